# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, run on a small Debian image as a
# non-root user. Migrations are embedded in the binary; nothing else is needed at run time.
# Needs BuildKit (Docker 23+, `docker compose`) or buildah/podman for `RUN --mount`.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cargo's registry and target directory live in build-cache mounts, so a code change
# rebuilds only dapi itself, whatever targets or workspace members Cargo.toml declares
# (no stub files to keep in step with it). The target directory is not part of any
# layer, so the binary is copied out in the same step. Cargo decides freshness by
# mtime, and COPY keeps the context's mtimes: a checkout older than the cached build
# (another branch, another worktree) would look up to date, so every source is touched.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    find . -path ./target -prune -o -type f -exec touch {} + \
    && cargo build --release --locked --bin dapi \
    && cp target/release/dapi /usr/local/bin/dapi

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dapi
COPY --from=build /usr/local/bin/dapi /usr/local/bin/dapi
USER dapi
ENV DAPI_BIND=0.0.0.0:8000 \
    DAPI_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/dapi"]
# Every role (serve, serve --no-flusher, flusher) answers /healthz on DAPI_BIND.
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["/usr/local/bin/dapi", "healthcheck"]
CMD ["serve"]
