//! kxdp's XDP filter against real kernels: a "node" namespace whose veth end `va` carries
//! the filter and an AF_XDP socket, and an "outside" namespace on the other end `vb`.
//! Traffic the filter tables name must reach the AF_XDP socket and not the node's kernel;
//! everything else must reach the node's kernel (real TCP and UDP sockets there) and not the
//! AF_XDP socket; and when the process holding the filter dies, the program must be gone and
//! the node's kernel must get everything.
//!
//! Root only: without root each test says so and passes. Both namespaces are created here
//! and deleted when the test ends, also on failure; nothing touches the root namespace.
//! Child processes are ended by PID.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pktio::netns::{self, in_ns, NetnsGuard};
use pktio::xsk::{
    self, FilterTables, Protocol, Steering, XdpMode, XdpProgram, XskConfig, XskDevice,
};
use pktio::{Device, DeviceExt};

/// The node's address on `va`: the kernel owns it (SSH, the kubelet).
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The outside host's address on `vb`.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// An address kxdp answers ARP for on the uplink (a load-balancer IP), also configured on
/// the node's loopback so that the kernel would answer if it saw the request.
const OWNED: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
/// A ClusterIP inside the Service range kxdp serves, routed to the node by the outside host.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The port standing in for SSH on the node.
const SSH: u16 = 2222;
/// Longest any wait for an expected event runs.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(400);
/// Pause between polling rounds.
const ROUND: Duration = Duration::from_millis(2);
/// Upper bound on polling rounds in any wait loop (each sleeps at least `ROUND`).
const MAX_ROUNDS: usize = 2500;
/// Frames per receive call.
const BURST: usize = 64;
/// The child process's test, and the variable that tells it the node namespace.
const CHILD_TEST: &str = "child_holds_a_filter_until_killed";
const CHILD_NS: &str = "KXDP_XDP_FILTER_CHILD_NETNS";
/// What the child prints once its filter is attached, then the link id.
const CHILD_READY: &str = "kxdp-child-ready";

fn skip(test: &str) -> bool {
    if netns::is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root to create network namespaces and attach XDP");
    true
}

/// The node and the outside host on one veth pair.
struct Lab {
    node: NetnsGuard,
    outside: NetnsGuard,
}

impl Lab {
    fn new() -> Lab {
        let node = NetnsGuard::new("kxdp-flt-node").unwrap();
        let outside = NetnsGuard::new("kxdp-flt-out").unwrap();
        node.ip(&[
            "link",
            "add",
            "va",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            outside.name(),
        ])
        .unwrap();
        node.ip(&["addr", "add", "192.168.77.2/24", "dev", "va"])
            .unwrap();
        node.ip(&["addr", "add", "192.168.77.10/32", "dev", "lo"])
            .unwrap();
        node.ip(&["addr", "add", "10.96.0.10/32", "dev", "lo"])
            .unwrap();
        outside
            .ip(&["addr", "add", "192.168.77.1/24", "dev", "vb"])
            .unwrap();
        for (ns, dev) in [
            (&node, "lo"),
            (&node, "va"),
            (&outside, "lo"),
            (&outside, "vb"),
        ] {
            ns.ip(&["link", "set", "dev", dev, "up"]).unwrap();
        }
        outside
            .ip(&["route", "add", "10.96.0.0/16", "via", "192.168.77.2"])
            .unwrap();
        Lab { node, outside }
    }

    /// Attaches the filter to `va` and binds an AF_XDP socket to each of its queues.
    fn attach_filter(&self) -> (XdpProgram, XskDevice) {
        self.attach_filter_in(XdpMode::Auto)
    }

    fn attach_filter_in(&self, mode: XdpMode) -> (XdpProgram, XskDevice) {
        self.attach_filter_with(mode, false)
    }

    /// A filtering program that stamps the frames it redirects, and a device that expects
    /// them.
    fn attach_stamping_filter(&self) -> (XdpProgram, XskDevice) {
        self.attach_filter_with(XdpMode::Auto, true)
    }

    /// The filter on `va` in `mode`, stamping or not, with an AF_XDP socket on each of its
    /// queues in a device that expects the stamps or not.
    fn attach_filter_with(&self, mode: XdpMode, stamped: bool) -> (XdpProgram, XskDevice) {
        in_ns(&self.node, || {
            let va = xsk::ifindex("va").unwrap();
            let queues = xsk::queue_count("va");
            let prog = XdpProgram::load_detached(va, queues, Steering::Filter).unwrap();
            prog.set_stamp(stamped).unwrap();
            let prog = prog.link_to(mode).unwrap();
            if mode != XdpMode::Auto {
                assert_eq!(prog.mode(), mode);
            }
            let pairs: Vec<(u32, u32)> = (0..queues).map(|q| (va, q)).collect();
            let cfg = XskConfig {
                stamped,
                ..small_config()
            };
            let dev = XskDevice::new(&pairs, &cfg).unwrap();
            for q in 0..queues {
                prog.insert(q, dev.socket_fd(q as usize)).unwrap();
            }
            assert_eq!(prog.steering(), Steering::Filter);
            (prog, dev)
        })
    }

    /// Whether `ip link show dev va` in the node shows an XDP program (`prog/xdp id N`; the
    /// peer's namespace name, also printed, contains "xdp" too).
    fn va_has_xdp(&self) -> bool {
        let out = self.node.ip(&["link", "show", "dev", "va"]).unwrap();
        out.contains("prog/xdp")
    }

    /// Connects from the outside host to the node's kernel on `port` and exchanges a line;
    /// true if the node's kernel accepted the connection and the bytes arrived.
    fn tcp_to_node_kernel(&self, port: u16) -> bool {
        let listener = in_ns(&self.node, || TcpListener::bind((NODE, port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let client = in_ns(&self.outside, || {
            TcpStream::connect_timeout(&SocketAddr::from((NODE, port)), QUIET)
        });
        let Ok(mut client) = client else {
            return false;
        };
        client.write_all(b"hello node\n").unwrap();
        let start = Instant::now();
        for _ in 0..MAX_ROUNDS {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(DEADLINE)).unwrap();
                    let mut buf = [0u8; 11];
                    conn.read_exact(&mut buf).unwrap();
                    return &buf == b"hello node\n";
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if start.elapsed() > DEADLINE {
                break;
            }
            std::thread::sleep(ROUND);
        }
        false
    }

    /// A UDP socket of the node's kernel bound to (`addr`, `port`).
    fn node_udp(&self, addr: Ipv4Addr, port: u16) -> UdpSocket {
        let s = in_ns(&self.node, || UdpSocket::bind((addr, port)).unwrap());
        s.set_read_timeout(Some(QUIET)).unwrap();
        s
    }

    /// Sends one datagram from the outside host to (`addr`, `port`).
    fn udp_from_outside(&self, addr: Ipv4Addr, port: u16, payload: &[u8]) {
        in_ns(&self.outside, || {
            let s = UdpSocket::bind((OUTSIDE, 0)).unwrap();
            s.send_to(payload, (addr, port)).unwrap();
        });
    }

    /// A raw socket on the outside host's `vb`, to send hand-made frames and capture.
    fn outside_packet_socket(&self) -> PacketSocket {
        in_ns(&self.outside, || PacketSocket::open("vb"))
    }

    /// The MAC address of `vb`.
    fn vb_mac(&self) -> [u8; 6] {
        let out = self
            .outside
            .ip(&["-o", "link", "show", "dev", "vb"])
            .unwrap();
        let word = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("link/ether in ip link show");
        let mut mac = [0u8; 6];
        for (b, part) in mac.iter_mut().zip(word.split(':')) {
            *b = u8::from_str_radix(part, 16).unwrap();
        }
        mac
    }
}

fn small_config() -> XskConfig {
    XskConfig {
        frame_count: 1024,
        rx_size: 512,
        tx_size: 512,
        fill_size: 512,
        comp_size: 512,
        ..XskConfig::default()
    }
}

/// Receives on every port of `dev` until `done` says the frames so far suffice or `wait`
/// passed; returns every frame's bytes.
fn xsk_frames(
    dev: &mut XskDevice,
    wait: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut burst = Vec::with_capacity(BURST);
    for _ in 0..MAX_ROUNDS {
        let mut any = false;
        for port in 0..dev.port_count() {
            burst.clear();
            dev.recv(port, &mut burst, BURST);
            any |= !burst.is_empty();
            for &f in &burst {
                got.push(dev.packet_mut(f).to_vec());
                dev.free(f);
            }
        }
        dev.flush();
        if done(&got) || start.elapsed() > wait {
            break;
        }
        if !any {
            std::thread::sleep(ROUND);
        }
    }
    got
}

/// (protocol, destination, destination port) of an IPv4 TCP or UDP frame.
fn ipv4_flow(f: &[u8]) -> Option<(u8, Ipv4Addr, u16)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let proto = f[23];
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let l4 = 14 + ihl;
    if f.len() < l4 + 4 {
        return None;
    }
    Some((proto, dst, u16::from_be_bytes([f[l4 + 2], f[l4 + 3]])))
}

fn is_flow(f: &[u8], proto: u8, dst: Ipv4Addr, port: u16) -> bool {
    ipv4_flow(f) == Some((proto, dst, port))
}

/// Whether `f` is an ICMP port unreachable to the node.
fn icmp_unreachable(f: &[u8]) -> bool {
    f.len() >= 38 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[30..34] == NODE.octets() && {
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        f.len() > l4 + 1 && f[l4] == 3 && f[l4 + 1] == 3
    }
}

/// (operation, sender, target) of an ARP frame.
fn arp(f: &[u8]) -> Option<(u16, Ipv4Addr, Ipv4Addr)> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
    let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
    Some((op, spa, tpa))
}

/// An ARP request from `mac`/OUTSIDE for `target`.
fn arp_request(mac: [u8; 6], target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&OUTSIDE.octets());
    f[38..42].copy_from_slice(&target.octets());
    f
}

/// A neighbour solicitation from `mac`/fe80::1 for `target`, with a valid checksum.
fn neighbour_solicitation(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    )
    .octets();
    let mut f = vec![0u8; 14 + 40 + 32];
    f[..6].copy_from_slice(&[0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&src);
    f[38..54].copy_from_slice(&dst);
    let icmp = 54;
    f[icmp] = 135;
    f[icmp + 8..icmp + 24].copy_from_slice(&t);
    f[icmp + 24] = 1; // source link-layer address option, 8 bytes
    f[icmp + 25] = 1;
    f[icmp + 26..icmp + 32].copy_from_slice(&mac);
    // Checksum over the pseudo-header (addresses, length, next header) and the message.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src);
    add(&dst);
    add(&32u32.to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&f[icmp..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[icmp + 2..icmp + 4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

/// The target of a neighbour solicitation frame.
fn ns_target(f: &[u8]) -> Option<Ipv6Addr> {
    if f.len() < 78 || f[12..14] != [0x86, 0xdd] || f[20] != 58 || f[54] != 135 {
        return None;
    }
    let t: [u8; 16] = f[62..78].try_into().unwrap();
    Some(Ipv6Addr::from(t))
}

/// A raw AF_PACKET socket on one interface (pktio's own), to inject and capture frames.
struct PacketSocket(pktio::capture::RawSocket);

impl PacketSocket {
    fn open(ifname: &str) -> PacketSocket {
        PacketSocket(pktio::capture::RawSocket::bind(ifname).expect("AF_PACKET socket"))
    }

    fn send(&self, frame: &[u8]) {
        self.0.send(frame).expect("AF_PACKET send");
    }

    /// Frames that arrived (not ones this host sent) until `done` is satisfied or `wait`
    /// passed.
    fn capture(&self, wait: Duration, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        for _ in 0..MAX_ROUNDS {
            // Bound: the socket's receive queue; each pass consumes a frame or ends.
            while let Some(n) = self
                .0
                .recv(&mut buf, Duration::from_millis(1))
                .expect("AF_PACKET recv")
            {
                got.push(buf[..n].to_vec());
            }
            if done(&got) || start.elapsed() > wait {
                break;
            }
            std::thread::sleep(ROUND);
        }
        got
    }
}

#[test]
fn host_traffic_reaches_the_kernel_and_never_the_socket() {
    if skip("host_traffic_reaches_the_kernel_and_never_the_socket") {
        return;
    }
    host_traffic_passes(XdpMode::Native);
}

#[test]
fn host_traffic_reaches_the_kernel_in_generic_mode_too() {
    if skip("host_traffic_reaches_the_kernel_in_generic_mode_too") {
        return;
    }
    host_traffic_passes(XdpMode::Generic);
}

fn host_traffic_passes(mode: XdpMode) {
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_filter_in(mode);
    // Tables as on a real uplink, none of them naming the SSH port.
    prog.allow_prefix("10.96.0.0/16".parse().unwrap()).unwrap();
    prog.allow_prefix("10.244.0.0/16".parse().unwrap()).unwrap();
    prog.allow_port(IpAddr::V4(NODE), Protocol::Tcp, 30080)
        .unwrap();
    prog.own_address(IpAddr::V4(OWNED)).unwrap();
    prog.add_node_address(IpAddr::V4(NODE)).unwrap();
    prog.set_vxlan_port(8472).unwrap();
    eprintln!(
        "filter on va in {:?} mode, link {}",
        prog.mode(),
        prog.link_id().unwrap()
    );

    assert!(
        lab.tcp_to_node_kernel(SSH),
        "TCP to the node's SSH port reaches its kernel"
    );
    let seen = xsk_frames(&mut dev, QUIET, |_| false);
    assert!(
        !seen
            .iter()
            .any(|f| matches!(ipv4_flow(f), Some((6, _, SSH)))),
        "no frame of the SSH connection reached AF_XDP"
    );
    assert!(
        !seen.iter().any(|f| matches!(arp(f), Some((_, _, NODE)))),
        "ARP for the node's own address is the kernel's"
    );
    let s = prog.stats().unwrap();
    eprintln!("AF_XDP saw {} frames; {s:?}", seen.len());
    assert!(s.passed >= 3, "handshake and data passed: {s:?}");
    assert_eq!(s.port + s.prefix + s.redirect_all, 0, "{s:?}");
}

#[test]
fn service_prefix_goes_to_the_socket_not_the_kernel() {
    if skip("service_prefix_goes_to_the_socket_not_the_kernel") {
        return;
    }
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_filter();
    // The node's kernel has the ClusterIP on lo and listens there, so it would get the
    // datagram if the filter passed it.
    let kernel = lab.node_udp(CLUSTER_IP, 53);
    prog.allow_prefix("10.96.0.10/32".parse().unwrap()).unwrap();

    lab.udp_from_outside(CLUSTER_IP, 53, b"query 1");
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 17, CLUSTER_IP, 53))
    });
    assert!(
        seen.iter()
            .any(|f| is_flow(f, 17, CLUSTER_IP, 53) && f.ends_with(b"query 1")),
        "UDP to the ClusterIP arrived on AF_XDP"
    );
    let mut buf = [0u8; 64];
    assert!(
        kernel.recv_from(&mut buf).is_err(),
        "and not at the kernel's socket"
    );
    assert_eq!(prog.stats().unwrap().prefix, 1);

    // Without the prefix the same datagram is the kernel's: the control for the above.
    prog.remove_prefix("10.96.0.10/32".parse().unwrap())
        .unwrap();
    assert!(prog.tables().prefixes.is_empty());
    lab.udp_from_outside(CLUSTER_IP, 53, b"query 2");
    kernel.set_read_timeout(Some(DEADLINE)).unwrap();
    let (n, _) = kernel
        .recv_from(&mut buf)
        .expect("the kernel gets it once the prefix is gone");
    assert_eq!(&buf[..n], b"query 2");
    let seen = xsk_frames(&mut dev, QUIET, |_| false);
    assert!(!seen.iter().any(|f| is_flow(f, 17, CLUSTER_IP, 53)));
}

#[test]
fn a_stamping_program_writes_the_time_it_saw_each_frame_before_the_packet() {
    if skip("a_stamping_program_writes_the_time_it_saw_each_frame_before_the_packet") {
        return;
    }
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_stamping_filter();
    prog.allow_prefix("10.96.0.10/32".parse().unwrap()).unwrap();
    // The node's kernel listens on the ClusterIP: what passes reaches it untouched.
    let kernel = lab.node_udp(CLUSTER_IP, 53);
    let mut stamped = Vec::new();
    for i in 0..3 {
        let payload = format!("stamped {i}");
        let sent = pktio::stamp_clock();
        lab.udp_from_outside(CLUSTER_IP, 53, payload.as_bytes());
        let start = Instant::now();
        let mut burst = Vec::with_capacity(BURST);
        let mut found = None;
        while found.is_none() && start.elapsed() < DEADLINE {
            for port in 0..dev.port_count() {
                burst.clear();
                dev.recv(port, &mut burst, BURST);
                for &f in &burst {
                    let taken = pktio::stamp_clock();
                    let packet = dev.packet_mut(f);
                    // The whole frame as sent, from its Ethernet header: the stamp is off.
                    if is_flow(packet, 17, CLUSTER_IP, 53) && packet.ends_with(payload.as_bytes()) {
                        found = Some((dev.rx_stamp(f), sent, taken));
                    }
                    dev.free(f);
                }
            }
            dev.flush();
            std::thread::sleep(ROUND);
        }
        let (stamp, sent, taken) = found.expect("the datagram reached AF_XDP");
        let stamp = stamp.expect("room for the stamp in the headroom");
        assert!(
            sent <= stamp && stamp <= taken,
            "stamped between sending and taking: {sent} <= {stamp} <= {taken}"
        );
        stamped.push(stamp);
    }
    assert!(stamped.windows(2).all(|w| w[0] < w[1]), "{stamped:?}");
    assert_eq!(prog.stats().unwrap().prefix, 3);
    // What the filter passes is the kernel's, untouched.
    prog.remove_prefix("10.96.0.10/32".parse().unwrap())
        .unwrap();
    lab.udp_from_outside(CLUSTER_IP, 53, b"passed");
    kernel.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = kernel.recv_from(&mut buf).expect("the kernel gets it");
    assert_eq!(&buf[..n], b"passed");
}

#[test]
fn node_port_is_redirected_and_other_ports_of_the_node_pass() {
    if skip("node_port_is_redirected_and_other_ports_of_the_node_pass") {
        return;
    }
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_filter();
    let node = IpAddr::V4(NODE);
    prog.allow_port(node, Protocol::Tcp, 30080).unwrap();
    prog.allow_port_range(node, Protocol::Udp, 40000..=40100)
        .unwrap();

    // The kernel listens on the NodePort too: it must not get the connection.
    let kernel_nodeport = in_ns(&lab.node, || TcpListener::bind((NODE, 30080)).unwrap());
    kernel_nodeport.set_nonblocking(true).unwrap();
    let refused = in_ns(&lab.outside, || {
        TcpStream::connect_timeout(&SocketAddr::from((NODE, 30080)), QUIET)
    });
    assert!(
        refused.is_err(),
        "the NodePort's SYN never reached the kernel"
    );
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 6, NODE, 30080))
    });
    assert!(
        seen.iter().any(|f| is_flow(f, 6, NODE, 30080)),
        "SYN to the NodePort on AF_XDP"
    );
    assert!(matches!(
        kernel_nodeport.accept(),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    ));
    assert!(
        lab.tcp_to_node_kernel(30081),
        "the next port of the same address is the kernel's"
    );
    let seen = xsk_frames(&mut dev, QUIET, |_| false);
    assert!(!seen.iter().any(|f| is_flow(f, 6, NODE, 30081)));

    // A port range: inside goes to AF_XDP, outside to the kernel.
    let kernel_in = lab.node_udp(NODE, 40050);
    let kernel_out = lab.node_udp(NODE, 40200);
    lab.udp_from_outside(NODE, 40050, b"in range");
    lab.udp_from_outside(NODE, 40200, b"out of range");
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 17, NODE, 40050))
    });
    assert!(seen.iter().any(|f| is_flow(f, 17, NODE, 40050)));
    assert!(!seen.iter().any(|f| is_flow(f, 17, NODE, 40200)));
    let mut buf = [0u8; 64];
    assert!(kernel_in.recv_from(&mut buf).is_err());
    kernel_out.set_read_timeout(Some(DEADLINE)).unwrap();
    let (n, _) = kernel_out.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"out of range");

    // ICMP errors about a flow from a kxdp port (masquerade) go to AF_XDP; about any other
    // flow of the node, to the kernel, whose connected socket then reports the refusal.
    let (masq, host) = in_ns(&lab.node, || {
        let masq = UdpSocket::bind((NODE, 40060)).unwrap();
        let host = UdpSocket::bind((NODE, 45000)).unwrap();
        for s in [&masq, &host] {
            s.connect((OUTSIDE, 9)).unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
        }
        (masq, host)
    });
    masq.send(b"to a closed port").unwrap();
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| icmp_unreachable(f))
    });
    assert!(
        seen.iter().any(|f| icmp_unreachable(f)),
        "port unreachable about 40060 on AF_XDP"
    );
    masq.set_read_timeout(Some(QUIET)).unwrap();
    let err = masq.recv(&mut buf).unwrap_err();
    assert_ne!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "the kernel never saw it"
    );
    host.send(b"to a closed port").unwrap();
    let err = host.recv(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "the kernel got this one"
    );

    // VXLAN to the node address on the configured port only.
    prog.add_node_address(node).unwrap();
    prog.set_vxlan_port(8472).unwrap();
    let kernel_other = lab.node_udp(NODE, 8473);
    lab.udp_from_outside(NODE, 8472, b"vxlan");
    lab.udp_from_outside(NODE, 8473, b"not vxlan");
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 17, NODE, 8472))
    });
    assert!(seen.iter().any(|f| is_flow(f, 17, NODE, 8472)));
    kernel_other.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(kernel_other.recv_from(&mut buf).unwrap().0, 9);

    let s = prog.stats().unwrap();
    eprintln!("{s:?}");
    assert!(
        s.port >= 1 && s.port_range == 1 && s.vxlan == 1 && s.icmp_error == 1,
        "{s:?}"
    );

    // Removing the NodePort gives it back to the kernel.
    prog.remove_port(node, Protocol::Tcp, 30080).unwrap();
    drop(kernel_nodeport);
    assert!(lab.tcp_to_node_kernel(30080));

    // Redirect-all takes everything, the SSH port included; filtering again gives it back.
    prog.set_steering(Steering::RedirectAll).unwrap();
    assert!(
        !lab.tcp_to_node_kernel(SSH),
        "redirect-all: even SSH goes to AF_XDP"
    );
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 6, NODE, SSH))
    });
    assert!(seen.iter().any(|f| is_flow(f, 6, NODE, SSH)));
    prog.set_steering(Steering::Filter).unwrap();
    assert!(lab.tcp_to_node_kernel(SSH + 1));
}

#[test]
fn arp_and_neighbour_discovery_for_owned_addresses_only() {
    if skip("arp_and_neighbour_discovery_for_owned_addresses_only") {
        return;
    }
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_filter();
    prog.own_address(IpAddr::V4(OWNED)).unwrap();
    let owned6: Ipv6Addr = "fd00:77::10".parse().unwrap();
    let other6: Ipv6Addr = "fd00:77::11".parse().unwrap();
    prog.own_address(IpAddr::V6(owned6)).unwrap();
    let mac = lab.vb_mac();
    let vb = lab.outside_packet_socket();

    // ARP for the owned address: on AF_XDP, and the kernel (which has it on lo) is silent.
    vb.send(&arp_request(mac, OWNED));
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| arp(f) == Some((1, OUTSIDE, OWNED)))
    });
    assert!(
        seen.iter().any(|f| arp(f) == Some((1, OUTSIDE, OWNED))),
        "owned ARP on AF_XDP"
    );
    let replies = vb.capture(QUIET, |_| false);
    assert!(
        !replies.iter().any(|f| arp(f) == Some((2, OWNED, OUTSIDE))),
        "the kernel never saw the request for the owned address"
    );

    // ARP for the node's own address: the kernel answers, AF_XDP sees nothing.
    vb.send(&arp_request(mac, NODE));
    let replies = vb.capture(DEADLINE, |got| {
        got.iter().any(|f| arp(f) == Some((2, NODE, OUTSIDE)))
    });
    assert!(
        replies.iter().any(|f| arp(f) == Some((2, NODE, OUTSIDE))),
        "kernel answered"
    );
    let seen = xsk_frames(&mut dev, QUIET, |_| false);
    assert!(!seen.iter().any(|f| matches!(arp(f), Some((_, _, NODE)))));

    // Disowning gives the owned address's ARP back to the kernel, which answers.
    prog.disown_address(IpAddr::V4(OWNED)).unwrap();
    vb.send(&arp_request(mac, OWNED));
    let replies = vb.capture(DEADLINE, |got| {
        got.iter().any(|f| arp(f) == Some((2, OWNED, OUTSIDE)))
    });
    assert!(replies.iter().any(|f| arp(f) == Some((2, OWNED, OUTSIDE))));

    // Neighbour solicitations: the owned target on AF_XDP, another one not.
    vb.send(&neighbour_solicitation(mac, owned6));
    vb.send(&neighbour_solicitation(mac, other6));
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| ns_target(f) == Some(owned6))
    });
    assert!(seen.iter().any(|f| ns_target(f) == Some(owned6)));
    assert!(!seen.iter().any(|f| ns_target(f) == Some(other6)));
    let s = prog.stats().unwrap();
    eprintln!("{s:?}");
    assert_eq!((s.arp, s.ndp), (1, 1), "{s:?}");
}

/// The child side of the crash tests: enters the node namespace named by `CHILD_NS`,
/// attaches a filter that captures the SSH port, prints the link id and sleeps until killed
/// (at most a minute, should the parent die first). Ignored unless a parent runs it.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn child_holds_a_filter_until_killed() {
    let Ok(ns) = std::env::var(CHILD_NS) else {
        eprintln!("{CHILD_TEST}: only runs as the crash tests' child ({CHILD_NS} unset)");
        return;
    };
    netns::enter_thread(&ns).unwrap();
    let va = xsk::ifindex("va").unwrap();
    let queues = xsk::queue_count("va");
    let prog = XdpProgram::attach_filter(va, queues, XdpMode::Auto).unwrap();
    let pairs: Vec<(u32, u32)> = (0..queues).map(|q| (va, q)).collect();
    let dev = XskDevice::new(&pairs, &small_config()).unwrap();
    for q in 0..queues {
        prog.insert(q, dev.socket_fd(q as usize)).unwrap();
    }
    prog.allow_port(IpAddr::V4(NODE), Protocol::Tcp, SSH)
        .unwrap();
    println!("{CHILD_READY} {}", prog.link_id().unwrap());
    io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// A child process running [`child_holds_a_filter_until_killed`], killed by PID on drop.
struct FilterChild {
    child: Child,
    link_id: u32,
}

impl FilterChild {
    fn start(lab: &Lab) -> FilterChild {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_NS, lab.node.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut link_id = None;
        // Bound: the child prints a few lines and then the ready line, or exits (EOF).
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // libtest may have written "test NAME ... " on the same line first.
            if let Some((_, id)) = line.split_once(CHILD_READY) {
                link_id = Some(id.trim().parse().unwrap());
                break;
            }
        }
        let mut fc = FilterChild { child, link_id: 0 };
        fc.link_id = link_id.expect("the child attached its filter");
        fc
    }

    /// SIGKILL to the child's PID, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FilterChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `va` has no XDP program; false at the deadline.
fn wait_detached(lab: &Lab) -> bool {
    let start = Instant::now();
    for _ in 0..MAX_ROUNDS {
        if !lab.va_has_xdp() {
            return true;
        }
        if start.elapsed() > DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_killed_owner_leaves_no_program_and_the_kernel_gets_everything() {
    if skip("a_killed_owner_leaves_no_program_and_the_kernel_gets_everything") {
        return;
    }
    let lab = Lab::new();
    let mut child = FilterChild::start(&lab);
    assert!(lab.va_has_xdp(), "the child's filter is attached");
    assert!(
        !lab.tcp_to_node_kernel(SSH),
        "while it runs, its filter takes the SSH port"
    );

    child.kill();
    assert!(
        wait_detached(&lab),
        "the kernel released the link of the dead process"
    );
    assert!(
        lab.tcp_to_node_kernel(SSH),
        "after the crash the node's SSH port is reachable"
    );
}

#[test]
fn an_operator_detaches_a_live_owner_with_bpftool() {
    if skip("an_operator_detaches_a_live_owner_with_bpftool") {
        return;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        eprintln!("skipping an_operator_detaches_a_live_owner_with_bpftool: no bpftool (scripts/deps.sh installs it)");
        return;
    }
    let lab = Lab::new();
    let child = FilterChild::start(&lab);
    assert!(lab.va_has_xdp());

    // `ip link set dev va xdp off` talks netlink, which may not replace a BPF link.
    let off = lab.node.ip(&["link", "set", "dev", "va", "xdp", "off"]);
    eprintln!("ip link set dev va xdp off: {off:?}");
    assert!(off.is_err(), "netlink cannot remove a link-held program");
    assert!(lab.va_has_xdp());

    let out = Command::new("bpftool")
        .args(["link", "detach", "id", &child.link_id.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool link detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_detached(&lab), "detached while its owner still runs");
    assert!(lab.tcp_to_node_kernel(SSH));
    drop(child);
}

#[test]
fn replacing_the_tables_keeps_shared_entries_and_drops_stale_ones() {
    if skip("replacing_the_tables_keeps_shared_entries_and_drops_stale_ones") {
        return;
    }
    let lab = Lab::new();
    let (prog, mut dev) = lab.attach_filter();
    let node = IpAddr::V4(NODE);
    let old = FilterTables {
        prefixes: ["10.96.0.10/32".parse().unwrap()].into(),
        ports: [(node, Protocol::Tcp, 30080)].into(),
        owned: [IpAddr::V4(OWNED)].into(),
        ..FilterTables::default()
    };
    prog.replace_tables(&old).unwrap();
    assert_eq!(prog.tables(), old);
    let new = FilterTables {
        // The ClusterIP stays, the rest changes.
        prefixes: [
            "10.96.0.10/32".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ]
        .into(),
        ports: [(node, Protocol::Tcp, 30090)].into(),
        port_ranges: [((node, Protocol::Udp), 40000..=40100)].into(),
        node_addresses: [node].into(),
        vxlan_port: 8472,
        ..FilterTables::default()
    };
    prog.replace_tables(&new).unwrap();
    assert_eq!(prog.tables(), new);

    // The kept prefix still goes to AF_XDP, the new port too; the stale port and the
    // disowned address are the kernel's again.
    lab.udp_from_outside(CLUSTER_IP, 53, b"kept");
    let refused = in_ns(&lab.outside, || {
        TcpStream::connect_timeout(&SocketAddr::from((NODE, 30090)), QUIET)
    });
    assert!(refused.is_err());
    let seen = xsk_frames(&mut dev, DEADLINE, |got| {
        got.iter().any(|f| is_flow(f, 17, CLUSTER_IP, 53))
            && got.iter().any(|f| is_flow(f, 6, NODE, 30090))
    });
    assert!(seen.iter().any(|f| is_flow(f, 17, CLUSTER_IP, 53)));
    assert!(seen.iter().any(|f| is_flow(f, 6, NODE, 30090)));
    assert!(
        lab.tcp_to_node_kernel(30080),
        "the stale NodePort is the kernel's"
    );
    let vb = lab.outside_packet_socket();
    vb.send(&arp_request(lab.vb_mac(), OWNED));
    let replies = vb.capture(DEADLINE, |got| {
        got.iter().any(|f| arp(f) == Some((2, OWNED, OUTSIDE)))
    });
    assert!(replies.iter().any(|f| arp(f) == Some((2, OWNED, OUTSIDE))));

    // Emptying everything leaves a filter that passes all.
    prog.replace_tables(&FilterTables::default()).unwrap();
    assert_eq!(prog.tables(), FilterTables::default());
    assert!(lab.tcp_to_node_kernel(30090));
}
