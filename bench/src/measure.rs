//! One measured run on a [`Topology`]: the sink's XDP program and AF_XDP socket in the sink
//! namespace, the generator's socket in the generator namespace, both driven by one thread
//! ([`crate::load`]) pinned to the load core, the result summarised with the machine's load
//! around it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use pktio::xsk::{self, Steering, XdpMode, XdpProgram, XskConfig, XskDevice};
use pktio::Device;

use crate::gen::GenConfig;
use crate::load::{self, LoadReport};
use crate::netns;
use crate::sink::SinkConfig;
use crate::sysinfo;
use crate::topology::{Topology, GEN_IF, SINK_IF, SINK_MAC};

/// Median of `xs` (the upper one of an even count); `None` when empty.
pub fn median(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// How long the sink answers ARP before the generator starts, so a dataplane that has not
/// resolved the endpoints (or whose entries went stale between runs) has them before the
/// first measured frame.
pub const WARM_UP: Duration = Duration::from_millis(150);

/// Sink AF_XDP sizes: [`crate::ceiling::sink_xsk_config`] with a transmit ring big enough
/// for ARP answers and reflected frames.
pub fn sink_xsk_config() -> XskConfig {
    XskConfig {
        tx_size: 2048,
        comp_size: 2048,
        ..crate::ceiling::sink_xsk_config()
    }
}

/// Latency percentiles, ns.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Frames measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h`.
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What one run measured, in the form the report keeps.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// Which device (or `ceiling`).
    pub dut: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// Frames the generator queued.
    pub sent: u64,
    /// Their rate over the sending time.
    pub offered_pps: f64,
    /// Bench frames the sink counted.
    pub received: u64,
    /// Their rate between the first and the last.
    pub received_pps: f64,
    /// 1 − received / sent, percent.
    pub loss_pct: f64,
    /// One-way latency, generator to sink.
    pub latency_ns: Percentiles,
    /// That latency's first part: generator to the sink interface's XDP program (the
    /// device under test and the kernel on either side of it); none from a sink whose
    /// frames came unstamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_sink_ns: Option<Percentiles>,
    /// Its second part: the sink interface's XDP program to the sink taking the frame (the
    /// bench's own, the same for every device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_wait_ns: Option<Percentiles>,
    /// Frames that arrived at one of the probed Service's endpoints (translated).
    pub translated: u64,
    /// Distinct destinations seen (a Service spreads over its endpoints).
    pub destinations: usize,
    /// Source addresses seen, with counts (masqueraded traffic has one: the gateway).
    pub sources: Vec<(String, u64)>,
    /// Frames of the wrong size, other frames, bad timestamps, reordered.
    pub anomalies: [u64; 4],
    /// ARP requests the sink answered.
    pub arp_replies: u64,
    /// 1-minute load average just before the run.
    pub load1_before: f64,
    /// CPU time of processes other than this bench and the device under test during the
    /// run, percent of all cores (other engineers' builds show here).
    pub foreign_cpu_pct: f64,
    /// The device's counters that moved during the run.
    pub dut_counters: Vec<(String, u64)>,
    /// Times the run was made again because other processes took too much CPU.
    #[serde(default)]
    pub retries: u32,
    /// The generator device's counters (wake-ups, full rings, kernel drops).
    pub gen_device: Vec<(String, u64)>,
    /// The sink device's counters.
    pub sink_device: Vec<(String, u64)>,
    /// The generator's fixed rate (latency runs; none when flat out, and in results of
    /// before the rate was kept: their plan's one latency rate).
    #[serde(default)]
    pub rate_pps: Option<u64>,
}

fn device_counters(d: &pktio::DeviceStats) -> Vec<(String, u64)> {
    [
        ("rx_frames", d.rx_frames),
        ("tx_frames", d.tx_frames),
        ("tx_ring_full", d.tx_ring_full),
        ("alloc_failed", d.alloc_failed),
        ("kernel_rx_dropped", d.kernel_rx_dropped),
        ("kernel_rx_ring_full", d.kernel_rx_ring_full),
        ("kernel_fill_empty", d.kernel_fill_empty),
        ("wakeups", d.wakeups),
    ]
    .into_iter()
    .filter(|(_, v)| *v != 0)
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl RunResult {
    /// The summary of `r`; `endpoints` are the probed Service's endpoints.
    pub fn from_load(dut: &str, rep: u32, r: &LoadReport, endpoints: &[SocketAddrV4]) -> Self {
        let s = &r.sink;
        RunResult {
            dut: dut.to_string(),
            rep,
            sent: r.gen.sent,
            offered_pps: r.gen.pps(),
            received: s.frames,
            received_pps: s.pps(),
            loss_pct: if r.gen.sent == 0 {
                0.0
            } else {
                100.0 * (1.0 - s.frames as f64 / r.gen.sent as f64)
            },
            latency_ns: Percentiles::of(&s.latency),
            to_sink_ns: s.split.as_ref().map(|(path, _)| Percentiles::of(path)),
            sink_wait_ns: s.split.as_ref().map(|(_, wait)| Percentiles::of(wait)),
            translated: s.frames_to(endpoints),
            destinations: s.destinations.len(),
            sources: s
                .sources
                .iter()
                .map(|(ip, n)| (ip.to_string(), *n))
                .collect(),
            anomalies: [s.wrong_size, s.other, s.bad_timestamps, s.reordered],
            arp_replies: s.arp_replies,
            gen_device: {
                let mut c = device_counters(&r.gen.device);
                c.extend(
                    [
                        ("pool_empty_rounds", r.gen.pool_empty_rounds),
                        ("ring_full_rounds", r.gen.ring_full_rounds),
                    ]
                    .into_iter()
                    .filter(|(_, v)| *v != 0)
                    .map(|(k, v)| (k.to_string(), v)),
                );
                c
            },
            sink_device: device_counters(&s.device),
            ..RunResult::default()
        }
    }
}

/// Runs `gen_cfg` from the generator into the sink of `topo` on one thread pinned to
/// `core`; the sink answers ARP for `arp` (the probed endpoints). `exclude` are PIDs whose
/// CPU time is not foreign (the device under test's process).
pub fn run(
    topo: &Topology,
    gen_cfg: &GenConfig,
    arp: &[Ipv4Addr],
    core: usize,
    exclude: &[u32],
) -> anyhow::Result<(LoadReport, f64, f64)> {
    let load1 = sysinfo::load1();
    let mut excluded = vec![std::process::id()];
    excluded.extend_from_slice(exclude);
    let cpu_before = sysinfo::CpuSample::take(&excluded);
    let report = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<LoadReport> {
            netns::enter_thread(topo.sink.name())?;
            let sidx = xsk::ifindex(SINK_IF)?;
            // Stamping: each latency splits at the sink's interface.
            let prog = XdpProgram::load_detached(sidx, 1, Steering::RedirectAll)
                .and_then(|p| p.set_stamp(true).map(|()| p))
                .and_then(|p| p.link_to(XdpMode::Native))
                .context("attach XDP to the sink")?;
            let stamped = XskConfig {
                stamped: true,
                ..sink_xsk_config()
            };
            let mut sink_dev = XskDevice::new(&[(sidx, 0)], &stamped)?;
            prog.insert(0, sink_dev.socket_fd(0))?;
            netns::enter_thread(topo.gen.name())?;
            let gidx = xsk::ifindex(GEN_IF)?;
            let mut gen_dev = XskDevice::new(&[(gidx, 0)], &crate::ceiling::gen_xsk_config())?;
            crate::pin(core);
            let sink_cfg = SinkConfig {
                expect_size: gen_cfg.size,
                mac: SINK_MAC,
                arp: arp.to_vec(),
                reflect: false,
                stamped: true,
            };
            let epoch = Instant::now();
            // Announce the endpoints and answer ARP for a moment before measuring.
            {
                let mut warm = crate::sink::Sink::new(&sink_dev, 0, sink_cfg.clone());
                warm.announce(&mut sink_dev);
                let end = Instant::now() + WARM_UP;
                // Bound: WARM_UP.
                while Instant::now() < end {
                    warm.step(&mut sink_dev, epoch);
                    gen_dev.flush();
                }
            }
            let stop = AtomicBool::new(false);
            let r = load::run(&mut gen_dev, &mut sink_dev, gen_cfg, sink_cfg, epoch, &stop)?;
            drop(sink_dev);
            drop(prog);
            Ok(r)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    })?;
    let foreign = cpu_before.foreign_pct_since(&excluded);
    Ok((report, load1, foreign))
}
