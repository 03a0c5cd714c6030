//! Per-node mode with a real container runtime (issue 17): containerd and runc, started by
//! the test on a lab node (see `ctrd/mod.rs` for how), create containers whose network
//! kxdp-cni sets up and the running kxdp-dataplane attaches at runtime. The node runs no
//! static pods: every pod interface comes from the CNI. With no kubelet here, the test
//! writes the Pod objects (with the addresses host-local gave) and the Services' endpoint
//! slices for kxdp-control, as the kubelet and the endpoint-slice controller would.
//!
//! - Connectivity: 10 containers reach each other; a TCP and a UDP ClusterIP backed by
//!   containers; a pod on a second lab node through VXLAN; a server outside the cluster,
//!   which sees the node's address; host processes reach a ClusterIP. Stopped, the
//!   containers leave no veth, lease or record behind.
//! - Churn: 200 create/delete cycles, 10 at a time, while one TCP connection between two
//!   other containers streams without a retransmission; afterwards nothing of a deleted
//!   container remains: veth, AF_XDP socket, host-local lease, record, conntrack entry.
//! - Faults: `kill -9` of the dataplane during churn; ADDs during the outage fail with a
//!   CNI error and succeed on retry; a new dataplane serves the containers that lived
//!   through it; DEL twice, DEL of an unknown ID, CHECK after `ip link del`, GC with a
//!   stale list, STATUS, against the real dataplane.
//!
//! Needs root (skips with a message otherwise) and containerd, runc, busybox-static and
//! containernetworking-plugins (`scripts/deps.sh` installs them; skips with a message when
//! they are missing and cannot be installed). Workers sleep when idle: two dataplanes,
//! containerd and a few hundred containers share two cores.

mod common;
mod ctrd;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{answers, is_root, repo, who, Proc, Running};
use ctrd::{CniSettings, Container, Containerd};
use lab::{Lab, LabNode, LabOutside, LabPod, LabSpec};
use nat::wire::{self, Message};

/// Dataplane arguments for a node sharing the machine with others.
const SHARED_CORES: &[&str] = &["--poll-mode", "adaptive", "--pin", "false"];

/// The containers' echo port (TCP and UDP).
const PORT: &str = "8080";
/// The TCP and UDP ClusterIPs backed by containers.
const TCP_SERVICE: &str = "172.30.0.90";
const UDP_SERVICE: &str = "172.30.0.91";
/// The pod on the second node, and the server outside the cluster.
const REMOTE_POD: &str = "10.244.2.5";
const OUTSIDE: &str = "192.168.0.1:9090";

/// Whether the test can run; says why not.
fn can_run(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root for network namespaces, XDP and containerd");
        return false;
    }
    if let Err(missing) = ctrd::available() {
        eprintln!("SKIPPED {test}: missing {missing} (scripts/deps.sh installs them)");
        return false;
    }
    true
}

/// Removes a folder on drop.
struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cluster as control reads it at start: node-a (the lab's Node object), node-b and its
/// pod. The containers' Pods and Services come later ([`publish`]).
fn cluster_manifests(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        repo().join("lab/manifests/00-node.yaml"),
        dir.join("00-node.yaml"),
    )
    .unwrap();
    let node_b = format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: node-b
  annotations: {{kxdp.io/vtep-mac: '02:6b:78:00:00:03'}}
spec: {{podCIDR: 10.244.2.0/24}}
status:
  addresses: [{{type: InternalIP, address: 192.168.0.3}}]
---
{}"#,
        pod_manifest("web-b", "node-b", REMOTE_POD)
    );
    std::fs::write(dir.join("10-node-b.yaml"), node_b).unwrap();
}

fn pod_manifest(name: &str, node: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}
spec: {{nodeName: {node}, containers: [{{name: main, image: kxdp-echo:lab}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
---
"#
    )
}

fn service_manifest(name: &str, ip: &str, proto: &str, backends: &[(String, IpAddr)]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|(pod, addr)| {
            format!(
                "- {{addresses: [{addr}], nodeName: node-a, targetRef: {{kind: Pod, namespace: default, name: {pod}}}}}\n"
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{name: p, port: 80, targetPort: {PORT}, protocol: {proto}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-ctr
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{name: p, port: {PORT}, protocol: {proto}}}]
---
"#
    )
}

/// Writes the containers' Pod objects (and `services`) into node A's manifests, as the
/// kubelet would report them, and waits until the dataplane runs the new tables.
fn publish(node: &Running, pods: &[(String, IpAddr)], services: &str) {
    let pods: String = pods
        .iter()
        .map(|(name, ip)| pod_manifest(name, "node-a", &ip.to_string()))
        .collect();
    let before = common::generation(&node.socket).unwrap_or(0);
    std::fs::write(
        common::manifests(node.lab()).join("70-containers.yaml"),
        format!("{pods}{services}"),
    )
    .unwrap();
    node.wait_generation_after(before);
}

/// node-a as `<prefix><pid>`: the bundled lab's node, its uplink and host pair, and no
/// pods (the CNI brings them).
fn start_node_a(prefix: &str, manifests: &Path) -> Running {
    let mut spec = LabSpec::load(&repo().join("lab/lab.yaml")).unwrap();
    spec.name = format!("{prefix}{}", std::process::id());
    spec.queues = 1;
    spec.pods.clear();
    Running::start_node(spec, manifests, 1, SHARED_CORES)
}

/// node-b (192.168.0.3, 10.244.2.0/24) with its echo pod web-b, its uplink joined to A's.
fn start_node_b(a: &Running, prefix: &str, manifests: &Path) -> Running {
    let spec = LabSpec {
        name: format!("{prefix}{}", std::process::id()),
        node: LabNode {
            name: "node-b".into(),
            address: "192.168.0.3/24".parse().unwrap(),
            address6: None,
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            pod_cidr6: None,
        },
        outside: LabOutside {
            address: "192.168.0.1/24".parse().unwrap(),
            address6: None,
        },
        pods: vec![LabPod {
            name: "default/web-b".into(),
            ip: REMOTE_POD.parse().unwrap(),
            ip6: None,
            ports: vec![PORT.parse().unwrap()],
        }],
        queues: 1,
        host_routes: vec![
            "10.244.0.0/16".parse().unwrap(),
            "172.30.0.0/16".parse().unwrap(),
        ],
        host_routes6: Vec::new(),
    };
    let b = Running::start_node(spec, manifests, 1, SHARED_CORES);
    a.lab().join_uplinks(&[b.lab()]).unwrap();
    b
}

/// containerd on node A, its CNI configuration pointing at A's dataplane.
fn start_containerd(node: &Running) -> Containerd {
    let cni = CniSettings {
        plugin: common::bin("kxdp-cni"),
        dataplane_socket: std::env::var("KXDP_FAKE_DP")
            .map(PathBuf::from)
            .unwrap_or(node.socket.clone()),
        pod_cidr: node.lab().spec.node.pod_cidr.to_string(),
    };
    Containerd::start(
        &node.lab().state_dir().join("containerd"),
        &node.lab().node_ns(),
        &common::bin("kxdp-lab"),
        &cni,
    )
}

/// An echo container answering with `default/<id>`.
fn echo(ctrd: &Containerd, id: &str) -> Container {
    ctrd.spawn(
        id,
        &[
            "/bin/kxdp-lab",
            "echo",
            "--name",
            &format!("default/{id}"),
            "--ports",
            PORT,
        ],
    )
}

/// Starts echo containers `ids` together; their addresses, in order.
fn start_echoes(ctrd: &Containerd, ids: &[String]) -> (Vec<Container>, Vec<IpAddr>) {
    let mut cs: Vec<Container> = ids.iter().map(|id| echo(ctrd, id)).collect();
    let ips = cs.iter_mut().map(|c| ctrd.wait_running(c)).collect();
    (cs, ips)
}

/// JSON lines of `out`'s stdout.
fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `kxdp-lab call` from inside container `id`: who answered, and the source they saw.
fn call_from(
    ctrd: &Containerd,
    id: &str,
    to: &str,
    proto: &str,
    count: u32,
) -> Vec<serde_json::Value> {
    let count = count.to_string();
    let out = ctrd.exec(
        id,
        &[
            "/bin/kxdp-lab",
            "call",
            "--to",
            to,
            "--proto",
            proto,
            "--count",
            &count,
            "--timeout-ms",
            "2000",
        ],
    );
    assert!(
        out.status.success(),
        "call from {id} to {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

/// Every answer of `got` came from `from` and saw `peer`.
fn assert_all(
    what: &str,
    got: &[serde_json::Value],
    from: &[&str],
    peer: &str,
    nodes: &[&Running],
) {
    let ok = !got.is_empty()
        && answers(got)
            .iter()
            .all(|(w, seen)| from.contains(&w.as_str()) && seen == peer);
    if !ok {
        for n in nodes {
            n.dump_logs();
        }
        panic!("{what}: expected answers from {from:?} seeing {peer}, got {got:?}");
    }
}

/// The dataplane's conntrack entries with `addr` in either tuple.
fn conntrack_count(socket: &Path, addr: IpAddr) -> usize {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("dataplane socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    wire::write_message(
        &mut s,
        &Message::GetConntrack {
            addr: Some(addr),
            port: None,
            protocol: None,
            limit: 0,
        },
    )
    .unwrap();
    match wire::read_message(&mut s).unwrap() {
        Message::Conntrack { matched, .. } => matched,
        other => panic!("GetConntrack answered {other:?}"),
    }
}

/// AF_XDP sockets open in namespace `ns`: the `XDP` line of `/proc/net/protocols`, which
/// the kernel counts per network namespace (`ss --xdp` needs xsk_diag, which not every
/// kernel has).
fn xsk_sockets(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/protocols"])
        .output()
        .expect("read /proc/net/protocols");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "XDP").then(|| w.nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no XDP line in /proc/net/protocols: {text}"))
}

/// Nothing of a container but `live`'s remains on the node: host veths, AF_XDP sockets
/// beyond `xsk_baseline` (the count with only `live` attached), host-local leases,
/// kxdp-cni records, conntrack entries of `gone` addresses.
fn assert_only_left(
    node: &Running,
    ctrd: &Containerd,
    live: &[(String, IpAddr)],
    gone: &BTreeSet<IpAddr>,
    xsk_baseline: u64,
) {
    let live_ids: BTreeSet<String> = live.iter().map(|(id, _)| ctrd.cni_id(id)).collect();
    let live_ips: BTreeSet<IpAddr> = live.iter().map(|(_, ip)| *ip).collect();
    let veths: BTreeSet<String> = ctrd
        .host_veths()
        .into_iter()
        .map(|(_, owner)| owner)
        .collect();
    assert_eq!(veths, live_ids, "host veths left: {:?}", ctrd.host_veths());
    let xsk = xsk_sockets(&node.lab().node_ns());
    assert_eq!(
        xsk, xsk_baseline,
        "AF_XDP sockets on the node: {xsk_baseline} with only the live containers attached, {xsk} now"
    );
    assert_eq!(ctrd.leases(), live_ips, "host-local leases");
    assert_eq!(
        ctrd.records().len(),
        live.len(),
        "kxdp-cni records: {:?}",
        ctrd.records()
    );
    for ip in gone.difference(&live_ips) {
        assert_eq!(
            conntrack_count(&node.socket, *ip),
            0,
            "conntrack entries of deleted container {ip}"
        );
    }
}

/// TCP segments retransmitted in container `id`'s network namespace.
fn retransmits(ctrd: &Containerd, id: &str) -> u64 {
    let out = ctrd.exec(id, &["/bin/cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no RetransSegs in {id}'s /proc/net/snmp: {text}"))
}

#[test]
fn containers_reach_each_other_services_another_node_and_the_outside() {
    let test = "containers_reach_each_other_services_another_node_and_the_outside";
    if !can_run(test) {
        return;
    }
    let pid = std::process::id();
    let dir = Dir(PathBuf::from(format!("/run/kxdp/ctrd-reach-{pid}")));
    cluster_manifests(&dir.0);
    let a = start_node_a("kca", &dir.0);
    let b = start_node_b(&a, "kcb", &dir.0);
    let nodes = [&a, &b];
    let kxdp = common::bin("kxdp-lab").to_string_lossy().to_string();
    let _outside = Proc(
        Lab::exec(&a.lab().outside_ns(), &kxdp)
            .args(["echo", "--name", "outside", "--ports", "9090"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ctrd = start_containerd(&a);
    let xsk_empty = xsk_sockets(&a.lab().node_ns());

    // Ten echo containers, their network from kxdp-cni, each served by an AF_XDP socket.
    let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let (mut containers, ips) = start_echoes(&ctrd, &ids);
    let xsk = xsk_sockets(&a.lab().node_ns());
    assert!(
        xsk >= xsk_empty + 10,
        "AF_XDP sockets: {xsk_empty} before 10 containers, {xsk} with them"
    );
    let pods: Vec<(String, IpAddr)> = ids.iter().cloned().zip(ips.iter().copied()).collect();
    for (id, ip) in &pods {
        assert!(
            a.lab().spec.node.pod_cidr.contains(&match ip {
                IpAddr::V4(v4) => *v4,
                IpAddr::V6(_) => panic!("{id} got {ip}"),
            }),
            "{id}: {ip} is not in the node's pod network"
        );
    }
    let distinct: BTreeSet<IpAddr> = ips.iter().copied().collect();
    assert_eq!(distinct.len(), ips.len(), "addresses are distinct: {ips:?}");
    let services = [
        service_manifest("ctr-tcp", TCP_SERVICE, "TCP", &pods[0..3]),
        service_manifest("ctr-udp", UDP_SERVICE, "UDP", &pods[3..6]),
    ]
    .concat();
    publish(&a, &pods, &services);

    // Each container reaches every other, over TCP, and its right-hand neighbour over UDP
    // (one `sh` loop per container, so 10 execs and not 90).
    for (i, (id, ip)) in pods.iter().enumerate() {
        let targets: Vec<String> = pods
            .iter()
            .filter(|(other, _)| other != id)
            .map(|(_, t)| format!("{t}:{PORT}"))
            .collect();
        let script = format!(
            "for t in {}; do /bin/kxdp-lab call --to $t --proto tcp --timeout-ms 2000; done",
            targets.join(" ")
        );
        let out = ctrd.exec(id, &["/bin/sh", "-c", &script]);
        let got = json_lines(&out.stdout);
        let expected: Vec<String> = pods
            .iter()
            .filter(|(other, _)| other != id)
            .map(|(other, _)| format!("default/{other}"))
            .collect();
        let answered: Vec<String> = answers(&got).into_iter().map(|a| a.0).collect();
        if answered != expected
            || answers(&got)
                .iter()
                .any(|(_, seen)| *seen != ip.to_string())
        {
            a.dump_logs();
            panic!("{id} to every other container: {got:?}");
        }
        let (next, next_ip) = &pods[(i + 1) % pods.len()];
        let got = call_from(&ctrd, id, &format!("{next_ip}:{PORT}"), "udp", 3);
        assert_all(
            &format!("{id} UDP to {next}"),
            &got,
            &[&format!("default/{next}")],
            &ip.to_string(),
            &nodes,
        );
    }

    // The two ClusterIPs, from a container that backs neither.
    let client = &pods[9];
    let client_ip = client.1.to_string();
    for (svc, proto, backends) in [
        (TCP_SERVICE, "tcp", &pods[0..3]),
        (UDP_SERVICE, "udp", &pods[3..6]),
    ] {
        let got = call_from(&ctrd, &client.0, &format!("{svc}:80"), proto, 30);
        let names: Vec<String> = backends
            .iter()
            .map(|(n, _)| format!("default/{n}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_all(
            &format!("{proto} ClusterIP {svc}"),
            &got,
            &names,
            &client_ip,
            &nodes,
        );
        assert_eq!(
            who(&got),
            names,
            "every backend of {svc} answers over 30 calls"
        );
    }

    // The pod on node B, through the overlay, both protocols.
    for proto in ["tcp", "udp"] {
        let got = call_from(&ctrd, &client.0, &format!("{REMOTE_POD}:{PORT}"), proto, 5);
        assert_all(
            &format!("{proto} to node-b's pod"),
            &got,
            &["default/web-b"],
            &client_ip,
            &nodes,
        );
    }

    // A server outside the cluster sees the node's address.
    for proto in ["tcp", "udp"] {
        let got = call_from(&ctrd, &client.0, OUTSIDE, proto, 5);
        assert_all(
            &format!("{proto} to the outside"),
            &got,
            &["outside"],
            "192.168.0.2",
            &nodes,
        );
    }

    // A host process on the node reaches the TCP ClusterIP (masqueraded to the node's
    // pod-network gateway, as kube-proxy does).
    let got = a.kxdp_lab_in(
        &a.lab().node_ns(),
        &[
            "call",
            "--to",
            &format!("{TCP_SERVICE}:80"),
            "--count",
            "10",
            "--timeout-ms",
            "2000",
        ],
    );
    assert_all(
        "the node to the TCP ClusterIP",
        &got,
        &["default/c0", "default/c1", "default/c2"],
        "10.244.1.1",
        &nodes,
    );

    // Stopped (the runtime's DEL): nothing of them is left.
    for c in &mut containers {
        let log = ctrd.stop(c);
        assert!(
            !log.contains("failed (delete)"),
            "{}: DEL failed:\n{log}",
            c.id
        );
    }
    assert_only_left(&a, &ctrd, &[], &distinct, xsk_empty);
}

#[test]
fn churn_leaves_a_long_connection_flowing_and_nothing_behind() {
    let test = "churn_leaves_a_long_connection_flowing_and_nothing_behind";
    if !can_run(test) {
        return;
    }
    let pid = std::process::id();
    let dir = Dir(PathBuf::from(format!("/run/kxdp/ctrd-churn-{pid}")));
    cluster_manifests(&dir.0);
    let a = start_node_a("kcc", &dir.0);
    let ctrd = start_containerd(&a);
    // The connection's two ends, and the churned containers' server (kept apart so the
    // two ends' counters see only the long connection).
    let ids = [
        "server".to_string(),
        "client".to_string(),
        "target".to_string(),
    ];
    let (_held, ips) = start_echoes(&ctrd, &ids);
    let live: Vec<(String, IpAddr)> = ids.iter().cloned().zip(ips.iter().copied()).collect();
    publish(&a, &live, "");
    let server = format!("{}:{PORT}", ips[0]);
    let target = format!("{}:{PORT}", ips[2]);
    let xsk_live = xsk_sockets(&a.lab().node_ns());

    // The long-lived connection: one TCP stream for 60 s, echoed and checked (the churn
    // takes about 30 s here).
    let retrans_before = (retransmits(&ctrd, "client"), retransmits(&ctrd, "server"));
    let hold = ctrd.exec_spawn(
        "client",
        &[
            "/bin/kxdp-lab",
            "hold",
            "--to",
            &server,
            "--millis",
            "60000",
            "--interval-ms",
            "5",
        ],
    );
    let hold_end = Instant::now() + Duration::from_secs(60);

    // 200 cycles, 10 at a time: each container calls the target once and exits; its
    // `ctr run --rm` runs the DEL.
    let seen: std::sync::Mutex<BTreeSet<IpAddr>> = Default::default();
    let failed: std::sync::Mutex<Vec<String>> = Default::default();
    let io_lost = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..10 {
            let (ctrd, target, seen, failed, io_lost) = (&ctrd, &target, &seen, &failed, &io_lost);
            s.spawn(move || {
                for k in 0..20 {
                    let id = format!("churn-{t}-{k}");
                    let call = [
                        "/bin/kxdp-lab",
                        "call",
                        "--to",
                        target,
                        "--timeout-ms",
                        "3000",
                    ];
                    let mut out = ctrd.run_once(&id, &call);
                    // ctr 1.6 sometimes loses a short task's output (its FIFO is read after
                    // the task has exited): nothing on stdout or stderr. That cycle is run
                    // again as another container, and such losses are counted.
                    if out.stdout.is_empty() && out.stderr.is_empty() {
                        io_lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        out = ctrd.run_once(&format!("{id}-again"), &call);
                    }
                    let got = json_lines(&out.stdout);
                    let ok = out.status.success()
                        && answers(&got).first().map(|a| a.0.as_str()) == Some("default/target");
                    if !ok {
                        failed.lock().unwrap().push(format!(
                            "{id}: {} {}\n{got:?}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr)
                        ));
                        continue;
                    }
                    let peer: IpAddr = answers(&got)[0].1.parse().expect("the peer address");
                    seen.lock().unwrap().insert(peer);
                }
            });
        }
    });
    let io_lost = io_lost.into_inner();
    assert!(
        io_lost <= 5,
        "ctr lost the output of {io_lost} churned containers: more than its occasional race"
    );
    let failed = failed.into_inner().unwrap();
    if !failed.is_empty() {
        a.dump_logs();
        panic!(
            "{} of 200 churned containers failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    assert!(
        Instant::now() < hold_end,
        "the churn outlasted the 60 s connection: it was not watched throughout"
    );

    let out = hold.wait_with_output().unwrap();
    let held = json_lines(&out.stdout);
    if held.first().is_none_or(|h| h.get("error").is_some()) {
        a.dump_logs();
        panic!(
            "the long connection broke: {held:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(held[0]["answer"], "default/server", "{held:?}");
    assert!(
        held[0]["bytes"].as_u64().unwrap_or(0) > 64 * 1000,
        "{held:?}"
    );
    let retrans_after = (retransmits(&ctrd, "client"), retransmits(&ctrd, "server"));
    if retrans_after != retrans_before {
        a.dump_logs();
    }
    assert_eq!(
        retrans_after, retrans_before,
        "TCP retransmissions (client, server) during the churn: a segment was lost"
    );

    let seen = seen.into_inner().unwrap();
    assert!(seen.len() >= 10, "churned containers' addresses: {seen:?}");
    assert_only_left(&a, &ctrd, &live, &seen, xsk_live);
}

#[test]
fn dataplane_killed_during_churn_and_cni_edge_cases() {
    let test = "dataplane_killed_during_churn_and_cni_edge_cases";
    if !can_run(test) {
        return;
    }
    let pid = std::process::id();
    let dir = Dir(PathBuf::from(format!("/run/kxdp/ctrd-faults-{pid}")));
    cluster_manifests(&dir.0);
    let mut a = start_node_a("kcf", &dir.0);
    let ctrd = start_containerd(&a);
    let xsk_empty = xsk_sockets(&a.lab().node_ns());
    let ids: Vec<String> = ["a", "b", "g"].iter().map(|s| s.to_string()).collect();
    let (mut containers, ips) = start_echoes(&ctrd, &ids);
    let live: Vec<(String, IpAddr)> = ids.iter().cloned().zip(ips.iter().copied()).collect();
    publish(&a, &live, "");
    let to_b = format!("{}:{PORT}", ips[1]);
    assert_all(
        "a to b",
        &call_from(&ctrd, "a", &to_b, "tcp", 3),
        &["default/b"],
        &ips[0].to_string(),
        &[&a],
    );

    let xsk_three = xsk_sockets(&a.lab().node_ns());

    // STATUS (1.1.0) while the dataplane runs.
    let (ok, json, err) = ctrd.plugin("STATUS", "1.1.0", "", "", serde_json::json!({}));
    assert!(ok, "STATUS with the dataplane up: {json} {err}");

    // Churn, 3 at a time, retrying each failed ADD until it succeeds; the dataplane is
    // killed once the churn runs and restarted 3 s later.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let failures: std::sync::Mutex<Vec<String>> = Default::default();
    let (killed_at, restarted_at) = std::thread::scope(|s| {
        for t in 0..3 {
            let (ctrd, stop, failures) = (&ctrd, &stop, &failures);
            s.spawn(move || {
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("f-{t}-{k}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let out = ctrd.run_once(&id, &["/bin/true"]);
                        if out.status.success() {
                            break;
                        }
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{id}: {}", String::from_utf8_lossy(&out.stderr)));
                        assert!(
                            Instant::now() < deadline,
                            "{id}: no ADD succeeded within 60 s"
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    k += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_secs(3));
        let _ = Command::new("kill")
            .args(["-9", &a.dataplane.0.id().to_string()])
            .status();
        let _ = a.dataplane.0.wait();
        let killed_at = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        // While it is down: STATUS says so.
        let (ok, json, _) = ctrd.plugin("STATUS", "1.1.0", "", "", serde_json::json!({}));
        assert!(
            !ok && json["code"] == 50,
            "STATUS with the dataplane down: {json}"
        );
        std::thread::sleep(Duration::from_secs(2));
        restart_dataplane(&mut a);
        let restarted_at = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (killed_at, restarted_at)
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        !failures.is_empty(),
        "no ADD failed in the {:?} the dataplane was down",
        restarted_at - killed_at
    );
    for f in &failures {
        assert!(
            f.contains("could not attach") && f.contains("not reachable"),
            "an ADD during the outage failed otherwise than with the CNI error for an unreachable dataplane: {f}"
        );
    }

    // The containers that lived through it are served by the new dataplane.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = call_from(&ctrd, "a", &to_b, "tcp", 1);
        if answers(&got).first().map(|x| x.0.as_str()) == Some("default/b") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a → b after the restart: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_all(
        "b to a after the restart",
        &call_from(&ctrd, "b", &format!("{}:{PORT}", ips[0]), "udp", 3),
        &["default/a"],
        &ips[1].to_string(),
        &[&a],
    );

    assert_eq!(
        xsk_sockets(&a.lab().node_ns()),
        xsk_three,
        "AF_XDP sockets: the new dataplane serves a, b and g as the old one did"
    );

    // DEL twice (of a running container's attachment), then the runtime's own DEL when it
    // stops: each succeeds, and the first removes the veth and the lease.
    let a_id = ctrd.cni_id("a");
    for round in 1..=2 {
        let (ok, json, err) = ctrd.plugin("DEL", "1.0.0", &a_id, "", serde_json::json!({}));
        assert!(ok, "DEL #{round}: {json} {err}");
        assert!(
            !ctrd.host_veths().iter().any(|(_, o)| *o == a_id),
            "DEL #{round} left a's veth"
        );
        assert!(
            !ctrd.leases().contains(&ips[0]),
            "DEL #{round} left a's lease"
        );
    }
    let log = ctrd.stop(&mut containers[0]);
    assert!(
        !log.contains("failed (delete)"),
        "the runtime's DEL after two: {log}"
    );

    // DEL of an attachment nobody made.
    let (ok, json, err) = ctrd.plugin("DEL", "1.0.0", "never-added", "", serde_json::json!({}));
    assert!(ok, "DEL of an unknown ID: {json} {err}");

    // CHECK: passes, then fails once the host end is deleted by hand; the dataplane lets
    // go of the vanished interface.
    let b_id = ctrd.cni_id("b");
    let netns = format!("/proc/{}/ns/net", ctrd.pid("b").unwrap());
    let prev = serde_json::json!({"prevResult": ctrd.cni_result("b").unwrap()});
    let (ok, json, err) = ctrd.plugin("CHECK", "1.0.0", &b_id, &netns, prev.clone());
    assert!(ok, "CHECK of an intact attachment: {json} {err}");
    let (b_veth, _) = ctrd
        .host_veths()
        .into_iter()
        .find(|(_, o)| *o == b_id)
        .expect("b's host veth");
    let xsk_before = xsk_sockets(&a.lab().node_ns());
    let del = Command::new("ip")
        .args(["-n", &a.lab().node_ns(), "link", "del", &b_veth])
        .status()
        .unwrap();
    assert!(del.success());
    let (ok, json, _) = ctrd.plugin("CHECK", "1.0.0", &b_id, &netns, prev);
    assert!(
        !ok && json["code"] == 103,
        "CHECK after `ip link del`: {json}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while xsk_sockets(&a.lab().node_ns()) >= xsk_before {
        assert!(
            Instant::now() < deadline,
            "the dataplane kept its AF_XDP socket on b's deleted interface"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // GC with a list that leaves g out: g's attachment goes, b's (listed) stays recorded.
    let g_id = ctrd.cni_id("g");
    let valid =
        serde_json::json!({"cni.dev/valid-attachments": [{"containerID": b_id, "ifname": "eth0"}]});
    let (ok, json, err) = ctrd.plugin("GC", "1.1.0", "", "", valid);
    assert!(ok, "GC: {json} {err}");
    assert!(
        !ctrd.host_veths().iter().any(|(_, o)| *o == g_id),
        "GC left g's veth"
    );
    assert!(!ctrd.leases().contains(&ips[2]), "GC left g's lease");
    assert!(
        ctrd.leases().contains(&ips[1]),
        "GC released b's lease, which was listed"
    );

    for c in &mut containers[1..] {
        let log = ctrd.stop(c);
        assert!(
            !log.contains("failed (delete)"),
            "{}: DEL failed:\n{log}",
            c.id
        );
    }
    assert_only_left(&a, &ctrd, &[], &ips.iter().copied().collect(), xsk_empty);
}

/// Starts a new dataplane on `node` (the old one is gone) and control with it; waits until
/// it is programmed.
fn restart_dataplane(node: &mut Running) {
    let lab = node.lab();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(lab.state_dir().join("dataplane.log"))
        .unwrap();
    let dp = Proc(
        lab.dataplane_command(&common::bin("kxdp-dataplane"), 1, &node.socket)
            .args(SHARED_CORES)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The old process is reaped already: its PID may be anyone's now, so its `Proc` must
    // not end it again on drop.
    std::mem::forget(std::mem::replace(&mut node.dataplane, dp));
    node.start_control();
    let deadline = Instant::now() + Duration::from_secs(15);
    while common::generation(&node.socket).unwrap_or(0) == 0 {
        if Instant::now() > deadline {
            node.dump_logs();
            panic!("the new dataplane was not programmed within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
