//! Structure-aware fuzz input for kxdp's fuzz targets, on the stable toolchain.
//!
//! No nightly (so no `cargo fuzz`) can be installed here, so the targets are ordinary test
//! binaries: a seeded PRNG makes a string of bytes per case, and the generator reads every
//! choice it makes (which headers, which addresses, which mutation) from those bytes through
//! `arbitrary::Unstructured`. The PRNG is our own splitmix64, so a seed names the same bytes
//! whatever version of `rand` is around; the same seed gives the same run.
//!
//! The frames are mostly valid (Ethernet with VLAN tags or not, ARP, IPv4 with options,
//! IPv6 with extension headers and fragment headers, TCP, UDP, SCTP, ICMP echo and ICMP
//! errors quoting arbitrary packets, VXLAN around any of them) and then mutated: truncated,
//! padded, lengths and checksums broken, bits flipped, fragment bits set.
//!
//! The checks ([`check_frame`]) parse frames and verify IPv4 header, TCP, UDP, ICMP, ICMPv6
//! and SCTP checksums with code written here, independent of `nat::checksum` and
//! `nat::packet`, so a rewrite bug there cannot hide behind the same bug in the check.
//!
//! `nat/tests/fuzz_parsers.rs` and `control/tests/fuzz_manifests.rs` include this file by
//! path; each uses a part of it.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Unstructured;

// ---------------------------------------------------------------------------------------
// Seeds, settings, reporting

/// splitmix64: small, fast, and fixed forever (a seed in a bug report stays meaningful).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        out
    }
}

/// The seed of case `n` of a run seeded with `seed`: cases can be replayed one by one.
pub fn case_seed(seed: u64, n: u64) -> u64 {
    let mut r = Rng::new(seed ^ n.wrapping_mul(0xd6e8_feb8_6659_fd93));
    r.next_u64()
}

/// How one fuzz target runs: its seed, how many cases, and an optional single case to
/// replay.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `KXDP_FUZZ_SEED` (decimal or 0x-hex; `random` takes one from the clock), else a
    /// fixed default so the smoke run in the test command is the same every time.
    pub seed: u64,
    /// How many cases (frames, documents, byte streams) to run.
    pub count: u64,
    /// `KXDP_FUZZ_CASE`: run only this case (or episode) of the seed.
    pub only: Option<u64>,
}

/// The default seed of the smoke runs.
pub const DEFAULT_SEED: u64 = 0x6b78_6470_f022_2026;

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Reads the settings: `count_var` names the target's own count variable (for example
/// `KXDP_FUZZ_FRAMES`), `smoke` is its count when the variable is unset.
pub fn settings(count_var: &str, smoke: u64) -> Settings {
    let seed = match std::env::var("KXDP_FUZZ_SEED") {
        Ok(s) if s == "random" => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("KXDP_FUZZ_SEED={s}: not a number")),
        Err(_) => DEFAULT_SEED,
    };
    let count = match std::env::var(count_var) {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("{count_var}={s}: not a number")),
        Err(_) => smoke,
    };
    let only = std::env::var("KXDP_FUZZ_CASE")
        .ok()
        .map(|s| parse_u64(&s).unwrap_or_else(|| panic!("KXDP_FUZZ_CASE={s}: not a number")));
    Settings { seed, count, only }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex (whitespace ignored).
pub fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| (c as char).to_digit(16).expect("hex digit") as u8)
        .collect();
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// Prints a run's figures in one line, as the README quotes them.
pub fn report(target: &str, seed: u64, count: u64, unit: &str, started: std::time::Instant) {
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {target}: seed {seed:#x}: {count} {unit} in {secs:.1} s ({:.0} {unit}/s)",
        count as f64 / secs.max(1e-9)
    );
}

// ---------------------------------------------------------------------------------------
// Choices from bytes

/// Infallible choices over `arbitrary::Unstructured`: when the bytes run out every choice
/// is its smallest value, so any byte string is a valid input.
pub struct Src<'a> {
    u: Unstructured<'a>,
}

impl<'a> Src<'a> {
    /// Choices read from `data`.
    pub fn new(data: &'a [u8]) -> Src<'a> {
        Src {
            u: Unstructured::new(data),
        }
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// Two bytes.
    pub fn u16(&mut self) -> u16 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// Four bytes.
    pub fn u32(&mut self) -> u32 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A number below `n` (0 when `n` ≤ 1).
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            0
        } else {
            self.u.int_in_range(0..=n - 1).unwrap_or(0)
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        self.u.int_in_range(lo..=hi.max(lo)).unwrap_or(lo)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u8, den: u8) -> bool {
        self.u.ratio(num, den).unwrap_or(false)
    }

    /// One of `xs` (which must not be empty).
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    /// `n` bytes (zeros once the input is used up).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let _ = self.u.fill_buffer(&mut out);
        out
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// Checksums, written here on purpose (not nat::checksum)

/// IP protocol numbers.
pub const TCP: u8 = 6;
/// UDP.
pub const UDP: u8 = 17;
/// ICMP.
pub const ICMP: u8 = 1;
/// ICMPv6.
pub const ICMPV6: u8 = 58;
/// SCTP.
pub const SCTP: u8 = 132;

/// The one's complement sum of big-endian 16-bit words (an odd last byte padded), added to
/// `acc`, not folded.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = words.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// Folds a sum to 16 bits with end-around carry.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum for `proto` over `len` bytes between `src` and `dst`.
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
        }
        (s, d) => {
            acc = sum16(&v6_octets(s), acc);
            acc = sum16(&v6_octets(d), acc);
        }
    }
    acc + proto as u64 + len as u64
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// CRC32c (Castagnoli), bit by bit.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Where a protocol keeps its checksum in its header, for those we fill and verify.
fn checksum_at(proto: u8) -> Option<usize> {
    match proto {
        TCP => Some(16),
        UDP => Some(6),
        ICMP | ICMPV6 => Some(2),
        SCTP => Some(8),
        _ => None,
    }
}

/// Fills the checksum of a transport message `l4` carried from `src` to `dst` (SCTP: its
/// CRC32c, stored little-endian as Linux does).
pub fn fill_l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &mut [u8]) {
    let Some(at) = checksum_at(proto) else {
        return;
    };
    let width = if proto == SCTP { 4 } else { 2 };
    if l4.len() < at + width {
        return;
    }
    l4[at..at + width].fill(0);
    if proto == SCTP {
        let crc = crc32c(l4);
        l4[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        return;
    }
    let init = match proto {
        ICMP => 0,
        _ => pseudo(src, dst, proto, l4.len()),
    };
    let mut c = !fold(sum16(l4, init));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// Checking frames

/// What [`check_frame`] found about a transport checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// Verified.
    Valid,
    /// Wrong, and why.
    Invalid(String),
    /// Not verifiable here: a fragment, an unknown protocol, a routing header.
    Unchecked,
}

/// An IP packet as [`check_frame`] parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpView {
    /// IPv6.
    pub v6: bool,
    /// Offset of the IP header in the frame.
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
    /// End of the IP packet.
    pub end: usize,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Source.
    pub src: IpAddr,
    /// Destination.
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// Any fragment (more-fragments set or an offset).
    pub fragment: bool,
    /// A fragment with an offset (no transport header).
    pub later_fragment: bool,
    /// Source port (ICMP echo: identifier), 0 when there is none.
    pub sport: u16,
    /// Destination port (ICMP echo: identifier), 0 when there is none.
    pub dport: u16,
    /// ICMP type, for ICMP and ICMPv6.
    pub icmp_type: Option<u8>,
    /// The IPv6 extension headers walked (none for IPv4).
    pub extensions: Vec<u8>,
}

/// A frame as [`check_frame`] found it.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The IP packet, when the frame carries one.
    pub ip: Option<IpView>,
    /// Its transport checksum.
    pub l4: L4,
    /// The frame inside, when this is VXLAN.
    pub inner: Option<Box<Checked>>,
    /// ARP.
    pub arp: bool,
    /// The frame's bytes after the transport header's fixed part (what translation never
    /// touches), for telling which input an output came from.
    pub body: Vec<u8>,
}

impl Checked {
    /// The innermost frame (the VXLAN payload's, else this one).
    pub fn innermost(&self) -> &Checked {
        match &self.inner {
            Some(i) => i.innermost(),
            None => self,
        }
    }

    /// Whether every checksum of the frame and of any frame inside it verifies.
    pub fn all_valid(&self) -> bool {
        !matches!(self.l4, L4::Invalid(_)) && self.inner.as_ref().is_none_or(|i| i.all_valid())
    }

    /// The first invalid transport checksum, described.
    pub fn first_invalid(&self) -> Option<String> {
        if let L4::Invalid(why) = &self.l4 {
            return Some(why.clone());
        }
        self.inner
            .as_ref()
            .and_then(|i| i.first_invalid())
            .map(|w| format!("inner frame: {w}"))
    }
}

/// Which UDP packets [`check_frame`] opens as VXLAN: to `port`, from or to `vtep`.
#[derive(Clone, Copy, Debug)]
pub struct VxlanId {
    /// The overlay's UDP port.
    pub port: u16,
    /// A VTEP address of this node.
    pub vtep: Ipv4Addr,
    /// The VTEP it sends to.
    pub peer: Ipv4Addr,
    /// Open what is sent to `vtep` (frames coming in), rather than what it sends to
    /// `peer` (frames going out).
    pub inbound: bool,
}

/// Parses an Ethernet frame and verifies what it can: ARP's fixed part, the IPv4 header
/// checksum, lengths, the transport checksum, and VXLAN's inner frame likewise. `Err` for
/// what no dataplane may ever send (a broken IP header, a length past the frame); a bad
/// transport checksum is reported in [`Checked::l4`] instead, because a packet that came in
/// with one legitimately goes out with one.
pub fn check_frame(frame: &[u8], vxlan: Option<VxlanId>) -> Result<Checked, String> {
    check_frame_at(frame, vxlan, 0)
}

fn check_frame_at(frame: &[u8], vxlan: Option<VxlanId>, depth: u8) -> Result<Checked, String> {
    if frame.len() < 14 {
        return Err(format!("{} bytes: shorter than Ethernet", frame.len()));
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match ethertype {
        0x0806 => {
            let a = frame
                .get(14..42)
                .ok_or_else(|| format!("ARP of {} bytes", frame.len()))?;
            if a[0..6] != [0, 1, 8, 0, 6, 4] || !matches!(a[6..8], [0, 1] | [0, 2]) {
                return Err(format!("ARP header {:02x?}", &a[0..8]));
            }
            Ok(Checked {
                ip: None,
                l4: L4::Unchecked,
                inner: None,
                arp: true,
                body: Vec::new(),
            })
        }
        0x0800 => check_ipv4(frame, 14, vxlan, depth),
        0x86dd => check_ipv6(frame, 14),
        other => Err(format!("ethertype {other:#06x}")),
    }
}

fn check_ipv4(
    frame: &[u8],
    l3: usize,
    vxlan: Option<VxlanId>,
    depth: u8,
) -> Result<Checked, String> {
    let ip = frame.get(l3..l3 + 20).ok_or("IPv4 header truncated")?;
    if ip[0] >> 4 != 4 {
        return Err(format!("IPv4 version {}", ip[0] >> 4));
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || total < ihl {
        return Err(format!("IPv4 IHL {ihl}, total length {total}"));
    }
    let end = l3 + total;
    if frame.len() < end {
        return Err(format!(
            "IPv4 total length {total} past the frame's {} bytes",
            frame.len() - l3
        ));
    }
    if fold(sum16(&frame[l3..l3 + ihl], 0)) != 0xffff {
        return Err("IPv4 header checksum".into());
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let view = IpView {
        v6: false,
        l3,
        l4: l3 + ihl,
        end,
        proto: ip[9],
        src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
        dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
        ttl: ip[8],
        fragment: more || offset != 0,
        later_fragment: offset != 0,
        sport: 0,
        dport: 0,
        icmp_type: None,
        extensions: Vec::new(),
    };
    let mut checked = transport(frame, view);
    let v = checked.ip.as_ref().expect("transport keeps the view");
    if let Some(x) = vxlan {
        // Sent by the VTEP to its peer (from its source-port range), or sent to it.
        let sent = v.src == IpAddr::V4(x.vtep)
            && v.dst == IpAddr::V4(x.peer)
            && (32768..=60998).contains(&v.sport);
        let ours = if x.inbound {
            v.dst == IpAddr::V4(x.vtep)
        } else {
            sent
        };
        if depth == 0 && v.proto == UDP && !v.fragment && v.dport == x.port && ours {
            let udp = &frame[v.l4..v.end];
            if udp.len() < 8 {
                return Err(format!("VXLAN: {} bytes of UDP header", udp.len()));
            }
            let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            if ulen != udp.len() {
                return Err(format!(
                    "VXLAN: UDP length {ulen}, IP payload {}",
                    udp.len()
                ));
            }
            if udp.len() < 16 + 14 {
                return Err(format!("VXLAN: {} bytes of UDP", udp.len()));
            }
            if udp[8] & 0x08 == 0 {
                return Err(format!("VXLAN flags {:#04x}: no VNI", udp[8]));
            }
            let inner = check_frame_at(&udp[16..], vxlan, depth + 1)
                .map_err(|e| format!("VXLAN inner frame: {e}"))?;
            checked.inner = Some(Box::new(inner));
        }
    }
    Ok(checked)
}

fn check_ipv6(frame: &[u8], l3: usize) -> Result<Checked, String> {
    let ip = frame.get(l3..l3 + 40).ok_or("IPv6 header truncated")?;
    if ip[0] >> 4 != 6 {
        return Err(format!("IPv6 version {}", ip[0] >> 4));
    }
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let end = l3 + 40 + payload;
    if frame.len() < end {
        return Err(format!(
            "IPv6 payload length {payload} past the frame's {} bytes",
            frame.len() - l3 - 40
        ));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    let mut view = IpView {
        v6: true,
        l3,
        l4: l3 + 40,
        end,
        proto: ip[6],
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        ttl: ip[7],
        fragment: false,
        later_fragment: false,
        sport: 0,
        dport: 0,
        icmp_type: None,
        extensions: Vec::new(),
    };
    // Walk hop-by-hop, routing, destination options and fragment headers.
    for _ in 0..8 {
        match view.proto {
            0 | 43 | 60 => {
                let h = frame
                    .get(view.l4..view.l4 + 2)
                    .filter(|_| view.l4 + 8 <= end)
                    .ok_or("IPv6 extension header truncated")?;
                let len = (h[1] as usize + 1) * 8;
                if view.l4 + len > end {
                    return Err("IPv6 extension header past the payload".into());
                }
                view.extensions.push(view.proto);
                view.proto = h[0];
                view.l4 += len;
            }
            44 => {
                let h = frame
                    .get(view.l4..view.l4 + 8)
                    .filter(|_| view.l4 + 8 <= end)
                    .ok_or("IPv6 fragment header truncated")?;
                let off = u16::from_be_bytes([h[2], h[3]]);
                view.extensions.push(44);
                view.proto = h[0];
                view.fragment |= off >> 3 != 0 || off & 1 != 0;
                view.later_fragment |= off >> 3 != 0;
                view.l4 += 8;
                if view.later_fragment {
                    break; // what follows is the middle of another packet
                }
            }
            _ => break,
        }
    }
    let routed = view.extensions.contains(&43);
    let mut checked = transport(frame, view);
    if routed && matches!(checked.l4, L4::Invalid(_)) {
        // The checksum covers the final destination, which the routing header names.
        checked.l4 = L4::Unchecked;
    }
    Ok(checked)
}

/// Reads ports and verifies the transport checksum of `view`'s packet.
fn transport(frame: &[u8], mut view: IpView) -> Checked {
    let l4 = &frame[view.l4.min(view.end)..view.end];
    let fixed = match view.proto {
        TCP => 20,
        UDP | ICMP | ICMPV6 => 8,
        SCTP => 12,
        _ => 0,
    };
    let body = if view.later_fragment {
        l4.to_vec()
    } else {
        l4.get(fixed..).unwrap_or_default().to_vec()
    };
    let mut status = L4::Unchecked;
    if !view.later_fragment {
        if matches!(view.proto, TCP | UDP | SCTP) && l4.len() >= 4 {
            view.sport = u16::from_be_bytes([l4[0], l4[1]]);
            view.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        if matches!(view.proto, ICMP | ICMPV6) && !l4.is_empty() {
            view.icmp_type = Some(l4[0]);
            let echo = if view.v6 {
                matches!(l4[0], 128 | 129)
            } else {
                matches!(l4[0], 0 | 8)
            };
            if echo && l4.len() >= 6 {
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                view.sport = id;
                view.dport = id;
            }
        }
    }
    if !view.fragment {
        status = verify_l4(&view, l4);
    }
    Checked {
        ip: Some(view),
        l4: status,
        inner: None,
        arp: false,
        body,
    }
}

fn verify_l4(v: &IpView, l4: &[u8]) -> L4 {
    let summed = |init: u64| fold(sum16(l4, init)) == 0xffff;
    match v.proto {
        TCP => {
            if l4.len() < 20 {
                return L4::Invalid(format!("TCP of {} bytes", l4.len()));
            }
            if summed(pseudo(v.src, v.dst, TCP, l4.len())) {
                L4::Valid
            } else {
                L4::Invalid("TCP checksum".into())
            }
        }
        UDP => {
            if l4.len() < 8 {
                return L4::Invalid(format!("UDP of {} bytes", l4.len()));
            }
            let ulen = u16::from_be_bytes([l4[4], l4[5]]) as usize;
            if ulen != l4.len() {
                return L4::Invalid(format!("UDP length {ulen}, IP payload {}", l4.len()));
            }
            let check = u16::from_be_bytes([l4[6], l4[7]]);
            if check == 0 {
                return if v.v6 {
                    L4::Invalid("UDP over IPv6 without checksum".into())
                } else {
                    L4::Valid
                };
            }
            if summed(pseudo(v.src, v.dst, UDP, l4.len())) {
                L4::Valid
            } else {
                L4::Invalid("UDP checksum".into())
            }
        }
        ICMP if !v.v6 => {
            if l4.len() < 8 {
                return L4::Invalid(format!("ICMP of {} bytes", l4.len()));
            }
            if summed(0) {
                L4::Valid
            } else {
                L4::Invalid("ICMP checksum".into())
            }
        }
        ICMPV6 if v.v6 => {
            if l4.len() < 8 {
                return L4::Invalid(format!("ICMPv6 of {} bytes", l4.len()));
            }
            if summed(pseudo(v.src, v.dst, ICMPV6, l4.len())) {
                L4::Valid
            } else {
                L4::Invalid("ICMPv6 checksum".into())
            }
        }
        SCTP => {
            if l4.len() < 12 {
                return L4::Invalid(format!("SCTP of {} bytes", l4.len()));
            }
            let mut copy = l4.to_vec();
            let want = u32::from_le_bytes([copy[8], copy[9], copy[10], copy[11]]);
            copy[8..12].fill(0);
            if crc32c(&copy) == want {
                L4::Valid
            } else {
                L4::Invalid("SCTP CRC32c".into())
            }
        }
        _ => L4::Unchecked,
    }
}

// ---------------------------------------------------------------------------------------
// Building packets

/// The fixed fields of an IPv4 header the generator varies.
#[derive(Clone, Debug)]
pub struct V4Opts {
    /// TTL.
    pub ttl: u8,
    /// TOS byte (DSCP and ECN).
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset (DF 0x4000, MF 0x2000, offset in 8-byte units).
    pub frag: u16,
    /// Options (padded to a multiple of 4 with end-of-list).
    pub options: Vec<u8>,
}

impl Default for V4Opts {
    fn default() -> Self {
        V4Opts {
            ttl: 64,
            tos: 0,
            id: 0,
            frag: 0x4000,
            options: Vec::new(),
        }
    }
}

/// An IPv4 packet around `l4`, whose checksum is filled for `proto` first.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, mut l4: Vec<u8>, o: &V4Opts) -> Vec<u8> {
    fill_l4_checksum(src.into(), dst.into(), proto, &mut l4);
    ipv4_raw(src, dst, proto, &l4, o)
}

/// An IPv4 packet around `payload`, taken as it is.
pub fn ipv4_raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], o: &V4Opts) -> Vec<u8> {
    let mut opts = o.options.clone();
    opts.truncate(40);
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 20 + opts.len();
    let total = (ihl + payload.len()).min(0xffff);
    let mut p = Vec::with_capacity(ihl + payload.len());
    p.push(0x40 | (ihl / 4) as u8);
    p.push(o.tos);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&o.id.to_be_bytes());
    p.extend_from_slice(&o.frag.to_be_bytes());
    p.push(o.ttl);
    p.push(proto);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&opts);
    let c = !fold(sum16(&p, 0));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 extension header the generator can put before the transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (0) with `n` 8-byte units of padding options.
    HopByHop(u8),
    /// Destination options (60).
    DestOpts(u8),
    /// A routing header (43), type 0 with no addresses left.
    Routing,
    /// A fragment header (44): offset in 8-byte units, more-fragments.
    Fragment(u16, bool),
}

/// An IPv6 packet around `l4` (checksum filled for `proto`), after `exts`.
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    mut l4: Vec<u8>,
    hop: u8,
    tclass: u8,
    exts: &[Ext],
) -> Vec<u8> {
    fill_l4_checksum(src.into(), dst.into(), proto, &mut l4);
    ipv6_raw(src, dst, proto, &l4, hop, tclass, exts)
}

/// An IPv6 packet around `payload`, taken as it is.
pub fn ipv6_raw(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    payload: &[u8],
    hop: u8,
    tclass: u8,
    exts: &[Ext],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = match exts.get(i + 1) {
            Some(Ext::HopByHop(_)) => 0,
            Some(Ext::DestOpts(_)) => 60,
            Some(Ext::Routing) => 43,
            Some(Ext::Fragment(..)) => 44,
            None => proto,
        };
        match *e {
            Ext::HopByHop(n) | Ext::DestOpts(n) => {
                let units = n as usize % 4;
                chain.push(next);
                chain.push(units as u8);
                // PadN covering the rest of the header.
                let pad = 6 + units * 8;
                chain.push(1);
                chain.push((pad - 2) as u8);
                chain.extend(std::iter::repeat_n(0, pad - 2));
            }
            Ext::Routing => chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
            Ext::Fragment(off, more) => {
                let word = (off << 3) | more as u16;
                chain.push(next);
                chain.push(0);
                chain.extend_from_slice(&word.to_be_bytes());
                chain.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            }
        }
    }
    let first = match exts.first() {
        Some(Ext::HopByHop(_)) => 0,
        Some(Ext::DestOpts(_)) => 60,
        Some(Ext::Routing) => 43,
        Some(Ext::Fragment(..)) => 44,
        None => proto,
    };
    let plen = (chain.len() + payload.len()).min(0xffff);
    let mut p = Vec::with_capacity(40 + plen);
    p.push(0x60 | (tclass >> 4));
    p.push(tclass << 4);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&(plen as u16).to_be_bytes());
    p.push(first);
    p.push(hop);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&chain);
    p.extend_from_slice(payload);
    p
}

/// An IP packet of `src`'s family with default header fields.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: Vec<u8>, ttl: u8) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(
            s,
            d,
            proto,
            l4,
            &V4Opts {
                ttl,
                ..V4Opts::default()
            },
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, l4, ttl, 0, &[]),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// TCP flag bits.
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment (checksum left 0 for [`fill_l4_checksum`]).
pub fn tcp(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    fl: u8,
    options: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    opts.truncate(40);
    while !opts.len().is_multiple_of(4) {
        opts.push(1);
    }
    let mut t = Vec::with_capacity(20 + opts.len() + data.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((((20 + opts.len()) / 4) as u8) << 4);
    t.push(fl);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(data);
    t
}

/// A UDP datagram (checksum left 0).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()).min(0xffff) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// An SCTP packet with one chunk (CRC left 0).
pub fn sctp(sport: u16, dport: u16, vtag: u32, chunk_type: u8, data: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(16 + data.len());
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&vtag.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.push(chunk_type);
    s.push(0);
    s.extend_from_slice(&((4 + data.len()) as u16).to_be_bytes());
    s.extend_from_slice(data);
    while s.len() % 4 != 0 {
        s.push(0);
    }
    s
}

/// An ICMP or ICMPv6 message (checksum left 0): type, code, 4 bytes of rest-of-header,
/// then `data`.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    m
}

/// An Ethernet frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The EtherType of an IP packet by its version nibble.
pub fn ethertype_of(packet: &[u8]) -> u16 {
    match packet.first().map(|b| b >> 4) {
        Some(6) => 0x86dd,
        _ => 0x0800,
    }
}

/// An ARP request or reply.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// A neighbour advertisement for `target` at `mac` (ICMPv6 checksum filled), hop limit
/// 255, as a pod answers a solicitation.
pub fn neighbor_advert(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut data = target.octets().to_vec();
    data.extend_from_slice(&[2, 1]);
    data.extend_from_slice(&mac);
    let m = icmp(136, 0, [0x60, 0, 0, 0], &data);
    ipv6(src, dst, ICMPV6, m, 255, 0, &[])
}

/// A neighbour solicitation for `target` from `src` at `mac`.
pub fn neighbor_solicit(src: Ipv6Addr, target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | t[13] as u16,
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut data = t.to_vec();
    data.extend_from_slice(&[1, 1]);
    data.extend_from_slice(&mac);
    let m = icmp(135, 0, [0; 4], &data);
    ipv6(src, dst, ICMPV6, m, 255, 0, &[])
}

/// A VXLAN packet (outer Ethernet, IPv4, UDP with checksum 0, VXLAN) around `inner`.
#[allow(clippy::too_many_arguments)]
pub fn vxlan(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    port: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut payload = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    payload.extend_from_slice(inner);
    let dgram = udp(sport, port, &payload);
    let packet = ipv4_raw(src, dst, UDP, &dgram, &V4Opts::default());
    ethernet(eth_dst, eth_src, 0x0800, &packet)
}

// ---------------------------------------------------------------------------------------
// Generating packets from choices

/// What the generator draws addresses, ports and MACs from (mostly; sometimes it makes
/// them up).
#[derive(Clone, Debug, Default)]
pub struct Palette {
    /// IPv4 addresses of interest.
    pub v4: Vec<Ipv4Addr>,
    /// IPv6 addresses of interest.
    pub v6: Vec<Ipv6Addr>,
    /// Ports of interest.
    pub ports: Vec<u16>,
    /// MACs of interest.
    pub macs: Vec<[u8; 6]>,
    /// The overlay, for VXLAN frames.
    pub vxlan: Option<VxlanPalette>,
    /// The sender's own IPv4 address, used as the source most of the time.
    pub from_v4: Option<Ipv4Addr>,
    /// The sender's own IPv6 address.
    pub from_v6: Option<Ipv6Addr>,
}

/// The overlay as the generator sees it.
#[derive(Clone, Debug)]
pub struct VxlanPalette {
    /// UDP port.
    pub port: u16,
    /// VNI.
    pub vni: u32,
    /// The receiving VTEP.
    pub local: Ipv4Addr,
    /// Sending VTEPs.
    pub remotes: Vec<Ipv4Addr>,
}

impl Palette {
    /// An IPv4 address: from the palette mostly.
    pub fn v4(&self, s: &mut Src) -> Ipv4Addr {
        if !self.v4.is_empty() && !s.chance(1, 8) {
            s.pick(&self.v4)
        } else {
            Ipv4Addr::from(s.u32())
        }
    }

    /// An IPv6 address: from the palette mostly.
    pub fn v6(&self, s: &mut Src) -> Ipv6Addr {
        if !self.v6.is_empty() && !s.chance(1, 8) {
            s.pick(&self.v6)
        } else {
            let mut o = s.bytes(16);
            if s.chance(1, 2) {
                o[0] = 0xfd;
            }
            Ipv6Addr::from(<[u8; 16]>::try_from(o).expect("16 bytes"))
        }
    }

    /// A port: from the palette mostly.
    pub fn port(&self, s: &mut Src) -> u16 {
        if !self.ports.is_empty() && s.chance(2, 3) {
            s.pick(&self.ports)
        } else {
            s.u16()
        }
    }

    /// A MAC: from the palette mostly.
    pub fn mac(&self, s: &mut Src) -> [u8; 6] {
        if !self.macs.is_empty() && !s.chance(1, 8) {
            s.pick(&self.macs)
        } else if s.chance(1, 4) {
            [0xff; 6]
        } else {
            <[u8; 6]>::try_from(s.bytes(6)).expect("6 bytes")
        }
    }
}

/// A payload: a serial number first (so outputs can be told apart), then filler; mostly
/// short, sometimes past any MTU.
pub fn payload(s: &mut Src) -> Vec<u8> {
    let len = match s.below(8) {
        0 => 0,
        1..=4 => s.range(8, 64) as usize,
        5 => s.range(0, 7) as usize,
        6 => s.range(64, 600) as usize,
        _ => s.range(1300, 1600) as usize,
    };
    let mut p = s.u32().to_be_bytes().to_vec();
    p.extend_from_slice(&s.u32().to_be_bytes());
    p.resize(len, 0x5a);
    if len > 8 && s.chance(1, 4) {
        let junk = s.bytes(len - 8);
        p[8..].copy_from_slice(&junk);
    }
    p
}

/// A transport message of `proto` (checksum not filled), echo identifiers and ports from
/// the palette; ICMP errors quote a packet made by [`ip_packet_gen`] one level deeper.
pub fn transport_gen(s: &mut Src, pal: &Palette, proto: u8, v6: bool, depth: u8) -> Vec<u8> {
    let (sport, dport) = (pal.port(s), pal.port(s));
    match proto {
        TCP => {
            let fl = match s.below(8) {
                0..=2 => flags::SYN,
                3 => flags::SYN | flags::ACK,
                4 => flags::ACK | flags::PSH,
                5 => flags::FIN | flags::ACK,
                6 => flags::RST,
                _ => s.u8(),
            };
            let opts = if s.chance(1, 4) {
                // MSS, then random options.
                let mut o = vec![2, 4, 5, 0xb4];
                let n = s.below(12);
                o.extend(s.bytes(n));
                o
            } else {
                Vec::new()
            };
            tcp(sport, dport, s.u32(), s.u32(), fl, &opts, &payload(s))
        }
        UDP => udp(sport, dport, &payload(s)),
        SCTP => {
            let chunk = s.pick(&[1u8, 2, 0, 3, 4, 5, 6, 7, 8, 14]);
            sctp(sport, dport, s.u32(), chunk, &payload(s))
        }
        ICMP | ICMPV6 => {
            let (req, rep, errors): (u8, u8, &[u8]) = if v6 {
                (128, 129, &[1, 2, 3, 4])
            } else {
                (8, 0, &[3, 11, 12, 4, 5])
            };
            let id = pal.port(s);
            match s.below(6) {
                0 | 1 => icmp(req, 0, [(id >> 8) as u8, id as u8, 0, s.u8()], &payload(s)),
                2 => icmp(rep, 0, [(id >> 8) as u8, id as u8, 0, s.u8()], &payload(s)),
                3 | 4 if depth < 2 => {
                    let ty = s.pick(errors);
                    let code = s.below(5) as u8;
                    let rest = if ty == 3 && !v6 && code == 4 || v6 && ty == 2 {
                        [0, 0, 0x05, 0x78]
                    } else {
                        [0; 4]
                    };
                    let mut quoted = ip_packet_gen(s, pal, Some(v6), depth + 1);
                    match s.below(4) {
                        0 => quoted.truncate(if v6 { 48 } else { 28 }),
                        1 => quoted.truncate(s.below(quoted.len() + 1)),
                        _ => quoted.truncate(1232),
                    }
                    icmp(ty, code, rest, &quoted)
                }
                _ => icmp(
                    s.u8(),
                    s.u8(),
                    [s.u8(), s.u8(), s.u8(), s.u8()],
                    &payload(s),
                ),
            }
        }
        _ => payload(s),
    }
}

/// An IP packet (no Ethernet): family `v6` or chosen, addresses and ports from the
/// palette, any protocol, IPv4 options and fragments, IPv6 extension headers.
pub fn ip_packet_gen(s: &mut Src, pal: &Palette, v6: Option<bool>, depth: u8) -> Vec<u8> {
    let v6 = v6.unwrap_or_else(|| s.chance(1, 3));
    let proto = match s.below(12) {
        0..=2 => TCP,
        3..=5 => UDP,
        6 => SCTP,
        7 | 8 => {
            if v6 {
                ICMPV6
            } else {
                ICMP
            }
        }
        9 => {
            if v6 {
                ICMP
            } else {
                ICMPV6
            }
        }
        _ => s.u8(),
    };
    let l4 = transport_gen(s, pal, proto, v6, depth);
    let ttl = match s.below(10) {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 255,
        _ => 64,
    };
    if v6 {
        let src = match pal.from_v6 {
            Some(a) if s.chance(3, 4) => a,
            _ => pal.v6(s),
        };
        let dst = pal.v6(s);
        let mut exts = Vec::new();
        if s.chance(1, 5) {
            for _ in 0..1 + s.below(3) {
                exts.push(match s.below(5) {
                    0 => Ext::HopByHop(s.u8()),
                    1 => Ext::DestOpts(s.u8()),
                    2 => Ext::Routing,
                    _ => Ext::Fragment(
                        if s.chance(1, 2) { 0 } else { s.u16() & 0x1fff },
                        s.chance(1, 2),
                    ),
                });
            }
        }
        ipv6(src, dst, proto, l4, ttl, s.u8(), &exts)
    } else {
        let src = match pal.from_v4 {
            Some(a) if s.chance(3, 4) => a,
            _ => pal.v4(s),
        };
        let dst = pal.v4(s);
        let mut o = V4Opts {
            ttl,
            tos: if s.chance(1, 3) { s.u8() } else { 0 },
            id: s.u16(),
            frag: if s.chance(1, 4) { 0 } else { 0x4000 },
            options: Vec::new(),
        };
        if s.chance(1, 8) {
            let n = s.below(41);
            o.options = if s.chance(1, 2) {
                vec![1; n]
            } else {
                s.bytes(n)
            };
        }
        if s.chance(1, 10) {
            o.frag = match s.below(3) {
                0 => 0x2000,
                1 => s.u16() & 0x1fff,
                _ => 0x2000 | (s.u16() & 0x1fff),
            };
        }
        ipv4(src, dst, proto, l4, &o)
    }
}

/// An Ethernet frame: IPv4, IPv6, ARP, VXLAN around another frame, or junk; sometimes
/// behind VLAN tags.
pub fn frame_gen(s: &mut Src, pal: &Palette, depth: u8) -> Vec<u8> {
    let (dst, src) = (pal.mac(s), pal.mac(s));
    let (ethertype, body) = match s.below(16) {
        0..=9 => {
            let p = ip_packet_gen(s, pal, None, depth);
            (ethertype_of(&p), p)
        }
        10 | 11 => {
            let op = if s.chance(3, 4) { 1 } else { 2 };
            let spa = match pal.from_v4 {
                Some(a) if s.chance(3, 4) => a,
                _ => pal.v4(s),
            };
            let tpa = pal.v4(s);
            (0x0806, arp(op, pal.mac(s), spa, [0; 6], tpa))
        }
        12..=14 if depth == 0 && pal.vxlan.is_some() => {
            let x = pal.vxlan.clone().expect("checked");
            let inner = frame_gen(s, pal, depth + 1);
            let src = if s.chance(7, 8) && !x.remotes.is_empty() {
                s.pick(&x.remotes)
            } else {
                pal.v4(s)
            };
            let vni = if s.chance(7, 8) {
                x.vni
            } else {
                s.u32() & 0xff_ffff
            };
            let f = vxlan(
                dst,
                src_mac(src),
                src,
                x.local,
                pal.port(s),
                x.port,
                vni,
                &inner,
            );
            return f;
        }
        _ => {
            let (t, n) = (s.u16(), s.below(80));
            (t, s.bytes(n))
        }
    };
    let mut f = ethernet(dst, src, ethertype, &body);
    if s.chance(1, 12) {
        // 802.1Q / 802.1ad tags between the MACs and the EtherType.
        for _ in 0..1 + s.below(2) {
            let tpid: u16 = if s.chance(1, 2) { 0x8100 } else { 0x88a8 };
            let tci = s.u16() & 0x0fff;
            let mut tag = tpid.to_be_bytes().to_vec();
            tag.extend_from_slice(&tci.to_be_bytes());
            f.splice(12..12, tag);
        }
    }
    if f.len() < 60 && s.chance(1, 2) {
        f.resize(60, 0);
    }
    f
}

fn src_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0, o[0], o[1], o[2], o[3]]
}

/// Recomputes the IPv4 header checksum of a frame whose IP header starts at 14, if it
/// looks like one (so a mutation behind it gets past the header check).
pub fn fix_ipv4_header(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [8, 0] || f[14] >> 4 != 4 {
        return;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    f[24..26].fill(0);
    let c = !fold(sum16(&f[14..14 + ihl], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Mutates a frame: truncation, extension, bit flips, broken lengths, IHL, fragment bits,
/// EtherType, checksums; the IPv4 header checksum is often fixed up afterwards so the
/// mutation reaches what lies behind it.
pub fn mutate(s: &mut Src, f: &mut Vec<u8>) {
    for _ in 0..1 + s.below(3) {
        let len = f.len();
        match s.below(11) {
            0 => f.truncate(s.below(len + 1)),
            1 => {
                let n = 1 + s.below(64);
                let extra = s.bytes(n);
                f.extend_from_slice(&extra);
            }
            2 if len > 0 => {
                let i = s.below(len);
                f[i] ^= 1 << s.below(8);
            }
            3 if len > 0 => {
                let i = s.below(len);
                f[i] = s.u8();
            }
            4 if len >= 20 => {
                // IPv4 total length or IPv6 payload length.
                let at = if f[12..14] == [0x86, 0xdd] { 18 } else { 16 };
                let old = u16::from_be_bytes([f[at], f[at + 1]]);
                let new = match s.below(3) {
                    0 => s.u16(),
                    1 => old.wrapping_add(s.range(1, 8) as u16),
                    _ => old.wrapping_sub(s.range(1, 8) as u16),
                };
                f[at..at + 2].copy_from_slice(&new.to_be_bytes());
            }
            5 if len > 14 => f[14] = (f[14] & 0xf0) | s.below(16) as u8,
            6 if len > 0 => {
                // Somewhere in the transport header, where checksums and ports live.
                let i = (34 + s.below(24)).min(len - 1);
                f[i] = f[i].wrapping_add(1 + s.below(255) as u8);
            }
            7 if len >= 22 && f[12..14] == [8, 0] => {
                let frag: u16 = match s.below(3) {
                    0 => 0x2000,
                    1 => s.u16() & 0x1fff,
                    _ => s.u16() & 0x3fff,
                };
                f[20..22].copy_from_slice(&frag.to_be_bytes());
            }
            8 if len >= 14 => {
                let any = s.u16();
                let t = s.pick(&[0x0800u16, 0x86dd, 0x0806, 0x8100, any]);
                f[12..14].copy_from_slice(&t.to_be_bytes());
            }
            9 if len >= 26 => f[24] ^= 0xff,
            _ => fix_ipv4_header(f),
        }
    }
    if s.chance(1, 2) {
        fix_ipv4_header(f);
    }
}

// ---------------------------------------------------------------------------------------
// The simulated node and random tables for it

/// The node the pipeline target simulates (and whose tables the other targets send
/// through the control stream): node A with three pods and a host port, node B behind
/// the overlay, a router and hosts outside.
pub mod layout {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// Port 0: the uplink.
    pub const UPLINK: usize = 0;
    /// Pod ports are 1..=PODS.
    pub const PODS: usize = 3;
    /// The host port (the node's kernel).
    pub const HOST: usize = PODS + 1;
    /// Ports in all.
    pub const PORTS: usize = PODS + 2;
    /// The uplink's MAC.
    pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    /// The router's MAC and address, behind the uplink.
    pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xff, 0x01];
    /// The router's address: the node's default gateway.
    pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
    /// Node A's addresses (its VTEP is the IPv4 one).
    pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
    /// Node A's IPv6 address.
    pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, 0, 2);
    /// The host port's MAC.
    pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 3, 0, 1];
    /// The node kernel's MAC, at the other end of the host port.
    pub const KERNEL_MAC: [u8; 6] = [0x02, 0, 0, 3, 0, 2];
    /// Node B: its VTEP address, its uplink's MAC and its VTEP MAC.
    pub const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);
    /// Node B's uplink MAC (the outer Ethernet destination towards it).
    pub const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 2, 0, 3];
    /// Node B's VTEP MAC.
    pub const NODE_B_VTEP_MAC: [u8; 6] = [0x9a, 0x3c, 0x2e, 0, 0, 3];
    /// Node A's VTEP MAC, as announced.
    pub const VTEP_MAC: [u8; 6] = [0x9a, 0x3c, 0x2e, 0, 0, 2];
    /// The overlay's UDP port and VNI.
    pub const VXLAN_PORT: u16 = 8472;
    /// VNI.
    pub const VNI: u32 = 1;
    /// A host outside the cluster.
    pub const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    /// Its IPv6 address.
    pub const OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
    /// An address in node A's pod network that no pod has.
    pub const GHOST_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 99);

    /// The MAC of pod port `i`'s dataplane end.
    pub fn port_mac(i: usize) -> [u8; 6] {
        [0x02, 0, 0, 1, 0, i as u8]
    }

    /// The MAC of pod `i`.
    pub fn pod_mac(i: usize) -> [u8; 6] {
        [0x0a, 0x58, 10, 244, 1, 10 + i as u8]
    }

    /// Pod `i`'s IPv4 address.
    pub fn pod_v4(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 1, 10 + i as u8)
    }

    /// Pod `i`'s IPv6 address.
    pub fn pod_v6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10 + i as u16)
    }

    /// Pod `i`'s address of a family.
    pub fn pod_ip(i: usize, v6: bool) -> IpAddr {
        if v6 {
            pod_v6(i).into()
        } else {
            pod_v4(i).into()
        }
    }

    /// Pod `i`'s name.
    pub fn pod_name(i: usize) -> String {
        format!("default/pod-{i}")
    }

    /// Pod `j` of node B.
    pub fn remote_ip(j: usize, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x20 + j as u16).into()
        } else {
            Ipv4Addr::new(10, 244, 2, 20 + j as u8).into()
        }
    }

    /// Node A's address of a family.
    pub fn node_ip(v6: bool) -> IpAddr {
        if v6 {
            NODE_V6.into()
        } else {
            NODE_V4.into()
        }
    }

    /// The outside host's address of a family.
    pub fn outside_ip(v6: bool) -> IpAddr {
        if v6 {
            OUTSIDE_V6.into()
        } else {
            OUTSIDE_V4.into()
        }
    }

    /// Service `k`'s ClusterIP.
    pub fn cluster_ip(k: usize, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x10 + k as u16).into()
        } else {
            Ipv4Addr::new(172, 30, 0, 10 + k as u8).into()
        }
    }

    /// Service `k`'s load-balancer address.
    pub fn lb_ip(k: usize, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0x2001, 0xdb8, 0x1b, 0, 0, 0, 0, k as u16).into()
        } else {
            Ipv4Addr::new(1, 2, 3, 4 + k as u8).into()
        }
    }

    /// Service `k`'s external IP.
    pub fn external_ip(k: usize, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, k as u16).into()
        } else {
            Ipv4Addr::new(198, 51, 100, 7 + k as u8).into()
        }
    }

    /// Ports Services and endpoints use.
    pub const PORT_CHOICES: [u16; 6] = [80, 53, 443, 8080, 9999, 5000];
}

/// Every address, port and MAC of the simulated node, for the frame generator.
pub fn layout_palette() -> Palette {
    use layout::*;
    let mut v4 = vec![ROUTER, NODE_V4, NODE_B, OUTSIDE_V4, GHOST_V4];
    let mut v6 = vec![NODE_V6, OUTSIDE_V6];
    for i in 1..=PODS {
        v4.push(pod_v4(i));
        v6.push(pod_v6(i));
    }
    v4.push(Ipv4Addr::new(10, 244, 1, 1));
    v6.push(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1));
    for j in 0..2 {
        if let (IpAddr::V4(a), IpAddr::V6(b)) = (remote_ip(j, false), remote_ip(j, true)) {
            v4.push(a);
            v6.push(b);
        }
    }
    for k in 0..8 {
        for f in [cluster_ip, lb_ip, external_ip] {
            if let (IpAddr::V4(a), IpAddr::V6(b)) = (f(k, false), f(k, true)) {
                v4.push(a);
                v6.push(b);
            }
        }
    }
    v4.push(Ipv4Addr::new(172, 30, 9, 9));
    v4.push(Ipv4Addr::new(224, 0, 0, 1));
    v4.push(Ipv4Addr::BROADCAST);
    v6.push(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1));
    let mut ports: Vec<u16> = PORT_CHOICES.to_vec();
    ports.extend([0, 1, 30000, 30001, 30002, 40000, 61000, 65535, VXLAN_PORT]);
    let mut macs = vec![UPLINK_MAC, ROUTER_MAC, HOST_MAC, KERNEL_MAC, NODE_B_MAC];
    for i in 1..=PODS {
        macs.push(port_mac(i));
        macs.push(pod_mac(i));
    }
    Palette {
        v4,
        v6,
        ports,
        macs,
        vxlan: Some(VxlanPalette {
            port: VXLAN_PORT,
            vni: VNI,
            local: NODE_V4,
            remotes: vec![NODE_B],
        }),
        from_v4: None,
        from_v6: None,
    }
}

/// Random but valid tables for the simulated node: a few Services of every frontend kind
/// and protocol, endpoints on this node, on node B, outside and nowhere, in every state;
/// affinity and traffic policies; NetworkPolicy isolating some pods; node B present or
/// not; the overlay on or off.
pub fn table_spec_gen(s: &mut Src) -> nat::spec::TableSpec {
    use layout::*;
    use nat::spec::*;
    let mut services = Vec::new();
    for k in 0..s.range(0, 8) as usize {
        let v6 = s.chance(1, 3);
        let protocol = s.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
        let port = s.pick(&PORT_CHOICES);
        let mut frontends = vec![FrontendSpec {
            kind: FrontendKind::ClusterIp,
            ip: cluster_ip(k, v6),
            port,
        }];
        if s.chance(1, 3) {
            frontends.push(FrontendSpec {
                kind: FrontendKind::NodePort,
                ip: node_ip(v6),
                port: 30000 + k as u16,
            });
        }
        if s.chance(1, 4) {
            frontends.push(FrontendSpec {
                kind: FrontendKind::LoadBalancer,
                ip: lb_ip(k, v6),
                port,
            });
        }
        if s.chance(1, 5) {
            frontends.push(FrontendSpec {
                kind: FrontendKind::ExternalIp,
                ip: external_ip(k, v6),
                port,
            });
        }
        let mut all = Vec::new();
        for _ in 0..s.range(0, 4) {
            let (ip, local) = match s.below(8) {
                0..=3 => (pod_ip(1 + s.below(PODS), v6), true),
                4 | 5 => (remote_ip(s.below(2), v6), false),
                6 => (outside_ip(v6), false),
                _ => (
                    if v6 {
                        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x99))
                    } else {
                        GHOST_V4.into()
                    },
                    true,
                ),
            };
            let (ready, serving, terminating) = match s.below(6) {
                0..=3 => (true, true, false),
                4 => (false, true, true),
                _ => (false, false, s.chance(1, 2)),
            };
            let ep = EndpointSpec {
                ip,
                port: s.pick(&PORT_CHOICES),
                local,
                ready,
                serving,
                terminating,
            };
            if !all
                .iter()
                .any(|e: &EndpointSpec| e.ip == ep.ip && e.port == ep.port)
            {
                all.push(ep);
            }
        }
        // Control's categorisation: ready ones, else the serving-and-terminating ones.
        let pick = |eps: Vec<&EndpointSpec>| -> Vec<EndpointSpec> {
            let ready: Vec<EndpointSpec> = eps
                .iter()
                .filter(|e| e.ready)
                .map(|e| (*e).clone())
                .collect();
            if !ready.is_empty() {
                return ready;
            }
            eps.iter()
                .filter(|e| e.serving && e.terminating)
                .map(|e| (*e).clone())
                .collect()
        };
        let cluster_endpoints = pick(all.iter().collect());
        let local_endpoints = pick(all.iter().filter(|e| e.local).collect());
        services.push(ServiceSpec {
            name: format!("default/svc-{k}:p"),
            protocol,
            frontends,
            cluster_endpoints,
            local_endpoints,
            all_endpoints: all,
            internal_local: s.chance(1, 5),
            external_local: s.chance(1, 4),
            affinity_timeout_s: if s.chance(1, 4) {
                Some(s.range(1, 10800))
            } else {
                None
            },
            lb_source_ranges: Vec::new(),
            refused: Vec::new(),
        });
    }
    let mut local_pods = Vec::new();
    for i in 1..=PODS {
        if s.chance(1, 12) {
            continue; // deleted
        }
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_string(), format!("a{}", i % 2));
        local_pods.push(PodSpec {
            name: pod_name(i),
            ips: vec![pod_ip(i, false), pod_ip(i, true)],
            labels,
        });
    }
    let remote_nodes = if s.chance(7, 8) {
        vec![RemoteNodeSpec {
            name: "node-b".into(),
            pod_cidrs: vec![
                "10.244.2.0/24".parse().expect("literal"),
                "fd00:10:244:2::/64".parse().expect("literal"),
            ],
            vtep_ip: NODE_B.into(),
            vtep_mac: NODE_B_VTEP_MAC,
        }]
    } else {
        Vec::new()
    };
    let masquerade_all = s.chance(1, 6);
    let cluster = ClusterSpec {
        masquerade_all,
        ip_masq: !s.chance(1, 6),
        ..ClusterSpec::default()
    };
    TableSpec {
        node: NodeSpec {
            name: "node-a".into(),
            addresses: vec![NODE_V4.into(), NODE_V6.into()],
            pod_cidrs: vec![
                "10.244.1.0/24".parse().expect("literal"),
                "fd00:10:244:1::/64".parse().expect("literal"),
            ],
            zone: None,
            vtep_ip: if s.chance(9, 10) {
                Some(NODE_V4.into())
            } else {
                None
            },
            vtep_mac: Some(VTEP_MAC),
        },
        cluster,
        services: services.into_iter().map(std::sync::Arc::new).collect(),
        local_pods,
        remote_nodes,
        policy: policy_gen(s),
    }
}

/// NetworkPolicy isolating some of the simulated node's pods, with rules over pods,
/// blocks and ports.
pub fn policy_gen(s: &mut Src) -> nat::spec::PolicySpec {
    use layout::*;
    use nat::spec::*;
    if s.chance(1, 2) {
        return PolicySpec::default();
    }
    let n = s.range(1, 3);
    let policies: Vec<String> = (0..n).map(|p| format!("default/np-{p}")).collect();
    let nets: Vec<ipnet::IpNet> = [
        "10.244.0.0/16",
        "10.244.1.11/32",
        "10.244.1.12/32",
        "10.244.2.0/24",
        "0.0.0.0/0",
        "203.0.113.0/24",
        "192.168.0.0/24",
        "fd00:10:244::/48",
        "fd00:10:244:1::11/128",
        "::/0",
    ]
    .iter()
    .map(|t| t.parse().expect("literal"))
    .collect();
    let isolation = |s: &mut Src| -> Option<IsolationSpec> {
        if !s.chance(1, 2) {
            return None;
        }
        let mut pols: Vec<u32> = (0..n).filter(|_| s.chance(1, 2)).collect();
        if pols.is_empty() {
            pols.push(0);
        }
        let mut rules = Vec::new();
        for _ in 0..s.range(0, 3) {
            let peers = if s.chance(1, 3) {
                None
            } else {
                let n = s.range(1, 3);
                Some((0..n).map(|_| s.pick(&nets)).collect())
            };
            let ports = if s.chance(1, 2) {
                None
            } else {
                let n_ranges = s.range(1, 2);
                Some(
                    (0..n_ranges)
                        .map(|_| {
                            let first = s.pick(&PORT_CHOICES);
                            PortRangeSpec {
                                protocol: s.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
                                first,
                                last: if s.chance(1, 3) {
                                    first + s.range(0, 100) as u16
                                } else {
                                    first
                                },
                            }
                        })
                        .collect(),
                )
            };
            rules.push(RuleSpec {
                policy: s.pick(&pols),
                peers,
                ports,
            });
        }
        Some(IsolationSpec {
            policies: pols,
            rules,
        })
    };
    let mut pods = Vec::new();
    for i in 1..=PODS {
        if s.chance(1, 2) {
            let ingress = isolation(s);
            let egress = isolation(s);
            pods.push(PodPolicySpec {
                pod: pod_name(i),
                ips: vec![pod_ip(i, false), pod_ip(i, true)],
                ingress,
                egress,
            });
        }
    }
    PolicySpec { policies, pods }
}
