//! A JSON body extractor whose every rejection is a problem with the right status:
//! 415 without a JSON content type, 413 over the body limit, 400 for malformed JSON,
//! 422 for JSON nested deeper than [`JSON_DEPTH_MAX`] or with a string longer than
//! [`JSON_STRING_BYTES_MAX`], and for well-formed JSON of the wrong shape (missing or unknown
//! fields, wrong types).
//!
//! The depth and string bounds are checked on the raw bytes before anything is deserialized,
//! so no body, however crafted, makes the server recurse deeply or allocate a large string.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// Deepest accepted nesting of arrays and objects. Tally's bodies are flat objects.
pub const JSON_DEPTH_MAX: usize = 8;
/// Longest accepted JSON string (keys included), in bytes as sent (escapes count as written).
pub const JSON_STRING_BYTES_MAX: usize = 1024;

/// Use in handlers instead of `axum::Json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .detail("Send the body as JSON with `Content-Type: application/json`."));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large")
                    .detail("The request body is larger than this endpoint accepts.")
            } else {
                Problem::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request").detail(e.body_text())
            }
        })?;
        check_bounds(&bytes)?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(problem_of(&rejection)),
        }
    }
}

/// `application/json`, or any `application/<something>+json`, with any parameters.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Refuses bodies nested deeper than [`JSON_DEPTH_MAX`] or with a string longer than
/// [`JSON_STRING_BYTES_MAX`]. Looks at structure only; whether the JSON is well-formed is the
/// parser's business afterwards.
fn check_bounds(bytes: &[u8]) -> Result<(), Problem> {
    let mut depth = 0usize;
    // Bytes of the string being read (`None` outside strings), and whether the last one was
    // an unescaped backslash.
    let mut string: Option<usize> = None;
    let mut escaped = false;
    for &byte in bytes {
        if let Some(length) = string.as_mut() {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                string = None;
                continue;
            }
            *length += 1;
            if *length > JSON_STRING_BYTES_MAX {
                return Err(
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "string-too-long", "String too long")
                        .detail(format!("A JSON string is longer than {JSON_STRING_BYTES_MAX} bytes.")),
                );
            }
            continue;
        }
        match byte {
            b'"' => string = Some(0),
            b'[' | b'{' => {
                depth += 1;
                if depth > JSON_DEPTH_MAX {
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "json-too-deep",
                        "JSON nested too deeply",
                    )
                    .detail(format!(
                        "The body nests arrays and objects more than {JSON_DEPTH_MAX} deep."
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn problem_of(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonSyntaxError(e) => {
            Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON").detail(e.body_text())
        }
        JsonRejection::JsonDataError(e) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-body", "Invalid request body").detail(e.body_text())
        }
        other => Problem::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request").detail(other.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: Result<(), Problem>) -> Option<String> {
        result
            .err()
            .map(|p| p.type_uri.rsplit('/').next().unwrap_or_default().to_owned())
    }

    #[test]
    fn flat_bodies_pass_the_bounds() {
        assert_eq!(
            code(check_bounds(br#"{"amount":1,"reference":"a \"quoted\" {[ word"}"#)),
            None
        );
        assert_eq!(code(check_bounds(&[b'['; JSON_DEPTH_MAX])), None);
    }

    #[test]
    fn nesting_past_the_depth_bound_is_refused() {
        let deep = format!("{}1{}", "[".repeat(JSON_DEPTH_MAX + 1), "]".repeat(JSON_DEPTH_MAX + 1));
        assert_eq!(code(check_bounds(deep.as_bytes())).as_deref(), Some("json-too-deep"));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_nesting() {
        let text = format!(r#"{{"owner":"{}"}}"#, "[".repeat(JSON_DEPTH_MAX * 2));
        assert_eq!(code(check_bounds(text.as_bytes())), None);
    }

    #[test]
    fn a_string_past_the_length_bound_is_refused_and_one_at_it_passes() {
        let at = format!(r#"{{"owner":"{}"}}"#, "a".repeat(JSON_STRING_BYTES_MAX));
        assert_eq!(code(check_bounds(at.as_bytes())), None);
        let over = format!(r#"{{"owner":"{}"}}"#, "a".repeat(JSON_STRING_BYTES_MAX + 1));
        assert_eq!(code(check_bounds(over.as_bytes())).as_deref(), Some("string-too-long"));
    }

    #[test]
    fn json_content_types_are_recognised_with_parameters() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            json_content_type(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
