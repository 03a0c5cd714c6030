//! Learned neighbours (where an address lives, and its MAC), and the link-local address
//! kxdp solicits them from on the uplink.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use nat::tables::BuildFastHasher;

/// kxdp's own IPv6 link-local address on the uplink, from the uplink's MAC:
/// `fe80::6b78:6470:` ("kxdp") and the MAC's last four bytes. It is not the kernel's
/// (EUI-64, `…ff:fe…`), so neighbour discovery kxdp does from it is answered to kxdp: the
/// uplink's filter takes what is addressed to it, and leaves the kernel's to the kernel.
pub fn uplink_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0x6b78,
        0x6470,
        u16::from_be_bytes([mac[2], mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// A neighbour: where an address lives and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbor {
    /// The port it is reached on.
    pub port: usize,
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// How long a learned neighbour is trusted before it is solicited again (it stays in use
/// meanwhile, like the kernel's STALE state). The kernel's `base_reachable_time` is 30 s.
pub const NEIGHBOR_REFRESH: u64 = 30 * 1_000_000_000;

/// The learned neighbours at one moment: each address with where it lives and when it was
/// last confirmed.
pub type NeighborMap = HashMap<IpAddr, (Neighbor, u64), BuildFastHasher>;

/// Learned neighbours. Read without locks (a worker's pass takes the map once,
/// [`Neighbors::snapshot`]); written (copy on write) only when a neighbour appears, moves,
/// or is re-confirmed after [`NEIGHBOR_REFRESH`], which is rare.
#[derive(Default)]
pub struct Neighbors {
    map: ArcSwap<NeighborMap>,
}

impl Neighbors {
    /// Where `ip` lives, if learned.
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<Neighbor> {
        self.map.load().get(ip).map(|e| e.0)
    }

    /// The neighbours as they are now, for a worker's pass to read without loading the
    /// map per packet (a guard: no reference count is written to take it).
    pub fn snapshot(&self) -> Guard<Arc<NeighborMap>> {
        self.map.load()
    }

    /// Whether `map` already has `ip` at `n`, confirmed recently enough at `now` that
    /// [`Neighbors::learn`] would leave it as it is.
    #[inline]
    pub fn knows(map: &NeighborMap, ip: &IpAddr, n: Neighbor, now: u64) -> bool {
        map.get(ip).is_some_and(|(known, at)| {
            *known == n && now.saturating_sub(*at) < NEIGHBOR_REFRESH / 2
        })
    }

    /// Records `ip` at `n`, seen at `now`, unless that is already known and fresh.
    pub fn learn(&self, ip: IpAddr, n: Neighbor, now: u64) {
        if Self::knows(&self.map.load(), &ip, n, now) {
            return;
        }
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(ip, (n, now));
            m
        });
    }

    /// Neighbours not confirmed for [`NEIGHBOR_REFRESH`]: to be solicited again.
    pub fn stale(&self, now: u64) -> Vec<IpAddr> {
        self.map
            .load()
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) >= NEIGHBOR_REFRESH)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Forgets neighbours not confirmed for `max_age`.
    pub fn expire(&self, now: u64, max_age: u64) {
        if self
            .map
            .load()
            .values()
            .all(|(_, at)| now.saturating_sub(*at) < max_age)
        {
            return;
        }
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, (_, at)| now.saturating_sub(*at) < max_age);
            m
        });
    }

    /// Forgets every neighbour on `port` (a pod interface that went); returns their
    /// addresses.
    pub fn forget_port(&self, port: usize) -> Vec<IpAddr> {
        let gone: Vec<IpAddr> = self
            .map
            .load()
            .iter()
            .filter(|(_, (n, _))| n.port == port)
            .map(|(ip, _)| *ip)
            .collect();
        if !gone.is_empty() {
            self.map.rcu(|m| {
                let mut m = HashMap::clone(m);
                m.retain(|_, (n, _)| n.port != port);
                m
            });
        }
        gone
    }

    /// Every neighbour (for inspection).
    pub fn all(&self) -> Vec<(IpAddr, Neighbor)> {
        self.map.load().iter().map(|(k, v)| (*k, v.0)).collect()
    }
}
