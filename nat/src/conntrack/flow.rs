//! What the table tracks, as values: a connection's two tuples ([`FlowKey`]), the
//! connection itself ([`Connection`]) and which of its tuples a packet carries
//! ([`Direction`]). Nothing here knows how the table stores them.

use std::net::IpAddr;

/// A connection's 5-tuple as seen in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP echo: identifier).
    pub sport: u16,
    /// Destination port (ICMP echo: identifier).
    pub dport: u16,
}

impl FlowKey {
    /// A placeholder tuple (protocol 0, unspecified IPv4 addresses, ports 0).
    pub const NONE: FlowKey = FlowKey {
        proto: 0,
        src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        sport: 0,
        dport: 0,
    };

    /// The same tuple seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }

    /// A hash of the tuple that every node computes alike (Maglev needs that), and that the
    /// connection table indexes by. Cheap because every packet pays it: the tuple is packed
    /// into words (an IPv4 tuple into two) and mixed by 64x64->128-bit multiplies folded
    /// in half (wyhash's `mum`), whose chains run side by side, then spread by splitmix64's
    /// finaliser so that low-entropy tuples (consecutive ports) cover all 64 bits.
    pub fn flow_hash(&self) -> u64 {
        let ports = self.sport as u64 | (self.dport as u64) << 16 | (self.proto as u64) << 32;
        let x = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                mix(u32::from(s) as u64 | (u32::from(d) as u64) << 32, ports, 0)
            }
            (s, d) => {
                let (s, d) = (address_bits(s), address_bits(d));
                let a = mix(s as u64, (s >> 64) as u64, 0);
                let b = mix(d as u64, (d >> 64) as u64, 2);
                mix(a ^ ports, b, 0)
            }
        };
        let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
}

/// Odd constants (wyhash's) mixed into the words [`FlowKey::flow_hash`] multiplies.
const MIX: [u64; 4] = [
    0xa076_1d64_78bd_642f,
    0xe703_7ed1_a0b4_28db,
    0x8ebc_6af0_9c88_c6e3,
    0x5899_65cc_7537_4cc3,
];

/// `a` and `b` mixed: the 128-bit product of each xored with a constant of `MIX` (from
/// `at`), its halves xored, and the words themselves xored back in, so that the one pair of
/// words whose product is zero does not lose the other's bits.
#[inline]
fn mix(a: u64, b: u64, at: usize) -> u64 {
    let r = (a ^ MIX[at]) as u128 * (b ^ MIX[at + 1]) as u128;
    r as u64 ^ (r >> 64) as u64 ^ a ^ b
}

/// An address as 128 bits: IPv4 as its IPv4-mapped IPv6 address.
#[inline]
fn address_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A tracked, translated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The tuple the client sent (to the frontend).
    pub original: FlowKey,
    /// The tuple the backend replies with (from the backend, to the client or to the
    /// masquerade address).
    pub reply: FlowKey,
    /// Dense id of the Service, 0 when the connection is not a Service's.
    pub service: u32,
    /// The NetworkPolicy verdict the connection was admitted with: 0 when no policy
    /// isolated either end, else 1 + the index of the policy that allowed it (the
    /// destination's ingress policy when it was isolated, else the source's egress one),
    /// saturating at [`POLICY_MAX`].
    pub policy: u32,
}

/// The largest [`Connection::policy`] an entry stores (23 bits); larger values are kept as
/// this one, which inspection shows as "a policy beyond the table's range".
pub const POLICY_MAX: u32 = (1 << 23) - 1;

/// Which direction of a connection a packet belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client towards the frontend.
    Original,
    /// From the backend back to the client.
    Reply,
}

impl Connection {
    /// A placeholder connection (both tuples [`FlowKey::NONE`], no Service, no policy).
    pub const NONE: Connection = Connection {
        original: FlowKey::NONE,
        reply: FlowKey::NONE,
        service: 0,
        policy: 0,
    };

    /// Its tuple in direction `dir`.
    pub(super) fn key(&self, dir: Direction) -> &FlowKey {
        match dir {
            Direction::Original => &self.original,
            Direction::Reply => &self.reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tuples of one client's connections to one Service port, the source port the
    /// only difference: the least entropy real traffic has.
    fn ports_of_one_client(v6: bool) -> impl Iterator<Item = FlowKey> {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                "fd00:10:244:1::2".parse().unwrap(),
                "fd00:96::a".parse().unwrap(),
            )
        } else {
            ("10.244.1.2".parse().unwrap(), "10.96.0.10".parse().unwrap())
        };
        (1..=u16::MAX).map(move |sport| FlowKey {
            proto: 6,
            src,
            dst,
            sport,
            dport: 53,
        })
    }

    #[test]
    fn flow_hash_spreads_consecutive_ports() {
        for v6 in [false, true] {
            let hashes: Vec<u64> = ports_of_one_client(v6).map(|k| k.flow_hash()).collect();
            let mut distinct = hashes.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                hashes.len(),
                "v6 {v6}: no two ports collide"
            );
            // Maglev takes the hash modulo its ring (a prime); the table takes high and
            // low halves. Every residue, and every value of the top byte, about as often
            // as any other: 65535 draws over 509 slots is 129 each, sigma about 11.
            let mut slots = [0u32; 509];
            let mut top = [0u32; 256];
            for h in &hashes {
                slots[(h % 509) as usize] += 1;
                top[(h >> 56) as usize] += 1;
            }
            let (lo, hi) = (slots.iter().min().unwrap(), slots.iter().max().unwrap());
            assert!(*lo > 70 && *hi < 190, "v6 {v6}: Maglev slots {lo}..{hi}");
            let (lo, hi) = (top.iter().min().unwrap(), top.iter().max().unwrap());
            assert!(*lo > 170 && *hi < 350, "v6 {v6}: top bytes {lo}..{hi}");
        }
    }

    #[test]
    fn flow_hash_tells_families_and_directions_apart() {
        let k = ports_of_one_client(false).nth(1000).unwrap();
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (k.src, k.dst) else {
            unreachable!()
        };
        let mapped = FlowKey {
            src: IpAddr::V6(src.to_ipv6_mapped()),
            dst: IpAddr::V6(dst.to_ipv6_mapped()),
            ..k
        };
        assert_ne!(
            k.flow_hash(),
            mapped.flow_hash(),
            "an IPv4 tuple and its mapped twin"
        );
        assert_ne!(k.flow_hash(), k.reversed().flow_hash());
    }

    #[test]
    fn flow_hash_has_no_zero_product_blind_spot() {
        // The addresses whose packed word cancels the first multiplier's constant: with
        // the product zero, the ports must still tell the tuples apart.
        let w = MIX[0];
        let k = |sport| FlowKey {
            proto: 6,
            src: IpAddr::V4((w as u32).into()),
            dst: IpAddr::V4(((w >> 32) as u32).into()),
            sport,
            dport: 80,
        };
        assert_ne!(k(1).flow_hash(), k(2).flow_hash());
    }
}
