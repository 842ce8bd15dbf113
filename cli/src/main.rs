//! `tally`: operate and audit a Tally deployment.

use clap::{Parser, Subcommand};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("tally");
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate => {
            let pool = tally_event_store::connect(&cli.database_url, 2)?;
            tally_event_store::migrate(&pool).await?;
            tally_projectors::migrate(&pool).await?;
            println!("migrated");
        }
    }
    Ok(())
}
