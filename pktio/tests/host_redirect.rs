//! The host redirect (tc egress) against a real kernel. One namespace stands for a node: its
//! uplink `up0` (peer `up1`, a router at 192.168.78.1) has the node's addresses, and the host
//! veth pair `kxhost` (the kernel's end) ↔ `kxdpend` (kxdp's end, watched by a raw socket
//! here) is where redirected packets must come out. Host sockets connect to NodePorts on the
//! node's own addresses (routed to `lo` by the kernel) and to a load-balancer IP (routed to
//! the router through `up0`): what the table names must come out of `kxdpend` with the pair's
//! MACs, complete (checksums filled in), and not reach the local listener; what it does not
//! name must be the kernel's as before; and once the redirect is dropped, everything is the
//! kernel's again.
//!
//! Root only: without root each test says so and passes. The namespace is created here and
//! deleted when the test ends, also on failure.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use pktio::capture::RawSocket;
use pktio::netns::{self, in_ns, NetnsGuard};
use pktio::xsk::{self, HostRedirect, HostTarget, Protocol};

const NODE4: &str = "192.168.78.2";
const NODE6: &str = "fd00:78::2";
const LB: &str = "203.0.113.7";
/// Longest a connection attempt that must be redirected is given (it gets no answer).
const ATTEMPT: Duration = Duration::from_millis(300);
/// Longest the capture waits for a frame.
const DEADLINE: Duration = Duration::from_secs(3);

fn skip(test: &str) -> bool {
    if netns::is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root to create network namespaces and attach tc programs");
    true
}

fn mac_of(ns: &NetnsGuard, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]).unwrap();
    let text = out.split("link/ether ").nth(1).expect("an Ethernet device");
    let mut mac = [0u8; 6];
    for (i, b) in text
        .split_whitespace()
        .next()
        .unwrap()
        .split(':')
        .enumerate()
    {
        mac[i] = u8::from_str_radix(b, 16).unwrap();
    }
    mac
}

fn node() -> NetnsGuard {
    let ns = NetnsGuard::new("kxdp-hr").unwrap();
    for (a, b) in [("up0", "up1"), ("kxhost", "kxdpend")] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
            .unwrap();
    }
    ns.ip(&["addr", "add", &format!("{NODE4}/24"), "dev", "up0"])
        .unwrap();
    ns.ip(&["addr", "add", &format!("{NODE6}/64"), "dev", "up0", "nodad"])
        .unwrap();
    // The router's address without its network: the node's connected route stays up0's.
    ns.ip(&["addr", "add", "192.168.78.1/32", "dev", "up1"])
        .unwrap();
    for dev in ["lo", "up0", "up1", "kxhost", "kxdpend"] {
        ns.ip(&["link", "set", "dev", dev, "up"]).unwrap();
    }
    // The load balancer's address is out there, through the router (whose address the
    // kernel would not resolve by ARP: it is one of its own in this namespace).
    ns.ip(&[
        "route",
        "add",
        &format!("{LB}/32"),
        "via",
        "192.168.78.1",
        "dev",
        "up0",
    ])
    .unwrap();
    let router_mac = mac_of(&ns, "up1")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip(&[
        "neigh",
        "replace",
        "192.168.78.1",
        "lladdr",
        &router_mac,
        "dev",
        "up0",
        "nud",
        "permanent",
    ])
    .unwrap();
    // kxdp's end is kxdp's: the kernel must not take what arrives there (in a real node an
    // XDP program hands it all to AF_XDP; here the raw socket only watches).
    ns.ip(&["addr", "flush", "dev", "kxdpend"]).unwrap();
    let sysctl = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "sysctl", "-qw"])
        .args(["net.ipv6.conf.kxdpend.disable_ipv6=1"])
        .output()
        .expect("sysctl");
    assert!(sysctl.status.success(), "{sysctl:?}");
    // The pair carries complete packets only, as the lab and a CNI set it.
    let ethtool = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "ethtool", "-K", "kxhost"])
        .args(["tx", "off", "tso", "off", "gso", "off"])
        .output()
        .expect("ethtool");
    assert!(ethtool.status.success(), "{ethtool:?}");
    ns
}

/// The internet checksum of `data` folded with `sum`.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (destination, protocol number, destination port, transport checksum verifies).
type Decoded = (IpAddr, u8, u16, bool);

/// A captured frame: destination MAC, source MAC, what it carries.
type Captured = ([u8; 6], [u8; 6], Decoded);

/// [`Decoded`] of an IPv4 or IPv6 frame.
fn decode(frame: &[u8]) -> Option<Decoded> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (dst, proto, l4, pseudo) = match ethertype {
        0x0800 => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            let l4 = &ip[ihl..total];
            let mut p: u32 = 0;
            for c in ip[12..20].chunks(2) {
                p += u32::from(c[0]) << 8 | u32::from(c[1]);
            }
            p += u32::from(ip[9]) + l4.len() as u32;
            (IpAddr::from(dst), ip[9], l4, p)
        }
        0x86dd => {
            let ip = &frame[14..];
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            let l4 = &ip[40..40 + len];
            let mut p: u32 = 0;
            for c in ip[8..40].chunks(2) {
                p += u32::from(c[0]) << 8 | u32::from(c[1]);
            }
            p += u32::from(ip[6]) + l4.len() as u32;
            (IpAddr::from(dst), ip[6], l4, p)
        }
        _ => return None,
    };
    let port = u16::from_be_bytes([l4[2], l4[3]]);
    Some((dst, proto, port, checksum(pseudo, l4) == 0))
}

/// The frames `kxdpend` receives within `wait`, decoded, with their MACs.
fn captured(sock: &RawSocket, wait: Duration) -> Vec<Captured> {
    let mut out = Vec::new();
    let until = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match sock.recv(&mut buf, left) {
            Ok(Some(n)) => {
                if let Some(d) = decode(&buf[..n]) {
                    let dst: [u8; 6] = buf[..6].try_into().unwrap();
                    let src: [u8; 6] = buf[6..12].try_into().unwrap();
                    out.push((dst, src, d));
                }
            }
            Ok(None) => break,
            Err(e) => panic!("capture: {e}"),
        }
    }
    out
}

/// Whether a TCP connection to `to` is accepted within [`ATTEMPT`].
fn connects(to: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&to, ATTEMPT) {
        Ok(_) => true,
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => false,
        Err(e) => panic!("connect {to}: {e}"),
    }
}

#[test]
fn host_sockets_to_kxdp_frontends_go_to_the_host_pair_and_nothing_else_does() {
    if skip("host_sockets_to_kxdp_frontends_go_to_the_host_pair_and_nothing_else_does") {
        return;
    }
    let ns = node();
    let (kxdp_mac, kernel_mac) = (mac_of(&ns, "kxdpend"), mac_of(&ns, "kxhost"));
    in_ns(&ns, || {
        let sock = RawSocket::bind("kxdpend").unwrap();
        let node4: IpAddr = NODE4.parse().unwrap();
        let node6: IpAddr = NODE6.parse().unwrap();
        let lb: IpAddr = LB.parse().unwrap();
        // Local listeners on every port tried: the kernel would accept each at once.
        let listeners: Vec<TcpListener> = [(node4, 30080), (node6, 30080), (node4, 30081)]
            .iter()
            .map(|&(ip, port)| TcpListener::bind(SocketAddr::new(ip, port)).unwrap())
            .collect();
        let redirect = HostRedirect::load(HostTarget {
            ifindex: xsk::ifindex("kxhost").unwrap(),
            dst_mac: kxdp_mac,
            src_mac: kernel_mac,
        })
        .unwrap();
        redirect.attach_egress(xsk::ifindex("lo").unwrap()).unwrap();
        redirect
            .attach_egress(xsk::ifindex("up0").unwrap())
            .unwrap();
        let want: BTreeSet<(IpAddr, Protocol, u16)> = [
            (node4, Protocol::Tcp, 30080),
            (node6, Protocol::Tcp, 30080),
            (node4, Protocol::Udp, 30053),
            (lb, Protocol::Tcp, 80),
        ]
        .into_iter()
        .collect();
        redirect.replace_ports(&want).unwrap();
        assert_eq!(redirect.ports(), want);
        assert_eq!(redirect.attachments().len(), 2);

        // NodePorts on the node's own addresses, TCP over both families and UDP.
        for to in [SocketAddr::new(node4, 30080), SocketAddr::new(node6, 30080)] {
            assert!(!connects(to), "{to} reached the local listener");
        }
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.send_to(&[7u8; 100], SocketAddr::new(node4, 30053))
            .unwrap();
        // A load-balancer IP, routed out of the uplink.
        assert!(!connects(SocketAddr::new(lb, 80)));
        let got = captured(&sock, DEADLINE);
        for (ip, proto, port) in [
            (node4, 6, 30080),
            (node6, 6, 30080),
            (node4, 17, 30053),
            (lb, 6, 80),
        ] {
            let hit = got
                .iter()
                .find(|(_, _, d)| (d.0, d.1, d.2) == (ip, proto, port))
                .unwrap_or_else(|| panic!("no {ip} {proto} {port} on kxdpend: {got:?}"));
            assert_eq!((hit.0, hit.1), (kxdp_mac, kernel_mac), "the pair's MACs");
            assert!(hit.2 .3, "{ip} {proto} {port}: the checksum is complete");
        }
        // A port the table does not name stays the kernel's.
        assert!(connects(SocketAddr::new(node4, 30081)));
        let stats = redirect.stats().unwrap();
        assert!(stats.redirected >= 4 && stats.passed > 0, "{stats:?}");

        // Gone with its owner: the kernel has everything again.
        drop(redirect);
        assert!(connects(SocketAddr::new(node4, 30080)));
        assert!(connects(SocketAddr::new(node6, 30080)));
        let late = captured(&sock, Duration::from_millis(300));
        assert!(
            !late.iter().any(|(_, _, d)| d.2 == 30080 && d.1 == 6),
            "redirected after the drop: {late:?}"
        );
        drop(listeners);
    });
}
