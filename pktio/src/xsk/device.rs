//! [`XskDevice`]: one worker's AF_XDP sockets, one per port, all on one UMEM, behind the
//! [`Device`] interface.
//!
//! Frame life cycle: free stack → fill ring → (kernel receives) → RX ring → pipeline →
//! TX ring → (kernel transmits) → completion ring → free stack. A frame received on one port
//! can go straight onto another port's TX ring: same UMEM, no copy.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::device::{Device, DeviceStats, Frame, PortId};

use super::socket::{UmemRole, XskSocket};
use super::sys::XDP_PACKET_HEADROOM;
use super::umem::{FreeFrames, Umem};
use super::{ifname, XskConfig, XskError, BUSY_POLL, MAP_UMEM};

/// Wake-up calls per socket per flush while the kernel answers EAGAIN. In copy mode one
/// sendto transmits at most the kernel's TX budget (32 frames, `max_tx_budget`), so 4 calls
/// drain two 64-frame worker bursts (`dataplane::worker::BURST`); what is left waits for the
/// next flush. No benchmark has tuned it yet.
const TX_KICKS_PER_FLUSH: u32 = 4;

/// How long closing a port waits for the kernel to complete frames it is transmitting.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

struct Port {
    sock: XskSocket,
    /// The interface and queue it is bound to.
    ifindex: u32,
    queue: u32,
    /// Completions reaped from this socket: with the TX ring's consumer index, how many
    /// transmitted frames the kernel still holds.
    completed: u32,
    /// Chunks its fill ring is kept topped up to.
    fill_share: u32,
}

/// One worker's AF_XDP ports over a shared UMEM.
///
/// Dropping it closes the sockets (the kernel removes them from any XSKMAP) and unmaps the
/// UMEM.
pub struct XskDevice {
    /// By port id; `None` for a port closed at run time (its id may be opened again).
    /// Declared before `umem` so sockets close before the UMEM is unmapped.
    ports: Vec<Option<Port>>,
    umem: Umem,
    free: FreeFrames,
    /// Chunks the fill ring of each port given at start is kept topped up to.
    fill_share: u32,
    /// Sizes of the rings of sockets opened later.
    cfg: XskConfig,
    /// Ports given at start.
    start_ports: u32,
    stats: DeviceStats,
    /// Preferred busy polling's budget, when it is on ([`XskDevice::set_busy_poll`]).
    busy_poll: Option<u16>,
}

impl XskDevice {
    /// Binds one socket per `(ifindex, queue)` pair, in order (port `i` is `pairs[i]`), all on
    /// one UMEM of `cfg.frame_count` chunks, and fills their fill rings. Interface indexes are
    /// those of the calling thread's network namespace.
    pub fn new(pairs: &[(u32, u32)], cfg: &XskConfig) -> Result<XskDevice, XskError> {
        cfg.validate()?;
        if pairs.is_empty() {
            return Err(XskError::Config("no (interface, queue) pairs".into()));
        }
        for (i, p) in pairs.iter().enumerate() {
            if pairs[..i].contains(p) {
                return Err(XskError::Config(format!(
                    "{} queue {} given twice: one socket per queue",
                    ifname(p.0),
                    p.1
                )));
            }
        }
        let total = cfg.umem_frames() as u32;
        let umem = Umem::new(total, cfg.frame_size)
            .map_err(|e| XskError::os(MAP_UMEM, format!("{total} frames"), e))?;
        let mut dev = XskDevice {
            ports: Vec::with_capacity(pairs.len()),
            umem,
            free: FreeFrames::all(total, cfg.frame_size),
            // Half of the start's chunks wait in its ports' fill rings, split evenly; the
            // other half is for frames in flight (pipeline, TX rings, completions). A ring
            // never holds more than its size.
            fill_share: (cfg.frame_count / 2 / pairs.len() as u32)
                .max(1)
                .min(cfg.fill_size),
            cfg: cfg.clone(),
            start_ports: pairs.len() as u32,
            stats: DeviceStats::default(),
            busy_poll: None,
        };
        for (port, &(ifindex, queue)) in pairs.iter().enumerate() {
            dev.bind(port, ifindex, queue, dev.fill_share)?;
        }
        for port in 0..dev.ports.len() {
            dev.refill(port);
        }
        Ok(dev)
    }

    /// Binds a socket for `port` (registering the UMEM with it if no other socket holds
    /// it) whose fill ring is kept at `fill_share` chunks; the caller refills.
    fn bind(
        &mut self,
        port: PortId,
        ifindex: u32,
        queue: u32,
        fill_share: u32,
    ) -> Result<(), XskError> {
        if self.ports.get(port).is_some_and(Option::is_some) {
            return Err(XskError::Config(format!("port {port} is open already")));
        }
        let role = match self.ports.iter().flatten().next() {
            None => UmemRole::Owner(&self.umem),
            Some(first) => UmemRole::SharedWith(first.sock.fd().as_raw_fd()),
        };
        let sock = XskSocket::new(ifindex, queue, &self.cfg, role)?;
        if self.busy_poll.is_some() {
            sock.set_busy_poll(self.busy_poll)
                .map_err(|e| XskError::os(BUSY_POLL, ifname(ifindex), e))?;
        }
        if self.ports.len() <= port {
            self.ports.resize_with(port + 1, || None);
        }
        self.ports[port] = Some(Port {
            sock,
            ifindex,
            queue,
            completed: 0,
            fill_share,
        });
        Ok(())
    }

    /// Turns the kernel's preferred busy polling on for every socket, now and opened later,
    /// with at most `budget` frames per poll of a queue, or off (`None`; sockets handed
    /// over by another process keep what it set until this is called). While it is on, a
    /// poll of a port that finds its receive ring empty asks the kernel to run the queue's
    /// driver in this thread (a non-blocking `recvfrom`, counted as `busy_polls`) instead of
    /// waiting for its interrupt and softirq: with the interface's `napi_defer_hard_irqs`
    /// and `gro_flush_timeout` set, the kernel leaves the queue to this thread while it
    /// polls. Returns each open port's NAPI id; 0 means the kernel knows no NAPI instance
    /// for the socket (veth, generic XDP) and busy polling does nothing there. On an error
    /// (a kernel without the options, no `CAP_NET_ADMIN`) every socket is left without it.
    pub fn set_busy_poll(&mut self, budget: Option<u16>) -> Result<Vec<(PortId, u32)>, XskError> {
        let mut ids = Vec::new();
        for (id, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            let failed = |e| XskError::os(BUSY_POLL, ifname(p.ifindex), e);
            let set = p.sock.set_busy_poll(budget).and_then(|()| p.sock.napi_id());
            match set {
                Ok(napi) => ids.push((id, napi)),
                Err(e) => {
                    // All or nothing: the sockets set so far go back to plain polling.
                    if budget.is_some() {
                        for q in self.ports.iter().flatten() {
                            let _ = q.sock.set_busy_poll(None);
                        }
                    }
                    self.busy_poll = None;
                    return Err(failed(e));
                }
            }
        }
        self.busy_poll = budget;
        Ok(ids)
    }

    /// The UMEM's memfd, for a successor to map ahead of the handover ([`HandedUmem`]).
    pub fn umem_fd(&self) -> BorrowedFd<'_> {
        self.umem.fd()
    }

    /// What a successor process needs to take this device over, with the descriptors to
    /// pass it: one socket per entry of [`DeviceHandover::sockets`] (the UMEM's went
    /// before, [`XskDevice::umem_fd`]). Frames sent since the last flush are published on
    /// the TX rings first, for the successor to flush. Call with the device idle (its
    /// worker stopped, no frame held outside the free stack and the rings); the device must
    /// not be used again once the successor has taken it.
    pub fn handover(&mut self) -> (DeviceHandover, Vec<BorrowedFd<'_>>) {
        for p in self.ports.iter_mut().flatten() {
            p.sock.tx.submit();
            p.sock.fill.submit();
        }
        let mut fds = Vec::new();
        let mut sockets = Vec::new();
        for p in self.ports.iter().flatten() {
            fds.push(p.sock.fd());
            sockets.push(HandedSocket {
                ifindex: p.ifindex,
                queue: p.queue,
                completed: p.completed,
                fill_share: p.fill_share,
            });
        }
        let state = DeviceHandover {
            cfg: self.cfg.clone(),
            fill_share: self.fill_share,
            start_ports: self.start_ports,
            sockets,
            free: self.free.chunks().to_vec(),
        };
        (state, fds)
    }

    /// Takes over a predecessor's device: its UMEM, mapped already, and its sockets `fds`
    /// as [`XskDevice::handover`] gave them, placed at the port ids `place` gives their
    /// (interface, queue). A socket with no place is closed and the frames it held are
    /// counted lost (its interface may still steer to it until the predecessor lets go, so
    /// they cannot be taken back).
    pub fn adopt(
        state: DeviceHandover,
        umem: HandedUmem,
        fds: Vec<OwnedFd>,
        place: impl Fn(u32, u32) -> Option<PortId>,
    ) -> Result<XskDevice, XskError> {
        let cfg = state.cfg;
        cfg.validate()?;
        let handed = |what: &str| XskError::Config(format!("the handed device: {what}"));
        if fds.len() != state.sockets.len() {
            return Err(handed(&format!(
                "{} descriptors for {} sockets",
                fds.len(),
                state.sockets.len()
            )));
        }
        let total = cfg.umem_frames() as u32;
        let umem = umem.0;
        if umem.frame_size() != cfg.frame_size || umem.frames() != total {
            return Err(handed("its UMEM has another size"));
        }
        let free = FreeFrames::from_list(&state.free, total, cfg.frame_size)
            .ok_or_else(|| handed("its free frames are not chunks of its UMEM"))?;
        let mut dev = XskDevice {
            ports: Vec::new(),
            umem,
            free,
            fill_share: state.fill_share,
            cfg,
            start_ports: state.start_ports,
            stats: DeviceStats::default(),
            busy_poll: None,
        };
        for (h, fd) in state.sockets.into_iter().zip(fds) {
            let mut sock = XskSocket::adopt(fd, h.ifindex, h.queue, &dev.cfg)?;
            let Some(port) = place(h.ifindex, h.queue) else {
                let lent = sock.held(h.completed);
                dev.stats.frames_lost += u64::from(lent);
                continue;
            };
            if dev.ports.get(port).is_some_and(Option::is_some) {
                return Err(handed(&format!("two sockets for port {port}")));
            }
            if dev.ports.len() <= port {
                dev.ports.resize_with(port + 1, || None);
            }
            dev.ports[port] = Some(Port {
                sock,
                ifindex: h.ifindex,
                queue: h.queue,
                completed: h.completed,
                fill_share: h.fill_share,
            });
        }
        Ok(dev)
    }

    /// The AF_XDP socket of `port`, to insert into the interface's XSKMAP
    /// ([`super::XdpProgram::insert`]). Panics if `port >= port_count()`.
    pub fn socket_fd(&self, port: PortId) -> RawFd {
        self.open(port).sock.fd().as_raw_fd()
    }

    /// The AF_XDP socket of `port`, if it is open.
    pub fn port_fd(&self, port: PortId) -> Option<RawFd> {
        match self.ports.get(port) {
            Some(Some(p)) => Some(p.sock.fd().as_raw_fd()),
            _ => None,
        }
    }

    fn open(&self, port: PortId) -> &Port {
        match self.ports.get(port) {
            Some(Some(p)) => p,
            _ => panic!("port {port} is not open"),
        }
    }

    /// Chunks free in user space (not lent to the kernel, not held by the caller).
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Chunks each fill ring is kept topped up to.
    pub fn fill_share(&self) -> u32 {
        self.fill_share
    }

    /// Moves transmitted chunks from `port`'s completion ring to the free stack.
    fn reap(&mut self, port: PortId) {
        let Some(Some(p)) = self.ports.get_mut(port) else {
            return;
        };
        // Bound: the ring's size, i.e. everything completed so far.
        let (first, n) = p.sock.comp.peek(p.sock.comp.size());
        for i in 0..n {
            // The kernel returns the address we transmitted from; keep the chunk.
            let base = self
                .umem
                .chunk_base(p.sock.comp.read(first.wrapping_add(i)));
            self.free.push(base);
        }
        if n > 0 {
            p.sock.comp.release();
            p.completed = p.completed.wrapping_add(n);
        }
    }

    /// Tops `port`'s fill ring up to its share from the free stack. Returns how many chunks
    /// were lent.
    fn refill(&mut self, port: PortId) -> u32 {
        let Some(Some(p)) = self.ports.get_mut(port) else {
            return 0;
        };
        let lent = p.sock.fill.outstanding();
        let want = p
            .fill_share
            .saturating_sub(lent)
            .min(self.free.len() as u32);
        if want == 0 {
            return 0;
        }
        // All-or-nothing; `want` fits because `lent + want <= fill_share <= fill size`.
        let Some(first) = p.sock.fill.reserve(want) else {
            return 0;
        };
        for i in 0..want {
            // `want <= free.len()`, so pop succeeds; 0 would only be a harmless duplicate.
            let base = self.free.pop().unwrap_or(0);
            p.sock.fill.write(first.wrapping_add(i), base);
        }
        p.sock.fill.submit();
        want
    }
}

/// A predecessor's UMEM mapped by its successor ahead of the handover, for
/// [`XskDevice::adopt`].
pub struct HandedUmem(Umem);

impl HandedUmem {
    /// Maps memfd `fd`, the UMEM of a device sized as `cfg` says
    /// ([`XskDevice::umem_fd`]).
    pub fn map(fd: OwnedFd, cfg: &XskConfig) -> Result<HandedUmem, XskError> {
        let total = cfg.umem_frames() as u32;
        Umem::adopt(fd, total, cfg.frame_size)
            .map(HandedUmem)
            .map_err(|e| XskError::os(MAP_UMEM, format!("{total} handed frames"), e))
    }
}

/// One worker's AF_XDP device as a successor process takes it over
/// ([`XskDevice::handover`], [`XskDevice::adopt`]); its descriptors travel beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHandover {
    /// Sizes of the UMEM and of every socket's rings.
    pub cfg: XskConfig,
    /// Chunks each fill ring of a port given at start is kept topped up to.
    pub fill_share: u32,
    /// Ports given at start.
    pub start_ports: u32,
    /// The sockets, in the order of their descriptors.
    pub sockets: Vec<HandedSocket>,
    /// The chunks free in user space, last out first.
    pub free: Vec<u64>,
}

/// One socket of a [`DeviceHandover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandedSocket {
    /// The interface it is bound to.
    pub ifindex: u32,
    /// Its queue.
    pub queue: u32,
    /// Completions reaped so far (with the TX ring's consumer index: what the kernel holds).
    pub completed: u32,
    /// Chunks its fill ring is kept topped up to.
    pub fill_share: u32,
}

impl Device for XskDevice {
    fn port_count(&self) -> usize {
        self.ports.len()
    }

    fn prefetch(&self, frames: &[Frame], bytes: usize) {
        for frame in frames {
            self.umem
                .prefetch(frame.addr, bytes.min(frame.len as usize));
        }
    }

    fn chunk_size(&self) -> usize {
        self.umem.frame_size() as usize
    }

    fn recv(&mut self, port: PortId, out: &mut Vec<Frame>, max: usize) {
        let Some(Some(p)) = self.ports.get_mut(port) else {
            return;
        };
        // Never beyond `out`'s spare capacity: pushing must not allocate.
        let max = max.min(out.capacity() - out.len()).min(u32::MAX as usize) as u32;
        let (first, n) = p.sock.rx.peek(max);
        if n == 0 {
            if p.sock.fill.needs_wakeup() {
                p.sock.kick_rx();
                self.stats.wakeups += 1;
            } else if self.busy_poll.is_some() {
                p.sock.kick_rx();
                self.stats.busy_polls += 1;
            }
            return;
        }
        // A stamped frame's packet starts after its stamp (none is shorter: the program
        // makes room for the stamp in front of a whole frame).
        let skip = if self.cfg.stamped {
            crate::device::STAMP_LEN as u32
        } else {
            0
        };
        for i in 0..n {
            let d = p.sock.rx.read(first.wrapping_add(i));
            let skip = skip.min(d.len);
            out.push(Frame {
                addr: d.addr + u64::from(skip),
                len: d.len - skip,
            });
        }
        p.sock.rx.release();
        self.stats.rx_frames += u64::from(n);
    }

    fn chunk_mut(&mut self, frame: Frame) -> (&mut [u8], usize) {
        self.umem.chunk_mut(frame.addr)
    }

    fn alloc(&mut self) -> Option<Frame> {
        match self.free.pop() {
            Some(base) => Some(Frame {
                addr: base + XDP_PACKET_HEADROOM,
                len: 0,
            }),
            None => {
                self.stats.alloc_failed += 1;
                None
            }
        }
    }

    fn free(&mut self, frame: Frame) {
        let base = self.umem.chunk_base(frame.addr);
        self.free.push(base);
    }

    fn send(&mut self, port: PortId, frame: Frame) -> bool {
        let Some(Some(p)) = self.ports.get_mut(port) else {
            self.free(frame);
            return false;
        };
        let Some(idx) = p.sock.tx.reserve(1) else {
            self.stats.tx_ring_full += 1;
            self.free(frame);
            return false;
        };
        p.sock.tx.write(
            idx,
            libc::xdp_desc {
                addr: frame.addr,
                len: frame.len,
                options: 0,
            },
        );
        self.stats.tx_frames += 1;
        true
    }

    fn flush(&mut self) {
        for port in 0..self.ports.len() {
            let Some(p) = self.ports[port].as_mut() else {
                continue;
            };
            p.sock.tx.submit();
            if p.sock.tx.needs_wakeup() && p.sock.tx.outstanding() > 0 {
                for _ in 0..TX_KICKS_PER_FLUSH {
                    let Some(p) = self.ports[port].as_ref() else {
                        break;
                    };
                    let errno = p.sock.kick_tx();
                    self.stats.wakeups += 1;
                    // A full completion ring also stops the kernel with EAGAIN: make room.
                    self.reap(port);
                    // EBUSY, ENOBUFS, ENETDOWN: transient, retried at the next flush.
                    if errno != libc::EAGAIN {
                        break;
                    }
                }
            }
            self.reap(port);
            if self.refill(port) > 0 {
                if let Some(p) = &self.ports[port] {
                    if p.sock.fill.needs_wakeup() {
                        p.sock.kick_rx();
                        self.stats.wakeups += 1;
                    }
                }
            }
        }
    }

    fn wait_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.ports.iter().flatten().map(|p| p.sock.fd()).collect()
    }

    fn tx_pending(&mut self) -> bool {
        self.ports
            .iter_mut()
            .flatten()
            .any(|p| p.sock.tx.outstanding() > 0)
    }

    fn open_port(
        &mut self,
        port: PortId,
        ifindex: u32,
        queue: u32,
    ) -> Result<Option<RawFd>, String> {
        let opened = self.ports.iter().flatten().count() as u32;
        if opened >= self.start_ports + self.cfg.runtime_ports {
            return Err(format!(
                "no chunks for another port: this device was made for {} ports opened at run time",
                self.cfg.runtime_ports
            ));
        }
        let share = (super::RUNTIME_PORT_FRAMES / 2).min(self.cfg.fill_size);
        self.bind(port, ifindex, queue, share)
            .map_err(|e| e.to_string())?;
        self.refill(port);
        Ok(Some(self.socket_fd(port)))
    }

    fn close_port(&mut self, port: PortId) {
        let Some(Some(mut p)) = self.ports.get_mut(port).map(Option::take) else {
            return;
        };
        // Every frame the socket holds comes back: received and not yet taken, completed,
        // lent for receiving and not consumed, queued for transmitting and not consumed.
        // The interface no longer steers to the socket, so the kernel adds nothing more.
        let (first, n) = p.sock.rx.peek(p.sock.rx.size());
        for i in 0..n {
            let base = self
                .umem
                .chunk_base(p.sock.rx.read(first.wrapping_add(i)).addr);
            self.free.push(base);
        }
        p.sock.rx.release();
        let umem = &self.umem;
        let free = &mut self.free;
        p.sock.fill.take_back(|addr| {
            free.push(umem.chunk_base(addr));
        });
        p.sock.tx.take_back(|d| {
            free.push(umem.chunk_base(d.addr));
        });
        // Transmitted but not yet completed: the kernel completes them as their packets
        // are freed, soon; wait a little for that, then count what is still out as lost.
        let until = std::time::Instant::now() + CLOSE_WAIT;
        loop {
            let (first, n) = p.sock.comp.peek(p.sock.comp.size());
            for i in 0..n {
                self.free.push(
                    self.umem
                        .chunk_base(p.sock.comp.read(first.wrapping_add(i))),
                );
            }
            p.sock.comp.release();
            p.completed = p.completed.wrapping_add(n);
            let held = p.sock.tx.consumed().wrapping_sub(p.completed);
            if held == 0 {
                break;
            }
            if std::time::Instant::now() >= until {
                self.stats.frames_lost += u64::from(held);
                break;
            }
            std::thread::yield_now();
        }
        drop(p);
        while self.ports.last().is_some_and(Option::is_none) {
            self.ports.pop();
        }
    }

    fn stats(&self) -> DeviceStats {
        let mut s = self.stats;
        for p in self.ports.iter().flatten() {
            // Not on the hot path; a socket that cannot answer adds nothing.
            if let Ok(k) = p.sock.statistics() {
                s.kernel_rx_dropped += k.rx_dropped;
                s.kernel_rx_ring_full += k.rx_ring_full;
                s.kernel_rx_invalid += k.rx_invalid_descs;
                s.kernel_tx_invalid += k.tx_invalid_descs;
                s.kernel_fill_empty += k.rx_fill_ring_empty_descs;
            }
        }
        s
    }
}
