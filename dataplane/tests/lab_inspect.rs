//! The inspection commands against a running lab (issue 10): `kxdp services`, `kxdp
//! conntrack` (filters, counts) and `kxdp stats`, as tables and as JSON. Needs root; skips
//! with a message otherwise.

mod common;

use std::process::{Command, Stdio};

use common::Running;
use lab::Lab;

fn kxdp(node: &Running, args: &[&str]) -> String {
    let out = Command::new(common::bin("kxdp"))
        .args(args)
        .args(["--socket", &node.socket.to_string_lossy()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kxdp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json(node: &Running, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let text = kxdp(node, &a);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kxdp {args:?}: {e}: {text}"))
}

#[test]
fn inspection_commands_against_a_running_lab() {
    let Some(node) = Running::start("inspection_commands_against_a_running_lab", "insp", 1) else {
        return;
    };
    let client = node.ns("default/client");
    // A connection held open through the web ClusterIP while we look, and some UDP.
    let held = {
        let ns = client.clone();
        let bin = common::bin("kxdp-lab");
        std::thread::spawn(move || {
            Lab::exec(&ns, &bin.to_string_lossy())
                .args(["hold", "--to", "172.30.0.41:80", "--millis", "3000"])
                .output()
                .unwrap()
        })
    };
    node.call(&client, "172.30.0.10:53", "udp", "3");
    std::thread::sleep(std::time::Duration::from_millis(500));

    // services: every port with its endpoints' states and Maglev shares.
    let services = json(&node, &["services"]);
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default/web:http")
        .unwrap_or_else(|| panic!("no default/web:http in {services}"));
    assert!(web["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "ClusterIp 172.30.0.41:80"));
    let backends = web["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 4, "{web}");
    let not_ready = backends
        .iter()
        .find(|b| b["endpoint"] == "10.244.1.8:8080")
        .unwrap();
    assert_eq!(not_ready["state"], "not serving");
    assert_eq!(not_ready["cluster_share"], 0.0);
    let share: f64 = backends
        .iter()
        .map(|b| b["cluster_share"].as_f64().unwrap())
        .sum();
    assert!(
        (share - 1.0).abs() < 1e-9,
        "shares add up to the ring: {share}"
    );
    for b in backends.iter().filter(|b| b["state"] == "serving") {
        let s = b["cluster_share"].as_f64().unwrap();
        assert!((0.25..0.42).contains(&s), "Maglev share of {b}");
        assert_eq!(b["weight"], 1);
    }
    let table = kxdp(&node, &["services"]);
    assert!(table.contains("default/web:http TCP"), "{table}");
    assert!(table.contains("ClusterIp 172.30.0.41:80"), "{table}");

    // conntrack: the held connection, translated, established, filtered by address.
    let ct = json(
        &node,
        &["conntrack", "--addr", "10.244.1.2", "--proto", "tcp"],
    );
    let entries = ct["entries"].as_array().unwrap();
    let web_conn = entries
        .iter()
        .find(|e| e["service"] == "default/web:http")
        .unwrap_or_else(|| panic!("the held connection is not listed: {ct}"));
    assert_eq!(web_conn["nat"], "dnat", "{web_conn}");
    assert_eq!(web_conn["state"], "Established", "{web_conn}");
    assert_eq!(web_conn["policy"], "not isolated", "{web_conn}");
    assert!(web_conn["original"]
        .as_str()
        .unwrap()
        .ends_with("-> 172.30.0.41:80"));
    assert!(
        web_conn["expires_in_s"].as_u64().unwrap() > 3600,
        "{web_conn}"
    );
    let total = ct["total"].as_u64().unwrap();
    assert!(ct["matched"].as_u64().unwrap() >= 1 && total >= ct["matched"].as_u64().unwrap());
    // The UDP flows to dns, by port; none by an address nobody uses.
    let udp = json(&node, &["conntrack", "--port", "53", "--proto", "udp"]);
    assert!(udp["matched"].as_u64().unwrap() >= 1, "{udp}");
    let none = json(&node, &["conntrack", "--addr", "10.9.9.9"]);
    assert_eq!(none["matched"], 0);
    assert_eq!(none["entries"].as_array().unwrap().len(), 0);
    let counted = kxdp(&node, &["conntrack", "--count"]);
    assert!(counted.trim().ends_with("connections match"), "{counted}");
    assert_eq!(
        counted.lines().count(),
        1,
        "--count prints only the counts: {counted}"
    );

    // stats as JSON.
    let stats = json(&node, &["stats"]);
    assert_eq!(stats["conntrack"]["capacity"], 1 << 20);
    assert!(stats["conntrack"]["entries"].as_u64().unwrap() >= 1);
    assert!(stats["workers"][0]["rx"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["generation"].as_u64().unwrap() >= 1);

    // monitor: new translated connections and drops, as JSON lines, from a reader that
    // watches while traffic flows; a second reader meanwhile is refused.
    let watcher = Command::new(common::bin("kxdp"))
        .args(["monitor", "-o", "json", "--seconds", "3"])
        .args(["--socket", &node.socket.to_string_lossy()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let second = Command::new(common::bin("kxdp"))
        .args(["monitor", "--seconds", "1"])
        .args(["--socket", &node.socket.to_string_lossy()])
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second monitor is refused");
    assert!(String::from_utf8_lossy(&second.stderr).contains("one at a time"));
    node.call(&client, "172.30.0.41:80", "tcp", "3");
    let _ = node.call(&client, "172.30.0.200:80", "tcp", "1");
    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let translated: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "Translated" && e["dst"][0] == "172.30.0.41")
        .collect();
    assert_eq!(translated.len(), 3, "{events:?}");
    for e in &translated {
        let to = e["to"][0].as_str().unwrap();
        assert!(
            ["10.244.1.5", "10.244.1.6", "10.244.1.7"].contains(&to),
            "{e}"
        );
        assert_eq!(e["to"][1], 8080);
        assert_eq!(e["src"][0], "10.244.1.2");
    }
    assert!(
        events.iter().any(|e| e["kind"] == "Drop"
            && e["reason"] == "no_service"
            && e["dst"][0] == "172.30.0.200"),
        "the drop to an address no Service holds: {events:?}"
    );

    let held = held.join().unwrap();
    let line = String::from_utf8_lossy(&held.stdout);
    assert!(!line.contains("error"), "held connection: {line}");
}
