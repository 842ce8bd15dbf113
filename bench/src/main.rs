//! `tally-bench`: the measurements of `cargo xtask bench`, one per invocation, each printing
//! one JSON object on stdout. Built in release mode so the measuring side is never the
//! bottleneck; xtask starts the servers and services and collects the results.

use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use tally_bench::nats::PublishPlan;
use tally_bench::raw::{RawBatchInsert, RawInsert};
use tally_bench::runner::closed_loop;
use tally_bench::store::StoreAppend;
use tally_bench::{Measurement, Window};
use tally_event_store::EventStore;
use tally_event_store::nats_users::NatsArgs;
use tally_event_store::partition::{self, Topology};

#[derive(Debug, Parser)]
#[command(name = "tally-bench", about = "Benchmark measurements for `cargo xtask bench`")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The Postgres limit: single-row INSERT transactions into a copy of `events`.
    RawAppend(AppendArgs),
    /// Single-event appends through `EventStore::append`.
    StoreAppend(AppendArgs),
    /// The limit of batches of transfers: their rows in one multi-row INSERT per transaction.
    RawBatchAppend {
        #[command(flatten)]
        append: AppendArgs,
        /// Transfers per transaction (three rows each).
        #[arg(long)]
        transfers: usize,
    },
    /// Writes a backlog of events for the relay scenario.
    Preload {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long)]
        events: u64,
    },
    /// Writes a log of account events (an opening, then deposits) for the rebuild scenario.
    RebuildPreload {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long)]
        events: u64,
    },
    /// The rebuild limit: the whole log read in commit order, nothing done with it.
    ReadLog {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Rebuilds the `accounts` projection from the log.
    Rebuild {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, default_value_t = partition::PARTITIONS_DEFAULT)]
        partitions: u32,
    },
    /// Deposits at a steady rate; the time from each `201` to `account_balances` showing it.
    ProjectionLag {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long)]
        command_url: String,
        /// Where the projector announces its commits (`TALLY_NATS_URL`, `TALLY_SUBJECT_PREFIX`).
        #[command(flatten)]
        nats: NatsArgs,
        #[arg(long)]
        subject_prefix: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Writes and projects the accounts the read scenarios read; lists them in a file.
    ReadsPrepare {
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Account events to write (an opening and 99 deposits per account).
        #[arg(long)]
        events: u64,
        #[arg(long, default_value_t = partition::PARTITIONS_DEFAULT)]
        partitions: u32,
        #[arg(long)]
        accounts_file: std::path::PathBuf,
    },
    /// The read limits: a minimal HTTP server on the query API's paths (runs until killed).
    ServeLimit {
        #[arg(long, value_enum, env = "TALLY_BENCH_LIMIT_MODE")]
        mode: tally_bench::reads::LimitMode,
        #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, env = "TALLY_BENCH_LISTEN")]
        listen: std::net::SocketAddr,
        /// Database connections (row mode), as many as the query API's pool.
        #[arg(long, env = "TALLY_BENCH_DB_CONNECTIONS", default_value_t = 32)]
        connections: u32,
    },
    /// The JetStream limit: pipelined publishes with `Nats-Msg-Id`.
    NatsPublish {
        #[command(flatten)]
        nats: NatsArgs,
        #[arg(long)]
        messages: u64,
        #[arg(long)]
        message_bytes: usize,
        #[arg(long, default_value_t = 1_024)]
        in_flight_max: usize,
        /// A stream of its own: deleted and created fresh, deleted again at the end.
        #[arg(long, default_value = "BENCH_RAW")]
        stream: String,
        #[arg(long, default_value = "bench.raw")]
        subject_prefix: String,
        #[arg(long, default_value_t = partition::PARTITIONS_DEFAULT)]
        partitions: u32,
    },
}

#[derive(Debug, clap::Args)]
struct AppendArgs {
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Concurrent writers, each with its own connection and its own streams.
    #[arg(long)]
    writers: usize,
    /// Measured window, in milliseconds.
    #[arg(long)]
    duration_ms: u64,
    /// Unrecorded warm-up before the window, in milliseconds.
    #[arg(long, default_value_t = 0)]
    warmup_ms: u64,
}

impl AppendArgs {
    fn window(&self) -> Window {
        Window {
            warmup: Duration::from_millis(self.warmup_ms),
            measure: Duration::from_millis(self.duration_ms),
        }
    }

    /// One pooled connection per writer, so writers never wait for each other's connections.
    fn store(&self) -> anyhow::Result<EventStore> {
        anyhow::ensure!(self.writers > 0, "--writers must be at least 1");
        let connections = u32::try_from(self.writers)?;
        Ok(EventStore::new(tally_event_store::connect(
            &self.database_url,
            connections,
        )?))
    }
}

/// mimalloc, as in every Tally binary (`tally_service::Allocator`): the limits run on the
/// allocator Tally runs on.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::RawAppend(args) => {
            let store = args.store()?;
            tally_bench::raw::ensure_table(store.pool()).await?;
            let writers = (0..args.writers)
                .map(|_| RawInsert::new(store.pool().clone()))
                .collect();
            print(&closed_loop(writers, args.window()).await?)
        }
        Command::RawBatchAppend { append, transfers } => {
            anyhow::ensure!(transfers > 0, "--transfers must be at least 1");
            let store = append.store()?;
            tally_bench::raw::ensure_table(store.pool()).await?;
            let writers = (0..append.writers)
                .map(|_| RawBatchInsert::new(store.pool().clone(), transfers))
                .collect();
            print(&closed_loop(writers, append.window()).await?)
        }
        Command::StoreAppend(args) => {
            let store = args.store()?;
            let writers = (0..args.writers).map(|_| StoreAppend::new(store.clone())).collect();
            print(&closed_loop(writers, args.window()).await?)
        }
        Command::Preload { database_url, events } => {
            let store = EventStore::new(tally_event_store::connect(&database_url, 1)?);
            print(&tally_bench::preload::preload(&store, events).await?)
        }
        Command::RebuildPreload { database_url, events } => {
            let store = EventStore::new(tally_event_store::connect(&database_url, 1)?);
            print(&tally_bench::rebuild::preload(&store, events).await?)
        }
        Command::ReadLog { database_url } => {
            let store = EventStore::new(tally_event_store::connect(&database_url, 1)?);
            print(&tally_bench::rebuild::read_log(&store).await?)
        }
        Command::Rebuild {
            database_url,
            partitions,
        } => {
            let store = EventStore::new(tally_event_store::connect(&database_url, 4)?);
            print(&tally_bench::rebuild::rebuild(&store, partitions).await?)
        }
        Command::ProjectionLag {
            database_url,
            command_url,
            nats,
            subject_prefix,
            token,
            rate,
            duration_ms,
        } => {
            let pool = tally_event_store::connect(&database_url, 2)?;
            let plan = tally_bench::lag::LagPlan {
                command_url,
                nats,
                subject_prefix,
                token,
                rate_per_s: rate,
                duration: Duration::from_millis(duration_ms),
            };
            print(&tally_bench::lag::measure(&pool, &plan).await?)
        }
        Command::ReadsPrepare {
            database_url,
            events,
            partitions,
            accounts_file,
        } => {
            let store = EventStore::new(tally_event_store::connect(&database_url, 4)?);
            print(&tally_bench::reads::prepare(&store, events, partitions, &accounts_file).await?)
        }
        Command::ServeLimit {
            mode,
            database_url,
            listen,
            connections,
        } => tally_bench::reads::serve(mode, &database_url, listen, connections).await,
        Command::NatsPublish {
            nats,
            messages,
            message_bytes,
            in_flight_max,
            stream,
            subject_prefix,
            partitions,
        } => {
            let js = async_nats::jetstream::new(nats.options().connect(nats.servers()?).await?);
            let plan = PublishPlan {
                messages,
                message_bytes,
                in_flight_max,
                topology: Topology {
                    stream_name: stream,
                    subject_prefix,
                    partitions,
                    ..Topology::default()
                },
            };
            let measured: Measurement = tally_bench::nats::publish_limit(&js, &plan).await?;
            print(&measured)
        }
    }
}

fn print(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
