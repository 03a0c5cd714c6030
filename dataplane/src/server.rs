//! The dataplane's end of the control stream: a Unix socket on which control sends tables
//! and inspection asks for counters.
//!
//! Each connection is served by its own thread; a table is compiled off the workers and
//! swapped in whole, so workers never wait. A control that goes away leaves the tables as
//! they are: forwarding continues until a new control connects and resyncs.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nat::wire::{self, Message};

use crate::state::{DeltaOutcome, Shared};

/// Who is at the other end of a control connection, as the kernel tells it
/// (`SO_PEERCRED`: the credentials of the process that connected, at the time it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process id (0 when it lives in a PID namespace this one cannot see).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`.
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
        Ok(Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }
}

/// What a request on the control socket may do, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Privilege {
    /// Read counters, tables, connections, flow events, policy verdicts.
    Inspect,
    /// Replace the tables (snapshots and deltas).
    Program,
    /// Stop this process's forwarding and hand its state to a successor.
    Handover,
}

impl Privilege {
    /// What `msg` asks for.
    pub fn required(msg: &Message) -> Privilege {
        match msg {
            Message::Snapshot { .. }
            | Message::Delta { .. }
            | Message::AttachPod { .. }
            | Message::DetachPod { .. } => Privilege::Program,
            Message::Handover { .. } => Privilege::Handover,
            _ => Privilege::Inspect,
        }
    }
}

/// Who may use the control socket, and for what. Connecting at all takes the socket
/// file's permissions: root, and the members of its group when it has one (mode 0660).
/// Whoever connects may inspect; programming the tables is for root and the user
/// kxdp-control runs as; a handover (which stops this process's forwarding) is for root
/// alone. There is no shutdown request: a dataplane stops on SIGTERM, which only root
/// (or the process's own user) can send.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The socket's group (mode 0660 when set, else 0600): its members may connect.
    pub group: Option<u32>,
    /// kxdp-control's user: it may program the tables as well as root.
    pub control_uid: Option<u32>,
}

impl Access {
    /// Whether `peer` may do what `privilege` names; `Err` says why not, for the peer.
    pub fn check(&self, peer: &Peer, privilege: Privilege) -> Result<(), String> {
        let root = peer.uid == 0;
        match privilege {
            Privilege::Inspect => Ok(()),
            Privilege::Program if root || self.control_uid == Some(peer.uid) => Ok(()),
            Privilege::Program => Err(match self.control_uid {
                Some(c) => format!(
                    "user {} may inspect this dataplane but not program it: tables come from root or kxdp-control's user ({c})",
                    peer.uid
                ),
                None => format!(
                    "user {} may inspect this dataplane but not program it: tables come from root (start kxdp-dataplane with --control-user for an unprivileged kxdp-control)",
                    peer.uid
                ),
            }),
            Privilege::Handover if root => Ok(()),
            Privilege::Handover => Err(format!(
                "user {} may not ask for a handover: only root may stop this dataplane's forwarding",
                peer.uid
            )),
        }
    }

    /// Whether `peer` is one of the trusted users (root, kxdp-control's), whose connections
    /// are counted apart from inspection's so that these can never crowd them out.
    fn trusted(&self, peer: &Peer) -> bool {
        self.check(peer, Privilege::Program).is_ok()
    }
}

/// Connections served at once, per class (trusted users, everyone else): each is a thread,
/// and a group member must not be able to make thousands. One kxdp-control, a CNI plugin
/// per pod being set up and a few operators fit easily.
pub const MAX_CONNECTIONS: usize = 64;

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
    serve_with(path, shared, epoch, Access::default())
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

/// [`serve`], with the socket's group (mode 0660 when given) and who may do what.
pub fn serve_with(
    path: &Path,
    shared: Arc<Shared>,
    epoch: Instant,
    access: Access,
) -> io::Result<std::thread::JoinHandle<()>> {
    let listener = bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = access.group {
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
                let class = usize::from(!access.trusted(&peer));
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
                let access = access.clone();
                let spawned = std::thread::Builder::new()
                    .name("kxdp-control-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        let mut conn = Conn {
                            id,
                            writer: &writer,
                            peer,
                        };
                        if let Err(e) = connection(stream, &shared, epoch, &mut conn, &access) {
                            log::debug!("control connection {id} ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("control connection {id}: no thread for it ({e}); closed");
                }
            }
        })
}

/// A connection's place among the [`MAX_CONNECTIONS`] of its class, given back on drop.
struct Slot {
    open: Arc<[AtomicUsize; 2]>,
    class: usize,
}

impl Slot {
    fn take(open: &Arc<[AtomicUsize; 2]>, class: usize) -> Option<Slot> {
        open[class]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            open: open.clone(),
            class,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open[self.class].fetch_sub(1, Ordering::AcqRel);
    }
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

/// How long a second control waits for the first one's connection to close before it is
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
    access: &Access,
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
        if let Err(reason) = access.check(&conn.peer, Privilege::required(&msg)) {
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
            return handover(stream, shared, version, conn.peer);
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
            wire::write_message(&mut stream, &pod_request(msg, shared, epoch))?;
            continue;
        }
        if matches!(msg, Message::Snapshot { .. } | Message::Delta { .. }) {
            if let Err(reason) = conn.claim() {
                log::error!("refusing a table from a second control: {reason}");
                wire::write_message(&mut stream, &Message::Busy { reason })?;
                return Ok(());
            }
        }
        let (answer, retire) = handle_table_or(msg, shared, epoch);
        wire::write_message(&mut stream, &answer)?;
        if retire {
            // After the answer: control's wait (and the network programming latency it
            // measures) ends when the workers use the new tables, not after a sweep of the
            // whole connection table.
            shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
        }
    }
}

/// A CNI plugin's request to attach or detach a pod interface.
fn pod_request(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    let Some(pods) = shared.server.pods.get() else {
        return Message::Refused {
            reason: "this dataplane attaches no pod interfaces at run time".into(),
        };
    };
    match msg {
        Message::AttachPod {
            ifname,
            container_id,
            ips,
        } => match pods.attach(shared, &ifname, &container_id, ips) {
            Ok(_) => Message::PodAttached { ifname },
            Err(reason) => {
                log::warn!("refused to attach {ifname} (container {container_id}): {reason}");
                Message::Refused { reason }
            }
        },
        Message::DetachPod {
            ifname,
            container_id,
        } => match pods.detach(shared, &ifname, epoch.elapsed().as_nanos() as u64) {
            Ok(found) => Message::PodDetached { ifname, found },
            Err(reason) => {
                log::warn!("refused to detach {ifname} (container {container_id}): {reason}");
                Message::Refused { reason }
            }
        },
        other => Message::Refused {
            reason: format!("unexpected message {other:?}"),
        },
    }
}

/// [`handle`], with whether stale flows are to be retired once the answer is out.
fn handle_table_or(msg: Message, shared: &Shared, epoch: Instant) -> (Message, bool) {
    match msg {
        Message::Snapshot { generation, tables } => {
            match install_snapshot(generation, *tables, shared) {
                Ok(answer) => (answer, true),
                Err(answer) => (answer, false),
            }
        }
        Message::Delta {
            generation,
            base,
            delta,
        } => install_delta(generation, base, &delta, shared),
        other => (answer_query(other, shared, epoch), false),
    }
}

fn refuse(shared: &Shared, reason: String) -> Message {
    shared
        .server
        .refused_tables
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log::error!("refusing {reason}; keeping the tables in use");
    Message::Refused { reason }
}

fn install_snapshot(
    generation: u64,
    mut tables: nat::spec::TableSpec,
    shared: &Shared,
) -> Result<Message, Message> {
    tables.sort_services();
    if let Err(reason) = tables.validate() {
        return Err(refuse(
            shared,
            format!("table generation {generation}: {reason}"),
        ));
    }
    let started = Instant::now();
    let services = tables.services.len();
    shared.install_tables(generation, tables);
    log::info!(
        "applied table generation {generation}: {services} service ports in {:?}",
        started.elapsed()
    );
    Ok(Message::Applied { generation })
}

fn install_delta(
    generation: u64,
    base: u64,
    delta: &nat::spec::TableDelta,
    shared: &Shared,
) -> (Message, bool) {
    let started = Instant::now();
    match shared.install_delta(generation, base, delta) {
        Ok(DeltaOutcome::Applied { retire }) => {
            log::debug!(
                "applied table generation {generation} (delta from {base}: {} service ports upserted, {} removed) in {:?}",
                delta.upserted.len(),
                delta.removed.len(),
                started.elapsed()
            );
            (Message::Applied { generation }, retire)
        }
        Ok(DeltaOutcome::Stale { have }) => {
            log::info!(
                "table generation {generation} is a delta from {base}, but generation {have} is in use: asking control for a snapshot"
            );
            (Message::NeedSnapshot { have }, false)
        }
        Err(reason) => (refuse(shared, reason), false),
    }
}

/// Hands this process's state to a successor: refused unless it speaks our version and
/// the process can hand over (its main thread listens); then the main thread stops the
/// workers, releases the interfaces and gives the state on `stream`, and waits there for
/// the successor's word (see [`crate::handover`]).
fn handover(mut stream: UnixStream, shared: &Shared, version: u32, peer: Peer) -> io::Result<()> {
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
    let main = shared
        .server
        .handover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(main) = main else {
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: "this dataplane cannot hand over (no main loop)".into(),
            },
        );
    };
    let successor = crate::handover::Successor { stream, peer };
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

/// How long a new monitor waits for the one before it to go.
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

/// The id of group `name`, from `/etc/group`.
pub fn group_id(name: &str) -> io::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group {name:?} in /etc/group"),
            )
        })
}

/// The id of user `name` (or a number), from `/etc/passwd`.
pub fn user_id(name: &str) -> io::Result<u32> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let users = std::fs::read_to_string("/etc/passwd")?;
    users
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, uid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| uid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user {name:?} in /etc/passwd"),
            )
        })
}

/// Acts on one message and returns the answer (stale flows retired before it, when a
/// table was installed).
pub fn handle(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    let (answer, retire) = handle_table_or(msg, shared, epoch);
    if retire {
        shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
    }
    answer
}

/// The answer to a message that is not a table (tables go to [`handle_table_or`]).
fn answer_query(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    match msg {
        Message::GetStats => Message::Stats {
            generation: shared.tables.load().generation,
            conntrack: shared.conntrack.len(),
            conntrack_capacity: shared.conntrack.capacity(),
            workers: shared.counters.iter().map(|p| p.read().named()).collect(),
            policy_drops: shared.policy_drop_counts(),
            refused_tables: shared
                .server
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
        },
        Message::ExplainPolicy {
            src,
            dst,
            protocol,
            port,
        } => {
            match crate::inspect::explain_policy(&shared.tables.load(), src, dst, protocol, port) {
                Ok(paths) => Message::PolicyExplained { paths },
                Err(e) => Message::Refused {
                    reason: e.to_string(),
                },
            }
        }
        Message::GetServices => {
            let tables = shared.tables.load();
            Message::Services {
                generation: tables.generation,
                services: crate::inspect::services(&tables),
            }
        }
        Message::GetConntrack {
            addr,
            port,
            protocol,
            limit,
        } => {
            let now = epoch.elapsed().as_nanos() as u64;
            let (total, matched, entries) = crate::inspect::conntrack(
                &shared.tables.load(),
                &shared.conntrack,
                now,
                addr,
                port,
                protocol,
                limit,
            );
            Message::Conntrack {
                total,
                matched,
                entries,
            }
        }
        other => Message::Refused {
            reason: format!("unexpected message {other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{PortConfig, PortRole};
    use crate::state::Limits;

    /// Sends a snapshot of `generation` on `s` and returns the answer.
    fn send_snapshot(s: &mut UnixStream, generation: u64) -> Message {
        wire::write_message(
            s,
            &Message::Snapshot {
                generation,
                tables: Box::default(),
            },
        )
        .unwrap();
        wire::read_message(s).unwrap()
    }

    /// A socket path in a fresh folder of its own.
    fn socket_path(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kxdp-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir.join("dataplane.sock")
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn who_may_do_what() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let control = Peer {
            pid: 2,
            uid: 65532,
            gid: 65532,
        };
        let member = Peer {
            pid: 3,
            uid: 1000,
            gid: 65532,
        };
        let access = Access {
            group: Some(65532),
            control_uid: Some(65532),
        };
        let stats = Message::GetStats;
        let table = Message::Snapshot {
            generation: 1,
            tables: Box::default(),
        };
        let handover = Message::Handover { version: 1 };
        let pod = Message::AttachPod {
            ifname: "kxdp0".into(),
            container_id: "c".into(),
            ips: vec![],
        };
        for (peer, msg, allowed) in [
            (root, &stats, true),
            (root, &table, true),
            (root, &handover, true),
            (control, &stats, true),
            (control, &table, true),
            (control, &handover, false),
            (member, &stats, true),
            (member, &table, false),
            (member, &handover, false),
            (root, &pod, true),
            (member, &pod, false),
        ] {
            let verdict = access.check(&peer, Privilege::required(msg));
            assert_eq!(verdict.is_ok(), allowed, "{peer:?} {msg:?}: {verdict:?}");
        }
        // Without --control-user only root programs.
        assert!(Access::default()
            .check(&control, Privilege::Program)
            .unwrap_err()
            .contains("--control-user"));
    }

    /// Runs `frames` through the socket at `path` as user and group 65534 (nobody), one
    /// after the other, and returns the answers.
    fn as_nobody(path: &Path, frames: &[Message]) -> Vec<Message> {
        use std::os::unix::process::CommandExt;
        let hex: Vec<String> = frames
            .iter()
            .map(|m| wire::encode(m).iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        // Frame by frame: write one, read its answer (header, then the announced length).
        let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def exact(n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit('closed')
        b += c
    return b
for frame in sys.argv[2:]:
    s.sendall(bytes.fromhex(frame))
    head = exact(12)
    print((head + exact(struct.unpack('>I', head[8:12])[0])).hex())
"#;
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .args(&hex)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("python3 (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let bytes: Vec<u8> = (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                    .collect();
                wire::read_message(&mut &bytes[..]).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_member_of_the_socket_group_may_inspect_but_neither_program_nor_hand_over() {
        if !is_root() {
            eprintln!("SKIPPED: needs root to run a client as another user");
            return;
        }
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        // What a handover request would reach: the main thread, which stops forwarding.
        let (to_main, at_main) = std::sync::mpsc::channel();
        *shared.server.handover.lock().unwrap() = Some(to_main);
        let path = socket_path("group");
        let access = Access {
            group: Some(65534),
            control_uid: None,
        };
        serve_with(&path, shared.clone(), Instant::now(), access).unwrap();
        let answers = as_nobody(
            &path,
            &[
                Message::GetStats,
                Message::Snapshot {
                    generation: 5,
                    tables: Box::default(),
                },
                Message::Handover {
                    version: crate::handover::VERSION,
                },
                Message::GetServices,
            ],
        );
        assert!(matches!(answers[0], Message::Stats { .. }), "{answers:?}");
        assert!(
            matches!(&answers[1], Message::Refused { reason } if reason.contains("not program")),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[2], Message::Refused { reason } if reason.contains("only root")),
            "{answers:?}"
        );
        assert!(
            matches!(answers[3], Message::Services { .. }),
            "{answers:?}"
        );
        assert!(
            at_main.try_recv().is_err(),
            "a group member's handover request reached the main thread"
        );
        assert_eq!(shared.tables.load().generation, 0, "nothing was programmed");

        // kxdp-control's own user programs.
        let path = socket_path("control-user");
        let access = Access {
            group: Some(65534),
            control_uid: Some(65534),
        };
        serve_with(&path, shared.clone(), Instant::now(), access).unwrap();
        let answers = as_nobody(
            &path,
            &[Message::Snapshot {
                generation: 5,
                tables: Box::default(),
            }],
        );
        assert_eq!(answers, vec![Message::Applied { generation: 5 }]);
        assert!(at_main.try_recv().is_err());
    }

    #[test]
    fn a_second_dataplane_on_a_live_socket_is_refused_and_a_stale_file_replaced() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let path = socket_path("live");
        // A file nobody listens on (a dataplane killed with -9 leaves one).
        drop(UnixListener::bind(&path).unwrap());
        assert_eq!(live_dataplane(&path).unwrap(), None);
        serve(&path, shared.clone(), Instant::now()).unwrap();
        assert_eq!(
            live_dataplane(&path).unwrap(),
            Some(std::process::id() as i32)
        );
        let second = serve(&path, shared.clone(), Instant::now()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
        assert!(
            second
                .to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{second}"
        );
        // The first still answers on its path.
        let mut s = UnixStream::connect(&path).unwrap();
        wire::write_message(&mut s, &Message::GetStats).unwrap();
        assert!(matches!(
            wire::read_message(&mut s).unwrap(),
            Message::Stats { .. }
        ));
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_and_a_freed_slot_is_reused() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let path = socket_path("cap");
        serve(&path, shared, Instant::now()).unwrap();
        let mut idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut over = UnixStream::connect(&path).unwrap();
        over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            matches!(wire::read_message(&mut over), Ok(Message::Refused { reason }) if reason.contains("too many")),
            "connection {} was served",
            MAX_CONNECTIONS + 1
        );
        // One goes: its slot is free again (once the server has read the hang-up).
        idle.pop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // A refused connection may be closed before the request is written.
            let answer = wire::write_message(&mut s, &Message::GetStats)
                .and_then(|()| wire::read_message(&mut s));
            match answer {
                Ok(Message::Stats { .. }) => break,
                other => assert!(Instant::now() < deadline, "{other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_half_sent_frame_is_cut_off_after_the_deadline() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let path = socket_path("half");
        serve(&path, shared, Instant::now()).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        let frame = wire::encode(&Message::GetStats);
        io::Write::write_all(&mut s, &frame[..5]).unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(FRAME_DEADLINE * 3)).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).expect("closed, not timed out");
        assert_eq!(n, 0, "the server answered a half frame");
        let waited = started.elapsed();
        assert!(
            waited >= FRAME_DEADLINE / 2 && waited < FRAME_DEADLINE * 2,
            "{waited:?}"
        );
    }

    #[test]
    fn a_monitor_started_right_after_another_ended_is_served() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let path = socket_path("monitor");
        serve(&path, shared, Instant::now()).unwrap();
        let watch = || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            wire::write_message(
                &mut s,
                &Message::Monitor {
                    addr: None,
                    port: None,
                    drops_only: false,
                },
            )
            .unwrap();
            let first = wire::read_message(&mut s).unwrap();
            (s, first)
        };
        for round in 0..10 {
            let (first, answer) = watch();
            assert!(matches!(answer, Message::FlowEvents { .. }), "{answer:?}");
            drop(first);
            let (_second, answer) = watch();
            assert!(
                matches!(answer, Message::FlowEvents { .. }),
                "round {round}: {answer:?}"
            );
        }
    }

    #[test]
    fn one_control_programs_the_tables_and_a_second_is_told_busy() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let dir = std::env::temp_dir().join(format!("kxdp-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dataplane.sock");
        serve(&path, shared.clone(), Instant::now()).unwrap();
        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(
            send_snapshot(&mut first, 1),
            Message::Applied { generation: 1 }
        );
        // Inspection on another connection is not programming: answered as always.
        let mut cli = UnixStream::connect(&path).unwrap();
        wire::write_message(&mut cli, &Message::GetStats).unwrap();
        assert!(matches!(
            wire::read_message(&mut cli).unwrap(),
            Message::Stats { generation: 1, .. }
        ));
        // A second control is refused (after waiting for the first to go) and closed.
        let mut second = UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        let Message::Busy { reason } = send_snapshot(&mut second, 7) else {
            panic!("a second writer was not told busy");
        };
        assert!(started.elapsed() >= WRITER_WAIT, "{:?}", started.elapsed());
        assert!(reason.contains("another kxdp-control"), "{reason}");
        assert!(
            wire::read_message(&mut second).is_err(),
            "the busy connection is closed"
        );
        assert_eq!(shared.tables.load().generation, 1, "nothing changed");
        // The first one keeps programming.
        assert_eq!(
            send_snapshot(&mut first, 2),
            Message::Applied { generation: 2 }
        );
        // A replacement that connects while its predecessor is still going away waits
        // for it, then takes over.
        let mut third = UnixStream::connect(&path).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(WRITER_WAIT / 4);
            drop(first);
        });
        assert_eq!(
            send_snapshot(&mut third, 1),
            Message::Applied { generation: 1 }
        );
        closer.join().unwrap();
        assert_eq!(shared.tables.load().generation, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_table_that_fails_validation_is_refused_counted_and_changes_nothing() {
        let shared = Shared::new(
            vec![PortConfig {
                name: "up".into(),
                role: PortRole::Uplink,
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
            }],
            1,
            Limits {
                conntrack_capacity: 64,
                affinity_capacity: 16,
                ..Limits::default()
            },
        );
        let epoch = Instant::now();
        let good = nat::spec::TableSpec::default();
        let answer = handle(
            Message::Snapshot {
                generation: 1,
                tables: Box::new(good.clone()),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 1 });
        let mut bad = good;
        bad.cluster.vxlan_vni = 1 << 30;
        let answer = handle(
            Message::Snapshot {
                generation: 2,
                tables: Box::new(bad),
            },
            &shared,
            epoch,
        );
        let Message::Refused { reason } = answer else {
            panic!("{answer:?}");
        };
        assert!(
            reason.contains("generation 2") && reason.contains("VNI"),
            "{reason}"
        );
        assert_eq!(shared.tables.load().generation, 1, "the tables in use stay");
        assert_eq!(
            shared
                .server
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    fn one_service(
        name: &str,
        ip: &str,
        endpoints: &[&str],
    ) -> std::sync::Arc<nat::spec::ServiceSpec> {
        use nat::spec::*;
        let eps: Vec<EndpointSpec> = endpoints
            .iter()
            .map(|e| EndpointSpec {
                ip: e.parse().unwrap(),
                port: 8080,
                local: false,
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect();
        std::sync::Arc::new(ServiceSpec {
            name: name.into(),
            protocol: Protocol::Udp,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: ip.parse().unwrap(),
                port: 53,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        })
    }

    #[test]
    fn deltas_apply_to_their_base_only_and_a_bad_one_changes_nothing() {
        use nat::spec::{TableDelta, TableSpec};
        let shared = Shared::new(
            vec![],
            1,
            Limits {
                conntrack_capacity: 64,
                affinity_capacity: 16,
                ..Limits::default()
            },
        );
        let epoch = Instant::now();
        // A snapshot in any order is put in canonical order.
        let first = TableSpec {
            services: vec![
                one_service("ns/b:dns", "172.30.0.2", &["10.244.1.2"]),
                one_service("ns/a:dns", "172.30.0.1", &["10.244.1.1"]),
            ],
            ..TableSpec::default()
        };
        let answer = handle(
            Message::Snapshot {
                generation: 1,
                tables: Box::new(first),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 1 });
        let before = shared.tables.load_full();
        assert_eq!(before.spec.services[0].name, "ns/a:dns");
        let mut next = before.spec.clone();
        next.services[1] = one_service("ns/b:dns", "172.30.0.2", &["10.244.1.2", "10.244.1.3"]);
        let delta = TableDelta::between(&before.spec, &next);
        assert_eq!(delta.upserted.len(), 1);
        let stale = handle(
            Message::Delta {
                generation: 3,
                base: 2,
                delta: Box::new(delta.clone()),
            },
            &shared,
            epoch,
        );
        assert_eq!(stale, Message::NeedSnapshot { have: 1 });
        let answer = handle(
            Message::Delta {
                generation: 2,
                base: 1,
                delta: Box::new(delta),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 2 });
        let after = shared.tables.load_full();
        assert_eq!(after.spec, next);
        let b = after
            .services
            .frontend(&nat::tables::FrontendKey {
                ip: "172.30.0.2".parse().unwrap(),
                port: 53,
                protocol: nat::spec::Protocol::Udp,
            })
            .and_then(|f| after.services.service(f.service))
            .expect("ns/b");
        assert_eq!(b.cluster.backends.len(), 2);
        // The untouched Service port is the same compiled one.
        assert_eq!(before.services.ids()[0], after.services.ids()[0]);
        // Removing what is not there is refused, counted, and changes nothing.
        let bad = TableDelta {
            removed: vec![nat::spec::ServiceKey {
                name: "ns/zzz:dns".into(),
                protocol: nat::spec::Protocol::Udp,
                ipv6: false,
            }],
            ..TableDelta::default()
        };
        let answer = handle(
            Message::Delta {
                generation: 3,
                base: 2,
                delta: Box::new(bad),
            },
            &shared,
            epoch,
        );
        assert!(
            matches!(&answer, Message::Refused { reason } if reason.contains("ns/zzz:dns")),
            "{answer:?}"
        );
        assert_eq!(shared.tables.load().generation, 2);
        assert_eq!(
            shared
                .server
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
