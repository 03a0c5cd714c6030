//! Per-packet cost of the whole pipeline in memory, with 1, 10k and 100k ClusterIP
//! Services installed (three local endpoints each) and 1k, 100k and 1M live connections
//! in the connection table, on one worker over a `MemDevice`. A benchmark's parameter is
//! `SERVICES x CONNECTIONS`.
//!
//! - `established`: a TCP ACK of a tracked connection from a client pod to a ClusterIP,
//!   DNATed and routed to the backend's port (conntrack hit, rewrite, route). Every live
//!   connection is one of these flows (spread over the Services, tracked as established
//!   by inserting them into the table directly), visited in a scattered order, so at 1M
//!   connections nearly every lookup goes to memory, as on a busy node.
//! - `new_flow`: a TCP SYN of a connection not seen before (frontend lookup, Maglev pick,
//!   conntrack insert, rewrite, route), with the live connections in the table.
//!
//! Frames go in bursts of [`BURST`] (the worker's own burst): inject a burst into the client
//! port, one `Worker::poll`, drain the backend port with `take_sent`. One criterion
//! iteration is one packet; the time reported per iteration is the measured time divided by
//! the packets, nothing subtracted.
//!
//! What is measured: by default only `poll` (receive from the in-memory queue, the pipeline,
//! transmit onto the in-memory queue, counter publication). The `*_with_io` variants (one
//! Service only) also time `inject` (a copy of each frame into the pool) and `take_sent` (a
//! copy out into a fresh `Vec` per frame, plus the `Vec` of them): their difference from
//! the plain variants is what the in-memory device adds that AF_XDP does not.
//!
//! Run: `cargo bench -p dataplane --bench pipeline`. Each Service's Maglev rings (cluster
//! and local set) are built at install; the install time per size is printed on stderr.
//! `KXDP_BENCH_SERVICES` and `KXDP_BENCH_CONNECTIONS` (comma-separated) run a subset of
//! the sizes, e.g. `KXDP_BENCH_SERVICES=1 KXDP_BENCH_CONNECTIONS=1000000`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::pipeline::SECOND;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use dataplane::worker::{Worker, BURST};
use etherparse::PacketBuilder;
use nat::spec::*;
use pktio::MemDevice;

const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW_CLIENT: [u8; 6] = [2, 0, 0, 0, 1, 1];
const GW_WEB: [u8; 6] = [2, 0, 0, 0, 1, 2];
const CLIENT_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 2];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The established flows come from this pod's addresses (`CLIENT_IPS` of them, from
/// 10.244.1.64), `FLOW_PORTS` source ports each: room for 1.9M tuples.
const CLIENT_IPS: u32 = 32;
const FLOW_PORTS: u32 = 60_000;
const FLOW_SPORT: u16 = 2048;
/// The three backend pods every Service has (all behind the `web` port).
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 5),
    Ipv4Addr::new(10, 244, 1, 6),
    Ipv4Addr::new(10, 244, 1, 7),
];
/// Port indices.
const CLIENT_PORT: usize = 1;
const WEB_PORT: usize = 2;

/// Services installed per run.
const SIZES: [u32; 3] = [1, 10_000, 100_000];
/// Live connections per run (grown in place for each number of Services).
const CONNECTIONS: [u32; 3] = [1_000, 100_000, 1_000_000];
/// The connection table's capacity: the largest fill, the pool of new flows, and room.
const CAPACITY: usize = 1_200_000;
/// Above this many Services the Maglev rings are at most 251 slots. With fixed 16381-slot
/// rings, `Shared::install` of 100k Services (then two rings each: 200k rings of 32 KiB)
/// took 80 s and peaked at 6.3 GiB resident on this 2-core machine (10k Services: 6.5 s).
/// The ring size only changes the Maglev slot read of `new_flow`.
/// `KXDP_BENCH_FULL_RINGS=1` allows 16381 at every size.
const SMALL_RING_ABOVE: u32 = 10_000;
/// New flows are drawn from a pool of this many distinct SYNs (from `CLIENT`, source
/// ports `NEW_SPORT..`); when the pool is used up, their connections are swept (outside
/// the measured time) and the pool starts again. The table thus holds at most this many
/// new flows besides the established ones.
const NEW_FLOWS: u16 = 32768;
const NEW_SPORT: u16 = 30000;
/// Simulated time between two bursts.
const TICK: u64 = 1_000;

fn ep(ip: Ipv4Addr) -> EndpointSpec {
    EndpointSpec {
        ip: IpAddr::V4(ip),
        port: 8080,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// ClusterIP of Service `i`: 172.30.0.1 onwards, into 172.31.0.0/16 past 65535.
fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 0, 1)) + i)
}

fn spec(services: u32) -> TableSpec {
    let eps: Vec<EndpointSpec> = BACKENDS.iter().map(|b| ep(*b)).collect();
    let first = u32::from(cluster_ip(0)) >> 16;
    let last = u32::from(cluster_ip(services - 1)) >> 16;
    let service_cidrs = (first..=last)
        .map(|net| {
            let [a, b, ..] = Ipv4Addr::from(net << 16).octets();
            format!("{a}.{b}.0.0/16").parse().expect("a /16")
        })
        .collect();
    let pod = |name: &str, ip: Ipv4Addr| PodSpec {
        name: name.into(),
        ips: vec![IpAddr::V4(ip)],
        labels: Default::default(),
    };
    let mut local_pods = vec![pod("default/client", CLIENT)];
    local_pods.push(PodSpec {
        name: "default/clients".into(),
        ips: (0..CLIENT_IPS)
            .map(|i| IpAddr::V4(flow_client(i)))
            .collect(),
        labels: Default::default(),
    });
    local_pods.extend(
        BACKENDS
            .iter()
            .enumerate()
            .map(|(i, b)| pod(&format!("default/web-{i}"), *b)),
    );
    TableSpec {
        node: NodeSpec {
            name: "node-a".into(),
            addresses: vec!["192.168.0.2".parse().expect("literal")],
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("literal")],
            ..NodeSpec::default()
        },
        cluster: ClusterSpec {
            service_cidrs,
            ..ClusterSpec::default()
        },
        services: (0..services)
            .map(|i| ServiceSpec {
                name: format!("bench/svc-{i}:http"),
                protocol: Protocol::Tcp,
                frontends: vec![FrontendSpec {
                    kind: FrontendKind::ClusterIp,
                    ip: IpAddr::V4(cluster_ip(i)),
                    port: 80,
                }],
                cluster_endpoints: eps.clone(),
                local_endpoints: eps.clone(),
                all_endpoints: eps.clone(),
                ..ServiceSpec::default()
            })
            .map(std::sync::Arc::new)
            .collect(),
        local_pods,
        remote_nodes: vec![],
        policy: Default::default(),
    }
}

/// A TCP segment between the client pod and a ClusterIP (or back from a backend), without
/// payload. `flags`: (syn, ack).
fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: (bool, bool),
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = match flags {
        (true, false) => b.syn(),
        (true, true) => b.syn().ack(1),
        _ => b.ack(1),
    };
    let mut out = Vec::with_capacity(64);
    b.write(&mut out, &[]).expect("writing to a Vec");
    out
}

/// Address `i` of the pod the established flows come from.
fn flow_client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 1, 64)) + i)
}

/// Established flow `k` of `services`: its client (address, port) and Service.
fn flow(k: u32, services: u32) -> ((Ipv4Addr, u16), u32) {
    let client = (
        flow_client(k / FLOW_PORTS),
        FLOW_SPORT + (k % FLOW_PORTS) as u16,
    );
    // Scattered over the Services, as real clients would be.
    (client, k.wrapping_mul(40503) % services)
}

fn from_client(sport: u16, service: u32, syn: bool) -> Vec<u8> {
    tcp(
        (CLIENT_MAC, GW_CLIENT),
        (CLIENT, sport),
        (cluster_ip(service), 80),
        (syn, !syn),
    )
}

fn backend_mac(ip: Ipv4Addr) -> [u8; 6] {
    [0x0a, 0x58, 10, 244, 1, ip.octets()[3]]
}

/// An ARP reply from `sender` (MAC, address) to `target`.
fn arp_reply(sender: ([u8; 6], Ipv4Addr), target: ([u8; 6], [u8; 4])) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&target.0);
    f.extend_from_slice(&sender.0);
    // Ethertype ARP; Ethernet, IPv4, address lengths 6 and 4; operation 2 (reply).
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&sender.0);
    f.extend_from_slice(&sender.1.octets());
    f.extend_from_slice(&target.0);
    f.extend_from_slice(&target.1);
    f
}

/// Whether a sent frame carries IPv4 (rather than being one of the dataplane's own ARP
/// requests).
fn is_ipv4(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[8, 0])
}

/// A node with `services` Services, its neighbours resolved, its established flows in the
/// connection table, and the new flows' frames built.
struct Node {
    worker: Worker<MemDevice>,
    shared: Arc<Shared>,
    services: u32,
    now: u64,
    /// Established flows in the table (flows `0..connections`).
    connections: u32,
    /// The next established flow's position in the scattered visit.
    established_at: u32,
    syns: Vec<Vec<u8>>,
    syns_at: usize,
}

impl Node {
    fn new(services: u32) -> Node {
        let full_rings = std::env::var_os("KXDP_BENCH_FULL_RINGS").is_some();
        let ring_size = if services > SMALL_RING_ABOVE && !full_rings {
            251
        } else {
            nat::maglev::DEFAULT_RING_SIZE
        };
        let port = |name: &str, role, mac| PortConfig {
            name: name.into(),
            role,
            mac,
            mtu: 1500,
        };
        let ports = vec![
            port("uplink", PortRole::Uplink, UPLINK_MAC),
            port("client", PortRole::Pod, GW_CLIENT),
            port("web", PortRole::Pod, GW_WEB),
        ];
        let shared = Arc::new(Shared::new(
            ports,
            1,
            Limits {
                ring_size,
                // Rings sized by backend count (kxdp-dataplane --scaled-rings), the mode
                // the README's figures were measured in.
                ring_scaled: true,
                conntrack_capacity: CAPACITY,
                ..Limits::default()
            },
        ));
        let started = Instant::now();
        let spec = spec(services);
        let built = started.elapsed();
        let started = Instant::now();
        shared.install(1, spec, SECOND);
        eprintln!(
            "{services} Services: spec built in {built:.2?}, Shared::install (ring {ring_size}) \
             took {:.2?}",
            started.elapsed()
        );
        let mut node = Node {
            worker: Worker::new(0, MemDevice::new(3, 4 * BURST), shared.clone()),
            shared,
            services,
            now: 2 * SECOND,
            connections: 0,
            established_at: 0,
            syns: Vec::new(),
            syns_at: 0,
        };
        node.resolve_neighbors();
        // A real handshake first: the connections inserted below are what it leaves.
        let ((client, sport), service) = flow(0, services);
        node.handshake(client, sport, service);
        node.connections = 1;
        let service_of = |k: u32, of: u32| (k as u64 * services as u64 / of as u64) as u32;
        // New flows go to Services in a scattered order (as real clients would), not walking
        // the service table in order where the prefetcher would hide its misses.
        node.syns = (0..NEW_FLOWS)
            .map(|k| {
                let scattered = (k as u32).wrapping_mul(40503) % NEW_FLOWS as u32;
                from_client(NEW_SPORT + k, service_of(scattered, NEW_FLOWS as u32), true)
            })
            .collect();
        node
    }

    /// The pods answer the dataplane's ARP requests, so it knows where they are.
    fn resolve_neighbors(&mut self) {
        let gateway = [10, 244, 1, 1];
        self.worker.dev.inject(
            CLIENT_PORT,
            &arp_reply((CLIENT_MAC, CLIENT), (GW_CLIENT, gateway)),
        );
        for b in BACKENDS {
            self.worker
                .dev
                .inject(WEB_PORT, &arp_reply((backend_mac(b), b), (GW_WEB, gateway)));
        }
        self.now += TICK;
        self.worker.poll(self.now);
        for port in 0..3 {
            // The dataplane's own ARP requests, sent before it learned the pods.
            self.worker.dev.take_sent(port);
        }
    }

    /// One poll with `frames` arriving from the client; returns what the web port sent.
    fn exchange(&mut self, port: usize, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for f in frames {
            assert!(self.worker.dev.inject(port, f), "device pool too small");
        }
        self.now += TICK;
        self.worker.poll(self.now);
        let out: Vec<Vec<u8>> = self
            .worker
            .dev
            .take_sent(if port == CLIENT_PORT {
                WEB_PORT
            } else {
                CLIENT_PORT
            })
            .into_iter()
            .filter(|f| is_ipv4(f))
            .collect();
        assert_eq!(
            out.len(),
            frames.len(),
            "dropped: {:?}",
            self.worker.counters()
        );
        out
    }

    /// SYN, SYN-ACK from whichever backend Maglev chose, ACK: the flow is established.
    fn handshake(&mut self, client: Ipv4Addr, sport: u16, service: u32) {
        let from_client = |syn| {
            tcp(
                (CLIENT_MAC, GW_CLIENT),
                (client, sport),
                (cluster_ip(service), 80),
                (syn, !syn),
            )
        };
        let out = self.exchange(CLIENT_PORT, &[from_client(true)]);
        let backend = Ipv4Addr::new(out[0][30], out[0][31], out[0][32], out[0][33]);
        let syn_ack = tcp(
            (backend_mac(backend), GW_WEB),
            (backend, 8080),
            (client, sport),
            (true, true),
        );
        self.exchange(WEB_PORT, &[syn_ack]);
        self.exchange(CLIENT_PORT, &[from_client(false)]);
    }

    /// Grows the table to `connections` established flows, inserted as the handshake of
    /// flow 0 left its connection (the same Service id, state and timeout), each to one
    /// of the three backends.
    fn fill(&mut self, connections: u32) {
        let ((client, sport), _) = flow(0, self.services);
        let key = nat::conntrack::FlowKey {
            proto: 6,
            src: client.into(),
            dst: cluster_ip(flow(0, self.services).1).into(),
            sport,
            dport: 80,
        };
        let first = self
            .shared
            .conntrack
            .get(&key, self.now)
            .expect("flow 0 is tracked");
        let timeout = first.expires - self.now;
        for k in self.connections..connections {
            let ((client, sport), service) = flow(k, self.services);
            let backend = BACKENDS[k as usize % BACKENDS.len()];
            let mut conn = first.conn;
            conn.original.src = client.into();
            conn.original.sport = sport;
            conn.original.dst = cluster_ip(service).into();
            conn.reply.src = backend.into();
            conn.reply.dst = client.into();
            conn.reply.dport = sport;
            self.shared
                .conntrack
                .insert_with_state(conn, first.state, self.now, timeout)
                .expect("room in the table");
        }
        self.connections = connections;
        self.established_at = 0;
    }

    /// The next established flow's ACK: the flows are visited in a scattered order (a
    /// step coprime with their number), every one once per round.
    fn next_established(&mut self) -> Vec<u8> {
        let n = self.connections;
        let mut step = 40503 % n.max(2);
        while gcd(step, n) != 1 {
            step += 1;
        }
        let k = ((self.established_at as u64 * step as u64) % n as u64) as u32;
        self.established_at = (self.established_at + 1) % n;
        let ((client, sport), service) = flow(k, self.services);
        tcp(
            (CLIENT_MAC, GW_CLIENT),
            (client, sport),
            (cluster_ip(service), 80),
            (false, true),
        )
    }

    /// Runs `packets` packets of the established flows (`new == false`) or new flows
    /// through the worker in bursts; returns the measured time (see the file comment).
    fn run(&mut self, packets: u64, new: bool, with_io: bool) -> Duration {
        let mut measured = Duration::ZERO;
        let mut left = packets;
        while left > 0 {
            let len = left.min(BURST as u64) as usize;
            left -= len as u64;
            let established: Vec<Vec<u8>>;
            let burst = if new {
                if self.syns_at + len > self.syns.len() {
                    // Retire the pool's connections so its SYNs are new again.
                    self.shared
                        .conntrack
                        .sweep(self.now, |c| c.original.src == IpAddr::V4(CLIENT));
                    self.syns_at = 0;
                }
                self.syns_at += len;
                &self.syns[self.syns_at - len..self.syns_at]
            } else {
                established = (0..len).map(|_| self.next_established()).collect();
                &established[..]
            };
            self.now += TICK;
            let started = Instant::now();
            for f in burst {
                self.worker.dev.inject(CLIENT_PORT, f);
            }
            let polled = Instant::now();
            black_box(self.worker.poll(self.now));
            let done = Instant::now();
            let sent = self.worker.dev.take_sent(WEB_PORT);
            let drained = Instant::now();
            measured += if with_io {
                drained - started
            } else {
                done - polled
            };
            // Not a timing check: a burst that was dropped would measure the wrong path.
            assert_eq!(
                sent.iter().filter(|f| is_ipv4(f)).count(),
                len,
                "dropped: {:?}",
                self.worker.counters()
            );
        }
        measured
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The sizes in `var` (comma-separated) among `all`, or all of them.
fn sizes(var: &str, all: &[u32]) -> Vec<u32> {
    match std::env::var(var) {
        Ok(v) => all
            .iter()
            .copied()
            .filter(|n| v.split(',').any(|s| s.trim().parse() == Ok(*n)))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

fn bench(c: &mut Criterion) {
    for services in sizes("KXDP_BENCH_SERVICES", &SIZES) {
        let mut node = Node::new(services);
        for connections in sizes("KXDP_BENCH_CONNECTIONS", &CONNECTIONS) {
            let started = Instant::now();
            node.fill(connections);
            eprintln!(
                "{services} Services: {connections} connections in {:.2?}",
                started.elapsed()
            );
            let mut g = c.benchmark_group("pipeline");
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2))
                .throughput(Throughput::Elements(1));
            let mut cases = vec![("established", false, false), ("new_flow", true, false)];
            if services == 1 && connections == CONNECTIONS[0] {
                cases.push(("established_with_io", false, true));
                cases.push(("new_flow_with_io", true, true));
            }
            for (name, new, with_io) in cases {
                let id = BenchmarkId::new(name, format!("{services}x{connections}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|packets| node.run(packets, new, with_io))
                });
            }
            g.finish();
            let c = node.worker.counters();
            eprintln!(
                "{services} Services: {} new flows, {} tracked packets, conntrack holds {}",
                c.nat_new,
                c.nat_hits,
                node.shared.conntrack.len()
            );
        }
    }
}

criterion_group! {
    name = benches;
    // Fewer bootstrap resamples and no plots: the analysis otherwise takes longer than
    // the measurements on this 2-core machine.
    config = Criterion::default().nresamples(10_000).without_plots();
    targets = bench
}
criterion_main!(benches);
