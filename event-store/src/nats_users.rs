//! Who may do what on NATS: one user per service, allowed only the subjects its work needs, so
//! that nobody else can publish an event the projectors would see (SECURITY.md).
//!
//! | user | publishes | subscribes to |
//! |---|---|---|
//! | [`RELAY`] | events (`<prefix>.<partition>.<stream type>`); creating and reading the stream | its inbox (JetStream acks) |
//! | [`PROJECTOR`] | JetStream consumer requests and acks on the stream; dead letters; cache invalidations | its inbox (pulled messages) |
//! | [`QUERY`] (query API) | nothing | cache invalidations |
//! | [`ADMIN`] | anything | anything (operators' tools and the tests) |
//!
//! Each service has an inbox prefix of its own ([`inbox_prefix`]): with the default shared
//! `_INBOX.>` any user allowed to subscribe to inboxes could read the events JetStream
//! delivers to the projectors.
//!
//! The rules are rendered as the `authorization` block of a nats-server configuration
//! ([`authorization`]). The dev stack and the test kit write it with generated passwords;
//! `deploy/nats/auth.conf` is the same block taking the passwords from the environment, and a
//! test fails when the two drift. Projectors also check each event against the log's hash
//! chain before they apply it (`tally_projectors`), so even a publish these rules let through
//! cannot change a read model.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand::Rng as _;
use rand::distr::Alphanumeric;

use crate::partition::Topology;

/// The relay's NATS user.
pub const RELAY: &str = "tally_relay";
/// The projectors' NATS user.
pub const PROJECTOR: &str = "tally_projector";
/// The query API's NATS user.
pub const QUERY: &str = "tally_query";
/// Operators' user: every permission. No service signs in as it.
pub const ADMIN: &str = "tally_admin";
/// Every user, in the order they are rendered.
pub const ALL: [&str; 4] = [RELAY, PROJECTOR, QUERY, ADMIN];

/// Length of a generated password (alphanumeric: about 5.95 bits a character).
const GENERATED_PASSWORD_LEN: usize = 32;

/// The prefix of a user's reply subjects (`ConnectOptions::custom_inbox_prefix`).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// The rules for one server shared by many deployments, each with a stream and subject prefix
/// of its own (the test suite's: stream `T_<id>`, prefix `t<id>.events`).
pub fn shared_topology() -> Topology {
    Topology {
        stream_name: "*".into(),
        subject_prefix: "*.events".into(),
        ..Topology::default()
    }
}

/// The subjects a user may publish to and subscribe to; `None` for [`ADMIN`] (everything) and
/// for a user this module does not know (who gets no block, so nats-server refuses them).
///
/// `topology` may hold wildcards where a deployment shares one server between several
/// streams (the test kit gives every test its own): a stream name of `*` and a subject prefix
/// like `*.events`.
pub fn permissions(user: &str, topology: &Topology) -> Option<Permissions> {
    let stream = &topology.stream_name;
    let prefix = &topology.subject_prefix;
    let inbox = format!("{}.>", inbox_prefix(user));
    // `ensure_stream`: relay and projectors both make sure the stream exists, with as many
    // replicas as the topology asks.
    let stream_api = [
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.CREATE.{stream}"),
        format!("$JS.API.STREAM.UPDATE.{stream}"),
    ];
    match user {
        RELAY => Some(Permissions {
            publish: stream_api
                .into_iter()
                // `<prefix>.<partition>.<stream type>`: two tokens, so not the dead letters'
                // `<prefix>.dead-letter.<projection>.<partition>`.
                .chain([format!("{prefix}.*.*")])
                .collect(),
            subscribe: vec![inbox],
        }),
        PROJECTOR => Some(Permissions {
            publish: stream_api
                .into_iter()
                .chain([
                    // Durable pull consumers: create (with or without a filter subject), read,
                    // delete, and pull the next messages.
                    format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                    format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>"),
                    format!("$JS.API.CONSUMER.INFO.{stream}.>"),
                    format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"),
                    // Acks, naks and progress on the messages it was delivered.
                    format!("$JS.ACK.{stream}.>"),
                    format!("{prefix}.dead-letter.>"),
                    tally_schemas::invalidation::invalidation_wildcard(prefix),
                ])
                .collect(),
            subscribe: vec![inbox],
        }),
        QUERY => Some(Permissions {
            publish: Vec::new(),
            subscribe: vec![tally_schemas::invalidation::invalidation_wildcard(prefix)],
        }),
        _ => None,
    }
}

/// What one user may do; see [`permissions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (nothing else).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to (nothing else).
    pub subscribe: Vec<String>,
}

/// How a password appears in the rendered configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    /// Written out (the dev stack and the test kit, in a private folder).
    Literal(String),
    /// A variable nats-server reads from its environment when it starts, e.g.
    /// `TALLY_NATS_RELAY_PASSWORD` ([`password_variable`]); it refuses to start without it.
    Environment(String),
}

/// The environment variable `deploy/nats/auth.conf` reads a user's password from:
/// `tally_relay` → `TALLY_NATS_RELAY_PASSWORD`.
pub fn password_variable(user: &str) -> String {
    let role = user.strip_prefix("tally_").unwrap_or(user);
    format!("TALLY_NATS_{}_PASSWORD", role.to_ascii_uppercase())
}

/// The `authorization { users = [...] }` block of a nats-server configuration for every user
/// in [`ALL`], each with the password `password` gives it.
///
/// # Panics
/// When a literal password holds a character the configuration syntax would need to escape
/// (`"`, `\` or a control character): [`Credentials::generate`] never makes one.
pub fn authorization(topology: &Topology, password: impl Fn(&str) -> Password) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for user in ALL {
        let password = match password(user) {
            Password::Literal(text) => {
                assert!(
                    !text.chars().any(|c| c == '"' || c == '\\' || c.is_control()),
                    "a NATS password must not need escaping"
                );
                format!("\"{text}\"")
            }
            Password::Environment(variable) => format!("${variable}"),
        };
        let _ = write!(out, "    {{\n      user: \"{user}\"\n      password: {password}\n");
        if let Some(permissions) = permissions(user, topology) {
            let publish = if permissions.publish.is_empty() {
                "{ deny: [\">\"] }".to_owned()
            } else {
                format!("{{ allow: {} }}", quoted_list(&permissions.publish))
            };
            let _ = write!(
                out,
                "      permissions: {{\n        publish: {publish}\n        subscribe: {{ allow: {} }}\n      }}\n",
                quoted_list(&permissions.subscribe)
            );
        }
        out.push_str("    }\n");
    }
    out.push_str("  ]\n}\n");
    out
}

fn quoted_list(subjects: &[String]) -> String {
    let quoted: Vec<String> = subjects.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The `authorization` block of a deployment (`deploy/nats/auth.conf`): the default stream
/// and prefix, every password from the server's environment ([`password_variable`]).
pub fn deployment_authorization() -> String {
    authorization(&Topology::default(), |user| {
        Password::Environment(password_variable(user))
    })
}

/// One password per user, for a stack this process starts (the dev stack, the test kit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    passwords: BTreeMap<String, String>,
}

impl Credentials {
    /// A fresh random password for every user in [`ALL`].
    pub fn generate() -> Self {
        let passwords = ALL
            .iter()
            .map(|user| {
                let password: String = rand::rng()
                    .sample_iter(&Alphanumeric)
                    .take(GENERATED_PASSWORD_LEN)
                    .map(char::from)
                    .collect();
                ((*user).to_owned(), password)
            })
            .collect();
        Self { passwords }
    }

    /// The password of `user`.
    ///
    /// # Panics
    /// When `user` is not one of [`ALL`].
    pub fn password(&self, user: &str) -> &str {
        self.passwords
            .get(user)
            .unwrap_or_else(|| panic!("no NATS user {user}"))
    }

    /// The `authorization` block with these passwords written out.
    pub fn authorization(&self, topology: &Topology) -> String {
        authorization(topology, |user| Password::Literal(self.password(user).to_owned()))
    }

    /// `TALLY_NATS_USER` and `TALLY_NATS_PASSWORD` for a service signing in as `user`.
    pub fn env(&self, user: &str) -> [(&'static str, String); 2] {
        [
            ("TALLY_NATS_USER", user.to_owned()),
            ("TALLY_NATS_PASSWORD", self.password(user).to_owned()),
        ]
    }

    /// `user=password,...`: how a parent process hands them to its children (the test suite's
    /// `TALLY_TEST_NATS_PASSWORDS`).
    pub fn encode(&self) -> String {
        let pairs: Vec<String> = self.passwords.iter().map(|(u, p)| format!("{u}={p}")).collect();
        pairs.join(",")
    }

    /// The inverse of [`Credentials::encode`]; `None` when a user of [`ALL`] is missing.
    pub fn decode(text: &str) -> Option<Self> {
        let passwords: BTreeMap<String, String> = text
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(u, p)| (u.to_owned(), p.to_owned()))
            .collect();
        ALL.iter()
            .all(|user| passwords.contains_key(*user))
            .then_some(Self { passwords })
    }
}

/// How a service signs in to NATS: `--nats-url`, `--nats-user`, `--nats-password` (or
/// `TALLY_NATS_URL`, `TALLY_NATS_USER`, `TALLY_NATS_PASSWORD`).
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// The server, or a cluster's servers comma-separated (the client learns the others from
    /// any one, but needs one that is up to start).
    #[arg(long = "nats-url", env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// The NATS user to sign in as (e.g. `tally_relay`; see deploy/nats/auth.conf). Without
    /// one the service connects anonymously, which only a server without authorization lets in.
    #[arg(long = "nats-user", env = "TALLY_NATS_USER", requires = "password")]
    pub user: Option<String>,
    #[arg(
        long = "nats-password",
        env = "TALLY_NATS_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
}

impl NatsArgs {
    /// The servers `url` names (comma-separated), to pass to `ConnectOptions::connect`.
    pub fn servers(&self) -> std::io::Result<Vec<async_nats::ServerAddr>> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse::<async_nats::ServerAddr>().map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("NATS URL {url:?}: {e}"))
                })
            })
            .collect()
    }

    /// Connection options signing in as the configured user, with that user's inbox prefix
    /// (the only inboxes its permissions let it subscribe to).
    pub fn options(&self) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new();
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => options
                .user_and_password(user.clone(), password.clone())
                .custom_inbox_prefix(inbox_prefix(user)),
            _ => options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_variables_are_named_after_the_role() {
        assert_eq!(password_variable(RELAY), "TALLY_NATS_RELAY_PASSWORD");
        assert_eq!(password_variable(ADMIN), "TALLY_NATS_ADMIN_PASSWORD");
    }

    #[test]
    fn the_relay_may_publish_events_but_not_dead_letters_or_invalidations() {
        let topology = Topology::default();
        let relay = permissions(RELAY, &topology).unwrap();
        assert!(relay.publish.contains(&"tally.events.*.*".to_owned()));
        assert!(
            !relay
                .publish
                .iter()
                .any(|s| s.contains("dead-letter") || s.contains("invalidations"))
        );
        let projector = permissions(PROJECTOR, &topology).unwrap();
        assert!(!projector.publish.iter().any(|s| s.starts_with("tally.events.*")));
        assert!(permissions(QUERY, &topology).unwrap().publish.is_empty());
        assert_eq!(permissions(ADMIN, &topology), None);
    }

    #[test]
    fn credentials_survive_encoding_and_fill_the_block() {
        let credentials = Credentials::generate();
        assert_eq!(Credentials::decode(&credentials.encode()), Some(credentials.clone()));
        assert_eq!(Credentials::decode("tally_relay=x"), None);
        let block = credentials.authorization(&Topology::default());
        for user in ALL {
            assert!(block.contains(&format!("password: \"{}\"", credentials.password(user))));
        }
        assert!(block.contains("publish: { deny: [\">\"] }"), "{block}");
    }
}
