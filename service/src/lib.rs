//! What every Tally server shares, so each concern has one implementation:
//! RFC 9457 problem responses ([`problem`]), a JSON body extractor whose rejections are
//! problems ([`json`]), tracing set-up ([`telemetry`]), shutdown signals ([`shutdown`]) and how an
//! OpenAPI document is rendered, served and checked in ([`openapi`]).
//!
//! Only the API crates and the binaries depend on this crate; it knows HTTP but no domain.

pub mod json;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod shutdown;
pub mod telemetry;

pub use json::Json;
pub use problem::Problem;
pub mod errors;
pub mod token;
