//! The sink: receives on a device, counts the generator's frames (and anything else
//! separately), checks their sizes, and records one-way latency — receive time minus the
//! transmit time in each frame — in an HDR histogram. Generator and sink run in one process
//! (as threads, or interleaved on one thread by [`crate::load`]), so both times come from
//! one monotonic clock and one epoch.
//!
//! It also tallies where the frames went and where they came from (a translating device
//! under test must spread them over a Service's endpoints and masquerade them), answers and
//! announces ARP for the endpoint addresses it stands in for (so a dataplane resolves them
//! on its link), and can reflect frames back to a generator on another machine.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pktio::{Device, DeviceExt, DeviceStats, Frame, PortId};

use crate::frame;

/// Frames taken per receive call; one worker burst. No benchmark has tuned it yet.
pub const BURST: usize = 64;
/// Largest latency the histogram holds (longer ones are clamped and counted).
pub const MAX_LATENCY: Duration = Duration::from_secs(10);
/// Longest a sink runs, whatever it is told.
pub const MAX_DURATION: Duration = Duration::from_secs(660);

/// Distinct destinations (or sources) the sink tallies one by one; beyond that they are
/// counted together. A Service under test has 10 endpoints.
pub const TALLY: usize = 64;

/// What the sink does besides counting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkConfig {
    /// Expected frame length of the generator's frames.
    pub expect_size: usize,
    /// The sink's MAC (ARP answers and announcements carry it).
    pub mac: [u8; 6],
    /// Addresses the sink answers ARP requests for and announces: the endpoints a device
    /// under test forwards to, so it resolves them on the sink's link.
    pub arp: Vec<Ipv4Addr>,
    /// Send every bench frame back where it came from (MACs, addresses and ports swapped):
    /// a reflector, so a generator on another machine measures round trips on its clock.
    pub reflect: bool,
    /// Frames arrive stamped by the sink interface's XDP program (its device made with
    /// `XskConfig::stamped`): each latency is split at the sink's interface into the path
    /// there and the wait in the sink's own ring ([`SinkReport::split`]).
    pub stamped: bool,
}

/// What the sink saw.
#[derive(Clone, Debug)]
pub struct SinkReport {
    /// Bench frames received.
    pub frames: u64,
    /// Their bytes (without FCS).
    pub bytes: u64,
    /// Bench frames whose length was not the expected size.
    pub wrong_size: u64,
    /// Other frames (not the generator's, not ARP the sink answered).
    pub other: u64,
    /// Bench frames stamped later than they arrived, or latency beyond [`MAX_LATENCY`].
    pub bad_timestamps: u64,
    /// Bench frames with a sequence number lower than one already seen.
    pub reordered: u64,
    /// Highest sequence number seen.
    pub max_seq: Option<u64>,
    /// One-way latency of every bench frame, ns.
    pub latency: Histogram<u64>,
    /// Time from the first bench frame to the last, ns.
    pub span_ns: u64,
    /// The device's counters over the run.
    pub device: DeviceStats,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// Bench frames sent back ([`SinkConfig::reflect`]).
    pub reflected: u64,
    /// Bench frames per destination address and port, first [`TALLY`] seen: what a
    /// translating device under test chose.
    pub destinations: Vec<(SocketAddrV4, u64)>,
    /// Bench frames per source address, first [`TALLY`] seen: masqueraded or not.
    pub sources: Vec<(Ipv4Addr, u64)>,
    /// Bench frames whose destination or source did not fit the tallies.
    pub untallied: u64,
    /// With [`SinkConfig::stamped`], every bench frame's latency in two: generator to the
    /// sink interface's XDP program (the device under test's part, and the kernel's on
    /// both sides of it), then that program to the sink taking the frame (the bench's own
    /// part, the same for every device), ns.
    pub split: Option<(Histogram<u64>, Histogram<u64>)>,
}

impl SinkReport {
    /// Bench frames per second between the first and the last.
    pub fn pps(&self) -> f64 {
        if self.span_ns == 0 {
            return 0.0;
        }
        self.frames as f64 * 1e9 / self.span_ns as f64
    }

    /// Bench frames that went to one of `dests`.
    pub fn frames_to(&self, dests: &[SocketAddrV4]) -> u64 {
        self.destinations
            .iter()
            .filter(|(d, _)| dests.contains(d))
            .map(|(_, n)| n)
            .sum()
    }
}

fn tally<K: PartialEq + Copy>(list: &mut Vec<(K, u64)>, key: K) -> bool {
    if let Some(e) = list.iter_mut().find(|(k, _)| *k == key) {
        e.1 += 1;
        return true;
    }
    if list.len() < TALLY {
        list.push((key, 1));
        return true;
    }
    false
}

const ETH_ARP: [u8; 2] = [0x08, 0x06];
/// Ethernet + ARP for IPv4 over Ethernet.
const ARP_FRAME: usize = 14 + 28;

/// Writes an ARP packet (`op` 1 request, 2 reply) into `f`; returns its length, padded to
/// the 60-byte Ethernet minimum.
fn write_arp(
    f: &mut [u8],
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    op: u16,
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> usize {
    f[..60].fill(0);
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_ARP);
    let a = &mut f[14..ARP_FRAME];
    a[0..2].copy_from_slice(&1u16.to_be_bytes());
    a[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&src_mac);
    a[14..18].copy_from_slice(&spa.octets());
    a[18..24].copy_from_slice(&tha);
    a[24..28].copy_from_slice(&tpa.octets());
    60
}

/// The sender MAC and address, and the target address, of an ARP request for IPv4.
fn arp_request(f: &[u8]) -> Option<([u8; 6], Ipv4Addr, Ipv4Addr)> {
    if f.len() < ARP_FRAME || f[12..14] != ETH_ARP {
        return None;
    }
    let a = &f[14..ARP_FRAME];
    if a[0..8] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return None;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&a[8..14]);
    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
    Some((sha, spa, tpa))
}

/// Swaps a bench frame's MACs, IPv4 addresses and UDP ports in place. Checksums stay
/// valid: each is a sum in which the swapped fields appear symmetrically.
fn reflect(f: &mut [u8]) {
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(26 + i, 30 + i);
    }
    for i in 0..2 {
        f.swap(34 + i, 36 + i);
    }
}

/// A sink in progress, driven one round at a time ([`Sink::step`]) so one thread can
/// interleave it with a generator ([`crate::load`]).
pub struct Sink {
    cfg: SinkConfig,
    port: PortId,
    report: SinkReport,
    first: Option<u64>,
    last: u64,
    before: DeviceStats,
    burst: Vec<Frame>,
    /// The stamps' clock minus the run's epoch, ns, once known.
    stamp_offset: Option<u64>,
}

/// The stamps' clock ([`pktio::stamp_clock`]) minus the time since `epoch`, ns: read
/// between two readings of the latter, the closest pair of a few tries, so that a thread
/// preempted between two readings does not shift every split by its wait.
pub fn stamp_offset(epoch: Instant) -> u64 {
    let mut best = (u64::MAX, 0);
    // Bound: 8 tries.
    for _ in 0..8 {
        let before = epoch.elapsed().as_nanos() as u64;
        let stamp = pktio::stamp_clock();
        let after = epoch.elapsed().as_nanos() as u64;
        let spread = after - before;
        if spread < best.0 {
            best = (spread, stamp.saturating_sub(before + spread / 2));
        }
        if spread < 1_000 {
            break;
        }
    }
    best.1
}

/// An empty latency histogram: 1 ns to [`MAX_LATENCY`], 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY.as_nanos() as u64, 3)
        .expect("static histogram bounds")
}

/// Bursts a [`Sink::step`] takes at most before it returns, so a generator on the same
/// thread is not starved; 4 × 64 frames keep a 16k ring from filling while the generator
/// writes one burst of 64.
const BURSTS_PER_STEP: usize = 4;

impl Sink {
    /// A sink on `port` of `dev`.
    pub fn new<D: Device>(dev: &D, port: PortId, cfg: SinkConfig) -> Sink {
        let split = cfg
            .stamped
            .then(|| (latency_histogram(), latency_histogram()));
        Sink {
            cfg,
            port,
            report: SinkReport {
                frames: 0,
                bytes: 0,
                wrong_size: 0,
                other: 0,
                bad_timestamps: 0,
                reordered: 0,
                max_seq: None,
                latency: latency_histogram(),
                span_ns: 0,
                device: DeviceStats::default(),
                arp_replies: 0,
                reflected: 0,
                destinations: Vec::with_capacity(TALLY),
                sources: Vec::with_capacity(TALLY),
                untallied: 0,
                split,
            },
            first: None,
            last: 0,
            before: dev.stats(),
            burst: Vec::with_capacity(BURST),
            stamp_offset: None,
        }
    }

    /// Announces every address of [`SinkConfig::arp`] with a gratuitous ARP request
    /// (sender and target the address itself), so a device under test knows them before
    /// the first packet.
    pub fn announce<D: Device>(&mut self, dev: &mut D) {
        for &ip in &self.cfg.arp {
            let Some(mut f) = dev.alloc() else {
                break;
            };
            let (chunk, off) = dev.chunk_mut(f);
            f.len = write_arp(
                &mut chunk[off..],
                [0xff; 6],
                self.cfg.mac,
                1,
                ip,
                [0; 6],
                ip,
            ) as u32;
            dev.send(self.port, f);
        }
        dev.flush();
    }

    /// Handles what has arrived (up to [`BURSTS_PER_STEP`] bursts) with receive time
    /// `now_ns` since the run's epoch taken per burst from `epoch`. Returns the frames
    /// handled.
    pub fn step<D: Device>(&mut self, dev: &mut D, epoch: Instant) -> usize {
        let mut handled = 0;
        for _ in 0..BURSTS_PER_STEP {
            self.burst.clear();
            dev.recv(self.port, &mut self.burst, BURST);
            if self.burst.is_empty() {
                break;
            }
            handled += self.burst.len();
            let now = epoch.elapsed().as_nanos() as u64;
            if self.cfg.stamped && self.stamp_offset.is_none() {
                self.stamp_offset = Some(stamp_offset(epoch));
            }
            for i in 0..self.burst.len() {
                let f = self.burst[i];
                self.frame(dev, f, now);
            }
        }
        dev.flush();
        handled
    }

    fn frame<D: Device>(&mut self, dev: &mut D, f: Frame, now: u64) {
        let stamp = if self.cfg.stamped {
            dev.rx_stamp(f)
        } else {
            None
        };
        let r = &mut self.report;
        let pkt = dev.packet_mut(f);
        match frame::parse(pkt) {
            Some(p) => {
                r.frames += 1;
                r.bytes += p.len as u64;
                if p.len != self.cfg.expect_size {
                    r.wrong_size += 1;
                }
                match r.max_seq {
                    Some(m) if p.seq < m => r.reordered += 1,
                    _ => r.max_seq = Some(p.seq),
                }
                match now.checked_sub(p.tx_ns) {
                    Some(lat) if r.latency.record(lat.max(1)).is_ok() => {}
                    _ => r.bad_timestamps += 1,
                }
                if let (Some((path, wait)), Some(offset)) = (&mut r.split, self.stamp_offset) {
                    // The program's stamp on the run's clock; one outside the frame's own
                    // span is not a stamp and splits nothing.
                    let at = stamp
                        .and_then(|stamp| stamp.checked_sub(offset))
                        .filter(|at| (p.tx_ns..=now).contains(at));
                    if let Some(at) = at {
                        let _ = path.record((at - p.tx_ns).max(1));
                        let _ = wait.record((now - at).max(1));
                    }
                }
                if !tally(&mut r.destinations, p.dst) | !tally(&mut r.sources, *p.src.ip()) {
                    r.untallied += 1;
                }
                self.first.get_or_insert(now);
                self.last = now;
                if self.cfg.reflect {
                    reflect(pkt);
                    if dev.send(self.port, f) {
                        self.report.reflected += 1;
                    }
                    return;
                }
            }
            None => {
                if let Some((sha, spa, tpa)) = arp_request(pkt) {
                    if self.cfg.arp.contains(&tpa) && spa != tpa {
                        write_arp(pkt, sha, self.cfg.mac, 2, tpa, sha, spa);
                        let reply = Frame {
                            addr: f.addr,
                            len: 60,
                        };
                        if dev.send(self.port, reply) {
                            r.arp_replies += 1;
                        }
                        return;
                    }
                }
                r.other += 1;
            }
        }
        dev.free(f);
    }

    /// Ends the run and returns what the sink saw.
    pub fn finish<D: Device>(self, dev: &mut D) -> SinkReport {
        let mut r = self.report;
        r.span_ns = self.first.map_or(0, |f| self.last - f);
        dev.flush();
        r.device = dev.stats().since(self.before);
        r
    }
}

/// Receives on `port` of `dev` until `stop` is set (or [`MAX_DURATION`]), expecting frames
/// of `expect_size` bytes.
pub fn run<D: Device>(
    dev: &mut D,
    port: PortId,
    expect_size: usize,
    epoch: Instant,
    stop: &AtomicBool,
) -> SinkReport {
    let mut sink = Sink::new(
        dev,
        port,
        SinkConfig {
            expect_size,
            ..SinkConfig::default()
        },
    );
    let start = Instant::now();
    // Bound: MAX_DURATION, checked every round.
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_DURATION {
        if sink.step(dev, epoch) == 0 {
            std::hint::spin_loop();
        }
    }
    sink.finish(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FlowSet;
    use pktio::MemDevice;
    use std::net::Ipv4Addr;

    /// One flow, 10.0.0.1:1024 to 10.0.0.2:9.
    fn one_flow() -> FlowSet {
        FlowSet {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_port: 1024,
            flows: 1,
            dests: vec!["10.0.0.2:9".parse().unwrap()],
        }
    }

    #[test]
    fn counts_sizes_and_latency_and_ignores_other_frames() {
        let mut dev = MemDevice::new(1, 64);
        let flows = one_flow();
        let epoch = Instant::now() - Duration::from_millis(5);
        let mut buf = [0u8; 128];
        for seq in 0..10 {
            let size = if seq == 3 { 128 } else { 64 };
            let n = frame::write(&mut buf, size, &flows, seq, 1_000_000);
            assert!(dev.inject(0, &buf[..n]));
        }
        assert!(dev.inject(0, &[0xff; 60]), "a broadcast that is not ours");
        let stop = AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                stop.store(true, Ordering::Relaxed);
            });
            run(&mut dev, 0, 64, epoch, &stop)
        });
        assert_eq!(
            (r.frames, r.wrong_size, r.other, r.bad_timestamps),
            (10, 1, 1, 0)
        );
        assert_eq!(r.latency.len(), 10);
        assert!(
            r.latency.min() >= 4_000_000,
            "stamped 1 ms after an epoch 5 ms ago"
        );
        assert_eq!(r.max_seq, Some(9));
    }

    #[test]
    fn a_stamped_frame_latency_splits_at_the_sink_interface() {
        let mut dev = MemDevice::new(1, 64);
        let flows = one_flow();
        // The run began 10 ms ago; frames sent 1 ms in reached the sink interface 2 ms in.
        let epoch = Instant::now() - Duration::from_millis(10);
        let offset = stamp_offset(epoch);
        let mut buf = [0u8; 64];
        for seq in 0..4 {
            let n = frame::write(&mut buf, 64, &flows, seq, 1_000_000);
            assert!(dev.inject_stamped(0, &buf[..n], offset + 2_000_000));
        }
        let n = frame::write(&mut buf, 64, &flows, 4, 1_000_000);
        assert!(dev.inject_stamped(0, &buf[..n], 0), "not a stamp: no split");
        let cfg = SinkConfig {
            expect_size: 64,
            stamped: true,
            ..SinkConfig::default()
        };
        let mut sink = Sink::new(&dev, 0, cfg);
        assert_eq!(sink.step(&mut dev, epoch), 5);
        let r = sink.finish(&mut dev);
        assert_eq!(r.latency.len(), 5);
        let (path, wait) = r.split.expect("split");
        assert_eq!((path.len(), wait.len()), (4, 4));
        // 1 ms to the interface (within the clocks' reading apart), 8 ms and more waiting.
        assert!(
            (990_000..=1_010_000).contains(&path.max()),
            "{}",
            path.max()
        );
        assert!(wait.min() >= 7_990_000, "{}", wait.min());
    }
}
