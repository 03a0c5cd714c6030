//! The bench's lab measures what it says: every device under test, set up exactly as
//! `kxdp-bench run` sets it up (generator → DUT → sink, each in namespaces of its own),
//! forwards the generator's frames at a modest fixed rate, and the sink sees them DNATed to
//! the probed Service's endpoints — more than one of them — and masqueraded to the pod
//! gateway (the kernel rulesets and kxdp in both poll modes), or untouched (the bare
//! forwarder); kxdp's worker at rest uses its core when busy-polling and next to nothing
//! when polling adaptively. Nothing here asserts a rate.
//!
//! Root only (skips otherwise). kxdp needs `kxdp-dataplane`: `KXDP_BIN_DIR`, else
//! `target/release`, else `target/debug`; without it the kxdp case says so and passes.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use bench::baseline;
use bench::dut::{Dut, DutContext, DutKind, Neighbors};
use bench::frame::FlowSet;
use bench::gen::GenConfig;
use bench::measure::{self, RunResult};
use bench::scenario::NODE_IP;
use bench::suite::{self, SOURCE};
use bench::topology::{DUT_UPLINK_MAC, GEN_MAC};

/// Frames per second: far below what any device forwards, so nothing is lost to speed.
const RATE: u64 = 10_000;

/// One device at a time: they all pin to the same two cores, and two busy-polling devices
/// (kxdp's worker, the forwarder) on one core would starve each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn skip(test: &str) -> bool {
    if bench::netns::is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root for namespaces, XDP and rulesets");
    true
}

fn bin_dir() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = std::env::var_os("KXDP_BIN_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join("target/release"), root.join("target/debug")]);
    dirs.into_iter().find(|d| d.join("kxdp-dataplane").exists())
}

fn check(kind: DutKind) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let set = suite::service_set(10);
    let spec = set.table_spec().unwrap();
    let ports = baseline::service_ports(&spec);
    let (_, sp) = suite::probe(&ports).unwrap();
    let endpoints: Vec<SocketAddrV4> = sp
        .cluster_endpoints
        .iter()
        .map(|e| SocketAddrV4::new(e.ip, e.port))
        .collect();
    let ips: Vec<Ipv4Addr> = endpoints.iter().map(|e| *e.ip()).collect();
    let bin = bin_dir().unwrap_or_else(|| PathBuf::from("target/release"));
    let logs = std::env::temp_dir();
    let ctx = DutContext {
        spec: &spec,
        pod_cidr: set.pod_cidr,
        node_ip: NODE_IP,
        neighbors: Neighbors::lab(),
        endpoints: &ips,
        core: 1,
        other_core: 0,
        bin_dir: &bin,
        log_dir: &logs,
        install_limit: Duration::from_secs(60),
        xdp_mode: pktio::xsk::XdpMode::Native,
        idle_cpu: Duration::from_secs(2),
    };
    let tag = format!("t{}{}", &kind.name()[..2], kind.name().len());
    let mut dut = Dut::set_up(kind, &ctx, &tag)
        .expect("set up")
        .unwrap_or_else(|why| panic!("{}: {why}", kind.name()));
    // kxdp's worker watched at rest: a busy-polling one uses its core, an adaptive one
    // sleeps. Not a rate: the two differ a hundredfold.
    match (kind, dut.install.idle_cpu) {
        (DutKind::Kxdp, Some(share)) => assert!(share > 0.5, "busy polling at rest: {share}"),
        (DutKind::KxdpAdaptive, Some(share)) => {
            assert!(share < 0.05, "adaptive polling at rest: {share}")
        }
        (k, share) => assert!(!k.is_kxdp() && share.is_none(), "{k:?}: {share:?}"),
    }
    let cfg = GenConfig {
        size: 64,
        flows: FlowSet {
            src_mac: GEN_MAC,
            dst_mac: DUT_UPLINK_MAC,
            src_ip: SOURCE,
            src_port: 1024,
            flows: 64,
            dests: vec![SocketAddrV4::new(sp.cluster_ip, sp.port)],
        },
        rate_pps: Some(RATE),
        duration: Duration::from_secs(1),
        count: None,
    };
    let exclude: Vec<u32> = dut.pid().into_iter().collect();
    let ((report, _, _), counters) = dut
        .during(|topo| measure::run(topo, &cfg, &ips, 0, &exclude))
        .expect("run");
    let r = RunResult::from_load(kind.name(), 1, &report, &endpoints);
    eprintln!("{}: {r:?}\ncounters {counters:?}", kind.name());
    assert!(r.sent > 0);
    assert!(
        r.received * 10 >= r.sent * 9,
        "{}: {} of {} frames arrived",
        kind.name(),
        r.received,
        r.sent
    );
    assert_eq!(r.anomalies[0], 0, "every frame kept its size");
    if kind == DutKind::XdpForwarder {
        assert_eq!(r.translated, 0, "the forwarder translates nothing");
        assert_eq!(
            r.sources,
            vec![(SOURCE.to_string(), r.received)],
            "and leaves the source alone"
        );
        return;
    }
    assert_eq!(
        r.translated,
        r.received,
        "{}: every frame DNATed to one of {endpoints:?}",
        kind.name()
    );
    assert!(
        r.destinations > 1,
        "{}: spread over more than one endpoint",
        kind.name()
    );
    let gateway = set.pod_cidr.hosts().next().unwrap().to_string();
    assert_eq!(
        r.sources,
        vec![(gateway, r.received)],
        "{}: every frame masqueraded to the pod gateway",
        kind.name()
    );
}

#[test]
fn kernel_with_kube_proxy_iptables_rules_translates_and_masquerades() {
    if skip("kernel_with_kube_proxy_iptables_rules_translates_and_masquerades") {
        return;
    }
    check(DutKind::Iptables);
}

#[test]
fn kernel_with_kube_proxy_nftables_rules_translates_and_masquerades() {
    if skip("kernel_with_kube_proxy_nftables_rules_translates_and_masquerades") {
        return;
    }
    check(DutKind::Nftables);
}

#[test]
fn the_bare_forwarder_forwards_untouched() {
    if skip("the_bare_forwarder_forwards_untouched") {
        return;
    }
    check(DutKind::XdpForwarder);
}

/// [`check`] of a kxdp device, when `kxdp-dataplane` is built (else `test` says so and
/// passes).
fn check_kxdp(test: &str, kind: DutKind) {
    if skip(test) {
        return;
    }
    if bin_dir().is_none() {
        eprintln!(
            "skipping {test}: no kxdp-dataplane (build it with cargo build --release -p dataplane --bins, or set KXDP_BIN_DIR)"
        );
        return;
    }
    check(kind);
}

#[test]
fn kxdp_translates_and_masquerades() {
    check_kxdp("kxdp_translates_and_masquerades", DutKind::Kxdp);
}

#[test]
fn kxdp_polling_adaptively_translates_and_masquerades() {
    check_kxdp(
        "kxdp_polling_adaptively_translates_and_masquerades",
        DutKind::KxdpAdaptive,
    );
}
