//! ClientIP session affinity: which backend a client was last sent to, per Service port.
//!
//! kube-proxy keeps this in the kernel's `recent` lists (one per endpoint, checked with
//! `--rcheck --seconds <timeout>` on a connection's first packet), which hold a bounded
//! number of addresses. Here it is a fixed, lock-free table of 4-way buckets: a record is
//! written under a sequence counter and read consistently without locks; when a bucket is
//! full, the record that expires first is replaced (that client's affinity is forgotten,
//! as an overflowing `recent` list forgets). Only new connections of Services with
//! affinity touch it.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Records per bucket.
const WAYS: usize = 4;
/// Re-reads of a record being rewritten before a lookup gives up on it.
const SEQ_RETRIES: usize = 16;

/// One record: service key, client, backend, expiry.
struct Record {
    seq: AtomicU64,
    /// service key (u64), client (2 words), backend (2 words), backend port | v6 flag,
    /// expiry.
    words: [AtomicU64; 7],
}

/// The affinity table shared by all workers.
pub struct AffinityTable {
    records: Box<[Record]>,
    mask: usize,
}

fn addr(ip: IpAddr) -> [u64; 2] {
    let b = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    [
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

fn unaddr(w: [u64; 2], v6: bool) -> IpAddr {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_le_bytes());
    b[8..].copy_from_slice(&w[1].to_le_bytes());
    let a = Ipv6Addr::from(b);
    match (v6, a.to_ipv4_mapped()) {
        (false, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(a),
    }
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable key for a Service port (its `namespace/name:port` and family), the same in
/// every table generation.
pub fn service_key(name: &str, v6: bool) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ v6 as u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 0 marks an empty record.
    mix(h) | 1
}

impl AffinityTable {
    /// A table of at least `capacity` records.
    pub fn new(capacity: usize) -> AffinityTable {
        let n = capacity.max(WAYS).next_power_of_two();
        AffinityTable {
            records: (0..n)
                .map(|_| Record {
                    seq: AtomicU64::new(0),
                    words: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
            mask: n - 1,
        }
    }

    fn bucket(&self, service: u64, client: &[u64; 2]) -> usize {
        (mix(service ^ client[0].rotate_left(17) ^ client[1]) as usize & self.mask) & !(WAYS - 1)
    }

    fn read(&self, i: usize) -> Option<[u64; 7]> {
        let r = &self.records[i];
        for _ in 0..SEQ_RETRIES {
            // Acquire pairs with the Release that ended the writer's update.
            let s = r.seq.load(Ordering::Acquire);
            if s & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let w: [u64; 7] = std::array::from_fn(|k| r.words[k].load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if r.seq.load(Ordering::Relaxed) == s {
                return Some(w);
            }
        }
        None
    }

    /// The backend `client` was last sent to for `service`, if that was before `now` and
    /// within its timeout.
    pub fn get(&self, service: u64, client: IpAddr, now: u64) -> Option<(IpAddr, u16)> {
        let c = addr(client);
        let b = self.bucket(service, &c);
        for i in b..b + WAYS {
            let Some(w) = self.read(i) else { continue };
            if w[0] == service && w[1] == c[0] && w[2] == c[1] && w[6] > now {
                return Some((unaddr([w[3], w[4]], w[5] >> 32 == 1), w[5] as u16));
            }
        }
        None
    }

    /// Records that `client` went to `backend` for `service`, valid until `expires`.
    pub fn set(&self, service: u64, client: IpAddr, backend: (IpAddr, u16), expires: u64) {
        let c = addr(client);
        let b = self.bucket(service, &c);
        // Same client's record, else the one that expires first.
        let mut target = b;
        let mut earliest = u64::MAX;
        for i in b..b + WAYS {
            let w = self.read(i).unwrap_or([0; 7]);
            if w[0] == service && w[1] == c[0] && w[2] == c[1] {
                target = i;
                break;
            }
            if w[6] < earliest {
                earliest = w[6];
                target = i;
            }
        }
        let r = &self.records[target];
        // Claim the record: even → odd. A writer that loses simply skips its update (two
        // workers recording the same client at once record equivalent choices).
        let s = r.seq.load(Ordering::Relaxed);
        if s & 1 == 1
            || r.seq
                .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Orders the odd sequence before the record's stores, for readers.
        fence(Ordering::Release);
        let bk = addr(backend.0);
        let vals = [
            service,
            c[0],
            c[1],
            bk[0],
            bk[1],
            backend.1 as u64 | (backend.0.is_ipv6() as u64) << 32,
            expires,
        ];
        for (slot, v) in r.words.iter().zip(vals) {
            slot.store(v, Ordering::Relaxed);
        }
        // Release: readers that see the even sequence see the whole record.
        r.seq.store(s + 2, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_timeout() {
        let t = AffinityTable::new(64);
        let svc = service_key("default/web:http", false);
        let client: IpAddr = "10.244.1.2".parse().unwrap();
        let backend = ("10.244.1.5".parse().unwrap(), 8080);
        assert_eq!(t.get(svc, client, 0), None);
        t.set(svc, client, backend, 100);
        assert_eq!(t.get(svc, client, 99), Some(backend));
        assert_eq!(t.get(svc, client, 100), None);
        assert_eq!(
            t.get(service_key("default/other:http", false), client, 0),
            None
        );
        let v6: IpAddr = "fd00::5".parse().unwrap();
        t.set(svc, v6, (v6, 80), 100);
        assert_eq!(t.get(svc, v6, 1), Some((v6, 80)));
    }

    #[test]
    fn a_full_bucket_forgets_the_earliest() {
        let t = AffinityTable::new(4);
        let svc = service_key("s", false);
        for i in 0..5u8 {
            let c = IpAddr::from([10, 0, 0, i]);
            t.set(svc, c, (c, 1), 100 + i as u64);
        }
        // Four records fit; the first (earliest expiry) was replaced.
        assert_eq!(t.get(svc, IpAddr::from([10, 0, 0, 0]), 0), None);
        for i in 1..5u8 {
            let c = IpAddr::from([10, 0, 0, i]);
            assert_eq!(t.get(svc, c, 0), Some((c, 1)));
        }
    }
}
