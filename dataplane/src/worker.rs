//! The poll-mode worker: one thread, one [`Device`] (its queue on every port), busy-polling
//! in bursts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pktio::{Device, DeviceExt, Frame, PortId};

use crate::counters::Counters;
use crate::idle::{self, PollMode};
use crate::pipeline::{Pipeline, Resolver, SECOND};
use crate::state::Shared;

/// Frames taken from one port per pass. 64 is the burst DPDK's l3fwd uses and the size of
/// the pass the lab benchmark (`kxdp bench`, issue 7) measures; larger bursts did not help
/// on veth, where the kernel hands frames over one copy at a time.
pub const BURST: usize = 64;

/// How often worker 0 solicits unresolved local pods (and publishes housekeeping).
const HOUSEKEEPING: u64 = SECOND / 10;

/// Longest a busy worker keeps its counters to itself. A worker publishes them when a poll
/// finds nothing (they are final until traffic returns), when it stops, and under load
/// once this long has passed since it last did: copying every counter out after each
/// poll cost a worker on veth, where a poll finds a few frames, more than the lookups of
/// its packets (29% of its own time in the lab). Readers (the stats request, metrics) look
/// seconds apart.
const PUBLISH: u64 = SECOND / 100;

/// An interval between the end of one pass and the start of the next above which it is
/// counted as a gap (`poll_gaps_over_100us`): the worker was kept off its core, and its
/// frames waited.
const POLL_GAP: u64 = 100_000;

/// How far ahead of the time a frame was taken its stamp may be (the clocks of two cores
/// read a moment apart), and how far behind: a stamp outside these, or zero, is not one
/// (the headroom of a frame that the program did not stamp: a predecessor's, or one in a
/// fresh pool).
const STAMP_AHEAD: u64 = 1_000_000;
const STAMP_BEHIND: u64 = 10_000_000_000;

/// A worker: its device, its counters, and a handle on the shared state.
pub struct Worker<D: Device> {
    /// Index of the worker (its counters' slot in [`Shared::counters`]).
    pub id: usize,
    /// Its device.
    pub dev: D,
    shared: Arc<Shared>,
    counters: Counters,
    limiter: Resolver,
    rx: Vec<Frame>,
    last_housekeeping: u64,
    /// When the counters were last published, and whether they may have changed since.
    last_published: u64,
    unpublished: bool,
    /// The generation of the port list this worker's sockets follow.
    ports_seen: u64,
    /// Ports this worker opened at run time, by id, with their sockets.
    opened: Vec<Option<Option<std::os::fd::RawFd>>>,
    /// Whether frames come stamped and their wait is counted (`--measure-ring-wait`).
    measure_wait: bool,
}

impl<D: Device> Worker<D> {
    /// A worker over `dev`.
    pub fn new(id: usize, dev: D, shared: Arc<Shared>) -> Worker<D> {
        Worker {
            id,
            dev,
            shared,
            counters: Counters::default(),
            limiter: Resolver::default(),
            rx: Vec::with_capacity(BURST),
            last_housekeeping: 0,
            last_published: 0,
            unpublished: true,
            ports_seen: 0,
            opened: Vec::new(),
            measure_wait: false,
        }
    }

    /// Counts how long each frame waited in its receive ring (`rx_waited_*`), from the
    /// stamp the XDP program put before it ([`pktio::xsk::XdpProgram::set_stamp`]) to the
    /// moment the worker took it.
    pub fn measure_ring_wait(&mut self, on: bool) {
        self.measure_wait = on;
    }

    /// Opens the sockets of pods the port list gained and closes those of pods it lost
    /// (see [`crate::ports`]), then acknowledges the list's generation.
    fn follow_ports(&mut self, generation: u64) {
        let list = self.shared.ports.load_full();
        let (mut opened, mut failed) = (Vec::new(), Vec::new());
        for id in 0..self.opened.len() {
            let still = list.port(id).is_some_and(|p| p.pod.is_some());
            if self.opened[id].is_some() && !still {
                self.dev.close_port(id);
                self.opened[id] = None;
            }
        }
        for (id, port) in list.pods() {
            // Every open pod socket is reported, not only new ones: whoever changed the
            // list may be steering all of them again (after the workers restarted).
            if let Some(Some(fd)) = self.opened.get(id) {
                opened.push((id, *fd));
                continue;
            }
            let Some(pod) = &port.pod else { continue };
            match self.dev.open_port(id, pod.ifindex, self.id as u32) {
                Ok(fd) => {
                    if self.opened.len() <= id {
                        self.opened.resize(id + 1, None);
                    }
                    self.opened[id] = Some(fd);
                    opened.push((id, fd));
                }
                Err(e) => failed.push((id, e)),
            }
        }
        self.ports_seen = generation;
        self.shared
            .ports
            .caught_up(self.id, generation, opened, failed);
    }

    /// One pass over every port at time `now`: receive a burst, handle it, flush. Returns
    /// the number of frames handled.
    pub fn poll(&mut self, now: u64) -> usize {
        let generation = self.shared.ports.generation();
        if generation != self.ports_seen {
            self.follow_ports(generation);
        }
        let tables = self.shared.tables.load();
        let ports = self.shared.ports.load();
        let pipeline = Pipeline::new(&self.shared, &tables, &ports, now, self.id);
        let mut handled = 0;
        for port in 0..self.dev.port_count() {
            self.rx.clear();
            self.dev.recv(port, &mut self.rx, BURST);
            handled += self.rx.len();
            if self.measure_wait && !self.rx.is_empty() {
                let taken = pktio::stamp_clock();
                time_waits(&mut self.dev, &self.rx, &mut self.counters, taken);
            }
            pipeline.handle_burst(
                &mut self.dev,
                port,
                &self.rx,
                &mut self.counters,
                &mut self.limiter,
            );
        }
        // Held frames are sent or dropped (and counted) by a pass that received nothing.
        self.unpublished |= handled > 0 || self.limiter.held() > 0;
        pipeline.release_held(&mut self.dev, &mut self.counters, &mut self.limiter);
        if now >= self.last_housekeeping + HOUSEKEEPING {
            self.last_housekeeping = now;
            if self.id == 0 {
                pipeline.resolve_local_pods(&mut self.dev, &mut self.counters, &mut self.limiter);
            }
            self.counters.device = self.dev.stats();
            self.unpublished = true;
        }
        self.dev.flush();
        if self.unpublished && (handled == 0 || now >= self.last_published + PUBLISH) {
            self.publish(now);
        }
        handled
    }

    /// Copies the counters out for readers on other threads.
    fn publish(&mut self, now: u64) {
        if let Some(p) = self.shared.counters.get(self.id) {
            p.publish(&self.counters);
        }
        self.unpublished = false;
        self.last_published = now;
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Port `id` of the device is a pod's socket opened already (by a predecessor whose
    /// device this worker took over), with descriptor `fd`.
    pub fn opened_already(&mut self, id: PortId, fd: std::os::fd::RawFd) {
        if self.opened.len() <= id {
            self.opened.resize(id + 1, None);
        }
        self.opened[id] = Some(Some(fd));
    }

    /// The device, once the worker stopped: frames held for unresolved neighbours are
    /// dropped (counted as such) and back in its pool, so that every frame is free or
    /// in a ring.
    pub fn into_device(mut self) -> D {
        let dev = &mut self.dev;
        let counters = &mut self.counters;
        let dropped = self.limiter.forget_held(|f| {
            dev.free(f);
            counters.drop(crate::counters::DropReason::NeighborUnresolved);
        });
        if dropped > 0 {
            if let Some(p) = self.shared.counters.get(self.id) {
                p.publish(&self.counters);
            }
        }
        self.dev
    }

    /// Polls until `stop` is set, with the time taken from a monotonic clock started at
    /// `epoch` (all workers share one epoch, so conntrack times agree), waiting for
    /// packets as `mode` says (`crate::idle`): busy-polling throughout, or asleep on the
    /// device's sockets and the worker's eventfd once a poll, or a spell of polls, found
    /// nothing. Frames held for an unresolved neighbour, or queued for the kernel to send,
    /// keep the worker polling until they are gone. The time awake and asleep is counted,
    /// and so are the gaps between the end of one pass and the start of the next: the
    /// worker off its core.
    pub fn run(mut self, stop: &AtomicBool, epoch: Instant, mode: PollMode) -> Worker<D> {
        let shared = self.shared.clone();
        let waker = shared.wakers.of(self.id);
        let clock = || epoch.elapsed().as_nanos() as u64;
        // The end of the last pass (or sleep), and the start of the last pass with frames.
        let (mut last, mut last_frame) = (clock(), clock());
        while !stop.load(Ordering::Acquire) {
            let start = clock();
            let gap = start - last;
            if gap > POLL_GAP {
                // Kept off its core: nothing between two passes takes this long.
                self.counters.poll_gaps_over_100us += 1;
                self.counters.poll_gaps_over_1ms += u64::from(gap > 1_000_000);
            }
            let handled = self.poll(start);
            let end = clock();
            self.counters.awake_ns += end - last;
            last = end;
            if handled > 0 {
                last_frame = start;
                continue;
            }
            match waker {
                Some(waker)
                    if mode.sleeps_after(start - last_frame)
                        && self.limiter.held() == 0
                        && !self.dev.tx_pending() =>
                {
                    idle::sleep(&self.dev.wait_fds(), waker, idle::SLEEP_LONGEST);
                    let woke = clock();
                    self.counters.asleep_ns += woke - end;
                    self.counters.sleeps += 1;
                    // Woken by a frame, the poll finds it and a spell of polling follows;
                    // by a timeout or its eventfd, the worker sleeps again after one pass.
                    last = woke;
                }
                // No eventfd (descriptors exhausted at start): never sleeps.
                _ => std::hint::spin_loop(),
            }
        }
        // What the last polls counted.
        let now = clock();
        self.counters.awake_ns += now - last;
        self.publish(now);
        self
    }
}

/// Counts the wait of each of `frames`, taken from their ring at `taken` on the stamps'
/// clock.
fn time_waits<D: Device>(dev: &mut D, frames: &[Frame], counters: &mut Counters, taken: u64) {
    for &f in frames {
        let Some(stamp) = dev.rx_stamp(f) else {
            continue;
        };
        if stamp != 0
            && stamp <= taken.saturating_add(STAMP_AHEAD)
            && stamp.saturating_add(STAMP_BEHIND) >= taken
        {
            counters.rx_waited(taken.saturating_sub(stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{PortConfig, PortRole};
    use crate::state::Limits;
    use pktio::MemDevice;

    /// Shared state for one worker with one port, an uplink.
    fn one_uplink() -> Arc<Shared> {
        let uplink = PortConfig {
            name: "uplink".into(),
            role: PortRole::Uplink,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        };
        Arc::new(Shared::new(vec![uplink], 1, Limits::default()))
    }

    /// Frames received as the published counters tell it.
    fn published_rx(shared: &Shared) -> u64 {
        shared.counters[0].read().rx
    }

    #[test]
    fn counters_are_published_when_idle_and_at_least_every_interval_under_load() {
        let shared = one_uplink();
        let mut w = Worker::new(0, MemDevice::new(1, 64), shared.clone());
        // A runt: received, counted and dropped.
        let runt = [0u8; 10];
        let t = SECOND;
        assert_eq!(w.poll(t), 0);
        assert!(w.dev.inject(0, &runt));
        assert_eq!(w.poll(t + 1), 1);
        assert_eq!(w.counters().rx, 1);
        assert_eq!(
            published_rx(&shared),
            0,
            "a busy poll keeps its counters a while"
        );
        assert_eq!(w.poll(t + 2), 0);
        assert_eq!(published_rx(&shared), 1, "an idle poll publishes them");

        // Under load: published once the interval has passed, not before.
        for (i, at) in [t + 3, t + 4, t + 2 + PUBLISH / 2].into_iter().enumerate() {
            assert!(w.dev.inject(0, &runt));
            assert_eq!(w.poll(at), 1);
            assert_eq!(published_rx(&shared), 1, "poll {i} under load");
        }
        assert!(w.dev.inject(0, &runt));
        assert_eq!(w.poll(t + 2 + PUBLISH), 1);
        assert_eq!(published_rx(&shared), 5);
    }

    #[test]
    fn a_measuring_worker_counts_how_long_stamped_frames_waited() {
        let mut w = Worker::new(0, MemDevice::new(1, 64), one_uplink());
        w.measure_ring_wait(true);
        let runt = [0u8; 10];
        // Stamped this long before now; the poll takes them a little later still, so each
        // wait is chosen well inside its bucket's lower edge.
        let now = pktio::stamp_clock();
        for (stamp, what) in [
            (now - 210_000, "waited 210 µs"),
            (now - 2_000_000, "waited 2 ms"),
            (now - 30_000_000, "waited 30 ms"),
            (0, "unstamped: not counted"),
            (now + 100_000_000, "from the future: not a stamp"),
        ] {
            assert!(w.dev.inject_stamped(0, &runt, stamp), "{what}");
        }
        assert!(w.dev.inject(0, &runt), "no stamp at all");
        assert_eq!(w.poll(SECOND), 6);
        let c = w.counters();
        assert_eq!(c.rx_wait_timed, 3);
        let least = 210_000 + 2_000_000 + 30_000_000;
        assert!(
            (least..least + 50_000_000).contains(&c.rx_wait_ns),
            "{}",
            c.rx_wait_ns
        );
        let over: Vec<u64> = [
            c.rx_waited_over_10us,
            c.rx_waited_over_20us,
            c.rx_waited_over_50us,
            c.rx_waited_over_100us,
            c.rx_waited_over_200us,
            c.rx_waited_over_500us,
            c.rx_waited_over_1ms,
            c.rx_waited_over_5ms,
        ]
        .to_vec();
        assert_eq!(over[..5], [3, 3, 3, 3, 3]);
        assert_eq!(
            over[6..],
            [2, 1],
            "2 ms and 30 ms over a millisecond, one over 5 ms"
        );

        // Not measuring: the same frames count nothing.
        let mut quiet = Worker::new(0, MemDevice::new(1, 64), w.shared.clone());
        assert!(quiet.dev.inject_stamped(0, &runt, now - 150_000));
        assert_eq!(quiet.poll(SECOND), 1);
        assert_eq!(quiet.counters().rx_wait_timed, 0);
    }
}
