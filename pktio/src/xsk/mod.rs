//! AF_XDP in Rust on `libc`: the UMEM, the four rings, sockets bound to (interface, queue)
//! pairs, the [`XskDevice`] that gives a worker all its ports over one shared UMEM, and the
//! [`XdpProgram`] that steers each queue's traffic into its socket: all of it on a pod-facing
//! port, only what kxdp serves on the uplink (its filter tables), the rest to the kernel.
//!
//! The rings, UMEM and sockets are plain system calls, so the hot path and need-wakeup
//! handling stay in view (`ring.rs`). The XDP program is C (`bpf/kxdp_filter.bpf.c`), built
//! by clang at compile time and loaded with libbpf-rs; it is attached with a BPF link, so it
//! detaches when kxdp exits or dies. No bpffs is needed. Everything here works on the calling
//! thread's network namespace: interface names and indexes, socket binds and XDP attachments
//! are all resolved in it.
//!
//! Set-up order: [`XdpProgram::attach`] (or [`XdpProgram::attach_filter`] and its tables) per
//! interface, [`XskDevice::new`] per worker, then [`XdpProgram::insert`] each device socket
//! ([`XskDevice::socket_fd`]) at its queue. A program that is to stamp its frames
//! ([`XdpProgram::set_stamp`], for devices with [`XskConfig::stamped`]) is loaded with
//! [`XdpProgram::load_detached`], told so, then attached with [`XdpProgram::link_to`].

mod bpf;
mod config;
mod device;
mod filter;
mod host;
mod iface;
mod ring;
mod socket;
mod sys;
mod umem;

use std::io;

pub use bpf::{XdpMode, XdpProgram};
pub use config::{FilterTables, Protocol, Steering};
pub use device::{DeviceHandover, HandedSocket, HandedUmem, XskDevice};
pub use filter::FilterStats;
pub use host::{HostRedirect, HostRedirectStats, HostTarget};
pub use iface::{ifindex, ifname, ifname_of, queue_count};
pub use sys::XDP_PACKET_HEADROOM;

/// Sizes and mode of one worker's AF_XDP device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Chunks in the worker's UMEM, shared by all its ports. Half of them are kept in the fill
    /// rings (split evenly between ports), the rest cover frames in flight: in the pipeline,
    /// on TX rings, awaiting completion.
    pub frame_count: u32,
    /// Bytes per chunk: a power of two from 2048 to the page size (4096). Limits the largest
    /// packet to `frame_size - XDP_PACKET_HEADROOM` (8 bytes less with [`XskConfig::stamped`]).
    pub frame_size: u32,
    /// Entries of each socket's RX ring (a power of two).
    pub rx_size: u32,
    /// Entries of each socket's TX ring (a power of two). Sends beyond it between two flushes
    /// are dropped and counted (`tx_ring_full`).
    pub tx_size: u32,
    /// Entries of each socket's fill ring (a power of two).
    pub fill_size: u32,
    /// Entries of each socket's completion ring (a power of two).
    pub comp_size: u32,
    /// Bind in zero-copy mode (`XDP_ZEROCOPY`) instead of copy mode (`XDP_COPY`). Needs a
    /// driver with AF_XDP zero-copy support; veth has none.
    pub zero_copy: bool,
    /// Ports that may be opened while the device runs (pods): the UMEM holds
    /// [`RUNTIME_PORT_FRAMES`] more chunks for each, half for its fill ring and half for its
    /// frames in flight, so opening one never takes chunks from the other ports.
    pub runtime_ports: u32,
    /// Frames arrive stamped: kxdp's XDP program puts the time it saw each one in 8 bytes
    /// before its Ethernet header ([`XdpProgram::set_stamp`], set on every program steering
    /// to these sockets). The device takes them off on receipt and leaves them just before
    /// the packet, where [`crate::DeviceExt::rx_stamp`] reads them.
    pub stamped: bool,
}

/// Chunks a port opened at run time brings to the UMEM: its fill ring keeps half of them
/// (a worker burst, 64), the other half covers its frames in flight.
pub const RUNTIME_PORT_FRAMES: u32 = 128;

impl XskConfig {
    /// Chunks in the UMEM: `frame_count` for the ports given at start, and
    /// [`RUNTIME_PORT_FRAMES`] for each port that may be opened later.
    pub fn umem_frames(&self) -> u64 {
        u64::from(self.frame_count) + u64::from(self.runtime_ports) * u64::from(RUNTIME_PORT_FRAMES)
    }
}

impl Default for XskConfig {
    fn default() -> XskConfig {
        XskConfig {
            frame_count: 4096,
            frame_size: 4096,
            rx_size: 2048,
            tx_size: 2048,
            fill_size: 2048,
            comp_size: 2048,
            zero_copy: false,
            runtime_ports: 0,
            stamped: false,
        }
    }
}

impl XskConfig {
    /// Checks sizes before any syscall, so a mistake is reported by name.
    pub fn validate(&self) -> Result<(), XskError> {
        let page = 4096;
        if !self.frame_size.is_power_of_two() || !(2048..=page).contains(&self.frame_size) {
            return Err(XskError::Config(format!(
                "frame_size {} must be a power of two from 2048 to {page}",
                self.frame_size
            )));
        }
        if self.frame_count == 0 || self.umem_frames() * u64::from(self.frame_size) > 1 << 32 {
            return Err(XskError::Config(format!(
                "frame_count {} (and {} for {} ports opened at run time) must be at least 1 and the UMEM at most 4 GiB",
                self.frame_count,
                u64::from(self.runtime_ports) * u64::from(RUNTIME_PORT_FRAMES),
                self.runtime_ports
            )));
        }
        for (name, size) in [
            ("rx_size", self.rx_size),
            ("tx_size", self.tx_size),
            ("fill_size", self.fill_size),
            ("comp_size", self.comp_size),
        ] {
            if !size.is_power_of_two() {
                return Err(XskError::Config(format!(
                    "{name} {size} must be a power of two"
                )));
            }
        }
        Ok(())
    }
}

/// Why setting up AF_XDP failed. Each message names the failed step, the interface and queue,
/// and what to try.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A configuration value is out of range.
    #[error("AF_XDP configuration: {0}")]
    Config(String),
    /// No interface of that name in the calling thread's network namespace.
    #[error("no interface {name:?} in this network namespace: {err} — check `ip link`, or enter the interface's namespace first")]
    NoInterface {
        /// The name looked up.
        name: String,
        /// What if_nametoindex said.
        err: io::Error,
    },
    /// A system call failed.
    #[error("{what} {target}: {err} — {hint}")]
    Os {
        /// The step that failed, e.g. "bind AF_XDP socket to".
        what: &'static str,
        /// The interface and queue, e.g. "veth0 queue 1".
        target: String,
        /// The error the kernel returned.
        err: io::Error,
        /// What to try.
        hint: &'static str,
    },
    /// The verifier refused the XDP program.
    #[error("load XDP program for {target}: {err} — verifier log: {log}")]
    Verifier {
        /// The interface.
        target: String,
        /// The error the kernel returned.
        err: io::Error,
        /// The verifier's log.
        log: String,
    },
}

impl XskError {
    /// An [`XskError::Os`] with a hint chosen from the step and errno.
    pub(crate) fn os(what: &'static str, target: impl Into<String>, err: io::Error) -> XskError {
        let hint = hint(what, sys::errno(&err));
        XskError::Os {
            what,
            target: target.into(),
            err,
            hint,
        }
    }
}

// Steps, named once so `hint` can match them.
pub(crate) const CREATE_SOCKET: &str = "create AF_XDP socket for";
pub(crate) const REGISTER_UMEM: &str = "register UMEM with the AF_XDP socket of";
pub(crate) const SIZE_RINGS: &str = "size the rings of the AF_XDP socket of";
pub(crate) const MAP_RINGS: &str = "map the rings of the AF_XDP socket of";
pub(crate) const MAP_UMEM: &str = "map the UMEM for";
pub(crate) const BIND: &str = "bind AF_XDP socket to";
pub(crate) const LOAD: &str = "load the XDP program for";
pub(crate) const ATTACH: &str = "attach XDP program to";
pub(crate) const UPDATE_MAP: &str = "update the XSKMAP of";
pub(crate) const UPDATE_FILTER: &str = "update the XDP filter tables of";
pub(crate) const BUSY_POLL: &str = "set busy polling on the AF_XDP socket of";

fn hint(what: &str, errno: i32) -> &'static str {
    match (what, errno) {
        (_, libc::EPERM | libc::EACCES) => {
            "needs CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF and CAP_IPC_LOCK (run as root)"
        }
        (CREATE_SOCKET, libc::EAFNOSUPPORT) => "the kernel lacks CONFIG_XDP_SOCKETS",
        (REGISTER_UMEM | MAP_UMEM, libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN) => {
            "cannot pin the UMEM: raise RLIMIT_MEMLOCK (ulimit -l) or lower frame_count"
        }
        (REGISTER_UMEM, libc::EINVAL) => {
            "frame_size must be a power of two from 2048 to the page size"
        }
        (SIZE_RINGS, libc::EINVAL) => "ring sizes must be powers of two",
        (BIND, libc::EINVAL) => "does the interface have that many queues? (ethtool -l)",
        (BIND, libc::EBUSY) => {
            "another AF_XDP socket is bound to that queue; stop it or use another queue"
        }
        (BIND, libc::EOPNOTSUPP) => "the driver has no zero-copy AF_XDP; set zero_copy = false",
        (BIND, libc::ENODEV) => "the interface is gone or lives in another network namespace",
        (LOAD, _) => "is BPF enabled (CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS)?",
        (ATTACH, libc::EBUSY | libc::EEXIST) => {
            "another XDP program is attached: `ip link set dev IFACE xdp off` removes one \
             attached by netlink, `bpftool link detach id ID` one held by a BPF link \
             (`bpftool link show` lists them)"
        }
        (ATTACH, libc::EOPNOTSUPP) => "the driver has no native XDP; use generic mode",
        (ATTACH, libc::ERANGE) => "the MTU is too large for XDP on this driver; lower it",
        (UPDATE_MAP, libc::EOPNOTSUPP) => "the socket is not bound with an RX ring",
        (UPDATE_MAP, libc::E2BIG) => "queue beyond the XSKMAP's size: attach with more queues",
        (UPDATE_FILTER, libc::E2BIG | libc::ENOSPC | libc::ENOMEM) => {
            "the table is full: its capacity is in pktio/bpf/kxdp_filter.bpf.c (*_MAX)"
        }
        _ => "see the error above",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mistakes_are_named() {
        assert!(XskConfig::default().validate().is_ok());
        let bad = XskConfig {
            frame_size: 3000,
            ..XskConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("frame_size 3000"));
        let bad = XskConfig {
            fill_size: 1000,
            ..XskConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("fill_size 1000"));
    }

    #[test]
    fn messages_say_what_where_and_what_to_do() {
        let err = XskError::os(
            BIND,
            "veth0 queue 1",
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("bind AF_XDP socket to veth0 queue 1: Invalid argument"),
            "{msg}"
        );
        assert!(
            msg.ends_with("does the interface have that many queues? (ethtool -l)"),
            "{msg}"
        );
    }
}
