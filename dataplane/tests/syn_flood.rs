//! A spoofed SYN or ACK flood at a NodePort must not lock real clients out (issue 16,
//! item 8), through the whole pipeline in memory with a simulated clock.
//!
//! The node: a NodePort 192.168.0.2:30080 with `externalTrafficPolicy: Cluster`, so every
//! connection from outside is masqueraded to the pods' gateway address, from the 28,232
//! ports of `SNAT_PORT_MIN..=SNAT_PORT_MAX` towards its one endpoint, a pod on this node.
//! 200,000 SYNs from random spoofed sources arrive over ten simulated seconds; the endpoint
//! answers every other one with a SYN-ACK (the rest it drops, as a backend with a full SYN
//! queue does), which goes out to a source that never answers. Among them, 200 real
//! clients each do a whole handshake: SYN, the endpoint's SYN-ACK (one burst of the flood
//! later), ACK (another burst later). A real connection succeeds when its SYN reaches the
//! endpoint masqueraded, the SYN-ACK comes back to the client un-translated, from the
//! NodePort, and its ACK and, after the flood, a data segment reach the endpoint from the
//! same masquerade port.
//!
//! Before the fix the ports ran out after about 30,000 SYNs and stayed taken (unanswered
//! SYNs for 120 s, answered ones for 60 s), and every real client from then on was refused
//! (`drop_snat_exhausted`). The second test makes the connection table, not the ports, the
//! limit (4,096 entries), where real clients were refused as `drop_conntrack_full`.
//!
//! The ACK flood is the same with bare ACKs (a FIN flood is alike): segments that start no
//! connection, which the dataplane still takes up mid-stream (see `nat::timeouts`). The
//! endpoint answers every other one with a RST, as a TCP stack answers a segment of no
//! connection; the rest it never sees answered (a firewall in the pod, or RSTs rate
//! limited). Before the fix such a pickup was established at once, assured for 24 h: the
//! unanswered half held every masquerade port (or the whole table) and nothing evicted
//! them, so about 1% of the real clients got through.

use std::net::Ipv4Addr;
use std::sync::Arc;

use dataplane::counters::DropReason;
use dataplane::pipeline::SECOND;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use dataplane::worker::{Worker, BURST};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use nat::spec::*;
use pktio::MemDevice;

const UPLINK: usize = 0;
const WEB: usize = 1;
const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0xff, 1];
const GW_WEB: [u8; 6] = [2, 0, 0, 0, 1, 1];
const WEB_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const NODE_PORT: u16 = 30080;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const BACKEND_PORT: u16 = 8080;

/// Spoofed SYNs, as in the lab run the issue reports.
const FLOOD: u64 = 200_000;
/// Real clients, spread over the flood from a fifth of the way in (when the ports of the
/// old code had run out) to its end.
const CLIENTS: u64 = 200;
/// Simulated length of the flood.
const FLOOD_TIME: u64 = 10 * SECOND;
/// A real client's sequence numbers: `CLIENT_SEQ + i`, so the endpoint's copy of a SYN
/// tells which client sent it (a flood SYN's sequence number is below).
const CLIENT_SEQ: u32 = 0x8000_0000;

fn spec() -> TableSpec {
    let ep = EndpointSpec {
        ip: BACKEND.into(),
        port: BACKEND_PORT,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    };
    TableSpec {
        node: NodeSpec {
            name: "node-a".into(),
            addresses: vec![NODE.into()],
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("literal")],
            ..NodeSpec::default()
        },
        cluster: ClusterSpec {
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("literal")],
            service_cidrs: vec!["172.30.0.0/16".parse().expect("literal")],
            ..ClusterSpec::default()
        },
        services: vec![Arc::new(ServiceSpec {
            name: "default/web:http".into(),
            protocol: Protocol::Tcp,
            frontends: vec![
                FrontendSpec {
                    kind: FrontendKind::ClusterIp,
                    ip: "172.30.0.41".parse().expect("literal"),
                    port: 80,
                },
                FrontendSpec {
                    kind: FrontendKind::NodePort,
                    ip: NODE.into(),
                    port: NODE_PORT,
                },
            ],
            cluster_endpoints: vec![ep.clone()],
            local_endpoints: vec![ep.clone()],
            all_endpoints: vec![ep],
            external_local: false,
            ..ServiceSpec::default()
        })],
        local_pods: vec![PodSpec {
            name: "default/web".into(),
            ips: vec![BACKEND.into()],
            labels: Default::default(),
        }],
        remote_nodes: vec![],
        policy: Default::default(),
    }
}

/// What a flood sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FloodKind {
    /// SYNs: connections that start and are never completed.
    Syn,
    /// Bare ACKs: segments of no connection, taken up mid-stream.
    Ack,
}

/// A TCP segment (sequence, acknowledgment or 0, flags SYN / ACK) with `payload`.
#[allow(clippy::too_many_arguments)]
fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    tcp_flags(macs, src, dst, seq, ack, syn, false, payload)
}

/// [`tcp`], with RST when `rst`.
#[allow(clippy::too_many_arguments)]
fn tcp_flags(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    rst: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, seq, 64240);
    let b = if syn { b.syn() } else { b };
    let b = if rst { b.rst() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    let mut out = Vec::with_capacity(64 + payload.len());
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

/// A TCP segment the pipeline sent, parsed.
#[derive(Clone, Copy, Debug)]
struct Seen {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    syn: bool,
}

fn parse(frame: &[u8]) -> Option<Seen> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        return None;
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        return None;
    };
    let h = ip.header();
    Some(Seen {
        src: (h.source_addr(), t.source_port()),
        dst: (h.destination_addr(), t.destination_port()),
        seq: t.sequence_number(),
        ack: t.acknowledgment_number(),
        syn: t.syn(),
    })
}

/// xorshift64*: the flood's spoofed sources, the same every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Where a real client is in its handshake.
#[derive(Clone, Copy, Debug)]
struct Client {
    addr: (Ipv4Addr, u16),
    /// The masquerade port its SYN reached the endpoint from.
    port: Option<u16>,
    /// Its SYN-ACK came back un-translated.
    answered: bool,
    /// Its ACK reached the endpoint from the same port.
    acked: bool,
    /// A data segment after the flood reached the endpoint from the same port.
    lasted: bool,
}

impl Client {
    fn seq(i: usize) -> u32 {
        CLIENT_SEQ + i as u32 * 16
    }
    fn endpoint_seq(i: usize) -> u32 {
        0x4000_0000 + i as u32 * 16
    }
}

/// The node and its surroundings.
struct Flood {
    worker: Worker<MemDevice>,
    shared: Arc<Shared>,
    now: u64,
    clients: Vec<Client>,
    /// Segments from the endpoint to send in the next burst (SYN-ACKs).
    from_endpoint: Vec<Vec<u8>>,
    /// Segments from real clients to send in the next burst (ACKs).
    from_clients: Vec<Vec<u8>>,
}

impl Flood {
    fn new(capacity: usize) -> Flood {
        let port = |name: &str, role, mac| PortConfig {
            name: name.into(),
            role,
            mac,
            mtu: 1500,
        };
        let shared = Arc::new(Shared::new(
            vec![
                port("uplink", PortRole::Uplink, UPLINK_MAC),
                port("default/web", PortRole::Pod, GW_WEB),
            ],
            1,
            Limits {
                conntrack_capacity: capacity,
                ..Limits::default()
            },
        ));
        shared.install(1, spec(), SECOND);
        let mut flood = Flood {
            worker: Worker::new(0, MemDevice::new(2, 8 * BURST), shared.clone()),
            shared,
            now: 2 * SECOND,
            clients: Vec::new(),
            from_endpoint: Vec::new(),
            from_clients: Vec::new(),
        };
        // The endpoint tells the dataplane where it is.
        let mut arp = Vec::with_capacity(42);
        arp.extend_from_slice(&GW_WEB);
        arp.extend_from_slice(&WEB_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        arp.extend_from_slice(&WEB_MAC);
        arp.extend_from_slice(&BACKEND.octets());
        arp.extend_from_slice(&GW_WEB);
        arp.extend_from_slice(&GATEWAY.octets());
        flood.worker.dev.inject(WEB, &arp);
        flood.worker.poll(flood.now);
        for p in [UPLINK, WEB] {
            flood.worker.dev.take_sent(p);
        }
        flood
    }

    fn from_outside(src: (Ipv4Addr, u16), seq: u32, ack: Option<u32>, syn: bool) -> Vec<u8> {
        let payload: &[u8] = if syn || ack.is_none() { b"" } else { b"GET /" };
        tcp(
            (ROUTER_MAC, UPLINK_MAC),
            src,
            (NODE, NODE_PORT),
            seq,
            ack,
            syn,
            payload,
        )
    }

    /// One burst: `frames` from outside (and the segments answering the last burst), the
    /// endpoint answering what reached it, and the replies that went out checked.
    fn burst(&mut self, frames: &[Vec<u8>], answer_flood: &mut bool) {
        let from_endpoint = std::mem::take(&mut self.from_endpoint);
        let from_clients = std::mem::take(&mut self.from_clients);
        for f in frames.iter().chain(&from_clients) {
            assert!(self.worker.dev.inject(UPLINK, f), "device pool too small");
        }
        for f in &from_endpoint {
            assert!(self.worker.dev.inject(WEB, f), "device pool too small");
        }
        self.now += FLOOD_TIME * BURST as u64 / FLOOD;
        // Enough polls to take every frame in (a poll takes a burst per port).
        for _ in 0..3 {
            self.worker.poll(self.now);
        }
        for f in self.worker.dev.take_sent(WEB) {
            let Some(s) = parse(&f) else { continue };
            assert_eq!(s.dst, (BACKEND, BACKEND_PORT), "{s:?}");
            assert_eq!(s.src.0, GATEWAY, "masqueraded to the pods' gateway: {s:?}");
            let client = s.seq.wrapping_sub(CLIENT_SEQ) as usize / 16;
            if s.seq >= CLIENT_SEQ && client < self.clients.len() {
                let c = &mut self.clients[client];
                if s.syn {
                    c.port = Some(s.src.1);
                    // The endpoint answers a real client one burst later.
                    self.from_endpoint.push(tcp(
                        (WEB_MAC, GW_WEB),
                        (BACKEND, BACKEND_PORT),
                        s.src,
                        Client::endpoint_seq(client),
                        Some(s.seq.wrapping_add(1)),
                        true,
                        b"",
                    ));
                } else if c.port == Some(s.src.1) {
                    if c.acked {
                        c.lasted = true;
                    }
                    c.acked = true;
                }
            } else {
                // Every other flood segment is answered: a SYN with a SYN-ACK, a segment
                // of no connection with a RST.
                *answer_flood = !*answer_flood;
                if *answer_flood {
                    self.from_endpoint.push(if s.syn {
                        tcp(
                            (WEB_MAC, GW_WEB),
                            (BACKEND, BACKEND_PORT),
                            s.src,
                            1,
                            Some(s.seq.wrapping_add(1)),
                            true,
                            b"",
                        )
                    } else {
                        tcp_flags(
                            (WEB_MAC, GW_WEB),
                            (BACKEND, BACKEND_PORT),
                            s.src,
                            s.ack,
                            None,
                            false,
                            true,
                            b"",
                        )
                    });
                }
            }
        }
        for f in self.worker.dev.take_sent(UPLINK) {
            let Some(s) = parse(&f) else { continue };
            let client = s.seq.wrapping_sub(0x4000_0000) as usize / 16;
            if !(s.syn && s.seq >= 0x4000_0000 && client < self.clients.len()) {
                continue;
            }
            let c = &mut self.clients[client];
            if s.dst == c.addr
                && s.src == (NODE, NODE_PORT)
                && s.ack == Client::seq(client).wrapping_add(1)
            {
                c.answered = true;
                self.from_clients.push(Flood::from_outside(
                    c.addr,
                    Client::seq(client).wrapping_add(1),
                    Some(s.seq.wrapping_add(1)),
                    false,
                ));
            }
        }
    }

    /// The flood with the real clients among it; then a data segment from every client.
    fn run(&mut self, kind: FloodKind) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut answer_flood = false;
        let first_client = FLOOD / 5;
        let every = (FLOOD - first_client) / CLIENTS;
        let mut frames = Vec::with_capacity(BURST);
        for n in 0..FLOOD {
            let r = rng.next();
            // Spoofed sources anywhere in 11.0.0.0–126.255.255.255 (outside the cluster's
            // networks and the node's), any port.
            let src = (
                Ipv4Addr::from(0x0b00_0000 + (r as u32 % 0x7400_0000)),
                (r >> 32) as u16 | 1024,
            );
            // The sequence number stays below a real client's.
            let seq = (r >> 48) as u32;
            frames.push(match kind {
                FloodKind::Syn => Flood::from_outside(src, seq, None, true),
                FloodKind::Ack => tcp(
                    (ROUTER_MAC, UPLINK_MAC),
                    src,
                    (NODE, NODE_PORT),
                    seq,
                    Some(r as u32),
                    false,
                    b"",
                ),
            });
            if n >= first_client && (n - first_client).is_multiple_of(every) {
                let i = self.clients.len();
                if i < CLIENTS as usize {
                    // Real clients from 198.51.100.0/24, ports in the kernel's range.
                    let addr = (Ipv4Addr::new(198, 51, 100, i as u8), 33000 + i as u16);
                    self.clients.push(Client {
                        addr,
                        port: None,
                        answered: false,
                        acked: false,
                        lasted: false,
                    });
                    frames.push(Flood::from_outside(addr, Client::seq(i), None, true));
                }
            }
            if frames.len() >= BURST - 2 {
                self.burst(&frames, &mut answer_flood);
                frames.clear();
            }
        }
        self.burst(&frames, &mut answer_flood);
        for _ in 0..3 {
            self.burst(&[], &mut answer_flood);
        }
        // A while later, each client sends data: established connections kept their place.
        self.now += SECOND;
        let data: Vec<Vec<u8>> = (0..self.clients.len())
            .filter(|i| self.clients[*i].acked)
            .map(|i| {
                Flood::from_outside(
                    self.clients[i].addr,
                    Client::seq(i).wrapping_add(1),
                    Some(Client::endpoint_seq(i).wrapping_add(1)),
                    false,
                )
            })
            .collect();
        for chunk in data.chunks(BURST / 2) {
            self.burst(chunk, &mut answer_flood);
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.worker
            .counters()
            .named()
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| v)
    }

    /// How many real clients got through each step, and the drops, for the report.
    fn report(&self) -> (usize, String) {
        let count = |f: fn(&Client) -> bool| self.clients.iter().filter(|c| f(c)).count();
        let ok = count(|c| c.port.is_some() && c.answered && c.acked && c.lasted);
        let c = self.worker.counters();
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| c.drops[**r as usize] > 0)
            .map(|r| format!("{} {}", r.label(), c.drops[*r as usize]))
            .collect();
        let text = format!(
            "{ok} of {} real connections succeeded (SYN through {}, answered {}, ACK through \
             {}, data after the flood {}); nat_new {}, conntrack {} of {}, \
             conntrack_early_drop {}, drops: {}",
            self.clients.len(),
            count(|c| c.port.is_some()),
            count(|c| c.answered),
            count(|c| c.acked),
            count(|c| c.lasted),
            c.nat_new,
            self.shared.conntrack.len(),
            self.shared.conntrack.capacity(),
            self.counter("conntrack_early_drop"),
            drops.join(", "),
        );
        (ok, text)
    }
}

/// A flood of `kind` at the NodePort: real clients keep their masquerade ports.
fn leaves_real_clients_their_masquerade_ports(kind: FloodKind) {
    let mut flood = Flood::new(Limits::default().conntrack_capacity);
    flood.run(kind);
    let (ok, report) = flood.report();
    eprintln!("{report}");
    assert_eq!(flood.clients.len(), CLIENTS as usize);
    assert!(ok * 100 >= 99 * CLIENTS as usize, "{report}");
    // The flood was there: the ports ran out, and the flood's entries gave theirs up (an
    // ACK flood's entries that the endpoint reset give their ports up as closed tuples
    // do, uncounted).
    let yielded = match kind {
        FloodKind::Syn => FLOOD / 2,
        FloodKind::Ack => FLOOD / 4,
    };
    assert!(flood.counter("conntrack_early_drop") > yielded, "{report}");
}

/// A flood of `kind` into a table of 4,096 entries: real clients keep their room.
fn leaves_real_clients_room_in_a_full_table(kind: FloodKind) {
    let mut flood = Flood::new(4096);
    flood.run(kind);
    let (ok, report) = flood.report();
    eprintln!("{report}");
    assert_eq!(flood.clients.len(), CLIENTS as usize);
    assert!(ok * 100 >= 99 * CLIENTS as usize, "{report}");
    assert!(
        flood.shared.conntrack.len() <= 4096,
        "never more than the capacity: {report}"
    );
    assert!(
        flood.counter("conntrack_early_drop") > FLOOD / 2,
        "{report}"
    );
}

#[test]
fn a_spoofed_syn_flood_at_a_nodeport_leaves_real_clients_their_masquerade_ports() {
    leaves_real_clients_their_masquerade_ports(FloodKind::Syn);
}

#[test]
fn a_spoofed_syn_flood_into_a_full_table_leaves_real_clients_room() {
    leaves_real_clients_room_in_a_full_table(FloodKind::Syn);
}

#[test]
fn a_spoofed_ack_flood_at_a_nodeport_leaves_real_clients_their_masquerade_ports() {
    leaves_real_clients_their_masquerade_ports(FloodKind::Ack);
}

#[test]
fn a_spoofed_ack_flood_into_a_full_table_leaves_real_clients_room() {
    leaves_real_clients_room_in_a_full_table(FloodKind::Ack);
}
