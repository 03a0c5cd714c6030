//! Connection tracking shared by all workers, lock-free.
//!
//! Each translated connection is one [`Entry`] in a fixed array, found through an index of
//! 64-bit slots under both its original and its reply 5-tuple, so a reply arriving on any
//! queue finds its way back. Capacity is fixed at start; nothing allocates afterwards.
//!
//! - **Entries** are written only while their owner holds them exclusively (after taking
//!   them from the free list, before publishing them in the index), under a sequence
//!   counter: a reader that raced with a reuse sees the counter move and reads again, and
//!   compares the key it read, so it can never take one connection for another.
//! - **Index slots** hold `tag(32) | entry+1 (31) | direction (1)`; 0 is free. A key lives
//!   in the first free slot of its window of [`WINDOW`] slots (four cache lines), found by
//!   compare-and-swap; a full window marks itself spilled and the key goes to the next one
//!   (up to four). Lookups scan the window, and the next ones only past spilled windows;
//!   nothing ever moves.
//! - **Inserting the same tuple twice at once** (two workers, or two flows picking the same
//!   masquerade port) is settled after publishing: an entry is `PENDING` until it has
//!   checked its window for a twin. A live twin wins; a pending twin with a lower index
//!   wins; a pending twin with a higher index is waited for (it never waits for us, so it
//!   soon goes live, and wins, or gives up). Publishing and checking are sequentially
//!   consistent, so of two racers at least one sees the other.
//! - **Removal** (expiry, or a flush of flows to a deleted endpoint) is a compare-and-swap
//!   of the entry's state from `LIVE` to `DEAD` (so two sweepers never free one entry),
//!   then clearing its index slots, then returning it to a lock-free free list (a Treiber
//!   stack with an ABA tag).
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
//! Memory: 104 bytes per entry, 4 of free list and three index slots (24 bytes), 132
//! bytes per connection: 1,048,576 connections in 132 MiB (1M in 126 MiB).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};

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

/// Index slots scanned for one key: four 64-byte cache lines.
pub const WINDOW: usize = 32;
/// Windows a key may spill into when its own is full (at full capacity a window holds 16
/// keys on average, so a full one is rare but, over a million windows, does happen).
const SPILL: usize = 4;
/// Index slots per entry: two keys per entry at most two-thirds full.
const SLOTS_PER_ENTRY: usize = 3;
fn backoff(round: usize) {
    if round < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}
/// Re-reads of an entry that is being rewritten before a lookup gives up on it.
const SEQ_RETRIES: usize = 16;

const FREE: u8 = 0;
const PENDING: u8 = 1;
const LIVE: u8 = 2;
const DEAD: u8 = 3;
/// Entries an insert may evict before it gives up (each eviction frees one entry, which a
/// racing insert may take first).
const EVICTIONS_MAX: u32 = 4;

/// An entry's state word: status (`FREE`…`DEAD`) in the low byte, the protocol state in
/// the next, the generation (connections the entry has held) in the high half.
fn word(status: u8, proto_state: u8, generation: u64) -> u64 {
    status as u64 | (proto_state as u64) << 8 | generation << 32
}
fn status(w: u64) -> u8 {
    w as u8
}
fn proto_state(w: u64) -> u8 {
    (w >> 8) as u8
}
fn generation(w: u64) -> u64 {
    w >> 32
}

/// Words of an entry's connection: four addresses (2 words each), ports, proto + policy +
/// service.
const KEY_WORDS: usize = 10;

/// One connection. Word layout of `key`: original src, original dst, reply src, reply dst
/// (16 bytes each, IPv4 mapped), then the four ports, then proto | v6 flag | service.
struct Entry {
    /// Even: stable; odd: being written. Bumped around every rewrite of `key`.
    seq: AtomicU64,
    key: [AtomicU64; KEY_WORDS],
    /// Expiry time (ns); refreshed by packets.
    expires: AtomicU64,
    /// `FREE`/`PENDING`/`LIVE`/`DEAD`, protocol state and generation (see [`word`]).
    state: AtomicU64,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            seq: AtomicU64::new(0),
            key: std::array::from_fn(|_| AtomicU64::new(0)),
            expires: AtomicU64::new(0),
            state: AtomicU64::new(FREE as u64),
        }
    }
}

fn addr_words(ip: IpAddr) -> [u64; 2] {
    let b = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    [
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

fn words_addr(w: [u64; 2], v6: bool) -> IpAddr {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_le_bytes());
    b[8..].copy_from_slice(&w[1].to_le_bytes());
    let a = Ipv6Addr::from(b);
    if v6 {
        IpAddr::V6(a)
    } else {
        IpAddr::V4(a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED))
    }
}

fn encode(c: &Connection) -> [u64; KEY_WORDS] {
    let mut w = [0u64; KEY_WORDS];
    let addrs = [c.original.src, c.original.dst, c.reply.src, c.reply.dst];
    for (i, a) in addrs.iter().enumerate() {
        let [x, y] = addr_words(*a);
        w[2 * i] = x;
        w[2 * i + 1] = y;
    }
    w[8] = c.original.sport as u64
        | (c.original.dport as u64) << 16
        | (c.reply.sport as u64) << 32
        | (c.reply.dport as u64) << 48;
    w[9] = c.original.proto as u64
        | (c.original.src.is_ipv6() as u64) << 8
        | (c.policy.min(POLICY_MAX) as u64) << 9
        | (c.service as u64) << 32;
    w
}

fn decode(w: &[u64; KEY_WORDS]) -> Connection {
    let v6 = (w[9] >> 8) & 1 == 1;
    let proto = w[9] as u8;
    let a = |i: usize| words_addr([w[2 * i], w[2 * i + 1]], v6);
    Connection {
        original: FlowKey {
            proto,
            src: a(0),
            dst: a(1),
            sport: w[8] as u16,
            dport: (w[8] >> 16) as u16,
        },
        reply: FlowKey {
            proto,
            src: a(2),
            dst: a(3),
            sport: (w[8] >> 32) as u16,
            dport: (w[8] >> 48) as u16,
        },
        service: (w[9] >> 32) as u32,
        policy: ((w[9] >> 9) as u32) & POLICY_MAX,
    }
}

fn slot_value(tag: u32, entry: u32, dir: Direction) -> u64 {
    (tag as u64) << 32 | ((entry as u64 + 1) << 1) | (dir == Direction::Reply) as u64
}

fn slot_entry(v: u64) -> Option<(u32, Direction)> {
    let e = ((v & 0xffff_ffff) >> 1) as u32;
    if e == 0 {
        return None;
    }
    let dir = if v & 1 == 1 {
        Direction::Reply
    } else {
        Direction::Original
    };
    Some((e - 1, dir))
}

/// The shared connection table.
pub struct Conntrack {
    entries: Box<[Entry]>,
    index: Box<[AtomicU64]>,
    /// Index length: a multiple of [`WINDOW`], at least `SPILL` windows.
    slots: usize,
    /// One bit per window: set once an insert found the window full and spilled into the
    /// next one, so lookups of keys hashed there look on. Never cleared (a clear bit only
    /// saves a window scan).
    spilled: Box<[AtomicU64]>,
    /// Mixed into the index hash.
    seed: u64,
    /// Free list: `tag << 32 | (entry + 1)`, 0 when empty.
    free_head: AtomicU64,
    next_free: Box<[AtomicU32]>,
    len: AtomicUsize,
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
        let slots = (capacity * SLOTS_PER_ENTRY).div_ceil(WINDOW).max(SPILL) * WINDOW;
        let ct = Conntrack {
            entries: (0..capacity).map(|_| Entry::new()).collect(),
            index: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            slots,
            spilled: (0..(slots / WINDOW).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            seed,
            free_head: AtomicU64::new(0),
            next_free: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            len: AtomicUsize::new(0),
        };
        // Entry 0 ends up on top, so a fresh table fills from the front.
        for e in (0..capacity as u32).rev() {
            ct.push_free(e);
        }
        ct
    }

    /// Number of tracked connections (entries in use).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
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
        self.entries.len() * (std::mem::size_of::<Entry>() + 4)
            + self.index.len() * 8
            + self.spilled.len() * 8
    }

    fn pop_free(&self) -> Option<u32> {
        // Acquire pairs with the Release of the CAS in `push_free`, so `next_free` of the
        // head we read is the value its pusher wrote.
        let mut head = self.free_head.load(Ordering::Acquire);
        loop {
            let e = (head & 0xffff_ffff) as u32;
            if e == 0 {
                return None;
            }
            let next = self.next_free[(e - 1) as usize].load(Ordering::Relaxed);
            // The tag in the high half changes on every pop, so a head that was popped and
            // pushed back meanwhile (ABA) fails this exchange.
            let new = ((head >> 32).wrapping_add(1) << 32) | next as u64;
            match self.free_head.compare_exchange_weak(
                head,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.len.fetch_add(1, Ordering::Relaxed);
                    return Some(e - 1);
                }
                Err(h) => head = h,
            }
        }
    }

    fn push_free(&self, entry: u32) {
        let mut head = self.free_head.load(Ordering::Acquire);
        loop {
            self.next_free[entry as usize].store((head & 0xffff_ffff) as u32, Ordering::Relaxed);
            let new = (head & !0xffff_ffff) | (entry as u64 + 1);
            // Release: publishes `next_free[entry]` to the popper's Acquire.
            match self.free_head.compare_exchange_weak(
                head,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Reads an entry's connection consistently; `None` if it kept changing.
    fn read_entry(&self, e: u32) -> Option<[u64; KEY_WORDS]> {
        let entry = &self.entries[e as usize];
        for _ in 0..SEQ_RETRIES {
            // Acquire pairs with the Release store that ended the last rewrite.
            let s1 = entry.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let w: [u64; KEY_WORDS] = std::array::from_fn(|i| entry.key[i].load(Ordering::Relaxed));
            // Keeps the key loads above from moving below the re-check (seqlock reader).
            fence(Ordering::Acquire);
            if entry.seq.load(Ordering::Relaxed) == s1 {
                return Some(w);
            }
        }
        None
    }

    fn write_entry(&self, e: u32, w: &[u64; KEY_WORDS]) {
        let entry = &self.entries[e as usize];
        let s = entry.seq.load(Ordering::Relaxed);
        entry.seq.store(s + 1, Ordering::Relaxed);
        // Orders the odd sequence before the key stores, for readers' first load.
        fence(Ordering::Release);
        for (slot, v) in entry.key.iter().zip(w) {
            slot.store(*v, Ordering::Relaxed);
        }
        // Release: a reader that sees `s + 2` sees every key word above.
        entry.seq.store(s + 2, Ordering::Release);
    }

    fn window(&self, key: &FlowKey) -> (usize, u32) {
        let h = key.flow_hash() ^ self.seed;
        let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let h = h ^ (h >> 33);
        // Lemire's multiply-shift reduction picks a window without a power-of-two size.
        let windows = (self.slots / WINDOW) as u128;
        let w = ((h as u32 as u128 * windows) >> 32) as usize;
        (w * WINDOW, (h >> 32) as u32)
    }

    /// An index position past the end wraps to the start (positions are at most one
    /// length past it).
    #[inline]
    fn wrap(&self, at: usize) -> usize {
        if at >= self.slots {
            at - self.slots
        } else {
            at
        }
    }

    fn window_no(&self, start: usize) -> usize {
        self.wrap(start) / WINDOW
    }

    fn has_spilled(&self, start: usize) -> bool {
        let w = self.window_no(start);
        // SeqCst pairs with the SeqCst `fetch_or` in `claim`: a lookup that sees a slot
        // claimed past a window also sees that window's bit.
        self.spilled[w / 64].load(Ordering::SeqCst) & (1 << (w % 64)) != 0
    }

    /// The index positions a key's slot may be at: its window, then the next ones while
    /// each window before has spilled.
    fn positions(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        let mut windows = 1;
        while windows < SPILL && self.has_spilled(start + (windows - 1) * WINDOW) {
            windows += 1;
        }
        (0..windows * WINDOW).map(move |i| self.wrap(start + i))
    }

    /// Claims a free slot for `value` in the key's window or, marking the window as
    /// spilled, in the next ones.
    fn claim(&self, start: usize, value: u64) -> Option<usize> {
        for w in 0..SPILL {
            let base = start + w * WINDOW;
            for i in 0..WINDOW {
                let at = self.wrap(base + i);
                if self.index[at]
                    .compare_exchange(0, value, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(at);
                }
            }
            let n = self.window_no(base);
            self.spilled[n / 64].fetch_or(1 << (n % 64), Ordering::SeqCst);
        }
        None
    }

    fn key_of(c: &Connection, dir: Direction) -> &FlowKey {
        match dir {
            Direction::Original => &c.original,
            Direction::Reply => &c.reply,
        }
    }

    /// Finds `key` among entries in states accepted by `want`; returns the entry, its
    /// decoded connection, the direction and the raw state word.
    fn find(
        &self,
        key: &FlowKey,
        want: impl Fn(u8, u32) -> bool,
        skip: Option<u32>,
    ) -> Option<(u32, Connection, Direction, u64)> {
        let (start, tag) = self.window(key);
        for at in self.positions(start) {
            let v = self.index[at].load(Ordering::SeqCst);
            if v == 0 || (v >> 32) as u32 != tag {
                continue;
            }
            let Some((e, dir)) = slot_entry(v) else {
                continue;
            };
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
            if Self::key_of(&conn, dir) == key {
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

    /// Tracks `conn` until `now + timeout` unless refreshed. Returns the entry.
    pub fn insert(&self, conn: Connection, now: u64, timeout: u64) -> Result<u32, InsertError> {
        self.insert_with_state(conn, 0, now, timeout)
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
        self.insert_inner(conn, state, now, timeout, &never)
            .map(|i| i.entry)
    }

    /// [`Conntrack::insert_with_state`] that, when the table or a key's windows are full,
    /// makes room by evicting an entry indexed near the new tuples: an expired one not yet
    /// swept, else one that `last_seen(state, expires)` lets go, the earliest seen first.
    /// `last_seen` gives when an entry in protocol state `state` expiring at `expires` last
    /// saw a packet, or `None` for an entry that keeps its place (an established
    /// connection). At most [`EVICTIONS_MAX`] entries go for one insert.
    pub fn insert_evicting(
        &self,
        conn: Connection,
        state: u8,
        now: u64,
        timeout: u64,
        last_seen: impl Fn(u8, u64) -> Option<u64>,
    ) -> Result<Inserted, InsertError> {
        self.insert_inner(conn, state, now, timeout, &last_seen)
    }

    fn insert_inner(
        &self,
        conn: Connection,
        state: u8,
        now: u64,
        timeout: u64,
        last_seen: &dyn Fn(u8, u64) -> Option<u64>,
    ) -> Result<Inserted, InsertError> {
        let mut evicted = 0;
        'retry: loop {
            if self.contains(&conn.original, now) || self.contains(&conn.reply, now) {
                return Err(InsertError::Exists);
            }
            let Some(e) = self.pop_free() else {
                let near = [&conn.original, &conn.reply];
                if evicted < EVICTIONS_MAX && self.evict_near(&near, now, last_seen) {
                    evicted += 1;
                    continue;
                }
                return Err(InsertError::Full);
            };
            let entry = &self.entries[e as usize];
            // A new generation before the new key, so a reader that sees the key sees it.
            let generation =
                generation(entry.state.load(Ordering::Relaxed)).wrapping_add(1) & 0xffff_ffff;
            entry
                .state
                .store(word(FREE, 0, generation), Ordering::SeqCst);
            self.write_entry(e, &encode(&conn));
            entry.expires.store(now + timeout, Ordering::Relaxed);
            entry
                .state
                .store(word(PENDING, state, generation), Ordering::SeqCst);
            let mut claimed: [Option<usize>; 2] = [None, None];
            for (n, dir) in [Direction::Original, Direction::Reply]
                .into_iter()
                .enumerate()
            {
                let key = Self::key_of(&conn, dir);
                let (start, tag) = self.window(key);
                claimed[n] = self.claim(start, slot_value(tag, e, dir));
                if claimed[n].is_none() {
                    self.abandon(e, &claimed);
                    if evicted < EVICTIONS_MAX && self.evict_near(&[key], now, last_seen) {
                        evicted += 1;
                        continue 'retry;
                    }
                    return Err(InsertError::Full);
                }
            }
            match self.settle(e, &conn, now) {
                None => {
                    entry
                        .state
                        .store(word(LIVE, state, generation), Ordering::SeqCst);
                    return Ok(Inserted { entry: e, evicted });
                }
                Some(twin) => {
                    self.abandon(e, &claimed);
                    // Wait for the twin to settle too. If it went live, the tuple is
                    // tracked (the caller's lookup finds it); if it lost to yet another
                    // racer that then gave up, try again.
                    self.wait_while_pending(twin);
                    if self.contains(&conn.original, now) || self.contains(&conn.reply, now) {
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
    fn settle(&self, e: u32, conn: &Connection, now: u64) -> Option<u32> {
        for dir in [Direction::Original, Direction::Reply] {
            let key = Self::key_of(conn, dir);
            loop {
                let live_or_pending = |st: u8, other: u32| {
                    st == PENDING
                        || (st == LIVE
                            && self.entries[other as usize].expires.load(Ordering::Relaxed) > now)
                };
                let Some((other, _, _, st)) = self.find(key, live_or_pending, Some(e)) else {
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
            .store(word(DEAD, 0, generation), Ordering::SeqCst);
        for at in claimed.iter().flatten() {
            self.index[*at].store(0, Ordering::SeqCst);
        }
        entry
            .state
            .store(word(FREE, 0, generation), Ordering::Release);
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.push_free(e);
    }

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
                .compare_exchange(cur, dead, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => break,
                // A state change raced with us: look again.
                Err(c) => cur = c,
            }
        }
        for dir in [Direction::Original, Direction::Reply] {
            let key = Self::key_of(conn, dir);
            let (start, tag) = self.window(key);
            let value = slot_value(tag, e, dir);
            for at in self.positions(start) {
                if self.index[at]
                    .compare_exchange(value, 0, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            }
        }
        entry
            .state
            .store(word(FREE, 0, generation(cur)), Ordering::Release);
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.push_free(e);
        true
    }

    /// Removes a connection (both tuples), if tracked.
    pub fn remove(&self, conn: &Connection) -> bool {
        match self.find(&conn.original, |s, _| s == LIVE, None) {
            Some((e, c, _, st)) if c == *conn => self.kill(e, st, &c, |_| true),
            _ => false,
        }
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

    /// Evicts one entry indexed in the windows of `keys`: an expired one, else the one
    /// `last_seen` lets go that was seen earliest. Returns whether one went.
    fn evict_near(
        &self,
        keys: &[&FlowKey],
        now: u64,
        last_seen: &dyn Fn(u8, u64) -> Option<u64>,
    ) -> bool {
        // (when last seen, entry, state word)
        let mut victim: Option<(u64, u32, u64)> = None;
        for key in keys {
            let (start, _) = self.window(key);
            for at in self.positions(start) {
                let Some((e, _)) = slot_entry(self.index[at].load(Ordering::Relaxed)) else {
                    continue;
                };
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
        let Some(w) = self.read_entry(e) else {
            return false;
        };
        let entry = &self.entries[e as usize];
        if generation(entry.state.load(Ordering::Acquire)) != generation(st) {
            return false;
        }
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
            let Some(w) = self.read_entry(e as u32) else {
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
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

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
            policy: 0,
        }
    }

    #[test]
    fn encode_round_trips_v4_and_v6() {
        let mut c = conn(40000);
        assert_eq!(decode(&encode(&c)), c);
        c.policy = 7;
        assert_eq!(decode(&encode(&c)), c);
        c.policy = POLICY_MAX + 5;
        assert_eq!(decode(&encode(&c)).policy, POLICY_MAX, "saturates");
        c.policy = POLICY_MAX;
        let mut c6 = c;
        c6.original.src = "fd00:10:244:1::2".parse().unwrap();
        c6.original.dst = "fd00:172:30::41".parse().unwrap();
        c6.reply.src = "fd00:10:244:1::5".parse().unwrap();
        c6.reply.dst = "fd00:10:244:1::2".parse().unwrap();
        c6.service = u32::MAX;
        assert_eq!(decode(&encode(&c6)), c6);
        c6.policy = 0;
        assert_eq!(decode(&encode(&c6)), c6);
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
        assert!(ct.lookup(&conn(2).reply, 5, 100).is_some());
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

    #[test]
    fn sweeping_in_slices_removes_exactly_the_expired() {
        let ct = Conntrack::new(100);
        for i in 0..50 {
            ct.insert(conn(i), 0, 10).unwrap();
        }
        for i in 50..80 {
            ct.insert(conn(i), 0, 1000).unwrap();
        }
        // A packet at 5 keeps this one alive until 105.
        assert!(ct.lookup(&conn(3).original, 5, 100).is_some());
        let (mut removed, mut from, mut calls) = (0, 0, 0);
        loop {
            let (r, next) = ct.sweep_expired(20, from, 16);
            removed += r;
            calls += 1;
            if next == 0 {
                break;
            }
            assert_eq!(next, from + 16, "each call covers its slice only");
            from = next;
        }
        assert_eq!(calls, 100usize.div_ceil(16));
        assert_eq!(removed, 49);
        assert_eq!(ct.len(), 31);
        assert!(ct.lookup(&conn(3).reply, 20, 100).is_some());
        for i in 50..80 {
            assert!(ct.lookup(&conn(i).original, 20, 1000).is_some(), "{i}");
        }
        // Out of range is nothing, and starts over.
        assert_eq!(ct.sweep_expired(2000, 500, 16), (0, 0));
    }

    #[test]
    fn fills_to_capacity_without_refusals() {
        let cap = 1 << 16;
        let ct = Conntrack::new(cap);
        let mut refused = 0;
        for i in 0..cap as u32 {
            let mut c = conn((i & 0xffff) as u16);
            c.original.src = IpAddr::from((0x0a00_0000 | (i >> 16)).to_be_bytes());
            c.reply.dst = c.original.src;
            if ct.insert(c, 0, 100).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 0, "refused before reaching capacity");
        assert_eq!(ct.len(), cap);
        // Everything is found again.
        for i in (0..cap as u32).step_by(97) {
            let mut c = conn((i & 0xffff) as u16);
            c.original.src = IpAddr::from((0x0a00_0000 | (i >> 16)).to_be_bytes());
            c.reply.dst = c.original.src;
            assert!(ct.get(&c.reply, 1).is_some());
        }
    }

    #[test]
    fn memory_per_connection_is_bounded() {
        let ct = Conntrack::new(1 << 16);
        // 104-byte entries, 4 bytes of free list, 3 index slots of 8 bytes.
        assert!(ct.memory_bytes() / (1 << 16) <= 104 + 4 + 8 * 3 + 1);
        let million = Conntrack::new(1_000_000);
        assert!(
            million.memory_bytes() <= 128 << 20,
            "{} bytes",
            million.memory_bytes()
        );
    }

    #[test]
    fn threads_inserting_looking_up_and_expiring_the_same_tuples() {
        let ct = Arc::new(Conntrack::new(4096));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let rounds = 50u64;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let ct = ct.clone();
                let b = barrier.clone();
                std::thread::spawn(move || {
                    // No assertion in here: a panicking thread would leave the others
                    // waiting at the barrier forever. Count, and assert after the join.
                    let (mut won, mut missing) = (0usize, 0usize);
                    for round in 0..rounds {
                        let now = round * 1000;
                        b.wait();
                        for s in 0..64u16 {
                            if ct.insert(conn(s), now, 500).is_ok() {
                                won += 1;
                            }
                            // Whoever won, the tuple is tracked now, in both directions.
                            if ct.lookup(&conn(s).reply, now, 500).is_none()
                                || ct.get(&conn(s).original, now).is_none()
                            {
                                missing += 1;
                            }
                        }
                        b.wait();
                        // Everyone expires the round's flows at once; each is freed once.
                        ct.sweep(now + 600, |_| false);
                    }
                    (won, missing)
                })
            })
            .collect();
        let results: Vec<(usize, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let won: usize = results.iter().map(|r| r.0).sum();
        let missing: usize = results.iter().map(|r| r.1).sum();
        assert_eq!(missing, 0, "a tuple was not found right after its insert");
        assert_eq!(
            won,
            64 * rounds as usize,
            "exactly one insert per tuple per round"
        );
        assert_eq!(ct.len(), 0, "no entry leaked");
        // The free list still holds every entry.
        for s in 0..4096u16 {
            ct.insert(conn(s), 0, 10).unwrap();
        }
        assert_eq!(ct.insert(conn(5000), 0, 10), Err(InsertError::Full));
    }

    #[test]
    fn concurrent_racers_never_leave_twins() {
        for _ in 0..20 {
            let ct = Arc::new(Conntrack::new(256));
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let ct = ct.clone();
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        b.wait();
                        (0..32u16)
                            .filter(|s| ct.insert(conn(*s), 0, 100).is_ok())
                            .count()
                    })
                })
                .collect();
            let won: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(won, 32, "exactly one winner per tuple");
            assert_eq!(ct.len(), 32);
            assert_eq!(ct.snapshot(1).len(), 32);
        }
    }

    /// The eviction policy of the tests: state 3 keeps its place, any other was last seen
    /// 10 before it expires.
    fn policy(state: u8, expires: u64) -> Option<u64> {
        (state != 3).then(|| expires.saturating_sub(10))
    }

    #[test]
    fn a_full_table_makes_room_from_unassured_and_expired_entries_only() {
        let cap = 64;
        let ct = Conntrack::new(cap);
        for s in 0..32 {
            ct.insert_with_state(conn(s), 3, 0, 1000).unwrap();
        }
        // Unassured, seen at 0..32.
        for s in 32..64 {
            ct.insert_with_state(conn(s), 1, s as u64 - 32, 100)
                .unwrap();
        }
        assert_eq!(
            ct.insert_with_state(conn(64), 1, 40, 100),
            Err(InsertError::Full)
        );
        let mut evicted = 0;
        for s in 64..96 {
            let got = ct.insert_evicting(conn(s), 1, 40, 100, policy).unwrap();
            evicted += got.evicted;
        }
        assert_eq!(evicted, 32);
        assert_eq!(ct.len(), cap);
        for s in 0..32 {
            assert!(ct.get(&conn(s).reply, 40).is_some(), "assured {s} kept");
        }
        // The earliest seen go first: most of the older unassured ones (seen before 32) made
        // room, most of the new ones (seen at 40) stay. (Eviction looks only near the new
        // tuples, so a new one may yield to a newer one where no older one was near.)
        let alive =
            |r: std::ops::Range<u16>| r.filter(|s| ct.get(&conn(*s).reply, 40).is_some()).count();
        let (old, new) = (alive(32..64), alive(64..96));
        eprintln!("older unassured left {old}, new left {new}");
        assert!(old <= 8 && new >= 24, "older left {old}, new left {new}");
        // With only assured entries left, the table is full for real.
        for s in (32..96).filter(|s| ct.get(&conn(*s).reply, 40).is_some()) {
            let hit = ct.get(&conn(s).original, 40).unwrap();
            assert!(ct.update(&hit, 3, 1000));
        }
        assert_eq!(
            ct.insert_evicting(conn(200), 1, 41, 10, policy),
            Err(InsertError::Full)
        );
        // Expired entries not yet swept give way whatever their state.
        let got = ct.insert_evicting(conn(200), 1, 2000, 10, policy).unwrap();
        assert_eq!(got.evicted, 1);
        assert_eq!(ct.len(), cap);
    }

    #[test]
    fn streams_taken_up_mid_way_yield_until_answered() {
        use crate::timeouts::{self, State, SECOND};
        let (tcp, ack, syn) = (crate::packet::PROTO_TCP, 0x10, 0x02);
        let ct = Conntrack::new(32);
        // A full table of streams taken up without a SYN (a spoofed ACK flood), one a
        // second; the last 8 are answered.
        for s in 0..32u16 {
            let state = timeouts::initial(tcp, ack);
            let now = s as u64 * SECOND;
            ct.insert_with_state(conn(s), state as u8, now, timeouts::timeout(tcp, state))
                .unwrap();
        }
        let now = 40 * SECOND;
        for s in 24..32u16 {
            let hit = ct.get(&conn(s).reply, now).unwrap();
            assert_eq!(State::from_u8(hit.state), State::PickedUp);
            let state = timeouts::next(tcp, State::PickedUp, hit.dir, ack);
            assert_eq!(state, State::Established);
            assert!(ct.update(&hit, state as u8, now + timeouts::timeout(tcp, state)));
        }
        // New handshakes take the unanswered ones' places, the earliest seen first; the
        // answered ones keep theirs.
        let state = timeouts::initial(tcp, syn);
        for s in 100..124u16 {
            let got = ct
                .insert_evicting(
                    conn(s),
                    state as u8,
                    now,
                    timeouts::timeout(tcp, state),
                    timeouts::last_seen,
                )
                .unwrap();
            assert_eq!(got.evicted, 1, "{s}");
        }
        assert!((0..24).all(|s| ct.get(&conn(s).original, now).is_none()));
        assert!((24..32).all(|s| ct.get(&conn(s).original, now).is_some()));
        assert!((100..124).all(|s| ct.get(&conn(s).original, now).is_some()));
        // Unanswered, one lives 300 s from its last packet, not a day.
        let hit = ct.get(&conn(100).original, now).unwrap();
        assert_eq!(hit.expires, now + 5 * SECOND, "a SYN gets 5 s");
        assert_eq!(
            timeouts::timeout(tcp, timeouts::initial(tcp, ack)),
            300 * SECOND
        );
    }

    #[test]
    fn evicting_a_hit_spares_a_connection_that_moved_on_or_was_replaced() {
        let ct = Conntrack::new(4);
        ct.insert_with_state(conn(1), 1, 0, 10).unwrap();
        let hit = ct.get(&conn(1).reply, 1).unwrap();
        assert_eq!(hit.expires, 10);
        // Its handshake completed meanwhile: it keeps its place.
        let later = ct.get(&conn(1).original, 2).unwrap();
        assert!(ct.update(&later, 3, 1000));
        assert!(!ct.evict(&hit, 3, policy));
        assert!(ct.get(&conn(1).reply, 3).is_some());
        // Removed and its entry reused by another connection: a stale hit touches neither.
        assert!(ct.remove(&conn(1)));
        let e = ct.insert_with_state(conn(2), 1, 3, 10).unwrap();
        assert_eq!(e, hit.entry, "the freed entry is reused first");
        assert!(
            !ct.update(&hit, 3, 5000),
            "no state change through a stale hit"
        );
        assert!(!ct.evict(&hit, 4, policy));
        let now = ct.get(&conn(2).reply, 4).unwrap();
        assert_eq!((now.state, now.expires), (1, 13));
        assert!(ct.evict(&now, 4, policy));
        assert!(ct.get(&conn(2).original, 4).is_none() && ct.is_empty());
    }

    #[test]
    fn threads_evicting_each_other_keep_both_tuples_and_assured_connections() {
        let cap = 1024;
        let ct = Arc::new(Conntrack::new(cap));
        let tuple = |t: u32, i: u32| {
            let mut c = conn(i as u16);
            c.original.src = IpAddr::from([10, 1, t as u8, (i >> 16) as u8]);
            c.reply.dst = c.original.src;
            c
        };
        for i in 0..128 {
            ct.insert_with_state(tuple(9, i), 3, 0, u64::MAX / 2)
                .unwrap();
        }
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let ct = ct.clone();
                let b = barrier.clone();
                std::thread::spawn(move || {
                    // Counted, asserted after the join (see above).
                    let (mut established, mut lost_assured) = (Vec::new(), 0usize);
                    b.wait();
                    for i in 0..6000u32 {
                        let now = 1 + i as u64;
                        let _ = ct.insert_evicting(tuple(t, i), 1, now, 50, policy);
                        // Some complete their handshake, through a hit that may be stale
                        // by the time it is used.
                        if i % 8 == 0 {
                            if let Some(hit) = ct.get(&tuple(t, i).reply, now) {
                                if ct.update(&hit, 3, u64::MAX / 2) {
                                    established.push(i);
                                }
                            }
                        }
                        if ct.get(&tuple(9, i % 128).original, now).is_none() {
                            lost_assured += 1;
                        }
                    }
                    (t, established, lost_assured)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let now = 7000;
        for (t, established, lost) in &results {
            assert_eq!(*lost, 0, "thread {t} missed an assured connection");
            for i in established {
                assert!(
                    ct.get(&tuple(*t, *i).original, now).is_some(),
                    "thread {t}: established {i} was evicted"
                );
            }
        }
        // Every entry is found under both its tuples, and only the connections that
        // completed their handshake are assured.
        let entries = ct.entries(now);
        assert!(entries.len() <= cap);
        for (c, state, _) in &entries {
            let hit = ct.get(&c.reply, now).expect("reply tuple indexed");
            assert_eq!(hit.conn, *c);
            assert_eq!(ct.get(&c.original, now).map(|h| h.conn), Some(*c));
            if *state == 3 {
                let t = c.original.src.to_string();
                let ok = t.starts_with("10.1.9.")
                    || results.iter().any(|(th, est, _)| {
                        t.starts_with(&format!("10.1.{th}."))
                            && est.contains(&(c.original.sport as u32))
                    });
                assert!(ok, "{c:?} assured though its handshake never completed");
            }
        }
        // Removing everything leaves no index slot behind.
        ct.sweep(u64::MAX, |_| true);
        assert!(ct.is_empty());
        assert!(ct.index.iter().all(|s| s.load(Ordering::Relaxed) == 0));
    }

    proptest::proptest! {
        /// The table behaves like a map with capacity, checked against a plain model.
        #[test]
        fn matches_a_simple_model(ops in proptest::collection::vec((0u8..6, 0u16..24, 1u64..50), 1..200)) {
            let cap = 16;
            let ct = Conntrack::new(cap);
            let mut model: HashMap<u16, u64> = HashMap::new();
            // Keys whose connection completed its handshake (state 3: never evicted).
            let mut assured: std::collections::HashSet<u16> = Default::default();
            let mut now = 0u64;
            for (op, s, t) in ops {
                match op {
                    4 => {
                        // An insert that may evict an expired or unassured connection.
                        let full = ct.len() >= cap;
                        let live = model.get(&s).is_some_and(|e| *e > now);
                        let got = ct.insert_evicting(conn(s), 1, now, t, policy);
                        // Connections no longer in the table at all (expired ones stay
                        // until a sweep, and are found at time 0).
                        let gone: Vec<u16> = model
                            .keys()
                            .copied()
                            .filter(|k| *k != s && ct.get(&conn(*k).reply, 0).is_none())
                            .collect();
                        match got {
                            Err(InsertError::Exists) => proptest::prop_assert!(live),
                            Err(InsertError::Full) => proptest::prop_assert!(!live && full),
                            Ok(ins) => {
                                proptest::prop_assert!(!live);
                                proptest::prop_assert!(full || ins.evicted == 0);
                                proptest::prop_assert!(ins.evicted as usize >= gone.len());
                                for k in &gone {
                                    let expired = model[k] <= now;
                                    proptest::prop_assert!(expired || !assured.contains(k), "assured {} evicted", k);
                                    model.remove(k);
                                    assured.remove(k);
                                }
                                model.insert(s, now + t);
                                assured.remove(&s);
                            }
                        }
                        proptest::prop_assert!(gone.is_empty() || got.is_ok());
                        proptest::prop_assert!(ct.len() <= cap);
                    }
                    5 => {
                        // The handshake completes: assured from now on.
                        if let Some(hit) = ct.get(&conn(s).original, now) {
                            proptest::prop_assert!(ct.update(&hit, 3, now + t));
                            model.insert(s, now + t);
                            assured.insert(s);
                        }
                    }
                    0 => {
                        let want = if model.get(&s).is_some_and(|e| *e > now) {
                            Err(InsertError::Exists)
                        } else if ct.len() >= cap {
                            // Expired entries hold their space until a sweep.
                            Err(InsertError::Full)
                        } else {
                            Ok(())
                        };
                        let got = ct.insert(conn(s), now, t).map(|_| ());
                        proptest::prop_assert_eq!(got, want);
                        if got.is_ok() {
                            model.insert(s, now + t);
                            assured.remove(&s);
                        }
                    }
                    1 => {
                        let want = model.get(&s).is_some_and(|e| *e > now);
                        let got = ct.get(&conn(s).reply, now).is_some();
                        proptest::prop_assert_eq!(got, want);
                    }
                    2 => {
                        now += t;
                        ct.sweep(now, |_| false);
                        model.retain(|_, e| *e > now);
                        assured.retain(|k| model.contains_key(k));
                        proptest::prop_assert_eq!(ct.len(), model.len());
                        proptest::prop_assert_eq!(ct.snapshot(now).len(), model.len());
                    }
                    _ => {
                        let removed = ct.remove(&conn(s));
                        let want = model.get(&s).is_some_and(|e| *e > now) || (model.contains_key(&s) && removed);
                        proptest::prop_assert_eq!(removed, want);
                        model.remove(&s);
                        assured.remove(&s);
                    }
                }
            }
        }
    }
}
