//! How events map onto NATS subjects. A contract shared by the relay and every consumer:
//! `<prefix>.<partition>.<stream_type>`, partition = FNV-1a-64 of the stream id's 16 bytes
//! modulo the partition count. All events of one stream land in one partition, in order.

use std::time::Duration;

use async_nats::jetstream;
use uuid::Uuid;

/// Default JetStream stream name.
pub const STREAM_NAME_DEFAULT: &str = "TALLY_EVENTS";
/// Default subject prefix.
pub const SUBJECT_PREFIX_DEFAULT: &str = "tally.events";
/// Default partition count. Changing it re-maps streams to partitions: only while no
/// projector is mid-stream (a rebuild re-reads from Postgres anyway).
pub const PARTITIONS_DEFAULT: u32 = 8;
/// How long JetStream remembers a `Nats-Msg-Id` to drop a re-published duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long JetStream keeps events. Postgres is the log of record; the stream is fan-out.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default copies of the stream a NATS cluster keeps (1: a single server).
pub const REPLICAS_DEFAULT: usize = 1;

/// Stable partition of a stream: FNV-1a over the 16 bytes of its id, modulo `partitions`.
pub fn partition_of(stream_id: Uuid, partitions: u32) -> u32 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0100_0000_01b3;
    let hash = stream_id
        .as_bytes()
        .iter()
        .fold(FNV_OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME));
    (hash % u64::from(partitions.max(1))) as u32
}

/// The NATS side of the deployment: stream name, subject prefix, partition count, and how
/// many servers of a NATS cluster keep a copy of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub stream_name: String,
    pub subject_prefix: String,
    pub partitions: u32,
    /// JetStream replicas of the stream (1 to 5; 3 on a three-server cluster survives the loss
    /// of any one server). An existing stream with fewer is raised to this many.
    pub replicas: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            stream_name: STREAM_NAME_DEFAULT.into(),
            subject_prefix: SUBJECT_PREFIX_DEFAULT.into(),
            partitions: PARTITIONS_DEFAULT,
            replicas: REPLICAS_DEFAULT,
        }
    }
}

impl Topology {
    /// The subject an event of this stream is published on.
    pub fn subject(&self, stream_id: Uuid, stream_type: &str) -> String {
        self.partition_stream_type_filter(partition_of(stream_id, self.partitions), stream_type)
    }

    /// Where a projection's poison events go, with the error in headers. Inside the events
    /// stream's subjects (so dead letters are kept like events) but outside every partition's
    /// filter (partitions are numbers).
    pub fn dead_letter_subject(&self, projection: &str, partition: u32) -> String {
        format!("{}.dead-letter.{projection}.{partition}", self.subject_prefix)
    }

    /// The filter matching every event of one partition.
    pub fn partition_filter(&self, partition: u32) -> String {
        format!("{}.{}.>", self.subject_prefix, partition)
    }

    /// The filter matching the events of one stream type in one partition: what a projection
    /// folding that stream type consumes, so JetStream never delivers it the others.
    pub fn partition_stream_type_filter(&self, partition: u32, stream_type: &str) -> String {
        format!("{}.{}.{}", self.subject_prefix, partition, stream_type)
    }

    /// Creates the JetStream stream if it does not exist (idempotent; relay and projectors
    /// both call it so either may start first). A stream that exists with fewer replicas than
    /// [`Topology::replicas`] (a deployment that grew from one server to a cluster) is raised
    /// to that many; JetStream copies it to the new replicas in the background. Fewer are
    /// never forced down: that is an operator's decision (`nats stream edit`).
    pub async fn ensure_stream(&self, js: &jetstream::Context) -> anyhow::Result<jetstream::stream::Stream> {
        let config = jetstream::stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            max_age: STREAM_MAX_AGE,
            num_replicas: self.replicas.max(1),
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| anyhow::anyhow!("creating JetStream stream {}: {e}", self.stream_name))?;
        let existing = stream
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("reading JetStream stream {}: {e}", self.stream_name))?
            .config
            .clone();
        if existing.num_replicas < self.replicas {
            tracing::info!(
                stream = %self.stream_name,
                from = existing.num_replicas,
                to = self.replicas,
                "raising the stream's replicas"
            );
            js.update_stream(jetstream::stream::Config {
                num_replicas: self.replicas,
                ..existing
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "raising JetStream stream {} to {} replicas: {e}",
                    self.stream_name,
                    self.replicas
                )
            })?;
            stream = js
                .get_stream(&self.stream_name)
                .await
                .map_err(|e| anyhow::anyhow!("reading JetStream stream {}: {e}", self.stream_name))?;
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        // Pinned (cross-checked in another language): consumers elsewhere must agree.
        assert_eq!(partition_of(id, 8), 5);
        assert_eq!(partition_of(id, 16), 5);
        assert_eq!(partition_of(Uuid::nil(), 8), 5);
        for n in 0..1000u128 {
            assert!(partition_of(Uuid::from_u128(n * 7919), 8) < 8);
        }
    }

    #[test]
    fn a_stream_type_filter_is_the_subject_of_that_type_in_that_partition() {
        let topology = Topology::default();
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(topology.subject(id, "account"), "tally.events.5.account");
        assert_eq!(
            topology.partition_stream_type_filter(5, "account"),
            "tally.events.5.account"
        );
        assert_eq!(topology.partition_filter(5), "tally.events.5.>");
    }

    #[test]
    fn partitions_spread_streams_evenly() {
        let mut counts = [0u32; 8];
        for _ in 0..8000 {
            counts[partition_of(Uuid::now_v7(), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (700..1300).contains(&c)), "{counts:?}");
    }
}
