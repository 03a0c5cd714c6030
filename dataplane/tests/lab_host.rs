//! The whole node (issue 9) through AF_XDP: the node's own TCP server (standing in for
//! SSH) stays reachable from outside while kxdp runs and after `kill -9` of the dataplane;
//! a host process reaches a ClusterIP and a local pod through the host veth pair; a pod
//! reaches a server outside the cluster, which sees the node's address; ping and
//! traceroute from a pod through the node give the right answers. Needs root; skips with a
//! message otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{answers, Proc, Running};
use lab::Lab;

/// `kxdp-lab call` from `ns` to `to`, and whether every call was answered by `who` (seeing
/// `peer`, when given).
fn answered(node: &Running, ns: &str, to: &str, proto: &str, who: &str, peer: Option<&str>) {
    let got = node.call(ns, to, proto, "3");
    for (w, p) in answers(&got) {
        if w != who || peer.is_some_and(|want| want != p) {
            node.dump_logs();
            panic!("{proto} from {ns} to {to}: answered by {w} seeing {p}, want {who} seeing {peer:?}: {got:?}");
        }
    }
}

/// Six TCP calls from `ns` to `to`, every one answered by a web pod (seeing `peer`, when
/// given).
fn answered_by_web(node: &Running, ns: &str, to: &str, peer: Option<&str>) {
    let got = node.call(ns, to, "tcp", "6");
    let seen = answers(&got);
    let right = |(w, p): &(String, String)| {
        w.starts_with("default/web-") && peer.is_none_or(|want| want == p)
    };
    if seen.len() != 6 || !seen.iter().all(right) {
        node.dump_logs();
        panic!("{ns} to {to}: want six answers from web pods seeing {peer:?}: {got:?}");
    }
}

/// `ping` from `ns` (`-6` in `family` for IPv6) succeeds.
fn pings(ns: &str, family: &[&str], to: &str) {
    let out = run_in(
        ns,
        "ping",
        &[family, &["-c", "2", "-i", "0.2", "-W", "2", to]].concat(),
    );
    assert!(
        out.status.success(),
        "ping {family:?} {to}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The first two hops `traceroute` (UDP probes) from `ns` finds towards `to`.
fn first_hops(ns: &str, family: &[&str], to: &str) -> (Vec<String>, String) {
    let args = [family, &["-n", "-q", "1", "-w", "2", "-m", "3", to]].concat();
    let out = run_in(ns, "traceroute", &args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let hops = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(2)
        .map(str::to_string)
        .collect();
    (hops, text)
}

fn run_in(ns: &str, program: &str, args: &[&str]) -> std::process::Output {
    Lab::exec(ns, program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

#[test]
fn the_whole_node_host_traffic_pods_outside_ping_and_traceroute() {
    let Some(mut node) = Running::start(
        "the_whole_node_host_traffic_pods_outside_ping_and_traceroute",
        "host",
        1,
    ) else {
        return;
    };
    let lab_node = node.lab().node_ns();
    let outside = node.lab().outside_ns();
    let client = node.ns("default/client");
    let kxdp_lab = common::bin("kxdp-lab").to_string_lossy().to_string();

    // The node's own server (SSH's stand-in) on its address, and a server outside.
    let _ssh = Proc(
        Lab::exec(&lab_node, &kxdp_lab)
            .args(["echo", "--name", "node-sshd", "--ports", "2222"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _far = Proc(
        Lab::exec(&outside, &kxdp_lab)
            .args(["echo", "--name", "far-server", "--ports", "9000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));

    // While kxdp runs: outside → the node's own server, over TCP (the uplink's XDP
    // filter passes it, and the kernel's ARP, to the kernel).
    answered(
        &node,
        &outside,
        "192.168.0.2:2222",
        "tcp",
        "node-sshd",
        Some("192.168.0.1"),
    );
    // A host process reaches a ClusterIP and a local pod (through kxhost ↔ kxdp).
    answered(
        &node,
        &lab_node,
        "10.244.1.5:8080",
        "tcp",
        "default/web-1",
        Some("192.168.0.2"),
    );
    answered_by_web(&node, &lab_node, "172.30.0.41:80", None);
    // A host process reaches a NodePort on the node's own address (the kernel would
    // deliver it locally: kxdp's host redirect on lo hands it over), under both external
    // traffic policies; the node's own traffic is masqueraded, as kube-proxy does.
    for np in ["192.168.0.2:30080", "192.168.0.2:30081"] {
        answered_by_web(&node, &lab_node, np, Some("10.244.1.1"));
    }
    // A pod reaches the outside server, which sees the node's address.
    answered(
        &node,
        &client,
        "192.168.0.1:9000",
        "tcp",
        "far-server",
        Some("192.168.0.2"),
    );
    answered(
        &node,
        &client,
        "192.168.0.1:9000",
        "udp",
        "far-server",
        Some("192.168.0.2"),
    );
    // And reaches the node's own server (pods reach the node's addresses).
    answered(
        &node,
        &client,
        "192.168.0.2:2222",
        "tcp",
        "node-sshd",
        Some("10.244.1.2"),
    );

    // The same over IPv6: the node's next hop on the uplink is resolved by neighbour
    // discovery from kxdp's own link-local address, under the uplink's filter.
    answered(
        &node,
        &client,
        "[fd00:192:168::1]:9000",
        "tcp",
        "far-server",
        Some("fd00:192:168::2"),
    );
    answered(
        &node,
        &client,
        "[fd00:192:168::1]:9000",
        "udp",
        "far-server",
        Some("fd00:192:168::2"),
    );
    answered(
        &node,
        &outside,
        "[fd00:192:168::2]:2222",
        "tcp",
        "node-sshd",
        Some("fd00:192:168::1"),
    );
    answered(
        &node,
        &lab_node,
        "[fd00:10:244:1::5]:8080",
        "tcp",
        "default/web-1",
        Some("fd00:192:168::2"),
    );
    // kxdp asked for the outside host from its own link-local address (the kernel's
    // neighbour entries are its own business), and the answer came back to it.
    let neigh = run_in(&outside, "ip", &["-6", "neigh", "show", "dev", "eth0"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains("fe80::6b78:6470:"),
        "outside's neighbours:\n{neigh}"
    );
    // The NodePort on the node's IPv6 address, from outside and from the host (through
    // the host redirect on lo); externalTrafficPolicy Cluster masquerades both to the
    // pods' IPv6 gateway.
    for from in [&outside, &lab_node] {
        answered_by_web(
            &node,
            from,
            "[fd00:192:168::2]:30080",
            Some("fd00:10:244:1::1"),
        );
    }
    answered_by_web(&node, &lab_node, "[fd00:172:30::41]:80", None);
    for to in ["fd00:10:244:1::1", "fd00:192:168::1"] {
        pings(&client, &["-6"], to);
    }
    let (hops, text) = first_hops(&client, &["-6"], "fd00:192:168::1");
    assert_eq!(
        hops,
        ["fd00:10:244:1::1", "fd00:192:168::1"],
        "traceroute -6:\n{text}"
    );

    // ping: the pods' gateway, and the outside host through the masquerade.
    for to in ["10.244.1.1", "192.168.0.1"] {
        pings(&client, &[], to);
    }
    // TTL 1 towards the outside: "time to live exceeded" from the gateway.
    let out = run_in(
        &client,
        "ping",
        &["-c", "1", "-W", "2", "-t", "1", "192.168.0.1"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 10.244.1.1") && text.to_lowercase().contains("time to live exceeded"),
        "ping -t 1: {text}"
    );
    // traceroute (UDP probes): hop 1 is the node (the pods' gateway), hop 2 the server.
    let (hops, text) = first_hops(&client, &[], "192.168.0.1");
    assert_eq!(hops, ["10.244.1.1", "192.168.0.1"], "traceroute:\n{text}");

    // kill -9: the dataplane's XDP program goes with its process, the interface is the
    // kernel's again, and the node's server answers as before. So does the host redirect
    // on lo and the uplink: its tcx links (ids from the dataplane's log) are gone.
    let log = std::fs::read_to_string(node.lab().state_dir().join("dataplane.log")).unwrap();
    let tc_links: Vec<String> = log
        .lines()
        .filter(|l| l.contains("host redirect") && l.contains("by link "))
        .filter_map(|l| l.split("by link ").nth(1)?.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_eq!(tc_links.len(), 2, "lo and the uplink: {log}");
    for id in &tc_links {
        let show = run_in(&lab_node, "bpftool", &["link", "show", "id", id]);
        assert!(show.status.success(), "link {id}: {show:?}");
    }
    let pid = node.dataplane.0.id();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = node.dataplane.0.wait();
    node.control = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let link = run_in(&lab_node, "ip", &["link", "show", "dev", "kxup0"]);
        let text = String::from_utf8_lossy(&link.stdout).to_string();
        if !text.contains("prog/xdp") && !text.contains(" xdp") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "XDP still attached after kill -9:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    answered(
        &node,
        &outside,
        "192.168.0.2:2222",
        "tcp",
        "node-sshd",
        Some("192.168.0.1"),
    );
    for id in &tc_links {
        let show = run_in(&lab_node, "bpftool", &["link", "show", "id", id]);
        assert!(
            !show.status.success(),
            "tcx link {id} outlived the dataplane: {show:?}"
        );
    }
}
