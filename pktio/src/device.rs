//! The interface every packet source implements: a worker's set of ports sharing one frame pool.

/// A packet in a device's frame pool: `addr` is the device address of the packet's first byte.
///
/// A frame lives in a fixed-size chunk; the bytes before `addr` inside the chunk are headroom,
/// so a header (VXLAN) can be prepended by moving `addr` back. A `Frame` is a handle, not an
/// owner: it must end in exactly one of [`Device::send`] or [`Device::free`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Device address of the first packet byte.
    pub addr: u64,
    /// Packet length in bytes.
    pub len: u32,
}

/// Index of a port (an interface, or an in-memory port) within one device.
pub type PortId = usize;

/// One worker's ports and their shared frame pool.
///
/// AF_XDP: one socket per (interface, queue), all of a worker's sockets on one UMEM, so a
/// frame received on one port is transmitted on another without a copy. In memory: queues of
/// byte vectors that tests fill and drain.
pub trait Device {
    /// Number of ports.
    fn port_count(&self) -> usize;

    /// Size of one chunk of the frame pool (headroom plus the largest packet).
    fn chunk_size(&self) -> usize;

    /// Appends up to `max` received frames of `port` to `out` (which must have the capacity).
    fn recv(&mut self, port: PortId, out: &mut Vec<Frame>, max: usize);

    /// The whole chunk that holds `frame`, and the packet's offset inside it.
    fn chunk_mut(&mut self, frame: Frame) -> (&mut [u8], usize);

    /// A free frame with its packet starting after the default headroom, length 0; `None`
    /// when the pool is empty (counted by the device).
    fn alloc(&mut self) -> Option<Frame>;

    /// Returns `frame` to the pool.
    fn free(&mut self, frame: Frame);

    /// Queues `frame` for transmission on `port`. When the transmit ring is full the frame is
    /// returned to the pool and counted, and `false` is returned.
    fn send(&mut self, port: PortId, frame: Frame) -> bool;

    /// Asks for the first `bytes` bytes of each of `frames` (received, not yet read) to be
    /// brought into the cache without waiting for them, so that a burst's frames come in
    /// together rather than each at its first read. A hint with no other effect; devices
    /// whose frames are in the cache already (the in-memory one) do nothing.
    fn prefetch(&self, frames: &[Frame], bytes: usize) {
        let _ = (frames, bytes);
    }

    /// Pushes queued transmits to the kernel (waking it only when the ring asks), reaps
    /// completions and refills receive buffers.
    fn flush(&mut self);

    /// Counters of this device.
    fn stats(&self) -> DeviceStats;

    /// The descriptors that turn readable when a frame arrives on one of the ports (the
    /// AF_XDP sockets), for a worker to sleep on with `poll(2)`. Empty for a device nothing
    /// wakes (the in-memory one): a worker sleeping on it wakes only when told to or when
    /// its sleep times out.
    fn wait_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }

    /// Whether frames queued for transmission are still waiting for the kernel to take
    /// them (an AF_XDP copy-mode socket sends a few dozen per wake-up): a worker that
    /// sleeps now would leave them until something wakes it.
    fn tx_pending(&mut self) -> bool {
        false
    }

    /// Opens `port` at run time on queue `queue` of interface `ifindex` (a pod attached
    /// while the worker runs); returns the descriptor to steer the queue to, if the device
    /// has one. Devices with a fixed set of ports refuse.
    fn open_port(
        &mut self,
        port: PortId,
        ifindex: u32,
        queue: u32,
    ) -> Result<Option<std::os::fd::RawFd>, String> {
        let _ = (port, ifindex, queue);
        Err("this device has a fixed set of ports".into())
    }

    /// Closes a port opened by [`Device::open_port`], taking back every frame it held.
    /// Its interface must no longer steer packets to it. Unknown ports are ignored.
    fn close_port(&mut self, port: PortId) {
        let _ = port;
    }
}

/// Convenience accessors built on [`Device::chunk_mut`].
pub trait DeviceExt: Device {
    /// The packet bytes of `frame`.
    fn packet_mut(&mut self, frame: Frame) -> &mut [u8] {
        let (chunk, off) = self.chunk_mut(frame);
        let end = (off + frame.len as usize).min(chunk.len());
        &mut chunk[off..end]
    }

    /// Headroom before the packet of `frame`, in bytes.
    fn headroom(&mut self, frame: Frame) -> usize {
        self.chunk_mut(frame).1
    }

    /// The 8 bytes before the packet of a received `frame`, where a device whose frames
    /// come stamped leaves the stamp ([`crate::xsk::XskConfig::stamped`],
    /// [`crate::xsk::XdpProgram::set_stamp`]): the time kxdp's XDP program saw the frame,
    /// on the clock of [`stamp_clock`]. Whatever the headroom held for a
    /// frame that was not stamped; `None` when the headroom is shorter.
    fn rx_stamp(&mut self, frame: Frame) -> Option<u64> {
        let (chunk, off) = self.chunk_mut(frame);
        let bytes = chunk.get(off.checked_sub(STAMP_LEN)?..off)?;
        Some(u64::from_ne_bytes(bytes.try_into().ok()?))
    }
}

impl<D: Device + ?Sized> DeviceExt for D {}

/// Bytes of the stamp kxdp's XDP program puts in front of a frame
/// ([`crate::xsk::XdpProgram::set_stamp`]).
pub const STAMP_LEN: usize = 8;

/// The time now on the clock kxdp's XDP program stamps frames with (`bpf_ktime_get_ns`:
/// `CLOCK_MONOTONIC`), in nanoseconds; see [`DeviceExt::rx_stamp`].
pub fn stamp_clock() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Counters kept by a device; plain numbers, summed by whoever reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames handed to transmit rings.
    pub tx_frames: u64,
    /// Frames dropped because a transmit ring was full.
    pub tx_ring_full: u64,
    /// Allocations refused because the frame pool was empty.
    pub alloc_failed: u64,
    /// Kernel: frames dropped for lack of fill-ring buffers or other reasons (XDP_STATISTICS
    /// `rx_dropped`).
    pub kernel_rx_dropped: u64,
    /// Kernel: frames dropped because the RX ring was full (`rx_ring_full`).
    pub kernel_rx_ring_full: u64,
    /// Kernel: invalid descriptors on RX (`rx_invalid_descs`).
    pub kernel_rx_invalid: u64,
    /// Kernel: invalid descriptors on TX (`tx_invalid_descs`).
    pub kernel_tx_invalid: u64,
    /// Kernel: fill ring empty when a frame arrived (`rx_fill_ring_empty_descs`).
    pub kernel_fill_empty: u64,
    /// Wake-up syscalls made because a ring asked for one.
    pub wakeups: u64,
    /// Frames a closed port could not give back: transmitted by the kernel but not yet
    /// completed when the port closed (they leave the pool for good).
    pub frames_lost: u64,
    /// Receive calls made to run the queue's driver in the caller's thread (preferred busy
    /// polling, [`crate::xsk::XskDevice::set_busy_poll`]): one per empty poll of a port
    /// that did not need a wake-up anyway (those count as `wakeups`).
    pub busy_polls: u64,
}

impl DeviceStats {
    /// The counters' movement since `before`, a reading of the same device taken earlier:
    /// what a run did, without what the device counted before it. Each field saturates at
    /// zero, so a reading lower than the earlier one shows no movement instead of wrapping
    /// or panicking.
    pub fn since(self, before: DeviceStats) -> DeviceStats {
        DeviceStats {
            rx_frames: self.rx_frames.saturating_sub(before.rx_frames),
            tx_frames: self.tx_frames.saturating_sub(before.tx_frames),
            tx_ring_full: self.tx_ring_full.saturating_sub(before.tx_ring_full),
            alloc_failed: self.alloc_failed.saturating_sub(before.alloc_failed),
            kernel_rx_dropped: self
                .kernel_rx_dropped
                .saturating_sub(before.kernel_rx_dropped),
            kernel_rx_ring_full: self
                .kernel_rx_ring_full
                .saturating_sub(before.kernel_rx_ring_full),
            kernel_rx_invalid: self
                .kernel_rx_invalid
                .saturating_sub(before.kernel_rx_invalid),
            kernel_tx_invalid: self
                .kernel_tx_invalid
                .saturating_sub(before.kernel_tx_invalid),
            kernel_fill_empty: self
                .kernel_fill_empty
                .saturating_sub(before.kernel_fill_empty),
            wakeups: self.wakeups.saturating_sub(before.wakeups),
            frames_lost: self.frames_lost.saturating_sub(before.frames_lost),
            busy_polls: self.busy_polls.saturating_sub(before.busy_polls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_every_field_and_saturates_at_zero() {
        let before = DeviceStats {
            rx_frames: 1,
            tx_frames: 2,
            tx_ring_full: 3,
            alloc_failed: 4,
            kernel_rx_dropped: 5,
            kernel_rx_ring_full: 6,
            kernel_rx_invalid: 7,
            kernel_tx_invalid: 8,
            kernel_fill_empty: 9,
            wakeups: 10,
            frames_lost: 11,
            busy_polls: 12,
        };
        let after = DeviceStats {
            rx_frames: 11,
            tx_frames: 22,
            tx_ring_full: 33,
            alloc_failed: 44,
            kernel_rx_dropped: 55,
            kernel_rx_ring_full: 66,
            kernel_rx_invalid: 77,
            kernel_tx_invalid: 88,
            kernel_fill_empty: 9,
            wakeups: 0,
            frames_lost: 11,
            busy_polls: 24,
        };
        assert_eq!(
            after.since(before),
            DeviceStats {
                rx_frames: 10,
                tx_frames: 20,
                tx_ring_full: 30,
                alloc_failed: 40,
                kernel_rx_dropped: 50,
                kernel_rx_ring_full: 60,
                kernel_rx_invalid: 70,
                kernel_tx_invalid: 80,
                kernel_fill_empty: 0,
                wakeups: 0,
                frames_lost: 0,
                busy_polls: 12,
            },
            "unchanged reads 0, and a counter lower than before saturates"
        );
    }
}
