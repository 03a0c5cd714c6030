//! Packet I/O for kxdp: AF_XDP sockets (UMEM, fill/completion/RX/TX rings, the XDP program
//! that steers a queue into its socket) and an in-memory device with the same interface.
//!
//! This is the only crate of kxdp that holds `unsafe`: mapped rings, the UMEM and the
//! syscalls that create them. It knows nothing about packets' contents: parsing and rewriting
//! live in `nat` and `dataplane`.

pub mod capture;
pub mod device;
pub mod mem;
pub mod netns;
pub mod xsk;

pub use device::{Device, DeviceExt, DeviceStats, Frame, PortId};
pub use mem::MemDevice;
