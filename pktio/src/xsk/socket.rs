//! One AF_XDP socket bound to an (interface, queue), with its four mapped rings.
//!
//! The first socket of a device registers the UMEM; the others bind with `XDP_SHARED_UMEM`
//! to it, each with fill and completion rings of its own (since Linux 5.10 for sockets on
//! other interfaces or queues; README.md, "What a node needs"). A shared bind may carry no
//! other flag: copy/zero-copy and need-wakeup are inherited from the first socket.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::iface::ifname;
use super::ring::{ConsRing, ProdRing, RingLayout};
use super::sys::{self, Mmap};
use super::umem::Umem;
use super::{XskConfig, XskError, BIND, CREATE_SOCKET, MAP_RINGS, REGISTER_UMEM, SIZE_RINGS};

/// Which UMEM a new socket uses.
pub(crate) enum UmemRole<'a> {
    /// Register this UMEM with the new socket.
    Owner(&'a Umem),
    /// Share the UMEM registered with this (bound) socket.
    SharedWith(RawFd),
}

/// How long a blocking call on a busy-polling socket polls the queue before it sleeps
/// (`SO_BUSY_POLL`, in µs; kxdp's own calls do not block and poll once): what the kernel's
/// AF_XDP example uses.
pub const BUSY_POLL_USECS: u32 = 20;

/// A bound AF_XDP socket and its rings.
pub(crate) struct XskSocket {
    /// Received descriptors (kernel produces).
    pub rx: ConsRing<libc::xdp_desc>,
    /// Descriptors to transmit (we produce).
    pub tx: ProdRing<libc::xdp_desc>,
    /// Chunks lent to the kernel for receiving (we produce).
    pub fill: ProdRing<u64>,
    /// Transmitted chunks given back (kernel produces).
    pub comp: ConsRing<u64>,
    /// Declared last so the rings are unmapped before the socket closes.
    fd: OwnedFd,
}

impl XskSocket {
    /// Creates, sizes, maps and binds a socket on `ifindex`/`queue`.
    pub fn new(
        ifindex: u32,
        queue: u32,
        cfg: &XskConfig,
        umem: UmemRole<'_>,
    ) -> Result<XskSocket, XskError> {
        let target = format!("{} queue {queue}", ifname(ifindex));
        let os = |what, err| XskError::os(what, target.clone(), err);
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(os(CREATE_SOCKET, io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if let UmemRole::Owner(u) = umem {
            u.register(fd.as_fd()).map_err(|e| os(REGISTER_UMEM, e))?;
        }
        for (opt, size) in [
            (libc::XDP_UMEM_FILL_RING, cfg.fill_size),
            (libc::XDP_UMEM_COMPLETION_RING, cfg.comp_size),
            (libc::XDP_RX_RING, cfg.rx_size),
            (libc::XDP_TX_RING, cfg.tx_size),
        ] {
            sys::setsockopt(fd.as_fd(), libc::SOL_XDP, opt, &size)
                .map_err(|e| os(SIZE_RINGS, e))?;
        }
        let sock = XskSocket::map(fd, cfg, &target)?;
        let (flags, shared_fd) = match umem {
            UmemRole::Owner(_) => {
                let mode = if cfg.zero_copy {
                    libc::XDP_ZEROCOPY
                } else {
                    libc::XDP_COPY
                };
                (libc::XDP_USE_NEED_WAKEUP | mode, 0)
            }
            UmemRole::SharedWith(first) => (libc::XDP_SHARED_UMEM, first as u32),
        };
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: shared_fd,
        };
        // SAFETY: `addr` is a valid sockaddr_xdp for the length given, alive for the call.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_xdp).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os(BIND, io::Error::last_os_error()));
        }
        Ok(sock)
    }

    /// Takes over `fd`, a bound AF_XDP socket (a predecessor's) whose rings have the sizes
    /// of `cfg`, on `ifindex`/`queue` (for messages): its rings are mapped again, with the
    /// indexes where the predecessor left them.
    pub fn adopt(
        fd: OwnedFd,
        ifindex: u32,
        queue: u32,
        cfg: &XskConfig,
    ) -> Result<XskSocket, XskError> {
        XskSocket::map(fd, cfg, &format!("{} queue {queue}", ifname(ifindex)))
    }

    /// Maps the four rings of socket `fd`, sized as `cfg` says.
    fn map(fd: OwnedFd, cfg: &XskConfig, target: &str) -> Result<XskSocket, XskError> {
        let os = |what, err| XskError::os(what, target.to_string(), err);
        let off: libc::xdp_mmap_offsets =
            sys::getsockopt(fd.as_fd(), libc::SOL_XDP, libc::XDP_MMAP_OFFSETS)
                .map_err(|e| os(MAP_RINGS, e))?;
        let bad_layout = || {
            os(
                MAP_RINGS,
                io::Error::other("ring layout does not fit its mapping"),
            )
        };
        let map = |o: libc::xdp_ring_offset, entry: usize, size: u32, pgoff: u64| {
            let layout = RingLayout::from(o);
            let len = layout.desc as usize + size as usize * entry;
            Mmap::shared(fd.as_fd(), len, pgoff)
                .map(|m| (m, layout))
                .map_err(|e| os(MAP_RINGS, e))
        };
        let (addr_len, desc_len) = (size_of::<u64>(), size_of::<libc::xdp_desc>());
        let (m, l) = map(
            off.fr,
            addr_len,
            cfg.fill_size,
            libc::XDP_UMEM_PGOFF_FILL_RING,
        )?;
        // SAFETY: the fill ring of this socket, consumed by the kernel; this value is its only
        // user-space producer.
        let fill = unsafe { ProdRing::new(m, l, cfg.fill_size) }.ok_or_else(bad_layout)?;
        let (m, l) = map(
            off.cr,
            addr_len,
            cfg.comp_size,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )?;
        // SAFETY: the completion ring of this socket, produced by the kernel; only consumer.
        let comp = unsafe { ConsRing::new(m, l, cfg.comp_size) }.ok_or_else(bad_layout)?;
        let (m, l) = map(
            off.rx,
            desc_len,
            cfg.rx_size,
            libc::XDP_PGOFF_RX_RING as u64,
        )?;
        // SAFETY: the RX ring of this socket, produced by the kernel; only consumer.
        let rx = unsafe { ConsRing::new(m, l, cfg.rx_size) }.ok_or_else(bad_layout)?;
        let (m, l) = map(
            off.tx,
            desc_len,
            cfg.tx_size,
            libc::XDP_PGOFF_TX_RING as u64,
        )?;
        // SAFETY: the TX ring of this socket, consumed by the kernel; only producer.
        let tx = unsafe { ProdRing::new(m, l, cfg.tx_size) }.ok_or_else(bad_layout)?;

        Ok(XskSocket {
            rx,
            tx,
            fill,
            comp,
            fd,
        })
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Asks the kernel to transmit what is on the TX ring (need-wakeup protocol). Returns the
    /// errno, 0 on success. EAGAIN means the kernel stopped at its per-call budget (or a full
    /// completion ring) with more to send; EBUSY, ENOBUFS and ENETDOWN are transient, as the
    /// kernel's AF_XDP documentation says.
    pub fn kick_tx(&self) -> i32 {
        // SAFETY: a zero-length send with null buffers; the kernel reads nothing from them.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if rc < 0 {
            sys::errno(&io::Error::last_os_error())
        } else {
            0
        }
    }

    /// Wakes the kernel to take buffers from the fill ring and receive (need-wakeup protocol:
    /// a zero-length non-blocking recvfrom).
    pub fn kick_rx(&self) {
        // SAFETY: a zero-length receive into a null buffer; the kernel writes nothing.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Chunks this socket holds outside user space's free stack, `completed` having been
    /// reaped from its completion ring so far: lent on the fill ring, received and not
    /// taken, on the TX ring, transmitted and not yet reaped.
    pub fn held(&mut self, completed: u32) -> u32 {
        let received = self.rx.peek(self.rx.size()).1;
        self.fill.outstanding()
            + received
            + self.tx.outstanding()
            + self.tx.consumed().wrapping_sub(completed)
    }

    /// Turns the kernel's preferred busy polling on, with at most `budget` frames per poll
    /// of the queue (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL` at [`BUSY_POLL_USECS`],
    /// `SO_BUSY_POLL_BUDGET`), or off with `None`. Needs `CAP_NET_ADMIN`.
    pub fn set_busy_poll(&self, budget: Option<u16>) -> io::Result<()> {
        let (prefer, usecs) = match budget {
            Some(_) => (1u32, BUSY_POLL_USECS),
            None => (0, 0),
        };
        let fd = self.fd.as_fd();
        sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_PREFER_BUSY_POLL, &prefer)?;
        sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_BUSY_POLL, &usecs)?;
        if let Some(budget) = budget {
            let budget = u32::from(budget);
            sys::setsockopt(fd, libc::SOL_SOCKET, sys::SO_BUSY_POLL_BUDGET, &budget)?;
        }
        Ok(())
    }

    /// The id of the NAPI instance the kernel busy-polls for this socket
    /// (`SO_INCOMING_NAPI_ID`); 0 when it knows none, and busy polling does nothing.
    pub fn napi_id(&self) -> io::Result<u32> {
        sys::getsockopt(self.fd.as_fd(), libc::SOL_SOCKET, sys::SO_INCOMING_NAPI_ID)
    }

    /// Kernel counters of this socket (XDP_STATISTICS).
    pub fn statistics(&self) -> io::Result<libc::xdp_statistics> {
        sys::getsockopt(self.fd.as_fd(), libc::SOL_XDP, libc::XDP_STATISTICS)
    }
}
