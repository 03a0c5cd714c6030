//! The NetworkPolicy cases (`netpol-*.yaml` in `../shared/cases`, or in the folder named by
//! `KXDP_CASES`) against the compiled policy alone: every probe the policy decides by
//! itself must get the expected verdict from `nat::policy::PolicyTable`.
//!
//! A probe is judged when its destination `to.ip` is a pod's own address (no Service
//! translation in between), its source is a pod or an outside address, and it expects
//! `drop` or `deliver`. The connection is denied when the source pod's egress (on the
//! source pod's node) or the destination pod's ingress (on the destination's node) denies
//! it; each node's policy is compiled as its own control would, so a probe between two
//! nodes is judged on both ends. Left out, because policy alone cannot decide them:
//! probes to a ClusterIP, NodePort or other Service address (egress is judged on the
//! translated destination, which needs the Service tables; the dataplane's case runner
//! covers them), probes from a node (traffic from a pod's own node is always allowed, an
//! exception the dataplane applies), `reject` expectations, and connections that deliver
//! elsewhere than `to.ip`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use control::{compute_with_warnings, Objects};
use nat::policy::{PolicyTable, Verdict};
use nat::spec::Protocol;
use serde_yaml::Value;

/// The folder, and whether it was asked for (then it must exist).
fn cases_dir() -> (PathBuf, bool) {
    match std::env::var_os("KXDP_CASES") {
        Some(dir) => (PathBuf::from(dir), true),
        None => (
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/cases"),
            false,
        ),
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn seq<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

/// A pod that can take part in a probe: its node and addresses.
struct ProbePod {
    name: String,
    node: String,
    ips: Vec<IpAddr>,
}

/// Pods with an address, as control sees them as peers (running, not host network).
fn pods(objects: &Objects) -> Vec<ProbePod> {
    objects
        .pods()
        .filter_map(|p| {
            let spec = p.spec.as_ref()?;
            let status = p.status.as_ref()?;
            if spec.host_network == Some(true)
                || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
            {
                return None;
            }
            let mut ips: Vec<IpAddr> = status
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|i| i.ip.parse().ok())
                .collect();
            if ips.is_empty() {
                ips.extend(
                    status
                        .pod_ip
                        .as_deref()
                        .and_then(|s| s.parse::<IpAddr>().ok()),
                );
            }
            Some(ProbePod {
                name: format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or("")
                ),
                node: spec.node_name.clone()?,
                ips,
            })
        })
        .collect()
}

fn protocol(s: &str) -> Option<Protocol> {
    match s {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `Some(true)` for `drop`, `Some(false)` for a delivery to `to`, `None` when not judged.
fn expects_drop(expect: &Value, to: SocketAddr) -> Option<bool> {
    match expect {
        Value::String(s) if s == "drop" => Some(true),
        Value::Mapping(_) => {
            let deliver: Vec<SocketAddr> = seq(expect, "deliver")
                .filter_map(|d| d.as_str()?.parse().ok())
                .collect();
            (deliver == [to]).then_some(false)
        }
        _ => None,
    }
}

/// Applies a step's `apply` and `delete`.
fn apply_step(objects: &mut Objects, step: &Value, case: &str) {
    for obj in seq(step, "apply") {
        objects
            .apply_document(obj.clone(), case)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    for d in seq(step, "delete") {
        let kind = str_at(d, "kind").unwrap_or("");
        let ns = str_at(d, "namespace").unwrap_or("");
        let name = str_at(d, "name").unwrap_or("");
        assert!(
            objects.delete(kind, ns, name),
            "{case}: delete {kind} {ns}/{name}: not there"
        );
    }
}

#[test]
fn netpol_cases_agree_with_the_compiled_policy() {
    let (dir, asked) = cases_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        assert!(!asked, "KXDP_CASES={} cannot be read", dir.display());
        eprintln!("no cases at {}: nothing to check", dir.display());
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("netpol-"))
        })
        .collect();
    files.sort();
    let (mut judged, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for file in &files {
        let case = file
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(file).expect("readable case");
        let doc: Value = serde_yaml::from_str(&text).expect("case is YAML");
        let mut objects = Objects::new();
        for obj in seq(&doc, "objects") {
            objects
                .apply_document(obj.clone(), &case)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        }
        for (s, step) in seq(&doc, "steps").enumerate() {
            apply_step(&mut objects, step, &case);
            let pods = pods(&objects);
            let by_ip: BTreeMap<IpAddr, &ProbePod> = pods
                .iter()
                .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
                .collect();
            // Each node's policy, as its own control compiles it.
            let mut tables: BTreeMap<&str, PolicyTable> = BTreeMap::new();
            for p in &pods {
                if !tables.contains_key(p.node.as_str()) {
                    if let Ok(c) = compute_with_warnings(&objects, &p.node, &Default::default()) {
                        tables.insert(&p.node, PolicyTable::build(&c.tables.policy));
                    }
                }
            }
            for (n, probe) in seq(step, "probes").enumerate() {
                let to = probe.get("to").expect("probe has to");
                let dst: Option<IpAddr> = str_at(to, "ip").and_then(|s| s.parse().ok());
                let port = to.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
                let proto = protocol(str_at(to, "protocol").unwrap_or("TCP"));
                let from = probe.get("from").expect("probe has from");
                let (Some(dst), Some(proto)) = (dst, proto) else {
                    skipped += 1;
                    continue;
                };
                let Some(dst_pod) = by_ip.get(&dst) else {
                    skipped += 1;
                    continue;
                };
                let Some(want_drop) = probe
                    .get("expect")
                    .and_then(|e| expects_drop(e, SocketAddr::new(dst, port)))
                else {
                    skipped += 1;
                    continue;
                };
                // The source address and, for a pod, its egress verdict.
                let (src, src_pod) = if let Some(name) = str_at(from, "pod") {
                    let pod = pods.iter().find(|p| p.name == name);
                    let ip = pod.and_then(|p| p.ips.iter().find(|i| i.is_ipv6() == dst.is_ipv6()));
                    match (pod, ip) {
                        (Some(pod), Some(ip)) => (*ip, Some(pod)),
                        _ => panic!("{case}: probe from {name}: no such pod with an address of the destination's family"),
                    }
                } else if let Some(ip) = str_at(from, "ip").and_then(|s| s.parse().ok()) {
                    (ip, None)
                } else {
                    skipped += 1;
                    continue;
                };
                let egress = src_pod
                    .and_then(|p| tables.get(p.node.as_str()))
                    .map(|t| t.egress(src, dst, proto, port));
                let ingress = tables
                    .get(dst_pod.node.as_str())
                    .map(|t| t.ingress(dst, src, proto, port));
                if egress.is_none() && ingress.is_none() {
                    skipped += 1;
                    continue;
                }
                judged += 1;
                let denied = [egress, ingress].contains(&Some(Verdict::Denied));
                if denied != want_drop {
                    failures.push(format!(
                        "{case} step {s} probe {n} {src} -> {dst}:{port} {proto:?}: expected {}, egress {egress:?}, ingress {ingress:?}",
                        if want_drop { "drop" } else { "deliver" }
                    ));
                }
            }
        }
    }
    eprintln!(
        "{} netpol cases: {judged} probes judged, {skipped} left to the dataplane's runner",
        files.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {judged} probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if !files.is_empty() {
        assert!(judged > 0, "no probe of the netpol cases could be judged");
    }
}
