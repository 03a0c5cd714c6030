//! A raw `AF_PACKET` socket on one interface, for tests that need to see or inject whole
//! Ethernet frames the way a wire would: what a kernel device (a VXLAN device, a bridge)
//! puts on a link, and frames built by hand that the kernel must accept.
//!
//! Not a data path: one `recvfrom`/`send` per frame, a `poll` per receive. The socket
//! belongs to the network namespace of the thread that opens it (see
//! [`crate::netns::enter_thread`]).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `sll_pkttype` of a frame this host sent (include/uapi/linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

/// A raw packet socket bound to one interface. Receives every frame the interface
/// receives (its own transmissions are skipped) and sends frames as they are given,
/// Ethernet header included. Closed on drop.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl RawSocket {
    /// Opens a socket on interface `ifname` of the calling thread's namespace. Needs
    /// `CAP_NET_RAW`.
    pub fn bind(ifname: &str) -> io::Result<RawSocket> {
        let name = CString::new(ifname).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {ifname:?} contains NUL"),
            )
        })?;
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("no interface {ifname} in this namespace: {e}"),
            ));
        }
        // Protocol 0 at creation: the socket receives nothing until it is bound, so no
        // frame from another interface slips in between socket() and bind().
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("open AF_PACKET socket (needs CAP_NET_RAW): {e}"),
            ));
        }
        // SAFETY: `raw` is a descriptor socket() just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value of it.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll that lives across the call, and the length passed
        // is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("bind AF_PACKET socket to {ifname}: {e}"),
            ));
        }
        Ok(RawSocket { fd, ifindex })
    }

    /// Waits up to `timeout` for a frame received on the interface and copies it into
    /// `buf` (a longer frame is cut to `buf.len()`); `Ok(None)` when none came in time.
    /// Frames the host itself sent on the interface are skipped.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd that lives across the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value of it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for `buf.len()` bytes and `from`/`from_len` describe
            // a sockaddr_ll of the given size; all outlive the call. MSG_DONTWAIT: poll said
            // readable, but never block if another reader took the frame.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == PACKET_OUTGOING {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                continue;
            }
            return Ok(Some(n as usize));
        }
    }

    /// Sends `frame` (Ethernet header first) on the interface as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value of it.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        if let Some(dst) = frame.get(0..6) {
            to.sll_addr[..6].copy_from_slice(dst);
        }
        // SAFETY: `frame` is readable for `frame.len()` bytes and `to` is a sockaddr_ll of
        // the size passed; both outlive the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!(
                "sent {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }
}
