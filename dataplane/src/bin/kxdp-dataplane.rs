//! `kxdp-dataplane`: attaches to a node's uplink and pod interfaces with AF_XDP, runs one
//! pinned poll-mode worker per queue, and takes its tables from `kxdp-control` over a Unix
//! socket.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dataplane::idle::PollMode;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::startup::{Action, Args, Fault, Step};
use dataplane::state::Shared;
use dataplane::worker::Worker;
use pktio::xsk::{self, XdpMode, XdpProgram, XskConfig, XskDevice};

/// Acts out `--handover-fault` at `step`: `Err` for `fail`; `pause` and `exit` never return.
fn fault_at(fault: Option<Fault>, step: Step) -> Result<()> {
    match fault {
        Some(Fault(s, action)) if s == step => {
            log::warn!("handover fault: {action:?} at {step:?}");
            match action {
                Action::Pause => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
                Action::Exit => std::process::exit(3),
                Action::Fail => bail!("handover fault injected at {step:?}"),
            }
        }
        _ => Ok(()),
    }
}

fn mac_of(ifname: &str) -> Result<[u8; 6]> {
    Ok(dataplane::pods::mac_of(ifname)?)
}

/// The host redirect for the host pair whose kxdp end is `host`: redirecting to its peer
/// (the kernel's end), attached to the egress of `lo` and of the uplink.
fn host_redirect(host: &str, uplink: Option<&str>) -> Result<pktio::xsk::HostRedirect> {
    let path = format!("/sys/class/net/{host}/iflink");
    let peer: u32 = std::fs::read_to_string(&path)
        .with_context(|| format!("read {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("{path}: not an interface index"))?;
    let peer_name = match xsk::ifname_of(peer) {
        Some(name) if peer != xsk::ifindex(host)? => name,
        _ => bail!("--host {host}: not one end of a veth pair in this namespace (its peer, ifindex {peer}, is not here)"),
    };
    let redirect = pktio::xsk::HostRedirect::load(pktio::xsk::HostTarget {
        ifindex: peer,
        dst_mac: mac_of(host)?,
        src_mac: mac_of(&peer_name)?,
    })
    .context("load the host redirect")?;
    for dev in std::iter::once("lo").chain(uplink) {
        redirect
            .attach_egress(xsk::ifindex(dev)?)
            .with_context(|| format!("attach the host redirect to {dev}'s egress"))?;
    }
    log::info!(
        "host redirect: NodePorts on the node's addresses, load-balancer and external IPs from host processes go to {host} through {peer_name}"
    );
    Ok(redirect)
}

fn mtu_of(ifname: &str) -> Result<u16> {
    Ok(dataplane::pods::mtu_of(ifname)?)
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let verbose = args.verbose;
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the causes; the debug form (and a backtrace, if captured) only
            // when asked for.
            if verbose {
                eprintln!("kxdp-dataplane: {e:?}");
            } else {
                eprintln!("kxdp-dataplane: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let mode = args.xdp_mode()?;
    let workers = args.workers();
    // The cores, checked before anything is looked up or attached.
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let cores = args.cores(&available)?;
    let host_pair = match &args.host_pair {
        Some(name) => Some(Arc::new(setup_host_pair(&args, name, workers)?)),
        None => None,
    };
    let host = args
        .host
        .clone()
        .or_else(|| host_pair.as_ref().map(|p| p.kxdp_end().to_string()));
    let mut ports = Vec::new();
    if let Some(up) = &args.uplink {
        ports.push(PortConfig {
            name: up.clone(),
            role: PortRole::Uplink,
            mac: mac_of(up)?,
            mtu: mtu_of(up)?,
        });
    }
    for p in &args.pods {
        ports.push(PortConfig {
            name: p.clone(),
            role: PortRole::Pod,
            mac: mac_of(p)?,
            mtu: mtu_of(p)?,
        });
    }
    if let Some(h) = &host {
        ports.push(PortConfig {
            name: h.clone(),
            role: PortRole::Host,
            mac: mac_of(h)?,
            mtu: mtu_of(h)?,
        });
    }
    if let Some(up) = ports.iter().find(|p| p.role == PortRole::Uplink) {
        let m = up.mac;
        log::info!(
            "uplink {} is this node's VTEP; unless its Node names another MAC, announce \
             kxdp.io/vtep-mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} (and flannel's VtepMAC \
             if flannel nodes must reach it)",
            up.name,
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5]
        );
    }
    if ports.is_empty() {
        bail!("no interfaces: give --uplink and/or --pods");
    }
    let limits = args.limits()?;
    // Everything this process can check alone, before it asks a running dataplane for
    // anything or attaches anywhere.
    for p in &ports {
        let queues = xsk::queue_count(&p.name);
        if queues < workers {
            bail!(
                "{}: {queues} receive queue(s), but --workers {workers} needs one per worker: \
                 give it more queues (ethtool -L {} combined {workers}) or run fewer workers",
                p.name,
                p.name
            );
        }
        if p.role == PortRole::Uplink && queues > workers {
            untranslated_queues(&p.name, queues, workers, args.set_channels)?;
        }
    }
    let cfg = XskConfig {
        frame_count: args.frames,
        runtime_ports: args.max_pods as u32,
        ..XskConfig::default()
    };
    cfg.validate().context("--frames")?;
    let umem = cfg.umem_frames() * u64::from(cfg.frame_size) * u64::from(workers);
    if let Some(available) = mem_available() {
        if umem > available {
            bail!(
                "the workers' frames need {} MiB and only {} MiB are available",
                umem >> 20,
                available >> 20
            );
        }
    }
    if !args.takeover {
        if let Some(pid) = dataplane::server::live_dataplane(&args.socket)
            .with_context(|| format!("look at {}", args.socket.display()))?
        {
            bail!(
                "a dataplane (pid {pid}) already serves {}: stop it first, or replace it with --takeover",
                args.socket.display()
            );
        }
    }
    let access = dataplane::server::Access {
        group: match &args.socket_group {
            Some(g) => Some(
                dataplane::server::group_id(g).with_context(|| format!("--socket-group {g}"))?,
            ),
            None => None,
        },
        control_uid: match &args.control_user {
            Some(u) => {
                Some(dataplane::server::user_id(u).with_context(|| format!("--control-user {u}"))?)
            }
            None => None,
        },
    };
    // The connection table is allocated here, before a running dataplane is asked.
    let shared = Arc::new(Shared::new(ports.clone(), workers as usize, limits));
    let _ = shared.poll_mode.set(args.poll_mode);
    log::info!("workers poll in {} mode", args.poll_mode.name());
    let epoch = Instant::now();
    // Pod interfaces a CNI plugin attached (to this process or a predecessor): found by
    // their aliases, opened by the workers when they start.
    let pods = dataplane::pods::PodPorts::new(workers, mode);
    for (ifname, container) in dataplane::pods::discover() {
        if args.pods.contains(&ifname) {
            continue;
        }
        match pods.preload(&shared, &ifname, &container) {
            Ok(id) => log::info!("pod interface {ifname} (container {container}) found: port {id}"),
            Err(e) => {
                log::warn!("pod interface {ifname} (container {container}) not attached: {e}")
            }
        }
    }
    let server = Arc::new(dataplane::server::ServerState::new(access));
    if server.pods.set(pods).is_err() {
        bail!("pod interfaces set up twice");
    }
    if let Some(up) = &args.uplink {
        // This namespace's routes; a file that cannot be read gives none.
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        let (v4, v6) = (read("/proc/net/route"), read("/proc/net/ipv6_route"));
        let routes = dataplane::routes::UplinkRoutes::from_proc(&v4, &v6, up);
        if routes.is_empty() {
            log::warn!("no route through {up} in this namespace: traffic leaving the cluster goes to the router outside traffic last came from");
        }
        shared.uplink_routes.store(Arc::new(routes));
    }
    let plan = Plan {
        ports: ports.clone(),
        workers,
        mode,
        host: host.clone(),
        host_pair: host_pair.clone(),
        uplink: args.uplink.clone(),
        cfg,
        cores,
        poll_mode: args.poll_mode,
        epoch,
        server: server.clone(),
    };
    let takeover_started = Instant::now();
    let mut attached = if args.takeover {
        let (attached, predecessor) = take_over(&args, &plan, &shared)?;
        // The predecessor has closed our connection; its control socket goes with the
        // rest of the process a moment later.
        let until = Instant::now() + dataplane::handover::DEFAULT_DEADLINE;
        while predecessor > 0
            && Instant::now() < until
            && dataplane::server::live_dataplane(&args.socket)
                .ok()
                .flatten()
                == Some(predecessor)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        attached
    } else {
        plan.attach(&shared)?
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    dataplane::server::serve_with(&args.socket, shared.clone(), epoch, server.clone())
        .with_context(|| format!("serve the control socket {}", args.socket.display()))?;
    log::info!(
        "kxdp-dataplane running: {} ports, {workers} workers, control socket {}",
        ports.len(),
        args.socket.display()
    );
    if args.takeover {
        log::info!(
            "forwarding {:?} after asking for the handover",
            takeover_started.elapsed()
        );
    }
    let (handover_tx, handover_rx) = std::sync::mpsc::channel();
    server.set_handover(handover_tx);
    let deadline = Duration::from_millis(args.handover_deadline_ms);
    // Conntrack expiry off the workers' path; a successor's handover request.
    let mut sweep_from = 0;
    let mut ticks = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match handover_rx.recv_timeout(SWEEP_TICK) {
            Ok(successor) => {
                let started = Instant::now();
                let pid = successor.peer.pid;
                attached.release(&shared);
                let now = epoch.elapsed().as_nanos() as u64;
                let state = dataplane::handover::export(&shared, now);
                match successor.hand_over(&state, deadline) {
                    dataplane::handover::Outcome::Done => {
                        log::info!(
                            "handed over to a successor (pid {pid}) in {:?}: it forwards; exiting",
                            started.elapsed()
                        );
                        return Ok(());
                    }
                    dataplane::handover::Outcome::Resume(why) => {
                        log::warn!(
                            "handover to pid {pid} failed ({why}): taking the interfaces back"
                        );
                        attached = plan.attach_retrying(&shared)?;
                        log::warn!(
                            "forwarding again {:?} after the failed handover began",
                            started.elapsed()
                        );
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = epoch.elapsed().as_nanos() as u64;
        ticks += 1;
        if ticks.is_multiple_of(PRUNE_TICKS) {
            if let Some(pods) = server.pods.get() {
                pods.prune(&shared, now);
            }
        }
        let slice = shared.conntrack.capacity().div_ceil(SWEEP_SLICES);
        sweep_from = shared.conntrack.sweep_expired(now, sweep_from, slice).1;
    }
    attached.release(&shared);
    let _ = std::fs::remove_file(&args.socket);
    if let Some(pair) = host_pair {
        pair.teardown()?;
    }
    log::info!("kxdp-dataplane stopped; XDP programs detached");
    Ok(())
}

/// `--takeover`: asks the dataplane on `--socket` for its state and interfaces, attaches,
/// and tells it so. A failure at any step lets it carry on (see `dataplane::handover`).
/// Returns the attachment and the predecessor's pid.
fn take_over(args: &Args, plan: &Plan, shared: &Arc<Shared>) -> Result<(Attachment, i32)> {
    let started = Instant::now();
    let mut predecessor = dataplane::handover::request(&args.socket, args.handover_version)
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))?;
    fault_at(args.handover_fault, Step::Requested)?;
    let state = predecessor
        .state()
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))?;
    let now = plan.epoch.elapsed().as_nanos() as u64;
    let imported = dataplane::handover::import(shared, state, now)
        .map_err(|e| anyhow::anyhow!("takeover: {e}"));
    let taken =
        match imported.and_then(|t| fault_at(args.handover_fault, Step::Received).map(|()| t)) {
            Ok(taken) => taken,
            Err(e) => {
                predecessor.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
    log::info!(
        "took over {taken} connections and the tables (generation {}) in {:?}",
        shared.tables.load().generation,
        started.elapsed()
    );
    let attached = match plan.attach_retrying(shared) {
        Ok(a) => a,
        Err(e) => {
            predecessor.abort(&format!("{e:#}"));
            return Err(e.context("takeover: attach (the running dataplane resumes)"));
        }
    };
    if let Err(e) = fault_at(args.handover_fault, Step::Attached) {
        attached.release(shared);
        predecessor.abort(&format!("{e:#}"));
        return Err(e);
    }
    let pid = predecessor.pid;
    if let Err(e) = predecessor.done() {
        log::warn!("takeover: {e}");
    }
    Ok((attached, pid))
}

/// How often the main thread sweeps a slice of the connection table (and looks for a
/// successor's handover request).
const SWEEP_TICK: Duration = Duration::from_millis(10);

/// Slices of the table, one per tick: every entry is looked at once a second. Small, so
/// that a tick takes the core it shares for tens of microseconds: a fifth of a 1M-entry
/// table every 200 ms took 0.85–1.2 ms at a time, empty, and about 90 ms when most entries
/// are live, delaying whatever the core was running (on a 2-core node, a worker).
const SWEEP_SLICES: usize = 100;

/// Ticks between looks for pod interfaces that vanished without a CNI DEL (200 ms).
const PRUNE_TICKS: u64 = 20;

/// What attaching means for this process: the same every time it attaches (at start, and
/// again after a successor failed).
struct Plan {
    ports: Vec<PortConfig>,
    workers: u32,
    mode: XdpMode,
    host: Option<String>,
    /// The host pair this process set up (`--host-pair`): its routes follow the tables.
    host_pair: Option<Arc<dataplane::hostnet::HostPair>>,
    uplink: Option<String>,
    cfg: XskConfig,
    cores: Vec<Option<usize>>,
    poll_mode: PollMode,
    epoch: Instant,
    /// The control socket's server: its pod interfaces are attached with the rest.
    server: Arc<dataplane::server::ServerState>,
}

/// The interfaces as this process holds them: XDP programs, AF_XDP sockets (owned by the
/// workers), the host redirect (owned by the install hook) and the workers.
struct Attachment {
    programs: Vec<Arc<XdpProgram>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    server: Arc<dataplane::server::ServerState>,
}

impl Attachment {
    /// Stops the workers and lets go of every interface (sockets closed, programs
    /// detached, host redirect removed).
    fn release(self, shared: &Shared) {
        self.stop.store(true, Ordering::Release);
        shared.wakers.wake_all();
        for h in self.workers {
            let _ = h.join();
        }
        // The install hook holds the uplink's program and the host redirect.
        shared.installs.set_install_hook(None);
        drop(self.programs);
        if let Some(pods) = self.server.pods.get() {
            pods.release();
        }
    }
}

impl Plan {
    /// [`Plan::attach`], retried for up to 5 s: a predecessor or successor that just went
    /// away may still hold an interface for a moment.
    fn attach_retrying(&self, shared: &Arc<Shared>) -> Result<Attachment> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match self.attach(shared) {
                Ok(a) => return Ok(a),
                Err(e) if Instant::now() < until => {
                    log::debug!("attach: {e:#}; trying again");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Attaches to every interface and starts the workers. On an error nothing stays
    /// attached.
    fn attach(&self, shared: &Arc<Shared>) -> Result<Attachment> {
        let (ports, workers) = (&self.ports, self.workers);
        // One XDP program per interface, steering queue i to worker i's socket.
        let mut programs = Vec::new();
        let mut ifindexes = Vec::new();
        for p in ports {
            let idx = xsk::ifindex(&p.name)?;
            // The uplink's program takes only what kxdp serves and passes the node's own
            // traffic to the kernel; pod and host ports are kxdp's alone.
            let prog = if p.role == PortRole::Uplink {
                XdpProgram::attach_filter(idx, workers, self.mode)
            } else {
                XdpProgram::attach(idx, workers, self.mode)
            }
            .with_context(|| format!("attach XDP to {}", p.name))?;
            log::info!(
                "{}: XDP attached in {:?} mode{}",
                p.name,
                prog.mode(),
                if p.role == PortRole::Uplink {
                    " (filtering: the node's own traffic passes to the kernel)"
                } else {
                    ""
                }
            );
            programs.push(Arc::new(prog));
            ifindexes.push(idx);
        }
        let mut devices = Vec::new();
        for w in 0..workers {
            let pairs: Vec<(u32, u32)> = ifindexes.iter().map(|i| (*i, w)).collect();
            let dev = XskDevice::new(&pairs, &self.cfg)
                .with_context(|| format!("AF_XDP sockets for worker {w}"))?;
            for (i, prog) in programs.iter().enumerate() {
                prog.insert(w, dev.socket_fd(i))
                    .with_context(|| format!("steer {} queue {w}", ports[i].name))?;
            }
            devices.push(dev);
        }
        self.install_hook(shared, &programs);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (w, dev) in devices.into_iter().enumerate() {
            let worker_shared = shared.clone();
            let worker_stop = stop.clone();
            let core = self
                .cores
                .get(w)
                .copied()
                .flatten()
                .map(|id| core_affinity::CoreId { id });
            let (epoch, poll_mode) = (self.epoch, self.poll_mode);
            let spawned = std::thread::Builder::new()
                .name(format!("kxdp-worker-{w}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            log::warn!("worker {w}: could not pin to core {}", core.id);
                        }
                    }
                    log::info!("worker {w} polling {} ports", dev_ports(&dev));
                    Worker::new(w, dev, worker_shared).run(&worker_stop, epoch, poll_mode);
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    Attachment {
                        programs,
                        workers: handles,
                        stop,
                        server: self.server.clone(),
                    }
                    .release(shared);
                    return Err(e).context(format!("start worker {w}"));
                }
            }
        }
        // Pod interfaces attached at run time (found at start, or attached before a
        // handover that failed): the new workers open them, then they are steered.
        if let Some(pods) = self.server.pods.get() {
            pods.reattach(shared, self.epoch.elapsed().as_nanos() as u64);
        }
        Ok(Attachment {
            programs,
            workers: handles,
            stop,
            server: self.server.clone(),
        })
    }

    /// Keeps the uplink's XDP filter and the host redirect in step with the tables: once
    /// now, then on every install.
    fn install_hook(&self, shared: &Shared, programs: &[Arc<XdpProgram>]) {
        // Host processes' packets for NodePorts on the node's addresses and for
        // load-balancer and external IPs: taken on the egress of lo and the uplink to the
        // host pair. Without it (a kernel older than 6.6 has no tcx) the rest still works:
        // say what is missing and go on.
        let host_redirect = match &self.host {
            Some(h) => match host_redirect(h, self.uplink.as_deref()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    log::warn!(
                        "no host redirect ({e:#}): host processes will not reach NodePorts on the node's addresses, nor load-balancer and external IPs; pods, ClusterIPs and everything else are served"
                    );
                    None
                }
            },
            None => None,
        };
        let uplink = self
            .ports
            .iter()
            .position(|p| p.role == PortRole::Uplink)
            .map(|i| (programs[i].clone(), self.ports[i].mac));
        let host_pair = self.host_pair.clone();
        if uplink.is_none() && host_redirect.is_none() && host_pair.is_none() {
            return;
        }
        let limits = shared.limits.clone();
        let sync = move |t: &dataplane::tables::Tables| {
            if let Some((uplink, mac)) = &uplink {
                let want = dataplane::steering::uplink_filter(t, &limits, *mac);
                if let Err(e) = uplink.replace_tables(&want) {
                    log::error!(
                        "uplink XDP filter not updated for generation {}: {e}",
                        t.generation
                    );
                }
            }
            if let Some(r) = &host_redirect {
                if let Err(e) = r.replace_ports(&dataplane::steering::host_redirect_ports(t)) {
                    log::error!(
                        "host redirect not updated for generation {}: {e}",
                        t.generation
                    );
                }
            }
            // Generation 0 is the empty start-up table, not control's word on the
            // cluster's networks.
            if let Some(pair) = host_pair.as_ref().filter(|_| t.generation > 0) {
                let routes = dataplane::hostnet::routes_of(&t.spec);
                if let Err(e) = pair.sync_routes(&routes) {
                    log::error!(
                        "host pair routes not updated for generation {}: {e}",
                        t.generation
                    );
                }
            }
        };
        sync(&shared.tables.load());
        shared.installs.set_install_hook(Some(Box::new(sync)));
    }
}

/// `--host-pair NAME`: the pair, one queue per worker, its routes' sources the uplink's
/// addresses. Not while another dataplane runs, unless this one takes over from it: a pair
/// of another shape would be recreated under it.
fn setup_host_pair(args: &Args, name: &str, workers: u32) -> Result<dataplane::hostnet::HostPair> {
    if !args.takeover {
        if let Some(pid) = dataplane::server::live_dataplane(&args.socket)
            .with_context(|| format!("look at {}", args.socket.display()))?
        {
            bail!(
                "a dataplane (pid {pid}) already serves {}: stop it first, or replace it with --takeover",
                args.socket.display()
            );
        }
    }
    let sources = match args.uplink.as_deref() {
        Some(up) => dataplane::hostnet::node_addresses(up)?,
        None => Vec::new(),
    };
    if sources.is_empty() {
        log::warn!("--host-pair {name}: no node address on the uplink; host processes get no routes to the pod networks and Services");
    }
    let spec = dataplane::hostnet::HostPairSpec::named(name, workers, sources)?;
    Ok(dataplane::hostnet::HostPair::setup(&spec)?)
}

/// The uplink has receive queues no worker serves: what arrives there would pass to the
/// kernel untranslated. With `--set-channels` its channel count becomes the worker count;
/// else refuse, naming the fixes.
fn untranslated_queues(uplink: &str, queues: u32, workers: u32, set: bool) -> Result<()> {
    let fixes = format!(
        "give it one queue per worker (ethtool -L {uplink} combined {workers}, or rx {workers}          where the driver counts RX channels), run --workers {queues}, or let kxdp-dataplane          set it with --set-channels"
    );
    if !set {
        bail!("{uplink}: {queues} receive queues, but only {workers} worker(s) serve them: packets on queues {workers}..{} would pass to the kernel untranslated: {fixes}", queues - 1);
    }
    let index = xsk::ifindex(uplink)?;
    let channels = netconf::channels::get(index)
        .with_context(|| format!("--set-channels: read {uplink}'s channels"))?;
    let change = channels.with_rx_queues(workers).with_context(|| {
        format!("--set-channels: {uplink} has {channels:?}, which kxdp does not change by itself: {fixes}")
    })?;
    netconf::channels::set(index, change)
        .with_context(|| format!("--set-channels: set {uplink}'s channels to {change:?}"))?;
    let now = xsk::queue_count(uplink);
    if now != workers {
        bail!("--set-channels: {uplink} has {now} receive queues after {change:?}: {fixes}");
    }
    log::warn!(
        "{uplink}: channels set from {channels:?} to {change:?} for {workers} worker(s); not restored at exit"
    );
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn dev_ports(dev: &XskDevice) -> usize {
    use pktio::Device;
    dev.port_count()
}
