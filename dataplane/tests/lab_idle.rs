//! Adaptive polling through AF_XDP (issue 20): a worker with nothing to do sleeps — its
//! thread uses next to no CPU, as `/proc/PID/task/TID/stat` counts it — and the next
//! packet wakes it: connections to ClusterIPs (TCP, UDP) and a NodePort are answered
//! after every quiet spell. The worker runs in SCHED_FIFO (`--worker-priority`), the
//! class meant for sleeping workers. (Pod interfaces attached while workers sleep are the CNI
//! tests', which run in the default adaptive mode.) With `--measure-ring-wait` every frame
//! comes stamped and is timed, and the traffic is the same; so it is with the kernel's
//! preferred busy polling (`--busy-poll-budget`), which the dataplane says veth cannot use. Not a timing check: a busy-polling worker uses its whole core, a sleeping one a few ticks;
//! the measured figures are the benchmark's (`kxdp-bench idle`). Needs root; skips with a
//! message otherwise.

mod common;

use std::time::Duration;

use common::{answers, Running};

const WEB: [&str; 3] = ["default/web-1", "default/web-2", "default/web-3"];
const DNS: [&str; 3] = ["default/dns-1", "default/dns-2", "default/dns-3"];

/// `/proc` times are in these ticks per second (`USER_HZ`).
const TICKS: f64 = 100.0;

/// The thread of process `pid` named `name`.
fn thread(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// Field `n` (numbered from 1 as `proc(5)` does) of thread `tid`'s stat, `n` > 2.
fn stat_field(pid: u32, tid: u32, n: usize) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // After the command (field 2, in parentheses, which may hold spaces) come fields 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

/// User plus system ticks of thread `tid` of `pid` (stat fields 14 and 15).
fn ticks(pid: u32, tid: u32) -> u64 {
    stat_field(pid, tid, 14) + stat_field(pid, tid, 15)
}

/// The share of a core worker `tid` used over `span`.
fn cpu_share(pid: u32, tid: u32, span: Duration) -> f64 {
    let before = ticks(pid, tid);
    std::thread::sleep(span);
    (ticks(pid, tid) - before) as f64 / TICKS / span.as_secs_f64()
}

/// Connections to a ClusterIP over TCP and UDP from a pod and to a NodePort from outside,
/// six each: every one answered, by one of the Service's endpoints.
fn every_call_answered(node: &Running, when: &str) {
    let client = node.ns("default/client");
    let outside = node.ns("outside");
    for (ns, to, proto, endpoints) in [
        (&client, "172.30.0.41:80", "tcp", &WEB[..]),
        (&client, "172.30.0.10:53", "udp", &DNS[..]),
        (&outside, "192.168.0.2:30080", "tcp", &WEB[..]),
    ] {
        let got = answers(&node.call(ns, to, proto, "6"));
        assert_eq!(got.len(), 6, "{when}: {to} {proto}: {got:?}");
        for (who, _) in &got {
            assert!(
                endpoints.contains(&who.as_str()),
                "{when}: {to} {proto} answered by {who}"
            );
        }
    }
}

/// Worker 0's counter `name`, from `kxdp stats -o json`.
fn counter(node: &Running, name: &str) -> u64 {
    let v = node.stats();
    assert_eq!(v["poll_mode"], "adaptive", "{v}");
    v["workers"][0][name].as_u64().unwrap()
}

#[test]
fn an_idle_adaptive_worker_sleeps_and_the_next_packet_wakes_it() {
    let Some(node) = Running::start_args(
        "an_idle_adaptive_worker_sleeps_and_the_next_packet_wakes_it",
        "idle",
        1,
        &["--poll-mode", "adaptive", "--worker-priority", "10"],
    ) else {
        return;
    };
    let pid = node.dataplane.0.id();
    let worker = thread(pid, "kxdp-worker-0").expect("the worker thread");
    assert_eq!(
        (stat_field(pid, worker, 40), stat_field(pid, worker, 41)),
        (10, 1),
        "the worker's rt_priority and policy (SCHED_FIFO)"
    );
    for round in 0..3 {
        // Quiet: the lab's own chatter (ARP refreshes) is rare.
        let share = cpu_share(pid, worker, Duration::from_secs(3));
        let slept = counter(&node, "sleeps");
        eprintln!(
            "round {round}: the idle worker used {:.2}% of a core",
            share * 100.0
        );
        if share > 0.05 || slept == 0 {
            node.dump_logs();
        }
        assert!(
            share <= 0.05,
            "round {round}: the idle worker used {:.1}% of a core",
            share * 100.0
        );
        assert!(slept > 0, "round {round}: the worker never slept");
        // Woken by the first packet: every connection answered, by an endpoint.
        every_call_answered(&node, &format!("round {round}"));
    }
    assert!(counter(&node, "asleep_ns") > counter(&node, "awake_ns"));
}

#[test]
fn with_ring_waits_measured_every_frame_is_timed_and_the_traffic_is_unchanged() {
    let Some(node) = Running::start_args(
        "with_ring_waits_measured_every_frame_is_timed_and_the_traffic_is_unchanged",
        "stamp",
        1,
        &["--measure-ring-wait"],
    ) else {
        return;
    };
    every_call_answered(&node, "measured");
    let (rx, timed) = (counter(&node, "rx"), counter(&node, "rx_wait_timed"));
    eprintln!(
        "{rx} frames received, {timed} timed, {} ns waited, {} over 10 µs",
        counter(&node, "rx_wait_ns"),
        counter(&node, "rx_waited_over_10us")
    );
    assert!(rx >= 36, "every call's frames: {rx}");
    assert_eq!(timed, rx, "every frame received came stamped");
    assert!(counter(&node, "rx_waited_over_10us") <= timed);
}

#[test]
fn with_preferred_busy_polling_the_traffic_is_unchanged_and_every_port_is_accounted_for() {
    let Some(node) = Running::start_args(
        "with_preferred_busy_polling_the_traffic_is_unchanged_and_every_port_is_accounted_for",
        "bpoll",
        1,
        &["--poll-mode", "busy", "--busy-poll-budget", "64"],
    ) else {
        return;
    };
    every_call_answered(&node, "busy-polled");
    let v = node.stats();
    let busy_polls = v["workers"][0]["dev_busy_polls"].as_u64().unwrap();
    assert!(
        busy_polls > 0,
        "a polling worker's empty polls busy-poll: {v}"
    );
    // Each port is named once: busy-polled by NAPI id, or said to gain nothing (veth).
    let log = std::fs::read_to_string(node.lab().state_dir().join("dataplane.log")).unwrap();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("preferred busy polling, budget 64")
                || l.contains("busy polling does nothing on")
        })
        .collect();
    eprintln!("{}", said.join("\n"));
    if said.is_empty() || log.contains("busy polling refused") {
        node.dump_logs();
    }
    assert!(
        !said.is_empty(),
        "the dataplane says what busy polling does"
    );
    assert!(!log.contains("busy polling refused"));
}
