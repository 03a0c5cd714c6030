//! `kxdp-control`: reads Kubernetes manifests from a directory, computes the node's tables
//! and streams them to `kxdp-dataplane`; re-sends when the directory changes or the
//! dataplane restarts.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use control::stream::Stream;
use ipnet::IpNet;
use nat::spec::ClusterSpec;

#[derive(Parser)]
#[command(
    name = "kxdp-control",
    about = "kxdp's control process: Kubernetes objects to dataplane tables"
)]
struct Args {
    /// Directory of Kubernetes manifests (multi-document YAML or JSON).
    #[arg(long)]
    manifests: PathBuf,
    /// The Node this dataplane serves.
    #[arg(long)]
    node: String,
    /// The dataplane's control socket.
    #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
    socket: PathBuf,
    /// The cluster's pod networks (repeatable).
    #[arg(long = "cluster-cidr")]
    cluster_cidrs: Vec<IpNet>,
    /// The Service ClusterIP ranges (repeatable).
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<IpNet>,
    /// Masquerade every Service connection (kube-proxy --masquerade-all).
    #[arg(long)]
    masquerade_all: bool,
    /// Send one table and exit once it is applied.
    #[arg(long)]
    once: bool,
    /// How often to look at the directory, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut cluster = ClusterSpec::default();
    if !args.cluster_cidrs.is_empty() {
        cluster.cluster_cidrs = args.cluster_cidrs.clone();
    }
    if !args.service_cidrs.is_empty() {
        cluster.service_cidrs = args.service_cidrs.clone();
    }
    cluster.masquerade_all = args.masquerade_all;
    let mut stream = Stream::new(&args.socket);
    let mut generation = 0u64;
    let mut seen = None;
    let mut pending: Option<nat::spec::TableSpec> = None;
    loop {
        let print = control::manifests::fingerprint(&args.manifests);
        if seen.as_ref() != Some(&print) {
            seen = Some(print);
            let started = Instant::now();
            let (objects, errors) = control::load_dir(&args.manifests)?;
            for e in &errors {
                eprintln!("kxdp-control: skipped {e}");
            }
            match control::compute_with_warnings(&objects, &args.node, &cluster) {
                Ok((tables, warnings)) => {
                    for w in warnings {
                        log::warn!("{}", w.0);
                    }
                    log::info!(
                        "computed {} service ports, {} local pods from {} objects ({} rejected) in {:?}",
                        tables.services.len(),
                        tables.local_pods.len(),
                        objects.len(),
                        errors.len(),
                        started.elapsed()
                    );
                    pending = Some(tables);
                }
                Err(e) => log::error!("{e}"),
            }
        }
        if let Some(tables) = &pending {
            generation += 1;
            let started = Instant::now();
            match stream.send(generation, tables) {
                Ok(()) => {
                    log::info!(
                        "generation {generation} applied by the dataplane in {:?}",
                        started.elapsed()
                    );
                    pending = None;
                    if args.once {
                        return Ok(());
                    }
                }
                Err(e) => log::warn!("{e}; retrying"),
            }
        } else if !args.once {
            // Resync when the dataplane restarted: it answers, but with an older generation.
            if let Err(e) = probe_and_resync(&args, &mut pending, &mut seen) {
                log::debug!("{e}");
            }
        }
        std::thread::sleep(Duration::from_millis(args.poll_ms));
    }
}

/// If the dataplane's tables are not ours (it restarted), forget the fingerprint so the
/// next pass recomputes and resends.
fn probe_and_resync(
    args: &Args,
    pending: &mut Option<nat::spec::TableSpec>,
    seen: &mut Option<Vec<(PathBuf, u64, Option<std::time::SystemTime>)>>,
) -> Result<()> {
    use nat::wire::{self, Message};
    let mut s = std::os::unix::net::UnixStream::connect(&args.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    wire::write_message(&mut s, &Message::GetStats)?;
    if let Message::Stats { generation: 0, .. } = wire::read_message(&mut s)? {
        log::info!("the dataplane has no tables (it restarted): resyncing");
        *seen = None;
        *pending = None;
    }
    Ok(())
}
