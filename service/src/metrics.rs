//! Prometheus metrics: one process-wide recorder (the `metrics` facade), rendered in the text
//! exposition format at `GET /metrics`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder was installed first; metrics then go there.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only this one's");
        }
        handle
    })
}

/// `GET /metrics`: the Prometheus text format.
pub async fn serve() -> Response {
    let body = install().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
