use clap::Parser;
use tally_console::{AppState, Config};

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("console");
    let config = Config::parse();
    // Refuses to start without a way to check tokens, like the APIs.
    let (state, targets) = AppState::new(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, query_url = %config.query_url, "console listening");
    tally_console::run(
        listener,
        state,
        targets,
        &config.shutdown,
        tally_service::shutdown::signal(),
    )
    .await?;
    tally_service::telemetry::shutdown();
    Ok(())
}
