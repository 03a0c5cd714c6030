//! A receive burst, stage by stage, as VPP handles a vector and DPDK looks keys up in
//! bulk: the frames of a group are all classified and parsed first ([`Pipeline::prepare`]),
//! then their connection-table keys are looked up together ([`Pipeline::look_up`], whose
//! bucket and entry lines are requested for the whole group before any is read, so the
//! group's cache misses overlap instead of adding up), and only then is each frame handled
//! to the end ([`Pipeline::handle`]), with what the first stages found. Between the two,
//! the frames the table did not know (new connections) have their Service decision taken
//! ahead and the lines their inserts will touch requested ([`Pipeline::prefetch_new`]), so
//! that the inserts do not wait for memory one by one.
//!
//! The semantics are those of handling the frames one by one. A frame's early lookup is
//! used only while it still stands: a hit whose entry an earlier frame of the burst has
//! changed (a new protocol state, a removal, a reuse) is looked up again, and so is a miss
//! once an earlier frame has written the table (a SYN and its retransmission in one burst
//! make one connection, not two).

use std::net::{IpAddr, Ipv4Addr};

use nat::conntrack::{FlowKey, Hit, BULK};
use nat::packet::{self, Headers, ETH_IPV4, ETH_IPV6};
use nat::tables::{Decision, FrontendKey};
use pktio::{Device, Frame, PortId};

use super::{is_tracked, key_of, Pipeline, Resolver, Rx};
use crate::counters::Counters;

/// Frames prepared and looked up together: one bulk lookup's worth. A 64-frame receive
/// burst is two groups; a group's records (headers, keys, hits) stay within a few KiB of
/// stack, in the first-level cache with the frames.
const GROUP: usize = BULK;

/// Bytes from a frame's start that its headers take up at most in the common case
/// (Ethernet, IPv6, TCP without options): the lines the first stage reads.
const HEADER_BYTES: usize = 74;

/// What the first stages found for one frame, lent to its handler.
pub(super) struct Early<'g> {
    /// The frame's IP and transport headers, for the handler to use (and edit) in place.
    pub h: &'g mut Headers,
    /// Its lookup, when its tuple is one the table keys (else the handler decides as if
    /// alone).
    pub lookup: Option<Lookup<'g>>,
}

/// A tuple looked up before its frame's turn.
#[derive(Clone, Copy)]
pub(super) struct Lookup<'g> {
    /// What the table held for it.
    pub hit: &'g Option<Hit>,
    /// The pipeline's count of table writes when it was looked up (`Pipeline::writes`).
    pub writes: u32,
    /// The tuple's [`FlowKey::flow_hash`], computed once for the lookup, the Service's
    /// decision and the insert.
    pub hash: u64,
}

/// A placeholder frontend for the unused places of a group's arrays.
const NO_FRONTEND: FrontendKey = FrontendKey {
    ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    port: 0,
    protocol: nat::spec::Protocol::Tcp,
};

/// Where a group's frame stands after the first stage.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not an IP packet the first stages take up: handled as if alone.
    Alone,
    /// Parsed, nothing to look up.
    Parsed,
    /// Parsed, its key the n-th of the group's lookup.
    Keyed(u8),
}

impl Pipeline<'_> {
    /// Handles the frames of one receive burst from `port`; each is sent or freed.
    pub fn handle_burst<D: Device>(
        &self,
        dev: &mut D,
        port: PortId,
        frames: &[Frame],
        c: &mut Counters,
        resolver: &mut Resolver,
    ) {
        if frames.is_empty() {
            // Most ports of a pass have nothing: not even the group's records are set up.
            return;
        }
        // The group's records live here, written in place by the first stages and lent to
        // the last: nothing of them is copied per frame but the headers the handler edits.
        let mut heads = [packet::Headers::NONE; GROUP];
        let mut stages = [Stage::Alone; GROUP];
        let mut keys = [FlowKey::NONE; GROUP];
        let mut hashes = [0u64; GROUP];
        let mut hits: [Option<Hit>; GROUP] = [None; GROUP];
        for group in frames.chunks(GROUP) {
            // On AF_XDP in copy mode the kernel wrote each frame on the core that received
            // it, and a frame's first read waits for its lines to come over: requested for
            // the whole group first, they come together (read one frame at a time by the
            // parse, with a frame's work in between, the waits added up: in the lab, half
            // of the worker's own time stalled on a frame's EtherType).
            dev.prefetch(group, HEADER_BYTES);
            for ((frame, stage), h) in group.iter().zip(&mut stages).zip(&mut heads) {
                *stage = self.prepare(dev, port, *frame, c, h);
            }
            // The keys in a loop of their own: a frame's headers are read back well after
            // the stores that wrote them (read at once, the copy waits for those stores).
            let mut n = 0;
            for (stage, h) in stages[..group.len()].iter_mut().zip(&heads) {
                if *stage == Stage::Keyed(0) {
                    keys[n] = key_of(h);
                    hashes[n] = keys[n].flow_hash();
                    *stage = Stage::Keyed(n as u8);
                    n += 1;
                }
            }
            let writes = self.writes.get();
            self.look_up(&keys[..n], &hashes[..n], &mut hits[..n]);
            self.prefetch_new(&heads[..group.len()], &stages, &hashes, &hits);
            for ((frame, h), stage) in group.iter().zip(heads.iter_mut()).zip(&stages) {
                let early = match *stage {
                    Stage::Alone => None,
                    Stage::Parsed => Some(Early { h, lookup: None }),
                    Stage::Keyed(k) => Some(Early {
                        h,
                        lookup: Some(Lookup {
                            hit: &hits[k as usize],
                            writes,
                            hash: hashes[k as usize],
                        }),
                    }),
                };
                self.handle(dev, port, *frame, c, resolver, early);
            }
        }
    }

    /// The first stage for one frame: an IP packet received as it is (not ARP, not VXLAN
    /// for this node: those take their own ways) has its headers parsed into `h`, and a
    /// tuple the connection table keys is marked for the lookup (as `Keyed(0)`; the caller
    /// numbers it). Every other frame, malformed ones included, stays `Alone`: the handler
    /// drops and counts it as it would alone.
    fn prepare<D: Device>(
        &self,
        dev: &mut D,
        port: PortId,
        frame: Frame,
        c: &mut Counters,
        h: &mut Headers,
    ) -> Stage {
        let (buf, off) = dev.chunk_mut(frame);
        let mut rx = Rx::new(buf, off, frame, port, c);
        if rx.buf.len() < rx.off + frame.len as usize {
            return Stage::Alone;
        }
        match packet::ethertype(rx.pkt()) {
            Some(ETH_IPV4) if !self.is_overlay_for_us(&mut rx) => {}
            Some(ETH_IPV6) => {}
            _ => return Stage::Alone,
        }
        if packet::parse_into(rx.pkt(), h).is_err() {
            return Stage::Alone;
        }
        let keyed = !h.later_fragment && !packet::is_icmp_error(h) && is_tracked(h);
        if keyed {
            Stage::Keyed(0)
        } else {
            Stage::Parsed
        }
    }

    /// The second stage: a group's keys looked up in the connection table at once.
    fn look_up(&self, keys: &[FlowKey], hashes: &[u64], hits: &mut [Option<Hit>]) {
        if !keys.is_empty() {
            self.shared
                .conntrack
                .get_bulk_hashed(keys, hashes, self.now, hits);
        }
    }

    /// `key`'s [`FlowKey::flow_hash`]: a new connection's tuple is hashed for its lookup,
    /// its Service's decision, its masquerade port and its insert, so the pass keeps the
    /// last one.
    pub(super) fn flow_hash(&self, key: &FlowKey) -> u64 {
        if let Some((k, hash)) = self.hash_memo.get() {
            if k == *key {
                return hash;
            }
        }
        let hash = key.flow_hash();
        self.hash_memo.set(Some((*key, hash)));
        hash
    }

    /// The third stage, for the frames the table does not know (new connections, mostly):
    /// the lines their Services' decisions read brought in for all of them, a level at a
    /// time (`ServiceTable::warm`), each decision taken ahead, and the lines their inserts
    /// will touch requested: the reply tuple's index buckets and the free entry
    /// (`Conntrack::prefetch_inserts`), so that the inserts find them in the cache.
    /// Nothing is decided here: the handler decides again, with session affinity, and that
    /// decision is the one kept.
    fn prefetch_new(
        &self,
        heads: &[Headers],
        stages: &[Stage; GROUP],
        hashes: &[u64; GROUP],
        hits: &[Option<Hit>; GROUP],
    ) {
        // The group's new connections: which frame, its frontend, its hash.
        let mut frame_of = [0usize; GROUP];
        let mut frontends = [NO_FRONTEND; GROUP];
        let mut new_hashes = [0u64; GROUP];
        let mut m = 0;
        for (i, (h, stage)) in heads.iter().zip(stages).enumerate() {
            let Stage::Keyed(k) = *stage else { continue };
            if hits[k as usize].is_some() {
                continue;
            }
            let Some(protocol) = nat::spec::Protocol::from_number(h.proto) else {
                continue;
            };
            frontends[m] = FrontendKey {
                ip: h.dst,
                port: h.dport,
                protocol,
            };
            new_hashes[m] = hashes[k as usize];
            frame_of[m] = i;
            m += 1;
        }
        if m == 0 {
            return;
        }
        // Every decision's lines, a level at a time, before the first decision is taken.
        std::hint::black_box(self.tables.services.warm(&frontends[..m], &new_hashes[..m]));
        let mut originals = [0u64; GROUP];
        let mut replies = [FlowKey::NONE; GROUP];
        let mut n = 0;
        for ((fkey, hash), i) in frontends[..m].iter().zip(&new_hashes).zip(&frame_of) {
            let h = &heads[*i];
            let Some(f) = self.tables.services.frontend(fkey) else {
                continue;
            };
            if let Decision::Translate {
                backend,
                masquerade,
            } = self.tables.services.decide(f, h.src, *hash)
            {
                // The reply tuple of the first masquerade port an insert tries when the
                // client's own port is in the range (a guess otherwise: only a prefetch).
                let dst = if masquerade {
                    self.tables.masquerade_source(h.v6).unwrap_or(h.src)
                } else {
                    h.src
                };
                originals[n] = *hash;
                replies[n] = FlowKey {
                    proto: h.proto,
                    src: backend.ip,
                    dst,
                    sport: backend.port,
                    dport: h.sport,
                };
                n += 1;
            }
        }
        if n > 0 {
            self.shared
                .conntrack
                .prefetch_inserts(&originals[..n], &replies[..n]);
        }
    }

    /// The connection `key` belongs to, now: the early lookup when it still stands, else
    /// a lookup of its own (see the module comment), kept in `fresh`. Lent rather than
    /// copied out: a `Hit` is some hundred bytes of addresses at odd offsets.
    pub(super) fn tracked<'h>(
        &self,
        key: &FlowKey,
        early: Option<Lookup<'h>>,
        fresh: &'h mut Option<Hit>,
    ) -> Option<&'h Hit> {
        let Some(early) = early else {
            *fresh = self.shared.conntrack.get(key, self.now);
            return fresh.as_ref();
        };
        if let Some(hit) = early.hit {
            if self.shared.conntrack.still(hit, self.now) {
                return Some(hit);
            }
        }
        // A new connection, likely: its admission hashes the tuple again.
        self.hash_memo.set(Some((*key, early.hash)));
        if early.hit.is_none() && early.writes == self.writes.get() {
            return None;
        }
        *fresh = self.shared.conntrack.get_hashed(key, early.hash, self.now);
        fresh.as_ref()
    }
}
