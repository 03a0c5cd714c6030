//! Inserting a connection: publishing it under both tuples, settling a race with a twin
//! inserted at the same time, and making room when the table or a window is full.
//!
//! An entry is `PENDING` from the moment its tuples are in the index until it has checked
//! their buckets for a twin: a live twin wins; a pending twin with a lower entry number
//! wins; one with a higher number is waited for (it never waits for us, so it soon goes
//! live, and wins, or gives up). Between publishing and checking stands a sequentially
//! consistent fence: two racers each store a slot and then load the other's (Dekker's
//! pattern), which acquire and release alone allow both to miss; with the fence, of two
//! racers at least one sees the other. The fence is on the insert path only; lookups use
//! acquire loads. Where there is no room, the new flow may evict an entry indexed near its
//! tuples ([`Conntrack::insert_evicting`], the kernel's `early_drop`).

use std::sync::atomic::{fence, Ordering};

use super::entry::{encode, generation, status, word, DEAD, FREE, LIVE, PENDING};
use super::index::Place;
use super::{Connection, Conntrack, Direction, InsertError, Inserted};

/// Entries an insert may evict before it gives up (each eviction frees one entry, which a
/// racing insert may take first).
const EVICTIONS_MAX: u32 = 4;
/// Buckets from each of a tuple's two (that one and the next ones) in which a full table
/// looks for an entry to evict: 64 slots per tuple, eight lines, on the slow path of a
/// full table only. A wider look finds an older victim; two buckets (32 slots, as many as
/// the window of the table before buckets) let newer flows go first in a small table
/// (`tests::streams_taken_up_mid_way_yield_until_answered`), three were just enough.
const EVICTION_SPAN: usize = 4;

fn backoff(round: usize) {
    if round < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl Conntrack {
    /// Tracks `conn` until `now + timeout` unless refreshed. Returns the entry.
    pub fn insert(&self, conn: Connection, now: u64, timeout: u64) -> Result<u32, InsertError> {
        self.insert_with_state(conn, 0, now, timeout)
    }

    /// [`Conntrack::insert`] of each of `conns` in order into `out` (`out[i]` for
    /// `conns[i]`; connections past `out.len()` are not inserted), the same results as one
    /// by one (a tuple twice in `conns` is `Exists` the second time). The index lines of a
    /// group of `BULK` (32) connections' tuples are requested before the first insert, as
    /// [`Conntrack::get_bulk`] does for lookups.
    pub fn insert_bulk(
        &self,
        conns: &[Connection],
        now: u64,
        timeout: u64,
        out: &mut [Result<u32, InsertError>],
    ) {
        for (conns, out) in conns.chunks(super::BULK).zip(out.chunks_mut(super::BULK)) {
            let mut touched = 0u64;
            for c in conns.iter().take(out.len()) {
                touched ^= self.index.touch(&self.index.place(&c.original));
                touched ^= self.index.touch(&self.index.place(&c.reply));
            }
            std::hint::black_box(touched);
            for (c, o) in conns.iter().zip(out) {
                *o = self.insert(*c, now, timeout);
            }
        }
    }

    /// [`Conntrack::insert`] with an initial protocol state.
    pub fn insert_with_state(
        &self,
        conn: Connection,
        state: u8,
        now: u64,
        timeout: u64,
    ) -> Result<u32, InsertError> {
        let never = |_: u8, _: u64| None;
        let hash = conn.original.flow_hash();
        self.insert_inner(conn, hash, state, now, timeout, &never)
            .map(|i| i.entry)
    }

    /// [`Conntrack::insert_with_state`] that, when the table or a key's windows are full,
    /// makes room by evicting an entry indexed near the new tuples: an expired one not yet
    /// swept, else one that `last_seen(state, expires)` lets go, the earliest seen first.
    /// `last_seen` gives when an entry in protocol state `state` expiring at `expires` last
    /// saw a packet, or `None` for an entry that keeps its place (an established
    /// connection). At most `EVICTIONS_MAX` (4) entries go for one insert.
    pub fn insert_evicting(
        &self,
        conn: Connection,
        state: u8,
        now: u64,
        timeout: u64,
        last_seen: impl Fn(u8, u64) -> Option<u64>,
    ) -> Result<Inserted, InsertError> {
        let hash = conn.original.flow_hash();
        self.insert_evicting_hashed(conn, hash, state, now, timeout, last_seen)
    }

    /// [`Conntrack::insert_evicting`] of a connection whose original tuple's
    /// [`FlowKey`](super::FlowKey)`::flow_hash` the caller has computed (`hash`).
    pub fn insert_evicting_hashed(
        &self,
        conn: Connection,
        hash: u64,
        state: u8,
        now: u64,
        timeout: u64,
        last_seen: impl Fn(u8, u64) -> Option<u64>,
    ) -> Result<Inserted, InsertError> {
        self.insert_inner(conn, hash, state, now, timeout, &last_seen)
    }

    fn insert_inner(
        &self,
        conn: Connection,
        hash: u64,
        state: u8,
        now: u64,
        timeout: u64,
        last_seen: &dyn Fn(u8, u64) -> Option<u64>,
    ) -> Result<Inserted, InsertError> {
        let mut evicted = 0;
        // Each tuple hashed once for the whole insert.
        let places = [self.index.place_hashed(hash), self.index.place(&conn.reply)];
        let tracked = || {
            self.get_at(&places[0], &conn.original, now).is_some()
                || self.get_at(&places[1], &conn.reply, now).is_some()
        };
        'retry: loop {
            if tracked() {
                return Err(InsertError::Exists);
            }
            let Some(e) = self.free.pop(places[0].tag() as usize) else {
                if evicted < EVICTIONS_MAX
                    && self.evict_near(&places, EVICTION_SPAN, now, last_seen)
                {
                    evicted += 1;
                    continue;
                }
                return Err(InsertError::Full);
            };
            let entry = &self.entries[e as usize];
            // A new generation before the new words, so a reader that sees a word sees it
            // (the fence orders the store before the word stores; the reader's Acquire
            // fence in `read_entry` pairs with it).
            let generation =
                generation(entry.state.load(Ordering::Relaxed)).wrapping_add(1) & 0xffff_ffff;
            entry
                .state
                .store(word(FREE, 0, generation), Ordering::Relaxed);
            fence(Ordering::Release);
            entry.store(&self.cold[e as usize], &encode(&conn));
            entry.expires.store(now + timeout, Ordering::Relaxed);
            // Release: a reader that sees PENDING (or the slots claimed after) sees the
            // words.
            entry
                .state
                .store(word(PENDING, state, generation), Ordering::Release);
            let mut claimed: [Option<usize>; 2] = [None, None];
            for (n, dir) in [Direction::Original, Direction::Reply]
                .into_iter()
                .enumerate()
            {
                claimed[n] = self.index.claim(&places[n], e, dir);
                if claimed[n].is_none() {
                    self.abandon(e, &claimed);
                    if evicted < EVICTIONS_MAX && self.evict_near(&places[n..=n], 1, now, last_seen)
                    {
                        evicted += 1;
                        continue 'retry;
                    }
                    return Err(InsertError::Full);
                }
            }
            // Our slots before the twins' (see the module comment).
            fence(Ordering::SeqCst);
            match self.settle(e, &conn, &places, now) {
                None => {
                    entry
                        .state
                        .store(word(LIVE, state, generation), Ordering::Release);
                    return Ok(Inserted { entry: e, evicted });
                }
                Some(twin) => {
                    self.abandon(e, &claimed);
                    // Wait for the twin to settle too. If it went live, the tuple is
                    // tracked (the caller's lookup finds it); if it lost to yet another
                    // racer that then gave up, try again.
                    self.wait_while_pending(twin);
                    if tracked() {
                        return Err(InsertError::Exists);
                    }
                }
            }
        }
    }

    /// Settles a race with twins of pending entry `e` (see the module comment): `None`
    /// when `e` wins, else the twin it defers to. A higher pending twin is waited for: it
    /// never waits on a lower one, so it soon goes live (it did not see us, we lose) or
    /// gives up (it saw us).
    fn settle(&self, e: u32, conn: &Connection, places: &[Place; 2], now: u64) -> Option<u32> {
        for (dir, place) in [Direction::Original, Direction::Reply]
            .into_iter()
            .zip(places)
        {
            let key = conn.key(dir);
            loop {
                let live_or_pending = |st: u8, other: u32| {
                    st == PENDING
                        || (st == LIVE
                            && self.entries[other as usize].expires.load(Ordering::Relaxed) > now)
                };
                let Some((other, _, _, st)) = self.find_at(place, key, live_or_pending, Some(e))
                else {
                    break;
                };
                if status(st) == LIVE || other < e {
                    return Some(other);
                }
                self.wait_while_pending(other);
            }
        }
        None
    }

    /// Waits (spinning, then yielding the core in case the other thread was preempted)
    /// until entry `e` is no longer pending. Only racing inserts of one tuple get here, and
    /// a pending entry settles in a bounded number of its own steps.
    fn wait_while_pending(&self, e: u32) {
        let state = &self.entries[e as usize].state;
        let mut round = 0usize;
        while status(state.load(Ordering::Acquire)) == PENDING {
            round += 1;
            backoff(round);
        }
    }

    fn abandon(&self, e: u32, claimed: &[Option<usize>; 2]) {
        let entry = &self.entries[e as usize];
        let generation = generation(entry.state.load(Ordering::Relaxed));
        entry
            .state
            .store(word(DEAD, 0, generation), Ordering::Relaxed);
        for at in claimed.iter().flatten() {
            self.index.clear(*at);
        }
        entry
            .state
            .store(word(FREE, 0, generation), Ordering::Release);
        self.free.push(e);
    }
}
