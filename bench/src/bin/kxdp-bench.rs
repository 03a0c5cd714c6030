//! `kxdp-bench`: the bench harness's command line (issue 7). `kxdp bench` is spelled
//! `kxdp-bench` so the bench crate stays out of the dataplane binary.
//!
//! - `kxdp-bench gen-ceiling`: AF_XDP generator → veth → AF_XDP sink in namespaces of their
//!   own; prints what was sent and received, the rates, loss and one-way latency.
//! - `kxdp-bench rules iptables|nftables`: prints the ruleset kube-proxy would write for a
//!   generated Service set (what the kernel baselines load).

use std::time::Duration;

use anyhow::bail;
use bench::baseline::{iptables, nftables, KubeProxyConfig};
use bench::ceiling::{self, CeilingConfig};
use bench::scenario::ServiceSet;
use clap::{Parser, Subcommand, ValueEnum};
use pktio::xsk::XdpMode;

#[derive(Parser)]
#[command(name = "kxdp-bench", about = "kxdp's benchmark harness (issue 7)")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
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

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Args::parse().command {
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
