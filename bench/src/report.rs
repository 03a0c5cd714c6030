//! The run's report: medians over repetitions, the ratio of kxdp to each alternative, the
//! issue's targets checked against them, as Markdown (the results file, and the table for
//! the top-level README). Only measured numbers appear; a device that was not run says
//! why.

use std::fmt::Write as _;

use crate::dut::DutKind;
pub use crate::measure::median;
use crate::measure::RunResult;
use crate::record::{Point, Results};

/// Runs of `dut` in `runs`.
fn of<'a>(runs: &'a [RunResult], dut: &'a str) -> impl Iterator<Item = &'a RunResult> {
    runs.iter().filter(move |r| r.dut == dut)
}

/// Median received rate of `dut` in `runs`.
pub fn median_pps(runs: &[RunResult], dut: &str) -> Option<f64> {
    median(of(runs, dut).map(|r| r.received_pps))
}

/// Median of one latency percentile (ns) of `dut` in `runs`.
pub fn median_latency(runs: &[RunResult], dut: &str, pick: fn(&RunResult) -> u64) -> Option<f64> {
    median(of(runs, dut).map(|r| pick(r) as f64))
}

/// `1234567.0` as `1,234,567`.
pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// "1 Service", "10k Services".
fn services_noun(n: u32) -> String {
    format!(
        "{} Service{}",
        services_label(n),
        if n == 1 { "" } else { "s" }
    )
}

fn services_label(n: u32) -> String {
    match n {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn not_run(point: &Point, dut: &str) -> Option<String> {
    point
        .setup
        .iter()
        .find(|s| s.dut == dut)
        .and_then(|s| s.not_run.clone())
}

fn cell(point: &Point, runs: &[RunResult], dut: &str) -> String {
    if let Some(why) = not_run(point, dut) {
        return why;
    }
    match median_pps(runs, dut) {
        Some(v) => thousands(v),
        None => "—".into(),
    }
}

/// The DUTs of `res` in report order.
pub(crate) fn duts(res: &Results) -> Vec<DutKind> {
    res.plan
        .as_ref()
        .map(|p| p.duts.clone())
        .unwrap_or_else(|| DutKind::ALL.to_vec())
}

/// The rates of `res`'s latency runs, in the plan's order (without a plan, those the runs
/// kept, in rising order).
pub(crate) fn latency_rates(res: &Results) -> Vec<u64> {
    if let Some(p) = &res.plan {
        return p.latency_pps.clone();
    }
    let mut rates: Vec<u64> = res
        .points
        .iter()
        .flat_map(|p| &p.latency)
        .filter_map(|r| r.rate_pps)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates
}

/// The runs of `runs` made at `rate` frames per second; a run that kept no rate (results
/// of before the rates were kept) was made at the plan's only rate, `rates[0]`.
pub(crate) fn at_rate(runs: &[RunResult], rates: &[u64], rate: u64) -> Vec<RunResult> {
    runs.iter()
        .filter(|r| r.rate_pps.or(rates.first().copied()) == Some(rate))
        .cloned()
        .collect()
}

/// Whether kxdp's runs in `runs` were limited by the generator: it lost under 1% of what
/// was offered, and the offer was within 10% of the generator's ceiling.
fn generator_bound(runs: &[RunResult], ceiling: Option<f64>) -> bool {
    let loss = median(of(runs, "kxdp").map(|r| r.loss_pct));
    let offered = median(of(runs, "kxdp").map(|r| r.offered_pps));
    matches!((loss, offered, ceiling), (Some(l), Some(o), Some(c)) if l < 1.0 && o >= 0.9 * c)
}

fn ratio(kxdp: Option<f64>, other: Option<f64>, lower_bound: bool) -> String {
    match (kxdp, other) {
        (Some(k), Some(o)) if o > 0.0 => {
            format!("{}{:.2}×", if lower_bound { "≥ " } else { "" }, k / o)
        }
        _ => "—".into(),
    }
}

/// A forwarding-style table (throughput or new flows): one row per Service count.
fn rate_table(
    out: &mut String,
    res: &Results,
    pick: fn(&Point) -> &Vec<RunResult>,
    with_ceiling: bool,
) {
    let duts = duts(res);
    // kxdp (busy polling) against every device but kxdp itself (adaptive polling is
    // compared in the targets).
    let others: Vec<DutKind> = duts.iter().copied().filter(|d| !d.is_kxdp()).collect();
    let _ = write!(out, "| Services |");
    for d in &duts {
        let _ = write!(out, " {} |", d.short());
    }
    for d in &others {
        let _ = write!(out, " kxdp / {} |", d.short());
    }
    out.push('\n');
    out.push_str(&"|---".repeat(1 + duts.len() + others.len()));
    out.push_str("|\n");
    let ceiling = median(res.ceiling.iter().map(|r| r.received_pps));
    if with_ceiling {
        let _ = write!(
            out,
            "| generator → sink, no device (the generator's ceiling) | {} |",
            ceiling.map_or("—".into(), thousands)
        );
        out.push_str(&" |".repeat(duts.len() - 1 + others.len()));
        out.push('\n');
    }
    for p in &res.points {
        let runs = pick(p);
        if runs.is_empty() {
            continue;
        }
        let bound = generator_bound(runs, ceiling);
        let _ = write!(out, "| {} |", services_label(p.services));
        for d in &duts {
            let mut c = cell(p, runs, d.name());
            if *d == DutKind::Kxdp && bound && with_ceiling {
                c.push_str(" (generator-bound)");
            }
            let _ = write!(out, " {c} |");
        }
        let k = median_pps(runs, "kxdp");
        for d in &others {
            let o = median_pps(runs, d.name());
            let _ = write!(out, " {} |", ratio(k, o, bound && with_ceiling));
        }
        out.push('\n');
    }
}

fn us(ns: Option<f64>) -> String {
    ns.map_or("—".into(), |v| format!("{:.1}", v / 1000.0))
}

fn latency_table(out: &mut String, res: &Results, p: &Point, rate: u64) {
    let rates = latency_rates(res);
    let ceiling = at_rate(&res.ceiling_latency, &rates, rate);
    let latency = at_rate(&p.latency, &rates, rate);
    let _ = writeln!(
        out,
        "| device | received pps | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n|---|---|---|---|---|---|---|"
    );
    let mut rows: Vec<(String, &[RunResult], String)> = vec![(
        "generator → sink, no device".into(),
        &ceiling,
        "ceiling".into(),
    )];
    for d in duts(res) {
        rows.push((d.short().into(), &latency, d.name().into()));
    }
    for (label, runs, key) in rows {
        if let Some(why) = not_run(p, &key) {
            let _ = writeln!(out, "| {label} | {why} | | | | | |");
            continue;
        }
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            median_pps(runs, &key).map_or("—".into(), thousands),
            us(median_latency(runs, &key, |r| r.latency_ns.p50)),
            us(median_latency(runs, &key, |r| r.latency_ns.p90)),
            us(median_latency(runs, &key, |r| r.latency_ns.p99)),
            us(median_latency(runs, &key, |r| r.latency_ns.p999)),
            us(median_latency(runs, &key, |r| r.latency_ns.max)),
        );
    }
}

/// Where the latency of the runs at `rate` went, for runs that can tell: to the sink's
/// interface and in the sink (the sink's own stamps), and, for a kxdp run with
/// `--measure-ring-wait`, how many frames waited long in kxdp's receive ring. Nothing for
/// results without the sink's stamps.
fn split_table(out: &mut String, res: &Results, p: &Point, rate: u64) {
    let rates = latency_rates(res);
    let latency = at_rate(&p.latency, &rates, rate);
    if latency.iter().all(|r| r.to_sink_ns.is_none()) {
        return;
    }
    let _ = writeln!(
        out,
        "\nWhere it went: generator to the sink's interface (the device and the kernel around it), \
         then in the sink (the bench's own part); and the share of frames that waited in kxdp's \
         receive ring for a worker longer than 10 µs, 100 µs, 1 ms (`--measure-ring-wait`).\n\n\
         | device | to the sink's interface p50 / p99 / p99.9 µs | in the sink p99 / p99.9 µs | waited in kxdp's ring > 10 µs / 100 µs / 1 ms |\n|---|---|---|---|"
    );
    for d in duts(res) {
        let key = d.name();
        if of(&latency, key).all(|r| r.to_sink_ns.is_none()) {
            continue;
        }
        let part = |pick: fn(&RunResult) -> Option<u64>| {
            us(median(
                of(&latency, key).filter_map(|r| pick(r).map(|v| v as f64)),
            ))
        };
        let waited = |over: &str| {
            let name = format!("rx_waited_over_{over}");
            median(of(&latency, key).filter_map(|r| {
                let count = |n: &str| r.dut_counters.iter().find(|(c, _)| c == n).map(|(_, v)| *v);
                let timed = count("rx_wait_timed").filter(|&t| t > 0)?;
                Some(100.0 * count(&name).unwrap_or(0) as f64 / timed as f64)
            }))
            .map_or("—".into(), |v| format!("{v:.2}%"))
        };
        let _ = writeln!(
            out,
            "| {} | {} / {} / {} | {} / {} | {} / {} / {} |",
            d.short(),
            part(|r| r.to_sink_ns.map(|p| p.p50)),
            part(|r| r.to_sink_ns.map(|p| p.p99)),
            part(|r| r.to_sink_ns.map(|p| p.p999)),
            part(|r| r.sink_wait_ns.map(|p| p.p99)),
            part(|r| r.sink_wait_ns.map(|p| p.p999)),
            waited("10us"),
            waited("100us"),
            waited("1ms"),
        );
    }
}

fn secs(s: Option<f64>) -> String {
    match s {
        Some(v) if v < 0.01 => format!("{:.2} ms", v * 1000.0),
        Some(v) if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Some(v) => format!("{v:.1} s"),
        None => "—".into(),
    }
}

fn install_table(out: &mut String, res: &Results) {
    let _ = writeln!(
        out,
        "| Services (endpoints) | system | install everything | one endpoint change (median) | note |\n|---|---|---|---|---|"
    );
    for p in &res.install {
        let _ = writeln!(
            out,
            "| {} ({}) | control: compute the tables | {} | | from the objects control holds |",
            services_label(p.services),
            thousands(p.endpoints as f64),
            secs(Some(p.compute_s))
        );
        for r in &p.rows {
            let full = match r.full_s {
                Some(_) => secs(r.full_s),
                None => "not finished".into(),
            };
            let change = if r.change_s.is_empty() {
                "—".into()
            } else {
                format!("{} (of {})", secs(r.change_median()), r.change_s.len())
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                services_label(p.services),
                r.system,
                full,
                change,
                r.note
            );
        }
    }
}

/// One of the targets and what the run says about it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    /// The target as the issue states it.
    pub target: String,
    /// The measured figure.
    pub measured: String,
    /// Holds, does not hold, or not measured.
    pub verdict: String,
}

fn point(res: &Results, n: u32) -> Option<&Point> {
    res.points.iter().find(|p| p.services == n)
}

fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "holds".into(),
        Some(false) => "does not hold".into(),
        None => "not measured".into(),
    }
}

/// The targets against `res`.
pub fn targets(res: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let ceiling = median(res.ceiling.iter().map(|r| r.received_pps));
    let tp = |n: u32, dut: &str| point(res, n).and_then(|p| median_pps(&p.throughput, dut));
    for (dut, want) in [("iptables", 3.0), ("nftables", 2.0)] {
        let k = tp(10_000, "kxdp");
        let o = tp(10_000, dut);
        let bound = point(res, 10_000).is_some_and(|p| generator_bound(&p.throughput, ceiling));
        let r = match (k, o) {
            (Some(k), Some(o)) if o > 0.0 => Some(k / o),
            _ => None,
        };
        out.push(Target {
            target: format!("64-byte DNAT forwarding at 10k Services: kxdp ≥ {want}× {dut}"),
            measured: match (k, o, r) {
                (Some(k), Some(o), Some(r)) => format!(
                    "{} / {} pps = {}{r:.2}×{}",
                    thousands(k),
                    thousands(o),
                    if bound { "≥ " } else { "" },
                    if bound { " (kxdp generator-bound)" } else { "" }
                ),
                _ => "—".into(),
            },
            verdict: match r {
                Some(r) if r >= want => "holds".into(),
                Some(_) if bound => "not shown: kxdp was limited by the generator".into(),
                Some(_) => "does not hold".into(),
                None => "not measured".into(),
            },
        });
    }
    let (a, b) = (tp(100_000, "kxdp"), tp(1, "kxdp"));
    out.push(Target {
        target: "kxdp at 100k Services ≥ 90% of kxdp at 1 Service".into(),
        measured: match (a, b) {
            (Some(a), Some(b)) => format!(
                "{} / {} pps = {:.0}%",
                thousands(a),
                thousands(b),
                100.0 * a / b
            ),
            _ => "—".into(),
        },
        verdict: verdict(a.zip(b).map(|(a, b)| a >= 0.9 * b)),
    });
    for n in [1, 10_000] {
        let (k, f) = (tp(n, "kxdp"), tp(n, "xdp-fwd"));
        out.push(Target {
            target: format!(
                "kxdp's full pipeline ≥ 80% of the bare AF_XDP forwarder ({})",
                services_noun(n)
            ),
            measured: match (k, f) {
                (Some(k), Some(f)) => format!(
                    "{} / {} pps = {:.0}%",
                    thousands(k),
                    thousands(f),
                    100.0 * k / f
                ),
                _ => "—".into(),
            },
            verdict: verdict(k.zip(f).map(|(k, f)| k >= 0.8 * f)),
        });
    }
    let rates = latency_rates(res);
    for n in [1, 10_000] {
        let Some(p) = point(res, n) else { continue };
        if p.latency.is_empty() {
            continue;
        }
        for &rate in &rates {
            let runs = at_rate(&p.latency, &rates, rate);
            for kx in [DutKind::Kxdp, DutKind::KxdpAdaptive] {
                let pick = |dut: &str, f: fn(&RunResult) -> u64| median_latency(&runs, dut, f);
                let k = (
                    pick(kx.name(), |r| r.latency_ns.p50),
                    pick(kx.name(), |r| r.latency_ns.p99),
                );
                if k.1.is_none() && not_run(p, kx.name()).is_none() {
                    continue;
                }
                for dut in ["iptables", "iptables-legacy", "nftables"] {
                    let o = (
                        pick(dut, |r| r.latency_ns.p50),
                        pick(dut, |r| r.latency_ns.p99),
                    );
                    if o.1.is_none() && not_run(p, dut).is_none() {
                        continue;
                    }
                    // (kxdp's p50, p99; the other's p50, p99) when all four were measured.
                    let both = match (k, o) {
                        ((Some(k50), Some(k99)), (Some(o50), Some(o99))) => {
                            Some((k50, k99, o50, o99))
                        }
                        _ => None,
                    };
                    out.push(Target {
                        target: format!(
                            "latency at {} pps, {}: {} p99 ≤ {dut}'s, p50 lower",
                            thousands(rate as f64),
                            services_noun(n),
                            kx.name()
                        ),
                        measured: match both {
                            Some((k50, k99, o50, o99)) => format!(
                                "p50 {} vs {} µs, p99 {} vs {} µs",
                                us(Some(k50)),
                                us(Some(o50)),
                                us(Some(k99)),
                                us(Some(o99))
                            ),
                            None => not_run(p, dut)
                                .or_else(|| not_run(p, kx.name()))
                                .unwrap_or_else(|| "—".into()),
                        },
                        verdict: verdict(both.map(|(k50, k99, o50, o99)| k99 <= o99 && k50 < o50)),
                    });
                }
            }
        }
    }
    if duts(res).contains(&DutKind::KxdpAdaptive) {
        poll_mode_targets(res, &mut out);
    }
    out
}

/// Issue 20's targets for adaptive polling: forwarding at saturation within 3% of busy
/// polling's, at every Service count both ran; the worker at rest under 1% of a core.
fn poll_mode_targets(res: &Results, out: &mut Vec<Target>) {
    let ceiling = median(res.ceiling.iter().map(|r| r.received_pps));
    for p in &res.points {
        let (a, b) = (
            median_pps(&p.throughput, DutKind::KxdpAdaptive.name()),
            median_pps(&p.throughput, DutKind::Kxdp.name()),
        );
        if a.is_none() && b.is_none() {
            continue;
        }
        out.push(Target {
            target: format!(
                "adaptive polling forwards ≥ 97% of busy polling's rate ({})",
                services_noun(p.services)
            ),
            measured: match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!(
                    "{} / {} pps = {:.1}%{}",
                    thousands(a),
                    thousands(b),
                    100.0 * a / b,
                    if generator_bound(&p.throughput, ceiling) {
                        " (busy polling was generator-bound)"
                    } else {
                        ""
                    }
                ),
                _ => "—".into(),
            },
            verdict: verdict(
                a.zip(b)
                    .filter(|(_, b)| *b > 0.0)
                    .map(|(a, b)| a >= 0.97 * b),
            ),
        });
    }
    let at_rest: Vec<f64> = res
        .points
        .iter()
        .flat_map(|p| &p.setup)
        .filter(|s| s.dut == DutKind::KxdpAdaptive.name())
        .filter_map(|s| s.idle_cpu)
        .collect();
    let most = at_rest.iter().copied().reduce(f64::max);
    out.push(Target {
        target: "adaptive polling: the worker at rest uses ≤ 1% of a core".into(),
        measured: most.map_or_else(
            || "—".into(),
            |m| format!("at most {:.2}% ({} watches)", m * 100.0, at_rest.len()),
        ),
        verdict: verdict(most.map(|m| m <= 0.01)),
    });
}

/// The whole report.
pub fn markdown(res: &Results) -> String {
    let mut out = String::new();
    let plan = res.plan.as_ref();
    let _ = writeln!(out, "# kxdp against the kernel paths it replaces\n");
    let _ = writeln!(
        out,
        "Command: `{}`; {} to {} ({:.0} s), tree `{}`.\n",
        res.command, res.started, res.finished, res.seconds, res.commit
    );
    let _ = writeln!(
        out,
        "Machine: {} ({}). Load average (1, 5, 15 min) {} at the start, {} at the end; median \
         1-minute load before a run {:.2}, median CPU taken by other processes during a run {:.0}% \
         of both cores.\n",
        res.machine.line(),
        res.machine.network,
        res.loadavg_start,
        res.loadavg_end,
        median(all_runs(res).map(|r| r.load1_before)).unwrap_or(f64::NAN),
        median(all_runs(res).map(|r| r.foreign_cpu_pct)).unwrap_or(f64::NAN),
    );
    if let Some(p) = plan {
        let _ = writeln!(
            out,
            "Cores: the load (generator and sink, one thread) on core {}, the device under test on \
             core {} (kxdp's one worker by `taskset`, the forwarder's thread pinned, the kernel's \
             forwarding moved there by RPS on the uplink). {} repetitions of {} s per device, \
             devices in alternation; medians below. {}-byte frames (without FCS), {} flows; \
             the probed Service is the middle one of the set, with 10 endpoints; every frame is \
             DNATed to an endpoint and masqueraded (the source is outside the cluster).\n",
            p.load_core,
            p.dut_core,
            p.reps,
            p.seconds,
            p.size,
            p.flows
        );
    }
    let _ = writeln!(
        out,
        "## Forwarding: {}-byte UDP to one ClusterIP, flat out (received pps)\n",
        plan.map_or(64, |p| p.size)
    );
    rate_table(&mut out, res, |p| &p.throughput, true);
    if res.points.iter().any(|p| !p.new_flows.is_empty()) {
        let _ = writeln!(
            out,
            "\n## New flows: every frame a new 5-tuple ({} per run), flat out (received pps)\n",
            plan.map_or(0, |p| p.new_flows)
        );
        rate_table(&mut out, res, |p| &p.new_flows, false);
    }
    for p in res.points.iter().filter(|p| !p.latency.is_empty()) {
        for rate in latency_rates(res) {
            let _ = writeln!(
                out,
                "\n## One-way latency at {} pps, {} (generator to sink, one clock)\n",
                thousands(rate as f64),
                services_noun(p.services)
            );
            latency_table(&mut out, res, p, rate);
            split_table(&mut out, res, p, rate);
        }
    }
    if !res.install.is_empty() {
        let _ = writeln!(out, "\n## Installing Services and changing one endpoint\n");
        install_table(&mut out, res);
    }
    let _ = writeln!(
        out,
        "\n## The issue's targets\n\n| target | measured | verdict |\n|---|---|---|"
    );
    for t in targets(res) {
        let _ = writeln!(out, "| {} | {} | {} |", t.target, t.measured, t.verdict);
    }
    let _ = writeln!(out, "\n## How each device's tables were loaded\n");
    let _ = writeln!(
        out,
        "| Services | device | seconds | how | worker at rest (% of a core) |\n|---|---|---|---|---|"
    );
    for p in &res.points {
        for s in &p.setup {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                services_label(p.services),
                s.dut,
                s.install_seconds.map_or_else(
                    || s.not_run.clone().unwrap_or_default(),
                    |v| format!("{v:.2}")
                ),
                s.how,
                s.idle_cpu
                    .map_or_else(String::new, |c| format!("{:.2}", c * 100.0))
            );
        }
    }
    if !res.notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in &res.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

fn all_runs(res: &Results) -> impl Iterator<Item = &RunResult> {
    res.ceiling.iter().chain(&res.ceiling_latency).chain(
        res.points
            .iter()
            .flat_map(|p| p.throughput.iter().chain(&p.new_flows).chain(&p.latency)),
    )
}

/// The first limit a note names: "… took > 300 s" or "… not finished in 120 s".
fn limit_in(note: &str) -> Option<u64> {
    for marker in ["> ", "in "] {
        if let Some(i) = note.find(marker) {
            let rest = &note[i + marker.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !digits.is_empty() && rest[digits.len()..].starts_with(" s") {
                return digits.parse().ok();
            }
        }
    }
    None
}

/// The table proposed for the top-level README's performance section: one table, the
/// issue's four devices, every scenario a row, the machine and the command above it.
pub fn readme_table(res: &Results) -> String {
    let mut out = String::new();
    let reps = res.plan.as_ref().map_or(0, |p| p.reps);
    let ceiling = median(res.ceiling.iter().map(|r| r.received_pps));
    let _ = writeln!(
        out,
        "**kxdp against the kernel it replaces, same lab, same run** (`{}`, {}; {}; veth \
         pairs between namespaces, AF_XDP copy mode; median 1-minute load average before a \
         run {:.2}, other processes {:.0}% of the CPU during the median run). Medians of {reps} runs per \
         device, devices in alternation; generator and sink on core 0, the device on \
         core 1; 64-byte UDP to the middle one of N ClusterIP Services with 10 endpoints \
         each, DNAT + masquerade. The generator alone into the sink reaches {} pps, above \
         every device.\n",
        res.command,
        res.started.get(..10).unwrap_or(&res.started),
        res.machine.line(),
        median(all_runs(res).map(|r| r.load1_before)).unwrap_or(f64::NAN),
        median(all_runs(res).map(|r| r.foreign_cpu_pct)).unwrap_or(f64::NAN),
        ceiling.map_or("—".into(), thousands),
    );
    let duts = [
        DutKind::Kxdp,
        DutKind::Iptables,
        DutKind::Nftables,
        DutKind::XdpForwarder,
    ];
    let _ = writeln!(
        out,
        "| | kxdp | kernel + kube-proxy iptables | kernel + kube-proxy nftables | bare AF_XDP forwarder | kxdp / iptables | kxdp / nftables |\n|---|---|---|---|---|---|---|"
    );
    let short_not_run = |p: &Point, d: &str| {
        not_run(p, d).map(|w| {
            let secs = w.rsplit("> ").next().unwrap_or("").trim().to_string();
            format!("not run (tables not loaded in {secs})")
        })
    };
    let rate_row = |out: &mut String, label: String, p: &Point, runs: &[RunResult]| {
        let _ = write!(out, "| {label} |");
        for d in duts {
            let c = short_not_run(p, d.name())
                .unwrap_or_else(|| median_pps(runs, d.name()).map_or("—".into(), thousands));
            let _ = write!(out, " {c} |");
        }
        let k = median_pps(runs, "kxdp");
        for d in [DutKind::Iptables, DutKind::Nftables] {
            let _ = write!(out, " {} |", ratio(k, median_pps(runs, d.name()), false));
        }
        out.push('\n');
    };
    for p in &res.points {
        rate_row(
            &mut out,
            format!("forwarding, {} (pps)", services_noun(p.services)),
            p,
            &p.throughput,
        );
    }
    for p in res.points.iter().filter(|p| !p.new_flows.is_empty()) {
        rate_row(
            &mut out,
            format!("new flows per second, {}", services_noun(p.services)),
            p,
            &p.new_flows,
        );
    }
    let rates = latency_rates(res);
    for p in res.points.iter().filter(|p| !p.latency.is_empty()) {
        for &rate in &rates {
            let runs = at_rate(&p.latency, &rates, rate);
            let _ = write!(
                out,
                "| latency p50 / p99 at {} pps, {} (µs) |",
                thousands(rate as f64),
                services_noun(p.services)
            );
            for d in duts {
                let p50 = median_latency(&runs, d.name(), |r| r.latency_ns.p50);
                let p99 = median_latency(&runs, d.name(), |r| r.latency_ns.p99);
                let _ = write!(out, " {} / {} |", us(p50), us(p99));
            }
            out.push_str(" | |\n");
        }
    }
    for ip in &res.install {
        let row = |system: &str| ip.rows.iter().find(|r| r.system == system);
        let full = |system: &str| match row(system) {
            Some(r) if r.full_s.is_some() => secs(r.full_s),
            Some(r) => match limit_in(&r.note) {
                Some(n) => format!("not finished in {n} s"),
                None => "not finished".into(),
            },
            None => "—".into(),
        };
        let change = |system: &str| match row(system) {
            Some(r) if !r.change_s.is_empty() => secs(r.change_median()),
            _ => "—".into(),
        };
        let limit = res.plan.as_ref().map_or(0, |p| p.restore_limit_s);
        let ipt = match row("iptables-nft-restore --noflush").and_then(|r| r.full_s) {
            Some(v) => secs(Some(v)),
            None => format!(
                "not finished in {limit} s (legacy backend: {})",
                full("iptables-legacy-restore --noflush")
            ),
        };
        let _ = writeln!(
            out,
            "| install {} × 10 endpoints | {} | {ipt} | {} | — | | |",
            services_noun(ip.services),
            full("kxdp"),
            full("nft -f"),
        );
        let _ = writeln!(
            out,
            "| one endpoint change at {} | {} | {} | {} | — | | |",
            services_noun(ip.services),
            change("kxdp"),
            change("iptables-nft-restore --noflush"),
            change("nft -f"),
        );
    }
    let _ = writeln!(
        out,
        "\nkxdp: one worker, `kxdp-dataplane --scaled-rings`, tables sent as `kxdp-control` sends \
         them (snapshot, then deltas). Kernel: kube-proxy's own rulesets for the same Services, \
         forwarding moved to core 1 by RPS; install and change times are kube-proxy's \
         `iptables-restore --noflush` full and partial syncs and `nft -f`. Every device, the \
         iptables legacy backend, the targets and plots: `bench/results/` (`kxdp-bench run --full`)."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dut: &str, pps: f64) -> RunResult {
        RunResult {
            dut: dut.into(),
            received_pps: pps,
            offered_pps: 1000.0,
            ..RunResult::default()
        }
    }

    #[test]
    fn latency_runs_are_told_apart_by_rate_and_old_results_read_as_one_rate() {
        // Results of before the rate list: the plan's one number, runs without a rate.
        let old = include_str!("../results/results.json");
        let res: Results = serde_json::from_str(old).expect("the committed results");
        assert_eq!(latency_rates(&res), vec![50_000]);
        let p = res.points.iter().find(|p| !p.latency.is_empty()).unwrap();
        assert_eq!(
            at_rate(&p.latency, &[50_000], 50_000).len(),
            p.latency.len()
        );
        assert!(markdown(&res).contains("## One-way latency at 50,000 pps"));

        // Runs at several rates: each table has its own.
        let mut res = Results::default();
        let mut plan = crate::record::Plan::quick();
        plan.latency_pps = vec![1_000, 200_000];
        plan.duts = vec![DutKind::KxdpAdaptive, DutKind::Nftables];
        res.plan = Some(plan);
        let at = |dut: &str, rate: u64, p50: u64, p99: u64| {
            let mut r = run(dut, rate as f64);
            r.rate_pps = Some(rate);
            r.latency_ns.p50 = p50 * 1000;
            r.latency_ns.p99 = p99 * 1000;
            r
        };
        res.points.push(Point {
            services: 1,
            latency: vec![
                at("kxdp-adaptive", 1_000, 40, 90),
                at("nftables", 1_000, 50, 80),
                at("kxdp-adaptive", 200_000, 20, 60),
                at("nftables", 200_000, 30, 70),
            ],
            ..Point::default()
        });
        assert_eq!(
            at_rate(&res.points[0].latency, &[1_000, 200_000], 1_000).len(),
            2
        );
        let md = markdown(&res);
        assert!(
            md.contains("## One-way latency at 1,000 pps, 1 Service"),
            "{md}"
        );
        assert!(
            md.contains("## One-way latency at 200,000 pps, 1 Service"),
            "{md}"
        );
        let t = targets(&res);
        let verdict = |rate: &str| {
            t.iter()
                .find(|t| {
                    t.target
                        .starts_with(&format!("latency at {rate} pps, 1 Service: kxdp-adaptive"))
                })
                .map(|t| t.verdict.clone())
                .unwrap_or_else(|| panic!("no target at {rate}: {t:?}"))
        };
        assert_eq!(verdict("1,000"), "does not hold", "p99 90 against 80 µs");
        assert_eq!(verdict("200,000"), "holds", "p50 20 < 30, p99 60 ≤ 70 µs");
    }

    #[test]
    fn a_split_latency_says_where_it_went_and_old_results_say_nothing() {
        let mut res = Results::default();
        let mut plan = crate::record::Plan::quick();
        plan.latency_pps = vec![10_000];
        plan.duts = vec![DutKind::Kxdp, DutKind::Nftables];
        res.plan = Some(plan);
        let at = |dut: &str, to_sink_p99: u64, counters: Vec<(String, u64)>| {
            let mut r = run(dut, 10_000.0);
            r.rate_pps = Some(10_000);
            r.to_sink_ns = Some(crate::measure::Percentiles {
                p99: to_sink_p99 * 1000,
                ..Default::default()
            });
            r.sink_wait_ns = Some(crate::measure::Percentiles::default());
            r.dut_counters = counters;
            r
        };
        let ring = |over_10us| {
            vec![
                ("rx_wait_timed".to_string(), 10_000),
                ("rx_waited_over_10us".to_string(), over_10us),
                ("rx_waited_over_100us".to_string(), 50),
            ]
        };
        res.points.push(Point {
            services: 1,
            latency: vec![
                at("kxdp", 80, ring(100)),
                at("kxdp", 90, ring(120)),
                at("kxdp", 100, ring(140)),
                at("nftables", 50, vec![]),
            ],
            ..Point::default()
        });
        let md = markdown(&res);
        assert!(
            md.contains("| kxdp | 0.0 / 90.0 / 0.0 | 0.0 / 0.0 | 1.20% / 0.50% / 0.00% |"),
            "{md}"
        );
        assert!(
            md.contains("| nftables | 0.0 / 50.0 / 0.0 | 0.0 / 0.0 | — / — / — |"),
            "{md}"
        );
        // Results from a sink that did not stamp: no such table.
        for r in &mut res.points[0].latency {
            r.to_sink_ns = None;
        }
        assert!(!markdown(&res).contains("Where it went"));
    }

    #[test]
    fn medians_and_numbers_read_well() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([]), None);
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(services_label(10_000), "10k");
        assert_eq!(services_label(1), "1");
        assert_eq!(
            limit_in("first sync not run: nft -f took > 300 s"),
            Some(300)
        );
        assert_eq!(limit_in("full sync not finished in 120 s, nor"), Some(120));
        assert_eq!(limit_in("no number"), None);
    }

    #[test]
    fn the_table_shows_ratios_and_devices_not_run() {
        let mut res = Results {
            ceiling: vec![run("ceiling", 2000.0)],
            ..Results::default()
        };
        let mut p = Point {
            services: 10_000,
            throughput: vec![run("kxdp", 500.0), run("iptables", 100.0)],
            ..Point::default()
        };
        p.setup.push(crate::suite::SetupRecord {
            dut: "nftables".into(),
            not_run: Some("not run: nft -f took > 60 s".into()),
            ..Default::default()
        });
        res.points.push(p);
        let md = markdown(&res);
        // Without a plan every device is a column: kxdp adaptive's is empty here.
        assert!(md.contains("| 10k | 500 | — | 100 |"), "{md}");
        assert!(md.contains("5.00×"), "{md}");
        assert!(md.contains("not run: nft -f took > 60 s"), "{md}");
        let t = targets(&res);
        assert_eq!(t[0].verdict, "holds", "{t:?}");
        assert!(readme_table(&res).contains("kxdp / iptables"));

        // Adaptive polling against busy polling, and its worker at rest.
        let p = &mut res.points[0];
        p.throughput.push(run("kxdp-adaptive", 480.0));
        p.setup.push(crate::suite::SetupRecord {
            dut: "kxdp-adaptive".into(),
            idle_cpu: Some(0.004),
            ..Default::default()
        });
        let t = targets(&res);
        let find = |prefix: &str| {
            t.iter()
                .find(|t| t.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target {prefix}: {t:?}"))
        };
        let rate = find("adaptive polling forwards");
        assert_eq!(rate.measured, "480 / 500 pps = 96.0%", "{t:?}");
        assert_eq!(rate.verdict, "does not hold");
        let rest = find("adaptive polling: the worker at rest");
        assert_eq!(rest.measured, "at most 0.40% (1 watches)");
        assert_eq!(rest.verdict, "holds");
        assert!(markdown(&res).contains("| 10k | kxdp-adaptive |  |  | 0.40 |"));
    }
}
