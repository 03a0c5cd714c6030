//! `kxdp-dataplane`: attaches to a node's uplink and pod interfaces with AF_XDP, runs one
//! pinned poll-mode worker per queue, and takes its tables from `kxdp-control` over a Unix
//! socket.

#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dataplane::idle::PollMode;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::startup::{Action, Args, Fault, Step};
use dataplane::state::Shared;
use dataplane::steering::XdpSetup;
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
    // A successor shares the cores with its predecessor's workers until it takes over:
    // it prepares (its tables, its programs, its connection table's memory) at a lower
    // priority, and is back at its own before its workers start (`take_over`).
    let own_nice = pktio::sched::nice().unwrap_or(0);
    if args.takeover {
        if let Err(e) = pktio::sched::set_nice((own_nice + PREPARE_NICE).min(19)) {
            log::debug!("takeover: preparing at the usual priority ({e})");
        }
    }
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
        stamped: args.measure_ring_wait,
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
    if args.worker_priority.is_some() && args.poll_mode == PollMode::Busy {
        log::warn!(
            "--worker-priority with --poll-mode busy: each worker keeps its core from every ordinary thread, ksoftirqd included (the kernel leaves them 5% of it, in slices that stall the worker and whatever they were sending); give the workers cores of their own (--cores) whose softirqs run elsewhere"
        );
    }
    let epoch = Instant::now();
    // Pod interfaces a CNI plugin attached (to this process or a predecessor): found by
    // their aliases, opened by the workers when they start.
    let xdp = XdpSetup {
        queues: workers,
        mode,
        stamp: cfg.stamped,
    };
    let pods = dataplane::pods::PodPorts::new(xdp);
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
        xdp,
        host: host.clone(),
        host_pair: host_pair.clone(),
        uplink: args.uplink.clone(),
        cfg,
        cores,
        poll_mode: args.poll_mode,
        worker_priority: args.worker_priority,
        busy_poll: args.busy_poll_budget,
        epoch,
        server: server.clone(),
    };
    let takeover_started = Instant::now();
    let mut attached = if args.takeover {
        let (attached, predecessor) = take_over(&args, &plan, &shared, own_nice)?;
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
            Ok(successor) => match hand_over(successor, attached, &plan, &shared, deadline)? {
                Some(still) => attached = still,
                None => return Ok(()),
            },
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

/// The running process's side of a handover (`dataplane::handover`): offers its tables
/// while forwarding, then stops and hands over its state with its rings, or releases its
/// interfaces when the successor cannot take the rings. `None` once the successor
/// forwards (this process exits); the attachment to go on with otherwise.
fn hand_over(
    mut successor: dataplane::handover::Successor,
    attached: Attachment,
    plan: &Plan,
    shared: &Arc<Shared>,
    deadline: Duration,
) -> Result<Option<Attachment>> {
    let started = Instant::now();
    let pid = successor.peer.pid;
    let offered = shared.tables.load().generation;
    let offer = dataplane::handover::offer(shared, plan.shape(shared));
    let umems: Vec<_> = attached.umems.iter().map(AsFd::as_fd).collect();
    let rings = match successor.offer(&offer, &umems, plan.cfg.stamped, deadline) {
        Ok(rings) => rings,
        Err(why) => {
            log::warn!("handover to pid {pid} abandoned ({why}); forwarding throughout");
            return Ok(Some(attached));
        }
    };
    let mut stopped = Some(attached.stop(shared));
    let stopped_at = Instant::now();
    let handed = match &mut stopped {
        Some(s) if rings => s.rings(plan, shared),
        _ => None,
    };
    let in_place = handed.is_some();
    let outcome = match handed {
        Some((handed, fds)) => {
            let now = plan.epoch.elapsed().as_nanos() as u64;
            let state = dataplane::handover::export(shared, now, offered, Some(handed));
            successor.hand_over(&state, &fds, deadline)
        }
        None => {
            // Nothing in place: the successor attaches again, so let go first.
            if let Some(s) = stopped.take() {
                s.release(shared);
            }
            let now = plan.epoch.elapsed().as_nanos() as u64;
            let state = dataplane::handover::export(shared, now, offered, None);
            successor.hand_over(&state, &[], deadline)
        }
    };
    match outcome {
        dataplane::handover::Outcome::Done => {
            log::info!(
                "handed over to a successor (pid {pid}) in {:?}{}: it forwards; exiting",
                started.elapsed(),
                if in_place {
                    format!(
                        ", the rings in place (its word came {:?} after the workers stopped)",
                        stopped_at.elapsed()
                    )
                } else {
                    String::new()
                }
            );
            Ok(None)
        }
        dataplane::handover::Outcome::Resume(why) => {
            log::warn!("handover to pid {pid} failed ({why}): taking the interfaces back");
            if let Some(s) = stopped.take() {
                s.release(shared);
            }
            let again = plan.attach_retrying(shared)?;
            log::warn!(
                "forwarding again {:?} after the failed handover began",
                started.elapsed()
            );
            Ok(Some(again))
        }
    }
}

/// `--takeover`: asks the dataplane on `--socket` for its tables, prepares, then asks for
/// its state with its rings in place (or its interfaces released, when this process
/// cannot take the rings as they are), takes over, and tells it so. A failure at any step
/// lets it carry on (see `dataplane::handover`). Returns the attachment and the
/// predecessor's pid.
fn take_over(
    args: &Args,
    plan: &Plan,
    shared: &Arc<Shared>,
    own_nice: i32,
) -> Result<(Attachment, i32)> {
    let started = Instant::now();
    let mut predecessor = dataplane::handover::request(&args.socket, args.handover_version)
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))?;
    fault_at(args.handover_fault, Step::Requested)?;
    let (offer, umems) = predecessor
        .offer()
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))?;
    let now = plan.epoch.elapsed().as_nanos() as u64;
    let shape = dataplane::handover::import_offer(shared, offer, now)
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))
        .and_then(|shape| fault_at(args.handover_fault, Step::Received).map(|()| shape));
    let shape = match shape {
        Ok(shape) => shape,
        Err(e) => {
            predecessor.abort(&format!("{e:#}"));
            return Err(e);
        }
    };
    let prepared = match plan.fits(&shape, umems.len()) {
        Ok(()) => match plan.prepare(shared, umems) {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!("takeover: the rings cannot be taken in place ({e:#}): the interfaces are attached again");
                None
            }
        },
        Err(why) => {
            log::warn!("takeover: the rings cannot be taken in place ({why}): the interfaces are attached again");
            None
        }
    };
    let asked = Instant::now();
    let (state, fds) = predecessor
        .take(prepared.is_some(), plan.cfg.stamped)
        .map_err(|e| anyhow::anyhow!("takeover: {e}"))?;
    let now = plan.epoch.elapsed().as_nanos() as u64;
    let (taken, rings) = match dataplane::handover::import(shared, state, now) {
        Ok(t) => t,
        Err(e) => {
            predecessor.abort(&e);
            bail!("takeover: {e}");
        }
    };
    let in_place = rings.is_some() && prepared.is_some();
    // The workers inherit this thread's priority: its own again.
    if let Err(e) = pktio::sched::set_nice(own_nice) {
        log::warn!("takeover: priority not restored to nice {own_nice} ({e}): the workers run at the preparing priority");
    }
    let attached = match (prepared, rings) {
        (Some(prepared), Some(rings)) => plan.adopt(shared, prepared, rings, fds, asked),
        _ => plan.attach_retrying(shared),
    };
    let attached = match attached {
        Ok(a) => a,
        Err(e) => {
            predecessor.abort(&format!("{e:#}"));
            return Err(e.context("takeover: attach (the running dataplane resumes)"));
        }
    };
    log::info!(
        "took over {taken} connections, the tables (generation {}) and {} in {:?}",
        shared.tables.load().generation,
        if in_place {
            "the rings in place"
        } else {
            "the interfaces, attached again"
        },
        started.elapsed()
    );
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

/// A successor's XDP programs, loaded and not attached, ready to take over the running
/// process's links: one per port given at start, in order, and one per pod port.
struct Prepared {
    /// The workers' UMEMs, mapped.
    umems: Vec<pktio::xsk::HandedUmem>,
    programs: Vec<Arc<XdpProgram>>,
    pods: Vec<(pktio::PortId, XdpProgram)>,
}

/// How much lower a successor's priority is while it prepares (nice levels).
const PREPARE_NICE: i32 = 10;

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

/// What a port's program sends to kxdp: the uplink's only what kxdp serves (the node's own
/// traffic passes to the kernel); pod and host ports are kxdp's alone.
fn steering(role: PortRole) -> xsk::Steering {
    if role == PortRole::Uplink {
        xsk::Steering::Filter
    } else {
        xsk::Steering::RedirectAll
    }
}

/// What attaching means for this process: the same every time it attaches (at start, and
/// again after a successor failed).
struct Plan {
    ports: Vec<PortConfig>,
    workers: u32,
    /// How programs are loaded (one XSKMAP slot per worker).
    xdp: XdpSetup,
    host: Option<String>,
    /// The host pair this process set up (`--host-pair`): its routes follow the tables.
    host_pair: Option<Arc<dataplane::hostnet::HostPair>>,
    uplink: Option<String>,
    cfg: XskConfig,
    cores: Vec<Option<usize>>,
    poll_mode: PollMode,
    /// `--worker-priority`: the workers' SCHED_FIFO priority.
    worker_priority: Option<u8>,
    /// `--busy-poll-budget`: the kernel's preferred busy polling.
    busy_poll: Option<u16>,
    epoch: Instant,
    /// The control socket's server: its pod interfaces are attached with the rest.
    server: Arc<dataplane::server::ServerState>,
}

/// The interfaces as this process holds them: XDP programs, AF_XDP sockets (owned by the
/// workers), the host redirect (owned by the install hook) and the workers.
struct Attachment {
    programs: Vec<Arc<XdpProgram>>,
    /// Each returns its device when it stops.
    workers: Vec<std::thread::JoinHandle<XskDevice>>,
    /// The workers' UMEMs (duplicates), offered to a successor while they run.
    umems: Vec<std::os::fd::OwnedFd>,
    stop: Arc<AtomicBool>,
    server: Arc<dataplane::server::ServerState>,
}

/// An attachment whose workers stopped: everything still held, nothing forwarding.
struct Stopped {
    /// By worker; `None` for one that panicked.
    devices: Vec<Option<XskDevice>>,
    programs: Vec<Arc<XdpProgram>>,
    pods: Vec<(pktio::PortId, XdpProgram)>,
}

impl Attachment {
    /// Stops the workers and takes their devices back; the interfaces stay attached.
    fn stop(self, shared: &Shared) -> Stopped {
        self.stop.store(true, Ordering::Release);
        shared.wakers.wake_all();
        let devices = self.workers.into_iter().map(|h| h.join().ok()).collect();
        let pods = self
            .server
            .pods
            .get()
            .map(|p| p.take_programs())
            .unwrap_or_default();
        Stopped {
            devices,
            programs: self.programs,
            pods,
        }
    }

    /// Stops the workers and lets go of every interface (sockets closed, programs
    /// detached, host redirect removed).
    fn release(self, shared: &Shared) {
        self.stop(shared).release(shared);
    }
}

impl Stopped {
    /// Lets go of every interface.
    fn release(self, shared: &Shared) {
        // The install hook holds the uplink's program and the host redirect.
        shared.installs.set_install_hook(None);
        drop(self.devices);
        drop(self.pods);
        drop(self.programs);
    }

    /// The rings for a successor: every device and link as it travels, with their
    /// descriptors in order. `None` if a worker is gone (its device with it).
    fn rings(
        &mut self,
        plan: &Plan,
        shared: &Shared,
    ) -> Option<(nat::wire::HandedRings, Vec<std::os::fd::BorrowedFd<'_>>)> {
        let mut fds = Vec::new();
        let mut devices = Vec::new();
        for dev in &mut self.devices {
            let (state, dev_fds) = dev.as_mut()?.handover();
            devices.push(dataplane::handover::handed_device(state));
            fds.extend(dev_fds);
        }
        let ports = shared.ports.load();
        let statics =
            self.programs.iter().zip(&plan.ports).map(|(prog, p)| {
                Some((prog.as_ref(), p.name.clone(), xsk::ifindex(&p.name).ok()?))
            });
        let pods = self.pods.iter().map(|(id, prog)| {
            let port = ports.port(*id)?;
            Some((prog, port.cfg.name.clone(), port.pod.as_ref()?.ifindex))
        });
        let mut links = Vec::new();
        for (prog, name, ifindex) in statics.chain(pods).flatten() {
            let Some(fd) = prog.link_fd() else { continue };
            links.push(nat::wire::HandedLink {
                name,
                ifindex,
                native: prog.mode() == XdpMode::Native,
            });
            fds.push(fd);
        }
        Some((nat::wire::HandedRings { devices, links }, fds))
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
        let ports = &self.ports;
        // One XDP program per interface, steering queue i to worker i's socket.
        let mut programs = Vec::new();
        let mut ifindexes = Vec::new();
        for p in ports {
            let idx = xsk::ifindex(&p.name)?;
            let prog = self
                .xdp
                .attach(idx, steering(p.role))
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
        for w in 0..self.workers {
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
        let attached = self.start_workers(shared, programs, devices, Vec::new())?;
        // Pod interfaces attached at run time (found at start, or attached before a
        // handover that failed): the new workers open them, then they are steered.
        if let Some(pods) = self.server.pods.get() {
            pods.reattach(shared, self.epoch.elapsed().as_nanos() as u64);
        }
        Ok(attached)
    }

    /// Starts one worker per device (`opened[w]`: pod ports worker `w`'s device has open
    /// already, with their sockets). On an error nothing stays attached.
    fn start_workers(
        &self,
        shared: &Arc<Shared>,
        programs: Vec<Arc<XdpProgram>>,
        devices: Vec<XskDevice>,
        mut opened: Vec<Vec<(pktio::PortId, std::os::fd::RawFd)>>,
    ) -> Result<Attachment> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        // Without duplicates of the UMEMs a handover releases the interfaces instead.
        let umems = devices
            .iter()
            .map(|d| d.umem_fd().try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()
            .unwrap_or_else(|e| {
                log::warn!("the UMEMs' descriptors not duplicated ({e}): a handover will release the interfaces");
                Vec::new()
            });
        opened.resize_with(devices.len(), Vec::new);
        for ((w, mut dev), opened) in devices.into_iter().enumerate().zip(opened) {
            match self.busy_poll {
                Some(budget) => busy_poll(w, &mut dev, budget, shared),
                // Sockets taken over keep what their predecessor set: off, as asked (a
                // kernel without the options has nothing to turn off).
                None => {
                    let _ = dev.set_busy_poll(None);
                }
            }
            let worker_shared = shared.clone();
            let worker_stop = stop.clone();
            let core = self
                .cores
                .get(w)
                .copied()
                .flatten()
                .map(|id| core_affinity::CoreId { id });
            let (epoch, poll_mode, priority) = (self.epoch, self.poll_mode, self.worker_priority);
            let measure_wait = self.xdp.stamp;
            let spawned = std::thread::Builder::new()
                .name(format!("kxdp-worker-{w}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            log::warn!("worker {w}: could not pin to core {}", core.id);
                        }
                    }
                    if let Some(p) = priority {
                        match pktio::sched::set_fifo(i32::from(p)) {
                            Ok(()) => log::info!("worker {w}: SCHED_FIFO priority {p}"),
                            Err(e) => log::warn!(
                                "worker {w}: SCHED_FIFO priority {p} refused ({e}): an ordinary thread"
                            ),
                        }
                    }
                    log::info!("worker {w} polling {} ports", dev_ports(&dev));
                    let mut worker = Worker::new(w, dev, worker_shared);
                    worker.measure_ring_wait(measure_wait);
                    for (id, fd) in opened {
                        worker.opened_already(id, fd);
                    }
                    worker.run(&worker_stop, epoch, poll_mode).into_device()
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    Attachment {
                        programs,
                        workers: handles,
                        umems,
                        stop,
                        server: self.server.clone(),
                    }
                    .release(shared);
                    return Err(e).context(format!("start worker {w}"));
                }
            }
        }
        Ok(Attachment {
            programs,
            workers: handles,
            umems,
            stop,
            server: self.server.clone(),
        })
    }

    /// What this process's rings look like, for a successor.
    fn shape(&self, shared: &Shared) -> nat::wire::RingShape {
        let statics = self
            .ports
            .iter()
            .filter_map(|p| Some((p.name.clone(), xsk::ifindex(&p.name).ok()?)));
        let ports = shared.ports.load();
        let pods = ports
            .pods()
            .filter_map(|(_, p)| Some((p.cfg.name.clone(), p.pod.as_ref()?.ifindex)));
        nat::wire::RingShape {
            workers: self.workers,
            sizes: dataplane::handover::ring_sizes(&self.cfg),
            interfaces: statics.chain(pods).collect(),
        }
    }

    /// Whether this process can take over rings of `shape` (with `umems` UMEMs) in place:
    /// as many workers, the same sizes, and every interface given at start among the
    /// predecessor's.
    fn fits(&self, shape: &nat::wire::RingShape, umems: usize) -> Result<(), String> {
        if shape.workers != self.workers {
            return Err(format!(
                "{} workers there, {} here",
                shape.workers, self.workers
            ));
        }
        if umems != self.workers as usize {
            return Err(format!(
                "{umems} UMEMs offered for {} workers",
                self.workers
            ));
        }
        let here = dataplane::handover::ring_sizes(&self.cfg);
        if shape.sizes != here {
            return Err(format!("its rings are {:?}, here {here:?}", shape.sizes));
        }
        for p in &self.ports {
            let ifindex = xsk::ifindex(&p.name).map_err(|e| e.to_string())?;
            if !shape.interfaces.contains(&(p.name.clone(), ifindex)) {
                return Err(format!("it does not serve {}", p.name));
            }
        }
        Ok(())
    }

    /// Maps the predecessor's `umems`, loads the XDP programs to swap into its links,
    /// without attaching them, and fills the uplink's filter and the host redirect from the
    /// tables (the offer's): everything that can be done while the predecessor still
    /// forwards.
    fn prepare(&self, shared: &Arc<Shared>, umems: Vec<std::os::fd::OwnedFd>) -> Result<Prepared> {
        let umems = umems
            .into_iter()
            .map(|fd| pktio::xsk::HandedUmem::map(fd, &self.cfg))
            .collect::<Result<Vec<_>, _>>()
            .context("map the offered UMEMs")?;
        let mut programs = Vec::new();
        for p in &self.ports {
            let idx = xsk::ifindex(&p.name)?;
            let prog = self
                .xdp
                .load(idx, steering(p.role))
                .with_context(|| format!("load XDP for {}", p.name))?;
            programs.push(Arc::new(prog));
        }
        let mut pods = Vec::new();
        for (id, port) in shared.ports.load().pods() {
            let ifindex = port.pod.as_ref().map_or(0, |p| p.ifindex);
            let prog = self
                .xdp
                .load(ifindex, xsk::Steering::RedirectAll)
                .with_context(|| format!("load XDP for pod interface {}", port.cfg.name))?;
            pods.push((id, prog));
        }
        self.install_hook(shared, &programs);
        Ok(Prepared {
            umems,
            programs,
            pods,
        })
    }

    /// Takes over a predecessor's `rings` with their descriptors `fds`: its devices with
    /// their sockets at this process's port ids, steered by the prepared programs, which
    /// then take over its links; then the workers start where the predecessor's stopped.
    fn adopt(
        &self,
        shared: &Arc<Shared>,
        prepared: Prepared,
        rings: nat::wire::HandedRings,
        fds: Vec<std::os::fd::OwnedFd>,
        asked: Instant,
    ) -> Result<Attachment> {
        let Prepared {
            umems,
            programs,
            pods,
        } = prepared;
        if rings.devices.len() != self.workers as usize {
            bail!(
                "{} devices handed for {} workers",
                rings.devices.len(),
                self.workers
            );
        }
        // Every port by interface index: those given at start, then the pods.
        let mut by_ifindex = std::collections::HashMap::new();
        for (id, p) in self.ports.iter().enumerate() {
            by_ifindex.insert(xsk::ifindex(&p.name)?, id);
        }
        for (id, port) in shared.ports.load().pods() {
            if let Some(pod) = &port.pod {
                by_ifindex.insert(pod.ifindex, id);
            }
        }
        let mut fds = fds.into_iter();
        let mut devices = Vec::new();
        let mut opened = Vec::new();
        for ((w, handed), umem) in rings.devices.into_iter().enumerate().zip(umems) {
            let dev_fds: Vec<_> = fds.by_ref().take(handed.sockets.len()).collect();
            let place = |ifindex: u32, queue: u32| {
                (queue as usize == w)
                    .then(|| by_ifindex.get(&ifindex).copied())
                    .flatten()
            };
            let dev = XskDevice::adopt(
                dataplane::handover::device_handover(handed),
                umem,
                dev_fds,
                place,
            )
            .with_context(|| format!("take over worker {w}'s device"))?;
            for (i, prog) in programs.iter().enumerate() {
                let fd = dev.port_fd(i).with_context(|| {
                    format!("worker {w}: no socket handed for {}", self.ports[i].name)
                })?;
                prog.insert(w as u32, fd)
                    .with_context(|| format!("steer {} queue {w}", self.ports[i].name))?;
            }
            let mut pods_open = Vec::new();
            for (id, prog) in &pods {
                if let Some(fd) = dev.port_fd(*id) {
                    prog.insert(w as u32, fd)
                        .with_context(|| format!("steer pod port {id} queue {w}"))?;
                    pods_open.push((*id, fd));
                }
            }
            opened.push(pods_open);
            devices.push(dev);
        }
        // The workers start at once: the predecessor's programs steer to these very
        // sockets until the links run this process's programs.
        let attached = self.start_workers(shared, programs.clone(), devices, opened)?;
        log::info!(
            "workers forwarding on the handed rings {:?} after the state was asked for",
            asked.elapsed()
        );
        let pods: std::collections::HashMap<_, _> = pods.into_iter().collect();
        let taken = (|| -> Result<()> {
            for (link, fd) in rings.links.into_iter().zip(fds) {
                let mode = if link.native {
                    XdpMode::Native
                } else {
                    XdpMode::Generic
                };
                let prog = match by_ifindex.get(&link.ifindex).copied() {
                    Some(id) if id < programs.len() => Some(programs[id].as_ref()),
                    Some(id) => pods.get(&id),
                    None => None,
                };
                match prog {
                    Some(prog) => prog
                        .take_link(fd, mode)
                        .with_context(|| format!("take over {}'s XDP link", link.name))?,
                    None => log::warn!(
                        "{}: handed over but not served here; it goes back to the kernel",
                        link.name
                    ),
                }
            }
            if let Some((_, p)) = programs
                .iter()
                .zip(&self.ports)
                .find(|(prog, _)| prog.link_fd().is_none())
            {
                bail!("no XDP link handed over for {}", p.name);
            }
            Ok(())
        })();
        if let Err(e) = taken {
            attached.release(shared);
            return Err(e);
        }
        if let Some(server_pods) = self.server.pods.get() {
            for (id, prog) in pods {
                if prog.link_fd().is_some() {
                    server_pods.adopt(id, prog);
                } else {
                    log::warn!("pod port {id}: no link handed over; not steered");
                }
            }
        }
        Ok(attached)
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

/// Turns preferred busy polling on for worker `w`'s sockets, and says which of them it
/// does nothing for (no NAPI id: veth, generic XDP).
fn busy_poll(w: usize, dev: &mut XskDevice, budget: u16, shared: &Shared) {
    match dev.set_busy_poll(Some(budget)) {
        Ok(ids) => {
            let ports = shared.ports.load();
            let name = |id| {
                ports
                    .port(id)
                    .map_or_else(|| format!("port {id}"), |p| p.cfg.name.clone())
            };
            let (with, without): (Vec<_>, Vec<_>) =
                ids.into_iter().partition(|&(_, napi)| napi != 0);
            if !with.is_empty() {
                let with: Vec<String> = with
                    .iter()
                    .map(|&(id, napi)| format!("{} (NAPI {napi})", name(id)))
                    .collect();
                log::info!(
                    "worker {w}: preferred busy polling, budget {budget}: {}",
                    with.join(", ")
                );
            }
            if !without.is_empty() {
                let without: Vec<String> = without.iter().map(|&(id, _)| name(id)).collect();
                log::warn!(
                    "worker {w}: busy polling does nothing on {}: the kernel knows no NAPI instance for their sockets (veth and generic XDP give none); it receives for them in its softirq as without",
                    without.join(", ")
                );
            }
        }
        Err(e) => log::warn!("worker {w}: busy polling refused ({e}): the worker polls without it"),
    }
}

fn dev_ports(dev: &XskDevice) -> usize {
    use pktio::Device;
    dev.port_count()
}
