//! The calling thread's scheduling: its niceness (a successor dataplane prepares its
//! takeover at a lower priority than the predecessor's workers it shares the cores with)
//! and the real-time class a worker may run in.
//!
//! On Linux `setpriority(PRIO_PROCESS, tid, …)` and `sched_setscheduler(0, …)` act on the
//! calling thread alone, and threads it creates afterwards inherit what it has.

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

/// Puts the calling thread in `SCHED_FIFO` at `priority` (1–99; needs CAP_SYS_NICE): it
/// runs as soon as it is runnable, before every ordinary thread of its core, until it
/// sleeps or a thread of a higher priority wants the core.
pub fn set_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param alive for the call; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling thread runs in `SCHED_FIFO`.
pub fn is_fifo() -> bool {
    // SAFETY: a plain query of the calling thread.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_FIFO }
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

    #[test]
    fn a_thread_goes_real_time_alone_or_is_told_why_not() {
        let (fifo, err) = std::thread::spawn(|| {
            let err = set_fifo(10).err();
            (is_fifo(), err)
        })
        .join()
        .unwrap();
        match err {
            None => assert!(fifo, "set_fifo succeeded, so the thread is SCHED_FIFO"),
            Some(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        assert!(!is_fifo(), "the test's own thread is untouched");
        assert!(set_fifo(100).is_err(), "priorities stop at 99");
    }
}
