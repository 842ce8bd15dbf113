//! `tally token`: mints an HS256 bearer token for a Tally API, signed with the shared secret
//! the servers verify with (`TALLY_JWT_SECRET`). For the local stack and tests; production
//! tokens come from an identity provider and are RS256/ES256-signed.

use std::time::Duration;

use anyhow::bail;
use tally_service::auth::{Claims, Role, SECRET_BYTES_MIN, mint};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Role to grant: teller, reader, auditor or ops. Repeat (or separate with commas) for several.
    #[arg(long = "role", required = true, value_delimiter = ',')]
    roles: Vec<Role>,
    /// The servers' HS256 secret.
    #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Who the token speaks for; recorded as the actor of every event its commands append.
    #[arg(long, default_value = "dev")]
    sub: String,
    /// How long the token is valid, e.g. 30s, 15m, 1440m.
    #[arg(long, default_value = "60m", value_parser = crate::load::parse_duration)]
    ttl: Duration,
    /// `iss` claim, for servers configured with TALLY_JWT_ISSUER.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim, for servers configured with TALLY_JWT_AUDIENCE.
    #[arg(long)]
    audience: Option<String>,
}

/// Prints the token on stdout.
pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    if args.secret.len() < SECRET_BYTES_MIN {
        bail!("--secret must be at least {SECRET_BYTES_MIN} bytes (the servers refuse shorter ones)");
    }
    if args.sub.is_empty() {
        bail!("--sub must not be empty");
    }
    let mut claims = Claims::new(&args.sub, &args.roles, args.ttl.as_secs().max(1));
    claims.iss.clone_from(&args.issuer);
    claims.aud.clone_from(&args.audience);
    println!("{}", mint(args.secret.as_bytes(), &claims));
    Ok(())
}
