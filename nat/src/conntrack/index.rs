//! The index from a tuple to the entry that holds it: buckets of one cache line, two
//! choices per key.
//!
//! A [`Bucket`] is one 64-byte line of [`BUCKET_SLOTS`] slots; a slot holds
//! `tag(32) | entry+1 (31) | direction (1)`, 0 when free. A key hashes to two buckets (its
//! [`Place`]) and lives in a free slot of the emptier one, claimed by compare-and-swap
//! (the "power of two choices": the fullest bucket of a table at two-thirds load holds
//! far fewer keys than with one choice, so a key whose two buckets are both full is rare).
//! Nothing ever moves: a lookup reads the key's two buckets, at most two lines, and an
//! insert reads the same two. The index knows tuples, entry numbers and directions, not
//! what an entry holds: the table checks each candidate's connection against the key.
//!
//! Slots are claimed with Release and read with Acquire: a reader that sees a slot sees the
//! entry's state and tuples stored before it was claimed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::flow::{Direction, FlowKey};

/// Slots in one bucket: one 64-byte cache line.
pub const BUCKET_SLOTS: usize = 8;
/// Index slots per entry: two keys per entry, the index at most two-thirds full.
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

/// One cache line of slots.
#[repr(align(64))]
struct Bucket([AtomicU64; BUCKET_SLOTS]);

/// Where a key may be indexed: its two buckets and the tag its slots carry. Computed once
/// per key (a bulk lookup computes a burst's places first, then reads their buckets).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Place {
    /// The first choice, then the second.
    pub(super) buckets: [u32; 2],
    tag: u32,
}

impl Place {
    /// The tag: hash bits the bucket choices did not use, also good for picking a stripe
    /// of the free list.
    pub(super) fn tag(&self) -> u32 {
        self.tag
    }
}

/// The index of a table of `capacity` entries.
pub(super) struct Index {
    buckets: Box<[Bucket]>,
    /// Mixed into the index hash.
    seed: u64,
}

impl Index {
    /// An empty index for `capacity` entries, hashing with `seed`.
    pub(super) fn new(capacity: usize, seed: u64) -> Index {
        let len = (capacity * SLOTS_PER_ENTRY).div_ceil(BUCKET_SLOTS).max(2);
        Index {
            buckets: (0..len)
                .map(|_| Bucket(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            seed,
        }
    }

    /// Bytes of memory the index holds.
    pub(super) fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    /// `key`'s two buckets and tag.
    pub(super) fn place(&self, key: &FlowKey) -> Place {
        self.place_hashed(key.flow_hash())
    }

    /// The place of a key whose [`FlowKey::flow_hash`] is `hash`.
    pub(super) fn place_hashed(&self, hash: u64) -> Place {
        let h = hash ^ self.seed;
        let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let h = h ^ (h >> 33);
        let n = self.buckets.len() as u64;
        // Lemire's multiply-shift reduction picks a bucket without a power-of-two count.
        let first = ((h as u32 as u64 * n) >> 32) as u32;
        let g = (h ^ (h >> 29)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        let mut second = (((g >> 32) * n) >> 32) as u32;
        if second == first {
            second = ((first as u64 + 1) % n) as u32;
        }
        Place {
            buckets: [first, second],
            tag: (h >> 32) as u32,
        }
    }

    fn bucket(&self, b: u32) -> &Bucket {
        &self.buckets[b as usize]
    }

    /// Loads one word of each of `place`'s buckets, so that a burst's bucket lines are on
    /// their way from memory together (a plain load, as `_mm_prefetch` is `unsafe` to call
    /// here); returns the words, for the caller to fold into `black_box`.
    #[inline]
    pub(super) fn touch(&self, place: &Place) -> u64 {
        self.bucket(place.buckets[0]).0[0].load(Ordering::Relaxed) ^ self.touch_second(place)
    }

    /// [`Index::touch`] of `place`'s second bucket only: a lookup requests it before it
    /// reads the first, so that the two misses overlap.
    #[inline]
    pub(super) fn touch_second(&self, place: &Place) -> u64 {
        self.bucket(place.buckets[1]).0[0].load(Ordering::Relaxed)
    }

    /// Calls `f` on the entries (and directions) indexed at `place` under its tag, its
    /// first bucket's first, until `f` returns something: the candidates a lookup reads.
    #[inline]
    pub(super) fn find_map<T>(
        &self,
        place: &Place,
        mut f: impl FnMut(u32, Direction) -> Option<T>,
    ) -> Option<T> {
        for b in place.buckets {
            for slot in &self.bucket(b).0 {
                // Acquire pairs with the Release of the claim: the entry's state and tuples
                // stored before the claim are seen.
                let v = slot.load(Ordering::Acquire);
                if (v >> 32) as u32 != place.tag {
                    continue;
                }
                if let Some(t) = slot_entry(v).and_then(|(e, dir)| f(e, dir)) {
                    return Some(t);
                }
            }
        }
        None
    }

    /// Every entry indexed in `place`'s buckets and the `span - 1` buckets after each,
    /// whatever its tuple: the neighbours an insert may evict to make room (`span` 1 when
    /// the key's own buckets are full, more when the table is).
    pub(super) fn neighbours(&self, place: &Place, span: usize) -> impl Iterator<Item = u32> + '_ {
        let n = self.buckets.len();
        place.buckets.into_iter().flat_map(move |b| {
            (0..span.min(n)).flat_map(move |i| {
                self.buckets[(b as usize + i) % n]
                    .0
                    .iter()
                    .filter_map(|slot| slot_entry(slot.load(Ordering::Relaxed)).map(|(e, _)| e))
            })
        })
    }

    /// Claims a free slot for `entry`'s key at `place` (its tuple in direction `dir`) in
    /// the emptier of its two buckets. Returns the slot's position, for [`Index::clear`];
    /// `None` when both buckets are full.
    pub(super) fn claim(&self, place: &Place, entry: u32, dir: Direction) -> Option<usize> {
        let value = slot_value(place.tag, entry, dir);
        loop {
            let free = |b: u32| {
                self.bucket(b)
                    .0
                    .iter()
                    .filter(|s| s.load(Ordering::Relaxed) == 0)
                    .count()
            };
            let [first, second] = place.buckets;
            let (f, s) = (free(first), free(second));
            if f == 0 && s == 0 {
                return None;
            }
            let b = if s > f { second } else { first };
            for (i, slot) in self.bucket(b).0.iter().enumerate() {
                // Release: publishes the entry's state and tuples to readers of the slot.
                if slot
                    .compare_exchange(0, value, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(b as usize * BUCKET_SLOTS + i);
                }
            }
            // Another insert took the slots we saw free: count again.
        }
    }

    /// Frees the slot at `at` that [`Index::claim`] returned.
    pub(super) fn clear(&self, at: usize) {
        self.buckets[at / BUCKET_SLOTS].0[at % BUCKET_SLOTS].store(0, Ordering::Release);
    }

    /// Frees the slot that indexes `entry`'s key at `place` (its tuple in direction `dir`).
    pub(super) fn release(&self, place: &Place, entry: u32, dir: Direction) {
        let value = slot_value(place.tag, entry, dir);
        for b in place.buckets {
            for slot in &self.bucket(b).0 {
                if slot
                    .compare_exchange(value, 0, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
    }

    /// Whether no slot is in use.
    #[cfg(test)]
    pub(super) fn is_clear(&self) -> bool {
        self.buckets
            .iter()
            .all(|b| b.0.iter().all(|s| s.load(Ordering::Relaxed) == 0))
    }
}
