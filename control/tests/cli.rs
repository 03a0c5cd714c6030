//! The `kxdp-control` binary's failures: `--once` stops at once on an error that waiting
//! does not mend, and errors are one clean line unless `--verbose` asks for more.
//!
//! The permission tests run the binary as `nobody` (uid 65534), which needs root; without
//! it they say so and pass. Every run is bounded: a binary still running after
//! [`LIMIT`] is killed and the test fails. Files live in a temporary directory removed at
//! the end.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a run may take: `--once` that fails "at once" fails within this.
const LIMIT: Duration = Duration::from_secs(10);

/// The user the permission tests run as.
const NOBODY: u32 = 65534;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kxdp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Runs kxdp-control with `args` (as `uid` if given): exit success, stderr. Panics if it
/// is still running after [`LIMIT`] (after killing it).
fn run(args: &[&str], uid: Option<u32>, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kxdp-control"));
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().expect("start kxdp-control");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err);
            panic!("kxdp-control {args:?} still running after {LIMIT:?}:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status.success(), err)
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";

fn manifests(dir: &Path) -> PathBuf {
    let m = dir.join("manifests");
    std::fs::create_dir(&m).expect("mkdir");
    std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let node = m.join("node.yaml");
    std::fs::write(&node, NODE).expect("write");
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    m
}

#[test]
fn once_fails_at_once_when_the_socket_refuses_permission() {
    if !is_root() {
        eprintln!("skipped: needs root to run kxdp-control as nobody");
        return;
    }
    let dir = temp_dir("socket-permission");
    let m = manifests(&dir);
    // A dataplane's socket that only root may connect to.
    let socket = dir.join("dataplane.sock");
    let _listener = UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (ok, err) = run(
        &[
            "--manifests",
            m.to_str().expect("path"),
            "--node",
            "node-a",
            "--socket",
            socket.to_str().expect("path"),
            "--once",
        ],
        Some(NOBODY),
        &[],
    );
    assert!(!ok, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kxdp-control: control socket ")
            && last.contains("cannot connect: Permission denied"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn once_fails_at_once_when_a_manifest_cannot_be_read() {
    if !is_root() {
        eprintln!("skipped: needs root to run kxdp-control as nobody");
        return;
    }
    let dir = temp_dir("file-permission");
    let m = manifests(&dir);
    let secret = m.join("web.yaml");
    std::fs::write(
        &secret,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    )
    .expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // No dataplane at all: without the check, --once would wait for one forever.
    let socket = dir.join("absent.sock");
    let (ok, err) = run(
        &[
            "--manifests",
            m.to_str().expect("path"),
            "--node",
            "node-a",
            "--socket",
            socket.to_str().expect("path"),
            "--once",
        ],
        Some(NOBODY),
        &[],
    );
    assert!(!ok, "{err}");
    assert_eq!(
        err.lines().last().unwrap_or_default(),
        "kxdp-control: --once: web.yaml: cannot read it: Permission denied (os error 13)",
        "{err}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn an_error_is_one_line_with_its_causes_even_with_rust_backtrace_set() {
    let args = [
        "--manifests",
        "/nonexistent",
        "--node",
        "node-a",
        "--healthz-bind-address",
        "nowhere",
    ];
    let (ok, err) = run(&args, None, &[("RUST_BACKTRACE", "1")]);
    assert!(!ok);
    assert_eq!(
        err,
        "kxdp-control: --healthz-bind-address \"nowhere\": write IP:PORT (e.g. 0.0.0.0:10256), or \"\" to turn it off: invalid socket address syntax\n"
    );
    // Asked for more: the causes one per line, and the backtrace RUST_BACKTRACE wants.
    let mut verbose = args.to_vec();
    verbose.push("--verbose");
    let (ok, err) = run(&verbose, None, &[("RUST_BACKTRACE", "1")]);
    assert!(!ok);
    assert!(err.contains("Caused by:"), "{err}");
    assert!(err.contains("backtrace"), "{err}");
}

/// The uplink flags: the CNI config needs the uplink (for the pods' MTU), and an uplink
/// that is not there stops kxdp-control at once with a line that names it, before any
/// request to the API server.
#[test]
fn an_unreadable_uplink_is_a_clear_error() {
    let (ok, err) = run(&["--cni-conf-dir", "/tmp", "--node", "n"], None, &[]);
    assert!(!ok);
    assert!(err.contains("--uplink"), "{err}");
    let (ok, err) = run(
        &[
            "--uplink",
            "kxdpnosuch0",
            "--cni-conf-dir",
            "/tmp",
            "--node",
            "n",
            "--master",
            "http://127.0.0.1:1",
        ],
        None,
        &[],
    );
    assert!(!ok);
    assert!(
        err.starts_with(
            "kxdp-control: --uplink kxdpnosuch0: cannot read /sys/class/net/kxdpnosuch0/address"
        ),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
