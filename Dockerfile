# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a small Debian image as a
# non-root user. Migrations are embedded in the binary; nothing else is needed at run time.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Build the dependencies first so that code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/domain.rs \
    && cargo build --release --locked --bin dapi \
    && rm -rf src benches
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin dapi

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dapi
COPY --from=build /src/target/release/dapi /usr/local/bin/dapi
USER dapi
ENV DAPI_BIND=0.0.0.0:8000 \
    DAPI_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/dapi"]
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["/usr/local/bin/dapi", "healthcheck"]
CMD ["serve"]
