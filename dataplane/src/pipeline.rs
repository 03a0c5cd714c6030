//! The per-packet pipeline: ARP for the pods' gateway, Service translation with connection
//! tracking, routing between pod interfaces, and kube-proxy's reject for Services without
//! endpoints.
//!
//! Pure: it reads frames from a [`Device`] and writes them back (forward, or rewritten into
//! a reply in place), given the tables, the shared conntrack and the time as arguments. It
//! never allocates, locks or panics per packet; every drop has a [`DropReason`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use nat::conntrack::{Connection, Direction, FlowKey, Hit, InsertError};
use nat::packet::{self, End, Headers, Malformed, ETH_ARP, ETH_IPV4, ETH_IPV6, ETH_LEN};
use nat::policy::{PolicyType, Verdict};
use nat::tables::{Decision, FrontendKey};
use nat::timeouts::{self, State};
use pktio::{Device, Frame, PortId};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, Icmpv4DstUnreachable, Icmpv4Packet,
    Icmpv4Repr, Icmpv4TimeExceeded, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

use crate::counters::{Counters, DropReason};
use crate::monitor::{EventKind, FlowEvent};
use crate::neighbors::Neighbor;
use crate::ports::PortRole;
use crate::state::Shared;
use crate::tables::Tables;

/// One second in the pipeline's clock unit (nanoseconds).
pub const SECOND: u64 = timeouts::SECOND;

/// First port of the masquerade source-port range (the kernel's default ephemeral range).
pub const SNAT_PORT_MIN: u16 = 32768;
/// Last port of the masquerade source-port range.
pub const SNAT_PORT_MAX: u16 = 60999;
/// Ports tried before a masqueraded connection is refused; bounded so a crowded range
/// costs a new flow at most this many conntrack probes.
const SNAT_TRIES: u64 = 64;

/// A new connection's NetworkPolicy admission.
#[derive(Clone, Copy, Debug, Default)]
struct Admitted {
    /// Whether a policy isolated either end (the verdict must then be kept in conntrack).
    isolated: bool,
    /// [`Connection::policy`]: 1 + the allowing policy, 0 when none isolated.
    tag: u32,
}

/// Which ICMP error the dataplane builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IcmpKind {
    /// Destination port unreachable (a Service without endpoints).
    PortUnreachable,
    /// Fragmentation needed (IPv4) / packet too big (IPv6), with the MTU that fits.
    TooBig(u16),
    /// Time exceeded in transit: the TTL / hop limit ran out here.
    TimeExceeded,
}

/// How a frame reached the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Straight from a port.
    Port,
    /// Out of a VXLAN packet that arrived on the uplink.
    Overlay,
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
}

/// Frames a worker holds while their next hop is being resolved, like the kernel's
/// per-neighbour `unres_qlen` queue: the first packet of a connection to a pod the
/// dataplane has not heard from yet is delayed, not lost.
pub const HELD_FRAMES: usize = 64;
/// How long a held frame waits for its neighbour before it is dropped (and counted).
pub const HOLD_TIME: u64 = SECOND;

/// Per-worker neighbour-resolution state: recent solicitations (so a burst for one address
/// sends one request) and the frames waiting for an answer.
pub struct Resolver {
    recent: [(u32, u64); 64],
    held: [Option<(Frame, IpAddr, u64)>; HELD_FRAMES],
    held_count: usize,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver {
            recent: [(0, 0); 64],
            held: [None; HELD_FRAMES],
            held_count: 0,
        }
    }
}

impl Resolver {
    /// Minimum interval between two requests for one address.
    const INTERVAL: u64 = SECOND / 5;

    fn allow(&mut self, ip: IpAddr, now: u64) -> bool {
        let key = match ip {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(a) => {
                let o = a.octets();
                u32::from_be_bytes([o[12], o[13], o[14], o[15]])
                    ^ u32::from_be_bytes([o[0], o[1], o[2], o[3]])
            }
        };
        let slot = &mut self.recent[(key as usize).wrapping_mul(0x9e37_79b9) >> 26 & 63];
        if slot.0 == key && now < slot.1 + Self::INTERVAL && slot.1 != 0 {
            return false;
        }
        *slot = (key, now.max(1));
        true
    }

    /// Holds `frame` for `ip` until `deadline`; false when every slot is taken.
    fn hold(&mut self, frame: Frame, ip: IpAddr, deadline: u64) -> bool {
        match self.held.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some((frame, ip, deadline));
                self.held_count += 1;
                true
            }
            None => false,
        }
    }

    /// Frames held now.
    pub fn held(&self) -> usize {
        self.held_count
    }
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
}

impl Pipeline<'_> {
    /// Handles one received frame; the frame is always sent or freed.
    pub fn handle<D: Device>(
        &self,
        dev: &mut D,
        port: PortId,
        frame: Frame,
        c: &mut Counters,
        limiter: &mut Resolver,
    ) {
        c.rx += 1;
        c.rx_bytes += u64::from(frame.len);
        let outcome = {
            let (chunk, off) = dev.chunk_mut(frame);
            self.classify(chunk, off, frame, port, c)
        };
        match outcome {
            Outcome::Send(out, f) => {
                send_counted(dev, out, f, c);
            }
            Outcome::Drop(reason) => {
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

    fn classify(
        &self,
        chunk: &mut [u8],
        off: usize,
        frame: Frame,
        port: PortId,
        c: &mut Counters,
    ) -> Outcome {
        let len = frame.len as usize;
        let Some(pkt) = chunk.get_mut(off..off + len) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        match packet::ethertype(pkt) {
            Some(ETH_ARP) => self.arp(pkt, frame, port, c),
            Some(ETH_IPV4) if self.is_overlay_for_us(pkt, port) => {
                self.decap(chunk, off, frame, port, c)
            }
            Some(ETH_IPV4) | Some(ETH_IPV6) => self.ip(chunk, off, frame, port, Via::Port, c),
            Some(_) => Outcome::Drop(DropReason::UnknownEthertype),
            None => Outcome::Drop(DropReason::Truncated),
        }
    }

    /// Whether a frame from the uplink is VXLAN addressed to this node's VTEP (a cheap look
    /// at fixed offsets; [`crate::vxlan::decapsulate`] validates it fully).
    fn is_overlay_for_us(&self, pkt: &[u8], port: PortId) -> bool {
        let Some(o) = &self.tables.overlay else {
            return false;
        };
        if Some(port) != self.shared.uplink || pkt.len() < ETH_LEN + 28 {
            return false;
        }
        let ip = &pkt[ETH_LEN..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        ip[9] == packet::PROTO_UDP
            && ip[16..20] == o.local_vtep_ip.octets()
            && pkt.len() >= ETH_LEN + ihl + 4
            && u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]) == o.port
    }

    /// Takes the inner frame out of a VXLAN packet and handles it as received from the
    /// overlay.
    fn decap(
        &self,
        chunk: &mut [u8],
        off: usize,
        frame: Frame,
        port: PortId,
        c: &mut Counters,
    ) -> Outcome {
        let Some(overlay) = &self.tables.overlay else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let pkt = &chunk[off..off + frame.len as usize];
        let d = match crate::vxlan::decapsulate(pkt, overlay) {
            Ok(d) => d,
            Err(_) => return Outcome::Drop(DropReason::BadOverlay),
        };
        c.decapsulated += 1;
        let inner = Frame {
            addr: frame.addr + d.inner_offset as u64,
            len: d.inner_len as u32,
        };
        match packet::ethertype(&chunk[off + d.inner_offset..]) {
            Some(ETH_IPV4) | Some(ETH_IPV6) => {
                self.ip(chunk, off + d.inner_offset, inner, port, Via::Overlay, c)
            }
            _ => Outcome::Drop(DropReason::BadOverlay),
        }
    }

    /// Answers ARP requests: on pod ports for every address but the asker's own (we are the
    /// gateway to everything), on the uplink for the node's and the Services' addresses.
    fn arp(&self, pkt: &mut [u8], frame: Frame, port: PortId, c: &mut Counters) -> Outcome {
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let Ok(arp) = ArpPacket::new_checked(&pkt[ETH_LEN..]) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&arp)
        else {
            return Outcome::Drop(DropReason::NeighborConsumed);
        };
        let sender = IpAddr::V4(source_protocol_addr);
        let learn = match cfg.role {
            PortRole::Pod => self.tables.in_local_pod_network(sender),
            // On the uplink, everyone who speaks ARP is a neighbour (other nodes' VTEPs,
            // routers) - but never for this node's pod network or, with a host port, the
            // node's own addresses: nobody there may take a pod's, the gateway's or the
            // node kernel's address.
            PortRole::Uplink => {
                let taken = self.tables.in_local_pod_network(sender)
                    || self.tables.is_gateway(sender)
                    || self.shared.host.is_some() && self.tables.node_addresses.contains(&sender);
                !source_protocol_addr.is_unspecified() && !taken
            }
            // On the host port, the node's kernel speaks for the node's addresses only.
            PortRole::Host => self.tables.node_addresses.contains(&sender),
        };
        if learn {
            self.shared.neighbors.learn(
                sender,
                Neighbor {
                    port,
                    mac: source_hardware_addr.0,
                },
                self.now,
            );
        }
        if operation != ArpOperation::Request || source_protocol_addr == target_protocol_addr {
            return Outcome::Drop(DropReason::NeighborConsumed);
        }
        let target = IpAddr::V4(target_protocol_addr);
        let answer = match cfg.role {
            PortRole::Pod => true,
            // The kernel's routes for the pod networks and the Service range point at us.
            PortRole::Host => !self.tables.node_addresses.contains(&target),
            PortRole::Uplink => {
                self.tables.node_addresses.contains(&target)
                    || self.tables.services.is_frontend_ip(target)
            }
        };
        if !answer {
            return Outcome::Drop(DropReason::NeighborConsumed);
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(cfg.mac),
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        set_macs(pkt, source_hardware_addr.0, cfg.mac);
        reply.emit(&mut ArpPacket::new_unchecked(&mut pkt[ETH_LEN..]));
        c.arp_replies += 1;
        let len = (ETH_LEN + reply.buffer_len()).max(frame.len as usize) as u32;
        Outcome::Send(
            port,
            Frame {
                addr: frame.addr,
                len,
            },
        )
    }

    fn ip(
        &self,
        chunk: &mut [u8],
        off: usize,
        frame: Frame,
        port: PortId,
        via: Via,
        c: &mut Counters,
    ) -> Outcome {
        let pkt = &mut chunk[off..off + frame.len as usize];
        let mut h = match packet::parse(pkt) {
            Ok(h) => h,
            Err(m) => return Outcome::Drop(malformed(m)),
        };
        let role = self.ports.get(port).map(|p| p.role);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&pkt[6..12]);
        match (role, via) {
            // A pod is learned where its own addresses come from: those control lists, or
            // those its CNI plugin gave when it was attached (the Pod's status may come
            // later than its first packets).
            (Some(PortRole::Pod), _)
                if self.tables.local_pods.contains_key(&h.src)
                    || self.ports.pod_ips(port).contains(&h.src) =>
            {
                self.shared
                    .neighbors
                    .learn(h.src, Neighbor { port, mac }, self.now);
            }
            (Some(PortRole::Uplink), Via::Port) => {
                // Replies to outside clients go back where their traffic came from.
                let m = mac_u64(mac);
                if self.shared.uplink_next_hop.load(Ordering::Relaxed) != m {
                    self.shared.uplink_next_hop.store(m, Ordering::Relaxed);
                }
            }
            (Some(PortRole::Host), Via::Port) => self.saw_host_kernel(mac),
            _ => {}
        }
        // Untranslated traffic may leave through the uplink only if it came from there.
        let from_outside = role == Some(PortRole::Uplink) && via == Via::Port;
        if h.proto == packet::PROTO_ICMPV6 && matches!(h.icmp_type, 133..=137) {
            if via == Via::Overlay {
                return Outcome::Drop(DropReason::NeighborConsumed);
            }
            return self.ndp(pkt, frame, port, &h, c);
        }
        if h.later_fragment {
            return Outcome::Drop(DropReason::Fragment);
        }
        if packet::is_icmp_error(&h) && self.icmp_error(pkt, &mut h, c) {
            return self.route(chunk, off, &mut h, frame, port, true, c);
        }
        let tracked = matches!(
            h.proto,
            packet::PROTO_TCP | packet::PROTO_UDP | packet::PROTO_SCTP
        ) || (matches!(h.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6)
            && packet::is_echo(h.v6, h.icmp_type));
        if tracked {
            let (key, flags) = tuple_of(pkt, &h);
            if let Some(hit) = self.shared.conntrack.get(&key, self.now) {
                let (conn, dir) = (hit.conn, hit.dir);
                let before = State::from_u8(hit.state);
                let state = timeouts::next(h.proto, before, dir, flags);
                let expires = self.now + timeouts::timeout(h.proto, state);
                self.shared.conntrack.update(&hit, state as u8, expires);
                translate(pkt, &mut h, &conn, dir);
                c.nat_hits += 1;
                return self.route(chunk, off, &mut h, frame, port, true, c);
            }
            if let Some(proto) = nat::spec::Protocol::from_number(h.proto) {
                let fkey = FrontendKey {
                    ip: h.dst,
                    port: h.dport,
                    protocol: proto,
                };
                if let Some(f) = self.tables.services.frontend(&fkey) {
                    let decision = self.tables.services.decide_with_affinity(
                        f,
                        h.src,
                        key.flow_hash(),
                        Some(&self.shared.affinity),
                        self.now,
                    );
                    return match decision {
                        Decision::Translate {
                            backend,
                            masquerade,
                        } => {
                            let mut reply = FlowKey {
                                proto: h.proto,
                                src: backend.ip,
                                dst: h.src,
                                sport: backend.port,
                                dport: h.sport,
                            };
                            // Masquerade takes the address of the way out, as the kernel's
                            // does: the node's own towards an endpoint outside the pod
                            // networks, with the ports whose replies the uplink hands us.
                            let (snat, ports) = if masquerade {
                                let outside = !self.tables.in_cluster_network(backend.ip)
                                    && !self.tables.node_addresses.contains(&backend.ip);
                                let (source, ports) = if outside {
                                    let ports = self.shared.limits.egress_masquerade_ports;
                                    (self.tables.egress_source(h.v6), ports)
                                } else {
                                    let ports = (SNAT_PORT_MIN, SNAT_PORT_MAX);
                                    (self.tables.masquerade_source(h.v6), ports)
                                };
                                match source {
                                    Some(ip) => (Some(ip), ports),
                                    None => return Outcome::Drop(DropReason::NoRoute),
                                }
                            } else {
                                (None, (SNAT_PORT_MIN, SNAT_PORT_MAX))
                            };
                            let peer = snat.unwrap_or(h.src);
                            let policy =
                                match self.judge(h.proto, h.src, backend.ip, backend.port, peer) {
                                    Ok(policy) => policy,
                                    Err(reason) => return Outcome::Drop(reason),
                                };
                            let state = timeouts::initial(h.proto, flags);
                            let conn = match self.track_in(
                                key, &mut reply, snat, ports, f.service, state, policy.tag, c,
                            ) {
                                Ok(conn) => conn,
                                Err(reason) => return Outcome::Drop(reason),
                            };
                            if self.shared.monitor.active() {
                                let to = Some((conn.reply.src, conn.reply.sport));
                                let masq = snat.map(|ip| (ip, conn.reply.dport));
                                self.event(EventKind::Translated, &h, to, masq, conn.policy, None);
                            }
                            translate(pkt, &mut h, &conn, Direction::Original);
                            c.nat_new += 1;
                            self.route(chunk, off, &mut h, frame, port, true, c)
                        }
                        Decision::Reject => self.reject(chunk, off, frame, port, &h, c),
                        Decision::Drop => Outcome::Drop(DropReason::NoLocalEndpoint),
                        Decision::SourceFiltered => Outcome::Drop(DropReason::SourceRange),
                    };
                }
            }
        }
        if self.tables.services.is_cluster_ip(h.dst) && !packet::is_icmp_error(&h) {
            // A held ClusterIP on a port or protocol none of its Service ports serves:
            // kube-proxy's nftables rejects it (the `cluster-ips` set), unlike an address
            // of the range nobody holds, which it drops.
            return self.reject(chunk, off, frame, port, &h, c);
        }
        if self.tables.services.in_service_range(h.dst) {
            return Outcome::Drop(DropReason::NoService);
        }
        if self.tables.is_gateway(h.dst) {
            let echo_request = matches!(h.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6)
                && h.icmp_type == if h.v6 { 128 } else { 8 };
            if echo_request && !h.later_fragment && !h.first_fragment {
                c.echo_replies += 1;
                return self.echo_reply(pkt, &h, port, frame);
            }
            return Outcome::Drop(DropReason::ToHost);
        }
        if self.tables.node_addresses.contains(&h.dst) {
            return self.to_host(chunk, off, &h, frame, port, tracked, c);
        }
        if tracked
            && self.tables.spec.cluster.ip_masq
            && self.tables.local_pods.contains_key(&h.src)
            && !self.tables.in_cluster_network(h.dst)
            && !is_multicast(h.dst)
        {
            // A pod reaching outside the cluster's pod networks: masqueraded to the node's
            // address (flannel's ipMasq), from a port range the node's own connections do
            // not use, so replies come back to us and never collide with the host's.
            if let Some(node_ip) = self.tables.egress_source(h.v6) {
                let policy = match self.judge(h.proto, h.src, h.dst, h.dport, h.src) {
                    Ok(policy) => policy,
                    Err(reason) => return Outcome::Drop(reason),
                };
                let (key, flags) = tuple_of(pkt, &h);
                let mut reply = key.reversed();
                let state = timeouts::initial(h.proto, flags);
                let ports = self.shared.limits.egress_masquerade_ports;
                let conn = match self.track_in(
                    key,
                    &mut reply,
                    Some(node_ip),
                    ports,
                    0,
                    state,
                    policy.tag,
                    c,
                ) {
                    Ok(conn) => conn,
                    Err(reason) => return Outcome::Drop(reason),
                };
                if self.shared.monitor.active() {
                    let masq = Some((conn.reply.dst, conn.reply.dport));
                    self.event(EventKind::Masqueraded, &h, None, masq, conn.policy, None);
                }
                translate(pkt, &mut h, &conn, Direction::Original);
                c.masqueraded_out += 1;
                return self.route(chunk, off, &mut h, frame, port, true, c);
            }
        }
        if tracked
            && (self.tables.local_pods.contains_key(&h.src)
                || self.tables.local_pods.contains_key(&h.dst))
        {
            // Untranslated connections of local pods are tracked too, with their policy
            // verdict, so that replies of an allowed connection pass whatever policy says
            // about their direction, and a connection keeps its verdict until it ends.
            if let Err(reason) = self.track_untranslated(pkt, &h, c) {
                return Outcome::Drop(reason);
            }
        }
        c.routed += 1;
        self.route(chunk, off, &mut h, frame, port, from_outside, c)
    }

    /// Translates an ICMP error about a tracked connection, the quoted packet and the
    /// outer header both, as the kernel's NAT does (so path-MTU discovery and traceroute
    /// work through a Service). Returns false when the error is about no connection of ours.
    fn icmp_error(&self, pkt: &mut [u8], h: &mut Headers, c: &mut Counters) -> bool {
        let Some(mut q) = packet::parse_quoted(pkt, h) else {
            return false;
        };
        // The quoted packet travelled the other way: its reverse is a packet of ours.
        let key = FlowKey {
            proto: q.proto,
            src: q.dst,
            dst: q.src,
            sport: q.dport,
            dport: q.sport,
        };
        let Some(hit) = self.shared.conntrack.get(&key, self.now) else {
            return false;
        };
        let conn = hit.conn;
        // (quoted source, quoted destination, outer (from, to) for source and destination)
        let (qs, qd, src_map, dst_map) = match hit.dir {
            // The error is about a packet the client sent (after DNAT / SNAT); the client
            // must see its own packet as it sent it.
            Direction::Reply => (
                (conn.original.src, conn.original.sport),
                (conn.original.dst, conn.original.dport),
                (conn.reply.src, conn.original.dst),
                (conn.reply.dst, conn.original.src),
            ),
            // The error is about a reply the client got; the backend must see its own.
            Direction::Original => (
                (conn.reply.src, conn.reply.sport),
                (conn.reply.dst, conn.reply.dport),
                (conn.original.src, conn.reply.dst),
                (conn.original.dst, conn.reply.src),
            ),
        };
        packet::rewrite_quoted(pkt, &mut q, qs, qd);
        let src = if h.src == src_map.0 { src_map.1 } else { h.src };
        let dst = if h.dst == dst_map.0 { dst_map.1 } else { h.dst };
        packet::set_addresses(pkt, h, src, dst);
        packet::fix_icmp_checksum(pkt, h);
        c.nat_hits += 1;
        true
    }

    /// A packet for one of the node's own addresses: handed to the node's kernel through the
    /// host port, as it is (no TTL taken off: it is not routed, it arrives). A pod's
    /// connection is tracked (and judged by its egress policy) on the way.
    #[allow(clippy::too_many_arguments)]
    fn to_host(
        &self,
        chunk: &mut [u8],
        off: usize,
        h: &Headers,
        frame: Frame,
        in_port: PortId,
        tracked: bool,
        c: &mut Counters,
    ) -> Outcome {
        let Some(host) = self.shared.host.filter(|&p| p != in_port) else {
            return Outcome::Drop(DropReason::ToHost);
        };
        if tracked && self.tables.local_pods.contains_key(&h.src) {
            if let Err(reason) = self.track_untranslated(&chunk[off..], h, c) {
                return Outcome::Drop(reason);
            }
        }
        self.deliver_to_host(chunk, off, h, frame, host, c)
    }

    /// Notes the MAC of the kernel's end of the host pair from a frame it sent.
    #[inline]
    fn saw_host_kernel(&self, mac: [u8; 6]) {
        let m = mac_u64(mac);
        if self.shared.host_kernel_mac.load(Ordering::Relaxed) != m {
            self.shared.host_kernel_mac.store(m, Ordering::Relaxed);
        }
    }

    /// Sends a packet for one of the node's addresses out of the host port (no TTL taken
    /// off), once the kernel's end is resolved.
    fn deliver_to_host(
        &self,
        chunk: &mut [u8],
        off: usize,
        h: &Headers,
        frame: Frame,
        host: PortId,
        c: &mut Counters,
    ) -> Outcome {
        // The host port is one end of a veth pair: whatever the node's address, the
        // kernel's end has one MAC. Its ARP answers name it, but its neighbour discovery
        // answers only for addresses on that very interface (the node's are on the
        // uplink), so for IPv6 the MAC its own frames came from serves.
        let known = self.shared.neighbors.get(&h.dst).filter(|n| n.port == host);
        let mac = match known {
            Some(n) => n.mac,
            None => match self.shared.host_kernel_mac.load(Ordering::Relaxed) {
                0 => return Outcome::Resolve(DropReason::NeighborUnresolved, h.dst, frame),
                m => u64_mac(m),
            },
        };
        let Some(cfg) = self.ports.get(host) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        set_macs(&mut chunk[off..], mac, cfg.mac);
        c.to_host += 1;
        Outcome::Send(host, frame)
    }

    /// Records a flow event for the monitor (call only when it is active).
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
        let policy = policy
            .checked_sub(1)
            .map(|p| self.tables.policy.policy_name(p).to_string());
        self.shared.monitor.record(
            self.worker,
            FlowEvent {
                at: self.now,
                worker: self.worker as u16,
                kind,
                protocol: h.proto,
                src: (h.src, h.sport),
                dst: (h.dst, h.dport),
                to,
                masquerade,
                policy,
                reason: reason.map(|r| r.label().to_string()),
            },
        );
    }

    /// A packet whose TTL (hop limit) runs out here: answered with ICMP time exceeded from
    /// this node's address on the side it came from (the pods' gateway, or the node's
    /// address on the uplink), so traceroute through the node works. Never about an ICMP
    /// error or a later fragment (RFC 1122 3.2.2, RFC 4443 2.4).
    fn time_exceeded(
        &self,
        chunk: &mut [u8],
        off: usize,
        h: &Headers,
        frame: Frame,
        in_port: PortId,
        c: &mut Counters,
    ) -> Outcome {
        if h.later_fragment || packet::is_icmp_error(h) || is_multicast(h.dst) {
            return Outcome::Drop(DropReason::TtlExceeded);
        }
        let from = if Some(in_port) == self.shared.uplink {
            self.tables
                .node_addresses
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == h.v6)
                .or_else(|| self.tables.masquerade_source(h.v6))
        } else {
            self.tables.masquerade_source(h.v6)
        };
        let Some(from) = from else {
            return Outcome::Drop(DropReason::TtlExceeded);
        };
        c.time_exceeded += 1;
        let h = *h;
        self.icmp_reply(
            chunk,
            off,
            frame,
            in_port,
            &h,
            IcmpKind::TimeExceeded,
            from,
            c,
        )
    }

    /// Answers an echo request to the pods' gateway address in place: addresses swapped,
    /// type turned into a reply, TTL 64, checksums fixed, back out of the port it came in.
    fn echo_reply(&self, pkt: &mut [u8], h: &Headers, port: PortId, frame: Frame) -> Outcome {
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let mut peer = [0u8; 6];
        peer.copy_from_slice(&pkt[6..12]);
        set_macs(pkt, peer, cfg.mac);
        let (src, dst) = (h.src, h.dst);
        let mut h = *h;
        packet::set_addresses(pkt, &mut h, dst, src);
        pkt[h.l4] = if h.v6 { 129 } else { 0 };
        if h.v6 {
            pkt[h.l3 + 7] = 64;
        } else {
            pkt[h.l3 + 8] = 64;
            pkt[h.l3 + 10..h.l3 + 12].copy_from_slice(&[0, 0]);
            let check = nat::checksum::checksum(&pkt[h.l3..h.l4]);
            pkt[h.l3 + 10..h.l3 + 12].copy_from_slice(&check.to_be_bytes());
        }
        packet::fix_icmp_checksum(pkt, &h);
        Outcome::Send(port, frame)
    }

    /// Tracks a new untranslated connection of a local pod (an identity entry) with its
    /// NetworkPolicy verdict. A refusal by policy is returned; so is a full table for a pod
    /// some policy isolates, while a connection no policy isolates goes on untracked.
    fn track_untranslated(
        &self,
        pkt: &[u8],
        h: &Headers,
        c: &mut Counters,
    ) -> Result<(), DropReason> {
        let policy = self.judge(h.proto, h.src, h.dst, h.dport, h.src)?;
        let (key, flags) = tuple_of(pkt, h);
        let mut reply = key.reversed();
        let state = timeouts::initial(h.proto, flags);
        match self.track(key, &mut reply, None, 0, state, policy.tag, c) {
            Ok(_) => {
                c.tracked_new += 1;
                if self.shared.monitor.active() {
                    self.event(EventKind::Tracked, h, None, None, policy.tag, None);
                }
                Ok(())
            }
            Err(_) if !policy.isolated => {
                c.untracked += 1;
                Ok(())
            }
            Err(reason) => Err(reason),
        }
    }

    /// NetworkPolicy for a new connection from `src` to `dst`:`dport` (after Service
    /// translation): the source pod's egress towards `dst`, and the destination pod's
    /// ingress from `peer` (the source as the pod will see it, after masquerade). Traffic
    /// from the node itself (its addresses, the pods' gateway, which masquerade uses) is
    /// always allowed into a pod. A refusal is counted on the pod and its policies.
    fn judge(
        &self,
        proto: u8,
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
        peer: IpAddr,
    ) -> Result<Admitted, DropReason> {
        let mut out = Admitted::default();
        if !self.tables.policy_active {
            return Ok(out);
        }
        let table = &self.tables.policy;
        // ICMP and other protocols have no port: only rules without ports allow them.
        let l4 = nat::spec::Protocol::from_number(proto).map(|p| (p, dport));
        match table.verdict(PolicyType::Egress, src, dst, l4) {
            Verdict::Denied => {
                self.tables
                    .policy_drops
                    .count(table, PolicyType::Egress, src);
                return Err(DropReason::PolicyDenied);
            }
            Verdict::Allowed { policy } => {
                out.isolated = true;
                out.tag = policy.saturating_add(1);
            }
            Verdict::NotIsolated => {}
        }
        let from_node = self.tables.is_gateway(peer) || self.tables.node_addresses.contains(&peer);
        if from_node {
            return Ok(out);
        }
        match table.verdict(PolicyType::Ingress, dst, peer, l4) {
            Verdict::Denied => {
                self.tables
                    .policy_drops
                    .count(table, PolicyType::Ingress, dst);
                Err(DropReason::PolicyDenied)
            }
            Verdict::Allowed { policy } => {
                out.isolated = true;
                out.tag = policy.saturating_add(1);
                Ok(out)
            }
            Verdict::NotIsolated => Ok(out),
        }
    }

    /// Inserts a new connection, choosing a masquerade port that no live flow uses.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &self,
        key: FlowKey,
        reply: &mut FlowKey,
        snat: Option<IpAddr>,
        service: u32,
        state: State,
        policy: u32,
        c: &mut Counters,
    ) -> Result<Connection, DropReason> {
        let ports = (SNAT_PORT_MIN, SNAT_PORT_MAX);
        self.track_in(key, reply, snat, ports, service, state, policy, c)
    }

    /// [`Pipeline::track`] with masquerade ports from `ports` (inclusive). The client's own
    /// port is kept when it is in the range; an ICMP echo's identifier is both its "ports".
    /// When room runs out, a connection that is not assured yields its place (see
    /// `nat::timeouts`): near the new tuples in a full table, or, when every port tried is
    /// taken, the one seen earliest among those holding them.
    #[allow(clippy::too_many_arguments)]
    fn track_in(
        &self,
        key: FlowKey,
        reply: &mut FlowKey,
        snat: Option<IpAddr>,
        ports: (u16, u16),
        service: u32,
        state: State,
        policy: u32,
        c: &mut Counters,
    ) -> Result<Connection, DropReason> {
        let timeout = timeouts::timeout(key.proto, state);
        let mut snat = snat;
        let mut evicted = false;
        // The port of the unassured connection seen earliest among those holding a
        // masquerade port tried: (when last seen, its lookup, the port).
        let mut yielding: Option<(u64, Hit, u16)> = None;
        let (first, last) = (ports.0.min(ports.1), ports.0.max(ports.1));
        let span = (last - first) as u64 + 1;
        let seed = key.flow_hash();
        let echo = matches!(key.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6);
        for i in 0..SNAT_TRIES {
            if let Some(ip) = snat {
                reply.dst = ip;
                reply.dport = if i == 0 && (first..=last).contains(&key.sport) {
                    key.sport
                } else {
                    first + ((seed.wrapping_add(i.wrapping_mul(0x9e37_79b9))) % span) as u16
                };
                if echo {
                    reply.sport = reply.dport;
                }
            }
            let conn = Connection {
                original: key,
                reply: *reply,
                service,
                policy,
            };
            match self.shared.conntrack.insert_evicting(
                conn,
                state as u8,
                self.now,
                timeout,
                timeouts::last_seen,
            ) {
                Ok(inserted) => {
                    c.conntrack_early_drop += inserted.evicted as u64;
                    return Ok(conn);
                }
                Err(InsertError::Full) => return Err(DropReason::ConntrackFull),
                Err(InsertError::Exists) => {
                    // Another worker tracked this very connection first: use its choice.
                    if let Some(hit) = self.shared.conntrack.get(&key, self.now) {
                        if hit.dir == Direction::Original {
                            return Ok(hit.conn);
                        }
                    }
                    // Else the reply tuple is another connection's: the client reuses a
                    // source port towards a backend it also reached directly. A closed TCP
                    // connection's entry gives way (as the kernel's conntrack restarts a
                    // TIME_WAIT tuple on a new SYN); else the source port is remapped, as
                    // the kernel's NAT does on a clash (the backend sees another port).
                    let taken = self.shared.conntrack.get(reply, self.now);
                    if let Some(old) = taken.filter(|_| !evicted) {
                        let closed = old.conn.original.proto == packet::PROTO_TCP
                            && matches!(State::from_u8(old.state), State::Closing | State::Reset);
                        if closed && self.shared.conntrack.remove(&old.conn) {
                            evicted = true;
                            continue;
                        }
                    }
                    if let (Some(old), Some(_)) = (taken, snat) {
                        if let Some(seen) = timeouts::last_seen(old.state, old.expires) {
                            if yielding.is_none_or(|(s, _, _)| seen < s) {
                                yielding = Some((seen, old, reply.dport));
                            }
                        }
                    }
                    if snat.is_none() {
                        if key.proto == packet::PROTO_ICMP || key.proto == packet::PROTO_ICMPV6 {
                            return Err(DropReason::TupleTaken);
                        }
                        snat = Some(key.src);
                    }
                }
            }
        }
        // Every port tried is taken: the unassured connection seen earliest among their
        // holders gives its port up (a flood's SYN, never answered, ages while a real
        // client's completes its handshake within a round trip).
        if let Some((_, old, port)) = yielding {
            if self
                .shared
                .conntrack
                .evict(&old, self.now, timeouts::last_seen)
            {
                c.conntrack_early_drop += 1;
                reply.dport = port;
                if echo {
                    reply.sport = port;
                }
                let conn = Connection {
                    original: key,
                    reply: *reply,
                    service,
                    policy,
                };
                if let Ok(inserted) = self.shared.conntrack.insert_evicting(
                    conn,
                    state as u8,
                    self.now,
                    timeout,
                    timeouts::last_seen,
                ) {
                    c.conntrack_early_drop += inserted.evicted as u64;
                    return Ok(conn);
                }
            }
        }
        Err(DropReason::SnatExhausted)
    }

    /// Sends a packet towards its (translated) destination: a local pod by its learned
    /// neighbour entry, a pod on another node through the overlay, anything outside the
    /// cluster through the uplink's next hop. `may_leave` says whether the packet may go out
    /// of the uplink untranslated (pod traffic to the outside is masqueraded first, which is
    /// issue 9's work). A packet too big for the overlay is answered with ICMP
    /// fragmentation-needed / packet-too-big (sent back to `in_port`'s sender).
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        chunk: &mut [u8],
        off: usize,
        h: &mut Headers,
        frame: Frame,
        in_port: PortId,
        may_leave: bool,
        c: &mut Counters,
    ) -> Outcome {
        if let Some(host) = self.shared.host {
            if host != in_port && self.tables.node_addresses.contains(&h.dst) {
                return self.deliver_to_host(chunk, off, h, frame, host, c);
            }
        }
        if h.ttl <= 1 {
            return self.time_exceeded(chunk, off, h, frame, in_port, c);
        }
        let len = frame.len as usize;
        let local =
            self.tables.local_pods.contains_key(&h.dst) || self.tables.in_local_pod_network(h.dst);
        if !local {
            if let Some(r) = self.tables.remote.lookup(h.dst) {
                return self.encap(chunk, off, h, frame, in_port, r, c);
            }
        }
        let (port, mac) = if local {
            let Some(n) = self.shared.neighbors.get(&h.dst) else {
                return Outcome::Resolve(DropReason::NeighborUnresolved, h.dst, frame);
            };
            (n.port, n.mac)
        } else if self.tables.in_cluster_network(h.dst) || !may_leave {
            return Outcome::Drop(DropReason::NoRoute);
        } else {
            let Some(up) = self.shared.uplink else {
                return Outcome::Drop(DropReason::NoRoute);
            };
            // The node's own route (a connected network or its gateway), resolved by ARP;
            // without one, the router outside traffic last came from.
            match self.shared.uplink_routes.load().next_hop(h.dst) {
                Some(hop) => match self.shared.neighbors.get(&hop).filter(|n| n.port == up) {
                    Some(n) => (up, n.mac),
                    None => return Outcome::Resolve(DropReason::NeighborUnresolved, hop, frame),
                },
                None => {
                    let next_hop = self.shared.uplink_next_hop.load(Ordering::Relaxed);
                    if next_hop == 0 {
                        return Outcome::Drop(DropReason::NoRoute);
                    }
                    (up, u64_mac(next_hop))
                }
            }
        };
        let Some(out) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let pkt = &mut chunk[off..off + len];
        packet::decrement_ttl(pkt, h);
        set_macs(pkt, mac, out.mac);
        Outcome::Send(port, frame)
    }

    /// Encapsulates a packet for another node's pod network and sends it on the uplink.
    #[allow(clippy::too_many_arguments)]
    fn encap(
        &self,
        chunk: &mut [u8],
        off: usize,
        h: &mut Headers,
        frame: Frame,
        in_port: PortId,
        r: crate::routes::RemoteRoute,
        c: &mut Counters,
    ) -> Outcome {
        let (Some(overlay), Some(up)) = (&self.tables.overlay, self.shared.uplink) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let Some(upcfg) = self.ports.get(up) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let vtep = IpAddr::V4(r.vtep);
        let Some(next) = self.shared.neighbors.get(&vtep).filter(|n| n.port == up) else {
            return Outcome::Resolve(DropReason::NeighborUnresolved, vtep, frame);
        };
        let ip_len = h.end - h.l3;
        // The outer IP packet carries 50 bytes more than the inner one: outer IPv4 20, UDP 8,
        // VXLAN 8 and the inner Ethernet header 14.
        let inner_mtu = (upcfg.mtu as usize).saturating_sub(crate::vxlan::VXLAN_OVERHEAD);
        if ip_len > inner_mtu {
            let df = h.v6 || chunk.get(off + h.l3 + 6).is_some_and(|b| b & 0x40 != 0);
            if !df {
                return Outcome::Drop(DropReason::TooBig);
            }
            c.too_big += 1;
            let from = match self.tables.masquerade_source(h.v6) {
                Some(a) => a,
                None => return Outcome::Drop(DropReason::TooBig),
            };
            let h = *h;
            return self.icmp_reply(
                chunk,
                off,
                frame,
                in_port,
                &h,
                IcmpKind::TooBig(inner_mtu as u16),
                from,
                c,
            );
        }
        packet::decrement_ttl(&mut chunk[off..off + frame.len as usize], h);
        let flow = FlowKey {
            proto: h.proto,
            src: h.src,
            dst: h.dst,
            sport: h.sport,
            dport: h.dport,
        }
        .flow_hash();
        let remote = crate::vxlan::RemoteVtep {
            ip: r.vtep,
            vtep_mac: r.vtep_mac,
            next_hop_mac: next.mac,
        };
        match crate::vxlan::encapsulate(chunk, off, frame.len as usize, overlay, &remote, flow) {
            Some((new_off, new_len)) => {
                c.encapsulated += 1;
                Outcome::Send(
                    up,
                    Frame {
                        addr: frame.addr - (off - new_off) as u64,
                        len: new_len as u32,
                    },
                )
            }
            None => Outcome::Drop(DropReason::NoHeadroom),
        }
    }

    /// Rewrites the frame in place into an ICMP error about it, from `from` to its sender,
    /// and sends it back where the packet came from. For a port unreachable that is the
    /// client on `port` (kube-proxy's reject, for TCP too); for too-big and time-exceeded
    /// about a packet already translated, the error is un-NATed like any error about a
    /// tracked connection, then routed.
    #[allow(clippy::too_many_arguments)]
    fn icmp_reply(
        &self,
        chunk: &mut [u8],
        off: usize,
        frame: Frame,
        port: PortId,
        h: &Headers,
        kind: IcmpKind,
        from: IpAddr,
        c: &mut Counters,
    ) -> Outcome {
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let pkt = &mut chunk[off..];
        let mut client_mac = [0u8; 6];
        client_mac.copy_from_slice(&pkt[6..12]);
        // The quoted original: its IP header and the first 8 bytes of its payload.
        let mut quoted = [0u8; 8];
        let n = (h.end - h.l4).min(8);
        quoted[..n].copy_from_slice(&pkt[h.l4..h.l4 + n]);
        let caps = ChecksumCapabilities::default();
        // Errors sent back on the port they came from leave with the kernel's default TTL
        // (64); the others are routed below like any packet, which takes one hop off.
        let ttl = if kind == IcmpKind::PortUnreachable {
            64
        } else {
            65
        };
        let total = match (h.src, h.dst, from) {
            (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(from)) => {
                let original = Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::from(h.proto),
                    payload_len: h.end - h.l4,
                    hop_limit: h.ttl,
                };
                let data = &quoted[..n];
                let icmp = match kind {
                    IcmpKind::PortUnreachable => Icmpv4Repr::DstUnreachable {
                        reason: Icmpv4DstUnreachable::PortUnreachable,
                        header: original,
                        data,
                    },
                    IcmpKind::TooBig(_) => Icmpv4Repr::DstUnreachable {
                        reason: Icmpv4DstUnreachable::FragRequired,
                        header: original,
                        data,
                    },
                    IcmpKind::TimeExceeded => Icmpv4Repr::TimeExceeded {
                        reason: Icmpv4TimeExceeded::TtlExpired,
                        header: original,
                        data,
                    },
                };
                let ip = Ipv4Repr {
                    src_addr: from,
                    dst_addr: src,
                    next_header: IpProtocol::Icmp,
                    payload_len: icmp.buffer_len(),
                    hop_limit: ttl,
                };
                let total = ETH_LEN + ip.buffer_len() + icmp.buffer_len();
                if pkt.len() < total {
                    return Outcome::Drop(DropReason::NoFrame);
                }
                let l3 = &mut pkt[ETH_LEN..total];
                // smoltcp leaves the ICMP "unused" word as it finds it; it must be zero.
                l3.fill(0);
                ip.emit(&mut Ipv4Packet::new_unchecked(&mut *l3), &caps);
                let at = ip.buffer_len();
                icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut l3[at..]), &caps);
                if let IcmpKind::TooBig(mtu) = kind {
                    // RFC 1191: next-hop MTU in the low half of the "unused" word.
                    l3[at + 6..at + 8].copy_from_slice(&mtu.to_be_bytes());
                    l3[at + 2..at + 4].copy_from_slice(&[0, 0]);
                    let check = nat::checksum::checksum(&l3[at..]);
                    l3[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
                }
                pkt[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
                total
            }
            (IpAddr::V6(src), IpAddr::V6(_), IpAddr::V6(from)) => {
                // RFC 4443 2.4 (c): an ICMPv6 error carries as much of the offending packet
                // as fits in the minimum MTU (1280). It is moved up in place, behind the new
                // IPv6 and ICMPv6 headers.
                const IPV6_MIN_MTU: usize = 1280;
                const IPV6_LEN: usize = 40;
                let at = ETH_LEN + IPV6_LEN;
                let quoted_len = (h.end - h.l3).min(IPV6_MIN_MTU - IPV6_LEN - 8);
                let total = at + 8 + quoted_len;
                if pkt.len() < total {
                    return Outcome::Drop(DropReason::NoFrame);
                }
                pkt.copy_within(h.l3..h.l3 + quoted_len, at + 8);
                let (icmp_type, code, word) = match kind {
                    IcmpKind::PortUnreachable => (1u8, 4u8, 0u32),
                    IcmpKind::TooBig(mtu) => (2, 0, mtu as u32),
                    IcmpKind::TimeExceeded => (3, 0, 0),
                };
                let ip = Ipv6Repr {
                    src_addr: from,
                    dst_addr: src,
                    next_header: IpProtocol::Icmpv6,
                    payload_len: 8 + quoted_len,
                    hop_limit: ttl,
                };
                ip.emit(&mut Ipv6Packet::new_unchecked(&mut pkt[ETH_LEN..at]));
                pkt[at] = icmp_type;
                pkt[at + 1] = code;
                pkt[at + 2..at + 4].copy_from_slice(&[0, 0]);
                pkt[at + 4..at + 8].copy_from_slice(&word.to_be_bytes());
                let pseudo = nat::checksum::pseudo_v6(
                    from.octets(),
                    src.octets(),
                    packet::PROTO_ICMPV6,
                    (8 + quoted_len) as u32,
                );
                let check = !(nat::checksum::sum(&pkt[at..total], pseudo) as u16);
                pkt[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
                pkt[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
                total
            }
            _ => return Outcome::Drop(DropReason::BadIpHeader),
        };
        set_macs(pkt, client_mac, cfg.mac);
        let reply = Frame {
            addr: frame.addr,
            len: total as u32,
        };
        if kind == IcmpKind::PortUnreachable {
            return Outcome::Send(port, reply);
        }
        // An error about a translated packet goes to the translated source: un-NAT it
        // (the client then sees its own packet to the Service quoted), then route it.
        let Ok(mut eh) = packet::parse(&chunk[off..off + total]) else {
            return Outcome::Drop(DropReason::BadIpHeader);
        };
        self.icmp_error(&mut chunk[off..off + total], &mut eh, c);
        self.route(chunk, off, &mut eh, reply, port, true, c)
    }

    /// kube-proxy's reject: ICMP port unreachable from the address the client sent to,
    /// counted in `rejects`.
    fn reject(
        &self,
        chunk: &mut [u8],
        off: usize,
        frame: Frame,
        port: PortId,
        h: &Headers,
        c: &mut Counters,
    ) -> Outcome {
        c.rejects += 1;
        self.icmp_reply(
            chunk,
            off,
            frame,
            port,
            h,
            IcmpKind::PortUnreachable,
            h.dst,
            c,
        )
    }

    /// Asks every pod port who has `ip`: an ARP request for IPv4, a neighbour solicitation
    /// to the solicited-node multicast group for IPv6.
    fn solicit<D: Device>(&self, dev: &mut D, ip: IpAddr, c: &mut Counters) {
        // Pods are asked on every pod port, from the gateway; anything else (other nodes'
        // VTEPs) on the uplink, from the node's own address.
        let on_pods = self.tables.in_local_pod_network(ip);
        let on_host = self.tables.node_addresses.contains(&ip);
        let node_v4 = self.tables.node_addresses.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        });
        let node_v6 = self.tables.node_addresses.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        });
        for (port, cfg) in self.ports.iter() {
            let wanted = match cfg.role {
                PortRole::Pod => on_pods,
                PortRole::Host => on_host,
                PortRole::Uplink => !(on_pods || on_host && self.shared.host.is_some()),
            };
            if !wanted {
                continue;
            }
            // On the uplink, IPv4 neighbours are asked with an ARP probe (RFC 5227: sender
            // 0.0.0.0), answered to 0.0.0.0, and IPv6 ones from kxdp's own link-local
            // address, answered to it: the uplink's XDP filter gives those answers to kxdp
            // and every answer addressed to the node to the kernel, whose it is.
            let (src4, src6) = if on_pods || cfg.role == PortRole::Host {
                (self.tables.gateway_v4, self.tables.gateway_v6)
            } else {
                (
                    node_v4.map(|_| Ipv4Addr::UNSPECIFIED),
                    node_v6.map(|_| crate::neighbors::uplink_link_local(cfg.mac)),
                )
            };
            let Some(mut f) = dev.alloc() else {
                c.drop(DropReason::NoFrame);
                return;
            };
            let len = {
                let (chunk, off) = dev.chunk_mut(f);
                let pkt = &mut chunk[off..];
                match ip {
                    IpAddr::V4(a) => src4.map(|src| write_arp_request(pkt, cfg.mac, src, a)),
                    IpAddr::V6(a) => src6.map(|src| write_neighbor_solicit(pkt, cfg.mac, src, a)),
                }
            };
            let Some(len) = len else {
                dev.free(f);
                return;
            };
            f.len = len as u32;
            if send_counted(dev, port, f, c) {
                c.arp_requests += 1;
            }
        }
    }

    /// IPv6 neighbour discovery: answer solicitations as ARP is answered (on pod ports for
    /// every address but the asker's own, on the uplink for the node's and external
    /// frontends' addresses), and learn pods from solicitations and advertisements.
    fn ndp(
        &self,
        pkt: &mut [u8],
        frame: Frame,
        port: PortId,
        h: &Headers,
        c: &mut Counters,
    ) -> Outcome {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (h.src, h.dst) else {
            return Outcome::Drop(DropReason::BadIpHeader);
        };
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        // RFC 4861 7.1.1: neighbour discovery only from on-link (hop limit 255).
        if h.ttl != 255 {
            return Outcome::Drop(DropReason::NeighborConsumed);
        }
        let caps = ChecksumCapabilities::default();
        let Ok(icmp) = Icmpv6Packet::new_checked(&pkt[h.l4..h.end]) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        let Ok(Icmpv6Repr::Ndisc(nd)) = Icmpv6Repr::parse(&src, &dst, &icmp, &caps) else {
            return Outcome::Drop(DropReason::NeighborConsumed);
        };
        let mut eth_src = [0u8; 6];
        eth_src.copy_from_slice(&pkt[6..12]);
        let lladdr_mac = |l: Option<RawHardwareAddress>| {
            l.and_then(|l| <[u8; 6]>::try_from(l.as_bytes()).ok())
                .unwrap_or(eth_src)
        };
        let own_link_local = crate::neighbors::uplink_link_local(cfg.mac);
        let learn = |ip: Ipv6Addr, mac: [u8; 6]| {
            let ip = IpAddr::V6(ip);
            let ours = match cfg.role {
                PortRole::Pod => self.tables.in_local_pod_network(ip),
                PortRole::Host => self.tables.node_addresses.contains(&ip),
                // Routers and hosts on the uplink (the next hops kxdp asked for, whose
                // answers the filter gives it), as ARP learns them — never for this node's
                // pod network, its gateways, its own link-local address or, with a host
                // port, the node's addresses.
                PortRole::Uplink => {
                    !(self.tables.in_local_pod_network(ip)
                        || self.tables.is_gateway(ip)
                        || ip == IpAddr::V6(own_link_local)
                        || self.shared.host.is_some() && self.tables.node_addresses.contains(&ip))
                }
            };
            if ours {
                self.shared
                    .neighbors
                    .learn(ip, Neighbor { port, mac }, self.now);
            }
        };
        match nd {
            NdiscRepr::NeighborAdvert {
                target_addr,
                lladdr,
                ..
            } => {
                learn(target_addr, lladdr_mac(lladdr));
                Outcome::Drop(DropReason::NeighborConsumed)
            }
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } => {
                if !src.is_unspecified() {
                    learn(src, lladdr_mac(lladdr));
                }
                let target = IpAddr::V6(target_addr);
                let answer = match cfg.role {
                    PortRole::Pod => target_addr != src,
                    PortRole::Host => !self.tables.node_addresses.contains(&target),
                    PortRole::Uplink => {
                        self.tables.node_addresses.contains(&target)
                            || self.tables.services.is_frontend_ip(target)
                            || target_addr == own_link_local
                    }
                };
                if !answer {
                    return Outcome::Drop(DropReason::NeighborConsumed);
                }
                let reply_dst = if src.is_unspecified() {
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)
                } else {
                    src
                };
                let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    flags: NdiscNeighborFlags::ROUTER
                        | NdiscNeighborFlags::SOLICITED
                        | NdiscNeighborFlags::OVERRIDE,
                    target_addr,
                    lladdr: Some(EthernetAddress(cfg.mac).into()),
                });
                let ip = Ipv6Repr {
                    src_addr: target_addr,
                    dst_addr: reply_dst,
                    next_header: IpProtocol::Icmpv6,
                    payload_len: na.buffer_len(),
                    hop_limit: 255,
                };
                let total = ETH_LEN + ip.buffer_len() + na.buffer_len();
                if pkt.len() < total {
                    return Outcome::Drop(DropReason::NoFrame);
                }
                set_macs(pkt, eth_src, cfg.mac);
                pkt[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
                let l3 = &mut pkt[ETH_LEN..total];
                l3.fill(0);
                ip.emit(&mut Ipv6Packet::new_unchecked(&mut *l3));
                na.emit(
                    &target_addr,
                    &reply_dst,
                    &mut Icmpv6Packet::new_unchecked(&mut l3[ip.buffer_len()..]),
                    &caps,
                );
                c.arp_replies += 1;
                Outcome::Send(
                    port,
                    Frame {
                        addr: frame.addr,
                        len: total as u32,
                    },
                )
            }
            // Router solicitations and the rest: pods are configured statically.
            _ => Outcome::Drop(DropReason::NeighborConsumed),
        }
    }

    /// Sends the held frames whose neighbour is now known; drops (and counts) those that
    /// waited too long.
    pub fn release_held<D: Device>(&self, dev: &mut D, c: &mut Counters, resolver: &mut Resolver) {
        if resolver.held_count == 0 {
            return;
        }
        for i in 0..HELD_FRAMES {
            let Some((frame, ip, deadline)) = resolver.held[i] else {
                continue;
            };
            if self.shared.neighbors.get(&ip).is_none() && self.now < deadline {
                continue;
            }
            resolver.held[i] = None;
            resolver.held_count -= 1;
            // Route it again: translation is done, the next hop is known (or never will be).
            let outcome = {
                let (chunk, off) = dev.chunk_mut(frame);
                match packet::parse(&chunk[off..off + frame.len as usize]) {
                    Ok(mut h) if self.shared.neighbors.get(&ip).is_some() => {
                        let in_port = self.shared.uplink.unwrap_or(0);
                        self.route(chunk, off, &mut h, frame, in_port, true, c)
                    }
                    _ => Outcome::Drop(DropReason::NeighborUnresolved),
                }
            };
            match outcome {
                Outcome::Send(port, f) => {
                    send_counted(dev, port, f, c);
                }
                Outcome::Drop(reason) | Outcome::Resolve(reason, _, _) => {
                    c.drop(reason);
                    dev.free(frame);
                }
            }
        }
    }

    /// Solicits every local pod address whose MAC is not known yet (called periodically,
    /// so backends are resolved before their first connection), re-confirms stale
    /// neighbours and forgets dead ones.
    pub fn resolve_local_pods<D: Device>(
        &self,
        dev: &mut D,
        c: &mut Counters,
        limiter: &mut Resolver,
    ) {
        for ip in self.tables.local_pods.keys() {
            if self.shared.neighbors.get(ip).is_none() && limiter.allow(*ip, self.now) {
                self.solicit(dev, *ip, c);
            }
        }
        // Re-confirm neighbours not heard from for a while (they stay in use meanwhile, as
        // the kernel's STALE entries do); forget those silent for ten times as long.
        for ip in self.shared.neighbors.stale(self.now) {
            if limiter.allow(ip, self.now) {
                self.solicit(dev, ip, c);
            }
        }
        self.shared
            .neighbors
            .expire(self.now, 10 * crate::neighbors::NEIGHBOR_REFRESH);
    }
}

/// Applies a tracked connection's translation to a packet of it.
fn translate(pkt: &mut [u8], h: &mut Headers, conn: &Connection, dir: Direction) {
    match dir {
        Direction::Original => {
            if conn.reply.src != h.dst || conn.reply.sport != h.dport {
                packet::rewrite(pkt, h, End::Destination, conn.reply.src, conn.reply.sport);
            }
            if conn.reply.dst != h.src || conn.reply.dport != h.sport {
                packet::rewrite(pkt, h, End::Source, conn.reply.dst, conn.reply.dport);
            }
        }
        Direction::Reply => {
            if conn.original.dst != h.src || conn.original.dport != h.sport {
                packet::rewrite(pkt, h, End::Source, conn.original.dst, conn.original.dport);
            }
            if conn.original.src != h.dst || conn.original.sport != h.dport {
                packet::rewrite(
                    pkt,
                    h,
                    End::Destination,
                    conn.original.src,
                    conn.original.sport,
                );
            }
        }
    }
}

fn mac_u64(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    // Bit 63 marks "known", so an all-zero MAC is still distinguishable from unset.
    u64::from_le_bytes(b) | 1 << 63
}

fn u64_mac(v: u64) -> [u8; 6] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Writes an ARP request (who has `target`? tell `gw`) as a minimum-size broadcast frame;
/// returns its length.
fn write_arp_request(pkt: &mut [u8], mac: [u8; 6], gw: Ipv4Addr, target: Ipv4Addr) -> usize {
    // Ethernet minimum frame (without FCS).
    let len = 60;
    let pkt = &mut pkt[..len];
    pkt.fill(0);
    set_macs(pkt, [0xff; 6], mac);
    pkt[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
    ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: gw,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    }
    .emit(&mut ArpPacket::new_unchecked(&mut pkt[ETH_LEN..]));
    len
}

/// Writes a neighbour solicitation for `target` from `gw` to its solicited-node group;
/// returns its length.
fn write_neighbor_solicit(pkt: &mut [u8], mac: [u8; 6], gw: Ipv6Addr, target: Ipv6Addr) -> usize {
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | t[13] as u16,
        u16::from_be_bytes([t[14], t[15]]),
    );
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(EthernetAddress(mac).into()),
    });
    let ip = Ipv6Repr {
        src_addr: gw,
        dst_addr: group,
        next_header: IpProtocol::Icmpv6,
        payload_len: ns.buffer_len(),
        hop_limit: 255,
    };
    let total = ETH_LEN + ip.buffer_len() + ns.buffer_len();
    let pkt = &mut pkt[..total];
    pkt.fill(0);
    set_macs(pkt, [0x33, 0x33, 0xff, t[13], t[14], t[15]], mac);
    pkt[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
    let l3 = &mut pkt[ETH_LEN..];
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut *l3));
    ns.emit(
        &gw,
        &group,
        &mut Icmpv6Packet::new_unchecked(&mut l3[ip.buffer_len()..]),
        &ChecksumCapabilities::default(),
    );
    total
}

/// A packet's tuple as conntrack keys it, and its TCP flags (0 for other protocols).
fn tuple_of(pkt: &[u8], h: &Headers) -> (FlowKey, u8) {
    let key = FlowKey {
        proto: h.proto,
        src: h.src,
        dst: h.dst,
        sport: h.sport,
        dport: h.dport,
    };
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

fn set_macs(pkt: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    pkt[0..6].copy_from_slice(&dst);
    pkt[6..12].copy_from_slice(&src);
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
