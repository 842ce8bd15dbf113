//! `deploy/cnpg/`: the Kubernetes deployment on a CloudNativePG `Cluster`, the recommended
//! database (docs/adr/0006). The validator has no schema for the operator's kinds, so the
//! overlay is checked by what it must mean: replication that is synchronous and required, an
//! owner Secret the operator can read, every database URL of the base on the operator's
//! Services, and deletions that name what the base defines (a typo would leave the bundled
//! Postgres running beside the cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_yaml_ng::Value;

use super::{Report, manifest_files, scalar, strings, yaml_documents};

const API_VERSION: &str = "postgresql.cnpg.io/v1";
/// The base's Secret of database URLs, and the one the bundled Postgres alone needs.
const URL_SECRET: &str = "tally-secrets";

pub(super) fn check_overlay(root: &Path, report: &mut Report) -> anyhow::Result<()> {
    let dir = root.join("deploy/cnpg");
    let kustomization = yaml_documents(&dir.join("kustomization.yaml"))?
        .pop()
        .unwrap_or_default();
    let resources = strings(kustomization.get("resources"));
    report.check(resources.iter().any(|r| r == "../"), || {
        "deploy/cnpg/kustomization.yaml: resources must include the base (../)".to_owned()
    });
    let mut overlay = Vec::new();
    for resource in resources.iter().filter(|r| *r != "../") {
        let file = dir.join(resource);
        if file.is_file() {
            overlay.extend(yaml_documents(&file)?);
        } else {
            report.fail(format!(
                "deploy/cnpg/kustomization.yaml: resource {resource} is missing"
            ));
        }
    }

    // What the base defines, by (kind, name), and its URL Secret.
    let mut base = BTreeMap::new();
    for file in manifest_files(root)? {
        for document in yaml_documents(&file)? {
            let key = (scalar(&document["kind"]), scalar(&document["metadata"]["name"]));
            base.insert(key, document);
        }
    }

    let mut deleted = BTreeSet::new();
    let mut url_patch = None;
    for patch in kustomization
        .get("patches")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        if let Some(text) = patch.get("patch").and_then(Value::as_str) {
            let document: Value = serde_yaml_ng::from_str(text)?;
            let key = (scalar(&document["kind"]), scalar(&document["metadata"]["name"]));
            let target = (scalar(&patch["target"]["kind"]), scalar(&patch["target"]["name"]));
            report.check(target == key, || {
                format!("deploy/cnpg: a patch targets {target:?} but patches {key:?}")
            });
            report.check(base.contains_key(&key), || {
                format!("deploy/cnpg: a patch names {key:?}, which the base does not define")
            });
            if scalar(&document["$patch"]) == "delete" {
                deleted.insert(key);
            }
        } else if let Some(path) = patch.get("path").and_then(Value::as_str) {
            for document in yaml_documents(&dir.join(path))? {
                if document["kind"].as_str() == Some("Secret") && scalar(&document["metadata"]["name"]) == URL_SECRET {
                    url_patch = Some(document);
                } else {
                    report.fail(format!(
                        "deploy/cnpg/{path}: only the {URL_SECRET} Secret is patched from a file"
                    ));
                }
            }
        }
    }
    // The bundled Postgres goes, whole.
    for (key, document) in &base {
        if key.0 == "StatefulSet"
            && scalar(&document["spec"]["template"]["spec"]["containers"][0]["name"]) == "postgres"
        {
            report.check(deleted.contains(key), || {
                format!("deploy/cnpg: the base's Postgres {key:?} is not deleted")
            });
        }
    }
    let bundled_hosts: BTreeSet<String> = base
        .keys()
        .filter(|(kind, _)| kind == "Service")
        .filter(|key| deleted.contains(key))
        .map(|(_, name)| name.clone())
        .collect();

    let clusters: Vec<&Value> = overlay
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Cluster"))
        .collect();
    let [cluster] = clusters.as_slice() else {
        report.fail(format!("deploy/cnpg: wants one Cluster, found {}", clusters.len()));
        return Ok(());
    };
    let name = scalar(&cluster["metadata"]["name"]);
    let place = format!("deploy/cnpg Cluster {name}");
    let spec = &cluster["spec"];
    report.check(scalar(&cluster["apiVersion"]) == API_VERSION, || {
        format!("{place}: apiVersion is not {API_VERSION}")
    });
    report.check(spec["instances"].as_u64().is_some_and(|n| n >= 3), || {
        format!("{place}: needs at least three instances (a primary and two standbys)")
    });
    let synchronous = &spec["postgresql"]["synchronous"];
    report.check(synchronous["number"].as_u64().is_some_and(|n| n >= 1), || {
        format!("{place}: postgresql.synchronous.number must be at least 1")
    });
    // `preferred` would let the primary acknowledge alone when no standby answers.
    report.check(
        matches!(synchronous["dataDurability"].as_str(), None | Some("required")),
        || format!("{place}: postgresql.synchronous.dataDurability must be required"),
    );
    let initdb = &spec["bootstrap"]["initdb"];
    let owner = scalar(&initdb["owner"]);
    let database = scalar(&initdb["database"]);
    let owner_secret = scalar(&initdb["secret"]["name"]);
    let basic_auth = overlay
        .iter()
        .find(|d| d["kind"].as_str() == Some("Secret") && scalar(&d["metadata"]["name"]) == owner_secret);
    match basic_auth {
        None => report.fail(format!(
            "{place}: its owner Secret {owner_secret:?} is not in the overlay"
        )),
        Some(secret) => {
            report.check(scalar(&secret["type"]) == "kubernetes.io/basic-auth", || {
                format!("Secret {owner_secret}: the operator wants type kubernetes.io/basic-auth")
            });
            report.check(scalar(&secret["stringData"]["username"]) == owner, || {
                format!("Secret {owner_secret}: its username is not the owner {owner:?}")
            });
        }
    }

    // Every URL of the base Secret that named the bundled Postgres now names the operator's
    // Services (read-write for writers, read-only for the query API's replicas), as the
    // database the cluster creates.
    let Some(url_patch) = url_patch else {
        report.fail(format!(
            "deploy/cnpg: the {URL_SECRET} Secret's database URLs are not patched"
        ));
        return Ok(());
    };
    let base_urls = &base
        .get(&("Secret".to_owned(), URL_SECRET.to_owned()))
        .map(|s| s["stringData"].clone())
        .unwrap_or_default();
    for (key, value) in base_urls.as_mapping().into_iter().flatten() {
        let (key, value) = (scalar(key), scalar(value));
        let Some(host) = url_host(&value) else { continue };
        let patched = scalar(&url_patch["stringData"][key.as_str()]);
        if !bundled_hosts.contains(&host) {
            continue;
        }
        let want = if key.contains("REPLICA") {
            format!("{name}-ro")
        } else {
            format!("{name}-rw")
        };
        report.check(url_host(&patched).as_deref() == Some(want.as_str()), || {
            format!("deploy/cnpg/{URL_SECRET}: {key} must point at the Service {want}, not {patched:?}")
        });
        report.check(patched.ends_with(&format!("/{database}")), || {
            format!("deploy/cnpg/{URL_SECRET}: {key} must name the database {database}")
        });
        if key == "TALLY_DATABASE_URL" {
            report.check(patched.starts_with(&format!("postgres://{owner}:")), || {
                format!("deploy/cnpg/{URL_SECRET}: TALLY_DATABASE_URL must sign in as the owner {owner}")
            });
        }
    }
    println!(
        "ok   deploy/cnpg: Cluster {name}, {} deletions, database URLs on {name}-rw/-ro",
        deleted.len()
    );
    Ok(())
}

/// The host of a `postgres://` URL, `None` for anything else.
fn url_host(value: &str) -> Option<String> {
    let url = reqwest::Url::parse(value).ok()?;
    (url.scheme() == "postgres" || url.scheme() == "postgresql")
        .then(|| url.host_str().map(str::to_owned))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn only_postgres_urls_have_a_host() {
        assert_eq!(
            url_host("postgres://u:p@tally-pg-rw:5432/tally").as_deref(),
            Some("tally-pg-rw")
        );
        assert_eq!(url_host("https://example.com/"), None);
        assert_eq!(url_host("CHANGE-ME"), None);
    }
}
