//! Several kxdp nodes on one network (issue 4): each lab node runs its own kxdp-dataplane
//! and kxdp-control over the same cluster manifests, and their uplinks share one Ethernet
//! segment (a bridge in the first lab's outside namespace, where the outside client lives).
//!
//! - Two kxdp nodes: pods on A and B talk over TCP and UDP both ways through the overlay,
//!   a ClusterIP on either node reaches endpoints on the other, and a large transfer
//!   completes.
//! - A gateway node without pods: an outside client reaches a LoadBalancer IP on it, served
//!   by pods on two other kxdp nodes; every endpoint answers over 30 connections, each
//!   seeing the gateway's address (so replies return through it).
//!
//! Needs root; skips with a message otherwise. Workers sleep when idle (three busy-polling
//! dataplanes would otherwise share two cores badly).

mod common;

use std::path::{Path, PathBuf};

use common::{answers, is_root, repo, who, Running};
use lab::{LabNode, LabOutside, LabPod, LabSpec};

/// Dataplane arguments for a node sharing the machine with others.
const SHARED_CORES: &[&str] = &["--poll-mode", "adaptive", "--pin", "false"];

/// A lab node description: `name` (Node object), its uplink address and pod network.
fn node_spec(
    lab: &str,
    name: &str,
    address: &str,
    pod_cidr: &str,
    pods: &[(&str, &str)],
) -> LabSpec {
    LabSpec {
        name: lab.to_string(),
        node: LabNode {
            name: name.to_string(),
            address: address.parse().unwrap(),
            address6: None,
            pod_cidr: pod_cidr.parse().unwrap(),
            pod_cidr6: None,
        },
        // Only the first lab's outside host stays (as the client on the shared segment).
        outside: LabOutside {
            address: "192.168.0.1/24".parse().unwrap(),
            address6: None,
        },
        pods: pods
            .iter()
            .map(|(name, ip)| LabPod {
                name: name.to_string(),
                ip: ip.parse().unwrap(),
                ip6: None,
                ports: if name.contains("client") {
                    Vec::new()
                } else {
                    vec![8080]
                },
            })
            .collect(),
        queues: 1,
        host_routes: vec![
            "10.244.0.0/16".parse().unwrap(),
            "172.30.0.0/16".parse().unwrap(),
        ],
        host_routes6: Vec::new(),
    }
}

/// node-a: the bundled lab (its pods and address), as `ka<pid>`, on the manifests in `dir`.
fn start_node_a(pid: u32, dir: &Path) -> Running {
    let mut spec = LabSpec::load(&repo().join("lab/lab.yaml")).unwrap();
    spec.name = format!("ka{pid}");
    spec.queues = 1;
    Running::start_node(spec, dir, 1, SHARED_CORES)
}

/// node-b (192.168.0.3, 10.244.2.0/24) with `pods`, as `kb<pid>`, on the manifests in `dir`.
fn start_node_b(pid: u32, dir: &Path, pods: &[(&str, &str)]) -> Running {
    let spec = node_spec(
        &format!("kb{pid}"),
        "node-b",
        "192.168.0.3/24",
        "10.244.2.0/24",
        pods,
    );
    Running::start_node(spec, dir, 1, SHARED_CORES)
}

/// The bundled lab manifests plus `extra`, in a fresh folder.
fn cluster_manifests(test: &str, extra: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/run/kxdp/{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(repo().join("lab/manifests")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("60-cluster.yaml"), extra).unwrap();
    dir
}

/// Removes a folder on drop.
struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node_manifest(name: &str, address: &str, pod_cidr: &str, mac: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations: {{kxdp.io/vtep-mac: '{mac}'}}
spec: {{podCIDR: {pod_cidr}}}
status:
  addresses: [{{type: InternalIP, address: {address}}}]
---
"#
    )
}

fn pod_manifest(ns_name: &str, node: &str, ip: &str) -> String {
    let (ns, name) = ns_name.split_once('/').unwrap();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec: {{nodeName: {node}, containers: [{{name: m, image: kxdp-echo:lab}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
---
"#
    )
}

fn run(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every answer came from one of `from`, and the backend saw `peer` (any when `None`).
fn assert_answers(
    what: &str,
    got: &[serde_json::Value],
    from: &[&str],
    peer: Option<&str>,
    nodes: &[&Running],
) {
    for (who, seen) in answers(got) {
        if !from.contains(&who.as_str()) || peer.is_some_and(|p| p != seen) {
            for n in nodes {
                n.dump_logs();
            }
            panic!("{what}: answered by {who} seeing {seen}, expected one of {from:?} seeing {peer:?}: {got:?}");
        }
    }
}

#[test]
fn pods_across_the_overlay_between_two_kxdp_nodes() {
    let test = "pods_across_the_overlay_between_two_kxdp_nodes";
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root for network namespaces and XDP");
        return;
    }
    let pid = std::process::id();
    let extra = [
        node_manifest(
            "node-b",
            "192.168.0.3",
            "10.244.2.0/24",
            "02:6b:78:00:00:03",
        ),
        pod_manifest("default/web-b", "node-b", "10.244.2.5"),
        pod_manifest("default/client-b", "node-b", "10.244.2.2"),
        r#"apiVersion: v1
kind: Service
metadata: {name: remote, namespace: default}
spec:
  clusterIP: 172.30.0.70
  ports:
  - {name: p, port: 80, targetPort: 8080}
  - {name: u, port: 80, targetPort: 8080, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-lab01
  namespace: default
  labels: {kubernetes.io/service-name: remote}
addressType: IPv4
endpoints:
- addresses: [10.244.2.5]
  nodeName: node-b
ports:
- {name: p, port: 8080}
- {name: u, port: 8080, protocol: UDP}
"#
        .to_string(),
    ]
    .concat();
    let dir = Dir(cluster_manifests("two-nodes", &extra));

    let a = start_node_a(pid, &dir.0);
    let b = start_node_b(
        pid,
        &dir.0,
        &[
            ("default/client-b", "10.244.2.2"),
            ("default/web-b", "10.244.2.5"),
        ],
    );
    a.lab().join_uplinks(&[b.lab()]).unwrap();
    let nodes = [&a, &b];

    let client_a = a.ns("default/client");
    let client_b = b.ns("default/client-b");
    // A → B: pod to pod, and a ClusterIP on A whose endpoint is on B.
    for (proto, to) in [
        ("tcp", "10.244.2.5:8080"),
        ("udp", "10.244.2.5:8080"),
        ("tcp", "172.30.0.70:80"),
        ("udp", "172.30.0.70:80"),
    ] {
        let got = a.call(&client_a, to, proto, "10");
        assert_answers(
            &format!("A {proto} to {to}"),
            &got,
            &["default/web-b"],
            Some("10.244.1.2"),
            &nodes,
        );
    }
    // A's host (a hostNetwork process, the kubelet's probes) → a pod on B, directly and
    // through the ClusterIP: through A's host pair, kxdp and the overlay. Directly, the
    // pod sees A's address; through the ClusterIP the node's traffic is masqueraded, as
    // kube-proxy does, to A's pod-network gateway.
    let host_a = a.lab().node_ns();
    for (proto, to, peer) in [
        ("tcp", "10.244.2.5:8080", "192.168.0.2"),
        ("udp", "10.244.2.5:8080", "192.168.0.2"),
        ("tcp", "172.30.0.70:80", "10.244.1.1"),
        ("udp", "172.30.0.70:80", "10.244.1.1"),
    ] {
        let got = a.call(&host_a, to, proto, "5");
        assert_answers(
            &format!("A's host {proto} to {to}"),
            &got,
            &["default/web-b"],
            Some(peer),
            &nodes,
        );
    }
    // B → A: pod to pod, and the lab's web ClusterIP on B, whose endpoints are all on A.
    for (proto, to) in [("tcp", "10.244.1.5:8080"), ("udp", "10.244.1.5:8080")] {
        let got = b.call(&client_b, to, proto, "10");
        assert_answers(
            &format!("B {proto} to {to}"),
            &got,
            &["default/web-1"],
            Some("10.244.2.2"),
            &nodes,
        );
    }
    let got = b.call(&client_b, "172.30.0.41:80", "tcp", "30");
    let web = ["default/web-1", "default/web-2", "default/web-3"];
    assert_answers(
        "B to the web ClusterIP",
        &got,
        &web,
        Some("10.244.2.2"),
        &nodes,
    );
    assert_eq!(who(&got), web, "every ready web endpoint on A answers B");

    // Node B removed from A's view: A has no route to its pods at once; added back, it has.
    let a_manifests = common::manifests(a.lab());
    let node_b = a_manifests.join("60-cluster.yaml");
    let saved = std::fs::read_to_string(&node_b).unwrap();
    let before = common::generation(&a.socket).unwrap();
    std::fs::remove_file(&node_b).unwrap();
    a.wait_generation_after(before);
    let got = a.call(&client_a, "10.244.2.5:8080", "tcp", "1");
    assert!(
        answers(&got)[0].0.starts_with("error"),
        "node-b removed, yet: {got:?}"
    );
    let before = common::generation(&a.socket).unwrap();
    std::fs::write(&node_b, saved).unwrap();
    a.wait_generation_after(before);
    let got = a.call(&client_a, "10.244.2.5:8080", "tcp", "3");
    assert_answers(
        "node-b back",
        &got,
        &["default/web-b"],
        Some("10.244.1.2"),
        &nodes,
    );

    // A large transfer each way across the 1450-byte overlay (both ends kxdp).
    for (node, client, to) in [
        (&a, &client_a, "10.244.2.5:8080"),
        (&b, &client_b, "10.244.1.5:8080"),
    ] {
        let held = node.kxdp_lab_in(
            client,
            &[
                "hold",
                "--to",
                to,
                "--millis",
                "1500",
                "--size",
                "16000",
                "--interval-ms",
                "1",
            ],
        );
        if held[0].get("error").is_some() {
            for n in nodes {
                n.dump_logs();
            }
        }
        assert!(
            held[0].get("error").is_none(),
            "large transfer to {to}: {held:?}"
        );
        assert!(
            held[0]["bytes"].as_u64().unwrap_or(0) >= 16000 * 10,
            "{held:?}"
        );
    }
}

#[test]
fn a_gateway_node_serves_a_loadbalancer_from_pods_on_two_other_nodes() {
    let test = "a_gateway_node_serves_a_loadbalancer_from_pods_on_two_other_nodes";
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root for network namespaces and XDP");
        return;
    }
    let pid = std::process::id();
    let extra = [
        node_manifest(
            "node-b",
            "192.168.0.3",
            "10.244.2.0/24",
            "02:6b:78:00:00:03",
        ),
        node_manifest(
            "edge-1",
            "192.168.0.9",
            "10.244.9.0/24",
            "02:6b:78:00:00:09",
        ),
        pod_manifest("default/web-b", "node-b", "10.244.2.5"),
        r#"apiVersion: v1
kind: Service
metadata: {name: edge, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.80
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30090}
  - {name: dns, port: 80, targetPort: 8080, nodePort: 30090, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: edge-lab01
  namespace: default
  labels: {kubernetes.io/service-name: edge}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.1.6], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
ports:
- {name: http, port: 8080}
- {name: dns, port: 8080, protocol: UDP}
"#
        .to_string(),
    ]
    .concat();
    let dir = Dir(cluster_manifests("gateway", &extra));

    let gw = Running::start_node(
        node_spec(
            &format!("kg{pid}"),
            "edge-1",
            "192.168.0.9/24",
            "10.244.9.0/24",
            &[],
        ),
        &dir.0,
        1,
        SHARED_CORES,
    );
    let a = start_node_a(pid, &dir.0);
    let b = start_node_b(pid, &dir.0, &[("default/web-b", "10.244.2.5")]);
    gw.lab().join_uplinks(&[a.lab(), b.lab()]).unwrap();
    let nodes = [&gw, &a, &b];

    // The outside client (on the shared segment) reaches the LoadBalancer IP through the
    // gateway, as an edge router would route it.
    let client = gw.lab().outside_ns();
    run(
        &client,
        &["route", "add", "1.2.3.4/32", "via", "192.168.0.9"],
    );
    let endpoints = ["default/web-1", "default/web-2", "default/web-b"];
    for proto in ["tcp", "udp"] {
        let got = gw.call(&client, "1.2.3.4:80", proto, "30");
        // The gateway masquerades to its own address in its pod network (10.244.9.1), so
        // the backends' replies come back to it through the overlay.
        assert_answers(
            &format!("{proto} to the LoadBalancer"),
            &got,
            &endpoints,
            Some("10.244.9.1"),
            &nodes,
        );
        assert_eq!(
            who(&got),
            endpoints,
            "{proto}: every endpoint answers over 30 connections"
        );
    }
}
