use clap::Parser;
use tally_projectors::Config;

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("projector");
    tally_service::metrics::install();
    let config = Config::parse();
    let pool = tally_event_store::connect(&config.database_url, config.db_connections_max)?;
    let nats = config
        .nats
        .options()
        .retry_on_initial_connect()
        .connect(config.nats.servers()?)
        .await?;
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let router = tally_projectors::http::router(pool.clone(), nats.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the health and metrics endpoint stopped");
        }
    });
    let js = async_nats::jetstream::new(nats);
    let result = tally_projectors::run(pool, js, config, tally_service::shutdown::signal()).await;
    tally_service::telemetry::shutdown();
    result
}
