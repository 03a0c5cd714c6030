//! The traffic generator: writes bench frames ([`crate::frame`]) straight into a device's
//! frame pool and transmits them in bursts, flat out or at a fixed rate, for a bounded time
//! and count.
//!
//! It works on any [`pktio::Device`]: an AF_XDP [`pktio::xsk::XskDevice`] bound to the
//! generator namespace's interface in a run, the in-memory device in tests. Each frame is
//! stamped with its transmit time (ns since the run's epoch, one clock for generator and
//! sink, which are threads of one process) when it is written, just before it is queued.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pktio::{Device, DeviceExt, DeviceStats, PortId};

use crate::frame::{self, FlowSet};

/// Frames written and queued per round; one worker burst (`dataplane::worker::BURST`).
/// No benchmark has tuned it yet.
pub const BURST: usize = 64;
/// Longest run the generator accepts: every traffic loop is bounded in time.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// How long the generator keeps flushing after its last frame so queued frames leave and
/// their completions come back.
pub const DRAIN: Duration = Duration::from_millis(200);

/// What to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenConfig {
    /// Frame length without FCS, [`frame::MIN_FRAME`]..=[`frame::MAX_FRAME`].
    pub size: usize,
    /// Addresses, ports and flow count.
    pub flows: FlowSet,
    /// Frames per second; `None` sends flat out.
    pub rate_pps: Option<u64>,
    /// How long to send (at most [`MAX_DURATION`]).
    pub duration: Duration,
    /// Stop after this many frames, if given.
    pub count: Option<u64>,
}

/// Why a generator configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GenError {
    /// Frame size out of range.
    #[error("frame size {0} is outside {min}..={max} (bytes without FCS)", min = frame::MIN_FRAME, max = frame::MAX_FRAME)]
    Size(usize),
    /// Nothing to send to.
    #[error("no destinations: give at least one address:port")]
    NoDestination,
    /// Zero flows or a zero rate.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// Too long a run.
    #[error("duration {0:?} is over the limit of {MAX_DURATION:?}")]
    TooLong(Duration),
    /// The device's chunks are smaller than a frame.
    #[error("frame size {size} does not fit the device's {room}-byte chunks after headroom")]
    NoRoom {
        /// Requested size.
        size: usize,
        /// Room in a chunk.
        room: usize,
    },
}

impl GenConfig {
    /// Checks the configuration before anything is sent.
    pub fn validate(&self) -> Result<(), GenError> {
        if !(frame::MIN_FRAME..=frame::MAX_FRAME).contains(&self.size) {
            return Err(GenError::Size(self.size));
        }
        if self.flows.dests.is_empty() {
            return Err(GenError::NoDestination);
        }
        if self.flows.flows == 0 {
            return Err(GenError::Zero("flows"));
        }
        if self.rate_pps == Some(0) {
            return Err(GenError::Zero("rate"));
        }
        if self.duration > MAX_DURATION {
            return Err(GenError::TooLong(self.duration));
        }
        Ok(())
    }
}

/// What the generator did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenReport {
    /// Frames handed to the device's transmit ring.
    pub sent: u64,
    /// Bytes of those frames (without FCS).
    pub bytes: u64,
    /// Rounds in which the pool had no free frame (the kernel had not completed enough).
    pub pool_empty_rounds: u64,
    /// Rounds ended by a full transmit ring.
    pub ring_full_rounds: u64,
    /// Time from the first frame to the last.
    pub elapsed_ns: u64,
    /// The device's counters over the run (including the drain).
    #[serde(skip)]
    pub device: DeviceStats,
}

impl GenReport {
    /// Frames per second over the sending time.
    pub fn pps(&self) -> f64 {
        if self.elapsed_ns == 0 {
            return 0.0;
        }
        self.sent as f64 * 1e9 / self.elapsed_ns as f64
    }
}

/// A generator run in progress, driven one round at a time ([`Generator::step`]), so one
/// thread can interleave it with a sink ([`crate::load`]) on a single core.
pub struct Generator<'a> {
    cfg: &'a GenConfig,
    port: PortId,
    epoch: Instant,
    start: Instant,
    deadline: Instant,
    last: Instant,
    limit: u64,
    seq: u64,
    before: DeviceStats,
    report: GenReport,
    rx: Vec<pktio::Frame>,
    /// Frames received back (a reflector's answers), read by [`Generator::step`].
    returned: Option<Returned>,
}

/// Bench frames that came back to the generator (from a reflector): their count and
/// round-trip time, measured on the generator's own clock.
#[derive(Clone, Debug)]
pub struct Returned {
    /// Bench frames received.
    pub frames: u64,
    /// Round-trip times, ns.
    pub rtt: hdrhistogram::Histogram<u64>,
    /// Frames that were not bench frames, or whose timestamp was unusable.
    pub other: u64,
}

impl<'a> Generator<'a> {
    /// A run of `cfg` on `port` of `dev`, starting now, stamping frames with ns since
    /// `epoch`. Checks the configuration and that a frame fits `dev`'s chunks.
    pub fn new<D: Device>(
        dev: &D,
        port: PortId,
        cfg: &'a GenConfig,
        epoch: Instant,
    ) -> Result<Generator<'a>, GenError> {
        cfg.validate()?;
        let room = dev
            .chunk_size()
            .saturating_sub(pktio::xsk::XDP_PACKET_HEADROOM as usize);
        if cfg.size > room {
            return Err(GenError::NoRoom {
                size: cfg.size,
                room,
            });
        }
        let start = Instant::now();
        Ok(Generator {
            cfg,
            port,
            epoch,
            start,
            deadline: start + cfg.duration.min(MAX_DURATION),
            last: start,
            limit: cfg.count.unwrap_or(u64::MAX),
            seq: 0,
            before: dev.stats(),
            report: GenReport::default(),
            rx: Vec::with_capacity(BURST),
            returned: None,
        })
    }

    /// Also counts bench frames that come back on the generator's port and records their
    /// round-trip time (a reflector at the far end).
    pub fn count_returns(mut self) -> Self {
        self.returned = Some(Returned {
            frames: 0,
            rtt: hdrhistogram::Histogram::new_with_bounds(
                1,
                crate::sink::MAX_LATENCY.as_nanos() as u64,
                3,
            )
            .expect("static histogram bounds"),
            other: 0,
        });
        self
    }

    /// Whether the run is over (deadline, count or `stop`).
    pub fn done(&self, stop: &AtomicBool) -> bool {
        self.seq >= self.limit || stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// One round: writes and queues the frames that are due (at most [`BURST`]; all of them
    /// flat out, those the rate allows otherwise), flushes, and frees (or counts, with
    /// [`Generator::count_returns`]) what was received. Returns the frames queued.
    pub fn step<D: Device>(&mut self, dev: &mut D) -> usize {
        let port = self.port;
        let now = Instant::now();
        let mut want = (BURST as u64).min(self.limit.saturating_sub(self.seq));
        if now >= self.deadline {
            want = 0;
        }
        if let Some(rate) = self.cfg.rate_pps {
            let due = (now - self.start).as_nanos() * u128::from(rate) / 1_000_000_000;
            want = want.min((due as u64).saturating_sub(self.seq));
        }
        let mut queued = 0;
        for _ in 0..want {
            let Some(mut f) = dev.alloc() else {
                self.report.pool_empty_rounds += 1;
                break;
            };
            let tx_ns = self.epoch.elapsed().as_nanos() as u64;
            f.len = frame::write(
                dev.packet_mut_full(f),
                self.cfg.size,
                &self.cfg.flows,
                self.seq,
                tx_ns,
            ) as u32;
            // A full transmit ring (the kernel has not taken the last frames yet: a device
            // under test pushing back) ends the round; the frame went back to the pool and
            // its sequence number is used again, so every frame counted was sent and a
            // new-flow run's flows are all new.
            if !dev.send(port, f) {
                self.report.ring_full_rounds += 1;
                break;
            }
            self.report.sent += 1;
            self.report.bytes += self.cfg.size as u64;
            self.seq += 1;
            queued += 1;
        }
        if queued > 0 {
            self.last = Instant::now();
        }
        dev.flush();
        self.rx.clear();
        dev.recv(port, &mut self.rx, BURST);
        if !self.rx.is_empty() {
            let now_ns = self.epoch.elapsed().as_nanos() as u64;
            for i in 0..self.rx.len() {
                let f = self.rx[i];
                if let Some(r) = &mut self.returned {
                    match frame::parse(dev.packet_mut(f)) {
                        Some(p) if now_ns >= p.tx_ns => {
                            r.frames += 1;
                            if r.rtt.record((now_ns - p.tx_ns).max(1)).is_err() {
                                r.other += 1;
                            }
                        }
                        _ => r.other += 1,
                    }
                }
                dev.free(f);
            }
        }
        queued
    }

    /// Ends the run: keeps flushing for [`DRAIN`], calling `between` after each round (a
    /// sink on the same thread receives there; a lone generator sleeps), and returns the
    /// report.
    pub fn finish<D: Device>(self, dev: &mut D, mut between: impl FnMut()) -> GenReport {
        let (report, _) = self.finish_with_returns(dev, &mut between);
        report
    }

    /// [`Generator::finish`], also returning what came back (with
    /// [`Generator::count_returns`]).
    pub fn finish_with_returns<D: Device>(
        mut self,
        dev: &mut D,
        mut between: impl FnMut(),
    ) -> (GenReport, Option<Returned>) {
        self.report.elapsed_ns = (self.last - self.start).as_nanos() as u64;
        let drain_end = Instant::now() + DRAIN;
        // Bound: DRAIN.
        while Instant::now() < drain_end {
            self.limit = self.seq;
            self.step(dev);
            between();
        }
        self.report.device = dev.stats().since(self.before);
        (self.report, self.returned)
    }
}

/// Sends on `port` of `dev` until the duration or count is reached or `stop` is set, then
/// drains for [`DRAIN`]. Frames received meanwhile (none are expected) are freed.
pub fn run<D: Device>(
    dev: &mut D,
    port: PortId,
    cfg: &GenConfig,
    epoch: Instant,
    stop: &AtomicBool,
) -> Result<GenReport, GenError> {
    let mut g = Generator::new(dev, port, cfg, epoch)?;
    // Bound: the deadline (checked every round) and the count.
    while !g.done(stop) {
        g.step(dev);
    }
    Ok(g.finish(dev, || std::thread::sleep(Duration::from_millis(1))))
}

/// Room to write a whole frame: the chunk from the frame's start on.
trait PacketRoom {
    fn packet_mut_full(&mut self, f: pktio::Frame) -> &mut [u8];
}

impl<D: Device + ?Sized> PacketRoom for D {
    fn packet_mut_full(&mut self, f: pktio::Frame) -> &mut [u8] {
        let (chunk, off) = self.chunk_mut(f);
        &mut chunk[off..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pktio::MemDevice;
    use std::net::Ipv4Addr;

    fn cfg() -> GenConfig {
        GenConfig {
            size: 64,
            flows: FlowSet {
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: [2, 0, 0, 0, 0, 2],
                src_ip: Ipv4Addr::new(10, 0, 0, 1),
                src_port: 1024,
                flows: 4,
                dests: vec!["172.30.0.10:80".parse().unwrap()],
            },
            rate_pps: None,
            duration: Duration::from_secs(5),
            count: Some(100),
        }
    }

    #[test]
    fn sends_the_count_with_rising_sequence_numbers() {
        let mut dev = MemDevice::new(1, 256);
        let stop = AtomicBool::new(false);
        let r = run(&mut dev, 0, &cfg(), Instant::now(), &stop).unwrap();
        assert_eq!(r.sent, 100);
        let sent = dev.take_sent(0);
        assert_eq!(sent.len(), 100);
        for (i, bytes) in sent.iter().enumerate() {
            let p = frame::parse(bytes).expect("a bench frame");
            assert_eq!((p.len, p.seq), (64, i as u64));
            assert_eq!(p.src.port(), 1024 + (i % 4) as u16);
        }
    }

    #[test]
    fn mistakes_are_named() {
        let mut bad = cfg();
        bad.size = 60;
        assert_eq!(bad.validate(), Err(GenError::Size(60)));
        bad = cfg();
        bad.flows.dests.clear();
        assert_eq!(bad.validate(), Err(GenError::NoDestination));
        bad = cfg();
        bad.duration = Duration::from_secs(3600);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }
}
