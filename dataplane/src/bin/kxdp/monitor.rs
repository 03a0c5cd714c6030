//! `kxdp monitor`: the dataplane's flow events (new connections, drops) as they happen,
//! filtered, until a time or count limit; says how many events it could not keep up with.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nat::wire::Message;

use crate::output::stdout_error;

/// Streams the flow events of the dataplane at `socket` that match the filters, as
/// `output` (`table` or `json`, one event per line), for `seconds` (0: until interrupted)
/// or `count` events (0: no limit).
pub fn monitor(
    socket: &Path,
    addr: Option<std::net::IpAddr>,
    port: Option<u16>,
    drops_only: bool,
    seconds: u64,
    count: usize,
    output: &str,
) -> Result<()> {
    if !matches!(output, "table" | "json") {
        bail!("-o {output}: use table or json");
    }
    let mut client = crate::connect(socket)?;
    client.send(&Message::Monitor {
        addr,
        port,
        drops_only,
    })?;
    let deadline = (seconds > 0).then(|| Instant::now() + Duration::from_secs(seconds));
    let mut shown = 0usize;
    let mut stdout = std::io::stdout().lock();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) || (count > 0 && shown >= count) {
            return Ok(());
        }
        let m = client.read()?;
        let (events, lost) = match m {
            Message::FlowEvents { events, lost } => (events, lost),
            Message::Refused { reason } => bail!("the dataplane refused: {reason}"),
            other => bail!("unexpected answer: {other:?}"),
        };
        if lost > 0 {
            if output == "json" {
                writeln!(stdout, "{}", serde_json::json!({ "lost": lost }))
                    .map_err(stdout_error)?;
            } else {
                writeln!(
                    stdout,
                    "... {lost} events lost (the monitor could not keep up)"
                )
                .map_err(stdout_error)?;
            }
        }
        for e in events {
            if count > 0 && shown >= count {
                break;
            }
            shown += 1;
            if output == "json" {
                writeln!(stdout, "{}", serde_json::to_string(&e)?).map_err(stdout_error)?;
                continue;
            }
            let sock = |a: (std::net::IpAddr, u16)| std::net::SocketAddr::from(a).to_string();
            let mut line = format!(
                "{:>12.6} w{} {:<12} {:<3} {} -> {}",
                e.at as f64 / 1e9,
                e.worker,
                format!("{:?}", e.kind),
                e.protocol,
                sock(e.src),
                sock(e.dst)
            );
            if let Some(to) = e.to {
                line.push_str(&format!(" => {}", sock(to)));
            }
            if let Some(m) = e.masquerade {
                line.push_str(&format!(" as {}", sock(m)));
            }
            if let Some(p) = &e.policy {
                line.push_str(&format!(" allowed by {p}"));
            }
            if let Some(r) = &e.reason {
                line.push_str(&format!(" ({r})"));
            }
            writeln!(stdout, "{line}").map_err(stdout_error)?;
        }
        stdout.flush().map_err(stdout_error)?;
    }
}
