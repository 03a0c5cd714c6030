//! Neighbours: ARP and IPv6 neighbour discovery answered for the pods' gateway and the
//! node's frontends, neighbours learned from what they send, solicitations for addresses
//! not known yet, and the frames held meanwhile ([`Resolver`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use nat::packet::{self, Headers, ETH_ARP, ETH_IPV6, ETH_LEN};
use pktio::{Device, Frame};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, Icmpv6Packet, Icmpv6Repr, IpProtocol,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

use super::eth::{mac_u64, set_macs};
use super::{send_counted, Outcome, Pipeline, Rx, Via, SECOND};
use crate::counters::{Counters, DropReason};
use crate::neighbors::{uplink_link_local, Neighbor, Neighbors, NEIGHBOR_REFRESH};
use crate::ports::PortRole;

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

    /// Whether `ip` may be asked for now (at most once per [`Resolver::INTERVAL`]).
    pub(super) fn allow(&mut self, ip: IpAddr, now: u64) -> bool {
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
    pub(super) fn hold(&mut self, frame: Frame, ip: IpAddr, deadline: u64) -> bool {
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

    /// Lets go of every held frame, handing each to `free`; returns how many there were.
    pub fn forget_held(&mut self, mut free: impl FnMut(Frame)) -> usize {
        let n = self.held_count;
        for slot in &mut self.held {
            if let Some((frame, _, _)) = slot.take() {
                free(frame);
            }
        }
        self.held_count = 0;
        n
    }
}

/// Slots of the pass's neighbour memo (`Pipeline::neighbor`): with one, packets to three
/// backends in turn missed it (`pipeline/established/1x1000` 146–153 ns against 139–140
/// with eight).
pub(super) const NEIGHBOR_MEMO: usize = 8;

/// `ip`'s slot in the neighbour memo: its last byte's low bits (pods of a node differ there).
fn memo_slot(ip: &IpAddr) -> usize {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    last as usize % NEIGHBOR_MEMO
}

impl Pipeline<'_> {
    /// Where `ip` lives, if learned. The pass reads the neighbours as they were when it
    /// began, and remembers its last answers in a few slots chosen by the address's last
    /// byte (a burst's packets mostly go to a few pods, and a slot is cheaper than a hash
    /// probe). What this pipeline learns is seen at once, and so is a neighbour another
    /// worker learned meanwhile (a miss takes the map again); one another thread moved or
    /// forgot meanwhile is seen from the next pass on (one poll of every port), as it would
    /// be by a packet handled just before the change.
    pub(super) fn neighbor(&self, ip: &IpAddr) -> Option<Neighbor> {
        let slot = &self.neighbor_memo[memo_slot(ip)];
        if let Some((at, n)) = slot.get() {
            if at == *ip {
                return Some(n);
            }
        }
        let known = self.neighbors.borrow().get(ip).map(|e| e.0);
        let n = match known {
            Some(n) => n,
            None => {
                let now = self.shared.neighbors.snapshot();
                let n = now.get(ip).map(|e| e.0);
                *self.neighbors.borrow_mut() = now;
                n?
            }
        };
        slot.set(Some((*ip, n)));
        Some(n)
    }

    /// Records `ip` at `n`, seen now.
    fn learn(&self, ip: IpAddr, n: Neighbor) {
        if Neighbors::knows(&self.neighbors.borrow(), &ip, n, self.now) {
            return;
        }
        self.shared.neighbors.learn(ip, n, self.now);
        // Written now, or by another worker since the pass began: read the map again.
        self.neighbor_memo[memo_slot(&ip)].set(None);
        *self.neighbors.borrow_mut() = self.shared.neighbors.snapshot();
    }

    /// Learns where an IP packet's sender is: a local pod on its port, the router outside
    /// traffic comes from on the uplink, the kernel's end of the host pair.
    pub(super) fn learn_sender(&self, rx: &Rx<'_>, role: Option<PortRole>, h: &Headers) {
        let mac = rx.sender_mac();
        match (role, rx.via) {
            // A pod is learned where its own addresses come from: those control lists, or
            // those its CNI plugin gave when it was attached (the Pod's status may come
            // later than its first packets).
            (Some(PortRole::Pod), _) => {
                // The same sender as the pass's last learned: nothing new (its packets
                // mostly come in a row). Compared field by field: a tuple with an `IpAddr`
                // built on the stack to compare is read back at odd offsets, which stalls.
                let seen = Neighbor { port: rx.port, mac };
                if let Some((ip, n)) = self.sender_memo.get() {
                    if n == seen && ip == h.src {
                        return;
                    }
                }
                let seen = (h.src, seen);
                // Known there already: nothing to learn (and no need to ask whose it is).
                if Neighbors::knows(&self.neighbors.borrow(), &seen.0, seen.1, self.now) {
                    self.sender_memo.set(Some(seen));
                    return;
                }
                if self.tables.local_pods.contains_key(&h.src)
                    || self.ports.pod_ips(rx.port).contains(&h.src)
                {
                    self.learn(seen.0, seen.1);
                    self.sender_memo.set(Some(seen));
                }
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
    }

    /// Answers ARP requests: on pod ports for every address but the asker's own (we are the
    /// gateway to everything), on the uplink for the node's and the Services' addresses.
    pub(super) fn arp(&self, rx: &mut Rx<'_>) -> Outcome {
        let port = rx.port;
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        let frame = rx.frame;
        let pkt = rx.pkt();
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
            let mac = source_hardware_addr.0;
            self.learn(sender, Neighbor { port, mac });
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
        rx.c.arp_replies += 1;
        let len = (ETH_LEN + reply.buffer_len()).max(frame.len as usize) as u32;
        Outcome::Send(
            port,
            Frame {
                addr: frame.addr,
                len,
            },
        )
    }

    /// IPv6 neighbour discovery: answer solicitations as ARP is answered (on pod ports for
    /// every address but the asker's own, on the uplink for the node's and external
    /// frontends' addresses), and learn pods from solicitations and advertisements.
    pub(super) fn ndp(&self, rx: &mut Rx<'_>, h: &Headers) -> Outcome {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (h.src, h.dst) else {
            return Outcome::Drop(DropReason::BadIpHeader);
        };
        let port = rx.port;
        let Some(cfg) = self.ports.get(port) else {
            return Outcome::Drop(DropReason::NoRoute);
        };
        // RFC 4861 7.1.1: neighbour discovery only from on-link (hop limit 255).
        if h.ttl != 255 {
            return Outcome::Drop(DropReason::NeighborConsumed);
        }
        let caps = ChecksumCapabilities::default();
        let eth_src = rx.sender_mac();
        let frame = rx.frame;
        let pkt = rx.pkt();
        let Ok(icmp) = Icmpv6Packet::new_checked(&pkt[h.l4..h.end]) else {
            return Outcome::Drop(DropReason::Truncated);
        };
        let Ok(Icmpv6Repr::Ndisc(nd)) = Icmpv6Repr::parse(&src, &dst, &icmp, &caps) else {
            return Outcome::Drop(DropReason::NeighborConsumed);
        };
        let lladdr_mac = |l: Option<RawHardwareAddress>| {
            l.and_then(|l| <[u8; 6]>::try_from(l.as_bytes()).ok())
                .unwrap_or(eth_src)
        };
        let own_link_local = uplink_link_local(cfg.mac);
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
                self.learn(ip, Neighbor { port, mac });
            }
        };
        let (target_addr, lladdr) = match nd {
            NdiscRepr::NeighborAdvert {
                target_addr,
                lladdr,
                ..
            } => {
                learn(target_addr, lladdr_mac(lladdr));
                return Outcome::Drop(DropReason::NeighborConsumed);
            }
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } => (target_addr, lladdr),
            // Router solicitations and the rest: pods are configured statically.
            _ => return Outcome::Drop(DropReason::NeighborConsumed),
        };
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
        rx.c.arp_replies += 1;
        Outcome::Send(
            port,
            Frame {
                addr: frame.addr,
                len: total as u32,
            },
        )
    }

    /// Asks every pod port who has `ip`: an ARP request for IPv4, a neighbour solicitation
    /// to the solicited-node multicast group for IPv6.
    pub(super) fn solicit<D: Device>(&self, dev: &mut D, ip: IpAddr, c: &mut Counters) {
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
                    node_v6.map(|_| uplink_link_local(cfg.mac)),
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
            if self.neighbor(&ip).is_none() && self.now < deadline {
                continue;
            }
            resolver.held[i] = None;
            resolver.held_count -= 1;
            // Route it again: translation is done, the next hop is known (or never will be).
            let outcome = {
                let (buf, off) = dev.chunk_mut(frame);
                let port = self.shared.uplink.unwrap_or(0);
                let mut rx = Rx::new(buf, off, frame, port, &mut *c);
                match packet::parse(rx.pkt()) {
                    Ok(mut h) if self.neighbor(&ip).is_some() => {
                        let outcome = self.route(&mut rx, &mut h, true);
                        self.settle(&mut rx, outcome)
                    }
                    _ => Outcome::Drop(DropReason::NeighborUnresolved),
                }
            };
            match outcome {
                Outcome::Send(port, f) => {
                    send_counted(dev, port, f, c);
                }
                Outcome::Drop(reason)
                | Outcome::Resolve(reason, _, _)
                | Outcome::Icmp(super::icmp::Request { unsent: reason, .. }) => {
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
            if self.neighbor(ip).is_none() && limiter.allow(*ip, self.now) {
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
            .expire(self.now, 10 * NEIGHBOR_REFRESH);
    }
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
