//! The host pair: the veth pair between the node's kernel and kxdp, set up by the dataplane
//! itself (`kxdp-dataplane --host-pair NAME`) instead of by hand.
//!
//! kxdp's end is a port of the workers (role `Host`); the kernel's end carries the routes
//! to the cluster's pod networks and Service ranges (`src` the node's address of each
//! family), so that host processes reach pods and ClusterIPs through kxdp. What the kernel's
//! end needs besides (each the README's former hand step, each said why below): a
//! link-scope IPv4 address, `accept_local=1`, loose `rp_filter`, and, on both ends,
//! checksum and segmentation offloads off.
//!
//! Set-up is idempotent: a pair of the same names, peers of each other with the queues
//! asked for (left by a crashed run, or held by the dataplane being taken over) is reused,
//! other leftovers are recreated; an interface of another kind under either name is
//! refused, never deleted. The routes follow the tables ([`HostPair::sync_routes`]);
//! [`HostPair::teardown`] deletes the pair, and the kernel its routes with it.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use ipnet::{IpNet, Ipv4Net};
use netconf::netlink::{Ipv4DevConf, Link, Netlink, RTPROT_KERNEL};

/// The link-scope address of the kernel's end: never a source (the routes name the
/// node's), there so that the reverse-path check accepts packets kxdp hands over from the
/// node's own addresses (it fails any source on an interface without an address of its
/// own).
pub const KERNEL_END_ADDRESS: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 42, 1), 32);

/// What `--host-pair NAME` appends to NAME for kxdp's end.
pub const KXDP_END_SUFFIX: &str = "-xdp";

/// The longest interface name the kernel takes (`IFNAMSIZ` less its NUL).
const IFNAME_MAX: usize = 15;

/// The host pair wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPairSpec {
    /// The kernel's end: the routes go out of it (`kxhost` in the lab).
    pub kernel_end: String,
    /// kxdp's end: the workers' host port (`kxhp` in the lab).
    pub kxdp_end: String,
    /// Receive and transmit queues of each end: one per worker.
    pub queues: u32,
    /// The destinations routed to kxdp: the pod networks and the Service ranges. Empty
    /// leaves the routes of a reused pair as they are (the dataplane's own routes come
    /// with the tables, and a dataplane taking over must not cut its predecessor's).
    pub routes: Vec<IpNet>,
    /// The node's addresses: the first of each family is the `src` of that family's
    /// routes. A family without one gets no routes (nothing on the node could answer).
    pub sources: Vec<IpAddr>,
}

impl HostPairSpec {
    /// The spec of `--host-pair NAME`: the kernel's end `NAME`, kxdp's end `NAME-xdp`, no
    /// routes yet (they come with the tables).
    pub fn named(name: &str, queues: u32, sources: Vec<IpAddr>) -> Result<Self, HostPairError> {
        let spec = HostPairSpec {
            kernel_end: name.to_string(),
            kxdp_end: format!("{name}{KXDP_END_SUFFIX}"),
            queues,
            routes: Vec::new(),
            sources,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), HostPairError> {
        for name in [&self.kernel_end, &self.kxdp_end] {
            let ok = !name.is_empty()
                && name.len() <= IFNAME_MAX
                && name != "."
                && name != ".."
                && !name
                    .bytes()
                    .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
            if !ok {
                return Err(HostPairError::BadName(name.clone()));
            }
        }
        if self.kernel_end == self.kxdp_end {
            return Err(HostPairError::BadName(self.kernel_end.clone()));
        }
        if self.queues == 0 {
            return Err(HostPairError::NoQueues);
        }
        Ok(())
    }
}

/// What went wrong setting up, updating or removing the host pair.
#[derive(Debug, thiserror::Error)]
pub enum HostPairError {
    /// A name the kernel would refuse.
    #[error("host pair: {0:?} is not an interface name (1 to {IFNAME_MAX} bytes, no '/', ':' or spaces; the two ends differ)")]
    BadName(String),
    /// Zero queues asked for.
    #[error("host pair: each end needs at least one queue")]
    NoQueues,
    /// A name is held by an interface that is not a leftover host pair.
    #[error("host pair: {name} exists and is a {kind} interface, not a veth: kxdp deletes only its own pair; rename or remove it, or choose another --host-pair name")]
    NameTaken {
        /// The interface's name.
        name: String,
        /// Its kind (`ip -d link show` names it).
        kind: String,
    },
    /// A netlink request the kernel refused.
    #[error("host pair: {what}: {source}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The kernel's answer.
        source: io::Error,
    },
}

fn netlink_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> HostPairError {
    let what = what.into();
    move |source| HostPairError::Netlink { what, source }
}

/// A host pair set up in the calling thread's network namespace.
#[derive(Debug)]
pub struct HostPair {
    spec: HostPairSpec,
    kernel_index: u32,
    kxdp_index: u32,
    /// The routes last installed, with their sources (`None`: not yet synced).
    synced: Mutex<Option<BTreeMap<IpNet, IpAddr>>>,
}

impl HostPair {
    /// Creates (or reuses) the pair and configures it: both ends up with offloads off; the
    /// kernel's end with [`KERNEL_END_ADDRESS`], `accept_local=1`, `rp_filter=2` and the
    /// spec's routes (if it names any).
    pub fn setup(spec: &HostPairSpec) -> Result<HostPair, HostPairError> {
        spec.validate()?;
        let mut nl = Netlink::open().map_err(netlink_error("open a route-netlink socket"))?;
        let (kernel, kxdp) = Self::create(&mut nl, spec)?;
        // Through route netlink, not /proc/sys: a DaemonSet container that is not privileged
        // has CAP_NET_ADMIN but /proc/sys mounted read-only.
        //
        // kxdp's answers to a host process's NodePort connection come from the node's own
        // address (the NodePort's) to the node's own address: the kernel accepts such a
        // packet only where accept_local is set.
        //
        // Packets for the node that kxdp hands over arrive here while the kernel's route
        // back to their source may be the uplink: loose reverse-path filtering (RFC 3704).
        // The kernel applies the larger of this and conf/all, and 2 is the largest.
        //
        // IPv6 needs neither: it has no reverse-path filter of its own and accepts a local
        // source address on any interface.
        let settings = [(Ipv4DevConf::AcceptLocal, 1), (Ipv4DevConf::RpFilter, 2)];
        nl.set_ipv4_conf(kernel.index, &settings)
            .map_err(netlink_error(format!(
                "set {}'s accept_local=1 and rp_filter=2",
                kernel.name
            )))?;
        for link in [&kernel, &kxdp] {
            // kxdp rewrites with incremental checksums and never segments: the kernel must
            // hand it whole frames with full checksums.
            netconf::offload::disable(link.index)
                .map_err(netlink_error(format!("turn {}'s offloads off", link.name)))?;
            nl.set_up(link.index, None)
                .map_err(netlink_error(format!("set {} up", link.name)))?;
        }
        nl.replace_address(kernel.index, IpNet::V4(KERNEL_END_ADDRESS), true)
            .map_err(netlink_error(format!(
                "add {KERNEL_END_ADDRESS} to {}",
                kernel.name
            )))?;
        let pair = HostPair {
            spec: spec.clone(),
            kernel_index: kernel.index,
            kxdp_index: kxdp.index,
            synced: Mutex::new(None),
        };
        if !spec.routes.is_empty() {
            pair.sync_routes(&spec.routes)?;
        }
        Ok(pair)
    }

    /// The two ends, reused if they are the pair asked for, else (re)created.
    fn create(nl: &mut Netlink, spec: &HostPairSpec) -> Result<(Link, Link), HostPairError> {
        let lookup = |nl: &mut Netlink, name: &str| {
            nl.link_by_name(name)
                .map_err(netlink_error(format!("look {name} up")))
        };
        let kernel = lookup(nl, &spec.kernel_end)?;
        let kxdp = lookup(nl, &spec.kxdp_end)?;
        if let (Some(k), Some(x)) = (&kernel, &kxdp) {
            if is_veth(k)
                && is_veth(x)
                && k.peer == Some(x.index)
                && x.peer == Some(k.index)
                && x.rx_queues == spec.queues
            {
                log::info!("host pair {}/{}: there already, reused", k.name, x.name);
                return Ok((k.clone(), x.clone()));
            }
        }
        // Refuse before deleting anything.
        for link in kernel.iter().chain(&kxdp) {
            if !is_veth(link) {
                return Err(HostPairError::NameTaken {
                    name: link.name.clone(),
                    kind: link.kind.clone().unwrap_or_else(|| "device".into()),
                });
            }
        }
        for link in kernel.iter().chain(&kxdp) {
            log::warn!(
                "host pair: {} is left from an earlier run in another shape; recreating it",
                link.name
            );
            match nl.delete_link(link.index) {
                // Gone with its peer, deleted just before.
                Err(e) if e.raw_os_error() == Some(libc_enodev()) => {}
                other => other.map_err(netlink_error(format!("delete {}", link.name)))?,
            }
        }
        nl.create_veth_here(&spec.kernel_end, &spec.kxdp_end, spec.queues)
            .map_err(netlink_error(format!(
                "create the veth pair {}/{}",
                spec.kernel_end, spec.kxdp_end
            )))?;
        let kernel = lookup(nl, &spec.kernel_end)?;
        let kxdp = lookup(nl, &spec.kxdp_end)?;
        match (kernel, kxdp) {
            (Some(k), Some(x)) => {
                log::info!(
                    "host pair {}/{} created ({} queues)",
                    k.name,
                    x.name,
                    spec.queues
                );
                Ok((k, x))
            }
            _ => Err(HostPairError::Netlink {
                what: format!("find {}/{} just created", spec.kernel_end, spec.kxdp_end),
                source: io::Error::from(io::ErrorKind::NotFound),
            }),
        }
    }

    /// kxdp's end: the workers' host port.
    pub fn kxdp_end(&self) -> &str {
        &self.spec.kxdp_end
    }

    /// The kernel's end, where the routes go.
    pub fn kernel_end(&self) -> &str {
        &self.spec.kernel_end
    }

    /// Makes the routes through the kernel's end exactly `routes` (each with its family's
    /// source): adds or replaces what is missing or differs, deletes what is no longer
    /// wanted. Routes elsewhere, and the kernel's own on this link, are left alone. Does
    /// nothing when `routes` are those of the last successful sync.
    pub fn sync_routes(&self, routes: &[IpNet]) -> Result<(), HostPairError> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let want = wanted_routes(routes, &self.spec.sources);
        if synced.as_ref() == Some(&want) {
            return Ok(());
        }
        let unsourced: Vec<String> = routes
            .iter()
            .filter(|r| !want.contains_key(&r.trunc()))
            .map(|r| r.to_string())
            .collect();
        if !unsourced.is_empty() {
            log::warn!(
                "host pair: no route for {} through {}: the node has no address of that family",
                unsourced.join(", "),
                self.spec.kernel_end
            );
        }
        let mut nl = Netlink::open().map_err(netlink_error("open a route-netlink socket"))?;
        let mut have = BTreeMap::new();
        for v6 in [false, true] {
            let routes = nl.routes(v6).map_err(netlink_error("list the routes"))?;
            for r in routes {
                if r.oif == Some(self.kernel_index) && r.protocol != RTPROT_KERNEL && r.gw.is_none()
                {
                    have.insert(r.dst, r.src);
                }
            }
        }
        for dst in have.keys() {
            if !want.contains_key(dst) {
                match nl.delete_route(*dst, self.kernel_index) {
                    Err(e) if e.raw_os_error() == Some(libc_esrch()) => {}
                    other => other.map_err(netlink_error(format!(
                        "delete the route to {dst} through {}",
                        self.spec.kernel_end
                    )))?,
                }
            }
        }
        for (dst, src) in &want {
            if have.get(dst) != Some(&Some(*src)) {
                nl.replace_route(*dst, self.kernel_index, Some(*src))
                    .map_err(netlink_error(format!(
                    "route {dst} through {} with source {src} (is {src} an address of this node?)",
                    self.spec.kernel_end
                )))?;
            }
        }
        log::info!(
            "host pair: routes through {}: {}",
            self.spec.kernel_end,
            want.iter()
                .map(|(d, s)| format!("{d} src {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        *synced = Some(want);
        Ok(())
    }

    /// Deletes the pair (its routes go with it). Gone already is fine; an interface of that
    /// name that is not this pair any more is left alone.
    pub fn teardown(&self) -> Result<(), HostPairError> {
        let mut nl = Netlink::open().map_err(netlink_error("open a route-netlink socket"))?;
        for (name, index) in [
            (&self.spec.kernel_end, self.kernel_index),
            (&self.spec.kxdp_end, self.kxdp_index),
        ] {
            let link = nl
                .link_by_name(name)
                .map_err(netlink_error(format!("look {name} up")))?;
            if link.is_some_and(|l| l.index == index) {
                match nl.delete_link(index) {
                    Err(e) if e.raw_os_error() == Some(libc_enodev()) => {}
                    other => other.map_err(netlink_error(format!("delete {name}")))?,
                }
                log::info!(
                    "host pair {}/{} deleted, its routes with it",
                    self.spec.kernel_end,
                    self.spec.kxdp_end
                );
                break;
            }
        }
        Ok(())
    }
}

/// The routes the host pair carries for tables of `spec`: the cluster's pod networks and
/// Service ranges, each once.
pub fn routes_of(spec: &nat::spec::TableSpec) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = spec
        .cluster
        .cluster_cidrs
        .iter()
        .chain(&spec.cluster.service_cidrs)
        .map(IpNet::trunc)
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

/// Each of `routes` (as a network) with the first of `sources` of its family; routes of a
/// family without a source are left out.
fn wanted_routes(routes: &[IpNet], sources: &[IpAddr]) -> BTreeMap<IpNet, IpAddr> {
    let v4 = sources.iter().find(|a| a.is_ipv4()).copied();
    let v6 = sources.iter().find(|a| a.is_ipv6()).copied();
    routes
        .iter()
        .filter_map(|r| {
            let src = match r {
                IpNet::V4(_) => v4,
                IpNet::V6(_) => v6,
            }?;
            Some((r.trunc(), src))
        })
        .collect()
}

/// The node's addresses on `ifname` that can be a route's source: global ones (no
/// loopback, no link-local), in the order the kernel lists them.
pub fn node_addresses(ifname: &str) -> Result<Vec<IpAddr>, HostPairError> {
    let mut nl = Netlink::open().map_err(netlink_error("open a route-netlink socket"))?;
    let link = nl
        .link_by_name(ifname)
        .map_err(netlink_error(format!("look {ifname} up")))?
        .ok_or_else(|| HostPairError::Netlink {
            what: format!("look {ifname} up"),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
    let addresses = nl
        .addresses(link.index)
        .map_err(netlink_error(format!("list {ifname}'s addresses")))?;
    Ok(addresses
        .into_iter()
        .map(|a| a.addr())
        .filter(|a| match a {
            IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
            IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local(),
        })
        .collect())
}

fn is_veth(link: &Link) -> bool {
    link.kind.as_deref() == Some("veth")
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("literal")).collect()
    }

    #[test]
    fn routes_take_their_family_source_and_skip_a_family_without_one() {
        let routes = nets(&["10.244.0.0/16", "fd00:10:244::/48", "172.30.1.2/16"]);
        let v4: IpAddr = "192.168.1.10".parse().unwrap();
        let v6: IpAddr = "fd00::10".parse().unwrap();
        let both = wanted_routes(&routes, &[v4, v6]);
        assert_eq!(
            both.into_iter().collect::<Vec<_>>(),
            vec![
                ("10.244.0.0/16".parse().unwrap(), v4),
                ("172.30.0.0/16".parse().unwrap(), v4),
                ("fd00:10:244::/48".parse().unwrap(), v6),
            ]
        );
        let only_v4 = wanted_routes(&routes, &[v4]);
        assert_eq!(only_v4.len(), 2);
        assert!(only_v4.values().all(|s| *s == v4));
        assert!(wanted_routes(&routes, &[]).is_empty());
    }

    #[test]
    fn the_tables_routes_are_the_pod_networks_and_service_ranges_once() {
        let mut spec = nat::spec::TableSpec::default();
        spec.cluster.cluster_cidrs = nets(&["10.244.0.0/16", "fd00:10:244::/48"]);
        spec.cluster.service_cidrs = nets(&["10.96.0.1/12", "10.244.0.0/16"]);
        assert_eq!(
            routes_of(&spec),
            nets(&["10.96.0.0/12", "10.244.0.0/16", "fd00:10:244::/48"])
        );
    }

    #[test]
    fn names_the_kernel_would_refuse_are_refused() {
        let ok = HostPairSpec::named("kxhost", 2, Vec::new()).unwrap();
        assert_eq!(ok.kxdp_end, "kxhost-xdp");
        for bad in ["", "a-name-too-long", "a/b", "a b", "a:b"] {
            assert!(
                matches!(
                    HostPairSpec::named(bad, 1, Vec::new()),
                    Err(HostPairError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            HostPairSpec::named("kxhost", 0, Vec::new()),
            Err(HostPairError::NoQueues)
        ));
    }
}
