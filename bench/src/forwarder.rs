//! The bare AF_XDP forwarder: the same I/O path as kxdp's worker — XDP redirect into one
//! UMEM shared by the uplink's and the pod side's sockets, bursts of 64, copy mode — with
//! nothing but a MAC rewrite in between. What it forwards is the ceiling of that path on
//! this machine; kxdp's figure divided by it is what the pipeline costs.
//!
//! Frames from the uplink go to the sink's MAC on the pod side; frames from the pod side go
//! back to the generator's MAC on the uplink (a reflector's answers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use pktio::xsk::{self, XdpMode, XdpProgram, XskConfig, XskDevice};
use pktio::{Device, DeviceExt, DeviceStats, Frame};

use crate::netns::{self, NetnsGuard};
use crate::topology::{DUT_POD_MAC, DUT_UPLINK_MAC, GEN_MAC, POD_IF, SINK_MAC, UPLINK_IF};

/// The MACs the forwarder writes: (destination, source) towards the pod side (the sink)
/// and towards the uplink (the generator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Macs {
    /// Frames from the uplink: to the sink, from the pod-side interface.
    pub to_pod: ([u8; 6], [u8; 6]),
    /// Frames from the pod side: to the generator, from the uplink interface.
    pub to_uplink: ([u8; 6], [u8; 6]),
}

impl Macs {
    /// The namespace lab's.
    pub fn lab() -> Macs {
        Macs {
            to_pod: (SINK_MAC, DUT_POD_MAC),
            to_uplink: (GEN_MAC, DUT_UPLINK_MAC),
        }
    }
}

/// Frames per receive call; kxdp's worker burst (`dataplane::worker::BURST`).
pub const BURST: usize = 64;

/// What the forwarder did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwarderReport {
    /// Frames from the uplink sent to the pod side.
    pub forwarded: u64,
    /// Frames from the pod side sent to the uplink.
    pub returned: u64,
    /// Frames the transmit ring refused.
    pub tx_full: u64,
    /// Longest time between two polls, ns: how long the thread was kept off its core.
    pub max_gap_ns: u64,
    /// Polls that came more than 100 µs after the one before.
    pub gaps_over_100us: u64,
    /// The device's counters.
    pub device: DeviceStats,
}

impl ForwarderReport {
    /// The counters by name, as kxdp's are reported.
    pub fn counters(&self) -> Vec<(String, u64)> {
        vec![
            ("forwarded".into(), self.forwarded),
            ("returned".into(), self.returned),
            ("tx_ring_full".into(), self.tx_full),
            ("max_poll_gap_ns".into(), self.max_gap_ns),
            ("poll_gaps_over_100us".into(), self.gaps_over_100us),
            ("kernel_rx_dropped".into(), self.device.kernel_rx_dropped),
            (
                "kernel_rx_ring_full".into(),
                self.device.kernel_rx_ring_full,
            ),
            ("kernel_fill_empty".into(), self.device.kernel_fill_empty),
            ("wakeups".into(), self.device.wakeups),
        ]
    }
}

/// Rewrites the MACs of `pkt` to `dst` from `src`.
pub fn rewrite(pkt: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    if pkt.len() >= 12 {
        pkt[0..6].copy_from_slice(&dst);
        pkt[6..12].copy_from_slice(&src);
    }
}

/// One pass over both ports of `dev` (0 the uplink, 1 the pod side). Returns the frames
/// moved.
pub fn poll<D: Device>(
    dev: &mut D,
    macs: &Macs,
    rx: &mut Vec<Frame>,
    r: &mut ForwarderReport,
) -> usize {
    let mut moved = 0;
    for (from, to, (dst, src)) in [(0, 1, macs.to_pod), (1, 0, macs.to_uplink)] {
        rx.clear();
        dev.recv(from, rx, BURST);
        moved += rx.len();
        for &f in rx.iter() {
            rewrite(dev.packet_mut(f), dst, src);
            if dev.send(to, f) {
                if from == 0 {
                    r.forwarded += 1;
                } else {
                    r.returned += 1;
                }
            } else {
                r.tx_full += 1;
            }
        }
    }
    dev.flush();
    moved
}

/// Runs the forwarder on a thread of its own in `ns`, pinned to `core`, its XDP programs
/// attached in `mode`, until `stop`; sets `ready` once both interfaces steer into its
/// sockets.
pub fn run(
    ns: &NetnsGuard,
    (core, mode): (usize, XdpMode),
    macs: Macs,
    ready: &AtomicBool,
    stop: &AtomicBool,
) -> anyhow::Result<ForwarderReport> {
    netns::enter_thread(ns.name())?;
    crate::pin(core);
    let up = xsk::ifindex(UPLINK_IF)?;
    let pod = xsk::ifindex(POD_IF)?;
    let p_up = XdpProgram::attach(up, 1, mode).context("attach XDP to u0")?;
    let p_pod = XdpProgram::attach(pod, 1, mode).context("attach XDP to p0")?;
    // kxdp-dataplane's defaults (4096 frames of 4096 bytes, 2048-entry rings).
    let mut dev = XskDevice::new(&[(up, 0), (pod, 0)], &XskConfig::default())?;
    p_up.insert(0, dev.socket_fd(0))?;
    p_pod.insert(0, dev.socket_fd(1))?;
    let before = dev.stats();
    ready.store(true, Ordering::Release);
    let mut r = ForwarderReport::default();
    let mut rx = Vec::with_capacity(BURST);
    let start = Instant::now();
    let mut last = start;
    // Bound: `stop`, and the generator's longest run.
    while !stop.load(Ordering::Relaxed) && start.elapsed() < crate::gen::MAX_DURATION {
        if poll(&mut dev, &macs, &mut rx, &mut r) == 0 {
            std::hint::spin_loop();
        }
        let now = Instant::now();
        let gap = (now - last).as_nanos() as u64;
        last = now;
        r.max_gap_ns = r.max_gap_ns.max(gap);
        if gap > 100_000 {
            r.gaps_over_100us += 1;
        }
    }
    r.device = dev.stats().since(before);
    drop(dev);
    drop((p_up, p_pod));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pktio::MemDevice;

    #[test]
    fn frames_cross_with_their_macs_rewritten() {
        let mut dev = MemDevice::new(2, 64);
        let mut f = vec![0u8; 64];
        f[12] = 0x08;
        assert!(dev.inject(0, &f));
        assert!(dev.inject(1, &f));
        let mut r = ForwarderReport::default();
        let mut rx = Vec::with_capacity(BURST);
        assert_eq!(poll(&mut dev, &Macs::lab(), &mut rx, &mut r), 2);
        let to_pod = dev.take_sent(1);
        let to_up = dev.take_sent(0);
        assert_eq!(&to_pod[0][0..12], &[SINK_MAC, DUT_POD_MAC].concat()[..]);
        assert_eq!(&to_up[0][0..12], &[GEN_MAC, DUT_UPLINK_MAC].concat()[..]);
        assert_eq!((r.forwarded, r.returned), (1, 1));
    }
}
