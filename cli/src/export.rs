//! `tally audit export`: the global feed of a query API (`GET /v1/audit/events`, the `auditor`
//! role) written as JSON Lines, one event per line exactly as the API sent it (payloads byte
//! for byte as stored and hashed), with progress on stderr and the file's SHA-256 at the end
//! (also written beside it as `<file>.sha256`, in `sha256sum -c` format).
//!
//! `--from` and `--to` select events by the time they were recorded. The feed is in commit
//! order, which follows recording time only up to the time a transaction takes to commit:
//! the export reads from the start of the log (or `--after`, a checkpoint of an earlier
//! export) and stops at the head of the log or once it sees an event recorded
//! [`COMMIT_SKEW_MAX`] after `--to`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tally_event_store::verify::Progress;

use crate::progress::ProgressReporter;

/// How long after being recorded an event may still commit (a batch transaction's bound), so
/// how far past `--to` the export keeps reading before it stops.
pub const COMMIT_SKEW_MAX: Duration = Duration::from_secs(60);
/// Events asked for per request (the API's page maximum).
const PAGE_EVENTS: u32 = 1_000;
/// Attempts per page before the export gives up on a failing API.
const PAGE_ATTEMPTS_MAX: u32 = 5;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Only events recorded at or after this instant (RFC 3339).
    #[arg(long)]
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this instant (RFC 3339).
    #[arg(long)]
    pub to: Option<DateTime<Utc>>,
    /// Start after this feed checkpoint (`<tx>.<position>`, as the last export printed).
    #[arg(long)]
    pub after: Option<String>,
    /// The JSON Lines file to write (replaced if it exists).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Base URL of a query API.
    #[arg(long, env = "TALLY_QUERY_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// A bearer token with the `auditor` role.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, Deserialize)]
struct FeedPage {
    events: Vec<Box<RawValue>>,
    checkpoint: String,
    head_position: i64,
}

/// The fields of an event the export looks at; the line written is the event as sent.
#[derive(Debug, Deserialize)]
struct EventHead {
    position: i64,
    recorded_at: DateTime<Utc>,
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub events: u64,
    pub sha256: String,
    /// Resume a later export here (`--after`).
    pub checkpoint: String,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (args.from, args.to)
        && from >= to
    {
        bail!("--from must be before --to");
    }
    let exported = export(&args).await?;
    let digest_file = sha256_path(&args.output);
    let name = args
        .output
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    std::fs::write(&digest_file, format!("{}  {name}\n", exported.sha256))
        .with_context(|| format!("writing {}", digest_file.display()))?;
    println!(
        "exported {} events to {}\ncheckpoint {}\nsha256 {}",
        exported.events,
        args.output.display(),
        exported.checkpoint,
        exported.sha256
    );
    Ok(())
}

fn sha256_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

async fn export(args: &ExportArgs) -> anyhow::Result<Exported> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let file = std::fs::File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut hasher = Sha256::new();
    let mut reporter = ProgressReporter::new("exported");
    let stop_after = args.to.map(|to| to + COMMIT_SKEW_MAX);
    let mut after = args.after.clone();
    let mut written = 0u64;
    let mut first_position: Option<i64> = None;
    loop {
        let page = fetch_page(&client, args, after.as_deref()).await?;
        let mut past_end = page.events.is_empty();
        for raw in &page.events {
            let head: EventHead = serde_json::from_str(raw.get()).context("an event the API sent is malformed")?;
            let start = *first_position.get_or_insert(head.position);
            reporter.update(Progress {
                done: (head.position - start).max(0) as u64,
                total: (page.head_position - start).max(0) as u64,
            });
            if stop_after.is_some_and(|stop| head.recorded_at >= stop) {
                past_end = true;
            }
            let wanted =
                args.from.is_none_or(|from| head.recorded_at >= from) && args.to.is_none_or(|to| head.recorded_at < to);
            if wanted {
                let line = raw.get().as_bytes();
                out.write_all(line)?;
                out.write_all(b"\n")?;
                hasher.update(line);
                hasher.update(b"\n");
                written += 1;
            }
        }
        after = Some(page.checkpoint);
        if past_end {
            break;
        }
    }
    out.flush()?;
    reporter.finish();
    Ok(Exported {
        events: written,
        sha256: hex::encode(hasher.finalize()),
        checkpoint: after.unwrap_or_default(),
    })
}

/// One page, retrying 503s and transport errors a few times with back-off.
async fn fetch_page(client: &reqwest::Client, args: &ExportArgs, after: Option<&str>) -> anyhow::Result<FeedPage> {
    let url = format!("{}/v1/audit/events", args.url.trim_end_matches('/'));
    let mut query = vec![("limit", PAGE_EVENTS.to_string())];
    if let Some(after) = after {
        query.push(("after", after.to_owned()));
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = client.get(&url).query(&query).bearer_auth(&args.token).send().await;
        let retryable = match response {
            Ok(response) if response.status().is_success() => {
                return response.json().await.context("reading a page of the feed");
            }
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                format!("{} {}", response.status(), response.text().await.unwrap_or_default())
            }
            Ok(response) => {
                let status = response.status();
                bail!("{url}: {status}: {}", response.text().await.unwrap_or_default());
            }
            Err(error) => error.to_string(),
        };
        if attempt >= PAGE_ATTEMPTS_MAX {
            bail!("{url}: giving up after {attempt} attempts: {retryable}");
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
    }
}
