//! The few raw system-call wrappers the AF_XDP code needs: mappings that unmap on drop, and
//! socket options read and written as plain structs.
//!
//! Constants the `libc` crate lacks are defined here and in `bpf.rs`, each citing its uapi
//! header.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// `XDP_PACKET_HEADROOM` (include/uapi/linux/bpf.h): the kernel puts received packets this
/// far into their chunk, so the same headroom is used for frames allocated by user space.
pub const XDP_PACKET_HEADROOM: u64 = 256;

/// A memory mapping, unmapped when dropped.
pub(crate) struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mmap` is plain memory exclusively owned by this value; nothing about it is tied
// to the thread that created it.
unsafe impl Send for Mmap {}

impl Mmap {
    /// A private anonymous read-write mapping of `len` bytes, zeroed and populated (the
    /// tests' rings).
    #[cfg(test)]
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        Mmap::checked(ptr, len)
    }

    /// A shared read-write mapping of `len` bytes of `fd` at offset `offset`, populated: an
    /// AF_XDP ring (at its page offset) or the UMEM's memfd.
    pub fn shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mmap> {
        // SAFETY: mapping a kernel object at a fresh address aliases no Rust memory; the
        // kernel checks `offset` and `len` against the ring and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Mmap::checked(ptr, len)
    }

    fn checked(ptr: *mut libc::c_void, len: usize) -> io::Result<Mmap> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap at 0"))?;
        Ok(Mmap { ptr, len })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and the borrow checker ensures no
        // reference derived from this mapping outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A memfd of `len` zeroed bytes named `name` (close-on-exec).
pub(crate) fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is NUL-terminated and outlives the call; the result is checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a plain call on the descriptor just made; the result is checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The size of the file `fd` in bytes.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: all-zero bytes are a valid `stat`, which fstat overwrites.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable for the whole struct for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// Types for which every bit pattern is a valid value, so the kernel may fill them.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers (and arrays of them) without padding
/// the kernel could leave uninitialised in a way Rust would read.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: integers and libc's uapi structs of integers.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for libc::xdp_mmap_offsets {}
// SAFETY: as above.
unsafe impl Plain for libc::xdp_statistics {}
// SAFETY: as above (the struct has no padding: 2×u64 + 4×u32).
unsafe impl Plain for libc::xdp_umem_reg {}

/// Socket options of the kernel's busy polling (`asm-generic/socket.h`), which the libc
/// crate does not name for Linux.
pub(crate) const SO_BUSY_POLL: libc::c_int = 46;
pub(crate) const SO_INCOMING_NAPI_ID: libc::c_int = 56;
pub(crate) const SO_PREFER_BUSY_POLL: libc::c_int = 69;
pub(crate) const SO_BUSY_POLL_BUDGET: libc::c_int = 70;

/// `setsockopt(fd, level, name, value)`.
pub(crate) fn setsockopt<T: Plain>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a valid `T` for `size_of::<T>()` bytes for the whole call; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt(fd, level, name)` into a zeroed `T`; fails if the kernel returned fewer bytes
/// than `T` (an older layout of the struct).
pub(crate) fn getsockopt<T: Plain>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    // SAFETY: `T: Plain`, so all-zero bytes are a valid `T`.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is writable for `len` bytes and `T: Plain` accepts whatever the kernel
    // writes there.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<T>() {
        return Err(io::Error::other(format!(
            "kernel returned {len} bytes, expected {}: a kernel older than kxdp needs (README.md, \"What a node needs\")?",
            size_of::<T>()
        )));
    }
    Ok(value)
}

/// The errno of `err`, or 0.
pub(crate) fn errno(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}
