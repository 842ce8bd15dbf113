//! Who may call what: JWT bearer tokens with roles, checked the same way by both APIs.
//!
//! - [`AuthConfig`] is the part of each server's configuration that says how tokens are
//!   verified: HS256 with a shared secret (`TALLY_JWT_SECRET`, the local stack), or RS256/ES256
//!   with a public key (`TALLY_JWT_PUBLIC_KEY_FILE` + `TALLY_JWT_ALGORITHM`, production);
//!   optionally the `iss` and `aud` a token must carry. A server without a key refuses to start,
//!   unless started with `--insecure-no-auth` (then every request acts as
//!   [`INSECURE_SUBJECT`] with every role, and a warning is logged).
//! - [`Authenticator::authenticate`] verifies the `Authorization: Bearer` token of a request
//!   (if it has one); the edge ([`crate::edge`]) leaves the outcome, an [`Authentication`], in
//!   the request's extensions, so the rate limiter can tell clients apart and handlers can ask
//!   for a role.
//! - [`Require<R>`] is the extractor with which every protected handler declares its role
//!   ([`Teller`], [`Reader`], [`Auditor`], [`Ops`]): it yields the caller's [`Principal`], or
//!   answers `401` (no, malformed, badly signed or expired token; with `WWW-Authenticate:
//!   Bearer …` and the RFC 6750 error code) or `403` (a valid token without the role).
//! - [`mint`] signs HS256 tokens: for `tally token`, `cargo xtask up` and the tests.
//!
//! Roles are not a hierarchy: a route needs its one role, and a token carries every role its
//! holder has (`"roles": ["teller", "reader"]`).

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::Problem;
use crate::errors::ErrorReport;

/// Seconds a token's `exp` may lie in the past (clock skew between issuer and server).
pub const CLOCK_LEEWAY_S: u64 = 5;
/// Shortest accepted HS256 secret: RFC 7518 §3.2 asks for a key at least as long as the hash.
pub const SECRET_BYTES_MIN: usize = 32;
/// Longest accepted bearer token; a token with a handful of claims is a few hundred bytes.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Longest accepted token subject (it is stored in every event's metadata).
pub const SUBJECT_BYTES_MAX: usize = 255;
/// The actor recorded when the server runs with `--insecure-no-auth`.
pub const INSECURE_SUBJECT: &str = "insecure-no-auth";
/// The `realm` of every `WWW-Authenticate` challenge.
const REALM: &str = "tally";

/// What a caller may do. A route requires exactly one; a token may carry several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Write commands: open accounts, deposits, withdrawals, transfers.
    Teller,
    /// Reads of accounts and transfers.
    Reader,
    /// Audit endpoints and export.
    Auditor,
    /// Admin and projection control.
    Ops,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Teller, Role::Reader, Role::Auditor, Role::Ops];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Teller => "teller",
            Role::Reader => "reader",
            Role::Auditor => "auditor",
            Role::Ops => "ops",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}` (expected teller, reader, auditor or ops)"))
    }
}

/// The claims of a Tally token. `roles` holds role names; names this version does not know
/// are ignored, so an issuer can add roles before every server knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller: recorded as the actor of every event its commands append.
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, seconds since the Unix epoch: the token is refused until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    /// Claims for `subject` with `roles`, valid for `ttl_s` seconds from now.
    pub fn new(subject: &str, roles: &[Role], ttl_s: u64) -> Self {
        let now = jsonwebtoken::get_current_timestamp();
        Self {
            sub: subject.to_owned(),
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            exp: now.saturating_add(ttl_s),
            iat: Some(now),
            nbf: None,
            iss: None,
            aud: None,
        }
    }
}

/// Signs `claims` with HS256 and `secret`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing with a byte secret cannot fail")
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    pub roles: Vec<Role>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// How tokens are verified (flags or `TALLY_JWT_*` variables), flattened into each server's
/// `Config`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthConfig {
    /// HS256 shared secret (at least 32 bytes). The local stack's choice; production uses a
    /// public key instead.
    #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key that verifies RS256 or ES256 tokens (see --jwt-algorithm).
    #[arg(long, env = "TALLY_JWT_PUBLIC_KEY_FILE", conflicts_with = "jwt_secret")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Algorithm of the public key: RS256 or ES256 (HS256 goes with --jwt-secret).
    #[arg(long, env = "TALLY_JWT_ALGORITHM", value_parser = ["HS256", "RS256", "ES256"])]
    pub jwt_algorithm: Option<String>,
    /// When set, a token's `iss` must be this.
    #[arg(long, env = "TALLY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set, a token's `aud` must be this.
    #[arg(long, env = "TALLY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Serve without authentication: every request acts with every role. For local
    /// experiments only; without it, a server with no key configured refuses to start.
    #[arg(long, env = "TALLY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

/// Why an [`AuthConfig`] cannot be used; the server refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "no token key configured: set TALLY_JWT_SECRET (HS256) or TALLY_JWT_PUBLIC_KEY_FILE with \
         TALLY_JWT_ALGORITHM (RS256/ES256), or start with --insecure-no-auth for local experiments"
    )]
    NoKey,
    #[error("TALLY_JWT_SECRET must be at least {SECRET_BYTES_MIN} bytes")]
    SecretTooShort,
    #[error(
        "TALLY_JWT_SECRET is a published placeholder (it contains \"{0}\"): anyone can mint tokens \
         with it; generate one, e.g. `openssl rand -hex 32`"
    )]
    PlaceholderSecret(&'static str),
    #[error("{0} does not go with this key: HS256 needs TALLY_JWT_SECRET, RS256/ES256 a public key file")]
    AlgorithmMismatch(String),
    #[error("TALLY_JWT_ALGORITHM (RS256 or ES256) is required with TALLY_JWT_PUBLIC_KEY_FILE")]
    AlgorithmMissing,
    #[error("reading the public key {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("the public key {path} is not a valid {algorithm} PEM key: {source}")]
    KeyFormat {
        path: PathBuf,
        algorithm: String,
        source: jsonwebtoken::errors::Error,
    },
}

/// Verifies tokens, or (with `--insecure-no-auth`) lets everything through.
#[derive(Clone)]
pub enum Authenticator {
    Jwt(Arc<Verifier>),
    Disabled,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The key stays out of logs.
            Authenticator::Jwt(v) => write!(f, "Authenticator::Jwt({:?})", v.validation.algorithms),
            Authenticator::Disabled => f.write_str("Authenticator::Disabled"),
        }
    }
}

/// Most tokens [`Verifier`] remembers as verified (the most recently used are kept).
pub const VERIFIED_TOKENS_MAX: u64 = 10_000;
/// Longest a verified token is remembered; its `exp` is checked again at every use.
pub const VERIFIED_TOKENS_TTL: Duration = Duration::from_secs(60);

/// A key and the rules a token must pass.
///
/// A client sends the same token with every request until it expires, and checking a
/// signature is most of what authentication costs (an ES256 check takes tens of microseconds).
/// So the verifier remembers the tokens it found valid, by their exact text, and answers a
/// token it has seen from memory while its `exp` has not passed. Only valid tokens are kept,
/// so a caller without the key cannot fill the memory; it is bounded by
/// [`VERIFIED_TOKENS_MAX`] and [`VERIFIED_TOKENS_TTL`].
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    verified: moka::sync::Cache<String, Arc<Verified>>,
}

/// A token found valid: who it names, and until when.
struct Verified {
    principal: Principal,
    /// The token's `exp`, seconds since the Unix epoch.
    expires_at: u64,
}

impl AuthConfig {
    /// The authenticator this configuration describes, or why there is none.
    pub fn authenticator(&self) -> Result<Authenticator, AuthConfigError> {
        let algorithm = self.jwt_algorithm.as_deref();
        let (key, algorithm) = match (&self.jwt_secret, &self.jwt_public_key_file) {
            (Some(secret), _) => {
                if algorithm.is_some_and(|a| a != "HS256") {
                    return Err(AuthConfigError::AlgorithmMismatch(algorithm.unwrap_or_default().into()));
                }
                if secret.len() < SECRET_BYTES_MIN {
                    return Err(AuthConfigError::SecretTooShort);
                }
                if let Some(marker) = placeholder_marker(secret) {
                    return Err(AuthConfigError::PlaceholderSecret(marker));
                }
                (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::KeyFile {
                    path: path.clone(),
                    source,
                })?;
                let (key, algorithm) = match algorithm {
                    Some("RS256") => (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256),
                    Some("ES256") => (DecodingKey::from_ec_pem(&pem), Algorithm::ES256),
                    Some(other) => return Err(AuthConfigError::AlgorithmMismatch(other.into())),
                    None => return Err(AuthConfigError::AlgorithmMissing),
                };
                let key = key.map_err(|source| AuthConfigError::KeyFormat {
                    path: path.clone(),
                    algorithm: format!("{algorithm:?}"),
                    source,
                })?;
                (key, algorithm)
            }
            (None, None) if self.insecure_no_auth => return Ok(Authenticator::Disabled),
            (None, None) => return Err(AuthConfigError::NoKey),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = CLOCK_LEEWAY_S;
        // A token that says it is valid only from some time on is refused until then (with the
        // same leeway as `exp`).
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without a configured audience a token's `aud` means nothing to this server.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator::Jwt(Arc::new(Verifier::new(key, validation))))
    }
}

/// Words that mark a secret as one copied from documentation or an example file. A secret
/// containing one is refused whatever its length: such values are public, and a server
/// verifying with one accepts tokens anyone can mint.
const PLACEHOLDER_MARKERS: &[&str] = &[
    "change-me",
    "changeme",
    "change_me",
    "insecure",
    "placeholder",
    "example",
];

/// The placeholder marker `secret` contains, if any (case-insensitive).
pub fn placeholder_marker(secret: &str) -> Option<&'static str> {
    let lower = secret.to_ascii_lowercase();
    PLACEHOLDER_MARKERS.iter().copied().find(|m| lower.contains(m))
}

/// Why a presented token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The token was valid once; its `exp` has passed.
    Expired,
    /// Anything else: not a JWT, bad signature, wrong algorithm, issuer or audience, bad claims.
    Invalid,
}

impl Verifier {
    fn new(key: DecodingKey, validation: Validation) -> Self {
        let verified = moka::sync::Cache::builder()
            .max_capacity(VERIFIED_TOKENS_MAX)
            .time_to_live(VERIFIED_TOKENS_TTL)
            .build();
        Self {
            key,
            validation,
            verified,
        }
    }

    /// The principal of a valid `token`.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Invalid);
        }
        match self.remembered(token) {
            Some(principal) => Ok(principal),
            None => self.verify_signed(token),
        }
    }

    /// The principal of `token` if it was found valid before and has not expired since: no
    /// signature is checked.
    fn remembered(&self, token: &str) -> Option<Principal> {
        let verified = self.verified.get(token)?;
        // The same rule as the full check: `exp` may lie up to the leeway in the past.
        if verified.expires_at.saturating_add(self.validation.leeway) >= jsonwebtoken::get_current_timestamp() {
            return Some(verified.principal.clone());
        }
        self.verified.invalidate(token);
        None
    }

    /// [`Self::verify`] without the memory: the signature and every claim checked.
    fn verify_signed(&self, token: &str) -> Result<Principal, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > SUBJECT_BYTES_MAX {
            return Err(TokenError::Invalid);
        }
        let roles = claims.roles.iter().filter_map(|r| r.parse().ok()).collect();
        let principal = Principal {
            subject: claims.sub,
            roles,
        };
        let verified = Verified {
            principal: principal.clone(),
            expires_at: claims.exp,
        };
        self.verified.insert(token.to_owned(), Arc::new(verified));
        Ok(principal)
    }
}

/// What [`Authenticator::authenticate`] found out about a request, left in its extensions.
#[derive(Debug, Clone)]
pub enum Authentication {
    /// A valid token, or any request when authentication is disabled.
    Authenticated(Principal),
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not a valid bearer token.
    Refused(TokenError),
}

impl Authentication {
    /// The caller, when it proved who it is.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Authentication::Authenticated(p) => Some(p),
            _ => None,
        }
    }
}

impl Authenticator {
    /// Verifies the bearer token of a request with `headers`, if it has one. It refuses nothing
    /// itself: the edge ([`crate::edge::protect`]) leaves the outcome in the request's
    /// extensions, open routes (`/health`, `/ready`, `/openapi.json`) stay open, and protected
    /// routes refuse through [`Require`].
    /// What [`Self::authenticate`] would answer, when that needs no signature check: no
    /// authentication configured, no or a malformed `Authorization` header, or a token found
    /// valid before. `None` for a token whose signature has yet to be checked, which the edge
    /// does only once the sender's address is within its rate: forged tokens then cost their
    /// sender its budget, not the server its CPU.
    pub fn authenticate_without_signature(&self, headers: &HeaderMap) -> Option<Authentication> {
        let Authenticator::Jwt(verifier) = self else {
            return Some(self.authenticate(headers));
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Some(Authentication::Missing);
        };
        match bearer_token(value) {
            None => Some(Authentication::Refused(TokenError::Invalid)),
            Some(token) if token.len() > TOKEN_BYTES_MAX => Some(Authentication::Refused(TokenError::Invalid)),
            Some(token) => verifier.remembered(token).map(Authentication::Authenticated),
        }
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Authentication {
        match self {
            Authenticator::Disabled => Authentication::Authenticated(Principal {
                subject: INSECURE_SUBJECT.to_owned(),
                roles: Role::ALL.to_vec(),
            }),
            Authenticator::Jwt(verifier) => match headers.get(header::AUTHORIZATION) {
                None => Authentication::Missing,
                Some(value) => match bearer_token(value) {
                    Some(token) => match verifier.verify(token) {
                        Ok(principal) => Authentication::Authenticated(principal),
                        Err(e) => Authentication::Refused(e),
                    },
                    None => Authentication::Refused(TokenError::Invalid),
                },
            },
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A role as a type, so a handler's signature says which role it needs: `Require<Teller>`.
pub trait RequiredRole {
    const ROLE: Role;
}

/// The role of write commands.
#[derive(Debug)]
pub struct Teller;
/// The role of account and transfer reads.
#[derive(Debug)]
pub struct Reader;
/// The role of audit endpoints and export.
#[derive(Debug)]
pub struct Auditor;
/// The role of admin and projection control.
#[derive(Debug)]
pub struct Ops;

impl RequiredRole for Teller {
    const ROLE: Role = Role::Teller;
}
impl RequiredRole for Reader {
    const ROLE: Role = Role::Reader;
}
impl RequiredRole for Auditor {
    const ROLE: Role = Role::Auditor;
}
impl RequiredRole for Ops {
    const ROLE: Role = Role::Ops;
}

/// Extractor: the caller, who must hold role `R`. Put it first among a handler's arguments,
/// so an unauthenticated request is refused before its body is read.
#[derive(Debug)]
pub struct Require<R: RequiredRole> {
    pub caller: Principal,
    role: PhantomData<R>,
}

impl<S, R> FromRequestParts<S> for Require<R>
where
    S: Send + Sync,
    R: RequiredRole,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authentication>() {
            Some(Authentication::Authenticated(p)) if p.has(R::ROLE) => Ok(Require {
                caller: p.clone(),
                role: PhantomData,
            }),
            Some(Authentication::Authenticated(_)) => Err(forbidden(R::ROLE)),
            Some(Authentication::Missing) => Err(unauthorized(None)),
            Some(Authentication::Refused(e)) => Err(unauthorized(Some(e))),
            None => {
                // A programmer error: the router was built without the middleware.
                let mut response = Problem::internal().into_response();
                response.extensions_mut().insert(ErrorReport(
                    "Require<_> used on a route without the edge (tally_service::edge::protect)".into(),
                ));
                Err(response)
            }
        }
    }
}

/// `401` with the RFC 6750 challenge: no error code when the request had no token (§3.1),
/// `invalid_token` when its token was refused.
pub fn unauthorized(error: Option<&TokenError>) -> Response {
    let (problem, challenge) = match error {
        None => (
            Problem::new(StatusCode::UNAUTHORIZED, "missing-token", "Authentication required")
                .detail("Send `Authorization: Bearer <token>`."),
            format!("Bearer realm=\"{REALM}\""),
        ),
        Some(TokenError::Expired) => (
            Problem::new(StatusCode::UNAUTHORIZED, "token-expired", "Token expired")
                .detail("The bearer token has expired; get a new one."),
            format!("Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"The token expired\""),
        ),
        Some(TokenError::Invalid) => (
            Problem::new(StatusCode::UNAUTHORIZED, "invalid-token", "Invalid token").detail(
                "The bearer token is malformed, not signed by a key this server trusts, or has \
                 the wrong issuer or audience.",
            ),
            format!("Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"The token is invalid\""),
        ),
    };
    with_challenge(problem, &challenge)
}

/// `403`: a valid token without the role the route needs.
pub fn forbidden(role: Role) -> Response {
    let problem = Problem::new(StatusCode::FORBIDDEN, "insufficient-role", "Insufficient role")
        .detail(format!("This endpoint needs the `{role}` role."))
        .extension("required_role", role.as_str());
    with_challenge(
        problem,
        &format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{role}\""),
    )
}

fn with_challenge(problem: Problem, challenge: &str) -> Response {
    let mut response = problem.into_response();
    if let Ok(value) = HeaderValue::from_str(challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs256() -> Arc<Verifier> {
        let config = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        match config.authenticator().unwrap() {
            Authenticator::Jwt(v) => v,
            Authenticator::Disabled => panic!("a secret was configured"),
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_subject_and_roles() {
        let token = mint(
            SECRET.as_bytes(),
            &Claims::new("alice", &[Role::Teller, Role::Reader], 60),
        );
        let principal = hs256().verify(&token).unwrap();
        assert_eq!(principal.subject, "alice");
        assert_eq!(principal.roles, vec![Role::Teller, Role::Reader]);
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let mut claims = Claims::new("alice", &[Role::Teller], 0);
        claims.exp -= CLOCK_LEEWAY_S + 60;
        let token = mint(SECRET.as_bytes(), &claims);
        assert_eq!(hs256().verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn a_remembered_token_is_answered_from_memory_only_until_it_expires() {
        let verifier = hs256();
        let token = mint(SECRET.as_bytes(), &Claims::new("alice", &[Role::Reader], 60));
        let first = verifier.verify(&token).unwrap();
        assert_eq!(
            verifier.verify(&token).unwrap(),
            first,
            "the second answer is the first"
        );
        assert!(verifier.verified.contains_key(token.as_str()));

        // A token remembered while it was valid, whose `exp` has since passed beyond the leeway.
        let mut claims = Claims::new("bob", &[Role::Reader], 0);
        claims.exp -= CLOCK_LEEWAY_S + 1;
        let expired = mint(SECRET.as_bytes(), &claims);
        let remembered = Verified {
            principal: Principal {
                subject: "bob".into(),
                roles: vec![Role::Reader],
            },
            expires_at: claims.exp,
        };
        verifier.verified.insert(expired.clone(), Arc::new(remembered));
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        assert!(!verifier.verified.contains_key(expired.as_str()), "and it is forgotten");
    }

    #[test]
    fn a_refused_token_is_not_remembered() {
        let verifier = hs256();
        let token = mint(
            b"another secret of at least 32 bytes!",
            &Claims::new("mallory", &[Role::Ops], 60),
        );
        assert_eq!(verifier.verify(&token), Err(TokenError::Invalid));
        assert!(!verifier.verified.contains_key(token.as_str()));
    }

    #[test]
    fn a_token_signed_with_another_secret_is_invalid() {
        let token = mint(
            b"another secret of at least 32 bytes!",
            &Claims::new("alice", &[Role::Ops], 60),
        );
        assert_eq!(hs256().verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn an_unsigned_token_is_invalid() {
        // {"alg":"none"} . {"sub":"alice","roles":["ops"],"exp":9999999999} . (no signature)
        let token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsInJvbGVzIjpbIm9wcyJdLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(hs256().verify(token), Err(TokenError::Invalid));
    }

    #[test]
    fn unknown_roles_are_ignored() {
        let mut claims = Claims::new("alice", &[Role::Reader], 60);
        claims.roles.push("superuser".into());
        let token = mint(SECRET.as_bytes(), &claims);
        assert_eq!(hs256().verify(&token).unwrap().roles, vec![Role::Reader]);
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required() {
        let config = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            jwt_issuer: Some("https://issuer.example".into()),
            jwt_audience: Some("tally".into()),
            ..AuthConfig::default()
        };
        let Authenticator::Jwt(verifier) = config.authenticator().unwrap() else {
            panic!("a secret was configured")
        };
        let mut claims = Claims::new("alice", &[Role::Reader], 60);
        let bare = mint(SECRET.as_bytes(), &claims);
        assert_eq!(verifier.verify(&bare), Err(TokenError::Invalid));
        claims.iss = Some("https://issuer.example".into());
        claims.aud = Some("someone-else".into());
        assert_eq!(
            verifier.verify(&mint(SECRET.as_bytes(), &claims)),
            Err(TokenError::Invalid)
        );
        claims.aud = Some("tally".into());
        assert!(verifier.verify(&mint(SECRET.as_bytes(), &claims)).is_ok());
    }

    /// A P-256 key pair made for this test only (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256`): the issuer's private key and the public key a server gets.
    const TEST_ES256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgl/M5IX0s0XvfqGKq
FU6Ynz0NjyJ2NWdjoq1v3Ti3Dp2hRANCAASDOxtIsDln+4CGtu6UmnWCNnYPSlYp
sb5DA6Q6pxBJYk/k4G6fyVQoZEwdMjYExOePj81M5iRuyq2Zr4o3Ml2r
-----END PRIVATE KEY-----
";
    const TEST_ES256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEgzsbSLA5Z/uAhrbulJp1gjZ2D0pW
KbG+QwOkOqcQSWJP5OBun8lUKGRMHTI2BMTnj4/NTOYkbsqtma+KNzJdqw==
-----END PUBLIC KEY-----
";

    #[test]
    fn an_es256_token_verifies_with_the_configured_public_key_and_hs256_ones_do_not() {
        let path = std::env::temp_dir().join(format!("tally-es256-{}.pem", std::process::id()));
        std::fs::write(&path, TEST_ES256_PUBLIC).unwrap();
        let mut config = AuthConfig {
            jwt_public_key_file: Some(path.clone()),
            ..AuthConfig::default()
        };
        let without_algorithm = config.authenticator();
        config.jwt_algorithm = Some("ES256".into());
        let authenticator = config.authenticator();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(without_algorithm, Err(AuthConfigError::AlgorithmMissing)));
        let Ok(Authenticator::Jwt(verifier)) = authenticator else {
            panic!("a public key was configured: {authenticator:?}")
        };
        let claims = Claims::new("issuer-signed", &[Role::Auditor], 60);
        let key = EncodingKey::from_ec_pem(TEST_ES256_PRIVATE.as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::ES256), &claims, &key).unwrap();
        let principal = verifier.verify(&token).unwrap();
        assert_eq!(principal.subject, "issuer-signed");
        assert_eq!(principal.roles, vec![Role::Auditor]);
        // An HS256 token "signed" with the public key's text must not pass (algorithm confusion).
        let confused = mint(TEST_ES256_PUBLIC.as_bytes(), &claims);
        assert_eq!(verifier.verify(&confused), Err(TokenError::Invalid));
    }

    #[test]
    fn a_server_without_a_key_refuses_to_start_unless_told_to_run_insecure() {
        assert!(matches!(
            AuthConfig::default().authenticator(),
            Err(AuthConfigError::NoKey)
        ));
        let insecure = AuthConfig {
            insecure_no_auth: true,
            ..AuthConfig::default()
        };
        assert!(matches!(insecure.authenticator(), Ok(Authenticator::Disabled)));
        let short = AuthConfig {
            jwt_secret: Some("short".into()),
            ..AuthConfig::default()
        };
        assert!(matches!(short.authenticator(), Err(AuthConfigError::SecretTooShort)));
    }

    #[test]
    fn a_published_placeholder_secret_is_refused_whatever_its_length() {
        for placeholder in [
            "dev-only-insecure-secret-change-me-0123456789",
            "CHANGE-ME-0123456789abcdef0123456789",
        ] {
            let config = AuthConfig {
                jwt_secret: Some(placeholder.into()),
                ..AuthConfig::default()
            };
            assert!(
                matches!(config.authenticator(), Err(AuthConfigError::PlaceholderSecret(_))),
                "{placeholder}"
            );
        }
    }

    #[test]
    fn a_token_not_valid_yet_is_refused_until_its_nbf() {
        let mut claims = Claims::new("alice", &[Role::Teller], 7200);
        claims.nbf = Some(jsonwebtoken::get_current_timestamp() + 3600);
        let early = mint(SECRET.as_bytes(), &claims);
        assert_eq!(hs256().verify(&early), Err(TokenError::Invalid));
        claims.nbf = Some(jsonwebtoken::get_current_timestamp() - 1);
        let now_valid = mint(SECRET.as_bytes(), &claims);
        assert!(hs256().verify(&now_valid).is_ok());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_needs_a_token() {
        let parse = |s: &'static str| bearer_token(&HeaderValue::from_static(s)).map(str::to_owned);
        assert_eq!(parse("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(parse("bearer abc").as_deref(), Some("abc"));
        assert_eq!(parse("Basic abc"), None);
        assert_eq!(parse("Bearer "), None);
        assert_eq!(parse("Bearer"), None);
    }

    #[test]
    fn refusals_carry_rfc_6750_challenges() {
        let missing = unauthorized(None);
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(missing.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"tally\"");
        let expired = unauthorized(Some(&TokenError::Expired));
        let challenge = expired.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        let forbidden = forbidden(Role::Teller);
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        let challenge = forbidden.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"teller\""),
            "{challenge}"
        );
    }
}
