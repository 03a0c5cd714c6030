//! Who may use the control socket, and how much of it: the peer's credentials as the
//! kernel gives them, the privilege each request needs, the socket's group and
//! kxdp-control's user, and the cap on connections per class of peer.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nat::wire::Message;

/// Who is at the other end of a control connection, as the kernel tells it
/// (`SO_PEERCRED`: the credentials of the process that connected, at the time it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process id (0 when it lives in a PID namespace this one cannot see).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`.
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
        Ok(Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }
}

/// What a request on the control socket may do, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Privilege {
    /// Read counters, tables, connections, flow events, policy verdicts.
    Inspect,
    /// Replace the tables (snapshots and deltas).
    Program,
    /// Stop this process's forwarding and hand its state to a successor.
    Handover,
}

impl Privilege {
    /// What `msg` asks for.
    pub fn required(msg: &Message) -> Privilege {
        match msg {
            Message::Snapshot { .. }
            | Message::Delta { .. }
            | Message::AttachPod { .. }
            | Message::DetachPod { .. } => Privilege::Program,
            Message::Handover { .. } => Privilege::Handover,
            _ => Privilege::Inspect,
        }
    }
}

/// Who may use the control socket, and for what. Connecting at all takes the socket
/// file's permissions: root, and the members of its group when it has one (mode 0660).
/// Whoever connects may inspect; programming the tables is for root and the user
/// kxdp-control runs as; a handover (which stops this process's forwarding) is for root
/// alone. There is no shutdown request: a dataplane stops on SIGTERM, which only root
/// (or the process's own user) can send.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The socket's group (mode 0660 when set, else 0600): its members may connect.
    pub group: Option<u32>,
    /// kxdp-control's user: it may program the tables as well as root.
    pub control_uid: Option<u32>,
}

impl Access {
    /// Whether `peer` may do what `privilege` names; `Err` says why not, for the peer.
    pub fn check(&self, peer: &Peer, privilege: Privilege) -> Result<(), String> {
        let root = peer.uid == 0;
        match privilege {
            Privilege::Inspect => Ok(()),
            Privilege::Program if root || self.control_uid == Some(peer.uid) => Ok(()),
            Privilege::Program => Err(match self.control_uid {
                Some(c) => format!(
                    "user {} may inspect this dataplane but not program it: tables come from root or kxdp-control's user ({c})",
                    peer.uid
                ),
                None => format!(
                    "user {} may inspect this dataplane but not program it: tables come from root (start kxdp-dataplane with --control-user for an unprivileged kxdp-control)",
                    peer.uid
                ),
            }),
            Privilege::Handover if root => Ok(()),
            Privilege::Handover => Err(format!(
                "user {} may not ask for a handover: only root may stop this dataplane's forwarding",
                peer.uid
            )),
        }
    }

    /// Whether `peer` is one of the trusted users (root, kxdp-control's), whose connections
    /// are counted apart from inspection's so that these can never crowd them out.
    pub(super) fn trusted(&self, peer: &Peer) -> bool {
        self.check(peer, Privilege::Program).is_ok()
    }
}

/// Connections served at once, per class (trusted users, everyone else): each is a thread,
/// and a group member must not be able to make thousands. One kxdp-control, a CNI plugin
/// per pod being set up and a few operators fit easily.
pub const MAX_CONNECTIONS: usize = 64;

/// A connection's place among the [`MAX_CONNECTIONS`] of its class, given back on drop.
pub(super) struct Slot {
    open: Arc<[AtomicUsize; 2]>,
    class: usize,
}

impl Slot {
    pub(super) fn take(open: &Arc<[AtomicUsize; 2]>, class: usize) -> Option<Slot> {
        open[class]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            open: open.clone(),
            class,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open[self.class].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The id of group `name`, from `/etc/group`.
pub fn group_id(name: &str) -> io::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group {name:?} in /etc/group"),
            )
        })
}

/// The id of user `name` (or a number), from `/etc/passwd`.
pub fn user_id(name: &str) -> io::Result<u32> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let users = std::fs::read_to_string("/etc/passwd")?;
    users
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, uid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| uid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user {name:?} in /etc/passwd"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_do_what() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let control = Peer {
            pid: 2,
            uid: 65532,
            gid: 65532,
        };
        let member = Peer {
            pid: 3,
            uid: 1000,
            gid: 65532,
        };
        let access = Access {
            group: Some(65532),
            control_uid: Some(65532),
        };
        let stats = Message::GetStats;
        let table = Message::Snapshot {
            generation: 1,
            tables: Box::default(),
        };
        let handover = Message::Handover { version: 1 };
        let pod = Message::AttachPod {
            ifname: "kxdp0".into(),
            container_id: "c".into(),
            ips: vec![],
        };
        for (peer, msg, allowed) in [
            (root, &stats, true),
            (root, &table, true),
            (root, &handover, true),
            (control, &stats, true),
            (control, &table, true),
            (control, &handover, false),
            (member, &stats, true),
            (member, &table, false),
            (member, &handover, false),
            (root, &pod, true),
            (member, &pod, false),
        ] {
            let verdict = access.check(&peer, Privilege::required(msg));
            assert_eq!(verdict.is_ok(), allowed, "{peer:?} {msg:?}: {verdict:?}");
        }
        // Without --control-user only root programs.
        assert!(Access::default()
            .check(&control, Privilege::Program)
            .unwrap_err()
            .contains("--control-user"));
    }
}
