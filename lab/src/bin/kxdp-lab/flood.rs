//! A bounded flood of raw frames out of an interface, for the flood tests: TCP SYNs from
//! random sources, later IPv4 fragments, or malformed IPv4 frames.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Sends `count` frames of `kind` (at most for `seconds`) to `to` out of `dev`, and prints
/// how many went.
pub fn flood(
    dev: &str,
    dst_mac: &str,
    to: std::net::SocketAddrV4,
    kind: &str,
    count: u64,
    seconds: u64,
) -> Result<()> {
    let mac: Vec<u8> = dst_mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--dst-mac {dst_mac}"))?;
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| anyhow::anyhow!("--dst-mac {dst_mac}"))?;
    let sock = pktio::capture::RawSocket::bind(dev)?;
    let src_mac = [0x02, 0x66, 0x6c, 0x6f, 0x6f, 0x64];
    // xorshift: reproducible, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline {
        let r = rand();
        // Sources in 100.64.0.0/10 (shared address space: nobody's real clients).
        let src = [100, 64 | (r as u8 & 0x3f), (r >> 8) as u8, (r >> 16) as u8];
        let sport = 1024 + (r >> 24) as u16 % 60000;
        let mut frame = Vec::with_capacity(64);
        match kind {
            "syn" => etherparse::PacketBuilder::ethernet2(src_mac, mac)
                .ipv4(src, to.ip().octets(), 64)
                .tcp(sport, to.port(), r as u32, 1024)
                .syn()
                .write(&mut frame, &[])?,
            "fragments" => {
                etherparse::PacketBuilder::ethernet2(src_mac, mac)
                    .ipv4(src, to.ip().octets(), 64)
                    .udp(sport, to.port())
                    .write(&mut frame, &[0u8; 32])?;
                // A fragment other than the first: offset 8 (in 8-byte units), no transport
                // header of its own; the header checksum made right again.
                frame[14 + 6] = 0x00;
                frame[14 + 7] = 0x08;
                frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
                let c = nat::checksum::checksum(&frame[14..34]);
                frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
            }
            "garbage" => {
                // An IPv4 header that an XDP parser takes (version 4, IHL 5, UDP, the
                // destination) around random bytes: wrong checksum, lengths, payload.
                frame.extend_from_slice(&mac);
                frame.extend_from_slice(&src_mac);
                frame.extend_from_slice(&[0x08, 0x00]);
                let n = 28 + (r % 40) as usize;
                for _ in 0..n {
                    frame.push(rand() as u8);
                }
                frame[14] = 0x45;
                frame[14 + 9] = 17;
                frame[26..30].copy_from_slice(&src);
                frame[30..34].copy_from_slice(&to.ip().octets());
            }
            other => bail!("--kind {other}: use syn, fragments or garbage"),
        }
        sock.send(&frame)?;
        sent += 1;
    }
    outln!("{}", serde_json::json!({"sent": sent, "kind": kind}));
    Ok(())
}
