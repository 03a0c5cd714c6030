//! `kxdp-control`: reads Kubernetes manifests from a directory, computes this node's tables
//! and streams them to `kxdp-dataplane`; re-sends when the directory changes or the
//! dataplane restarts.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use control::stream::{Progress, Stream, StreamError};
use ipnet::IpNet;
use nat::spec::{ClusterSpec, TableSpec};

#[derive(Parser)]
#[command(
    name = "kxdp-control",
    about = "kxdp's control process: Kubernetes manifests to dataplane tables"
)]
struct Args {
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json; multi-document YAML).
    #[arg(long)]
    manifests: PathBuf,
    /// The Node this dataplane serves (its metadata.name).
    #[arg(long)]
    node: String,
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
    /// How often to look at the directory, in milliseconds.
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

/// Reads the directory and computes the tables; `None` when nothing can be sent (the
/// directory or this node's Node object is missing): the dataplane keeps what it has.
fn compute(args: &Args, cluster: &ClusterSpec) -> Option<(TableSpec, Duration)> {
    let started = Instant::now();
    let loaded = match control::load_dir(&args.manifests) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            return None;
        }
    };
    for e in &loaded.errors {
        eprintln!("kxdp-control: skipped {e}");
    }
    match control::compute_with_warnings(&loaded.objects, &args.node, cluster) {
        Ok(computed) => {
            for w in &computed.warnings {
                log::warn!("{w}");
            }
            log::debug!(
                "{} files, {} documents, {} objects, {} rejected",
                loaded.files,
                loaded.documents,
                loaded.objects.len(),
                loaded.errors.len()
            );
            Some((computed.tables, started.elapsed()))
        }
        Err(e) => {
            log::error!("{e}");
            None
        }
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let cluster = cluster_spec(&args);
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let mut stream = Stream::new(&args.socket);
    let mut seen = None;
    let mut dir_error = None;
    let mut latest: Option<Sync> = None;
    loop {
        match control::fingerprint(&args.manifests) {
            Ok(print) => {
                dir_error = None;
                if seen.as_ref() != Some(&print) {
                    seen = Some(print);
                    match compute(&args, &cluster) {
                        Some((tables, computed_in)) => {
                            let same = latest.as_ref().is_some_and(|l| l.tables == tables);
                            if !same {
                                let generation = latest.as_ref().map_or(1, |l| l.generation + 1);
                                stream.publish(generation, &tables);
                                latest = Some(Sync {
                                    generation,
                                    tables,
                                    computed_in,
                                });
                            }
                        }
                        None if args.once => bail!("--once: no table to send (see above)"),
                        None => {}
                    }
                }
            }
            Err(e) => {
                // Said once, not every poll; the directory may appear later.
                let msg = e.to_string();
                if args.once {
                    bail!("{msg}");
                }
                if dir_error.as_ref() != Some(&msg) {
                    log::error!("{msg}");
                    dir_error = Some(msg);
                }
                seen = None;
            }
        }
        match stream.sync() {
            Ok(Progress::Applied(g)) => {
                if let Some(l) = latest.as_ref().filter(|l| l.generation == g) {
                    log::info!(
                        "generation {g} applied: {} service ports, {} local pods, {} remote nodes; computed in {:?}, applied in {:?}",
                        l.tables.services.len(),
                        l.tables.local_pods.len(),
                        l.tables.remote_nodes.len(),
                        l.computed_in,
                        stream.last_round_trip().unwrap_or_default(),
                    );
                }
                if args.once {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e @ StreamError::Refused { .. }) => {
                log::error!("{e}");
                if args.once {
                    bail!("{e}");
                }
            }
            Err(e) => log::warn!("{e}"),
        }
        std::thread::sleep(poll);
    }
}
