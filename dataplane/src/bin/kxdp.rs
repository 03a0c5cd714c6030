//! `kxdp`: the operator's command. Builds and tears down the namespace lab, runs the pods'
//! echo server and a test client, reads the dataplane's counters, and runs the demo.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dataplane::lab::{Lab, LabSpec};
use nat::wire::{self, Message};

#[derive(Parser)]
#[command(name = "kxdp", about = "kxdp: lab, demo and inspection")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// On failure, print the error's full form (each cause on its own line, and a
    /// backtrace when RUST_BACKTRACE or RUST_LIB_BACKTRACE asks for one) instead of one line.
    #[arg(short, long, global = true)]
    verbose: bool,
}

/// Stdout was closed before everything was written (`kxdp services | head -1`): the
/// reader has what it wanted, so the command ends quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct StdoutClosed;

/// The error of a failed write to stdout: [`StdoutClosed`] for a closed pipe, else the
/// I/O error, saying it was stdout.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("write to stdout")
    }
}

/// `print!` that returns a failed write as an error (see [`stdout_error`]) instead of
/// panicking, as `print!` does.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// `println!` likewise.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, inspect or remove the namespace lab.
    Lab {
        #[command(subcommand)]
        action: LabAction,
        /// The lab description.
        #[arg(long, default_value = "lab/lab.yaml", global = true)]
        lab: PathBuf,
        /// Override the lab's name (namespaces are kxdp-<name>-…).
        #[arg(long, global = true)]
        name: Option<String>,
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

#[derive(clap::Subcommand)]
enum LabAction {
    /// Build the lab and start the pods' echo servers.
    Up {
        /// Queues per veth (one per dataplane worker).
        #[arg(long)]
        queues: Option<u32>,
    },
    /// End the lab's processes and delete its namespaces.
    Down,
    /// Show which of the lab's namespaces exist.
    Status,
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
        Cmd::Lab { action, lab, name } => {
            let mut spec = LabSpec::load(&lab)?;
            if let Some(n) = name {
                spec.name = n;
            }
            match action {
                LabAction::Up { queues } => {
                    if let Some(q) = queues {
                        spec.queues = q;
                    }
                    let lab = Lab::new(spec);
                    lab.up(&std::env::current_exe()?)?;
                    out!("{}", lab.status());
                }
                LabAction::Down => Lab::new(spec).down()?,
                LabAction::Status => out!("{}", Lab::new(spec).status()),
            }
            Ok(())
        }
        Cmd::Echo { name, ports } => echo(&name, &ports),
        Cmd::Call {
            to,
            proto,
            count,
            timeout_ms,
            interval_ms,
            reuse,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let session = if reuse && proto == "udp" {
                Some(udp_socket(to, timeout)?)
            } else {
                None
            };
            for i in 0..count {
                if i > 0 && interval_ms > 0 {
                    std::thread::sleep(Duration::from_millis(interval_ms));
                }
                let answer = match (proto.as_str(), &session) {
                    ("udp", Some(s)) => ask_udp(s),
                    ("tcp", _) => call_tcp(to, timeout),
                    ("udp", None) => call_udp(to, timeout),
                    (other, _) => bail!("--proto {other}: use tcp or udp"),
                };
                let line = match answer {
                    Ok(a) => {
                        let (who, peer) = split_answer(&a);
                        serde_json::json!({"i": i, "answer": who, "peer": peer})
                    }
                    Err(e) => serde_json::json!({"i": i, "error": format!("{e:#}")}),
                };
                outln!("{line}");
            }
            Ok(())
        }
        Cmd::Hold {
            to,
            millis,
            interval_ms,
            size,
            connections,
        } => {
            let threads: Vec<_> = (0..connections.clamp(1, 1024))
                .map(|i| {
                    std::thread::spawn(move || {
                        let (who, bytes, gap, err) = match hold(
                            to,
                            Duration::from_millis(millis),
                            Duration::from_millis(interval_ms),
                            size.clamp(8, 1 << 20),
                        ) {
                            Ok((who, bytes, gap)) => (who, bytes, gap, None),
                            Err((who, bytes, gap, e)) => (who, bytes, gap, Some(format!("{e:#}"))),
                        };
                        let mut line = serde_json::json!({
                            "i": i, "answer": who, "bytes": bytes,
                            "max_gap_ms": gap.as_secs_f64() * 1e3,
                        });
                        if let Some(e) = err {
                            line["error"] = e.into();
                        }
                        line
                    })
                })
                .collect();
            for t in threads {
                let line = t
                    .join()
                    .map_err(|_| anyhow::anyhow!("a hold thread panicked"))?;
                outln!("{line}");
            }
            Ok(())
        }
        Cmd::Blast {
            to,
            seconds,
            size,
            flows,
        } => {
            let sockets: Vec<UdpSocket> = (0..flows.max(1))
                .map(|_| UdpSocket::bind(("0.0.0.0", 0)))
                .collect::<Result<_, _>>()?;
            let payload = vec![0x6bu8; size];
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut sent = 0u64;
            'send: loop {
                for s in &sockets {
                    for _ in 0..64 {
                        if s.send_to(&payload, to).is_ok() {
                            sent += 1;
                        }
                    }
                    if Instant::now() >= deadline {
                        break 'send;
                    }
                }
            }
            outln!("{}", serde_json::json!({"sent": sent, "seconds": seconds}));
            Ok(())
        }
        Cmd::Stats { socket, output } => {
            let m = stats(&socket)?;
            match output.as_str() {
                "json" => {
                    let Message::Stats {
                        generation,
                        conntrack,
                        conntrack_capacity,
                        workers,
                        policy_drops,
                        refused_tables,
                    } = &m
                    else {
                        bail!("unexpected answer: {m:?}");
                    };
                    let workers: Vec<BTreeMap<&str, u64>> = workers
                        .iter()
                        .map(|w| w.iter().map(|(k, v)| (k.as_str(), *v)).collect())
                        .collect();
                    let drops: BTreeMap<&str, u64> =
                        policy_drops.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                    outln!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "generation": generation,
                            "conntrack": {"entries": conntrack, "capacity": conntrack_capacity},
                            "workers": workers,
                            "policy_drops": drops,
                            "refused_tables": refused_tables,
                        }))?
                    );
                }
                "table" => print_stats(&m)?,
                other => bail!("-o {other}: use table or json"),
            }
            Ok(())
        }
        Cmd::Monitor {
            addr,
            port,
            drops,
            seconds,
            count,
            socket,
            output,
        } => monitor(&socket, addr, port, drops, seconds, count, &output),
        Cmd::Flood {
            dev,
            dst_mac,
            to,
            kind,
            count,
            seconds,
        } => flood(&dev, &dst_mac, to, &kind, count, seconds),
        Cmd::Services { socket, output } => {
            let m = ask(&socket, &Message::GetServices)?;
            let Message::Services {
                generation,
                services,
            } = m
            else {
                bail!("unexpected answer: {m:?}");
            };
            match output.as_str() {
                "json" => outln!("{}", serde_json::to_string_pretty(&services)?),
                "table" => {
                    outln!(
                        "tables generation {generation}, {} service ports",
                        services.len()
                    );
                    for s in &services {
                        let mut flags = Vec::new();
                        if s.internal_local {
                            flags.push("iTP=Local".to_string());
                        }
                        if s.external_local {
                            flags.push("eTP=Local".to_string());
                        }
                        if let Some(t) = s.affinity_timeout_s {
                            flags.push(format!("affinity {t}s"));
                        }
                        outln!("{} {} {}", s.name, s.protocol, flags.join(" "));
                        for f in &s.frontends {
                            outln!("  -> {f}");
                        }
                        // Another Service on one of these frontends: this one is older
                        // and holds it (issue 16: a newcomer must not take it over).
                        for r in &s.refused {
                            outln!("  !! refused to {r} (this Service is older)");
                        }
                        for b in &s.backends {
                            outln!(
                                "     {:<28} {:<12} {:<6} weight {} share cluster {:>5.1}% local {:>5.1}%",
                                b.endpoint,
                                b.state,
                                if b.local { "local" } else { "remote" },
                                b.weight,
                                b.cluster_share * 100.0,
                                b.local_share * 100.0
                            );
                        }
                    }
                }
                other => bail!("-o {other}: use table or json"),
            }
            Ok(())
        }
        Cmd::Conntrack {
            addr,
            port,
            proto,
            limit,
            count,
            socket,
            output,
        } => {
            let protocol = match proto.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None => None,
                Some("tcp") => Some(6),
                Some("udp") => Some(17),
                Some("sctp") => Some(132),
                Some("icmp") => Some(1),
                Some("icmpv6") => Some(58),
                Some(other) => bail!("--proto {other}: use tcp, udp, sctp, icmp or icmpv6"),
            };
            let m = ask(
                &socket,
                &Message::GetConntrack {
                    addr,
                    port,
                    protocol,
                    limit: if count { 0 } else { limit },
                },
            )?;
            let Message::Conntrack {
                total,
                matched,
                entries,
            } = m
            else {
                bail!("unexpected answer: {m:?}");
            };
            match output.as_str() {
                "json" => outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "total": total, "matched": matched, "entries": entries,
                    }))?
                ),
                "table" => {
                    outln!("{matched} of {total} connections match");
                    for e in &entries {
                        outln!(
                            "{:<6} {:<48} reply {:<48} {:<9} {:<12} {:>6}s {} [{}]",
                            e.protocol,
                            e.original,
                            e.reply,
                            e.nat,
                            e.state,
                            e.expires_in_s,
                            e.service.as_deref().unwrap_or("-"),
                            e.policy
                        );
                    }
                }
                other => bail!("-o {other}: use table or json"),
            }
            Ok(())
        }
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
        } => policy_explain(&socket, src, dst, port, &proto, &output),
        Cmd::Demo {
            lab,
            manifests,
            workers,
            count,
            rate_seconds,
        } => demo(&lab, &manifests, workers, count, rate_seconds),
    }
}

/// Binds `[::]:port` (which takes IPv4 too) or, without IPv6, `0.0.0.0:port`.
fn bind_any<T>(port: u16, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    bind(SocketAddr::from(([0u16; 8], port))).or_else(|_| bind(SocketAddr::from(([0u8; 4], port))))
}

fn echo(name: &str, ports: &[u16]) -> Result<()> {
    let mut threads = Vec::new();
    for &port in ports {
        let tcp = bind_any(port, TcpListener::bind).with_context(|| format!("bind tcp {port}"))?;
        let name_tcp = name.to_string();
        threads.push(std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                // Each connection: say who we are and who we see, then echo whatever comes
                // until the client closes (a one-shot `call` closes at once, `hold` streams).
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_canonical().to_string())
                    .unwrap_or_default();
                let answer = format!("{name_tcp} {peer}\n");
                std::thread::spawn(move || {
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let udp = bind_any(port, UdpSocket::bind).with_context(|| format!("bind udp {port}"))?;
        let name_udp = name.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let answer = format!("{name_udp} {}", from.ip().to_canonical());
                let _ = udp.send_to(answer.as_bytes(), from);
            }
        }));
    }
    eprintln!("echo {name} on {ports:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// An echo server's answer: who answered and which source address it saw.
fn split_answer(text: &str) -> (String, String) {
    let mut parts = text.split_whitespace();
    let who = parts.next().unwrap_or_default().to_string();
    let peer = parts.next().unwrap_or_default().to_string();
    (who, peer)
}

fn call_tcp(to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout).context("connect")?;
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("read")?;
    Ok(out.trim().to_string())
}

/// Streams `size`-byte messages through one connection, checking each echo; returns who
/// answered and the bytes echoed, or the error with what was done before it.
/// Holds one TCP connection for `total`, echoing `size`-byte messages every `interval`;
/// returns who answered, the bytes echoed and the longest wait for an echo.
#[allow(clippy::type_complexity)]
fn hold(
    to: SocketAddr,
    total: Duration,
    interval: Duration,
    size: usize,
) -> std::result::Result<(String, u64, Duration), (String, u64, Duration, anyhow::Error)> {
    let mut who = String::new();
    let mut bytes = 0u64;
    let mut max_gap = Duration::ZERO;
    let mut run = || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).context("connect")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).context("read greeting")?;
            line.push(b[0]);
        }
        who = split_answer(&String::from_utf8_lossy(&line)).0;
        let deadline = Instant::now() + total;
        let mut seq = 0u64;
        while Instant::now() < deadline {
            let mut msg = vec![0x5au8; size];
            msg[..8].copy_from_slice(&seq.to_be_bytes());
            let sent = Instant::now();
            s.write_all(&msg).context("write")?;
            let mut back = vec![0u8; size];
            s.read_exact(&mut back).context("read echo")?;
            max_gap = max_gap.max(sent.elapsed());
            if back != msg {
                bail!("echo {seq} came back changed");
            }
            bytes += size as u64;
            seq += 1;
            std::thread::sleep(interval);
        }
        Ok(())
    };
    match run() {
        Ok(()) => Ok((who, bytes, max_gap)),
        Err(e) => Err((who.clone(), bytes, max_gap, e)),
    }
}

fn udp_socket(to: SocketAddr, timeout: Duration) -> Result<UdpSocket> {
    let local = if to.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(to)?;
    Ok(s)
}

fn call_udp(to: SocketAddr, timeout: Duration) -> Result<String> {
    ask_udp(&udp_socket(to, timeout)?)
}

/// One question on a connected UDP socket.
fn ask_udp(s: &UdpSocket) -> Result<String> {
    let mut buf = [0u8; 2048];
    // A datagram can be lost (e.g. while the dataplane resolves a pod); ask up to 3 times.
    let mut last = None;
    for _ in 0..3 {
        s.send(b"who")?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no answer")))
}

/// Sends one request to the dataplane and returns its answer.
fn ask(socket: &Path, msg: &Message) -> Result<Message> {
    let mut client = ctlclient::Client::connect(socket).with_context(|| {
        format!(
            "connect to {} (is kxdp-dataplane running?)",
            socket.display()
        )
    })?;
    client.set_timeout(Duration::from_secs(5))?;
    match client.ask(msg)? {
        Message::Refused { reason } => bail!("the dataplane refused: {reason}"),
        answer => Ok(answer),
    }
}

fn policy_explain(
    socket: &Path,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    port: u16,
    proto: &str,
    output: &str,
) -> Result<()> {
    use nat::spec::Protocol;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        "icmp" => None,
        other => bail!("--proto {other}: use tcp, udp, sctp or icmp"),
    };
    // Any client may ask the dataplane, which refuses this too; asked here, it needs none.
    dataplane::inspect::check_families(src, dst)?;
    let answer = ask(
        socket,
        &Message::ExplainPolicy {
            src,
            dst,
            protocol,
            port,
        },
    )?;
    let Message::PolicyExplained { paths } = answer else {
        bail!("unexpected answer: {answer:?}");
    };
    match output {
        "json" => outln!("{}", serde_json::to_string_pretty(&paths)?),
        "table" => {
            for p in &paths {
                let via = p
                    .service
                    .as_deref()
                    .map(|s| format!(" via {s}"))
                    .unwrap_or_default();
                outln!(
                    "{src} -> {}:{}{via} (seen from {}): {}",
                    p.dst,
                    p.port,
                    p.peer,
                    if p.allowed { "ALLOWED" } else { "DENIED" }
                );
                for (dir, v) in [("egress ", &p.egress), ("ingress", &p.ingress)] {
                    let pod = v.pod.as_deref().unwrap_or("-");
                    let by = match (&v.allowed_by, v.verdict.as_str()) {
                        (Some(by), _) => format!(" by {by}"),
                        (None, "denied") => " (no policy allows it)".to_string(),
                        _ => String::new(),
                    };
                    let iso = if v.isolating.is_empty() {
                        String::new()
                    } else {
                        format!("; isolated by {}", v.isolating.join(", "))
                    };
                    outln!("  {dir} {pod:<24} {}{by}{iso}", v.verdict);
                }
            }
        }
        other => bail!("-o {other}: use table or json"),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn monitor(
    socket: &Path,
    addr: Option<std::net::IpAddr>,
    port: Option<u16>,
    drops_only: bool,
    seconds: u64,
    count: usize,
    output: &str,
) -> Result<()> {
    if !matches!(output, "table" | "json") {
        bail!("-o {output}: use table or json");
    }
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to {} (is kxdp-dataplane running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    wire::write_message(
        &mut s,
        &Message::Monitor {
            addr,
            port,
            drops_only,
        },
    )?;
    let deadline = (seconds > 0).then(|| Instant::now() + Duration::from_secs(seconds));
    let mut shown = 0usize;
    let mut stdout = std::io::stdout().lock();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) || (count > 0 && shown >= count) {
            return Ok(());
        }
        let m = wire::read_message(&mut s)?;
        let (events, lost) = match m {
            Message::FlowEvents { events, lost } => (events, lost),
            Message::Refused { reason } => bail!("the dataplane refused: {reason}"),
            other => bail!("unexpected answer: {other:?}"),
        };
        if lost > 0 {
            if output == "json" {
                writeln!(stdout, "{}", serde_json::json!({ "lost": lost }))
                    .map_err(stdout_error)?;
            } else {
                writeln!(
                    stdout,
                    "... {lost} events lost (the monitor could not keep up)"
                )
                .map_err(stdout_error)?;
            }
        }
        for e in events {
            if count > 0 && shown >= count {
                break;
            }
            shown += 1;
            if output == "json" {
                writeln!(stdout, "{}", serde_json::to_string(&e)?).map_err(stdout_error)?;
                continue;
            }
            let sock = |a: (std::net::IpAddr, u16)| std::net::SocketAddr::from(a).to_string();
            let mut line = format!(
                "{:>12.6} w{} {:<12} {:<3} {} -> {}",
                e.at as f64 / 1e9,
                e.worker,
                format!("{:?}", e.kind),
                e.protocol,
                sock(e.src),
                sock(e.dst)
            );
            if let Some(to) = e.to {
                line.push_str(&format!(" => {}", sock(to)));
            }
            if let Some(m) = e.masquerade {
                line.push_str(&format!(" as {}", sock(m)));
            }
            if let Some(p) = &e.policy {
                line.push_str(&format!(" allowed by {p}"));
            }
            if let Some(r) = &e.reason {
                line.push_str(&format!(" ({r})"));
            }
            writeln!(stdout, "{line}").map_err(stdout_error)?;
        }
        stdout.flush().map_err(stdout_error)?;
    }
}

/// Sends `count` frames of `kind` (at most for `seconds`) to `to` out of `dev`, and prints
/// how many went.
fn flood(
    dev: &str,
    dst_mac: &str,
    to: std::net::SocketAddrV4,
    kind: &str,
    count: u64,
    seconds: u64,
) -> Result<()> {
    let mac: Vec<u8> = dst_mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--dst-mac {dst_mac}"))?;
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| anyhow::anyhow!("--dst-mac {dst_mac}"))?;
    let sock = pktio::capture::RawSocket::bind(dev)?;
    let src_mac = [0x02, 0x66, 0x6c, 0x6f, 0x6f, 0x64];
    // xorshift: reproducible, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline {
        let r = rand();
        // Sources in 100.64.0.0/10 (shared address space: nobody's real clients).
        let src = [100, 64 | (r as u8 & 0x3f), (r >> 8) as u8, (r >> 16) as u8];
        let sport = 1024 + (r >> 24) as u16 % 60000;
        let mut frame = Vec::with_capacity(64);
        match kind {
            "syn" => etherparse::PacketBuilder::ethernet2(src_mac, mac)
                .ipv4(src, to.ip().octets(), 64)
                .tcp(sport, to.port(), r as u32, 1024)
                .syn()
                .write(&mut frame, &[])?,
            "fragments" => {
                etherparse::PacketBuilder::ethernet2(src_mac, mac)
                    .ipv4(src, to.ip().octets(), 64)
                    .udp(sport, to.port())
                    .write(&mut frame, &[0u8; 32])?;
                // A fragment other than the first: offset 8 (in 8-byte units), no transport
                // header of its own; the header checksum made right again.
                frame[14 + 6] = 0x00;
                frame[14 + 7] = 0x08;
                frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
                let c = nat::checksum::checksum(&frame[14..34]);
                frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
            }
            "garbage" => {
                // An IPv4 header that an XDP parser takes (version 4, IHL 5, UDP, the
                // destination) around random bytes: wrong checksum, lengths, payload.
                frame.extend_from_slice(&mac);
                frame.extend_from_slice(&src_mac);
                frame.extend_from_slice(&[0x08, 0x00]);
                let n = 28 + (r % 40) as usize;
                for _ in 0..n {
                    frame.push(rand() as u8);
                }
                frame[14] = 0x45;
                frame[14 + 9] = 17;
                frame[26..30].copy_from_slice(&src);
                frame[30..34].copy_from_slice(&to.ip().octets());
            }
            other => bail!("--kind {other}: use syn, fragments or garbage"),
        }
        sock.send(&frame)?;
        sent += 1;
    }
    outln!("{}", serde_json::json!({"sent": sent, "kind": kind}));
    Ok(())
}

/// Asks the dataplane for its counters.
fn stats(socket: &Path) -> Result<Message> {
    ask(socket, &Message::GetStats)
}

fn print_stats(m: &Message) -> Result<()> {
    let Message::Stats {
        generation,
        conntrack,
        conntrack_capacity,
        workers,
        policy_drops,
        refused_tables,
    } = m
    else {
        bail!("unexpected answer: {m:?}");
    };
    outln!(
        "tables generation {generation}, conntrack {conntrack}/{conntrack_capacity}, tables refused {refused_tables}"
    );
    out!("{:<28}", "counter");
    for i in 0..workers.len() {
        out!("{:>14}", format!("worker {i}"));
    }
    outln!();
    if let Some(first) = workers.first() {
        for (k, (name, _)) in first.iter().enumerate() {
            let values: Vec<u64> = workers
                .iter()
                .map(|w| w.get(k).map(|v| v.1).unwrap_or(0))
                .collect();
            if values.iter().all(|v| *v == 0) && name.starts_with("drop_") {
                continue;
            }
            out!("{name:<28}");
            for v in values {
                out!("{v:>14}");
            }
            outln!();
        }
    }
    if !policy_drops.is_empty() {
        outln!("connections refused by NetworkPolicy");
        for (name, v) in policy_drops {
            outln!("  {name:<40}{v:>14}");
        }
    }
    Ok(())
}

/// A child process that is ended (by PID) when dropped.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn demo(
    lab_path: &Path,
    manifests: &Path,
    workers: u32,
    count: u32,
    rate_seconds: u64,
) -> Result<()> {
    let mut spec = LabSpec::load(lab_path)?;
    spec.queues = workers;
    let lab = Lab::new(spec);
    let _ = lab.down();
    lab.up(&std::env::current_exe()?)?;
    // Whatever happens below, the lab goes away.
    struct Down<'a>(&'a Lab);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = self.0.down();
        }
    }
    let _down = Down(&lab);
    let socket = lab.state_dir().join("dataplane.sock");
    let dp_log = std::fs::File::create(lab.state_dir().join("dataplane.log"))?;
    let dataplane = lab
        .dataplane_command(&sibling("kxdp-dataplane")?, workers, &socket)
        .stdin(Stdio::null())
        .stdout(dp_log.try_clone()?)
        .stderr(dp_log)
        .spawn()
        .context("start kxdp-dataplane")?;
    let _dataplane = Guarded(dataplane);
    wait_for(&socket, Duration::from_secs(10))
        .context("kxdp-dataplane did not open its socket (see its log)")?;
    let ctl_log = std::fs::File::create(lab.state_dir().join("control.log"))?;
    let control = Command::new(sibling("kxdp-control")?)
        .args([
            "--manifests",
            &manifests.to_string_lossy(),
            "--node",
            &lab.spec.node.name,
        ])
        .args(["--socket", &socket.to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(ctl_log.try_clone()?)
        .stderr(ctl_log)
        .spawn()
        .context("start kxdp-control")?;
    let _control = Guarded(control);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Message::Stats { generation, .. }) = stats(&socket) {
            if generation > 0 {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "control did not program the dataplane within 10 s (see {})",
                lab.state_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = lab
        .pod_index("default/client")
        .context("the lab has no default/client pod")?;
    let me = std::env::current_exe()?;
    let targets = [
        ("web", "172.30.0.41:80", "tcp"),
        ("dns", "172.30.0.10:53", "udp"),
        ("dns", "172.30.0.10:53", "tcp"),
    ];
    outln!(
        "\n{count} connections per Service from default/client ({}):",
        lab.spec.pods[client].ip
    );
    outln!(
        "{:<8} {:<18} {:<5} {:<18} {:>8}",
        "service",
        "clusterIP:port",
        "proto",
        "answered by",
        "count"
    );
    let mut failed = 0u32;
    for (svc, to, proto) in targets {
        let out = run_output(Lab::exec(&lab.pod_ns(client), &me.to_string_lossy()).args([
            "call",
            "--to",
            to,
            "--proto",
            proto,
            "--count",
            &count.to_string(),
        ]))?;
        let mut tally: BTreeMap<String, u32> = BTreeMap::new();
        for line in out.lines() {
            // (each line is one connection's outcome)
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let who = v
                .get("answer")
                .and_then(|a| a.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "error: {}",
                        v.get("error").and_then(|e| e.as_str()).unwrap_or("?")
                    )
                });
            if who.starts_with("error") {
                failed += 1;
            }
            *tally.entry(who).or_default() += 1;
        }
        for (who, n) in tally {
            outln!("{svc:<8} {to:<18} {proto:<5} {who:<18} {n:>8}");
        }
    }
    outln!();
    print_stats(&stats(&socket)?)?;
    if rate_seconds > 0 {
        let before = forwarded(&stats(&socket)?);
        let started = Instant::now();
        let out = run_output(Lab::exec(&lab.pod_ns(client), &me.to_string_lossy()).args([
            "blast",
            "--to",
            "172.30.0.10:53",
            "--seconds",
            &rate_seconds.to_string(),
        ]))?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = forwarded(&stats(&socket)?);
        let sent: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let sent = sent.get("sent").and_then(|v| v.as_u64()).unwrap_or(0);
        outln!(
            "\nrate: a UDP sender in default/client sent {sent} 64-byte datagrams to 172.30.0.10:53 in {elapsed:.1} s ({:.0} pps offered);\nthe dataplane forwarded {} packets in that time, both directions ({:.0} pps, {workers} workers)",
            sent as f64 / elapsed,
            after - before,
            (after - before) as f64 / elapsed
        );
    }
    if failed > 0 {
        bail!("{failed} connections failed (see the table above)");
    }
    Ok(())
}

/// Packets the dataplane transmitted, summed over workers.
fn forwarded(m: &Message) -> u64 {
    let Message::Stats { workers, .. } = m else {
        return 0;
    };
    workers
        .iter()
        .flat_map(|w| w.iter())
        .filter(|(k, _)| k == "tx")
        .map(|(_, v)| *v)
        .sum()
}

fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
