//! Golden packets: {tables, input frame} → expected verdict and exact output frame.
//!
//! Expected frames are built independently with etherparse, so a rewrite that gets a byte
//! or a checksum wrong fails here.

use std::sync::Arc;

use dataplane::counters::DropReason;
use dataplane::pipeline::SECOND;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use dataplane::worker::Worker;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use nat::spec::*;
use pktio::MemDevice;

const UPLINK: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW1: [u8; 6] = [2, 0, 0, 0, 1, 1];
const GW2: [u8; 6] = [2, 0, 0, 0, 1, 2];
const POD1: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 2];
const POD2: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];

fn ep(ip: &str, port: u16) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        port,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service(
    name: &str,
    ip: &str,
    port: u16,
    protocol: Protocol,
    eps: Vec<EndpointSpec>,
) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        protocol,
        frontends: vec![FrontendSpec {
            kind: FrontendKind::ClusterIp,
            ip: ip.parse().unwrap(),
            port,
        }],
        all_endpoints: eps.clone(),
        local_endpoints: eps.clone(),
        cluster_endpoints: eps,
        ..ServiceSpec::default()
    }
}

/// Node 192.168.0.2 with pods client (10.244.1.2, port 1) and web (10.244.1.5, port 2).
fn node() -> Worker<MemDevice> {
    worker(shared(), spec())
}

/// The ports and limits of [`node`].
fn shared() -> Arc<Shared> {
    let ports = vec![
        PortConfig {
            name: "uplink".into(),
            role: PortRole::Uplink,
            mac: UPLINK,
            mtu: 1500,
        },
        PortConfig {
            name: "client".into(),
            role: PortRole::Pod,
            mac: GW1,
            mtu: 1500,
        },
        PortConfig {
            name: "web".into(),
            role: PortRole::Pod,
            mac: GW2,
            mtu: 1500,
        },
    ];
    Arc::new(Shared::new(
        ports,
        1,
        Limits {
            ring_size: 251,
            conntrack_capacity: 1024,
            affinity_capacity: 64,
            ring_scaled: false,
            ..Limits::default()
        },
    ))
}

/// Installs `spec` and returns the worker.
fn worker(shared: Arc<Shared>, spec: TableSpec) -> Worker<MemDevice> {
    shared.install(1, spec, SECOND);
    Worker::new(0, MemDevice::new(3, 64), shared)
}

/// The tables of [`node`].
fn spec() -> TableSpec {
    TableSpec {
        node: NodeSpec {
            name: "node-a".into(),
            addresses: vec!["192.168.0.2".parse().unwrap()],
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            zone: None,
            ..Default::default()
        },
        cluster: ClusterSpec::default(),
        services: [
            service(
                "default/web:http",
                "172.30.0.41",
                80,
                Protocol::Tcp,
                vec![ep("10.244.1.5", 8080)],
            ),
            service(
                "default/empty:dns",
                "172.30.0.53",
                53,
                Protocol::Udp,
                vec![],
            ),
            service(
                "default/web6:http",
                "fd00:172:30::41",
                80,
                Protocol::Tcp,
                vec![ep("fd00:10:244:1::5", 8080)],
            ),
            {
                let mut np = service(
                    "default/np:http",
                    "172.30.0.50",
                    80,
                    Protocol::Tcp,
                    vec![ep("10.244.1.5", 8080)],
                );
                np.frontends.push(FrontendSpec {
                    kind: FrontendKind::NodePort,
                    ip: "192.168.0.2".parse().unwrap(),
                    port: 30080,
                });
                np
            },
            {
                let mut lb = service(
                    "default/lbl:http",
                    "172.30.0.52",
                    80,
                    Protocol::Tcp,
                    vec![ep("10.244.1.5", 8080)],
                );
                lb.frontends.push(FrontendSpec {
                    kind: FrontendKind::LoadBalancer,
                    ip: "1.2.3.4".parse().unwrap(),
                    port: 80,
                });
                lb.external_local = true;
                lb
            },
            service(
                "default/sctp:s",
                "172.30.0.43",
                9999,
                Protocol::Sctp,
                vec![ep("10.244.1.5", 8080)],
            ),
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect(),
        local_pods: vec![
            PodSpec {
                name: "default/client".into(),
                ips: vec![
                    "10.244.1.2".parse().unwrap(),
                    "fd00:10:244:1::2".parse().unwrap(),
                ],
                labels: Default::default(),
            },
            PodSpec {
                name: "default/web".into(),
                ips: vec![
                    "10.244.1.5".parse().unwrap(),
                    "fd00:10:244:1::5".parse().unwrap(),
                ],
                labels: Default::default(),
            },
        ],
        remote_nodes: vec![],
        policy: Default::default(),
    }
}

fn arp(
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    eth_dst: [u8; 6],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

fn tcp(
    mac: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ttl: u8,
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac.1, mac.0)
        .ipv4(src, dst, ttl)
        .tcp(sport, dport, 7, 1000);
    let b = if syn { b.syn() } else { b.ack(9) };
    let mut out = Vec::new();
    b.write(&mut out, b"payload").unwrap();
    out
}

/// Runs one pass and returns what each port sent, leaving out the dataplane's own ARP
/// requests (it solicits unresolved pods in the background).
fn step(w: &mut Worker<MemDevice>, now: u64) -> Vec<Vec<Vec<u8>>> {
    w.poll(now);
    let is_solicitation = |f: &Vec<u8>| {
        let arp = f.len() >= 22 && f[12..14] == [8, 6] && f[20..22] == [0, 1];
        let ns = f.len() > 54 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 135;
        arp || ns
    };
    (0..3)
        .map(|p| {
            w.dev
                .take_sent(p)
                .into_iter()
                .filter(|f| !is_solicitation(f))
                .collect()
        })
        .collect()
}

/// Lets the dataplane learn where web lives (web answers the dataplane's ARP request).
fn resolve_web(w: &mut Worker<MemDevice>) {
    w.dev
        .inject(2, &arp(2, POD2, [10, 244, 1, 5], GW2, [10, 244, 1, 1], GW2));
    w.dev
        .inject(1, &arp(2, POD1, [10, 244, 1, 2], GW1, [10, 244, 1, 1], GW1));
    step(w, 2 * SECOND);
}

#[test]
fn arp_for_the_gateway_is_answered_with_the_port_mac() {
    let mut w = node();
    w.dev.inject(
        1,
        &arp(1, POD1, [10, 244, 1, 2], [0; 6], [10, 244, 1, 1], [0xff; 6]),
    );
    let out = step(&mut w, 2 * SECOND);
    let want = arp(2, GW1, [10, 244, 1, 1], POD1, [10, 244, 1, 2], POD1);
    assert!(out[1].contains(&want), "port 1 sent {:02x?}", out[1]);
    assert_eq!(w.counters().arp_replies, 1);
}

#[test]
fn uplink_arp_only_for_node_and_service_addresses() {
    let mut w = node();
    let router = [2, 0, 0, 0, 0xff, 1];
    w.dev.inject(
        0,
        &arp(
            1,
            router,
            [192, 168, 0, 1],
            [0; 6],
            [192, 168, 0, 2],
            [0xff; 6],
        ),
    );
    w.dev.inject(
        0,
        &arp(
            1,
            router,
            [192, 168, 0, 1],
            [0; 6],
            [192, 168, 0, 77],
            [0xff; 6],
        ),
    );
    let out = step(&mut w, 2 * SECOND);
    assert_eq!(
        out[0],
        vec![arp(
            2,
            UPLINK,
            [192, 168, 0, 2],
            router,
            [192, 168, 0, 1],
            router
        )]
    );
    assert_eq!(w.counters().drops[DropReason::NeighborConsumed as usize], 1);
}

#[test]
fn clusterip_dnat_and_reply_undnat_are_byte_exact() {
    let mut w = node();
    resolve_web(&mut w);
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40000,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let want = tcp(
        (POD2, GW2),
        [10, 244, 1, 2],
        40000,
        [10, 244, 1, 5],
        8080,
        63,
        true,
    );
    assert_eq!(out[2], vec![want]);
    // The reply from web is un-DNATed back to the ClusterIP.
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            8080,
            [10, 244, 1, 2],
            40000,
            64,
            false,
        ),
    );
    let out = step(&mut w, 4 * SECOND);
    let want = tcp(
        (POD1, GW1),
        [172, 30, 0, 41],
        80,
        [10, 244, 1, 2],
        40000,
        63,
        false,
    );
    assert_eq!(out[1], vec![want]);
    assert_eq!((w.counters().nat_new, w.counters().nat_hits), (1, 1));
}

#[test]
fn hairpin_is_masqueraded_to_the_gateway() {
    let mut w = node();
    resolve_web(&mut w);
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            40001,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let (src, dst, sport, dport) = delivered_to_web(&out);
    assert_eq!((src, dst, dport), ([10, 244, 1, 1], [10, 244, 1, 5], 8080));
    // The reply to the masquerade address goes back to web as from the ClusterIP.
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            8080,
            [10, 244, 1, 1],
            sport,
            64,
            false,
        ),
    );
    let out = step(&mut w, 4 * SECOND);
    let want = tcp(
        (POD2, GW2),
        [172, 30, 0, 41],
        80,
        [10, 244, 1, 5],
        40001,
        63,
        false,
    );
    assert_eq!(out[2], vec![want]);
}

#[test]
fn service_without_endpoints_is_rejected_with_icmp_port_unreachable() {
    let mut w = node();
    let b = PacketBuilder::ethernet2(POD1, GW1)
        .ipv4([10, 244, 1, 2], [172, 30, 0, 53], 64)
        .udp(5353, 53);
    let mut f = Vec::new();
    b.write(&mut f, b"query").unwrap();
    w.dev.inject(1, &f);
    let out = step(&mut w, 2 * SECOND);
    assert_eq!(out[1].len(), 1);
    let p = SlicedPacket::from_ethernet(&out[1][0]).unwrap();
    assert_eq!(&out[1][0][0..6], &POD1);
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), [172, 30, 0, 53]);
    assert_eq!(ip.header().destination(), [10, 244, 1, 2]);
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not icmp")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port
        )
    );
    // The quoted packet is the original's IP header and first 8 bytes.
    assert_eq!(icmp.payload(), &f[14..14 + 28]);
    assert_eq!(
        icmp.header().checksum,
        icmp.header().icmp_type.calc_checksum(icmp.payload())
    );
    assert_eq!(w.counters().rejects, 1);
}

#[test]
fn unknown_service_address_and_malformed_frames_are_dropped_and_counted() {
    let mut w = node();
    resolve_web(&mut w);
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            1,
            [172, 30, 9, 9],
            80,
            64,
            true,
        ),
    );
    let good = tcp(
        (GW1, POD1),
        [10, 244, 1, 2],
        2,
        [10, 244, 1, 5],
        80,
        64,
        true,
    );
    w.dev.inject(1, &good[..30]);
    let mut bad = good.clone();
    bad[24] ^= 0xff; // IPv4 header checksum
    w.dev.inject(1, &bad);
    w.dev.inject(1, &[0u8; 10]);
    let out = step(&mut w, 3 * SECOND);
    assert!(out.iter().all(|p| p.is_empty()));
    let c = w.counters();
    assert_eq!(c.drops[DropReason::NoService as usize], 1);
    assert_eq!(c.drops[DropReason::Truncated as usize], 2);
    assert_eq!(c.drops[DropReason::BadIpChecksum as usize], 1);
    assert_eq!(
        w.dev.free_frames(),
        64,
        "every dropped frame went back to the pool"
    );
}

#[test]
fn ipv6_clusterip_dnat_is_byte_exact() {
    let mut w = node();
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    // web speaks first (v6 neighbours are learned from traffic until ND lands in issue 3).
    let mut hello = Vec::new();
    PacketBuilder::ethernet2(POD2, GW2)
        .ipv6(v6("fd00:10:244:1::5"), v6("fd00:10:244:1::2"), 64)
        .udp(1, 2)
        .write(&mut hello, b"hi")
        .unwrap();
    w.dev.inject(2, &hello);
    step(&mut w, 2 * SECOND);
    let build = |mac: ([u8; 6], [u8; 6]), src: &str, sport, dst: &str, dport, hop| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(mac.1, mac.0)
            .ipv6(v6(src), v6(dst), hop)
            .tcp(sport, dport, 7, 1000)
            .syn()
            .write(&mut out, b"")
            .unwrap();
        out
    };
    w.dev.inject(
        1,
        &build(
            (GW1, POD1),
            "fd00:10:244:1::2",
            40000,
            "fd00:172:30::41",
            80,
            64,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(
        out[2],
        vec![build(
            (POD2, GW2),
            "fd00:10:244:1::2",
            40000,
            "fd00:10:244:1::5",
            8080,
            63
        )]
    );
}

#[test]
fn ipv6_neighbour_solicitation_for_the_gateway_is_answered() {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr,
        NdiscNeighborFlags, NdiscRepr,
    };
    let mut w = node();
    let pod: std::net::Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
    let gw: std::net::Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    let group: std::net::Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: gw,
        lladdr: Some(EthernetAddress(POD1).into()),
    });
    let ip = Ipv6Repr {
        src_addr: pod,
        dst_addr: group,
        next_header: IpProtocol::Icmpv6,
        payload_len: ns.buffer_len(),
        hop_limit: 255,
    };
    let mut f = vec![0u8; 14 + ip.buffer_len() + ns.buffer_len()];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0xff, 0, 0, 1]);
    f[6..12].copy_from_slice(&POD1);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
    ns.emit(
        &pod,
        &group,
        &mut Icmpv6Packet::new_unchecked(&mut f[14 + 40..]),
        &ChecksumCapabilities::default(),
    );
    w.dev.inject(1, &f);
    let out = step(&mut w, 2 * SECOND);
    let na = out[1]
        .iter()
        .find(|f| f.len() > 54 && f[12..14] == [0x86, 0xdd])
        .expect("an answer on port 1");
    assert_eq!(&na[0..12], &[POD1, GW1].concat()[..]);
    let ipp = Ipv6Packet::new_checked(&na[14..]).unwrap();
    let ipr = Ipv6Repr::parse(&ipp).unwrap();
    assert_eq!((ipr.src_addr, ipr.dst_addr, ipr.hop_limit), (gw, pod, 255));
    let icmp = Icmpv6Packet::new_checked(ipp.payload()).unwrap();
    // Parsing verifies the ICMPv6 checksum.
    let repr = Icmpv6Repr::parse(&gw, &pod, &icmp, &ChecksumCapabilities::default()).unwrap();
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags,
        target_addr,
        lladdr,
    }) = repr
    else {
        panic!("{repr:?}")
    };
    assert_eq!(target_addr, gw);
    assert!(flags.contains(NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::ROUTER));
    assert_eq!(lladdr.unwrap().as_bytes(), &GW1);
    // And the pod was learned from its solicitation: traffic to it needs no resolution.
    assert!(w.counters().arp_replies >= 1);
}

#[test]
fn icmp_frag_needed_from_the_backend_side_is_un_natted_inner_and_outer() {
    use etherparse::icmpv4::DestUnreachableHeader;
    use etherparse::{Icmpv4Type, Ipv4HeaderSlice};
    let mut w = node();
    resolve_web(&mut w);
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40000,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let forwarded = out[2][0].clone();
    // web answers "fragmentation needed", quoting the packet it got (after DNAT).
    let mut err = Vec::new();
    PacketBuilder::ethernet2(POD2, GW2)
        .ipv4([10, 244, 1, 5], [10, 244, 1, 2], 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut err, &forwarded[14..14 + 28])
        .unwrap();
    w.dev.inject(2, &err);
    let out = step(&mut w, 4 * SECOND);
    assert_eq!(out[1].len(), 1, "the error reaches the client");
    let p = SlicedPacket::from_ethernet(&out[1][0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    // The client sees the error come from the ClusterIP it talked to.
    assert_eq!(ip.header().source(), [172, 30, 0, 41]);
    assert_eq!(ip.header().destination(), [10, 244, 1, 2]);
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    assert_eq!(
        icmp.header().checksum,
        icmp.header().icmp_type.calc_checksum(icmp.payload())
    );
    // The quoted packet is the client's own: to the ClusterIP, port 80, valid header.
    let q = Ipv4HeaderSlice::from_slice(icmp.payload()).unwrap();
    assert_eq!(
        (q.source(), q.destination()),
        ([10, 244, 1, 2], [172, 30, 0, 41])
    );
    let qh = q.to_header();
    assert_eq!(qh.header_checksum, qh.calc_header_checksum());
    let ports = &icmp.payload()[20..24];
    assert_eq!(ports, &[0x9c, 0x40, 0, 80]);
}

#[test]
fn first_packet_to_an_unresolved_pod_is_held_until_it_answers() {
    let mut w = node();
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40000,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 2 * SECOND);
    assert!(
        out[2].is_empty(),
        "nothing can go to web before it is resolved"
    );
    // The dataplane asked who has 10.244.1.5; web answers, and the held SYN follows.
    w.dev
        .inject(2, &arp(2, POD2, [10, 244, 1, 5], GW2, [10, 244, 1, 1], GW2));
    let out = step(&mut w, 2 * SECOND + 1000);
    let want = tcp(
        (POD2, GW2),
        [10, 244, 1, 2],
        40000,
        [10, 244, 1, 5],
        8080,
        63,
        true,
    );
    assert_eq!(out[2], vec![want]);
    assert_eq!(
        w.counters().drops[DropReason::NeighborUnresolved as usize],
        0
    );
}

#[test]
fn a_held_packet_is_dropped_and_counted_when_nobody_answers() {
    let mut w = node();
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40000,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    step(&mut w, 2 * SECOND);
    let out = step(&mut w, 4 * SECOND);
    assert!(out.iter().all(|p| p.is_empty()));
    assert_eq!(
        w.counters().drops[DropReason::NeighborUnresolved as usize],
        1
    );
    assert_eq!(
        w.dev.free_frames(),
        64,
        "the held frame went back to the pool"
    );
}

#[test]
fn nodeport_from_outside_is_dnatted_and_masqueraded_and_the_reply_goes_back_to_the_router() {
    let mut w = node();
    resolve_web(&mut w);
    let router = [2, 0, 0, 0, 0xff, 1];
    w.dev.inject(
        0,
        &tcp(
            (UPLINK, router),
            [203, 0, 113, 2],
            50000,
            [192, 168, 0, 2],
            30080,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    // eTP Cluster: source masqueraded to the node's pod-network address.
    let (src, dst, snat_port, dport) = delivered_to_web(&out);
    assert_eq!((src, dst, dport), ([10, 244, 1, 1], [10, 244, 1, 5], 8080));
    // web's reply goes back out of the uplink to the router, from the NodePort.
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            8080,
            [10, 244, 1, 1],
            snat_port,
            64,
            false,
        ),
    );
    let out = step(&mut w, 4 * SECOND);
    let want = tcp(
        (router, UPLINK),
        [192, 168, 0, 2],
        30080,
        [203, 0, 113, 2],
        50000,
        63,
        false,
    );
    assert_eq!(out[0], vec![want]);
}

#[test]
fn sctp_clusterip_dnat_keeps_the_crc32c_valid() {
    let mut w = node();
    resolve_web(&mut w);
    let mut sctp = vec![0x9c, 0x40, 0x27, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 20];
    sctp.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    nat::packet::sctp_fix_crc(&mut sctp);
    let mut f = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv4([10, 244, 1, 2], [172, 30, 0, 43], 64)
        .write(&mut f, etherparse::IpNumber(132), &sctp)
        .unwrap();
    w.dev.inject(1, &f);
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[2].len(), 1);
    let got = &out[2][0];
    // Destination 10.244.1.5:8080, and the CRC32c verifies over the rewritten packet.
    assert_eq!(&got[30..34], &[10, 244, 1, 5]);
    let l4 = &got[34..];
    assert_eq!(&l4[2..4], &8080u16.to_be_bytes());
    let mut check = l4.to_vec();
    let want = u32::from_le_bytes([check[8], check[9], check[10], check[11]]);
    check[8..12].copy_from_slice(&[0; 4]);
    assert_eq!(nat::packet::crc32c(&check), want);
}

/// The frame web receives for a connection (checksums verified): its source, destination,
/// source port and destination port.
fn delivered_to_web(out: &[Vec<Vec<u8>>]) -> ([u8; 4], [u8; 4], u16, u16) {
    assert_eq!(out[2].len(), 1, "one frame to web: {out:02x?}");
    let p = SlicedPacket::from_ethernet(&out[2][0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    assert_eq!(
        t.checksum(),
        t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
    );
    (
        ip.header().source(),
        ip.header().destination(),
        t.source_port(),
        t.destination_port(),
    )
}

#[test]
fn load_balancer_ip_with_local_policy_keeps_the_client_source() {
    let mut w = node();
    resolve_web(&mut w);
    let router = [2, 0, 0, 0, 0xff, 1];
    w.dev.inject(
        0,
        &tcp(
            (UPLINK, router),
            [203, 0, 113, 2],
            50001,
            [1, 2, 3, 4],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let (src, dst, _, dport) = delivered_to_web(&out);
    assert_eq!((src, dst, dport), ([203, 0, 113, 2], [10, 244, 1, 5], 8080));
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            8080,
            [203, 0, 113, 2],
            50001,
            64,
            false,
        ),
    );
    let out = step(&mut w, 4 * SECOND);
    let want = tcp(
        (router, UPLINK),
        [1, 2, 3, 4],
        80,
        [203, 0, 113, 2],
        50001,
        63,
        false,
    );
    assert_eq!(out[0], vec![want]);
}

#[test]
fn clusterip_from_outside_the_cluster_is_masqueraded() {
    let mut w = node();
    resolve_web(&mut w);
    let router = [2, 0, 0, 0, 0xff, 1];
    w.dev.inject(
        0,
        &tcp(
            (UPLINK, router),
            [203, 0, 113, 2],
            50002,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let (src, dst, _, dport) = delivered_to_web(&out);
    assert_eq!((src, dst, dport), ([10, 244, 1, 1], [10, 244, 1, 5], 8080));
}

#[test]
fn icmp_time_exceeded_about_a_translated_packet_is_un_natted() {
    use etherparse::{Icmpv4Type, Ipv4HeaderSlice};
    let mut w = node();
    resolve_web(&mut w);
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40003,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let forwarded = out[2][0].clone();
    let mut err = Vec::new();
    PacketBuilder::ethernet2(POD2, GW2)
        .ipv4([10, 244, 1, 5], [10, 244, 1, 2], 64)
        .icmpv4(Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut err, &forwarded[14..14 + 28])
        .unwrap();
    w.dev.inject(2, &err);
    let out = step(&mut w, 4 * SECOND);
    assert_eq!(out[1].len(), 1);
    let p = SlicedPacket::from_ethernet(&out[1][0]).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    assert_eq!(
        icmp.header().checksum,
        icmp.header().icmp_type.calc_checksum(icmp.payload())
    );
    let q = Ipv4HeaderSlice::from_slice(icmp.payload()).unwrap();
    assert_eq!(
        (q.source(), q.destination()),
        ([10, 244, 1, 2], [172, 30, 0, 41])
    );
}

/// A neighbour on the uplink (`mac` at `ip`) answers the node's ARP.
fn answer_on_uplink(w: &mut Worker<MemDevice>, mac: [u8; 6], ip: [u8; 4]) {
    w.dev
        .inject(0, &arp(2, mac, ip, UPLINK, [192, 168, 0, 2], UPLINK));
    step(w, 2 * SECOND);
}

/// The MAC of node-b's uplink, node-a's next hop to node-b's VTEP.
const NODE_B: [u8; 6] = [2, 0, 0, 0, 0, 3];

/// [`node`] with node-b (10.244.2.0/24, fd00:10:244:2::/64) behind the overlay at
/// 192.168.0.3, every neighbour resolved. The uplink's MTU is 1500, so the overlay's is 1450.
fn overlay_node() -> Worker<MemDevice> {
    let mut spec = spec();
    spec.node.vtep_ip = Some("192.168.0.2".parse().unwrap());
    spec.remote_nodes = vec![RemoteNodeSpec {
        name: "node-b".into(),
        pod_cidrs: vec![
            "10.244.2.0/24".parse().unwrap(),
            "fd00:10:244:2::/64".parse().unwrap(),
        ],
        vtep_ip: "192.168.0.3".parse().unwrap(),
        vtep_mac: [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33],
    }];
    let mut w = worker(shared(), spec);
    resolve_web(&mut w);
    answer_on_uplink(&mut w, NODE_B, [192, 168, 0, 3]);
    w
}

/// A TCP segment from the client pod with DF set and `ip_len` bytes of IPv4 packet.
fn big_v4(dst: [u8; 4], ip_len: usize) -> Vec<u8> {
    use etherparse::{IpHeaders, IpNumber, Ipv4Header};
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, [10, 244, 1, 2], dst).unwrap();
    h.dont_fragment = true;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(40000, 8080, 7, 1000)
        .ack(9)
        .write(&mut out, &vec![0xab; ip_len - 40])
        .unwrap();
    out
}

#[test]
fn too_big_for_the_overlay_with_df_is_answered_with_frag_needed() {
    use etherparse::icmpv4::DestUnreachableHeader;
    use etherparse::{Icmpv4Type, IpHeaders, IpNumber, Ipv4Header};
    let mut w = overlay_node();
    // 1450 bytes fit the overlay: encapsulated to node-b, 1450 + 50 on the wire.
    w.dev.inject(1, &big_v4([10, 244, 2, 5], 1450));
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[0].len(), 1, "encapsulated");
    assert_eq!(out[0][0].len(), 14 + 1450 + 50);
    assert!(out[1].is_empty());

    // 1451 bytes do not: the client gets "fragmentation needed, next-hop MTU 1450" from its
    // gateway, quoting its IP header and 8 bytes of TCP (RFC 792, RFC 1191).
    let original = big_v4([10, 244, 2, 5], 1451);
    w.dev.inject(1, &original);
    let out = step(&mut w, 3 * SECOND);
    assert!(out[0].is_empty(), "nothing goes to the overlay");
    assert_eq!(out[1].len(), 1);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, [10, 244, 1, 1], [10, 244, 1, 2]).unwrap();
    ip.dont_fragment = true;
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 },
        ))
        .write(&mut expected, &original[14..14 + 28])
        .unwrap();
    assert_eq!(out[1][0], expected);
    assert_eq!(w.counters().too_big, 1);

    // Without DF the packet cannot be sent whole either; it is dropped and counted.
    let mut no_df = big_v4([10, 244, 2, 5], 1451);
    no_df[14 + 6] &= !0x40;
    let check = etherparse::Ipv4HeaderSlice::from_slice(&no_df[14..])
        .unwrap()
        .to_header()
        .calc_header_checksum();
    no_df[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    w.dev.inject(1, &no_df);
    let out = step(&mut w, 3 * SECOND);
    assert!(out.iter().all(|p| p.is_empty()));
    assert_eq!(w.counters().drops[DropReason::TooBig as usize], 1);
}

#[test]
fn too_big_for_the_overlay_over_ipv6_is_answered_with_packet_too_big() {
    use etherparse::Icmpv6Type;
    let client6: std::net::Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
    let gw6: std::net::Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    let b6: std::net::Ipv6Addr = "fd00:10:244:2::5".parse().unwrap();
    let mut w = overlay_node();
    // Teach the dataplane the client's IPv6 MAC (a neighbour advertisement is how a pod
    // would answer; a packet from it is enough here).
    let mut original = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv6(client6.octets(), b6.octets(), 64)
        .tcp(40000, 8080, 7, 1000)
        .ack(9)
        .write(&mut original, &[0xab; 1500 - 60])
        .unwrap();
    w.dev.inject(1, &original);
    let out = step(&mut w, 3 * SECOND);
    assert!(out[0].is_empty(), "nothing goes to the overlay");
    assert_eq!(out[1].len(), 1, "{out:?}");
    // RFC 4443: as much of the packet as fits in 1280 bytes, from the pods' gateway.
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ipv6(gw6.octets(), client6.octets(), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1450 })
        .write(&mut expected, &original[14..14 + 1280 - 48])
        .unwrap();
    assert_eq!(out[1][0].len(), 14 + 1280);
    assert_eq!(out[1][0], expected);
}

/// The router in front of the uplink, the node's default gateway.
const ROUTER: [u8; 6] = [2, 0, 0, 0, 0xff, 1];

/// [`node`] with a default route through 192.168.0.1 on the uplink (resolved), and the
/// pods resolved.
fn routed_node() -> Worker<MemDevice> {
    let shared = shared();
    shared
        .uplink_routes
        .store(Arc::new(dataplane::routes::UplinkRoutes::new(vec![(
            "0.0.0.0/0".parse().unwrap(),
            Some("192.168.0.1".parse().unwrap()),
        )])));
    let mut w = worker(shared, spec());
    resolve_web(&mut w);
    answer_on_uplink(&mut w, ROUTER, [192, 168, 0, 1]);
    w
}

#[test]
fn pod_traffic_leaving_the_cluster_is_masqueraded_to_the_node_and_back() {
    let mut w = routed_node();
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40000,
            [203, 0, 113, 50],
            443,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[0].len(), 1, "out of the uplink: {out:?}");
    let f = &out[0][0];
    assert_eq!((&f[0..6], &f[6..12]), (&ROUTER[..], &UPLINK[..]));
    let p = SlicedPacket::from_ethernet(f).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), [192, 168, 0, 2], "the node's address");
    assert_eq!(ip.header().destination(), [203, 0, 113, 50]);
    assert_eq!(ip.header().ttl(), 63);
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    let port = t.source_port();
    assert!(
        port >= 61000,
        "a port above the kernel's ephemeral range: {port}"
    );
    let check = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
    assert_eq!(t.checksum(), check);
    assert_eq!(w.counters().masqueraded_out, 1);

    // The reply comes back to the node's address and port, and reaches the pod as the
    // reply of its own connection.
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(ROUTER, UPLINK)
        .ipv4([203, 0, 113, 50], [192, 168, 0, 2], 60)
        .tcp(443, port, 77, 1000)
        .syn()
        .ack(8)
        .write(&mut reply, b"")
        .unwrap();
    w.dev.inject(0, &reply);
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[1].len(), 1, "{out:?}");
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ipv4([203, 0, 113, 50], [10, 244, 1, 2], 59)
        .tcp(443, 40000, 77, 1000)
        .syn()
        .ack(8)
        .write(&mut expected, b"")
        .unwrap();
    // etherparse leaves the IP identification 0 and DF clear, as our reply was built.
    assert_eq!(out[1][0], expected);
}

#[test]
fn echo_to_the_gateway_is_answered_and_ttl_runs_out_with_time_exceeded() {
    use etherparse::{IcmpEchoHeader, Icmpv4Type};
    let mut w = routed_node();
    // ping 10.244.1.1 from the client pod.
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv4([10, 244, 1, 2], [10, 244, 1, 1], 64)
        .icmpv4_echo_request(0x1234, 7)
        .write(&mut ping, b"abcdefgh")
        .unwrap();
    w.dev.inject(1, &ping);
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[1].len(), 1, "{out:?}");
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ipv4([10, 244, 1, 1], [10, 244, 1, 2], 64)
        .icmpv4(Icmpv4Type::EchoReply(IcmpEchoHeader { id: 0x1234, seq: 7 }))
        .write(&mut expected, b"abcdefgh")
        .unwrap();
    assert_eq!(out[1][0], expected);

    // A UDP probe with TTL 1 towards the outside: time exceeded from the gateway, quoting
    // the probe as the pod sent it (traceroute's first hop).
    let mut probe = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv4([10, 244, 1, 2], [203, 0, 113, 50], 1)
        .udp(40000, 33434)
        .write(&mut probe, b"probe")
        .unwrap();
    w.dev.inject(1, &probe);
    let out = step(&mut w, 3 * SECOND);
    assert!(out[0].is_empty(), "nothing leaves with TTL 0");
    assert_eq!(out[1].len(), 1, "{out:?}");
    let mut ip = etherparse::Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::ICMP,
        [10, 244, 1, 1],
        [10, 244, 1, 2],
    )
    .unwrap();
    ip.dont_fragment = true;
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut expected, &probe[14..14 + 28])
        .unwrap();
    assert_eq!(out[1][0], expected);
    assert_eq!(w.counters().time_exceeded, 1);

    // TTL 2 passes this hop (masqueraded, TTL 1 on the wire).
    probe[14 + 8] = 2;
    let check = etherparse::Ipv4HeaderSlice::from_slice(&probe[14..])
        .unwrap()
        .to_header()
        .calc_header_checksum();
    probe[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    w.dev.inject(1, &probe);
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[0].len(), 1, "{out:?}");
    assert_eq!(out[0][0][14 + 8], 1);
}

#[test]
fn a_service_connection_whose_reply_tuple_is_taken_gets_another_source_port() {
    let mut w = node();
    resolve_web(&mut w);
    // The client talks to web directly from port 40010 (tracked, still open) ...
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40010,
            [10, 244, 1, 5],
            8080,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(
        delivered_to_web(&out),
        ([10, 244, 1, 2], [10, 244, 1, 5], 40010, 8080)
    );
    // ... and then, from the same port, to web's ClusterIP: the backend side of both would
    // be web:8080 ↔ client:40010, so the second gets another source port.
    w.dev.inject(
        1,
        &tcp(
            (GW1, POD1),
            [10, 244, 1, 2],
            40010,
            [172, 30, 0, 41],
            80,
            64,
            true,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    let (src, dst, sport, dport) = delivered_to_web(&out);
    assert_eq!((src, dst, dport), ([10, 244, 1, 2], [10, 244, 1, 5], 8080));
    assert_ne!(sport, 40010, "the clash is resolved by remapping the port");
    assert_eq!(w.counters().drops[DropReason::TupleTaken as usize], 0);
    // web's answer to that port reaches the client as from the ClusterIP, on port 40010.
    w.dev.inject(
        2,
        &tcp(
            (GW2, POD2),
            [10, 244, 1, 5],
            8080,
            [10, 244, 1, 2],
            sport,
            64,
            false,
        ),
    );
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[1].len(), 1, "{out:?}");
    let p = SlicedPacket::from_ethernet(&out[1][0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), [172, 30, 0, 41]);
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!()
    };
    assert_eq!((t.source_port(), t.destination_port()), (80, 40010));
}

#[test]
fn ipv6_echo_to_the_gateway_and_hop_limit_running_out() {
    use etherparse::Icmpv6Type;
    let client6: std::net::Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
    let gw6: std::net::Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    let mut w = routed_node();
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv6(client6.octets(), gw6.octets(), 64)
        .icmpv6_echo_request(0x4321, 3)
        .write(&mut ping, b"ping6")
        .unwrap();
    w.dev.inject(1, &ping);
    let out = step(&mut w, 3 * SECOND);
    assert_eq!(out[1].len(), 1, "{out:?}");
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ipv6(gw6.octets(), client6.octets(), 64)
        .icmpv6_echo_reply(0x4321, 3)
        .write(&mut expected, b"ping6")
        .unwrap();
    assert_eq!(out[1][0], expected);

    // Hop limit 1 towards another node's pod: time exceeded from the gateway, quoting the
    // packet (RFC 4443: as much as fits in 1280 bytes; here all of it).
    let mut probe = Vec::new();
    PacketBuilder::ethernet2(POD1, GW1)
        .ipv6(
            client6.octets(),
            "fd00:10:244:1::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            1,
        )
        .udp(40000, 33434)
        .write(&mut probe, b"probe6")
        .unwrap();
    w.dev.inject(1, &probe);
    let out = step(&mut w, 3 * SECOND);
    assert!(out[2].is_empty(), "not forwarded with hop limit 0");
    assert_eq!(out[1].len(), 1, "{out:?}");
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(GW1, POD1)
        .ipv6(gw6.octets(), client6.octets(), 64)
        .icmpv6(Icmpv6Type::TimeExceeded(
            etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
        ))
        .write(&mut expected, &probe[14..])
        .unwrap();
    assert_eq!(out[1][0], expected);
}
