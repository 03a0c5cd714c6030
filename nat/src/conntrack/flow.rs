//! What the table tracks, as values: a connection's two tuples ([`FlowKey`]), the
//! connection itself ([`Connection`]) and which of its tuples a packet carries
//! ([`Direction`]). Nothing here knows how the table stores them.

use std::net::IpAddr;

use crate::tables::BuildFastHasher;

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

    /// A hash of the tuple that every node computes alike (Maglev needs that).
    pub fn flow_hash(&self) -> u64 {
        use std::hash::BuildHasher;
        let x = BuildFastHasher.hash_one(self);
        // splitmix64 finaliser: spread low-entropy tuples over all 64 bits.
        let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
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
    /// Its tuple in direction `dir`.
    pub(super) fn key(&self, dir: Direction) -> &FlowKey {
        match dir {
            Direction::Original => &self.original,
            Direction::Reply => &self.reply,
        }
    }
}
