//! How a worker spends the time between packets: busy-polling its rings, or asleep in
//! `poll(2)` on its AF_XDP sockets and an eventfd of its own until a frame arrives, the
//! ports or tables change, or the dataplane stops ([`PollMode`], [`Wakers`]). This is what
//! VPP calls `rx-mode adaptive|interrupt` and DPDK's power management does: poll while
//! there is traffic, sleep on an interrupt when there is none.
//!
//! Nothing is lost by sleeping. An AF_XDP socket is readable while its receive ring holds
//! a frame, so a frame that came just before the worker went to sleep wakes it at once; the
//! fill ring is topped up at the end of every poll, so the kernel has buffers to deliver
//! into while the worker sleeps (a driver that needs a kick to use them sets the ring's
//! `need_wakeup` flag, which the poll after waking honours). An eventfd stays readable
//! until its reader clears it, so a change made while the worker was deciding to sleep
//! wakes it too. What a sleeping worker still does on its own, it does on a timeout
//! ([`SLEEP_LONGEST`]): worker 0's housekeeping (soliciting unresolved pods), every
//! worker's device counters.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// How a worker waits for packets (`--poll-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Poll without pause: the lowest latency, a whole core always (dedicated gateways).
    Busy,
    /// Busy-poll while there is traffic; after [`ADAPTIVE_IDLE`] without a frame, sleep
    /// until one arrives (the default: nodes with pods).
    #[default]
    Adaptive,
    /// Sleep as soon as a poll finds nothing: the least CPU, each quiet spell's first
    /// packet waits for the worker to wake.
    Interrupt,
}

impl PollMode {
    /// Its name, as `--poll-mode` takes it and `kxdp stats` shows it.
    pub fn name(self) -> &'static str {
        match self {
            PollMode::Busy => "busy",
            PollMode::Adaptive => "adaptive",
            PollMode::Interrupt => "interrupt",
        }
    }

    /// Whether a worker whose last frame came `idle_ns` ago sleeps now.
    pub fn sleeps_after(self, idle_ns: u64) -> bool {
        match self {
            PollMode::Busy => false,
            PollMode::Adaptive => idle_ns >= ADAPTIVE_IDLE.as_nanos() as u64,
            PollMode::Interrupt => true,
        }
    }
}

/// How long an adaptive worker keeps polling after its last frame before it sleeps: a
/// burst's stragglers and a request's answer a few round trips later find it awake, and
/// a quiet worker costs this much polling per wake-up.
pub const ADAPTIVE_IDLE: Duration = Duration::from_micros(200);

/// The longest a worker sleeps without being woken: the housekeeping interval.
pub const SLEEP_LONGEST: Duration = Duration::from_millis(100);

/// One eventfd per worker, written to wake it: the ports or tables changed, or it is to
/// stop. A worker whose eventfd could not be made (descriptors exhausted) never sleeps.
pub struct Wakers {
    fds: Vec<Option<EventFd>>,
}

impl Wakers {
    /// Eventfds for `workers` workers.
    pub fn new(workers: usize) -> Wakers {
        let fds = (0..workers.max(1))
            .map(|w| {
                EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| {
                        log::warn!("worker {w}: no eventfd ({e}): it will busy-poll, never sleep")
                    })
                    .ok()
            })
            .collect();
        Wakers { fds }
    }

    /// Wakes every sleeping worker (a worker that is awake finds its eventfd set and
    /// clears it at its next sleep, which then ends at once: one empty pass).
    pub fn wake_all(&self) {
        for fd in self.fds.iter().flatten() {
            // EAGAIN only when the counter is at its maximum: the worker is awake anyway.
            let _ = fd.write(1);
        }
    }

    /// Worker `worker`'s eventfd, if it has one.
    pub fn of(&self, worker: usize) -> Option<&EventFd> {
        self.fds.get(worker).and_then(Option::as_ref)
    }
}

/// Sleeps until one of `sockets` is readable (a frame arrived), `waker` is written, or
/// `longest` has passed; clears `waker`. An interrupted or failed `poll(2)` just ends the
/// sleep early: the worker polls and decides again.
pub fn sleep(sockets: &[BorrowedFd<'_>], waker: &EventFd, longest: Duration) {
    let mut fds: Vec<PollFd<'_>> = sockets
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    fds.push(PollFd::new(waker.as_fd(), PollFlags::POLLIN));
    let timeout = PollTimeout::try_from(longest).unwrap_or(PollTimeout::MAX);
    if let Err(e) = nix::poll::poll(&mut fds, timeout) {
        if e != nix::errno::Errno::EINTR {
            log::debug!("worker sleep: poll: {e}");
        }
    }
    let woken = fds
        .last()
        .and_then(PollFd::revents)
        .is_some_and(|r| r.contains(PollFlags::POLLIN));
    if woken {
        // Non-blocking: a racing write is seen by the next sleep.
        let _ = waker.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn modes_sleep_when_they_say() {
        let spell = ADAPTIVE_IDLE.as_nanos() as u64;
        assert!(!PollMode::Busy.sleeps_after(u64::MAX));
        assert!(!PollMode::Adaptive.sleeps_after(spell - 1));
        assert!(PollMode::Adaptive.sleeps_after(spell));
        assert!(PollMode::Interrupt.sleeps_after(0));
    }

    #[test]
    fn a_wake_before_the_sleep_ends_it_at_once_and_is_cleared() {
        let wakers = Wakers::new(2);
        let fd = wakers.of(1).expect("an eventfd");
        wakers.wake_all();
        let started = Instant::now();
        sleep(&[], fd, Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the pending wake ended the sleep"
        );
        // Cleared: the next sleep lasts until its timeout.
        let started = Instant::now();
        sleep(&[], fd, Duration::from_millis(20));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn a_wake_from_another_thread_ends_a_sleep() {
        let wakers = std::sync::Arc::new(Wakers::new(1));
        let w = wakers.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake_all();
        });
        let started = Instant::now();
        sleep(
            &[],
            wakers.of(0).expect("an eventfd"),
            Duration::from_secs(30),
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        waker.join().expect("the waking thread");
    }
}
