//! The dataplane's ports, by id: those given at start (uplink, host pair, `--pods`) and pod
//! interfaces attached and detached while the workers run (a CNI plugin's request).
//!
//! A port id is the index of the port's socket in every worker's device, and what
//! neighbours and counters refer to. The list is published whole ([`arc_swap`]): workers
//! read one snapshot per pass, and a change is a new list plus a new generation. Each
//! worker compares the generation once per pass; when it moved, the worker opens the
//! sockets of ports that appeared and closes those of ports that went, reports what it
//! opened, and acknowledges the generation. Whoever changed the list waits for every
//! worker's acknowledgement before it steers an interface to the new sockets (or after
//! unsteering, before it forgets a port), so no worker ever holds a socket for a port the
//! list no longer has, nor an id that was given to another interface.

use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pktio::PortId;

/// What a port is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// The node's link to the rest of the network.
    Uplink,
    /// The host side of a pod's veth.
    Pod,
    /// kxdp's end of the veth pair to the node's own kernel (the host network): host
    /// processes reach pods and Services through it, and the node's addresses are reached
    /// through it.
    Host,
}

/// A port of the dataplane, the same on every worker (each worker has its own queue on it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Interface name.
    pub name: String,
    /// Its role.
    pub role: PortRole,
    /// Its MAC address: the source of every frame the dataplane sends there.
    pub mac: [u8; 6],
    /// Its MTU (IP packet size); the overlay's inner MTU is this less
    /// [`crate::vxlan::VXLAN_OVERHEAD`] on the uplink.
    pub mtu: u16,
}

/// A port attached at run time: the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAttachment {
    /// The interface's index when it was attached (a new interface of the same name is
    /// another one).
    pub ifindex: u32,
    /// The container runtime's id of the pod sandbox (the CNI `CNI_CONTAINERID`).
    pub container_id: String,
    /// The pod's addresses, as the CNI plugin gave them (possibly none).
    pub ips: Vec<IpAddr>,
}

/// One port of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Name, role, MAC, MTU.
    pub cfg: PortConfig,
    /// Set for a port attached at run time; `None` for one given at start.
    pub pod: Option<PodAttachment>,
}

/// The ports at one moment, by id; an id whose port went is `None` until it is given
/// again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList {
    slots: Vec<Option<Port>>,
}

impl PortList {
    /// The ports given at start, with ids in order.
    pub fn new(ports: Vec<PortConfig>) -> PortList {
        PortList {
            slots: ports
                .into_iter()
                .map(|cfg| Some(Port { cfg, pod: None }))
                .collect(),
        }
    }

    /// Port `id`'s configuration, if it is there.
    #[inline]
    pub fn get(&self, id: PortId) -> Option<&PortConfig> {
        match self.slots.get(id) {
            Some(Some(p)) => Some(&p.cfg),
            _ => None,
        }
    }

    /// Port `id`, with its pod if it was attached at run time.
    pub fn port(&self, id: PortId) -> Option<&Port> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    /// The addresses the CNI plugin gave the pod on port `id` (none for other ports).
    #[inline]
    pub fn pod_ips(&self, id: PortId) -> &[IpAddr] {
        match self.slots.get(id) {
            Some(Some(Port { pod: Some(p), .. })) => &p.ips,
            _ => &[],
        }
    }

    /// Every port, by id.
    pub fn iter(&self) -> impl Iterator<Item = (PortId, &PortConfig)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(id, p)| Some((id, &p.as_ref()?.cfg)))
    }

    /// Every port attached at run time, by id.
    pub fn pods(&self) -> impl Iterator<Item = (PortId, &Port)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(id, p)| p.as_ref().filter(|p| p.pod.is_some()).map(|p| (id, p)))
    }

    /// The id of the port named `name`.
    pub fn position(&self, name: &str) -> Option<PortId> {
        self.iter().find(|(_, p)| p.name == name).map(|(id, _)| id)
    }

    /// Ids in use or given before: one past the highest.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no port.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The list with `port` at the lowest free id, and that id.
    fn with(&self, port: Port) -> (PortList, PortId) {
        let mut next = self.clone();
        match next.slots.iter().position(Option::is_none) {
            Some(id) => {
                next.slots[id] = Some(port);
                (next, id)
            }
            None => {
                next.slots.push(Some(port));
                let id = next.slots.len() - 1;
                (next, id)
            }
        }
    }

    /// The list without port `id`.
    fn without(&self, id: PortId) -> PortList {
        let mut next = self.clone();
        if let Some(slot) = next.slots.get_mut(id) {
            *slot = None;
        }
        while next.slots.last().is_some_and(Option::is_none) {
            next.slots.pop();
        }
        next
    }
}

/// What one worker did about a generation of the list: the sockets it opened (with their
/// descriptors, to steer the interfaces' queues to) or could not open.
#[derive(Debug, Default)]
struct Report {
    opened: Vec<(PortId, Option<RawFd>)>,
    failed: Vec<(PortId, String)>,
}

/// The published port list, and the workers' acknowledgements of it.
pub struct Ports {
    list: ArcSwap<PortList>,
    generation: AtomicU64,
    /// Per worker: the last generation it has caught up with.
    seen: Vec<AtomicU64>,
    reports: Mutex<Vec<Report>>,
    /// One change at a time.
    changing: Mutex<()>,
    /// The most ports at once (ids beyond the start's count go to pods).
    capacity: usize,
    /// Woken at every change, so that sleeping workers follow it.
    wakers: Arc<crate::idle::Wakers>,
}

/// Why a change of the port list did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    /// Every id is taken.
    #[error("all {0} ports are in use: raise --max-pods")]
    Full(usize),
    /// A port of that name is there already.
    #[error("{0} is attached already (port {1})")]
    Attached(String, PortId),
    /// Not every worker caught up in time.
    #[error("worker {0} did not take the new ports within {1:?}")]
    Slow(usize, Duration),
    /// A worker could not open its socket.
    #[error("worker {0} could not open {1}: {2}")]
    Open(usize, String, String),
}

/// How long a change waits for the workers (they look once per pass, every few µs when
/// busy-polling; a sleeping worker is woken by the change).
pub const CATCH_UP: Duration = Duration::from_secs(2);

impl Ports {
    /// The ports given at start, for `workers` workers, at most `capacity` ports in all.
    /// `wakers` wake the workers when the list changes.
    pub fn new(
        ports: Vec<PortConfig>,
        workers: usize,
        capacity: usize,
        wakers: Arc<crate::idle::Wakers>,
    ) -> Ports {
        let capacity = capacity.max(ports.len());
        Ports {
            wakers,
            list: ArcSwap::from_pointee(PortList::new(ports)),
            generation: AtomicU64::new(0),
            seen: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
            reports: Mutex::new((0..workers.max(1)).map(|_| Report::default()).collect()),
            changing: Mutex::new(()),
            capacity,
        }
    }

    /// The list now.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<PortList>> {
        self.list.load()
    }

    /// The list now, as an owned handle.
    pub fn load_full(&self) -> Arc<PortList> {
        self.list.load_full()
    }

    /// The generation of the list (workers compare it once per pass).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Worker `worker` has caught up with `generation`, having opened `opened` and failed
    /// to open `failed`.
    pub fn caught_up(
        &self,
        worker: usize,
        generation: u64,
        opened: Vec<(PortId, Option<RawFd>)>,
        failed: Vec<(PortId, String)>,
    ) {
        if let Some(r) = self
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(worker)
        {
            r.opened.extend(opened);
            r.failed.extend(failed);
        }
        if let Some(s) = self.seen.get(worker) {
            s.store(generation, Ordering::Release);
        }
    }

    /// Publishes `next` and waits until every worker has caught up; returns what each
    /// reported.
    fn publish(&self, next: PortList) -> Result<Vec<Report>, PortError> {
        for r in self
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            *r = Report::default();
        }
        self.list.store(Arc::new(next));
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.wakers.wake_all();
        let until = Instant::now() + CATCH_UP;
        for (w, seen) in self.seen.iter().enumerate() {
            while seen.load(Ordering::Acquire) < generation {
                if Instant::now() > until {
                    return Err(PortError::Slow(w, CATCH_UP));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = reports.iter().map(|_| Report::default()).collect();
        Ok(std::mem::replace(&mut *reports, fresh))
    }

    /// Each worker's socket for `port` in `reports`, or the first failure to open one.
    fn sockets(
        reports: &[Report],
        port: PortId,
        name: &str,
    ) -> Result<Vec<Option<RawFd>>, PortError> {
        let mut fds = Vec::with_capacity(reports.len());
        for (w, r) in reports.iter().enumerate() {
            if let Some((_, why)) = r.failed.iter().find(|(p, _)| *p == port) {
                return Err(PortError::Open(w, name.to_string(), why.clone()));
            }
            fds.push(
                r.opened
                    .iter()
                    .find(|(p, _)| *p == port)
                    .and_then(|(_, fd)| *fd),
            );
        }
        Ok(fds)
    }

    /// Adds `port` at the lowest free id once every worker has opened its socket for it;
    /// returns the id and each worker's socket (to steer queue `w` to). On a failure the
    /// port is taken out again.
    pub fn add(&self, port: Port) -> Result<(PortId, Vec<Option<RawFd>>), PortError> {
        let _one = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.list.load_full();
        let name = port.cfg.name.clone();
        if let Some(id) = now.position(&name) {
            return Err(PortError::Attached(name, id));
        }
        if now.iter().count() >= self.capacity {
            return Err(PortError::Full(self.capacity));
        }
        let (next, id) = now.with(port);
        match self
            .publish(next)
            .and_then(|r| Ports::sockets(&r, id, &name))
        {
            Ok(fds) => Ok((id, fds)),
            Err(e) => {
                let _ = self.publish(now.without(id));
                Err(e)
            }
        }
    }

    /// Adds `port` to the list without asking the workers: for ports found before the
    /// workers start (they open every port of the list they find), or before
    /// [`Ports::reopen`].
    pub fn preload(&self, port: Port) -> Result<PortId, PortError> {
        let _one = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.list.load_full();
        if let Some(id) = now.position(&port.cfg.name) {
            return Err(PortError::Attached(port.cfg.name.clone(), id));
        }
        if now.iter().count() >= self.capacity {
            return Err(PortError::Full(self.capacity));
        }
        let (next, id) = now.with(port);
        self.list.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wakers.wake_all();
        Ok(id)
    }

    /// Takes port `id` out once every worker has closed its socket (its interface must no
    /// longer steer to them); returns the port that was there.
    pub fn remove(&self, id: PortId) -> Result<Option<Port>, PortError> {
        let _one = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.list.load_full();
        let Some(gone) = now.port(id).cloned() else {
            return Ok(None);
        };
        self.publish(now.without(id))?;
        Ok(Some(gone))
    }

    /// Has every worker open the sockets of every runtime port of the list (workers that
    /// started with devices of the start's ports only); returns, per runtime port, each
    /// worker's socket or the failure. Ports that failed are left in the list: the caller
    /// removes them.
    #[allow(clippy::type_complexity)]
    pub fn reopen(
        &self,
    ) -> Result<Vec<(PortId, Result<Vec<Option<RawFd>>, PortError>)>, PortError> {
        let _one = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.list.load_full();
        let reports = self.publish(PortList::clone(&now))?;
        Ok(now
            .pods()
            .map(|(id, p)| (id, Ports::sockets(&reports, id, &p.cfg.name)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, role: PortRole) -> PortConfig {
        PortConfig {
            name: name.into(),
            role,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        }
    }

    fn pod(name: &str) -> Port {
        Port {
            cfg: cfg(name, PortRole::Pod),
            pod: Some(PodAttachment {
                ifindex: 7,
                container_id: "c".into(),
                ips: vec![],
            }),
        }
    }

    /// A worker thread that catches up with every generation, failing to open `bad`.
    fn worker(
        ports: Arc<Ports>,
        w: usize,
        bad: &'static str,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut seen = 0;
            let mut open: Vec<PortId> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let g = ports.generation();
                if g != seen {
                    let list = ports.load_full();
                    open.retain(|id| list.port(*id).is_some_and(|p| p.pod.is_some()));
                    let (mut opened, mut failed) = (Vec::new(), Vec::new());
                    for (id, p) in list.pods() {
                        if open.contains(&id) {
                            continue;
                        }
                        if p.cfg.name == bad {
                            failed.push((id, "no such queue".to_string()));
                        } else {
                            open.push(id);
                            opened.push((id, Some(100 + w as RawFd)));
                        }
                    }
                    ports.caught_up(w, g, opened, failed);
                    seen = g;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    }

    #[test]
    fn pods_come_and_go_at_the_lowest_free_id_once_every_worker_follows() {
        let ports = Arc::new(Ports::new(
            vec![cfg("up", PortRole::Uplink), cfg("host", PortRole::Host)],
            2,
            4,
            Arc::new(crate::idle::Wakers::new(2)),
        ));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|w| worker(ports.clone(), w, "bad", stop.clone()))
            .collect();
        let (a, fds) = ports.add(pod("a")).unwrap();
        assert_eq!((a, fds), (2, vec![Some(100), Some(101)]));
        let (b, _) = ports.add(pod("b")).unwrap();
        assert_eq!(b, 3);
        assert_eq!(ports.add(pod("a")), Err(PortError::Attached("a".into(), 2)));
        assert_eq!(ports.add(pod("c")), Err(PortError::Full(4)));
        assert_eq!(ports.remove(a).unwrap().unwrap().cfg.name, "a");
        assert_eq!(ports.load().get(a), None);
        assert_eq!(ports.remove(a), Ok(None), "removing twice is nothing");
        // A failure on any worker takes the port out again.
        let err = ports.add(pod("bad")).unwrap_err();
        assert!(
            matches!(err, PortError::Open(_, ref n, _) if n == "bad"),
            "{err:?}"
        );
        assert_eq!(ports.load().position("bad"), None);
        // The freed id is given again.
        assert_eq!(ports.add(pod("d")).unwrap().0, 2);
        assert_eq!(ports.load().get(0).unwrap().name, "up");
        assert!(ports.remove(b).unwrap().is_some());
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        // With no worker following, a change gives up after a while and says who.
        let err = ports.add(pod("e")).unwrap_err();
        assert!(matches!(err, PortError::Slow(0, _)), "{err:?}");
    }
}
