//! `kxdp conntrack`: tracked connections (tuples, translation, state, expiry, Service,
//! policy verdict), filtered, as a table or JSON.

use std::path::Path;

use anyhow::{bail, Result};
use nat::wire::Message;

use crate::ask;

/// Prints the tracked connections of the dataplane at `socket` that match the filters, or
/// only their counts, as `output` (`table` or `json`).
pub fn conntrack(
    socket: &Path,
    addr: Option<std::net::IpAddr>,
    port: Option<u16>,
    proto: Option<&str>,
    limit: usize,
    count: bool,
    output: &str,
) -> Result<()> {
    let protocol = match proto.map(str::to_ascii_lowercase).as_deref() {
        None => None,
        Some("tcp") => Some(6),
        Some("udp") => Some(17),
        Some("sctp") => Some(132),
        Some("icmp") => Some(1),
        Some("icmpv6") => Some(58),
        Some(other) => bail!("--proto {other}: use tcp, udp, sctp, icmp or icmpv6"),
    };
    let m = ask(
        socket,
        &Message::GetConntrack {
            addr,
            port,
            protocol,
            limit: if count { 0 } else { limit },
        },
    )?;
    let Message::Conntrack {
        total,
        matched,
        entries,
    } = m
    else {
        bail!("unexpected answer: {m:?}");
    };
    match output {
        "json" => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "total": total, "matched": matched, "entries": entries,
            }))?
        ),
        "table" => {
            outln!("{matched} of {total} connections match");
            for e in &entries {
                outln!(
                    "{:<6} {:<48} reply {:<48} {:<9} {:<12} {:>6}s {} [{}]",
                    e.protocol,
                    e.original,
                    e.reply,
                    e.nat,
                    e.state,
                    e.expires_in_s,
                    e.service.as_deref().unwrap_or("-"),
                    e.policy
                );
            }
        }
        other => bail!("-o {other}: use table or json"),
    }
    Ok(())
}
