//! What a bench run is asked ([`Plan`]) and what it keeps ([`Results`], written as JSON and
//! read back by [`crate::report`] and [`crate::plot`]): plain data, no measuring.

use crate::dut::DutKind;
use crate::measure::{median, RunResult};
use crate::sysinfo::Machine;

/// What a run measures and how long it may take.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// `quick` or `full`.
    pub name: String,
    /// Devices under test, in report order.
    pub duts: Vec<DutKind>,
    /// Service counts for the forwarding scenario.
    pub services: Vec<u32>,
    /// Repetitions of every measurement.
    pub reps: u32,
    /// Seconds of traffic per throughput and latency run.
    pub seconds: f64,
    /// Frame size (without FCS).
    pub size: usize,
    /// Flows of the forwarding and latency runs (UDP source ports).
    pub flows: u32,
    /// New 5-tuples per new-flow run (every frame a new flow).
    pub new_flows: u64,
    /// Service counts at which the new-flow run is made.
    pub new_flow_services: Vec<u32>,
    /// Frames per second of the latency runs: each rate is run at every latency Service
    /// count (results of before the list hold one number, read as a list of one).
    #[serde(deserialize_with = "one_or_many")]
    pub latency_pps: Vec<u64>,
    /// Service counts at which the latency run is made.
    pub latency_services: Vec<u32>,
    /// Service counts whose install and one-endpoint-change times are measured.
    pub install_services: Vec<u32>,
    /// Endpoint changes timed per system.
    pub changes: u32,
    /// Longest a device's tables may take to load for the runs (seconds).
    pub install_limit_s: u64,
    /// Longest kube-proxy's own `iptables-restore --noflush` / `nft -f` may take in the
    /// install timing (seconds).
    pub restore_limit_s: u64,
    /// Wait until the 1-minute load average is below this before each scenario's first
    /// round (0: do not).
    pub idle_below: f64,
    /// Longest such a wait (seconds).
    pub idle_wait_s: u64,
    /// A run during which other processes took more than this share of the machine's CPU
    /// (percent) is made again, after waiting for the load to fall (0: never).
    pub max_foreign_pct: f64,
    /// At most this many times.
    pub retries: u32,
    /// The core of the load (generator and sink).
    pub load_core: usize,
    /// The core of the device under test.
    pub dut_core: usize,
    /// Seconds kxdp's worker is watched with no traffic, once its tables are in, for the
    /// share of a core it uses at rest (0: not watched).
    #[serde(default)]
    pub idle_cpu_s: f64,
}

/// A number or a list of numbers, as a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u64),
        Many(Vec<u64>),
    }
    Ok(match serde::Deserialize::deserialize(d)? {
        OneOrMany::One(n) => vec![n],
        OneOrMany::Many(v) => v,
    })
}

impl Plan {
    /// `--quick`: under 5 minutes on the 2-core machine.
    pub fn quick() -> Plan {
        Plan {
            name: "quick".into(),
            duts: vec![
                DutKind::Kxdp,
                DutKind::Iptables,
                DutKind::Nftables,
                DutKind::XdpForwarder,
            ],
            // 1 and 10k Services: the 10k point's nftables ruleset alone takes ~72 s to
            // load on an idle machine (kube-proxy's nft -f is super-linear); a 1k point
            // would push the run past 5 minutes.
            services: vec![1, 10_000],
            reps: 2,
            seconds: 2.0,
            size: 64,
            flows: 1024,
            new_flows: 50_000,
            new_flow_services: vec![10_000],
            latency_pps: vec![50_000],
            latency_services: vec![10_000],
            install_services: vec![10_000],
            changes: 3,
            install_limit_s: 120,
            restore_limit_s: 10,
            idle_below: 0.0,
            idle_wait_s: 0,
            max_foreign_pct: 0.0,
            retries: 0,
            load_core: 0,
            dut_core: 1,
            idle_cpu_s: 3.0,
        }
    }

    /// `--full`: the committed results.
    pub fn full() -> Plan {
        Plan {
            name: "full".into(),
            duts: DutKind::ALL.to_vec(),
            services: vec![1, 1_000, 10_000, 100_000],
            install_limit_s: 300,
            restore_limit_s: 120,
            reps: 5,
            seconds: 5.0,
            new_flow_services: vec![1, 10_000],
            latency_services: vec![1, 10_000],
            // Issue 20: the tail from a trickle to a heavy load.
            latency_pps: vec![1_000, 10_000, 50_000, 200_000],
            install_services: vec![10_000, 100_000],
            changes: 5,
            idle_below: 0.7,
            idle_wait_s: 1200,
            max_foreign_pct: 10.0,
            retries: 3,
            idle_cpu_s: 10.0,
            ..Plan::quick()
        }
    }
}

/// Where the devices' tables came from and whether they ran.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SetupRecord {
    /// The device.
    pub dut: String,
    /// Seconds its tables took to load (`None` when not run).
    pub install_seconds: Option<f64>,
    /// How they were loaded.
    pub how: String,
    /// Why it was not run, if it was not.
    pub not_run: Option<String>,
    /// kxdp: the share of a core its worker used with no traffic (`Plan::idle_cpu_s`).
    #[serde(default)]
    pub idle_cpu: Option<f64>,
}

/// The probed Service.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeRecord {
    /// `namespace/name:port`.
    pub service: String,
    /// ClusterIP:port the generator sends to.
    pub frontend: String,
    /// Its position in the Service order (kube-proxy's KUBE-SERVICES order), from 0.
    pub position: usize,
    /// Its endpoints.
    pub endpoints: Vec<String>,
}

/// A wait for the machine to calm down, or for a device's connections of an earlier new-flow
/// repetition on the same Service to expire.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WaitRecord {
    /// Which scenario and repetition it preceded (and for an expiry, which device).
    pub before: String,
    /// Seconds waited.
    pub waited_s: f64,
    /// 1-minute load average at the end of the wait.
    pub load1: f64,
}

/// Everything measured at one Service count.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Services installed.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// The probed Service.
    pub probe: ProbeRecord,
    /// How each device was set up.
    pub setup: Vec<SetupRecord>,
    /// Flat-out 64-byte forwarding.
    pub throughput: Vec<RunResult>,
    /// Every frame a new flow.
    pub new_flows: Vec<RunResult>,
    /// Fixed rate, latency.
    pub latency: Vec<RunResult>,
    /// Waits before rounds.
    pub waits: Vec<WaitRecord>,
}

/// A whole run's results.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Results {
    /// The command line that produced them.
    pub command: String,
    /// The plan.
    pub plan: Option<Plan>,
    /// The machine.
    pub machine: Machine,
    /// Start (UTC).
    pub started: String,
    /// End (UTC).
    pub finished: String,
    /// Seconds the run took.
    pub seconds: f64,
    /// `git describe --always --dirty` of the tree the binaries were built from (dirty
    /// may be other engineers' work in progress outside the bench).
    pub commit: String,
    /// Load averages (1, 5, 15 min) at the start and the end.
    pub loadavg_start: String,
    /// At the end.
    pub loadavg_end: String,
    /// Generator → sink, flat out (the generator's ceiling).
    pub ceiling: Vec<RunResult>,
    /// Generator → sink at the latency run's rate.
    pub ceiling_latency: Vec<RunResult>,
    /// Per Service count.
    pub points: Vec<Point>,
    /// Install and update times.
    pub install: Vec<InstallPoint>,
    /// Things the reader must know (devices not run, waits that timed out).
    pub notes: Vec<String>,
}

/// One system's install and change times.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct InstallRow {
    /// What was measured.
    pub system: String,
    /// Seconds to install everything, `None` if it did not finish in the limit.
    pub full_s: Option<f64>,
    /// Seconds of each endpoint change.
    pub change_s: Vec<f64>,
    /// What was run, and anything unusual.
    pub note: String,
}

impl InstallRow {
    /// Median of the row's changes.
    pub fn change_median(&self) -> Option<f64> {
        median(self.change_s.iter().copied())
    }
}

/// Install and change times at one Service count.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct InstallPoint {
    /// Services.
    pub services: u32,
    /// Endpoints in all.
    pub endpoints: u64,
    /// Seconds control took to compute the tables from the objects it holds.
    pub compute_s: f64,
    /// One row per system.
    pub rows: Vec<InstallRow>,
}
