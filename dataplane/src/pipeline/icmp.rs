//! ICMP the dataplane speaks itself: the errors it sends (kube-proxy's reject, time
//! exceeded, fragmentation needed / packet too big), the translation of errors about a
//! tracked connection (so path-MTU discovery and traceroute work through a Service), and
//! echo replies from the pods' gateway.
//!
//! An error is asked for with [`Outcome::Icmp`]; [`Pipeline::settle`] builds it here, in
//! the offending packet's place, and sends it back or routes it.

use std::net::IpAddr;

use nat::conntrack::{Direction, FlowKey};
use nat::packet::{self, Headers, ETH_IPV4, ETH_IPV6, ETH_LEN};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv4TimeExceeded, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use super::eth::set_macs;
use super::{is_multicast, Outcome, Pipeline, Rx};
use crate::counters::DropReason;

/// Which ICMP error the dataplane builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Destination port unreachable (a Service without endpoints).
    PortUnreachable,
    /// Fragmentation needed (IPv4) / packet too big (IPv6), with the MTU that fits.
    TooBig(u16),
    /// Time exceeded in transit: the TTL / hop limit ran out here.
    TimeExceeded,
}

/// An ICMP error asked for about the packet being handled (as the packet now is: the
/// error quotes it translated, and is un-NATed on its way). Small, as every outcome is
/// returned through the pipeline's calls; the packet's headers are read again when the
/// error is built.
#[derive(Clone, Copy, Debug)]
pub(super) struct Request {
    /// Which error.
    pub(super) kind: Kind,
    /// The address it comes from.
    pub(super) from: IpAddr,
    /// What the packet is counted as when no error is sent after all.
    pub(super) unsent: DropReason,
}

impl Pipeline<'_> {
    /// kube-proxy's reject: ICMP port unreachable from the address the client sent to, sent
    /// back where the packet came from, counted in `rejects`.
    pub(super) fn reject(&self, rx: &mut Rx<'_>, h: &Headers) -> Outcome {
        rx.c.rejects += 1;
        Outcome::Icmp(Request {
            kind: Kind::PortUnreachable,
            from: h.dst,
            unsent: DropReason::NoRoute,
        })
    }

    /// A packet whose TTL (hop limit) runs out here: answered with ICMP time exceeded from
    /// this node's address on the side it came from (the pods' gateway, or the node's
    /// address on the uplink), so traceroute through the node works. Never about an ICMP
    /// error or a later fragment (RFC 1122 3.2.2, RFC 4443 2.4).
    pub(super) fn time_exceeded(&self, rx: &mut Rx<'_>, h: &Headers) -> Outcome {
        if h.later_fragment || packet::is_icmp_error(h) || is_multicast(h.dst) {
            return Outcome::Drop(DropReason::TtlExceeded);
        }
        let from = if Some(rx.port) == self.shared.uplink {
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
        rx.c.time_exceeded += 1;
        Outcome::Icmp(Request {
            kind: Kind::TimeExceeded,
            from,
            unsent: DropReason::TtlExceeded,
        })
    }

    /// A packet too big for the way out (`mtu` fits): answered with fragmentation needed /
    /// packet too big when it may not be fragmented, else dropped (kxdp does not fragment).
    pub(super) fn too_big(&self, rx: &mut Rx<'_>, h: &Headers, mtu: u16) -> Outcome {
        let df = h.v6 || rx.room().get(h.l3 + 6).is_some_and(|b| b & 0x40 != 0);
        if !df {
            return Outcome::Drop(DropReason::TooBig);
        }
        rx.c.too_big += 1;
        match self.tables.masquerade_source(h.v6) {
            Some(from) => Outcome::Icmp(Request {
                kind: Kind::TooBig(mtu),
                from,
                unsent: DropReason::TooBig,
            }),
            None => Outcome::Drop(DropReason::TooBig),
        }
    }

    /// Rewrites the frame in place into the ICMP error asked for, from `from` to the
    /// packet's sender, and sends it back where the packet came from. For a port
    /// unreachable that is the client on the port (kube-proxy's reject, for TCP too); for
    /// too-big and time-exceeded about a packet already translated, the error is un-NATed
    /// like any error about a tracked connection, then routed.
    pub(super) fn icmp_reply(&self, rx: &mut Rx<'_>, req: &Request) -> Outcome {
        let Some(cfg) = self.ports.get(rx.port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let client_mac = rx.sender_mac();
        let Ok(h) = packet::parse(rx.pkt()) else {
            return Outcome::Drop(DropReason::BadIpHeader);
        };
        let total = match write_error(rx.room(), &h, req) {
            Ok(total) => total,
            Err(reason) => return Outcome::Drop(reason),
        };
        set_macs(rx.room(), client_mac, cfg.mac);
        rx.frame.len = total as u32;
        if req.kind == Kind::PortUnreachable {
            return Outcome::Send(rx.port, rx.frame);
        }
        // An error about a translated packet goes to the translated source: un-NAT it
        // (the client then sees its own packet to the Service quoted), then route it.
        let Ok(mut eh) = packet::parse(rx.pkt()) else {
            return Outcome::Drop(DropReason::BadIpHeader);
        };
        self.unnat_icmp_error(rx, &mut eh);
        self.route(rx, &mut eh, true)
    }

    /// Translates an ICMP error about a tracked connection, the quoted packet and the
    /// outer header both, as the kernel's NAT does (so path-MTU discovery and traceroute
    /// work through a Service). Returns false when the error is about no connection of ours.
    pub(super) fn unnat_icmp_error(&self, rx: &mut Rx<'_>, h: &mut Headers) -> bool {
        let len = rx.frame.len as usize;
        let pkt = &mut rx.buf[rx.off..rx.off + len];
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
        rx.c.nat_hits += 1;
        true
    }

    /// Answers an echo request to the pods' gateway address in place: addresses swapped,
    /// type turned into a reply, TTL 64, checksums fixed, back out of the port it came in.
    pub(super) fn echo_reply(&self, rx: &mut Rx<'_>, h: &Headers) -> Outcome {
        let Some(cfg) = self.ports.get(rx.port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let peer = rx.sender_mac();
        let pkt = rx.pkt();
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
        Outcome::Send(rx.port, rx.frame)
    }
}

/// Writes the error `req` asks for over the packet in `pkt` (whose headers are `h`) (which runs to the end of the
/// frame's chunk), from the IP header on; returns the new frame length.
fn write_error(pkt: &mut [u8], h: &Headers, req: &Request) -> Result<usize, DropReason> {
    let caps = ChecksumCapabilities::default();
    // Errors sent back on the port they came from leave with the kernel's default TTL
    // (64); the others are routed like any packet, which takes one hop off.
    let ttl = if req.kind == Kind::PortUnreachable {
        64
    } else {
        65
    };
    match (h.src, h.dst, req.from) {
        (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(from)) => {
            // The quoted original: its IP header and the first 8 bytes of its payload.
            let mut quoted = [0u8; 8];
            let n = (h.end - h.l4).min(8);
            quoted[..n].copy_from_slice(&pkt[h.l4..h.l4 + n]);
            let original = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: IpProtocol::from(h.proto),
                payload_len: h.end - h.l4,
                hop_limit: h.ttl,
            };
            let data = &quoted[..n];
            let icmp = match req.kind {
                Kind::PortUnreachable => Icmpv4Repr::DstUnreachable {
                    reason: Icmpv4DstUnreachable::PortUnreachable,
                    header: original,
                    data,
                },
                Kind::TooBig(_) => Icmpv4Repr::DstUnreachable {
                    reason: Icmpv4DstUnreachable::FragRequired,
                    header: original,
                    data,
                },
                Kind::TimeExceeded => Icmpv4Repr::TimeExceeded {
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
                return Err(DropReason::NoFrame);
            }
            let l3 = &mut pkt[ETH_LEN..total];
            // smoltcp leaves the ICMP "unused" word as it finds it; it must be zero.
            l3.fill(0);
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut *l3), &caps);
            let at = ip.buffer_len();
            icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut l3[at..]), &caps);
            if let Kind::TooBig(mtu) = req.kind {
                // RFC 1191: next-hop MTU in the low half of the "unused" word.
                l3[at + 6..at + 8].copy_from_slice(&mtu.to_be_bytes());
                l3[at + 2..at + 4].copy_from_slice(&[0, 0]);
                let check = nat::checksum::checksum(&l3[at..]);
                l3[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
            }
            pkt[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
            Ok(total)
        }
        (IpAddr::V6(src), IpAddr::V6(_), IpAddr::V6(from)) => {
            // RFC 4443 2.4 (c): an ICMPv6 error carries as much of the offending packet as
            // fits in the minimum MTU (1280). It is moved up in place, behind the new IPv6
            // and ICMPv6 headers.
            const IPV6_MIN_MTU: usize = 1280;
            const IPV6_LEN: usize = 40;
            let at = ETH_LEN + IPV6_LEN;
            let quoted_len = (h.end - h.l3).min(IPV6_MIN_MTU - IPV6_LEN - 8);
            let total = at + 8 + quoted_len;
            if pkt.len() < total {
                return Err(DropReason::NoFrame);
            }
            pkt.copy_within(h.l3..h.l3 + quoted_len, at + 8);
            let (icmp_type, code, word) = match req.kind {
                Kind::PortUnreachable => (1u8, 4u8, 0u32),
                Kind::TooBig(mtu) => (2, 0, mtu as u32),
                Kind::TimeExceeded => (3, 0, 0),
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
            Ok(total)
        }
        _ => Err(DropReason::BadIpHeader),
    }
}
