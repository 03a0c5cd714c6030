//! Parsing and in-place rewriting of the headers Service translation touches.
//!
//! [`parse`] reads Ethernet, IPv4 or IPv6 and the transport ports once, checking every length
//! it relies on, so no later accessor can read out of bounds. The rewrite functions change
//! addresses and ports in place and update the IP and transport checksums incrementally
//! (RFC 1624); payloads are never summed again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::checksum;

/// EtherType of IPv4.
pub const ETH_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_ARP: u16 = 0x0806;
/// Length of an Ethernet header without VLAN tags.
pub const ETH_LEN: usize = 14;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// Why a frame could not be parsed; each is a distinct drop counter in the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than the headers it announces.
    Truncated,
    /// IPv4 header length or version field is invalid.
    BadIpHeader,
    /// IPv4 header checksum does not verify.
    BadIpChecksum,
    /// An IPv6 extension header we do not walk.
    UnsupportedExtension,
}

/// The result of [`parse`]: offsets and the fields translation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    /// Offset of the IP header in the frame.
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
    /// End of the IP packet (Ethernet padding excluded).
    pub end: usize,
    /// IPv6 rather than IPv4.
    pub v6: bool,
    /// Transport protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP echo: the identifier); 0 when there is none.
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier); 0 when there is none.
    pub dport: u16,
    /// A fragment other than the first: no transport header here.
    pub later_fragment: bool,
    /// The first fragment of a fragmented packet.
    pub first_fragment: bool,
    /// TTL or hop limit.
    pub ttl: u8,
    /// For ICMP: the type.
    pub icmp_type: u8,
}

impl Headers {
    /// Headers of nothing (all zero, IPv4 unspecified addresses): a placeholder for arrays
    /// a burst's parsed headers are written into.
    pub const NONE: Headers = Headers {
        l3: 0,
        l4: 0,
        end: 0,
        v6: false,
        proto: 0,
        src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        sport: 0,
        dport: 0,
        later_fragment: false,
        first_fragment: false,
        ttl: 0,
        icmp_type: 0,
    };
}

/// The EtherType of a frame, or `None` when it is shorter than an Ethernet header.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= ETH_LEN).then(|| u16::from_be_bytes([frame[12], frame[13]]))
}

/// Parses the IP and transport headers of an Ethernet frame carrying IPv4 or IPv6.
pub fn parse(frame: &[u8]) -> Result<Headers, Malformed> {
    let mut h = Headers::NONE;
    parse_into(frame, &mut h)?;
    Ok(h)
}

/// [`parse`] into `h`, field by field (on an error, `h` holds some of the fields). A
/// burst's headers are parsed in place: `Headers` built elsewhere and copied in is read
/// back in wide words across its narrow stores (its addresses lie at odd offsets), which
/// stalls the copy until the stores are done.
pub fn parse_into(frame: &[u8], h: &mut Headers) -> Result<(), Malformed> {
    match ethertype(frame) {
        Some(ETH_IPV4) => parse_v4_into(frame, ETH_LEN, h),
        Some(ETH_IPV6) => parse_v6_into(frame, ETH_LEN, h),
        _ => Err(Malformed::Truncated),
    }
}

/// Parses an IPv4 packet that starts at `l3`.
pub fn parse_v4(frame: &[u8], l3: usize) -> Result<Headers, Malformed> {
    let mut h = Headers::NONE;
    parse_v4_into(frame, l3, &mut h)?;
    Ok(h)
}

/// [`parse_v4`] into `h`, field by field.
fn parse_v4_into(frame: &[u8], l3: usize, h: &mut Headers) -> Result<(), Malformed> {
    let ip = frame.get(l3..l3 + 20).ok_or(Malformed::Truncated)?;
    if ip[0] >> 4 != 4 {
        return Err(Malformed::BadIpHeader);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || total < ihl {
        return Err(Malformed::BadIpHeader);
    }
    let end = l3 + total;
    if frame.len() < end {
        return Err(Malformed::Truncated);
    }
    if checksum::sum(&frame[l3..l3 + ihl], 0) != 0xffff {
        return Err(Malformed::BadIpChecksum);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    h.l3 = l3;
    h.l4 = l3 + ihl;
    h.end = end;
    h.v6 = false;
    h.proto = ip[9];
    h.src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    h.dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    h.sport = 0;
    h.dport = 0;
    h.later_fragment = offset != 0;
    h.first_fragment = offset == 0 && more;
    h.ttl = ip[8];
    h.icmp_type = 0;
    if offset == 0 {
        transport(frame, h)?;
    }
    Ok(())
}

/// Parses an IPv6 packet that starts at `l3` (fragment headers are walked; other extension
/// headers are refused).
pub fn parse_v6(frame: &[u8], l3: usize) -> Result<Headers, Malformed> {
    let mut h = Headers::NONE;
    parse_v6_into(frame, l3, &mut h)?;
    Ok(h)
}

/// [`parse_v6`] into `h`, field by field.
fn parse_v6_into(frame: &[u8], l3: usize, h: &mut Headers) -> Result<(), Malformed> {
    let ip = frame.get(l3..l3 + 40).ok_or(Malformed::Truncated)?;
    if ip[0] >> 4 != 6 {
        return Err(Malformed::BadIpHeader);
    }
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let end = l3 + 40 + payload;
    if frame.len() < end {
        return Err(Malformed::Truncated);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    h.l3 = l3;
    h.l4 = l3 + 40;
    h.end = end;
    h.v6 = true;
    h.proto = ip[6];
    h.src = IpAddr::V6(Ipv6Addr::from(src));
    h.dst = IpAddr::V6(Ipv6Addr::from(dst));
    h.sport = 0;
    h.dport = 0;
    h.later_fragment = false;
    h.first_fragment = false;
    h.ttl = ip[7];
    h.icmp_type = 0;
    if h.proto == 44 {
        // The fragment header must lie inside the packet, not in Ethernet padding.
        let fh = frame
            .get(h.l4..h.l4 + 8)
            .filter(|_| h.l4 + 8 <= h.end)
            .ok_or(Malformed::Truncated)?;
        let off = u16::from_be_bytes([fh[2], fh[3]]);
        h.proto = fh[0];
        h.later_fragment = off >> 3 != 0;
        h.first_fragment = off >> 3 == 0 && off & 1 != 0;
        h.l4 += 8;
    }
    // Extension headers we do not walk, a second fragment header among them (else its
    // protocol number, 44, would pass for a transport without ports).
    if matches!(h.proto, 0 | 43 | 44 | 60 | 51 | 50 | 135 | 139 | 140) {
        return Err(Malformed::UnsupportedExtension);
    }
    if !h.later_fragment {
        transport(frame, h)?;
    }
    Ok(())
}

fn transport(frame: &[u8], h: &mut Headers) -> Result<(), Malformed> {
    let l4 = &frame[h.l4.min(h.end)..h.end];
    match h.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let need = match h.proto {
                PROTO_TCP => 20,
                PROTO_UDP => 8,
                _ => 12,
            };
            if l4.len() < need {
                return Err(Malformed::Truncated);
            }
            h.sport = u16::from_be_bytes([l4[0], l4[1]]);
            h.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4.len() < 8 {
                return Err(Malformed::Truncated);
            }
            h.icmp_type = l4[0];
            if is_echo(h.v6, l4[0]) {
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                h.sport = id;
                h.dport = id;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether an ICMP type is an echo request or reply (tracked by identifier).
pub fn is_echo(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        matches!(icmp_type, 128 | 129)
    } else {
        matches!(icmp_type, 0 | 8)
    }
}

fn addr_bytes(ip: &IpAddr) -> ([u8; 16], usize) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    }
}

/// Offset of the transport checksum field from the transport header, if the protocol has
/// one we update incrementally.
fn l4_check_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The source address and port.
    Source,
    /// The destination address and port.
    Destination,
}

/// Rewrites one end's address and port in place, updating `h` and every checksum. The new
/// address must be of the packet's family. SCTP's CRC32c is recomputed over the packet (it
/// is not incrementally updatable).
pub fn rewrite(frame: &mut [u8], h: &mut Headers, end: End, ip: IpAddr, port: u16) {
    let (new, alen) = addr_bytes(&ip);
    let old_ip = match end {
        End::Source => h.src,
        End::Destination => h.dst,
    };
    let (old, _) = addr_bytes(&old_ip);
    let addr_off = match (h.v6, end) {
        (false, End::Source) => h.l3 + 12,
        (false, End::Destination) => h.l3 + 16,
        (true, End::Source) => h.l3 + 8,
        (true, End::Destination) => h.l3 + 24,
    };
    let port_off = match end {
        End::Source => h.l4,
        End::Destination => h.l4 + 2,
    };
    let old_port = match end {
        End::Source => h.sport,
        End::Destination => h.dport,
    };
    let echo = matches!(h.proto, PROTO_ICMP | PROTO_ICMPV6) && is_echo(h.v6, h.icmp_type);
    if !h.later_fragment {
        if let Some(co) = l4_check_offset(h.proto) {
            let at = h.l4 + co;
            let mut check = u16::from_be_bytes([frame[at], frame[at + 1]]);
            let udp_v4_none = h.proto == PROTO_UDP && !h.v6 && check == 0;
            // ICMPv4 has no pseudo-header; ICMPv6, TCP and UDP do.
            let pseudo = h.proto != PROTO_ICMP;
            if !udp_v4_none {
                if pseudo {
                    check = checksum::update_bytes(check, &old[..alen], &new[..alen]);
                }
                if echo {
                    // The echo identifier is both "ports"; only the source side carries it
                    // as we track it, so rewrite it once.
                    if end == End::Source {
                        check = checksum::update16(check, old_port, port);
                    }
                } else if matches!(h.proto, PROTO_TCP | PROTO_UDP) {
                    check = checksum::update16(check, old_port, port);
                }
                if h.proto == PROTO_UDP && check == 0 {
                    check = 0xffff;
                }
                frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
            }
        }
        match h.proto {
            PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
                frame[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
            }
            _ if echo && end == End::Source => {
                frame[h.l4 + 4..h.l4 + 6].copy_from_slice(&port.to_be_bytes());
            }
            _ => {}
        }
    }
    if !h.v6 {
        let at = h.l3 + 10;
        let check = u16::from_be_bytes([frame[at], frame[at + 1]]);
        let check = checksum::update_bytes(check, &old[..4], &new[..4]);
        frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
    }
    frame[addr_off..addr_off + alen].copy_from_slice(&new[..alen]);
    match end {
        End::Source => {
            h.src = ip;
            if h.proto != PROTO_ICMP && h.proto != PROTO_ICMPV6 || echo {
                h.sport = port;
            }
            if echo {
                h.dport = port;
            }
        }
        End::Destination => {
            h.dst = ip;
            if h.proto != PROTO_ICMP && h.proto != PROTO_ICMPV6 {
                h.dport = port;
            }
        }
    }
    if h.proto == PROTO_SCTP && !h.later_fragment {
        sctp_fix_crc(&mut frame[h.l4..h.end]);
    }
    // One's-complement arithmetic has two zeros: the incremental update may leave 0x0000
    // where only 0xffff verifies (a message that sums to zero, such as an echo reply with
    // identifier, sequence and data all zero). Rare: recompute the whole message then.
    if echo && !h.later_fragment && frame.get(h.l4 + 2..h.l4 + 4) == Some(&[0, 0][..]) {
        fix_icmp_checksum(frame, h);
    }
}

/// The packet quoted inside an ICMP error: where it is and its tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// Offset of the quoted IP header in the frame.
    pub l3: usize,
    /// Offset of its transport header.
    pub l4: usize,
    /// End of the quoted bytes (the ICMP message's end).
    pub end: usize,
    /// IPv6.
    pub v6: bool,
    /// Its protocol.
    pub proto: u8,
    /// Its source.
    pub src: IpAddr,
    /// Its destination.
    pub dst: IpAddr,
    /// Its source port (ICMP echo: identifier).
    pub sport: u16,
    /// Its destination port (ICMP echo: identifier).
    pub dport: u16,
}

/// Whether `h` is an ICMP error that quotes a packet (destination unreachable, packet too
/// big, time exceeded, parameter problem).
pub fn is_icmp_error(h: &Headers) -> bool {
    match h.proto {
        PROTO_ICMP => matches!(h.icmp_type, 3 | 11 | 12),
        PROTO_ICMPV6 => matches!(h.icmp_type, 1..=4),
        _ => false,
    }
}

/// Parses the packet an ICMP error quotes (its IP header and at least 8 bytes of transport
/// header, RFC 792 / RFC 4443).
pub fn parse_quoted(frame: &[u8], h: &Headers) -> Option<Quoted> {
    let l3 = h.l4 + 8;
    let ip = frame.get(l3..h.end)?;
    let (l4, proto, src, dst, v6) = if !h.v6 {
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ihl < 20 {
            return None;
        }
        let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
        let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
        (l3 + ihl, ip[9], src, dst, false)
    } else {
        if ip.len() < 40 || ip[0] >> 4 != 6 {
            return None;
        }
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[8..24]);
        let mut b = [0u8; 16];
        b.copy_from_slice(&ip[24..40]);
        (
            l3 + 40,
            ip[6],
            IpAddr::V6(a.into()),
            IpAddr::V6(b.into()),
            true,
        )
    };
    let t = frame.get(l4..l4 + 8)?;
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => (
            u16::from_be_bytes([t[0], t[1]]),
            u16::from_be_bytes([t[2], t[3]]),
        ),
        PROTO_ICMP | PROTO_ICMPV6 if is_echo(v6, t[0]) => {
            let id = u16::from_be_bytes([t[4], t[5]]);
            (id, id)
        }
        _ => return None,
    };
    Some(Quoted {
        l3,
        l4,
        end: h.end,
        v6,
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

/// Rewrites the quoted packet's addresses and ports, with its IPv4 header checksum and the
/// transport checksum where the quote carries it. The enclosing ICMP checksum must be
/// recomputed afterwards ([`fix_icmp_checksum`]).
pub fn rewrite_quoted(frame: &mut [u8], q: &mut Quoted, src: (IpAddr, u16), dst: (IpAddr, u16)) {
    let (ns, alen) = addr_bytes(&src.0);
    let (nd, _) = addr_bytes(&dst.0);
    let (os, _) = addr_bytes(&q.src);
    let (od, _) = addr_bytes(&q.dst);
    let (so, dof) = if q.v6 { (8, 24) } else { (12, 16) };
    // Transport checksum, if the quote includes it.
    let check_at = match q.proto {
        PROTO_TCP => Some(q.l4 + 16),
        PROTO_UDP => Some(q.l4 + 6),
        _ => None,
    };
    if let Some(at) = check_at.filter(|at| at + 2 <= q.end) {
        let mut c = u16::from_be_bytes([frame[at], frame[at + 1]]);
        if !(q.proto == PROTO_UDP && !q.v6 && c == 0) {
            c = checksum::update_bytes(c, &os[..alen], &ns[..alen]);
            c = checksum::update_bytes(c, &od[..alen], &nd[..alen]);
            c = checksum::update16(c, q.sport, src.1);
            c = checksum::update16(c, q.dport, dst.1);
            frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    match q.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            frame[q.l4..q.l4 + 2].copy_from_slice(&src.1.to_be_bytes());
            frame[q.l4 + 2..q.l4 + 4].copy_from_slice(&dst.1.to_be_bytes());
        }
        _ => {
            // ICMP echo: the identifier; the quoted echo's own checksum is left as it was
            // (it covers data the quote may not hold in full).
            frame[q.l4 + 4..q.l4 + 6].copy_from_slice(&src.1.to_be_bytes());
        }
    }
    frame[q.l3 + so..q.l3 + so + alen].copy_from_slice(&ns[..alen]);
    frame[q.l3 + dof..q.l3 + dof + alen].copy_from_slice(&nd[..alen]);
    if !q.v6 {
        let ihl = (frame[q.l3] & 0x0f) as usize * 4;
        if q.l3 + ihl <= frame.len() {
            frame[q.l3 + 10..q.l3 + 12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&frame[q.l3..q.l3 + ihl]);
            frame[q.l3 + 10..q.l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
    }
    q.src = src.0;
    q.sport = src.1;
    q.dst = dst.0;
    q.dport = dst.1;
}

/// Sets an IP packet's addresses without touching the transport header (for ICMP errors,
/// whose checksum is then recomputed whole), updating the IPv4 header checksum.
pub fn set_addresses(frame: &mut [u8], h: &mut Headers, src: IpAddr, dst: IpAddr) {
    let (ns, alen) = addr_bytes(&src);
    let (nd, _) = addr_bytes(&dst);
    let (so, dof) = if h.v6 { (8, 24) } else { (12, 16) };
    frame[h.l3 + so..h.l3 + so + alen].copy_from_slice(&ns[..alen]);
    frame[h.l3 + dof..h.l3 + dof + alen].copy_from_slice(&nd[..alen]);
    if !h.v6 {
        let ihl = h.l4 - h.l3;
        frame[h.l3 + 10..h.l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&frame[h.l3..h.l3 + ihl]);
        frame[h.l3 + 10..h.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    h.src = src;
    h.dst = dst;
}

/// Recomputes an ICMP or ICMPv6 message's checksum over the whole message (slow path:
/// ICMP errors only).
pub fn fix_icmp_checksum(frame: &mut [u8], h: &Headers) {
    let msg = h.l4..h.end;
    frame[h.l4 + 2..h.l4 + 4].copy_from_slice(&[0, 0]);
    let initial = match (h.v6, h.src, h.dst) {
        (true, IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo_sum_v6(s.octets(), d.octets(), (h.end - h.l4) as u32)
        }
        _ => 0,
    };
    let c = !(checksum::sum(&frame[msg], initial) as u16);
    frame[h.l4 + 2..h.l4 + 4].copy_from_slice(&c.to_be_bytes());
}

fn pseudo_sum_v6(src: [u8; 16], dst: [u8; 16], len: u32) -> u32 {
    checksum::pseudo_v6(src, dst, PROTO_ICMPV6, len)
}

/// Decrements the TTL / hop limit, updating the IPv4 header checksum. Returns the new value.
pub fn decrement_ttl(frame: &mut [u8], h: &mut Headers) -> u8 {
    let ttl = h.ttl.saturating_sub(1);
    if h.v6 {
        frame[h.l3 + 7] = ttl;
    } else {
        let old = u16::from_be_bytes([frame[h.l3 + 8], frame[h.l3 + 9]]);
        frame[h.l3 + 8] = ttl;
        let new = u16::from_be_bytes([frame[h.l3 + 8], frame[h.l3 + 9]]);
        let at = h.l3 + 10;
        let check = u16::from_be_bytes([frame[at], frame[at + 1]]);
        let check = checksum::update16(check, old, new);
        frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
    }
    h.ttl = ttl;
    ttl
}

/// Recomputes the CRC32c of an SCTP packet (checksum field at offset 8).
pub fn sctp_fix_crc(sctp: &mut [u8]) {
    if sctp.len() < 12 {
        return;
    }
    sctp[8..12].copy_from_slice(&[0; 4]);
    let crc = crc32c(sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// CRC32c (Castagnoli), as SCTP uses (RFC 3309).
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000);
        let mut out = Vec::new();
        b.write(&mut out, b"hello").unwrap();
        out
    }

    fn verify(frame: &[u8]) {
        let p = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not ipv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        if let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport {
            let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
            assert_eq!(t.checksum(), want);
        }
        if let Some(etherparse::TransportSlice::Udp(u)) = &p.transport {
            let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
            assert_eq!(u.checksum(), want);
        }
    }

    #[test]
    fn dnat_and_snat_keep_checksums_valid() {
        let mut f = tcp_frame([10, 244, 1, 2], 40000, [172, 30, 0, 41], 80);
        let mut h = parse(&f).unwrap();
        assert_eq!((h.sport, h.dport, h.proto), (40000, 80, PROTO_TCP));
        rewrite(
            &mut f,
            &mut h,
            End::Destination,
            "10.244.1.5".parse().unwrap(),
            8080,
        );
        rewrite(
            &mut f,
            &mut h,
            End::Source,
            "10.244.1.1".parse().unwrap(),
            61000,
        );
        verify(&f);
        let again = parse(&f).unwrap();
        assert_eq!(again, h);
        assert_eq!(again.dst, "10.244.1.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn udp_rewrite_keeps_checksum_valid() {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 244, 1, 2], [172, 30, 0, 53], 64)
            .udp(5353, 53);
        let mut f = Vec::new();
        b.write(&mut f, b"query").unwrap();
        let mut h = parse(&f).unwrap();
        rewrite(
            &mut f,
            &mut h,
            End::Destination,
            "10.244.2.7".parse().unwrap(),
            5353,
        );
        verify(&f);
    }

    #[test]
    fn truncated_and_bad_headers_are_refused() {
        let f = tcp_frame([10, 244, 1, 2], 1, [10, 244, 1, 3], 2);
        for cut in [10, 20, 33, 40, 50] {
            assert!(parse(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = f.clone();
        bad[ETH_LEN] = 0x43; // IHL 3
        assert_eq!(parse(&bad), Err(Malformed::BadIpHeader));
        let mut bad = f.clone();
        bad[ETH_LEN + 10] ^= 0xff;
        assert_eq!(parse(&bad), Err(Malformed::BadIpChecksum));
    }

    #[test]
    fn ipv6_fragment_header_past_the_payload_is_truncated() {
        // IPv6 header saying "fragment header follows" with a 4-byte payload, then padding.
        let mut f = vec![0u8; ETH_LEN + 40 + 16];
        f[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
        f[ETH_LEN] = 0x60;
        f[ETH_LEN + 5] = 4; // payload length
        f[ETH_LEN + 6] = 44; // next header: fragment
        assert_eq!(parse(&f), Err(Malformed::Truncated));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut f = tcp_frame([10, 244, 1, 2], 1, [10, 244, 1, 3], 2);
        let mut h = parse(&f).unwrap();
        assert_eq!(decrement_ttl(&mut f, &mut h), 63);
        verify(&f);
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }
}
