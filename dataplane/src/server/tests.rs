use super::*;
use crate::ports::{PortConfig, PortRole};
use crate::state::Limits;

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

/// A socket path in a fresh folder of its own.
fn socket_path(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kxdp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.join("dataplane.sock")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `frames` through the socket at `path` as user and group 65534 (nobody), one
/// after the other, and returns the answers.
fn as_nobody(path: &Path, frames: &[Message]) -> Vec<Message> {
    use std::os::unix::process::CommandExt;
    let hex: Vec<String> = frames
        .iter()
        .map(|m| wire::encode(m).iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    // Frame by frame: write one, read its answer (header, then the announced length).
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def exact(n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit('closed')
        b += c
    return b
for frame in sys.argv[2:]:
    s.sendall(bytes.fromhex(frame))
    head = exact(12)
    print((head + exact(struct.unpack('>I', head[8:12])[0])).hex())
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .args(&hex)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let bytes: Vec<u8> = (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect();
            wire::read_message(&mut &bytes[..]).unwrap()
        })
        .collect()
}

#[test]
fn a_member_of_the_socket_group_may_inspect_but_neither_program_nor_hand_over() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run a client as another user");
        return;
    }
    let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
    // What a handover request would reach: the main thread, which stops forwarding.
    let (to_main, at_main) = std::sync::mpsc::channel();
    let server = Arc::new(ServerState::new(Access {
        group: Some(65534),
        control_uid: None,
    }));
    server.set_handover(to_main);
    let path = socket_path("group");
    serve_with(&path, shared.clone(), Instant::now(), server).unwrap();
    let answers = as_nobody(
        &path,
        &[
            Message::GetStats,
            Message::Snapshot {
                generation: 5,
                tables: Box::default(),
            },
            Message::Handover {
                version: crate::handover::VERSION,
            },
            Message::GetServices,
        ],
    );
    assert!(matches!(answers[0], Message::Stats { .. }), "{answers:?}");
    assert!(
        matches!(&answers[1], Message::Refused { reason } if reason.contains("not program")),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[2], Message::Refused { reason } if reason.contains("only root")),
        "{answers:?}"
    );
    assert!(
        matches!(answers[3], Message::Services { .. }),
        "{answers:?}"
    );
    assert!(
        at_main.try_recv().is_err(),
        "a group member's handover request reached the main thread"
    );
    assert_eq!(shared.tables.load().generation, 0, "nothing was programmed");

    // kxdp-control's own user programs.
    let path = socket_path("control-user");
    let server = ServerState::new(Access {
        group: Some(65534),
        control_uid: Some(65534),
    });
    serve_with(&path, shared.clone(), Instant::now(), Arc::new(server)).unwrap();
    let answers = as_nobody(
        &path,
        &[Message::Snapshot {
            generation: 5,
            tables: Box::default(),
        }],
    );
    assert_eq!(answers, vec![Message::Applied { generation: 5 }]);
    assert!(at_main.try_recv().is_err());
}

#[test]
fn a_second_dataplane_on_a_live_socket_is_refused_and_a_stale_file_replaced() {
    let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
    let path = socket_path("live");
    // A file nobody listens on (a dataplane killed with -9 leaves one).
    drop(UnixListener::bind(&path).unwrap());
    assert_eq!(live_dataplane(&path).unwrap(), None);
    serve(&path, shared.clone(), Instant::now()).unwrap();
    assert_eq!(
        live_dataplane(&path).unwrap(),
        Some(std::process::id() as i32)
    );
    let second = serve(&path, shared.clone(), Instant::now()).unwrap_err();
    assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
    assert!(
        second
            .to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{second}"
    );
    // The first still answers on its path.
    let mut s = UnixStream::connect(&path).unwrap();
    wire::write_message(&mut s, &Message::GetStats).unwrap();
    assert!(matches!(
        wire::read_message(&mut s).unwrap(),
        Message::Stats { .. }
    ));
}

#[test]
fn connections_beyond_the_cap_are_refused_and_a_freed_slot_is_reused() {
    let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
    let path = socket_path("cap");
    serve(&path, shared, Instant::now()).unwrap();
    let mut idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    let mut over = UnixStream::connect(&path).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(wire::read_message(&mut over), Ok(Message::Refused { reason }) if reason.contains("too many")),
        "connection {} was served",
        MAX_CONNECTIONS + 1
    );
    // One goes: its slot is free again (once the server has read the hang-up).
    idle.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A refused connection may be closed before the request is written.
        let answer = wire::write_message(&mut s, &Message::GetStats)
            .and_then(|()| wire::read_message(&mut s));
        match answer {
            Ok(Message::Stats { .. }) => break,
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_half_sent_frame_is_cut_off_after_the_deadline() {
    let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
    let path = socket_path("half");
    serve(&path, shared, Instant::now()).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    let frame = wire::encode(&Message::GetStats);
    io::Write::write_all(&mut s, &frame[..5]).unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(FRAME_DEADLINE * 3)).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).expect("closed, not timed out");
    assert_eq!(n, 0, "the server answered a half frame");
    let waited = started.elapsed();
    assert!(
        waited >= FRAME_DEADLINE / 2 && waited < FRAME_DEADLINE * 2,
        "{waited:?}"
    );
}

#[test]
fn a_monitor_started_right_after_another_ended_is_served() {
    let shared = Arc::new(Shared::new(vec![], 1, Limits::default()));
    let path = socket_path("monitor");
    serve(&path, shared, Instant::now()).unwrap();
    let watch = || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        wire::write_message(
            &mut s,
            &Message::Monitor {
                addr: None,
                port: None,
                drops_only: false,
            },
        )
        .unwrap();
        let first = wire::read_message(&mut s).unwrap();
        (s, first)
    };
    for round in 0..10 {
        let (first, answer) = watch();
        assert!(matches!(answer, Message::FlowEvents { .. }), "{answer:?}");
        drop(first);
        let (_second, answer) = watch();
        assert!(
            matches!(answer, Message::FlowEvents { .. }),
            "round {round}: {answer:?}"
        );
    }
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
            .installs
            .refused_tables
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

fn one_service(name: &str, ip: &str, endpoints: &[&str]) -> std::sync::Arc<nat::spec::ServiceSpec> {
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
            .installs
            .refused_tables
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
