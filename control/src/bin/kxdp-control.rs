//! `kxdp-control`: reads Kubernetes objects from a directory of manifests (`--manifests`) or
//! watches them on the API server (otherwise), computes this node's tables and streams them
//! to `kxdp-dataplane`; re-sends when the objects change or the dataplane restarts. Serves
//! kube-proxy's `/healthz` and `/livez`, the health-check node ports of
//! `externalTrafficPolicy: Local` Services, and Prometheus `/metrics`.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use control::follow::{Follow, Settle};
use control::health::{HealthCheckPort, ProxyHealth, ServiceHealthServers};
use control::kube_source::{Change, Connection, KubeSource};
use control::metrics::ControlMetrics;
use control::stream::{Progress, Stream, StreamError};
use control::Programmer;
use ipnet::IpNet;
use nat::spec::ClusterSpec;

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
    /// Masquerade every connection to a ClusterIP (kube-proxy --masquerade-all).
    #[arg(long)]
    masquerade_all: bool,
    /// NodePorts answer only on node addresses in these networks (kube-proxy
    /// --nodeport-addresses; repeatable; 0.0.0.0/0 and ::/0 for all). Default: the
    /// node's primary address of each family, as kube-proxy's nftables mode.
    #[arg(long = "nodeport-address")]
    nodeport_addresses: Vec<IpNet>,
    /// Masquerade pod traffic leaving the cluster networks (flannel --ip-masq).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// Send one snapshot, exit once the dataplane applied it. Waits for a dataplane that
    /// is not up yet, but fails at once when its socket refuses permission (or the path
    /// cannot be one) or a manifest file cannot be read.
    #[arg(long)]
    once: bool,
    /// How often to look at the directory and at the dataplane connection, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// A burst of API changes is computed once no change has arrived for this long, in
    /// milliseconds.
    #[arg(long, default_value_t = control::follow::SETTLE_QUIET.as_millis() as u64)]
    settle_ms: u64,
    /// ... and at the latest this long after its first change, in milliseconds.
    #[arg(long, default_value_t = control::follow::SETTLE_MAX.as_millis() as u64)]
    settle_max_ms: u64,
    /// Where /healthz and /livez answer, as kube-proxy's (IP:PORT; "" turns them off).
    /// Default when watching the API server: 127.0.0.1:10256 (kube-proxy's port, but
    /// localhost unless told otherwise: load balancers that probe it need
    /// `--healthz-bind-address 0.0.0.0:10256`, as the DaemonSets in deploy/ pass); with
    /// --manifests: off.
    #[arg(long)]
    healthz_bind_address: Option<String>,
    /// /healthz and /livez fail once a change has waited this long for the dataplane, in
    /// seconds (kube-proxy: twice its sync period, 60 s by default).
    #[arg(long, default_value_t = control::health::DEFAULT_HEALTHZ_TIMEOUT.as_secs())]
    healthz_timeout_s: u64,
    /// Where /metrics answers (IP:PORT; "" turns it off). Default when watching the API
    /// server: 127.0.0.1:10249, localhost only as kube-proxy's; with --manifests: off.
    #[arg(long)]
    metrics_bind_address: Option<String>,
    /// The address the health-check node ports of externalTrafficPolicy: Local Services
    /// listen on (with --manifests too).
    #[arg(long, default_value = "0.0.0.0")]
    health_check_bind_address: IpAddr,
    /// The dataplane's uplink (as kxdp-dataplane --uplink). Its MAC is announced as this
    /// node's VTEP on its Node, as kxdp.io/vtep-mac and as flannel's annotations, so
    /// flannel nodes reach its pods; its MTU less 50 is the pods' MTU in the CNI config.
    #[arg(long, conflicts_with = "manifests")]
    uplink: Option<String>,
    /// Write this node's CNI config (05-kxdp.conflist) into this directory once its Node
    /// has podCIDRs, then exit (the DaemonSet's init container).
    #[arg(long, requires = "uplink", conflicts_with = "manifests")]
    cni_conf_dir: Option<PathBuf>,
    /// The CNI config's veth queues: kxdp-dataplane --workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    cni_queues: u32,
    /// On an error, print each cause on its own line and, when RUST_BACKTRACE or
    /// RUST_LIB_BACKTRACE is set, where it happened (without: one line, causes joined).
    #[arg(short, long)]
    verbose: bool,
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

/// Brings the dataplane to the latest snapshot if it is not there; `true` when `--once` is
/// done.
fn sync(programmer: &mut Programmer, once: bool) -> Result<bool> {
    match programmer.sync() {
        Ok(Progress::Applied(_)) => Ok(once),
        Ok(_) => Ok(false),
        Err(e @ (StreamError::Refused { .. } | StreamError::Busy { .. })) => {
            log::error!("{e}");
            if once {
                bail!("{e}");
            }
            Ok(false)
        }
        // Waiting for a permission to change is not what --once is for.
        Err(e) if once => match e.into_unreachable() {
            Ok(unreachable) => Err(unreachable.into()),
            Err(e) => {
                log::warn!("{e}");
                Ok(false)
            }
        },
        Err(e) => {
            log::warn!("{e}");
            Ok(false)
        }
    }
}

/// Polls the directory; reloads and recomputes when its fingerprint changes.
fn run_manifests(
    dir: &Path,
    programmer: &mut Programmer,
    poll: Duration,
    once: bool,
) -> Result<()> {
    let mut manifests = control::ManifestDir::new(dir);
    let mut seen = None;
    let mut dir_error = None;
    loop {
        match control::fingerprint(dir) {
            Ok(print) => {
                dir_error = None;
                if seen.as_ref() != Some(&print) {
                    seen = Some(print);
                    let started = Instant::now();
                    let published = match manifests.load() {
                        Ok(loaded) => {
                            for e in &loaded.errors {
                                eprintln!("kxdp-control: skipped {e}");
                            }
                            for k in &loaded.kept {
                                eprintln!("kxdp-control: {k}");
                            }
                            // One snapshot without a file's objects is not what --once
                            // was asked for (a bad document is: it is said above).
                            let unreadable = loaded
                                .errors
                                .into_iter()
                                .find(|e| matches!(e, control::ManifestError::Unreadable { .. }));
                            if let Some(e) = unreadable.filter(|_| once) {
                                return Err(anyhow::Error::new(e).context("--once"));
                            }
                            log::debug!(
                                "{} files, {} documents, {} objects",
                                loaded.files,
                                loaded.documents,
                                loaded.objects.len(),
                            );
                            let change = Change {
                                batches: 1,
                                ..Change::default()
                            };
                            programmer.objects_changed(&loaded.objects, &change, started)
                        }
                        Err(e) => {
                            log::error!("{e}");
                            false
                        }
                    };
                    if !published && once {
                        bail!("--once: no table to send (see above)");
                    }
                }
            }
            Err(e) => {
                // Said once, not every poll; the directory may appear later.
                let msg = e.to_string();
                if once {
                    bail!("{msg}");
                }
                if dir_error.as_ref() != Some(&msg) {
                    log::error!("{msg}");
                    dir_error = Some(msg);
                }
                seen = None;
            }
        }
        if sync(programmer, once)? {
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

/// An address flag that may be empty (kube-proxy: an empty bind address turns the server
/// off).
fn bind_address(flag: &str, value: Option<&str>) -> Result<Option<SocketAddr>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    value.parse().map(Some).with_context(|| {
        format!("{flag} {value:?}: write IP:PORT (e.g. 0.0.0.0:10256), or \"\" to turn it off")
    })
}

/// How often a server whose address could not be bound tries again (kube-proxy retries
/// its healthz and metrics servers every 5 s too, and keeps proxying meanwhile).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Runs the server `start` makes, trying again every [`BIND_RETRY`] while its address is
/// taken (kube-proxy still running during a migration): programming the dataplane does
/// not wait for it.
fn keep_serving<F>(runtime: &tokio::runtime::Handle, what: &'static str, addr: SocketAddr, start: F)
where
    F: Fn(&tokio::runtime::Handle) -> std::io::Result<control::health::HttpServer> + Send + 'static,
{
    let handle = runtime.clone();
    runtime.spawn(async move {
        let mut said = false;
        loop {
            match start(&handle) {
                Ok(server) => {
                    log::info!("{what} on {}", server.addr());
                    // Serves until the process ends.
                    std::future::pending::<()>().await;
                    drop(server);
                }
                Err(e) => {
                    if !said {
                        log::error!("{what}: cannot listen on {addr}: {e} (is kube-proxy still running on this node?); trying again every {BIND_RETRY:?}");
                        said = true;
                    }
                    tokio::time::sleep(BIND_RETRY).await;
                }
            }
        }
    });
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

/// An error as one line: each cause after a colon, a cause whose words its parent already
/// says left out (a message that quotes its source), line breaks folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let verbose = args.verbose;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if verbose => {
            eprintln!("kxdp-control: {e:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kxdp-control: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let node = match (&args.manifests, &args.node) {
        (Some(_), Some(node)) => node.clone(),
        _ => node_name(args.node.as_deref())?,
    };
    // The API watchers and the HTTP servers wait on sockets; one worker is plenty, and the
    // table computation runs on this thread meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kxdp-control-io")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let uplink = args
        .uplink
        .as_deref()
        .map(|u| control::uplink::Uplink::read(Path::new(control::uplink::SYS_CLASS_NET), u))
        .transpose()?;
    let connection = Connection {
        kubeconfig: args.kubeconfig.clone(),
        master: args.master.clone(),
    };
    // The init container's job: no servers, no tables.
    if let (Some(dir), Some(uplink)) = (&args.cni_conf_dir, &uplink) {
        let conf = control::cni_conf::CniConf {
            mtu: uplink.pod_mtu(),
            queues: args.cni_queues,
            dataplane_socket: args.socket.clone(),
        };
        let client = runtime.block_on(connection.client())?;
        runtime.block_on(control::cni_conf::install(client, &node, dir, &conf))?;
        return Ok(());
    }
    let metrics = Arc::new(ControlMetrics::new());
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(
        args.healthz_timeout_s,
    )));
    // Labs run several kxdp-control processes side by side on manifests: the fixed ports
    // are only the default when watching a cluster, as kube-proxy does.
    let cluster_default = |d: &str| args.manifests.is_none().then(|| d.to_string());
    let healthz = args
        .healthz_bind_address
        .clone()
        .or_else(|| cluster_default(control::health::DEFAULT_HEALTHZ_BIND));
    if let Some(addr) = bind_address("--healthz-bind-address", healthz.as_deref())? {
        let health = health.clone();
        keep_serving(
            runtime.handle(),
            "/healthz and /livez",
            addr,
            move |handle| control::health::serve_healthz(addr, health.clone(), handle),
        );
    }
    let metrics_bind = args
        .metrics_bind_address
        .clone()
        .or_else(|| cluster_default(control::metrics::DEFAULT_METRICS_BIND));
    if let Some(addr) = bind_address("--metrics-bind-address", metrics_bind.as_deref())? {
        let (metrics, socket) = (metrics.clone(), args.socket.clone());
        keep_serving(runtime.handle(), "/metrics", addr, move |handle| {
            control::metrics::serve_metrics(addr, metrics.clone(), socket.clone(), handle)
        });
    }
    let service_health = Arc::new(ServiceHealthServers::new(
        args.health_check_bind_address,
        HealthCheckPort::NodePort,
        health.clone(),
        runtime.handle().clone(),
    ));
    let mut programmer = Programmer::new(
        &node,
        cluster_spec(&args),
        Stream::new(&args.socket),
        metrics,
        health,
    )
    .with_service_health(service_health)
    .with_quiet_repeats(args.manifests.is_none());
    match &args.manifests {
        Some(dir) => run_manifests(dir, &mut programmer, poll, args.once),
        None => {
            let client = runtime.block_on(connection.client())?;
            let mut source = runtime.block_on(async { KubeSource::start(client.clone()) });
            if let Some(uplink) = &uplink {
                let vtep = control::node_announce::Vtep {
                    mac: uplink.mac,
                    vni: cluster_spec(&args).vxlan_vni,
                };
                let own = source.node_watch(&node);
                runtime.spawn(control::node_announce::announce(client, own, vtep));
            }
            log::info!("watching the API server for node {node}'s tables");
            let how = Follow {
                settle: Settle {
                    quiet: Duration::from_millis(args.settle_ms),
                    max: Duration::from_millis(args.settle_max_ms.max(args.settle_ms)),
                },
                poll,
                once: args.once,
            };
            // Runs until the process is killed; the dataplane keeps its tables meanwhile.
            let stop = AtomicBool::new(false);
            control::follow::follow(&mut source, &mut programmer, runtime.handle(), how, &stop)
                .map_err(Into::into)
        }
    }
}
