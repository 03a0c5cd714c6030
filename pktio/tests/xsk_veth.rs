//! AF_XDP against real veth pairs, inside network namespaces these tests create and delete.
//!
//! Root only: without root each test says so and passes. Nothing here touches the root
//! namespace's interfaces: every veth and every XDP attachment lives in a namespace owned by a
//! [`NetnsGuard`], deleted when the test ends, also on failure. Frames carry the local
//! experimental EtherType 0x88b5 and a sequence number, so the kernel's own chatter (IPv6
//! neighbour discovery on a fresh link) is told apart and ignored.

use std::time::{Duration, Instant};

use pktio::netns::{self, in_ns, NetnsGuard};
use pktio::xsk::{self, XdpMode, XdpProgram, XskConfig, XskDevice};
use pktio::{Device, DeviceExt, Frame};

/// IEEE 802 local experimental EtherType: nothing else on the link uses it.
const ETHERTYPE: u16 = 0x88b5;
/// Frames per test: one worker burst (`dataplane::worker::BURST`).
const N: usize = 64;
/// Longest any wait loop runs.
const DEADLINE: Duration = Duration::from_secs(5);
/// Upper bound on polling rounds in any wait loop (each sleeps `ROUND`).
const MAX_ROUNDS: usize = 5000;
/// Pause between polling rounds.
const ROUND: Duration = Duration::from_millis(1);

fn skip(test: &str) -> bool {
    if netns::is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root to create network namespaces and attach XDP");
    true
}

/// A veth pair `a`–`b`, both ends in `ns`, both up. Native XDP on veth needs the peer up
/// too; NAPI on the XDP side is switched on by the attachment.
fn veth(ns: &NetnsGuard, a: &str, b: &str) {
    ns.ip(&["link", "add", "name", a, "type", "veth", "peer", "name", b])
        .unwrap();
    ns.ip(&["link", "set", "dev", a, "up"]).unwrap();
    ns.ip(&["link", "set", "dev", b, "up"]).unwrap();
}

/// Test frame `seq`: broadcast, our EtherType, the sequence number, then a pattern; lengths
/// vary from 60 to about 1500 bytes.
fn test_frame(seq: usize) -> Vec<u8> {
    let len = 60 + (seq * 97) % 1440;
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&(seq as u32).to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (i + seq) as u8;
    }
    f
}

fn is_test_frame(bytes: &[u8]) -> bool {
    bytes.len() >= 18 && bytes[12..14] == ETHERTYPE.to_be_bytes()
}

/// A raw AF_PACKET socket on one interface (pktio's own), to inject and capture frames
/// beside AF_XDP.
struct PacketSocket(pktio::capture::RawSocket);

impl PacketSocket {
    fn open(ifname: &str) -> PacketSocket {
        PacketSocket(pktio::capture::RawSocket::bind(ifname).expect("AF_PACKET socket"))
    }

    fn send(&self, frame: &[u8]) {
        self.0.send(frame).expect("AF_PACKET send");
    }

    /// One frame that arrived on the interface (not one it sent), if any is waiting.
    fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        let n = self
            .0
            .recv(&mut buf, Duration::from_millis(1))
            .expect("AF_PACKET recv")?;
        buf.truncate(n);
        Some(buf)
    }
}

/// Polls `port` until `want` test frames arrived or the deadline passed; frees everything
/// it receives and returns the test frames' bytes.
fn recv_test_frames(dev: &mut XskDevice, port: usize, want: usize, wait: Duration) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut burst = Vec::with_capacity(N);
    for _ in 0..MAX_ROUNDS {
        burst.clear();
        dev.recv(port, &mut burst, N);
        for &f in &burst {
            let bytes = dev.packet_mut(f).to_vec();
            if is_test_frame(&bytes) {
                got.push(bytes);
            }
            dev.free(f);
        }
        dev.flush();
        if got.len() >= want || start.elapsed() > wait {
            break;
        }
        if burst.is_empty() {
            std::thread::sleep(ROUND);
        }
    }
    got
}

/// Flushes `dev` and captures test frames on `sock` until `want` arrived or the deadline.
fn capture(dev: &mut XskDevice, sock: &PacketSocket, want: usize) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    for _ in 0..MAX_ROUNDS {
        dev.flush();
        // Bound: at most `want` frames are taken per round.
        while got.len() < want {
            match sock.try_recv() {
                Some(f) if is_test_frame(&f) => got.push(f),
                Some(_) => {}
                None => break,
            }
        }
        if got.len() >= want || start.elapsed() > DEADLINE {
            break;
        }
        std::thread::sleep(ROUND);
    }
    got
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

/// Receive N frames on `a` through AF_XDP, then transmit N frames out of `a`, in `mode`.
fn receive_and_transmit(mode: XdpMode) {
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va", "vb");
    in_ns(&ns, || {
        let a = xsk::ifindex("va").unwrap();
        let queues = xsk::queue_count("va");
        let prog = XdpProgram::attach(a, queues, mode).unwrap();
        eprintln!(
            "veth va: {queues} queue(s), XDP asked {mode:?}, got {:?}",
            prog.mode()
        );
        if mode != XdpMode::Auto {
            assert_eq!(prog.mode(), mode);
        }
        let cfg = small_config();
        let mut dev = XskDevice::new(&[(a, 0)], &cfg).unwrap();
        prog.insert(0, dev.socket_fd(0)).unwrap();
        let sent: Vec<Vec<u8>> = (0..N).map(test_frame).collect();

        let b = PacketSocket::open("vb");
        for f in &sent {
            b.send(f);
        }
        let got = recv_test_frames(&mut dev, 0, N, DEADLINE);
        assert_eq!(got.len(), N, "frames redirected into the AF_XDP socket");
        assert_eq!(got, sent, "received bytes equal sent bytes, in order");

        let capture_b = PacketSocket::open("vb");
        for f in &sent {
            let mut frame: Frame = dev.alloc().expect("a free frame");
            assert_eq!(dev.headroom(frame), xsk::XDP_PACKET_HEADROOM as usize);
            frame.len = f.len() as u32;
            dev.packet_mut(frame).copy_from_slice(f);
            assert!(dev.send(0, frame));
        }
        let out = capture(&mut dev, &capture_b, N);
        assert_eq!(out.len(), N, "frames transmitted out of a arrive at b");
        assert_eq!(out, sent);

        // Every chunk comes home: completions reaped, fill ring topped up, nothing leaked.
        // Late kernel chatter (IPv6 neighbour discovery from vb) is drained and freed.
        let mut late = Vec::with_capacity(N);
        for _ in 0..MAX_ROUNDS {
            late.clear();
            dev.recv(0, &mut late, N);
            for &f in &late {
                dev.free(f);
            }
            dev.flush();
            if dev.free_frames() + dev.fill_share() as usize == cfg.frame_count as usize {
                break;
            }
            std::thread::sleep(ROUND);
        }
        assert_eq!(
            dev.free_frames() + dev.fill_share() as usize,
            cfg.frame_count as usize
        );
        let s = dev.stats();
        eprintln!("stats: {s:?}");
        assert!(s.rx_frames >= N as u64);
        assert_eq!(s.tx_frames, N as u64);
        assert_eq!(
            (s.tx_ring_full, s.alloc_failed, s.kernel_tx_invalid),
            (0, 0, 0)
        );
        assert!(s.wakeups > 0, "copy-mode TX needs sendto wake-ups");
    });
}

#[test]
fn receive_and_transmit_native() {
    if skip("receive_and_transmit_native") {
        return;
    }
    receive_and_transmit(XdpMode::Native);
}

#[test]
fn receive_and_transmit_generic() {
    if skip("receive_and_transmit_generic") {
        return;
    }
    receive_and_transmit(XdpMode::Generic);
}

#[test]
fn two_ports_share_one_umem_and_forward_without_copy() {
    if skip("two_ports_share_one_umem_and_forward_without_copy") {
        return;
    }
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va1", "vb1");
    veth(&ns, "va2", "vb2");
    in_ns(&ns, || {
        let (a1, a2) = (xsk::ifindex("va1").unwrap(), xsk::ifindex("va2").unwrap());
        let p1 = XdpProgram::attach(a1, 1, XdpMode::Auto).unwrap();
        let p2 = XdpProgram::attach(a2, 1, XdpMode::Auto).unwrap();
        let mut dev = XskDevice::new(&[(a1, 0), (a2, 0)], &small_config()).unwrap();
        p1.insert(0, dev.socket_fd(0)).unwrap();
        p2.insert(0, dev.socket_fd(1)).unwrap();
        let sent: Vec<Vec<u8>> = (0..N).map(test_frame).collect();
        let b1 = PacketSocket::open("vb1");
        let b2 = PacketSocket::open("vb2");
        for f in &sent {
            b1.send(f);
        }
        // Forward every test frame from port 0 to port 1 as is: same chunk, same address.
        let start = Instant::now();
        let mut forwarded = 0;
        let mut burst = Vec::with_capacity(N);
        for _ in 0..MAX_ROUNDS {
            burst.clear();
            dev.recv(0, &mut burst, N);
            for &f in &burst {
                if is_test_frame(dev.packet_mut(f)) {
                    assert!(dev.send(1, f));
                    forwarded += 1;
                } else {
                    dev.free(f);
                }
            }
            dev.flush();
            if forwarded == N || start.elapsed() > DEADLINE {
                break;
            }
            if burst.is_empty() {
                std::thread::sleep(ROUND);
            }
        }
        assert_eq!(forwarded, N, "frames received on a1");
        let out = capture(&mut dev, &b2, N);
        assert_eq!(out.len(), N, "frames forwarded a1 → a2 arrive at b2");
        assert_eq!(out, sent);
        let s = dev.stats();
        assert_eq!(
            (s.tx_frames, s.alloc_failed),
            (N as u64, 0),
            "no copy: nothing allocated"
        );
    });
}

#[test]
fn removing_and_detaching_stops_the_redirect() {
    if skip("removing_and_detaching_stops_the_redirect") {
        return;
    }
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va", "vb");
    in_ns(&ns, || {
        let a = xsk::ifindex("va").unwrap();
        let prog = XdpProgram::attach(a, 1, XdpMode::Auto).unwrap();
        let link = ns.ip(&["link", "show", "dev", "va"]).unwrap();
        eprintln!(
            "XDP asked Auto, got {:?}; ip link: {}",
            prog.mode(),
            link.trim()
        );
        assert!(link.contains("xdp"), "program attached: {link}");
        let mut dev = XskDevice::new(&[(a, 0)], &small_config()).unwrap();
        let b = PacketSocket::open("vb");
        let send_some = |from: usize| {
            for seq in from..from + 8 {
                b.send(&test_frame(seq));
            }
        };
        let quiet = Duration::from_millis(300);

        prog.insert(0, dev.socket_fd(0)).unwrap();
        send_some(0);
        assert_eq!(
            recv_test_frames(&mut dev, 0, 8, DEADLINE).len(),
            8,
            "redirected"
        );

        prog.remove(0).unwrap();
        send_some(100);
        assert!(
            recv_test_frames(&mut dev, 0, 1, quiet).is_empty(),
            "an empty XSKMAP slot passes traffic to the kernel"
        );

        prog.insert(0, dev.socket_fd(0)).unwrap();
        send_some(200);
        assert_eq!(
            recv_test_frames(&mut dev, 0, 8, DEADLINE).len(),
            8,
            "redirected again"
        );

        drop(prog);
        let link = ns.ip(&["link", "show", "dev", "va"]).unwrap();
        assert!(!link.contains("xdp"), "link detached with its fd: {link}");
        send_some(300);
        assert!(
            recv_test_frames(&mut dev, 0, 1, quiet).is_empty(),
            "no redirect after detach"
        );
    });
}

/// What a successor process does with a running device (issue 20): the same sockets, UMEM
/// and link, taken over in place. Frames waiting in the RX ring and frames queued on the
/// TX ring at the handover are all delivered, the interface keeps its link (now running
/// the successor's program), and every chunk is accounted for.
#[test]
fn a_successor_takes_the_rings_and_the_link_in_place_and_loses_no_frame() {
    if skip("a_successor_takes_the_rings_and_the_link_in_place_and_loses_no_frame") {
        return;
    }
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va", "vb");
    in_ns(&ns, || {
        let a = xsk::ifindex("va").unwrap();
        let prog = XdpProgram::attach(a, 1, XdpMode::Auto).unwrap();
        let (link_id, old_program) = (prog.link_id().unwrap(), prog.program_id().unwrap());
        let cfg = small_config();
        let mut dev = XskDevice::new(&[(a, 0)], &cfg).unwrap();
        prog.insert(0, dev.socket_fd(0)).unwrap();
        let b = PacketSocket::open("vb");
        let capture_b = PacketSocket::open("vb");

        // Some frames taken by the predecessor, some left waiting in its RX ring, some
        // queued for sending and not yet flushed.
        for seq in 0..8 {
            b.send(&test_frame(seq));
        }
        assert_eq!(recv_test_frames(&mut dev, 0, 8, DEADLINE).len(), 8);
        let waiting: Vec<Vec<u8>> = (100..100 + N).map(test_frame).collect();
        for f in &waiting {
            b.send(f);
        }
        std::thread::sleep(Duration::from_millis(50));
        let queued: Vec<Vec<u8>> = (200..200 + N / 2).map(test_frame).collect();
        for f in &queued {
            let mut frame = dev.alloc().expect("a free frame");
            frame.len = f.len() as u32;
            dev.packet_mut(frame).copy_from_slice(f);
            assert!(dev.send(0, frame));
        }

        // The handover: duplicates stand for the descriptors passed over a socket.
        let umem = xsk::HandedUmem::map(dev.umem_fd().try_clone_to_owned().unwrap(), &cfg).unwrap();
        let (state, fds) = dev.handover();
        let fds: Vec<_> = fds
            .iter()
            .map(|f| f.try_clone_to_owned().unwrap())
            .collect();
        let next_prog = XdpProgram::load_detached(a, 1, xsk::Steering::RedirectAll).unwrap();
        let mut next =
            XskDevice::adopt(state, umem, fds, |i, q| (i == a && q == 0).then_some(0)).unwrap();
        next_prog.insert(0, next.socket_fd(0)).unwrap();
        let link = prog.link_fd().unwrap().try_clone_to_owned().unwrap();
        next_prog.take_link(link, prog.mode()).unwrap();
        drop(dev);
        drop(prog);
        assert_eq!(next_prog.link_id().unwrap(), link_id, "the same link");
        assert_ne!(
            next_prog.program_id().unwrap(),
            old_program,
            "running the new program"
        );

        // Compared by sequence number: a failure prints a line, not kilobytes.
        let seqs = |frames: &[Vec<u8>]| -> Vec<u32> {
            frames
                .iter()
                .map(|f| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
                .collect()
        };
        let got = recv_test_frames(&mut next, 0, N, DEADLINE);
        assert_eq!(
            got,
            waiting,
            "the frames waiting in the RX ring, in order: {:?}",
            seqs(&got)
        );
        let out = capture(&mut next, &capture_b, N / 2);
        assert_eq!(
            out,
            queued,
            "the frames queued on the TX ring, sent: {:?}",
            seqs(&out)
        );
        let after: Vec<Vec<u8>> = (300..300 + N).map(test_frame).collect();
        for f in &after {
            b.send(f);
        }
        let got = recv_test_frames(&mut next, 0, N, DEADLINE);
        assert_eq!(
            got,
            after,
            "redirected to the same socket after the predecessor let go: {:?}",
            seqs(&got)
        );
        // Every chunk comes home to the successor.
        for _ in 0..MAX_ROUNDS {
            next.flush();
            if next.free_frames() + next.fill_share() as usize == cfg.frame_count as usize {
                break;
            }
            std::thread::sleep(ROUND);
        }
        assert_eq!(
            next.free_frames() + next.fill_share() as usize,
            cfg.frame_count as usize
        );
        assert_eq!(next.stats().frames_lost, 0);
    });
}

#[test]
fn preferred_busy_polling_is_set_and_frames_still_flow() {
    if skip("preferred_busy_polling_is_set_and_frames_still_flow") {
        return;
    }
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va", "vb");
    in_ns(&ns, || {
        let a = xsk::ifindex("va").unwrap();
        let prog = XdpProgram::attach(a, xsk::queue_count("va"), XdpMode::Auto).unwrap();
        let mut dev = XskDevice::new(&[(a, 0)], &small_config()).unwrap();
        prog.insert(0, dev.socket_fd(0)).unwrap();
        let ids = dev.set_busy_poll(Some(64)).expect("busy polling set");
        // What veth gives an AF_XDP socket to busy-poll (README: none on current kernels).
        eprintln!("veth va in {:?} mode: NAPI ids {ids:?}", prog.mode());
        assert_eq!(ids.len(), 1, "one per port");

        let sent: Vec<Vec<u8>> = (0..N).map(test_frame).collect();
        let b = PacketSocket::open("vb");
        for f in &sent {
            b.send(f);
        }
        assert_eq!(recv_test_frames(&mut dev, 0, N, DEADLINE), sent);
        // A poll that finds the ring empty asks the kernel to poll the queue.
        let mut none = Vec::with_capacity(N);
        let before = dev.stats().busy_polls;
        dev.recv(0, &mut none, N);
        assert!(none.iter().all(|&f| !is_test_frame(dev.packet_mut(f))));
        let with = dev.stats().busy_polls;
        assert!(
            with > before || !none.is_empty(),
            "an empty poll busy-polls: {before} -> {with}"
        );
        for &f in &none {
            dev.free(f);
        }
        // Off again: an empty poll asks nothing.
        dev.set_busy_poll(None).expect("busy polling off");
        none.clear();
        dev.recv(0, &mut none, N);
        if none.is_empty() {
            assert_eq!(dev.stats().busy_polls, with);
        }
    });
}

#[test]
fn binding_a_missing_queue_says_what_to_check() {
    if skip("binding_a_missing_queue_says_what_to_check") {
        return;
    }
    let ns = NetnsGuard::new("kxdp-xsk").unwrap();
    veth(&ns, "va", "vb");
    in_ns(&ns, || {
        let a = xsk::ifindex("va").unwrap();
        let q = xsk::queue_count("va");
        let err = match XskDevice::new(&[(a, q + 7)], &small_config()) {
            Ok(_) => panic!("bound queue {} of a {q}-queue veth", q + 7),
            Err(e) => e.to_string(),
        };
        eprintln!("{err}");
        assert!(
            err.contains(&format!("bind AF_XDP socket to va queue {}", q + 7)),
            "{err}"
        );
        assert!(err.contains("ethtool -l"), "{err}");
    });
}
