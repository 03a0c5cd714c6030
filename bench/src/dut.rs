//! The devices under test, each on a [`Topology`] of its own (generator → DUT → sink):
//!
//! - **kxdp**: `kxdp-dataplane` in the DUT namespace (uplink `u0`, pod port `p0`, one
//!   worker), run under `taskset` on the DUT core, its tables streamed by this process
//!   through control's own [`control::Stream`], exactly as `kxdp-control` would;
//! - **iptables** / **iptables-legacy**: the kernel forwarding with kube-proxy's iptables
//!   ruleset for the same Services ([`crate::baseline::iptables`]), through the nf_tables
//!   backend (Debian's `iptables`) or the legacy one;
//! - **nftables**: the kernel with kube-proxy's nftables ruleset;
//! - **AF_XDP forwarder**: [`crate::forwarder`], MACs rewritten and nothing else — the
//!   ceiling of kxdp's I/O path on this machine.
//!
//! The kernel devices get the same neighbours for the endpoints (static entries pointing at
//! the sink) and their forwarding moved to the DUT core by RPS on the uplink, so they work
//! on the same core kxdp's worker polls. kxdp resolves the endpoints itself (the sink
//! answers and announces ARP for them).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use nat::spec::TableSpec;
use pktio::xsk::XdpMode;

use crate::baseline::{iptables, nftables, KubeProxyConfig};
use crate::forwarder::{self, ForwarderReport};
use crate::netns::{self, Bounded, NetnsGuard};
use crate::topology::{self, Topology, GEN_IP, GEN_MAC, POD_IF, SINK_MAC, UPLINK_IF};

/// A device under test.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DutKind {
    /// kxdp-dataplane, busy-polling (`--poll-mode busy`).
    Kxdp,
    /// kxdp-dataplane, adaptive polling (`--poll-mode adaptive`).
    KxdpAdaptive,
    /// The kernel with kube-proxy's iptables ruleset, nf_tables backend.
    Iptables,
    /// The kernel with kube-proxy's iptables ruleset, legacy xtables backend.
    IptablesLegacy,
    /// The kernel with kube-proxy's nftables ruleset.
    Nftables,
    /// The bare AF_XDP MAC-rewriting forwarder.
    XdpForwarder,
}

impl DutKind {
    /// Every kind, in report order.
    pub const ALL: [DutKind; 6] = [
        DutKind::Kxdp,
        DutKind::KxdpAdaptive,
        DutKind::Iptables,
        DutKind::IptablesLegacy,
        DutKind::Nftables,
        DutKind::XdpForwarder,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            DutKind::Kxdp => "kxdp",
            DutKind::KxdpAdaptive => "kxdp-adaptive",
            DutKind::Iptables => "iptables",
            DutKind::IptablesLegacy => "iptables-legacy",
            DutKind::Nftables => "nftables",
            DutKind::XdpForwarder => "xdp-fwd",
        }
    }

    /// A column heading.
    pub fn label(self) -> &'static str {
        match self {
            DutKind::Kxdp => "kxdp",
            DutKind::KxdpAdaptive => "kxdp, adaptive polling",
            DutKind::Iptables => "kernel + kube-proxy iptables (nft backend)",
            DutKind::IptablesLegacy => "kernel + kube-proxy iptables (legacy)",
            DutKind::Nftables => "kernel + kube-proxy nftables",
            DutKind::XdpForwarder => "bare AF_XDP forwarder",
        }
    }

    /// Short heading for tables.
    pub fn short(self) -> &'static str {
        match self {
            DutKind::Kxdp => "kxdp",
            DutKind::KxdpAdaptive => "kxdp adaptive",
            DutKind::Iptables => "iptables",
            DutKind::IptablesLegacy => "iptables-legacy",
            DutKind::Nftables => "nftables",
            DutKind::XdpForwarder => "AF_XDP fwd",
        }
    }

    /// Parses [`DutKind::name`].
    pub fn parse(s: &str) -> Option<DutKind> {
        DutKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether this is kxdp (in either poll mode).
    pub fn is_kxdp(self) -> bool {
        matches!(self, DutKind::Kxdp | DutKind::KxdpAdaptive)
    }

    /// Whether the kernel forwards (and RPS moves it to the DUT core).
    pub fn is_kernel(self) -> bool {
        matches!(
            self,
            DutKind::Iptables | DutKind::IptablesLegacy | DutKind::Nftables
        )
    }
}

/// Who is on the device's two links: the generator (a router outside the cluster) on the
/// uplink, the sink (standing in for the endpoints) on the pod side, and the device's own
/// MACs there. The kernel devices get static neighbours from it, the forwarder its MAC
/// rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbors {
    /// The generator's address on the uplink.
    pub gen_ip: Ipv4Addr,
    /// The generator's MAC.
    pub gen_mac: [u8; 6],
    /// The sink's MAC.
    pub sink_mac: [u8; 6],
    /// The device's uplink MAC.
    pub uplink_mac: [u8; 6],
    /// The device's pod-side MAC.
    pub pod_mac: [u8; 6],
}

impl Neighbors {
    /// The namespace lab's fixed addresses ([`crate::topology`]).
    pub fn lab() -> Neighbors {
        Neighbors {
            gen_ip: GEN_IP,
            gen_mac: GEN_MAC,
            sink_mac: SINK_MAC,
            uplink_mac: topology::DUT_UPLINK_MAC,
            pod_mac: topology::DUT_POD_MAC,
        }
    }
}

/// What a device under test is set up with.
#[derive(Clone, Debug)]
pub struct DutContext<'a> {
    /// The tables (kxdp gets them as they are, the kernel as kube-proxy's rulesets).
    pub spec: &'a TableSpec,
    /// The node's pod network; its first address is the gateway (the masquerade source).
    pub pod_cidr: Ipv4Net,
    /// The node's uplink address.
    pub node_ip: Ipv4Addr,
    /// Who is on its links.
    pub neighbors: Neighbors,
    /// Endpoints of the probed Service: the sink stands in for them.
    pub endpoints: &'a [Ipv4Addr],
    /// The core the device works on.
    pub core: usize,
    /// The core for the device's other threads (kxdp's control socket and conntrack
    /// sweep): the load's core, so they never take the worker's.
    pub other_core: usize,
    /// Where `kxdp-dataplane` is.
    pub bin_dir: &'a Path,
    /// Where logs go.
    pub log_dir: &'a Path,
    /// Longest a ruleset or table install may take before the device is reported as not
    /// run.
    pub install_limit: Duration,
    /// XDP attach mode of kxdp and the forwarder: native on veth (the namespace lab);
    /// `Auto` on NICs whose driver may not have it (VMs).
    pub xdp_mode: XdpMode,
    /// How long kxdp's worker is watched at rest once its tables are in (zero: not).
    pub idle_cpu: Duration,
}

/// How the device's tables got in.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InstallReport {
    /// What was run, for the record.
    pub how: String,
    /// Seconds it took (the whole install: restore, transaction, or send until applied).
    pub seconds: f64,
    /// kxdp: the share of a core its worker used with no traffic, watched for
    /// [`DutContext::idle_cpu`] after the install.
    pub idle_cpu: Option<f64>,
}

/// Why a device was not run.
#[derive(Debug)]
pub enum NotRun {
    /// Its install did not finish within the limit.
    TooSlow {
        /// What was being run.
        how: String,
        /// The limit.
        limit: Duration,
    },
}

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRun::TooSlow { how, limit } => {
                write!(f, "not run: {how} took > {} s", limit.as_secs())
            }
        }
    }
}

enum State {
    Kxdp(Box<KxdpProcess>),
    Kernel,
    Forwarder,
}

/// A device under test, set up on its topology with its tables installed, ready for runs.
pub struct Dut {
    /// Which device.
    pub kind: DutKind,
    /// Its namespaces.
    pub topo: Topology,
    /// How its tables got in.
    pub install: InstallReport,
    core: usize,
    macs: forwarder::Macs,
    xdp_mode: XdpMode,
    state: State,
}

/// What a device reported about one run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DutCounters {
    /// kxdp's per-worker counters that changed over the run (`kxdp stats`), or the
    /// forwarder's.
    pub counters: Vec<(String, u64)>,
}

impl Dut {
    /// Builds the topology for `kind` and installs its tables. `Ok(Err(_))` when the
    /// install took longer than allowed (the device is then left out of the runs).
    pub fn set_up(
        kind: DutKind,
        ctx: &DutContext<'_>,
        tag: &str,
    ) -> anyhow::Result<Result<Dut, NotRun>> {
        let topo = Topology::through_dut(tag, ctx.node_ip)?;
        Dut::set_up_on(kind, ctx, tag, topo)
    }

    /// [`Dut::set_up`] on a topology made elsewhere (a VM's NICs moved into a namespace:
    /// [`Topology::dut_only`]); its DUT namespace must have `u0` (with the node address)
    /// and `p0`.
    pub fn set_up_on(
        kind: DutKind,
        ctx: &DutContext<'_>,
        tag: &str,
        topo: Topology,
    ) -> anyhow::Result<Result<Dut, NotRun>> {
        let ns = topo.dut_ns();
        let (state, install) = match kind {
            DutKind::Kxdp | DutKind::KxdpAdaptive => {
                let log = ctx.log_dir.join(format!("kxdp-dataplane-{tag}.log"));
                let poll_mode = if kind == DutKind::Kxdp {
                    "busy"
                } else {
                    "adaptive"
                };
                let mut p = KxdpProcess::start(
                    ns,
                    ctx.bin_dir,
                    &log,
                    tag,
                    (ctx.core, ctx.other_core),
                    (ctx.xdp_mode, poll_mode),
                )?;
                let took = p.install(1, ctx.spec, ctx.install_limit)?;
                let Some(took) = took else {
                    return Ok(Err(NotRun::TooSlow {
                        how: "kxdp table install".into(),
                        limit: ctx.install_limit,
                    }));
                };
                let idle_cpu = (!ctx.idle_cpu.is_zero())
                    .then(|| p.worker_cpu_share(ctx.idle_cpu))
                    .flatten();
                p.suspend();
                (
                    State::Kxdp(Box::new(p)),
                    InstallReport {
                        how: "control::Stream::send of the snapshot until Applied".into(),
                        seconds: took.as_secs_f64(),
                        idle_cpu,
                    },
                )
            }
            DutKind::Iptables | DutKind::IptablesLegacy | DutKind::Nftables => {
                kernel_router(ns, ctx)?;
                match load_ruleset(kind, ns, ctx.spec, ctx.install_limit)? {
                    Ok(install) => (State::Kernel, install),
                    Err(n) => return Ok(Err(n)),
                }
            }
            DutKind::XdpForwarder => (
                State::Forwarder,
                InstallReport {
                    how: "no tables".into(),
                    seconds: 0.0,
                    idle_cpu: None,
                },
            ),
        };
        let n = ctx.neighbors;
        Ok(Ok(Dut {
            kind,
            topo,
            install,
            core: ctx.core,
            macs: forwarder::Macs {
                to_pod: (n.sink_mac, n.pod_mac),
                to_uplink: (n.gen_mac, n.uplink_mac),
            },
            xdp_mode: ctx.xdp_mode,
            state,
        }))
    }

    /// Stops the device (ends kxdp's process) and hands back its namespaces.
    pub fn stop(self) -> Topology {
        drop(self.state);
        self.topo
    }

    /// The kxdp process, if this is kxdp.
    pub fn kxdp_mut(&mut self) -> Option<&mut KxdpProcess> {
        match &mut self.state {
            State::Kxdp(p) => Some(p),
            _ => None,
        }
    }

    /// The PID of the device's process, if it has one (kxdp).
    pub fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Kxdp(p) => Some(p.pid()),
            _ => None,
        }
    }

    /// Runs `load` on the device's topology with the device working: kxdp resumed (it is
    /// stopped with SIGSTOP between its runs, so its busy-polling worker leaves the DUT core
    /// to the others), the forwarder started on the DUT core. Returns what `load` returned
    /// and the device's counters over the run.
    pub fn during<T>(
        &mut self,
        load: impl FnOnce(&Topology) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, DutCounters)> {
        let Dut {
            topo,
            state,
            core,
            macs,
            xdp_mode,
            ..
        } = self;
        let topo = &*topo;
        match state {
            State::Kxdp(p) => {
                p.resume();
                let before = p.counters().unwrap_or_default();
                let result = load(topo);
                let after = p.counters().unwrap_or_default();
                p.suspend();
                let counters = changed(&before, &after);
                Ok((result?, DutCounters { counters }))
            }
            State::Kernel => Ok((load(topo)?, DutCounters::default())),
            State::Forwarder => {
                let stop = AtomicBool::new(false);
                let ready = AtomicBool::new(false);
                let failed = AtomicBool::new(false);
                let ns = topo.dut_ns();
                let core = *core;
                let macs = *macs;
                let mode = *xdp_mode;
                std::thread::scope(|s| {
                    let fwd = s.spawn(|| {
                        let r = forwarder::run(ns, (core, mode), macs, &ready, &stop);
                        if r.is_err() {
                            failed.store(true, Ordering::Release);
                        }
                        r
                    });
                    let start = Instant::now();
                    // Bound: 10 s for the forwarder to attach.
                    while !ready.load(Ordering::Acquire) && !failed.load(Ordering::Acquire) {
                        if start.elapsed() > Duration::from_secs(10) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let result = if ready.load(Ordering::Acquire) {
                        Some(load(topo))
                    } else {
                        None
                    };
                    stop.store(true, Ordering::Release);
                    let report: ForwarderReport = fwd
                        .join()
                        .map_err(|_| anyhow::anyhow!("forwarder thread panicked"))??;
                    let Some(result) = result else {
                        bail!("the forwarder did not start within 10 s");
                    };
                    Ok((
                        result?,
                        DutCounters {
                            counters: report.counters(),
                        },
                    ))
                })
            }
        }
    }
}

fn changed(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let b = before
                .iter()
                .find(|(bk, _)| bk == k)
                .map_or(0, |(_, bv)| *bv);
            (*v != b).then(|| (k.clone(), v.saturating_sub(b)))
        })
        .collect()
}

/// The kernel as a router between the uplink and the pod side: the gateway address on the
/// pod side, forwarding on, reverse-path filtering off (the generator's sources are not
/// routed back), static neighbours for the endpoints (the sink) and the generator, and RPS
/// moving the uplink's receive processing — the whole forwarding path — to the DUT core.
pub fn kernel_router(ns: &NetnsGuard, ctx: &DutContext<'_>) -> anyhow::Result<()> {
    let gw = ctx
        .pod_cidr
        .hosts()
        .next()
        .context("the pod network has no host address")?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{gw}/{}", ctx.pod_cidr.prefix_len()),
        "dev",
        POD_IF,
    ])?;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        (&format!("net.ipv4.conf.{UPLINK_IF}.rp_filter") as &str, "0"),
        (&format!("net.ipv4.conf.{POD_IF}.rp_filter") as &str, "0"),
    ] {
        netns::sysctl(ns.name(), key, value)?;
    }
    let sink_mac = netns::mac_string(ctx.neighbors.sink_mac);
    for ep in ctx.endpoints {
        ns.ip(&[
            "neigh",
            "replace",
            &ep.to_string(),
            "lladdr",
            &sink_mac,
            "dev",
            POD_IF,
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&[
        "neigh",
        "replace",
        &ctx.neighbors.gen_ip.to_string(),
        "lladdr",
        &netns::mac_string(ctx.neighbors.gen_mac),
        "dev",
        UPLINK_IF,
        "nud",
        "permanent",
    ])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &ctx.neighbors.gen_ip.to_string(),
        "dev",
        UPLINK_IF,
    ])?;
    let mask = format!("{:x}", 1u64 << ctx.core.min(63));
    netns::exec(
        ns.name(),
        "sh",
        &[
            "-c",
            &format!("echo {mask} > /sys/class/net/{UPLINK_IF}/queues/rx-0/rps_cpus"),
        ],
        None,
    )?;
    Ok(())
}

/// kube-proxy's jump rules without their chain declarations, for after a restore without
/// `--noflush` (a declaration of an existing chain in a `--noflush` restore flushes it).
pub fn jump_inserts() -> String {
    iptables::jump_rules()
        .lines()
        .filter(|l| !l.starts_with(':'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Loads the ruleset of `kind` into `ns` the fast way that leaves the kernel in the state
/// kube-proxy's own sync would: iptables restored without `--noflush` into the fresh
/// namespace, then the jumps inserted; nftables with `nft -f` (what kube-proxy runs).
pub fn load_ruleset(
    kind: DutKind,
    ns: &NetnsGuard,
    spec: &TableSpec,
    limit: Duration,
) -> anyhow::Result<Result<InstallReport, NotRun>> {
    let cfg = KubeProxyConfig::for_spec(spec);
    let started = Instant::now();
    let how = match kind {
        DutKind::Iptables | DutKind::IptablesLegacy => {
            let restore = if kind == DutKind::Iptables {
                "iptables-nft-restore"
            } else {
                "iptables-legacy-restore"
            };
            let rules = iptables::restore_input(spec, &cfg);
            if let Bounded::TimedOut(_) =
                netns::exec_bounded(ns.name(), restore, &[], Some(rules.as_bytes()), limit)?
            {
                return Ok(Err(NotRun::TooSlow {
                    how: format!("{restore} (into an empty namespace)"),
                    limit,
                }));
            }
            let jumps = jump_inserts();
            netns::exec(ns.name(), restore, &["--noflush"], Some(jumps.as_bytes()))?;
            format!("{restore} into an empty namespace, then the jump rules with --noflush")
        }
        DutKind::Nftables => {
            let tx = nftables::transaction(spec, &cfg);
            if let Bounded::TimedOut(_) =
                netns::exec_bounded(ns.name(), "nft", &["-f", "-"], Some(tx.as_bytes()), limit)?
            {
                return Ok(Err(NotRun::TooSlow {
                    how: "nft -f".into(),
                    limit,
                }));
            }
            "nft -f of kube-proxy's first-sync transaction".into()
        }
        _ => bail!("{} has no ruleset", kind.name()),
    };
    Ok(Ok(InstallReport {
        how,
        seconds: started.elapsed().as_secs_f64(),
        idle_cpu: None,
    }))
}

/// Longest `kxdp-dataplane` may take to open its control socket.
const KXDP_START: Duration = Duration::from_secs(20);
/// Longest it may take to exit after SIGTERM before it is killed.
const KXDP_STOP: Duration = Duration::from_secs(5);

/// A `kxdp-dataplane` process this bench started, in a DUT namespace, ended by its PID.
pub struct KxdpProcess {
    child: Child,
    socket: PathBuf,
    stream: control::Stream,
    running: bool,
}

/// The thread of `pid` whose name is `name`.
fn thread_named(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find_map(|t| {
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(tid)
        })
}

/// Sends `signal` (a `kill -s` name) to `pid`.
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl KxdpProcess {
    /// Starts `kxdp-dataplane --uplink u0 --pods p0 --workers 1 --poll-mode POLL_MODE` in
    /// `ns` with Maglev rings
    /// scaled to their backends (`--scaled-rings`: 100k Services would otherwise need
    /// 3.2 GiB of rings), waits for its control socket, and places its threads: the worker
    /// alone on `core`, the others (control socket, conntrack sweep) on `other_core`.
    /// kxdp's own `--pin` would put worker 0 on core 0 and leave the others anywhere, so
    /// it is started with `--pin false` under `taskset -c other_core` and the worker moved
    /// with `taskset -p` once it exists.
    pub fn start(
        ns: &NetnsGuard,
        bin_dir: &Path,
        log: &Path,
        tag: &str,
        (core, other_core): (usize, usize),
        (mode, poll_mode): (XdpMode, &str),
    ) -> anyhow::Result<KxdpProcess> {
        let mode = match mode {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            _ => "auto",
        };
        let bin = bin_dir.join("kxdp-dataplane");
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p dataplane -p control --bins` or pass --bin-dir",
                bin.display()
            );
        }
        let dir = PathBuf::from(format!("/run/kxdp-bench/{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("dataplane.sock");
        let _ = std::fs::remove_file(&socket);
        let logf = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "taskset",
                "-c",
                &other_core.to_string(),
            ])
            .arg(&bin)
            .args([
                "--uplink",
                UPLINK_IF,
                "--pods",
                POD_IF,
                "--workers",
                "1",
                "--pin",
                "false",
                "--xdp-mode",
                mode,
                "--scaled-rings",
                "--poll-mode",
                poll_mode,
                "--socket",
            ])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("start kxdp-dataplane")?;
        let mut p = KxdpProcess {
            child,
            stream: control::Stream::new(&socket),
            socket,
            running: true,
        };
        let start = Instant::now();
        // Bound: KXDP_START.
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "kxdp-dataplane exited with {status} before it was ready; see {}",
                    log.display()
                );
            }
            if p.socket.exists() {
                if let Some(tid) = thread_named(p.pid(), "kxdp-worker-0") {
                    let st = Command::new("taskset")
                        .args(["-p", "-c", &core.to_string(), &tid.to_string()])
                        .stdout(Stdio::null())
                        .status()?;
                    if !st.success() {
                        bail!("taskset -p -c {core} {tid} (kxdp's worker) failed: {st}");
                    }
                    break;
                }
            }
            if start.elapsed() > KXDP_START {
                bail!(
                    "kxdp-dataplane was not ready (socket {}, thread kxdp-worker-0) within {KXDP_START:?}; see {}",
                    p.socket.display(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p)
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The share of a core its worker uses over `span` (nothing else is sent meanwhile:
    /// the worker at rest).
    pub fn worker_cpu_share(&self, span: Duration) -> Option<f64> {
        let tid = thread_named(self.pid(), "kxdp-worker-0")?;
        crate::sysinfo::thread_cpu_share(self.pid(), tid, span)
    }

    /// Sends `spec` as `generation` and waits until the dataplane applied it; `None` if
    /// that took longer than `limit`.
    pub fn install(
        &mut self,
        generation: u64,
        spec: &TableSpec,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let started = Instant::now();
        match self
            .stream
            .send(generation, spec, Some(Instant::now() + limit))
        {
            Ok(()) => Ok(Some(started.elapsed())),
            Err(e) if started.elapsed() >= limit => {
                log::warn!("kxdp install: {e}");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The dataplane's counters (worker 0's, one worker), from its control socket.
    pub fn counters(&self) -> Option<Vec<(String, u64)>> {
        let mut client = ctlclient::Client::connect(&self.socket).ok()?;
        client.set_timeout(Duration::from_secs(5)).ok()?;
        Some(client.stats().ok()?.summed())
    }

    /// Stops the process (SIGSTOP): its worker stops polling and leaves its core.
    pub fn suspend(&mut self) {
        if self.running {
            signal(self.pid(), "STOP");
            self.running = false;
        }
    }

    /// Lets it run again (SIGCONT), and waits until its control socket answers.
    pub fn resume(&mut self) {
        if !self.running {
            signal(self.pid(), "CONT");
            self.running = true;
            let start = Instant::now();
            // Bound: 5 s for the socket to answer after SIGCONT.
            while self.counters().is_none() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for KxdpProcess {
    fn drop(&mut self) {
        let pid = self.pid();
        if !self.running {
            signal(pid, "CONT");
        }
        signal(pid, "TERM");
        let start = Instant::now();
        // Bound: KXDP_STOP, then SIGKILL.
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < KXDP_STOP => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_jump_inserts_declare_no_chain() {
        for k in DutKind::ALL {
            assert_eq!(DutKind::parse(k.name()), Some(k));
        }
        let j = jump_inserts();
        assert!(j.contains("-I PREROUTING"));
        assert!(!j.lines().any(|l| l.starts_with(':')));
        assert_eq!(j.matches("COMMIT").count(), 2);
    }

    #[test]
    fn only_counters_that_moved_are_kept() {
        let before = vec![("rx".to_string(), 10), ("tx".to_string(), 5)];
        let after = vec![
            ("rx".to_string(), 15),
            ("tx".to_string(), 5),
            ("new".to_string(), 1),
        ];
        assert_eq!(
            changed(&before, &after),
            vec![("rx".to_string(), 5), ("new".to_string(), 1)]
        );
    }
}
