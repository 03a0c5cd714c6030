//! The entries not in use: a lock-free stack (Treiber's) of entry numbers, with an ABA tag.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The free entries of a table, and how many are taken.
pub(super) struct FreeList {
    /// `tag << 32 | (entry + 1)`, 0 when empty.
    head: AtomicU64,
    /// Per entry, the one below it on the stack (`entry + 1`, 0 at the bottom).
    next: Box<[AtomicU32]>,
    /// Entries taken and not given back.
    taken: AtomicUsize,
}

impl FreeList {
    /// Every one of `capacity` entries free, entry 0 on top (so a fresh table fills from
    /// the front).
    pub(super) fn new(capacity: usize) -> FreeList {
        let list = FreeList {
            head: AtomicU64::new(0),
            next: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            taken: AtomicUsize::new(0),
        };
        for e in (0..capacity as u32).rev() {
            list.link(e);
        }
        list
    }

    /// Entries taken and not given back.
    pub(super) fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    /// Bytes of memory the list holds.
    pub(super) fn memory_bytes(&self) -> usize {
        self.next.len() * 4
    }

    /// Takes a free entry, if any is left.
    pub(super) fn pop(&self) -> Option<u32> {
        // Acquire pairs with the Release of the CAS in `link`, so `next` of the head we
        // read is the value its pusher wrote.
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let e = (head & 0xffff_ffff) as u32;
            if e == 0 {
                return None;
            }
            let next = self.next[(e - 1) as usize].load(Ordering::Relaxed);
            // The tag in the high half changes on every pop, so a head that was popped and
            // pushed back meanwhile (ABA) fails this exchange.
            let new = ((head >> 32).wrapping_add(1) << 32) | next as u64;
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    return Some(e - 1);
                }
                Err(h) => head = h,
            }
        }
    }

    /// Gives back an entry [`FreeList::pop`] took, once nothing refers to it any more.
    pub(super) fn push(&self, entry: u32) {
        self.taken.fetch_sub(1, Ordering::Relaxed);
        self.link(entry);
    }

    fn link(&self, entry: u32) {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            self.next[entry as usize].store((head & 0xffff_ffff) as u32, Ordering::Relaxed);
            let new = (head & !0xffff_ffff) | (entry as u64 + 1);
            // Release: publishes `next[entry]` to the popper's Acquire.
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }
}
