//! Test clients of the echo server: `call` (one short TCP connection or UDP question each
//! time) and `hold` (long TCP connections streaming echoed messages).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `count` connections (or UDP questions) to `to`, one JSON line each with who answered
/// and the source address they saw, or the error.
pub fn call(
    to: SocketAddr,
    proto: &str,
    count: u32,
    timeout_ms: u64,
    interval_ms: u64,
    reuse: bool,
) -> Result<()> {
    let timeout = Duration::from_millis(timeout_ms);
    let session = if reuse && proto == "udp" {
        Some(udp_socket(to, timeout)?)
    } else {
        None
    };
    for i in 0..count {
        if i > 0 && interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
        let answer = match (proto, &session) {
            ("udp", Some(s)) => ask_udp(s),
            ("tcp", _) => call_tcp(to, timeout),
            ("udp", None) => call_udp(to, timeout),
            (other, _) => bail!("--proto {other}: use tcp or udp"),
        };
        let line = match answer {
            Ok(a) => {
                let (who, peer) = split_answer(&a);
                serde_json::json!({"i": i, "answer": who, "peer": peer})
            }
            Err(e) => serde_json::json!({"i": i, "error": format!("{e:#}")}),
        };
        outln!("{line}");
    }
    Ok(())
}

/// `connections` TCP connections to `to` held at once for `millis`, each streaming
/// `size`-byte messages every `interval_ms`; one JSON line each with who answered, the
/// bytes echoed, the longest wait for an echo and any error.
pub fn hold_all(
    to: SocketAddr,
    millis: u64,
    interval_ms: u64,
    size: usize,
    connections: usize,
) -> Result<()> {
    let threads: Vec<_> = (0..connections.clamp(1, 1024))
        .map(|i| {
            std::thread::spawn(move || {
                let (who, bytes, gap, err) = match hold(
                    to,
                    Duration::from_millis(millis),
                    Duration::from_millis(interval_ms),
                    size.clamp(8, 1 << 20),
                ) {
                    Ok((who, bytes, gap)) => (who, bytes, gap, None),
                    Err((who, bytes, gap, e)) => (who, bytes, gap, Some(format!("{e:#}"))),
                };
                let mut line = serde_json::json!({
                    "i": i, "answer": who, "bytes": bytes,
                    "max_gap_ms": gap.as_secs_f64() * 1e3,
                });
                if let Some(e) = err {
                    line["error"] = e.into();
                }
                line
            })
        })
        .collect();
    for t in threads {
        let line = t
            .join()
            .map_err(|_| anyhow::anyhow!("a hold thread panicked"))?;
        outln!("{line}");
    }
    Ok(())
}

/// `probe`: datagrams at `pps` to `to` for `millis` from one socket; the answers timed.
pub fn probe(to: SocketAddr, pps: u32, millis: u64, report_ms: f64) -> Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("bind")?;
    sock.connect(to).context("connect")?;
    let receiver = sock.try_clone()?;
    let total = Duration::from_millis(millis);
    let interval = Duration::from_secs(1) / pps.clamp(1, 100_000);
    let start = Instant::now();
    let start_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Answers until a second after the last datagram went out.
    receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
    let listen = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let (mut received, mut last, mut longest) = (0u64, None::<Duration>, Duration::ZERO);
        let mut gaps = Vec::new();
        while start.elapsed() < total + Duration::from_secs(1) {
            if receiver.recv(&mut buf).is_err() {
                continue;
            }
            let now = start.elapsed();
            if let Some(prev) = last {
                let gap = now - prev;
                longest = longest.max(gap);
                if gap.as_secs_f64() * 1e3 > report_ms {
                    gaps.push((prev.as_secs_f64() * 1e3, gap.as_secs_f64() * 1e3));
                }
            }
            last = Some(now);
            received += 1;
        }
        (received, longest, gaps)
    });
    let mut sent = 0u64;
    let mut next = start;
    while start.elapsed() < total {
        // Sends are paced from the start, not from each other: a late one does not
        // delay the rest.
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        let _ = sock.send(&sent.to_be_bytes());
        sent += 1;
        next += interval;
    }
    let (received, longest, gaps) = listen
        .join()
        .map_err(|_| anyhow::anyhow!("the probe's receiver panicked"))?;
    let line = serde_json::json!({
        "start_unix_ms": start_unix.as_secs_f64() * 1e3,
        "sent": sent, "received": received,
        "max_gap_ms": longest.as_secs_f64() * 1e3,
        "gaps": gaps.iter().map(|(at, gap)| serde_json::json!({"at_ms": at, "gap_ms": gap})).collect::<Vec<_>>(),
    });
    outln!("{line}");
    Ok(())
}

/// An echo server's answer: who answered and which source address it saw.
fn split_answer(text: &str) -> (String, String) {
    let mut parts = text.split_whitespace();
    let who = parts.next().unwrap_or_default().to_string();
    let peer = parts.next().unwrap_or_default().to_string();
    (who, peer)
}

fn call_tcp(to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout).context("connect")?;
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("read")?;
    Ok(out.trim().to_string())
}

/// Holds one TCP connection for `total`, echoing `size`-byte messages every `interval`,
/// checking each echo; returns who answered, the bytes echoed and the longest wait for an
/// echo, or the error with what was done before it.
#[allow(clippy::type_complexity)]
fn hold(
    to: SocketAddr,
    total: Duration,
    interval: Duration,
    size: usize,
) -> std::result::Result<(String, u64, Duration), (String, u64, Duration, anyhow::Error)> {
    let mut who = String::new();
    let mut bytes = 0u64;
    let mut max_gap = Duration::ZERO;
    let mut run = || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).context("connect")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).context("read greeting")?;
            line.push(b[0]);
        }
        who = split_answer(&String::from_utf8_lossy(&line)).0;
        let deadline = Instant::now() + total;
        let mut seq = 0u64;
        while Instant::now() < deadline {
            let mut msg = vec![0x5au8; size];
            msg[..8].copy_from_slice(&seq.to_be_bytes());
            let sent = Instant::now();
            s.write_all(&msg).context("write")?;
            let mut back = vec![0u8; size];
            s.read_exact(&mut back).context("read echo")?;
            max_gap = max_gap.max(sent.elapsed());
            if back != msg {
                bail!("echo {seq} came back changed");
            }
            bytes += size as u64;
            seq += 1;
            std::thread::sleep(interval);
        }
        Ok(())
    };
    match run() {
        Ok(()) => Ok((who, bytes, max_gap)),
        Err(e) => Err((who.clone(), bytes, max_gap, e)),
    }
}

fn udp_socket(to: SocketAddr, timeout: Duration) -> Result<UdpSocket> {
    let local = if to.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(to)?;
    Ok(s)
}

fn call_udp(to: SocketAddr, timeout: Duration) -> Result<String> {
    ask_udp(&udp_socket(to, timeout)?)
}

/// One question on a connected UDP socket.
fn ask_udp(s: &UdpSocket) -> Result<String> {
    let mut buf = [0u8; 2048];
    // A datagram can be lost (e.g. while the dataplane resolves a pod); ask up to 3 times.
    let mut last = None;
    for _ in 0..3 {
        s.send(b"who")?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no answer")))
}
