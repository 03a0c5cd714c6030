//! The `kxdp-control` binary's failures: `--once` stops at once on an error that waiting
//! does not mend, and errors are one clean line unless `--verbose` asks for more.
//!
//! The permission tests run the binary as `nobody` (uid 65534), which needs root; without
//! it they say so and pass. Every run is bounded: a binary still running after
//! [`LIMIT`] is killed and the test fails. Files live in a temporary directory removed at
//! the end.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a run may take: `--once` that fails "at once" fails within this.
const LIMIT: Duration = Duration::from_secs(10);

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
