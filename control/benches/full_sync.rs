//! A full sync at scale (issue 6's target: 10k Services and 100k endpoints in ≤ 1 s, with
//! control's memory stated): 10,000 ClusterIP Services with one EndpointSlice of 10 ready
//! endpoints each, as objects in control's store; then each step a full resync pays —
//! computing the tables, encoding them for the socket, decoding them in the dataplane,
//! and installing them (compiled lookup tables, Maglev rings sized by backend count as
//! with `--scaled-rings`). Prints wall times of the median of 3 runs and the resident
//! memory (VmRSS, VmHWM) after loading the objects and after computing.
//!
//! Then issue 6's other target, one EndpointSlice change visible in the dataplane at that
//! scale: 1,000 times, one slice of the 10,000 gets another endpoint (a watch event
//! applied to the store), control computes the tables again (incrementally), the stream
//! sends the delta over a real Unix socket to an in-process dataplane
//! (`dataplane::server::serve`), and the time until its `Applied` is recorded. Then issue
//! 21's larger change the same way: one Service's slice between 1,000 and 999 endpoints.
//!
//! `cargo bench -p control --bench full_sync` (`KXDP_BENCH_SERVICES=100000` for 100k)

use std::time::{Duration, Instant};

use control::objects::{apply_value, Objects};
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use nat::spec::ClusterSpec;
use nat::wire::{self, Message};
use serde_json::json;

/// Services installed: 10,000, or `KXDP_BENCH_SERVICES`.
fn services() -> u32 {
    std::env::var("KXDP_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const ENDPOINTS: u32 = 10;

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let pick = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
            .unwrap_or_default()
    };
    format!(
        "VmRSS {} MiB, VmHWM {} MiB",
        mib(&pick("VmRSS:")),
        mib(&pick("VmHWM:"))
    )
}

fn yaml(v: &serde_json::Value) -> serde_yaml::Value {
    serde_yaml::to_value(v).expect("JSON is YAML")
}

/// Service `s`'s EndpointSlice with `n` ready endpoints, the first on node-a when
/// `first_local`, the rest on node-b.
fn slice(s: u32, n: u32, first_local: bool) -> serde_yaml::Value {
    let name = format!("svc-{s}");
    let endpoints: Vec<_> = (0..n)
        .map(|e| {
            let k = s * ENDPOINTS + e;
            let node = if e == 0 && first_local {
                "node-a"
            } else {
                "node-b"
            };
            json!({"addresses": [format!("10.{}.{}.{}", 100 + k / 65536, (k / 256) % 256, k % 256)],
                   "conditions": {"ready": true}, "nodeName": node})
        })
        .collect();
    yaml(
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abc"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080}]}),
    )
}

fn mib(kib: &str) -> String {
    kib.parse::<u64>()
        .map(|k| (k / 1024).to_string())
        .unwrap_or_default()
}

/// The cluster's settings, with the Service range the bench's ClusterIPs are in (the
/// default range is the lab's 172.30.0.0/16, and a ClusterIP outside the range is not
/// programmed).
fn bench_cluster() -> ClusterSpec {
    ClusterSpec {
        service_cidrs: vec!["172.16.0.0/12".parse().expect("a prefix")],
        ..ClusterSpec::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let before = rss();
    let mut objects = Objects::default();
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}});
    apply_value(&mut objects, &yaml(&node), "bench").unwrap();
    let started = Instant::now();
    let services = services();
    for s in 0..services {
        let name = format!("svc-{s}");
        // 172.16.0.1 on: room for a million Services in 172.16.0.0/12.
        let ip = std::net::Ipv4Addr::from(0xac10_0001 + s).to_string();
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
        apply_value(&mut objects, &yaml(&svc), "bench").unwrap();
        apply_value(&mut objects, &slice(s, ENDPOINTS, true), "bench").unwrap();
    }
    let load = started.elapsed();
    let loaded = rss();

    let cluster = bench_cluster();
    let shared = Shared::new(
        vec![PortConfig {
            name: "up".into(),
            role: PortRole::Uplink,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        }],
        1,
        Limits {
            ring_scaled: true,
            ..Limits::default()
        },
    );
    let (mut compute, mut encode, mut decode, mut install) = (vec![], vec![], vec![], vec![]);
    let mut bytes = 0;
    let mut computed_rss = String::new();
    for generation in 1..=3 {
        let t = Instant::now();
        let tables = control::compute_with_warnings(&objects, "node-a", &cluster)
            .unwrap()
            .tables;
        compute.push(t.elapsed());
        computed_rss = rss();
        assert_eq!(tables.services.len(), services as usize);
        let t = Instant::now();
        let frame = wire::encode(&Message::Snapshot {
            generation,
            tables: Box::new(tables),
        });
        encode.push(t.elapsed());
        bytes = frame.len();
        let t = Instant::now();
        let Message::Snapshot { tables, .. } = wire::read_message(&mut frame.as_slice()).unwrap()
        else {
            panic!("not a snapshot")
        };
        decode.push(t.elapsed());
        let t = Instant::now();
        shared.install(generation, *tables, 0);
        install.push(t.elapsed());
    }
    let (c, e, d, i) = (
        median(compute),
        median(encode),
        median(decode),
        median(install),
    );
    println!(
        "full sync of {services} Services x {ENDPOINTS} endpoints ({} endpoints), median of 3:",
        services * ENDPOINTS
    );
    println!("  objects loaded into control's store in {load:?} (once)");
    println!("  compute tables   {c:?}");
    println!(
        "  encode for the socket {e:?} ({:.1} MiB)",
        bytes as f64 / (1 << 20) as f64
    );
    println!("  decode in the dataplane {d:?}");
    println!("  install (compile + swap) {i:?}");
    println!("  total {:?}", c + e + d + i);
    println!("memory: at start {before}; objects loaded {loaded}; after computing {computed_rss}");
    one_change_at_scale(&mut objects, shared);
}

const CHANGES: u32 = 1_000;
/// Changes of the one large Service, and its endpoints (issue 21: ≤ 20 ms at 100k).
const BIG_CHANGES: u32 = 100;
const BIG_ENDPOINTS: u32 = 1_000;

/// One EndpointSlice change at a time, through the incremental computation and a delta
/// on the socket, until the dataplane applied it.
fn one_change_at_scale(objects: &mut Objects, shared: Shared) {
    let shared = std::sync::Arc::new(shared);
    let path =
        std::env::temp_dir().join(format!("kxdp-bench-full-sync-{}.sock", std::process::id()));
    dataplane::server::serve(&path, shared.clone(), Instant::now()).expect("control socket");
    let cluster = bench_cluster();
    let mut computer = control::tables::TableComputer::new("node-a", cluster);
    let mut stream = control::Stream::new(&path);
    let t = Instant::now();
    let first = computer.compute(objects).unwrap().tables;
    stream.send(100, &first, None).expect("snapshot applied");
    println!(
        "one change at scale: first snapshot over the socket applied in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(computer.compute(objects).unwrap());
    }
    println!(
        "one change at scale: a computation with nothing changed takes {:?}",
        t.elapsed() / 100
    );
    let mut total = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut apply = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut compute = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut bytes = 0;
    for c in 0..CHANGES {
        // A slice with one or two endpoints more than before, all on node-b.
        let value = slice((c * 7919) % services(), ENDPOINTS + 1 + c % 2, false);
        let started = Instant::now();
        apply_value(objects, &value, "bench").unwrap();
        let tables = computer.compute(objects).unwrap().tables;
        compute
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        stream
            .send(101 + c as u64, &tables, None)
            .expect("delta applied");
        total.record(started.elapsed().as_micros() as u64).unwrap();
        for sent in stream.take_sent() {
            if let control::stream::Sent::Delta { bytes: b } = sent {
                bytes = b;
            }
        }
    }
    // Issue 21's larger change: one Service's slice between 1,000 and 999 endpoints.
    let mut big = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut big_bytes = 0;
    for c in 0..BIG_CHANGES {
        let value = slice(services() / 2, BIG_ENDPOINTS - c % 2, false);
        let started = Instant::now();
        apply_value(objects, &value, "bench").unwrap();
        let tables = computer.compute(objects).unwrap().tables;
        stream
            .send(101 + u64::from(CHANGES + c), &tables, None)
            .expect("delta applied");
        big.record(started.elapsed().as_micros() as u64).unwrap();
        for sent in stream.take_sent() {
            if let control::stream::Sent::Delta { bytes: b } = sent {
                big_bytes = b;
            }
        }
    }
    // What applying a delta costs the dataplane alone (no socket, no control): the same
    // kind of change, straight into its state.
    drop(stream);
    let first = shared.tables.load().generation;
    let mut spec = shared.tables.load().spec.clone();
    for (generation, c) in (first..).zip(0..CHANGES) {
        let i = ((c * 104729) % services()) as usize;
        let mut changed = (*spec.services[i]).clone();
        if changed.cluster_endpoints.len() > 1 {
            changed.cluster_endpoints.pop();
        } else {
            changed.cluster_endpoints = changed.all_endpoints.clone();
        }
        let mut next = spec.clone();
        next.services[i] = std::sync::Arc::new(changed);
        let delta = nat::spec::TableDelta::between(&spec, &next);
        let t = Instant::now();
        let outcome = shared.install_delta(generation + 1, generation, &delta);
        apply.record(t.elapsed().as_micros() as u64).unwrap();
        assert!(matches!(
            outcome,
            Ok(dataplane::state::DeltaOutcome::Applied { .. })
        ));
        spec = next;
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "one change at scale, {CHANGES} changes one at a time (store update → compute → delta on the socket → Applied):"
    );
    println!(
        "  total   p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(&total, 0.5),
        ms(&total, 0.9),
        ms(&total, 0.99),
        total.max() as f64 / 1000.0
    );
    println!(
        "  compute p50 {:.2} ms  p99 {:.2} ms; a delta is {bytes} bytes",
        ms(&compute, 0.5),
        ms(&compute, 0.99)
    );
    println!(
        "  the dataplane applying a one-Service delta: p50 {:.2} ms  p99 {:.2} ms",
        ms(&apply, 0.5),
        ms(&apply, 0.99)
    );
    println!(
        "one Service of {BIG_ENDPOINTS} endpoints changed, {BIG_CHANGES} times (the same path): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms; a delta is {big_bytes} bytes",
        ms(&big, 0.5),
        ms(&big, 0.99),
        big.max() as f64 / 1000.0
    );
    let _ = std::fs::remove_file(&path);
}
