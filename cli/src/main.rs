//! `tally`: operate and audit a Tally deployment.
//!
//! `tally load` generates HTTP load against a command API (see `load.rs`); `tally token`
//! mints a bearer token for the local stack (see `token.rs`).
//!
//! `tally audit verify` exits 0 when every chain is intact, 1 at the first broken event and 2
//! when it could not read the log (clap also uses 2 for a malformed command line).

mod load;
mod token;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tally_event_store::verify::{self, Progress, Scope, VerifyReport};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "tally", about = "Operate and audit a Tally deployment", version)]
struct Cli {
    /// Postgres primary.
    #[arg(
        long,
        global = true,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the event store and read-model tables.
    Migrate,
    /// Check the stored log for tampering.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Generate load against a command API and measure throughput and latency.
    Load(load::LoadArgs),
    /// Mint an HS256 bearer token with roles (for the local stack; print it on stdout).
    Token(token::TokenArgs),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute every event's hash and check every stream's chain; report the first break.
    Verify {
        /// Verify only this stream.
        #[arg(long, value_name = "UUID")]
        stream: Option<Uuid>,
    },
}

/// Exit code: the log was read and a chain is broken.
const EXIT_BROKEN: u8 = 1;
/// Exit code: the log could not be read (unreachable database, SQL error).
const EXIT_DATABASE: u8 = 2;
/// How often progress is logged when stderr is not a terminal (a job's log, a pipe).
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> ExitCode {
    tally_service::telemetry::init("tally");
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate => match migrate(&cli.database_url).await {
            Ok(()) => {
                println!("migrated");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("Error: {e:?}");
                ExitCode::FAILURE
            }
        },
        Command::Audit {
            command: AuditCommand::Verify { stream },
        } => audit_verify(&cli.database_url, stream).await,
        Command::Token(args) => exit_code(token::run(&args)),
        Command::Load(args) => exit_code(load::run(args).await),
    }
}

/// Success, or the error's chain on stderr and a failure.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let pool = tally_event_store::connect(database_url, 2)?;
    tally_event_store::migrate(&pool).await?;
    tally_projectors::migrate(&pool).await?;
    Ok(())
}

async fn audit_verify(database_url: &str, stream: Option<Uuid>) -> ExitCode {
    // One connection: the verifier reads one page at a time.
    let pool = match tally_event_store::connect(database_url, 1) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot verify the event log: bad database URL: {e}");
            return ExitCode::from(EXIT_DATABASE);
        }
    };
    let scope = stream.map_or(Scope::All, Scope::Stream);
    let mut reporter = ProgressReporter::new();
    let result = verify::verify(&pool, scope, |p| reporter.update(p)).await;
    reporter.finish();
    match result {
        Ok(report) => print_report(&report, stream),
        Err(e) => {
            eprintln!("error: cannot verify the event log: {e}");
            ExitCode::from(EXIT_DATABASE)
        }
    }
}

fn print_report(report: &VerifyReport, stream: Option<Uuid>) -> ExitCode {
    let counted = format!(
        "{} in {}",
        plural(report.events_checked, "event"),
        plural(report.streams_checked, "stream")
    );
    match &report.first_break {
        None => {
            println!("OK: {counted} verified, chains intact");
            if let Some(id) = stream.filter(|_| report.events_checked == 0) {
                // Vacuously intact; say so rather than let a typo pass for a clean audit.
                eprintln!("note: stream {id} has no events");
            }
            ExitCode::SUCCESS
        }
        Some(broken) => {
            println!("BROKEN: {broken}");
            eprintln!("stopped at the first break after checking {counted}");
            ExitCode::from(EXIT_BROKEN)
        }
    }
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Shows progress on stderr: a bar on a terminal, a log line every [`PROGRESS_LOG_INTERVAL`]
/// otherwise (a bar's redraws would fill a log file with control characters).
enum ProgressReporter {
    Bar(ProgressBar),
    Log {
        started: Instant,
        logged: Instant,
        /// `None` until the verifier has counted the events (it may fail before).
        latest: Option<Progress>,
    },
}

impl ProgressReporter {
    fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events, {per_sec:0}, ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Self::Bar(bar)
        } else {
            let now = Instant::now();
            Self::Log {
                started: now,
                logged: now,
                latest: None,
            }
        }
    }

    fn update(&mut self, progress: Progress) {
        match self {
            Self::Bar(bar) => {
                // Events appended since the count was taken may push `done` past it.
                bar.set_length(progress.total.max(progress.done));
                bar.set_position(progress.done);
            }
            Self::Log {
                started,
                logged,
                latest,
            } => {
                *latest = Some(progress);
                if logged.elapsed() >= PROGRESS_LOG_INTERVAL {
                    log_progress(*started, progress);
                    *logged = Instant::now();
                }
            }
        }
    }

    /// Clears the bar (the verdict follows on stdout) or logs where verification ended.
    fn finish(self) {
        match self {
            Self::Bar(bar) => bar.finish_and_clear(),
            Self::Log { started, latest, .. } => {
                if let Some(progress) = latest {
                    log_progress(started, progress);
                }
            }
        }
    }
}

fn log_progress(started: Instant, progress: Progress) {
    let seconds = started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        progress.done as f64 / seconds
    } else {
        0.0
    };
    tracing::info!(
        "verified {}/{} events ({rate:.0} events/s)",
        progress.done,
        progress.total.max(progress.done)
    );
}
