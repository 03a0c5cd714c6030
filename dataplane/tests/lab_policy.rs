//! NetworkPolicy through AF_XDP with real sockets (issue 5): default deny, an allowed peer
//! on one port and protocol, egress through a ClusterIP to its endpoints, replies of an
//! allowed connection into a pod isolated for ingress, an established connection kept when
//! a policy denies it later, the drop counters, and `kxdp policy explain`. Needs root;
//! skips with a message otherwise.

mod common;

use common::{answers, generation, manifests, Running};

/// Writes `yaml` as the lab manifest `name` and waits until the dataplane runs it.
fn apply(node: &Running, name: &str, yaml: &str) {
    let before = generation(&node.socket).unwrap();
    std::fs::write(manifests(node.lab()).join(name), yaml).unwrap();
    node.wait_generation_after(before);
}

/// Every call of `got` was answered by `who`.
fn answered_by(got: &[serde_json::Value], who: &str) -> bool {
    !got.is_empty() && answers(got).iter().all(|(w, _)| w == who)
}

/// No call of `got` was answered (the connection attempt timed out: dropped, not refused).
fn all_dropped(got: &[serde_json::Value]) -> bool {
    !got.is_empty()
        && answers(got)
            .iter()
            .all(|(w, _)| w.starts_with("error") && !w.contains("refused"))
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}---\n"
    )
}

#[test]
fn network_policy_through_af_xdp() {
    let Some(node) = Running::start("network_policy_through_af_xdp", "pol", 1) else {
        return;
    };
    let client = node.ns("default/client");
    let dns1 = node.ns("default/dns-1");
    let kxdp = common::bin("kxdp");
    let socket = node.socket.to_string_lossy().to_string();

    // Nothing isolated: everybody reaches web-1.
    assert!(answered_by(
        &node.call(&client, "10.244.1.5:8080", "tcp", "2"),
        "default/web-1"
    ));
    assert!(answered_by(
        &node.call(&dns1, "10.244.1.5:8080", "udp", "2"),
        "default/web-1"
    ));

    // A long-lived connection from dns-1 to web-1, established before any policy.
    let held = {
        let ns = dns1.clone();
        let bin = common::bin("kxdp-lab");
        std::thread::spawn(move || {
            let out = lab::Lab::exec(&ns, &bin.to_string_lossy())
                .args([
                    "hold",
                    "--to",
                    "10.244.1.5:8080",
                    "--millis",
                    "4000",
                    "--interval-ms",
                    "20",
                ])
                .output()
                .expect("run kxdp-lab hold");
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));

    // Default deny for the web pods: new connections to them are dropped, TCP and UDP,
    // directly and through their ClusterIP.
    apply(
        &node,
        "70-policy.yaml",
        &policy(
            "web-deny",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n",
        ),
    );
    assert!(all_dropped(&node.call(
        &client,
        "10.244.1.5:8080",
        "tcp",
        "1"
    )));
    assert!(all_dropped(&node.call(
        &client,
        "10.244.1.5:8080",
        "udp",
        "1"
    )));
    assert!(all_dropped(&node.call(
        &client,
        "172.30.0.41:80",
        "tcp",
        "1"
    )));
    // ... but the connection established before the policy keeps flowing to its end.
    let held = held.join().unwrap();
    let held: serde_json::Value = serde_json::from_str(held.trim()).expect("hold's JSON line");
    assert!(
        held.get("error").is_none(),
        "established connection cut by a later policy: {held}"
    );
    assert!(held["bytes"].as_u64().unwrap_or(0) > 0, "{held}");

    // Allow the client on TCP 8080 only (policies add up).
    let allow_client = policy(
        "web-from-client",
        "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080, protocol: TCP}]\n",
    );
    apply(
        &node,
        "70-policy.yaml",
        &[
            policy(
                "web-deny",
                "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n",
            ),
            allow_client.clone(),
        ]
        .concat(),
    );
    assert!(answered_by(
        &node.call(&client, "10.244.1.5:8080", "tcp", "3"),
        "default/web-1"
    ));
    let through_service = node.call(&client, "172.30.0.41:80", "tcp", "6");
    assert!(
        answers(&through_service)
            .iter()
            .all(|(w, _)| w.starts_with("default/web-")),
        "ingress judged after translation: {through_service:?}"
    );
    assert!(
        all_dropped(&node.call(&client, "10.244.1.5:8080", "udp", "1")),
        "UDP is not allowed"
    );
    assert!(
        all_dropped(&node.call(&dns1, "10.244.1.5:8080", "tcp", "1")),
        "dns-1 is not allowed"
    );

    // The client isolated both ways, allowed out only to the web pods on TCP 8080: its
    // connection through the web ClusterIP passes (egress judged on the translated
    // destination), the replies come back although nothing allows ingress into it, and
    // the dns ClusterIP is out of reach.
    apply(
        &node,
        "70-policy.yaml",
        &[
            policy("web-deny", "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n"),
            allow_client,
            policy(
                "client-out",
                "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress, Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 8080, protocol: TCP}]\n",
            ),
        ]
        .concat(),
    );
    let through_service = node.call(&client, "172.30.0.41:80", "tcp", "6");
    assert!(
        answers(&through_service)
            .iter()
            .all(|(w, _)| w.starts_with("default/web-")),
        "egress through the ClusterIP: {through_service:?}"
    );
    assert!(
        all_dropped(&node.call(&client, "172.30.0.10:53", "udp", "1")),
        "dns is not allowed out"
    );
    assert!(all_dropped(&node.call(
        &client,
        "10.244.1.11:5353",
        "tcp",
        "1"
    )));

    // The refusals are counted per pod and per policy.
    let stats = std::process::Command::new(&kxdp)
        .args(["stats", "--socket", &socket])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    for line in [
        "pod default/web-1 ingress",
        "policy default/web-deny",
        "pod default/client egress",
        "policy default/client-out",
        "policy_denied",
    ] {
        assert!(stats.contains(line), "stats lack {line:?}:\n{stats}");
    }

    // kxdp policy explain, as a table and as JSON.
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(&kxdp)
            .args(["policy", "explain"])
            .args(args)
            .args(["--socket", &socket])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let table = explain(&["10.244.1.11", "10.244.1.5", "8080"]);
    assert!(table.contains("DENIED"), "{table}");
    assert!(table.contains("no policy allows it"), "{table}");
    assert!(table.contains("default/web-deny"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&explain(&["10.244.1.2", "172.30.0.41", "80", "-o", "json"])).unwrap();
    let paths = json.as_array().expect("a list of paths");
    assert_eq!(paths.len(), 3, "one path per ready web endpoint: {json}");
    for p in paths {
        assert_eq!(p["allowed"], true, "{p}");
        assert_eq!(p["service"], "default/web:http", "{p}");
        assert_eq!(p["egress"]["pod"], "default/client", "{p}");
        assert_eq!(p["egress"]["allowed_by"], "default/client-out", "{p}");
        assert_eq!(p["ingress"]["allowed_by"], "default/web-from-client", "{p}");
        assert_eq!(p["ingress"]["verdict"], "allowed", "{p}");
    }
    let json: serde_json::Value = serde_json::from_str(&explain(&[
        "10.244.1.2",
        "172.30.0.10",
        "53",
        "--proto",
        "udp",
        "-o",
        "json",
    ]))
    .unwrap();
    for p in json.as_array().unwrap() {
        assert_eq!(p["allowed"], false, "{p}");
        assert_eq!(p["egress"]["verdict"], "denied", "{p}");
        assert_eq!(p["ingress"]["verdict"], "not isolated", "{p}");
    }
}
