//! `deploy/` as the API server would take it: every document of every `deploy/*.yaml`
//! parses as its k8s-openapi type, and nothing in it is lost doing so (a misspelt field
//! would be silently dropped by the API server); no image is untagged or `latest`, in the
//! manifests or the Containerfile; the ClusterRole grants list and watch on exactly the
//! six kinds kxdp-control watches, patch on nodes, and nothing else; the DaemonSets keep
//! to what the README promises (host network, the dataplane's five capabilities and no
//! more, an unprivileged control, the socket shared through a volume, NODE_NAME from the
//! downward API, probes on /livez and /healthz); the per-node one installs kxdp-cni and
//! its config into the host's CNI directories from init containers and shares the socket
//! with the host, the gateway one installs nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use control::k8s_openapi::api::apps::v1::DaemonSet;
use control::k8s_openapi::api::core::v1::{Container, ServiceAccount};
use control::k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Whether everything in `part` is in `full` (objects: every key, recursively; arrays:
/// element by element); the first difference otherwise.
fn contained(part: &Value, full: &Value, at: &str) -> Result<(), String> {
    match (part, full) {
        (Value::Object(p), Value::Object(f)) => {
            for (k, v) in p {
                let here = format!("{at}.{k}");
                let Some(fv) = f.get(k) else {
                    return Err(format!("{here}: not a field of the type (misspelt?)"));
                };
                contained(v, fv, &here)?;
            }
            Ok(())
        }
        (Value::Array(p), Value::Array(f)) if p.len() == f.len() => p
            .iter()
            .zip(f)
            .enumerate()
            .try_for_each(|(i, (p, f))| contained(p, f, &format!("{at}[{i}]"))),
        (p, f) if p == f => Ok(()),
        (p, f) => Err(format!("{at}: {p} became {f}")),
    }
}

/// `doc` as a `T`, which must keep every field the document has.
fn typed<T: DeserializeOwned + Serialize>(doc: &serde_yaml::Value, name: &str) -> T {
    let object: T = serde_yaml::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name}: not a valid {}: {e}", std::any::type_name::<T>()));
    let original = serde_json::to_value(doc).expect("YAML as JSON");
    let back = serde_json::to_value(&object).expect("object as JSON");
    if let Err(e) = contained(&original, &back, "") {
        panic!("{name}: {e}");
    }
    object
}

#[derive(Default)]
struct Deploy {
    daemon_sets: Vec<(String, DaemonSet)>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn load() -> Deploy {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "deploy/ has {files:?}");
    let mut d = Deploy::default();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let file = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{file} document {i}: not YAML: {e}"));
            if doc.is_null() {
                continue;
            }
            let name = format!("{file} document {i}");
            match doc["kind"].as_str() {
                Some("DaemonSet") => d.daemon_sets.push((name.clone(), typed(&doc, &name))),
                Some("ServiceAccount") => d.service_accounts.push(typed(&doc, &name)),
                Some("ClusterRole") => d.cluster_roles.push(typed(&doc, &name)),
                Some("ClusterRoleBinding") => d.bindings.push(typed(&doc, &name)),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    d
}

/// Why an image reference is not pinned, if it is not.
fn unpinned(image: &str) -> Option<&'static str> {
    let name = image.split('@').next().unwrap_or(image);
    // A tag is after the last ':' that follows the last '/' (a registry port is not one).
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        None => Some("untagged (means latest)"),
        Some((_, "")) => Some("empty tag"),
        Some((_, "latest")) => Some("tagged latest"),
        Some(_) => None,
    }
}

#[test]
fn pinning_is_judged_right() {
    assert_eq!(unpinned("ghcr.io/kxdp/kxdp:0.1.0"), None);
    assert_eq!(unpinned("registry:5000/kxdp:0.1.0@sha256:abc"), None);
    assert!(unpinned("ghcr.io/kxdp/kxdp").is_some());
    assert!(unpinned("registry:5000/kxdp").is_some());
    assert!(unpinned("ghcr.io/kxdp/kxdp:latest").is_some());
}

fn containers(ds: &DaemonSet) -> Vec<&Container> {
    let spec = ds.spec.template.spec.as_ref().expect("pod spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

#[test]
fn every_document_parses_as_its_kubernetes_type() {
    let d = load();
    assert_eq!(d.daemon_sets.len(), 2, "per-node and gateway");
    assert_eq!(d.service_accounts.len(), 1);
    assert_eq!(d.cluster_roles.len(), 1);
    assert_eq!(d.bindings.len(), 1);
}

#[test]
fn no_image_is_untagged_or_latest() {
    let d = load();
    for (name, ds) in &d.daemon_sets {
        for c in containers(ds) {
            let image = c.image.as_deref().unwrap_or("");
            if let Some(why) = unpinned(image) {
                panic!("{name}: container {}: image {image:?} is {why}", c.name);
            }
        }
    }
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    let froms: Vec<&str> = containerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM "))
        .collect();
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    for from in froms {
        let image = from.split_whitespace().next().expect("an image");
        if let Some(why) = unpinned(image) {
            panic!("Containerfile: FROM {image} is {why}");
        }
    }
}

#[test]
fn the_cluster_role_grants_list_and_watch_on_the_six_kinds_patch_on_nodes_and_nothing_else() {
    let d = load();
    let role = &d.cluster_roles[0];
    assert!(role.aggregation_rule.is_none(), "no aggregated rules");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "{rule:?}");
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let kinds = [
        ("", "services"),
        ("", "nodes"),
        ("", "pods"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "networkpolicies"),
    ];
    let mut wanted: BTreeSet<(String, String, String)> = kinds
        .iter()
        .flat_map(|(g, r)| ["list", "watch"].map(|v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    // kxdp-control annotates its own Node with its VTEP (control/src/node_announce.rs).
    wanted.insert(("".into(), "nodes".into(), "patch".into()));
    assert_eq!(granted, wanted);

    // Bound to the service account the DaemonSets run as, and only to it.
    let sa = &d.service_accounts[0].metadata;
    let binding = &d.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.namespace);
    for (name, ds) in &d.daemon_sets {
        let spec = ds.spec.template.spec.as_ref();
        assert_eq!(
            spec.and_then(|s| s.service_account_name.as_ref()),
            sa.name.as_ref(),
            "{name}"
        );
        assert_eq!(ds.metadata.namespace, sa.namespace, "{name}");
    }
}

#[test]
fn the_daemon_sets_are_what_the_readme_says() {
    let d = load();
    for (name, ds) in &d.daemon_sets {
        let spec = &ds.spec;
        let update = spec.update_strategy.as_ref().expect("update strategy");
        assert_eq!(update.type_.as_deref(), Some("RollingUpdate"), "{name}");
        let pod = spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(pod.host_network, Some(true), "{name}");
        let run_volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "run")
            .unwrap_or_else(|| panic!("{name}: a volume for the socket"));
        let host_path = |volume: &str| {
            pod.volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| h.path.clone())
        };
        let by_name = |n: &str| {
            pod.containers
                .iter()
                .find(|c| c.name == n)
                .unwrap_or_else(|| panic!("{name}: container {n}"))
        };
        let dataplane = by_name("dataplane");
        let control = by_name("control");
        for c in [dataplane, control] {
            let mounted = c
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == run_volume.name && m.mount_path == "/run/kxdp");
            assert!(mounted, "{name}: {} mounts the socket's volume", c.name);
        }
        let inits: Vec<&Container> = pod.init_containers.iter().flatten().collect();
        for c in [dataplane, control]
            .into_iter()
            .chain(inits.iter().copied())
        {
            let sc = c.security_context.as_ref().expect("security context");
            assert_ne!(sc.privileged, Some(true), "{name}: {}", c.name);
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{name}: {}",
                c.name
            );
            let caps = sc.capabilities.as_ref().expect("capabilities");
            assert_eq!(
                caps.drop.as_deref(),
                Some(&["ALL".to_string()][..]),
                "{name}"
            );
        }
        let added: BTreeSet<&str> = dataplane
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(
            added,
            BTreeSet::from(["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "IPC_LOCK"]),
            "{name}"
        );
        for c in &inits {
            let caps = c
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref());
            assert!(
                caps.and_then(|c| c.add.as_ref()).is_none(),
                "{name}: {} needs no capability",
                c.name
            );
        }
        let env = |c: &Container, var: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == var)
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| panic!("{name}: {} sets {var}", c.name))
        };
        let args = |c: &Container| c.args.clone().unwrap_or_default();
        // Control announces the dataplane's uplink as this node's VTEP.
        assert!(
            args(control).contains(&"--uplink=$(KXDP_UPLINK)".to_string()),
            "{name}"
        );
        assert_eq!(
            env(control, "KXDP_UPLINK"),
            env(dataplane, "KXDP_UPLINK"),
            "{name}"
        );
        // Only the CNI directories and the socket's are taken from the host.
        let host_paths: BTreeSet<String> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
            .collect();
        if name.contains("gateway") {
            // No pods of its own: no plugin, no config, the socket in an emptyDir.
            assert!(inits.is_empty(), "{name}");
            assert!(host_paths.is_empty(), "{name}: {host_paths:?}");
            assert!(run_volume.empty_dir.is_some(), "{name}");
            continue;
        }
        assert_eq!(
            host_paths,
            BTreeSet::from(["/run/kxdp", "/opt/cni/bin", "/etc/cni/net.d"].map(String::from)),
            "{name}"
        );
        // kxdp-cni, run on the host, finds the socket where the containers put it.
        assert_eq!(host_path("run").as_deref(), Some("/run/kxdp"), "{name}");
        let init = |n: &str| {
            inits
                .iter()
                .copied()
                .find(|c| c.name == n)
                .unwrap_or_else(|| panic!("{name}: init container {n}"))
        };
        let mounted_at = |c: &Container, volume: &str| {
            let m = c.volume_mounts.iter().flatten().find(|m| m.name == volume);
            m.map(|m| m.mount_path.clone())
                .unwrap_or_else(|| panic!("{name}: {} mounts {volume}", c.name))
        };
        let plugin = init("install-cni-plugin");
        assert_eq!(
            host_path("cni-bin").as_deref(),
            Some("/opt/cni/bin"),
            "{name}"
        );
        let bin_dir = mounted_at(plugin, "cni-bin");
        let script = plugin.command.clone().unwrap_or_default().join(" ");
        assert!(
            script.contains("/usr/local/bin/kxdp-cni"),
            "{name}: {script}"
        );
        assert!(
            script.contains(&format!("mv -f {bin_dir}/.kxdp-cni.new {bin_dir}/kxdp-cni")),
            "{name}: installed by a rename into the mounted directory: {script}"
        );
        let conf = init("install-cni-conf");
        assert_eq!(
            host_path("cni-conf").as_deref(),
            Some("/etc/cni/net.d"),
            "{name}"
        );
        let conf_dir = mounted_at(conf, "cni-conf");
        assert_eq!(
            conf.command.as_deref(),
            Some(&["/usr/local/bin/kxdp-control".to_string()][..])
        );
        for arg in [
            format!("--cni-conf-dir={conf_dir}"),
            "--uplink=$(KXDP_UPLINK)".into(),
            "--cni-queues=$(KXDP_WORKERS)".into(),
            "--socket=/run/kxdp/dataplane.sock".into(),
        ] {
            assert!(args(conf).contains(&arg), "{name}: install-cni-conf {arg}");
        }
        assert!(
            args(dataplane).contains(&"--workers=$(KXDP_WORKERS)".to_string()),
            "{name}: the veth queues are the workers"
        );
        assert_eq!(
            env(conf, "KXDP_WORKERS"),
            env(dataplane, "KXDP_WORKERS"),
            "{name}"
        );
        assert_eq!(
            env(conf, "KXDP_UPLINK"),
            env(dataplane, "KXDP_UPLINK"),
            "{name}"
        );
        let conf_node = conf
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(conf_node, Some("spec.nodeName"), "{name}");
    }
}

#[test]
fn the_image_holds_kxdp_cni() {
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    assert!(containerfile.contains("--bin kxdp-cni"), "built");
    assert!(
        containerfile.contains("install -m 0755 -t /out \"target/$target/release/kxdp-cni\""),
        "put where the run stage copies /usr/local/bin from"
    );
    assert!(containerfile.contains("COPY --from=build /out/ /usr/local/bin/"));
}

#[test]
fn the_daemon_sets_run_unprivileged_where_they_can() {
    let d = load();
    for (name, ds) in &d.daemon_sets {
        let pod = ds.spec.template.spec.as_ref().expect("pod spec");
        let control = pod
            .containers
            .iter()
            .find(|c| c.name == "control")
            .unwrap_or_else(|| panic!("{name}: container control"));
        let control_sc = control.security_context.as_ref().expect("security context");
        assert!(
            control_sc
                .capabilities
                .as_ref()
                .and_then(|c| c.add.as_ref())
                .is_none(),
            "{name}: control needs no capability"
        );
        assert_eq!(control_sc.run_as_non_root, Some(true), "{name}");
        let node_name = control
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(node_name, Some("spec.nodeName"), "{name}");
        let probe_path = |p: Option<&control::k8s_openapi::api::core::v1::Probe>| {
            p.and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(
            probe_path(control.liveness_probe.as_ref()).as_deref(),
            Some("/livez"),
            "{name}"
        );
        assert_eq!(
            probe_path(control.readiness_probe.as_ref()).as_deref(),
            Some("/healthz"),
            "{name}"
        );
    }
}
