//! The generator's frames: Ethernet / IPv4 / UDP with a payload that carries a magic
//! number, a sequence number and the transmit time, so the sink can tell its frames from
//! anything else on the link, count them, and measure one-way latency.
//!
//! Sizes are Ethernet frame lengths without the FCS (what AF_XDP transmits and receives):
//! 64 to 1514 bytes. A "64-byte packet" here is 64 bytes on the ring, 68 on the wire with
//! the FCS; the smallest frame that carries the 22-byte payload below is 64.
//!
//! Payload (after the UDP header, big-endian): magic `u32`, sequence `u64`, transmit time
//! `u64` in nanoseconds since the run's epoch, then zeros to the frame size. Flows rotate
//! the UDP source port (and past 65535 − base ports, the source address); destinations
//! rotate through the destination set.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Marks a bench frame: ASCII "kxbp".
pub const MAGIC: u32 = 0x6b78_6270;
/// Ethernet + IPv4 (no options) + UDP headers.
pub const HEADERS: usize = 14 + 20 + 8;
/// Magic, sequence, timestamp.
pub const PAYLOAD: usize = 4 + 8 + 8;
/// Smallest frame the generator sends.
pub const MIN_FRAME: usize = 64;
/// Largest frame on a 1500-byte MTU link.
pub const MAX_FRAME: usize = 1514;
/// Offset of the payload in a frame.
const PAYLOAD_AT: usize = HEADERS;

/// What varies between the generator's frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSet {
    /// Source MAC (the generator's interface).
    pub src_mac: [u8; 6],
    /// Destination MAC (the next hop: the sink, or the device under test).
    pub dst_mac: [u8; 6],
    /// Source address of flow 0.
    pub src_ip: Ipv4Addr,
    /// Source port of flow 0; flow f uses `src_port + f` while that stays a port number.
    pub src_port: u16,
    /// Distinct source (address, port) pairs; frame `seq` belongs to flow `seq % flows`.
    pub flows: u32,
    /// Destinations; frame `seq` goes to `dests[seq % dests.len()]`.
    pub dests: Vec<SocketAddrV4>,
}

impl FlowSet {
    /// Source address and port of flow `f`.
    pub fn source(&self, f: u32) -> (Ipv4Addr, u16) {
        let per_ip = u32::from(u16::MAX - self.src_port) + 1;
        let ip = u32::from(self.src_ip).wrapping_add(f / per_ip);
        (Ipv4Addr::from(ip), self.src_port + (f % per_ip) as u16)
    }
}

/// A bench frame as the sink reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Frame length.
    pub len: usize,
    /// Sequence number.
    pub seq: u64,
    /// Transmit time, ns since the run's epoch.
    pub tx_ns: u64,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
}

/// One's-complement sum of `data` as big-endian 16-bit words (RFC 1071), unfolded.
fn sum16(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes frame `seq` of `flows`, `size` bytes long, stamped `tx_ns`, into `buf`; returns
/// the length written. Panics if `size` is outside [`MIN_FRAME`]..=[`MAX_FRAME`] or `buf`
/// is shorter (the generator checks sizes at start-up).
pub fn write(buf: &mut [u8], size: usize, flows: &FlowSet, seq: u64, tx_ns: u64) -> usize {
    assert!((MIN_FRAME..=MAX_FRAME).contains(&size), "frame size {size}");
    let f = &mut buf[..size];
    let (src_ip, src_port) = flows.source((seq % u64::from(flows.flows.max(1))) as u32);
    let dst = flows.dests[(seq % flows.dests.len() as u64) as usize];
    // Ethernet.
    f[0..6].copy_from_slice(&flows.dst_mac);
    f[6..12].copy_from_slice(&flows.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: no options, DF, TTL 64, UDP.
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&0u16.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = fold(sum16(ip));
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // UDP, then the payload, then zeros.
    let udp_len = (size - 34) as u16;
    f[34..36].copy_from_slice(&src_port.to_be_bytes());
    f[36..38].copy_from_slice(&dst.port().to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f[40..42].copy_from_slice(&[0, 0]);
    f[PAYLOAD_AT..PAYLOAD_AT + 4].copy_from_slice(&MAGIC.to_be_bytes());
    f[PAYLOAD_AT + 4..PAYLOAD_AT + 12].copy_from_slice(&seq.to_be_bytes());
    f[PAYLOAD_AT + 12..PAYLOAD_AT + 20].copy_from_slice(&tx_ns.to_be_bytes());
    f[PAYLOAD_AT + PAYLOAD..].fill(0);
    // UDP checksum over the pseudo-header and the datagram; 0 is sent as 0xffff.
    let mut sum = sum16(&f[26..34]) + 17 + u32::from(udp_len);
    sum += sum16(&f[34..size]);
    let udp_sum = match fold(sum) {
        0 => 0xffff,
        s => s,
    };
    f[40..42].copy_from_slice(&udp_sum.to_be_bytes());
    size
}

/// Reads a bench frame; `None` for anything else (wrong EtherType, IP options, not UDP, too
/// short, no magic). Checksums are not verified: a device under test that rewrites headers
/// is checked by the tests that own it.
pub fn parse(frame: &[u8]) -> Option<Probe> {
    if frame.len() < HEADERS + PAYLOAD
        || frame[12..14] != [0x08, 0x00]
        || frame[14] != 0x45
        || frame[23] != 17
    {
        return None;
    }
    let u32_at =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&frame[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let u16_at = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    if u32_at(PAYLOAD_AT) != MAGIC {
        return None;
    }
    Some(Probe {
        len: frame.len(),
        seq: u64_at(PAYLOAD_AT + 4),
        tx_ns: u64_at(PAYLOAD_AT + 12),
        src: SocketAddrV4::new(Ipv4Addr::from(u32_at(26)), u16_at(34)),
        dst: SocketAddrV4::new(Ipv4Addr::from(u32_at(30)), u16_at(36)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn flows() -> FlowSet {
        FlowSet {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_port: 65530,
            flows: 10,
            dests: vec![
                "172.30.0.10:80".parse().unwrap(),
                "172.30.0.11:80".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn frames_are_valid_udp_that_etherparse_reads_back() {
        for size in [64, 65, 128, 1514] {
            let mut buf = vec![0xaa; 2048];
            let n = write(&mut buf, size, &flows(), 7, 123_456_789);
            assert_eq!(n, size);
            let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("IPv4")
            };
            assert_eq!(ip.header().total_len() as usize, size - 14);
            assert!(
                ip.header().to_header().calc_header_checksum() == ip.header().header_checksum()
            );
            let Some(TransportSlice::Udp(udp)) = p.transport else {
                panic!("UDP")
            };
            let want = udp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), want, "UDP checksum, size {size}");
            assert_eq!(udp.length() as usize, size - 34);
        }
    }

    #[test]
    fn parse_reads_what_write_wrote() {
        let mut buf = [0u8; 64];
        let f = flows();
        write(&mut buf, 64, &f, 13, 42);
        let p = parse(&buf).unwrap();
        assert_eq!((p.len, p.seq, p.tx_ns), (64, 13, 42));
        // Flow 13 % 10 = 3: ports 65530..=65535 on 10.0.0.1, then 10.0.0.2 from 65530.
        assert_eq!(p.src, "10.0.0.1:65533".parse().unwrap());
        assert_eq!(p.dst, "172.30.0.11:80".parse().unwrap());
        write(&mut buf, 64, &f, 7, 42);
        assert_eq!(parse(&buf).unwrap().src, "10.0.0.2:65531".parse().unwrap());
    }

    #[test]
    fn other_frames_are_not_bench_frames() {
        let mut buf = [0u8; 64];
        write(&mut buf, 64, &flows(), 1, 1);
        assert!(parse(&buf[..41]).is_none(), "too short");
        let mut arp = buf;
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(parse(&arp).is_none());
        let mut nomagic = buf;
        nomagic[HEADERS] ^= 1;
        assert!(parse(&nomagic).is_none());
    }
}
