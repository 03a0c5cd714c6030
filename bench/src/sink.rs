//! The sink: receives on a device, counts the generator's frames (and anything else
//! separately), checks their sizes, and records one-way latency — receive time minus the
//! transmit time in each frame — in an HDR histogram. Generator and sink are threads of one
//! process, so both times come from one monotonic clock and one epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pktio::{Device, DeviceExt, DeviceStats, PortId};

use crate::frame;

/// Frames taken per receive call; one worker burst. No benchmark has tuned it yet.
pub const BURST: usize = 64;
/// Largest latency the histogram holds (longer ones are clamped and counted).
pub const MAX_LATENCY: Duration = Duration::from_secs(10);
/// Longest a sink runs, whatever it is told.
pub const MAX_DURATION: Duration = Duration::from_secs(660);

/// What the sink saw.
#[derive(Clone, Debug)]
pub struct SinkReport {
    /// Bench frames received.
    pub frames: u64,
    /// Their bytes (without FCS).
    pub bytes: u64,
    /// Bench frames whose length was not the expected size.
    pub wrong_size: u64,
    /// Other frames (not the generator's).
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
}

impl SinkReport {
    /// Bench frames per second between the first and the last.
    pub fn pps(&self) -> f64 {
        if self.span_ns == 0 {
            return 0.0;
        }
        self.frames as f64 * 1e9 / self.span_ns as f64
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
    let before = dev.stats();
    let mut r = SinkReport {
        frames: 0,
        bytes: 0,
        wrong_size: 0,
        other: 0,
        bad_timestamps: 0,
        reordered: 0,
        max_seq: None,
        latency: Histogram::new_with_bounds(1, MAX_LATENCY.as_nanos() as u64, 3)
            .expect("static histogram bounds"),
        span_ns: 0,
        device: DeviceStats::default(),
    };
    let mut burst = Vec::with_capacity(BURST);
    let start = Instant::now();
    let (mut first, mut last) = (None, 0u64);
    // Bound: MAX_DURATION, checked every round.
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_DURATION {
        burst.clear();
        dev.recv(port, &mut burst, BURST);
        if burst.is_empty() {
            dev.flush();
            std::hint::spin_loop();
            continue;
        }
        let now = epoch.elapsed().as_nanos() as u64;
        for &f in &burst {
            match frame::parse(dev.packet_mut(f)) {
                Some(p) => {
                    r.frames += 1;
                    r.bytes += p.len as u64;
                    if p.len != expect_size {
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
                    first.get_or_insert(now);
                    last = now;
                }
                None => r.other += 1,
            }
            dev.free(f);
        }
        dev.flush();
    }
    r.span_ns = first.map_or(0, |f| last - f);
    let after = dev.stats();
    r.device = DeviceStats {
        rx_frames: after.rx_frames - before.rx_frames,
        kernel_rx_dropped: after
            .kernel_rx_dropped
            .saturating_sub(before.kernel_rx_dropped),
        kernel_rx_ring_full: after
            .kernel_rx_ring_full
            .saturating_sub(before.kernel_rx_ring_full),
        kernel_fill_empty: after
            .kernel_fill_empty
            .saturating_sub(before.kernel_fill_empty),
        ..after
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FlowSet;
    use pktio::MemDevice;
    use std::net::Ipv4Addr;

    #[test]
    fn counts_sizes_and_latency_and_ignores_other_frames() {
        let mut dev = MemDevice::new(1, 64);
        let flows = FlowSet {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_port: 1024,
            flows: 1,
            dests: vec!["10.0.0.2:9".parse().unwrap()],
        };
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
}
