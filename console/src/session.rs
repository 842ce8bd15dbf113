//! Who is signed in, and what they may see.
//!
//! A user signs in with the same bearer token they would give `curl` (the dev tokens `cargo
//! xtask up` prints, or `tally token`). The console checks it with the APIs' own verifier
//! ([`tally_service::auth::AuthConfig`]: `TALLY_JWT_SECRET` or a public key) and keeps it in a
//! cookie that scripts cannot read (`HttpOnly`) and other sites cannot make the browser send
//! (`SameSite=Strict`). Every page re-verifies it, so an expired token signs the user out.
//! The token is forwarded to the query API, which applies its own role checks again.
//!
//! Pages follow the APIs' roles ([`Session::require`]): the overview and projections need
//! `ops`, accounts `reader`, audit `auditor`; a signed-in user without the role gets a 403 page.
//!
//! Forms that change something (pause, resume, retry, rebuild, sign-out) are POSTs carrying
//! a CSRF token derived from the session's token and a key of this process; besides,
//! [`same_origin`] refuses any POST whose `Origin` (or `Sec-Fetch-Site`) says it came from
//! another site.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, http};
use maud::html;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tally_service::auth::{Authenticator, INSECURE_SUBJECT, Principal, Role, TOKEN_BYTES_MAX, TokenError};

use crate::AppState;
use crate::views::{self, Nav};

/// The cookie holding the signed-in user's bearer token.
pub const COOKIE: &str = "tally_console_token";
/// How long the browser keeps the cookie; the token's own `exp` usually ends a session first.
const COOKIE_MAX_AGE_S: u64 = 12 * 60 * 60;

/// How tokens are checked, and the key CSRF tokens are derived with.
pub struct Sessions {
    authenticator: Authenticator,
    /// Random per process: a CSRF token is worthless to anyone who cannot read the page it is
    /// on, and a restart invalidates open forms (the user reloads the page).
    csrf_key: [u8; 32],
    cookie_secure: bool,
}

impl Sessions {
    pub fn new(authenticator: Authenticator, cookie_secure: bool) -> Self {
        Self {
            authenticator,
            csrf_key: rand::random(),
            cookie_secure,
        }
    }

    fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        match &self.authenticator {
            Authenticator::Jwt(verifier) => verifier.verify(token),
            Authenticator::Disabled => Ok(Principal {
                subject: INSECURE_SUBJECT.to_owned(),
                roles: Role::ALL.to_vec(),
            }),
        }
    }

    fn csrf(&self, token: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.csrf_key);
        hasher.update(token.as_bytes());
        hex::encode(&hasher.finalize()[..16])
    }

    fn cookie(&self, value: &str, max_age_s: u64) -> HeaderValue {
        let secure = if self.cookie_secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("tally_console_token=; Max-Age=0"))
    }
}

/// A signed-in user: their token (forwarded to the APIs), who it names, and the CSRF token
/// of their forms.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: String,
    pub principal: Principal,
    pub csrf: String,
}

impl Session {
    /// `Ok` when the user holds `role`, else the 403 page saying which role the page needs.
    #[allow(clippy::result_large_err)]
    pub fn require(&self, role: Role) -> Result<(), Response> {
        if self.principal.has(role) {
            return Ok(());
        }
        let body = html! {
            h1 { "Not for your role" }
            p.problem {
                "This page needs the " code { (role) } " role; your token ("
                code { (self.principal.subject) } ") carries "
                @if self.principal.roles.is_empty() { "no role" }
                @else { (self.principal.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")) }
                ". Sign in with another token to see it."
            }
        };
        Err(views::page_with_status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            Some(self),
            Nav::None,
            body,
        ))
    }

    /// `Ok` when a form's `csrf` field is this session's.
    #[allow(clippy::result_large_err)]
    pub fn check_csrf(&self, csrf: &str) -> Result<(), Response> {
        // Constant time, so the comparison says nothing about how much of a guess was right.
        let same = csrf.len() == self.csrf.len()
            && csrf
                .bytes()
                .zip(self.csrf.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(views::message_page(
                StatusCode::FORBIDDEN,
                "Form expired",
                "This form's CSRF token is not your session's (the console restarted, or you \
                 signed in again). Go back, reload the page and try again.",
                Some(self),
            ))
        }
    }
}

/// The value of the session cookie in `headers`, if any.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

impl FromRequestParts<AppState> for Session {
    /// Not signed in (or the token no longer passes): to the sign-in page.
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(token) = cookie_token(&parts.headers) else {
            return Err(Redirect::to("/sign-in").into_response());
        };
        match state.sessions.verify(token) {
            Ok(principal) => Ok(Session {
                token: token.to_owned(),
                csrf: state.sessions.csrf(token),
                principal,
            }),
            Err(e) => {
                let why = match e {
                    TokenError::Expired => "expired",
                    TokenError::Invalid => "invalid",
                };
                Err(Redirect::to(&format!("/sign-in?why={why}")).into_response())
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    why: Option<String>,
}

/// `GET /sign-in`: the token form.
pub async fn sign_in_form(axum::extract::Query(query): axum::extract::Query<SignInQuery>) -> Response {
    let note = match query.why.as_deref() {
        Some("expired") => Some("Your token has expired: sign in with a new one."),
        Some("invalid") => Some("That token is not valid here (wrong key, malformed, or wrong issuer)."),
        Some("signed-out") => Some("Signed out."),
        _ => None,
    };
    sign_in_page(StatusCode::OK, note)
}

fn sign_in_page(status: StatusCode, note: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(note) = note { p.problem { (note) } }
        form.signin method="post" action="/sign-in" {
            label for="token" { "Bearer token" }
            textarea #token name="token" rows="5" cols="80" required autocomplete="off" spellcheck="false" {}
            button type="submit" { "Sign in" }
        }
        p.hint {
            "The same token the APIs take: " code { "cargo xtask up" } " prints one per role (and "
            code { "tally token --role ROLE" } " mints more). Pages follow the roles: "
            code { "ops" } " sees the overview and projections, " code { "reader" } " accounts, "
            code { "auditor" } " audit."
        }
    };
    views::page_with_status(status, "Sign in", None, Nav::None, body)
}

#[derive(Debug, Deserialize)]
pub struct SignInForm {
    token: String,
}

/// `POST /sign-in`: verify the token, set the cookie, go to the first page the roles allow.
pub async fn sign_in(State(state): State<AppState>, Form(form): Form<SignInForm>) -> Response {
    let token = form.token.trim();
    // Anything else could not be put in a cookie header (and is no JWT anyway).
    let printable = token.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',');
    if token.is_empty() || token.len() > TOKEN_BYTES_MAX || !printable {
        return sign_in_page(StatusCode::UNAUTHORIZED, Some("That is not a bearer token."));
    }
    let principal = match state.sessions.verify(token) {
        Ok(p) => p,
        Err(TokenError::Expired) => {
            return sign_in_page(StatusCode::UNAUTHORIZED, Some("That token has expired."));
        }
        Err(TokenError::Invalid) => {
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                Some("That token is not valid here (wrong key, malformed, or wrong issuer)."),
            );
        }
    };
    let landing = landing(&principal);
    let mut response = Redirect::to(landing).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, state.sessions.cookie(token, COOKIE_MAX_AGE_S));
    response
}

/// The first page `principal` may see.
pub fn landing(principal: &Principal) -> &'static str {
    if principal.has(Role::Ops) {
        "/"
    } else if principal.has(Role::Reader) {
        "/accounts"
    } else if principal.has(Role::Auditor) {
        "/audit"
    } else {
        "/accounts"
    }
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

/// `POST /sign-out`: forget the cookie.
pub async fn sign_out(State(state): State<AppState>, session: Session, Form(form): Form<CsrfForm>) -> Response {
    if let Err(refused) = session.check_csrf(&form.csrf) {
        return refused;
    }
    let mut response = Redirect::to("/sign-in?why=signed-out").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, state.sessions.cookie("", 0));
    response
}

/// Middleware: a request that changes something (anything but GET and HEAD) must come from
/// the console's own pages. Browsers send `Origin` with every POST (and `Sec-Fetch-Site`);
/// one naming another site is refused before any handler runs.
pub async fn same_origin(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(|o| o.split_once("://").map_or(o, |(_, rest)| rest));
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site");
    let foreign = match (origin_host, host) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => origin != host,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if foreign || cross_site {
        return views::message_page(
            http::StatusCode::FORBIDDEN,
            "Refused",
            "This request came from another site; the console only takes forms from its own pages.",
            None,
        );
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tally_console_token=abc.def; b=2"),
        );
        assert_eq!(cookie_token(&headers), Some("abc.def"));
        headers.insert(header::COOKIE, HeaderValue::from_static("tally_console_token="));
        assert_eq!(cookie_token(&headers), None);
    }

    #[test]
    fn a_csrf_token_belongs_to_one_session_token() {
        let sessions = Sessions::new(Authenticator::Disabled, false);
        assert_eq!(sessions.csrf("a"), sessions.csrf("a"));
        assert_ne!(sessions.csrf("a"), sessions.csrf("b"));
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site_strict() {
        let sessions = Sessions::new(Authenticator::Disabled, true);
        let cookie = sessions.cookie("t", 60);
        let cookie = cookie.to_str().unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"));
    }
}
