//! Logging and tracing set-up shared by every binary.
//!
//! - **Logs**: `TALLY_LOG` (or `RUST_LOG`) filters, `TALLY_LOG_FORMAT=json` switches to JSON
//!   lines for log shippers. A JSON line carries the fields of every span it is in, so each
//!   line logged while serving a request names its `request_id` and `correlation_id` (the
//!   request span of [`crate::edge`]).
//! - **Traces**: every span carries a W3C trace context (tracing-opentelemetry), continued from
//!   an incoming `traceparent` or started here, so the context stored with events and sent on
//!   NATS is the one of the request that wrote them. With `OTEL_EXPORTER_OTLP_ENDPOINT` set
//!   (e.g. `http://otel-collector:4318`), spans are exported over OTLP HTTP/protobuf to
//!   `{endpoint}/v1/traces`, in batches (the standard `OTEL_BSP_*` variables tune them);
//!   without it nothing is exported and only the ids are made.

use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where spans are exported (the OpenTelemetry standard variable); unset: not exported.
pub const OTLP_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The tracer provider, kept for [`shutdown`] to flush.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber (logs and traces) and the W3C trace-context propagator.
/// Call once, first thing in `main`; `service` names the process in traces
/// (`service.name` = `tally-{service}`). Call [`shutdown`] before exiting.
pub fn init(service: &'static str) {
    let filter = std::env::var("TALLY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TALLY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours only for a person at a terminal who has not asked for none (`NO_COLOR`): log
    // files and shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json {
        fmt.json().with_current_span(true).with_span_list(true).boxed()
    } else {
        fmt.compact().boxed()
    };
    let endpoint = std::env::var(OTLP_ENDPOINT_VARIABLE).ok().filter(|e| !e.is_empty());
    let (provider, export_error) = tracer_provider(service, endpoint.is_some());
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tally"))
        .with_tracked_inactivity(false);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(traces)
        .try_init();
    if installed.is_ok() {
        let _ = PROVIDER.set(provider);
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            otlp = endpoint.as_deref(),
            "starting"
        );
        if let Some(error) = export_error {
            tracing::error!(%error, "cannot export traces over OTLP; spans are not exported");
        }
    }
}

/// A provider that makes trace and span ids, and exports the spans when `export`.
fn tracer_provider(service: &str, export: bool) -> (SdkTracerProvider, Option<String>) {
    let resource = Resource::builder()
        .with_service_name(format!("tally-{service}"))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut error = None;
    if export {
        // The exporter reads the endpoint (and `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`) itself.
        match SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => error = Some(e.to_string()),
        }
    }
    (builder.build(), error)
}

/// Exports the spans still buffered and stops the exporter. Call at the end of `main`.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::debug!(%error, "flushing traces at shutdown");
    }
}

/// The W3C `traceparent` of `span` (`00-{trace id}-{span id}-{flags}`), or `None` when it has
/// no valid context (tracing not initialised, or the span is disabled).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span = context.span();
    let ids = span.span_context();
    ids.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        )
    })
}

/// The trace id of `span` in hex, or `None` as for [`traceparent`].
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then(|| ids.trace_id().to_string())
}
