//! The generator's ceiling: generator → veth → sink, nothing in between, both on AF_XDP in
//! namespaces of their own. Whatever a device under test forwards later is compared with
//! this, so a figure is never just the generator's limit.
//!
//! ```text
//! ns kxdp-bench-gen-PID-N            ns kxdp-bench-sink-PID-N
//!   g0 (AF_XDP TX, queue 0) ──veth──   s0 (XDP program → AF_XDP RX, queue 0)
//! ```
//!
//! Generator and sink are threads of this process, each entered into its namespace and,
//! with `pin`, on its own core (generator core 0, sink core 1). IPv6 is off in both
//! namespaces so the link carries nothing but the generator's frames.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pktio::xsk::{self, XdpMode, XdpProgram, XskConfig, XskDevice};

use crate::frame::FlowSet;
use crate::gen::{self, GenConfig, GenReport};
use crate::netns::{self, NetnsGuard, VethEnd};
use crate::sink::{self, SinkReport};

/// The generator interface's MAC.
pub const GEN_MAC: [u8; 6] = [0x02, 0x6b, 0x62, 0x00, 0x01, 0x01];
/// The sink interface's MAC.
pub const SINK_MAC: [u8; 6] = [0x02, 0x6b, 0x62, 0x00, 0x01, 0x02];
/// Longest the generator waits for the sink to be ready.
const SINK_READY_WAIT: Duration = Duration::from_secs(10);
/// How long the sink keeps receiving after the generator stops (frames still in flight).
const SINK_GRACE: Duration = Duration::from_millis(200);

/// A ceiling run.
#[derive(Clone, Debug)]
pub struct CeilingConfig {
    /// Frame size without FCS.
    pub size: usize,
    /// Flows (source ports).
    pub flows: u32,
    /// Frames per second; `None` for flat out.
    pub rate_pps: Option<u64>,
    /// Sending time.
    pub duration: Duration,
    /// XDP attach mode of the sink's program.
    pub mode: XdpMode,
    /// Pin the generator to core 0 and the sink to core 1.
    pub pin: bool,
}

impl Default for CeilingConfig {
    fn default() -> Self {
        CeilingConfig {
            size: 64,
            flows: 1,
            rate_pps: None,
            duration: Duration::from_secs(5),
            mode: XdpMode::Auto,
            pin: true,
        }
    }
}

/// What a ceiling run measured.
#[derive(Debug)]
pub struct CeilingReport {
    /// The generator's side.
    pub gen: GenReport,
    /// The sink's side.
    pub sink: SinkReport,
    /// XDP mode the sink's program got.
    pub sink_mode: XdpMode,
}

/// A one-line-per-number summary, for humans and for JSON.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// Frame size without FCS.
    pub size: usize,
    /// Frames the generator queued.
    pub sent: u64,
    /// Bench frames the sink counted.
    pub received: u64,
    /// Generator rate over its sending time.
    pub sent_pps: f64,
    /// Sink rate between its first and last frame.
    pub received_pps: f64,
    /// 1 − received / sent, in percent.
    pub loss_pct: f64,
    /// One-way latency percentiles, ns.
    pub latency_ns: Percentiles,
    /// Frames of the wrong size, other frames, unreadable timestamps.
    pub anomalies: [u64; 3],
    /// XDP mode of the sink.
    pub sink_mode: String,
}

/// Latency percentiles in ns.
#[derive(Debug, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl CeilingReport {
    /// The summary of this run.
    pub fn summary(&self, size: usize) -> Summary {
        let h = &self.sink.latency;
        Summary {
            size,
            sent: self.gen.sent,
            received: self.sink.frames,
            sent_pps: self.gen.pps(),
            received_pps: self.sink.pps(),
            loss_pct: if self.gen.sent == 0 {
                0.0
            } else {
                100.0 * (1.0 - self.sink.frames as f64 / self.gen.sent as f64)
            },
            latency_ns: Percentiles {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            },
            anomalies: [
                self.sink.wrong_size,
                self.sink.other,
                self.sink.bad_timestamps,
            ],
            sink_mode: format!("{:?}", self.sink_mode),
        }
    }
}

/// The flows of a ceiling run: one source, one destination, `flows` source ports.
pub fn flow_set(flows: u32) -> FlowSet {
    FlowSet {
        src_mac: GEN_MAC,
        dst_mac: SINK_MAC,
        src_ip: Ipv4Addr::new(10, 255, 0, 1),
        src_port: 1024,
        flows,
        dests: vec![SocketAddrV4::new(Ipv4Addr::new(10, 255, 0, 2), 9)],
    }
}

/// AF_XDP sizes for a transmit-only port: a big TX and completion ring, a token fill ring.
pub fn gen_xsk_config() -> XskConfig {
    XskConfig {
        frame_count: 4096,
        frame_size: 2048,
        rx_size: 64,
        tx_size: 2048,
        fill_size: 64,
        comp_size: 2048,
        zero_copy: false,
        runtime_ports: 0,
        stamped: false,
    }
}

/// AF_XDP sizes for a receive-only port: big RX and fill rings, token TX and completion.
/// 16k frames in each ring ride out a sink thread descheduled for ~50 ms at 340 kpps
/// (measured on the shared 2-core machine: with 4k, losses were fill-ring-empty drops
/// while other builds held both cores); 64 MiB of UMEM.
pub fn sink_xsk_config() -> XskConfig {
    XskConfig {
        frame_count: 32768,
        frame_size: 2048,
        rx_size: 16384,
        tx_size: 64,
        fill_size: 16384,
        comp_size: 64,
        zero_copy: false,
        runtime_ports: 0,
        stamped: false,
    }
}

/// A fresh namespace with IPv6 off (no neighbour discovery on its links).
pub fn quiet_namespace(prefix: &str) -> anyhow::Result<NetnsGuard> {
    let ns = NetnsGuard::new(prefix).context("create a network namespace (needs root)")?;
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        netns::sysctl(ns.name(), key, "1")?;
    }
    Ok(ns)
}

/// Runs the generator into the sink over a veth pair in two fresh namespaces.
pub fn run(cfg: &CeilingConfig) -> anyhow::Result<CeilingReport> {
    let gen_cfg = GenConfig {
        size: cfg.size,
        flows: flow_set(cfg.flows),
        rate_pps: cfg.rate_pps,
        duration: cfg.duration,
        count: None,
    };
    gen_cfg.validate()?;
    let gen_ns = quiet_namespace("kxdp-bench-gen")?;
    let sink_ns = quiet_namespace("kxdp-bench-sink")?;
    netns::veth(
        VethEnd {
            ns: &gen_ns,
            name: "g0",
            mac: GEN_MAC,
        },
        VethEnd {
            ns: &sink_ns,
            name: "s0",
            mac: SINK_MAC,
        },
    )?;
    let epoch = Instant::now();
    let ready = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let stop_sink = AtomicBool::new(false);
    let stop_gen = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sink = s.spawn(|| -> anyhow::Result<(SinkReport, XdpMode)> {
            let result = (|| {
                netns::enter_thread(sink_ns.name())?;
                if cfg.pin {
                    crate::pin(1);
                }
                let idx = xsk::ifindex("s0")?;
                let prog = XdpProgram::attach(idx, 1, cfg.mode).context("attach XDP to s0")?;
                let mut dev = XskDevice::new(&[(idx, 0)], &sink_xsk_config())?;
                prog.insert(0, dev.socket_fd(0))?;
                ready.store(true, Ordering::Release);
                let report = sink::run(&mut dev, 0, cfg.size, epoch, &stop_sink);
                Ok((report, prog.mode()))
            })();
            if result.is_err() {
                failed.store(true, Ordering::Release);
            }
            result
        });
        let gen = s.spawn(|| -> anyhow::Result<GenReport> {
            let result = (|| {
                netns::enter_thread(gen_ns.name())?;
                if cfg.pin {
                    crate::pin(0);
                }
                let idx = xsk::ifindex("g0")?;
                let mut dev = XskDevice::new(&[(idx, 0)], &gen_xsk_config())?;
                let start = Instant::now();
                // Bound: SINK_READY_WAIT.
                while !ready.load(Ordering::Acquire) {
                    if failed.load(Ordering::Acquire) {
                        bail!("the sink failed to start");
                    }
                    if start.elapsed() > SINK_READY_WAIT {
                        bail!("the sink was not ready after {SINK_READY_WAIT:?}");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(gen::run(&mut dev, 0, &gen_cfg, epoch, &stop_gen)?)
            })();
            std::thread::sleep(SINK_GRACE);
            stop_sink.store(true, Ordering::Release);
            result
        });
        let gen = gen
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"));
        stop_sink.store(true, Ordering::Release);
        let sink = sink
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"));
        let (sink, sink_mode) = sink??;
        Ok(CeilingReport {
            gen: gen??,
            sink,
            sink_mode,
        })
    })
}
