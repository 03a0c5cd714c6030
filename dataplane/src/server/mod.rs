//! The dataplane's end of the control stream: a Unix socket on which control sends tables
//! and inspection asks for counters.
//!
//! Each connection is served by its own thread; a table is compiled off the workers and
//! swapped in whole, so workers never wait. A control that goes away leaves the tables as
//! they are: forwarding continues until a new control connects and resyncs.
//!
//! This room holds the socket and its connections: binding, one thread per connection,
//! the frame deadline, the one connection that programs the tables, and the two requests
//! that take a connection over (a handover, a flow monitor). Who may connect and do what
//! is [`access`]; what each other request is answered is `answer`.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nat::wire::{self, Message};

use crate::handover::Successor;
use crate::pods::PodPorts;
use crate::state::Shared;

pub mod access;
mod answer;
#[cfg(test)]
mod tests;

use access::Slot;
pub use access::{group_id, user_id, Access, Peer, Privilege, MAX_CONNECTIONS};
pub use answer::handle;

/// What the control socket's server owns beside [`Shared`] (which the workers read): who
/// may do what, the pod interfaces it attaches for kxdp-cni, and where a handover request
/// goes. The binary sets the last two; a dataplane in memory has neither.
#[derive(Default)]
pub struct ServerState {
    /// Who may connect, and do what.
    pub access: Access,
    /// Attaches and detaches pod interfaces at run time (set by the binary, which owns
    /// the interfaces; absent in memory).
    pub pods: OnceLock<PodPorts>,
    /// Where a handover request goes: the process's main thread, which is given the
    /// successor's connection, stops the workers and writes the state on it.
    handover: Mutex<Option<Sender<Successor>>>,
}

impl ServerState {
    /// A server that lets in whom `access` names, with no pod interfaces and no handover
    /// yet.
    pub fn new(access: Access) -> ServerState {
        ServerState {
            access,
            ..ServerState::default()
        }
    }

    /// Sends handover requests to `main` from now on.
    pub fn set_handover(&self, main: Sender<Successor>) {
        *self.handover.lock().unwrap_or_else(PoisonError::into_inner) = Some(main);
    }
}

/// How long a new connection may take to send its first frame, and a frame once begun
/// may pause between two reads: a client that connects and says nothing, or stops halfway
/// through a frame, is cut off. Between whole frames a connection may idle for as long as
/// it likes (kxdp-control waits for the next change).
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// Binds the control socket at `path` (mode 0600: only root may connect) and serves it on a
/// background thread.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    epoch: Instant,
) -> io::Result<std::thread::JoinHandle<()>> {
    serve_with(path, shared, epoch, Arc::new(ServerState::default()))
}

/// The pid of the dataplane serving `path`, if one answers there (`None` when nothing
/// listens: no file, or a file left by a process that is gone).
pub fn live_dataplane(path: &Path) -> io::Result<Option<i32>> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let pid = Peer::of(&s)?.pid;
    // Whoever listens there is alive, whether or not it answers as a dataplane would: it
    // is not this process's to unlink.
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let _ =
        wire::write_message(&mut s, &Message::GetStats).and_then(|_| wire::read_message(&mut s));
    Ok(Some(pid))
}

/// Binds `path`, refusing if a live process serves it already (a stale file is replaced).
fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(pid) = live_dataplane(path)? {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{}: a running dataplane (pid {pid}) serves this control socket; stop it first, or replace it with --takeover",
                path.display()
            ),
        ));
    }
    if path.symlink_metadata().is_ok() {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// [`serve`], with the socket's group (mode 0660 when given), who may do what, and what
/// else `server` holds (pod interfaces, the handover).
pub fn serve_with(
    path: &Path,
    shared: Arc<Shared>,
    epoch: Instant,
    server: Arc<ServerState>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let listener = bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = server.access.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    log::info!("control socket listening on {}", path.display());
    let writer = Arc::new(Writer::default());
    let open: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    std::thread::Builder::new()
        .name("kxdp-control-rx".into())
        .spawn(move || {
            for (id, stream) in (1u64..).zip(listener.incoming()) {
                let mut stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        log::warn!("accept on control socket: {e}");
                        continue;
                    }
                };
                let peer = match Peer::of(&stream) {
                    Ok(peer) => peer,
                    Err(e) => {
                        log::warn!("control connection {id}: no peer credentials ({e}); closed");
                        continue;
                    }
                };
                let class = usize::from(!server.access.trusted(&peer));
                let Some(slot) = Slot::take(&open, class) else {
                    log::warn!(
                        "control connection {id} from pid {} (uid {}) refused: {MAX_CONNECTIONS} connections of its class are open",
                        peer.pid,
                        peer.uid
                    );
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = wire::write_message(
                        &mut stream,
                        &Message::Refused {
                            reason: format!(
                                "too many control connections ({MAX_CONNECTIONS} open); try again later"
                            ),
                        },
                    );
                    continue;
                };
                let shared = shared.clone();
                let writer = writer.clone();
                let server = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("kxdp-control-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        let mut conn = Conn {
                            id,
                            writer: &writer,
                            peer,
                        };
                        if let Err(e) = connection(stream, &shared, epoch, &mut conn, &server) {
                            log::debug!("control connection {id} ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("control connection {id}: no thread for it ({e}); closed");
                }
            }
        })
}

/// The next frame on `stream`; `None` when the peer hung up between frames. Waiting for a
/// frame to start is unbounded except for a connection's `first` frame; once it has
/// started, every read must come within [`FRAME_DEADLINE`].
fn next_message(stream: &mut UnixStream, first: bool) -> io::Result<Option<Message>> {
    stream.set_read_timeout(first.then_some(FRAME_DEADLINE))?;
    let mut byte = [0u8; 1];
    let n = loop {
        match stream.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if n == 0 {
        return Ok(None);
    }
    stream.set_read_timeout(Some(FRAME_DEADLINE))?;
    let msg = wire::read_message(&mut (&byte[..]).chain(&mut *stream));
    stream.set_read_timeout(None)?;
    msg.map(Some)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// told the tables are taken: a restarted control may connect before the dataplane has
/// read its predecessor's end of file.
const WRITER_WAIT: Duration = Duration::from_secs(1);

/// The one connection that programs the tables. Two kxdp-control processes (a stale one
/// and its replacement, or two nodes' configs on one socket) would otherwise replace each
/// other's snapshots forever; the second is answered [`Message::Busy`] instead.
#[derive(Default)]
struct Writer {
    /// The connection holding the tables, and since when.
    held: Mutex<Option<(u64, SystemTime)>>,
    freed: Condvar,
}

/// One connection's claim on the [`Writer`], released when the connection ends.
struct Conn<'a> {
    id: u64,
    writer: &'a Writer,
    peer: Peer,
}

impl Conn<'_> {
    /// Makes this connection the writer, waiting up to [`WRITER_WAIT`] for another to
    /// end; `Err` tells who holds the tables.
    fn claim(&mut self) -> Result<(), String> {
        let held = self
            .writer
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut held, _) = self
            .writer
            .freed
            .wait_timeout_while(held, WRITER_WAIT, |h| {
                h.is_some_and(|(id, _)| id != self.id)
            })
            .unwrap_or_else(PoisonError::into_inner);
        match *held {
            Some((id, since)) if id != self.id => {
                let since = since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                Err(format!(
                    "another kxdp-control (control connection {id}, programming since unix time {since}) holds this dataplane's tables; run one kxdp-control per dataplane and stop the other"
                ))
            }
            Some(_) => Ok(()),
            None => {
                *held = Some((self.id, SystemTime::now()));
                Ok(())
            }
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut held = self
            .writer
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.is_some_and(|(id, _)| id == self.id) {
            *held = None;
            self.writer.freed.notify_all();
        }
    }
}

fn connection(
    mut stream: UnixStream,
    shared: &Shared,
    epoch: Instant,
    conn: &mut Conn<'_>,
    server: &ServerState,
) -> io::Result<()> {
    let mut first = true;
    loop {
        let msg = match next_message(&mut stream, first) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) if timed_out(&e) => {
                log::warn!(
                    "control connection {} from pid {}: no complete frame within {FRAME_DEADLINE:?}; closed",
                    conn.id,
                    conn.peer.pid
                );
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                log::warn!("refusing control message: {e}");
                let _ = wire::write_message(
                    &mut stream,
                    &Message::Refused {
                        reason: e.to_string(),
                    },
                );
                return Err(e);
            }
        };
        first = false;
        if let Err(reason) = server.access.check(&conn.peer, Privilege::required(&msg)) {
            log::warn!(
                "control connection {} from pid {} (uid {}): refused: {reason}",
                conn.id,
                conn.peer.pid,
                conn.peer.uid
            );
            wire::write_message(&mut stream, &Message::Refused { reason })?;
            continue;
        }
        if let Message::Handover { version } = msg {
            return handover(stream, server, version, conn.peer);
        }
        if let Message::Monitor {
            addr,
            port,
            drops_only,
        } = msg
        {
            return monitor(stream, shared, addr, port, drops_only);
        }
        if matches!(msg, Message::AttachPod { .. } | Message::DetachPod { .. }) {
            wire::write_message(
                &mut stream,
                &answer::pod_request(msg, shared, server.pods.get(), epoch),
            )?;
            continue;
        }
        if matches!(msg, Message::Snapshot { .. } | Message::Delta { .. }) {
            if let Err(reason) = conn.claim() {
                log::error!("refusing a table from a second control: {reason}");
                wire::write_message(&mut stream, &Message::Busy { reason })?;
                return Ok(());
            }
        }
        let (answer, retire) = answer::handle_table_or(msg, shared, epoch);
        wire::write_message(&mut stream, &answer)?;
        if retire {
            // After the answer: control's wait (and the network programming latency it
            // measures) ends when the workers use the new tables, not after a sweep of the
            // whole connection table.
            shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
        }
    }
}

/// Hands this process's state to a successor: refused unless it speaks our version and
/// the process can hand over (its main thread listens); then the main thread stops the
/// workers, releases the interfaces and gives the state on `stream`, and waits there for
/// the successor's word (see [`crate::handover`]).
fn handover(
    mut stream: UnixStream,
    server: &ServerState,
    version: u32,
    peer: Peer,
) -> io::Result<()> {
    if version != crate::handover::VERSION {
        log::warn!(
            "refusing a handover to version {version} (this is {}); still forwarding",
            crate::handover::VERSION
        );
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: format!(
                    "handover version {version}, the running dataplane speaks {}; it keeps running",
                    crate::handover::VERSION
                ),
            },
        );
    }
    let main = server
        .handover
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let Some(main) = main else {
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: "this dataplane cannot hand over (no main loop)".into(),
            },
        );
    };
    let successor = Successor { stream, peer };
    if let Err(e) = main.send(successor) {
        let mut answer = e.0.stream;
        return wire::write_message(
            &mut answer,
            &Message::Refused {
                reason: "the dataplane is already handing over".into(),
            },
        );
    }
    Ok(())
}

const MONITOR_WAIT: Duration = Duration::from_secs(1);

/// Streams flow events to a `kxdp monitor` every 50 ms until it hangs up (a write fails).
fn monitor(
    mut stream: UnixStream,
    shared: &Shared,
    addr: Option<std::net::IpAddr>,
    port: Option<u16>,
    drops_only: bool,
) -> io::Result<()> {
    // A monitor that just went away frees its slot as soon as its thread reads the hang-up;
    // one started right after it waits for that instead of being refused.
    let waited = Instant::now();
    while !shared.monitor.subscribe() {
        if waited.elapsed() < MONITOR_WAIT {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: "another kxdp monitor is watching; one at a time".into(),
            },
        );
    }
    struct Unsubscribe<'a>(&'a Shared);
    impl Drop for Unsubscribe<'_> {
        fn drop(&mut self) {
            self.0.monitor.unsubscribe();
        }
    }
    let _watching = Unsubscribe(shared);
    let keep = |e: &nat::wire::FlowEvent| {
        let ends = [Some(e.src), Some(e.dst), e.to, e.masquerade];
        let by_addr = addr.is_none_or(|a| ends.iter().flatten().any(|x| x.0 == a));
        let by_port = port.is_none_or(|p| ends.iter().flatten().any(|x| x.1 == p));
        let kind = !drops_only
            || matches!(
                e.kind,
                nat::wire::EventKind::Drop | nat::wire::EventKind::PolicyDenied
            );
        by_addr && by_port && kind
    };
    // Every 50 ms a batch; in between, a read that returns at once when the reader hangs up.
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut scratch = [0u8; 64];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if timed_out(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let (events, lost) = shared.monitor.drain(crate::monitor::RING * 4);
        let events: Vec<_> = events.into_iter().filter(keep).collect();
        // An empty batch too: it is how a reader that went away is noticed.
        wire::write_message(&mut stream, &Message::FlowEvents { events, lost })?;
    }
}
