//! `tally projections ...`: status, pause, resume, retry and rebuild of the read models.

use std::process::ExitCode;

use clap::Subcommand;
use tally_projectors::{ops, rebuild};

use crate::progress::ProgressReporter;

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Per projection and partition: generation, state, worker, position, lag, errors.
    Status {
        /// One JSON object per partition, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Stop applying events to a projection (after the batches in hand); reads go on.
    Pause { name: String },
    /// Undo `pause`.
    Resume { name: String },
    /// Let partitions stopped at a poison event try it again (after the fix).
    Retry {
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
    },
    /// Build a new generation of a projection from the log and switch readers to it.
    /// NAME is a projection (`accounts`, `transfers`) or one of its read models
    /// (`account_balances`, `account_statement`, `ledger_totals`, `transfers`).
    Rebuild {
        name: String,
        /// The deployment's partition count (per-partition rows are keyed by it).
        #[arg(long, env = "TALLY_PARTITIONS", default_value_t = tally_event_store::partition::PARTITIONS_DEFAULT)]
        partitions: u32,
    },
}

pub async fn run(database_url: &str, command: ProjectionsCommand) -> ExitCode {
    match execute(database_url, command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(database_url: &str, command: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    let pool = tally_event_store::connect(database_url, 4)?;
    match command {
        ProjectionsCommand::Status { json } => {
            let rows = ops::status(&pool).await?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                print_status(&rows);
            }
        }
        ProjectionsCommand::Pause { name } => {
            let projection = ops::set_paused(&pool, &name, true).await?;
            println!("{projection}: paused");
        }
        ProjectionsCommand::Resume { name } => {
            let projection = ops::set_paused(&pool, &name, false).await?;
            println!("{projection}: resumed");
        }
        ProjectionsCommand::Retry { name, partition } => {
            let n = ops::retry(&pool, &name, partition).await?;
            println!("{name}: {n} failed partition(s) will retry");
        }
        ProjectionsCommand::Rebuild { name, partitions } => {
            let mut reporter = ProgressReporter::new("rebuilt");
            let result = rebuild::rebuild(&pool, &name, partitions, |p| reporter.update(p)).await;
            reporter.finish();
            let report = result?;
            println!(
                "{}: generation {} live (replaced {}), {} events read, {} applied in {:.1} s ({:.0} events/s)",
                report.projection,
                report.generation,
                report.replaced.map_or("none".to_string(), |g| g.to_string()),
                report.events,
                report.applied,
                report.elapsed.as_secs_f64(),
                report.events_per_second()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(rows: &[ops::PartitionStatus]) {
    println!(
        "{:<10} {:>4} {:>4} {:<14} {:<24} {:>10} {:>8} {:>8} {:>10} {:>6}  last error",
        "projection", "part", "gen", "state", "worker", "position", "lag", "lag s", "applied", "dead"
    );
    for r in rows {
        let generation = match r.building {
            Some(b) => format!("{}>{b}", r.generation.unwrap_or(0)),
            None => r.generation.unwrap_or(0).to_string(),
        };
        println!(
            "{:<10} {:>4} {:>4} {:<14} {:<24} {:>10} {:>8} {:>8.1} {:>10} {:>6}  {}",
            r.projection,
            r.partition,
            generation,
            r.state,
            r.worker.as_deref().unwrap_or("-"),
            r.position,
            r.lag_events,
            r.lag_seconds,
            r.applied,
            r.dead_letters,
            r.last_error.as_deref().unwrap_or("")
        );
    }
}
