//! `kxdp-bench`: the bench harness's command line (issue 7). `kxdp bench` is spelled
//! `kxdp-bench` so the bench crate stays out of the dataplane binary.
//!
//! - `kxdp-bench gen-ceiling`: AF_XDP generator → veth → AF_XDP sink in namespaces of their
//!   own; prints what was sent and received, the rates, loss and one-way latency.
//! - `kxdp-bench rules iptables|nftables`: prints the ruleset kube-proxy would write for a
//!   generated Service set (what the kernel baselines load).
//! - `kxdp-bench run --quick|--full`: every device under test (kxdp, the kernel with
//!   kube-proxy's iptables and nftables rulesets, the bare AF_XDP forwarder) on the same
//!   lab in the same run, in alternation; writes `results.json`, `results.md`,
//!   `README-table.md` and PNG plots, and prints the Markdown.
//! - `kxdp-bench report RESULTS.json`: writes the Markdown and plots again from a JSON.
//! - `kxdp-bench serve-dut|gen|sink|vm-report`: the roles of the VM bench (`vagrant/`),
//!   one per machine, each printing JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bench::baseline::{iptables, nftables, KubeProxyConfig};
use bench::ceiling::{self, CeilingConfig};
use bench::dut::DutKind;
use bench::scenario::ServiceSet;
use bench::suite::{self, Paths, Plan, Results};
use clap::{Parser, Subcommand, ValueEnum};
use pktio::xsk::XdpMode;

#[derive(Parser)]
#[command(name = "kxdp-bench", about = "kxdp's benchmark harness (issue 7)")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
    /// Print errors with their full detail (a backtrace too, when RUST_BACKTRACE is set).
    #[arg(long, short, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// The generator's ceiling: generator → veth → sink, nothing in between (root).
    GenCeiling {
        /// Frame size in bytes without FCS (64..=1514).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Flows (rotating UDP source ports).
        #[arg(long, default_value_t = 1)]
        flows: u32,
        /// Frames per second; 0 sends flat out.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Seconds to send (at most 600).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Runs, reported one by one and as a median.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// XDP mode of the sink's program.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        xdp_mode: Mode,
        /// Do not pin the generator and the sink to cores 0 and 1.
        #[arg(long)]
        no_pin: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every device under test in alternation, with reports (root).
    Run {
        /// The short run (under 5 minutes on 2 cores): 1, 1k and 10k Services, 2
        /// repetitions of 2 s, four devices.
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// The full run: 1 to 100k Services, 5 repetitions of 5 s, five devices, waiting
        /// for an idle machine before each round.
        #[arg(long)]
        full: bool,
        /// Where results, plots and logs go.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where kxdp-dataplane is.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        /// Devices, comma-separated (kxdp, kxdp-adaptive, iptables, iptables-legacy, nftables,
        /// xdp-fwd).
        #[arg(long, value_delimiter = ',')]
        duts: Option<Vec<String>>,
        /// Service counts for the forwarding runs, comma-separated.
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<u32>>,
        /// Repetitions.
        #[arg(long)]
        reps: Option<u32>,
        /// Seconds per run.
        #[arg(long)]
        seconds: Option<f64>,
        /// Frames per second of the latency runs, comma-separated: each rate is run at
        /// every latency Service count.
        #[arg(long, value_delimiter = ',')]
        latency_pps: Option<Vec<u64>>,
        /// Wait until the 1-minute load average is below this before each round (0: no).
        #[arg(long)]
        idle_below: Option<f64>,
        /// Longest such a wait, seconds.
        #[arg(long)]
        idle_wait: Option<u64>,
        /// Service counts for the install timing, comma-separated; empty for none.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        install_services: Option<Vec<u32>>,
        /// Service counts for the latency runs, comma-separated; empty for none.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        latency_services: Option<Vec<u32>>,
        /// Service counts for the new-flow runs, comma-separated; empty for none.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        new_flow_services: Option<Vec<u32>>,
    },
    /// Write the Markdown report and the plots again from a results JSON.
    Report {
        /// The results.json of a run.
        json: PathBuf,
        /// Where to write (default: the JSON's directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// VM bench, DUT VM: move two NICs into a namespace, set the device up there, keep it
    /// working for --hold seconds, tear it down. Prints a JSON line when ready (frontend,
    /// endpoints, uplink MAC) and one with its counters at the end.
    ServeDut {
        /// kxdp, iptables, iptables-legacy, nftables or xdp-fwd.
        #[arg(long)]
        kind: String,
        /// NIC towards the generator.
        #[arg(long)]
        uplink: String,
        /// NIC towards the sink.
        #[arg(long)]
        pods: String,
        /// Services installed (10 endpoints each).
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        /// The node's address on the uplink network.
        #[arg(long)]
        node_ip: std::net::Ipv4Addr,
        /// The generator's address.
        #[arg(long)]
        gen_ip: std::net::Ipv4Addr,
        /// The generator's MAC.
        #[arg(long)]
        gen_mac: String,
        /// The sink's MAC.
        #[arg(long)]
        sink_mac: String,
        /// Seconds to keep the device working (at most 900).
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// Where kxdp-dataplane is.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
    /// VM bench, generator VM: send to the device under test, count reflected frames and
    /// their round trip. Prints JSON.
    Gen {
        /// The NIC.
        #[arg(long)]
        iface: String,
        /// The device under test's uplink MAC.
        #[arg(long)]
        dst_mac: String,
        /// ClusterIP:port.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        /// Frame size without FCS.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Flows.
        #[arg(long, default_value_t = 1024)]
        flows: u32,
        /// Frames per second; 0 flat out.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Seconds to send (at most 900).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// VM bench, sink VM: receive, answer ARP for the endpoints, reflect. Prints JSON.
    Sink {
        /// The NIC.
        #[arg(long)]
        iface: String,
        /// Endpoint addresses to answer ARP for, comma-separated.
        #[arg(long, value_delimiter = ',')]
        arp: Vec<std::net::Ipv4Addr>,
        /// Send every bench frame back.
        #[arg(long)]
        reflect: bool,
        /// Seconds to run (at most 900).
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
    },
    /// VM bench: table the JSON files vagrant/bench.sh collected in a directory.
    VmReport {
        /// The directory.
        dir: PathBuf,
    },
    /// Print the ruleset kube-proxy would write for N Services of M endpoints.
    Rules {
        /// Which mode's ruleset.
        #[arg(value_enum)]
        mode: RulesMode,
        /// Services.
        #[arg(long, default_value_t = 1)]
        services: u32,
        /// Endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, ValueEnum)]
enum RulesMode {
    /// iptables-restore input, then the jump rules kube-proxy inserts separately.
    Iptables,
    /// nft -f transaction.
    Nftables,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let verbose = args.verbose;
    match run(args.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the causes; the debug form only when asked for.
            if verbose {
                eprintln!("kxdp-bench: {e:?}");
            } else {
                eprintln!("kxdp-bench: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::GenCeiling {
            size,
            flows,
            rate,
            duration,
            repeat,
            xdp_mode,
            no_pin,
            json,
        } => {
            if !bench::netns::is_root() {
                bail!("gen-ceiling creates network namespaces and attaches XDP: run it as root");
            }
            if !(0.0..=600.0).contains(&duration) {
                bail!("--duration {duration}: give 0 to 600 seconds");
            }
            let cfg = CeilingConfig {
                size,
                flows,
                rate_pps: (rate > 0).then_some(rate),
                duration: Duration::from_secs_f64(duration),
                mode: match xdp_mode {
                    Mode::Auto => XdpMode::Auto,
                    Mode::Native => XdpMode::Native,
                    Mode::Generic => XdpMode::Generic,
                },
                pin: !no_pin,
            };
            let mut runs = Vec::new();
            for i in 0..repeat.max(1) {
                let report = ceiling::run(&cfg)?;
                let s = report.summary(size);
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "run {}: sent {} ({:.0} pps), received {} ({:.0} pps), loss {:.2}%, \
                         one-way latency p50 {} ns p99 {} ns p99.9 {} ns max {} ns, \
                         anomalies (size/other/timestamp) {:?}, sink XDP {}",
                        i + 1,
                        s.sent,
                        s.sent_pps,
                        s.received,
                        s.received_pps,
                        s.loss_pct,
                        s.latency_ns.p50,
                        s.latency_ns.p99,
                        s.latency_ns.p999,
                        s.latency_ns.max,
                        s.anomalies,
                        s.sink_mode
                    );
                    log::info!("generator device: {:?}", report.gen.device);
                    log::info!("sink device: {:?}", report.sink.device);
                }
                runs.push(s.received_pps);
            }
            if !json && runs.len() > 1 {
                runs.sort_by(f64::total_cmp);
                println!(
                    "median received over {} runs: {:.0} pps ({size}-byte frames, {flows} flow(s))",
                    runs.len(),
                    runs[runs.len() / 2]
                );
            }
        }
        Cmd::Run {
            quick,
            full,
            out,
            bin_dir,
            duts,
            services,
            reps,
            seconds,
            latency_pps,
            idle_below,
            idle_wait,
            install_services,
            latency_services,
            new_flow_services,
        } => {
            if !bench::netns::is_root() {
                bail!("run creates network namespaces, attaches XDP and loads rulesets: run it as root");
            }
            if !quick && !full {
                bail!("say --quick (under 5 minutes) or --full");
            }
            let mut plan = if full { Plan::full() } else { Plan::quick() };
            if let Some(d) = duts {
                plan.duts = d
                    .iter()
                    .map(|n| {
                        DutKind::parse(n).ok_or_else(|| {
                            anyhow::anyhow!(
                                "--duts {n}: use kxdp, iptables, iptables-legacy, nftables or xdp-fwd"
                            )
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            if let Some(s) = services {
                plan.services = s;
            }
            if let Some(r) = reps {
                plan.reps = r.max(1);
            }
            if let Some(s) = seconds {
                if !(0.1..=600.0).contains(&s) {
                    bail!("--seconds {s}: give 0.1 to 600");
                }
                plan.seconds = s;
            }
            if let Some(r) = latency_pps {
                plan.latency_pps = r.into_iter().map(|r| r.max(1)).collect();
            }
            if let Some(l) = idle_below {
                plan.idle_below = l;
            }
            if let Some(w) = idle_wait {
                plan.idle_wait_s = w.min(3600);
            }
            if let Some(i) = install_services {
                plan.install_services = i;
            }
            if let Some(l) = latency_services {
                plan.latency_services = l;
            }
            if let Some(n) = new_flow_services {
                plan.new_flow_services = n;
            }
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("target/kxdp-bench/{}", plan.name)));
            let repo = std::env::current_dir()?;
            let paths = Paths {
                bin_dir,
                out_dir: out.clone(),
                repo,
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let res = suite::run(&plan, &paths, command, |line| eprintln!("{line}"))?;
            write_reports(&res, &out)?;
            print!("{}", bench::report::markdown(&res));
        }
        Cmd::Report { json, out } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("read {}", json.display()))?;
            let res: Results = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a kxdp-bench results file", json.display()))?;
            let out = out.unwrap_or_else(|| {
                json.parent()
                    .map(|p| p.to_path_buf())
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            write_reports(&res, &out)?;
            print!("{}", bench::report::markdown(&res));
        }
        Cmd::ServeDut {
            kind,
            uplink,
            pods,
            services,
            node_ip,
            gen_ip,
            gen_mac,
            sink_mac,
            hold,
            bin_dir,
        } => {
            if !bench::netns::is_root() {
                bail!("serve-dut moves NICs into a namespace: run it as root");
            }
            let kind = DutKind::parse(&kind).ok_or_else(|| {
                anyhow::anyhow!(
                    "--kind {kind}: use kxdp, iptables, iptables-legacy, nftables or xdp-fwd"
                )
            })?;
            let cfg = bench::remote::VmDut {
                kind,
                uplink,
                pods,
                services,
                node_ip,
                gen: (gen_ip, bench::remote::parse_mac(&gen_mac)?),
                sink_mac: bench::remote::parse_mac(&sink_mac)?,
                hold: Duration::from_secs(hold),
                bin_dir,
                core: 1,
                other_core: 0,
            };
            bench::remote::serve_dut(&cfg, |v| println!("{v}"))?;
        }
        Cmd::Gen {
            iface,
            dst_mac,
            to,
            size,
            flows,
            rate,
            seconds,
        } => {
            if !bench::netns::is_root() {
                bail!("gen attaches XDP and AF_XDP: run it as root");
            }
            let v = bench::remote::run_gen(&bench::remote::VmGen {
                iface,
                dst_mac: bench::remote::parse_mac(&dst_mac)?,
                to,
                size,
                flows,
                rate: (rate > 0).then_some(rate),
                seconds,
                core: 0,
            })?;
            println!("{v}");
        }
        Cmd::Sink {
            iface,
            arp,
            reflect,
            seconds,
        } => {
            if !bench::netns::is_root() {
                bail!("sink attaches XDP and AF_XDP: run it as root");
            }
            println!(
                "{}",
                bench::remote::run_sink(&iface, &arp, reflect, seconds, 0)?
            );
        }
        Cmd::VmReport { dir } => print!("{}", bench::remote::vm_report(&dir)?),
        Cmd::Rules {
            mode,
            services,
            endpoints,
        } => {
            let spec = ServiceSet {
                services,
                endpoints,
                ..ServiceSet::default()
            }
            .table_spec()?;
            let cfg = KubeProxyConfig::for_spec(&spec);
            match mode {
                RulesMode::Iptables => {
                    print!("{}", iptables::restore_input(&spec, &cfg));
                    print!("{}", iptables::jump_rules());
                }
                RulesMode::Nftables => print!("{}", nftables::transaction(&spec, &cfg)),
            }
        }
    }
    Ok(())
}

/// Writes results.json, results.md, README-table.md and the plots into `out`.
fn write_reports(res: &Results, out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(res)?)?;
    std::fs::write(out.join("results.md"), bench::report::markdown(res))?;
    std::fs::write(
        out.join("README-table.md"),
        bench::report::readme_table(res),
    )?;
    match bench::plot::all(res, out) {
        Ok(files) => {
            for f in files {
                eprintln!("wrote {}", f.display());
            }
        }
        Err(e) => eprintln!("plots not written: {e}"),
    }
    eprintln!("wrote {}", out.join("results.md").display());
    Ok(())
}
