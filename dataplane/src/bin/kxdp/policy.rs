//! `kxdp policy explain`: which NetworkPolicy allows a new connection, or that none does,
//! for every path the dataplane would take (after Service translation).

use std::path::Path;

use anyhow::{bail, Result};
use nat::wire::Message;

use crate::ask;

/// Prints which policy decides a new connection from `src` to `dst:port` over `proto`.
pub fn explain(
    socket: &Path,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    port: u16,
    proto: &str,
    output: &str,
) -> Result<()> {
    use nat::spec::Protocol;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        "icmp" => None,
        other => bail!("--proto {other}: use tcp, udp, sctp or icmp"),
    };
    // Any client may ask the dataplane, which refuses this too; asked here, it needs none.
    dataplane::inspect::check_families(src, dst)?;
    let answer = ask(
        socket,
        &Message::ExplainPolicy {
            src,
            dst,
            protocol,
            port,
        },
    )?;
    let Message::PolicyExplained { paths } = answer else {
        bail!("unexpected answer: {answer:?}");
    };
    match output {
        "json" => outln!("{}", serde_json::to_string_pretty(&paths)?),
        "table" => {
            for p in &paths {
                let via = p
                    .service
                    .as_deref()
                    .map(|s| format!(" via {s}"))
                    .unwrap_or_default();
                outln!(
                    "{src} -> {}:{}{via} (seen from {}): {}",
                    p.dst,
                    p.port,
                    p.peer,
                    if p.allowed { "ALLOWED" } else { "DENIED" }
                );
                for (dir, v) in [("egress ", &p.egress), ("ingress", &p.ingress)] {
                    let pod = v.pod.as_deref().unwrap_or("-");
                    let by = match (&v.allowed_by, v.verdict.as_str()) {
                        (Some(by), _) => format!(" by {by}"),
                        (None, "denied") => " (no policy allows it)".to_string(),
                        _ => String::new(),
                    };
                    let iso = if v.isolating.is_empty() {
                        String::new()
                    } else {
                        format!("; isolated by {}", v.isolating.join(", "))
                    };
                    outln!("  {dir} {pod:<24} {}{by}{iso}", v.verdict);
                }
            }
        }
        other => bail!("-o {other}: use table or json"),
    }
    Ok(())
}
