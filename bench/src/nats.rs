//! The JetStream limit of the relay: publish the same number of messages of the same size,
//! with `Nats-Msg-Id` (so JetStream does its duplicate check) and a bounded window of acks in
//! flight, straight from memory. No Postgres, no envelope building.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use tally_event_store::partition::Topology;
use tokio::time::Instant;
use uuid::Uuid;

use crate::measurement::Measurement;

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub messages: u64,
    pub message_bytes: usize,
    /// Publishes awaiting their ack at once (the relay's default is 1,024).
    pub in_flight_max: usize,
    /// A stream of its own, created fresh and deleted afterwards.
    pub topology: Topology,
}

/// Publishes `plan.messages` messages round-robin over the partitions' subjects and measures
/// from the first publish to the last ack. Unacknowledged publishes are counted as errors.
pub async fn publish_limit(js: &jetstream::Context, plan: &PublishPlan) -> anyhow::Result<Measurement> {
    anyhow::ensure!(plan.in_flight_max > 0, "at least one publish must be allowed in flight");
    // A leftover stream would make the duplicate window or an old backlog part of the run.
    let _absent_is_fine = js.delete_stream(&plan.topology.stream_name).await;
    plan.topology.ensure_stream(js).await?;
    let subjects: Vec<String> = (0..plan.topology.partitions.max(1))
        .map(|p| format!("{}.{p}.{}", plan.topology.subject_prefix, crate::sample::STREAM_TYPE))
        .collect();
    let body = Bytes::from(vec![b'x'; plan.message_bytes]);

    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    let mut acked = 0;
    let mut failed = 0;
    for i in 0..plan.messages {
        if in_flight.len() >= plan.in_flight_max
            && let Some(ack) = in_flight.next().await
        {
            tally_ack(ack, &mut acked, &mut failed);
        }
        let message = PublishMessage::build()
            .payload(body.clone())
            .message_id(Uuid::now_v7().to_string());
        let subject = subjects[(i % subjects.len() as u64) as usize].clone();
        let ack = js.send_publish(subject, message).await?;
        in_flight.push_back(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        tally_ack(ack, &mut acked, &mut failed);
    }
    let seconds = started.elapsed().as_secs_f64();

    let _ = js.delete_stream(&plan.topology.stream_name).await;
    let errors = if failed > 0 {
        BTreeMap::from([("not-acked".to_owned(), failed)])
    } else {
        BTreeMap::new()
    };
    Ok(Measurement::throughput(acked, seconds, errors))
}

fn tally_ack<T, E>(ack: Result<T, E>, acked: &mut u64, failed: &mut u64) {
    match ack {
        Ok(_) => *acked += 1,
        Err(_) => *failed += 1,
    }
}
