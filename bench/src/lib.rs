//! Tally's benchmark kit: the measurements behind `cargo xtask bench` (see BENCHMARKS.md).
//!
//! Every Tally number is reported as a ratio against a *limit* measured in the same run, on the
//! same machine, at the same concurrency and for the same duration: a speed claim without its
//! limit says nothing about how close to the hardware the code is.
//!
//! - [`raw`]: the Postgres limit of an append, plain single-row INSERT transactions.
//! - [`store`]: the same appends through `tally_event_store::EventStore::append`.
//! - [`preload`]: a backlog for the relay scenario, written in large appends.
//! - [`nats`]: the JetStream limit of the relay, pipelined publishes with `Nats-Msg-Id`.
//! - [`relay`]: watches a running `tally-relay` drain a backlog.
//! - [`lag`]: the time from a deposit's `201` to the read model showing it.
//! - [`rebuild`]: a log of account events, read raw (the limit) and rebuilt into read models.
//! - [`reads`]: the read scenarios' accounts and limits (a fixed-body and a one-query server).
//! - [`runner`], [`measurement`]: closed-loop workers and what a measurement reports.
//! - [`report`]: `target/bench/report.json`, the table and the machine's description.
//! - [`chart`]: `target/bench/report.png`, the ratios and latencies as bar charts.
//!
//! The measuring code runs in the release binary `tally-bench`; `cargo xtask bench` only
//! orchestrates (starts servers and services, runs the binaries, writes the report).

pub mod chart;
pub mod lag;
pub mod measurement;
pub mod nats;
pub mod preload;
pub mod raw;
pub mod reads;
pub mod rebuild;
pub mod relay;
pub mod report;
pub mod runner;
pub mod sample;
pub mod store;

pub use measurement::{Bracket, LatencyMs, Measurement};
pub use runner::Window;
