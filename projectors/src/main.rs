use clap::Parser;
use tally_projectors::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("projector");
    let config = Config::parse();
    let pool = tally_event_store::connect(&config.database_url, config.db_connections_max)?;
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&config.nats_url)
        .await?;
    let js = async_nats::jetstream::new(nats);
    tally_projectors::consumer::run(pool, js, config, tally_service::shutdown::signal()).await
}
