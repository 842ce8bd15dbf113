//! Where reads go: a pool of streaming replicas, with the primary as the fallback.
//!
//! A monitor checks every replica each `TALLY_REPLICA_CHECK_MS`: reachable, how far its replay
//! is behind the primary's WAL (bytes) and how old its last replayed commit is when it is
//! behind (seconds). A replica that is down or lags beyond either bound is left out of the
//! rotation until it is back within bounds; reads go round-robin over the others, and to the
//! primary when none is usable. `/ready` and `/metrics` report each replica's state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use utoipa::ToSchema;

/// How long one health check of one database may take before it counts as down.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a read waits for a pooled connection before answering 503.
pub const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// When a replica is too far behind to be read from.
#[derive(Debug, Clone, Copy)]
pub struct LagBounds {
    pub bytes_max: u64,
    pub seconds_max: f64,
}

/// The state of one replica as the last check saw it (`/ready` shows it).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplicaState {
    /// `host:port/database`: the URL without credentials.
    pub name: String,
    /// Whether reads go to it now: reachable and within both lag bounds.
    pub usable: bool,
    pub reachable: bool,
    /// Bytes of WAL the primary has written that this replica has not replayed (when the
    /// primary answered the same check).
    pub lag_bytes: Option<u64>,
    /// Age of the last replayed commit while the replica is behind; 0 when caught up.
    pub lag_seconds: Option<f64>,
    /// Why it is not usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub checked_at: Option<DateTime<Utc>>,
}

/// One replica: its pool and what the monitor last found.
#[derive(Debug)]
pub struct Replica {
    pub name: String,
    pub pool: PgPool,
    state: RwLock<ReplicaState>,
}

impl Replica {
    pub fn state(&self) -> ReplicaState {
        self.state.read().expect("replica state lock").clone()
    }

    fn usable(&self) -> bool {
        self.state.read().expect("replica state lock").usable
    }
}

/// Where one read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Replica,
    /// No replica is configured.
    Primary,
    /// Replicas are configured but none is usable.
    PrimaryFallback,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Replica => "replica",
            SourceKind::Primary => "primary",
            SourceKind::PrimaryFallback => "primary-fallback",
        }
    }
}

/// Every database this instance may read from.
#[derive(Debug)]
pub struct Sources {
    replicas: Vec<Replica>,
    primary: PgPool,
    bounds: LagBounds,
    next: AtomicUsize,
}

/// A URL without its user and password, for logs, metrics and `/ready`.
pub fn redact(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

fn pool(url: &str, connections_max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(connections_max)
        .acquire_timeout(READ_ACQUIRE_TIMEOUT)
        .connect_lazy(url)
}

impl Sources {
    /// Lazy pools: the instance starts whatever is down, and reports it.
    pub fn connect(
        replica_urls: &[String],
        primary_url: &str,
        connections_max: u32,
        bounds: LagBounds,
    ) -> Result<Self, sqlx::Error> {
        let replicas = replica_urls
            .iter()
            .map(|url| {
                let name = redact(url);
                Ok(Replica {
                    pool: pool(url, connections_max)?,
                    state: RwLock::new(ReplicaState {
                        name: name.clone(),
                        usable: false,
                        reachable: false,
                        lag_bytes: None,
                        lag_seconds: None,
                        reason: Some("not checked yet".into()),
                        checked_at: None,
                    }),
                    name,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Self {
            replicas,
            primary: pool(primary_url, connections_max)?,
            bounds,
            next: AtomicUsize::new(0),
        })
    }

    /// The pool for the next read: a usable replica (round-robin), else the primary.
    pub fn pick(&self) -> (&PgPool, SourceKind) {
        if self.replicas.is_empty() {
            return (&self.primary, SourceKind::Primary);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.replicas.len())
            .map(|i| &self.replicas[(start + i) % self.replicas.len()])
            .find(|r| r.usable())
            .map_or((&self.primary, SourceKind::PrimaryFallback), |r| {
                (&r.pool, SourceKind::Replica)
            })
    }

    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Checks every replica now (the monitor does this each interval).
    pub async fn check(&self) {
        let primary_lsn = tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text").fetch_one(&self.primary),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|lsn| parse_lsn(&lsn));
        // All at once: a replica that hangs must not delay the others' measurements.
        let states = futures::future::join_all(self.replicas.iter().map(|r| self.check_one(r, primary_lsn))).await;
        for (replica, state) in self.replicas.iter().zip(states) {
            let labels = [("replica", replica.name.clone())];
            metrics::gauge!("tally_replica_usable", &labels).set(if state.usable { 1.0 } else { 0.0 });
            if let Some(bytes) = state.lag_bytes {
                metrics::gauge!("tally_replica_lag_bytes", &labels).set(bytes as f64);
            }
            if let Some(seconds) = state.lag_seconds {
                metrics::gauge!("tally_replica_lag_seconds", &labels).set(seconds);
            }
            let was_usable = replica.usable();
            if was_usable != state.usable {
                tracing::warn!(replica = %replica.name, usable = state.usable, reason = ?state.reason, "replica rotation changed");
            }
            *replica.state.write().expect("replica state lock") = state;
        }
    }

    async fn check_one(&self, replica: &Replica, primary_lsn: Option<u64>) -> ReplicaState {
        let probe = sqlx::query_as::<_, (bool, Option<String>, Option<String>, Option<f64>)>(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, \
                    EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8",
        )
        .fetch_one(&replica.pool);
        let mut state = ReplicaState {
            name: replica.name.clone(),
            usable: false,
            reachable: false,
            lag_bytes: None,
            lag_seconds: None,
            reason: None,
            checked_at: Some(Utc::now()),
        };
        let (in_recovery, replay, receive, replay_age) = match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
            Ok(Ok(row)) => row,
            Ok(Err(error)) => {
                state.reason = Some(format!("unreachable: {error}"));
                return state;
            }
            Err(_) => {
                state.reason = Some("unreachable: the check timed out".into());
                return state;
            }
        };
        state.reachable = true;
        if !in_recovery {
            // A primary listed as a replica is never behind itself.
            state.lag_bytes = Some(0);
            state.lag_seconds = Some(0.0);
        } else {
            let replay = replay.as_deref().and_then(parse_lsn);
            state.lag_bytes = primary_lsn.zip(replay).map(|(p, r)| p.saturating_sub(r));
            let caught_up = match state.lag_bytes {
                Some(bytes) => bytes == 0,
                None => replay.is_some() && replay == receive.as_deref().and_then(parse_lsn),
            };
            state.lag_seconds = if caught_up {
                Some(0.0)
            } else {
                replay_age.map(|s| s.max(0.0))
            };
        }
        state.reason = match (state.lag_bytes, state.lag_seconds) {
            (Some(bytes), _) if bytes > self.bounds.bytes_max => {
                Some(format!("lags {bytes} bytes (bound {})", self.bounds.bytes_max))
            }
            (_, Some(seconds)) if seconds > self.bounds.seconds_max => {
                Some(format!("lags {seconds:.1} s (bound {} s)", self.bounds.seconds_max))
            }
            (_, None) if in_recovery => Some("has not replayed any commit yet".into()),
            _ => None,
        };
        state.usable = state.reason.is_none();
        state
    }

    /// Runs [`Self::check`] every `interval`, for as long as the process lives.
    pub async fn monitor(self: Arc<Self>, interval: Duration) {
        if self.replicas.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check().await;
        }
    }
}

/// `X/Y` (two hex halves) as a 64-bit WAL position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_position_parses_from_its_two_hex_halves() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn a_url_loses_its_credentials_when_shown() {
        assert_eq!(
            redact("postgres://user:secret@db.example:5433/tally?sslmode=require"),
            "db.example:5433/tally"
        );
        assert_eq!(redact("postgres://127.0.0.1:5432/tally"), "127.0.0.1:5432/tally");
    }
}
