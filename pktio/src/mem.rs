//! An in-memory [`Device`]: ports are queues of frames that tests fill and drain.
//!
//! It behaves like the AF_XDP device where it matters to the pipeline: fixed-size chunks with
//! headroom, a bounded pool, frames moving between ports without a copy.

use std::collections::VecDeque;

use crate::device::{Device, DeviceStats, Frame, PortId};

/// Headroom before a received or allocated packet, as AF_XDP gives (`XDP_PACKET_HEADROOM`).
pub const MEM_HEADROOM: usize = 256;

/// An in-memory device with `ports` ports and a pool of `frames` chunks of `chunk` bytes.
pub struct MemDevice {
    chunk: usize,
    pool: Vec<u8>,
    free: Vec<u64>,
    rx: Vec<VecDeque<Frame>>,
    tx: Vec<VecDeque<Frame>>,
    stats: DeviceStats,
}

impl MemDevice {
    /// A device with `ports` ports and `frames` chunks of 4096 bytes.
    pub fn new(ports: usize, frames: usize) -> MemDevice {
        let chunk = 4096;
        MemDevice {
            chunk,
            pool: vec![0; chunk * frames],
            free: (0..frames as u64).rev().map(|i| i * chunk as u64).collect(),
            rx: (0..ports).map(|_| VecDeque::new()).collect(),
            tx: (0..ports).map(|_| VecDeque::new()).collect(),
            stats: DeviceStats::default(),
        }
    }

    /// Queues `bytes` as a frame arriving on `port`. Returns `false` (and drops it) when the
    /// pool is empty or the frame does not fit a chunk.
    pub fn inject(&mut self, port: PortId, bytes: &[u8]) -> bool {
        if bytes.len() > self.chunk - MEM_HEADROOM {
            return false;
        }
        let Some(mut frame) = self.alloc() else {
            return false;
        };
        frame.len = bytes.len() as u32;
        let start = frame.addr as usize;
        self.pool[start..start + bytes.len()].copy_from_slice(bytes);
        self.rx[port].push_back(frame);
        true
    }

    /// As [`MemDevice::inject`], with `stamp` in the 8 bytes before the packet, as kxdp's
    /// XDP program writes them when it stamps frames ([`crate::DeviceExt::rx_stamp`]).
    pub fn inject_stamped(&mut self, port: PortId, bytes: &[u8], stamp: u64) -> bool {
        if !self.inject(port, bytes) {
            return false;
        }
        if let Some(frame) = self.rx[port].back() {
            let start = frame.addr as usize;
            self.pool[start - crate::device::STAMP_LEN..start]
                .copy_from_slice(&stamp.to_ne_bytes());
        }
        true
    }

    /// Takes every frame transmitted on `port` so far, as byte vectors, freeing the frames.
    pub fn take_sent(&mut self, port: PortId) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(frame) = self.tx[port].pop_front() {
            let start = frame.addr as usize;
            out.push(self.pool[start..start + frame.len as usize].to_vec());
            self.free(frame);
        }
        out
    }

    /// Number of frames currently free in the pool.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }
}

impl Device for MemDevice {
    fn port_count(&self) -> usize {
        self.rx.len()
    }

    fn chunk_size(&self) -> usize {
        self.chunk
    }

    fn recv(&mut self, port: PortId, out: &mut Vec<Frame>, max: usize) {
        for _ in 0..max {
            match self.rx[port].pop_front() {
                Some(frame) => {
                    self.stats.rx_frames += 1;
                    out.push(frame);
                }
                None => break,
            }
        }
    }

    fn chunk_mut(&mut self, frame: Frame) -> (&mut [u8], usize) {
        let base = frame.addr as usize / self.chunk * self.chunk;
        let off = frame.addr as usize - base;
        (&mut self.pool[base..base + self.chunk], off)
    }

    fn alloc(&mut self) -> Option<Frame> {
        match self.free.pop() {
            Some(base) => Some(Frame {
                addr: base + MEM_HEADROOM as u64,
                len: 0,
            }),
            None => {
                self.stats.alloc_failed += 1;
                None
            }
        }
    }

    fn free(&mut self, frame: Frame) {
        let base = frame.addr / self.chunk as u64 * self.chunk as u64;
        debug_assert!(!self.free.contains(&base), "double free of frame {base}");
        self.free.push(base);
    }

    fn send(&mut self, port: PortId, frame: Frame) -> bool {
        self.stats.tx_frames += 1;
        self.tx[port].push_back(frame);
        true
    }

    fn flush(&mut self) {}

    fn stats(&self) -> DeviceStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceExt;

    #[test]
    fn frames_move_between_ports_without_loss() {
        let mut dev = MemDevice::new(2, 4);
        assert!(dev.inject(0, &[1, 2, 3]));
        let mut got = Vec::with_capacity(8);
        dev.recv(0, &mut got, 8);
        assert_eq!(got.len(), 1);
        assert_eq!(dev.packet_mut(got[0]), &[1, 2, 3]);
        assert_eq!(dev.headroom(got[0]), MEM_HEADROOM);
        assert!(dev.send(1, got[0]));
        assert_eq!(dev.take_sent(1), vec![vec![1, 2, 3]]);
        assert_eq!(dev.free_frames(), 4);
    }

    #[test]
    fn empty_pool_refuses_and_counts() {
        let mut dev = MemDevice::new(1, 1);
        assert!(dev.inject(0, &[0; 60]));
        assert!(!dev.inject(0, &[0; 60]));
        assert_eq!(dev.stats().alloc_failed, 1);
        assert!(!dev.inject(0, &vec![0; 5000]));
    }
}
