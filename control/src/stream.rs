//! The client end of the control stream: sends the latest tables to `kxdp-dataplane` and
//! waits until they are applied; and the loop that turns object changes into them.
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
//! A [`Programmer`] computes the tables of changed objects, publishes them when they
//! differ, and when the dataplane answers `Applied` does what follows from it: records
//! each EndpointSlice change's network programming latency (trigger time to `Applied` of
//! the generation that contains it) and the sync duration, tells [`ProxyHealth`] the
//! dataplane caught up (and, when it cannot be reached, that it is lost), and updates the health-check node ports (only then, so a load
//! balancer is not told of a local endpoint the dataplane cannot reach yet).
//! [`follow`] drives it from the API source, letting bursts of changes settle first
//! ([`Settle`]).

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nat::spec::{ClusterSpec, TableSpec};
use nat::wire::{self, Message};

use crate::health::{ProxyHealth, ServiceHealthCheck, ServiceHealthServers};
use crate::kube_source::{Change, KubeSource};
use crate::metrics::ControlMetrics;
use crate::objects::Objects;
use crate::tables::Warning;

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
    conn: Option<UnixStream>,
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
        conn.set_read_timeout(Some(self.answer_timeout))?;
        conn.set_write_timeout(Some(self.answer_timeout))?;
        io::Write::write_all(conn, &frame)?;
        if self.sent.len() >= SENT_KEPT {
            self.sent.remove(0);
        }
        self.sent.push(sent);
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

/// Quiet time that ends a burst: computing starts once no change has arrived for this long.
/// A rollout or a node failure changes many EndpointSlices within a few milliseconds of
/// each other (the EndpointSlice controller writes them one by one); 2 ms groups those
/// while adding at most 2 ms to a lone change, a fifth of the 10 ms p99 target.
pub const SETTLE_QUIET: Duration = Duration::from_millis(2);
/// The longest a burst is waited for: a steady stream of changes is computed at least
/// every 20 ms, so the latency of the first change in it stays bounded.
pub const SETTLE_MAX: Duration = Duration::from_millis(20);

/// How long to let a burst of changes settle before computing the tables once for all of
/// them (kube-proxy waits its `minSyncPeriod`, 1 s by default, instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settle {
    /// Compute once no change arrived for this long.
    pub quiet: Duration,
    /// Compute at the latest this long after the first change.
    pub max: Duration,
}

impl Default for Settle {
    fn default() -> Self {
        Settle {
            quiet: SETTLE_QUIET,
            max: SETTLE_MAX,
        }
    }
}

impl Settle {
    /// How much longer to wait for more changes when the first of them arrived at
    /// `first` and the last at `last`; `None` when it is time to compute.
    pub fn remaining(&self, first: Instant, last: Instant, now: Instant) -> Option<Duration> {
        let until = (last + self.quiet).min(first + self.max);
        (now < until).then(|| until - now)
    }
}

/// One generation of tables, from objects taken to the dataplane's answer.
struct Generation {
    generation: u64,
    tables: Arc<TableSpec>,
    /// When the objects it was computed from were taken.
    started: Instant,
    computed_in: Duration,
    applied: bool,
}

/// Objects changed → tables computed → the latest snapshot published → the dataplane
/// brought to it → latencies recorded, health updated. What both sources do with their
/// objects.
pub struct Programmer {
    node: String,
    computer: crate::tables::TableComputer,
    stream: Stream,
    latest: Option<Generation>,
    /// Log a warning or error only when it was not in the previous computation's: the API
    /// source recomputes on every Pod event, the manifest source only on an edit.
    quiet_repeats: bool,
    warnings: Vec<Warning>,
    error: Option<String>,
    /// The newest objects gave no tables (this node's Node is missing): the dataplane is
    /// behind them whatever it applied.
    behind: bool,
    /// Trigger times of EndpointSlice changes, with the generation that contains each.
    triggers: Vec<(u64, SystemTime)>,
    /// Trigger times taken while no tables could be computed: the next generation will
    /// contain them.
    untagged: Vec<SystemTime>,
    /// Health checks to serve once the dataplane has this generation.
    health_checks: Option<(u64, Vec<ServiceHealthCheck>)>,
    metrics: Arc<ControlMetrics>,
    health: Arc<ProxyHealth>,
    service_health: Option<Arc<ServiceHealthServers>>,
}

impl Programmer {
    /// Programs the dataplane of node `node` through `stream`, recording into `metrics`
    /// and `health`.
    pub fn new(
        node: &str,
        cluster: ClusterSpec,
        stream: Stream,
        metrics: Arc<ControlMetrics>,
        health: Arc<ProxyHealth>,
    ) -> Programmer {
        Programmer {
            node: node.to_string(),
            computer: crate::tables::TableComputer::new(node, cluster),
            stream,
            latest: None,
            quiet_repeats: false,
            warnings: Vec::new(),
            error: None,
            behind: false,
            triggers: Vec::new(),
            untagged: Vec::new(),
            health_checks: None,
            metrics,
            health,
            service_health: None,
        }
    }

    /// Also keeps these health-check node port servers up to date.
    pub fn with_service_health(mut self, servers: Arc<ServiceHealthServers>) -> Programmer {
        self.service_health = Some(servers);
        self
    }

    /// Logs a warning or error only when the previous computation did not have it (for
    /// sources that recompute often).
    pub fn with_quiet_repeats(mut self, quiet: bool) -> Programmer {
        self.quiet_repeats = quiet;
        self
    }

    /// The node programmed.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The stream to the dataplane.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The last generation published, if any.
    pub fn latest_generation(&self) -> Option<u64> {
        self.latest.as_ref().map(|l| l.generation)
    }

    /// The source has changes the dataplane does not have yet; call when they arrive,
    /// before they are taken.
    pub fn change_queued(&self) {
        self.health.queued_update(Instant::now());
    }

    /// Computes the tables of `objects` (taken at `started`, with what changed since the
    /// last take) and publishes them if they differ from the last ones. `false` when none
    /// can be computed (this node's Node is missing): the dataplane keeps what it has.
    pub fn objects_changed(
        &mut self,
        objects: &Objects,
        change: &Change,
        started: Instant,
    ) -> bool {
        self.health.queued_update(started);
        self.health.sync_node(objects.node(&self.node));
        self.metrics.observe_queue_depth(change.batches);
        let computed = match self.computer.compute(objects) {
            Ok(computed) => computed,
            Err(e) => {
                let msg = e.to_string();
                if !self.quiet_repeats || self.error.as_ref() != Some(&msg) {
                    log::error!("{msg}");
                }
                self.error = Some(msg);
                self.behind = true;
                self.untagged
                    .extend(change.endpoint_slice_triggers.iter().copied());
                return false;
            }
        };
        for w in &computed.warnings {
            if !self.quiet_repeats || !self.warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        self.warnings = computed.warnings;
        self.metrics.services_refused(computed.refused);
        self.error = None;
        self.behind = false;
        let tables = computed.tables;
        let checks = self
            .service_health
            .is_some()
            .then(|| crate::health::service_health_checks(objects, &tables));
        let generation = match &self.latest {
            Some(l) if *l.tables == tables => l.generation,
            _ => {
                let generation = self.latest.as_ref().map_or(1, |l| l.generation + 1);
                let tables = Arc::new(tables);
                self.stream.publish_shared(generation, tables.clone());
                self.metrics.published(generation);
                self.latest = Some(Generation {
                    generation,
                    tables,
                    started,
                    computed_in: started.elapsed(),
                    applied: false,
                });
                generation
            }
        };
        let triggers = self
            .untagged
            .drain(..)
            .chain(change.endpoint_slice_triggers.iter().copied());
        self.triggers.extend(triggers.map(|t| (generation, t)));
        if let Some(checks) = checks {
            self.health_checks = Some((generation, checks));
        }
        true
    }

    /// Brings the dataplane to the latest snapshot if it is not there ([`Stream::sync`]),
    /// and acts on what it reached.
    pub fn sync(&mut self) -> Result<Progress, StreamError> {
        let progress = self.stream.sync();
        for sent in self.stream.take_sent() {
            self.metrics.sent(sent);
        }
        match &progress {
            Ok(Progress::Applied(g)) | Ok(Progress::UpToDate(g)) => self.reached(*g),
            Err(StreamError::Refused { .. }) => self.metrics.refused(),
            // Gone, or answering nonsense: it may forward nothing at all (a dataplane
            // that died took its XDP programs with it). Busy is not: another control
            // programs it, and only this one's updates wait.
            Err(StreamError::Connect { .. })
            | Err(StreamError::Io { .. })
            | Err(StreamError::Unexpected { .. }) => self.health.dataplane_lost(Instant::now()),
            _ => {}
        }
        progress
    }

    /// The dataplane has generation `g`.
    fn reached(&mut self, g: u64) {
        let wall = SystemTime::now();
        let metrics = &self.metrics;
        self.triggers.retain(|&(generation, trigger)| {
            if generation > g {
                return true;
            }
            // A trigger time ahead of this clock (clock skew with the control plane)
            // counts as zero rather than being lost.
            metrics.observe_network_programming(wall.duration_since(trigger).unwrap_or_default());
            false
        });
        if let Some(l) = self
            .latest
            .as_mut()
            .filter(|l| l.generation == g && !l.applied)
        {
            l.applied = true;
            let took = l.started.elapsed();
            metrics.observe_sync(took);
            metrics.applied(g, &l.tables, wall);
            log::info!(
                "generation {g} applied: {} service ports, {} local pods, {} remote nodes; computed in {:?}, applied in {:?}, {took:?} in all",
                l.tables.services.len(),
                l.tables.local_pods.len(),
                l.tables.remote_nodes.len(),
                l.computed_in,
                self.stream.last_round_trip().unwrap_or_default(),
            );
        }
        if self.health_checks.as_ref().is_some_and(|(h, _)| *h <= g) {
            if let (Some((_, checks)), Some(servers)) =
                (self.health_checks.take(), &self.service_health)
            {
                metrics.health_check_ports(servers.sync(&checks));
            }
        }
        self.health.dataplane_current();
        if !self.behind {
            self.health.updated(wall);
        }
    }
}

/// How [`follow`] paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// How bursts of changes are grouped.
    pub settle: Settle,
    /// How often to look at the dataplane connection when nothing changes (a restarted
    /// dataplane is noticed and resynced within this).
    pub poll: Duration,
    /// Return once the dataplane applied the first tables.
    pub once: bool,
}

/// Why [`follow`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// `--once` and the objects give no tables.
    #[error("--once: no table to send (see above)")]
    NoTables,
    /// `--once` and the dataplane refused the tables.
    #[error(transparent)]
    Refused(StreamError),
    /// `--once` and the dataplane's socket cannot be connected to for a reason that
    /// waiting does not mend.
    #[error(transparent)]
    Unreachable(Unreachable),
    /// The API watchers are gone (their runtime shut down).
    #[error("the API watchers stopped")]
    WatchersStopped,
}

/// What one look at the API source found.
enum Look {
    Unchanged,
    /// Some kinds have not been listed yet: no tables from a partial view.
    NotSynced,
    Published,
    Failed,
}

/// Programs the dataplane from the API source until `stop` is set (or, with `once`, the
/// first tables are applied): waits for a change, lets the burst settle, computes and
/// publishes, syncs. Blocks the calling thread (the computation runs on it); the source's
/// watchers run on `runtime`, which this thread must not be a worker of.
pub fn follow(
    source: &mut KubeSource,
    programmer: &mut Programmer,
    runtime: &tokio::runtime::Handle,
    how: Follow,
    stop: &AtomicBool,
) -> Result<(), FollowError> {
    let mut waiting_said = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let look = source.take(|objects, change| {
            if change.batches == 0 {
                return Look::Unchanged;
            }
            if !change.synced {
                return Look::NotSynced;
            }
            log::debug!(
                "{} batches ({:?}, listed {:?}), {} objects, {} EndpointSlice trigger times",
                change.batches,
                change.kinds,
                change.listed,
                objects.len(),
                change.endpoint_slice_triggers.len()
            );
            if programmer.objects_changed(objects, &change, started) {
                Look::Published
            } else {
                Look::Failed
            }
        });
        match look {
            Look::NotSynced if !waiting_said => {
                log::info!("waiting for the first list of {:?}", source.unsynced());
                waiting_said = true;
            }
            Look::Failed if how.once => return Err(FollowError::NoTables),
            Look::Unchanged | Look::NotSynced | Look::Published | Look::Failed => {}
        }
        match programmer.sync() {
            Ok(Progress::Applied(_)) if how.once => return Ok(()),
            Ok(_) => {}
            Err(e @ StreamError::Refused { .. }) => {
                log::error!("{e}");
                if how.once {
                    return Err(FollowError::Refused(e));
                }
            }
            Err(e) if how.once => match e.into_unreachable() {
                Ok(u) => return Err(FollowError::Unreachable(u)),
                Err(e) => log::warn!("{e}"),
            },
            Err(e) => log::warn!("{e}"),
        }
        let alive = runtime.block_on(async {
            match tokio::time::timeout(how.poll, source.changed()).await {
                Err(_) => true,
                Ok(false) => false,
                Ok(true) => {
                    programmer.change_queued();
                    let first = Instant::now();
                    let mut last = first;
                    while let Some(wait) = how.settle.remaining(first, last, Instant::now()) {
                        match tokio::time::timeout(wait, source.changed()).await {
                            Ok(true) => last = Instant::now(),
                            Ok(false) => return false,
                            Err(_) => {}
                        }
                    }
                    true
                }
            }
        });
        if !alive {
            return Err(FollowError::WatchersStopped);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
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
    fn a_burst_settles_after_a_quiet_gap_or_at_the_bound() {
        let s = Settle::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(s.remaining(t0, t0, t0), Some(ms(2)));
        assert_eq!(s.remaining(t0, t0, t0 + ms(2)), None);
        // A change every millisecond keeps it waiting, but never past 20 ms.
        assert_eq!(s.remaining(t0, t0 + ms(10), t0 + ms(11)), Some(ms(1)));
        assert_eq!(s.remaining(t0, t0 + ms(19), t0 + ms(19)), Some(ms(1)));
        assert_eq!(s.remaining(t0, t0 + ms(20), t0 + ms(20)), None);
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
