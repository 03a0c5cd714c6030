//! Service semantics through AF_XDP with real sockets (issue 3): NodePort from outside with
//! both external traffic policies, hairpin, a Service without endpoints, a UDP flow whose
//! endpoint is deleted, and an IPv6 ClusterIP. Needs root; skips with a message otherwise.

mod common;

use std::time::{Duration, Instant};

use common::{answers, generation, manifests, who, Running};

const WEB: [&str; 3] = ["default/web-1", "default/web-2", "default/web-3"];

#[test]
fn services_through_af_xdp() {
    let Some(node) = Running::start("services_through_af_xdp", "svc", 1) else {
        return;
    };
    let outside = node.ns("outside");
    let client = node.ns("default/client");

    // NodePort, externalTrafficPolicy Cluster: every endpoint, source masqueraded to the node.
    let np = node.call(&outside, "192.168.0.2:30080", "tcp", "30");
    assert_eq!(who(&np), WEB, "NodePort eTP Cluster: {np:?}");
    for (w, peer) in answers(&np) {
        assert_ne!(
            peer, "192.168.0.1",
            "{w} saw the client's own address under eTP Cluster"
        );
    }
    // NodePort, externalTrafficPolicy Local: the backend sees the client's address.
    let np = node.call(&outside, "192.168.0.2:30081", "tcp", "30");
    assert_eq!(who(&np), WEB, "NodePort eTP Local: {np:?}");
    for (w, peer) in answers(&np) {
        assert_eq!(
            peer, "192.168.0.1",
            "{w} did not see the client's address under eTP Local"
        );
    }

    // Hairpin: web-1 reaching itself through its Service sees the node, not itself.
    let hp = node.call(&node.ns("default/web-1"), "172.30.0.45:80", "tcp", "5");
    for (w, peer) in answers(&hp) {
        assert_eq!(w, "default/web-1");
        assert_eq!(peer, "10.244.1.1", "hairpin connection not masqueraded");
    }

    // No endpoints: refused at once, TCP and UDP (ICMP port unreachable).
    let started = Instant::now();
    let rej = node.call(&client, "172.30.0.99:80", "tcp", "3");
    for (w, _) in answers(&rej) {
        assert!(
            w.contains("refused"),
            "TCP to a Service without endpoints: {w}"
        );
    }
    let rej = node.call(&client, "172.30.0.99:53", "udp", "3");
    for (w, _) in answers(&rej) {
        assert!(
            w.contains("refused"),
            "UDP to a Service without endpoints: {w}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "rejects were not immediate"
    );

    // IPv6 ClusterIP, source kept.
    let v6 = node.call(&client, "[fd00:172:30::41]:80", "tcp", "30");
    assert_eq!(who(&v6), WEB, "IPv6 ClusterIP: {v6:?}");
    for (_, peer) in answers(&v6) {
        assert_eq!(peer, "fd00:10:244:1::2");
    }

    // A UDP flow moves to a live endpoint when its endpoint is deleted: one socket asks
    // every 50 ms; after a few answers dns-1 is replaced by dns-2 in the Service's slice.
    let ns = client.clone();
    let kxdp_lab = common::bin("kxdp-lab");
    let session = std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&kxdp_lab)
            .args([
                "call",
                "--to",
                "172.30.0.20:53",
                "--proto",
                "udp",
                "--reuse",
                "--count",
                "60",
                "--interval-ms",
                "50",
                "--timeout-ms",
                "500",
            ])
            .output()
            .expect("run kxdp-lab call");
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::thread::sleep(Duration::from_millis(800));
    let slice = manifests(node.lab()).join("50-udp-move.yaml");
    let text = std::fs::read_to_string(&slice).unwrap();
    let before = generation(&node.socket).unwrap();
    std::fs::write(&slice, text.replace("10.244.1.11", "10.244.1.12")).unwrap();
    node.wait_generation_after(before);
    let lines: Vec<serde_json::Value> = session
        .join()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let order: Vec<String> = answers(&lines).into_iter().map(|a| a.0).collect();
    assert_eq!(
        order.first().map(String::as_str),
        Some("default/dns-1"),
        "{order:?}"
    );
    assert_eq!(
        order.last().map(String::as_str),
        Some("default/dns-2"),
        "the flow stayed on the deleted endpoint: {order:?}"
    );
    // Once moved it stays moved, and no datagram went unanswered (the client asks again
    // after 500 ms at most twice before giving up on one).
    let first_new = order.iter().position(|w| w == "default/dns-2").unwrap();
    assert!(
        order[first_new..].iter().all(|w| w == "default/dns-2"),
        "{order:?}"
    );
    assert!(order.iter().all(|w| !w.starts_with("error")), "{order:?}");
}
