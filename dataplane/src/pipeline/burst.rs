//! A receive burst, stage by stage, as VPP handles a vector and DPDK looks keys up in
//! bulk: the frames of a group are all classified and parsed first ([`Pipeline::prepare`]),
//! then their connection-table keys are looked up together ([`Pipeline::look_up`], whose
//! bucket and entry lines are requested for the whole group before any is read, so the
//! group's cache misses overlap instead of adding up), and only then is each frame handled
//! to the end ([`Pipeline::handle`]), with what the first stages found.
//!
//! The semantics are those of handling the frames one by one. A frame's early lookup is
//! used only while it still stands: a hit whose entry an earlier frame of the burst has
//! changed (a new protocol state, a removal, a reuse) is looked up again, and so is a miss
//! once an earlier frame has written the table (a SYN and its retransmission in one burst
//! make one connection, not two).

use nat::conntrack::{FlowKey, Hit, BULK};
use nat::packet::{self, Headers, ETH_IPV4, ETH_IPV6};
use pktio::{Device, Frame, PortId};

use super::{tuple_of, Pipeline, Resolver, Rx};
use crate::counters::Counters;

/// Frames prepared and looked up together: one bulk lookup's worth. A 64-frame receive
/// burst is two groups; a group's records (headers, keys, hits) stay within a few KiB of
/// stack, in the first-level cache with the frames.
const GROUP: usize = BULK;

/// What the first stages found for one frame: its headers, parsed once, and its
/// connection-table lookup.
#[derive(Clone, Copy)]
pub(super) struct Early {
    /// The frame's IP and transport headers.
    pub h: Headers,
    /// Its lookup: `None` when its tuple is not one the table keys (the handler then
    /// looks nothing up early, and decides as if alone).
    pub lookup: Option<Lookup>,
}

/// A tuple looked up before its frame's turn.
#[derive(Clone, Copy)]
pub(super) struct Lookup {
    /// What the table held for it.
    pub hit: Option<Hit>,
    /// The pipeline's count of table writes when it was looked up ([`Pipeline::writes`]).
    pub writes: u32,
}

/// A placeholder key for the unused places of a group's arrays.
const NO_KEY: FlowKey = FlowKey {
    proto: 0,
    src: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    dst: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    sport: 0,
    dport: 0,
};

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
        for group in frames.chunks(GROUP) {
            let mut early: [Option<Early>; GROUP] = [None; GROUP];
            let mut keys = [NO_KEY; GROUP];
            let mut of_key = [0u8; GROUP];
            let mut n = 0;
            for (i, frame) in group.iter().enumerate() {
                early[i] = self.prepare(dev, port, *frame, c);
                if let Some(e) = &early[i] {
                    if e.lookup.is_some() {
                        let (buf, off) = dev.chunk_mut(*frame);
                        keys[n] = tuple_of(&buf[off..off + frame.len as usize], &e.h).0;
                        of_key[n] = i as u8;
                        n += 1;
                    }
                }
            }
            let mut hits = [None; GROUP];
            self.look_up(&keys[..n], &mut hits[..n]);
            for (k, hit) in hits[..n].iter().enumerate() {
                if let Some(Early {
                    lookup: Some(l), ..
                }) = &mut early[of_key[k] as usize]
                {
                    l.hit = *hit;
                }
            }
            for (frame, early) in group.iter().zip(early) {
                self.handle(dev, port, *frame, c, resolver, early);
            }
        }
    }

    /// The first stage for one frame: an IP packet received as it is (not ARP, not VXLAN
    /// for this node: those take their own ways) has its headers parsed, and a tuple the
    /// connection table keys is marked for the lookup. `None` for every other frame,
    /// including malformed ones, which the handler drops and counts as it would alone.
    fn prepare<D: Device>(
        &self,
        dev: &mut D,
        port: PortId,
        frame: Frame,
        c: &mut Counters,
    ) -> Option<Early> {
        let (buf, off) = dev.chunk_mut(frame);
        let mut rx = Rx::new(buf, off, frame, port, c);
        if rx.buf.len() < rx.off + frame.len as usize {
            return None;
        }
        match packet::ethertype(rx.pkt()) {
            Some(ETH_IPV4) if !self.is_overlay_for_us(&mut rx) => {}
            Some(ETH_IPV6) => {}
            _ => return None,
        }
        let h = packet::parse(rx.pkt()).ok()?;
        let keyed = !h.later_fragment
            && !packet::is_icmp_error(&h)
            && (matches!(
                h.proto,
                packet::PROTO_TCP | packet::PROTO_UDP | packet::PROTO_SCTP
            ) || (matches!(h.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6)
                && packet::is_echo(h.v6, h.icmp_type)));
        Some(Early {
            h,
            lookup: keyed.then_some(Lookup {
                hit: None,
                writes: self.writes.get(),
            }),
        })
    }

    /// The second stage: a group's keys looked up in the connection table at once.
    fn look_up(&self, keys: &[FlowKey], hits: &mut [Option<Hit>]) {
        if !keys.is_empty() {
            self.shared.conntrack.get_bulk(keys, self.now, hits);
        }
    }

    /// The connection `key` belongs to, now: the early lookup when it still stands, else
    /// a lookup of its own (see the module comment).
    pub(super) fn tracked(&self, key: &FlowKey, early: Option<Lookup>) -> Option<Hit> {
        match early {
            Some(Lookup { hit: Some(hit), .. }) if self.shared.conntrack.still(&hit, self.now) => {
                Some(hit)
            }
            Some(Lookup { hit: None, writes }) if writes == self.writes.get() => None,
            _ => self.shared.conntrack.get(key, self.now),
        }
    }
}
