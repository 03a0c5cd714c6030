//! Prometheus metrics of kxdp-control and, asked for at scrape time, of the dataplane.
//!
//! Control's own: the network programming latency (from an EndpointSlice's
//! `endpoints.kubernetes.io/last-change-trigger-time` to the dataplane's `Applied` for the
//! generation that contains the change, kube-proxy's `network_programming_duration_seconds`),
//! the sync duration (tables computed, sent, applied), the queue depth (change batches
//! waiting when a sync starts), table sizes and generations. Each distribution is kept in
//! an hdrhistogram (three significant digits, so percentiles can be read at any
//! resolution) with its exact sum, and exported as a Prometheus histogram over fixed
//! buckets: kube-proxy's where kube-proxy has the metric, with finer ones added below its
//! first (kube-proxy's smallest network-programming bucket is 250 ms; kxdp's changes land
//! in milliseconds). A bucket's count is read from the hdrhistogram, so a value within
//! 0.1% of a bucket bound may be counted on either side of it.
//!
//! The dataplane's: on every scrape control asks the dataplane for `GetStats` on its
//! socket and exports per-worker packets, drops by reason and the other named counters,
//! conntrack occupancy and capacity, and NetworkPolicy refusals per pod and per policy.
//! A dataplane that does not answer within [`SCRAPE_TIMEOUT`] gives
//! `kxdp_dataplane_up 0` and none of its metrics.
//!
//! Names are `kxdp_*`, in the OpenMetrics text format (counters end in `_total`).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use nat::spec::TableSpec;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::runtime::Handle;

use crate::health::{HttpServer, Reply};

/// kube-proxy's `--metrics-bind-address` default: its port, on localhost only.
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:10249";

/// How long a scrape waits for the dataplane's counters. Prometheus' default scrape
/// timeout is 10 s; a dataplane slower than this is reported down rather than stalling
/// the scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The content type of the OpenMetrics text format prometheus-client writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

mod distribution;

pub use distribution::{
    network_programming_buckets, queue_depth_buckets, sync_buckets, Distribution,
};

/// Sizes of the tables control last saw applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Service ports (one per Service, port and IP family).
    pub service_ports: usize,
    /// Endpoints over all Service ports, whatever their state.
    pub endpoints: usize,
    /// Pods on this node.
    pub local_pods: usize,
    /// Other nodes reached through the overlay.
    pub remote_nodes: usize,
    /// NetworkPolicies isolating a pod of this node.
    pub policies: usize,
    /// Pods of this node isolated by a policy.
    pub isolated_pods: usize,
}

impl TableSizes {
    /// The sizes of `tables`.
    pub fn of(tables: &TableSpec) -> TableSizes {
        TableSizes {
            service_ports: tables.services.len(),
            endpoints: tables.services.iter().map(|s| s.all_endpoints.len()).sum(),
            local_pods: tables.local_pods.len(),
            remote_nodes: tables.remote_nodes.len(),
            policies: tables.policy.policies.len(),
            isolated_pods: tables.policy.pods.len(),
        }
    }
}

/// Control's own measurements at one moment.
#[derive(Clone, Debug)]
pub struct ControlSnapshot {
    /// Trigger time to applied, per EndpointSlice change.
    pub network_programming: Distribution,
    /// Objects taken to the dataplane's `Applied`, per generation.
    pub sync_duration: Distribution,
    /// Change batches waiting when a sync started.
    pub queue_depth: Distribution,
    /// The last generation sent.
    pub published_generation: u64,
    /// The last generation the dataplane applied.
    pub applied_generation: u64,
    /// When that was.
    pub last_applied: Option<SystemTime>,
    /// Its tables' sizes.
    pub tables: TableSizes,
    /// Health-check node ports open.
    pub health_check_ports: usize,
    /// Snapshots the dataplane refused.
    pub refused: u64,
    /// Tables sent whole: count and bytes.
    pub snapshots_sent: (u64, u64),
    /// Tables sent as deltas: count and bytes.
    pub deltas_sent: (u64, u64),
    /// Service addresses the last table computation refused, by reason.
    pub services_refused: crate::tables::Refusals,
}

/// Control's measurements, updated by the sync loop and read by scrapes.
#[derive(Debug)]
pub struct ControlMetrics {
    inner: Mutex<ControlSnapshot>,
    /// The tables the dataplane last applied, whose sizes a snapshot reports: counted when
    /// read (a scrape), not on every generation (a pass over every Service port).
    applied_tables: Mutex<Option<std::sync::Arc<TableSpec>>>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics::new()
    }
}

impl ControlMetrics {
    /// Nothing measured yet.
    pub fn new() -> ControlMetrics {
        ControlMetrics {
            inner: Mutex::new(ControlSnapshot {
                network_programming: Distribution::durations(),
                sync_duration: Distribution::durations(),
                queue_depth: Distribution::counts(),
                published_generation: 0,
                applied_generation: 0,
                last_applied: None,
                tables: TableSizes::default(),
                health_check_ports: 0,
                refused: 0,
                snapshots_sent: (0, 0),
                deltas_sent: (0, 0),
                services_refused: Default::default(),
            }),
            applied_tables: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlSnapshot> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One EndpointSlice change reached the dataplane this long after its trigger time.
    pub fn observe_network_programming(&self, d: Duration) {
        self.lock().network_programming.record_duration(d);
    }

    /// One generation took this long from objects to `Applied`.
    pub fn observe_sync(&self, d: Duration) {
        self.lock().sync_duration.record_duration(d);
    }

    /// A sync started with this many change batches waiting.
    pub fn observe_queue_depth(&self, batches: u64) {
        self.lock().queue_depth.record_count(batches);
    }

    /// `generation` was sent.
    pub fn published(&self, generation: u64) {
        self.lock().published_generation = generation;
    }

    /// The dataplane applied `generation`, whose tables are `tables`, at `at`.
    pub fn applied(&self, generation: u64, tables: &std::sync::Arc<TableSpec>, at: SystemTime) {
        let mut m = self.lock();
        m.applied_generation = generation;
        m.last_applied = Some(at);
        *self
            .applied_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tables.clone());
    }

    /// A table went to the dataplane.
    pub fn sent(&self, sent: crate::stream::Sent) {
        let mut m = self.lock();
        let (slot, bytes) = match sent {
            crate::stream::Sent::Snapshot { bytes } => (&mut m.snapshots_sent, bytes),
            crate::stream::Sent::Delta { bytes } => (&mut m.deltas_sent, bytes),
        };
        slot.0 += 1;
        slot.1 += bytes as u64;
    }

    /// The dataplane refused a snapshot.
    pub fn refused(&self) {
        self.lock().refused += 1;
    }

    /// The last table computation refused these Service addresses.
    pub fn services_refused(&self, refused: crate::tables::Refusals) {
        self.lock().services_refused = refused;
    }

    /// This many health-check node ports are open.
    pub fn health_check_ports(&self, n: usize) {
        self.lock().health_check_ports = n;
    }

    /// A copy of everything measured.
    pub fn snapshot(&self) -> ControlSnapshot {
        let mut snapshot = self.lock().clone();
        let tables = self
            .applied_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        snapshot.tables = tables.as_deref().map(TableSizes::of).unwrap_or_default();
        snapshot
    }

    /// A copy of the network programming latencies.
    pub fn network_programming(&self) -> Distribution {
        self.lock().network_programming.clone()
    }

    /// How many network programming latencies were recorded (without copying them).
    pub fn network_programming_count(&self) -> u64 {
        self.lock().network_programming.len()
    }
}

pub use ctlclient::DataplaneStats;

/// Asks the dataplane on `socket` for its counters, giving up after `limit`. The socket's
/// one client ([`ctlclient`]) blocks, so it runs on a blocking thread, its reads and writes
/// bounded by `limit` too: an exchange given up on ends by itself.
pub async fn fetch_dataplane_stats(socket: &Path, limit: Duration) -> io::Result<DataplaneStats> {
    let socket = socket.to_owned();
    let exchange = tokio::task::spawn_blocking(move || {
        let mut client = ctlclient::Client::connect(&socket)?;
        client.set_timeout(limit)?;
        client.stats()
    });
    match tokio::time::timeout(limit, exchange).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer in {limit:?}"),
        )),
        Ok(Err(gone)) => Err(io::Error::other(gone)),
        Ok(Ok(answer)) => answer,
    }
}

type Labels = Vec<(String, String)>;

/// One scrape's values, encoded by prometheus-client.
#[derive(Debug)]
struct Exposition {
    control: ControlSnapshot,
    dataplane: Option<DataplaneStats>,
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn labelled(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, value) in samples {
        let mut family = metric.encode_family(labels)?;
        if matches!(ty, MetricType::Counter) {
            family.encode_counter::<NoLabelSet, _, u64>(value, None)?;
        } else {
            family.encode_gauge(value)?;
        }
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    d: &Distribution,
    bounds: &[f64],
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(d.sum(), d.len(), &d.buckets(bounds), None)
}

fn label(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

/// A dataplane counter name as a metric name part (they are snake case already).
fn metric_part(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl prometheus_client::collector::Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.control;
        histogram(
            &mut enc,
            "kxdp_network_programming_duration_seconds",
            "Time from an EndpointSlice change (its last-change-trigger-time) to the dataplane applying it, as kube-proxy's network_programming_duration_seconds",
            &c.network_programming,
            &network_programming_buckets(),
        )?;
        histogram(
            &mut enc,
            "kxdp_sync_duration_seconds",
            "Time from taking the changed objects to the dataplane's Applied: tables computed, sent and applied",
            &c.sync_duration,
            &sync_buckets(),
        )?;
        histogram(
            &mut enc,
            "kxdp_sync_queue_depth",
            "Change batches from the API watchers waiting when a sync started",
            &c.queue_depth,
            &queue_depth_buckets(),
        )?;
        gauge(
            &mut enc,
            "kxdp_generation_published",
            "The last table generation sent to the dataplane",
            c.published_generation as i64,
        )?;
        gauge(
            &mut enc,
            "kxdp_generation_applied",
            "The last table generation the dataplane applied",
            c.applied_generation as i64,
        )?;
        let last = c
            .last_applied
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        gauge(
            &mut enc,
            "kxdp_sync_last_applied_timestamp_seconds",
            "When the dataplane last applied a generation (Unix time), as kube-proxy's sync_proxy_rules_last_timestamp_seconds",
            last,
        )?;
        counter(
            &mut enc,
            "kxdp_sync_refused",
            "Table snapshots the dataplane refused",
            c.refused,
        )?;
        let kinds = [("snapshot", c.snapshots_sent), ("delta", c.deltas_sent)];
        let messages: Vec<(Labels, u64)> = kinds
            .iter()
            .map(|(k, (n, _))| (vec![label("kind", *k)], *n))
            .collect();
        labelled(
            &mut enc,
            "kxdp_stream_tables_sent",
            "Tables sent to the dataplane, whole (snapshot: a new connection, or a dataplane that lost step) or as the changes since the last one it applied (delta)",
            MetricType::Counter,
            &messages,
        )?;
        let bytes: Vec<(Labels, u64)> = kinds
            .iter()
            .map(|(k, (_, b))| (vec![label("kind", *k)], *b))
            .collect();
        labelled(
            &mut enc,
            "kxdp_stream_sent_bytes",
            "Bytes of the tables sent to the dataplane, by kind",
            MetricType::Counter,
            &bytes,
        )?;
        let t = &c.tables;
        let tables: Vec<(Labels, u64)> = [
            ("service_ports", t.service_ports),
            ("endpoints", t.endpoints),
            ("local_pods", t.local_pods),
            ("remote_nodes", t.remote_nodes),
            ("policies", t.policies),
            ("isolated_pods", t.isolated_pods),
        ]
        .into_iter()
        .map(|(name, n)| (vec![label("table", name)], n as u64))
        .collect();
        labelled(
            &mut enc,
            "kxdp_table_entries",
            "Entries in the tables the dataplane last applied",
            MetricType::Gauge,
            &tables,
        )?;
        let refused: Vec<(Labels, u64)> = c
            .services_refused
            .by_reason()
            .into_iter()
            .map(|(reason, n)| (vec![label("reason", reason)], n as u64))
            .collect();
        labelled(
            &mut enc,
            "kxdp_service_addresses_refused",
            "Service addresses the last table computation refused (each also logged as a warning), by reason: taken (an older Service's port holds the address, port and protocol), outside_service_ranges (a ClusterIP outside --service-cidr), invalid_cluster_ip",
            MetricType::Gauge,
            &refused,
        )?;
        gauge(
            &mut enc,
            "kxdp_health_check_node_ports",
            "Health-check node ports open (Services with externalTrafficPolicy Local)",
            c.health_check_ports as i64,
        )?;

        gauge(
            &mut enc,
            "kxdp_dataplane_up",
            "Whether the dataplane answered this scrape's request for its counters",
            i64::from(self.dataplane.is_some()),
        )?;
        let Some(d) = &self.dataplane else {
            return Ok(());
        };
        gauge(
            &mut enc,
            "kxdp_dataplane_generation",
            "The table generation the dataplane's workers use",
            d.generation as i64,
        )?;
        gauge(
            &mut enc,
            "kxdp_conntrack_entries",
            "Connections in the dataplane's connection table",
            d.conntrack as i64,
        )?;
        gauge(
            &mut enc,
            "kxdp_conntrack_capacity",
            "Capacity of the dataplane's connection table (a full table refuses new flows: drops reason conntrack_full)",
            d.conntrack_capacity as i64,
        )?;
        counter(
            &mut enc,
            "kxdp_dataplane_refused_tables",
            "Tables from control the dataplane's validation refused since it started (it keeps the tables in use)",
            d.refused_tables,
        )?;
        if !d.poll_mode.is_empty() {
            labelled(
                &mut enc,
                "kxdp_dataplane_poll_mode",
                "How the dataplane's workers wait for packets (--poll-mode): busy, adaptive or interrupt; the time each worker spends awake and asleep is kxdp_worker_awake_ns and kxdp_worker_asleep_ns",
                MetricType::Gauge,
                &[(vec![label("mode", d.poll_mode.as_str())], 1)],
            )?;
        }
        // Group the workers' counters by metric, so each is described once.
        let mut counters: BTreeMap<String, Vec<(Labels, u64)>> = BTreeMap::new();
        for (w, named) in d.workers.iter().enumerate() {
            let worker = label("worker", w.to_string());
            for (name, value) in named {
                let (metric, labels) = match name.as_str() {
                    "rx" | "tx" => (
                        "kxdp_worker_packets".to_string(),
                        vec![worker.clone(), label("direction", name.as_str())],
                    ),
                    "rx_bytes" | "tx_bytes" => (
                        "kxdp_worker_bytes".to_string(),
                        vec![worker.clone(), label("direction", &name[..2])],
                    ),
                    n if n.starts_with("drop_") => (
                        "kxdp_worker_drops".to_string(),
                        vec![worker.clone(), label("reason", &n["drop_".len()..])],
                    ),
                    n => (
                        format!("kxdp_worker_{}", metric_part(n)),
                        vec![worker.clone()],
                    ),
                };
                counters.entry(metric).or_default().push((labels, *value));
            }
        }
        for (metric, samples) in &counters {
            let help = match metric.as_str() {
                "kxdp_worker_packets" => {
                    "Frames received (direction rx) and transmitted (tx) by each worker".to_string()
                }
                "kxdp_worker_bytes" => {
                    "Bytes of the frames received (direction rx) and transmitted (tx) by each worker (Ethernet, without FCS)".to_string()
                }
                "kxdp_worker_drops" => "Frames each worker dropped, by reason".to_string(),
                m => format!(
                    "The dataplane's per-worker counter {} (see kxdp stats)",
                    &m["kxdp_worker_".len()..]
                ),
            };
            labelled(&mut enc, metric, &help, MetricType::Counter, samples)?;
        }
        let mut pods = Vec::new();
        let mut policies = Vec::new();
        for (key, value) in &d.policy_drops {
            if let Some(rest) = key.strip_prefix("pod ") {
                if let Some((pod, direction)) = rest.rsplit_once(' ') {
                    pods.push((
                        vec![label("pod", pod), label("direction", direction)],
                        *value,
                    ));
                }
            } else if let Some(policy) = key.strip_prefix("policy ") {
                policies.push((vec![label("policy", policy)], *value));
            }
        }
        labelled(
            &mut enc,
            "kxdp_policy_pod_drops",
            "New connections refused by NetworkPolicy, by pod (namespace/name) and direction",
            MetricType::Counter,
            &pods,
        )?;
        labelled(
            &mut enc,
            "kxdp_policy_drops",
            "New connections refused by NetworkPolicy, by each policy (namespace/name) isolating the pod",
            MetricType::Counter,
            &policies,
        )?;
        Ok(())
    }
}

/// The text exposition of `control`'s measurements and, if it answered, the dataplane's.
pub fn render(control: ControlSnapshot, dataplane: Option<DataplaneStats>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition { control, dataplane }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String does not fail");
    out
}

/// Serves `/metrics` on `addr`: control's measurements, and the dataplane's counters asked
/// for on `socket` at each scrape.
pub fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<ControlMetrics>,
    socket: PathBuf,
    runtime: &Handle,
) -> io::Result<HttpServer> {
    HttpServer::start(addr, runtime, move |path| {
        let metrics = metrics.clone();
        let socket = socket.clone();
        async move {
            if path != "/metrics" {
                return Reply::not_found();
            }
            let dataplane = match fetch_dataplane_stats(&socket, SCRAPE_TIMEOUT).await {
                Ok(s) => Some(s),
                Err(e) => {
                    log::debug!("scrape: the dataplane on {}: {e}", socket.display());
                    None
                }
            };
            Reply {
                status: 200,
                content_type: CONTENT_TYPE,
                body: render(metrics.snapshot(), dataplane),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_kube_proxys_with_finer_ones_below() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 10 + 59 + 12 + 7);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        for kube_proxy in [0.0, 0.25, 0.5, 1.0, 59.0, 60.0, 115.0, 120.0, 300.0] {
            assert!(b.contains(&kube_proxy), "{kube_proxy}");
        }
        let s = sync_buckets();
        assert_eq!(s[3], 0.001);
        assert_eq!(*s.last().expect("buckets"), 16.384);
    }

    #[test]
    fn bucket_counts_come_from_the_hdrhistogram() {
        let mut d = Distribution::durations();
        for ms in [1, 3, 3, 40, 900, 2500] {
            d.record_duration(Duration::from_millis(ms));
        }
        let buckets = d.buckets(&[0.001, 0.005, 0.25, 1.0]);
        assert_eq!(
            buckets,
            vec![
                (0.001, 1),
                (0.005, 2),
                (0.25, 1),
                (1.0, 1),
                (f64::INFINITY, 1)
            ]
        );
        assert!((d.sum() - 3.447).abs() < 1e-9);
        assert_eq!(d.len(), 6);
        assert!((d.quantile(0.5) - 0.003).abs() < 1e-5);
    }

    fn stats() -> DataplaneStats {
        DataplaneStats {
            generation: 7,
            conntrack: 3,
            conntrack_capacity: 1024,
            workers: vec![
                vec![
                    ("rx".into(), 10),
                    ("tx".into(), 9),
                    ("nat_new".into(), 2),
                    ("drop_no_service".into(), 1),
                ],
                vec![
                    ("rx".into(), 5),
                    ("tx".into(), 5),
                    ("nat_new".into(), 0),
                    ("drop_no_service".into(), 0),
                ],
            ],
            policy_drops: vec![
                ("pod default/db ingress".into(), 4),
                ("policy default/deny-all".into(), 4),
            ],
            refused_tables: 1,
            poll_mode: "adaptive".into(),
        }
    }

    #[test]
    fn exposition_has_control_and_dataplane_metrics() {
        let m = ControlMetrics::new();
        m.observe_network_programming(Duration::from_millis(3));
        m.observe_sync(Duration::from_micros(700));
        m.observe_queue_depth(2);
        m.services_refused(crate::tables::Refusals {
            taken: 1,
            ..Default::default()
        });
        let text = render(m.snapshot(), Some(stats()));
        for line in [
            "# TYPE kxdp_network_programming_duration_seconds histogram",
            "kxdp_network_programming_duration_seconds_count 1",
            "kxdp_network_programming_duration_seconds_bucket{le=\"0.005\"} 1",
            "kxdp_network_programming_duration_seconds_bucket{le=\"0.25\"} 1",
            "kxdp_network_programming_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kxdp_sync_duration_seconds_bucket{le=\"0.001\"} 1",
            "kxdp_sync_queue_depth_bucket{le=\"2.0\"} 1",
            "kxdp_dataplane_up 1",
            "kxdp_dataplane_generation 7",
            "kxdp_conntrack_capacity 1024",
            "kxdp_dataplane_refused_tables_total 1",
            "kxdp_dataplane_poll_mode{mode=\"adaptive\"} 1",
            "# TYPE kxdp_worker_packets counter",
            "kxdp_worker_packets_total{worker=\"0\",direction=\"rx\"} 10",
            "kxdp_worker_packets_total{worker=\"1\",direction=\"tx\"} 5",
            "kxdp_worker_drops_total{worker=\"0\",reason=\"no_service\"} 1",
            "kxdp_worker_nat_new_total{worker=\"0\"} 2",
            "kxdp_policy_pod_drops_total{pod=\"default/db\",direction=\"ingress\"} 4",
            "kxdp_policy_drops_total{policy=\"default/deny-all\"} 4",
            "kxdp_table_entries{table=\"service_ports\"} 0",
            "kxdp_service_addresses_refused{reason=\"taken\"} 1",
            "kxdp_service_addresses_refused{reason=\"outside_service_ranges\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Each metric is described once, however many workers report it.
        assert_eq!(text.matches("# TYPE kxdp_worker_packets ").count(), 1);

        let down = render(m.snapshot(), None);
        assert!(down.lines().any(|l| l == "kxdp_dataplane_up 0"), "{down}");
        assert!(!down.contains("kxdp_worker_"), "{down}");
    }
}
