//! `kxdp-dataplane`'s command line: its arguments, the parsing of each value, and the
//! checks that need nothing but the arguments (the XDP mode, the limits, which core each
//! worker gets). The binary does what they say, in the order it starts; tests reach them
//! here without starting anything.

use anyhow::{bail, Result};
use clap::Parser;
use pktio::xsk::XdpMode;
use std::path::PathBuf;

use crate::state::Limits;

/// `kxdp-dataplane`'s arguments (its `--help`).
#[derive(Parser)]
#[command(
    name = "kxdp-dataplane",
    about = "kxdp's AF_XDP Service dataplane",
    long_about = None
)]
pub struct Args {
    /// The node's uplink interface.
    #[arg(long)]
    pub uplink: Option<String>,
    /// Pod interfaces (host side of each pod's veth), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub pods: Vec<String>,
    /// kxdp's end of the veth pair to the node's own kernel: host processes reach pods and
    /// Services through it (route the pod networks and the Service range to its peer), and
    /// packets for the node's addresses are handed to the kernel through it.
    #[arg(long)]
    pub host: Option<String>,
    /// Create the host pair instead of being given one: the kernel's end NAME (e.g.
    /// `kxhost`), kxdp's end NAME-xdp, with their addresses, sysctls and offloads; the
    /// routes to the pod networks and Service ranges follow the tables. Removed at a clean
    /// exit. (`--host` takes a pair made by hand instead.)
    #[arg(long, value_name = "NAME", conflicts_with = "host")]
    pub host_pair: Option<String>,
    /// When the uplink has more receive queues than --workers, set its channel count to
    /// the worker count (`ethtool -L`; some NICs reset their link for it) instead of
    /// refusing to start. Not restored at exit.
    #[arg(long)]
    pub set_channels: bool,
    /// Worker threads; worker i serves queue i of every interface.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// The control socket kxdp-control connects to (mode 0600, root's).
    #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
    pub socket: PathBuf,
    /// Give the control socket to this group, mode 0660: its members may connect and
    /// inspect (counters, Services, connections, flow events).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// The user kxdp-control runs as (name or uid): it may program the tables, as root
    /// may. Without it only root programs. Handovers are root's alone.
    #[arg(long)]
    pub control_user: Option<String>,
    /// XDP attach mode: auto (native, else generic), native or generic.
    #[arg(long, default_value = "auto")]
    pub xdp_mode: String,
    /// Conntrack capacity (connections); a full table refuses new flows.
    #[arg(long, default_value_t = 1 << 20)]
    pub conntrack_capacity: usize,
    /// Session-affinity records (clients remembered across all Services with ClientIP
    /// affinity); a full bucket forgets the record that expires first.
    #[arg(long, default_value_t = 1 << 16)]
    pub affinity_capacity: usize,
    /// Size each Maglev ring by its backend count (≥ 100 slots per backend, at most
    /// --ring-size) instead of --ring-size for every Service: for very many Services, at
    /// the cost of Maglev's minimal disruption when a backend count crosses a size step.
    #[arg(long)]
    pub scaled_rings: bool,
    /// Maglev ring size (a prime).
    #[arg(long, default_value_t = nat::maglev::DEFAULT_RING_SIZE)]
    pub ring_size: u32,
    /// UMEM frames per worker for the ports given at start: half of them wait in their
    /// fill rings, shared evenly. Each pod that may be attached at run time (--max-pods)
    /// adds 128 more (64 in its fill ring).
    #[arg(long, default_value_t = 4096)]
    pub frames: u32,
    /// Pod interfaces that may be attached at run time (by kxdp-cni) beyond --pods.
    #[arg(long, default_value_t = crate::state::DEFAULT_MAX_PODS)]
    pub max_pods: usize,
    /// Source ports for pods' traffic masqueraded out of the cluster to the node's address,
    /// `FIRST-LAST`; keep it outside the kernel's `net.ipv4.ip_local_port_range` so the
    /// node's own connections never collide with them.
    #[arg(long, default_value = "61000-65535", value_parser = port_range)]
    pub masquerade_ports: (u16, u16),
    /// How workers wait for packets: `adaptive` polls while there is traffic and sleeps
    /// until the next frame after 200 µs without one (a node's agent costs nothing at
    /// rest); `busy` polls without pause, a core per worker always (dedicated gateways:
    /// the lowest latency); `interrupt` sleeps whenever a poll finds nothing.
    #[arg(long, value_enum, default_value_t = crate::idle::PollMode::Adaptive)]
    pub poll_mode: crate::idle::PollMode,
    /// Run the workers in the real-time class SCHED_FIFO at this priority (1–99): a worker
    /// woken by a frame takes its core from ordinary threads at once instead of waiting
    /// for its turn (the latency tail of a sleeping worker sharing its core). Only for
    /// workers that sleep (`interrupt`, `adaptive` at low rates): a polling worker in
    /// SCHED_FIFO keeps its core from every ordinary thread, ksoftirqd included, which on
    /// veth sends the worker's frames (tens of milliseconds of latency). Needs
    /// CAP_SYS_NICE.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub worker_priority: Option<u8>,
    /// Use the kernel's preferred busy polling, up to this many frames per poll of a queue
    /// (64 is a NAPI instance's usual weight): a worker whose poll finds a receive ring
    /// empty runs the queue's driver in its own thread (SO_PREFER_BUSY_POLL,
    /// SO_BUSY_POLL_BUDGET) instead of waiting for the interrupt and softirq. Set the
    /// interface's napi_defer_hard_irqs and gro_flush_timeout too, so the kernel leaves the
    /// queue to the worker while it polls. Does nothing where the kernel knows no NAPI
    /// instance for a socket (veth, generic XDP): the dataplane says so when its workers
    /// start. Needs CAP_NET_ADMIN.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub busy_poll_budget: Option<u16>,
    /// Measure how long frames wait in the receive rings for their worker: the XDP program
    /// stamps every frame it redirects with the time it saw it (8 bytes in front, taken off
    /// again before the pipeline sees the frame), and each worker
    /// counts the frames it took after 10 µs, 20 µs, ... 5 ms (`rx_waited_over_*` in
    /// `kxdp stats`), the part of a packet's latency that is the worker's. Costs the
    /// program a clock read per frame; off by default.
    #[arg(long)]
    pub measure_ring_wait: bool,
    /// Take over from the kxdp-dataplane running on --socket: its tables, connections and
    /// neighbours, then its interfaces (it stops and exits), so that established
    /// connections survive a restart or an upgrade. Fails, leaving it running, if it
    /// speaks another handover version.
    #[arg(long)]
    pub takeover: bool,
    /// The handover version to ask for (tests use it to show a mismatch is refused).
    #[arg(long, hide = true, default_value_t = crate::handover::VERSION)]
    pub handover_version: u32,
    /// Milliseconds a running dataplane waits for its successor's word after handing over
    /// its state; then it takes its interfaces back.
    #[arg(long, default_value_t = crate::handover::DEFAULT_DEADLINE.as_millis() as u64)]
    pub handover_deadline_ms: u64,
    /// Tests: make a successor fail at one step of a takeover, `STEP:ACTION` with STEP
    /// `requested` (asked, state not read), `received` (state read, nothing attached) or
    /// `attached` (forwarding, not yet reported) and ACTION `pause` (wait to be killed),
    /// `exit` (die without a word) or `fail` (release and report the failure).
    #[arg(long, hide = true, value_parser = fault)]
    pub handover_fault: Option<Fault>,
    /// Print errors with their full detail (a backtrace too, when RUST_BACKTRACE is set).
    #[arg(long, short)]
    pub verbose: bool,
    /// Pin workers to cores (worker i on core i modulo the core count, or on the i-th
    /// core of --cores).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub pin: bool,
    /// The cores to pin the workers to, one per worker in order, as the kernel writes CPU
    /// lists (`2,3`, `2-5`): give them cores isolated with `isolcpus=`/`nohz_full=`.
    #[arg(long, value_parser = core_list)]
    pub cores: Option<CoreList>,
}

/// Where a test makes a successor fail (`--handover-fault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Asked for the handover, state not read.
    Requested,
    /// State read, nothing attached.
    Received,
    /// Forwarding, not yet reported.
    Attached,
}

/// What the successor does there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait to be killed.
    Pause,
    /// Die without a word.
    Exit,
    /// Release and report the failure.
    Fail,
}

/// `--handover-fault`'s value: at which step the successor does what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault(pub Step, pub Action);

fn fault(s: &str) -> Result<Fault, String> {
    let (step, action) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: write STEP:ACTION"))?;
    let step = match step {
        "requested" => Step::Requested,
        "received" => Step::Received,
        "attached" => Step::Attached,
        other => {
            return Err(format!(
                "{other:?}: steps are requested, received, attached"
            ))
        }
    };
    let action = match action {
        "pause" => Action::Pause,
        "exit" => Action::Exit,
        "fail" => Action::Fail,
        other => return Err(format!("{other:?}: actions are pause, exit, fail")),
    };
    Ok(Fault(step, action))
}

/// `--cores`' value: one argument holding a whole list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

fn core_list(s: &str) -> Result<CoreList, String> {
    crate::cores::parse_core_list(s)
        .map(CoreList)
        .map_err(|e| e.to_string())
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: write FIRST-LAST, e.g. 61000-65535"))?;
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 0 < FIRST <= LAST"));
    }
    Ok((a, b))
}

impl Args {
    /// `--xdp-mode`.
    pub fn xdp_mode(&self) -> Result<XdpMode> {
        Ok(match self.xdp_mode.as_str() {
            "auto" => XdpMode::Auto,
            "native" => XdpMode::Native,
            "generic" => XdpMode::Generic,
            other => bail!("--xdp-mode {other}: use auto, native or generic"),
        })
    }

    /// The worker count: `--workers`, at least one.
    pub fn workers(&self) -> u32 {
        self.workers.max(1)
    }

    /// The core each worker is pinned to (`None`: not pinned), from `--pin` and `--cores`
    /// among the `available` ones.
    pub fn cores(&self, available: &[usize]) -> Result<Vec<Option<usize>>> {
        let workers = self.workers() as usize;
        if !self.pin && self.cores.is_some() {
            bail!("--cores pins the workers: it cannot go with --pin false");
        }
        if !self.pin {
            return Ok(vec![None; workers]);
        }
        let wanted = self.cores.as_ref().map(|c| c.0.as_slice());
        Ok(crate::cores::assign(workers, wanted, available)?)
    }

    /// The limits fixed at start, `--ring-size` checked.
    pub fn limits(&self) -> Result<Limits> {
        if !nat::maglev::is_prime(self.ring_size) || self.ring_size < 251 {
            bail!(
                "--ring-size {}: Maglev needs a prime of at least 251 (e.g. 16381, 65521)",
                self.ring_size
            );
        }
        Ok(Limits {
            ring_size: self.ring_size,
            conntrack_capacity: self.conntrack_capacity,
            affinity_capacity: self.affinity_capacity,
            ring_scaled: self.scaled_rings,
            egress_masquerade_ports: self.masquerade_ports,
            max_pods: self.max_pods,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kxdp-dataplane").chain(extra.iter().copied()))
    }

    #[test]
    fn defaults_give_the_default_limits() {
        let a = args(&[]).unwrap();
        let (l, d) = (a.limits().unwrap(), Limits::default());
        assert_eq!(
            (
                l.ring_size,
                l.ring_scaled,
                l.conntrack_capacity,
                l.affinity_capacity
            ),
            (
                d.ring_size,
                d.ring_scaled,
                d.conntrack_capacity,
                d.affinity_capacity
            )
        );
        assert_eq!(
            (l.egress_masquerade_ports, l.max_pods),
            (d.egress_masquerade_ports, d.max_pods)
        );
        assert_eq!(a.xdp_mode().unwrap(), XdpMode::Auto);
        assert_eq!(a.workers(), 1);
    }

    #[test]
    fn values_are_parsed_and_mistakes_named() {
        let a = args(&[
            "--masquerade-ports",
            "62000-62010",
            "--handover-fault",
            "received:fail",
        ])
        .unwrap();
        assert_eq!(a.masquerade_ports, (62000, 62010));
        assert_eq!(a.handover_fault, Some(Fault(Step::Received, Action::Fail)));
        for (bad, says) in [
            (["--masquerade-ports", "62010-62000"], "0 < FIRST <= LAST"),
            (["--masquerade-ports", "62000"], "FIRST-LAST"),
            (["--masquerade-ports", "1-x"], "not a port number"),
            (["--handover-fault", "attached"], "STEP:ACTION"),
            (["--handover-fault", "later:exit"], "steps are"),
            (["--handover-fault", "attached:cry"], "actions are"),
            (["--worker-priority", "0"], "not in 1..=99"),
            (["--worker-priority", "100"], "not in 1..=99"),
        ] {
            let e = args(&bad).err().expect(bad[1]).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let e = args(&["--xdp-mode", "fast"])
            .unwrap()
            .xdp_mode()
            .unwrap_err();
        assert!(e.to_string().contains("use auto, native or generic"), "{e}");
        let e = args(&["--ring-size", "1000"])
            .unwrap()
            .limits()
            .unwrap_err();
        assert!(e.to_string().contains("a prime of at least 251"), "{e}");
    }

    #[test]
    fn cores_follow_pin_and_the_list() {
        let a = args(&["--workers", "2", "--cores", "2,3"]).unwrap();
        assert_eq!(a.cores(&[0, 1, 2, 3]).unwrap(), vec![Some(2), Some(3)]);
        let a = args(&["--workers", "2", "--pin", "false"]).unwrap();
        assert_eq!(a.cores(&[0, 1]).unwrap(), vec![None, None]);
        let a = args(&["--pin", "false", "--cores", "1"]).unwrap();
        assert!(a
            .cores(&[0, 1])
            .unwrap_err()
            .to_string()
            .contains("--pin false"));
    }
}
