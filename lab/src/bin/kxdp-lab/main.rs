//! `kxdp-lab`: the lab and its tools. Builds and tears down the namespace lab, runs the
//! pods' echo server, test clients (`call`, `hold`), a UDP load (`blast`) and a raw-frame
//! flood inside the lab's namespaces, and runs the demo. The operator's commands
//! (inspection and operation of a running dataplane) are `kxdp`'s.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod blast;
mod client;
mod demo;
mod echo;
mod flood;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lab::{Lab, LabSpec};

use output::StdoutClosed;

#[derive(Parser)]
#[command(
    name = "kxdp-lab",
    about = "kxdp-lab: the namespace lab, its tools and the demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// On failure, print the error's full form (each cause on its own line, and a
    /// backtrace when RUST_BACKTRACE or RUST_LIB_BACKTRACE asks for one) instead of one line.
    #[arg(short, long, global = true)]
    verbose: bool,
}

/// Which lab a lab command acts on.
#[derive(Args)]
struct Which {
    /// The lab description.
    #[arg(long, default_value = "lab/lab.yaml")]
    lab: PathBuf,
    /// Override the lab's name (namespaces are kxdp-<name>-…).
    #[arg(long)]
    name: Option<String>,
}

impl Which {
    fn load(&self) -> Result<LabSpec> {
        let mut spec = LabSpec::load(&self.lab)?;
        if let Some(n) = &self.name {
            spec.name = n.clone();
        }
        Ok(spec)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab and start the pods' echo servers.
    Up {
        #[command(flatten)]
        which: Which,
        /// Queues per veth (one per dataplane worker).
        #[arg(long)]
        queues: Option<u32>,
    },
    /// End the lab's processes and delete its namespaces.
    Down {
        #[command(flatten)]
        which: Which,
    },
    /// Show which of the lab's namespaces exist.
    Status {
        #[command(flatten)]
        which: Which,
    },
    /// Run a pod's echo server: answers every TCP connection and UDP datagram with its name.
    Echo {
        /// The name to answer with.
        #[arg(long)]
        name: String,
        /// Ports, comma-separated; each is served on TCP and UDP.
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
    },
    /// Connect `count` times to an address and print who answered, one JSON line each.
    Call {
        /// Destination address:port.
        #[arg(long)]
        to: SocketAddr,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Number of connections (each from a new source port).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Per-attempt timeout in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Pause between connections, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// UDP: ask every time from the same socket (one flow) instead of a new one.
        #[arg(long)]
        reuse: bool,
    },
    /// Hold one TCP connection open and stream through it (echoed back) for a bounded
    /// time; prints one JSON line with who answered, bytes echoed and any error.
    Hold {
        /// Destination address:port.
        #[arg(long)]
        to: SocketAddr,
        /// How long to hold the connection, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        millis: u64,
        /// Pause between writes, in milliseconds.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Bytes per message (large ones exercise segmentation and path MTU).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Connections held at once (one JSON line each).
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Send UDP datagrams to an echo server at a constant rate from one socket (one flow)
    /// for a bounded time, and time the answers: prints one JSON line with when it started
    /// (Unix time), how many were sent and answered, the longest interval without an
    /// answer, and every interval over `--report-ms` with when it began (from the start).
    /// Shows how long forwarding stopped (a handover).
    Probe {
        /// Destination address:port.
        #[arg(long)]
        to: SocketAddr,
        /// Datagrams per second.
        #[arg(long, default_value_t = 1000)]
        pps: u32,
        /// How long to send, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        millis: u64,
        /// Report every interval without an answer longer than this, in milliseconds.
        #[arg(long, default_value_t = 3.0)]
        report_ms: f64,
    },
    /// Send UDP datagrams to an address as fast as one socket can, for a bounded time.
    Blast {
        /// Destination address:port.
        #[arg(long)]
        to: SocketAddr,
        /// How long to send, in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Payload bytes per datagram (18 makes a 64-byte Ethernet frame).
        #[arg(long, default_value_t = 18)]
        size: usize,
        /// Source ports to rotate through (flows).
        #[arg(long, default_value_t = 16)]
        flows: u16,
    },
    /// Send a bounded flood of raw frames out of an interface (for flood tests in the lab):
    /// TCP SYNs from random sources, later IPv4 fragments, or malformed IPv4 frames.
    Flood {
        /// The interface to send on (in this namespace).
        #[arg(long, default_value = "eth0")]
        dev: String,
        /// Destination MAC (the node's uplink).
        #[arg(long)]
        dst_mac: String,
        /// Destination address:port.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        /// syn, fragments or garbage.
        #[arg(long, default_value = "syn")]
        kind: String,
        /// Frames to send at most.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Seconds to send at most.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The demo: lab up, dataplane and control on the bundled manifests, TCP and UDP calls
    /// to the ClusterIPs from a pod, a table of who answered and the counters, lab down.
    Demo {
        /// The lab description.
        #[arg(long, default_value = "lab/lab.yaml")]
        lab: PathBuf,
        /// The manifests control reads.
        #[arg(long, default_value = "lab/manifests")]
        manifests: PathBuf,
        /// Worker threads (and queues per interface).
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Connections per Service.
        #[arg(long, default_value_t = 30)]
        count: u32,
        /// Seconds of UDP load for a packet-rate figure (0: skip).
        #[arg(long, default_value_t = 5)]
        rate_seconds: u64,
    },
}

/// Runs the command; an error is one line on stderr (with its causes, `: `-separated), or
/// its full form with `--verbose`, and exit status 1. A closed stdout ends it quietly.
fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn the error into a panic.
            let mut stderr = std::io::stderr().lock();
            let _ = if cli.verbose {
                writeln!(stderr, "error: {e:?}")
            } else {
                writeln!(stderr, "error: {e:#}")
            };
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<()> {
    match command {
        Cmd::Up { which, queues } => {
            let mut spec = which.load()?;
            if let Some(q) = queues {
                spec.queues = q;
            }
            let lab = Lab::new(spec);
            lab.up(&std::env::current_exe()?)?;
            out!("{}", lab.status());
            Ok(())
        }
        Cmd::Down { which } => Ok(Lab::new(which.load()?).down()?),
        Cmd::Status { which } => {
            out!("{}", Lab::new(which.load()?).status());
            Ok(())
        }
        Cmd::Echo { name, ports } => echo::serve(&name, &ports),
        Cmd::Call {
            to,
            proto,
            count,
            timeout_ms,
            interval_ms,
            reuse,
        } => client::call(to, &proto, count, timeout_ms, interval_ms, reuse),
        Cmd::Hold {
            to,
            millis,
            interval_ms,
            size,
            connections,
        } => client::hold_all(to, millis, interval_ms, size, connections),
        Cmd::Probe {
            to,
            pps,
            millis,
            report_ms,
        } => client::probe(to, pps, millis, report_ms),
        Cmd::Blast {
            to,
            seconds,
            size,
            flows,
        } => blast::blast(to, seconds, size, flows),
        Cmd::Flood {
            dev,
            dst_mac,
            to,
            kind,
            count,
            seconds,
        } => flood::flood(&dev, &dst_mac, to, &kind, count, seconds),
        Cmd::Demo {
            lab,
            manifests,
            workers,
            count,
            rate_seconds,
        } => demo::demo(&lab, &manifests, workers, count, rate_seconds),
    }
}
