//! Packet I/O for kxdp: AF_XDP sockets (UMEM, fill/completion/RX/TX rings), kxdp's XDP
//! program that steers a queue into its socket (everything on a pod-facing port, only what
//! its filter tables name on the uplink) and an in-memory device with the same interface.
//!
//! This is the only crate of kxdp that holds `unsafe`: mapped rings, the UMEM, the
//! syscalls that create them and the prefetch of received frames' lines. Beyond the XDP
//! program's header matching (in C, run by the kernel) it knows nothing about packets'
//! contents: parsing and rewriting live in `nat` and `dataplane`. README.md says how the
//! program is built, what it leaves when kxdp dies and how to remove it by hand.

pub mod capture;
pub mod device;
pub mod fdpass;
pub mod mem;
pub mod netns;
pub mod sched;
pub mod xsk;

pub use device::{stamp_clock, Device, DeviceExt, DeviceStats, Frame, PortId};
pub use mem::MemDevice;
