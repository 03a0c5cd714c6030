//! `kxdp`: the operator's command. Inspects and operates a running `kxdp-dataplane` over
//! its control socket: counters, flow events, Services, tracked connections, NetworkPolicy
//! verdicts. The lab, its test clients and the demo are `kxdp-lab`'s.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod conntrack;
mod monitor;
mod policy;
mod services;
mod stats;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nat::wire::Message;

use output::StdoutClosed;

#[derive(Parser)]
#[command(
    name = "kxdp",
    about = "kxdp: inspection and operation of a running dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// On failure, print the error's full form (each cause on its own line, and a
    /// backtrace when RUST_BACKTRACE or RUST_LIB_BACKTRACE asks for one) instead of one line.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the dataplane's per-worker counters, table occupancy and policy drops.
    Stats {
        /// The dataplane's control socket.
        #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
        socket: PathBuf,
        /// Output: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Stream flow events (new connections with translation and policy verdict, drops with
    /// their reason) from the running dataplane; says how many events it could not keep up
    /// with. Stops after --seconds or --count events.
    Monitor {
        /// Only events with this address (source, destination or translation).
        #[arg(long)]
        addr: Option<std::net::IpAddr>,
        /// Only events with this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only drops (policy refusals included).
        #[arg(long)]
        drops: bool,
        /// Stop after this many seconds (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Stop after this many events (0: no limit).
        #[arg(long, default_value_t = 0)]
        count: usize,
        /// The dataplane's control socket.
        #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
        socket: PathBuf,
        /// Output: `table` or `json` (one event per line).
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Every Service port: frontends, endpoints with their state, weight and Maglev share.
    Services {
        /// The dataplane's control socket.
        #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
        socket: PathBuf,
        /// Output: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Tracked connections: tuples, translation, state, expiry, Service and policy verdict.
    Conntrack {
        /// Only connections with this address in either tuple.
        #[arg(long)]
        addr: Option<std::net::IpAddr>,
        /// Only connections with this port in either tuple.
        #[arg(long)]
        port: Option<u16>,
        /// Only this protocol: tcp, udp, sctp, icmp, icmpv6.
        #[arg(long)]
        proto: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print only the counts.
        #[arg(long)]
        count: bool,
        /// The dataplane's control socket.
        #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
        socket: PathBuf,
        /// Output: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// NetworkPolicy: explain which policy decides a connection.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
}

#[derive(clap::Subcommand)]
enum PolicyAction {
    /// Which policy allows a new connection from SRC to DST:PORT, or that none does, as the
    /// dataplane would judge it now (after Service translation, for every endpoint).
    Explain {
        /// The client's address.
        src: std::net::IpAddr,
        /// The destination as the client addresses it (pod, Service frontend, any IP).
        dst: std::net::IpAddr,
        /// The destination port (ignored for ICMP).
        port: u16,
        /// tcp, udp, sctp or icmp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// The dataplane's control socket.
        #[arg(long, default_value = "/run/kxdp/dataplane.sock")]
        socket: PathBuf,
        /// Output: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
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
        Cmd::Stats { socket, output } => stats::stats(&socket, &output),
        Cmd::Monitor {
            addr,
            port,
            drops,
            seconds,
            count,
            socket,
            output,
        } => monitor::monitor(&socket, addr, port, drops, seconds, count, &output),
        Cmd::Services { socket, output } => services::services(&socket, &output),
        Cmd::Conntrack {
            addr,
            port,
            proto,
            limit,
            count,
            socket,
            output,
        } => conntrack::conntrack(&socket, addr, port, proto.as_deref(), limit, count, &output),
        Cmd::Policy {
            action:
                PolicyAction::Explain {
                    src,
                    dst,
                    port,
                    proto,
                    socket,
                    output,
                },
        } => policy::explain(&socket, src, dst, port, &proto, &output),
    }
}

/// Connects to the dataplane's socket, giving up on a read or write after 5 s.
fn connect(socket: &Path) -> Result<ctlclient::Client> {
    let mut client = ctlclient::Client::connect(socket).with_context(|| {
        format!(
            "connect to {} (is kxdp-dataplane running?)",
            socket.display()
        )
    })?;
    client.set_timeout(Duration::from_secs(5))?;
    Ok(client)
}

/// Sends one request to the dataplane and returns its answer.
fn ask(socket: &Path, msg: &Message) -> Result<Message> {
    match connect(socket)?.ask(msg)? {
        Message::Refused { reason } => bail!("the dataplane refused: {reason}"),
        answer => Ok(answer),
    }
}
