//! Removing connections: one at a time ([`Conntrack::remove`], [`Conntrack::evict`]), the
//! one that makes room for an insert (`evict_near`), and sweeps of expired or stale ones.
//!
//! Removal is a compare-and-swap of the entry's state from `LIVE` to `DEAD` against the
//! word the caller read with the connection (so two sweepers never free one entry, and one
//! prepared on a connection that has meanwhile gone never lands on the next one stored in
//! its entry), then clearing its index slots, then returning it to the free list.

use std::sync::atomic::Ordering;

use super::entry::{decode, generation, proto_state, status, word, DEAD, FREE, LIVE};
use super::index::Place;
use super::{Connection, Conntrack, Direction, Hit};

impl Conntrack {
    /// Removes live entry `e` holding `conn`, read with state word `seen`, if `may` still
    /// allows it given the current word: only the caller that moves it from LIVE to DEAD
    /// frees it, and not once it holds another connection (a new generation).
    fn kill(&self, e: u32, seen: u64, conn: &Connection, may: impl Fn(u64) -> bool) -> bool {
        let entry = &self.entries[e as usize];
        let mut cur = entry.state.load(Ordering::Acquire);
        loop {
            if status(cur) != LIVE || generation(cur) != generation(seen) || !may(cur) {
                return false;
            }
            let dead = word(DEAD, 0, generation(cur));
            match entry
                .state
                .compare_exchange(cur, dead, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                // A state change raced with us: look again.
                Err(c) => cur = c,
            }
        }
        for dir in [Direction::Original, Direction::Reply] {
            self.index.release(&self.index.place(conn.key(dir)), e, dir);
        }
        entry
            .state
            .store(word(FREE, 0, generation(cur)), Ordering::Release);
        self.free.push(e);
        true
    }

    /// Removes a connection (both tuples), if tracked: every entry that holds exactly
    /// `conn`, expired or not. Candidates under its original tuple that hold another
    /// connection (an expired one the sweep has not reached, with the same tuple) are
    /// looked past, not taken for it.
    pub fn remove(&self, conn: &Connection) -> bool {
        let mut removed = false;
        // Bounded: each round frees an entry indexed at the tuple's place, or ends.
        loop {
            let found = self.find(
                &conn.original,
                |s, e| {
                    s == LIVE
                        && self
                            .read_entry(e, self.entries[e as usize].state.load(Ordering::Acquire))
                            .is_some_and(|(w, _)| decode(&w) == *conn)
                },
                None,
            );
            match found {
                Some((e, c, _, st)) if c == *conn && self.kill(e, st, &c, |_| true) => {
                    removed = true;
                }
                _ => return removed,
            }
        }
    }

    /// Removes the connection of `hit` if its entry still holds it, as looked up (the same
    /// generation and state): the precise way for a caller holding a lookup's result.
    pub fn remove_hit(&self, hit: &Hit) -> bool {
        self.kill(hit.entry, hit.word, &hit.conn, |_| true)
    }

    /// Removes a looked-up connection if it is still the one in its entry and
    /// `last_seen(state, expires)` (see [`Conntrack::insert_evicting`]) still lets it go
    /// given its current protocol state; a caller uses it to take over the masquerade port
    /// of an idle unassured connection. Returns whether it went.
    pub fn evict(&self, hit: &Hit, now: u64, last_seen: impl Fn(u8, u64) -> Option<u64>) -> bool {
        let Some(entry) = self.entries.get(hit.entry as usize) else {
            return false;
        };
        self.kill(hit.entry, hit.word, &hit.conn, |cur| {
            let expires = entry.expires.load(Ordering::Relaxed);
            expires <= now || last_seen(proto_state(cur), expires).is_some()
        })
    }

    /// Evicts one entry indexed in the buckets of `places` (and the `span - 1` after each,
    /// see `Index::neighbours`): an expired one, else the one `last_seen` lets go that was
    /// seen earliest. Returns whether one went.
    pub(super) fn evict_near(
        &self,
        places: &[Place],
        span: usize,
        now: u64,
        last_seen: &dyn Fn(u8, u64) -> Option<u64>,
    ) -> bool {
        // (when last seen, entry, state word)
        let mut victim: Option<(u64, u32, u64)> = None;
        for place in places {
            for e in self.index.neighbours(place, span) {
                let entry = &self.entries[e as usize];
                let st = entry.state.load(Ordering::Acquire);
                if status(st) != LIVE {
                    continue;
                }
                let expires = entry.expires.load(Ordering::Relaxed);
                let seen = if expires <= now {
                    Some(0)
                } else {
                    last_seen(proto_state(st), expires)
                };
                if let Some(seen) = seen {
                    if victim.is_none_or(|(v, _, _)| seen < v) {
                        victim = Some((seen, e, st));
                    }
                }
            }
        }
        let Some((_, e, st)) = victim else {
            return false;
        };
        let Some((w, _)) = self.read_entry(e, st) else {
            return false;
        };
        let entry = &self.entries[e as usize];
        self.kill(e, st, &decode(&w), |cur| {
            let expires = entry.expires.load(Ordering::Relaxed);
            expires <= now || last_seen(proto_state(cur), expires).is_some()
        })
    }

    /// Removes every expired entry and every connection for which `stale` is true (for
    /// example UDP flows to an endpoint that is gone). Returns how many went. Workers keep
    /// running meanwhile; each removal is a few atomic operations.
    pub fn sweep(&self, now: u64, stale: impl FnMut(&Connection) -> bool) -> usize {
        self.sweep_entries(now, 0..self.entries.len(), Some(stale))
    }

    /// Removes the expired connections among entries `from..from + count` (clamped to the
    /// table) and returns how many went and where the next call should start (0 after the
    /// last entry): a sweep in slices, so that no single pass walks the whole table. An
    /// entry that has not expired costs two loads from its own cache line; only expired
    /// ones are read whole.
    pub fn sweep_expired(&self, now: u64, from: usize, count: usize) -> (usize, usize) {
        let end = from.saturating_add(count).min(self.entries.len());
        let removed = self.sweep_entries(now, from.min(end)..end, None::<fn(&Connection) -> bool>);
        let next = if end >= self.entries.len() { 0 } else { end };
        (removed, next)
    }

    /// Removes the expired connections among `entries`, and those `stale` says are; without
    /// `stale`, an entry that has not expired is passed over without being read whole.
    fn sweep_entries(
        &self,
        now: u64,
        entries: std::ops::Range<usize>,
        mut stale: Option<impl FnMut(&Connection) -> bool>,
    ) -> usize {
        let mut removed = 0;
        for e in entries {
            let entry = &self.entries[e];
            let st = entry.state.load(Ordering::Acquire);
            if status(st) != LIVE
                || (stale.is_none() && entry.expires.load(Ordering::Relaxed) > now)
            {
                continue;
            }
            let Some((w, _)) = self.read_entry(e as u32, st) else {
                continue;
            };
            let conn = decode(&w);
            // Read after the entry: a packet may have refreshed it since the first look.
            let expired = entry.expires.load(Ordering::Relaxed) <= now;
            if (expired || stale.as_mut().is_some_and(|s| s(&conn)))
                && self.kill(e as u32, st, &conn, |_| true)
            {
                removed += 1;
            }
        }
        removed
    }
}
