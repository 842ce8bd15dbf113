//! Trace context across the log. An event's metadata keeps the W3C `traceparent` of the request
//! that wrote it; the relay copies it onto the NATS message (header `traceparent`), and whoever
//! handles the event continues that trace. Work is done in batches of many events (or commands)
//! from many traces, so a batch's span joins them the one way OpenTelemetry allows: it is a
//! child of the first item's trace and links the others (up to [`BATCH_SPAN_LINKS_MAX`]). A
//! batch of one, the usual case when traffic is light, sits wholly inside its request's trace.
//!
//! The contexts are read with the global propagator `tally_service::telemetry::init` installs;
//! without it (unit tests) they are simply absent.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Most items of a batch a batch span links to besides its parent; the rest are not linked.
pub const BATCH_SPAN_LINKS_MAX: usize = 32;

/// The span context a `traceparent` header value names, if it is a valid one.
pub fn from_traceparent(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let ids = context.span().span_context().clone();
    ids.is_valid().then_some(ids)
}

/// The span context of a `tracing` span, if it has a valid one.
pub fn of_span(span: &tracing::Span) -> Option<SpanContext> {
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then_some(ids)
}

/// Makes `span` (not yet entered) a child of the first of `items` and links it to the next
/// [`BATCH_SPAN_LINKS_MAX`]. Returns how many items it joined.
pub fn join_batch(span: &tracing::Span, items: impl IntoIterator<Item = SpanContext>) -> usize {
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return 0;
    };
    // Fails only when tracing is not set up or the span is disabled: nothing to join then.
    let _ = span.set_parent(Context::new().with_remote_span_context(first));
    let mut joined = 1;
    for item in items.take(BATCH_SPAN_LINKS_MAX) {
        span.add_link(item);
        joined += 1;
    }
    joined
}
