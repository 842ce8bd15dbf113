//! `tally-baseline`: serves the benchmark baseline (see the library's docs and BENCHMARKS.md).

use clap::Parser;
use tally_baseline::{AppState, Config};

/// mimalloc, as in every Tally binary (`tally_service::Allocator`), so `tally/baseline` compares
/// the libraries, not the allocators.
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("baseline");
    let config = Config::parse();
    let pool = tally_baseline::connect(&config.database_url, config.db_connections_max)?;
    tally_baseline::migrate(&pool).await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "baseline listening");
    tally_baseline::run(listener, AppState::new(pool), tally_service::shutdown::signal()).await?;
    Ok(())
}
