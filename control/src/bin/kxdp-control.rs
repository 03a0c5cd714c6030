//! `kxdp-control`: reads Kubernetes objects from a directory of manifests (`--manifests`) or
//! watches them on the API server (otherwise), computes this node's tables and streams them
//! to `kxdp-dataplane`; re-sends when the objects change or the dataplane restarts.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use control::kube_source::{Connection, KubeSource};
use control::stream::{Progress, Stream, StreamError};
use control::{Objects, Warning};
use ipnet::IpNet;
use nat::spec::{ClusterSpec, TableSpec};

#[derive(Parser)]
#[command(
    name = "kxdp-control",
    about = "kxdp's control process: Kubernetes objects (manifests or the API server) to dataplane tables"
)]
struct Args {
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json; multi-document YAML).
    /// Without it, kxdp-control watches the API server.
    #[arg(long, requires = "node", conflicts_with_all = ["kubeconfig", "master"])]
    manifests: Option<PathBuf>,
    /// The Node this dataplane serves (its metadata.name). Required with --manifests; when
    /// watching the API server the default is $NODE_NAME (set it from the downward API's
    /// spec.nodeName), else the hostname.
    #[arg(long, visible_alias = "hostname-override")]
    node: Option<String>,
    /// Kubeconfig file to reach the API server with (its current context). Default: the
    /// in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL; overrides the kubeconfig's server.
    #[arg(long)]
    master: Option<String>,
    /// The dataplane's control socket.
    #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
    socket: PathBuf,
    /// The cluster's pod networks (repeatable or comma-separated) [10.244.0.0/16, fd00:10:244::/48].
    #[arg(long = "cluster-cidr", value_delimiter = ',')]
    cluster_cidrs: Vec<IpNet>,
    /// The Service ClusterIP ranges (repeatable or comma-separated) [172.30.0.0/16, fd00:172:30::/112].
    #[arg(long = "service-cidr", value_delimiter = ',')]
    service_cidrs: Vec<IpNet>,
    /// Masquerade every Service connection (kube-proxy --masquerade-all).
    #[arg(long)]
    masquerade_all: bool,
    /// NodePorts answer only on node addresses in these networks (kube-proxy
    /// --nodeport-addresses; repeatable). Default: every node address.
    #[arg(long = "nodeport-address")]
    nodeport_addresses: Vec<IpNet>,
    /// Masquerade pod traffic leaving the cluster networks (flannel --ip-masq).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// Send one snapshot, exit once the dataplane applied it.
    #[arg(long)]
    once: bool,
    /// How often to look at the directory and at the dataplane connection, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

/// What the last computation produced, for the log line of its sync.
struct Sync {
    generation: u64,
    tables: TableSpec,
    computed_in: Duration,
}

fn cluster_spec(args: &Args) -> ClusterSpec {
    let mut cluster = ClusterSpec::default();
    if !args.cluster_cidrs.is_empty() {
        cluster.cluster_cidrs = args.cluster_cidrs.clone();
    }
    if !args.service_cidrs.is_empty() {
        cluster.service_cidrs = args.service_cidrs.clone();
    }
    cluster.masquerade_all = args.masquerade_all;
    cluster.ip_masq = args.ip_masq;
    cluster.nodeport_addresses = args.nodeport_addresses.clone();
    cluster
}

/// Objects changed → tables computed → the latest snapshot published → the dataplane
/// brought to it: what both sources do with their objects.
struct Publisher {
    node: String,
    cluster: ClusterSpec,
    stream: Stream,
    latest: Option<Sync>,
    once: bool,
    /// Log a warning or error only when it was not in the previous computation's: the API
    /// source recomputes on every Pod event, the manifest source only on an edit.
    quiet_repeats: bool,
    warnings: Vec<Warning>,
    error: Option<String>,
}

impl Publisher {
    /// Computes the tables of `objects` (read since `started`) and publishes them if they
    /// differ from the last ones. `false` when none can be computed (this node's Node is
    /// missing): the dataplane keeps what it has.
    fn objects_changed(&mut self, objects: &Objects, started: Instant) -> bool {
        match control::compute_with_warnings(objects, &self.node, &self.cluster) {
            Ok(computed) => {
                for w in &computed.warnings {
                    if !self.quiet_repeats || !self.warnings.contains(w) {
                        log::warn!("{w}");
                    }
                }
                self.warnings = computed.warnings;
                self.error = None;
                let tables = computed.tables;
                if self.latest.as_ref().is_some_and(|l| l.tables == tables) {
                    return true;
                }
                let generation = self.latest.as_ref().map_or(1, |l| l.generation + 1);
                self.stream.publish(generation, &tables);
                self.latest = Some(Sync {
                    generation,
                    tables,
                    computed_in: started.elapsed(),
                });
                true
            }
            Err(e) => {
                let msg = e.to_string();
                if !self.quiet_repeats || self.error.as_ref() != Some(&msg) {
                    log::error!("{msg}");
                }
                self.error = Some(msg);
                false
            }
        }
    }

    /// Brings the dataplane to the latest snapshot if it is not there; `true` when `--once`
    /// is done.
    fn sync(&mut self) -> Result<bool> {
        match self.stream.sync() {
            Ok(Progress::Applied(g)) => {
                if let Some(l) = self.latest.as_ref().filter(|l| l.generation == g) {
                    log::info!(
                        "generation {g} applied: {} service ports, {} local pods, {} remote nodes; computed in {:?}, applied in {:?}",
                        l.tables.services.len(),
                        l.tables.local_pods.len(),
                        l.tables.remote_nodes.len(),
                        l.computed_in,
                        self.stream.last_round_trip().unwrap_or_default(),
                    );
                }
                Ok(self.once)
            }
            Ok(_) => Ok(false),
            Err(e @ StreamError::Refused { .. }) => {
                log::error!("{e}");
                if self.once {
                    bail!("{e}");
                }
                Ok(false)
            }
            Err(e) => {
                log::warn!("{e}");
                Ok(false)
            }
        }
    }
}

/// Polls the directory; reloads and recomputes when its fingerprint changes.
fn run_manifests(dir: &Path, publisher: &mut Publisher, poll: Duration) -> Result<()> {
    let mut seen = None;
    let mut dir_error = None;
    loop {
        match control::fingerprint(dir) {
            Ok(print) => {
                dir_error = None;
                if seen.as_ref() != Some(&print) {
                    seen = Some(print);
                    let started = Instant::now();
                    let published = match control::load_dir(dir) {
                        Ok(loaded) => {
                            for e in &loaded.errors {
                                eprintln!("kxdp-control: skipped {e}");
                            }
                            log::debug!(
                                "{} files, {} documents, {} objects, {} rejected",
                                loaded.files,
                                loaded.documents,
                                loaded.objects.len(),
                                loaded.errors.len()
                            );
                            publisher.objects_changed(&loaded.objects, started)
                        }
                        Err(e) => {
                            log::error!("{e}");
                            false
                        }
                    };
                    if !published && publisher.once {
                        bail!("--once: no table to send (see above)");
                    }
                }
            }
            Err(e) => {
                // Said once, not every poll; the directory may appear later.
                let msg = e.to_string();
                if publisher.once {
                    bail!("{msg}");
                }
                if dir_error.as_ref() != Some(&msg) {
                    log::error!("{msg}");
                    dir_error = Some(msg);
                }
                seen = None;
            }
        }
        if publisher.sync()? {
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

/// What one look at the API source found.
enum Look {
    /// Nothing applied since the last look.
    Unchanged,
    /// Some kinds have not been listed yet: no tables from a partial view.
    NotSynced,
    /// Tables computed (and published if new).
    Published,
    /// No tables could be computed (logged).
    Failed,
}

/// Watches the API server; recomputes whenever a batch of changes was applied.
fn run_kube(connection: &Connection, publisher: &mut Publisher, poll: Duration) -> Result<()> {
    // The watchers wait on sockets; one worker is plenty, and the computation runs on this
    // thread meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kxdp-watch")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut source = runtime.block_on(KubeSource::connect(connection))?;
    log::info!(
        "watching the API server for node {}'s tables",
        publisher.node
    );
    let mut waiting_said = false;
    loop {
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
            if publisher.objects_changed(objects, started) {
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
            Look::Failed if publisher.once => bail!("--once: no table to send (see above)"),
            Look::Unchanged | Look::NotSynced | Look::Published | Look::Failed => {}
        }
        if publisher.sync()? {
            return Ok(());
        }
        let alive = runtime.block_on(async {
            tokio::time::timeout(poll, source.changed())
                .await
                .unwrap_or(true)
        });
        if !alive {
            bail!("the API watchers stopped");
        }
    }
}

/// The node name when watching the API server, as kube-proxy finds it: the flag, else
/// `$NODE_NAME`, else the hostname; trimmed and lower-cased.
fn node_name(flag: Option<&str>) -> Result<String> {
    let name = match flag {
        Some(n) => n.to_string(),
        None => match std::env::var("NODE_NAME") {
            Ok(n) if !n.trim().is_empty() => n,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("no --hostname-override or NODE_NAME, and the hostname cannot be read")?,
        },
    };
    let name = name.trim().to_lowercase();
    if name.is_empty() {
        bail!("the node name is empty: give --hostname-override NAME");
    }
    Ok(name)
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let node = match (&args.manifests, &args.node) {
        (Some(_), Some(node)) => node.clone(),
        _ => node_name(args.node.as_deref())?,
    };
    let mut publisher = Publisher {
        node,
        cluster: cluster_spec(&args),
        stream: Stream::new(&args.socket),
        latest: None,
        once: args.once,
        quiet_repeats: args.manifests.is_none(),
        warnings: Vec::new(),
        error: None,
    };
    match &args.manifests {
        Some(dir) => run_manifests(dir, &mut publisher, poll),
        None => {
            let connection = Connection {
                kubeconfig: args.kubeconfig.clone(),
                master: args.master.clone(),
            };
            run_kube(&connection, &mut publisher, poll)
        }
    }
}
