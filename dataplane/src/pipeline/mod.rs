//! The per-packet pipeline: ARP for the pods' gateway, Service translation with connection
//! tracking, routing between pod interfaces, and kube-proxy's reject for Services without
//! endpoints.
//!
//! Pure: it reads frames from a [`Device`] and writes them back (forward, or rewritten into
//! a reply in place), given the tables, the shared conntrack and the time as arguments. It
//! never allocates, locks or panics per packet; every drop has a [`DropReason`].
//!
//! One room per concern, each a further `impl Pipeline`:
//!
//! - `burst`: a receive burst stage by stage ([`Pipeline::handle_burst`]): every frame
//!   parsed, then the connection table asked for all of them at once, then each handled;
//! - here: `Pipeline::handle`, classification by EtherType, the IP dispatch, and what
//!   becomes of an `Outcome` (the one place an ICMP error asked for is built and routed,
//!   so routing never calls itself);
//! - `neighbor`: ARP and neighbour discovery answers, learning, solicitations, and the
//!   frames held while a next hop is resolved ([`Resolver`]);
//! - `admit`: a new connection's admission — Service translation, masquerade, policy —
//!   and its entry in the connection table;
//! - `forward`: routing to local pods, other nodes (VXLAN), the uplink and the host;
//! - `icmp`: ICMP errors (built, and un-NATed when they are about a tracked connection)
//!   and echo replies;
//! - `eth`: Ethernet-level helpers.

mod admit;
mod burst;
mod eth;
mod forward;
mod icmp;
mod neighbor;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::Guard;

use nat::conntrack::FlowKey;
use nat::packet::{self, Headers, Malformed, ETH_ARP, ETH_IPV4, ETH_IPV6};
use nat::timeouts::{self, State};
use pktio::{Device, Frame, PortId};

use crate::counters::{Counters, DropReason};
use crate::monitor::{EventKind, FlowRecord};
use crate::neighbors::{Neighbor, NeighborMap};
use crate::ports::PortRole;
use crate::state::Shared;
use crate::tables::Tables;

pub use admit::{SNAT_PORT_MAX, SNAT_PORT_MIN};
pub use neighbor::{Resolver, HELD_FRAMES, HOLD_TIME};

/// One second in the pipeline's clock unit (nanoseconds).
pub const SECOND: u64 = timeouts::SECOND;

/// How a frame reached the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Straight from a port.
    Port,
    /// Out of a VXLAN packet that arrived on the uplink.
    Overlay,
}

/// A received frame while the pipeline handles it: where its packet lies in the device's
/// memory, where it came from, and the worker's counters.
struct Rx<'f> {
    /// The whole chunk that holds the frame: headroom before the packet (encapsulation
    /// grows into it) and room after it (an ICMP error may be longer than the packet).
    buf: &'f mut [u8],
    /// Offset of the packet's Ethernet header in `buf`.
    off: usize,
    /// The frame: for a decapsulated packet, the inner frame.
    frame: Frame,
    /// The port it arrived on.
    port: PortId,
    /// Whether it arrived as it is or out of the overlay.
    via: Via,
    /// The worker's counters.
    c: &'f mut Counters,
    /// What the burst's first stages found for the frame (`burst`), until it is used.
    early: Option<burst::Early<'f>>,
}

impl<'f> Rx<'f> {
    /// A frame received on `port`, at `off` in `buf`.
    fn new(buf: &'f mut [u8], off: usize, frame: Frame, port: PortId, c: &'f mut Counters) -> Self {
        Rx {
            buf,
            off,
            frame,
            port,
            via: Via::Port,
            c,
            early: None,
        }
    }

    /// The packet, from its Ethernet header to the end of the frame.
    fn pkt(&mut self) -> &mut [u8] {
        let len = self.frame.len as usize;
        &mut self.buf[self.off..self.off + len]
    }

    /// The packet and the room after it, for replies built in place.
    fn room(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..]
    }

    /// The Ethernet source address: who sent the frame.
    fn sender_mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.buf[self.off + 6..self.off + 12]);
        mac
    }
}

/// What became of a frame handled in place.
enum Outcome {
    /// Transmit the (rewritten) frame on a port; `addr`/`len` may have changed.
    Send(PortId, Frame),
    /// Drop and count.
    Drop(DropReason),
    /// Hold the frame given (the packet to send, which for a decapsulated packet lies
    /// inside the frame received) until this address is resolved, and ask for its MAC;
    /// when it cannot be held, drop and count.
    Resolve(DropReason, IpAddr, Frame),
    /// Answer the packet with an ICMP error, built in its place ([`Pipeline::settle`]).
    Icmp(icmp::Request),
}

/// The pipeline of one worker: borrowed state for one burst.
pub struct Pipeline<'a> {
    /// Shared state.
    pub shared: &'a Shared,
    /// Tables for this burst.
    pub tables: &'a Tables,
    /// Ports for this burst.
    pub ports: &'a crate::ports::PortList,
    /// The time, in nanoseconds of the dataplane's clock.
    pub now: u64,
    /// The worker running it (its flow monitor ring).
    pub worker: usize,
    /// Writes to the connection table this pipeline has made (inserts, and removals to make
    /// room): an early lookup's miss stands only while none came after it (`burst`).
    writes: Cell<u32>,
    /// The neighbours this pass reads: the map as it was when the pass began, taken again
    /// when the pass learns a neighbour or misses one (`Pipeline::neighbor`).
    neighbors: RefCell<Guard<Arc<NeighborMap>>>,
    /// The pass's last neighbour lookups (`Pipeline::neighbor`).
    neighbor_memo: [Cell<Option<(IpAddr, Neighbor)>>; neighbor::NEIGHBOR_MEMO],
    /// The pass's last pod sender learned, or found known already (`Pipeline::learn_sender`).
    sender_memo: Cell<Option<(IpAddr, Neighbor)>>,
    /// The last tuple hashed, with its hash (`Pipeline::flow_hash`).
    hash_memo: Cell<Option<(FlowKey, u64)>>,
}

impl<'a> Pipeline<'a> {
    /// The pipeline of worker `worker` for one pass at time `now`.
    pub fn new(
        shared: &'a Shared,
        tables: &'a Tables,
        ports: &'a crate::ports::PortList,
        now: u64,
        worker: usize,
    ) -> Self {
        Pipeline {
            shared,
            tables,
            ports,
            now,
            worker,
            writes: Cell::new(0),
            neighbors: RefCell::new(shared.neighbors.snapshot()),
            neighbor_memo: Default::default(),
            sender_memo: Cell::new(None),
            hash_memo: Cell::new(None),
        }
    }
}

impl Pipeline<'_> {
    /// Handles one received frame, with what the burst's first stages found for it; the
    /// frame is always sent or freed.
    fn handle<D: Device>(
        &self,
        dev: &mut D,
        port: PortId,
        frame: Frame,
        c: &mut Counters,
        limiter: &mut Resolver,
        early: Option<burst::Early<'_>>,
    ) {
        c.rx += 1;
        c.rx_bytes += u64::from(frame.len);
        let outcome = {
            let (buf, off) = dev.chunk_mut(frame);
            let mut rx = Rx::new(buf, off, frame, port, c);
            rx.early = early;
            let outcome = self.classify(&mut rx);
            self.settle(&mut rx, outcome)
        };
        match outcome {
            Outcome::Send(out, f) => {
                send_counted(dev, out, f, c);
            }
            Outcome::Drop(reason) | Outcome::Icmp(icmp::Request { unsent: reason, .. }) => {
                c.drop(reason);
                if self.shared.monitor.active() {
                    let (chunk, off) = dev.chunk_mut(frame);
                    if let Ok(h) = packet::parse(&chunk[off..off + frame.len as usize]) {
                        let kind = if reason == DropReason::PolicyDenied {
                            EventKind::PolicyDenied
                        } else {
                            EventKind::Drop
                        };
                        self.event(kind, &h, None, None, 0, Some(reason));
                    }
                }
                dev.free(frame);
            }
            Outcome::Resolve(reason, ip, held) => {
                if !limiter.hold(held, ip, self.now + HOLD_TIME) {
                    c.drop(reason);
                    dev.free(held);
                }
                if limiter.allow(ip, self.now) {
                    self.solicit(dev, ip, c);
                }
            }
        }
    }

    /// Carries out what an outcome leaves to do in place: an ICMP error asked for is built
    /// in the packet's place and sent back, or un-NATed and routed. Routing that asks for an
    /// error again (an error about an error) drops it. Never returns [`Outcome::Icmp`].
    fn settle(&self, rx: &mut Rx<'_>, outcome: Outcome) -> Outcome {
        let Outcome::Icmp(request) = outcome else {
            return outcome;
        };
        match self.icmp_reply(rx, &request) {
            Outcome::Icmp(again) => Outcome::Drop(again.unsent),
            done => done,
        }
    }

    fn classify(&self, rx: &mut Rx<'_>) -> Outcome {
        let len = rx.frame.len as usize;
        if rx.buf.len() < rx.off + len {
            return Outcome::Drop(DropReason::Truncated);
        }
        match packet::ethertype(rx.pkt()) {
            Some(ETH_ARP) => self.arp(rx),
            Some(ETH_IPV4) if self.is_overlay_for_us(rx) => self.decap(rx),
            Some(ETH_IPV4) | Some(ETH_IPV6) => self.ip(rx),
            Some(_) => Outcome::Drop(DropReason::UnknownEthertype),
            None => Outcome::Drop(DropReason::Truncated),
        }
    }

    /// An IP packet (received, or out of the overlay): neighbour discovery, ICMP errors
    /// about tracked connections, established connections, then a new connection's
    /// admission, the node's own addresses, and routing.
    fn ip(&self, rx: &mut Rx<'_>) -> Outcome {
        // The first stage's headers are used in place (a copy of them, with its addresses
        // at odd offsets, cost more than the rest of the dispatch).
        let mut parsed;
        let (h, lookup) = match rx.early.take() {
            Some(e) => (e.h, e.lookup),
            None => {
                parsed = match packet::parse(rx.pkt()) {
                    Ok(h) => h,
                    Err(m) => return Outcome::Drop(malformed(m)),
                };
                (&mut parsed, None)
            }
        };
        let role = self.ports.get(rx.port).map(|p| p.role);
        self.learn_sender(rx, role, h);
        // Untranslated traffic may leave through the uplink only if it came from there.
        let from_outside = role == Some(PortRole::Uplink) && rx.via == Via::Port;
        if h.proto == packet::PROTO_ICMPV6 && matches!(h.icmp_type, 133..=137) {
            if rx.via == Via::Overlay {
                return Outcome::Drop(DropReason::NeighborConsumed);
            }
            return self.ndp(rx, h);
        }
        if h.later_fragment {
            return Outcome::Drop(DropReason::Fragment);
        }
        if packet::is_icmp_error(h) && self.unnat_icmp_error(rx, h) {
            return self.route(rx, h, true);
        }
        let tracked = is_tracked(h);
        if tracked {
            let (key, flags) = tuple_of(rx.pkt(), h);
            let mut fresh = None;
            if let Some(hit) = self.tracked(&key, lookup, &mut fresh) {
                let before = State::from_u8(hit.state);
                let state = timeouts::next(h.proto, before, hit.dir, flags);
                let expires = self.now + timeouts::timeout(h.proto, state);
                self.shared.conntrack.update(hit, state as u8, expires);
                admit::translate(rx.pkt(), h, &hit.conn, hit.dir);
                rx.c.nat_hits += 1;
                return self.route(rx, h, true);
            }
            if let Some(outcome) = self.to_service(rx, h, key, flags) {
                return outcome;
            }
        }
        if self.tables.services.is_cluster_ip(h.dst) && !packet::is_icmp_error(h) {
            // A held ClusterIP on a port or protocol none of its Service ports serves:
            // kube-proxy's nftables rejects it (the `cluster-ips` set), unlike an address
            // of the range nobody holds, which it drops.
            return self.reject(rx, h);
        }
        if self.tables.services.in_service_range(h.dst) {
            return Outcome::Drop(DropReason::NoService);
        }
        if self.tables.is_gateway(h.dst) {
            let echo_request = matches!(h.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6)
                && h.icmp_type == if h.v6 { 128 } else { 8 };
            if echo_request && !h.later_fragment && !h.first_fragment {
                rx.c.echo_replies += 1;
                return self.echo_reply(rx, h);
            }
            return Outcome::Drop(DropReason::ToHost);
        }
        if self.tables.node_addresses.contains(&h.dst) {
            return self.to_host(rx, h, tracked);
        }
        if tracked
            && self.tables.spec.cluster.ip_masq
            && self.tables.local_pods.contains_key(&h.src)
            && !self.tables.in_cluster_network(h.dst)
            && !is_multicast(h.dst)
        {
            if let Some(outcome) = self.masquerade_out(rx, h) {
                return outcome;
            }
        }
        if tracked
            && (self.tables.local_pods.contains_key(&h.src)
                || self.tables.local_pods.contains_key(&h.dst))
        {
            // Untranslated connections of local pods are tracked too, with their policy
            // verdict, so that replies of an allowed connection pass whatever policy says
            // about their direction, and a connection keeps its verdict until it ends.
            if let Err(reason) = self.track_untranslated(rx, h) {
                return Outcome::Drop(reason);
            }
        }
        rx.c.routed += 1;
        self.route(rx, h, from_outside)
    }

    /// Records a flow event for the monitor (call only when it is active): a `Copy` record
    /// of addresses and ids, put into words by the reader.
    #[cold]
    fn event(
        &self,
        kind: EventKind,
        h: &Headers,
        to: Option<(IpAddr, u16)>,
        masquerade: Option<(IpAddr, u16)>,
        policy: u32,
        reason: Option<DropReason>,
    ) {
        self.shared.monitor.record(
            self.worker,
            FlowRecord {
                at: self.now,
                generation: self.tables.generation,
                worker: self.worker as u16,
                kind,
                protocol: h.proto,
                src: (h.src, h.sport),
                dst: (h.dst, h.dport),
                to,
                masquerade,
                policy,
                reason,
            },
        );
    }
}

/// Whether the connection table keys a packet's protocol: TCP, UDP, SCTP and ICMP echo.
fn is_tracked(h: &Headers) -> bool {
    matches!(
        h.proto,
        packet::PROTO_TCP | packet::PROTO_UDP | packet::PROTO_SCTP
    ) || (matches!(h.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6)
        && packet::is_echo(h.v6, h.icmp_type))
}

/// A packet's tuple as conntrack keys it.
fn key_of(h: &Headers) -> FlowKey {
    FlowKey {
        proto: h.proto,
        src: h.src,
        dst: h.dst,
        sport: h.sport,
        dport: h.dport,
    }
}

/// A packet's tuple as conntrack keys it, and its TCP flags (0 for other protocols).
fn tuple_of(pkt: &[u8], h: &Headers) -> (FlowKey, u8) {
    let key = key_of(h);
    let flags = if h.proto == packet::PROTO_TCP {
        pkt.get(h.l4 + 13).copied().unwrap_or(0)
    } else {
        0
    };
    (key, flags)
}

/// Multicast (and IPv4 limited broadcast) destinations: never masqueraded, never answered
/// with ICMP errors.
fn is_multicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast(),
    }
}

fn malformed(m: Malformed) -> DropReason {
    match m {
        Malformed::Truncated => DropReason::Truncated,
        Malformed::BadIpHeader => DropReason::BadIpHeader,
        Malformed::BadIpChecksum => DropReason::BadIpChecksum,
        Malformed::UnsupportedExtension => DropReason::UnsupportedExtension,
    }
}

/// Sends `f` on `port` of `dev`, counting it (`tx`, `tx_bytes`) if the device took it.
#[inline]
fn send_counted<D: Device>(dev: &mut D, port: PortId, f: Frame, c: &mut Counters) -> bool {
    let len = u64::from(f.len);
    let sent = dev.send(port, f);
    if sent {
        c.tx += 1;
        c.tx_bytes += len;
    }
    sent
}
