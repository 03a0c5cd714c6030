//! VXLAN as flannel's backend puts it on the wire (the kernel's vxlan device: VNI 1, UDP
//! port 8472, no learning): outer Ethernet, IPv4, UDP with a zero checksum and a source
//! port hashed from the inner flow, the 8-byte VXLAN header, then the inner Ethernet frame
//! addressed from our VTEP MAC to the remote node's VTEP MAC.
//!
//! Pure: frames in, frames out. Encapsulation prepends the outer headers in the frame's
//! headroom, so nothing is copied.

use std::net::Ipv4Addr;

use nat::checksum;
use nat::packet::{ETH_IPV4, ETH_LEN, PROTO_UDP};

/// Bytes VXLAN adds: outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
pub const VXLAN_OVERHEAD: usize = 50;
/// The VXLAN header's flags byte with the I bit (a valid VNI follows).
const FLAG_VNI: u8 = 0x08;
/// The kernel's default range for VXLAN source ports (`udp_flow_src_port` over the
/// ephemeral range).
const SRC_PORT_MIN: u16 = 32768;
const SRC_PORT_SPAN: u64 = 60999 - 32768 + 1;

/// This node's end of the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Outer source address (the node's VTEP address).
    pub local_vtep_ip: Ipv4Addr,
    /// Inner source MAC (our VTEP MAC, as other nodes know it).
    pub local_vtep_mac: [u8; 6],
    /// Outer source MAC (the uplink's).
    pub uplink_mac: [u8; 6],
}

/// The other end of one overlay packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteVtep {
    /// Outer destination address.
    pub ip: Ipv4Addr,
    /// Inner destination MAC (the remote VTEP's).
    pub vtep_mac: [u8; 6],
    /// Outer destination MAC (the next hop on the uplink towards `ip`).
    pub next_hop_mac: [u8; 6],
}

/// A decapsulated packet: where the inner frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decap {
    /// Offset of the inner Ethernet frame in the input.
    pub inner_offset: usize,
    /// Length of the inner frame.
    pub inner_len: usize,
    /// The sending VTEP.
    pub outer_src: Ipv4Addr,
    /// The VNI.
    pub vni: u32,
}

/// Why a frame did not decapsulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapError {
    /// Not IPv4/UDP to the overlay's port.
    NotVxlan,
    /// Shorter than its headers say.
    Truncated,
    /// The outer IPv4 header checksum does not verify.
    BadChecksum,
    /// The VXLAN I flag is not set.
    NoVni,
    /// Another VNI.
    WrongVni,
}

/// Wraps the Ethernet frame at `chunk[off..off + len]` for `remote`; returns the new
/// offset and length, or `None` when the headroom before `off` is under
/// [`VXLAN_OVERHEAD`]. `inner_hash` picks the outer UDP source port, so one flow keeps one
/// path through ECMP.
pub fn encapsulate(
    chunk: &mut [u8],
    off: usize,
    len: usize,
    overlay: &Overlay,
    remote: &RemoteVtep,
    inner_hash: u64,
) -> Option<(usize, usize)> {
    if off < VXLAN_OVERHEAD || chunk.len() < off + len || len < ETH_LEN {
        return None;
    }
    // Inner Ethernet: VTEP to VTEP, as the kernel's vxlan device addresses it.
    chunk[off..off + 6].copy_from_slice(&remote.vtep_mac);
    chunk[off + 6..off + 12].copy_from_slice(&overlay.local_vtep_mac);
    let start = off - VXLAN_OVERHEAD;
    let total = len + VXLAN_OVERHEAD;
    let h = &mut chunk[start..off];
    // Outer Ethernet.
    h[0..6].copy_from_slice(&remote.next_hop_mac);
    h[6..12].copy_from_slice(&overlay.uplink_mac);
    h[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
    // Outer IPv4: DF set, as the kernel sets it for vxlan by default; ID 0 (DF packets are
    // never fragmented, RFC 6864).
    let ip_len = (total - ETH_LEN) as u16;
    let ip = &mut h[ETH_LEN..ETH_LEN + 20];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&[0x40, 0]);
    ip[8] = 64;
    ip[9] = PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&overlay.local_vtep_ip.octets());
    ip[16..20].copy_from_slice(&remote.ip.octets());
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // Outer UDP, checksum zero (allowed for IPv4, and what the kernel sends by default).
    let udp = &mut h[ETH_LEN + 20..ETH_LEN + 28];
    let sport = SRC_PORT_MIN + ((inner_hash >> 16) % SRC_PORT_SPAN) as u16;
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&overlay.port.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    // VXLAN.
    let v = &mut h[ETH_LEN + 28..ETH_LEN + 36];
    v.copy_from_slice(&[FLAG_VNI, 0, 0, 0, 0, 0, 0, 0]);
    v[4..7].copy_from_slice(&overlay.vni.to_be_bytes()[1..4]);
    Some((start, total))
}

/// Validates a VXLAN frame for this overlay and locates its inner frame.
pub fn decapsulate(frame: &[u8], overlay: &Overlay) -> Result<Decap, DecapError> {
    let ip = frame
        .get(ETH_LEN..ETH_LEN + 20)
        .ok_or(DecapError::Truncated)?;
    if u16::from_be_bytes([frame[12], frame[13]]) != ETH_IPV4
        || ip[0] >> 4 != 4
        || ip[9] != PROTO_UDP
    {
        return Err(DecapError::NotVxlan);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || total < ihl + 16 || frame.len() < ETH_LEN + total {
        return Err(DecapError::Truncated);
    }
    if checksum::sum(&frame[ETH_LEN..ETH_LEN + ihl], 0) != 0xffff {
        return Err(DecapError::BadChecksum);
    }
    let udp = &frame[ETH_LEN + ihl..ETH_LEN + ihl + 8];
    if u16::from_be_bytes([udp[2], udp[3]]) != overlay.port {
        return Err(DecapError::NotVxlan);
    }
    let v = &frame[ETH_LEN + ihl + 8..ETH_LEN + ihl + 16];
    if v[0] & FLAG_VNI == 0 {
        return Err(DecapError::NoVni);
    }
    let vni = u32::from_be_bytes([0, v[4], v[5], v[6]]);
    if vni != overlay.vni {
        return Err(DecapError::WrongVni);
    }
    let inner_offset = ETH_LEN + ihl + 16;
    let inner_len = ETH_LEN + total - inner_offset;
    if inner_len < ETH_LEN {
        return Err(DecapError::Truncated);
    }
    Ok(Decap {
        inner_offset,
        inner_len,
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        vni,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> Overlay {
        Overlay {
            vni: 1,
            port: 8472,
            local_vtep_ip: Ipv4Addr::new(192, 168, 0, 2),
            local_vtep_mac: [0x9a, 0x3c, 0x2e, 0, 0, 2],
            uplink_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    #[test]
    fn round_trip() {
        let inner: Vec<u8> = (0..80u8).collect();
        let mut chunk = vec![0u8; 256 + 128];
        chunk[256..256 + 80].copy_from_slice(&inner);
        let remote = RemoteVtep {
            ip: Ipv4Addr::new(192, 168, 0, 3),
            vtep_mac: [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33],
            next_hop_mac: [2, 0, 0, 0, 0, 3],
        };
        let (off, len) = encapsulate(&mut chunk, 256, 80, &overlay(), &remote, 12345).unwrap();
        assert_eq!((off, len), (206, 130));
        let frame = &chunk[off..off + len];
        // The receiving side sees it as VXLAN for its own overlay.
        let mut theirs = overlay();
        theirs.local_vtep_ip = remote.ip;
        let d = decapsulate(frame, &theirs).unwrap();
        assert_eq!((d.inner_offset, d.inner_len, d.vni), (50, 80, 1));
        assert_eq!(d.outer_src, Ipv4Addr::new(192, 168, 0, 2));
        let got = &frame[50..];
        assert_eq!(&got[0..6], &remote.vtep_mac);
        assert_eq!(&got[6..12], &overlay().local_vtep_mac);
        assert_eq!(&got[12..], &inner[12..]);
        // Outer source port in the kernel's range; UDP checksum zero; DF set.
        let sport = u16::from_be_bytes([frame[34], frame[35]]);
        assert!((32768..=60999).contains(&sport));
        assert_eq!(&frame[40..42], &[0, 0]);
        assert_eq!(frame[20] & 0x40, 0x40);
    }

    #[test]
    fn too_little_headroom_is_refused() {
        let mut chunk = vec![0u8; 200];
        let remote = RemoteVtep {
            ip: Ipv4Addr::new(192, 168, 0, 3),
            vtep_mac: [0; 6],
            next_hop_mac: [0; 6],
        };
        assert!(encapsulate(&mut chunk, 40, 60, &overlay(), &remote, 0).is_none());
    }

    #[test]
    fn garbage_never_panics_and_wrong_vni_is_refused() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for n in 0..2000usize {
            let mut buf = vec![0u8; n % 200];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if buf.len() > 14 {
                buf[12] = 8;
                buf[13] = 0;
            }
            let _ = decapsulate(&buf, &overlay());
        }
        let mut chunk = vec![0u8; 400];
        let remote = RemoteVtep {
            ip: Ipv4Addr::new(192, 168, 0, 2),
            vtep_mac: [0; 6],
            next_hop_mac: [0; 6],
        };
        let mut other = overlay();
        other.vni = 7;
        let (off, len) = encapsulate(&mut chunk, 256, 60, &other, &remote, 0).unwrap();
        assert_eq!(
            decapsulate(&chunk[off..off + len], &overlay()),
            Err(DecapError::WrongVni)
        );
        for cut in 0..len {
            assert!(decapsulate(&chunk[off..off + cut], &overlay()).is_err());
        }
    }
}
