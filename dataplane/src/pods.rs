//! Pod interfaces attached and detached while the workers forward: what a CNI plugin
//! (`kxdp-cni`) asks for when a container runtime creates or deletes a pod.
//!
//! Attaching a pod's host-side interface: its XDP program first (steering queue `w` to
//! worker `w`'s socket once it is there), then a new port in the port list, for which
//! every worker opens a socket on its own UMEM ([`crate::ports`]), then the sockets into
//! the program's map. Detaching goes the other way: the program goes (nothing is steered
//! to the sockets any more), the workers close their sockets and take their frames back,
//! and the pod's connections and neighbours are forgotten. An interface that vanished
//! under the dataplane (its container was killed and the runtime deleted the veth without
//! a CNI DEL reaching us) is noticed by [`PodPorts::prune`] and detached the same way.
//!
//! Which interfaces are pods is written on them: `kxdp-cni` sets each host end's alias to
//! `kxdp-cni <container id>/<interface>`. A dataplane that starts (after a crash, or as a
//! successor taking over) attaches every interface with such an alias: it depends on no
//! runtime calling ADD again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use pktio::xsk::{self, Steering, XdpProgram};
use pktio::PortId;

use crate::ports::{PodAttachment, Port};
use crate::ports::{PortConfig, PortRole};
use crate::state::Shared;
use crate::steering::XdpSetup;

/// The alias prefix `kxdp-cni` writes on a pod's host interface.
pub const ALIAS_PREFIX: &str = "kxdp-cni ";

/// The pod interfaces attached at run time and their XDP programs.
pub struct PodPorts {
    xdp: XdpSetup,
    /// By port id. The lock also makes attach and detach one at a time.
    programs: Mutex<HashMap<PortId, XdpProgram>>,
}

/// Why an interface's sysfs attributes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Not a name an interface can have.
    #[error("{0:?} is not an interface name")]
    Name(String),
    /// The attribute's file could not be read.
    #[error("read {path} (does {ifname} exist in this namespace?)")]
    Read {
        /// The file.
        path: String,
        /// The interface.
        ifname: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold what it should.
    #[error("{ifname}: {text:?} is not {what}")]
    Value {
        /// The interface.
        ifname: String,
        /// What the file held.
        text: String,
        /// What it should have held.
        what: &'static str,
    },
}

/// What an interface looks like in sysfs.
fn read_sys(ifname: &str, what: &str) -> Result<String, SysfsError> {
    let path = format!("/sys/class/net/{ifname}/{what}");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysfsError::Read {
            path,
            ifname: ifname.to_string(),
            source,
        })
}

/// The MAC address of interface `ifname` in this namespace.
pub fn mac_of(ifname: &str) -> Result<[u8; 6], SysfsError> {
    let text = read_sys(ifname, "address")?;
    let bad = || SysfsError::Value {
        ifname: ifname.to_string(),
        text: text.clone(),
        what: "a MAC address",
    };
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// The MTU of interface `ifname` in this namespace.
pub fn mtu_of(ifname: &str) -> Result<u16, SysfsError> {
    let text = read_sys(ifname, "mtu")?;
    text.parse().map_err(|_| SysfsError::Value {
        ifname: ifname.to_string(),
        text: text.clone(),
        what: "an MTU",
    })
}

/// `e` with its causes, on one line (for a refusal's reason).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The configuration of the pod interface `ifname` in this namespace.
fn pod_config(ifname: &str) -> Result<(PortConfig, u32), String> {
    // The name comes from a CNI plugin: nothing but an interface's name goes into a path.
    if ifname.is_empty() || ifname.contains('/') || ifname.len() > 15 || ifname.starts_with('.') {
        return Err(SysfsError::Name(ifname.to_string()).to_string());
    }
    let mac = mac_of(ifname).map_err(|e| with_causes(&e))?;
    let mtu = mtu_of(ifname).map_err(|e| with_causes(&e))?;
    let ifindex = xsk::ifindex(ifname).map_err(|e| e.to_string())?;
    Ok((
        PortConfig {
            name: ifname.to_string(),
            role: PortRole::Pod,
            mac,
            mtu,
        },
        ifindex,
    ))
}

/// The pod interfaces in this namespace, from their aliases: `(ifname, container id)`.
pub fn discover() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let alias = read_sys(&name, "ifalias").ok()?;
            let rest = alias.strip_prefix(ALIAS_PREFIX)?;
            let container = rest.split_once('/').map_or(rest, |(c, _)| c);
            Some((name, container.to_string()))
        })
        .collect();
    found.sort();
    found
}

impl PodPorts {
    /// Pods whose programs are attached as `xdp` says (one queue per worker).
    pub fn new(xdp: XdpSetup) -> PodPorts {
        PodPorts {
            xdp,
            programs: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, ifname: &str) -> Result<(PortConfig, u32), String> {
        let (cfg, ifindex) = pod_config(ifname)?;
        let queues = xsk::queue_count(ifname);
        if queues < self.xdp.queues {
            return Err(format!(
                "{ifname} has {queues} receive queue(s) and this dataplane {} workers: create the pod's veth with one queue per worker (kxdp-cni's \"queues\" setting)",
                self.xdp.queues
            ));
        }
        Ok((cfg, ifindex))
    }

    /// Adds `ifname` to the port list without the workers (before they start: they open
    /// it themselves; call [`PodPorts::reattach`] once they run).
    pub fn preload(
        &self,
        shared: &Shared,
        ifname: &str,
        container_id: &str,
    ) -> Result<PortId, String> {
        let (cfg, ifindex) = self.check(ifname)?;
        shared
            .ports
            .preload(Port {
                cfg,
                pod: Some(PodAttachment {
                    ifindex,
                    container_id: container_id.to_string(),
                    ips: Vec::new(),
                }),
            })
            .map_err(|e| e.to_string())
    }

    /// Attaches pod interface `ifname`; returns its port id.
    pub fn attach(
        &self,
        shared: &Shared,
        ifname: &str,
        container_id: &str,
        ips: Vec<IpAddr>,
    ) -> Result<PortId, String> {
        let mut programs = self.programs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = shared.ports.load().position(ifname) {
            // A repeated ADD (the runtime retries): the same interface is attached already.
            if shared
                .ports
                .load()
                .port(id)
                .and_then(|p| p.pod.as_ref())
                .is_some_and(|p| p.container_id == container_id)
            {
                return Ok(id);
            }
            return Err(format!(
                "{ifname} is attached already, to another container"
            ));
        }
        let (cfg, ifindex) = self.check(ifname)?;
        let program = self
            .xdp
            .attach(ifindex, Steering::RedirectAll)
            .map_err(|e| format!("attach XDP to {ifname}: {e}"))?;
        let (id, fds) = shared
            .ports
            .add(Port {
                cfg,
                pod: Some(PodAttachment {
                    ifindex,
                    container_id: container_id.to_string(),
                    ips,
                }),
            })
            .map_err(|e| e.to_string())?;
        if let Err(e) = steer(&program, &fds, ifname) {
            drop(program);
            let _ = shared.ports.remove(id);
            return Err(e);
        }
        programs.insert(id, program);
        log::info!("pod interface {ifname} (container {container_id}) attached as port {id}");
        Ok(id)
    }

    /// Detaches pod interface `ifname`: `Ok(false)` when it is not attached.
    pub fn detach(&self, shared: &Shared, ifname: &str, now: u64) -> Result<bool, String> {
        let mut programs = self.programs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(id) = shared.ports.load().position(ifname) else {
            return Ok(false);
        };
        if shared
            .ports
            .load()
            .port(id)
            .is_some_and(|p| p.pod.is_none())
        {
            return Err(format!(
                "{ifname} was given at start, not attached by a CNI plugin"
            ));
        }
        self.forget(shared, &mut programs, id, now)?;
        Ok(true)
    }

    /// Detaches port `id` (its program first, then the sockets), and forgets the pod's
    /// connections and neighbours.
    fn forget(
        &self,
        shared: &Shared,
        programs: &mut HashMap<PortId, XdpProgram>,
        id: PortId,
        now: u64,
    ) -> Result<(), String> {
        // No redirect reaches the sockets once the program is gone (the kernel detaches it
        // under RCU: a packet being redirected right now still lands; the workers take it
        // back with the rest when they close the socket).
        drop(programs.remove(&id));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let gone = shared.ports.remove(id).map_err(|e| e.to_string())?;
        let Some(port) = gone else {
            return Ok(());
        };
        let mut ips = shared.neighbors.forget_port(id);
        if let Some(pod) = &port.pod {
            ips.extend(pod.ips.iter().copied());
        }
        ips.sort();
        ips.dedup();
        let retired = if ips.is_empty() {
            0
        } else {
            shared.conntrack.sweep(now, |c| {
                [c.original.src, c.original.dst, c.reply.src, c.reply.dst]
                    .iter()
                    .any(|a| ips.contains(a))
            })
        };
        log::info!(
            "pod interface {} (container {}) detached from port {id}; {retired} of its connections retired",
            port.cfg.name,
            port.pod.as_ref().map_or("?", |p| p.container_id.as_str())
        );
        Ok(())
    }

    /// Detaches every pod interface that is gone (or was replaced by another of the same
    /// name); returns their names.
    pub fn prune(&self, shared: &Shared, now: u64) -> Vec<String> {
        // The lock first: a list read before it could name a port that a DEL detached and
        // an ADD gave to another pod meanwhile.
        let mut programs = self.programs.lock().unwrap_or_else(PoisonError::into_inner);
        let vanished: Vec<(PortId, String)> = shared
            .ports
            .load()
            .pods()
            .filter(|(_, p)| {
                let ifindex = p.pod.as_ref().map_or(0, |a| a.ifindex);
                xsk::ifindex(&p.cfg.name).ok() != Some(ifindex)
            })
            .map(|(id, p)| (id, p.cfg.name.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, name) in vanished {
            log::warn!("pod interface {name} vanished (its container went without a CNI DEL): detaching it");
            match self.forget(shared, &mut programs, id, now) {
                Ok(()) => out.push(name),
                Err(e) => log::error!("detaching vanished {name}: {e}"),
            }
        }
        out
    }

    /// Lets go of every pod interface's program (the workers, stopping, close the
    /// sockets); the port list keeps them, for [`PodPorts::reattach`] or a successor.
    pub fn release(&self) {
        drop(self.take_programs());
    }

    /// Takes every pod interface's program out, by port id: for a handover, which passes
    /// their links on and drops them after. The port list keeps the pods.
    pub fn take_programs(&self) -> Vec<(PortId, XdpProgram)> {
        self.programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect()
    }

    /// Makes `program` (attached, steering to the workers' sockets) pod port `id`'s.
    pub fn adopt(&self, id: PortId, program: XdpProgram) {
        self.programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, program);
    }

    /// Attaches every pod interface of the port list again, with workers that started
    /// without them; one that fails (gone meanwhile) is detached.
    pub fn reattach(&self, shared: &Shared, now: u64) {
        let mut programs = self.programs.lock().unwrap_or_else(PoisonError::into_inner);
        let list = shared.ports.load_full();
        for (id, port) in list.pods() {
            let ifindex = port.pod.as_ref().map_or(0, |p| p.ifindex);
            match self.xdp.attach(ifindex, Steering::RedirectAll) {
                Ok(p) => {
                    programs.insert(id, p);
                }
                Err(e) => log::warn!("attach XDP to {} again: {e}", port.cfg.name),
            }
        }
        let reopened = match shared.ports.reopen() {
            Ok(r) => r,
            Err(e) => {
                log::error!("pod interfaces not reopened: {e}");
                return;
            }
        };
        for (id, fds) in reopened {
            let name = list.get(id).map(|c| c.name.clone()).unwrap_or_default();
            let steered = match (programs.get(&id), fds) {
                (Some(program), Ok(fds)) => steer(program, &fds, &name),
                (None, _) => Err("no program".to_string()),
                (_, Err(e)) => Err(e.to_string()),
            };
            match steered {
                Ok(()) => log::info!("pod interface {name} attached again as port {id}"),
                Err(e) => {
                    log::warn!("pod interface {name} not attached again ({e}): detaching it");
                    let _ = self.forget(shared, &mut programs, id, now);
                }
            }
        }
    }
}

/// Steers queue `w` of the interface to worker `w`'s socket.
fn steer(
    program: &XdpProgram,
    fds: &[Option<std::os::fd::RawFd>],
    ifname: &str,
) -> Result<(), String> {
    for (w, fd) in fds.iter().enumerate() {
        let fd = fd.ok_or_else(|| format!("worker {w} has no socket for {ifname}"))?;
        program
            .insert(w as u32, fd)
            .map_err(|e| format!("steer {ifname} queue {w}: {e}"))?;
    }
    Ok(())
}
