//! The `kxdp` binary against a stand-in dataplane (issue 16, items 3, 10, 12 and 15): a
//! Unix socket in a temporary directory answered by the dataplane's own request handler
//! (`dataplane::server::handle`) over tables control computed. No root, no interfaces.
//!
//! - `kxdp services` shows, under the Service that holds a ClusterIP:port, the younger
//!   Service refused it (item 3).
//! - A closed stdout (`kxdp services | head -1`) ends kxdp quietly, not with a panic
//!   (item 10).
//! - `kxdp policy explain` with an IPv4 source and an IPv6 destination is an error, in kxdp
//!   and in the dataplane, which any client can ask (item 12).
//! - An error is one line with its causes, without a backtrace even under
//!   `RUST_BACKTRACE=1`; `--verbose` gives the full form (item 15).
//! - `kxdp` is inspection and operation only: its `--help` lists no lab command, and
//!   `kxdp-lab --help` lists them all (issue 18).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::state::{Limits, Shared};
use nat::spec::{ClusterSpec, FrontendKind, FrontendSpec, Protocol, ServiceSpec, TableSpec};
use nat::wire::{self, Message};

/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(20);

fn kxdp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kxdp"));
    c.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null());
    c
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kxdp-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("dataplane.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dataplane without interfaces holding `tables`, answering requests on `socket` with
/// its own handler, one thread per connection. The thread lives until the test process
/// ends.
fn stand_in(socket: &Path, tables: TableSpec) -> Arc<Shared> {
    let shared = Arc::new(Shared::new(
        Vec::new(),
        1,
        Limits {
            conntrack_capacity: 64,
            affinity_capacity: 16,
            ..Limits::default()
        },
    ));
    let epoch = Instant::now();
    let answer = dataplane::server::handle(
        Message::Snapshot {
            generation: 1,
            tables: Box::new(tables),
        },
        &shared,
        epoch,
    );
    assert_eq!(answer, Message::Applied { generation: 1 });
    let listener = UnixListener::bind(socket).expect("bind the socket");
    let serving = shared.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let shared = serving.clone();
            std::thread::spawn(move || {
                while let Ok(msg) = wire::read_message(&mut conn) {
                    let answer = dataplane::server::handle(msg, &shared, epoch);
                    if wire::write_message(&mut conn, &answer).is_err() {
                        break;
                    }
                }
            });
        }
    });
    shared
}

/// Waits for `child` at most [`TIMEOUT`]; ends it (by its PID) if it does not end.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kxdp did not end within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn run(cmd: &mut Command) -> Output {
    finish(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kxdp"),
    )
}

/// Two Services on one ClusterIP:port, the younger's name sorting first, as control
/// computes them.
fn conflicting_tables() -> TableSpec {
    let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {clusterIP: 172.30.0.41, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: a-newcomer, namespace: default, creationTimestamp: "2024-06-01T00:00:00Z"}
spec: {type: NodePort, clusterIP: 172.30.0.41, ports: [{name: http, port: 80, nodePort: 30080}]}
"#;
    let mut objects = control::Objects::new();
    let mut errors = Vec::new();
    control::load_text(&mut objects, "test.yaml", yaml, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    control::compute_with_warnings(&objects, "node-a", &ClusterSpec::default())
        .expect("tables")
        .tables
}

#[test]
fn services_shows_what_an_older_service_holds_against_a_newcomer() {
    let dir = TempDir::new("conflict");
    stand_in(&dir.socket(), conflicting_tables());
    let out = run(kxdp().args(["services", "--socket"]).arg(dir.socket()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    let web = lines
        .iter()
        .position(|l| l.starts_with("default/web:http "))
        .unwrap_or_else(|| panic!("no default/web:http in\n{stdout}"));
    let block: Vec<&str> = lines[web + 1..]
        .iter()
        .take_while(|l| l.starts_with(' '))
        .copied()
        .collect();
    assert!(block.contains(&"  -> ClusterIp 172.30.0.41:80"), "{stdout}");
    assert!(
        block.contains(
            &"  !! refused to default/a-newcomer:http ClusterIp 172.30.0.41:80 (this Service is older)"
        ),
        "{stdout}"
    );
    // The newcomer keeps its NodePort only.
    let newcomer = lines
        .iter()
        .position(|l| l.starts_with("default/a-newcomer:http "))
        .unwrap_or_else(|| panic!("no default/a-newcomer:http in\n{stdout}"));
    assert_eq!(
        lines[newcomer + 1],
        "  -> NodePort 192.168.0.2:30080",
        "{stdout}"
    );
    assert!(!lines[newcomer + 2].starts_with("  ->"), "{stdout}");

    let out = run(kxdp()
        .args(["services", "-o", "json", "--socket"])
        .arg(dir.socket()));
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let web = v
        .as_array()
        .expect("a list")
        .iter()
        .find(|s| s["name"] == "default/web:http")
        .expect("web");
    assert_eq!(
        web["refused"],
        serde_json::json!(["default/a-newcomer:http ClusterIp 172.30.0.41:80"])
    );
}

/// Many Service ports: more output than a pipe holds, so kxdp is still writing when the
/// reader goes.
fn many_services() -> TableSpec {
    let mut t = TableSpec::default();
    for i in 0..4000u32 {
        t.services.push(Arc::new(ServiceSpec {
            name: format!("ns/svc-{i:05}:http"),
            protocol: Protocol::Tcp,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: std::net::Ipv4Addr::from(0xac1e_0000 + i).into(),
                port: 80,
            }],
            ..ServiceSpec::default()
        }));
    }
    t
}

#[test]
fn a_closed_stdout_ends_kxdp_quietly() {
    let dir = TempDir::new("pipe");
    stand_in(&dir.socket(), many_services());
    for format in ["table", "json"] {
        let mut child = kxdp()
            .env("RUST_BACKTRACE", "1")
            .args(["services", "-o", format, "--socket"])
            .arg(dir.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kxdp");
        // `| head -1`: one line, then the reader goes.
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("read a line");
        assert!(!first.is_empty(), "{format}: no output");
        let out = finish(child);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{format}: {:?}, stderr:\n{stderr}",
            out.status
        );
    }
}

#[test]
fn policy_explain_refuses_mixed_families() {
    let dir = TempDir::new("explain");
    let shared = stand_in(&dir.socket(), conflicting_tables());
    // kxdp says so without asking.
    let out = run(kxdp()
        .args([
            "policy",
            "explain",
            "10.244.1.2",
            "fd00::1",
            "80",
            "--socket",
        ])
        .arg(dir.socket()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        stderr.contains("different IP families") && !stderr.contains("ALLOWED"),
        "{stderr}"
    );
    // The dataplane refuses any client that asks, both ways round.
    for (src, dst) in [("10.244.1.2", "fd00::1"), ("fd00::1", "172.30.0.41")] {
        let answer = dataplane::server::handle(
            Message::ExplainPolicy {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                protocol: Some(Protocol::Tcp),
                port: 80,
            },
            &shared,
            Instant::now(),
        );
        assert!(
            matches!(&answer, Message::Refused { reason } if reason.contains("different IP families")),
            "{src} -> {dst}: {answer:?}"
        );
    }
    // One family is still explained, through the Service to its endpoint.
    let out = run(kxdp()
        .args([
            "policy",
            "explain",
            "10.244.1.2",
            "172.30.0.41",
            "80",
            "--socket",
        ])
        .arg(dir.socket()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("10.244.1.5:8080 via default/web:http") && stdout.contains("ALLOWED"),
        "{stdout}"
    );
}

#[test]
fn errors_are_one_line_without_a_backtrace_unless_verbose() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("nobody.sock");
    let out = run(kxdp()
        .env("RUST_BACKTRACE", "1")
        .args(["services", "--socket"])
        .arg(&missing));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: connect to {} (is kxdp-dataplane running?): No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");

    let out = run(kxdp().args(["services", "-v", "--socket"]).arg(&missing));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Caused by:"), "{stderr}");
}

#[test]
fn kxdp_dataplane_errors_are_one_line_without_a_backtrace_unless_verbose() {
    let dir = TempDir::new("dp-errors");
    let dataplane = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kxdp-dataplane"));
        c.env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "off")
            .args(["--pods", "kxdp-no-such-if0", "--socket"])
            .arg(dir.0.join("dp.sock"))
            .stdin(Stdio::null());
        c
    };
    let out = run(&mut dataplane());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("kxdp-dataplane: read /sys/class/net/kxdp-no-such-if0/address"),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let out = run(dataplane().arg("--verbose"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Caused by:"), "{stderr}");
}

/// The subcommands a `--help` lists (the first word of each line under `Commands:`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The lab's commands, which moved from `kxdp` to `kxdp-lab` (issue 18).
const LAB_COMMANDS: [&str; 9] = [
    "up", "down", "status", "echo", "call", "hold", "blast", "flood", "demo",
];

#[test]
fn kxdp_lists_no_lab_command_and_kxdp_lab_lists_them_all() {
    let out = run(kxdp().arg("--help"));
    assert!(out.status.success());
    let kxdp_commands = subcommands(&String::from_utf8_lossy(&out.stdout));
    for c in ["stats", "monitor", "services", "conntrack", "policy"] {
        assert!(
            kxdp_commands.iter().any(|k| k == c),
            "kxdp --help lacks {c}: {kxdp_commands:?}"
        );
    }
    for c in LAB_COMMANDS.iter().chain(&["lab"]) {
        assert!(
            !kxdp_commands.iter().any(|k| k == c),
            "kxdp --help lists the lab command {c}: {kxdp_commands:?}"
        );
    }

    // Built by `cargo build --workspace --bins` (scripts/test.sh), beside kxdp.
    let lab = Path::new(env!("CARGO_BIN_EXE_kxdp")).with_file_name("kxdp-lab");
    assert!(
        lab.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        lab.display()
    );
    let out = run(Command::new(&lab).arg("--help").stdin(Stdio::null()));
    assert!(out.status.success());
    let lab_commands = subcommands(&String::from_utf8_lossy(&out.stdout));
    for c in LAB_COMMANDS {
        assert!(
            lab_commands.iter().any(|k| k == c),
            "kxdp-lab --help lacks {c}: {lab_commands:?}"
        );
    }
}
