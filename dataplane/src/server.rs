//! The dataplane's end of the control stream: a Unix socket on which control sends tables
//! and inspection asks for counters.
//!
//! Each connection is served by its own thread; a table is compiled off the workers and
//! swapped in whole, so workers never wait. A control that goes away leaves the tables as
//! they are: forwarding continues until a new control connects and resyncs.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nat::wire::{self, Message};

use crate::state::{DeltaOutcome, Shared};

/// Binds the control socket at `path` (mode 0600: only root may program the dataplane) and
/// serves it on a background thread.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    epoch: Instant,
) -> io::Result<std::thread::JoinHandle<()>> {
    serve_for_group(path, shared, epoch, None)
}

/// [`serve`], the socket owned by group `gid` with mode 0660 when given (so that an
/// unprivileged control process of that group may connect), else 0600.
pub fn serve_for_group(
    path: &Path,
    shared: Arc<Shared>,
    epoch: Instant,
    gid: Option<u32>,
) -> io::Result<std::thread::JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    log::info!("control socket listening on {}", path.display());
    let writer = Arc::new(Writer::default());
    std::thread::Builder::new()
        .name("kxdp-control-rx".into())
        .spawn(move || {
            for (id, stream) in (1u64..).zip(listener.incoming()) {
                match stream {
                    Ok(stream) => {
                        let shared = shared.clone();
                        let writer = writer.clone();
                        let _ = std::thread::Builder::new()
                            .name("kxdp-control-conn".into())
                            .spawn(move || {
                                let mut conn = Conn {
                                    id,
                                    writer: &writer,
                                };
                                if let Err(e) = connection(stream, &shared, epoch, &mut conn) {
                                    log::debug!("control connection ended: {e}");
                                }
                            });
                    }
                    Err(e) => log::warn!("accept on control socket: {e}"),
                }
            }
        })
}

/// How long a second control waits for the first one's connection to close before it is
/// told the tables are taken: a restarted control may connect before the dataplane has
/// read its predecessor's end of file.
const WRITER_WAIT: Duration = Duration::from_secs(1);

/// The one connection that programs the tables. Two kxdp-control processes (a stale one
/// and its replacement, or two nodes' configs on one socket) would otherwise replace each
/// other's snapshots forever; the second is answered [`Message::Busy`] instead.
#[derive(Default)]
struct Writer {
    /// The connection holding the tables, and since when.
    held: Mutex<Option<(u64, SystemTime)>>,
    freed: Condvar,
}

/// One connection's claim on the [`Writer`], released when the connection ends.
struct Conn<'a> {
    id: u64,
    writer: &'a Writer,
}

impl Conn<'_> {
    /// Makes this connection the writer, waiting up to [`WRITER_WAIT`] for another to
    /// end; `Err` tells who holds the tables.
    fn claim(&mut self) -> Result<(), String> {
        let held = self
            .writer
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut held, _) = self
            .writer
            .freed
            .wait_timeout_while(held, WRITER_WAIT, |h| {
                h.is_some_and(|(id, _)| id != self.id)
            })
            .unwrap_or_else(PoisonError::into_inner);
        match *held {
            Some((id, since)) if id != self.id => {
                let since = since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                Err(format!(
                    "another kxdp-control (control connection {id}, programming since unix time {since}) holds this dataplane's tables; run one kxdp-control per dataplane and stop the other"
                ))
            }
            Some(_) => Ok(()),
            None => {
                *held = Some((self.id, SystemTime::now()));
                Ok(())
            }
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut held = self
            .writer
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.is_some_and(|(id, _)| id == self.id) {
            *held = None;
            self.writer.freed.notify_all();
        }
    }
}

fn connection(
    mut stream: UnixStream,
    shared: &Shared,
    epoch: Instant,
    conn: &mut Conn<'_>,
) -> io::Result<()> {
    loop {
        let msg = match wire::read_message(&mut stream) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                log::warn!("refusing control message: {e}");
                let _ = wire::write_message(
                    &mut stream,
                    &Message::Refused {
                        reason: e.to_string(),
                    },
                );
                return Err(e);
            }
        };
        if let Message::Handover { version } = msg {
            return handover(stream, shared, version);
        }
        if let Message::Monitor {
            addr,
            port,
            drops_only,
        } = msg
        {
            return monitor(stream, shared, addr, port, drops_only);
        }
        if matches!(msg, Message::Snapshot { .. } | Message::Delta { .. }) {
            if let Err(reason) = conn.claim() {
                log::error!("refusing a table from a second control: {reason}");
                wire::write_message(&mut stream, &Message::Busy { reason })?;
                return Ok(());
            }
        }
        let (answer, retire) = handle_table_or(msg, shared, epoch);
        wire::write_message(&mut stream, &answer)?;
        if retire {
            // After the answer: control's wait (and the network programming latency it
            // measures) ends when the workers use the new tables, not after a sweep of the
            // whole connection table.
            shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
        }
    }
}

/// [`handle`], with whether stale flows are to be retired once the answer is out.
fn handle_table_or(msg: Message, shared: &Shared, epoch: Instant) -> (Message, bool) {
    match msg {
        Message::Snapshot { generation, tables } => {
            match install_snapshot(generation, *tables, shared) {
                Ok(answer) => (answer, true),
                Err(answer) => (answer, false),
            }
        }
        Message::Delta {
            generation,
            base,
            delta,
        } => install_delta(generation, base, &delta, shared),
        other => (answer_query(other, shared, epoch), false),
    }
}

fn refuse(shared: &Shared, reason: String) -> Message {
    shared
        .refused_tables
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log::error!("refusing {reason}; keeping the tables in use");
    Message::Refused { reason }
}

fn install_snapshot(
    generation: u64,
    mut tables: nat::spec::TableSpec,
    shared: &Shared,
) -> Result<Message, Message> {
    tables.sort_services();
    if let Err(reason) = tables.validate() {
        return Err(refuse(
            shared,
            format!("table generation {generation}: {reason}"),
        ));
    }
    let started = Instant::now();
    let services = tables.services.len();
    shared.install_tables(generation, tables);
    log::info!(
        "applied table generation {generation}: {services} service ports in {:?}",
        started.elapsed()
    );
    Ok(Message::Applied { generation })
}

fn install_delta(
    generation: u64,
    base: u64,
    delta: &nat::spec::TableDelta,
    shared: &Shared,
) -> (Message, bool) {
    let started = Instant::now();
    match shared.install_delta(generation, base, delta) {
        Ok(DeltaOutcome::Applied { retire }) => {
            log::debug!(
                "applied table generation {generation} (delta from {base}: {} service ports upserted, {} removed) in {:?}",
                delta.upserted.len(),
                delta.removed.len(),
                started.elapsed()
            );
            (Message::Applied { generation }, retire)
        }
        Ok(DeltaOutcome::Stale { have }) => {
            log::info!(
                "table generation {generation} is a delta from {base}, but generation {have} is in use: asking control for a snapshot"
            );
            (Message::NeedSnapshot { have }, false)
        }
        Err(reason) => (refuse(shared, reason), false),
    }
}

/// Hands this process's state to a successor: refused unless it speaks our version and
/// the process can hand over (its main thread listens); then the main thread stops the
/// workers, releases the interfaces and gives the state, which goes out on `stream`.
fn handover(mut stream: UnixStream, shared: &Shared, version: u32) -> io::Result<()> {
    if version != crate::handover::VERSION {
        log::warn!(
            "refusing a handover to version {version} (this is {}); still forwarding",
            crate::handover::VERSION
        );
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: format!(
                    "handover version {version}, the running dataplane speaks {}; it keeps running",
                    crate::handover::VERSION
                ),
            },
        );
    }
    let main = shared
        .handover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(main) = main else {
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: "this dataplane cannot hand over (no main loop)".into(),
            },
        );
    };
    let answer = stream.try_clone()?;
    if let Err(e) = main.send(answer) {
        let mut answer = e.0;
        return wire::write_message(
            &mut answer,
            &Message::Refused {
                reason: "the dataplane is already handing over".into(),
            },
        );
    }
    Ok(())
}

/// Streams flow events to a `kxdp monitor` every 50 ms until it hangs up (a write fails).
fn monitor(
    mut stream: UnixStream,
    shared: &Shared,
    addr: Option<std::net::IpAddr>,
    port: Option<u16>,
    drops_only: bool,
) -> io::Result<()> {
    if !shared.monitor.subscribe() {
        return wire::write_message(
            &mut stream,
            &Message::Refused {
                reason: "another kxdp monitor is watching; one at a time".into(),
            },
        );
    }
    struct Unsubscribe<'a>(&'a Shared);
    impl Drop for Unsubscribe<'_> {
        fn drop(&mut self) {
            self.0.monitor.unsubscribe();
        }
    }
    let _watching = Unsubscribe(shared);
    let keep = |e: &nat::wire::FlowEvent| {
        let ends = [Some(e.src), Some(e.dst), e.to, e.masquerade];
        let by_addr = addr.is_none_or(|a| ends.iter().flatten().any(|x| x.0 == a));
        let by_port = port.is_none_or(|p| ends.iter().flatten().any(|x| x.1 == p));
        let kind = !drops_only
            || matches!(
                e.kind,
                nat::wire::EventKind::Drop | nat::wire::EventKind::PolicyDenied
            );
        by_addr && by_port && kind
    };
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (events, lost) = shared.monitor.drain(crate::monitor::RING * 4);
        let events: Vec<_> = events.into_iter().filter(keep).collect();
        // An empty batch too: it is how a reader that went away is noticed.
        wire::write_message(&mut stream, &Message::FlowEvents { events, lost })?;
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

/// Acts on one message and returns the answer (stale flows retired before it, when a
/// table was installed).
pub fn handle(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    let (answer, retire) = handle_table_or(msg, shared, epoch);
    if retire {
        shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
    }
    answer
}

/// The answer to a message that is not a table (tables go to [`handle_table_or`]).
fn answer_query(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    match msg {
        Message::GetStats => Message::Stats {
            generation: shared.tables.load().generation,
            conntrack: shared.conntrack.len(),
            conntrack_capacity: shared.conntrack.capacity(),
            workers: shared.counters.iter().map(|p| p.read().named()).collect(),
            policy_drops: shared.policy_drop_counts(),
            refused_tables: shared
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
        },
        Message::ExplainPolicy {
            src,
            dst,
            protocol,
            port,
        } => {
            match crate::inspect::explain_policy(&shared.tables.load(), src, dst, protocol, port) {
                Ok(paths) => Message::PolicyExplained { paths },
                Err(e) => Message::Refused {
                    reason: e.to_string(),
                },
            }
        }
        Message::GetServices => {
            let tables = shared.tables.load();
            Message::Services {
                generation: tables.generation,
                services: crate::inspect::services(&tables),
            }
        }
        Message::GetConntrack {
            addr,
            port,
            protocol,
            limit,
        } => {
            let now = epoch.elapsed().as_nanos() as u64;
            let (total, matched, entries) = crate::inspect::conntrack(
                &shared.tables.load(),
                &shared.conntrack,
                now,
                addr,
                port,
                protocol,
                limit,
            );
            Message::Conntrack {
                total,
                matched,
                entries,
            }
        }
        other => Message::Refused {
            reason: format!("unexpected message {other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Limits, PortConfig, PortRole};

    /// Sends a snapshot of `generation` on `s` and returns the answer.
    fn send_snapshot(s: &mut UnixStream, generation: u64) -> Message {
        wire::write_message(
            s,
            &Message::Snapshot {
                generation,
                tables: Box::default(),
            },
        )
        .unwrap();
        wire::read_message(s).unwrap()
    }

    #[test]
    fn one_control_programs_the_tables_and_a_second_is_told_busy() {
        let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
        let dir = std::env::temp_dir().join(format!("kxdp-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dataplane.sock");
        serve(&path, shared.clone(), Instant::now()).unwrap();
        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(
            send_snapshot(&mut first, 1),
            Message::Applied { generation: 1 }
        );
        // Inspection on another connection is not programming: answered as always.
        let mut cli = UnixStream::connect(&path).unwrap();
        wire::write_message(&mut cli, &Message::GetStats).unwrap();
        assert!(matches!(
            wire::read_message(&mut cli).unwrap(),
            Message::Stats { generation: 1, .. }
        ));
        // A second control is refused (after waiting for the first to go) and closed.
        let mut second = UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        let Message::Busy { reason } = send_snapshot(&mut second, 7) else {
            panic!("a second writer was not told busy");
        };
        assert!(started.elapsed() >= WRITER_WAIT, "{:?}", started.elapsed());
        assert!(reason.contains("another kxdp-control"), "{reason}");
        assert!(
            wire::read_message(&mut second).is_err(),
            "the busy connection is closed"
        );
        assert_eq!(shared.tables.load().generation, 1, "nothing changed");
        // The first one keeps programming.
        assert_eq!(
            send_snapshot(&mut first, 2),
            Message::Applied { generation: 2 }
        );
        // A replacement that connects while its predecessor is still going away waits
        // for it, then takes over.
        let mut third = UnixStream::connect(&path).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(WRITER_WAIT / 4);
            drop(first);
        });
        assert_eq!(
            send_snapshot(&mut third, 1),
            Message::Applied { generation: 1 }
        );
        closer.join().unwrap();
        assert_eq!(shared.tables.load().generation, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_table_that_fails_validation_is_refused_counted_and_changes_nothing() {
        let shared = Shared::new(
            vec![PortConfig {
                name: "up".into(),
                role: PortRole::Uplink,
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
            }],
            1,
            Limits {
                conntrack_capacity: 64,
                affinity_capacity: 16,
                ..Limits::default()
            },
        );
        let epoch = Instant::now();
        let good = nat::spec::TableSpec::default();
        let answer = handle(
            Message::Snapshot {
                generation: 1,
                tables: Box::new(good.clone()),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 1 });
        let mut bad = good;
        bad.cluster.vxlan_vni = 1 << 30;
        let answer = handle(
            Message::Snapshot {
                generation: 2,
                tables: Box::new(bad),
            },
            &shared,
            epoch,
        );
        let Message::Refused { reason } = answer else {
            panic!("{answer:?}");
        };
        assert!(
            reason.contains("generation 2") && reason.contains("VNI"),
            "{reason}"
        );
        assert_eq!(shared.tables.load().generation, 1, "the tables in use stay");
        assert_eq!(
            shared
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    fn one_service(
        name: &str,
        ip: &str,
        endpoints: &[&str],
    ) -> std::sync::Arc<nat::spec::ServiceSpec> {
        use nat::spec::*;
        let eps: Vec<EndpointSpec> = endpoints
            .iter()
            .map(|e| EndpointSpec {
                ip: e.parse().unwrap(),
                port: 8080,
                local: false,
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect();
        std::sync::Arc::new(ServiceSpec {
            name: name.into(),
            protocol: Protocol::Udp,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: ip.parse().unwrap(),
                port: 53,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        })
    }

    #[test]
    fn deltas_apply_to_their_base_only_and_a_bad_one_changes_nothing() {
        use nat::spec::{TableDelta, TableSpec};
        let shared = Shared::new(
            vec![],
            1,
            Limits {
                conntrack_capacity: 64,
                affinity_capacity: 16,
                ..Limits::default()
            },
        );
        let epoch = Instant::now();
        // A snapshot in any order is put in canonical order.
        let first = TableSpec {
            services: vec![
                one_service("ns/b:dns", "172.30.0.2", &["10.244.1.2"]),
                one_service("ns/a:dns", "172.30.0.1", &["10.244.1.1"]),
            ],
            ..TableSpec::default()
        };
        let answer = handle(
            Message::Snapshot {
                generation: 1,
                tables: Box::new(first),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 1 });
        let before = shared.tables.load_full();
        assert_eq!(before.spec.services[0].name, "ns/a:dns");
        let mut next = before.spec.clone();
        next.services[1] = one_service("ns/b:dns", "172.30.0.2", &["10.244.1.2", "10.244.1.3"]);
        let delta = TableDelta::between(&before.spec, &next);
        assert_eq!(delta.upserted.len(), 1);
        let stale = handle(
            Message::Delta {
                generation: 3,
                base: 2,
                delta: Box::new(delta.clone()),
            },
            &shared,
            epoch,
        );
        assert_eq!(stale, Message::NeedSnapshot { have: 1 });
        let answer = handle(
            Message::Delta {
                generation: 2,
                base: 1,
                delta: Box::new(delta),
            },
            &shared,
            epoch,
        );
        assert_eq!(answer, Message::Applied { generation: 2 });
        let after = shared.tables.load_full();
        assert_eq!(after.spec, next);
        let b = after
            .services
            .frontend(&nat::tables::FrontendKey {
                ip: "172.30.0.2".parse().unwrap(),
                port: 53,
                protocol: nat::spec::Protocol::Udp,
            })
            .and_then(|f| after.services.service(f.service))
            .expect("ns/b");
        assert_eq!(b.cluster.backends.len(), 2);
        // The untouched Service port is the same compiled one.
        assert_eq!(before.services.ids()[0], after.services.ids()[0]);
        // Removing what is not there is refused, counted, and changes nothing.
        let bad = TableDelta {
            removed: vec![nat::spec::ServiceKey {
                name: "ns/zzz:dns".into(),
                protocol: nat::spec::Protocol::Udp,
                ipv6: false,
            }],
            ..TableDelta::default()
        };
        let answer = handle(
            Message::Delta {
                generation: 3,
                base: 2,
                delta: Box::new(bad),
            },
            &shared,
            epoch,
        );
        assert!(
            matches!(&answer, Message::Refused { reason } if reason.contains("ns/zzz:dns")),
            "{answer:?}"
        );
        assert_eq!(shared.tables.load().generation, 2);
        assert_eq!(
            shared
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
