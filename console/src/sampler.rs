//! The overview's memory: every `interval` the console scrapes each service's `/metrics`
//! (Prometheus text) and keeps a compact [`Point`] of what the overview shows (command
//! totals by outcome, the latency histogram summed over commands, the writer queue, relay
//! leader and lag, projection lag per partition, replica lag and rotation). Points go into
//! a ring of at most [`SAMPLES_MAX`], so memory is bounded whatever the uptime; rates and
//! quantiles are computed from the difference of two points when a page asks.
//!
//! A service that does not answer is recorded as down in the point (with why), and the
//! overview says so; the sampler itself never stops.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Points kept: five minutes at the default two-second interval.
pub const SAMPLES_MAX: usize = 150;
/// Longest a single `/metrics` scrape may take before the service counts as down.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// What to scrape.
#[derive(Debug, Clone)]
pub struct Targets {
    pub command: Vec<String>,
    pub query: Vec<String>,
    pub relay: Vec<String>,
    pub projector: Vec<String>,
    pub interval: Duration,
    pub client: reqwest::Client,
}

/// One time series value of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text exposition format (what `tally_service::metrics` renders):
/// comments are skipped, and so is any line that does not parse.
pub fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (&line[..open], parse_labels(&line[open + 1..close])?, &line[close + 1..])
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Series {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.trim().is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.trim().trim_start_matches(',').trim().to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// Whether a scraped service answered.
#[derive(Debug, Clone)]
pub struct TargetState {
    pub kind: &'static str,
    pub url: String,
    /// Why it gave no metrics, when it did not.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RelayPoint {
    pub url: String,
    pub leader: bool,
    pub lag_events: f64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ProjectionPoint {
    pub projection: String,
    pub partition: String,
    pub lag_events: f64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ReplicaPoint {
    /// The query API instance that measured it.
    pub instance: String,
    pub replica: String,
    pub usable: bool,
    pub lag_bytes: Option<f64>,
    pub lag_seconds: Option<f64>,
}

/// What one round of scrapes found, reduced to what the overview shows.
#[derive(Debug, Clone)]
pub struct Point {
    pub at: DateTime<Utc>,
    /// `tally_commands_total` summed over commands and instances, by outcome.
    pub commands: BTreeMap<String, f64>,
    /// `tally_command_duration_seconds` buckets summed over commands and instances: (upper
    /// bound, cumulative count), by bound.
    pub duration_buckets: Vec<(f64, f64)>,
    /// `tally_writer_queue_commands`, summed over command APIs.
    pub queue_commands: f64,
    pub relays: Vec<RelayPoint>,
    pub projections: Vec<ProjectionPoint>,
    pub replicas: Vec<ReplicaPoint>,
    pub targets: Vec<TargetState>,
}

impl Point {
    pub fn commands_total(&self) -> f64 {
        self.commands.values().sum()
    }

    pub fn relay_lag_events(&self) -> f64 {
        self.relays.iter().filter(|r| r.leader).map(|r| r.lag_events).sum()
    }

    pub fn projection_lag_events(&self) -> f64 {
        self.projections.iter().map(|p| p.lag_events).sum()
    }

    pub fn replica_lag_seconds_max(&self) -> f64 {
        self.replicas.iter().filter_map(|r| r.lag_seconds).fold(0.0, f64::max)
    }
}

/// One target's scrape: its kind, its URL, and its series or why there are none.
pub type Scrape = (&'static str, String, Result<Vec<Series>, String>);

/// Reduces the scrapes of one round to a point.
pub fn reduce(at: DateTime<Utc>, scrapes: Vec<Scrape>) -> Point {
    let mut point = Point {
        at,
        commands: BTreeMap::new(),
        duration_buckets: Vec::new(),
        queue_commands: 0.0,
        relays: Vec::new(),
        projections: Vec::new(),
        replicas: Vec::new(),
        targets: Vec::new(),
    };
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (kind, url, scrape) in scrapes {
        let series = match scrape {
            Ok(series) => {
                point.targets.push(TargetState {
                    kind,
                    url: url.clone(),
                    error: None,
                });
                series
            }
            Err(error) => {
                point.targets.push(TargetState {
                    kind,
                    url,
                    error: Some(error),
                });
                continue;
            }
        };
        let mut relay = RelayPoint {
            url: url.clone(),
            leader: false,
            lag_events: 0.0,
            lag_seconds: 0.0,
        };
        let mut replicas: BTreeMap<String, ReplicaPoint> = BTreeMap::new();
        for s in series {
            match s.name.as_str() {
                "tally_commands_total" => {
                    let outcome = s.label("outcome").unwrap_or("unknown").to_owned();
                    *point.commands.entry(outcome).or_default() += s.value;
                }
                "tally_command_duration_seconds_bucket" => {
                    if let Some(le) = s.label("le").and_then(|le| le.parse::<f64>().ok()) {
                        // Keyed by the bound's bits: the bounds are the same few constants.
                        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
                    }
                }
                "tally_writer_queue_commands" => point.queue_commands += s.value,
                "tally_relay_leader" => relay.leader = s.value >= 1.0,
                "tally_relay_lag_events" => relay.lag_events = s.value,
                "tally_relay_lag_seconds" => relay.lag_seconds = s.value,
                "tally_projection_lag_events" | "tally_projection_lag_seconds" => {
                    let (projection, partition) = (
                        s.label("projection").unwrap_or("?").to_owned(),
                        s.label("partition").unwrap_or("?").to_owned(),
                    );
                    let index = match point
                        .projections
                        .iter()
                        .position(|p| p.projection == projection && p.partition == partition)
                    {
                        Some(i) => i,
                        None => {
                            point.projections.push(ProjectionPoint {
                                projection,
                                partition,
                                lag_events: 0.0,
                                lag_seconds: 0.0,
                            });
                            point.projections.len() - 1
                        }
                    };
                    if s.name.ends_with("_events") {
                        point.projections[index].lag_events = s.value;
                    } else {
                        point.projections[index].lag_seconds = s.value;
                    }
                }
                "tally_replica_usable" | "tally_replica_lag_bytes" | "tally_replica_lag_seconds" => {
                    let name = s.label("replica").unwrap_or("?").to_owned();
                    let replica = replicas.entry(name.clone()).or_insert_with(|| ReplicaPoint {
                        instance: url.clone(),
                        replica: name,
                        usable: false,
                        lag_bytes: None,
                        lag_seconds: None,
                    });
                    match s.name.as_str() {
                        "tally_replica_usable" => replica.usable = s.value >= 1.0,
                        "tally_replica_lag_bytes" => replica.lag_bytes = Some(s.value),
                        _ => replica.lag_seconds = Some(s.value),
                    }
                }
                _ => {}
            }
        }
        if kind == "relay" {
            point.relays.push(relay);
        }
        point.replicas.extend(replicas.into_values());
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    point.duration_buckets = sorted;
    point.projections.sort_by(|a, b| {
        (&a.projection, a.partition.parse::<u32>().ok()).cmp(&(&b.projection, b.partition.parse().ok()))
    });
    point
}

/// Commands per second between two points.
pub fn rate(earlier: &Point, later: &Point) -> f64 {
    let seconds = (later.at - earlier.at).num_milliseconds() as f64 / 1000.0;
    if seconds <= 0.0 {
        return 0.0;
    }
    // A restarted command API starts its counters again: never a negative rate.
    ((later.commands_total() - earlier.commands_total()) / seconds).max(0.0)
}

/// The `q` quantile (0..1) of the command latencies recorded between two points, in
/// seconds, interpolated within its bucket as Prometheus' `histogram_quantile` does; `None`
/// when no command finished in between.
pub fn quantile(earlier: &Point, later: &Point, q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = later
        .duration_buckets
        .iter()
        .map(|(le, count)| {
            let before = earlier
                .duration_buckets
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, (count - before).max(0.0))
        })
        .collect();
    let total = counts.last().map(|(_, c)| *c)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (le, count) in counts {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the largest bound: say the largest bound, as Prometheus does.
                return Some(previous.0);
            }
            let in_bucket = count - previous.1;
            let fraction = if in_bucket > 0.0 {
                (rank - previous.1) / in_bucket
            } else {
                1.0
            };
            return Some(previous.0 + (le - previous.0) * fraction);
        }
        previous = (le, count);
    }
    None
}

/// The ring of points.
#[derive(Debug, Default)]
pub struct Samples {
    ring: Mutex<VecDeque<Point>>,
}

impl Samples {
    pub fn push(&self, point: Point) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == SAMPLES_MAX {
            ring.pop_front();
        }
        ring.push_back(point);
    }

    /// Every point kept, oldest first.
    pub fn points(&self) -> Vec<Point> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

async fn scrape(client: &reqwest::Client, base: &str) -> Result<Vec<Series>, String> {
    let response = client
        .get(format!("{}/metrics", base.trim_end_matches('/')))
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("/metrics answered {}", response.status()));
    }
    let text = response.text().await.map_err(|e| e.to_string())?;
    Ok(parse(&text))
}

/// Samples every target every `interval`, forever (the server aborts it on shutdown).
pub async fn run(targets: Targets, samples: Arc<Samples>) {
    let mut tick = tokio::time::interval(targets.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let all: Vec<(&'static str, String)> = [
        ("command", &targets.command),
        ("query", &targets.query),
        ("relay", &targets.relay),
        ("projector", &targets.projector),
    ]
    .into_iter()
    .flat_map(|(kind, urls)| urls.iter().filter(|u| !u.is_empty()).map(move |u| (kind, u.clone())))
    .collect();
    loop {
        tick.tick().await;
        let at = Utc::now();
        let scrapes = futures::future::join_all(all.iter().map(|(kind, url)| {
            let client = targets.client.clone();
            async move { (*kind, url.clone(), scrape(&client, url).await) }
        }))
        .await;
        samples.push(reduce(at, scrapes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE tally_commands_total counter
tally_commands_total{command="deposit",outcome="accepted"} 8
tally_commands_total{command="withdraw",outcome="refused"} 2
tally_command_duration_seconds_bucket{command="deposit",outcome="accepted",le="0.001"} 0
tally_command_duration_seconds_bucket{command="deposit",outcome="accepted",le="0.01"} 8
tally_command_duration_seconds_bucket{command="deposit",outcome="accepted",le="+Inf"} 8
tally_command_duration_seconds_bucket{command="withdraw",outcome="refused",le="0.001"} 2
tally_command_duration_seconds_bucket{command="withdraw",outcome="refused",le="0.01"} 2
tally_command_duration_seconds_bucket{command="withdraw",outcome="refused",le="+Inf"} 2
tally_writer_queue_commands 3
tally_projection_lag_events{projection="accounts",partition="1"} 5
tally_replica_usable{replica="replica-1"} 1
tally_replica_lag_seconds{replica="replica-1"} 0.25
"#;

    fn point(at_s: i64, text: &str) -> Point {
        let at = DateTime::from_timestamp(at_s, 0).unwrap();
        reduce(at, vec![("command", "http://c".into(), Ok(parse(text)))])
    }

    #[test]
    fn a_scrape_is_reduced_to_outcomes_buckets_queue_lag_and_replicas() {
        let p = point(0, TEXT);
        assert_eq!(p.commands.get("accepted"), Some(&8.0));
        assert_eq!(p.commands_total(), 10.0);
        assert_eq!(
            p.duration_buckets,
            vec![(0.001, 2.0), (0.01, 10.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!(p.queue_commands, 3.0);
        assert_eq!(p.projection_lag_events(), 5.0);
        assert!(p.replicas[0].usable);
        assert_eq!(p.replica_lag_seconds_max(), 0.25);
    }

    #[test]
    fn rates_and_quantiles_come_from_the_difference_of_two_points() {
        let empty = point(0, "");
        let later = point(2, TEXT);
        assert_eq!(rate(&empty, &later), 5.0);
        let p50 = quantile(&empty, &later, 0.5).unwrap();
        assert!(p50 > 0.001 && p50 <= 0.01, "{p50}");
        assert_eq!(quantile(&later, &later, 0.5), None);
    }

    #[test]
    fn a_service_that_does_not_answer_is_recorded_as_down() {
        let p = reduce(Utc::now(), vec![("relay", "http://r".into(), Err("refused".into()))]);
        assert_eq!(p.targets[0].error.as_deref(), Some("refused"));
        assert!(p.relays.is_empty());
    }

    #[test]
    fn label_values_may_hold_commas_quotes_and_braces() {
        let s = parse(r#"m{a="x,y",b="q\"}"} 1"#);
        assert_eq!(s[0].label("a"), Some("x,y"));
        assert_eq!(s[0].label("b"), Some("q\"}"));
    }
}
