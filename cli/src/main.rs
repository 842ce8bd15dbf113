//! `tally`: operate and audit a Tally deployment.
//!
//! `tally load` generates HTTP load against a command API (see `load.rs`); `tally token`
//! mints a bearer token for the local stack (see `token.rs`); `tally ledger reconcile` compares
//! the read models with the log (see `ledger.rs`).
//!
//! `tally audit verify` exits 0 when every chain is intact, 1 at the first broken event and 2
//! when it could not read the log (clap also uses 2 for a malformed command line). With
//! `--checkpoint FILE` it also checks the log against signed checkpoints (`checkpoints.rs`;
//! `tally audit keygen` and `tally audit seal` make them), with the same exit codes.

mod checkpoints;
mod export;
mod ledger;
mod load;
mod progress;
mod projections;
mod token;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use progress::ProgressReporter;
use tally_event_store::verify::{self, Scope, VerifyReport};
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
    /// Create or upgrade the event store and read-model tables, and the service roles
    /// (tally_command, tally_relay, tally_projector, tally_query, tally_sealer) with their
    /// privileges.
    Migrate(MigrateArgs),
    /// Check the stored log for tampering.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check the ledger's read models against the log.
    Ledger {
        #[command(subcommand)]
        command: ledger::LedgerCommand,
    },
    /// Generate load against a command API and measure throughput and latency.
    Load(load::LoadArgs),
    /// Inspect and control the projections (read models).
    Projections {
        #[command(subcommand)]
        command: projections::ProjectionsCommand,
    },
    /// Mint an HS256 bearer token with roles (for the local stack; print it on stdout).
    Token(token::TokenArgs),
}

/// Passwords of the service roles: each one given is set (again) on its role, so each service
/// can log in over a password-checked connection with its own URL. Without them the roles
/// keep the passwords they have (none when new: enough where Postgres trusts local clients).
#[derive(Debug, clap::Args)]
struct MigrateArgs {
    #[arg(long, env = "TALLY_COMMAND_DB_PASSWORD", hide_env_values = true)]
    command_db_password: Option<String>,
    #[arg(long, env = "TALLY_RELAY_DB_PASSWORD", hide_env_values = true)]
    relay_db_password: Option<String>,
    #[arg(long, env = "TALLY_PROJECTOR_DB_PASSWORD", hide_env_values = true)]
    projector_db_password: Option<String>,
    #[arg(long, env = "TALLY_QUERY_DB_PASSWORD", hide_env_values = true)]
    query_db_password: Option<String>,
    #[arg(long, env = "TALLY_SEALER_DB_PASSWORD", hide_env_values = true)]
    sealer_db_password: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute every event's hash and check every stream's chain; report the first break.
    /// With --checkpoint, also recompute the Merkle tree over the log and check it against
    /// signed checkpoints.
    Verify {
        /// Verify only this stream.
        #[arg(long, value_name = "UUID", conflicts_with = "checkpoint")]
        stream: Option<Uuid>,
        /// A signed checkpoint, or a checkpoint history file (JSON Lines), to check the log
        /// against: each signature, then the root and last event at each tree size.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// The public key of the checkpoints' signer (`<key>.pub` from `tally audit keygen`).
        #[arg(long, value_name = "FILE", env = "TALLY_CHECKPOINT_PUBLIC_KEY_FILE")]
        public_key: Option<PathBuf>,
    },
    /// Generate an Ed25519 key pair for signing checkpoints.
    Keygen(checkpoints::KeygenArgs),
    /// Seal a signed checkpoint of the log: extend the history file's last one with the events
    /// committed since, sign it, append it (and publish a copy to the database). With --every,
    /// keep doing so periodically (the sealer).
    Seal(checkpoints::SealArgs),
    /// Write the global feed (from a query API, `auditor` role) as JSON Lines, with its SHA-256.
    Export(export::ExportArgs),
}

/// Exit code: the log was read and a chain is broken.
const EXIT_BROKEN: u8 = 1;
/// Exit code: the log could not be read (unreachable database, SQL error).
const EXIT_DATABASE: u8 = 2;

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    tally_service::telemetry::init("tally");
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate(args) => match migrate(&cli.database_url, &args).await {
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
            command:
                AuditCommand::Verify {
                    stream,
                    checkpoint,
                    public_key,
                },
        } => audit_verify(&cli.database_url, stream, checkpoint.as_deref(), public_key.as_deref()).await,
        Command::Audit {
            command: AuditCommand::Keygen(args),
        } => exit_code(checkpoints::keygen(&args)),
        Command::Audit {
            command: AuditCommand::Seal(args),
        } => exit_code(checkpoints::seal(&cli.database_url, &args).await),
        Command::Audit {
            command: AuditCommand::Export(args),
        } => exit_code(export::run(args).await),
        Command::Ledger { command } => ledger::run(&cli.database_url, command).await,
        Command::Projections { command } => projections::run(&cli.database_url, command).await,
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

async fn migrate(database_url: &str, args: &MigrateArgs) -> anyhow::Result<()> {
    use tally_event_store::roles;
    let pool = tally_event_store::connect(database_url, 2)?;
    tally_event_store::migrate(&pool).await?;
    tally_projectors::migrate(&pool).await?;
    let passwords = [
        (roles::COMMAND, &args.command_db_password),
        (roles::RELAY, &args.relay_db_password),
        (roles::PROJECTOR, &args.projector_db_password),
        (roles::QUERY, &args.query_db_password),
        (roles::SEALER, &args.sealer_db_password),
    ];
    for (role, password) in passwords {
        if let Some(password) = password {
            roles::set_password(&pool, role, password).await?;
        }
    }
    Ok(())
}

async fn audit_verify(
    database_url: &str,
    stream: Option<Uuid>,
    checkpoint: Option<&Path>,
    public_key: Option<&Path>,
) -> ExitCode {
    // Signatures first: no use reading the log against checkpoints nobody can vouch for.
    let heads = match checkpoint.map(|path| checkpoints::signed_heads(path, public_key)) {
        None => None,
        Some(Ok(heads)) => Some(heads),
        Some(Err(code)) => return code,
    };
    // One connection: the verifier reads one page at a time.
    let pool = match tally_event_store::connect(database_url, 1) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot verify the event log: bad database URL: {e}");
            return ExitCode::from(EXIT_DATABASE);
        }
    };
    let scope = stream.map_or(Scope::All, Scope::Stream);
    let mut reporter = ProgressReporter::new("verified");
    let result = verify::verify(&pool, scope, |p| reporter.update(p)).await;
    reporter.finish();
    let chains = match result {
        Ok(report) => print_report(&report, stream),
        Err(e) => {
            eprintln!("error: cannot verify the event log: {e}");
            return ExitCode::from(EXIT_DATABASE);
        }
    };
    match heads {
        // A broken chain is reported first: it names the event.
        Some(heads) if chains == ExitCode::SUCCESS => {
            checkpoints::check_log(&pool, &heads).await.unwrap_or(ExitCode::SUCCESS)
        }
        _ => chains,
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
