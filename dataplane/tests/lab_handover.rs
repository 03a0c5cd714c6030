//! Upgrades without dropping connections (issue 10) and without a gap (issue 20): 50
//! established TCP connections through a ClusterIP stream data, and a UDP probe sends a
//! datagram every millisecond through another, while `kxdp-dataplane` is replaced by a
//! new process 10 times (`--takeover`, the rings handed over in place); every connection
//! completes with all its bytes, and the longest interval without a probe's answer is at
//! most 10 ms (in an optimized build: `scripts/test.sh` runs this test once more with
//! `--release`; a debug build's successor is several times slower to start forwarding,
//! and there the intervals are printed, not held to the bound). A successor of another handover version is refused and the running one
//! carries on. Then `kxdp-control` is killed and restarted 100 times under the same load:
//! nothing is lost. Needs root; skips with a message otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{generation, Proc, Running};
use lab::Lab;

/// `kxdp-lab hold` with `connections` connections through the web ClusterIP, in the
/// background; the JSON lines when joined.
fn hold(
    node: &Running,
    connections: usize,
    millis: u64,
) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
    let ns = node.ns("default/client");
    let bin = common::bin("kxdp-lab");
    std::thread::spawn(move || {
        let out = Lab::exec(&ns, &bin.to_string_lossy())
            .args(["hold", "--to", "172.30.0.41:80", "--interval-ms", "50"])
            .args(["--connections", &connections.to_string()])
            .args(["--millis", &millis.to_string()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    })
}

/// `kxdp-lab probe` at 1000 datagrams a second to the DNS ClusterIP for `millis`, in the
/// background; its JSON line when joined.
fn probe(node: &Running, millis: u64) -> std::thread::JoinHandle<serde_json::Value> {
    let ns = node.ns("default/client");
    let bin = common::bin("kxdp-lab");
    std::thread::spawn(move || {
        let out = Lab::exec(&ns, &bin.to_string_lossy())
            .args(["probe", "--to", "172.30.0.10:53", "--pps", "1000"])
            .args(["--millis", &millis.to_string()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
}

/// The longest interval without forwarding a handover may cause (issue 20), for the
/// binaries as they ship; a debug build is not held to it.
const GAP_BOUND_MS: f64 = if cfg!(debug_assertions) {
    f64::INFINITY
} else {
    10.0
};

/// Now, in Unix milliseconds (the probe's clock).
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

/// Every connection completed with at least `min_bytes`; returns the longest echo wait.
fn all_complete(lines: &[serde_json::Value], connections: usize, min_bytes: u64) -> f64 {
    assert_eq!(lines.len(), connections, "{lines:?}");
    let mut gap = 0.0f64;
    for l in lines {
        assert!(l.get("error").is_none(), "a connection broke: {l}");
        assert!(l["bytes"].as_u64().unwrap() >= min_bytes, "{l}");
        assert!(
            l["answer"].as_str().unwrap().starts_with("default/web-"),
            "{l}"
        );
        gap = gap.max(l["max_gap_ms"].as_f64().unwrap());
    }
    gap
}

#[test]
fn dataplane_replaced_ten_times_and_control_killed_a_hundred_times_under_load() {
    let Some(mut node) = Running::start(
        "dataplane_replaced_ten_times_and_control_killed_a_hundred_times_under_load",
        "hand",
        1,
    ) else {
        return;
    };
    let lab_log = node.lab().state_dir().join("dataplane.log");

    // A successor speaking another handover version is refused; the dataplane carries on.
    let refused = node
        .lab()
        .dataplane_command(&common::bin("kxdp-dataplane"), 1, &node.socket)
        .args(["--takeover", "--handover-version", "99"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("refused") && why.contains("keeps running"),
        "{why}"
    );
    assert!(
        generation(&node.socket).unwrap() >= 1,
        "the old dataplane still answers"
    );

    let held = hold(&node, 50, 14_000);
    let probed = probe(&node, 13_000);
    std::thread::sleep(Duration::from_secs(1));
    // Each handover's span in Unix milliseconds: from the successor's start to the old
    // process's exit.
    let mut spans = Vec::new();
    for round in 0..10 {
        let began = unix_ms();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&lab_log)
            .unwrap();
        let started = Instant::now();
        let next = node
            .lab()
            .dataplane_command(&common::bin("kxdp-dataplane"), 1, &node.socket)
            .arg("--takeover")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut old = std::mem::replace(&mut node.dataplane, Proc(next));
        // The old process hands over and exits by itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if old.0.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                node.dump_logs();
                panic!("round {round}: the old dataplane did not hand over within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::mem::forget(old);
        spans.push((began, unix_ms()));
        while generation(&node.socket).unwrap_or(0) == 0 {
            if Instant::now() > deadline {
                node.dump_logs();
                panic!("round {round}: the new dataplane does not answer");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "handover {round}: {:?} until the successor answered",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1000));
    }
    let lines = held.join().unwrap();
    // 14 s of 64-byte echoes every 50 ms: well over 100 each even with the gaps.
    let gap = all_complete(&lines, 50, 64 * 100);
    eprintln!(
        "dataplane replaced 10 times: 50 connections complete, longest echo wait {gap:.0} ms"
    );
    for line in std::fs::read_to_string(&lab_log)
        .unwrap_or_default()
        .lines()
    {
        if line.contains("took over")
            || line.contains("handed over")
            || line.contains("forwarding ")
        {
            eprintln!("{line}");
        }
    }
    let probed = probed.join().unwrap();
    let (sent, received) = (
        probed["sent"].as_u64().unwrap(),
        probed["received"].as_u64().unwrap(),
    );
    eprintln!(
        "UDP probe: {received} of {sent} answered, longest interval without an answer {:.1} ms",
        probed["max_gap_ms"].as_f64().unwrap()
    );
    assert!(received * 100 >= sent * 99, "probes lost: {probed}");
    // The longest interval without an answer that overlaps each handover (the probe
    // reports those over 3 ms; below that, 3 ms is the bound).
    let start = probed["start_unix_ms"].as_f64().unwrap();
    let gaps: Vec<(f64, f64)> = probed["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                start + g["at_ms"].as_f64().unwrap(),
                g["gap_ms"].as_f64().unwrap(),
            )
        })
        .collect();
    if cfg!(debug_assertions) {
        eprintln!("a debug build: the intervals are not held to 10 ms (the release run is)");
    }
    for (round, (began, ended)) in spans.iter().enumerate() {
        let longest = gaps
            .iter()
            .filter(|(at, gap)| at + gap >= *began && *at <= *ended)
            .map(|(_, gap)| *gap)
            .fold(3.0f64, f64::max);
        let inside: Vec<String> = gaps
            .iter()
            .filter(|(at, gap)| at + gap >= *began && *at <= *ended)
            .map(|(at, gap)| format!("{gap:.1} ms at +{:.0} ms", at - began))
            .collect();
        eprintln!(
            "handover {round} ({:.0} ms): longest interval without forwarding {longest:.1} ms {inside:?}",
            ended - began
        );
        assert!(
            longest <= GAP_BOUND_MS,
            "handover {round}: forwarding stopped for {longest:.1} ms: {probed}"
        );
    }
    // kxdp-control killed and restarted 100 times under load.
    let held = hold(&node, 50, 8_000);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..100 {
        node.start_control();
        std::thread::sleep(Duration::from_millis(40));
    }
    let lines = held.join().unwrap();
    let gap = all_complete(&lines, 50, 64 * 60);
    eprintln!("control killed 100 times: 50 connections complete, longest echo wait {gap:.0} ms");
    let stopped = Command::new("true").status().unwrap();
    assert!(stopped.success());
}
