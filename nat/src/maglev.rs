//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Each backend gets a permutation of the ring's slots from two hashes of its name; backends
//! take turns claiming their next preferred free slot until the ring is full. Equal backend
//! sets give equal rings on every node, so two gateways behind ECMP choose the same backend
//! for a flow, and removing one backend moves only the flows it held (plus a small
//! disturbance bounded by the paper).

/// The default ring size: a prime well above 100 × the backends of a large Service.
pub const DEFAULT_RING_SIZE: u32 = 16381;

/// A filled Maglev ring: slot → index into the Service's backend list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevRing {
    slots: Box<[u16]>,
}

impl MaglevRing {
    /// Builds the ring of `size` slots (a prime) for backends identified by `keys` (for
    /// example `ip:port`, so that every node derives the same permutation).
    ///
    /// Returns `None` when there is no backend. At most `u16::MAX` backends are used.
    pub fn build<K: AsRef<[u8]>>(keys: &[K], size: u32) -> Option<MaglevRing> {
        let n = keys.len().min(u16::MAX as usize);
        if n == 0 {
            return None;
        }
        // Maglev needs a prime size: with a composite one, a backend's permutation can miss
        // slots and the fill below would never end.
        let size = next_prime(size.max(2));
        let m = size as u64;
        let perms: Vec<(u64, u64)> = keys[..n]
            .iter()
            .map(|k| {
                let offset = fnv1a(k.as_ref(), 0xcbf2_9ce4_8422_2325) % m;
                let skip = fnv1a(k.as_ref(), 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut slots = vec![u16::MAX; size as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Some(MaglevRing {
            slots: slots.into_boxed_slice(),
        })
    }

    /// The backend index for a flow hash.
    #[inline]
    pub fn pick(&self, hash: u64) -> usize {
        self.slots[(hash % self.slots.len() as u64) as usize] as usize
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: a ring has at least one slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// How many slots each backend holds.
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut out = vec![0; backends];
        for &s in self.slots.iter() {
            if let Some(c) = out.get_mut(s as usize) {
                *c += 1;
            }
        }
        out
    }
}

/// Whether `n` is prime (trial division; sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime at least `n`.
pub fn next_prime(mut n: u32) -> u32 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// FNV-1a with a chosen basis; stable across builds and machines, which Maglev needs.
fn fnv1a(data: &[u8], basis: u64) -> u64 {
    let mut h = basis;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (splitmix64) so nearby keys spread over the whole ring.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.1.{i}:8080")).collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let ring = MaglevRing::build(&keys(10), DEFAULT_RING_SIZE).unwrap();
        for share in ring.shares(10) {
            let ideal = DEFAULT_RING_SIZE as usize / 10;
            assert!(
                share.abs_diff(ideal) < ideal / 10,
                "share {share} vs {ideal}"
            );
        }
    }

    #[test]
    fn same_backends_same_ring() {
        let a = MaglevRing::build(&keys(7), 1021).unwrap();
        let b = MaglevRing::build(&keys(7), 1021).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let before_keys = keys(10);
        let after_keys: Vec<String> = before_keys[..9].to_vec();
        let before = MaglevRing::build(&before_keys, DEFAULT_RING_SIZE).unwrap();
        let after = MaglevRing::build(&after_keys, DEFAULT_RING_SIZE).unwrap();
        let mut moved = 0;
        for slot in 0..DEFAULT_RING_SIZE as usize {
            let b = before.slots[slot];
            if b != 9 && after.slots[slot] != b {
                moved += 1;
            }
        }
        // Flows on surviving backends stay put, up to a few percent of disturbance.
        assert!(moved < DEFAULT_RING_SIZE as usize / 20, "moved {moved}");
    }

    #[test]
    fn composite_and_tiny_sizes_are_made_prime() {
        assert!(is_prime(16381) && !is_prime(16383) && !is_prime(1));
        assert_eq!(MaglevRing::build(&keys(3), 1).unwrap().len(), 2);
        assert_eq!(MaglevRing::build(&keys(3), 1000).unwrap().len(), 1009);
    }

    #[test]
    fn no_backends_no_ring() {
        assert!(MaglevRing::build::<String>(&[], 13).is_none());
    }
}
