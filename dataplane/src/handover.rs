//! Handing a running dataplane's state to its successor, so that a restart or an upgrade
//! keeps established connections.
//!
//! Two phases, so that a successor that fails never leaves the node without a dataplane:
//!
//! 1. The successor (`kxdp-dataplane --takeover`, as root) checks what it can alone — its
//!    interfaces, their queues against its workers, the memory its connection table and
//!    frames need — and then connects to the running process's control socket and asks
//!    for a [`Message::Handover`] of its own [`VERSION`]. The running process refuses a
//!    version it does not speak and carries on.
//! 2. Otherwise the running process stops its workers, closes its AF_XDP sockets, detaches
//!    its XDP programs (an interface takes one program and a queue one socket), and sends
//!    its tables, connections and neighbours ([`Message::HandoverState`]). It keeps all of
//!    them and waits on the same connection for the successor's word:
//!    [`Message::HandoverDone`] once the successor's workers forward on every interface
//!    (then it exits), or [`Message::HandoverAborted`]. Without the word within a deadline,
//!    or if the connection drops, it kills a successor that is still there (it may hold
//!    the interfaces), attaches again and forwards as before: a successor killed or failing
//!    at any step costs a gap, never the node's forwarding.
//!
//! Packets arriving while the interfaces belong to nobody are lost, and TCP retransmits
//! them; the gap is logged.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nat::conntrack::{Connection, FlowKey};
use nat::wire::{self, HandedConnection, Message};

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

/// How a handover ended for the running process.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The successor forwards: exit.
    Done,
    /// The successor failed, vanished or kept silent (and is gone now): attach again.
    Resume(String),
}

impl Successor {
    /// Sends `state` (the workers stopped and the interfaces released), then waits up to
    /// `deadline` for the successor's word. A successor that says nothing in time, or says
    /// something else, is killed, and waited for until its connection closes: whatever it
    /// had attached is released when it is gone.
    pub fn hand_over(mut self, state: &Message, deadline: Duration) -> Outcome {
        // A successor that does not read blocks the write no longer than the deadline.
        let _ = self.stream.set_write_timeout(Some(deadline));
        if let Err(e) = wire::write_message(&mut self.stream, state) {
            return Outcome::Resume(format!("the state could not be sent ({e})"));
        }
        let _ = self.stream.set_read_timeout(Some(deadline));
        let why = match wire::read_message(&mut self.stream) {
            Ok(Message::HandoverDone) => return Outcome::Done,
            Ok(Message::HandoverAborted { reason }) => {
                return Outcome::Resume(format!("the successor gave up: {reason}"));
            }
            Ok(other) => format!("the successor answered {}", short(&other)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                format!("no word from the successor within {deadline:?}")
            }
            Err(e) => return Outcome::Resume(format!("the successor went away ({e})")),
        };
        self.kill();
        Outcome::Resume(why)
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
pub const VERSION: u32 = 1_000 + nat::spec::SPEC_VERSION;

/// The running process's state, for its successor (call with the workers stopped).
pub fn export(shared: &Shared, now: u64) -> Message {
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
        tables: Box::new(tables.spec.clone()),
        connections,
        neighbors,
    }
}

/// Installs a predecessor's state; returns how many connections were taken over.
pub fn import(shared: &Shared, state: Message, now: u64) -> Result<usize, String> {
    let Message::HandoverState {
        version,
        generation,
        tables,
        connections,
        neighbors,
    } = state
    else {
        return Err(format!("expected the handed state, got {state:?}"));
    };
    if version != VERSION {
        return Err(format!(
            "handover version {version}, this binary speaks {VERSION}"
        ));
    }
    shared.install(generation, *tables, now);
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
    Ok(taken)
}

/// The successor's end of a handover: the connection on which the running process waits
/// for its word.
pub struct Predecessor {
    stream: UnixStream,
    /// Its process id (0 when not visible from here).
    pub pid: i32,
}

impl Predecessor {
    /// The running process's state (it has stopped forwarding when this returns `Ok`).
    pub fn state(&mut self) -> Result<Message, String> {
        match wire::read_message(&mut self.stream)
            .map_err(|e| format!("reading the handed state: {e}"))?
        {
            Message::Refused { reason } => Err(format!("the running dataplane refused: {reason}")),
            m => Ok(m),
        }
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
