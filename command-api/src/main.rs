use clap::Parser;
use tally_command_api::writer::Writer;
use tally_command_api::{AppState, Config};
use tally_event_store::EventStore;
use tally_service::edge::Edge;

/// Longest wait, after the last request, for queued commands to commit on shutdown.
const WRITER_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("command-api");
    tally_service::metrics::install();
    let config = Config::parse();
    // Refuses to start without a way to check tokens.
    let edge = Edge::from_config(&config.auth, &config.limits)?;
    let pool = tally_event_store::connect(&config.database_url, config.db_connections_max)?;
    let listeners = tally_service::shutdown::Listeners::bind(config.listen, config.ops_listen).await?;
    tracing::info!(listen = %listeners.main.local_addr()?,
        ops_listen = %listeners.ops.local_addr()?, "command API listening");
    // Commits notify the relay (`tally_event_store::notify`), which then need not poll often.
    let store = EventStore::new(pool).notifying();
    let (writer, drained) = Writer::spawn(store.clone(), config.writer());
    if let Some(days) = config.idempotency_retention_days {
        let retention = std::time::Duration::from_secs(u64::from(days) * 86_400);
        tokio::spawn(tally_command_api::prune_idempotency_keys(store.clone(), retention));
    }
    let expiry_interval = std::time::Duration::from_millis(config.expiry_interval_ms);
    let expiry = tokio::spawn(tally_command_api::expiry::run(
        store.clone(),
        writer.clone(),
        expiry_interval,
    ));
    let state = AppState { store, writer };
    tally_command_api::run(
        listeners,
        state,
        &edge,
        &config.shutdown,
        tally_service::shutdown::signal(),
    )
    .await?;
    // The worker holds a writer handle too; stop it so the writer can drain and end.
    expiry.abort();
    let _ = expiry.await;
    // Every handler has returned, so every clone of the writer is gone: it finishes what it
    // has queued and stops.
    if tokio::time::timeout(WRITER_DRAIN_MAX, drained).await.is_err() {
        tracing::warn!("the writer did not drain in time");
    }
    tally_service::telemetry::shutdown();
    Ok(())
}
