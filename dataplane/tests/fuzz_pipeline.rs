//! Fuzz target for the whole pipeline (issue 10), on the stable toolchain: a worker on an
//! in-memory device, random but valid tables, random frames on random ports, random table
//! updates and clock jumps, in episodes of a few thousand frames.
//!
//! The node is `fuzzgen::layout`: an uplink (a router and node B behind it, node B's pods
//! through the VXLAN overlay), three pod ports and the host port. The world around the
//! worker answers its ARP and neighbour solicitations as the pods, the router, node B and
//! the node's kernel would, so frames held for resolution go out in the same step.
//!
//! Asserted, whatever comes in:
//!
//! - no panic;
//! - every emitted frame parses (ARP, or IPv4/IPv6 with lengths inside the frame, VXLAN
//!   outer and inner) with a valid IPv4 header checksum and, unless it came from an input
//!   whose own transport checksum was wrong, valid TCP/UDP/ICMP/ICMPv6/SCTP checksums
//!   (UDP over IPv4 may be 0), verified by code independent of `nat::checksum`; its
//!   Ethernet source is the MAC of the port it leaves by;
//! - conntrack never holds more than its capacity;
//! - a connection the generator opens to a Service frontend reaches an endpoint of that
//!   Service, where that endpoint lives, and the endpoint's reply comes back to the
//!   client's place un-translated: from the frontend ip:port to the client's ip:port.
//!
//! `KXDP_FUZZ_FRAMES=N` for a long run (with `--release`), `KXDP_FUZZ_SEED` for another
//! seed, `KXDP_FUZZ_CASE=E` to replay episode E alone. A failure prints the seed, the
//! episode, the step, and the frames in hex. `vxlan_decapsulate_*` fuzzes
//! `dataplane::vxlan` the same way (nat's tests cannot reach it).

mod fuzzgen;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use dataplane::counters::DropReason;
use dataplane::pipeline::{HOLD_TIME, SECOND};
use dataplane::ports::{PortConfig, PortRole};
use dataplane::routes::UplinkRoutes;
use dataplane::state::{Limits, Shared};
use dataplane::worker::Worker;
use fuzzgen::layout::*;
use fuzzgen::{check_frame, hex, Checked, Palette, Rng, Src, VxlanId};
use nat::spec::{Protocol, TableSpec};
use pktio::MemDevice;

/// Frames per smoke run: well under 10 s in a debug build.
const SMOKE_FRAMES: u64 = 100_000;
/// Steps per episode (a fresh worker, tables and conntrack each): long enough to fill
/// small conntrack tables and see several table generations.
const EPISODE_STEPS: u64 = 3_000;
/// Frames in the in-memory device's pool.
const POOL: usize = 256;
/// Bytes of PRNG input per step.
const STEP_BYTES: usize = 384;

/// What the checks open as VXLAN: on the uplink, what node A's VTEP sends to node B's.
const VX: VxlanId = VxlanId {
    port: VXLAN_PORT,
    vtep: NODE_V4,
    peer: NODE_B,
    inbound: false,
};
/// Inputs on the uplink sent to node A's VTEP, from anyone (the worker does not check
/// the sender).
const VX_IN: VxlanId = VxlanId {
    inbound: true,
    ..VX
};

/// Where a frame comes from or goes to, around the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Pod `i` on its port.
    Pod(usize),
    /// A pod of node B, through the overlay.
    Remote,
    /// Behind the uplink's router.
    Outside,
    /// The node's kernel, behind the host port.
    Host,
}

/// Where an address lives, as the world delivers.
fn place_of(ip: IpAddr) -> Option<Place> {
    for i in 1..=PODS {
        if ip == pod_ip(i, false) || ip == pod_ip(i, true) {
            return Some(Place::Pod(i));
        }
    }
    if (0..2).any(|j| ip == remote_ip(j, false) || ip == remote_ip(j, true)) {
        return Some(Place::Remote);
    }
    if ip == node_ip(false) || ip == node_ip(true) {
        return Some(Place::Host);
    }
    if ip == outside_ip(false) || ip == outside_ip(true) {
        return Some(Place::Outside);
    }
    None
}

/// Whether a frame from `place` would teach the worker that someone else's address lives
/// there: a pod's ARP, neighbour discovery or IP from another address of the pod network
/// (the worker learns pods from their traffic, as a bridge learns MACs: pods can take each
/// other's addresses, as on flannel's bridge). Such frames redirect that address's
/// traffic, which breaks the conversation checks, so the generator leaves them out.
fn claims_anothers_address(place: Place, frame: &[u8]) -> bool {
    let in_pod_network = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets()[..3] == [10, 244, 1],
        IpAddr::V6(a) => a.segments()[..4] == [0xfd00, 0x10, 0x244, 1],
    };
    let foreign = |ip: IpAddr| match place {
        Place::Pod(i) => in_pod_network(ip) && ip != pod_ip(i, false) && ip != pod_ip(i, true),
        Place::Outside | Place::Host | Place::Remote => false,
    };
    let v4 = |b: Option<&[u8]>| b.map(|b| IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes")));
    let v6 = |b: Option<&[u8]>| b.map(|b| IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes")));
    let claimed: Vec<IpAddr> = match frame.get(12..14) {
        Some([8, 6]) => v4(frame.get(28..32)).into_iter().collect(),
        Some([8, 0]) if matches!(place, Place::Pod(_)) => {
            v4(frame.get(26..30)).into_iter().collect()
        }
        Some([0x86, 0xdd]) => {
            let mut c: Vec<IpAddr> = Vec::new();
            if matches!(place, Place::Pod(_)) || frame.get(20) == Some(&58) {
                c.extend(v6(frame.get(22..38)));
            }
            if frame.get(20) == Some(&58) {
                c.extend(v6(frame.get(62..78)));
            }
            c
        }
        _ => Vec::new(),
    };
    claimed.into_iter().any(foreign)
}

/// A frame the worker sent, checked.
struct Out {
    port: usize,
    frame: Vec<u8>,
    checked: Checked,
}

impl Out {
    /// Where it went: VXLAN on the uplink is node B's.
    fn place(&self) -> Place {
        match self.port {
            UPLINK if self.checked.inner.is_some() => Place::Remote,
            UPLINK => Place::Outside,
            HOST => Place::Host,
            i => Place::Pod(i),
        }
    }
}

/// Counts printed at the end of a run, so a generator that stops reaching the pipeline's
/// depths shows.
#[derive(Default, Debug)]
struct Tally {
    frames: u64,
    emitted: u64,
    conversations: u64,
    replies_checked: u64,
    icmp_errors: u64,
    installs: u64,
    conntrack_full: u64,
    translated: u64,
}

/// One episode: the worker, its tables, the world's memory.
struct Sim {
    shared: Arc<Shared>,
    w: Worker<MemDevice>,
    spec: TableSpec,
    now: u64,
    generation: u64,
    /// Inputs whose transport checksum was already wrong: (time, protocol, body).
    dirty: VecDeque<(u64, u8, Vec<u8>)>,
    /// Recent IP frames sent, for ICMP errors about them.
    recent: VecDeque<Out>,
    /// The frames injected in the current step, for the failure report.
    step_inputs: Vec<(usize, Vec<u8>)>,
    conversation: u64,
    palettes: Vec<(Place, Palette)>,
    tally: Tally,
}

fn port_config() -> Vec<PortConfig> {
    let mut ports = vec![PortConfig {
        name: "uplink".into(),
        role: PortRole::Uplink,
        mac: UPLINK_MAC,
        mtu: 1500,
    }];
    for i in 1..=PODS {
        ports.push(PortConfig {
            name: pod_name(i),
            role: PortRole::Pod,
            mac: port_mac(i),
            mtu: 1450,
        });
    }
    ports.push(PortConfig {
        name: "host".into(),
        role: PortRole::Host,
        mac: HOST_MAC,
        mtu: 1500,
    });
    ports
}

impl Sim {
    fn new(s: &mut Src) -> Sim {
        let limits = Limits {
            ring_size: s.pick(&[13, 251, 1021]),
            ring_scaled: s.chance(1, 3),
            conntrack_capacity: s.pick(&[8, 64, 256, 4096]),
            affinity_capacity: s.pick(&[1, 8, 64]),
            ..Limits::default()
        };
        let shared = Arc::new(Shared::new(port_config(), 1, limits));
        if s.chance(3, 4) {
            shared.uplink_routes.store(Arc::new(UplinkRoutes::new(vec![(
                "0.0.0.0/0".parse().expect("literal"),
                Some(ROUTER),
            )])));
        }
        if s.chance(1, 4) {
            shared.monitor.subscribe();
        }
        let spec = fuzzgen::table_spec_gen(s);
        let now = 1000 * SECOND;
        shared.install(1, spec.clone(), now);
        let w = Worker::new(0, MemDevice::new(PORTS, POOL), shared.clone());
        let base = fuzzgen::layout_palette();
        let mut palettes = Vec::new();
        for place in [
            Place::Pod(1),
            Place::Pod(2),
            Place::Pod(3),
            Place::Remote,
            Place::Outside,
            Place::Host,
        ] {
            let mut p = base.clone();
            let (v4, v6) = match place {
                Place::Pod(i) => (pod_ip(i, false), pod_ip(i, true)),
                Place::Remote => (remote_ip(0, false), remote_ip(0, true)),
                Place::Outside => (outside_ip(false), outside_ip(true)),
                Place::Host => (node_ip(false), node_ip(true)),
            };
            p.from_v4 = match v4 {
                IpAddr::V4(a) => Some(a),
                _ => None,
            };
            p.from_v6 = match v6 {
                IpAddr::V6(a) => Some(a),
                _ => None,
            };
            palettes.push((place, p));
        }
        Sim {
            shared,
            w,
            spec,
            now,
            generation: 1,
            dirty: VecDeque::new(),
            recent: VecDeque::new(),
            step_inputs: Vec::new(),
            conversation: 0,
            palettes,
            tally: Tally::default(),
        }
    }

    /// Sends `frame` (an Ethernet frame whose MACs `inject` sets) into the worker as coming
    /// from `place`; VXLAN for node B's pods.
    fn inject(&mut self, place: Place, mut frame: Vec<u8>, set_macs: bool) {
        let (port, frame) = match place {
            Place::Pod(i) => {
                if set_macs && frame.len() >= 12 {
                    frame[0..6].copy_from_slice(&port_mac(i));
                    frame[6..12].copy_from_slice(&pod_mac(i));
                }
                (i, frame)
            }
            Place::Host => {
                if set_macs && frame.len() >= 12 {
                    frame[0..6].copy_from_slice(&HOST_MAC);
                    frame[6..12].copy_from_slice(&KERNEL_MAC);
                }
                (HOST, frame)
            }
            Place::Outside => {
                if set_macs && frame.len() >= 12 {
                    frame[0..6].copy_from_slice(&UPLINK_MAC);
                    frame[6..12].copy_from_slice(&ROUTER_MAC);
                }
                (UPLINK, frame)
            }
            Place::Remote => {
                if set_macs && frame.len() >= 12 {
                    frame[0..6].copy_from_slice(&VTEP_MAC);
                    frame[6..12].copy_from_slice(&NODE_B_VTEP_MAC);
                }
                let outer = fuzzgen::vxlan(
                    UPLINK_MAC, NODE_B_MAC, NODE_B, NODE_V4, 49152, VXLAN_PORT, VNI, &frame,
                );
                (UPLINK, outer)
            }
        };
        self.note_input(port, &frame);
        self.tally.frames += 1;
        self.step_inputs.push((port, frame.clone()));
        self.w.dev.inject(port, &frame);
    }

    /// Remembers an input whose transport checksum is already wrong: what comes out of it
    /// is allowed to be wrong the same way.
    fn note_input(&mut self, port: usize, frame: &[u8]) {
        let horizon = self.now.saturating_sub(3 * HOLD_TIME);
        while self.dirty.front().is_some_and(|d| d.0 < horizon) {
            self.dirty.pop_front();
        }
        let mut record = |c: &Checked| {
            if c.all_valid() {
                return;
            }
            let mut level = Some(c);
            while let Some(l) = level {
                if let Some(ip) = &l.ip {
                    self.dirty.push_back((self.now, ip.proto, l.body.clone()));
                }
                level = l.inner.as_deref();
            }
        };
        match check_frame(frame, (port == UPLINK).then_some(VX_IN)) {
            Ok(c) => record(&c),
            // Not a frame we can read whole (a VXLAN length the dataplane tolerates, say):
            // remember what its payload would be as an inner frame too.
            Err(_) => {
                for at in [50, 54] {
                    if let Some(Ok(c)) = frame.get(at..).map(|f| check_frame(f, None)) {
                        record(&c);
                    }
                }
                if let Ok(c) = check_frame(frame, None) {
                    record(&c);
                }
            }
        }
    }

    /// Runs the worker until nothing more comes out, answering its solicitations, and
    /// checks every frame it sends.
    fn pump(&mut self) -> Result<Vec<Out>, String> {
        let mut outs = Vec::new();
        // Bounded: each round the world answers each solicitation once.
        for _ in 0..8 {
            self.w.poll(self.now);
            let mut any = false;
            for port in 0..PORTS {
                for frame in self.w.dev.take_sent(port) {
                    any = true;
                    let checked = self.check_out(port, &frame)?;
                    self.answer(port, &frame, &checked);
                    outs.push(Out {
                        port,
                        frame,
                        checked,
                    });
                }
            }
            if !any {
                break;
            }
        }
        let (len, cap) = (
            self.shared.conntrack.len(),
            self.shared.conntrack.capacity(),
        );
        if len > cap {
            return Err(format!("conntrack holds {len} connections, capacity {cap}"));
        }
        self.tally.emitted += outs.len() as u64;
        Ok(outs)
    }

    /// The checks every emitted frame passes.
    fn check_out(&self, port: usize, frame: &[u8]) -> Result<Checked, String> {
        let c = check_frame(frame, (port == UPLINK).then_some(VX))
            .map_err(|e| format!("port {port} sent a broken frame ({e}): {}", hex(frame)))?;
        let want = port_config()[port].mac;
        if frame[6..12] != want {
            return Err(format!(
                "port {port} sent a frame from MAC {:02x?}, not the port's {want:02x?}: {}",
                &frame[6..12],
                hex(frame)
            ));
        }
        if let Some(why) = c.first_invalid() {
            // Every level with a bad checksum must have come in with it.
            let mut explained = true;
            let mut level = Some(&c);
            while let Some(l) = level {
                if let (fuzzgen::L4::Invalid(_), Some(ip)) = (&l.l4, &l.ip) {
                    explained &= self
                        .dirty
                        .iter()
                        .any(|(_, proto, body)| *proto == ip.proto && *body == l.body);
                }
                level = l.inner.as_deref();
            }
            if !explained {
                return Err(format!(
                    "port {port} sent a frame with a bad checksum ({why}) from inputs whose checksums verified: {}",
                    hex(frame)
                ));
            }
        }
        Ok(c)
    }

    /// The world answering the worker's ARP requests and neighbour solicitations.
    fn answer(&mut self, port: usize, frame: &[u8], c: &Checked) {
        if c.arp && frame[20..22] == [0, 1] {
            let target = Ipv4Addr::new(frame[38], frame[39], frame[40], frame[41]);
            let owner = match port {
                UPLINK if target == ROUTER => Some(ROUTER_MAC),
                UPLINK if target == NODE_B => Some(NODE_B_MAC),
                HOST if target == NODE_V4 => Some(KERNEL_MAC),
                i if (1..=PODS).contains(&i) && IpAddr::V4(target) == pod_ip(i, false) => {
                    Some(pod_mac(i))
                }
                _ => None,
            };
            if let Some(mac) = owner {
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&frame[22..28]);
                let spa = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
                let reply = fuzzgen::arp(2, mac, target, sha, spa);
                self.w
                    .dev
                    .inject(port, &fuzzgen::ethernet(sha, mac, 0x0806, &reply));
            }
            return;
        }
        let Some(ip) = &c.ip else {
            return;
        };
        if ip.proto != fuzzgen::ICMPV6 || ip.icmp_type != Some(135) {
            return;
        }
        let Some(t) = frame.get(ip.l4 + 8..ip.l4 + 24) else {
            return;
        };
        let target = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(t).expect("16 bytes"));
        let owner = match port {
            HOST if IpAddr::V6(target) == node_ip(true) => Some(KERNEL_MAC),
            i if (1..=PODS).contains(&i) && IpAddr::V6(target) == pod_ip(i, true) => {
                Some(pod_mac(i))
            }
            _ => None,
        };
        if let (Some(mac), IpAddr::V6(asker)) = (owner, ip.src) {
            let na = fuzzgen::neighbor_advert(target, asker, target, mac);
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&frame[6..12]);
            self.w
                .dev
                .inject(port, &fuzzgen::ethernet(dst, mac, 0x86dd, &na));
        }
    }

    /// A burst of generated frames from random places.
    fn random_frames(&mut self, s: &mut Src) -> Result<(), String> {
        for _ in 0..1 + s.below(4) {
            let k = s.below(self.palettes.len());
            let (place, pal) = self.palettes[k].clone();
            let mut frame = fuzzgen::frame_gen(s, &pal, if place == Place::Remote { 1 } else { 0 });
            let set_macs = !s.chance(1, 8);
            if s.chance(1, 4) {
                fuzzgen::mutate(s, &mut frame);
            }
            if claims_anothers_address(place, &frame) {
                continue;
            }
            self.inject(place, frame, set_macs);
        }
        let outs = self.pump()?;
        self.remember(outs);
        Ok(())
    }

    fn remember(&mut self, outs: Vec<Out>) {
        for o in outs {
            if o.checked.innermost().ip.is_some() {
                self.recent.push_back(o);
            }
        }
        while self.recent.len() > 16 {
            self.recent.pop_front();
        }
    }

    /// Opens a connection to a Service frontend and answers it from the endpoint reached.
    fn conversation(&mut self, s: &mut Src) -> Result<(), String> {
        if self.spec.services.is_empty() {
            return Ok(());
        }
        let svc = s.pick(&self.spec.services);
        let fe = s.pick(&svc.frontends);
        let v6 = fe.ip.is_ipv6();
        let (client_place, client) = match s.below(5) {
            0 | 1 => {
                let i = 1 + s.below(PODS);
                (Place::Pod(i), pod_ip(i, v6))
            }
            2 => (Place::Remote, remote_ip(s.below(2), v6)),
            3 => (Place::Outside, outside_ip(v6)),
            _ => (Place::Host, node_ip(v6)),
        };
        let overlay = !self.spec.remote_nodes.is_empty() && self.spec.node.vtep_ip.is_some();
        if client_place == Place::Remote && !overlay {
            // Node B's packets are taken in, but without a route back there is no reply.
            return Ok(());
        }
        self.conversation += 1;
        let sport = 20000 + (self.conversation % 10000) as u16;
        let proto = svc.protocol.number();
        let key = nat::conntrack::FlowKey {
            proto,
            src: client,
            dst: fe.ip,
            sport,
            dport: fe.port,
        };
        if self.shared.conntrack.contains(&key, self.now) {
            return Ok(());
        }
        self.tally.conversations += 1;
        let nonce = (0xc0_0000_0000u64 | self.conversation).to_be_bytes();
        let l4 = match svc.protocol {
            Protocol::Tcp => fuzzgen::tcp(sport, fe.port, 1, 0, fuzzgen::flags::SYN, &[], &nonce),
            Protocol::Udp => fuzzgen::udp(sport, fe.port, &nonce),
            Protocol::Sctp => fuzzgen::sctp(sport, fe.port, 0, 1, &nonce),
        };
        let packet = fuzzgen::ip_packet(client, fe.ip, proto, l4, 64);
        let frame = fuzzgen::ethernet([0; 6], [0; 6], fuzzgen::ethertype_of(&packet), &packet);
        self.inject(client_place, frame, true);
        let outs = self.pump()?;
        let forward = outs.iter().find(|o| {
            let i = o.checked.innermost();
            i.ip.as_ref().is_some_and(|ip| ip.proto == proto) && i.body.starts_with(&nonce)
        });
        let Some(forward) = forward else {
            if self.w.counters().drops[DropReason::ConntrackFull as usize] > 0 {
                self.tally.conntrack_full += 1;
            }
            self.remember(outs);
            return Ok(());
        };
        let fwd = forward
            .checked
            .innermost()
            .ip
            .clone()
            .expect("found by its IP");
        let backend = (fwd.dst, fwd.dport);
        let context = format!(
            "{} {client}:{sport} -> {}:{} ({:?} {})",
            svc.name,
            fe.ip,
            fe.port,
            fe.kind,
            svc.protocol.number()
        );
        if backend != (fe.ip, fe.port)
            || self
                .spec
                .services
                .iter()
                .any(|x| x.all_endpoints.iter().any(|e| (e.ip, e.port) == backend))
        {
            self.tally.translated += (backend != (fe.ip, fe.port)) as u64;
        }
        if !svc.all_endpoints.iter().any(|e| (e.ip, e.port) == backend) {
            return Err(format!(
                "{context}: sent to {}:{}, not an endpoint of the Service ({:?})",
                backend.0, backend.1, svc.all_endpoints
            ));
        }
        let Some(backend_place) = place_of(backend.0) else {
            return Err(format!(
                "{context}: delivered to {} which no one has",
                backend.0
            ));
        };
        if forward.place() != backend_place {
            return Err(format!(
                "{context}: endpoint {} lives at {backend_place:?}, the packet went to {:?} (port {})",
                backend.0,
                forward.place(),
                forward.port
            ));
        }
        self.remember(outs);
        // The endpoint answers the packet as it saw it.
        let nonce2 = (0xd0_0000_0000u64 | self.conversation).to_be_bytes();
        let l4 = match svc.protocol {
            Protocol::Tcp => fuzzgen::tcp(
                fwd.dport,
                fwd.sport,
                7,
                2,
                fuzzgen::flags::SYN | fuzzgen::flags::ACK,
                &[],
                &nonce2,
            ),
            Protocol::Udp => fuzzgen::udp(fwd.dport, fwd.sport, &nonce2),
            Protocol::Sctp => fuzzgen::sctp(fwd.dport, fwd.sport, 1, 2, &nonce2),
        };
        let packet = fuzzgen::ip_packet(fwd.dst, fwd.src, proto, l4, 64);
        let frame = fuzzgen::ethernet([0; 6], [0; 6], fuzzgen::ethertype_of(&packet), &packet);
        let drops_before = self.drops();
        self.inject(backend_place, frame, true);
        let outs = self.pump()?;
        let reply = outs.iter().find(|o| {
            let i = o.checked.innermost();
            i.ip.as_ref().is_some_and(|ip| ip.proto == proto) && i.body.starts_with(&nonce2)
        });
        let Some(reply) = reply else {
            return Err(format!(
                "{context}: reached {}:{} as {}:{}, but the reply never came back (conntrack {}/{}, original tracked: {:?}, reply tracked: {}; client's neighbour entry {:?}; dropped as {:?}; sent {:?})",
                backend.0,
                backend.1,
                fwd.src,
                fwd.sport,
                self.shared.conntrack.len(),
                self.shared.conntrack.capacity(),
                self.shared.conntrack.get(&key, self.now).map(|h| (h.conn, h.dir, h.state)),
                self.shared.conntrack.contains(
                    &nat::conntrack::FlowKey {
                        proto,
                        src: fwd.dst,
                        dst: fwd.src,
                        sport: fwd.dport,
                        dport: fwd.sport,
                    },
                    self.now
                ),
                self.shared.neighbors.get(&client),
                self.drops().into_iter().filter(|d| !drops_before.contains(d)).collect::<Vec<_>>(),
                outs.iter().map(|o| (o.port, hex(&o.frame))).collect::<Vec<_>>()
            ));
        };
        let r = reply
            .checked
            .innermost()
            .ip
            .clone()
            .expect("found by its IP");
        if (r.src, r.sport, r.dst, r.dport) != (fe.ip, fe.port, client, sport) {
            return Err(format!(
                "{context}: the reply came back as {}:{} -> {}:{}",
                r.src, r.sport, r.dst, r.dport
            ));
        }
        if reply.place() != client_place {
            return Err(format!(
                "{context}: the reply went to {:?}, the client is at {client_place:?}",
                reply.place()
            ));
        }
        self.tally.replies_checked += 1;
        self.remember(outs);
        Ok(())
    }

    /// An ICMP error about a frame the worker sent, from where it went.
    fn icmp_error(&mut self, s: &mut Src) -> Result<(), String> {
        if self.recent.is_empty() {
            return Ok(());
        }
        let k = s.below(self.recent.len());
        let o = &self.recent[k];
        let place = o.place();
        let inner = o.checked.innermost();
        let ip = inner.ip.clone().expect("recent frames carry IP");
        let start = match &o.checked.inner {
            Some(_) => 50 + ip.l3,
            None => ip.l3,
        };
        let mut quoted = o.frame[start..start + (ip.end - ip.l3)].to_vec();
        if s.chance(1, 2) {
            quoted.truncate(if ip.v6 { 48 } else { 28 });
        }
        // From the destination itself, or from a router on the way.
        let from = if s.chance(2, 3) {
            ip.dst
        } else if ip.v6 {
            IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1))
        } else {
            IpAddr::V4(ROUTER)
        };
        let (ty, code, rest) = if ip.v6 {
            s.pick(&[
                (1u8, 4u8, [0u8; 4]),
                (2, 0, [0, 0, 5, 0x00]),
                (3, 0, [0; 4]),
            ])
        } else {
            s.pick(&[
                (3u8, 3u8, [0u8; 4]),
                (3, 4, [0, 0, 0x05, 0x00]),
                (11, 0, [0; 4]),
            ])
        };
        let proto = if ip.v6 {
            fuzzgen::ICMPV6
        } else {
            fuzzgen::ICMP
        };
        let m = fuzzgen::icmp(ty, code, rest, &quoted);
        let packet = fuzzgen::ip_packet(from, ip.src, proto, m, 64);
        let frame = fuzzgen::ethernet([0; 6], [0; 6], fuzzgen::ethertype_of(&packet), &packet);
        self.tally.icmp_errors += 1;
        self.inject(place, frame, true);
        let outs = self.pump()?;
        self.remember(outs);
        Ok(())
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let c = self.w.counters();
        DropReason::ALL
            .iter()
            .filter(|r| c.drops[**r as usize] > 0)
            .map(|r| (r.label(), c.drops[*r as usize]))
            .collect()
    }

    /// One step: frames, a conversation, an ICMP error, new tables or a clock jump.
    fn step(&mut self, s: &mut Src) -> Result<(), String> {
        self.step_inputs.clear();
        self.now += s.range(0, 5_000_000) as u64;
        match s.below(100) {
            0..=74 => self.random_frames(s),
            75..=86 => self.conversation(s),
            87..=92 => self.icmp_error(s),
            93..=95 => {
                let mut next = fuzzgen::table_spec_gen(s);
                next.sort_services();
                self.generation += 1;
                self.tally.installs += 1;
                // Half the time as control sends it after its first table: the delta
                // from the tables in use (when the new table is one the dataplane takes).
                if s.below(2) == 0 && next.validate().is_ok() {
                    let current = self.shared.tables.load_full();
                    let delta = nat::spec::TableDelta::between(&current.spec, &next);
                    match self
                        .shared
                        .install_delta(self.generation, current.generation, &delta)
                    {
                        Ok(dataplane::state::DeltaOutcome::Applied { retire }) => {
                            if retire {
                                self.shared.retire_stale_flows(self.now);
                            }
                        }
                        other => return Err(format!("a delta was not applied: {other:?}")),
                    }
                    if self.shared.tables.load().spec != next {
                        return Err("the tables after a delta are not the table sent".into());
                    }
                } else {
                    self.shared.install(self.generation, next.clone(), self.now);
                }
                self.spec = next;
                let outs = self.pump()?;
                self.remember(outs);
                Ok(())
            }
            _ => {
                self.now += s.pick(&[
                    SECOND / 100,
                    SECOND,
                    5 * SECOND,
                    40 * SECOND,
                    200 * SECOND,
                    3000 * SECOND,
                ]);
                let outs = self.pump()?;
                self.remember(outs);
                Ok(())
            }
        }
    }
}

/// A failed episode: the step, what broke, and the frames injected in that step by port.
type Failure = (u64, String, Vec<(usize, Vec<u8>)>);

/// Runs one episode of `steps` steps; `Err` describes the first failure.
fn episode(seed: u64, steps: u64, tally: &mut Tally) -> Result<(), Failure> {
    let mut rng = Rng::new(seed);
    let setup = rng.bytes(STEP_BYTES);
    let mut sim = Sim::new(&mut Src::new(&setup));
    let result = (|| -> Result<(), (u64, String)> {
        sim.pump().map_err(|e| (0, e))?;
        for step in 1..=steps {
            let bytes = rng.bytes(STEP_BYTES);
            let outcome = catch_unwind(AssertUnwindSafe(|| sim.step(&mut Src::new(&bytes))));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err((step, e)),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    return Err((step, format!("panic: {msg}")));
                }
            }
        }
        Ok(())
    })();
    let t = &sim.tally;
    tally.frames += t.frames;
    tally.emitted += t.emitted;
    tally.conversations += t.conversations;
    tally.replies_checked += t.replies_checked;
    tally.icmp_errors += t.icmp_errors;
    tally.installs += t.installs;
    tally.conntrack_full += t.conntrack_full;
    tally.translated += t.translated;
    result.map_err(|(step, e)| (step, e, sim.step_inputs.clone()))
}

#[test]
fn fuzz_pipeline() {
    let st = fuzzgen::settings("KXDP_FUZZ_FRAMES", SMOKE_FRAMES);
    let started = std::time::Instant::now();
    let mut tally = Tally::default();
    let mut e = st.only.unwrap_or(0);
    let mut episodes = 0;
    loop {
        let seed = fuzzgen::case_seed(st.seed, e);
        if let Err((step, why, inputs)) = episode(seed, EPISODE_STEPS, &mut tally) {
            let frames: Vec<String> = inputs
                .iter()
                .map(|(port, f)| format!("    port {port}: {}", hex(f)))
                .collect();
            panic!(
                "fuzz pipeline: {why}\n  replay: KXDP_FUZZ_SEED={:#x} KXDP_FUZZ_CASE={e} (step {step})\n  frames injected in that step:\n{}",
                st.seed,
                frames.join("\n")
            );
        }
        e += 1;
        episodes += 1;
        if st.only.is_some() || tally.frames >= st.count {
            break;
        }
    }
    fuzzgen::report("pipeline", st.seed, tally.frames, "frames", started);
    eprintln!("fuzz pipeline: {episodes} episodes, {tally:?}");
    assert!(
        st.only.is_some() || tally.replies_checked > 0,
        "no conversation reached a backend: the generator no longer exercises translation"
    );
}

/// Node A with its tables (one ClusterIP Service whose only endpoint is pod 1), pods 1
/// and 2 resolved.
fn small_node() -> Sim {
    let mut s = Src::new(&[]);
    let mut sim = Sim::new(&mut s);
    let mut spec = fuzzgen::table_spec_gen(&mut Src::new(&[]));
    spec.services.clear();
    spec.policy = Default::default();
    sim.spec = spec.clone();
    sim.shared.install(2, spec, sim.now);
    sim.pump().expect("resolving pods");
    sim
}

/// A TCP SYN from pod 2 to pod 1, and the port it leaves by.
fn pod2_to_pod1(sim: &mut Sim) -> Vec<usize> {
    let syn = fuzzgen::tcp(40000, 8080, 1, 0, fuzzgen::flags::SYN, &[], b"x");
    let packet = fuzzgen::ip_packet(pod_ip(2, false), pod_ip(1, false), fuzzgen::TCP, syn, 64);
    sim.inject(
        Place::Pod(2),
        fuzzgen::ethernet([0; 6], [0; 6], 0x0800, &packet),
        true,
    );
    let outs = sim.pump().expect("valid frames");
    outs.iter()
        .filter(|o| {
            o.checked
                .ip
                .as_ref()
                .is_some_and(|ip| ip.proto == fuzzgen::TCP)
        })
        .map(|o| o.port)
        .collect()
}

#[test]
fn pod_to_pod_goes_to_the_pods_port() {
    let mut sim = small_node();
    assert_eq!(pod2_to_pod1(&mut sim), vec![1]);
}

/// Found by `fuzz_pipeline` (seed 0x6b786470f0222026, episode 1, step 205: an ARP request
/// on the host port naming pod 1's address as its sender). Anyone on the uplink's segment
/// can do the same with one ARP request: the worker learns every ARP sender on the uplink
/// into the one neighbour table routing to pods uses, so pod 1's traffic (Service
/// connections to it included) leaves by the uplink to whoever asked. The kernel's
/// forwarding would not: its route to the pod network points at the pods' bridge, and a
/// neighbour entry learned on the uplink is never used for it.
#[test]
fn arp_from_the_uplink_cannot_take_a_pods_address() {
    let mut sim = small_node();
    let attacker = [0x02, 0xba, 0xd0, 0, 0, 1];
    let who_has = fuzzgen::arp(1, attacker, pod_v4(1), [0; 6], ROUTER);
    sim.inject(
        Place::Outside,
        fuzzgen::ethernet([0xff; 6], attacker, 0x0806, &who_has),
        false,
    );
    sim.pump().expect("valid frames");
    assert_eq!(
        pod2_to_pod1(&mut sim),
        vec![1],
        "pod 1's traffic left by another port"
    );
}

/// This node's end of the overlay, as the worker compiles it from the layout.
fn overlay(local: Ipv4Addr) -> dataplane::vxlan::Overlay {
    dataplane::vxlan::Overlay {
        vni: VNI,
        port: VXLAN_PORT,
        local_vtep_ip: local,
        local_vtep_mac: VTEP_MAC,
        uplink_mac: UPLINK_MAC,
    }
}

/// One case of `fuzz_vxlan_decapsulate`: `Err` for a broken promise.
fn vxlan_case(input: &[u8], made: &mut Vec<u8>) -> Result<(), String> {
    use dataplane::vxlan::{decapsulate, encapsulate, RemoteVtep, SRC_PORT_MAX, SRC_PORT_MIN};
    let mut s = Src::new(input);
    let pal = fuzzgen::layout_palette();
    if s.chance(1, 2) {
        // Anything from the uplink: what decapsulate accepts must be what it says.
        let mut f = fuzzgen::frame_gen(&mut s, &pal, 0);
        if s.chance(1, 2) {
            fuzzgen::mutate(&mut s, &mut f);
        }
        *made = f.clone();
        let Ok(d) = decapsulate(&f, &overlay(NODE_V4)) else {
            return Ok(());
        };
        if d.inner_len < 14 || d.inner_offset + d.inner_len > f.len() || d.vni != VNI {
            return Err(format!("decapsulated {d:?} from {} bytes", f.len()));
        }
        let ihl = (f[14] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let udp = &f[14 + ihl..];
        let ok = f[12..14] == [8, 0]
            && f[14] >> 4 == 4
            && fuzzgen::fold(fuzzgen::sum16(&f[14..14 + ihl], 0)) == 0xffff
            && u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0
            && f[23] == fuzzgen::UDP
            && f[30..34] == NODE_V4.octets()
            && u16::from_be_bytes([udp[2], udp[3]]) == VXLAN_PORT
            && d.inner_offset == 14 + ihl + 16
            && 14 + total >= d.inner_offset + d.inner_len
            && udp[8] & 0x08 != 0;
        if !ok {
            return Err(format!(
                "decapsulate accepted {d:?}, which the headers do not bear out"
            ));
        }
        return Ok(());
    }
    // Encapsulation round trip: node A to node B and back out of the packet.
    let mut inner = fuzzgen::frame_gen(&mut s, &pal, 1);
    if inner.len() < 14 {
        inner.resize(14, 0);
    }
    *made = inner.clone();
    let headroom = 50 + s.below(200);
    let mut chunk = vec![0u8; headroom + inner.len() + s.below(64)];
    chunk[headroom..headroom + inner.len()].copy_from_slice(&inner);
    let remote = RemoteVtep {
        ip: NODE_B,
        vtep_mac: NODE_B_VTEP_MAC,
        next_hop_mac: NODE_B_MAC,
    };
    let hash = ((s.u32() as u64) << 32) | s.u32() as u64;
    let Some((off, len)) = encapsulate(
        &mut chunk,
        headroom,
        inner.len(),
        &overlay(NODE_V4),
        &remote,
        hash,
    ) else {
        return Err(format!(
            "encapsulate refused {} bytes with {headroom} of headroom",
            inner.len()
        ));
    };
    let outer = &chunk[off..off + len];
    let sport = u16::from_be_bytes([outer[34], outer[35]]);
    if !(SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport) {
        return Err(format!("outer source port {sport}"));
    }
    let c = check_frame(outer, None).map_err(|e| format!("encapsulated frame: {e}"))?;
    if c.l4 != fuzzgen::L4::Valid {
        return Err(format!("outer UDP: {:?}", c.l4));
    }
    let d =
        decapsulate(outer, &overlay(NODE_B)).map_err(|e| format!("node B refuses it: {e:?}"))?;
    let got = &outer[d.inner_offset..d.inner_offset + d.inner_len];
    if got[0..6] != NODE_B_VTEP_MAC || got[6..12] != VTEP_MAC || got[12..] != inner[12..] {
        return Err(format!("inner frame came out as {}", hex(got)));
    }
    Ok(())
}

#[test]
fn fuzz_vxlan_decapsulate() {
    let st = fuzzgen::settings("KXDP_FUZZ_CASES", 50_000);
    let started = std::time::Instant::now();
    let cases: Box<dyn Iterator<Item = u64>> = match st.only {
        Some(n) => Box::new(std::iter::once(n)),
        None => Box::new(0..st.count),
    };
    let mut ran = 0;
    for n in cases {
        let input = Rng::new(fuzzgen::case_seed(st.seed, n)).bytes(STEP_BYTES);
        let mut made = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| vxlan_case(&input, &mut made)));
        let why = match result {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(_) => Some("panic".to_string()),
        };
        if let Some(why) = why {
            panic!(
                "fuzz vxlan: {why}\n  replay: KXDP_FUZZ_SEED={:#x} KXDP_FUZZ_CASE={n}\n  frame: {}",
                st.seed,
                hex(&made)
            );
        }
        ran += 1;
    }
    fuzzgen::report("vxlan", st.seed, ran, "cases", started);
}

/// Found by `fuzz_pipeline` (seed 0x1352903, episode 76, step 2290: an ARP on the uplink
/// naming 192.168.0.2). The uplink learns every ARP sender but the pod network's and the
/// gateway's, so one ARP request from anyone on the uplink's segment naming the node's
/// own address moves that address's neighbour entry to the uplink: packets for the node
/// (to its kernel, through the host port, such as replies to its own Service
/// connections) are then held for a resolution that never comes and dropped, until the
/// entry is re-confirmed on the host port.
#[test]
fn arp_from_the_uplink_cannot_take_the_nodes_address() {
    let mut sim = small_node();
    let to_node = |sim: &mut Sim| -> Vec<usize> {
        let syn = fuzzgen::tcp(40000, 22, 1, 0, fuzzgen::flags::SYN, &[], b"x");
        let packet = fuzzgen::ip_packet(pod_ip(2, false), node_ip(false), fuzzgen::TCP, syn, 64);
        sim.inject(
            Place::Pod(2),
            fuzzgen::ethernet([0; 6], [0; 6], 0x0800, &packet),
            true,
        );
        let outs = sim.pump().expect("valid frames");
        outs.iter()
            .filter(|o| {
                o.checked
                    .ip
                    .as_ref()
                    .is_some_and(|ip| ip.proto == fuzzgen::TCP)
            })
            .map(|o| o.port)
            .collect()
    };
    assert_eq!(to_node(&mut sim), vec![HOST]);
    let attacker = [0x02, 0xba, 0xd0, 0, 0, 1];
    let who_has = fuzzgen::arp(1, attacker, NODE_V4, [0; 6], ROUTER);
    sim.inject(
        Place::Outside,
        fuzzgen::ethernet([0xff; 6], attacker, 0x0806, &who_has),
        false,
    );
    sim.pump().expect("valid frames");
    assert_eq!(
        to_node(&mut sim),
        vec![HOST],
        "traffic for the node no longer reaches its kernel"
    );
}
