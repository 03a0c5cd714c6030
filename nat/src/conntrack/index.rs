//! The index from a tuple to the entry that holds it: 64-bit slots in windows.
//!
//! A slot holds `tag(32) | entry+1 (31) | direction (1)`; 0 is free. A key lives in the
//! first free slot of its window of [`WINDOW`] slots (four cache lines), found by
//! compare-and-swap; a full window marks itself spilled and the key goes to the next one
//! (up to [`SPILL`]). Lookups scan the window, and the next ones only past spilled windows;
//! nothing ever moves. The index knows tuples, entry numbers and directions, not what an
//! entry holds: the table checks each candidate's connection against the key.

use std::sync::atomic::{AtomicU64, Ordering};

use super::flow::{Direction, FlowKey};

/// Index slots scanned for one key: four 64-byte cache lines.
pub const WINDOW: usize = 32;
/// Windows a key may spill into when its own is full (at full capacity a window holds 16
/// keys on average, so a full one is rare but, over a million windows, does happen).
const SPILL: usize = 4;
/// Index slots per entry: two keys per entry at most two-thirds full.
const SLOTS_PER_ENTRY: usize = 3;

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

/// The index of a table of `capacity` entries.
pub(super) struct Index {
    slots: Box<[AtomicU64]>,
    /// Index length: a multiple of [`WINDOW`], at least `SPILL` windows.
    len: usize,
    /// One bit per window: set once an insert found the window full and spilled into the
    /// next one, so lookups of keys hashed there look on. Never cleared (a clear bit only
    /// saves a window scan).
    spilled: Box<[AtomicU64]>,
    /// Mixed into the index hash.
    seed: u64,
}

impl Index {
    /// An empty index for `capacity` entries, hashing with `seed`.
    pub(super) fn new(capacity: usize, seed: u64) -> Index {
        let len = (capacity * SLOTS_PER_ENTRY).div_ceil(WINDOW).max(SPILL) * WINDOW;
        Index {
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
            len,
            spilled: (0..(len / WINDOW).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            seed,
        }
    }

    /// Bytes of memory the index holds.
    pub(super) fn memory_bytes(&self) -> usize {
        self.slots.len() * 8 + self.spilled.len() * 8
    }

    /// Where `key`'s window starts, and the tag its slots carry.
    fn window(&self, key: &FlowKey) -> (usize, u32) {
        let h = key.flow_hash() ^ self.seed;
        let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let h = h ^ (h >> 33);
        // Lemire's multiply-shift reduction picks a window without a power-of-two size.
        let windows = (self.len / WINDOW) as u128;
        let w = ((h as u32 as u128 * windows) >> 32) as usize;
        (w * WINDOW, (h >> 32) as u32)
    }

    /// An index position past the end wraps to the start (positions are at most one
    /// length past it).
    #[inline]
    fn wrap(&self, at: usize) -> usize {
        if at >= self.len {
            at - self.len
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

    /// The entries (and directions) indexed where `key` may be, under `key`'s tag: the
    /// candidates a lookup reads.
    pub(super) fn candidates(&self, key: &FlowKey) -> impl Iterator<Item = (u32, Direction)> + '_ {
        let (start, tag) = self.window(key);
        self.positions(start).filter_map(move |at| {
            let v = self.slots[at].load(Ordering::SeqCst);
            if v == 0 || (v >> 32) as u32 != tag {
                return None;
            }
            slot_entry(v)
        })
    }

    /// Every entry indexed where `key` may be, whatever its tuple: the neighbours an
    /// insert may evict to make room.
    pub(super) fn neighbours(&self, key: &FlowKey) -> impl Iterator<Item = u32> + '_ {
        let (start, _) = self.window(key);
        self.positions(start)
            .filter_map(|at| slot_entry(self.slots[at].load(Ordering::Relaxed)).map(|(e, _)| e))
    }

    /// Claims a free slot for `entry`'s `key` (its tuple in direction `dir`) in the key's
    /// window or, marking the window as spilled, in the next ones. Returns the slot's
    /// position, for [`Index::clear`]; `None` when every window it may use is full.
    pub(super) fn claim(&self, key: &FlowKey, entry: u32, dir: Direction) -> Option<usize> {
        let (start, tag) = self.window(key);
        let value = slot_value(tag, entry, dir);
        for w in 0..SPILL {
            let base = start + w * WINDOW;
            for i in 0..WINDOW {
                let at = self.wrap(base + i);
                if self.slots[at]
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

    /// Frees the slot at `at` that [`Index::claim`] returned.
    pub(super) fn clear(&self, at: usize) {
        self.slots[at].store(0, Ordering::SeqCst);
    }

    /// Frees the slot that indexes `entry`'s `key` (its tuple in direction `dir`).
    pub(super) fn release(&self, key: &FlowKey, entry: u32, dir: Direction) {
        let (start, tag) = self.window(key);
        let value = slot_value(tag, entry, dir);
        for at in self.positions(start) {
            if self.slots[at]
                .compare_exchange(value, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
        }
    }

    /// Whether no slot is in use.
    #[cfg(test)]
    pub(super) fn is_clear(&self) -> bool {
        self.slots.iter().all(|s| s.load(Ordering::Relaxed) == 0)
    }
}
