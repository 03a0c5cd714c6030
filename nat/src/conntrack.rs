//! Connection tracking shared by all workers, lock-free.
//!
//! Each translated connection is one `Entry` in a fixed array, found through an index of
//! 64-bit slots under both its original and its reply 5-tuple, so a reply arriving on any
//! queue finds its way back. Capacity is fixed at start; nothing allocates afterwards.
//!
//! - **Entries** are written only while their owner holds them exclusively (after taking
//!   them from the free list, before publishing them in the index), under a sequence
//!   counter: a reader that raced with a reuse sees the counter move and reads again, and
//!   compares the key it read, so it can never take one connection for another.
//! - **Index slots** map a tuple to its entry in windows of [`WINDOW`] slots
//!   (four cache lines), claimed by compare-and-swap; nothing ever moves.
//! - **Inserting the same tuple twice at once** (two workers, or two flows picking the same
//!   masquerade port) is settled after publishing: an entry is `PENDING` until it has
//!   checked its window for a twin. A live twin wins; a pending twin with a lower index
//!   wins; a pending twin with a higher index is waited for (it never waits for us, so it
//!   soon goes live, and wins, or gives up). Publishing and checking are sequentially
//!   consistent, so of two racers at least one sees the other.
//! - **Removal** (expiry, or a flush of flows to a deleted endpoint) is a compare-and-swap
//!   of the entry's state from `LIVE` to `DEAD` (so two sweepers never free one entry),
//!   then clearing its index slots, then returning it to a lock-free free list.
//! - **Generations**: an entry's state word carries, in its high half, a count of the
//!   connections it has held. Every removal and state change is a compare-and-swap against
//!   the word the caller read with the connection, so one prepared on a connection that has
//!   meanwhile gone (expired, evicted) never lands on the next one stored in its entry.
//! - **A full table** (free list empty, or a key's window full) refuses the new flow with
//!   [`InsertError::Full`]; established flows are untouched. Through
//!   [`Conntrack::insert_evicting`] the new flow first takes the place of an expired entry
//!   or of one the caller's policy lets go (the dataplane's: a connection whose handshake
//!   has not completed), the longest idle of those indexed near its tuples, as the Linux
//!   kernel's `early_drop` evicts an unassured entry of the new tuple's hash buckets.
//!
//! The rooms: what is tracked, as values (`flow`); one entry and its seqlock (`entry`);
//! the tuple index (`index`); the free list (`free_list`); inserting, with its race and
//! making room (`insert`); removing, one connection or by sweeps (`removal`); here, the
//! table and its lookups. What a connection's protocol state is, when it expires and which
//! one yields first is not the table's business: [`crate::timeouts`] decides, the table
//! stores a byte and asks a caller's function.
//!
//! Memory: 104 bytes per entry, 4 of free list and three index slots (24 bytes), 132
//! bytes per connection: 1,048,576 connections in 132 MiB (1M in 126 MiB).

use std::sync::atomic::Ordering;

mod entry;
mod flow;
mod free_list;
mod index;
mod insert;
mod removal;

pub use flow::{Connection, Direction, FlowKey, POLICY_MAX};
pub use index::WINDOW;

use entry::{decode, generation, proto_state, status, word, Entry, LIVE};
use free_list::FreeList;
use index::Index;

/// A lookup's result: the connection, the packet's direction, and the entry (for state
/// updates through [`Conntrack::update`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The connection.
    pub conn: Connection,
    /// The packet's direction.
    pub dir: Direction,
    /// The entry's index.
    pub entry: u32,
    /// The protocol state stored with the entry.
    pub state: u8,
    /// The entry's expiry time (ns) when it was looked up.
    pub expires: u64,
    /// The entry's state word as read with the connection (status, state, generation).
    word: u64,
}

/// A successful [`Conntrack::insert_evicting`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    /// The new connection's entry.
    pub entry: u32,
    /// Entries removed to make room for it (expired ones not yet swept, or ones the
    /// eviction policy let go).
    pub evicted: u32,
}

/// Why an insert was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// No free entry, or no free index slot near the key: the table is full.
    Full,
    /// One of the tuples is already tracked.
    Exists,
}

/// The shared connection table.
pub struct Conntrack {
    entries: Box<[Entry]>,
    index: Index,
    free: FreeList,
}

impl Conntrack {
    /// A table for at most `capacity` connections (at least 1, at most 2^31 - 1).
    pub fn new(capacity: usize) -> Conntrack {
        Conntrack::with_seed(capacity, 0)
    }

    /// [`Conntrack::new`] with a secret `seed` mixed into the index hash, so that outside
    /// clients cannot aim crafted tuples at one window (the dataplane seeds it randomly).
    pub fn with_seed(capacity: usize, seed: u64) -> Conntrack {
        let capacity = capacity.clamp(1, (u32::MAX >> 1) as usize - 1);
        Conntrack {
            entries: (0..capacity).map(|_| Entry::new()).collect(),
            index: Index::new(capacity, seed),
            free: FreeList::new(capacity),
        }
    }

    /// Number of tracked connections (entries in use).
    pub fn len(&self) -> usize {
        self.free.taken()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's capacity.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of memory the table holds.
    pub fn memory_bytes(&self) -> usize {
        self.entries.len() * std::mem::size_of::<Entry>()
            + self.free.memory_bytes()
            + self.index.memory_bytes()
    }

    /// Reads entry `e`'s connection consistently; `None` if it kept changing.
    fn read_entry(&self, e: u32) -> Option<[u64; entry::KEY_WORDS]> {
        self.entries[e as usize].read()
    }

    /// Finds `key` among entries in states accepted by `want`; returns the entry, its
    /// decoded connection, the direction and the raw state word.
    fn find(
        &self,
        key: &FlowKey,
        want: impl Fn(u8, u32) -> bool,
        skip: Option<u32>,
    ) -> Option<(u32, Connection, Direction, u64)> {
        for (e, dir) in self.index.candidates(key) {
            if Some(e) == skip {
                continue;
            }
            let state = &self.entries[e as usize].state;
            let st = state.load(Ordering::Acquire);
            if !want(status(st), e) {
                continue;
            }
            let Some(w) = self.read_entry(e) else {
                continue;
            };
            // A new generation means the entry was reused while we read it: the key may be
            // the next connection's, and the word we hold is not its.
            let now_st = state.load(Ordering::Acquire);
            if generation(now_st) != generation(st) {
                continue;
            }
            let conn = decode(&w);
            if conn.key(dir) == key {
                return Some((e, conn, dir, now_st));
            }
        }
        None
    }

    /// Looks a packet's tuple up; a live entry's expiry is pushed to `now + timeout`.
    pub fn lookup(&self, key: &FlowKey, now: u64, timeout: u64) -> Option<(Connection, Direction)> {
        let hit = self.get(key, now)?;
        self.refresh(hit.entry, now + timeout);
        Some((hit.conn, hit.dir))
    }

    /// Looks a tuple up without refreshing it.
    pub fn get(&self, key: &FlowKey, now: u64) -> Option<Hit> {
        // An expired entry the sweep has not reached yet may share the tuple with a live
        // one inserted after it expired: look past it.
        let live = |s: u8, e: u32| {
            s == LIVE && self.entries[e as usize].expires.load(Ordering::Relaxed) > now
        };
        let (e, conn, dir, st) = self.find(key, live, None)?;
        let expires = self.entries[e as usize].expires.load(Ordering::Relaxed);
        if expires <= now {
            return None;
        }
        Some(Hit {
            conn,
            dir,
            entry: e,
            state: proto_state(st),
            expires,
            word: st,
        })
    }

    /// Records a packet of a looked-up connection: its protocol state and expiry. Nothing
    /// happens if the connection has gone meanwhile (its entry may hold another by now);
    /// returns whether it was recorded.
    pub fn update(&self, hit: &Hit, state: u8, expires: u64) -> bool {
        let Some(e) = self.entries.get(hit.entry as usize) else {
            return false;
        };
        let mut cur = e.state.load(Ordering::Relaxed);
        loop {
            if status(cur) != LIVE || generation(cur) != generation(hit.word) {
                return false;
            }
            if proto_state(cur) == state {
                break;
            }
            let new = word(LIVE, state, generation(cur));
            match e
                .state
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
        // The entry may be reused between the check above and this store; the new
        // connection then gets this one's expiry until its next packet (or a sweep).
        e.expires.store(expires, Ordering::Relaxed);
        true
    }

    /// Sets an entry's expiry.
    pub fn refresh(&self, entry: u32, expires: u64) {
        if let Some(e) = self.entries.get(entry as usize) {
            e.expires.store(expires, Ordering::Relaxed);
        }
    }

    /// Whether a tuple is tracked and live.
    pub fn contains(&self, key: &FlowKey, now: u64) -> bool {
        self.get(key, now).is_some()
    }

    /// Every live connection with its protocol state and expiry time (ns), for inspection:
    /// one pass over the entries, off the packet path; a connection rewritten meanwhile
    /// may be missed.
    pub fn entries(&self, now: u64) -> Vec<(Connection, u8, u64)> {
        let mut out = Vec::new();
        for e in 0..self.entries.len() as u32 {
            let entry = &self.entries[e as usize];
            let st = entry.state.load(Ordering::Acquire);
            let expires = entry.expires.load(Ordering::Relaxed);
            if status(st) != LIVE || expires <= now {
                continue;
            }
            if let Some(w) = self.read_entry(e) {
                out.push((decode(&w), proto_state(st), expires));
            }
        }
        out
    }

    /// Every live connection with its expiry (for inspection).
    pub fn snapshot(&self, now: u64) -> Vec<Connection> {
        let mut out = Vec::new();
        for e in 0..self.entries.len() as u32 {
            let entry = &self.entries[e as usize];
            if status(entry.state.load(Ordering::Acquire)) != LIVE
                || entry.expires.load(Ordering::Relaxed) <= now
            {
                continue;
            }
            if let Some(w) = self.read_entry(e) {
                out.push(decode(&w));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
