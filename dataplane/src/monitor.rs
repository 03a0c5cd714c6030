//! The flow monitor: workers record flow events (a new connection and its translation or
//! policy verdict, a drop and its reason) into per-worker lock-free rings that one reader
//! (`kxdp monitor`, through the control socket) drains.
//!
//! Recording costs one relaxed load while nobody watches. While a reader watches, a worker
//! pushes into its own bounded ring and never waits: when the ring is full the event is
//! counted as lost, and the reader is told how many it missed. One reader at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;

/// Events each worker's ring holds before new ones are lost.
pub const RING: usize = 4096;

pub use nat::wire::{EventKind, FlowEvent};

/// The per-worker rings.
pub struct Monitor {
    watching: AtomicBool,
    rings: Vec<ArrayQueue<FlowEvent>>,
    lost: Vec<AtomicU64>,
}

impl Monitor {
    /// Rings for `workers` workers.
    pub fn new(workers: usize) -> Monitor {
        Monitor {
            watching: AtomicBool::new(false),
            rings: (0..workers.max(1)).map(|_| ArrayQueue::new(RING)).collect(),
            lost: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether a reader watches (the only cost on the packet path when nobody does).
    #[inline]
    pub fn active(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// Starts watching; `false` when another reader already does.
    pub fn subscribe(&self) -> bool {
        if self
            .watching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Nothing recorded before this reader came is its business.
        for (r, l) in self.rings.iter().zip(&self.lost) {
            while r.pop().is_some() {}
            l.store(0, Ordering::Relaxed);
        }
        true
    }

    /// Stops watching.
    pub fn unsubscribe(&self) {
        self.watching.store(false, Ordering::Release);
    }

    /// Records an event from `worker` (never blocks; a full ring counts it lost).
    pub fn record(&self, worker: usize, event: FlowEvent) {
        let w = worker.min(self.rings.len() - 1);
        if self.rings[w].push(event).is_err() {
            self.lost[w].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes up to `max` events from every ring, and the events lost since the last call.
    pub fn drain(&self, max: usize) -> (Vec<FlowEvent>, u64) {
        let mut out = Vec::new();
        for r in &self.rings {
            while out.len() < max {
                match r.pop() {
                    Some(e) => out.push(e),
                    None => break,
                }
            }
        }
        out.sort_by_key(|e| e.at);
        let lost = self.lost.iter().map(|l| l.swap(0, Ordering::Relaxed)).sum();
        (out, lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64) -> FlowEvent {
        FlowEvent {
            at,
            worker: 0,
            kind: EventKind::Drop,
            protocol: 6,
            src: ("10.244.1.2".parse().unwrap(), 1),
            dst: ("10.244.1.5".parse().unwrap(), 2),
            to: None,
            masquerade: None,
            policy: None,
            reason: Some("no_route".into()),
        }
    }

    #[test]
    fn a_slow_reader_loses_events_and_is_told_how_many() {
        let m = Monitor::new(2);
        assert!(!m.active());
        assert!(m.subscribe());
        assert!(!m.subscribe(), "one reader at a time");
        for i in 0..(RING as u64 + 10) {
            m.record(0, ev(i));
        }
        m.record(1, ev(0));
        let (got, lost) = m.drain(usize::MAX);
        assert_eq!(got.len(), RING + 1);
        assert_eq!(lost, 10);
        let (got, lost) = m.drain(usize::MAX);
        assert!(got.is_empty());
        assert_eq!(lost, 0, "told once");
        m.unsubscribe();
        assert!(!m.active());
        assert!(m.subscribe(), "a new reader after the first left");
    }
}
