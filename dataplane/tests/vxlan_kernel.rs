//! [`dataplane::vxlan`] against the kernel's own vxlan device, configured the way flannel
//! configures `flannel.1`. Needs root; skipped (with a message) otherwise.
//!
//! Two namespaces joined by a veth pair stand for two nodes on one L2 segment:
//!
//! ```text
//! A ("us", kxdp)                           B (a flannel node)
//! up0 192.168.0.2/24 ──────── veth ──────── up0 192.168.0.3/24
//!   raw AF_PACKET socket                    flannel.1: vxlan id 1 dstport 8472 nolearning
//!                                           10.244.2.0/32, route 10.244.1.0/24 → A's VTEP
//! ```
//!
//! The kernel in B encapsulates towards A; the test captures that on A's `up0` and checks
//! it against what [`encapsulate`] builds from the same inner frame, then decapsulates it.
//! The other way, frames built by [`encapsulate`] are sent from A's `up0` and a socket in
//! B must receive their inner datagram. Nothing runs in the root namespace; every wait is
//! bounded in time and count.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use dataplane::vxlan::{
    decapsulate, encapsulate, Overlay, RemoteVtep, OUTER_TTL, SRC_PORT_MAX, SRC_PORT_MIN,
    VXLAN_OVERHEAD,
};
use etherparse::PacketBuilder;
use nat::checksum;
use pktio::capture::RawSocket;
use pktio::netns::{self, NetnsGuard};

const A_UP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const B_UP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// Our VTEP MAC (what flannel on B learned from our node's `VtepMAC` annotation).
const A_VTEP_MAC: [u8; 6] = [0x9a, 0x3c, 0x2e, 0, 0, 0x02];
/// The MAC of B's `flannel.1`.
const B_VTEP_MAC: [u8; 6] = [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33];
const A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);
/// B's `flannel.1` address: the `.0` of its pod subnet 10.244.2.0/24.
const B_VTEP_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 0);
/// A pod on A (10.244.1.0/24, reached from B through the overlay).
const A_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const VNI: u32 = 1;
const PORT: u16 = 8472;

/// How long any one wait for a frame or datagram lasts.
const WAIT: Duration = Duration::from_secs(3);
/// Frames looked at per capture before giving up (the link is otherwise quiet: this bounds
/// IPv6 chatter and ICMP errors).
const MAX_FRAMES: usize = 200;
/// Room before a frame for the outer headers, as a UMEM chunk would have.
const HEADROOM: usize = 256;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Our overlay, as the dataplane on A would hold it.
fn overlay_a() -> Overlay {
    Overlay {
        vni: VNI,
        port: PORT,
        local_vtep_ip: A_IP,
        local_vtep_mac: A_VTEP_MAC,
        uplink_mac: A_UP_MAC,
    }
}

/// B's overlay as `encapsulate` would build B's packets: to compare with B's kernel.
fn overlay_b() -> Overlay {
    Overlay {
        vni: VNI,
        port: PORT,
        local_vtep_ip: B_IP,
        local_vtep_mac: B_VTEP_MAC,
        uplink_mac: B_UP_MAC,
    }
}

/// The two nodes; both namespaces (and every interface in them) go when this drops,
/// panicking test or not.
struct Nodes {
    a: NetnsGuard,
    b: NetnsGuard,
    /// Whether `ethtool -K up0 tx off` worked in B. With transmit checksum offload on, B's
    /// kernel leaves checksums for the veth to finish (CHECKSUM_PARTIAL), which it never
    /// does: the capture would show the pseudo-header sum, not what a NIC puts on a wire.
    b_checksums_in_software: bool,
}

/// Builds the topology, or `None` (with a message) when not root.
fn nodes(test: &str) -> Option<Nodes> {
    if !netns::is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces, a vxlan device, AF_PACKET)");
        return None;
    }
    let a = NetnsGuard::new("kxdp-vxa").expect("create namespace A");
    let b = NetnsGuard::new("kxdp-vxb").expect("create namespace B");
    let ip = |ns: &NetnsGuard, args: &[&str]| {
        ns.ip(args)
            .unwrap_or_else(|e| panic!("in {}: {e}", ns.name()));
    };
    let (a_up, b_up) = (mac(A_UP_MAC), mac(B_UP_MAC));
    ip(
        &a,
        &[
            "link",
            "add",
            "up0",
            "address",
            &a_up,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "address",
            &b_up,
            "netns",
            b.name(),
        ],
    );
    for (ns, addr) in [(&a, "192.168.0.2/24"), (&b, "192.168.0.3/24")] {
        ip(ns, &["addr", "add", addr, "dev", "up0"]);
        ip(ns, &["link", "set", "up0", "up"]);
        ip(ns, &["link", "set", "lo", "up"]);
    }
    // Static underlay neighbours: no ARP between the frames the tests look at.
    ip(
        &b,
        &[
            "neigh",
            "add",
            "192.168.0.2",
            "lladdr",
            &a_up,
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
    );
    ip(
        &a,
        &[
            "neigh",
            "add",
            "192.168.0.3",
            "lladdr",
            &b_up,
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
    );
    // B's flannel.1, as flannel's vxlan backend makes it.
    b.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "up0",
        "local",
        "192.168.0.3",
        "dstport",
        "8472",
        "nolearning",
    ])
    .unwrap_or_else(|e| panic!("create the vxlan device (is the vxlan module available?): {e}"));
    ip(
        &b,
        &["link", "set", "flannel.1", "address", &mac(B_VTEP_MAC)],
    );
    ip(&b, &["addr", "add", "10.244.2.0/32", "dev", "flannel.1"]);
    ip(&b, &["link", "set", "flannel.1", "up"]);
    ip(
        &b,
        &[
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "10.244.1.0",
            "dev",
            "flannel.1",
            "onlink",
        ],
    );
    ip(
        &b,
        &[
            "neigh",
            "add",
            "10.244.1.0",
            "lladdr",
            &mac(A_VTEP_MAC),
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    );
    let out = Command::new("bridge")
        .args([
            "-n",
            b.name(),
            "fdb",
            "append",
            &mac(A_VTEP_MAC),
            "dev",
            "flannel.1",
            "dst",
            "192.168.0.2",
        ])
        .output()
        .expect("run bridge (package iproute2)");
    assert!(
        out.status.success(),
        "bridge fdb append: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b_checksums_in_software = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.name(),
            "ethtool",
            "-K",
            "up0",
            "tx",
            "off",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !b_checksums_in_software {
        eprintln!("{test}: ethtool -K failed in B; the kernel's UDP checksums are not checked");
    }
    Some(Nodes {
        a,
        b,
        b_checksums_in_software,
    })
}

/// Runs `f` on a new thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = ns.to_string();
    thread::spawn(move || {
        netns::enter_thread(&ns).unwrap_or_else(|e| panic!("enter {ns}: {e}"));
        f()
    })
}

/// Receives on `sock` until `want` VXLAN frames for A came in, `WAIT` passed or
/// `MAX_FRAMES` were seen.
fn capture_vxlan(sock: &RawSocket, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    for _ in 0..MAX_FRAMES {
        let left = deadline.saturating_duration_since(Instant::now());
        if got.len() == want || left.is_zero() {
            break;
        }
        match sock.recv(&mut buf, left).expect("receive on A's up0") {
            Some(n) if decapsulate(&buf[..n], &overlay_a()).is_ok() => got.push(buf[..n].to_vec()),
            Some(_) => {}
            None => break,
        }
    }
    got
}

/// How a UDP checksum was filled.
#[derive(Debug, PartialEq, Eq)]
enum UdpChecksum {
    Zero,
    /// Complete and correct.
    Valid,
    /// The pseudo-header sum only, left for an offload to finish (CHECKSUM_PARTIAL).
    Partial,
    Wrong,
}

/// The UDP checksum of the IPv4 packet (20-byte header) at `frame[l3..]`.
fn udp_checksum_kind(frame: &[u8], l3: usize) -> UdpChecksum {
    let ip = &frame[l3..l3 + 20];
    let udp = &frame[l3 + 20..];
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    let field = u16::from_be_bytes([udp[6], udp[7]]);
    let pseudo = checksum::pseudo_v4(
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
        17,
        udp_len,
    );
    if field == 0 {
        UdpChecksum::Zero
    } else if checksum::sum(&udp[..udp_len as usize], pseudo) == 0xffff {
        UdpChecksum::Valid
    } else if field == pseudo as u16 {
        UdpChecksum::Partial
    } else {
        UdpChecksum::Wrong
    }
}

/// What [`encapsulate`] makes of the kernel frame's inner frame, given as B would send it
/// (inner MACs scrambled first, to show they are rewritten).
fn ours_for(kernel: &[u8], hash: u64) -> Vec<u8> {
    let inner = &kernel[VXLAN_OVERHEAD..];
    let mut chunk = vec![0u8; HEADROOM + inner.len()];
    chunk[HEADROOM..].copy_from_slice(inner);
    chunk[HEADROOM..HEADROOM + 12].copy_from_slice(&[0xee; 12]);
    let remote = RemoteVtep {
        ip: A_IP,
        vtep_mac: A_VTEP_MAC,
        next_hop_mac: A_UP_MAC,
    };
    let (off, len) = encapsulate(
        &mut chunk,
        HEADROOM,
        inner.len(),
        &overlay_b(),
        &remote,
        hash,
    )
    .expect("encapsulate");
    chunk[off..off + len].to_vec()
}

/// Checks a frame B's kernel sent against ours for the same inner frame, field by field:
/// equal where the kernel's value follows from configuration and the packet, by rule where
/// it follows from the kernel's own state or where we differ on purpose.
fn compare(kernel: &[u8], software_checksums: bool) {
    let ours = ours_for(kernel, 0x1234_5678);
    assert_eq!(ours.len(), kernel.len(), "lengths");
    assert_eq!(ours[..14], kernel[..14], "outer Ethernet");
    assert_eq!(
        ours[14..18],
        kernel[14..18],
        "version, IHL, TOS (ECN), total length"
    );
    assert_eq!(ours[18..20], [0, 0], "our IP ID");
    assert_eq!(
        kernel[20..22],
        [0, 0],
        "kernel: DF clear (df unset), not a fragment"
    );
    assert_eq!(ours[20..22], [0x40, 0], "ours: DF set");
    assert_eq!(kernel[22], OUTER_TTL, "kernel TTL (ttl auto)");
    assert_eq!(ours[22..24], kernel[22..24], "TTL, protocol");
    assert_eq!(
        checksum::sum(&kernel[14..34], 0),
        0xffff,
        "kernel IP checksum"
    );
    assert_eq!(checksum::sum(&ours[14..34], 0), 0xffff, "our IP checksum");
    assert_eq!(ours[26..34], kernel[26..34], "addresses");
    for (who, f) in [("kernel", kernel), ("ours", &ours[..])] {
        let sport = u16::from_be_bytes([f[34], f[35]]);
        assert!(
            (SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport),
            "{who} source port {sport}"
        );
    }
    assert_eq!(ours[36..40], kernel[36..40], "UDP destination port, length");
    assert_eq!(ours[40..42], [0, 0], "our UDP checksum");
    if software_checksums {
        // The kernel checksums by default (`udpcsum`, which flannel leaves on).
        assert_eq!(
            udp_checksum_kind(kernel, 14),
            UdpChecksum::Valid,
            "kernel UDP checksum"
        );
        assert_eq!(
            udp_checksum_kind(kernel, 64),
            UdpChecksum::Valid,
            "inner UDP checksum"
        );
    }
    assert_eq!(ours[42..50], kernel[42..50], "VXLAN header");
    assert_eq!(ours[50..], kernel[50..], "inner frame");
}

#[test]
fn kernel_encapsulation_matches_ours() {
    let Some(n) = nodes("kernel_encapsulation_matches_ours") else {
        return;
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let capture = in_ns(n.a.name(), move || {
        let sock = RawSocket::bind("up0").expect("raw socket on A's up0");
        ready_tx.send(()).unwrap();
        capture_vxlan(&sock, 2)
    });
    ready_rx.recv_timeout(WAIT).expect("capture ready");
    // Two datagrams of one flow from B to a pod on A, through flannel.1.
    let sender = in_ns(n.b.name(), || {
        let s = UdpSocket::bind(SocketAddrV4::new(B_VTEP_NET_IP, 0)).expect("bind in B");
        for p in [&b"kxdp-vxlan-1"[..], b"kxdp-vxlan-2"] {
            s.send_to(p, SocketAddrV4::new(A_POD, 9999))
                .expect("send in B");
        }
        s.local_addr().unwrap().port()
    });
    let b_port = sender.join().unwrap();
    let frames = capture.join().unwrap();
    assert_eq!(frames.len(), 2, "VXLAN frames B's kernel sent to A");

    for (i, f) in frames.iter().enumerate() {
        let d = decapsulate(f, &overlay_a()).unwrap();
        assert_eq!((d.inner_offset, d.vni, d.outer_src), (50, VNI, B_IP));
        let inner = &f[d.inner_offset..d.inner_offset + d.inner_len];
        assert_eq!(inner[0..6], A_VTEP_MAC, "inner destination: our VTEP MAC");
        assert_eq!(inner[6..12], B_VTEP_MAC, "inner source: flannel.1's MAC");
        let h = nat::packet::parse(inner).expect("inner IPv4/UDP");
        assert_eq!(h.src, std::net::IpAddr::V4(B_VTEP_NET_IP));
        assert_eq!(h.dst, std::net::IpAddr::V4(A_POD));
        assert_eq!((h.sport, h.dport), (b_port, 9999));
        assert_eq!(
            &inner[h.l4 + 8..h.end],
            format!("kxdp-vxlan-{}", i + 1).as_bytes()
        );
        compare(f, n.b_checksums_in_software);
    }
    // What the kernel takes from its own state: the IP ID numbers each (fragmentable)
    // packet; the source port follows the flow.
    assert_ne!(frames[0][18..20], frames[1][18..20], "kernel IP IDs differ");
    assert_eq!(
        frames[0][34..36],
        frames[1][34..36],
        "one flow, one source port"
    );
    eprintln!(
        "kernel: IP IDs {:02x?} {:02x?}, DF clear, TTL {}, source port {}, UDP checksum {:?}",
        &frames[0][18..20],
        &frames[1][18..20],
        frames[0][22],
        u16::from_be_bytes([frames[0][34], frames[0][35]]),
        udp_checksum_kind(&frames[0], 14),
    );
}

/// A plain IPv4/UDP frame from A's up0 to B, for B to route into its overlay (so B's kernel
/// encapsulates an inner packet with the TOS we chose).
fn routed_through_b(tos: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(A_UP_MAC, B_UP_MAC)
        .ipv4(A_IP.octets(), Ipv4Addr::new(10, 244, 1, 9).octets(), 64)
        .udp(5555, 9999)
        .write(&mut f, payload)
        .unwrap();
    f[15] = tos;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn kernel_copies_inner_ecn_and_so_do_we() {
    let Some(n) = nodes("kernel_copies_inner_ecn_and_so_do_we") else {
        return;
    };
    in_ns(n.b.name(), || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding in B")
    })
    .join()
    .unwrap();
    // (inner TOS, outer TOS): DSCP 46 is not copied; ECT(1) is; CE goes out as ECT(0).
    let cases = [(0xb8u8, 0u8), (0xb9, 1), (0x02, 2), (0x03, 2)];
    let frames = in_ns(n.a.name(), move || {
        let sock = RawSocket::bind("up0").expect("raw socket on A's up0");
        let mut got = Vec::new();
        for (tos, _) in cases {
            sock.send(&routed_through_b(tos, format!("ecn-{tos:02x}").as_bytes()))
                .expect("send from A");
            got.extend(capture_vxlan(&sock, 1));
        }
        got
    })
    .join()
    .unwrap();
    assert_eq!(
        frames.len(),
        cases.len(),
        "one VXLAN frame back per packet routed"
    );
    for (f, (tos, outer)) in frames.iter().zip(cases) {
        assert_eq!(f[50 + 15], tos, "inner TOS unchanged");
        assert_eq!(f[50 + 22], 63, "B routed it (inner TTL decremented)");
        assert_eq!(f[15], outer, "kernel outer TOS for inner {tos:#04x}");
        compare(f, n.b_checksums_in_software);
    }
    eprintln!(
        "kernel, routed through B: outer TOS {:?}, UDP checksum {:?}",
        frames.iter().map(|f| f[15]).collect::<Vec<_>>(),
        udp_checksum_kind(&frames[0], 14),
    );
}

/// An inner frame from pod `A_POD` to B's flannel.1 address, addressed VTEP to VTEP, in a
/// chunk with headroom, encapsulated by us for `vni`.
fn ours_to_b(vni: u32, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    PacketBuilder::ethernet2(A_VTEP_MAC, B_VTEP_MAC)
        .ipv4(A_POD.octets(), B_VTEP_NET_IP.octets(), 64)
        .udp(4000, dport)
        .write(&mut inner, payload)
        .unwrap();
    let mut chunk = vec![0u8; HEADROOM + inner.len()];
    chunk[HEADROOM..].copy_from_slice(&inner);
    let overlay = Overlay { vni, ..overlay_a() };
    let remote = RemoteVtep {
        ip: B_IP,
        vtep_mac: B_VTEP_MAC,
        next_hop_mac: B_UP_MAC,
    };
    let (off, len) =
        encapsulate(&mut chunk, HEADROOM, inner.len(), &overlay, &remote, 42).expect("encapsulate");
    chunk[off..off + len].to_vec()
}

#[test]
fn kernel_decapsulates_ours() {
    let Some(n) = nodes("kernel_decapsulates_ours") else {
        return;
    };
    const DPORT: u16 = 7777;
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = in_ns(n.b.name(), move || {
        let s = UdpSocket::bind(SocketAddrV4::new(B_VTEP_NET_IP, DPORT)).expect("bind in B");
        s.set_read_timeout(Some(WAIT)).unwrap();
        ready_tx.send(()).unwrap();
        let mut got: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        let mut buf = [0u8; 256];
        // Bounded: at most three datagrams, each waited for at most WAIT.
        for _ in 0..3 {
            match s.recv_from(&mut buf) {
                Ok((len, from)) => {
                    let last = &buf[..len] == b"right-vni";
                    got.push((buf[..len].to_vec(), from));
                    if last {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        got
    });
    ready_rx.recv_timeout(WAIT).expect("receiver ready");
    in_ns(n.a.name(), || {
        let sock = RawSocket::bind("up0").expect("raw socket on A's up0");
        // The kernel must drop the first (another VNI) and deliver the second.
        sock.send(&ours_to_b(VNI + 1, DPORT, b"wrong-vni"))
            .expect("send");
        sock.send(&ours_to_b(VNI, DPORT, b"right-vni"))
            .expect("send");
    })
    .join()
    .unwrap();
    let got = receiver.join().unwrap();
    let from = SocketAddr::V4(SocketAddrV4::new(A_POD, 4000));
    assert_eq!(
        got,
        vec![(b"right-vni".to_vec(), from)],
        "B's kernel delivers our VNI-1 packet (DF set, ID 0, UDP checksum 0) and drops VNI 2"
    );
}
