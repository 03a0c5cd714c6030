//! Generator and sink on one thread: each round queues the generator's due frames, then
//! takes what reached the sink. On a 2-core machine the load (generator and sink) gets one
//! core and the device under test the other; two busy-polling threads on one core would
//! instead halve each other at the scheduler's whim, and a sleeping sink would smear the
//! latency it measures by its sleep.
//!
//! The two devices may live in different namespaces: an AF_XDP socket stays bound to the
//! interface it was created on, whichever namespace the thread is in later.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use pktio::Device;

use crate::gen::{GenConfig, GenError, GenReport, Generator};
use crate::sink::{Sink, SinkConfig, SinkReport};

/// How long the sink keeps receiving after the generator's last frame (frames still queued
/// in a device under test; the generator's own drain adds [`crate::gen::DRAIN`]).
pub const GRACE: Duration = Duration::from_millis(300);

/// What one load run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// The generator's side.
    pub gen: GenReport,
    /// The sink's side.
    pub sink: SinkReport,
}

/// Runs the generator on port 0 of `gen_dev` and the sink on port 0 of `sink_dev`,
/// interleaved on the calling thread, until the generator is done (its duration or count,
/// or `stop`), then lets the sink receive for [`GRACE`] more.
pub fn run<G: Device, S: Device>(
    gen_dev: &mut G,
    sink_dev: &mut S,
    gen_cfg: &GenConfig,
    sink_cfg: SinkConfig,
    epoch: Instant,
    stop: &AtomicBool,
) -> Result<LoadReport, GenError> {
    let mut sink = Sink::new(sink_dev, 0, sink_cfg);
    let mut gen = Generator::new(gen_dev, 0, gen_cfg, epoch)?;
    // Bound: the generator's deadline and count (checked by `done`).
    while !gen.done(stop) {
        gen.step(gen_dev);
        sink.step(sink_dev, epoch);
    }
    let grace_end = Instant::now() + GRACE;
    let gen = gen.finish(gen_dev, || {
        sink.step(sink_dev, epoch);
    });
    // Bound: GRACE.
    while Instant::now() < grace_end {
        if sink.step(sink_dev, epoch) == 0 {
            std::hint::spin_loop();
        }
    }
    Ok(LoadReport {
        gen,
        sink: sink.finish(sink_dev),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FlowSet;
    use pktio::MemDevice;
    use std::net::Ipv4Addr;

    /// Moves every frame the generator's device sent into the sink's device, as a wire
    /// would, but only when the test says so.
    fn wire(from: &mut MemDevice, to: &mut MemDevice) -> usize {
        let frames = from.take_sent(0);
        let n = frames.len();
        for f in frames {
            assert!(to.inject(0, &f));
        }
        n
    }

    /// 64-byte frames flat out from 198.18.0.1 over `flows` flows to 10.0.1.10:8080,
    /// `count` of them (5 s at most).
    fn flat_out(flows: u32, count: u64) -> GenConfig {
        GenConfig {
            size: 64,
            flows: FlowSet {
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: [2, 0, 0, 0, 0, 2],
                src_ip: Ipv4Addr::new(198, 18, 0, 1),
                src_port: 1024,
                flows,
                dests: vec!["10.0.1.10:8080".parse().unwrap()],
            },
            rate_pps: None,
            duration: Duration::from_secs(5),
            count: Some(count),
        }
    }

    #[test]
    fn the_sink_counts_what_the_generator_sent_and_answers_arp() {
        let cfg = flat_out(8, 200);
        let mut g = MemDevice::new(1, 512);
        let mut s = MemDevice::new(1, 512);
        let epoch = Instant::now();
        // The generator alone first; then the sink sees the frames on its own device.
        let stop = AtomicBool::new(false);
        let gen = crate::gen::run(&mut g, 0, &cfg, epoch, &stop).unwrap();
        assert_eq!(wire(&mut g, &mut s), 200);
        // An ARP request for an address the sink stands in for, and one for another.
        let mut arp = [0u8; 60];
        let asker = [2, 0, 0, 0, 0, 9];
        let ask = |buf: &mut [u8], target| {
            write_request(buf, asker, Ipv4Addr::new(10, 0, 0, 1), target);
        };
        ask(&mut arp, Ipv4Addr::new(10, 0, 1, 10));
        assert!(s.inject(0, &arp));
        ask(&mut arp, Ipv4Addr::new(10, 0, 1, 99));
        assert!(s.inject(0, &arp));
        let sink_cfg = SinkConfig {
            expect_size: 64,
            mac: [2, 0, 0, 0, 0, 2],
            arp: vec![Ipv4Addr::new(10, 0, 1, 10)],
            reflect: false,
            stamped: false,
        };
        let mut sink = Sink::new(&s, 0, sink_cfg);
        sink.announce(&mut s);
        let announced = s.take_sent(0);
        assert_eq!(announced.len(), 1, "one gratuitous ARP per address");
        assert_eq!(&announced[0][0..6], &[0xff; 6]);
        // Bound: the frames injected above.
        while sink.step(&mut s, epoch) > 0 {}
        let r = sink.finish(&mut s);
        assert_eq!((r.frames, r.wrong_size, r.bad_timestamps), (200, 0, 0));
        assert_eq!(gen.sent, 200);
        assert_eq!(r.arp_replies, 1);
        assert_eq!(
            r.other, 1,
            "the request for an address the sink does not hold"
        );
        let replies = s.take_sent(0);
        assert_eq!(replies.len(), 1);
        let reply = &replies[0];
        assert_eq!(&reply[0..6], &asker, "to the asker");
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[22..28], &[2, 0, 0, 0, 0, 2], "with the sink's MAC");
        assert_eq!(&reply[28..32], &[10, 0, 1, 10], "for the address asked");
        assert_eq!(
            r.destinations,
            vec![("10.0.1.10:8080".parse().unwrap(), 200)]
        );
        assert_eq!(r.sources, vec![(Ipv4Addr::new(198, 18, 0, 1), 200)]);
        assert_eq!(r.frames_to(&["10.0.1.10:8080".parse().unwrap()]), 200);
    }

    #[test]
    fn a_reflecting_sink_sends_frames_back_and_the_generator_times_them() {
        let cfg = flat_out(1, 50);
        let mut g = MemDevice::new(1, 256);
        let mut s = MemDevice::new(1, 256);
        let epoch = Instant::now();
        let mut gen = Generator::new(&g, 0, &cfg, epoch).unwrap().count_returns();
        let mut sink = Sink::new(
            &s,
            0,
            SinkConfig {
                expect_size: 64,
                reflect: true,
                ..SinkConfig::default()
            },
        );
        let stop = AtomicBool::new(false);
        // Bound: the count of 50.
        while !gen.done(&stop) {
            gen.step(&mut g);
            wire(&mut g, &mut s);
            sink.step(&mut s, epoch);
            wire(&mut s, &mut g);
        }
        let (report, returned) = gen.finish_with_returns(&mut g, || {});
        let back = returned.unwrap();
        assert_eq!(report.sent, 50);
        assert_eq!(back.frames, 50, "every frame came back");
        assert_eq!(back.rtt.len(), 50);
        let r = sink.finish(&mut s);
        assert_eq!(r.reflected, 50);
    }

    fn write_request(buf: &mut [u8], mac: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) {
        buf.fill(0);
        buf[0..6].copy_from_slice(&[0xff; 6]);
        buf[6..12].copy_from_slice(&mac);
        buf[12..14].copy_from_slice(&[0x08, 0x06]);
        buf[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        buf[22..28].copy_from_slice(&mac);
        buf[28..32].copy_from_slice(&spa.octets());
        buf[38..42].copy_from_slice(&tpa.octets());
    }
}
