use clap::Parser;
use tally_query_api::{AppState, Config};

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("query-api");
    tally_service::metrics::install();
    let config = Config::parse();
    // Refuses to start without a way to check tokens.
    let edge = tally_service::edge::Edge::from_config(&config.auth, &config.limits)?;
    let state = AppState::start(&config)?;
    let listeners = tally_service::shutdown::Listeners::bind(config.listen, config.ops_listen).await?;
    tracing::info!(
        listen = %listeners.main.local_addr()?,
        ops_listen = %listeners.ops.local_addr()?,
        replicas = config.replicas().len(),
        cache_max_entries = config.cache_max_entries,
        "query API listening"
    );
    tally_query_api::run(
        listeners,
        state,
        &edge,
        &config.shutdown,
        tally_service::shutdown::signal(),
    )
    .await?;
    tally_service::telemetry::shutdown();
    Ok(())
}
