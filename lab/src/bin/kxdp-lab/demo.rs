//! The demo: lab up, `kxdp-dataplane` and `kxdp-control` on the bundled manifests, TCP and
//! UDP calls to the ClusterIPs from a pod, a table of who answered, the counters (as
//! `kxdp stats` prints them) and a packet rate; the lab goes down whatever happens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ctlclient::DataplaneStats;
use lab::{Lab, LabSpec};

/// A child process that is ended (by PID) when dropped.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The workspace binary `name`, built beside this one.
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is not built (build every binary: cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The dataplane's counters.
fn stats(socket: &Path) -> Result<DataplaneStats> {
    let mut client = ctlclient::Client::connect(socket).with_context(|| {
        format!(
            "connect to {} (is kxdp-dataplane running?)",
            socket.display()
        )
    })?;
    client.set_timeout(Duration::from_secs(5))?;
    Ok(client.stats()?)
}

pub fn demo(
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
        if stats(&socket).is_ok_and(|s| s.generation > 0) {
            break;
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
    // The counters as the operator's command shows them.
    out!(
        "{}",
        run_output(Command::new(sibling("kxdp")?).args([
            "stats".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str()
        ]))?
    );
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
fn forwarded(stats: &DataplaneStats) -> u64 {
    stats
        .workers
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
