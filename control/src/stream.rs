//! The client end of the control stream: sends the latest tables to `kxdp-dataplane` and
//! waits until they are applied.
//!
//! The stream holds one table, the latest ([`Stream::publish`]); [`Stream::sync`] makes
//! sure the dataplane at the other end has it. On a new connection the whole table goes
//! (`Snapshot`); after that only what changed since the table the dataplane acknowledged on
//! this connection (`Delta`, [`nat::spec::TableDelta::between`]), so one EndpointSlice
//! change costs the bytes and the compile of one Service port whatever the table's size.
//! A dataplane that answers a delta with `NeedSnapshot` (it restarted, or was handed over,
//! and has another generation) gets the snapshot at once. A broken connection (the
//! dataplane restarted, or was not up yet) is re-established with exponential backoff and
//! the latest table is sent whole again — the dataplane keeps forwarding with its old
//! tables meanwhile, so nothing is lost by waiting. Plain blocking `std::os::unix::net`:
//! one request, one answer, no runtime needed.
//!
//! What computes the tables and acts on the dataplane's answers is the
//! [`Programmer`](crate::programmer::Programmer); what drives it from the API source is
//! [`follow`](crate::follow::follow).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctlclient::Client;
use nat::spec::TableSpec;
use nat::wire::{self, Message};

/// First wait after a failed connection. Short, because the usual cause is a dataplane that
/// is just starting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts: a dataplane that comes back is reprogrammed within this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the dataplane may take to answer a snapshot. Compiling 100k Service ports takes
/// seconds; a dead peer is noticed by the socket, not by this.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the latest snapshot is not (yet) applied.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The socket cannot be connected to.
    #[error("control socket {}: cannot connect: {source} (is kxdp-dataplane running with this --socket?); retrying in {retry:?}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
        /// When the next attempt is made.
        retry: Duration,
    },
    /// The connection broke while sending or waiting for the answer.
    #[error("control socket {}: connection lost: {source}; reconnecting in {retry:?}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
        /// When the next attempt is made.
        retry: Duration,
    },
    /// The dataplane refused the snapshot; it keeps its previous tables.
    #[error("the dataplane refused generation {generation}: {reason}; it keeps its previous tables until a corrected snapshot is sent")]
    Refused {
        /// The generation sent.
        generation: u64,
        /// The dataplane's reason.
        reason: String,
    },
    /// Another kxdp-control programs this dataplane; it is asked again after `retry`.
    #[error("control socket {}: {reason}; asking again in {retry:?}", .path.display())]
    Busy {
        /// The socket path.
        path: PathBuf,
        /// The dataplane's words: who holds its tables.
        reason: String,
        /// When the next attempt is made.
        retry: Duration,
    },
    /// The dataplane answered something other than `Applied` for this generation.
    #[error("the dataplane answered generation {generation} with {answer}: is it a kxdp-dataplane of this release? reconnecting")]
    Unexpected {
        /// The generation sent.
        generation: u64,
        /// The answer, debug-printed.
        answer: String,
    },
}

/// Whether a failure to connect to the socket stays until someone changes something (a
/// permission, the path) rather than until the dataplane starts: permission refused
/// (EACCES, EPERM), a path too long for a socket address, a path through a file or a
/// symbolic link loop. A missing socket or a refused connection (the dataplane not up
/// yet, or restarting) is not.
pub fn connect_error_is_permanent(e: &io::Error) -> bool {
    // ENOTDIR, ELOOP, ENAMETOOLONG.
    const PERMANENT_ERRNOS: [i32; 3] = [20, 40, 36];
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
    ) || e
        .raw_os_error()
        .is_some_and(|n| PERMANENT_ERRNOS.contains(&n))
}

/// The socket cannot be connected to until someone changes something
/// ([`connect_error_is_permanent`]): what `--once` stops with.
#[derive(Debug, thiserror::Error)]
#[error("control socket {}: cannot connect: {error}{}", .path.display(), hint(.error))]
pub struct Unreachable {
    /// The socket path.
    pub path: PathBuf,
    /// Why.
    pub error: io::Error,
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "; run kxdp-control as a user the socket lets in (root, or the dataplane's socket group)"
        }
        _ => "; check --socket",
    }
}

impl StreamError {
    /// The error as [`Unreachable`] when it is a connect error that trying again will not
    /// mend; else itself.
    pub fn into_unreachable(self) -> Result<Unreachable, StreamError> {
        match self {
            StreamError::Connect { path, source, .. } if connect_error_is_permanent(&source) => {
                Ok(Unreachable {
                    path,
                    error: source,
                })
            }
            other => Err(other),
        }
    }
}

/// What [`Stream::sync`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing has been published yet.
    Idle,
    /// The dataplane just applied this generation.
    Applied(u64),
    /// The dataplane already had the latest generation.
    UpToDate(u64),
    /// Backing off after a failure; the next attempt is due in this long.
    Waiting(Duration),
    /// The dataplane refused the latest generation (reported once as an error); waiting
    /// for a new one.
    Refused(u64),
}

/// The latest table.
struct Latest {
    generation: u64,
    tables: Arc<TableSpec>,
}

/// How a table went to the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Whole.
    Snapshot {
        /// Frame bytes.
        bytes: usize,
    },
    /// As the changes since the table the dataplane had.
    Delta {
        /// Frame bytes.
        bytes: usize,
    },
}

/// How many [`Sent`] records a stream keeps for [`Stream::take_sent`] when nobody takes
/// them.
const SENT_KEPT: usize = 64;

/// A connection to the dataplane's control socket that is re-established on demand.
pub struct Stream {
    path: PathBuf,
    conn: Option<Client>,
    latest: Option<Latest>,
    /// The generation the dataplane at the other end of `conn` applied, and its table:
    /// the base of the next delta.
    applied: Option<(u64, Arc<TableSpec>)>,
    refused: Option<u64>,
    /// What the last exchanges sent, oldest first; taken by [`Stream::take_sent`].
    sent: Vec<Sent>,
    backoff: Duration,
    retry_at: Option<Instant>,
    answer_timeout: Duration,
    round_trip: Option<Duration>,
}

impl Stream {
    /// A stream to the socket at `path`; nothing is connected until there is something to
    /// send.
    pub fn new(path: &Path) -> Stream {
        Stream {
            path: path.to_owned(),
            conn: None,
            latest: None,
            applied: None,
            refused: None,
            backoff: BACKOFF_MIN,
            retry_at: None,
            answer_timeout: ANSWER_TIMEOUT,
            round_trip: None,
            sent: Vec::new(),
        }
    }

    /// What was sent since the last call (snapshots and deltas with their sizes).
    pub fn take_sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.sent)
    }

    /// Sets how long to wait for the dataplane's answer (default [`ANSWER_TIMEOUT`]).
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Stream {
        self.answer_timeout = timeout;
        self
    }

    /// How long the last applied snapshot took from sending to the dataplane's answer.
    pub fn last_round_trip(&self) -> Option<Duration> {
        self.round_trip
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `tables` the table to keep the dataplane at, as `generation` (which should
    /// grow with every new table). Sends nothing: [`Stream::sync`] does. The Service ports
    /// are shared, not copied.
    pub fn publish(&mut self, generation: u64, tables: &TableSpec) {
        self.publish_shared(generation, Arc::new(tables.clone()));
    }

    /// [`Stream::publish`] of a table the caller keeps too: not even the list of Service
    /// ports is copied.
    pub fn publish_shared(&mut self, generation: u64, tables: Arc<TableSpec>) {
        self.latest = Some(Latest { generation, tables });
        self.refused = None;
        // A new table is worth an attempt now, whatever the backoff said.
        self.retry_at = None;
    }

    /// Brings the dataplane to the latest snapshot if it is not there: notices a connection
    /// the dataplane closed, reconnects (at most once per backoff interval), sends and
    /// waits for the answer. Cheap when nothing changed: one non-blocking read.
    pub fn sync(&mut self) -> Result<Progress, StreamError> {
        let Some(generation) = self.latest.as_ref().map(|s| s.generation) else {
            return Ok(Progress::Idle);
        };
        if self.conn.is_some() && !self.alive() {
            log::info!(
                "control socket {}: the dataplane closed the connection; reconnecting",
                self.path.display()
            );
            self.disconnect();
        }
        if self.refused == Some(generation) {
            return Ok(Progress::Refused(generation));
        }
        if self.conn.is_some() && self.applied.as_ref().map(|a| a.0) == Some(generation) {
            return Ok(Progress::UpToDate(generation));
        }
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if now < at {
                return Ok(Progress::Waiting(at - now));
            }
        }
        if self.conn.is_none() {
            match Client::connect(&self.path) {
                Ok(c) => self.conn = Some(c),
                Err(source) => {
                    let retry = self.back_off();
                    return Err(StreamError::Connect {
                        path: self.path.clone(),
                        source,
                        retry,
                    });
                }
            }
        }
        let started = Instant::now();
        match self.exchange() {
            Ok(Message::Applied { generation: g }) if g == generation => {
                self.round_trip = Some(started.elapsed());
                let tables = self.latest.as_ref().map(|l| l.tables.clone());
                self.applied = tables.map(|t| (g, t));
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                Ok(Progress::Applied(g))
            }
            Ok(Message::Refused { reason }) => {
                self.refused = Some(generation);
                Err(StreamError::Refused { generation, reason })
            }
            Ok(Message::Busy { reason }) => {
                self.disconnect();
                let retry = self.back_off();
                Err(StreamError::Busy {
                    path: self.path.clone(),
                    reason,
                    retry,
                })
            }
            Ok(other) => {
                self.disconnect();
                self.back_off();
                Err(StreamError::Unexpected {
                    generation,
                    answer: format!("{other:?}"),
                })
            }
            Err(source) => {
                self.disconnect();
                let retry = self.back_off();
                Err(StreamError::Io {
                    path: self.path.clone(),
                    source,
                    retry,
                })
            }
        }
    }

    /// Publishes `tables` and retries [`Stream::sync`] until the dataplane applied them,
    /// refused them, or `deadline` passed (then the last error is returned). Failures
    /// before that are logged.
    pub fn send(
        &mut self,
        generation: u64,
        tables: &TableSpec,
        deadline: Option<Instant>,
    ) -> Result<(), StreamError> {
        self.publish(generation, tables);
        let mut last_error = None;
        loop {
            match self.sync() {
                Ok(Progress::Applied(_)) | Ok(Progress::UpToDate(_)) | Ok(Progress::Idle) => {
                    return Ok(())
                }
                Ok(Progress::Refused(g)) => {
                    return Err(StreamError::Refused {
                        generation: g,
                        reason: "refused before".into(),
                    })
                }
                Ok(Progress::Waiting(wait)) => {
                    let wait = match (deadline, last_error.take()) {
                        (Some(d), Some(e)) if Instant::now() + wait >= d => return Err(e),
                        (_, e) => {
                            last_error = e;
                            wait
                        }
                    };
                    std::thread::sleep(wait);
                }
                Err(e @ StreamError::Refused { .. }) => return Err(e),
                Err(e) => {
                    log::warn!("{e}");
                    last_error = Some(e);
                }
            }
        }
    }

    /// Sends the latest table (as a delta when the dataplane on this connection has
    /// acknowledged one, else whole) and reads the answer; a `NeedSnapshot` answer to a
    /// delta is followed by the snapshot at once.
    fn exchange(&mut self) -> io::Result<Message> {
        let answer = self.send_latest(true)?;
        if let Message::NeedSnapshot { have } = answer {
            log::info!(
                "control socket {}: the dataplane has generation {have}, not the delta's base; sending the whole table",
                self.path.display()
            );
            self.applied = None;
            return self.send_latest(false);
        }
        Ok(answer)
    }

    fn send_latest(&mut self, delta_ok: bool) -> io::Result<Message> {
        let (Some(conn), Some(latest)) = (self.conn.as_mut(), self.latest.as_ref()) else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "not connected"));
        };
        let (frame, sent) = match self.applied.as_ref().filter(|_| delta_ok) {
            Some((base, have)) => {
                let delta = nat::spec::TableDelta::between(have, &latest.tables);
                let frame = wire::encode(&Message::Delta {
                    generation: latest.generation,
                    base: *base,
                    delta: Box::new(delta),
                });
                let bytes = frame.len();
                (frame, Sent::Delta { bytes })
            }
            None => {
                let frame = wire::encode(&Message::Snapshot {
                    generation: latest.generation,
                    tables: Box::new(TableSpec::clone(&latest.tables)),
                });
                let bytes = frame.len();
                (frame, Sent::Snapshot { bytes })
            }
        };
        conn.set_timeout(self.answer_timeout)?;
        conn.send_frame(&frame)?;
        if self.sent.len() >= SENT_KEPT {
            self.sent.remove(0);
        }
        self.sent.push(sent);
        conn.read()
    }

    /// Whether the idle connection is still open ([`Client::alive`]).
    fn alive(&mut self) -> bool {
        self.conn.as_mut().is_some_and(Client::alive)
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.applied = None;
    }

    /// Schedules the next attempt and doubles the interval; returns the wait.
    fn back_off(&mut self) -> Duration {
        let wait = self.backoff;
        self.retry_at = Some(Instant::now() + wait);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kxdp-control-{name}-{}.sock", std::process::id()))
    }

    /// A dataplane that answers each table with `answer(generation)` and reports the
    /// generations it saw; it drops each connection after `per_conn` messages.
    fn fake_dataplane(
        path: &Path,
        per_conn: usize,
        answer: fn(u64) -> Message,
    ) -> mpsc::Receiver<u64> {
        let (tx, rx) = mpsc::channel();
        let seen = fake_dataplane_of(path, per_conn, move |m| {
            let g = match m {
                Message::Snapshot { generation, .. } | Message::Delta { generation, .. } => {
                    *generation
                }
                _ => return None,
            };
            let _ = tx.send(g);
            Some(answer(g))
        });
        std::mem::forget(seen);
        rx
    }

    /// A dataplane that answers each message with `answer` (or hangs up on `None`) and
    /// reports every message; it drops each connection after `per_conn` messages.
    fn fake_dataplane_of(
        path: &Path,
        per_conn: usize,
        mut answer: impl FnMut(&Message) -> Option<Message> + Send + 'static,
    ) -> mpsc::Receiver<Message> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                for _ in 0..per_conn {
                    let Ok(msg) = wire::read_message(&mut conn) else {
                        break;
                    };
                    let Some(reply) = answer(&msg) else { break };
                    if tx.send(msg).is_err() {
                        return;
                    }
                    let _ = wire::write_message(&mut conn, &reply);
                }
            }
        });
        rx
    }

    fn table_with(names: &[&str]) -> TableSpec {
        let mut t = TableSpec::default();
        for n in names {
            t.services.push(Arc::new(nat::spec::ServiceSpec {
                name: (*n).into(),
                protocol: nat::spec::Protocol::Tcp,
                ..nat::spec::ServiceSpec::default()
            }));
        }
        t
    }

    #[test]
    fn after_the_first_snapshot_only_deltas_go_until_the_dataplane_loses_step() {
        let path = socket_path("deltas");
        // Answers deltas with NeedSnapshot once, when told to (a restarted dataplane).
        let lose_step = Arc::new(AtomicBool::new(false));
        let lose = lose_step.clone();
        let seen = fake_dataplane_of(&path, usize::MAX, move |m| {
            Some(match m {
                Message::Delta { .. } if lose.swap(false, Ordering::SeqCst) => {
                    Message::NeedSnapshot { have: 0 }
                }
                Message::Snapshot { generation, .. } | Message::Delta { generation, .. } => {
                    Message::Applied {
                        generation: *generation,
                    }
                }
                _ => return None,
            })
        });
        let mut s = Stream::new(&path);
        let first = table_with(&["a/x:p", "a/y:p"]);
        s.send(1, &first, None).expect("applied");
        assert!(matches!(
            seen.recv().unwrap(),
            Message::Snapshot { generation: 1, .. }
        ));
        let second = table_with(&["a/x:p", "a/z:p"]);
        s.send(2, &second, None).expect("applied");
        match seen.recv().unwrap() {
            Message::Delta {
                generation: 2,
                base: 1,
                delta,
            } => {
                assert_eq!(delta.removed.len(), 1);
                assert_eq!(delta.removed[0].name, "a/y:p");
                assert_eq!(delta.upserted.len(), 1);
                assert_eq!(delta.upserted[0].name, "a/z:p");
            }
            other => panic!("{other:?}"),
        }
        lose_step.store(true, Ordering::SeqCst);
        s.send(3, &first, None).expect("applied after a snapshot");
        assert!(matches!(
            seen.recv().unwrap(),
            Message::Delta {
                generation: 3,
                base: 2,
                ..
            }
        ));
        assert!(matches!(
            seen.recv().unwrap(),
            Message::Snapshot { generation: 3, .. }
        ));
        let sent = s.take_sent();
        assert!(matches!(
            sent.as_slice(),
            [
                Sent::Snapshot { .. },
                Sent::Delta { .. },
                Sent::Delta { .. },
                Sent::Snapshot { .. }
            ]
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn applied_then_up_to_date() {
        let path = socket_path("applied");
        let seen = fake_dataplane(&path, usize::MAX, |generation| Message::Applied {
            generation,
        });
        let mut s = Stream::new(&path);
        assert_eq!(s.sync().expect("nothing to do"), Progress::Idle);
        s.send(1, &TableSpec::default(), None).expect("applied");
        assert_eq!(seen.recv().expect("seen"), 1);
        assert_eq!(s.sync().expect("idle"), Progress::UpToDate(1));
        s.publish(2, &TableSpec::default());
        assert_eq!(s.sync().expect("sent"), Progress::Applied(2));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_dropped_connection_is_noticed_and_the_snapshot_resent() {
        let path = socket_path("resend");
        // Each connection serves one snapshot, then the "dataplane restarts".
        let seen = fake_dataplane(&path, 1, |generation| Message::Applied { generation });
        let mut s = Stream::new(&path);
        s.send(7, &TableSpec::default(), None).expect("applied");
        assert_eq!(seen.recv().expect("first"), 7);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.sync() {
                Ok(Progress::Applied(7)) => break,
                Ok(Progress::UpToDate(7)) | Ok(Progress::Waiting(_)) | Err(_) => {
                    assert!(Instant::now() < deadline, "never resent");
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen.recv().expect("resent"), 7);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn refused_is_an_error_reported_once() {
        let path = socket_path("refused");
        let _seen = fake_dataplane(&path, usize::MAX, |_| Message::Refused {
            reason: "bad table".into(),
        });
        let mut s = Stream::new(&path);
        let e = s.send(1, &TableSpec::default(), None).expect_err("refused");
        assert!(e.to_string().contains("bad table"), "{e}");
        assert_eq!(s.sync().expect("reported already"), Progress::Refused(1));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_second_control_is_told_busy_backs_off_and_takes_over_when_the_first_stops() {
        let path = socket_path("busy");
        let shared = Arc::new(dataplane::state::Shared::new(
            vec![],
            1,
            dataplane::state::Limits::default(),
        ));
        dataplane::server::serve(&path, shared.clone(), Instant::now()).expect("serve");
        let mut first = Stream::new(&path);
        first
            .send(1, &table_with(&["a/x:p"]), None)
            .expect("applied");
        let mut second = Stream::new(&path);
        second.publish(1, &table_with(&["a/y:p"]));
        let e = second.sync().expect_err("busy");
        assert!(matches!(e, StreamError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("another kxdp-control"), "{e}");
        assert!(matches!(second.sync(), Ok(Progress::Waiting(_))));
        assert_eq!(shared.tables.load().generation, 1);
        let names = |shared: &dataplane::state::Shared| -> Vec<String> {
            let t = shared.tables.load();
            t.services.services().map(|(_, s)| s.name.clone()).collect()
        };
        assert_eq!(names(&shared), ["a/x:p"], "the first control's table stays");
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match second.sync() {
                Ok(Progress::Applied(1)) => break,
                Ok(Progress::Waiting(w)) => std::thread::sleep(w.min(Duration::from_millis(50))),
                other => {
                    assert!(Instant::now() < deadline, "never took over: {other:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        assert_eq!(names(&shared), ["a/y:p"]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn permission_and_path_errors_are_permanent_a_missing_socket_is_not() {
        let permanent = |e: io::Error| connect_error_is_permanent(&e);
        assert!(permanent(io::Error::from_raw_os_error(13))); // EACCES
        assert!(permanent(io::Error::from_raw_os_error(1))); // EPERM
        assert!(permanent(io::Error::from_raw_os_error(20))); // ENOTDIR
        assert!(!permanent(io::Error::from_raw_os_error(2))); // ENOENT
        assert!(!permanent(io::Error::from_raw_os_error(111))); // ECONNREFUSED
                                                                // A path longer than a socket address holds.
        let long = std::env::temp_dir().join("x".repeat(200));
        let e = UnixStream::connect(&long).expect_err("too long");
        assert!(connect_error_is_permanent(&e), "{e:?}");
        let mut s = Stream::new(&long);
        s.publish(1, &TableSpec::default());
        let u = s.sync().expect_err("cannot connect").into_unreachable();
        let u = u.expect("permanent");
        assert!(u.to_string().starts_with("control socket "), "{u}");
        assert!(!u.to_string().contains("retrying"), "{u}");
    }

    #[test]
    fn no_dataplane_backs_off() {
        let path = socket_path("absent");
        let _ = std::fs::remove_file(&path);
        let mut s = Stream::new(&path);
        s.publish(1, &TableSpec::default());
        assert!(matches!(s.sync(), Err(StreamError::Connect { .. })));
        assert!(matches!(s.sync(), Ok(Progress::Waiting(_))));
        let deadline = Some(Instant::now() + Duration::from_millis(300));
        assert!(s.send(1, &TableSpec::default(), deadline).is_err());
    }
}
