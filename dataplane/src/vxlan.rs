//! VXLAN as flannel puts it on the wire, so kxdp nodes and flannel nodes share one overlay.
//!
//! Flannel's VXLAN backend is the kernel's vxlan device (`flannel.1`: VNI 1, UDP port 8472,
//! no learning, `df unset`, `ttl auto`, UDP checksums left at the kernel default). Each node
//! gives its device a MAC, its pod subnet's `.0` address and, for every other node, a route
//! `10.244.N.0/24 via 10.244.N.0 dev flannel.1 onlink`, a permanent neighbour entry
//! `10.244.N.0 → that node's VTEP MAC` and a bridge FDB entry `that MAC → that node's IP`.
//! A packet for a pod on node N therefore leaves as:
//!
//! ```text
//! outer Ethernet  uplink MAC → next hop's MAC, IPv4
//! outer IPv4      node IP → node N's IP, TTL 64, protocol UDP, ECN copied from the inner packet
//! UDP             source port hashed from the inner flow (32768..=60998), destination 8472
//! VXLAN           flags 0x08 (I: a VNI follows), VNI 1
//! inner Ethernet  our VTEP MAC → node N's VTEP MAC, then the pod's IP packet unchanged
//! ```
//!
//! Where [`encapsulate`] differs from the kernel, on purpose (checked against the kernel's
//! own device in `tests/vxlan_kernel.rs`):
//!
//! - **DF and IP ID.** The kernel leaves DF clear (`df unset`) and so must number every
//!   packet from a per-destination counter. This module keeps no state, so it sets DF and
//!   ID 0, which RFC 6864 allows for atomic datagrams. The pipeline never builds an outer
//!   packet larger than the uplink's MTU (it answers "fragmentation needed" for the inner
//!   packet instead); what is lost is fragmentation by a router whose MTU is smaller than
//!   the uplink's, where the kernel's packet would be fragmented and ours dropped.
//! - **UDP checksum.** Current kernels checksum VXLAN over IPv4 unless `noudpcsum` is given
//!   (flannel does not give it). We send zero, as RFC 7348 section 5 recommends and every
//!   receiver accepts over IPv4: computing it would sum the whole payload per packet. The
//!   inner packet keeps its own transport checksum end to end.
//! - **Source port.** Same range and the kernel's multiply-shift mapping, but hashed from
//!   kxdp's flow hash rather than the kernel's `skb_get_hash`: one flow keeps one port (one
//!   ECMP path), the value differs from the kernel's.
//!
//! Pure: frames in, offsets and frames out, no allocation, no panics on any input.
//! Encapsulation prepends the outer headers in the headroom before the frame, so the
//! payload is never copied.

use std::net::Ipv4Addr;

use nat::checksum;
use nat::packet::{ETH_IPV4, ETH_IPV6, ETH_LEN, PROTO_UDP};

/// Bytes VXLAN adds before the inner frame: outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
pub const VXLAN_OVERHEAD: usize = 50;
/// First UDP source port [`encapsulate`] uses: the kernel's default ephemeral range
/// (`net.ipv4.ip_local_port_range`), which its vxlan device uses when `srcport` is unset.
pub const SRC_PORT_MIN: u16 = 32768;
/// Last UDP source port [`encapsulate`] uses. The kernel's range ends at 60999, but
/// `udp_flow_src_port` maps a hash into `[min, max)`, so 60999 itself is never sent.
pub const SRC_PORT_MAX: u16 = 60998;
/// TTL of the outer IPv4 header: the kernel's `ttl auto` takes the route's hop limit,
/// `net.ipv4.ip_default_ttl`, 64 unless changed.
pub const OUTER_TTL: u8 = 64;

/// The VXLAN flags byte with the I bit: a valid VNI follows (RFC 7348 section 5).
const FLAG_I: u8 = 0x08;
/// Outer IPv4 length, UDP and VXLAN headers.
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const VXLAN_LEN: usize = 8;
/// The IPv4 "don't fragment" bit in the flags/fragment-offset word.
const IP_DF: u16 = 0x4000;
/// The "more fragments" bit and the fragment offset: either set means a fragment.
const IP_FRAGMENT: u16 = 0x3fff;
/// The ECN field of a TOS / traffic-class byte, and its "congestion experienced" value.
const ECN_MASK: u8 = 0b11;
const ECN_CE: u8 = 0b11;
const ECN_ECT0: u8 = 0b10;

/// This node's end of the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// VXLAN network identifier (flannel: 1). Only the low 24 bits go on the wire.
    pub vni: u32,
    /// UDP destination port (flannel: 8472, the kernel's pre-IANA default).
    pub port: u16,
    /// This node's VTEP address: the outer source, and the outer destination of what
    /// [`decapsulate`] accepts.
    pub local_vtep_ip: Ipv4Addr,
    /// The MAC of our VTEP, as the other nodes' neighbour tables know it: the inner
    /// Ethernet source of what we send.
    pub local_vtep_mac: [u8; 6],
    /// The uplink's own MAC: the outer Ethernet source.
    pub uplink_mac: [u8; 6],
}

/// The other end of one overlay packet: a node's VTEP and how to reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteVtep {
    /// The node's VTEP address: the outer IPv4 destination.
    pub ip: Ipv4Addr,
    /// The node's VTEP MAC (flannel's `VtepMAC` annotation): the inner Ethernet
    /// destination, which its kernel device accepts as addressed to itself.
    pub vtep_mac: [u8; 6],
    /// MAC of the next hop on the uplink towards `ip` (the node itself on one L2 segment,
    /// else the gateway): the outer Ethernet destination.
    pub next_hop_mac: [u8; 6],
}

/// Where the inner frame of a valid VXLAN packet is, and who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decap {
    /// Offset of the inner Ethernet frame from the start of the outer frame.
    pub inner_offset: usize,
    /// Length of the inner frame, as the UDP length gives it (outer Ethernet padding is
    /// not part of it).
    pub inner_len: usize,
    /// The sending VTEP (outer IPv4 source).
    pub outer_src: Ipv4Addr,
    /// The VNI of the packet (equal to the overlay's: anything else is refused).
    pub vni: u32,
}

/// Why a frame from the uplink is not a VXLAN packet for this node. Each is a distinct
/// reason a caller can count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapError {
    /// The frame ends before a header it needs, or before the length its IPv4 header
    /// announces; or the packet is too short to hold UDP, VXLAN and an inner Ethernet
    /// header.
    Truncated,
    /// Not IPv4 carrying UDP to the overlay's port (another EtherType, IP version,
    /// protocol or port).
    NotVxlan,
    /// The outer IPv4 header is malformed: header length under 20 bytes, or a total length
    /// shorter than the header.
    BadIpHeader,
    /// The outer IPv4 header checksum does not verify.
    BadChecksum,
    /// The outer packet is an IPv4 fragment; the dataplane does not reassemble.
    Fragment,
    /// The outer destination is not this node's VTEP address.
    NotForUs,
    /// The UDP length field is under 8 bytes or longer than the IPv4 payload.
    BadUdpLength,
    /// The VXLAN I flag is clear: no valid VNI.
    NoVni,
    /// A VNI other than the overlay's.
    WrongVni,
}

impl DecapError {
    /// Every reason, in declaration order (for counters and tests).
    pub const ALL: [DecapError; 9] = [
        DecapError::Truncated,
        DecapError::NotVxlan,
        DecapError::BadIpHeader,
        DecapError::BadChecksum,
        DecapError::Fragment,
        DecapError::NotForUs,
        DecapError::BadUdpLength,
        DecapError::NoVni,
        DecapError::WrongVni,
    ];

    /// A short snake_case name, for counter labels.
    pub const fn name(self) -> &'static str {
        match self {
            DecapError::Truncated => "truncated",
            DecapError::NotVxlan => "not_vxlan",
            DecapError::BadIpHeader => "bad_ip_header",
            DecapError::BadChecksum => "bad_checksum",
            DecapError::Fragment => "fragment",
            DecapError::NotForUs => "not_for_us",
            DecapError::BadUdpLength => "bad_udp_length",
            DecapError::NoVni => "no_vni",
            DecapError::WrongVni => "wrong_vni",
        }
    }
}

/// The outer UDP source port for a flow: the kernel's `udp_flow_src_port` mapping (fold to
/// 32 bits, `h ^= h << 16`, multiply-shift into `[32768, 60999)`), applied to kxdp's flow
/// hash. Equal hashes give equal ports, so a flow keeps its path through ECMP.
pub fn source_port(inner_hash: u64) -> u16 {
    let mut h = (inner_hash ^ (inner_hash >> 32)) as u32;
    h ^= h << 16;
    let span = (SRC_PORT_MAX - SRC_PORT_MIN + 1) as u64;
    SRC_PORT_MIN + ((h as u64 * span) >> 32) as u16
}

/// The outer TOS byte for an inner Ethernet frame: DSCP 0 (the kernel's `tos` default) and
/// the inner packet's ECN, with "congestion experienced" sent as ECT(0)
/// (`ip_tunnel_ecn_encap`, RFC 6040 normal mode). Not IP: 0.
fn outer_tos(inner: &[u8]) -> u8 {
    let ecn = match (packet_type(inner), inner.get(15)) {
        (Some(ETH_IPV4), Some(tos)) => tos & ECN_MASK,
        (Some(ETH_IPV6), Some(b)) => (b >> 4) & ECN_MASK,
        _ => 0,
    };
    if ecn == ECN_CE {
        ECN_ECT0
    } else {
        ecn
    }
}

fn packet_type(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]))
}

/// Encapsulates the Ethernet frame at `chunk[off..off + len]` for `remote`.
///
/// The inner Ethernet header is readdressed VTEP to VTEP (destination `remote.vtep_mac`,
/// source `overlay.local_vtep_mac`), as the kernel's vxlan device addresses it; the outer
/// Ethernet, IPv4, UDP and VXLAN headers are written into the [`VXLAN_OVERHEAD`] bytes
/// before `off`. `inner_hash` is the inner flow's hash and picks the UDP source port
/// ([`source_port`]). Returns the new offset and length (`off - 50`, `len + 50`).
///
/// `None`, with `chunk` untouched, when the headroom before `off` is under
/// [`VXLAN_OVERHEAD`], when `chunk` does not hold `off + len` bytes, when the frame is
/// shorter than an Ethernet header, or when the outer packet would exceed 65535 bytes.
pub fn encapsulate(
    chunk: &mut [u8],
    off: usize,
    len: usize,
    overlay: &Overlay,
    remote: &RemoteVtep,
    inner_hash: u64,
) -> Option<(usize, usize)> {
    let start = off.checked_sub(VXLAN_OVERHEAD)?;
    let end = off.checked_add(len)?;
    let ip_total = u16::try_from(len + IP_LEN + UDP_LEN + VXLAN_LEN).ok()?;
    if len < ETH_LEN || end > chunk.len() {
        return None;
    }
    let (head, inner) = chunk[start..end].split_at_mut(VXLAN_OVERHEAD);

    inner[0..6].copy_from_slice(&remote.vtep_mac);
    inner[6..12].copy_from_slice(&overlay.local_vtep_mac);

    let (eth, rest) = head.split_at_mut(ETH_LEN);
    eth[0..6].copy_from_slice(&remote.next_hop_mac);
    eth[6..12].copy_from_slice(&overlay.uplink_mac);
    eth[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());

    let (ip, rest) = rest.split_at_mut(IP_LEN);
    ip[0] = 0x45;
    ip[1] = outer_tos(inner);
    ip[2..4].copy_from_slice(&ip_total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&overlay.local_vtep_ip.octets());
    ip[16..20].copy_from_slice(&remote.ip.octets());
    let check = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());

    let (udp, vxlan) = rest.split_at_mut(UDP_LEN);
    udp[0..2].copy_from_slice(&source_port(inner_hash).to_be_bytes());
    udp[2..4].copy_from_slice(&overlay.port.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_total - IP_LEN as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);

    let vni = overlay.vni.to_be_bytes();
    vxlan.copy_from_slice(&[FLAG_I, 0, 0, 0, vni[1], vni[2], vni[3], 0]);

    Some((start, len + VXLAN_OVERHEAD))
}

/// Checks that `frame`, an Ethernet frame from the uplink, is a VXLAN packet for
/// `overlay` and locates its inner frame.
///
/// Checked: outer IPv4 (header length, total length against the frame, header checksum,
/// not a fragment, destination = our VTEP), UDP destination port and length, the VXLAN I
/// flag and VNI, and room for an inner Ethernet header. Reserved VXLAN bits are ignored
/// (RFC 7348); a non-zero UDP checksum is not verified (that would sum the payload; the
/// inner packet carries its own). Never panics, whatever the bytes.
pub fn decapsulate(frame: &[u8], overlay: &Overlay) -> Result<Decap, DecapError> {
    let ip = frame
        .get(ETH_LEN..ETH_LEN + IP_LEN)
        .ok_or(DecapError::Truncated)?;
    if packet_type(frame) != Some(ETH_IPV4) || ip[0] >> 4 != 4 || ip[9] != PROTO_UDP {
        return Err(DecapError::NotVxlan);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < IP_LEN || total < ihl {
        return Err(DecapError::BadIpHeader);
    }
    let packet = frame
        .get(ETH_LEN..ETH_LEN + total)
        .ok_or(DecapError::Truncated)?;
    if checksum::sum(&packet[..ihl], 0) != 0xffff {
        return Err(DecapError::BadChecksum);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IP_FRAGMENT != 0 {
        return Err(DecapError::Fragment);
    }
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if dst != overlay.local_vtep_ip {
        return Err(DecapError::NotForUs);
    }
    let payload = &packet[ihl..];
    let udp = payload.get(..UDP_LEN).ok_or(DecapError::Truncated)?;
    if u16::from_be_bytes([udp[2], udp[3]]) != overlay.port {
        return Err(DecapError::NotVxlan);
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if udp_len < UDP_LEN || udp_len > payload.len() {
        return Err(DecapError::BadUdpLength);
    }
    if udp_len < UDP_LEN + VXLAN_LEN + ETH_LEN {
        return Err(DecapError::Truncated);
    }
    let v = &payload[UDP_LEN..UDP_LEN + VXLAN_LEN];
    if v[0] & FLAG_I == 0 {
        return Err(DecapError::NoVni);
    }
    let vni = u32::from_be_bytes([0, v[4], v[5], v[6]]);
    if vni != overlay.vni {
        return Err(DecapError::WrongVni);
    }
    Ok(Decap {
        inner_offset: ETH_LEN + ihl + UDP_LEN + VXLAN_LEN,
        inner_len: udp_len - UDP_LEN - VXLAN_LEN,
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        vni,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADROOM: usize = 256;

    /// Node A (us) and node B, as in the kernel test.
    fn ours() -> Overlay {
        Overlay {
            vni: 1,
            port: 8472,
            local_vtep_ip: Ipv4Addr::new(192, 168, 0, 2),
            local_vtep_mac: [0x9a, 0x3c, 0x2e, 0, 0, 2],
            uplink_mac: [0x02, 0, 0, 0, 0, 0x0a],
        }
    }

    fn theirs() -> Overlay {
        Overlay {
            vni: 1,
            port: 8472,
            local_vtep_ip: Ipv4Addr::new(192, 168, 0, 3),
            local_vtep_mac: [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33],
            uplink_mac: [0x02, 0, 0, 0, 0, 0x0b],
        }
    }

    fn to_theirs() -> RemoteVtep {
        let t = theirs();
        RemoteVtep {
            ip: t.local_vtep_ip,
            vtep_mac: t.local_vtep_mac,
            next_hop_mac: t.uplink_mac,
        }
    }

    /// An inner Ethernet frame: IPv4/UDP from pod 10.244.1.5 to 10.244.2.7, with `tos`,
    /// `payload` bytes long, MACs of the pod and its gateway (which encapsulation
    /// replaces).
    fn inner_frame(tos: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN + 28 + payload];
        f[0..6].copy_from_slice(&[0xee; 6]);
        f[6..12].copy_from_slice(&[0x0a, 0x58, 10, 244, 1, 5]);
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let ip = &mut f[ETH_LEN..ETH_LEN + 20];
        ip[0] = 0x45;
        ip[1] = tos;
        ip[2..4].copy_from_slice(&((28 + payload) as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 63;
        ip[9] = PROTO_UDP;
        ip[12..16].copy_from_slice(&[10, 244, 1, 5]);
        ip[16..20].copy_from_slice(&[10, 244, 2, 7]);
        let c = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let udp = &mut f[ETH_LEN + 20..ETH_LEN + 28];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        for (i, b) in f[ETH_LEN + 28..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    /// `inner` encapsulated from us to them, and the chunk it lives in.
    fn encapsulated(inner: &[u8], hash: u64) -> Vec<u8> {
        let mut chunk = vec![0u8; HEADROOM + inner.len()];
        chunk[HEADROOM..].copy_from_slice(inner);
        let (off, len) = encapsulate(
            &mut chunk,
            HEADROOM,
            inner.len(),
            &ours(),
            &to_theirs(),
            hash,
        )
        .unwrap();
        chunk[off..off + len].to_vec()
    }

    /// Recomputes the outer IPv4 checksum after a test changed the header.
    fn fix_ip_checksum(frame: &mut [u8]) {
        frame[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    }

    /// xorshift64: deterministic bytes without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn round_trip_gives_back_the_inner_frame() {
        let inner = inner_frame(0, 100);
        let mut chunk = vec![0u8; HEADROOM + inner.len() + 64];
        chunk[HEADROOM..HEADROOM + inner.len()].copy_from_slice(&inner);
        let (off, len) =
            encapsulate(&mut chunk, HEADROOM, inner.len(), &ours(), &to_theirs(), 7).unwrap();
        assert_eq!((off, len), (HEADROOM - 50, inner.len() + 50));
        // Trailing bytes in the chunk (Ethernet padding, say) are not part of the inner frame.
        let d = decapsulate(&chunk[off..], &theirs()).unwrap();
        assert_eq!(
            d,
            Decap {
                inner_offset: 50,
                inner_len: inner.len(),
                outer_src: ours().local_vtep_ip,
                vni: 1,
            }
        );
        let got = &chunk[off + d.inner_offset..off + d.inner_offset + d.inner_len];
        assert_eq!(
            &got[0..6],
            &theirs().local_vtep_mac,
            "inner dst: their VTEP"
        );
        assert_eq!(&got[6..12], &ours().local_vtep_mac, "inner src: our VTEP");
        assert_eq!(&got[12..], &inner[12..], "the rest untouched");
    }

    #[test]
    fn outer_headers_byte_for_byte() {
        let inner = inner_frame(0, 4);
        let f = encapsulated(&inner, 0);
        #[rustfmt::skip]
        let mut want: Vec<u8> = vec![
            // Ethernet: next hop, uplink, IPv4.
            0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00,
            // IPv4: 20 + 8 + 8 + 46 = 82 bytes, ID 0, DF, TTL 64, UDP, checksum (below).
            0x45, 0x00, 0x00, 82, 0x00, 0x00, 0x40, 0x00, 64, 17, 0, 0,
            192, 168, 0, 2, 192, 168, 0, 3,
            // UDP: source port of hash 0 is the range's first, 8472, 62 bytes, checksum 0.
            0x80, 0x00, 0x21, 0x18, 0, 62, 0, 0,
            // VXLAN: I flag, VNI 1.
            0x08, 0, 0, 0, 0, 0, 1, 0,
        ];
        let c = checksum::checksum(&want[14..34]);
        want[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(&f[..50], &want[..]);
        assert_eq!(checksum::sum(&f[14..34], 0), 0xffff);
    }

    #[test]
    fn vni_uses_24_bits() {
        let inner = inner_frame(0, 0);
        let mut chunk = vec![0u8; HEADROOM + inner.len()];
        chunk[HEADROOM..].copy_from_slice(&inner);
        let mut o = ours();
        o.vni = 0x00ab_cdef;
        let (off, _) = encapsulate(&mut chunk, HEADROOM, inner.len(), &o, &to_theirs(), 0).unwrap();
        assert_eq!(
            &chunk[off + 42..off + 50],
            &[8, 0, 0, 0, 0xab, 0xcd, 0xef, 0]
        );
    }

    #[test]
    fn too_little_headroom_is_refused_and_nothing_written() {
        let inner = inner_frame(0, 10);
        for off in [0, 1, 49] {
            let mut chunk = vec![0u8; off + inner.len()];
            chunk[off..].copy_from_slice(&inner);
            let before = chunk.clone();
            let r = encapsulate(&mut chunk, off, inner.len(), &ours(), &to_theirs(), 0);
            assert_eq!(r, None, "off {off}");
            assert_eq!(chunk, before, "off {off}");
        }
        let mut chunk = vec![0u8; 50 + inner.len()];
        chunk[50..].copy_from_slice(&inner);
        let r = encapsulate(&mut chunk, 50, inner.len(), &ours(), &to_theirs(), 0);
        assert_eq!(r, Some((0, inner.len() + 50)));
    }

    #[test]
    fn frames_that_do_not_fit_are_refused() {
        let mut chunk = vec![0u8; 200];
        // Past the chunk's end, shorter than Ethernet, overflowing offsets, too big for IPv4.
        for (off, len) in [
            (100, 101),
            (100, 13),
            (100, 0),
            (usize::MAX, 1),
            (60, usize::MAX),
            (60, 65535 - 35),
        ] {
            assert_eq!(
                encapsulate(&mut chunk, off, len, &ours(), &to_theirs(), 0),
                None,
                "off {off} len {len}"
            );
        }
        let mut big = vec![0u8; 50 + 65535 - 36];
        let len = big.len() - 50;
        assert_eq!(
            encapsulate(&mut big, 50, len, &ours(), &to_theirs(), 0),
            Some((0, 65535 + 14))
        );
    }

    #[test]
    fn source_port_stays_in_the_kernels_range_and_follows_the_flow() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..100_000 {
            let h = rng.next();
            let p = source_port(h);
            assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&p), "{p}");
            assert_eq!(p, source_port(h));
            seen_low |= p < 33000;
            seen_high |= p > 60700;
        }
        assert!(seen_low && seen_high, "spread over the whole range");
        assert_eq!(source_port(0), SRC_PORT_MIN);
        assert_eq!(source_port(u32::MAX as u64), SRC_PORT_MIN);
        assert_eq!(source_port(0xffff), SRC_PORT_MAX);
    }

    #[test]
    fn outer_ecn_follows_the_inner_packet() {
        // (inner TOS, outer TOS): DSCP never copied, ECN copied, CE sent as ECT(0).
        for (tos, want) in [
            (0x00, 0),
            (0xb8, 0),
            (0x01, 1),
            (0x02, 2),
            (0x03, 2),
            (0xbb, 2),
        ] {
            let f = encapsulated(&inner_frame(tos, 0), 0);
            assert_eq!(f[15], want, "inner tos {tos:#x}");
        }
        // IPv6: the traffic class straddles bytes 0 and 1 of the header.
        let mut v6 = vec![0u8; ETH_LEN + 40];
        v6[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
        v6[14] = 0x6f;
        v6[15] = 0xd0; // traffic class 0xfd: DSCP 63, ECT(1)
        assert_eq!(encapsulated(&v6, 0)[15], 1);
        v6[15] = 0xf0; // ECN CE
        assert_eq!(encapsulated(&v6, 0)[15], 2);
        // ARP (and anything not IP): 0.
        let mut arp = vec![0xffu8; ETH_LEN + 28];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(encapsulated(&arp, 0)[15], 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let f = encapsulated(&inner_frame(0, 20), 1);
        for cut in 0..f.len() {
            let r = decapsulate(&f[..cut], &theirs());
            assert_eq!(r, Err(DecapError::Truncated), "cut at {cut}");
        }
        assert!(decapsulate(&f, &theirs()).is_ok());
    }

    #[test]
    fn inner_frame_shorter_than_ethernet_is_truncated() {
        // A valid outer packet whose UDP payload holds VXLAN and 13 bytes.
        let mut f = encapsulated(&inner_frame(0, 0), 0);
        let total = 20 + 8 + 8 + 13;
        f.truncate(14 + total);
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        f[38..40].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        fix_ip_checksum(&mut f);
        assert_eq!(decapsulate(&f, &theirs()), Err(DecapError::Truncated));
    }

    #[test]
    fn each_reason_is_reported() {
        let good = encapsulated(&inner_frame(0, 30), 3);
        let case = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good.clone();
            edit(&mut f);
            decapsulate(&f, &theirs())
        };
        use DecapError::*;
        assert_eq!(case(&|f| f[12] = 0x86), Err(NotVxlan), "ethertype");
        assert_eq!(case(&|f| f[14] = 0x65), Err(NotVxlan), "IPv6 version");
        assert_eq!(case(&|f| f[23] = 6), Err(NotVxlan), "TCP");
        assert_eq!(
            case(&|f| {
                f[36..38].copy_from_slice(&4789u16.to_be_bytes());
            }),
            Err(NotVxlan),
            "IANA port, not ours"
        );
        assert_eq!(case(&|f| f[14] = 0x44), Err(BadIpHeader), "IHL 4");
        assert_eq!(
            case(&|f| {
                f[16..18].copy_from_slice(&19u16.to_be_bytes());
            }),
            Err(BadIpHeader),
            "total < IHL"
        );
        assert_eq!(case(&|f| f[24] ^= 1), Err(BadChecksum));
        assert_eq!(case(&|f| f[29] ^= 1), Err(BadChecksum), "source changed");
        assert_eq!(
            case(&|f| {
                f[20] = 0x20; // MF
                fix_ip_checksum(f);
            }),
            Err(Fragment)
        );
        assert_eq!(
            case(&|f| {
                f[21] = 1; // offset 8
                fix_ip_checksum(f);
            }),
            Err(Fragment)
        );
        assert_eq!(
            case(&|f| {
                f[33] = 9;
                fix_ip_checksum(f);
            }),
            Err(NotForUs)
        );
        assert_eq!(
            case(&|f| {
                f[38..40].copy_from_slice(&7u16.to_be_bytes());
            }),
            Err(BadUdpLength)
        );
        let too_long = (good.len() - 14 - 20 + 1) as u16;
        assert_eq!(
            case(&|f| {
                f[38..40].copy_from_slice(&too_long.to_be_bytes());
            }),
            Err(BadUdpLength)
        );
        assert_eq!(case(&|f| f[42] = 0), Err(NoVni));
        assert_eq!(case(&|f| f[42] = 0xf7), Err(NoVni));
        assert_eq!(case(&|f| f[48] = 2), Err(WrongVni));
        assert_eq!(case(&|f| f[46] = 1), Err(WrongVni), "VNI 0x010001");
        // Reserved bits are ignored on receipt (RFC 7348).
        assert!(case(&|f| {
            f[42] = 0xff;
            f[43] = 0xff;
            f[49] = 0xff;
        })
        .is_ok());
        let names: std::collections::HashSet<_> =
            DecapError::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), DecapError::ALL.len());
    }

    #[test]
    fn ip_options_and_padding_are_handled() {
        // An outer header with 4 bytes of options (NOP NOP NOP EOL), then Ethernet padding.
        let good = encapsulated(&inner_frame(0, 10), 5);
        let mut f = good[..34].to_vec();
        f.extend_from_slice(&[1, 1, 1, 0]);
        f.extend_from_slice(&good[34..]);
        f[14] = 0x46;
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&f[14..38]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&[0xaa; 8]);
        let d = decapsulate(&f, &theirs()).unwrap();
        assert_eq!(d.inner_offset, 54);
        assert_eq!(d.inner_len, good.len() - 50);
        assert_eq!(&f[54..54 + d.inner_len], &good[50..]);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let good = encapsulated(&inner_frame(0, 40), 9);
        let mut buf = [0u8; 256];
        let mut accepted = 0;
        for i in 0..200_000u32 {
            let len = (rng.next() % 160) as usize;
            let f = &mut buf[..len];
            if i % 2 == 0 {
                // Pure noise, mostly with the IPv4 EtherType and version so it gets further.
                for b in f.iter_mut() {
                    *b = rng.next() as u8;
                }
                if len > 14 && i % 4 == 0 {
                    f[12] = 0x08;
                    f[13] = 0x00;
                    f[14] = 0x40 | (f[14] & 0x0f);
                }
            } else {
                // A valid packet with a few bytes changed, the IP checksum usually fixed up.
                let n = len.min(good.len());
                f[..n].copy_from_slice(&good[..n]);
                for _ in 0..1 + rng.next() % 4 {
                    if n > 0 {
                        f[(rng.next() % n as u64) as usize] = rng.next() as u8;
                    }
                }
                if n >= 34 && rng.next() & 3 != 0 {
                    fix_ip_checksum(f);
                }
            }
            if let Ok(d) = decapsulate(f, &theirs()) {
                accepted += 1;
                assert!(d.inner_len >= ETH_LEN);
                assert!(d.inner_offset + d.inner_len <= f.len());
                assert_eq!(d.vni, 1);
            }
        }
        assert!(
            accepted > 0,
            "the mutated packets reach the end of the parser"
        );
    }
}
