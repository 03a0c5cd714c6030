//! One connection's place in the table: its state word, its expiry and its tuples, laid out
//! so that a lookup's hit reads one cache line.
//!
//! An [`Entry`] is one 64-byte line: the state word, the expiry, the ports, the protocol,
//! policy and Service, and the addresses of an IPv4 connection (four of 4 bytes). An IPv6
//! connection's four addresses (64 bytes) do not fit: the original tuple's two are in the
//! line, the reply tuple's two in the entry's [`Cold`] half line, so an IPv6 hit reads two
//! lines.
//!
//! An entry is written only while its owner holds it exclusively (taken from the free list,
//! not yet published in the index), and its generation (in the state word) moves before the
//! tuples do: a reader that read the state word, then the tuples, then sees the same
//! generation again read one connection whole (a seqlock whose counter is the generation).
//! The state word packs the entry's status ([`FREE`], [`PENDING`], [`LIVE`], [`DEAD`]), the
//! connection's protocol state and the entry's generation (see [`word`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use super::flow::{Connection, Direction, FlowKey, POLICY_MAX};

/// Status: on the free list, holding nothing.
pub(super) const FREE: u8 = 0;
/// Status: published in the index, not yet settled against a twin (see `insert`).
pub(super) const PENDING: u8 = 1;
/// Status: a tracked connection.
pub(super) const LIVE: u8 = 2;
/// Status: being removed by the one caller that marked it so.
pub(super) const DEAD: u8 = 3;

/// An entry's state word: status (`FREE`…`DEAD`) in the low byte, the protocol state in
/// the next, the generation (connections the entry has held) in the high half.
pub(super) fn word(status: u8, proto_state: u8, generation: u64) -> u64 {
    status as u64 | (proto_state as u64) << 8 | generation << 32
}
/// The status of state word `w`.
pub(super) fn status(w: u64) -> u8 {
    w as u8
}
/// The protocol state of state word `w`.
pub(super) fn proto_state(w: u64) -> u8 {
    (w >> 8) as u8
}
/// The generation of state word `w`.
pub(super) fn generation(w: u64) -> u64 {
    w >> 32
}

/// Words of an entry's connection (see [`encode`]): ports, meta, four address words in the
/// entry's line, four in its cold half line (IPv6 only).
pub(super) const KEY_WORDS: usize = 10;
/// Of those, the words in the entry's line.
const HOT_WORDS: usize = 6;
/// The IPv6 flag in the meta word (`KEY_WORDS[1]`).
const V6: u64 = 1 << 8;

/// One connection's line. `key` holds words `0..HOT_WORDS` of [`encode`].
#[repr(C, align(64))]
pub(super) struct Entry {
    /// `FREE`/`PENDING`/`LIVE`/`DEAD`, protocol state and generation (see [`word`]).
    pub(super) state: AtomicU64,
    /// Expiry time (ns); refreshed by packets.
    pub(super) expires: AtomicU64,
    key: [AtomicU64; HOT_WORDS],
}

/// The rest of an IPv6 connection's words (`HOT_WORDS..KEY_WORDS` of [`encode`]): its reply
/// tuple's addresses. Half a line, so it never straddles two.
#[repr(align(32))]
pub(super) struct Cold([AtomicU64; KEY_WORDS - HOT_WORDS]);

impl Cold {
    /// An unused half line.
    pub(super) fn new() -> Cold {
        Cold(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Entry {
    /// A free entry.
    pub(super) fn new() -> Entry {
        Entry {
            state: AtomicU64::new(FREE as u64),
            expires: AtomicU64::new(0),
            key: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Loads the entry's connection words (and `cold`'s, for IPv6), relaxed: the caller
    /// brackets them with its loads of the state word (see the module comment).
    pub(super) fn load(&self, cold: &Cold) -> [u64; KEY_WORDS] {
        let mut w = [0u64; KEY_WORDS];
        for (v, slot) in w.iter_mut().zip(&self.key) {
            *v = slot.load(Ordering::Relaxed);
        }
        if w[1] & V6 != 0 {
            for (v, slot) in w[HOT_WORDS..].iter_mut().zip(&cold.0) {
                *v = slot.load(Ordering::Relaxed);
            }
        }
        w
    }

    /// Stores the entry's connection words, relaxed; only its exclusive owner calls it,
    /// after moving the generation on (see the module comment).
    pub(super) fn store(&self, cold: &Cold, w: &[u64; KEY_WORDS]) {
        for (slot, v) in self.key.iter().zip(w) {
            slot.store(*v, Ordering::Relaxed);
        }
        if w[1] & V6 != 0 {
            for (slot, v) in cold.0.iter().zip(&w[HOT_WORDS..]) {
                slot.store(*v, Ordering::Relaxed);
            }
        }
    }
}

fn addr_words(ip: IpAddr) -> [u64; 2] {
    let b = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    [
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

fn words_addr(w: [u64; 2], v6: bool) -> IpAddr {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_le_bytes());
    b[8..].copy_from_slice(&w[1].to_le_bytes());
    let a = Ipv6Addr::from(b);
    if v6 {
        IpAddr::V6(a)
    } else {
        IpAddr::V4(a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED))
    }
}

/// The words of `c`, as an entry stores them: ports (original source and destination,
/// reply source and destination, 16 bits each); meta (protocol | IPv6 flag | policy << 9 |
/// Service << 32); then addresses. IPv4: original source | destination << 32, reply source
/// | destination << 32, two zero words. IPv6: original source and destination (two words
/// each), then reply source and destination (the cold words).
pub(super) fn encode(c: &Connection) -> [u64; KEY_WORDS] {
    let mut w = [0u64; KEY_WORDS];
    w[0] = c.original.sport as u64
        | (c.original.dport as u64) << 16
        | (c.reply.sport as u64) << 32
        | (c.reply.dport as u64) << 48;
    let v6 = c.original.src.is_ipv6();
    w[1] = c.original.proto as u64
        | if v6 { V6 } else { 0 }
        | (c.policy.min(POLICY_MAX) as u64) << 9
        | (c.service as u64) << 32;
    let addrs = [c.original.src, c.original.dst, c.reply.src, c.reply.dst];
    if v6 {
        for (i, a) in addrs.iter().enumerate() {
            let [x, y] = addr_words(*a);
            w[2 + 2 * i] = x;
            w[3 + 2 * i] = y;
        }
    } else {
        let v4 = |a: IpAddr| match a {
            IpAddr::V4(a) => u32::from(a) as u64,
            // A tuple mixing families: an IPv4-mapped address is kept, any other read
            // back as 0.0.0.0.
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(0, u32::from) as u64,
        };
        w[2] = v4(addrs[0]) | v4(addrs[1]) << 32;
        w[3] = v4(addrs[2]) | v4(addrs[3]) << 32;
    }
    w
}

/// Whether an entry's words hold `key` as the connection's tuple in direction `dir`: what
/// `decode(w).key(dir) == key` says, without building the connection (a lookup compares
/// every candidate its tag names, and decodes only the one that matches).
pub(super) fn matches(w: &[u64; KEY_WORDS], key: &FlowKey, dir: Direction) -> bool {
    let v6 = key.src.is_ipv6();
    if v6 != key.dst.is_ipv6() {
        // A tuple mixing families: as rare as it is odd, compared the long way.
        return decode(w).key(dir) == key;
    }
    let meta = key.proto as u64 | if v6 { V6 } else { 0 };
    let ports = key.sport as u64 | (key.dport as u64) << 16;
    let reply = dir == Direction::Reply;
    if w[1] & 0x1ff != meta || (w[0] >> if reply { 32 } else { 0 }) & 0xffff_ffff != ports {
        return false;
    }
    match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w[2 + reply as usize] == u32::from(s) as u64 | (u32::from(d) as u64) << 32
        }
        _ => {
            let at = if reply { HOT_WORDS } else { 2 };
            w[at..at + 2] == addr_words(key.src) && w[at + 2..at + 4] == addr_words(key.dst)
        }
    }
}

/// The connection of an entry's words.
pub(super) fn decode(w: &[u64; KEY_WORDS]) -> Connection {
    let mut c = Connection::NONE;
    decode_into(w, &mut c);
    c
}

/// [`decode`] into `c`, field by field (see `Conntrack::get_at_into`).
pub(super) fn decode_into(w: &[u64; KEY_WORDS], c: &mut Connection) {
    let v6 = w[1] & V6 != 0;
    let proto = w[1] as u8;
    let a = |i: usize| {
        if v6 {
            words_addr([w[2 + 2 * i], w[3 + 2 * i]], true)
        } else {
            IpAddr::V4(Ipv4Addr::from((w[2 + i / 2] >> (32 * (i % 2))) as u32))
        }
    };
    c.original.proto = proto;
    c.original.src = a(0);
    c.original.dst = a(1);
    c.original.sport = w[0] as u16;
    c.original.dport = (w[0] >> 16) as u16;
    c.reply.proto = proto;
    c.reply.src = a(2);
    c.reply.dst = a(3);
    c.reply.sport = (w[0] >> 32) as u16;
    c.reply.dport = (w[0] >> 48) as u16;
    c.service = (w[1] >> 32) as u32;
    c.policy = ((w[1] >> 9) as u32) & POLICY_MAX;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_v4_and_v6() {
        let mut c = Connection {
            original: FlowKey {
                proto: 6,
                src: "10.244.1.2".parse().unwrap(),
                dst: "172.30.0.41".parse().unwrap(),
                sport: 40000,
                dport: 80,
            },
            reply: FlowKey {
                proto: 6,
                src: "10.244.1.5".parse().unwrap(),
                dst: "10.244.1.2".parse().unwrap(),
                sport: 8080,
                dport: 40000,
            },
            service: 1,
            policy: 0,
        };
        assert_eq!(decode(&encode(&c)), c);
        c.policy = 7;
        assert_eq!(decode(&encode(&c)), c);
        c.policy = POLICY_MAX + 5;
        assert_eq!(decode(&encode(&c)).policy, POLICY_MAX, "saturates");
        c.policy = POLICY_MAX;
        let mut c6 = c;
        c6.original.src = "fd00:10:244:1::2".parse().unwrap();
        c6.original.dst = "fd00:172:30::41".parse().unwrap();
        c6.reply.src = "fd00:10:244:1::5".parse().unwrap();
        c6.reply.dst = "fd00:10:244:1::2".parse().unwrap();
        c6.service = u32::MAX;
        assert_eq!(decode(&encode(&c6)), c6);
        c6.policy = 0;
        assert_eq!(decode(&encode(&c6)), c6);
        // `matches` says what comparing the decoded tuple says, for every pair of these,
        // mixed families too.
        let mut mixed = c;
        mixed.original.dst = "::ffff:172.30.0.41".parse().unwrap();
        mixed.reply.src = "fd00::5".parse().unwrap();
        let mut other_port = c;
        other_port.reply.dport += 1;
        let mut other_proto = c6;
        other_proto.original.proto = 17;
        other_proto.reply.proto = 17;
        let conns = [c, c6, mixed, other_port, other_proto];
        for stored in &conns {
            let w = encode(stored);
            for looked in &conns {
                for key in [looked.original, looked.reply, looked.original.reversed()] {
                    for dir in [Direction::Original, Direction::Reply] {
                        assert_eq!(
                            matches(&w, &key, dir),
                            decode(&w).key(dir) == &key,
                            "{stored:?} {key:?} {dir:?}"
                        );
                    }
                }
            }
        }
    }
}
