//! The UMEM: one worker's packet memory, a memfd mapped shared and cut into equal
//! power-of-two chunks, registered with the kernel through the first socket and shared by
//! the others. A memfd rather than anonymous memory so that a successor process handed the
//! descriptor (`super::handover`) maps the same frames the kernel holds.
//!
//! Addresses are byte offsets into the UMEM. A packet's address may lie anywhere inside its
//! chunk (the kernel puts received packets `XDP_PACKET_HEADROOM` in); its chunk is
//! `addr & !(frame_size - 1)`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::sys::{self, Mmap};

/// The mapped packet memory of one worker.
pub(crate) struct Umem {
    map: Mmap,
    /// The memory's descriptor, for a successor ([`Umem::fd`]).
    fd: OwnedFd,
    frame_size: u32,
}

impl Umem {
    /// Maps `frame_count` chunks of `frame_size` bytes (a power of two, checked by the caller).
    pub fn new(frame_count: u32, frame_size: u32) -> io::Result<Umem> {
        let len = frame_count as usize * frame_size as usize;
        let fd = sys::memfd("kxdp-umem", len)?;
        Umem::adopt(fd, frame_count, frame_size)
    }

    /// Maps the UMEM of `frame_count` chunks of `frame_size` bytes held by memfd `fd` (a
    /// predecessor's); fails unless the memory has exactly that size.
    pub fn adopt(fd: OwnedFd, frame_count: u32, frame_size: u32) -> io::Result<Umem> {
        let len = frame_count as usize * frame_size as usize;
        let size = sys::file_size(fd.as_fd())?;
        if size != len as u64 {
            return Err(io::Error::other(format!(
                "the handed UMEM has {size} bytes, {frame_count} chunks of {frame_size} need {len}"
            )));
        }
        Ok(Umem {
            map: Mmap::shared(fd.as_fd(), len, 0)?,
            fd,
            frame_size,
        })
    }

    /// The memory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Registers the UMEM with the AF_XDP socket `fd` (XDP_UMEM_REG): aligned chunks, no
    /// extra headroom (the kernel adds `XDP_PACKET_HEADROOM` on receive anyway).
    pub fn register(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let reg = libc::xdp_umem_reg {
            addr: self.map.as_ptr() as u64,
            len: self.map.len() as u64,
            chunk_size: self.frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        sys::setsockopt(fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)
    }

    /// Size of one chunk.
    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// Number of chunks.
    pub fn frames(&self) -> u32 {
        (self.map.len() / self.frame_size as usize) as u32
    }

    /// Asks the processor for the lines that hold `bytes` bytes from `addr` (the first and
    /// the last), without waiting for them: on AF_XDP in copy mode the kernel wrote a
    /// received packet on the core that received it. Ranges beyond the UMEM are ignored.
    pub fn prefetch(&self, addr: u64, bytes: usize) {
        let first = addr as usize;
        let last = first.saturating_add(bytes.saturating_sub(1));
        if last >= self.map.len() {
            return;
        }
        for at in [first, last] {
            prefetch_line(self.map.as_ptr().wrapping_add(at));
        }
    }

    /// The chunk that holds `addr`.
    pub fn chunk_base(&self, addr: u64) -> u64 {
        addr & !(u64::from(self.frame_size) - 1)
    }

    /// The chunk holding `addr` and `addr`'s offset inside it. An address beyond the UMEM
    /// (a bug: addresses come from this device or the kernel) is clamped to the last chunk
    /// rather than panicking on the hot path.
    pub fn chunk_mut(&mut self, addr: u64) -> (&mut [u8], usize) {
        let size = self.frame_size as usize;
        debug_assert!(
            addr < self.map.len() as u64,
            "frame address {addr} outside the UMEM"
        );
        let base = (self.chunk_base(addr) as usize).min(self.map.len() - size);
        let off = (addr as usize).saturating_sub(base).min(size);
        // SAFETY: `base + size <= len`, so the slice is inside the mapping. The caller holds the
        // frame, so the chunk is in user space's hands (not in a fill or TX ring) and the kernel
        // does not touch it; `&mut self` keeps a second slice of it from coexisting.
        let chunk = unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(base), size) };
        (chunk, off)
    }
}

/// The chunks currently in user space's hands and unused: a stack of chunk addresses,
/// allocated once for the whole UMEM so pushing never allocates.
pub(crate) struct FreeFrames {
    stack: Vec<u64>,
    /// Number of chunks of the UMEM: the stack never holds more.
    limit: usize,
}

impl FreeFrames {
    /// Every chunk of a UMEM of `frame_count` chunks of `frame_size` bytes, lowest first out.
    pub fn all(frame_count: u32, frame_size: u32) -> FreeFrames {
        let mut stack = Vec::with_capacity(frame_count as usize);
        stack.extend(
            (0..u64::from(frame_count))
                .rev()
                .map(|i| i * u64::from(frame_size)),
        );
        FreeFrames {
            stack,
            limit: frame_count as usize,
        }
    }

    /// Takes a chunk.
    pub fn pop(&mut self) -> Option<u64> {
        self.stack.pop()
    }

    /// Returns chunk `base`. Returns `false` (and drops it) if the stack is already full, which
    /// only a double free can cause.
    pub fn push(&mut self, base: u64) -> bool {
        if self.stack.len() >= self.limit {
            debug_assert!(
                self.stack.len() < self.limit,
                "free stack overflow: frame {base} freed twice?"
            );
            return false;
        }
        self.stack.push(base);
        true
    }

    /// Number of free chunks.
    pub fn len(&self) -> usize {
        self.stack.len()
    }

    /// The free chunks, last out first.
    pub fn chunks(&self) -> &[u64] {
        &self.stack
    }

    /// The chunks `list` names (a predecessor's free stack, last out first) of a UMEM of
    /// `frame_count` chunks of `frame_size` bytes; `None` if one is not a chunk's start
    /// inside it, or is named twice.
    pub fn from_list(list: &[u64], frame_count: u32, frame_size: u32) -> Option<FreeFrames> {
        let size = u64::from(frame_size);
        let mut seen = vec![false; frame_count as usize];
        for &base in list {
            let slot = seen.get_mut(usize::try_from(base / size).ok()?)?;
            if base % size != 0 || *slot {
                return None;
            }
            *slot = true;
        }
        Some(FreeFrames {
            stack: {
                let mut stack = Vec::with_capacity(frame_count as usize);
                stack.extend_from_slice(list);
                stack
            },
            limit: frame_count as usize,
        })
    }
}

/// Requests the cache line holding `p` (a prefetch: the processor does not wait for it,
/// unlike a load, which holds up everything after it until it arrives).
#[inline]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults whatever the address, and it reads
    // nothing into the program nor writes anything.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_of_an_address_inside_a_frame() {
        let mut umem = Umem::new(4, 4096).unwrap();
        assert_eq!(umem.chunk_base(2 * 4096 + 256), 2 * 4096);
        let (chunk, off) = umem.chunk_mut(3 * 4096 + 300);
        assert_eq!((chunk.len(), off), (4096, 300));
        chunk[off] = 7;
        assert_eq!(umem.chunk_mut(3 * 4096).0[300], 7);
    }

    #[test]
    fn prefetch_takes_any_range_and_changes_nothing() {
        let mut umem = Umem::new(2, 4096).unwrap();
        umem.chunk_mut(256).0[256..330].fill(9);
        // Inside, straddling the end, beyond it, at the end of the address space, empty.
        for (addr, bytes) in [(256, 74), (8190, 74), (8192, 1), (u64::MAX, 74), (0, 0)] {
            umem.prefetch(addr, bytes);
        }
        assert!(umem.chunk_mut(0).0[256..330].iter().all(|b| *b == 9));
    }

    #[test]
    fn a_handed_umem_shows_the_same_bytes_and_a_free_list_is_checked() {
        let mut umem = Umem::new(2, 4096).unwrap();
        umem.chunk_mut(4096 + 256).0[256] = 42;
        let fd = umem.fd().try_clone_to_owned().unwrap();
        let mut again = Umem::adopt(fd, 2, 4096).unwrap();
        assert_eq!(again.chunk_mut(4096 + 256).0[256], 42);
        let fd = umem.fd().try_clone_to_owned().unwrap();
        let err = Umem::adopt(fd, 3, 4096).err().unwrap().to_string();
        assert!(err.contains("8192 bytes"), "{err}");

        let free = FreeFrames::from_list(&[4096, 0], 2, 4096).unwrap();
        assert_eq!(free.chunks(), &[4096, 0]);
        for bad in [&[0, 0][..], &[8192], &[100]] {
            assert!(FreeFrames::from_list(bad, 2, 4096).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn free_stack_gives_low_chunks_first_and_never_grows() {
        let mut free = FreeFrames::all(3, 2048);
        assert_eq!(free.pop(), Some(0));
        assert_eq!(free.pop(), Some(2048));
        assert!(free.push(2048));
        assert!(free.push(0));
        assert_eq!(free.len(), 3);
    }
}
