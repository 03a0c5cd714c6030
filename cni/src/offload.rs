//! Turns off the pod interface's checksum and segmentation offloads, as `ethtool -K eth0
//! tx off rx off tso off gso off gro off` does, through ethtool's generic-netlink family
//! (`ETHTOOL_MSG_FEATURES_SET`, Linux 5.6+).
//!
//! kxdp rewrites headers with incremental checksums and never segments: a partial
//! checksum or a 64 KiB TSO frame from a pod would leave the node wrong. No crate sets
//! ethtool features over netlink without an async runtime, and the messages are a few
//! nested attributes, so they are written here.

use std::io;

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// The features turned off, by the kernel's names (`ethtool -k` shows them).
pub const FEATURES_OFF: &[&str] = &[
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-sctp",
    "tx-tcp-segmentation",
    "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation",
    "tx-tcp6-segmentation",
    "tx-udp-segmentation",
    "tx-generic-segmentation",
    "rx-checksum",
    "rx-gro",
];

/// Features only newer kernels name (AccECN segmentation, Linux 6.18): asked for first, and
/// left out when the kernel refuses a name it does not know.
pub const NEWER_FEATURES_OFF: &[&str] = &["tx-tcp-accecn-segmentation"];

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const ETHTOOL_MSG_FEATURES_SET: u8 = 12;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_WANTED: u16 = 3;
const ETHTOOL_A_HEADER_DEV_INDEX: u16 = 1;
const ETHTOOL_A_HEADER_FLAGS: u16 = 3;
const ETHTOOL_FLAG_OMIT_REPLY: u32 = 1 << 1;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;

/// Turns [`FEATURES_OFF`] (and [`NEWER_FEATURES_OFF`] where the kernel has them) off on
/// link `index` of the calling thread's namespace.
pub fn disable(index: u32) -> io::Result<()> {
    let all: Vec<&str> = FEATURES_OFF
        .iter()
        .chain(NEWER_FEATURES_OFF)
        .copied()
        .collect();
    match set_off(index, &all) {
        // An unknown bit name is refused with EOPNOTSUPP ("unrecognized bit name").
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => set_off(index, FEATURES_OFF),
        other => other,
    }
}

fn set_off(index: u32, features: &[&str]) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let family = ethtool_family(&socket)?;
    let mut header = Vec::new();
    put_attr(
        &mut header,
        ETHTOOL_A_HEADER_DEV_INDEX,
        &index.to_ne_bytes(),
    );
    put_attr(
        &mut header,
        ETHTOOL_A_HEADER_FLAGS,
        &ETHTOOL_FLAG_OMIT_REPLY.to_ne_bytes(),
    );
    let mut bits = Vec::new();
    for name in features {
        // A bit listed without ETHTOOL_A_BITSET_BIT_VALUE is set to 0; bits not listed
        // keep their state (no ETHTOOL_A_BITSET_NOMASK).
        let mut bit = Vec::new();
        put_attr(&mut bit, ETHTOOL_A_BITSET_BIT_NAME, &c_string(name));
        put_attr(&mut bits, ETHTOOL_A_BITSET_BITS_BIT | NLA_F_NESTED, &bit);
    }
    let mut wanted = Vec::new();
    put_attr(&mut wanted, ETHTOOL_A_BITSET_BITS | NLA_F_NESTED, &bits);
    let mut attrs = Vec::new();
    put_attr(
        &mut attrs,
        ETHTOOL_A_FEATURES_HEADER | NLA_F_NESTED,
        &header,
    );
    put_attr(
        &mut attrs,
        ETHTOOL_A_FEATURES_WANTED | NLA_F_NESTED,
        &wanted,
    );
    send(
        &socket,
        family,
        ETHTOOL_MSG_FEATURES_SET,
        NLM_F_ACK,
        2,
        &attrs,
    )?;
    loop {
        for (kind, seq, payload) in receive(&socket)? {
            if seq == 2 && kind == NLMSG_ERROR {
                return ack(&payload);
            }
        }
    }
}

/// The ethtool family's id, asked of the generic-netlink controller.
fn ethtool_family(socket: &Socket) -> io::Result<u16> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &c_string("ethtool"));
    send(socket, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0, 1, &attrs)?;
    loop {
        for (kind, seq, payload) in receive(socket)? {
            if seq != 1 {
                continue;
            }
            if kind == NLMSG_ERROR {
                ack(&payload)?;
                return Err(io::Error::other("no answer for the ethtool netlink family"));
            }
            if kind == GENL_ID_CTRL {
                // After the 4-byte generic-netlink header, the attributes.
                let found = attributes(payload.get(4..).unwrap_or_default())
                    .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
                    .and_then(|(_, v)| v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])));
                return found
                    .ok_or_else(|| io::Error::other("the controller named no ethtool family id"));
            }
        }
    }
}

/// Sends one generic-netlink request.
fn send(
    socket: &Socket,
    family: u16,
    cmd: u8,
    flags: u16,
    seq: u32,
    attrs: &[u8],
) -> io::Result<()> {
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[cmd, 1, 0, 0]);
    msg.extend_from_slice(attrs);
    socket.send(&msg, 0).map(drop)
}

/// Receives one datagram: its messages as (type, sequence number, payload).
fn receive(socket: &Socket) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
    let (bytes, _) = socket.recv_from_full()?;
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        out.push((kind, seq, rest[16..len].to_vec()));
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(out)
}

/// An `NLMSG_ERROR` payload: 0 is an acknowledgement, else a negative errno.
fn ack(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| io::Error::other("truncated netlink error message"))?;
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// Appends one attribute (length, type, value, padding to 4 bytes).
fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + align(len) - len, 0);
}

/// The attributes in `buf`, as (type without flags, value).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_read_back() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 2, b"eth0\0");
        put_attr(&mut buf, 1 | NLA_F_NESTED, &7u32.to_ne_bytes());
        // 4 + 5 bytes, padded to 12; then 8.
        assert_eq!(buf.len(), 12 + 8);
        let read: Vec<_> = attributes(&buf).collect();
        assert_eq!(
            read,
            vec![(2, &b"eth0\0"[..]), (1, &7u32.to_ne_bytes()[..])]
        );
        // A length past the end stops the walk instead of panicking.
        let mut bad = buf.clone();
        bad[0] = 200;
        assert_eq!(attributes(&bad).count(), 0);
    }
}
