//! Work inside the pod's network namespace: a thread of its own enters it (`setns` changes
//! only the calling thread's namespace), does the work with sockets it opens there, and
//! ends; the rest of the process stays in the node's namespace.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// The namespace file of `CNI_NETNS`, open. `NotFound` when the namespace is gone.
pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Runs `work` on a new thread that has entered the namespace `ns`, and returns what it
/// returned. A panic inside `work` comes back as an error, not as this thread's panic.
pub fn run_in<T, F>(ns: &File, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("kxdp-cni-netns".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("enter the pod's network namespace: {e}")))?;
            work()
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the pod namespace thread panicked")))
}
