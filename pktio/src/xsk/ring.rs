//! Producer and consumer views over the four single-producer single-consumer rings AF_XDP
//! shares with the kernel: fill and TX (user space produces), RX and completion (the kernel
//! produces).
//!
//! The protocol is the kernel's (net/xdp/xsk_queue.h), quoted here because every index
//! load/store below names the step it is:
//!
//! ```text
//! producer                         consumer
//! if (LOAD ->consumer) {  (A)      LOAD.acq ->producer  (C)
//!    STORE $data                   LOAD $data
//!    STORE.rel ->producer (B)      STORE.rel ->consumer (D)
//! }
//! (A) pairs with (D), and (B) pairs with (C).
//! ```
//!
//! Indexes are free-running `u32`s that wrap; the slot of index `i` is `i & mask`. Each side
//! keeps cached copies of both indexes (as libxdp does) so the shared cache lines are touched
//! only when the cached view runs out.

use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::sys::Mmap;

/// Where the parts of one ring lie inside its mapping (`struct xdp_ring_offset`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingLayout {
    /// Offset of the producer index.
    pub producer: u64,
    /// Offset of the consumer index.
    pub consumer: u64,
    /// Offset of the flags word (`XDP_RING_NEED_WAKEUP`).
    pub flags: u64,
    /// Offset of the first descriptor.
    pub desc: u64,
}

impl From<libc::xdp_ring_offset> for RingLayout {
    fn from(o: libc::xdp_ring_offset) -> RingLayout {
        RingLayout {
            producer: o.producer,
            consumer: o.consumer,
            flags: o.flags,
            desc: o.desc,
        }
    }
}

/// The shared parts of one mapped ring.
struct Shared<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
    size: u32,
    _map: Mmap,
    _descs: PhantomData<T>,
}

// SAFETY: the pointers point into `_map`, which this value owns and which moves with it; the
// ring has one user-space side, held by whoever holds this value.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// Views `map` as a ring of `size` entries laid out as `layout` says. `None` when the
    /// layout does not fit the mapping or is misaligned, or `size` is not a power of two.
    ///
    /// # Safety
    /// `map` must be a ring mapping whose other side (the kernel, or a test) follows the
    /// protocol in the module comment, and nothing else may produce or consume on this side.
    unsafe fn new(map: Mmap, layout: RingLayout, size: u32) -> Option<Shared<T>> {
        let fits = |off: u64, len: usize, align: usize| {
            (off as usize) & (align - 1) == 0
                && (off as usize)
                    .checked_add(len)
                    .is_some_and(|end| end <= map.len())
        };
        let word = size_of::<AtomicU32>();
        if !size.is_power_of_two()
            || (map.as_ptr() as usize) & (align_of::<T>().max(word) - 1) != 0
            || !fits(layout.producer, word, word)
            || !fits(layout.consumer, word, word)
            || !fits(layout.flags, word, word)
            || !fits(layout.desc, size as usize * size_of::<T>(), align_of::<T>())
        {
            return None;
        }
        let at = |off: u64| {
            // SAFETY: `off` was checked to lie inside the mapping above.
            NonNull::new(unsafe { map.as_ptr().add(off as usize) })
        };
        Some(Shared {
            producer: at(layout.producer)?.cast(),
            consumer: at(layout.consumer)?.cast(),
            flags: at(layout.flags)?.cast(),
            descs: at(layout.desc)?.cast(),
            mask: size - 1,
            size,
            _map: map,
            _descs: PhantomData,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: in bounds and aligned (checked in `new`), alive as long as `_map`; the
        // kernel accesses it atomically too.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        let flags = unsafe { self.flags.as_ref() };
        // Relaxed: the flag carries no data, only a hint to make a syscall. A stale read costs
        // at most one poll-loop pass, since every flush/recv looks again.
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    fn read(&self, idx: u32) -> T {
        // SAFETY: `idx & mask < size`, so the slot is inside the descriptor array checked in
        // `new`; the caller obtained `idx` from `peek`, after the Acquire (C) that makes the
        // producer's write of this slot visible.
        unsafe { self.descs.as_ptr().add((idx & self.mask) as usize).read() }
    }

    fn write(&self, idx: u32, value: T) {
        // SAFETY: in bounds as in `read`; the caller obtained `idx` from `reserve`, after the
        // load (A) that showed the consumer is done with this slot.
        unsafe {
            self.descs
                .as_ptr()
                .add((idx & self.mask) as usize)
                .write(value)
        }
    }
}

/// User space's side of a ring it produces into: fill (addresses) or TX (descriptors).
pub(crate) struct ProdRing<T> {
    ring: Shared<T>,
    /// Next index to produce; everything before it has been reserved.
    cached_prod: u32,
    /// Consumer index plus `size`, as last read: slots before it are free to write.
    cached_cons: u32,
}

impl<T: Copy> ProdRing<T> {
    /// A producer over a mapped ring.
    ///
    /// # Safety
    /// As for the ring's `Shared::new`: `map` is a ring the other side consumes by the
    /// protocol, and this is the only producer.
    pub unsafe fn new(map: Mmap, layout: RingLayout, size: u32) -> Option<ProdRing<T>> {
        // SAFETY: forwarded from the caller.
        let ring = unsafe { Shared::new(map, layout, size)? };
        // Relaxed: we are the only writer of `producer`; Acquire on `consumer` pairs with the
        // other side's Release (D) so the free slots we count really are free.
        let cached_prod = ring.producer().load(Ordering::Relaxed);
        let cached_cons = ring.consumer().load(Ordering::Acquire).wrapping_add(size);
        Some(ProdRing {
            ring,
            cached_prod,
            cached_cons,
        })
    }

    /// Free slots, refreshing the consumer index only if fewer than `want` are known.
    fn free(&mut self, want: u32) -> u32 {
        let free = self.cached_cons.wrapping_sub(self.cached_prod);
        if free >= want {
            return free;
        }
        // (A): Acquire pairs with the consumer's Release store (D), so once we see slots
        // released the consumer has finished reading them and we may overwrite them.
        self.cached_cons = self
            .ring
            .consumer()
            .load(Ordering::Acquire)
            .wrapping_add(self.ring.size);
        self.cached_cons.wrapping_sub(self.cached_prod)
    }

    /// Reserves exactly `n` slots, or none: returns the first index to [`ProdRing::write`].
    pub fn reserve(&mut self, n: u32) -> Option<u32> {
        if self.free(n) < n {
            return None;
        }
        let first = self.cached_prod;
        self.cached_prod = self.cached_prod.wrapping_add(n);
        Some(first)
    }

    /// Writes the entry at reserved index `idx`.
    pub fn write(&mut self, idx: u32, value: T) {
        self.ring.write(idx, value);
    }

    /// Publishes every reserved entry to the consumer.
    pub fn submit(&mut self) {
        // (B): Release pairs with the consumer's Acquire load of `producer` (C), making the
        // entries written before it visible first.
        self.ring
            .producer()
            .store(self.cached_prod, Ordering::Release);
    }

    /// Entries produced that the consumer has not yet consumed.
    pub fn outstanding(&mut self) -> u32 {
        // (A) again: Acquire pairs with the consumer's Release (D); refreshes the cache too.
        let cons = self.ring.consumer().load(Ordering::Acquire);
        self.cached_cons = cons.wrapping_add(self.ring.size);
        self.cached_prod.wrapping_sub(cons)
    }

    /// Whether the kernel asked to be woken (XDP_RING_NEED_WAKEUP).
    pub fn needs_wakeup(&self) -> bool {
        self.ring.needs_wakeup()
    }

    /// Takes back every submitted entry the consumer has not consumed, calling `take` with
    /// each: for a socket being closed, whose consumer no longer consumes (its interface no
    /// longer redirects to it), so these entries are still ours. Afterwards the ring holds
    /// nothing of ours: the producer index is left as it was (the ring is about to go).
    pub fn take_back(&mut self, mut take: impl FnMut(T)) -> u32 {
        // (A): Acquire pairs with the consumer's Release (D); entries from `cons` on were
        // written by us and not yet read by it.
        let cons = self.ring.consumer().load(Ordering::Acquire);
        let n = self.cached_prod.wrapping_sub(cons);
        for i in 0..n {
            take(self.ring.read(cons.wrapping_add(i)));
        }
        n
    }

    /// Entries consumed since the ring was made: the consumer index.
    pub fn consumed(&self) -> u32 {
        // Acquire as in (A).
        self.ring.consumer().load(Ordering::Acquire)
    }
}

/// User space's side of a ring it consumes: RX (descriptors) or completion (addresses).
pub(crate) struct ConsRing<T> {
    ring: Shared<T>,
    /// Producer index as last read: entries before it are ready.
    cached_prod: u32,
    /// Next index to consume; everything before it has been peeked.
    cached_cons: u32,
}

impl<T: Copy> ConsRing<T> {
    /// A consumer over a mapped ring.
    ///
    /// # Safety
    /// As for the ring's `Shared::new`: `map` is a ring the other side produces into by the
    /// protocol, and this is the only consumer.
    pub unsafe fn new(map: Mmap, layout: RingLayout, size: u32) -> Option<ConsRing<T>> {
        // SAFETY: forwarded from the caller.
        let ring = unsafe { Shared::new(map, layout, size)? };
        // (C): Acquire pairs with the producer's Release (B). Relaxed for `consumer`: we are
        // its only writer.
        let cached_prod = ring.producer().load(Ordering::Acquire);
        let cached_cons = ring.consumer().load(Ordering::Relaxed);
        Some(ConsRing {
            ring,
            cached_prod,
            cached_cons,
        })
    }

    /// Number of entries of the ring.
    pub fn size(&self) -> u32 {
        self.ring.size
    }

    /// Takes up to `max` ready entries: returns the first index to [`ConsRing::read`] and how
    /// many there are. Call [`ConsRing::release`] once they have been read.
    pub fn peek(&mut self, max: u32) -> (u32, u32) {
        let mut ready = self.cached_prod.wrapping_sub(self.cached_cons);
        if ready == 0 {
            // (C): Acquire pairs with the producer's Release store (B), so the entries before
            // the new producer index are visible before we read them.
            self.cached_prod = self.ring.producer().load(Ordering::Acquire);
            ready = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        let n = ready.min(max);
        let first = self.cached_cons;
        self.cached_cons = self.cached_cons.wrapping_add(n);
        (first, n)
    }

    /// The entry at peeked index `idx`.
    pub fn read(&self, idx: u32) -> T {
        self.ring.read(idx)
    }

    /// Gives every peeked slot back to the producer.
    pub fn release(&mut self) {
        // (D): Release pairs with the producer's load of `consumer` (A): our reads of the
        // slots happen before the producer may overwrite them.
        self.ring
            .consumer()
            .store(self.cached_cons, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    //! The test plays the kernel's side through the same mapping, one index at a time.

    use super::*;

    const LAYOUT: RingLayout = RingLayout {
        producer: 0,
        consumer: 64,
        flags: 128,
        desc: 192,
    };

    fn mapping<T>(size: u32, prod: u32, cons: u32) -> Mmap {
        let map = Mmap::anonymous(LAYOUT.desc as usize + size as usize * size_of::<T>()).unwrap();
        // SAFETY: fresh private mapping, offsets in bounds and 4-aligned.
        unsafe {
            map.as_ptr()
                .add(LAYOUT.producer as usize)
                .cast::<u32>()
                .write(prod);
            map.as_ptr()
                .add(LAYOUT.consumer as usize)
                .cast::<u32>()
                .write(cons);
        }
        map
    }

    /// The kernel side's view of a ring: raw pointers into the same mapping.
    struct Peer {
        base: *mut u8,
    }

    impl Peer {
        fn word(&self, off: u64) -> &AtomicU32 {
            // SAFETY: offsets of LAYOUT are inside the mapping, which outlives the test body.
            unsafe { &*self.base.add(off as usize).cast::<AtomicU32>() }
        }
        fn prod(&self) -> u32 {
            self.word(LAYOUT.producer).load(Ordering::Acquire)
        }
        fn cons(&self) -> u32 {
            self.word(LAYOUT.consumer).load(Ordering::Acquire)
        }
        fn set_prod(&self, v: u32) {
            self.word(LAYOUT.producer).store(v, Ordering::Release)
        }
        fn set_cons(&self, v: u32) {
            self.word(LAYOUT.consumer).store(v, Ordering::Release)
        }
        fn slot(&self, idx: u32, mask: u32) -> *mut u64 {
            // SAFETY: `idx & mask` indexes the descriptor array of the mapping.
            unsafe {
                self.base
                    .add(LAYOUT.desc as usize)
                    .cast::<u64>()
                    .add((idx & mask) as usize)
            }
        }
    }

    #[test]
    fn producer_wraps_around_u32_and_respects_the_consumer() {
        let start = u32::MAX - 2;
        let map = mapping::<u64>(4, start, start);
        let peer = Peer { base: map.as_ptr() };
        // SAFETY: the test is the only other side of this mapping.
        let mut ring = unsafe { ProdRing::<u64>::new(map, LAYOUT, 4).unwrap() };
        let first = ring.reserve(3).unwrap();
        assert_eq!(first, start);
        for i in 0..3 {
            ring.write(first.wrapping_add(i), 100 + u64::from(i));
        }
        assert_eq!(ring.reserve(2), None, "only one slot left: all-or-nothing");
        let last = ring.reserve(1).unwrap();
        assert_eq!(last, start.wrapping_add(3), "index wrapped past u32::MAX");
        ring.write(last, 103);
        assert_eq!(ring.reserve(1), None, "ring full");
        ring.submit();
        assert_eq!(peer.prod(), start.wrapping_add(4));
        assert_eq!(ring.outstanding(), 4);
        for i in 0..4u32 {
            // SAFETY: slot inside the mapping, published by `submit`.
            let v = unsafe { peer.slot(start.wrapping_add(i), 3).read() };
            assert_eq!(v, 100 + u64::from(i));
        }
        // The kernel consumes two; two slots free up.
        peer.set_cons(start.wrapping_add(2));
        assert_eq!(ring.reserve(3), None);
        assert_eq!(ring.reserve(2), Some(start.wrapping_add(4)));
        assert_eq!(ring.outstanding(), 4);
    }

    #[test]
    fn consumer_wraps_around_u32_and_releases_what_it_peeked() {
        let start = u32::MAX - 1;
        let map = mapping::<u64>(8, start, start);
        let peer = Peer { base: map.as_ptr() };
        // SAFETY: the test is the only other side of this mapping.
        let mut ring = unsafe { ConsRing::<u64>::new(map, LAYOUT, 8).unwrap() };
        assert_eq!(ring.peek(8), (start, 0));
        for i in 0..5u32 {
            // SAFETY: slot inside the mapping, not yet published.
            unsafe { peer.slot(start.wrapping_add(i), 7).write(u64::from(i) * 10) };
        }
        peer.set_prod(start.wrapping_add(5));
        let (first, n) = ring.peek(3);
        assert_eq!((first, n), (start, 3));
        let got: Vec<u64> = (0..n).map(|i| ring.read(first.wrapping_add(i))).collect();
        assert_eq!(got, [0, 10, 20]);
        assert_eq!(peer.cons(), start, "nothing released before release()");
        ring.release();
        assert_eq!(peer.cons(), start.wrapping_add(3));
        let (first, n) = ring.peek(8);
        assert_eq!((first, n), (start.wrapping_add(3), 2));
        assert_eq!(ring.read(first.wrapping_add(1)), 40);
        ring.release();
        assert_eq!(peer.cons(), start.wrapping_add(5));
        assert_eq!(ring.peek(8).1, 0);
    }

    #[test]
    fn need_wakeup_flag_is_read_from_the_flags_word() {
        let map = mapping::<u64>(2, 0, 0);
        let peer = Peer { base: map.as_ptr() };
        // SAFETY: the test is the only other side of this mapping.
        let ring = unsafe { ProdRing::<u64>::new(map, LAYOUT, 2).unwrap() };
        assert!(!ring.needs_wakeup());
        peer.word(LAYOUT.flags)
            .store(libc::XDP_RING_NEED_WAKEUP, Ordering::Relaxed);
        assert!(ring.needs_wakeup());
    }

    #[test]
    fn bad_layouts_are_refused() {
        let map = mapping::<u64>(4, 0, 0);
        // SAFETY: nothing else uses the mapping.
        let refused = unsafe { ProdRing::<u64>::new(map, LAYOUT, 3) }.is_none();
        assert!(refused, "not a power of two");
        let map = mapping::<u64>(4, 0, 0);
        // SAFETY: as above.
        let refused = unsafe { ProdRing::<u64>::new(map, LAYOUT, 1 << 20) }.is_none();
        assert!(refused, "too big");
        let map = mapping::<u64>(4, 0, 0);
        let odd = RingLayout {
            consumer: 66,
            ..LAYOUT
        };
        // SAFETY: as above.
        let refused = unsafe { ConsRing::<u64>::new(map, odd, 4) }.is_none();
        assert!(refused, "misaligned");
    }
}
