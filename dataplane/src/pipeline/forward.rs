//! Forwarding a packet whose fate is decided: to a local pod by its learned neighbour
//! entry, to another node's pods through the VXLAN overlay (and out of it), out of the
//! uplink, or to the node's own kernel through the host port.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use nat::packet::{self, Headers, ETH_IPV4, ETH_IPV6, ETH_LEN};
use pktio::{Frame, PortId};

use super::eth::{mac_u64, set_macs, u64_mac};
use super::{key_of, Outcome, Pipeline, Rx, Via};
use crate::counters::DropReason;
use crate::routes::RemoteRoute;
use crate::vxlan;

impl Pipeline<'_> {
    /// Sends a packet towards its (translated) destination: a local pod by its learned
    /// neighbour entry, a pod on another node through the overlay, anything outside the
    /// cluster through the uplink's next hop. `may_leave` says whether the packet may go out
    /// of the uplink untranslated (pod traffic to the outside is masqueraded first). A
    /// packet whose TTL runs out here, or too big for the overlay, asks for an ICMP error
    /// to its sender ([`Outcome::Icmp`]).
    pub(super) fn route(&self, rx: &mut Rx<'_>, h: &mut Headers, may_leave: bool) -> Outcome {
        if let Some(host) = self.shared.host {
            if host != rx.port && self.tables.node_addresses.contains(&h.dst) {
                return self.deliver_to_host(rx, h, host);
            }
        }
        if h.ttl <= 1 {
            return self.time_exceeded(rx, h);
        }
        let local =
            self.tables.in_local_pod_network(h.dst) || self.tables.local_pods.contains_key(&h.dst);
        if !local {
            if let Some(r) = self.tables.remote.lookup(h.dst) {
                return self.encap(rx, h, r);
            }
        }
        let (port, mac) = if local {
            let Some(n) = self.neighbor(&h.dst) else {
                return Outcome::Resolve(DropReason::NeighborUnresolved, h.dst, rx.frame);
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
                Some(hop) => match self.neighbor(&hop).filter(|n| n.port == up) {
                    Some(n) => (up, n.mac),
                    None => return Outcome::Resolve(DropReason::NeighborUnresolved, hop, rx.frame),
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
        let pkt = rx.pkt();
        packet::decrement_ttl(pkt, h);
        set_macs(pkt, mac, out.mac);
        Outcome::Send(port, rx.frame)
    }

    /// Whether a frame from the uplink is VXLAN addressed to this node's VTEP (a cheap look
    /// at fixed offsets; [`vxlan::decapsulate`] validates it fully).
    pub(super) fn is_overlay_for_us(&self, rx: &mut Rx<'_>) -> bool {
        let Some(o) = &self.tables.overlay else {
            return false;
        };
        let port = rx.port;
        let pkt = rx.pkt();
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
    pub(super) fn decap(&self, rx: &mut Rx<'_>) -> Outcome {
        let Some(overlay) = &self.tables.overlay else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let d = match vxlan::decapsulate(rx.pkt(), overlay) {
            Ok(d) => d,
            Err(_) => return Outcome::Drop(DropReason::BadOverlay),
        };
        rx.c.decapsulated += 1;
        rx.off += d.inner_offset;
        rx.frame = Frame {
            addr: rx.frame.addr + d.inner_offset as u64,
            len: d.inner_len as u32,
        };
        rx.via = Via::Overlay;
        match packet::ethertype(&rx.buf[rx.off..]) {
            Some(ETH_IPV4) | Some(ETH_IPV6) => self.ip(rx),
            _ => Outcome::Drop(DropReason::BadOverlay),
        }
    }

    /// Encapsulates a packet for another node's pod network and sends it on the uplink.
    fn encap(&self, rx: &mut Rx<'_>, h: &mut Headers, r: RemoteRoute) -> Outcome {
        let (Some(overlay), Some(up)) = (&self.tables.overlay, self.shared.uplink) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let Some(upcfg) = self.ports.get(up) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let vtep = IpAddr::V4(r.vtep);
        let Some(next) = self.neighbor(&vtep).filter(|n| n.port == up) else {
            return Outcome::Resolve(DropReason::NeighborUnresolved, vtep, rx.frame);
        };
        let ip_len = h.end - h.l3;
        // The outer IP packet carries 50 bytes more than the inner one: outer IPv4 20, UDP 8,
        // VXLAN 8 and the inner Ethernet header 14.
        let inner_mtu = (upcfg.mtu as usize).saturating_sub(vxlan::VXLAN_OVERHEAD);
        if ip_len > inner_mtu {
            return self.too_big(rx, h, inner_mtu as u16);
        }
        packet::decrement_ttl(rx.pkt(), h);
        let flow = key_of(h).flow_hash();
        let remote = vxlan::RemoteVtep {
            ip: r.vtep,
            vtep_mac: r.vtep_mac,
            next_hop_mac: next.mac,
        };
        let (off, len) = (rx.off, rx.frame.len as usize);
        match vxlan::encapsulate(rx.buf, off, len, overlay, &remote, flow) {
            Some((new_off, new_len)) => {
                rx.c.encapsulated += 1;
                Outcome::Send(
                    up,
                    Frame {
                        addr: rx.frame.addr - (off - new_off) as u64,
                        len: new_len as u32,
                    },
                )
            }
            None => Outcome::Drop(DropReason::NoHeadroom),
        }
    }

    /// A packet for one of the node's own addresses: handed to the node's kernel through the
    /// host port, as it is (no TTL taken off: it is not routed, it arrives). A pod's
    /// connection is tracked (and judged by its egress policy) on the way.
    pub(super) fn to_host(&self, rx: &mut Rx<'_>, h: &Headers, tracked: bool) -> Outcome {
        let Some(host) = self.shared.host.filter(|&p| p != rx.port) else {
            return Outcome::Drop(DropReason::ToHost);
        };
        if tracked && self.tables.local_pods.contains_key(&h.src) {
            if let Err(reason) = self.track_untranslated(rx, h) {
                return Outcome::Drop(reason);
            }
        }
        self.deliver_to_host(rx, h, host)
    }

    /// Notes the MAC of the kernel's end of the host pair from a frame it sent.
    #[inline]
    pub(super) fn saw_host_kernel(&self, mac: [u8; 6]) {
        let m = mac_u64(mac);
        if self.shared.host_kernel_mac.load(Ordering::Relaxed) != m {
            self.shared.host_kernel_mac.store(m, Ordering::Relaxed);
        }
    }

    /// Sends a packet for one of the node's addresses out of the host port (no TTL taken
    /// off), once the kernel's end is resolved.
    fn deliver_to_host(&self, rx: &mut Rx<'_>, h: &Headers, host: PortId) -> Outcome {
        // The host port is one end of a veth pair: whatever the node's address, the
        // kernel's end has one MAC. Its ARP answers name it, but its neighbour discovery
        // answers only for addresses on that very interface (the node's are on the
        // uplink), so for IPv6 the MAC its own frames came from serves.
        let known = self.neighbor(&h.dst).filter(|n| n.port == host);
        let mac = match known {
            Some(n) => n.mac,
            None => match self.shared.host_kernel_mac.load(Ordering::Relaxed) {
                0 => return Outcome::Resolve(DropReason::NeighborUnresolved, h.dst, rx.frame),
                m => u64_mac(m),
            },
        };
        let Some(cfg) = self.ports.get(host) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        set_macs(rx.room(), mac, cfg.mac);
        rx.c.to_host += 1;
        Outcome::Send(host, rx.frame)
    }
}
