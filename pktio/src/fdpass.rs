//! Descriptors passed to another process over a Unix stream socket (`SCM_RIGHTS`): how a
//! dataplane hands its AF_XDP sockets, UMEMs and XDP links to its successor.
//!
//! Descriptors go in batches of at most [`BATCH`], each riding on one byte of data `F`, so
//! that any number of them fits under the kernel's limit per message (`SCM_MAX_FD`, 253).
//! The receiver asks for as many as the sender said it would send (in a message before
//! them) and gets them in the order they were sent.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors per message: below the kernel's `SCM_MAX_FD` (253).
pub const BATCH: usize = 200;

/// The byte each batch rides on.
const MARK: u8 = b'F';

/// Bytes of control buffer for `n` descriptors, in `u64`s so that it is aligned for
/// `cmsghdr`.
fn control_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let bytes = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

/// A message header for one byte in `iov` and the control buffer `control`; both must
/// outlive every use of the header.
fn message(iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
    // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(control);
    msg
}

/// Sends `fds` over `stream`, in batches; the peer takes them with [`recv`].
pub fn send(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for batch in fds.chunks(BATCH) {
        let raws: Vec<RawFd> = batch.iter().map(AsRawFd::as_raw_fd).collect();
        let mut control = vec![0u64; control_words(raws.len())];
        let byte = [MARK];
        let mut iov = libc::iovec {
            iov_base: byte.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let msg = message(&mut iov, &mut control);
        // SAFETY: `msg` points at `control`, which has CMSG_SPACE bytes for `raws`: the
        // first header fits, and its data holds `raws.len()` descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the control message"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((raws.len() * size_of::<RawFd>()) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                raws.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                raws.len() * size_of::<RawFd>(),
            );
        }
        // SAFETY: `msg` and everything it points at live for the call; the kernel only
        // reads them.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent != 1 {
            return Err(io::Error::other("the descriptors' byte was not sent"));
        }
    }
    Ok(())
}

/// Receives exactly `count` descriptors sent by [`send`] (close-on-exec), waiting as long
/// as the stream's read timeout allows. Fails if the peer closes first, or sends more
/// than `count` or something else (what came is closed then).
pub fn recv(stream: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut control = vec![0u64; control_words(BATCH)];
        let mut byte = [0u8];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut msg = message(&mut iov, &mut control);
        // SAFETY: `msg` points at a writable byte and control buffer, alive for the call.
        let got = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        // Whatever descriptors arrived are ours now, even if the rest is wrong.
        // SAFETY: the kernel filled `msg`'s control buffer; CMSG_FIRSTHDR/NXTHDR stay
        // inside `msg_controllen` and each SCM_RIGHTS header's data holds
        // (cmsg_len - CMSG_LEN(0)) / 4 descriptors, new in this process.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let n = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    for i in 0..n {
                        let raw = data
                            .add(i * size_of::<RawFd>())
                            .cast::<RawFd>()
                            .read_unaligned();
                        out.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the peer closed after {} of {count} descriptors", out.len()),
            ));
        }
        if byte[0] != MARK || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "the stream held something other than descriptors in batches",
            ));
        }
    }
    if out.len() != count {
        return Err(io::Error::other(format!(
            "{} descriptors came, {count} were announced",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_arrive_in_order_across_batches() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..BATCH + 5)
            .map(|i| {
                let mut f = tempfile_with(&i.to_string());
                f.rewind().unwrap();
                f
            })
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| send(&a, &fds));
            let got = recv(&b, files.len()).unwrap();
            for (i, fd) in got.into_iter().enumerate() {
                let mut text = String::new();
                std::fs::File::from(fd).read_to_string(&mut text).unwrap();
                assert_eq!(text, i.to_string());
            }
            h.join().unwrap()
        });
        sender.unwrap();
    }

    #[test]
    fn a_peer_that_closes_or_sends_bytes_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let err = recv(&b, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        assert!(recv(&b, 1).unwrap_err().to_string().contains("other than"));
    }

    /// A temporary file holding `text`, already unlinked.
    fn tempfile_with(text: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "kxdp-fdpass-{}-{text}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }
}
