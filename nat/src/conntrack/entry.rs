//! One connection's place in the table: its words, its state word, and the sequence counter
//! that lets lock-free readers read it whole.
//!
//! An [`Entry`] is written only while its owner holds it exclusively (taken from the free
//! list, not yet published in the index, or marked dead), under its sequence counter (a
//! seqlock): a reader that raced with a rewrite sees the counter move and reads again. The
//! state word packs the entry's status ([`FREE`], [`PENDING`], [`LIVE`], [`DEAD`]), the
//! connection's protocol state and the entry's generation (see [`word`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::flow::{Connection, FlowKey, POLICY_MAX};

/// Re-reads of an entry that is being rewritten before a lookup gives up on it.
const SEQ_RETRIES: usize = 16;

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

/// Words of an entry's connection: four addresses (2 words each), ports, proto + policy +
/// service.
pub(super) const KEY_WORDS: usize = 10;

/// One connection. Word layout of `key`: original src, original dst, reply src, reply dst
/// (16 bytes each, IPv4 mapped), then the four ports, then proto | v6 flag | service.
pub(super) struct Entry {
    /// Even: stable; odd: being written. Bumped around every rewrite of `key`.
    seq: AtomicU64,
    key: [AtomicU64; KEY_WORDS],
    /// Expiry time (ns); refreshed by packets.
    pub(super) expires: AtomicU64,
    /// `FREE`/`PENDING`/`LIVE`/`DEAD`, protocol state and generation (see [`word`]).
    pub(super) state: AtomicU64,
}

impl Entry {
    /// A free entry.
    pub(super) fn new() -> Entry {
        Entry {
            seq: AtomicU64::new(0),
            key: std::array::from_fn(|_| AtomicU64::new(0)),
            expires: AtomicU64::new(0),
            state: AtomicU64::new(FREE as u64),
        }
    }

    /// Reads the entry's connection consistently; `None` if it kept changing.
    pub(super) fn read(&self) -> Option<[u64; KEY_WORDS]> {
        for _ in 0..SEQ_RETRIES {
            // Acquire pairs with the Release store that ended the last rewrite.
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let w: [u64; KEY_WORDS] = std::array::from_fn(|i| self.key[i].load(Ordering::Relaxed));
            // Keeps the key loads above from moving below the re-check (seqlock reader).
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some(w);
            }
        }
        None
    }

    /// Rewrites the entry's connection; only its exclusive owner calls it.
    pub(super) fn write(&self, w: &[u64; KEY_WORDS]) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        // Orders the odd sequence before the key stores, for readers' first load.
        fence(Ordering::Release);
        for (slot, v) in self.key.iter().zip(w) {
            slot.store(*v, Ordering::Relaxed);
        }
        // Release: a reader that sees `s + 2` sees every key word above.
        self.seq.store(s + 2, Ordering::Release);
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

/// The words of `c`, as an entry stores them.
pub(super) fn encode(c: &Connection) -> [u64; KEY_WORDS] {
    let mut w = [0u64; KEY_WORDS];
    let addrs = [c.original.src, c.original.dst, c.reply.src, c.reply.dst];
    for (i, a) in addrs.iter().enumerate() {
        let [x, y] = addr_words(*a);
        w[2 * i] = x;
        w[2 * i + 1] = y;
    }
    w[8] = c.original.sport as u64
        | (c.original.dport as u64) << 16
        | (c.reply.sport as u64) << 32
        | (c.reply.dport as u64) << 48;
    w[9] = c.original.proto as u64
        | (c.original.src.is_ipv6() as u64) << 8
        | (c.policy.min(POLICY_MAX) as u64) << 9
        | (c.service as u64) << 32;
    w
}

/// The connection of an entry's words.
pub(super) fn decode(w: &[u64; KEY_WORDS]) -> Connection {
    let v6 = (w[9] >> 8) & 1 == 1;
    let proto = w[9] as u8;
    let a = |i: usize| words_addr([w[2 * i], w[2 * i + 1]], v6);
    Connection {
        original: FlowKey {
            proto,
            src: a(0),
            dst: a(1),
            sport: w[8] as u16,
            dport: (w[8] >> 16) as u16,
        },
        reply: FlowKey {
            proto,
            src: a(2),
            dst: a(3),
            sport: (w[8] >> 32) as u16,
            dport: (w[8] >> 48) as u16,
        },
        service: (w[9] >> 32) as u32,
        policy: ((w[9] >> 9) as u32) & POLICY_MAX,
    }
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
    }
}
