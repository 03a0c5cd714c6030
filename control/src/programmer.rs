//! The programmer: objects changed → tables computed → the latest table published on the
//! [`Stream`] → the dataplane brought to it → latencies recorded, health updated.
//!
//! A [`Programmer`] computes the tables of changed objects ([`TableComputer`]), publishes
//! them when they differ, and when the dataplane answers `Applied` does what follows from
//! it: records each EndpointSlice change's network programming latency (trigger time to
//! `Applied` of the generation that contains it) and the sync duration, tells
//! [`ProxyHealth`] the dataplane caught up (and, when it cannot be reached, that it is
//! lost), and updates the health-check node ports (only then, so a load balancer is not
//! told of a local endpoint the dataplane cannot reach yet). Both sources use it: the
//! manifest directory from `kxdp-control`'s own loop, the API source through
//! [`follow`](crate::follow::follow).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nat::spec::{ClusterSpec, TableSpec};

use crate::health::{ProxyHealth, ServiceHealthCheck, ServiceHealthServers};
use crate::kube_source::Change;
use crate::metrics::ControlMetrics;
use crate::objects::Objects;
use crate::stream::{Progress, Stream, StreamError};
use crate::tables::TableComputer;
use crate::warning::Warning;

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
    computer: TableComputer,
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
            computer: TableComputer::new(node, cluster),
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
