//! `cargo xtask check-deploy`: keeps `docker-compose.yml` and `deploy/` valid and true to the
//! code. CI runs it after the tests (`.ci/run`).
//!
//! - The compose file parses (`docker-compose config -q`, Debian's `docker-compose`).
//! - Every Kubernetes manifest validates against the Kubernetes JSON schemas of the oldest and
//!   newest version we support (`kubernetes-validate` from PyPI, which ships the schemas and
//!   runs offline; installed into a venv under the target directory on first use).
//! - Every `TALLY_*` variable given to a Tally binary (compose or Kubernetes) is one the binary
//!   reads: its clap `Config` lists it in `--help`.
//! - The pieces agree: load balancer backends and health checks with the listen ports, the
//!   event stream definition with the code's constants, Secret and ConfigMap references with
//!   what exists, `kustomization.yaml` with the files; the NATS and HAProxy configurations
//!   pass their servers' own checks; the Postgres scripts parse.
//! - The CloudNativePG overlay (`deploy/cnpg/`, no schema for its `Cluster` here) is checked
//!   structurally: synchronous replication required, the Secrets it needs, every database URL
//!   on the operator's Services, and its deletions naming what the base defines.
//! - The Prometheus alert rules pass `promtool check rules` and their unit tests
//!   (`promtool test rules`), where every alert fires in one case and stays quiet in another;
//!   every query of the Grafana dashboards parses (`promtool check rules` on them as recording
//!   rules); alerts and dashboards name only `tally_*` series the code exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_yaml_ng::Value;

use tally_event_store::nats_users;

use crate::{target_dir, workspace_root};

mod cnpg;

/// The PyPI package (and version) validating manifests; it bundles the schemas.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Kubernetes versions every manifest must be valid for: the oldest we support, the newest
/// the validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];
/// The image name every Tally workload uses (compose: `tally:dev`, Kubernetes: `tally`, set
/// by `images:` in `deploy/kustomization.yaml`).
const COMPOSE_IMAGE: &str = "tally:dev";
const K8S_IMAGE: &str = "tally";
/// Variables read outside clap, by every binary (`tally_service::telemetry`).
const TELEMETRY_VARIABLES: &[&str] = &["TALLY_LOG", "TALLY_LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT"];
/// Variables the deployment already passes for work in progress elsewhere: reported, not
/// failed, while the binary does not read them yet. Remove an entry once it has landed.
const PENDING_VARIABLES: &[(&str, &str)] = &[];

/// Failures collected over every check, reported together.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }

    fn fail(&mut self, failure: String) {
        self.failures.push(failure);
    }
}

pub fn check_deploy() -> anyhow::Result<()> {
    let root = workspace_root();
    let mut report = Report::default();

    crate::cargo(&["build", "--workspace", "--bins"])?;
    let mut binaries = Binaries::default();

    let compose = check_compose(&root, &mut binaries, &mut report)?;
    check_haproxy(&root, &compose, &mut report)?;
    check_k8s(&root, &mut binaries, &mut report)?;
    validate_manifests(&root, &mut report)?;
    cnpg::check_overlay(&root, &mut report)?;
    check_stream_definition(&root, &mut report)?;
    check_nats_config(&root, &mut report)?;
    check_scripts(&root, &mut report)?;
    check_monitoring(&root, &mut report)?;

    for note in &report.notes {
        println!("note: {note}");
    }
    if !report.failures.is_empty() {
        for failure in &report.failures {
            eprintln!("FAIL {failure}");
        }
        bail!("{} deployment check(s) failed", report.failures.len());
    }
    println!("deployment checks passed");
    Ok(())
}

// ---- Binaries and the variables they read ----------------------------------------------------

/// The `TALLY_*` variables each command line reads, from its `--help` (cached).
#[derive(Default)]
struct Binaries {
    variables: BTreeMap<Vec<String>, BTreeSet<String>>,
}

impl Binaries {
    /// The variables `command` (a binary and its subcommands, e.g. `tally migrate`) reads.
    fn variables(&mut self, command: &[String]) -> anyhow::Result<&BTreeSet<String>> {
        if !self.variables.contains_key(command) {
            let (binary, subcommands) = command.split_first().context("an empty command")?;
            let path = target_dir().join("debug").join(binary);
            let output = run(Command::new(&path).args(subcommands).arg("--help"))
                .with_context(|| format!("{} --help", command.join(" ")))?;
            let mut names = env_names_in_help(&String::from_utf8_lossy(&output.stdout));
            names.extend(TELEMETRY_VARIABLES.iter().map(|s| (*s).to_owned()));
            self.variables.insert(command.to_vec(), names);
        }
        Ok(&self.variables[command])
    }

    /// Checks that `binary` reads every one of `names`; `place` names where they are set.
    fn check(&mut self, command: &[String], names: &BTreeSet<String>, place: &str, report: &mut Report) {
        let known = match self.variables(command) {
            Ok(known) => known.clone(),
            Err(error) => return report.fail(format!("{place}: {error:#}")),
        };
        for name in names.iter().filter(|n| !known.contains(*n)) {
            match PENDING_VARIABLES.iter().find(|(pending, _)| pending == name) {
                Some((_, what)) => report.notes.push(format!(
                    "{place}: {name} is not read by `{}` yet (pending: {what})",
                    command.join(" ")
                )),
                None => report.fail(format!(
                    "{place}: `{}` reads no variable {name} (see its --help)",
                    command.join(" ")
                )),
            }
        }
    }
}

/// `[env: TALLY_X=…]` / `[env: TALLY_X]` markers of clap's help.
fn env_names_in_help(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Checks the telemetry variables are still read where `TELEMETRY_VARIABLES` says.
fn check_telemetry_variables(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    let source = std::fs::read_to_string(root.join("service/src/telemetry.rs"))?;
    for name in TELEMETRY_VARIABLES {
        report.check(source.contains(&format!("\"{name}\"")), || {
            format!("service/src/telemetry.rs no longer reads {name}; update TELEMETRY_VARIABLES")
        });
    }
    Ok(())
}

// ---- docker-compose.yml ---------------------------------------------------------------------

/// A Tally service of the compose file, as `docker-compose config` resolves it.
struct ComposeService {
    command: Vec<String>,
    environment: BTreeMap<String, String>,
    healthcheck: String,
}

/// The Tally services (by name) of the compose file.
type Compose = BTreeMap<String, ComposeService>;

/// The variables docker-compose.yml requires from the environment.
const COMPOSE_SECRETS: [&str; 13] = [
    "TALLY_JWT_SECRET",
    "TALLY_PG_PASSWORD",
    "TALLY_PG_REPLICATION_PASSWORD",
    "TALLY_COMMAND_DB_PASSWORD",
    "TALLY_RELAY_DB_PASSWORD",
    "TALLY_PROJECTOR_DB_PASSWORD",
    "TALLY_QUERY_DB_PASSWORD",
    "TALLY_SEALER_DB_PASSWORD",
    // A path (the sealer's signing key file, a compose secret).
    "TALLY_CHECKPOINT_KEY",
    "TALLY_NATS_RELAY_PASSWORD",
    "TALLY_NATS_PROJECTOR_PASSWORD",
    "TALLY_NATS_QUERY_PASSWORD",
    "TALLY_NATS_ADMIN_PASSWORD",
];

/// What `deploy/nats/auth.conf` holds above the block `nats_users` renders.
const NATS_AUTH_HEADER: &str = "\
# Who may do what on Tally's NATS: one user per service, allowed only its own subjects
# (event-store/src/nats_users.rs, SECURITY.md). Generated from that code: `cargo xtask
# check-deploy` fails when the two differ and prints what this file should hold. Each password
# comes from the server's environment (TALLY_NATS_<USER>_PASSWORD); nats-server refuses to start
# without it. The services sign in with TALLY_NATS_USER and TALLY_NATS_PASSWORD.
";

fn check_compose(root: &Path, binaries: &mut Binaries, report: &mut Report) -> anyhow::Result<Compose> {
    let compose_bin = which("docker-compose")
        .context("docker-compose is not installed (Debian: apt-get install docker-compose; .ci/run does it as root)")?;
    let config = || {
        let mut command = Command::new(&compose_bin);
        command
            .current_dir(root)
            .args(["--file", "docker-compose.yml", "config"])
            // The file has no defaults for its secrets (it refuses to start without them):
            // stand-ins, so that it resolves here.
            .envs(COMPOSE_SECRETS.iter().map(|name| (name, "check-deploy-stand-in")));
        command
    };
    run(config().arg("--quiet")).context("docker-compose config -q: docker-compose.yml is invalid")?;
    println!("ok   docker-compose config -q");
    let resolved = run(&mut config())?;
    let document: Value = serde_yaml_ng::from_slice(&resolved.stdout).context("parsing docker-compose config")?;

    check_telemetry_variables(root, report)?;
    let mut services = Compose::new();
    let Some(all) = document.get("services").and_then(Value::as_mapping) else {
        bail!("docker-compose config has no services");
    };
    for (name, service) in all {
        let name = name.as_str().unwrap_or_default().to_owned();
        if service.get("image").and_then(Value::as_str) != Some(COMPOSE_IMAGE) {
            continue;
        }
        let command = strings(service.get("command"));
        let environment: BTreeMap<String, String> = service
            .get("environment")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .map(|(k, v)| (scalar(k), scalar(v)))
            .collect();
        let healthcheck = strings(service.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
        if command.is_empty() {
            report.fail(format!(
                "compose service {name}: no command (the image has none; name the binary)"
            ));
            continue;
        }
        let names = environment.keys().cloned().collect();
        binaries.check(&command, &names, &format!("compose service {name}"), report);
        if let Some(port) = environment
            .iter()
            .find(|(k, _)| is_main_listen(k))
            .map(|(_, v)| port_of(v))
        {
            report.check(healthcheck.contains(&format!("127.0.0.1:{port}/")), || {
                format!("compose service {name}: its healthcheck does not ask its listen port {port}")
            });
        }
        services.insert(
            name,
            ComposeService {
                command,
                environment,
                healthcheck,
            },
        );
    }
    for binary in ["tally-relay", "tally-projector", "tally-command-api", "tally-query-api"] {
        let count = services.values().filter(|s| s.command[0] == binary).count();
        report.check(count >= 2, || {
            format!("docker-compose.yml runs {count} {binary}; the topology has two of each")
        });
    }
    report.check(services.values().any(|s| s.command == ["tally", "migrate"]), || {
        "docker-compose.yml has no `tally migrate` service".into()
    });
    // One periodic sealer: two would append to one history file.
    let sealers = services.values().filter(|s| is_sealer(&s.command)).count();
    report.check(sealers == 1, || {
        format!("docker-compose.yml runs {sealers} `tally audit seal` services; the topology has one")
    });
    let partitions: BTreeSet<&String> = services
        .values()
        .filter_map(|s| s.environment.get("TALLY_PARTITIONS"))
        .collect();
    report.check(partitions.len() == 1, || {
        format!("compose services disagree on TALLY_PARTITIONS: {partitions:?}")
    });
    check_console_targets(&services, report);
    let relay_health = services.values().filter(|s| s.command[0] == "tally-relay");
    for relay in relay_health {
        report.check(!relay.healthcheck.is_empty(), || {
            "a compose relay has no healthcheck".into()
        });
    }
    println!(
        "ok   docker-compose.yml: {} Tally services checked against their binaries",
        services.len()
    );
    Ok(services)
}

/// Whether `name` is a service's main listen variable (`TALLY_COMMAND_LISTEN`), not its
/// operations listener's (`TALLY_COMMAND_OPS_LISTEN`).
fn is_main_listen(name: &str) -> bool {
    name.ends_with("_LISTEN") && !name.ends_with(OPS_LISTEN_SUFFIX)
}

/// How an API's operations listener variable ends (`TALLY_COMMAND_OPS_LISTEN`).
const OPS_LISTEN_SUFFIX: &str = "_OPS_LISTEN";

/// The port a service serves `/metrics` on: its operations listener's when it has one (the
/// APIs), else its only listener's (relay, projectors).
fn metrics_port(environment: &BTreeMap<String, String>) -> Option<String> {
    let ops = environment.iter().find(|(k, _)| k.ends_with(OPS_LISTEN_SUFFIX));
    ops.or_else(|| environment.iter().find(|(k, _)| is_main_listen(k)))
        .map(|(_, v)| port_of(v))
}

/// Every address the console samples (`TALLY_CONSOLE_*_URLS`) is a compose service's
/// `/metrics` port: an API's operations listener, a worker's listener.
fn check_console_targets(services: &BTreeMap<String, ComposeService>, report: &mut Report) {
    for service in services.values() {
        for (name, urls) in service
            .environment
            .iter()
            .filter(|(k, _)| k.starts_with("TALLY_CONSOLE_") && k.ends_with("_URLS"))
        {
            for url in urls.split(',').filter(|u| !u.is_empty()) {
                let address = url.trim_start_matches("http://").trim_end_matches('/');
                let (host, port) = address.rsplit_once(':').unwrap_or((address, "80"));
                let expected = services.get(host).and_then(|s| metrics_port(&s.environment));
                report.check(expected.as_deref() == Some(port), || {
                    format!("{name} samples {url}, but {host} serves /metrics on port {expected:?}")
                });
            }
        }
    }
}

/// Whether `command` runs the sealer (`tally audit seal`, looping with `TALLY_SEALER_EVERY`).
fn is_sealer(command: &[String]) -> bool {
    command.len() >= 3 && command[..3] == ["tally", "audit", "seal"]
}

// ---- deploy/haproxy -------------------------------------------------------------------------

fn check_haproxy(root: &Path, compose: &Compose, report: &mut Report) -> anyhow::Result<()> {
    let dir = root.join("deploy/haproxy");
    let config = std::fs::read_to_string(dir.join("haproxy.cfg"))?;

    // Every backend server is a compose service, addressed on the port it listens on, and
    // every API instance is behind the load balancer.
    let mut routed = BTreeSet::new();
    for line in config.lines().map(str::trim).filter(|l| l.starts_with("server ")) {
        let address = line.split_whitespace().nth(2).unwrap_or_default();
        let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
        routed.insert(host.to_owned());
        match compose.get(host) {
            None => report.fail(format!(
                "haproxy.cfg routes to {host}, which docker-compose.yml does not run"
            )),
            Some(service) => {
                let listen = service.environment.iter().find(|(k, _)| is_main_listen(k));
                report.check(listen.is_some_and(|(_, v)| port_of(v) == port), || {
                    format!("haproxy.cfg routes to {address}, but {host} listens on {listen:?}")
                });
            }
        }
    }
    for (name, service) in compose {
        if matches!(service.command[0].as_str(), "tally-command-api" | "tally-query-api") {
            report.check(routed.contains(name), || {
                format!("haproxy.cfg does not route to {name}")
            });
        }
    }

    // Its own error responses are problem+json, like the APIs'.
    let mut files = 0;
    for line in config.lines().map(str::trim).filter(|l| l.starts_with("errorfile ")) {
        let mut words = line.split_whitespace().skip(1);
        let (status, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        let file = dir.join("errors").join(Path::new(path).file_name().unwrap_or_default());
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                if let Err(error) = check_error_response(status, &text) {
                    report.fail(format!("{}: {error}", file.display()));
                }
                files += 1;
            }
            Err(error) => report.fail(format!("haproxy.cfg: errorfile {}: {error}", file.display())),
        }
    }

    // HAProxy's own check, with the error files where this checkout has them.
    // Debian puts it in /usr/sbin, which a user's PATH may lack.
    let haproxy = which("haproxy").or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()));
    let Some(haproxy) = haproxy else {
        bail!("haproxy is not installed (Debian: apt-get install haproxy; .ci/run does it as root)");
    };
    let checked = target_dir().join("deploy-check").join("haproxy.cfg");
    std::fs::create_dir_all(checked.parent().unwrap())?;
    let errors_dir = dir.join("errors");
    std::fs::write(
        &checked,
        config.replace("/usr/local/etc/haproxy/errors", &errors_dir.to_string_lossy()),
    )?;
    match run(Command::new(haproxy).arg("-c").arg("-f").arg(&checked)) {
        Ok(_) => println!("ok   haproxy -c (deploy/haproxy/haproxy.cfg, {files} problem+json error files)"),
        Err(error) => report.fail(format!("haproxy -c: {error:#}")),
    }
    Ok(())
}

/// A raw HTTP response file: the status it stands for, a problem+json body of that status, and
/// a Content-Length that matches the body.
fn check_error_response(status: &str, text: &str) -> anyhow::Result<()> {
    let (head, body) = text.split_once("\r\n\r\n").context("no blank line after the headers")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    anyhow::ensure!(
        status_line.starts_with(&format!("HTTP/1.1 {status} ")),
        "status line {status_line:?} is not {status}"
    );
    let headers: BTreeMap<String, &str> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .collect();
    anyhow::ensure!(
        headers.get("content-type") == Some(&"application/problem+json"),
        "content-type is not application/problem+json"
    );
    anyhow::ensure!(
        headers.get("content-length") == Some(&body.len().to_string().as_str()),
        "content-length is not the body's {} bytes",
        body.len()
    );
    let problem: serde_json::Value = serde_json::from_str(body).context("the body is not JSON")?;
    anyhow::ensure!(
        problem["status"].as_u64() == status.parse().ok()
            && problem["type"]
                .as_str()
                .is_some_and(|t| t.starts_with(tally_service::problem::PROBLEM_TYPE_BASE)),
        "the body is not a problem of status {status}"
    );
    Ok(())
}

// ---- deploy/k8s -----------------------------------------------------------------------------

/// The manifests of `deploy/k8s`, in file order.
fn manifest_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/k8s"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    Ok(files)
}

/// Every (non-empty) YAML document of `file`.
fn yaml_documents(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).with_context(|| format!("parsing {}", file.display()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn check_k8s(root: &Path, binaries: &mut Binaries, report: &mut Report) -> anyhow::Result<()> {
    let kustomization: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("deploy/kustomization.yaml"))?)?;
    let files = manifest_files(root)?;

    // kustomization.yaml lists exactly the manifests, and its generated ConfigMaps' files exist.
    let listed: BTreeSet<String> = strings(kustomization.get("resources")).into_iter().collect();
    let present: BTreeSet<String> = files
        .iter()
        .map(|p| format!("k8s/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    report.check(listed == present, || {
        format!("deploy/kustomization.yaml resources {listed:?} are not the files of deploy/k8s {present:?}")
    });
    let mut config_maps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for generator in kustomization
        .get("configMapGenerator")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = scalar(&generator["name"]);
        let mut keys = BTreeSet::new();
        for file in strings(generator.get("files")) {
            report.check(root.join("deploy").join(&file).is_file(), || {
                format!("deploy/kustomization.yaml: ConfigMap {name} wants deploy/{file}, which is missing")
            });
            keys.insert(Path::new(&file).file_name().unwrap().to_string_lossy().into_owned());
        }
        config_maps.insert(name, keys);
    }

    let mut documents = Vec::new();
    for file in &files {
        documents.extend(yaml_documents(file)?);
    }
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for document in &documents {
        let keys = || -> BTreeSet<String> {
            ["data", "stringData"]
                .iter()
                .filter_map(|field| document.get(*field).and_then(Value::as_mapping))
                .flatten()
                .map(|(k, _)| scalar(k))
                .collect()
        };
        match document["kind"].as_str() {
            Some("ConfigMap") => {
                config_maps.insert(scalar(&document["metadata"]["name"]), keys());
            }
            Some("Secret") => {
                secrets.insert(scalar(&document["metadata"]["name"]), keys());
            }
            _ => {}
        }
    }

    let mut workloads = BTreeMap::new();
    for document in &documents {
        let kind = document["kind"].as_str().unwrap_or_default();
        let name = scalar(&document["metadata"]["name"]);
        let place = format!("{kind} {name}");
        if matches!(kind, "Deployment" | "StatefulSet" | "Job") {
            let template = &document["spec"]["template"];
            let runs_sealer = template["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|c| is_sealer(&strings(c.get("command"))));
            if runs_sealer {
                // One sealer per history, and never two at once during a rollout.
                report.check(
                    scalar(&document["spec"]["replicas"]) == "1"
                        && scalar(&document["spec"]["strategy"]["type"]) == "Recreate",
                    || format!("{place}: runs the sealer, so needs replicas: 1 and strategy Recreate"),
                );
            }
            workloads.insert((kind.to_owned(), name.clone()), template["metadata"]["labels"].clone());
            let refs = References {
                config_maps: &config_maps,
                secrets: &secrets,
            };
            check_pod(&place, template, &refs, binaries, report);
        }
    }
    for document in documents
        .iter()
        .filter(|d| d["kind"].as_str() == Some("HorizontalPodAutoscaler"))
    {
        let target = &document["spec"]["scaleTargetRef"];
        let key = (scalar(&target["kind"]), scalar(&target["name"]));
        report.check(workloads.contains_key(&key), || {
            format!(
                "HorizontalPodAutoscaler {} scales {key:?}, which no manifest defines",
                scalar(&document["metadata"]["name"])
            )
        });
    }
    for document in documents.iter().filter(|d| d["kind"].as_str() == Some("Service")) {
        let selector = document["spec"]["selector"].as_mapping().cloned().unwrap_or_default();
        let selects = workloads
            .values()
            .any(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        report.check(selects, || {
            format!(
                "Service {} selects no pod of any manifest",
                scalar(&document["metadata"]["name"])
            )
        });
    }
    println!(
        "ok   deploy/k8s: {} manifests, {} workloads cross-checked",
        documents.len(),
        workloads.len()
    );
    Ok(())
}

/// The ConfigMaps and Secrets (name → keys) a pod may refer to.
struct References<'a> {
    config_maps: &'a BTreeMap<String, BTreeSet<String>>,
    secrets: &'a BTreeMap<String, BTreeSet<String>>,
}

impl References<'_> {
    fn check(&self, place: &str, kind: &str, name: &str, key: Option<&str>, report: &mut Report) {
        let known = if kind == "Secret" {
            self.secrets
        } else {
            self.config_maps
        };
        match known.get(name) {
            None => report.fail(format!("{place}: refers to {kind} {name}, which no manifest defines")),
            Some(keys) => {
                if let Some(key) = key {
                    report.check(keys.contains(key), || {
                        format!("{place}: {kind} {name} has no key {key}")
                    });
                }
            }
        }
    }
}

/// Checks a pod `template`: its volumes and containers against the manifests and binaries, and
/// its Prometheus scrape port against the port its container serves `/metrics` on.
fn check_pod(place: &str, template: &Value, refs: &References<'_>, binaries: &mut Binaries, report: &mut Report) {
    let pod = &template["spec"];
    let scrape_port = template["metadata"]["annotations"]["prometheus.io/port"].as_str();
    for volume in pod.get("volumes").and_then(Value::as_sequence).into_iter().flatten() {
        if let Some(config_map) = volume.get("configMap") {
            let name = scalar(&config_map["name"]);
            for item in config_map
                .get("items")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                refs.check(place, "ConfigMap", &name, item["key"].as_str(), report);
            }
            refs.check(place, "ConfigMap", &name, None, report);
        }
    }
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|field| pod.get(*field).and_then(Value::as_sequence))
        .flatten();
    for container in containers {
        let place = format!("{place} container {}", scalar(&container["name"]));
        let mut names = BTreeSet::new();
        let mut listen = None;
        let mut ops_listen = None;
        for from in container
            .get("envFrom")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if let Some(name) = from.get("configMapRef").map(|r| scalar(&r["name"])) {
                refs.check(&place, "ConfigMap", &name, None, report);
                names.extend(refs.config_maps.get(&name).cloned().unwrap_or_default());
            }
            if let Some(name) = from.get("secretRef").map(|r| scalar(&r["name"])) {
                refs.check(&place, "Secret", &name, None, report);
                names.extend(refs.secrets.get(&name).cloned().unwrap_or_default());
            }
        }
        for variable in container.get("env").and_then(Value::as_sequence).into_iter().flatten() {
            let name = scalar(&variable["name"]);
            let from = &variable["valueFrom"];
            for (field, kind) in [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")] {
                if let Some(reference) = from.get(field) {
                    refs.check(
                        &place,
                        kind,
                        &scalar(&reference["name"]),
                        reference["key"].as_str(),
                        report,
                    );
                }
            }
            if name.ends_with(OPS_LISTEN_SUFFIX) {
                ops_listen = Some(port_of(&scalar(&variable["value"])));
            } else if is_main_listen(&name) {
                listen = Some(port_of(&scalar(&variable["value"])));
            }
            names.insert(name);
        }
        if container["image"].as_str() != Some(K8S_IMAGE) {
            continue;
        }
        let command = strings(container.get("command"));
        if command.is_empty() {
            report.fail(format!("{place}: no command (the image has none; name the binary)"));
            continue;
        }
        binaries.check(&command, &names, &place, report);
        // Probes and the named ports reach the ports the binary listens on; Prometheus scrapes
        // the one that serves /metrics.
        let port_named = |wanted: &str| {
            container
                .get("ports")
                .and_then(Value::as_sequence)
                .and_then(|ports| ports.iter().find(|p| p["name"].as_str() == Some(wanted)))
                .map(|p| scalar(&p["containerPort"]))
        };
        let port = port_named("http");
        report.check(port == listen, || {
            format!("{place}: containerPort http {port:?} is not its listen port {listen:?}")
        });
        let ops = port_named("ops");
        report.check(ops == ops_listen, || {
            format!("{place}: containerPort ops {ops:?} is not its operations listen port {ops_listen:?}")
        });
        if let Some(scrape_port) = scrape_port {
            let metrics = ops_listen.clone().or_else(|| listen.clone());
            report.check(metrics.as_deref() == Some(scrape_port), || {
                format!("{place}: prometheus.io/port {scrape_port} is not where it serves /metrics ({metrics:?})")
            });
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if listen.is_some() {
                let path = scalar(&container[probe]["httpGet"]["path"]);
                let expected = if probe == "livenessProbe" { "/health" } else { "/ready" };
                report.check(path == expected, || {
                    format!("{place}: {probe} asks {path:?}, not {expected}")
                });
            }
        }
    }
}

/// Runs `kubernetes-validate --strict` over every manifest, for each supported version.
fn validate_manifests(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    let venv = target_dir().join("deploy-check").join("venv");
    let validator = venv.join("bin").join("kubernetes-validate");
    if !validator.exists() {
        println!("installing {KUBERNETES_VALIDATE} into {}", venv.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
        run(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))
            .context("pip install kubernetes-validate")?;
    }
    let mut files = manifest_files(root)?;
    // The CloudNativePG overlay's Secret patch (its Cluster has no schema here: see cnpg.rs).
    files.push(root.join("deploy/cnpg/secrets.yaml"));
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .context("running kubernetes-validate")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // It only warns about a kind it has no schema for (a typo in apiVersion or kind): fail.
        let problems: Vec<&str> = text.lines().filter(|l| !l.starts_with("INFO")).collect();
        if output.status.success() && problems.is_empty() {
            let resources = text.lines().filter(|l| l.starts_with("INFO")).count();
            println!("ok   kubernetes-validate --strict -k {version}: {resources} resources");
        } else {
            report.fail(format!(
                "kubernetes-validate -k {version} ({}):\n{}",
                output.status,
                problems.join("\n")
            ));
        }
    }
    Ok(())
}

// ---- deploy/nats, deploy/postgres -----------------------------------------------------------

/// The stream the deployment creates up front (three replicas) is the one the relay and the
/// projectors would create: same name, subjects, storage and windows.
fn check_stream_definition(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    use tally_event_store::partition::{DUPLICATE_WINDOW, STREAM_MAX_AGE, STREAM_NAME_DEFAULT, SUBJECT_PREFIX_DEFAULT};
    let path = root.join("deploy/nats/tally-events.json");
    let stream: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let expected = serde_json::json!({
        "name": STREAM_NAME_DEFAULT,
        "subjects": [format!("{SUBJECT_PREFIX_DEFAULT}.>")],
        "storage": "file",
        "duplicate_window": DUPLICATE_WINDOW.as_nanos() as u64,
        "max_age": STREAM_MAX_AGE.as_nanos() as u64,
        "num_replicas": 3,
    });
    for (field, value) in expected.as_object().unwrap() {
        report.check(stream.get(field) == Some(value), || {
            format!(
                "deploy/nats/tally-events.json: {field} is {:?}, the code says {value}",
                stream.get(field)
            )
        });
    }
    println!("ok   deploy/nats/tally-events.json matches event-store/src/partition.rs");
    Ok(())
}

fn check_nats_config(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    let Some(nats) = which("nats-server") else {
        bail!("nats-server is not installed (Debian: apt-get install nats-server)");
    };
    let config = root.join("deploy/nats/nats.conf");
    let passwords = nats_users::ALL.map(|user| (nats_users::password_variable(user), "check-deploy-stand-in"));
    match run(Command::new(nats)
        .arg("-c")
        .arg(&config)
        .arg("-t")
        .env("SERVER_NAME", "check")
        .envs(passwords))
    {
        Ok(_) => println!("ok   nats-server -t (deploy/nats/nats.conf)"),
        Err(error) => report.fail(format!("nats-server -t: {error:#}")),
    }
    let expected = format!("{NATS_AUTH_HEADER}{}", nats_users::deployment_authorization());
    let path = root.join("deploy/nats/auth.conf");
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    if actual == expected {
        println!("ok   deploy/nats/auth.conf is what nats_users renders");
    } else {
        report.fail(format!(
            "deploy/nats/auth.conf differs from the permissions in event-store/src/nats_users.rs; it should hold:\n{expected}"
        ));
    }
    Ok(())
}

fn check_scripts(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(root.join("deploy/postgres"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sh")
            && let Err(error) = run(Command::new("sh").arg("-n").arg(&path))
        {
            report.fail(format!("{}: {error:#}", path.display()));
        }
    }
    println!("ok   sh -n deploy/postgres/*.sh");
    Ok(())
}

// ---- deploy/prometheus, deploy/grafana ------------------------------------------------------

/// What stands for Grafana's interval variables when promtool parses a dashboard's query.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")];
/// The datasource every dashboard panel and query uses: the dashboard's `datasource` variable,
/// so it imports into any Grafana whatever its Prometheus is called.
const GRAFANA_DATASOURCE: &str = "${datasource}";

/// Checks the alert rules and the dashboards (module documentation, last item).
fn check_monitoring(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    let promtool = which("promtool")
        .context("promtool is not installed (Debian: apt-get install prometheus; .ci/run does it as root)")?;
    let exported = exported_series(root)?;
    let dir = root.join("deploy/prometheus");

    // The test file names its rule files relative to itself.
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        match run(Command::new(&promtool).current_dir(&dir).args(args)) {
            Ok(_) => println!("ok   promtool {} deploy/prometheus/{}", args[..2].join(" "), args[2]),
            Err(error) => report.fail(format!("promtool {}: {error:#}", args.join(" "))),
        }
    }

    let alerts: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("alerts.yml"))?)
        .context("parsing deploy/prometheus/alerts.yml")?;
    let tests: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("alerts.test.yml"))?)
        .context("parsing deploy/prometheus/alerts.test.yml")?;
    let cases = alert_test_cases(&tests);
    let rules: Vec<&Value> = alerts["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|group| group["rules"].as_sequence())
        .flatten()
        .collect();
    let failures = report.failures.len();
    let mut alert_count = 0;
    for rule in &rules {
        let name = scalar(&rule["alert"]);
        let place = format!("deploy/prometheus/alerts.yml: {}", scalar(&rule["record"]) + &name);
        check_series(&place, &scalar(&rule["expr"]), &exported, report);
        if name.is_empty() {
            continue;
        }
        alert_count += 1;
        report.check(!scalar(&rule["labels"]["severity"]).is_empty(), || {
            format!("{place}: no severity label")
        });
        for annotation in ["summary", "description"] {
            report.check(!scalar(&rule["annotations"][annotation]).is_empty(), || {
                format!("{place}: no {annotation} annotation")
            });
        }
        report.check(!scalar(&rule["for"]).is_empty(), || format!("{place}: no `for`"));
        let (fires, quiet) = cases.get(&name).copied().unwrap_or_default();
        report.check(fires, || format!("{place}: no case of alerts.test.yml where it fires"));
        report.check(quiet, || {
            format!("{place}: no case of alerts.test.yml where it does not fire (exp_alerts: [])")
        });
    }
    if report.failures.len() == failures {
        println!(
            "ok   deploy/prometheus/alerts.yml: {alert_count} alerts, each tested firing and quiet, on exported series"
        );
    }

    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/grafana"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    let failures = report.failures.len();
    let mut queries = Vec::new();
    for file in &files {
        let name = format!("deploy/grafana/{}", file.file_name().unwrap().to_string_lossy());
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file)?).with_context(|| format!("parsing {name}"))?;
        let variables = dashboard["templating"]["list"].as_array().into_iter().flatten();
        report.check(
            variables
                .into_iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            || format!("{name}: no `datasource` variable"),
        );
        for (title, panel) in dashboard_panels(&dashboard) {
            let place = format!("{name}: panel {title:?}");
            let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            for datasource in std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"])) {
                report.check(datasource["uid"] == GRAFANA_DATASOURCE, || {
                    format!("{place}: a datasource other than {GRAFANA_DATASOURCE}: {datasource}")
                });
            }
            for expr in targets.iter().filter_map(|t| t["expr"].as_str()) {
                check_series(&place, expr, &exported, report);
                let parsable = GRAFANA_VARIABLES
                    .iter()
                    .fold(expr.to_owned(), |expr, (variable, value)| expr.replace(variable, value));
                queries.push((place.clone(), parsable));
            }
        }
    }

    // promtool parses queries only as rules: each becomes a recording rule of one file.
    let record = |i: usize| format!("dashboard_query_{i}");
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({ "record": record(i), "expr": expr }))
        .collect();
    let document = serde_json::json!({ "groups": [{ "name": "dashboards", "rules": rules }] });
    let path = target_dir().join("deploy-check").join("dashboard-queries.yml");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, serde_yaml_ng::to_string(&document)?)?;
    if let Err(error) = run(Command::new(&promtool).arg("check").arg("rules").arg(&path)) {
        // promtool names the rule it could not parse: say which panel that query is from.
        let text = format!("{error:#}");
        let panels: Vec<String> = (0..queries.len())
            .filter(|&i| text.contains(&format!("\"{}\"", record(i))))
            .map(|i| format!("{} is the query of {}", record(i), queries[i].0))
            .collect();
        report.fail(format!("dashboard queries: {text}\n{}", panels.join("\n")));
    }
    if report.failures.len() == failures {
        println!(
            "ok   deploy/grafana: {} dashboards, {} queries parse and name exported series",
            files.len(),
            queries.len()
        );
    }
    Ok(())
}

/// Every panel of a dashboard with its title, those inside collapsed rows included.
fn dashboard_panels(dashboard: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            panels.extend(dashboard_panels(panel));
        } else {
            panels.push((panel["title"].as_str().unwrap_or_default().to_owned(), panel));
        }
    }
    panels
}

/// Alert name → (a case expects it to fire, a case expects it quiet), from promtool's tests.
fn alert_test_cases(tests: &Value) -> BTreeMap<String, (bool, bool)> {
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let all = tests["tests"].as_sequence().into_iter().flatten();
    for case in all.filter_map(|test| test["alert_rule_test"].as_sequence()).flatten() {
        let seen = cases.entry(scalar(&case["alertname"])).or_default();
        // promtool reads a missing exp_alerts as none expected.
        if case["exp_alerts"]
            .as_sequence()
            .is_some_and(|alerts| !alerts.is_empty())
        {
            seen.0 = true;
        } else {
            seen.1 = true;
        }
    }
    cases
}

/// Fails `place` for every `tally_*` series `expr` names that the code does not export.
fn check_series(place: &str, expr: &str, exported: &BTreeSet<String>, report: &mut Report) {
    for name in series_named(expr).into_iter().filter(|n| !exported.contains(n)) {
        report.fail(format!(
            "{place}: {name} is no series the code exports (the metrics::counter!/gauge!/histogram! names in */src)"
        ));
    }
}

/// The `tally_*` names in a PromQL expression, outside its string literals (label values).
fn series_named(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    let mut word = String::new();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("tally_") {
            names.insert(word.clone());
        }
        word.clear();
        if matches!(c, '"' | '\'' | '`') {
            // Skips the literal; a backslash escapes the next character (not in backticks).
            while let Some(inner) = chars.next() {
                if inner == c {
                    break;
                }
                if inner == '\\' && c != '`' {
                    chars.next();
                }
            }
        }
    }
    if word.starts_with("tally_") {
        names.insert(word);
    }
    names
}

/// The series the workspace's code exports: the names of its `metrics::` macro calls in every
/// crate's `src/`. A histogram is exported as its `_bucket`, `_sum` and `_count` series. xtask
/// exports none (and its tests quote such calls).
fn exported_series(root: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut series = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "xtask" {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && path.components().any(|c| c.as_os_str() == "src") {
                series.extend(exported_by(&std::fs::read_to_string(&path)?));
            }
        }
    }
    anyhow::ensure!(
        !series.is_empty(),
        "found no metrics::counter!/gauge!/histogram! call under {}",
        root.display()
    );
    Ok(series)
}

/// The series the `counter!`, `gauge!` and `histogram!` calls of `source` export, where their
/// name is a string literal (the code's style; a name in a constant would show up as a
/// dashboard's unknown series, not go unnoticed).
fn exported_by(source: &str) -> BTreeSet<String> {
    let mut series = BTreeSet::new();
    for (call, suffixes) in [
        ("counter!(", &[""][..]),
        ("gauge!(", &[""][..]),
        ("histogram!(", &["_bucket", "_sum", "_count"][..]),
    ] {
        for (at, _) in source.match_indices(call) {
            let rest = source[at + call.len()..].trim_start();
            let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                continue;
            };
            series.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
        }
    }
    series
}

// ---- helpers --------------------------------------------------------------------------------

/// Runs a command; an error carries its output when it fails.
fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A scalar (string, number, bool) as text; anything else as an empty string.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// A sequence of scalars (a command, a healthcheck test, a list of files).
fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .map(|items| items.iter().map(scalar).collect())
        .unwrap_or_default()
}

/// The port of a listen address (`0.0.0.0:8080` → `8080`).
fn port_of(listen: &str) -> String {
    listen.rsplit(':').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_read_from_clap_help_with_and_without_values() {
        let help = "  --listen <LISTEN>  [env: TALLY_COMMAND_LISTEN=] [default: 127.0.0.1:8080]\n\
                    --database-url <URL>  [env: TALLY_DATABASE_URL]\n  --other  no env here";
        let names = env_names_in_help(help);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["TALLY_COMMAND_LISTEN", "TALLY_DATABASE_URL"]
        );
    }

    #[test]
    fn series_are_the_tally_names_of_an_expression_outside_its_strings() {
        let expr = r#"sum by (cache) (rate(tally_query_cache_requests_total{result="hit", x='tally_no'}[5m]))
            / on (cache) tally_a:b unless `tally_not` or tally_last"#;
        assert_eq!(
            series_named(expr).into_iter().collect::<Vec<_>>(),
            ["tally_a:b", "tally_last", "tally_query_cache_requests_total"]
        );
        assert!(series_named(r#"up{job="tally_x\"tally_y"} == 0"#).is_empty());
    }

    #[test]
    fn exported_series_are_the_literal_names_of_metric_macros_with_histogram_suffixes() {
        let source = r#"
            metrics::counter!("tally_a_total", "k" => v).increment(1);
            metrics::counter!(
                "tally_b_total",
                "route" => r
            );
            metrics::histogram!("tally_c_seconds").record(1.0);
            gauge!(NAME).set(1.0);
        "#;
        assert_eq!(
            exported_by(source).into_iter().collect::<Vec<_>>(),
            [
                "tally_a_total",
                "tally_b_total",
                "tally_c_seconds_bucket",
                "tally_c_seconds_count",
                "tally_c_seconds_sum"
            ]
        );
    }

    #[test]
    fn an_alert_needs_a_case_where_it_fires_and_one_where_it_does_not() {
        let tests: Value = serde_yaml_ng::from_str(
            "tests: [{alert_rule_test: [\
               {alertname: A, exp_alerts: [{exp_labels: {severity: warning}}]},\
               {alertname: A, exp_alerts: []},\
               {alertname: B}]}]",
        )
        .unwrap();
        let cases = alert_test_cases(&tests);
        assert_eq!(cases["A"], (true, true));
        assert_eq!(cases["B"], (false, true));
    }

    #[test]
    fn an_error_response_must_be_a_problem_of_its_status_with_a_true_length() {
        let body = r#"{"type":"https://tally.dev/problems/unavailable","title":"t","status":503}"#;
        let good = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        assert!(check_error_response("503", &good).is_ok());
        assert!(check_error_response("502", &good).is_err(), "wrong status");
        assert!(check_error_response("503", &good.replace("problem+json", "html")).is_err());
        assert!(check_error_response("503", &good.replace("\"status\":503", "\"status\":500")).is_err());
        assert!(
            check_error_response("503", &format!("{good} ")).is_err(),
            "length off by one"
        );
    }
}
