//! A bounded UDP load: datagrams to one address from several sockets (flows), as fast as
//! they go, for a packet-rate figure.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;

/// Sends `size`-byte datagrams to `to` from `flows` sockets for `seconds`, and prints how
/// many went.
pub fn blast(to: SocketAddr, seconds: u64, size: usize, flows: u16) -> Result<()> {
    let sockets: Vec<UdpSocket> = (0..flows.max(1))
        .map(|_| UdpSocket::bind(("0.0.0.0", 0)))
        .collect::<Result<_, _>>()?;
    let payload = vec![0x6bu8; size];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    'send: loop {
        for s in &sockets {
            for _ in 0..64 {
                if s.send_to(&payload, to).is_ok() {
                    sent += 1;
                }
            }
            if Instant::now() >= deadline {
                break 'send;
            }
        }
    }
    outln!("{}", serde_json::json!({"sent": sent, "seconds": seconds}));
    Ok(())
}
