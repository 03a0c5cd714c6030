//! Handing a running dataplane's state to its successor, so that a restart or an upgrade
//! keeps established connections.
//!
//! The successor (`kxdp-dataplane --takeover`) connects to the running process's control
//! socket and asks for a [`Message::Handover`] of its own [`VERSION`]. The running process
//! refuses a version it does not speak and carries on; otherwise it stops its workers,
//! closes its AF_XDP sockets and detaches its XDP programs, sends its tables, connections
//! and neighbours, and exits. The successor installs them, attaches, and forwards. Packets
//! arriving in between (the interfaces briefly belong to nobody) are lost, and TCP
//! retransmits them; the gap is logged.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nat::conntrack::{Connection, FlowKey};
use nat::wire::{self, HandedConnection, Message};

use crate::state::{Neighbor, Shared};

/// The handover format this binary speaks (the table format's version is part of it).
pub const VERSION: u32 = 1_000 + nat::spec::SPEC_VERSION;

/// The running process's state, for its successor (call with the workers stopped).
pub fn export(shared: &Shared, now: u64) -> Message {
    let tables = shared.tables.load();
    let connections = shared
        .conntrack
        .entries(now)
        .into_iter()
        .map(|(c, state, expires)| HandedConnection {
            proto: c.original.proto,
            original: (
                c.original.src,
                c.original.dst,
                c.original.sport,
                c.original.dport,
            ),
            reply: (c.reply.src, c.reply.dst, c.reply.sport, c.reply.dport),
            service: c.service,
            policy: c.policy,
            state,
            remaining_ns: expires.saturating_sub(now),
        })
        .collect();
    let neighbors = shared
        .neighbors
        .all()
        .into_iter()
        .filter_map(|(ip, n)| Some((ip, shared.ports.get(n.port)?.name.clone(), n.mac)))
        .collect();
    Message::HandoverState {
        version: VERSION,
        generation: tables.generation,
        tables: Box::new(tables.spec.clone()),
        connections,
        neighbors,
    }
}

/// Installs a predecessor's state; returns how many connections were taken over.
pub fn import(shared: &Shared, state: Message, now: u64) -> Result<usize, String> {
    let Message::HandoverState {
        version,
        generation,
        tables,
        connections,
        neighbors,
    } = state
    else {
        return Err(format!("expected the handed state, got {state:?}"));
    };
    if version != VERSION {
        return Err(format!(
            "handover version {version}, this binary speaks {VERSION}"
        ));
    }
    shared.install(generation, *tables, now);
    let key = |proto, t: (std::net::IpAddr, std::net::IpAddr, u16, u16)| FlowKey {
        proto,
        src: t.0,
        dst: t.1,
        sport: t.2,
        dport: t.3,
    };
    let mut taken = 0;
    for c in connections {
        let conn = Connection {
            original: key(c.proto, c.original),
            reply: key(c.proto, c.reply),
            service: c.service,
            policy: c.policy,
        };
        if shared
            .conntrack
            .insert_with_state(conn, c.state, now, c.remaining_ns.max(1))
            .is_ok()
        {
            taken += 1;
        }
    }
    for (ip, port_name, mac) in neighbors {
        if let Some(port) = shared.ports.iter().position(|p| p.name == port_name) {
            shared.neighbors.learn(ip, Neighbor { port, mac }, now);
        }
    }
    Ok(taken)
}

/// Asks the dataplane at `socket` to hand over, as a successor speaking `version`.
pub fn request(socket: &Path, version: u32) -> Result<Message, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "connect to the running dataplane at {}: {e}",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    wire::write_message(&mut s, &Message::Handover { version }).map_err(|e| e.to_string())?;
    match wire::read_message(&mut s).map_err(|e| format!("reading the handed state: {e}"))? {
        Message::Refused { reason } => Err(format!("the running dataplane refused: {reason}")),
        m => Ok(m),
    }
}
