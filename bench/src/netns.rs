//! Network namespaces for benchmarks and tests: pktio's [`NetnsGuard`] (deleted on drop,
//! also while a panic unwinds), veth pairs whose two ends both live in namespaces this
//! process made, running a closure on a thread inside a namespace, and running a command
//! inside one.
//!
//! Nothing here touches the root namespace: a veth is created inside its first namespace
//! (`ip -n A link add … peer … netns B`), and commands run under `ip netns exec`.

use std::io::Write as _;
use std::process::{Child, Command, ExitStatus, Stdio};

pub use pktio::netns::{enter_thread, is_root, NetnsGuard};

/// Why a command in a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The program could not be started.
    #[error(
        "run `{command}`: {err} (is it installed? scripts/deps.sh installs what the bench needs)"
    )]
    Spawn {
        /// The command line.
        command: String,
        /// What the OS said.
        err: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on standard error.
        stderr: String,
    },
}

/// Runs `program args…` inside namespace `ns` (`ip netns exec`), feeding `stdin` if given,
/// and returns its standard output.
pub fn exec(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, NetnsError> {
    let (mut child, command) = spawn(ns, program, args, stdin.is_some())?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits early closes its end; its exit status says why.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output().map_err(|err| NetnsError::Spawn {
        command: command.clone(),
        err,
    })?;
    output(command, out.status, &out.stdout, &out.stderr)
}

/// Starts `program args…` under `ip netns exec ns` with standard output and error piped,
/// and standard input piped if `stdin` (else empty). Returns the child and the command
/// line errors name.
fn spawn(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: bool,
) -> Result<(Child, String), NetnsError> {
    let command = format!("ip netns exec {ns} {program} {}", args.join(" "));
    let child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| NetnsError::Spawn {
            command: command.clone(),
            err,
        })?;
    Ok((child, command))
}

/// A finished command's standard output, or [`NetnsError::Failed`] with its standard
/// error if it did not succeed.
fn output(
    command: String,
    status: ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<String, NetnsError> {
    if !status.success() {
        return Err(NetnsError::Failed {
            command,
            status,
            stderr: String::from_utf8_lossy(stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(stdout).into_owned())
}

/// How a bounded command ended.
#[derive(Debug)]
pub enum Bounded {
    /// It finished successfully, with this standard output, after this long.
    Done(String, std::time::Duration),
    /// It was still running at the limit and was killed (by its PID).
    TimedOut(std::time::Duration),
}

/// [`exec`] with a time limit: a command still running after `limit` is killed (SIGKILL to
/// its PID, which is the program's: `ip netns exec` execs it) and reported as timed out.
/// Standard input is fed and standard output read on threads of their own, so a large
/// ruleset cannot deadlock the pipes.
pub fn exec_bounded(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: std::time::Duration,
) -> Result<Bounded, NetnsError> {
    use std::io::Read as _;
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let (mut child, command) = spawn(ns, program, args, stdin.is_some())?;
    let pipe_in = child.stdin.take();
    let mut pipe_out = child.stdout.take();
    let mut pipe_err = child.stderr.take();
    let (status, out, err) = std::thread::scope(|s| {
        if let (Some(input), Some(mut pipe)) = (stdin, pipe_in) {
            // A program that exits early (or is killed) closes its end; the status says why.
            s.spawn(move || {
                let _ = pipe.write_all(input);
            });
        }
        let out = s.spawn(move || {
            let mut b = Vec::new();
            if let Some(p) = pipe_out.as_mut() {
                let _ = p.read_to_end(&mut b);
            }
            b
        });
        let err = s.spawn(move || {
            let mut b = Vec::new();
            if let Some(p) = pipe_err.as_mut() {
                let _ = p.read_to_end(&mut b);
            }
            b
        });
        let deadline = started + limit;
        // Bound: `limit`, then the kill.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        (
            status,
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        )
    });
    let took = started.elapsed();
    match status {
        None => Ok(Bounded::TimedOut(took)),
        Some(st) => output(command, st, &out, &err).map(|out| Bounded::Done(out, took)),
    }
}

/// Sets a sysctl inside `ns` (`ip netns exec NS sysctl -qw KEY=VALUE`).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    exec(ns, "sysctl", &["-qw", &format!("{key}={value}")], None).map(|_| ())
}

/// One end of a veth pair.
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    /// Namespace it lives in.
    pub ns: &'a NetnsGuard,
    /// Interface name there.
    pub name: &'a str,
    /// MAC address to give it (locally administered), so frames can be addressed without
    /// asking the kernel.
    pub mac: [u8; 6],
}

/// Formats a MAC address the way `ip` takes it.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Creates a veth pair from `a` to `b` (created in `a.ns`, the peer moved straight into
/// `b.ns`), sets both MACs and brings both ends and both namespaces' loopbacks up.
pub fn veth(a: VethEnd<'_>, b: VethEnd<'_>) -> std::io::Result<()> {
    let (amac, bmac) = (mac_string(a.mac), mac_string(b.mac));
    a.ns.ip(&[
        "link",
        "add",
        a.name,
        "address",
        &amac,
        "type",
        "veth",
        "peer",
        "name",
        b.name,
        "address",
        &bmac,
        "netns",
        b.ns.name(),
    ])?;
    for end in [a, b] {
        end.ns.ip(&["link", "set", "dev", end.name, "up"])?;
        end.ns.ip(&["link", "set", "dev", "lo", "up"])?;
    }
    Ok(())
}

/// Runs `f` on a new thread inside `ns` and returns its result; a panic in `f` is passed on
/// after the thread ends.
pub fn in_ns<T: Send>(ns: &NetnsGuard, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_thread(ns.name())
                .unwrap_or_else(|e| panic!("enter network namespace {}: {e}", ns.name()));
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
