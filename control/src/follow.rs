//! Programs the dataplane from the API source: waits for a change, lets a burst of changes
//! settle ([`Settle`]), has the [`Programmer`] compute and publish, and syncs; paced by
//! [`Follow`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::kube_source::KubeSource;
use crate::programmer::Programmer;
use crate::stream::{Progress, StreamError, Unreachable};

/// Quiet time that ends a burst: computing starts once no change has arrived for this long.
/// A rollout or a node failure changes many EndpointSlices within a few milliseconds of
/// each other (the EndpointSlice controller writes them one by one); 2 ms groups those
/// while adding at most 2 ms to a lone change, a fifth of the 10 ms p99 target.
pub const SETTLE_QUIET: Duration = Duration::from_millis(2);
/// The longest a burst is waited for: a steady stream of changes is computed at least
/// every 20 ms, so the latency of the first change in it stays bounded.
pub const SETTLE_MAX: Duration = Duration::from_millis(20);

/// How long to let a burst of changes settle before computing the tables once for all of
/// them (kube-proxy waits its `minSyncPeriod`, 1 s by default, instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settle {
    /// Compute once no change arrived for this long.
    pub quiet: Duration,
    /// Compute at the latest this long after the first change.
    pub max: Duration,
}

impl Default for Settle {
    fn default() -> Self {
        Settle {
            quiet: SETTLE_QUIET,
            max: SETTLE_MAX,
        }
    }
}

impl Settle {
    /// How much longer to wait for more changes when the first of them arrived at
    /// `first` and the last at `last`; `None` when it is time to compute.
    pub fn remaining(&self, first: Instant, last: Instant, now: Instant) -> Option<Duration> {
        let until = (last + self.quiet).min(first + self.max);
        (now < until).then(|| until - now)
    }
}

/// How [`follow`] paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// How bursts of changes are grouped.
    pub settle: Settle,
    /// How often to look at the dataplane connection when nothing changes (a restarted
    /// dataplane is noticed and resynced within this).
    pub poll: Duration,
    /// Return once the dataplane applied the first tables.
    pub once: bool,
}

/// Why [`follow`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// `--once` and the objects give no tables.
    #[error("--once: no table to send (see above)")]
    NoTables,
    /// `--once` and the dataplane refused the tables.
    #[error(transparent)]
    Refused(StreamError),
    /// `--once` and the dataplane's socket cannot be connected to for a reason that
    /// waiting does not mend.
    #[error(transparent)]
    Unreachable(Unreachable),
    /// The API watchers are gone (their runtime shut down).
    #[error("the API watchers stopped")]
    WatchersStopped,
}

/// What one look at the API source found.
enum Look {
    Unchanged,
    /// Some kinds have not been listed yet: no tables from a partial view.
    NotSynced,
    Published,
    Failed,
}

/// Programs the dataplane from the API source until `stop` is set (or, with `once`, the
/// first tables are applied): waits for a change, lets the burst settle, computes and
/// publishes, syncs. Blocks the calling thread (the computation runs on it); the source's
/// watchers run on `runtime`, which this thread must not be a worker of.
pub fn follow(
    source: &mut KubeSource,
    programmer: &mut Programmer,
    runtime: &tokio::runtime::Handle,
    how: Follow,
    stop: &AtomicBool,
) -> Result<(), FollowError> {
    let mut waiting_said = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let look = source.take(|objects, change| {
            if change.batches == 0 {
                return Look::Unchanged;
            }
            if !change.synced {
                return Look::NotSynced;
            }
            log::debug!(
                "{} batches ({:?}, listed {:?}), {} objects, {} EndpointSlice trigger times",
                change.batches,
                change.kinds,
                change.listed,
                objects.len(),
                change.endpoint_slice_triggers.len()
            );
            if programmer.objects_changed(objects, &change, started) {
                Look::Published
            } else {
                Look::Failed
            }
        });
        match look {
            Look::NotSynced if !waiting_said => {
                log::info!("waiting for the first list of {:?}", source.unsynced());
                waiting_said = true;
            }
            Look::Failed if how.once => return Err(FollowError::NoTables),
            Look::Unchanged | Look::NotSynced | Look::Published | Look::Failed => {}
        }
        match programmer.sync() {
            Ok(Progress::Applied(_)) if how.once => return Ok(()),
            Ok(_) => {}
            Err(e @ StreamError::Refused { .. }) => {
                log::error!("{e}");
                if how.once {
                    return Err(FollowError::Refused(e));
                }
            }
            Err(e) if how.once => match e.into_unreachable() {
                Ok(u) => return Err(FollowError::Unreachable(u)),
                Err(e) => log::warn!("{e}"),
            },
            Err(e) => log::warn!("{e}"),
        }
        let alive = runtime.block_on(async {
            match tokio::time::timeout(how.poll, source.changed()).await {
                Err(_) => true,
                Ok(false) => false,
                Ok(true) => {
                    programmer.change_queued();
                    let first = Instant::now();
                    let mut last = first;
                    while let Some(wait) = how.settle.remaining(first, last, Instant::now()) {
                        match tokio::time::timeout(wait, source.changed()).await {
                            Ok(true) => last = Instant::now(),
                            Ok(false) => return false,
                            Err(_) => {}
                        }
                    }
                    true
                }
            }
        });
        if !alive {
            return Err(FollowError::WatchersStopped);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_settles_after_a_quiet_gap_or_at_the_bound() {
        let s = Settle::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(s.remaining(t0, t0, t0), Some(ms(2)));
        assert_eq!(s.remaining(t0, t0, t0 + ms(2)), None);
        // A change every millisecond keeps it waiting, but never past 20 ms.
        assert_eq!(s.remaining(t0, t0 + ms(10), t0 + ms(11)), Some(ms(1)));
        assert_eq!(s.remaining(t0, t0 + ms(19), t0 + ms(19)), Some(ms(1)));
        assert_eq!(s.remaining(t0, t0 + ms(20), t0 + ms(20)), None);
    }
}
