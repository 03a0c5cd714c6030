//! Interface names, indexes and queue counts, looked up in the calling thread's network
//! namespace.
//!
//! Queue counts come from the ETHTOOL_GCHANNELS ioctl, not from
//! `/sys/class/net/NAME/queues/rx-*`: sysfs shows the namespace it was mounted in, so after
//! `setns` (or under `ip netns exec` without a remount) it may describe the wrong interface
//! or none. The ioctl goes through a socket, which belongs to the caller's namespace.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::XskError;

/// `ETHTOOL_GCHANNELS` (include/uapi/linux/ethtool.h).
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels` (include/uapi/linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq` as SIOCETHTOOL uses it: a name and a pointer to the ethtool command.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    /// `struct ifreq` is 40 bytes on 64-bit Linux; the kernel copies all of it.
    _pad: [u8; 16],
}

/// Index of interface `name` (if_nametoindex).
pub fn ifindex(name: &str) -> Result<u32, XskError> {
    let no_such = |err| XskError::NoInterface {
        name: name.to_string(),
        err,
    };
    let c =
        CString::new(name).map_err(|_| no_such(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(no_such(io::Error::last_os_error()));
    }
    Ok(idx)
}

/// Name of interface `index`, or `"ifindex N"` if there is none (used in messages).
pub fn ifname(index: u32) -> String {
    ifname_of(index).unwrap_or_else(|| format!("ifindex {index}"))
}

/// The name of interface `index` in this namespace, if there is one.
pub fn ifname_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Receive queues of interface `name` now in use: `rx_count + combined_count` from
/// ETHTOOL_GCHANNELS (veth reports rx, most NICs combined). 1 when the driver does not
/// answer (no ethtool channel support means a single queue) or the name is unknown.
pub fn queue_count(name: &str) -> u32 {
    channels(name)
        .map(|c| c.rx_count + c.combined_count)
        .unwrap_or(0)
        .max(1)
}

fn channels(name: &str) -> io::Result<EthtoolChannels> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut ch as *mut EthtoolChannels).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq whose data pointer points at `ch`, both alive for the
    // call; the kernel writes at most `size_of::<EthtoolChannels>()` bytes there.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_unknown_names_are_explained() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        assert_eq!(ifname(1), "lo");
        assert_eq!(queue_count("lo"), 1);
        let err = ifindex("kxdp-nope0").unwrap_err().to_string();
        assert!(
            err.contains("\"kxdp-nope0\"") && err.contains("ip link"),
            "{err}"
        );
        assert_eq!(queue_count("kxdp-nope0"), 1);
    }

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(
            std::mem::size_of::<IfreqData>(),
            std::mem::size_of::<libc::ifreq>()
        );
    }
}
