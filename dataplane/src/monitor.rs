//! The flow monitor: workers record flow events (a new connection and its translation or
//! policy verdict, a drop and its reason) into per-worker lock-free rings that one reader
//! (`kxdp monitor`, through the control socket) drains.
//!
//! Recording costs one relaxed load while nobody watches. While a reader watches, a worker
//! pushes into its own bounded ring and never waits: when the ring is full the event is
//! counted as lost, and the reader is told how many it missed. One reader at a time.
//!
//! A worker records a [`FlowRecord`]: `Copy`, addresses and ids only, so recording builds
//! no text. The reader puts it into words ([`FlowEvent`]): the drop reason's label, and the
//! allowing policy's name looked up in the policy table of the tables generation the
//! worker used (the last [`POLICY_HISTORY`] generations installed are kept for that).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam::queue::ArrayQueue;
use nat::policy::PolicyTable;

use crate::counters::DropReason;

/// Events each worker's ring holds before new ones are lost.
pub const RING: usize = 4096;

/// Tables generations whose policy names the reader can still give; an event recorded
/// under an older one names its policy by index.
pub const POLICY_HISTORY: usize = 16;

pub use nat::wire::{EventKind, FlowEvent};

/// One flow event as a worker records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// Dataplane clock, ns.
    pub at: u64,
    /// The tables generation the worker used.
    pub generation: u64,
    /// The worker that saw it.
    pub worker: u16,
    /// What happened.
    pub kind: EventKind,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address and port (ICMP echo: identifier) as the packet arrived.
    pub src: (IpAddr, u16),
    /// Destination as the packet arrived.
    pub dst: (IpAddr, u16),
    /// The translated destination, for a translated connection.
    pub to: Option<(IpAddr, u16)>,
    /// The source after masquerade, if masqueraded.
    pub masquerade: Option<(IpAddr, u16)>,
    /// The allowing policy as the connection table tags it: 1 + its index in the policy
    /// table, 0 when no policy isolated either end.
    pub policy: u32,
    /// A drop's reason.
    pub reason: Option<DropReason>,
}

/// The per-worker rings.
pub struct Monitor {
    watching: AtomicBool,
    rings: Vec<ArrayQueue<FlowRecord>>,
    lost: Vec<AtomicU64>,
    /// The policy tables of the last generations installed, newest last.
    policies: Mutex<VecDeque<(u64, Arc<PolicyTable>)>>,
}

impl Monitor {
    /// Rings for `workers` workers.
    pub fn new(workers: usize) -> Monitor {
        Monitor {
            watching: AtomicBool::new(false),
            rings: (0..workers.max(1)).map(|_| ArrayQueue::new(RING)).collect(),
            lost: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
            policies: Mutex::new(VecDeque::with_capacity(POLICY_HISTORY)),
        }
    }

    /// Notes the policy table of tables `generation`, just installed, so events recorded
    /// under it can name their policies.
    pub fn tables_in_use(&self, generation: u64, policy: &Arc<PolicyTable>) {
        let mut history = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == POLICY_HISTORY {
            history.pop_front();
        }
        history.push_back((generation, Arc::clone(policy)));
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
    pub fn record(&self, worker: usize, event: FlowRecord) {
        let w = worker.min(self.rings.len() - 1);
        if self.rings[w].push(event).is_err() {
            self.lost[w].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes up to `max` events from every ring, in words, and the events lost since the
    /// last call.
    pub fn drain(&self, max: usize) -> (Vec<FlowEvent>, u64) {
        let mut out: Vec<FlowRecord> = Vec::new();
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
        let history = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let events = out.iter().map(|r| describe(r, &history)).collect();
        (events, lost)
    }
}

/// A record in words: the reason's label, the policy's `namespace/name` (or, when its
/// generation's tables are no longer known, `policy #N of generation G`).
fn describe(r: &FlowRecord, history: &VecDeque<(u64, Arc<PolicyTable>)>) -> FlowEvent {
    let policy = r.policy.checked_sub(1).map(|index| {
        let table = history.iter().rev().find(|(g, _)| *g == r.generation);
        match table {
            Some((_, t)) => t.policy_name(index).to_string(),
            None => format!("policy #{index} of generation {}", r.generation),
        }
    });
    FlowEvent {
        at: r.at,
        worker: r.worker,
        kind: r.kind,
        protocol: r.protocol,
        src: r.src,
        dst: r.dst,
        to: r.to,
        masquerade: r.masquerade,
        policy,
        reason: r.reason.map(|reason| reason.label().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64) -> FlowRecord {
        FlowRecord {
            at,
            generation: 1,
            worker: 0,
            kind: EventKind::Drop,
            protocol: 6,
            src: ("10.244.1.2".parse().unwrap(), 1),
            dst: ("10.244.1.5".parse().unwrap(), 2),
            to: None,
            masquerade: None,
            policy: 0,
            reason: Some(DropReason::NoRoute),
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

    fn policies(names: &[&str]) -> Arc<PolicyTable> {
        let spec = nat::spec::PolicySpec {
            policies: names.iter().map(|n| n.to_string()).collect(),
            pods: Vec::new(),
        };
        Arc::new(PolicyTable::build(&spec))
    }

    #[test]
    fn the_reader_names_a_policy_by_the_generation_it_was_recorded_under() {
        let m = Monitor::new(1);
        assert!(m.subscribe());
        m.tables_in_use(7, &policies(&["a/old", "a/allow"]));
        m.tables_in_use(8, &policies(&["b/new"]));
        let tagged = |generation, policy, at| FlowRecord {
            generation,
            policy,
            kind: EventKind::Translated,
            reason: None,
            ..ev(at)
        };
        m.record(0, tagged(7, 2, 1));
        m.record(0, tagged(8, 1, 2));
        m.record(0, tagged(8, 0, 3));
        m.record(0, tagged(3, 1, 4));
        m.record(0, ev(5));
        let (got, _) = m.drain(usize::MAX);
        let named: Vec<_> = got.iter().map(|e| e.policy.as_deref()).collect();
        assert_eq!(
            named,
            [
                Some("a/allow"),
                Some("b/new"),
                None,
                Some("policy #0 of generation 3"),
                None
            ]
        );
        assert_eq!(got[4].reason.as_deref(), Some("no_route"));
        // The history is bounded: the oldest generation's names go first.
        for g in 100..100 + POLICY_HISTORY as u64 {
            m.tables_in_use(g, &policies(&["c/later"]));
        }
        m.record(0, tagged(7, 2, 6));
        let (got, _) = m.drain(usize::MAX);
        assert_eq!(got[0].policy.as_deref(), Some("policy #1 of generation 7"));
    }
}
