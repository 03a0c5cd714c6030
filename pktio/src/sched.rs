//! The calling thread's scheduling niceness: a successor dataplane prepares its takeover at
//! a lower priority than the predecessor's workers it shares the cores with.
//!
//! On Linux `setpriority(PRIO_PROCESS, tid, …)` sets one thread's nice value, and threads
//! it creates afterwards inherit it.

use std::io;

/// The calling thread's nice value.
pub fn nice() -> io::Result<i32> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // getpriority returns -1 both as a value and on error: errno tells them apart.
    // SAFETY: plain calls; errno is the calling thread's.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

/// Sets the calling thread's nice value (lowering it needs CAP_SYS_NICE).
pub fn set_nice(value: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: a plain call on the calling thread; the result is checked.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, value) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_raises_its_nice_value_and_others_keep_theirs() {
        let before = nice().unwrap();
        let inside = std::thread::spawn(move || {
            set_nice((before + 5).min(19)).unwrap();
            nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + 5).min(19));
        assert_eq!(nice().unwrap(), before, "another thread's value is its own");
    }
}
