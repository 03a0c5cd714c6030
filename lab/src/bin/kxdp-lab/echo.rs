//! The pods' echo server: every TCP connection and UDP datagram is answered with the pod's
//! name and the source address it came from, so a client sees who answered and which
//! translation it went through.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};

/// Binds `[::]:port` (which takes IPv4 too) or, without IPv6, `0.0.0.0:port`.
fn bind_any<T>(port: u16, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    bind(SocketAddr::from(([0u16; 8], port))).or_else(|_| bind(SocketAddr::from(([0u8; 4], port))))
}

/// Serves `ports` on TCP and UDP as `name` until the process is ended.
pub fn serve(name: &str, ports: &[u16]) -> Result<()> {
    let mut threads = Vec::new();
    for &port in ports {
        let tcp = bind_any(port, TcpListener::bind).with_context(|| format!("bind tcp {port}"))?;
        let name_tcp = name.to_string();
        threads.push(std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                // Each connection: say who we are and who we see, then echo whatever comes
                // until the client closes (a one-shot `call` closes at once, `hold` streams).
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_canonical().to_string())
                    .unwrap_or_default();
                let answer = format!("{name_tcp} {peer}\n");
                std::thread::spawn(move || {
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let udp = bind_any(port, UdpSocket::bind).with_context(|| format!("bind udp {port}"))?;
        let name_udp = name.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let answer = format!("{name_udp} {}", from.ip().to_canonical());
                let _ = udp.send_to(answer.as_bytes(), from);
            }
        }));
    }
    eprintln!("echo {name} on {ports:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
