//! `kxdp services`: every Service port with its frontends and endpoints (state, weight,
//! Maglev share), as a table or JSON.

use std::path::Path;

use anyhow::{bail, Result};
use nat::wire::Message;

use crate::ask;

/// Prints the Service ports of the dataplane at `socket` as `output` (`table` or `json`).
pub fn services(socket: &Path, output: &str) -> Result<()> {
    let m = ask(socket, &Message::GetServices)?;
    let Message::Services {
        generation,
        services,
    } = m
    else {
        bail!("unexpected answer: {m:?}");
    };
    match output {
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
