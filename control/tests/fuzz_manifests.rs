//! Fuzz target for the manifest reader and the table computation (issue 10), on the
//! stable toolchain.
//!
//! Each case is a manifest file of a few YAML documents: objects of every kind control
//! reads (from the shared cases when they are there, else from templates here), with
//! fields replaced by values of the wrong type, out of range or malformed, keys dropped,
//! and then the text itself damaged (characters deleted or inserted, indentation changed,
//! lines duplicated, document markers added, cut short). It goes through `load_text` and
//! then `compute_with_warnings` for node-a. Asserted:
//!
//! - no panic, in either;
//! - every error names the file and a document of it that exists (`f.yaml document N`),
//!   and the line it names lies inside the file;
//! - tables that compute travel through the control stream and come back equal.
//!
//! `KXDP_FUZZ_DOCS=N` for a long run (with `--release`), `KXDP_FUZZ_SEED` for another
//! seed, `KXDP_FUZZ_CASE` to replay one case; a failure prints the seed, the case and the
//! file's text.

#[path = "../../dataplane/tests/fuzzgen/mod.rs"]
mod fuzzgen;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use control::{compute_with_warnings, load_text, ManifestError, Objects};
use fuzzgen::{Rng, Src};
use nat::spec::ClusterSpec;
use nat::wire;
use serde_yaml::{Mapping, Value};

/// How far files got, printed at the end: errors reported, objects stored, tables of
/// node-a computed, Service ports in them.
static ERRORS: AtomicU64 = AtomicU64::new(0);
static OBJECTS: AtomicU64 = AtomicU64::new(0);
static TABLES: AtomicU64 = AtomicU64::new(0);
static SERVICES: AtomicU64 = AtomicU64::new(0);

/// Files per smoke run: a few seconds in a debug build.
const SMOKE_FILES: u64 = 3_000;

/// Objects of every kind control reads, as templates.
const TEMPLATES: &[&str] = &[
    "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  annotations:\n    flannel.alpha.coreos.com/public-ip: 192.168.0.2\n    flannel.alpha.coreos.com/backend-data: '{\"VNI\":1,\"VtepMAC\":\"9a:3c:2e:00:00:02\"}'\nspec:\n  podCIDR: 10.244.1.0/24\n  podCIDRs: [10.244.1.0/24, fd00:10:244:1::/64]\nstatus:\n  addresses:\n  - {type: InternalIP, address: 192.168.0.2}\n  - {type: InternalIP, address: 'fd00:192:168::2'}\n",
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.2.0/24}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.0.3}]\n",
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {team: a}}\n",
    "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default, labels: {app: web}}\nspec: {nodeName: node-a, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {phase: Running, podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: 'fd00:10:244:1::5'}]}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.41\n  clusterIPs: [172.30.0.41]\n  ipFamilies: [IPv4]\n  selector: {app: web}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Cluster\n  externalIPs: [198.51.100.7]\n  ports:\n  - {name: http, port: 80, targetPort: http, nodePort: 30080, protocol: TCP}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\nstatus:\n  loadBalancer: {ingress: [{ip: 1.2.3.4}]}\n",
    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.5]\n  conditions: {ready: true, serving: true, terminating: false}\n  nodeName: node-a\n  zone: z1\n  hints: {forZones: [{name: z1}]}\n- addresses: [10.244.2.7]\n  conditions: {ready: false}\n  nodeName: node-b\nports:\n- {name: http, port: 8080, protocol: TCP}\n- {name: dns, port: 5353, protocol: UDP}\n",
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {matchExpressions: [{key: app, operator: In, values: [client]}]}\n      namespaceSelector: {matchLabels: {team: a}}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.244.3.0/24]}\n    ports:\n    - {port: http, protocol: TCP}\n    - {port: 9000, endPort: 9100}\n  egress:\n  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]\n",
    "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}, data: {a: b}}\n",
];

/// Scalars, collections and strings of the wrong shape, to put where fields were.
fn odd_value(s: &mut Src) -> Value {
    let words = [
        "",
        "http",
        "eighty",
        "TCP",
        "SCTP",
        "ICMP",
        "IPv6",
        "Local",
        "ClientIP",
        "None",
        "10.244.1.5",
        "10.244.1.5/32",
        "::1",
        "fd00::/8",
        "300.1.1.1",
        "not-an-ip",
        "node-a",
        "default",
        "kubernetes.io/service-name",
        "ÿ\u{0}é",
        "-1",
        "1e9",
        "0x10",
        "~",
        "null",
    ];
    match s.below(12) {
        0 => Value::Null,
        1 => Value::Bool(s.chance(1, 2)),
        2 => Value::Number((s.u32() as i64 - (1 << 31)).into()),
        3 => Value::Number(
            s.pick(&[0i64, -1, 65535, 65536, 86400, 86401, i64::MAX])
                .into(),
        ),
        4 => Value::Number(serde_yaml::Number::from(s.pick(&[
            1.5f64,
            -0.0,
            f64::NAN,
            f64::INFINITY,
        ]))),
        5 => Value::Sequence(Vec::new()),
        6 => Value::Mapping(Mapping::new()),
        7 => Value::Sequence(vec![odd_value_leaf(s), odd_value_leaf(s)]),
        _ => Value::String(s.pick(&words).to_string()),
    }
}

fn odd_value_leaf(s: &mut Src) -> Value {
    match s.below(3) {
        0 => Value::Null,
        1 => Value::Number((s.u16() as i64).into()),
        _ => Value::String(format!("x{}", s.u8())),
    }
}

/// Replaces, removes or renames something somewhere inside `v`.
fn mutate_value(s: &mut Src, v: &mut Value, depth: u8) {
    match v {
        Value::Mapping(m) if !m.is_empty() && depth < 8 => {
            let keys: Vec<Value> = m.keys().cloned().collect();
            let key = s.pick(&keys);
            match s.below(6) {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    let moved = m.remove(&key).unwrap_or(Value::Null);
                    m.insert(odd_value(s), moved);
                }
                2 => {
                    m.insert(key, odd_value(s));
                }
                _ => {
                    if let Some(inner) = m.get_mut(&key) {
                        mutate_value(s, inner, depth + 1);
                    }
                }
            }
        }
        Value::Sequence(seq) if !seq.is_empty() && depth < 8 => {
            let i = s.below(seq.len());
            match s.below(5) {
                0 => {
                    seq.remove(i);
                }
                1 => {
                    let copy = seq[i].clone();
                    seq.push(copy);
                }
                2 => seq[i] = odd_value(s),
                _ => mutate_value(s, &mut seq[i], depth + 1),
            }
        }
        _ => *v = odd_value(s),
    }
}

/// Damages YAML text: characters deleted or inserted, indentation shifted, lines
/// duplicated or dropped, markers added, the end cut off.
fn mutate_text(s: &mut Src, text: &mut String) {
    let tokens = [
        ":",
        "-",
        "- ",
        "[",
        "]",
        "{",
        "}",
        "\"",
        "'",
        "\t",
        "#",
        "&a ",
        "*a",
        "!!binary ",
        "---",
        "...",
        "\n",
        "  ",
        "? ",
        "|",
        ">",
        "%YAML 1.2",
        "\u{feff}",
        "é",
        "\r\n",
        "<<: *a",
    ];
    for _ in 0..1 + s.below(4) {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        let li = s.below(lines.len());
        match s.below(8) {
            0 => {
                lines.remove(li);
            }
            1 => {
                let copy = lines[li].clone();
                lines.insert(li, copy);
            }
            2 => lines[li].insert_str(0, s.pick(&["  ", " ", "\t", "- "])),
            3 => {
                let l = &mut lines[li];
                let cut = l
                    .char_indices()
                    .map(|(i, _)| i)
                    .nth(s.below(l.chars().count().max(1)));
                if let Some(cut) = cut {
                    l.remove(cut);
                }
            }
            4 => lines.insert(
                li,
                s.pick(&["---", "...", "--- !!map", "--- |", ""])
                    .to_string(),
            ),
            5 => {
                let l = &mut lines[li];
                let at = l
                    .char_indices()
                    .map(|(i, _)| i)
                    .nth(s.below(l.chars().count() + 1))
                    .unwrap_or(l.len());
                l.insert_str(at, s.pick(&tokens));
            }
            6 => lines[li] = lines[li].trim_start().to_string(),
            _ => {
                let keep = s.below(lines.len() + 1);
                lines.truncate(keep);
            }
        }
        *text = lines.join("\n");
        if s.chance(1, 2) {
            text.push('\n');
        }
    }
}

/// The objects of the shared cases, as YAML texts: realistic seeds for mutation.
fn corpus() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cases");
    let mut out: Vec<String> = TEMPLATES.iter().map(|t| t.to_string()).collect();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(case) = serde_yaml::from_str::<Value>(&text) else {
            continue;
        };
        let mut objects: Vec<&Value> = Vec::new();
        if let Some(Value::Sequence(seq)) = case.get("objects") {
            objects.extend(seq.iter());
        }
        if let Some(Value::Sequence(steps)) = case.get("steps") {
            for step in steps {
                if let Some(Value::Sequence(seq)) = step.get("apply") {
                    objects.extend(seq.iter());
                }
            }
        }
        for o in objects {
            if let Ok(t) = serde_yaml::to_string(o) {
                out.push(t);
            }
        }
    }
    out
}

/// One manifest file: a few documents, maybe mutated, maybe damaged as text.
fn file_gen(s: &mut Src, corpus: &[String]) -> String {
    let mut docs = Vec::new();
    for _ in 0..1 + s.below(5) {
        let mut text = s.pick(corpus);
        if s.chance(2, 3) {
            if let Ok(mut v) = serde_yaml::from_str::<Value>(&text) {
                for _ in 0..1 + s.below(3) {
                    mutate_value(s, &mut v, 0);
                }
                if let Ok(t) = serde_yaml::to_string(&v) {
                    text = t;
                }
            }
        }
        docs.push(text);
    }
    let mut text = docs.join("---\n");
    if s.chance(1, 3) {
        mutate_text(s, &mut text);
    }
    text
}

/// Loads one file and computes the tables; `Err` for a broken promise.
fn manifest_case(input: &[u8], corpus: &[String], text_out: &mut String) -> Result<(), String> {
    let mut s = Src::new(input);
    let text = file_gen(&mut s, corpus);
    *text_out = text.clone();
    let file = "fuzz.yaml";
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    let docs = load_text(&mut objects, file, &text, &mut errors);
    ERRORS.fetch_add(errors.len() as u64, Relaxed);
    OBJECTS.fetch_add(objects.len() as u64, Relaxed);
    let lines = text.lines().count().max(1);
    for e in &errors {
        let shown = e.to_string();
        let document = match e {
            ManifestError::Syntax { document, line, .. }
            | ManifestError::Document { document, line, .. } => {
                if *line < 1 || *line > lines {
                    return Err(format!(
                        "error at line {line} of a {lines}-line file: {shown}"
                    ));
                }
                *document
            }
            other => return Err(format!("unexpected error for text: {other}")),
        };
        if document < 1 || document > docs {
            return Err(format!(
                "error names document {document} of {docs}: {shown}"
            ));
        }
        if !shown.starts_with(&format!("{file} document {document}")) {
            return Err(format!(
                "error does not start with its file and document: {shown}"
            ));
        }
    }
    for node in ["node-a", "node-b", "missing"] {
        if let Ok(computed) = compute_with_warnings(&objects, node, &ClusterSpec::default()) {
            if node == "node-a" {
                TABLES.fetch_add(1, Relaxed);
                SERVICES.fetch_add(computed.tables.services.len() as u64, Relaxed);
            }
            let msg = wire::Message::Snapshot {
                generation: 1,
                tables: Box::new(computed.tables),
            };
            let back = wire::read_message(&mut std::io::Cursor::new(wire::encode(&msg)))
                .map_err(|e| format!("tables of {node} do not cross the control stream: {e}"))?;
            if back != msg {
                return Err(format!(
                    "tables of {node} changed crossing the control stream"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_manifests() {
    let st = fuzzgen::settings("KXDP_FUZZ_DOCS", SMOKE_FILES);
    let corpus = corpus();
    let started = std::time::Instant::now();
    let cases: Box<dyn Iterator<Item = u64>> = match st.only {
        Some(n) => Box::new(std::iter::once(n)),
        None => Box::new(0..st.count),
    };
    let mut ran = 0;
    for n in cases {
        let input = Rng::new(fuzzgen::case_seed(st.seed, n)).bytes(512);
        let mut text = String::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            manifest_case(&input, &corpus, &mut text)
        }));
        let why = match result {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(panic) => Some(format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(why) = why {
            panic!(
                "fuzz manifests: {why}\n  replay: KXDP_FUZZ_SEED={:#x} KXDP_FUZZ_CASE={n}\n  file ({} bytes, hex {}):\n{text}",
                st.seed,
                text.len(),
                fuzzgen::hex(text.as_bytes())
            );
        }
        ran += 1;
    }
    fuzzgen::report("manifests", st.seed, ran, "files", started);
    eprintln!(
        "fuzz manifests: {} seed documents; {} errors reported, {} objects stored, {} tables of node-a with {} Service ports",
        corpus.len(),
        ERRORS.load(Relaxed),
        OBJECTS.load(Relaxed),
        TABLES.load(Relaxed),
        SERVICES.load(Relaxed)
    );
}
