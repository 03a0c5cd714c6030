//! `kxdp stats`: the dataplane's per-worker counters, table occupancy and policy drops, as a
//! table or JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use ctlclient::DataplaneStats;
use nat::wire::Message;

use crate::ask;

/// Prints the counters of the dataplane at `socket` as `output` (`table` or `json`).
pub fn stats(socket: &Path, output: &str) -> Result<()> {
    let s = DataplaneStats::from_answer(ask(socket, &Message::GetStats)?)?;
    match output {
        "json" => {
            let DataplaneStats {
                generation,
                conntrack,
                conntrack_capacity,
                workers,
                policy_drops,
                refused_tables,
                poll_mode,
            } = &s;
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
                    "poll_mode": poll_mode,
                }))?
            );
        }
        "table" => print_stats(&s)?,
        other => bail!("-o {other}: use table or json"),
    }
    Ok(())
}

fn print_stats(s: &DataplaneStats) -> Result<()> {
    let DataplaneStats {
        generation,
        conntrack,
        conntrack_capacity,
        workers,
        policy_drops,
        refused_tables,
        poll_mode,
    } = s;
    let mode = if poll_mode.is_empty() {
        String::new()
    } else {
        format!(", workers poll {poll_mode}")
    };
    outln!(
        "tables generation {generation}, conntrack {conntrack}/{conntrack_capacity}, tables refused {refused_tables}{mode}"
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
        // The share of its time each worker slept (adaptive and interrupt modes).
        out!("{:<28}", "asleep (% of the time)");
        for w in workers {
            let get = |n: &str| w.iter().find(|(k, _)| k == n).map_or(0, |(_, v)| *v);
            let (awake, asleep) = (get("awake_ns"), get("asleep_ns"));
            let share = asleep as f64 * 100.0 / (awake + asleep).max(1) as f64;
            out!("{:>14}", format!("{share:.1}"));
        }
        outln!();
    }
    if !policy_drops.is_empty() {
        outln!("connections refused by NetworkPolicy");
        for (name, v) in policy_drops {
            outln!("  {name:<40}{v:>14}");
        }
    }
    Ok(())
}
