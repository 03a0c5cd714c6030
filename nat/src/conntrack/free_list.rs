//! The entries not in use: lock-free stacks (Treiber's) of entry numbers with ABA tags, one
//! per stripe of entries, each head on a cache line of its own.
//!
//! Entry `e` belongs to stripe `e % STRIPES` and only ever goes back to it. An insert
//! takes from the stripe its flow hashes to and looks on through the others only when that
//! one is empty, so two workers inserting at once rarely touch the same head (one head for
//! the whole table made every insert and removal of every worker pass one cache line
//! around: `mix_2threads` in `nat/benches/conntrack.rs`). DPDK's `rte_hash` keeps a cache
//! of free slots per core for the same reason; a stripe per flow needs no core number.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

/// Stripes of the free list: two workers' inserts meet on one head once in this many.
pub(super) const STRIPES: usize = 16;

/// One stripe's stack head and count, alone on its cache line.
#[repr(align(64))]
struct Stripe {
    /// `tag << 32 | (entry + 1)`, 0 when empty.
    head: AtomicU64,
    /// Entries taken from this stripe less those given back to it.
    taken: AtomicI64,
}

/// The free entries of a table, and how many are taken.
pub(super) struct FreeList {
    stripes: [Stripe; STRIPES],
    /// Per entry, the one below it on its stripe's stack (`entry + 1`, 0 at the bottom).
    next: Box<[AtomicU32]>,
}

impl FreeList {
    /// Every one of `capacity` entries free, each stripe's lowest entry on top (so a fresh
    /// table fills from the front).
    pub(super) fn new(capacity: usize) -> FreeList {
        let list = FreeList {
            stripes: std::array::from_fn(|_| Stripe {
                head: AtomicU64::new(0),
                taken: AtomicI64::new(0),
            }),
            next: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
        };
        for e in (0..capacity as u32).rev() {
            list.link(e);
        }
        list
    }

    /// Entries taken and not given back.
    pub(super) fn taken(&self) -> usize {
        let sum: i64 = self
            .stripes
            .iter()
            .map(|s| s.taken.load(Ordering::Relaxed))
            .sum();
        sum.max(0) as usize
    }

    /// Bytes of memory the list holds.
    pub(super) fn memory_bytes(&self) -> usize {
        self.next.len() * 4 + std::mem::size_of_val(&self.stripes)
    }

    /// Takes a free entry, if any is left: from stripe `hint % STRIPES` (a flow hash),
    /// else from the next stripe that has one.
    pub(super) fn pop(&self, hint: usize) -> Option<u32> {
        (0..STRIPES).find_map(|i| self.pop_from(&self.stripes[(hint + i) % STRIPES]))
    }

    fn pop_from(&self, stripe: &Stripe) -> Option<u32> {
        // Acquire pairs with the Release of the CAS in `link`, so `next` of the head we
        // read is the value its pusher wrote.
        let mut head = stripe.head.load(Ordering::Acquire);
        loop {
            let e = (head & 0xffff_ffff) as u32;
            if e == 0 {
                return None;
            }
            let next = self.next[(e - 1) as usize].load(Ordering::Relaxed);
            // The tag in the high half changes on every pop, so a head that was popped and
            // pushed back meanwhile (ABA) fails this exchange.
            let new = ((head >> 32).wrapping_add(1) << 32) | next as u64;
            match stripe
                .head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    stripe.taken.fetch_add(1, Ordering::Relaxed);
                    return Some(e - 1);
                }
                Err(h) => head = h,
            }
        }
    }

    /// The entry `depth` places below the top of stripe `hint % STRIPES` (the one the
    /// `depth + 1`-th pop from that stripe would take if nothing else happened meanwhile),
    /// read without taking anything: a guess for prefetching, which a racing pop or push
    /// only makes wrong. `None` past the bottom.
    pub(super) fn peek(&self, hint: usize, depth: usize) -> Option<u32> {
        let head = self.stripes[hint % STRIPES].head.load(Ordering::Relaxed);
        let mut e = (head & 0xffff_ffff) as u32;
        for _ in 0..depth {
            e = self
                .next
                .get(e.checked_sub(1)? as usize)?
                .load(Ordering::Relaxed);
        }
        e.checked_sub(1)
    }

    /// Gives back an entry [`FreeList::pop`] took, once nothing refers to it any more.
    pub(super) fn push(&self, entry: u32) {
        self.stripes[entry as usize % STRIPES]
            .taken
            .fetch_sub(1, Ordering::Relaxed);
        self.link(entry);
    }

    fn link(&self, entry: u32) {
        let stripe = &self.stripes[entry as usize % STRIPES];
        let mut head = stripe.head.load(Ordering::Acquire);
        loop {
            self.next[entry as usize].store((head & 0xffff_ffff) as u32, Ordering::Relaxed);
            let new = (head & !0xffff_ffff) | (entry as u64 + 1);
            // Release: publishes `next[entry]` to the popper's Acquire.
            match stripe
                .head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }
}
