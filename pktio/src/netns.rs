//! Network namespaces for tests and the lab: a named namespace that is deleted when its guard
//! drops, and moving a thread into one.
//!
//! Namespaces are made and deleted with iproute2 (`ip netns`), so they appear under
//! `/var/run/netns` like any other and `ip -n NAME` works on them. A namespace only changes
//! the calling *thread*: interface lookups, sockets and XDP attachments made by a thread
//! that entered one happen there; other threads stay where they were.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Counter making names unique within a process (the pid makes them unique across).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `<prefix>-<pid>-<counter>`, deleted (with every interface in it)
/// when the guard drops, including during a panic's unwinding.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// Creates a fresh namespace (`ip netns add`). Needs root.
    pub fn new(prefix: &str) -> io::Result<NetnsGuard> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["netns", "add", &name])?;
        Ok(NetnsGuard { name })
    }

    /// The namespace's name, for `ip -n`, `ip netns exec` and [`enter_thread`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> ARGS…` and returns its standard output; an error carries `ip`'s
    /// standard error.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = run(&["netns", "del", &self.name]) {
            log::warn!("delete network namespace {}: {e}", self.name);
        }
    }
}

fn run(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("run ip {}: {e} (is iproute2 installed?)", args.join(" ")),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into network namespace `name` (`/var/run/netns/<name>`). The
/// thread stays there until it ends or enters another; `/sys` still shows the namespace it
/// was mounted in.
pub fn enter_thread(name: &str) -> io::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let ns =
        File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    // SAFETY: `ns` is an open namespace file for the duration of the call, and CLONE_NEWNET
    // makes the kernel check it is a network namespace; setns changes only this thread's
    // namespace, which no Rust value depends on.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns {path}: {e}")));
    }
    Ok(())
}

/// Runs `f` on a thread of its own inside `ns` (setns changes only the calling thread) and
/// returns its result. Sockets made there stay in `ns` wherever they are used later. A
/// panic in `f` is resumed on the caller after the thread ends, so a test fails before its
/// namespace guard deletes the namespace.
pub fn in_ns<T: Send>(ns: &NetnsGuard, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_thread(ns.name()).expect("enter the namespace");
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
