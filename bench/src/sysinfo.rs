//! The machine a run happens on, and how busy it was: the 1-minute load average, and the
//! CPU time other processes took during a run (the figures on a shared machine are floors,
//! and the report says by how much it was shared). Read from `/proc`; nothing is changed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on every Linux ABI this
/// runs on).
const USER_HZ: f64 = 100.0;

/// What the machine is.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    /// Host name.
    pub hostname: String,
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// What the run used: veth pairs in network namespaces, AF_XDP copy mode.
    pub network: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Machine {
    /// This machine.
    pub fn this() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        Machine {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            cpu,
            cores,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            network: "veth pairs between network namespaces; AF_XDP copy mode; XDP native on veth"
                .into(),
        }
    }

    /// One line for tables: "2 × Intel(R) Xeon(R) Processor, Linux 6.18.44, 23 GiB".
    pub fn line(&self) -> String {
        format!(
            "{} × {}, Linux {}, {} GiB",
            self.cores, self.cpu, self.kernel, self.memory_gib
        )
    }
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` prints them.
pub fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (bounded by `max_wait`, polling every 5 s) until the 1-minute load average is
/// below `below`. Returns the time waited and the load at the end.
pub fn wait_for_idle(below: f64, max_wait: Duration) -> (Duration, f64) {
    let start = Instant::now();
    // Bound: max_wait.
    loop {
        let l = load1();
        if l < below || start.elapsed() >= max_wait {
            return (start.elapsed(), l);
        }
        std::thread::sleep(Duration::from_secs(5).min(max_wait.saturating_sub(start.elapsed())));
    }
}

/// CPU ticks (user + system) per process, taken from `/proc/*/stat`.
#[derive(Debug)]
pub struct CpuSample {
    at: Instant,
    ticks: HashMap<u32, u64>,
}

/// The (command, user + system ticks) of `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(String, u64)> {
    stat_at(&format!("/proc/{pid}/stat"))
}

/// The share of one core thread `tid` of process `pid` uses over `span` (user and system
/// time from `/proc/PID/task/TID/stat`, in ticks of 10 ms: over 10 s, a resolution of
/// 0.1%). `None` when the thread is gone.
pub fn thread_cpu_share(pid: u32, tid: u32, span: Duration) -> Option<f64> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let started = Instant::now();
    let before = stat_at(&path)?.1;
    std::thread::sleep(span);
    let used = stat_at(&path)?.1.saturating_sub(before);
    Some(used as f64 / USER_HZ / started.elapsed().as_secs_f64())
}

/// The (command, user + system ticks) of a `stat` file of `/proc`.
fn stat_at(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn foreign(pid: u32, comm: &str, exclude: &[u32]) -> bool {
    // ksoftirqd runs the bench's own packets when softirqs pile up.
    !exclude.contains(&pid) && !comm.starts_with("ksoftirqd")
}

impl CpuSample {
    /// Ticks of every process now, except those in `exclude`.
    pub fn take(exclude: &[u32]) -> CpuSample {
        let mut ticks = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some((comm, t)) = stat_of(pid) {
                    if foreign(pid, &comm, exclude) {
                        ticks.insert(pid, t);
                    }
                }
            }
        }
        CpuSample {
            at: Instant::now(),
            ticks,
        }
    }

    /// CPU time other processes used since this sample, in percent of all cores. A floor:
    /// processes that started and ended in between are not seen.
    pub fn foreign_pct_since(&self, exclude: &[u32]) -> f64 {
        let now = CpuSample::take(exclude);
        let used: u64 = now
            .ticks
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.ticks.get(pid).copied().unwrap_or(0)))
            .sum();
        let secs = now.at.duration_since(self.at).as_secs_f64();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        if secs <= 0.0 {
            return 0.0;
        }
        (100.0 * used as f64 / USER_HZ / secs / cores * 10.0).round() / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_and_this_process_are_readable() {
        let m = Machine::this();
        assert!(m.cores >= 1);
        assert!(!m.kernel.is_empty());
        assert!(load1() >= 0.0);
        assert!(stat_of(std::process::id()).is_some());
        let s = CpuSample::take(&[]);
        assert!(s.foreign_pct_since(&[]) >= 0.0);
    }
}
