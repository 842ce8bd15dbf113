//! Tally's integration suites, built as one test binary (one link, shared kit).
//! Every test talks to real Postgres and real NATS; see `tally_tests` for the isolation rules.

mod audit;
mod auth;
mod batches;
mod checkpoints;
mod connections;
mod console;
mod controls;
mod currencies;
mod e2e;
mod entries;
mod event_store;
mod failover;
mod idempotency;
mod lifecycle;
mod limits;
mod listing;
mod nats_auth;
mod observability;
mod outage;
mod projections;
mod query;
mod rebuild_reads;
mod reconcile;
mod relay;
mod roles;
mod schemas;
mod sealer;
mod shutdown;
mod transfers;
mod trial_balance;
mod writer;
