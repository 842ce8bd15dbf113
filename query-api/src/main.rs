use clap::Parser;
use tally_query_api::{AppState, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("query-api");
    let config = Config::parse();
    // Refuses to start without a way to check tokens.
    let edge = tally_service::edge::Edge::from_config(&config.auth, &config.limits)?;
    let state = AppState::connect(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, replica = config.replica_url.is_some(), "query API listening");
    tally_query_api::run(
        listener,
        state,
        &edge,
        &config.shutdown,
        tally_service::shutdown::signal(),
    )
    .await?;
    Ok(())
}
