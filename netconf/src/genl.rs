//! Generic netlink, as far as the ethtool family needs it: find the family's id, send a
//! request, read its answers. Messages are a few nested attributes, written and read here
//! (no crate speaks ethtool-netlink without an async runtime).

use std::io;

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
/// Ask for an acknowledgement (an `NLMSG_ERROR` with code 0) after the answers.
pub const NLM_F_ACK: u16 = 4;
/// Set on an attribute type whose value is itself attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// `ETHTOOL_A_HEADER_DEV_INDEX`: the device a request is about, by index.
const ETHTOOL_A_HEADER_DEV_INDEX: u16 = 1;
/// `ETHTOOL_A_HEADER_FLAGS`.
const ETHTOOL_A_HEADER_FLAGS: u16 = 3;
/// `ETHTOOL_FLAG_OMIT_REPLY`: no notification-style reply to a SET.
pub const ETHTOOL_FLAG_OMIT_REPLY: u32 = 1 << 1;

/// A generic-netlink socket bound to the ethtool family, in the calling thread's network
/// namespace.
pub struct Ethtool {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Ethtool {
    /// Opens a socket and asks the controller for the ethtool family's id.
    pub fn open() -> io::Result<Ethtool> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut genl = Ethtool {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &c_string("ethtool"));
        let answers = genl.request(CTRL_CMD_GETFAMILY, 0, &attrs)?;
        genl.family = answers
            .iter()
            .find_map(|payload| {
                attributes(payload)
                    .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
                    .and_then(|(_, v)| v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            })
            .ok_or_else(|| io::Error::other("the controller named no ethtool family id"))?;
        Ok(genl)
    }

    /// Sends command `cmd` with `attrs` and returns the attributes of every answer (each
    /// without its generic-netlink header). With [`NLM_F_ACK`] it reads until the
    /// acknowledgement; else until the first answer. A kernel error is its errno.
    pub fn request(&mut self, cmd: u8, flags: u16, attrs: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&self.family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, 1, 0, 0]);
        msg.extend_from_slice(attrs);
        self.socket.send(&msg, 0)?;
        let mut out = Vec::new();
        loop {
            for (kind, got, payload) in self.receive()? {
                if got != seq {
                    // A late answer to an earlier request: not ours to read.
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        ack(&payload)?;
                        return Ok(out);
                    }
                    NLMSG_DONE => return Ok(out),
                    _ => {
                        out.push(payload.get(4..).unwrap_or_default().to_vec());
                        if flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }

    /// Receives one datagram: its messages as (type, sequence number, payload).
    fn receive(&self) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
        let (bytes, _) = self.socket.recv_from_full()?;
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
}

/// The nested `ETHTOOL_A_*_HEADER` naming device `index`, with `flags`.
pub fn device_header(index: u32, flags: u32) -> Vec<u8> {
    let mut header = Vec::new();
    put_attr(
        &mut header,
        ETHTOOL_A_HEADER_DEV_INDEX,
        &index.to_ne_bytes(),
    );
    if flags != 0 {
        put_attr(&mut header, ETHTOOL_A_HEADER_FLAGS, &flags.to_ne_bytes());
    }
    header
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
pub fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + align(len) - len, 0);
}

/// The attributes in `buf`, as (type without flags, value).
pub fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

/// A NUL-terminated string attribute value.
pub fn c_string(s: &str) -> Vec<u8> {
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

    #[test]
    fn errors_and_acknowledgements() {
        assert!(ack(&0i32.to_ne_bytes()).is_ok());
        let e = ack(&(-libc::ENODEV).to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        assert!(ack(&[1, 2]).is_err());
    }
}
