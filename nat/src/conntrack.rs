//! Connection tracking shared by all workers: each translated connection is stored under
//! its original and its reply 5-tuple, so a reply arriving on any queue finds its way back.
//!
//! This first version shards a hash map over many small mutexes; capacity is fixed at start
//! and a full table refuses new flows (counted by the caller) while established ones keep
//! working. Issue 3 replaces the shards with a lock-free table behind the same interface.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
}

/// Which direction of a connection a packet belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client towards the frontend.
    Original,
    /// From the backend back to the client.
    Reply,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    conn: Connection,
    dir: Direction,
    expires: u64,
}

/// Why an insert was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The table holds `capacity` connections.
    Full,
    /// One of the tuples is already tracked (another worker won the race).
    Exists,
}

/// Number of shards: a power of two well above the worker count, so workers rarely meet.
const SHARDS: usize = 256;

/// The shared connection table.
pub struct Conntrack {
    shards: Box<[Mutex<HashMap<FlowKey, Slot, BuildFastHasher>>]>,
    capacity: usize,
    len: AtomicUsize,
}

impl Conntrack {
    /// A table for at most `capacity` connections.
    pub fn new(capacity: usize) -> Conntrack {
        Conntrack {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(BuildFastHasher)))
                .collect(),
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &FlowKey) -> usize {
        (key.flow_hash() as usize) & (SHARDS - 1)
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, HashMap<FlowKey, Slot, BuildFastHasher>> {
        // A poisoned shard only means another worker panicked mid-update; the map itself is
        // still consistent (every update is a single insert or remove).
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of tracked connections.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Looks a packet's tuple up; a live entry's expiry is pushed to `now + timeout`.
    pub fn lookup(&self, key: &FlowKey, now: u64, timeout: u64) -> Option<(Connection, Direction)> {
        let mut shard = self.lock(self.shard(key));
        let slot = shard.get_mut(key)?;
        if slot.expires <= now {
            return None;
        }
        slot.expires = now + timeout;
        Some((slot.conn, slot.dir))
    }

    /// Whether a tuple is tracked and live.
    pub fn contains(&self, key: &FlowKey, now: u64) -> bool {
        let shard = self.lock(self.shard(key));
        shard.get(key).is_some_and(|s| s.expires > now)
    }

    /// Tracks `conn` until `now + timeout` unless refreshed.
    pub fn insert(&self, conn: Connection, now: u64, timeout: u64) -> Result<(), InsertError> {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(InsertError::Full);
        }
        let a = self.shard(&conn.original);
        let b = self.shard(&conn.reply);
        let expires = now + timeout;
        let slot = |dir| Slot { conn, dir, expires };
        let live = |m: &HashMap<FlowKey, Slot, BuildFastHasher>, k: &FlowKey| {
            m.get(k).is_some_and(|s| s.expires > now)
        };
        let result = if a == b {
            let mut s = self.lock(a);
            if live(&s, &conn.original) || live(&s, &conn.reply) {
                Err(InsertError::Exists)
            } else {
                let old1 = s.insert(conn.original, slot(Direction::Original));
                let old2 = s.insert(conn.reply, slot(Direction::Reply));
                self.forget_replaced(old1.is_some() as usize + old2.is_some() as usize);
                Ok(())
            }
        } else {
            // Lock in index order so two inserts never wait on each other in a cycle.
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let mut first = self.lock(lo);
            let mut second = self.lock(hi);
            let (sa, sb) = if a < b {
                (&mut first, &mut second)
            } else {
                (&mut second, &mut first)
            };
            if live(sa, &conn.original) || live(sb, &conn.reply) {
                Err(InsertError::Exists)
            } else {
                let old1 = sa.insert(conn.original, slot(Direction::Original));
                let old2 = sb.insert(conn.reply, slot(Direction::Reply));
                self.forget_replaced(old1.is_some() as usize + old2.is_some() as usize);
                Ok(())
            }
        };
        if result.is_err() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }

    /// Expired entries that an insert overwrote count half a connection each.
    fn forget_replaced(&self, keys: usize) {
        // Each connection has two keys; an overwritten pair was one connection already
        // counted. Overwriting single stale keys can leave the count slightly high until
        // `expire` recounts, which only makes the table refuse a little early.
        if keys == 2 {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Removes a connection (both tuples).
    pub fn remove(&self, conn: &Connection) {
        let mut removed = false;
        for key in [conn.original, conn.reply] {
            let mut s = self.lock(self.shard(&key));
            if s.get(&key).is_some_and(|slot| slot.conn == *conn) {
                s.remove(&key);
                removed = true;
            }
        }
        if removed {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Removes every expired entry and every connection for which `stale` is true (for
    /// example UDP flows to an endpoint that is gone). Returns how many connections went.
    pub fn sweep(&self, now: u64, mut stale: impl FnMut(&Connection) -> bool) -> usize {
        let mut live_conns = 0usize;
        let mut removed = 0usize;
        for i in 0..SHARDS {
            let mut s = self.lock(i);
            s.retain(|_, slot| {
                let keep = slot.expires > now && !stale(&slot.conn);
                if !keep && slot.dir == Direction::Original {
                    removed += 1;
                }
                if keep && slot.dir == Direction::Original {
                    live_conns += 1;
                }
                keep
            });
        }
        // Recount: reply halves of removed pairs live in other shards and are gone too.
        self.len.store(live_conns, Ordering::Relaxed);
        removed
    }

    /// Every live connection (for inspection; takes each shard's lock briefly).
    pub fn snapshot(&self, now: u64) -> Vec<Connection> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let s = self.lock(i);
            out.extend(
                s.values()
                    .filter(|slot| slot.dir == Direction::Original && slot.expires > now)
                    .map(|slot| slot.conn),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sport: u16) -> Connection {
        let original = FlowKey {
            proto: 6,
            src: "10.244.1.2".parse().unwrap(),
            dst: "172.30.0.41".parse().unwrap(),
            sport,
            dport: 80,
        };
        let reply = FlowKey {
            proto: 6,
            src: "10.244.1.5".parse().unwrap(),
            dst: "10.244.1.2".parse().unwrap(),
            sport: 8080,
            dport: sport,
        };
        Connection {
            original,
            reply,
            service: 1,
        }
    }

    #[test]
    fn both_directions_found() {
        let ct = Conntrack::new(10);
        let c = conn(40000);
        ct.insert(c, 0, 100).unwrap();
        assert_eq!(
            ct.lookup(&c.original, 1, 100),
            Some((c, Direction::Original))
        );
        assert_eq!(ct.lookup(&c.reply, 1, 100), Some((c, Direction::Reply)));
        assert_eq!(ct.insert(c, 2, 100), Err(InsertError::Exists));
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn full_table_refuses_and_keeps_old() {
        let ct = Conntrack::new(2);
        ct.insert(conn(1), 0, 100).unwrap();
        ct.insert(conn(2), 0, 100).unwrap();
        assert_eq!(ct.insert(conn(3), 0, 100), Err(InsertError::Full));
        assert!(ct.lookup(&conn(1).original, 5, 100).is_some());
    }

    #[test]
    fn expiry_and_sweep() {
        let ct = Conntrack::new(10);
        ct.insert(conn(1), 0, 10).unwrap();
        ct.insert(conn(2), 0, 100).unwrap();
        assert!(ct.lookup(&conn(1).original, 20, 10).is_none());
        assert_eq!(ct.sweep(20, |_| false), 1);
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.sweep(20, |c| c.original.sport == 2), 1);
        assert!(ct.is_empty());
        // An expired entry's tuple can be reused.
        ct.insert(conn(1), 200, 10).unwrap();
    }
}
