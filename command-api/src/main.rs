use clap::Parser;
use tally_command_api::{AppState, Config};
use tally_event_store::EventStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("command-api");
    let config = Config::parse();
    let pool = tally_event_store::connect(&config.database_url, config.db_connections_max)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "command API listening");
    let state = AppState {
        store: EventStore::new(pool),
    };
    tally_command_api::run(listener, state, tally_service::shutdown::signal()).await?;
    Ok(())
}
