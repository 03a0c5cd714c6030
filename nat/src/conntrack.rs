//! Connection tracking shared by all workers, lock-free.
//!
//! Each translated connection is one `Entry` in a fixed array, found through an index of
//! 64-bit slots under both its original and its reply 5-tuple, so a reply arriving on any
//! queue finds its way back. Capacity is fixed at start; nothing allocates afterwards.
//!
//! - **Index buckets** are one 64-byte cache line of 8 slots (`tag | entry | direction`).
//!   A tuple hashes to two buckets and is indexed in the emptier one, by compare-and-swap;
//!   nothing ever moves (`index`).
//! - **Entries** are one cache line: state word, expiry, ports, protocol, policy, Service,
//!   and an IPv4 connection's four addresses; an IPv6 connection's reply addresses are in
//!   a half line of their own (`entry`). An entry is written only while its owner holds it
//!   exclusively (after taking it from the free list, before publishing it in the index),
//!   after its generation has moved on: a reader that raced with a reuse sees the
//!   generation move and passes the entry over, and compares the tuple it read, so it can
//!   never take one connection for another.
//! - **Lines touched.** A lookup reads the tuple's first bucket, its second one (always
//!   on a miss; on a hit only when the first holds no slot of the tuple's tag) and the
//!   line of the entry a tag names (two lines for IPv6): at most two index lines and one
//!   entry line per candidate, and a wrong candidate takes a 32-bit tag collision. An
//!   insert reads the two buckets of each tuple (four lines), looks both tuples up again
//!   for a twin (the same lines) and writes its entry's line. Making room in a full table
//!   (below) reads up to 16 index lines and the entries they name. [`Conntrack::get_bulk`]
//!   requests a burst's bucket lines, then the entry lines, before it reads any.
//! - **Memory ordering.** Lookups use acquire loads and relaxed ones under them, nothing
//!   sequentially consistent; inserts publish with release stores and one sequentially
//!   consistent fence (see the next point).
//! - **Inserting the same tuple twice at once** (two workers, or two flows picking the same
//!   masquerade port) is settled after publishing: an entry is `PENDING` until it has
//!   checked its buckets for a twin. A live twin wins; a pending twin with a lower index
//!   wins; a pending twin with a higher index is waited for (it never waits for us, so it
//!   soon goes live, and wins, or gives up). A sequentially consistent fence between
//!   publishing and checking makes sure that of two racers at least one sees the other.
//! - **Removal** (expiry, or a flush of flows to a deleted endpoint) is a compare-and-swap
//!   of the entry's state from `LIVE` to `DEAD` (so two sweepers never free one entry),
//!   then clearing its index slots, then returning it to a lock-free free list, striped
//!   so that workers inserting at once seldom meet on one head (`free_list`).
//! - **Generations**: an entry's state word carries, in its high half, a count of the
//!   connections it has held. Every removal and state change is a compare-and-swap against
//!   the word the caller read with the connection, so one prepared on a connection that has
//!   meanwhile gone (expired, evicted) never lands on the next one stored in its entry.
//! - **A full table** (free list empty, or both of a key's buckets full) refuses the new
//!   flow with [`InsertError::Full`]; established flows are untouched. Through
//!   [`Conntrack::insert_evicting`] the new flow first takes the place of an expired entry
//!   or of one the caller's policy lets go (the dataplane's: a connection whose handshake
//!   has not completed), the longest idle of those indexed near its tuples, as the Linux
//!   kernel's `early_drop` evicts an unassured entry of the new tuple's hash buckets.
//! - **Handover**: a successor receives connections as values (`wire::HandedConnection`),
//!   never this layout, so a new layout needs no new handover version.
//!
//! The rooms: what is tracked, as values (`flow`); one entry and its layout (`entry`);
//! the tuple index (`index`); the free list (`free_list`); inserting, with its race and
//! making room (`insert`); removing, one connection or by sweeps (`removal`); here, the
//! table and its lookups. What a connection's protocol state is, when it expires and which
//! one yields first is not the table's business: [`crate::timeouts`] decides, the table
//! stores a byte and asks a caller's function.
//!
//! Memory: a 64-byte entry and its 32-byte half line, 4 bytes of free list and three
//! index slots (24 bytes): 124 bytes per connection (and 1 KiB of free-list heads),
//! 1,000,000 connections in 119 MiB (`tests::memory_per_connection_is_bounded`).

use std::sync::atomic::{fence, Ordering};

mod entry;
mod flow;
mod free_list;
mod index;
mod insert;
mod removal;

pub use flow::{Connection, Direction, FlowKey, POLICY_MAX};
pub use index::BUCKET_SLOTS;

use entry::{
    decode, decode_into, generation, proto_state, status, word, Cold, Entry, FREE, KEY_WORDS, LIVE,
};
use free_list::FreeList;
use index::{Index, Place};

/// Keys a bulk lookup resolves together: a receive burst (`dataplane`'s `BURST`, 64) is
/// two of them. The bucket lines of all of them are requested before the first is read;
/// more keys overlap more misses but a processor keeps only so many loads in flight
/// (`bulk_lookup` in `nat/benches/conntrack.rs`).
pub const BULK: usize = 32;

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

impl Hit {
    /// A placeholder, overwritten field by field by a lookup (`Conntrack::get_at_into`).
    const NONE: Hit = Hit {
        conn: Connection::NONE,
        dir: Direction::Original,
        entry: 0,
        state: 0,
        expires: 0,
        word: 0,
    };
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
    /// Per entry, the words of an IPv6 connection that do not fit its line.
    cold: Box<[Cold]>,
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
            cold: (0..capacity).map(|_| Cold::new()).collect(),
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
        std::mem::size_of_val(&*self.entries)
            + std::mem::size_of_val(&*self.cold)
            + self.free.memory_bytes()
            + self.index.memory_bytes()
    }

    /// Reads entry `e`'s connection, whose state word `st` the caller loaded (Acquire)
    /// before; `None` if the entry has held another connection since (a new generation:
    /// the words may be the next connection's). Returns the words and the state word as
    /// it is after them.
    fn read_entry(&self, e: u32, st: u64) -> Option<([u64; KEY_WORDS], u64)> {
        let entry = &self.entries[e as usize];
        let w = entry.load(&self.cold[e as usize]);
        // Keeps the word loads above from moving below the re-check (a seqlock reader):
        // a word stored by the next connection's insert comes after its new generation.
        fence(Ordering::Acquire);
        let now_st = entry.state.load(Ordering::Relaxed);
        (generation(now_st) == generation(st)).then_some((w, now_st))
    }

    /// Finds `key` among entries in states accepted by `want`; returns the entry, its
    /// decoded connection, the direction and the raw state word.
    fn find(
        &self,
        key: &FlowKey,
        want: impl Fn(u8, u32) -> bool,
        skip: Option<u32>,
    ) -> Option<(u32, Connection, Direction, u64)> {
        let place = self.index.place(key);
        // Both bucket lines on their way before the first is read.
        std::hint::black_box(self.index.touch_second(&place));
        let (e, w, dir, st) = self.find_at(&place, key, want, skip)?;
        Some((e, decode(&w), dir, st))
    }

    /// [`Conntrack::find`] at `key`'s place in the index, with the entry's words rather
    /// than its decoded connection. The caller has requested the place's bucket lines.
    fn find_at(
        &self,
        place: &Place,
        key: &FlowKey,
        want: impl Fn(u8, u32) -> bool,
        skip: Option<u32>,
    ) -> Option<(u32, [u64; KEY_WORDS], Direction, u64)> {
        self.index.find_map(place, |e, dir| {
            if Some(e) == skip {
                return None;
            }
            self.candidate(e, dir, key, &want)
        })
    }

    /// Whether entry `e`, indexed under `key`'s tag in direction `dir`, holds `key` in a
    /// state accepted by `want`: its words, direction and state word if so.
    fn candidate(
        &self,
        e: u32,
        dir: Direction,
        key: &FlowKey,
        want: impl Fn(u8, u32) -> bool,
    ) -> Option<(u32, [u64; KEY_WORDS], Direction, u64)> {
        // Acquire pairs with the Release that made the entry PENDING or LIVE: its words
        // are seen.
        let st = self.entries.get(e as usize)?.state.load(Ordering::Acquire);
        if !want(status(st), e) {
            return None;
        }
        let (w, now_st) = self.read_entry(e, st)?;
        entry::matches(&w, key, dir).then_some((e, w, dir, now_st))
    }

    /// Looks a packet's tuple up; a live entry's expiry is pushed to `now + timeout`.
    pub fn lookup(&self, key: &FlowKey, now: u64, timeout: u64) -> Option<(Connection, Direction)> {
        let hit = self.get(key, now)?;
        self.refresh(hit.entry, now + timeout);
        Some((hit.conn, hit.dir))
    }

    /// Looks a tuple up without refreshing it.
    pub fn get(&self, key: &FlowKey, now: u64) -> Option<Hit> {
        self.get_at(&self.index.place(key), key, now)
    }

    /// [`Conntrack::get`] of a key whose [`FlowKey::flow_hash`] is `hash`.
    pub fn get_hashed(&self, key: &FlowKey, hash: u64, now: u64) -> Option<Hit> {
        self.get_at(&self.index.place_hashed(hash), key, now)
    }

    /// [`Conntrack::get`] of each of `keys` into `out` (`out[i]` for `keys[i]`; keys past
    /// `out.len()` are not looked up), the same results as one by one. The keys go in
    /// groups of `BULK` (32): every key's place in the index first, then a load from each
    /// of their buckets, then from the entry each first candidate names, and only then one
    /// lookup after the other, so that the group's cache misses overlap instead of adding
    /// up (DPDK's `rte_hash_lookup_bulk`).
    pub fn get_bulk(&self, keys: &[FlowKey], now: u64, out: &mut [Option<Hit>]) {
        for (keys, out) in keys.chunks(BULK).zip(out.chunks_mut(BULK)) {
            let mut hashes = [0u64; BULK];
            for (h, k) in hashes.iter_mut().zip(keys) {
                *h = k.flow_hash();
            }
            self.get_bulk_hashed(keys, &hashes[..keys.len()], now, out);
        }
    }

    /// [`Conntrack::get_bulk`] of keys whose [`FlowKey::flow_hash`] the caller has
    /// computed (`hashes[i]` of `keys[i]`), for the other uses it has for them: a new
    /// connection's Maglev pick, and its insert.
    pub fn get_bulk_hashed(
        &self,
        keys: &[FlowKey],
        hashes: &[u64],
        now: u64,
        out: &mut [Option<Hit>],
    ) {
        for ((keys, hashes), out) in keys
            .chunks(BULK)
            .zip(hashes.chunks(BULK))
            .zip(out.chunks_mut(BULK))
        {
            let mut places = [Place::default(); BULK];
            for (p, h) in places.iter_mut().zip(hashes) {
                *p = self.index.place_hashed(*h);
            }
            let places = &places[..keys.len().min(hashes.len()).min(out.len())];
            // Each stage a short loop, so that many loads are in flight at once.
            let mut touched = 0u64;
            for p in places {
                touched ^= self.index.touch(p);
            }
            let mut first = [None; BULK];
            for (f, p) in first.iter_mut().zip(places) {
                *f = self.index.find_map(p, |e, dir| Some((e, dir)));
            }
            for (e, _) in first[..places.len()].iter().flatten() {
                if let Some(entry) = self.entries.get(*e as usize) {
                    touched ^= entry.state.load(Ordering::Relaxed);
                }
            }
            std::hint::black_box(touched);
            for (((k, p), f), o) in keys.iter().zip(places).zip(first).zip(out) {
                self.get_at_into(p, k, now, f, o);
            }
        }
    }

    /// Requests, for new connections about to be inserted (original tuple `originals[i]`,
    /// reply tuple `replies[i]`), the lines their inserts read and write first, without
    /// waiting for them: both index buckets of each reply tuple (the original tuple's come
    /// with its lookup) and the free entries the inserts will take (read off their
    /// free-list stripes without taking them: an insert elsewhere meanwhile only makes the
    /// guess wrong). A burst's new connections thus wait for memory together, not one by one.
    /// The original tuples are given by their [`FlowKey::flow_hash`].
    pub fn prefetch_inserts(&self, originals: &[u64], replies: &[FlowKey]) {
        let mut touched = 0u64;
        let mut depth = [0usize; free_list::STRIPES];
        for (original, reply) in originals.iter().zip(replies) {
            touched ^= self.index.touch(&self.index.place(reply));
            let hint = self.index.place_hashed(*original).tag() as usize;
            let d = &mut depth[hint % free_list::STRIPES];
            if let Some(e) = self.free.peek(hint, *d) {
                if let Some(entry) = self.entries.get(e as usize) {
                    touched ^= entry.state.load(Ordering::Relaxed);
                }
            }
            *d += 1;
        }
        std::hint::black_box(touched);
    }

    /// [`Conntrack::get`] at `key`'s place in the index.
    fn get_at(&self, place: &Place, key: &FlowKey, now: u64) -> Option<Hit> {
        // Both bucket lines on their way before the first is read.
        std::hint::black_box(self.index.touch_second(place));
        let mut out = None;
        self.get_at_into(place, key, now, None, &mut out);
        out
    }

    /// [`Conntrack::get_at`] into `out`, field by field: a bulk lookup's hits are built
    /// where they are kept. (A `Hit` built elsewhere and copied in is read back in wide
    /// words across the narrow stores of its addresses, at odd offsets, and the copy
    /// stalls until they are done.) `first`, the first entry indexed under the key's tag
    /// as a bulk lookup found it, is tried before the buckets are read again; the caller
    /// has requested the place's bucket lines.
    fn get_at_into(
        &self,
        place: &Place,
        key: &FlowKey,
        now: u64,
        first: Option<(u32, Direction)>,
        out: &mut Option<Hit>,
    ) {
        // An expired entry the sweep has not reached yet may share the tuple with a live
        // one inserted after it expired: look past it.
        let live = |s: u8, e: u32| {
            s == LIVE && self.entries[e as usize].expires.load(Ordering::Relaxed) > now
        };
        let found = first
            .and_then(|(e, dir)| self.candidate(e, dir, key, live))
            .or_else(|| self.find_at(place, key, live, None));
        let Some((e, w, dir, st)) = found else {
            *out = None;
            return;
        };
        let expires = self.entries[e as usize].expires.load(Ordering::Relaxed);
        if expires <= now {
            *out = None;
            return;
        }
        let hit = out.insert(Hit::NONE);
        decode_into(&w, &mut hit.conn);
        hit.dir = dir;
        hit.entry = e;
        hit.state = proto_state(st);
        hit.expires = expires;
        hit.word = st;
    }

    /// Whether `hit`, looked up earlier (a burst's keys are looked up together, before the
    /// packets ahead of a key have been handled), still stands at `now`: its entry holds
    /// the same connection in the same protocol state, live and unexpired. Two loads from
    /// the entry's line, which the lookup brought in.
    pub fn still(&self, hit: &Hit, now: u64) -> bool {
        self.entries.get(hit.entry as usize).is_some_and(|e| {
            e.state.load(Ordering::Acquire) == hit.word && e.expires.load(Ordering::Relaxed) > now
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

    /// Every live connection with its protocol state and expiry time (ns), for inspection
    /// and handovers: one pass over the entries, off the packet path; a connection
    /// rewritten meanwhile may be missed. The pass ends once it has met as many entries in
    /// use as the table held when it began: the free lists hand out the lowest entries
    /// first, so it covers the table's high-water mark, not its capacity (a handover
    /// scans this with the workers stopped).
    pub fn entries(&self, now: u64) -> Vec<(Connection, u8, u64)> {
        let mut out = Vec::new();
        let (taken, mut met) = (self.len(), 0);
        for e in 0..self.entries.len() as u32 {
            if met >= taken {
                break;
            }
            let entry = &self.entries[e as usize];
            let st = entry.state.load(Ordering::Acquire);
            met += usize::from(status(st) != FREE);
            let expires = entry.expires.load(Ordering::Relaxed);
            if status(st) != LIVE || expires <= now {
                continue;
            }
            if let Some((w, _)) = self.read_entry(e, st) {
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
            let st = entry.state.load(Ordering::Acquire);
            if status(st) != LIVE || entry.expires.load(Ordering::Relaxed) <= now {
                continue;
            }
            if let Some((w, _)) = self.read_entry(e, st) {
                out.push(decode(&w));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
