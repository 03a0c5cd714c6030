//! `kxdp-bench run`: every device under test on the same lab in the same run, in
//! alternation, several repetitions each, and the results kept for [`crate::report`].
//!
//! Per Service count: the Service set is built (N Services × 10 endpoints, as Kubernetes
//! objects, turned into tables by control's own computation); the probed Service is the one
//! in the middle of the set's order (kube-proxy's iptables chain is walked in that order, and
//! kube-proxy's own order is random, so the middle is the expected case); every device is
//! set up on its own three namespaces with those tables; then each scenario runs every
//! device once per repetition, the order rotated each repetition, kxdp stopped (SIGSTOP)
//! while the others run so its busy-polling worker does not take their core.
//!
//! Cores: the load (generator and sink, one thread) on core 0, the device under test on
//! core 1 — kxdp's worker by `taskset`, the forwarder's thread by pinning, the kernel's
//! forwarding by RPS on the uplink.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv4Net;

use crate::baseline::{self, ServicePort};
use crate::dut::{Dut, DutContext, DutKind, Neighbors};
use crate::frame::FlowSet;
use crate::gen::GenConfig;
use crate::install;
use crate::measure::{self, RunResult};
pub use crate::record::{
    InstallPoint, InstallRow, Plan, Point, ProbeRecord, Results, SetupRecord, WaitRecord,
};
use crate::scenario::{ServiceSet, NODE_IP};
use crate::sysinfo::{self, Machine};
use crate::topology::{Topology, DUT_UPLINK_MAC, GEN_MAC, SINK_MAC};

/// Endpoints per Service: the probed Service always has 10.
pub const ENDPOINTS: u32 = 10;

/// Where binaries are and where results go.
#[derive(Clone, Debug)]
pub struct Paths {
    /// `kxdp-dataplane`'s directory.
    pub bin_dir: PathBuf,
    /// Output directory (logs, JSON, Markdown, PNG).
    pub out_dir: PathBuf,
    /// The repository (for `git describe`).
    pub repo: PathBuf,
}

/// A private copy of `kxdp-dataplane`, removed when dropped.
struct PrivateBin {
    dir: PathBuf,
}

impl PrivateBin {
    fn copy(from: &std::path::Path) -> anyhow::Result<PrivateBin> {
        let dir = std::env::temp_dir().join(format!("kxdp-bench-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let src = from.join("kxdp-dataplane");
        if src.exists() {
            std::fs::copy(&src, dir.join("kxdp-dataplane"))
                .with_context(|| format!("copy {}", src.display()))?;
        }
        Ok(PrivateBin { dir })
    }
}

impl Drop for PrivateBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bench's Service set for `services` Services: UDP port 80 → 8080, ten endpoints
/// each, a /8 pod network (a million endpoints fit) and a /12 Service range.
pub fn service_set(services: u32) -> ServiceSet {
    ServiceSet {
        services,
        endpoints: ENDPOINTS,
        protocol: "UDP",
        port: 80,
        target_port: 8080,
        first_cluster_ip: Ipv4Addr::new(172, 16, 0, 10),
        first_endpoint: Ipv4Addr::new(10, 0, 1, 10),
        pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("literal"),
        service_cidr: Ipv4Net::new(Ipv4Addr::new(172, 16, 0, 0), 12).expect("literal"),
        node_ip: NODE_IP,
    }
}

/// The Service in the middle of `ports`.
pub fn probe(ports: &[ServicePort]) -> Option<(usize, &ServicePort)> {
    let i = ports.len().checked_sub(1)? / 2;
    Some((i, &ports[i]))
}

/// The generator's source for forwarding runs: outside the cluster (masqueraded), in the
/// benchmarking range (RFC 2544).
pub const SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Which measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Flat out, established flows.
    Throughput,
    /// Flat out, every frame a new flow.
    NewFlows,
    /// Fixed rate (frames per second).
    Latency(u64),
}

impl Scenario {
    fn name(self) -> String {
        match self {
            Scenario::Throughput => "throughput".into(),
            Scenario::NewFlows => "new-flows".into(),
            Scenario::Latency(rate) => format!("latency at {rate} pps"),
        }
    }
}

/// The generator's configuration for `scenario`, repetition `rep`, towards `frontend`
/// through a next hop at `next_hop`.
pub fn gen_config(
    plan: &Plan,
    scenario: Scenario,
    rep: u32,
    frontend: SocketAddrV4,
    next_hop: [u8; 6],
) -> GenConfig {
    let flows = FlowSet {
        src_mac: GEN_MAC,
        dst_mac: next_hop,
        src_ip: SOURCE,
        src_port: 1024,
        flows: plan.flows,
        dests: vec![frontend],
    };
    let duration = Duration::from_secs_f64(plan.seconds);
    match scenario {
        Scenario::Throughput => GenConfig {
            size: plan.size,
            flows,
            rate_pps: None,
            duration,
            count: None,
        },
        Scenario::NewFlows => GenConfig {
            size: plan.size,
            flows: FlowSet {
                // A source address of its own per repetition: no flow of an earlier one is
                // still in a connection table.
                src_ip: Ipv4Addr::new(198, 19, (rep % 250) as u8 + 1, 1),
                flows: plan.new_flows as u32,
                ..flows
            },
            rate_pps: None,
            duration: Duration::from_secs(30),
            count: Some(plan.new_flows),
        },
        Scenario::Latency(rate) => GenConfig {
            size: plan.size,
            flows,
            rate_pps: Some(rate),
            duration,
            count: None,
        },
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn describe(repo: &std::path::Path) -> String {
    std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs `plan` and returns its results; `progress` is told what happens (one line each).
pub fn run(
    plan: &Plan,
    paths: &Paths,
    command: String,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Results> {
    std::fs::create_dir_all(&paths.out_dir)
        .with_context(|| format!("create {}", paths.out_dir.display()))?;
    let logs = paths.out_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // A copy of kxdp-dataplane for the whole run: a build in the shared target directory
    // may replace the original while the run goes on.
    let private = PrivateBin::copy(&paths.bin_dir)?;
    let paths = &Paths {
        bin_dir: private.dir.clone(),
        ..paths.clone()
    };
    let started = Instant::now();
    let mut res = Results {
        command,
        plan: Some(plan.clone()),
        machine: Machine::this(),
        started: utc_now(),
        commit: describe(&paths.repo),
        loadavg_start: sysinfo::loadavg(),
        ..Results::default()
    };
    progress(&format!(
        "machine: {}; load average {}",
        res.machine.line(),
        res.loadavg_start
    ));

    // The generator's ceiling: generator → sink, nothing in between.
    if plan.idle_below > 0.0 {
        let (waited, load1) =
            sysinfo::wait_for_idle(plan.idle_below, Duration::from_secs(plan.idle_wait_s));
        progress(&format!(
            "waited {:.0} s for the load average to fall below {}: {load1:.2}",
            waited.as_secs_f64(),
            plan.idle_below
        ));
    }
    {
        let topo = Topology::direct("ceil")?;
        let frontend = SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 10), 80);
        for rep in 1..=plan.reps {
            let scenarios = std::iter::once(Scenario::Throughput)
                .chain(plan.latency_pps.iter().map(|r| Scenario::Latency(*r)));
            for scenario in scenarios {
                let cfg = gen_config(plan, scenario, rep, frontend, SINK_MAC);
                let mut tries = 0;
                // Bound: plan.retries.
                let (r, load1, foreign) = loop {
                    let (r, load1, foreign) = measure::run(&topo, &cfg, &[], plan.load_core, &[])?;
                    if plan.max_foreign_pct > 0.0
                        && foreign > plan.max_foreign_pct
                        && tries < plan.retries
                    {
                        tries += 1;
                        sysinfo::wait_for_idle(
                            plan.idle_below.max(0.01),
                            Duration::from_secs(plan.idle_wait_s.min(120)),
                        );
                        continue;
                    }
                    break (r, load1, foreign);
                };
                let mut rr = RunResult::from_load("ceiling", rep, &r, &[]);
                rr.load1_before = load1;
                rr.foreign_cpu_pct = foreign;
                rr.retries = tries;
                rr.rate_pps = cfg.rate_pps;
                progress(&format!(
                    "ceiling {} rep {rep}: {:.0} pps received of {:.0} offered, p99 {} µs",
                    scenario.name(),
                    rr.received_pps,
                    rr.offered_pps,
                    rr.latency_ns.p99 / 1000
                ));
                match scenario {
                    Scenario::Latency(_) => res.ceiling_latency.push(rr),
                    _ => res.ceiling.push(rr),
                }
            }
        }
    }

    for &n in &plan.services {
        let (point, install) = run_point(plan, paths, &logs, n, &mut res.notes, &mut progress)?;
        res.points.push(point);
        res.install.extend(install);
    }

    for &n in plan
        .install_services
        .iter()
        .filter(|n| !plan.services.contains(n))
    {
        res.install.push(install_only(
            plan,
            paths,
            &logs,
            n,
            &mut res.notes,
            &mut progress,
        )?);
    }

    res.finished = utc_now();
    res.seconds = started.elapsed().as_secs_f64();
    res.loadavg_end = sysinfo::loadavg();
    Ok(res)
}

/// The Service set at `n` Services: its tables, the seconds control took to compute them
/// from the objects it holds, and the probed Services (the middle one, then the ones after
/// it: each new-flow repetition gets one of its own, so its connections and masquerade
/// ports start empty; with fewer Services than repetitions, one on a Service used before
/// waits for the earlier flows to expire, `expire_new_flows`).
struct Built {
    set: ServiceSet,
    spec: nat::spec::TableSpec,
    compute_s: f64,
    probes: Vec<(usize, ServicePort)>,
}

fn build(plan: &Plan, n: u32, progress: &mut impl FnMut(&str)) -> anyhow::Result<Built> {
    let set = service_set(n);
    let built = Instant::now();
    let objects = set.objects()?;
    let computing = Instant::now();
    let spec = set.compute(&objects)?;
    let compute_s = computing.elapsed().as_secs_f64();
    drop(objects);
    progress(&format!(
        "{n} Services × {ENDPOINTS} endpoints: objects and tables in {:.1} s (control's computation {compute_s:.3} s)",
        built.elapsed().as_secs_f64()
    ));
    let ports = baseline::service_ports(&spec);
    let (mid, _) = probe(&ports).context("the Service set is empty")?;
    let probes = (0..plan.reps.max(1) as usize)
        .map(|r| {
            let i = (mid + r) % ports.len();
            (i, ports[i].clone())
        })
        .collect();
    Ok(Built {
        set,
        spec,
        compute_s,
        probes,
    })
}

impl Built {
    /// The endpoint addresses of every probed Service, sorted, each once: what the devices
    /// under test are told about and what the sink answers ARP for.
    fn probe_ips(&self) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self
            .probes
            .iter()
            .flat_map(|(_, sp)| sp.cluster_endpoints.iter().map(|e| e.ip))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// Waits until the flows of a new-flow repetition that ended at `ended` have expired in the
/// device under test: none of them is ever answered, so kxdp (and the kernel's conntrack,
/// `nf_conntrack_udp_timeout`) keep each 30 s, and until then they hold masquerade ports of
/// the same endpoints. A repetition on the same Service before that would find the ports
/// crowded and measure the search for a free one, which the first repetition did not.
/// Returns the time waited.
fn expire_new_flows(ended: Instant, progress: &mut impl FnMut(&str)) -> Duration {
    let lifetime = Duration::from_nanos(nat::timeouts::timeout(
        nat::packet::PROTO_UDP,
        nat::timeouts::State::New,
    )) + Duration::from_secs(1);
    let left = lifetime.saturating_sub(ended.elapsed());
    if !left.is_zero() {
        progress(&format!(
            "  waiting {:.0} s for the last new-flow repetition's flows on this Service to expire",
            left.as_secs_f64()
        ));
        std::thread::sleep(left);
    }
    left
}

fn endpoints_of(sp: &ServicePort) -> Vec<SocketAddrV4> {
    sp.cluster_endpoints
        .iter()
        .map(|e| SocketAddrV4::new(e.ip, e.port))
        .collect()
}

/// Sets up every device of `kinds` for `b`; devices whose install is too slow are noted.
fn set_up_all(
    plan: &Plan,
    paths: &Paths,
    logs: &std::path::Path,
    b: &Built,
    kinds: &[DutKind],
    notes: &mut Vec<String>,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<(Vec<Dut>, Vec<SetupRecord>)> {
    let n = b.set.services;
    let all_ips = b.probe_ips();
    let ctx = DutContext {
        spec: &b.spec,
        pod_cidr: b.set.pod_cidr,
        node_ip: b.set.node_ip,
        neighbors: Neighbors::lab(),
        endpoints: &all_ips,
        core: plan.dut_core,
        other_core: plan.load_core,
        bin_dir: &paths.bin_dir,
        log_dir: logs,
        install_limit: Duration::from_secs(plan.install_limit_s),
        xdp_mode: pktio::xsk::XdpMode::Native,
        idle_cpu: Duration::from_secs_f64(plan.idle_cpu_s.clamp(0.0, 600.0)),
    };
    let mut duts = Vec::new();
    let mut setup = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let tag = format!("{}{n}x{i}", &kind.name()[..2]);
        match Dut::set_up(kind, &ctx, &tag)
            .with_context(|| format!("set up {} at {n} Services", kind.name()))?
        {
            Ok(d) => {
                progress(&format!(
                    "  {}: tables loaded in {:.2} s ({}){}",
                    kind.name(),
                    d.install.seconds,
                    d.install.how,
                    d.install.idle_cpu.map_or_else(String::new, |c| format!(
                        "; worker at rest {:.2}% of a core",
                        c * 100.0
                    ))
                ));
                setup.push(SetupRecord {
                    dut: kind.name().into(),
                    install_seconds: Some(d.install.seconds),
                    how: d.install.how.clone(),
                    not_run: None,
                    idle_cpu: d.install.idle_cpu,
                });
                duts.push(d);
            }
            Err(why) => {
                progress(&format!("  {}: {why}", kind.name()));
                notes.push(format!("{} at {n} Services: {why}", kind.name()));
                setup.push(SetupRecord {
                    dut: kind.name().into(),
                    install_seconds: None,
                    how: String::new(),
                    not_run: Some(why.to_string()),
                    idle_cpu: None,
                });
            }
        }
    }
    Ok((duts, setup))
}

/// Install timing at a Service count that has no traffic runs.
fn install_only(
    plan: &Plan,
    paths: &Paths,
    logs: &std::path::Path,
    n: u32,
    notes: &mut Vec<String>,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<InstallPoint> {
    let b = build(plan, n, progress)?;
    let kinds: Vec<DutKind> = plan
        .duts
        .iter()
        .copied()
        .filter(|k| matches!(k, DutKind::Kxdp | DutKind::Nftables))
        .collect();
    let (mut duts, setup) = set_up_all(plan, paths, logs, &b, &kinds, notes, progress)?;
    progress(&format!("install timing at {n} Services"));
    install::measure(
        plan,
        &b.spec,
        n,
        u64::from(n) * u64::from(ENDPOINTS),
        b.compute_s,
        &mut duts,
        &setup,
        progress,
    )
}

fn run_point(
    plan: &Plan,
    paths: &Paths,
    logs: &std::path::Path,
    n: u32,
    notes: &mut Vec<String>,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<(Point, Option<InstallPoint>)> {
    let b = build(plan, n, progress)?;
    let (position, sp) = &b.probes[0];
    let frontend = SocketAddrV4::new(sp.cluster_ip, sp.port);
    let endpoints = endpoints_of(sp);
    let mut point = Point {
        services: n,
        endpoints: ENDPOINTS,
        probe: ProbeRecord {
            service: sp.name_string(),
            frontend: frontend.to_string(),
            position: *position,
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        },
        ..Point::default()
    };
    let (mut duts, setup) = set_up_all(plan, paths, logs, &b, &plan.duts, notes, progress)?;
    point.setup = setup;
    let arp = b.probe_ips();
    let mut scenarios = vec![Scenario::Throughput];
    if plan.new_flow_services.contains(&n) {
        scenarios.push(Scenario::NewFlows);
    }
    if plan.latency_services.contains(&n) {
        scenarios.extend(plan.latency_pps.iter().map(|r| Scenario::Latency(*r)));
    }
    // When a new-flow repetition uses a Service earlier ones did, per device: the end of
    // the last one (see `expire_new_flows`).
    let mut new_flows_ended: HashMap<(usize, usize), Instant> = HashMap::new();
    for scenario in scenarios {
        for rep in 1..=plan.reps {
            if plan.idle_below > 0.0 && rep == 1 {
                let (waited, load1) =
                    sysinfo::wait_for_idle(plan.idle_below, Duration::from_secs(plan.idle_wait_s));
                if load1 >= plan.idle_below {
                    notes.push(format!(
                        "{n} Services, {} rep {rep}: load average still {load1:.2} after waiting {:.0} s",
                        scenario.name(),
                        waited.as_secs_f64()
                    ));
                }
                point.waits.push(WaitRecord {
                    before: format!("{} rep {rep}", scenario.name()),
                    waited_s: waited.as_secs_f64(),
                    load1,
                });
            }
            // A new-flow repetition sends to a Service of its own (while there are enough).
            let (service, fe, eps) = if scenario == Scenario::NewFlows {
                let (i, sp) = &b.probes[(rep as usize - 1) % b.probes.len()];
                (
                    *i,
                    SocketAddrV4::new(sp.cluster_ip, sp.port),
                    endpoints_of(sp),
                )
            } else {
                (*position, frontend, endpoints.clone())
            };
            let count = duts.len().max(1);
            for k in 0..duts.len() {
                let at = (k + rep as usize - 1) % count;
                // The forwarder keeps no state: nothing of its to expire.
                let stateful = duts[at].kind != DutKind::XdpForwarder;
                if scenario == Scenario::NewFlows && stateful {
                    if let Some(ended) = new_flows_ended.get(&(service, at)) {
                        let waited = expire_new_flows(*ended, progress);
                        if !waited.is_zero() {
                            point.waits.push(WaitRecord {
                                before: format!(
                                    "{} rep {rep} {} (flows expiring)",
                                    scenario.name(),
                                    duts[at].kind.name()
                                ),
                                waited_s: waited.as_secs_f64(),
                                load1: sysinfo::load1(),
                            });
                        }
                    }
                }
                let d = &mut duts[at];
                let cfg = gen_config(plan, scenario, rep, fe, DUT_UPLINK_MAC);
                let exclude: Vec<u32> = d.pid().into_iter().collect();
                let name = d.kind.name();
                let mut tries = 0;
                // Bound: plan.retries.
                let rr = loop {
                    let ((r, load1, foreign), counters) =
                        d.during(|topo| measure::run(topo, &cfg, &arp, plan.load_core, &exclude))?;
                    if plan.max_foreign_pct > 0.0
                        && foreign > plan.max_foreign_pct
                        && tries < plan.retries
                    {
                        tries += 1;
                        progress(&format!(
                            "  {n} Services {} rep {rep} {name}: other processes took {foreign:.0}% CPU, again (try {})",
                            scenario.name(),
                            tries + 1
                        ));
                        if plan.idle_below > 0.0 {
                            sysinfo::wait_for_idle(
                                plan.idle_below,
                                Duration::from_secs(plan.idle_wait_s.min(120)),
                            );
                        }
                        // The same tuples again: new only once the first try's expired.
                        if scenario == Scenario::NewFlows && stateful {
                            expire_new_flows(Instant::now(), progress);
                        }
                        continue;
                    }
                    let mut rr = RunResult::from_load(name, rep, &r, &eps);
                    rr.load1_before = load1;
                    rr.foreign_cpu_pct = foreign;
                    rr.dut_counters = counters.counters;
                    rr.retries = tries;
                    rr.rate_pps = cfg.rate_pps;
                    break rr;
                };
                let load1 = rr.load1_before;
                let foreign = rr.foreign_cpu_pct;
                progress(&format!(
                    "  {n} Services {} rep {rep} {name}: {:.0} pps of {:.0} offered, {} of {} translated, p50 {} µs p99 {} µs, load {load1:.2}, other processes {foreign:.0}% CPU",
                    scenario.name(),
                    rr.received_pps,
                    rr.offered_pps,
                    rr.translated,
                    rr.received,
                    rr.latency_ns.p50 / 1000,
                    rr.latency_ns.p99 / 1000,
                ));
                match scenario {
                    Scenario::Throughput => point.throughput.push(rr),
                    Scenario::NewFlows => {
                        new_flows_ended.insert((service, at), Instant::now());
                        point.new_flows.push(rr)
                    }
                    Scenario::Latency(_) => point.latency.push(rr),
                }
            }
        }
    }
    let install = if plan.install_services.contains(&n) {
        progress(&format!("install timing at {n} Services"));
        Some(install::measure(
            plan,
            &b.spec,
            n,
            u64::from(n) * u64::from(ENDPOINTS),
            b.compute_s,
            &mut duts,
            &point.setup,
            progress,
        )?)
    } else {
        None
    };
    drop(duts);
    Ok((point, install))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_in_the_middle_and_has_ten_endpoints() {
        let set = service_set(5);
        let spec = set.table_spec().unwrap();
        let ports = baseline::service_ports(&spec);
        let (i, sp) = probe(&ports).unwrap();
        assert_eq!(i, 2);
        assert_eq!(sp.cluster_endpoints.len(), 10);
        assert!(set.pod_cidr.contains(&sp.cluster_endpoints[0].ip));
    }

    #[test]
    fn new_flow_runs_use_a_source_of_their_own_per_repetition() {
        let plan = Plan::quick();
        let fe = SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 10), 80);
        let a = gen_config(&plan, Scenario::NewFlows, 1, fe, DUT_UPLINK_MAC);
        let b = gen_config(&plan, Scenario::NewFlows, 2, fe, DUT_UPLINK_MAC);
        assert_ne!(a.flows.src_ip, b.flows.src_ip);
        assert_eq!(a.count, Some(plan.new_flows));
        assert_eq!(u64::from(a.flows.flows), plan.new_flows);
        a.validate().unwrap();
        let l = gen_config(&plan, Scenario::Latency(50_000), 1, fe, DUT_UPLINK_MAC);
        assert_eq!(l.rate_pps, Some(50_000));
    }
}
