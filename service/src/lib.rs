//! What every Tally server shares, so each concern has one implementation:
//! RFC 9457 problem responses ([`problem`]), a JSON body extractor whose rejections are
//! problems and which bounds nesting and string length ([`json`]), bearer-token authentication
//! and roles ([`auth`]), the layers every request passes (timeout, authentication, per-client
//! rate limit, observation: [`edge`]), Prometheus metrics ([`metrics`]), a worker's probe
//! listener ([`probes`]), logging and tracing set-up ([`telemetry`]), how connections are
//! accepted and bounded ([`connections`]), shutdown signals ([`shutdown`]) and
//! how an OpenAPI document is rendered, served and checked in ([`openapi`]).
//!
//! Only the API crates and the binaries depend on this crate; it knows HTTP but no domain.

pub mod auth;
pub mod connections;
pub mod edge;
pub mod errors;
pub mod json;
pub mod metrics;
pub mod openapi;
pub mod probes;
pub mod problem;
pub mod shutdown;
pub mod telemetry;
pub mod token;

pub use json::Json;
pub use problem::Problem;

/// The allocator every Tally binary declares as its `#[global_allocator]`: mimalloc, whose
/// thread-local free lists suit a server that allocates and frees per request far better than
/// glibc's malloc (see the deposits profile in BENCHMARKS.md).
pub use mimalloc::MiMalloc as Allocator;
