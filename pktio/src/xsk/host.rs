//! The host redirect: `bpf/kxdp_host.bpf.c`, a tc program on the egress of the node's own
//! interfaces (`lo`, the uplink) that hands the packets of host processes for kxdp's
//! frontends to kxdp through the host veth pair.
//!
//! A host process's connection to a NodePort on one of the node's addresses never leaves
//! the kernel (the address is local, the route is `lo`), and one to a load-balancer or
//! external IP leaves through the uplink towards a router; neither would reach kxdp. The
//! program sees them on those interfaces' egress and redirects the ones whose (destination,
//! protocol, port) is in its table to the kernel's end of the host pair, addressed to
//! kxdp's end. It hangs on tcx links (Linux 6.6) held by descriptors, like the XDP program:
//! they detach when kxdp exits or dies, nothing is pinned.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use super::bpf::{link_create, link_ids, load_object, map_of, percpu_counters, BpfMap};
use super::config::Protocol;
use super::filter::port_key;
use super::iface::ifname;
use super::{XskError, ATTACH, UPDATE_MAP};

/// The compiled program (`build.rs` writes it to `OUT_DIR`).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kxdp_host.bpf.o"));
/// The program's function name in the object.
const PROGRAM: &str = "kxdp_host_redirect";
/// `BPF_TCX_EGRESS` of enum bpf_attach_type (include/uapi/linux/bpf.h).
const BPF_TCX_EGRESS: u32 = libbpf_rs::libbpf_sys::BPF_TCX_EGRESS;

/// Where redirected packets go: the kernel's end of the host veth pair, and the Ethernet
/// header they get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTarget {
    /// The kernel's end of the pair (the packets are sent out of it).
    pub ifindex: u32,
    /// The destination MAC: kxdp's end of the pair.
    pub dst_mac: [u8; 6],
    /// The source MAC: the kernel's end.
    pub src_mac: [u8; 6],
}

/// The redirect's counters, summed over CPUs since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostRedirectStats {
    /// Packets left alone.
    pub passed: u64,
    /// Packets sent to kxdp.
    pub redirected: u64,
}

/// The host redirect program with its maps, attached to any number of interfaces' egress.
/// Dropping it detaches it everywhere.
pub struct HostRedirect {
    /// Declared first so the program detaches before the rest closes.
    links: Mutex<Vec<(String, OwnedFd)>>,
    prog: OwnedFd,
    config: BpfMap,
    ports: BpfMap,
    stats: BpfMap,
    /// What the port table holds; the lock also serialises updates.
    installed: Mutex<BTreeSet<(IpAddr, Protocol, u16)>>,
}

impl HostRedirect {
    /// Loads the program, sending what it takes to `target`; it is attached nowhere yet.
    pub fn load(target: HostTarget) -> Result<HostRedirect, XskError> {
        let what = ifname(target.ifindex);
        let (prog, obj) = load_object(OBJECT, PROGRAM, &what, |_| Ok(()))?;
        let r = HostRedirect {
            links: Mutex::new(Vec::new()),
            prog,
            config: map_of(&obj, "kxdp_host_config", &what)?,
            ports: map_of(&obj, "kxdp_host_ports", &what)?,
            stats: map_of(&obj, "kxdp_host_stats", &what)?,
            installed: Mutex::new(BTreeSet::new()),
        };
        let mut value = [0u8; 16];
        value[..4].copy_from_slice(&target.ifindex.to_ne_bytes());
        value[4..10].copy_from_slice(&target.dst_mac);
        value[10..].copy_from_slice(&target.src_mac);
        r.config
            .update(&0u32.to_ne_bytes(), &value)
            .map_err(|e| XskError::os(UPDATE_MAP, format!("{what} host redirect"), e))?;
        Ok(r)
    }

    /// Attaches to the egress of interface `ifindex` (of the calling thread's network
    /// namespace), after whatever tc programs it has.
    pub fn attach_egress(&self, ifindex: u32) -> Result<(), XskError> {
        let name = ifname(ifindex);
        let link = link_create(&self.prog, ifindex, BPF_TCX_EGRESS, 0)
            .map_err(|e| XskError::os(ATTACH, format!("{name} tc egress"), e))?;
        match link_ids(&link) {
            Ok((link_id, prog_id)) => log::info!(
                "{name}: kxdp host redirect {prog_id} attached to tc egress by link {link_id} \
                 (closed when kxdp exits; by hand: bpftool link detach id {link_id})"
            ),
            Err(e) => log::info!("{name}: kxdp host redirect attached to tc egress ({e})"),
        }
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, link));
        Ok(())
    }

    /// The interfaces it is attached to, with the kernel's ids of their links.
    pub fn attachments(&self) -> Vec<(String, u32)> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, l)| (n.clone(), link_ids(l).map_or(0, |(id, _)| id)))
            .collect()
    }

    /// Makes the table `want`: adds what is new, then removes what is stale, so no entry
    /// that stays is ever missing.
    pub fn replace_ports(&self, want: &BTreeSet<(IpAddr, Protocol, u16)>) -> Result<(), XskError> {
        let mut have = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        let update = |what: &str, r: io::Result<()>, e: &(IpAddr, Protocol, u16)| {
            r.map_err(|err| {
                XskError::os(
                    UPDATE_MAP,
                    format!("host redirect: {what} {:?} {} port {}", e.1, e.0, e.2),
                    err,
                )
            })
        };
        for e in want {
            if !have.contains(e) {
                update("add", self.ports.update(&port_key(e.0, e.1, e.2), &[1]), e)?;
                have.insert(*e);
            }
        }
        let stale: Vec<_> = have.difference(want).copied().collect();
        for e in &stale {
            update("remove", self.ports.delete(&port_key(e.0, e.1, e.2)), e)?;
            have.remove(e);
        }
        Ok(())
    }

    /// What the table holds.
    pub fn ports(&self) -> BTreeSet<(IpAddr, Protocol, u16)> {
        self.installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters.
    pub fn stats(&self) -> Result<HostRedirectStats, XskError> {
        let [passed, redirected] = percpu_counters::<2>(&self.stats)
            .map_err(|e| XskError::os(UPDATE_MAP, "host redirect counters", e))?;
        Ok(HostRedirectStats { passed, redirected })
    }
}
