//! A burst handled stage by stage (every frame parsed, the connection table asked for all
//! of them at once, then each handled) must do exactly what handling its frames one at a
//! time does, even when frames of one connection follow each other in a burst: a SYN and
//! its retransmission, a FIN and the ACK after it, a RST and a new SYN on the same tuple.
//!
//! Two identical nodes in memory get the same random sequences of TCP and UDP segments
//! (a pod and an outside client to a Service with one endpoint, ClusterIP and NodePort,
//! and the endpoint's replies, on four source ports each so tuples repeat): one node a
//! whole burst per poll, the other one frame per poll. Every frame either sends, and the
//! connections they track with their protocol states, must be the same.

use std::net::Ipv4Addr;
use std::sync::Arc;

use dataplane::pipeline::SECOND;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use dataplane::worker::Worker;
use etherparse::PacketBuilder;
use nat::spec::*;
use pktio::MemDevice;

const UPLINK: usize = 0;
const CLIENT: usize = 1;
const WEB: usize = 2;
const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0xff, 1];
const GW_CLIENT: [u8; 6] = [2, 0, 0, 0, 1, 1];
const GW_WEB: [u8; 6] = [2, 0, 0, 0, 1, 2];
const CLIENT_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 2];
const WEB_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const NODE_PORT: u16 = 30080;
/// Source ports of the clients: in the masquerade range, so an outside client's port is
/// kept and the endpoint's replies can be written in advance.
const SPORTS: [u16; 4] = [40000, 40001, 40002, 40003];

fn spec() -> TableSpec {
    let ep = EndpointSpec {
        ip: BACKEND.into(),
        port: 8080,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    };
    let pod = |name: &str, ip: Ipv4Addr| PodSpec {
        name: name.into(),
        ips: vec![ip.into()],
        labels: Default::default(),
    };
    let service = |protocol| {
        Arc::new(ServiceSpec {
            name: format!("default/web:{protocol:?}"),
            protocol,
            frontends: vec![
                FrontendSpec {
                    kind: FrontendKind::ClusterIp,
                    ip: CLUSTER_IP.into(),
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
            all_endpoints: vec![ep.clone()],
            ..ServiceSpec::default()
        })
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
        services: vec![service(Protocol::Tcp), service(Protocol::Udp)],
        local_pods: vec![pod("default/client", POD), pod("default/web", BACKEND)],
        remote_nodes: vec![],
        policy: Default::default(),
    }
}

fn node() -> (Worker<MemDevice>, Arc<Shared>) {
    let port = |name: &str, role, mac| PortConfig {
        name: name.into(),
        role,
        mac,
        mtu: 1500,
    };
    let shared = Arc::new(Shared::new(
        vec![
            port("uplink", PortRole::Uplink, UPLINK_MAC),
            port("client", PortRole::Pod, GW_CLIENT),
            port("web", PortRole::Pod, GW_WEB),
        ],
        1,
        Limits {
            // Small, so that comparing whole tables after every burst stays quick.
            conntrack_capacity: 4096,
            ..Limits::default()
        },
    ));
    shared.install(1, spec(), SECOND);
    let mut worker = Worker::new(0, MemDevice::new(3, 256), shared.clone());
    // The pods answer the dataplane's ARP requests.
    for (port, mac, ip, gw) in [
        (CLIENT, CLIENT_MAC, POD, GW_CLIENT),
        (WEB, WEB_MAC, BACKEND, GW_WEB),
    ] {
        let mut f = Vec::new();
        f.extend_from_slice(&gw);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ip.octets());
        f.extend_from_slice(&gw);
        f.extend_from_slice(&GATEWAY.octets());
        worker.dev.inject(port, &f);
    }
    worker.poll(SECOND);
    for port in 0..3 {
        worker.dev.take_sent(port);
    }
    (worker, shared)
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random segment: (port it arrives on, frame).
fn segment(rng: &mut Rng) -> (usize, Vec<u8>) {
    let sport = SPORTS[rng.below(SPORTS.len() as u64) as usize];
    // Who sends: the pod to the ClusterIP, an outside client to the NodePort, or the
    // endpoint's reply to either.
    let (port, macs, src, dst) = match rng.below(4) {
        0 => (
            CLIENT,
            (CLIENT_MAC, GW_CLIENT),
            (POD, sport),
            (CLUSTER_IP, 80),
        ),
        1 => (
            UPLINK,
            (ROUTER_MAC, UPLINK_MAC),
            (OUTSIDE, sport),
            (NODE, NODE_PORT),
        ),
        2 => (WEB, (WEB_MAC, GW_WEB), (BACKEND, 8080), (POD, sport)),
        _ => (WEB, (WEB_MAC, GW_WEB), (BACKEND, 8080), (GATEWAY, sport)),
    };
    let ip = PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src.0.octets(), dst.0.octets(), 64);
    let mut out = Vec::new();
    if rng.below(5) == 0 {
        ip.udp(src.1, dst.1)
            .write(&mut out, b"datagram")
            .expect("to a Vec");
        return (port, out);
    }
    let seq = rng.next() as u32;
    let b = ip.tcp(src.1, dst.1, seq, 64240);
    let (b, payload): (_, &[u8]) = match rng.below(6) {
        0 => (b.syn(), b""),
        1 => (b.syn().ack(1), b""),
        2 => (b.ack(1), b""),
        3 => (b.fin().ack(1), b""),
        4 => (b.rst(), b""),
        _ => (b.ack(1), b"data"),
    };
    b.write(&mut out, payload).expect("to a Vec");
    (port, out)
}

/// The IPv4 frames a node sent, per port.
fn sent(worker: &mut Worker<MemDevice>) -> Vec<Vec<Vec<u8>>> {
    (0..3)
        .map(|p| {
            worker
                .dev
                .take_sent(p)
                .into_iter()
                .filter(|f| f.get(12..14) == Some(&[8, 0]))
                .collect()
        })
        .collect()
}

/// Tracked connections with their protocol states, in a stable order.
fn tracked(shared: &Shared, now: u64) -> Vec<String> {
    let mut all: Vec<String> = shared
        .conntrack
        .entries(now)
        .into_iter()
        .map(|(c, state, expires)| format!("{c:?} state {state} expires {expires}"))
        .collect();
    all.sort();
    all
}

#[test]
fn a_burst_does_what_its_frames_do_one_by_one() {
    let mut bursts = 0;
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (mut whole, whole_ct) = node();
        let (mut single, single_ct) = node();
        let mut now = 2 * SECOND;
        for _ in 0..40 {
            // Up to 70 frames: more than one lookup group of 32.
            let len = 1 + rng.below(70) as usize;
            let mut frames: Vec<(usize, Vec<u8>)> = (0..len).map(|_| segment(&mut rng)).collect();
            // A worker takes each port's burst in turn: the one-by-one node gets them in
            // that order.
            frames.sort_by_key(|(port, _)| *port);
            now += if rng.below(8) == 0 {
                200 * SECOND
            } else {
                SECOND / 1000
            };
            for (port, f) in &frames {
                assert!(whole.dev.inject(*port, f));
            }
            whole.poll(now);
            let mut one_by_one = vec![Vec::new(); 3];
            for (port, f) in &frames {
                assert!(single.dev.inject(*port, f));
                single.poll(now);
                for (p, out) in sent(&mut single).into_iter().enumerate() {
                    one_by_one[p].extend(out);
                }
            }
            assert_eq!(
                sent(&mut whole),
                one_by_one,
                "seed {seed}: the frames sent differ"
            );
            assert_eq!(
                tracked(&whole_ct, now),
                tracked(&single_ct, now),
                "seed {seed}: the connections tracked differ"
            );
            bursts += 1;
        }
        let (w, s) = (whole.counters(), single.counters());
        assert_eq!(
            (w.nat_new, w.nat_hits, w.rx),
            (s.nat_new, s.nat_hits, s.rx),
            "seed {seed}"
        );
        assert!(w.nat_hits > 0 && w.nat_new > 0, "seed {seed}: {w:?}");
    }
    assert_eq!(bursts, 60 * 40);
}
