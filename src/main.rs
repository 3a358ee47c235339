//! The `dapi` binary: parses the command line and the environment (one set of options,
//! `config::SettingsArgs`), sets up logging, and hands over to the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's malloc showed as a quarter of the request path's CPU profile (perf); mimalloc
/// serves the many small, short-lived allocations of HTTP and Redis work far cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use dapi::app::{self, Roles};
use dapi::config::{Settings, SettingsArgs, VALUE_FORMATS};
use dapi::telemetry;

/// Stages chatbot dialogs in Redis, stores consented ones in PostgreSQL, serves them
/// page by page. Configured by the environment variables below.
#[derive(Debug, Parser)]
#[command(name = "dapi", version, next_line_help = true, after_help = VALUE_FORMATS)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Debug, Subcommand)]
#[command(next_line_help = true, after_help = VALUE_FORMATS)]
enum Command {
    /// Run the HTTP API and the flusher (the default).
    Serve {
        /// Run the HTTP API only; run `dapi flusher` elsewhere.
        #[arg(long)]
        no_flusher: bool,
    },
    /// Run the flusher only: move consented dialogs from Redis to PostgreSQL; serves
    /// /healthz, /readyz and /metrics on DAPI_BIND.
    Flusher,
    /// Apply database migrations and exit.
    Migrate,
    /// Exit 0 when the dapi at DAPI_BIND answers GET /healthz (for container health checks).
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::try_from(cli.settings) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("dapi: configuration error: {e}"); // allow: logging is configured by these very settings
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format, &settings.log_filter);

    // A stop asked for while dapi waits for PostgreSQL (start-up and `migrate` try for up
    // to 30 s) ends it at once, and cleanly: the signal handlers are in place before then.
    let roles = match cli.command.unwrap_or(Command::Serve { no_flusher: false }) {
        Command::Healthcheck => {
            return if app::healthcheck(settings.bind).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Migrate => {
            return tokio::select! {
                migrated = app::migrate(&settings) => match migrated {
                    Ok(()) => {
                        tracing::info!("migrations applied");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                () = app::termination_signal() => stopped_before_start(),
            };
        }
        Command::Serve { no_flusher } => Roles {
            http: true,
            flusher: !no_flusher,
        },
        Command::Flusher => Roles {
            http: false,
            flusher: true,
        },
    };

    let mut stop = tokio::spawn(app::termination_signal());
    let running = tokio::select! {
        started = app::start(settings, roles) => match started {
            Ok(running) => running,
            Err(e) => return fail(&e),
        },
        _ = &mut stop => return stopped_before_start(),
    };
    let shutdown = running.shutdown_token();
    tokio::spawn(async move {
        let _ = stop.await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    if running.wait().await {
        tracing::info!("stopped");
        ExitCode::SUCCESS
    } else {
        // `wait` logged what it abandoned; a supervisor should see that this stop was
        // not clean.
        ExitCode::FAILURE
    }
}

fn fail(error: &app::StartError) -> ExitCode {
    if let app::StartError::OpenOnNetwork(_) = error {
        // A setting to change, like any other configuration error.
        eprintln!("dapi: configuration error: {error}"); // allow: the same line as the other configuration errors
        return ExitCode::from(2);
    }
    tracing::error!(error = %telemetry::chain(error), "dapi cannot start");
    ExitCode::FAILURE
}

fn stopped_before_start() -> ExitCode {
    tracing::info!("stopped before it started");
    ExitCode::SUCCESS
}
