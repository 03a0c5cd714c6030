//! Handing a running dataplane's state and interfaces to its successor, so that a restart
//! or an upgrade keeps established connections and the interfaces never stop forwarding.
//!
//! The successor (`kxdp-dataplane --takeover`, as root) checks what it can alone — its
//! interfaces, their queues against its workers, the memory its connection table and
//! frames need — and then connects to the running process's control socket and asks for a
//! [`Message::Handover`] of its own [`VERSION`]. The running process refuses a version it
//! does not speak and carries on. Otherwise:
//!
//! 1. The running process, still forwarding, offers its tables and the shape of its rings
//!    ([`Message::HandoverOffer`]: workers, UMEM and ring sizes, interfaces). The
//!    successor installs the tables and prepares all it can: its XDP programs loaded but
//!    not attached, the uplink's filter tables filled, the host redirect attached.
//! 2. The successor asks for the rest ([`Message::HandoverTake`]). When its workers and
//!    ring sizes match the running process's, and the interfaces it serves are among the
//!    running one's, it asks for the rings: the running process stops its workers and
//!    sends its connections and neighbours with every worker's UMEM (a memfd) and AF_XDP
//!    sockets and every interface's XDP link, as descriptors (`SCM_RIGHTS`,
//!    `pktio::fdpass`), with each device's free frames ([`Message::HandoverState`]). The
//!    successor maps the same rings and frames, puts the sockets into its programs' maps,
//!    swaps its programs into the links (`BPF_LINK_UPDATE`: no frame meets an interface
//!    without a program), and starts its workers where the old ones stopped. Frames
//!    arriving meanwhile wait in the rings; none is lost. Otherwise the running process
//!    releases its interfaces (sockets closed, programs detached) before it sends its
//!    state, and the successor attaches them again: packets arriving in between are lost
//!    and TCP retransmits them (a gap of tenths of a second).
//! 3. The running process keeps everything and waits on the same connection for the
//!    successor's word: [`Message::HandoverDone`] once the successor forwards (then it
//!    exits), or [`Message::HandoverAborted`]. Without the word within a deadline, or if
//!    the connection drops, it kills a successor that is still there (it may hold the
//!    interfaces), lets go of everything, attaches again and forwards as before: a
//!    successor killed or failing at any step costs a gap, never the node's forwarding.
//!    A successor that fails before step 2 costs nothing: the running process never
//!    stopped.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use nat::conntrack::{Connection, FlowKey};
use nat::wire::{
    self, HandedConnection, HandedDevice, HandedRings, HandedSocket, Message, RingShape, RingSizes,
};
use pktio::xsk::{DeviceHandover, XskConfig};

use crate::neighbors::Neighbor;
use crate::server::access::Peer;
use crate::state::Shared;

/// How long the running process waits for its successor's word after sending the state.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// A successor's handover request, as the control socket passes it to the main thread.
pub struct Successor {
    /// Its connection.
    pub stream: UnixStream,
    /// Who it is (root: the control socket let nobody else ask).
    pub peer: Peer,
}

/// What the successor said next.
enum Word {
    /// A message other than an abort.
    Said(Message),
    /// It gave up, went away or kept silent: why.
    Failed(String),
}

/// How a handover ended for the running process.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The successor forwards: exit.
    Done,
    /// The successor failed, vanished or kept silent (and is gone now): attach again.
    Resume(String),
}

impl Successor {
    /// Sends the offer with the workers' UMEMs `umems` (the workers still forwarding) and
    /// waits up to `deadline` for the successor's answer: `Ok(rings)`, whether it asks for
    /// the rings in place and can have them (rings whose frames come `stamped` go only to
    /// a successor that says it expects stamps), or `Err` with why it will not take over
    /// (a silent successor is killed).
    pub fn offer(
        &mut self,
        offer: &Message,
        umems: &[std::os::fd::BorrowedFd<'_>],
        stamped: bool,
        deadline: Duration,
    ) -> Result<bool, String> {
        let _ = self.stream.set_write_timeout(Some(deadline));
        if let Err(e) = wire::write_message(&mut self.stream, offer) {
            return Err(format!("the offer could not be sent ({e})"));
        }
        if let Err(e) = pktio::fdpass::send(&self.stream, umems) {
            return Err(format!("the UMEMs could not be sent ({e})"));
        }
        match self.word(deadline) {
            Word::Said(Message::HandoverTake {
                rings,
                stamped: theirs,
            }) => {
                if rings && stamped && theirs != Some(true) {
                    log::warn!("the successor does not expect stamped frames (--measure-ring-wait): it attaches again instead of taking the rings in place");
                    return Ok(false);
                }
                Ok(rings)
            }
            Word::Said(other) => {
                self.kill();
                Err(format!("the successor answered {}", short(&other)))
            }
            Word::Failed(why) => Err(why),
        }
    }

    /// Sends `state` (the workers stopped; with the rings, their descriptors `fds` follow),
    /// then waits up to `deadline` for the successor's word. A successor that says nothing
    /// in time, or says something else, is killed, and waited for until its connection
    /// closes: whatever it had attached is released when it is gone.
    pub fn hand_over(
        mut self,
        state: &Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
        deadline: Duration,
    ) -> Outcome {
        if let Err(e) = wire::write_message(&mut self.stream, state) {
            return Outcome::Resume(format!("the state could not be sent ({e})"));
        }
        if let Err(e) = pktio::fdpass::send(&self.stream, fds) {
            return Outcome::Resume(format!("the rings could not be sent ({e})"));
        }
        match self.word(deadline) {
            Word::Said(Message::HandoverDone) => Outcome::Done,
            Word::Said(other) => {
                self.kill();
                Outcome::Resume(format!("the successor answered {}", short(&other)))
            }
            Word::Failed(why) => Outcome::Resume(why),
        }
    }

    /// The successor's next message; an abort, a silence (the successor killed then) or a
    /// broken connection as [`Word::Failed`].
    fn word(&mut self, deadline: Duration) -> Word {
        let _ = self.stream.set_read_timeout(Some(deadline));
        match wire::read_message(&mut self.stream) {
            Ok(Message::HandoverAborted { reason }) => {
                Word::Failed(format!("the successor gave up: {reason}"))
            }
            Ok(msg) => Word::Said(msg),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.kill();
                Word::Failed(format!("no word from the successor within {deadline:?}"))
            }
            Err(e) => Word::Failed(format!("the successor went away ({e})")),
        }
    }

    /// Kills the successor and waits (up to 5 s) until its end of the connection closes.
    fn kill(&mut self) {
        let pid = self.peer.pid;
        if pid > 0 && pid as u32 != std::process::id() {
            log::warn!(
                "killing the handover successor (pid {pid}) so that its interfaces are free again"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let until = Instant::now() + Duration::from_secs(5);
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 256];
        while Instant::now() < until {
            match io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// A message named for a log line, without its contents.
fn short(msg: &Message) -> String {
    let text = format!("{msg:?}");
    let end = text.find([' ', '{', '(']).unwrap_or(text.len());
    text[..end].to_string()
}

/// The handover format this binary speaks (the table format's version is part of it).
/// 2000s: the rings are offered in place.
pub const VERSION: u32 = 2_000 + nat::spec::SPEC_VERSION;

/// The running process's offer: its tables and `shape`.
pub fn offer(shared: &Shared, shape: RingShape) -> Message {
    let tables = shared.tables.load();
    Message::HandoverOffer {
        version: VERSION,
        generation: tables.generation,
        tables: Box::new(tables.spec.clone()),
        shape,
    }
}

/// The running process's state for its successor (call with the workers stopped), the
/// tables only if they changed since `offered` (their generation in the offer).
pub fn export(shared: &Shared, now: u64, offered: u64, rings: Option<HandedRings>) -> Message {
    let tables = shared.tables.load();
    let connections = shared
        .conntrack
        .entries(now)
        .into_iter()
        .map(|(c, state, expires)| HandedConnection {
            proto: c.original.proto,
            original: (
                c.original.src,
                c.original.dst,
                c.original.sport,
                c.original.dport,
            ),
            reply: (c.reply.src, c.reply.dst, c.reply.sport, c.reply.dport),
            service: c.service,
            policy: c.policy,
            state,
            remaining_ns: expires.saturating_sub(now),
        })
        .collect();
    let ports = shared.ports.load();
    let neighbors = shared
        .neighbors
        .all()
        .into_iter()
        .filter_map(|(ip, n)| Some((ip, ports.get(n.port)?.name.clone(), n.mac)))
        .collect();
    Message::HandoverState {
        version: VERSION,
        generation: tables.generation,
        tables: (tables.generation != offered).then(|| Box::new(tables.spec.clone())),
        connections,
        neighbors,
        rings,
    }
}

/// `Ok` if `version` is this binary's handover format.
fn speaks(version: u32) -> Result<(), String> {
    if version != VERSION {
        return Err(format!(
            "handover version {version}, this binary speaks {VERSION}"
        ));
    }
    Ok(())
}

/// Installs a predecessor's offered tables; returns the shape of its rings.
pub fn import_offer(shared: &Shared, offer: Message, now: u64) -> Result<RingShape, String> {
    let Message::HandoverOffer {
        version,
        generation,
        tables,
        shape,
    } = offer
    else {
        return Err(format!("expected the offer, got {}", short(&offer)));
    };
    speaks(version)?;
    shared.install(generation, *tables, now);
    Ok(shape)
}

/// Installs a predecessor's state; returns how many connections were taken over, and
/// the rings if they were handed.
pub fn import(
    shared: &Shared,
    state: Message,
    now: u64,
) -> Result<(usize, Option<HandedRings>), String> {
    let Message::HandoverState {
        version,
        generation,
        tables,
        connections,
        neighbors,
        rings,
    } = state
    else {
        return Err(format!("expected the handed state, got {}", short(&state)));
    };
    speaks(version)?;
    if let Some(tables) = tables {
        shared.install(generation, *tables, now);
    }
    let key = |proto, t: (std::net::IpAddr, std::net::IpAddr, u16, u16)| FlowKey {
        proto,
        src: t.0,
        dst: t.1,
        sport: t.2,
        dport: t.3,
    };
    let mut taken = 0;
    for c in connections {
        let conn = Connection {
            original: key(c.proto, c.original),
            reply: key(c.proto, c.reply),
            service: c.service,
            policy: c.policy,
        };
        if shared
            .conntrack
            .insert_with_state(conn, c.state, now, c.remaining_ns.max(1))
            .is_ok()
        {
            taken += 1;
        }
    }
    let ports = shared.ports.load();
    for (ip, port_name, mac) in neighbors {
        if let Some(port) = ports.position(&port_name) {
            shared.neighbors.learn(ip, Neighbor { port, mac }, now);
        }
    }
    Ok((taken, rings))
}

/// Descriptors the handed `rings` come with: each device's sockets, each link.
pub fn descriptor_count(rings: &HandedRings) -> usize {
    rings.devices.iter().map(|d| d.sockets.len()).sum::<usize>() + rings.links.len()
}

/// A device's sizes as they travel.
pub fn ring_sizes(cfg: &XskConfig) -> RingSizes {
    RingSizes {
        frame_count: cfg.frame_count,
        frame_size: cfg.frame_size,
        rx_size: cfg.rx_size,
        tx_size: cfg.tx_size,
        fill_size: cfg.fill_size,
        comp_size: cfg.comp_size,
        zero_copy: cfg.zero_copy,
        runtime_ports: cfg.runtime_ports,
        stamped: cfg.stamped,
    }
}

/// A device's sizes as pktio takes them.
pub fn xsk_config(s: &RingSizes) -> XskConfig {
    XskConfig {
        frame_count: s.frame_count,
        frame_size: s.frame_size,
        rx_size: s.rx_size,
        tx_size: s.tx_size,
        fill_size: s.fill_size,
        comp_size: s.comp_size,
        zero_copy: s.zero_copy,
        runtime_ports: s.runtime_ports,
        stamped: s.stamped,
    }
}

/// A worker's device as it travels.
pub fn handed_device(d: DeviceHandover) -> HandedDevice {
    HandedDevice {
        sizes: ring_sizes(&d.cfg),
        fill_share: d.fill_share,
        start_ports: d.start_ports,
        sockets: d
            .sockets
            .iter()
            .map(|s| HandedSocket {
                ifindex: s.ifindex,
                queue: s.queue,
                completed: s.completed,
                fill_share: s.fill_share,
            })
            .collect(),
        free: runs(d.free, d.cfg.frame_size),
    }
}

/// `free`'s chunks (of `size` bytes) as runs of consecutive ones: first offset and count.
fn runs(mut free: Vec<u64>, size: u32) -> Vec<(u64, u32)> {
    free.sort_unstable();
    let size = u64::from(size);
    let mut out: Vec<(u64, u32)> = Vec::new();
    for chunk in free {
        match out.last_mut() {
            Some((first, n)) if *first + u64::from(*n) * size == chunk => *n += 1,
            _ => out.push((chunk, 1)),
        }
    }
    out
}

/// The chunks of `runs` (of `size` bytes each), one by one, at most `at_most` of them.
fn chunks(runs: &[(u64, u32)], size: u32, at_most: usize) -> Vec<u64> {
    let size = u64::from(size);
    runs.iter()
        .flat_map(|&(first, n)| (0..u64::from(n)).map(move |i| first.saturating_add(i * size)))
        .take(at_most)
        .collect()
}

/// A worker's device as pktio takes it over.
pub fn device_handover(d: HandedDevice) -> DeviceHandover {
    // More chunks than the UMEM holds are refused by pktio; a bad count stops here.
    let at_most = xsk_config(&d.sizes).umem_frames() as usize + 1;
    DeviceHandover {
        cfg: xsk_config(&d.sizes),
        fill_share: d.fill_share,
        start_ports: d.start_ports,
        sockets: d
            .sockets
            .iter()
            .map(|s| pktio::xsk::HandedSocket {
                ifindex: s.ifindex,
                queue: s.queue,
                completed: s.completed,
                fill_share: s.fill_share,
            })
            .collect(),
        free: chunks(&d.free, d.sizes.frame_size, at_most),
    }
}

/// The successor's end of a handover: the connection on which the running process waits
/// for its word.
pub struct Predecessor {
    stream: UnixStream,
    /// Its process id (0 when not visible from here).
    pub pid: i32,
}

impl Predecessor {
    /// The running process's offer (it still forwards), with its workers' UMEMs.
    pub fn offer(&mut self) -> Result<(Message, Vec<OwnedFd>), String> {
        let offer = match wire::read_message(&mut self.stream)
            .map_err(|e| format!("reading the offer: {e}"))?
        {
            Message::Refused { reason } => {
                return Err(format!("the running dataplane refused: {reason}"))
            }
            m => m,
        };
        let count = match &offer {
            Message::HandoverOffer { shape, .. } => shape.workers as usize,
            _ => 0,
        };
        let umems = pktio::fdpass::recv(&self.stream, count)
            .map_err(|e| format!("receiving the UMEMs: {e}"))?;
        Ok((offer, umems))
    }

    /// Asks for the state, with the rings in place or not (for devices that expect
    /// `stamped` frames or not); returns it, with the rings' descriptors when they came
    /// (the running process has stopped forwarding once this returns `Ok`, and without
    /// the rings released its interfaces).
    pub fn take(&mut self, rings: bool, stamped: bool) -> Result<(Message, Vec<OwnedFd>), String> {
        let take = Message::HandoverTake {
            rings,
            stamped: Some(stamped),
        };
        wire::write_message(&mut self.stream, &take)
            .map_err(|e| format!("asking for the state: {e}"))?;
        let state = wire::read_message(&mut self.stream)
            .map_err(|e| format!("reading the handed state: {e}"))?;
        let count = match &state {
            Message::HandoverState {
                rings: Some(rings), ..
            } => descriptor_count(rings),
            _ => 0,
        };
        let fds = pktio::fdpass::recv(&self.stream, count)
            .map_err(|e| format!("receiving the rings: {e}"))?;
        Ok((state, fds))
    }

    /// Tells the running process that this one forwards, and waits (up to
    /// [`DEFAULT_DEADLINE`]) until it has exited: its control socket is free then.
    pub fn done(mut self) -> Result<(), String> {
        wire::write_message(&mut self.stream, &Message::HandoverDone)
            .map_err(|e| format!("telling the running dataplane we forward: {e}"))?;
        let _ = self.stream.set_read_timeout(Some(DEFAULT_DEADLINE));
        let mut buf = [0u8; 256];
        loop {
            match io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("waiting for the running dataplane to exit: {e}")),
            }
        }
    }

    /// Tells the running process to carry on (call after releasing every interface).
    pub fn abort(mut self, reason: &str) {
        let _ = wire::write_message(
            &mut self.stream,
            &Message::HandoverAborted {
                reason: reason.to_string(),
            },
        );
    }
}

/// Asks the dataplane at `socket` to hand over, as a successor speaking `version`; the
/// state follows with [`Predecessor::state`].
pub fn request(socket: &Path, version: u32) -> Result<Predecessor, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "connect to the running dataplane at {}: {e}",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let pid = Peer::of(&stream).map(|p| p.pid).unwrap_or(0);
    wire::write_message(&mut stream, &Message::Handover { version }).map_err(|e| e.to_string())?;
    Ok(Predecessor { stream, pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_chunks_travel_as_runs_and_come_back_the_same() {
        let free = vec![4096 * 7, 0, 4096, 4096 * 2, 4096 * 9, 4096 * 8];
        let r = runs(free.clone(), 4096);
        assert_eq!(r, vec![(0, 3), (4096 * 7, 3)]);
        let mut back = chunks(&r, 4096, usize::MAX);
        let mut want = free;
        back.sort_unstable();
        want.sort_unstable();
        assert_eq!(back, want);
        // A count beyond reason is cut short, not expanded.
        assert_eq!(chunks(&[(0, u32::MAX)], 4096, 10).len(), 10);
    }

    #[test]
    fn stamped_rings_go_in_place_only_to_a_successor_that_expects_stamps() {
        use std::os::fd::AsFd;
        // What a successor older than stamping sends: no `stamped` at all.
        let old = wire::encode(&Message::HandoverTake {
            rings: true,
            stamped: None,
        });
        let text =
            String::from_utf8_lossy(&old[wire::HEADER_LEN..]).replace(",\"stamped\":null", "");
        let old_take: Message = serde_json::from_str(&text).unwrap();
        assert!(
            matches!(
                old_take,
                Message::HandoverTake {
                    rings: true,
                    stamped: None
                }
            ),
            "{text}"
        );
        for (ours, theirs, in_place) in [
            (true, None, false),
            (true, Some(false), false),
            (true, Some(true), true),
            (false, None, true),
            (false, Some(false), true),
        ] {
            let (here, there) = UnixStream::pair().unwrap();
            let fake = std::thread::spawn(move || {
                let mut there = there;
                wire::read_message(&mut there).unwrap();
                pktio::fdpass::recv(&there, 1).unwrap();
                let take = Message::HandoverTake {
                    rings: true,
                    stamped: theirs,
                };
                wire::write_message(&mut there, &take).unwrap();
            });
            let mut successor = Successor {
                stream: here,
                peer: Peer {
                    pid: 0,
                    uid: 0,
                    gid: 0,
                },
            };
            let umem = std::fs::File::open("/dev/null").unwrap();
            let got = successor.offer(
                &Message::GetStats,
                &[umem.as_fd()],
                ours,
                Duration::from_secs(5),
            );
            fake.join().unwrap();
            assert_eq!(got, Ok(in_place), "stamped here {ours}, there {theirs:?}");
        }
    }
}
