//! `tally-relay`: publishes the event log to NATS JetStream. Run two or more; one is active.
//!
//! Its HTTP listener (`TALLY_RELAY_LISTEN`) serves `/health` (the process answers), `/ready`
//! (Postgres and NATS reachable and some relay holds the lock; the body says whether it is
//! this one) and `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use sqlx::PgPool;
use tally_event_store::nats_users::NatsArgs;
use tally_event_store::partition::{self, Topology};
use tally_event_store::relay::{Leadership, RelayConfig, RelayStatus};
use tally_service::Problem;

#[derive(Debug, Parser)]
#[command(
    name = "tally-relay",
    about = "Publishes Tally's event log to NATS JetStream",
    version
)]
struct Config {
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    database_url: String,
    /// NATS, signed in as the relay's user (`tally_relay`).
    #[command(flatten)]
    nats: NatsArgs,
    /// Address of the HTTP listener: `/health`, `/ready`, `/metrics`.
    #[arg(long, env = "TALLY_RELAY_LISTEN", default_value = "0.0.0.0:9092")]
    listen: SocketAddr,
    #[arg(long, env = "TALLY_NATS_STREAM", default_value = partition::STREAM_NAME_DEFAULT)]
    nats_stream: String,
    #[arg(long, env = "TALLY_SUBJECT_PREFIX", default_value = partition::SUBJECT_PREFIX_DEFAULT)]
    subject_prefix: String,
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = partition::PARTITIONS_DEFAULT)]
    partitions: u32,
    /// Copies of the stream a NATS cluster keeps (3 on a three-server cluster).
    #[arg(long, env = "TALLY_NATS_REPLICAS", default_value_t = partition::REPLICAS_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    nats_replicas: usize,
    /// Events read from Postgres per batch.
    #[arg(long, env = "TALLY_RELAY_BATCH_MAX", default_value_t = 2_000)]
    batch_events_max: i64,
    /// Publishes awaiting a JetStream ack at once.
    #[arg(long, env = "TALLY_RELAY_IN_FLIGHT_MAX", default_value_t = 1_024)]
    in_flight_max: usize,
    /// Longest idle poll interval, in milliseconds.
    #[arg(long, env = "TALLY_RELAY_POLL_MAX_MS", default_value_t = 50)]
    poll_interval_max_ms: u64,
    /// On SIGTERM, the longest wait for the batch in hand to be published and checkpointed
    /// before the lock is released, in milliseconds.
    #[arg(long, env = "TALLY_SHUTDOWN_DRAIN_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    shutdown_drain_ms: u64,
    /// TEST ONLY, never set in production (fault injection): abort the process right after the
    /// Nth batch was published and acknowledged by JetStream, before its checkpoint is stored.
    #[arg(long, env = "TALLY_RELAY_FAULT_CRASH_AFTER_PUBLISH", value_name = "BATCHES")]
    fault_crash_after_publish: Option<u32>,
}

/// mimalloc, as in every Tally binary (`tally_service::Allocator`).
#[global_allocator]
static ALLOCATOR: tally_service::Allocator = tally_service::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::telemetry::init("relay");
    tally_service::metrics::install();
    let config = Config::parse();
    let pool = tally_event_store::connect(&config.database_url, 4)?;
    // Connects in the background: the probes answer (503) while NATS is unreachable.
    let nats = config
        .nats
        .options()
        .retry_on_initial_connect()
        .connect(config.nats.servers()?)
        .await?;
    let status = Arc::new(RelayStatus::default());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "relay probes listening");
    let probes = router(Probes {
        pool: pool.clone(),
        nats: nats.clone(),
        status: status.clone(),
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, probes).await {
            tracing::error!(%error, "the health and metrics endpoint stopped");
        }
    });
    let js = async_nats::jetstream::new(nats);
    let relay = RelayConfig {
        topology: Topology {
            stream_name: config.nats_stream,
            subject_prefix: config.subject_prefix,
            partitions: config.partitions,
            replicas: config.nats_replicas,
        },
        batch_events_max: config.batch_events_max,
        in_flight_max: config.in_flight_max,
        poll_interval_max: Duration::from_millis(config.poll_interval_max_ms),
        crash_after_publish_batches: config.fault_crash_after_publish,
        ..RelayConfig::default()
    };
    let drain = Duration::from_millis(config.shutdown_drain_ms);
    tally_event_store::relay::run(pool, js, relay, &status, drain, tally_service::shutdown::signal()).await;
    tally_service::telemetry::shutdown();
    Ok(())
}

/// What the probes look at.
#[derive(Clone)]
struct Probes {
    pool: PgPool,
    nats: async_nats::Client,
    status: Arc<RelayStatus>,
}

fn router(probes: Probes) -> Router {
    tally_service::probes::router(get(ready)).with_state(probes)
}

/// `GET /ready`: 200 `{"role": "leader"|"standby"}` while Postgres and NATS are reachable and
/// some relay holds the lock (this one, or another that this one stands by for); else 503.
async fn ready(State(probes): State<Probes>) -> Response {
    let leadership = match tally_event_store::relay::leadership(&probes.pool, &probes.status).await {
        Ok(leadership) => leadership,
        Err(_) => {
            return Problem::unavailable(1)
                .detail("Postgres is unreachable.")
                .into_response();
        }
    };
    if probes.nats.connection_state() != async_nats::connection::State::Connected {
        return Problem::unavailable(1).detail("NATS is unreachable.").into_response();
    }
    let role = match leadership {
        Leadership::Leader => "leader",
        Leadership::Standby => "standby",
        Leadership::None => {
            return Problem::unavailable(1)
                .detail("No relay holds the lock yet: an election is under way, or none is running.")
                .into_response();
        }
    };
    axum::Json(serde_json::json!({ "role": role })).into_response()
}
