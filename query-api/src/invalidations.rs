//! The caches of one instance and the NATS subscription that keeps them honest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::Event;
use futures::StreamExt;
use tally_event_store::nats_users::NatsArgs;
use tally_schemas::invalidation::{Invalidation, invalidation_wildcard};

use crate::cache::{VersionedCache, floor_ttl};
use crate::views::{AccountView, TransferView};

/// Events from the NATS client queued for the listener; more while it is busy are dropped
/// (a lost `Connected` is recovered by the state check after each message).
const CONNECTION_EVENTS_MAX: usize = 64;

/// Sizes of the caches (`TALLY_QUERY_CACHE_*`).
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Rows per cache; 0 turns caching off.
    pub entries_max: u64,
    /// A cached row is dropped this long after it was loaded, invalidated or not.
    pub ttl: Duration,
    /// The replica lag bound, which the floors must outlive.
    pub replica_lag_max: Duration,
}

/// Every cache of one instance. They are only used while `live`: subscribed to the
/// invalidations and connected.
#[derive(Debug)]
pub struct Caches {
    pub accounts: VersionedCache<AccountView>,
    pub transfers: VersionedCache<TransferView>,
    live: Arc<AtomicBool>,
}

impl Caches {
    pub fn new(config: CacheConfig) -> Self {
        let live = Arc::new(AtomicBool::new(false));
        let floors = floor_ttl(config.replica_lag_max);
        Self {
            accounts: VersionedCache::new("accounts", config.entries_max, config.ttl, floors, live.clone()),
            transfers: VersionedCache::new("transfers", config.entries_max, config.ttl, floors, live.clone()),
            live,
        }
    }

    /// Whether the caches are in use (the invalidation feed is up).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn set_live(&self, live: bool) {
        if self.live.swap(live, Ordering::SeqCst) != live {
            tracing::info!(
                live,
                "query cache {}",
                if live { "on" } else { "off: invalidation feed down" }
            );
        }
        metrics::gauge!("tally_query_cache_live").set(if live { 1.0 } else { 0.0 });
    }

    fn clear(&self) {
        self.accounts.clear();
        self.transfers.clear();
    }

    /// Applies one message from a projector.
    pub async fn apply(&self, invalidation: &Invalidation) {
        let cache_of = |projection: &str| match projection {
            "accounts" => Some(Cache::Accounts),
            "transfers" => Some(Cache::Transfers),
            _ => None,
        };
        let Some(cache) = cache_of(&invalidation.projection) else {
            return;
        };
        for row in &invalidation.rows {
            match cache {
                Cache::Accounts => self.accounts.invalidate(row.id, row.version).await,
                Cache::Transfers => self.transfers.invalidate(row.id, row.version).await,
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Cache {
    Accounts,
    Transfers,
}

/// Subscribes to every projection's invalidations on `nats` and applies them, for as long
/// as the process lives. The caches are off until the subscription is in place, and off again
/// (and emptied) whenever the connection drops: invalidations sent meanwhile are lost.
pub async fn listen(caches: Arc<Caches>, nats: NatsArgs, subject_prefix: String) {
    let (events, mut connection) = tokio::sync::mpsc::channel::<Event>(CONNECTION_EVENTS_MAX);
    let servers = match nats.servers() {
        Ok(servers) => servers,
        Err(error) => {
            tracing::error!(%error, "NATS URL rejected; the query cache stays off");
            return;
        }
    };
    let client = nats
        .options()
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let _ = events.try_send(event);
            }
        })
        .connect(servers)
        .await;
    let client = match client {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "NATS options rejected; the query cache stays off");
            return;
        }
    };
    let subject = invalidation_wildcard(&subject_prefix);
    let mut subscription = match client.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, %subject, "subscribing to invalidations failed; the query cache stays off");
            return;
        }
    };
    let go_live = || async {
        // The server has our subscription once a round trip after it completes.
        if client.flush().await.is_ok() && client.connection_state() == async_nats::connection::State::Connected {
            caches.clear();
            caches.set_live(true);
        }
    };
    go_live().await;
    loop {
        tokio::select! {
            message = subscription.next() => {
                let Some(message) = message else {
                    tracing::error!("invalidation subscription ended; the query cache stays off");
                    caches.set_live(false);
                    caches.clear();
                    return;
                };
                match serde_json::from_slice::<Invalidation>(&message.payload) {
                    Ok(invalidation) => caches.apply(&invalidation).await,
                    Err(error) => tracing::warn!(%error, subject = %message.subject, "ignoring a malformed invalidation"),
                }
                if !caches.is_live() && client.connection_state() == async_nats::connection::State::Connected {
                    go_live().await;
                }
            }
            Some(event) = connection.recv() => match event {
                Event::Connected => go_live().await,
                Event::Disconnected | Event::Closed => {
                    caches.set_live(false);
                    caches.clear();
                }
                _ => {}
            },
        }
    }
}
