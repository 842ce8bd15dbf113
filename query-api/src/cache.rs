//! The in-process cache of read-model rows, kept honest by the projectors' invalidations.
//!
//! Each row carries the stream version it reflects. An invalidation (`key`, `version`) from
//! NATS (see `tally_schemas::invalidation`) raises the key's **floor** to `version` and drops a
//! cached row below it. The rule that makes replica lag harmless: **a row below its key's floor
//! is never cached**. A replica that has not yet replayed the projector's commit returns the
//! old row after the invalidation arrived; that row is served (it is what the replica has) but
//! not kept, so the next read asks the replica again.
//!
//! Why the order of operations is enough, with no lock: an invalidation sets the floor, then
//! removes a lower cached row; a load reads the row, inserts it only if it is not below the
//! floor, and after inserting checks the floor again, removing what it inserted if the floor
//! has passed it. Whichever of the two runs last sees the other's write.
//!
//! Bounds (TigerStyle: a limit on everything): rows by count (`TALLY_QUERY_CACHE_MAX_ENTRIES`,
//! 0 turns the cache off) with a TTL as a safety net; floors by count ([`FLOORS_MAX`]) and age
//! ([`floor_ttl`]), least recently set first. A floor only has to outlive the replica lag the
//! instance tolerates (replicas further behind are out of rotation), which is why its age is
//! tied to that bound. While the NATS connection is down the instance may miss
//! invalidations, so it empties the cache and reads straight through until it is back.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moka::policy::EvictionPolicy;
use uuid::Uuid;

/// Floors kept per cache: the most recently invalidated keys.
pub const FLOORS_MAX: u64 = 1_000_000;

/// How long a floor is kept: ten times the replica lag bound, and at least a minute.
pub fn floor_ttl(replica_lag_max: Duration) -> Duration {
    (replica_lag_max * 10).max(Duration::from_secs(60))
}

/// A row that knows the stream version it reflects.
pub trait Versioned: Send + Sync + 'static {
    fn version(&self) -> i64;
}

/// What a cached read found.
#[derive(Debug)]
pub enum Read<V> {
    Found(Arc<V>),
    Missing,
}

/// A read the database could not answer (the cause, for the logs).
#[derive(Debug, Clone)]
pub struct ReadFailed(pub String);

/// Why a load's result is not cached; shared by every caller waiting on the same load.
#[derive(Debug)]
enum NotCached<V> {
    /// Below the key's floor: served once, not kept.
    Stale(Arc<V>),
    Missing,
    Failed(String),
}

/// One read model's rows, keyed by the stream id they fold.
#[derive(Debug)]
pub struct VersionedCache<V: Versioned> {
    name: &'static str,
    values: Option<moka::future::Cache<Uuid, Arc<V>>>,
    floors: moka::sync::Cache<Uuid, i64>,
    /// Off while the invalidation feed is down (shared by every cache of the instance).
    live: Arc<AtomicBool>,
}

impl<V: Versioned> VersionedCache<V> {
    pub fn new(
        name: &'static str,
        entries_max: u64,
        ttl: Duration,
        floor_ttl: Duration,
        live: Arc<AtomicBool>,
    ) -> Self {
        let values = (entries_max > 0).then(|| {
            moka::future::Cache::builder()
                .name(name)
                .max_capacity(entries_max)
                .time_to_live(ttl)
                .build()
        });
        let floors = moka::sync::Cache::builder()
            .max_capacity(FLOORS_MAX)
            .time_to_live(floor_ttl)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Self {
            name,
            values,
            floors,
            live,
        }
    }

    fn floor(&self, key: Uuid) -> i64 {
        self.floors.get(&key).unwrap_or(i64::MIN)
    }

    fn values(&self) -> Option<&moka::future::Cache<Uuid, Arc<V>>> {
        self.values.as_ref().filter(|_| self.live.load(Ordering::SeqCst))
    }

    fn count(&self, result: &'static str) {
        metrics::counter!("tally_query_cache_requests_total", "cache" => self.name, "result" => result).increment(1);
    }

    /// The cached row if it is at least `version_min` (and not below its floor).
    pub async fn cached(&self, key: Uuid, version_min: i64) -> Option<Arc<V>> {
        let values = self.values()?;
        let value = values.get(&key).await?;
        (value.version() >= version_min.max(self.floor(key))).then_some(value)
    }

    /// The row for `key`: from the cache, or from `load` (one load per key at a time, shared
    /// by concurrent callers), kept unless it is below the key's floor.
    pub async fn get_or_load<F>(&self, key: Uuid, load: F) -> Result<Read<V>, ReadFailed>
    where
        F: Future<Output = Result<Option<V>, sqlx::Error>>,
    {
        let Some(values) = self.values() else {
            self.count("bypass");
            return match load.await {
                Ok(Some(value)) => Ok(Read::Found(Arc::new(value))),
                Ok(None) => Ok(Read::Missing),
                Err(error) => Err(ReadFailed(error.to_string())),
            };
        };
        if let Some(value) = values.get(&key).await {
            if value.version() >= self.floor(key) {
                self.count("hit");
                return Ok(Read::Found(value));
            }
            // Below a floor (an insert that raced an invalidation): `try_get_with` would
            // return it as it stands.
            values.invalidate(&key).await;
        }
        let loaded = values
            .try_get_with(key, async {
                match load.await {
                    Ok(Some(value)) if value.version() >= self.floor(key) => Ok(Arc::new(value)),
                    Ok(Some(value)) => Err(NotCached::Stale(Arc::new(value))),
                    Ok(None) => Err(NotCached::Missing),
                    Err(error) => Err(NotCached::Failed(error.to_string())),
                }
            })
            .await;
        match loaded {
            Ok(value) => {
                let kept = self.recheck(values, key, &value).await;
                self.count(if kept { "miss" } else { "stale" });
                Ok(Read::Found(value))
            }
            Err(not_cached) => match &*not_cached {
                NotCached::Stale(value) => {
                    self.count("stale");
                    Ok(Read::Found(value.clone()))
                }
                NotCached::Missing => {
                    self.count("miss");
                    Ok(Read::Missing)
                }
                NotCached::Failed(error) => Err(ReadFailed(error.clone())),
            },
        }
    }

    /// Keeps a row read outside [`Self::get_or_load`] (a read-your-writes wait) unless it is
    /// below its floor or older than what is cached.
    pub async fn offer(&self, key: Uuid, value: Arc<V>) {
        let Some(values) = self.values() else {
            return;
        };
        if value.version() < self.floor(key) {
            return;
        }
        if values
            .get(&key)
            .await
            .is_some_and(|cached| cached.version() >= value.version())
        {
            return;
        }
        values.insert(key, value.clone()).await;
        self.recheck(values, key, &value).await;
    }

    /// After an insert: an invalidation that raised the floor meanwhile wins. Whether the
    /// value stays.
    async fn recheck(&self, values: &moka::future::Cache<Uuid, Arc<V>>, key: Uuid, value: &Arc<V>) -> bool {
        if value.version() < self.floor(key) {
            values.invalidate(&key).await;
            return false;
        }
        true
    }

    /// Applies one invalidation: raise the floor, then drop a lower cached row.
    pub async fn invalidate(&self, key: Uuid, version: i64) {
        if self.floor(key) < version {
            // Invalidations are applied by one task, so read-then-write cannot lose a raise.
            self.floors.insert(key, version);
        }
        if let Some(values) = &self.values
            && values.get(&key).await.is_some_and(|cached| cached.version() < version)
        {
            values.invalidate(&key).await;
        }
        metrics::counter!("tally_query_cache_invalidations_total", "cache" => self.name).increment(1);
    }

    /// Forgets every cached row (the floors stay: they only ever make the cache stricter).
    pub fn clear(&self) {
        if let Some(values) = &self.values {
            values.invalidate_all();
        }
    }

    /// Rows cached now (approximate, as moka counts).
    pub fn entries(&self) -> u64 {
        self.values.as_ref().map_or(0, |v| v.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Row(i64);

    impl Versioned for Row {
        fn version(&self) -> i64 {
            self.0
        }
    }

    fn cache() -> VersionedCache<Row> {
        let live = Arc::new(AtomicBool::new(true));
        VersionedCache::new("test", 100, Duration::from_secs(60), Duration::from_secs(60), live)
    }

    async fn read(cache: &VersionedCache<Row>, key: Uuid, replica_has: i64) -> i64 {
        match cache.get_or_load(key, async { Ok(Some(Row(replica_has))) }).await {
            Ok(Read::Found(row)) => row.0,
            other => panic!("expected a row, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_loaded_row_is_served_from_the_cache_afterwards() {
        let cache = cache();
        let key = Uuid::now_v7();
        assert_eq!(read(&cache, key, 3).await, 3);
        // The "replica" now says 4, but the cached 3 is served: nothing invalidated it.
        assert_eq!(read(&cache, key, 4).await, 3);
    }

    #[tokio::test]
    async fn a_row_below_an_invalidation_seen_is_served_but_never_kept() {
        let cache = cache();
        let key = Uuid::now_v7();
        assert_eq!(read(&cache, key, 3).await, 3);
        cache.invalidate(key, 4).await;
        // The lagging replica still has version 3: served, not cached.
        assert_eq!(read(&cache, key, 3).await, 3);
        assert!(cache.cached(key, i64::MIN).await.is_none());
        // Once the replica has 4, it is cached.
        assert_eq!(read(&cache, key, 4).await, 4);
        assert_eq!(cache.cached(key, i64::MIN).await.map(|r| r.0), Some(4));
    }

    #[tokio::test]
    async fn an_offered_row_below_the_floor_or_the_cached_one_is_refused() {
        let cache = cache();
        let key = Uuid::now_v7();
        cache.invalidate(key, 5).await;
        cache.offer(key, Arc::new(Row(4))).await;
        assert!(cache.cached(key, i64::MIN).await.is_none());
        cache.offer(key, Arc::new(Row(6))).await;
        cache.offer(key, Arc::new(Row(5))).await;
        assert_eq!(cache.cached(key, i64::MIN).await.map(|r| r.0), Some(6));
        assert!(
            cache.cached(key, 7).await.is_none(),
            "a row below the wanted version is not served"
        );
    }

    #[tokio::test]
    async fn without_the_invalidation_feed_reads_go_straight_through() {
        let cache = cache();
        let key = Uuid::now_v7();
        assert_eq!(read(&cache, key, 1).await, 1);
        cache.live.store(false, Ordering::SeqCst);
        assert_eq!(read(&cache, key, 2).await, 2);
    }

    #[tokio::test]
    async fn a_missing_row_is_not_remembered() {
        let cache = cache();
        let key = Uuid::now_v7();
        let missing = cache.get_or_load(key, async { Ok(None::<Row>) }).await;
        assert!(matches!(missing, Ok(Read::Missing)));
        assert_eq!(read(&cache, key, 1).await, 1);
    }
}
