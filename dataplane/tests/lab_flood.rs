//! Floods and a full connection table (issue 10), through AF_XDP in the lab: with the
//! dataplane's table at 1024 connections, a flood of TCP SYNs from random sources to a
//! NodePort fills it; established connections keep flowing to their end, the flood's
//! unanswered SYNs make room for each other and for a real new connection (issue 16 item
//! 8: `conntrack_early_drop`, where before they were refused as `drop_conntrack_full` and
//! so was the real one), and the table never holds more than its capacity. Floods of later IPv4 fragments and of malformed frames are dropped and
//! counted. Needs root; skips with a message otherwise.

mod common;

use std::process::{Command, Stdio};

use common::Running;
use lab::Lab;

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w[name].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_syn_flood_fills_the_table_without_hurting_established_connections() {
    let Some(node) = Running::start_args(
        "a_syn_flood_fills_the_table_without_hurting_established_connections",
        "flood",
        1,
        &["--conntrack-capacity", "1024"],
    ) else {
        return;
    };
    let lab = node.lab();
    let outside = lab.outside_ns();
    let client = node.ns("default/client");
    let link = Command::new("ip")
        .args(["-n", &lab.node_ns(), "-br", "link", "show", lab.uplink_if()])
        .output()
        .unwrap();
    let mac = String::from_utf8_lossy(&link.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let capacity = node.stats()["conntrack"]["capacity"].as_u64().unwrap();

    // Established connections first, held through the flood.
    let held = {
        let ns = client.clone();
        let bin = common::bin("kxdp-lab");
        std::thread::spawn(move || {
            Lab::exec(&ns, &bin.to_string_lossy())
                .args(["hold", "--to", "172.30.0.41:80", "--connections", "5"])
                .args(["--millis", "6000", "--interval-ms", "20"])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(700));

    let flood = |kind: &str, count: &str, to: &str| {
        let out = Lab::exec(&outside, &common::bin("kxdp-lab").to_string_lossy())
            .args(["flood", "--dst-mac", &mac, "--to", to])
            .args(["--kind", kind, "--count", count, "--seconds", "4"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    flood("syn", "5000", "192.168.0.2:30080");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = node.stats();
    let entries = s["conntrack"]["entries"].as_u64().unwrap();
    assert!(
        entries <= capacity,
        "{entries} entries in a table of {capacity}"
    );
    let early = counter(&s, "conntrack_early_drop");
    eprintln!("after syn flood: rx {} kernel_rx_dropped {} ring_full {} fill_empty {} early_drop {early} full {} nat_new {}", counter(&s, "rx"), counter(&s, "kernel_rx_dropped"), counter(&s, "kernel_rx_ring_full"), counter(&s, "kernel_fill_empty"), counter(&s, "drop_conntrack_full"), counter(&s, "nat_new"));
    assert!(early > 0, "the flood's SYNs made room for each other: {s}");

    // A new connection now takes an unanswered SYN's place.
    let got = node.call(&client, "172.30.0.41:80", "tcp", "1");
    assert!(
        !common::answers(&got)[0].0.starts_with("error"),
        "a new flow into a table full of a flood's SYNs: {got:?}"
    );
    assert!(counter(&node.stats(), "conntrack_early_drop") > early);

    // Later fragments and malformed headers to a Service address (the uplink's filter
    // sends those to kxdp; to the node's own address they would be the kernel's).
    let before = node.stats();
    flood("fragments", "3000", "172.30.0.41:80");
    flood("garbage", "3000", "172.30.0.41:80");
    // Wait until the worker has handled everything that arrived (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (s, arrived, fragments, malformed) = loop {
        let s = node.stats();
        let lost = |s: &serde_json::Value| {
            counter(s, "kernel_rx_dropped") + counter(s, "kernel_rx_ring_full")
        };
        let arrived = 6000 - (lost(&s) - lost(&before));
        let fragments = counter(&s, "drop_fragment");
        let malformed = [
            "drop_bad_ip_header",
            "drop_bad_ip_checksum",
            "drop_truncated",
        ]
        .iter()
        .map(|c| counter(&s, c) - counter(&before, c))
        .sum::<u64>();
        if fragments + malformed >= arrived || std::time::Instant::now() > deadline {
            break (s, arrived, fragments, malformed);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(fragments > 0 && malformed > 0, "{s}");
    assert_eq!(
        fragments + malformed,
        arrived,
        "every frame that arrived was counted: {s}"
    );

    let held = held.join().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&held.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        assert!(
            l.get("error").is_none(),
            "an established connection broke: {l}"
        );
        assert!(l["bytes"].as_u64().unwrap() >= 64 * 100, "{l}");
    }
    eprintln!(
        "flood: table {entries}/{capacity}, {} entries evicted for new flows; established connections' longest echo wait {:.0} ms",
        counter(&node.stats(), "conntrack_early_drop"),
        lines
            .iter()
            .map(|l| l["max_gap_ms"].as_f64().unwrap())
            .fold(0.0, f64::max)
    );
}
