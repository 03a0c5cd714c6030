//! The client end of the control stream: sends the latest tables to `kxdp-dataplane` and
//! waits until they are applied.
//!
//! The stream holds one snapshot, the latest ([`Stream::publish`]); [`Stream::sync`] makes
//! sure the dataplane at the other end has it. A broken connection (the dataplane
//! restarted, or was not up yet) is re-established with exponential backoff and the latest
//! snapshot is sent again — the dataplane keeps forwarding with its old tables meanwhile, so
//! nothing is lost by waiting. Plain blocking `std::os::unix::net`: one request, one answer,
//! no runtime needed.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// The dataplane answered something other than `Applied` for this generation.
    #[error("the dataplane answered generation {generation} with {answer}: is it a kxdp-dataplane of this release? reconnecting")]
    Unexpected {
        /// The generation sent.
        generation: u64,
        /// The answer, debug-printed.
        answer: String,
    },
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

/// The latest snapshot, encoded once.
struct Snapshot {
    generation: u64,
    frame: Vec<u8>,
}

/// A connection to the dataplane's control socket that is re-established on demand.
pub struct Stream {
    path: PathBuf,
    conn: Option<UnixStream>,
    latest: Option<Snapshot>,
    /// The generation the dataplane at the other end of `conn` applied.
    applied: Option<u64>,
    refused: Option<u64>,
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
        }
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

    /// Makes `tables` the snapshot to keep the dataplane at, as `generation` (which should
    /// grow with every new table). Sends nothing: [`Stream::sync`] does.
    pub fn publish(&mut self, generation: u64, tables: &TableSpec) {
        let msg = Message::Snapshot {
            generation,
            tables: Box::new(tables.clone()),
        };
        self.latest = Some(Snapshot {
            generation,
            frame: wire::encode(&msg),
        });
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
        if self.conn.is_some() && self.applied == Some(generation) {
            return Ok(Progress::UpToDate(generation));
        }
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if now < at {
                return Ok(Progress::Waiting(at - now));
            }
        }
        if self.conn.is_none() {
            match UnixStream::connect(&self.path) {
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
                self.applied = Some(g);
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                Ok(Progress::Applied(g))
            }
            Ok(Message::Refused { reason }) => {
                self.refused = Some(generation);
                Err(StreamError::Refused { generation, reason })
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

    fn exchange(&mut self) -> io::Result<Message> {
        let (Some(conn), Some(snapshot)) = (self.conn.as_mut(), self.latest.as_ref()) else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "not connected"));
        };
        conn.set_read_timeout(Some(self.answer_timeout))?;
        conn.set_write_timeout(Some(self.answer_timeout))?;
        io::Write::write_all(conn, &snapshot.frame)?;
        wire::read_message(conn)
    }

    /// Whether the idle connection is still open: a read that would block means yes, end
    /// of file or an error means the dataplane went away, and unrequested bytes mean the
    /// stream is out of step.
    fn alive(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if conn.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let alive = matches!(conn.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        alive && conn.set_nonblocking(false).is_ok()
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
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kxdp-control-{name}-{}.sock", std::process::id()))
    }

    /// A dataplane that answers each snapshot with `answer(generation)` and reports the
    /// generations it saw; it drops each connection after `per_conn` messages.
    fn fake_dataplane(
        path: &Path,
        per_conn: usize,
        answer: fn(u64) -> Message,
    ) -> mpsc::Receiver<u64> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                for _ in 0..per_conn {
                    let Ok(Message::Snapshot { generation, .. }) = wire::read_message(&mut conn)
                    else {
                        break;
                    };
                    if tx.send(generation).is_err() {
                        return;
                    }
                    let _ = wire::write_message(&mut conn, &answer(generation));
                }
            }
        });
        rx
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
