//! The state workers share: the current tables (swapped whole, read without locks), the
//! connection table and the neighbour table.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use nat::conntrack::Conntrack;
use nat::policy::{PolicyTable, PolicyType};
use nat::spec::{TableDelta, TableSpec};
use nat::tables::{BuildFastHasher, ServiceTable};

use crate::counters::Published;

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

/// The compiled tables of one generation: everything a worker looks up per packet.
pub struct Tables {
    /// Control's generation number.
    pub generation: u64,
    /// Service frontends and backends.
    pub services: ServiceTable,
    /// Local pods by address.
    pub local_pods: HashMap<IpAddr, Arc<str>, BuildFastHasher>,
    /// The node's pod networks.
    pub pod_cidrs: Vec<IpNet>,
    /// The pods' IPv4 gateway: the first address of the node's IPv4 pod network.
    pub gateway_v4: Option<Ipv4Addr>,
    /// The pods' IPv6 gateway: the first address of the node's IPv6 pod network.
    pub gateway_v6: Option<Ipv6Addr>,
    /// The node's own addresses.
    pub node_addresses: Vec<IpAddr>,
    /// Routes to other nodes' pod networks through the overlay.
    pub remote: RemoteRoutes,
    /// The overlay's settings, when the node has an IPv4 VTEP address.
    pub overlay: Option<crate::vxlan::Overlay>,
    /// NetworkPolicy of this node's pods, as control compiled it (shared with the next
    /// generation when a delta leaves it as it is).
    pub policy: Arc<PolicyTable>,
    /// Whether any pod is isolated (else new connections skip the policy lookup).
    pub policy_active: bool,
    /// Drop counters of the pods and policies in [`Tables::policy`].
    pub policy_drops: PolicyDrops,
    /// The spec these tables were compiled from (for inspection and diffs).
    pub spec: TableSpec,
}

/// Connections refused by NetworkPolicy, counted per pod and direction and per policy
/// isolating the pod. The counters live in [`Shared`] by name, so they keep counting across
/// table generations; a generation holds them by index for the packet path.
#[derive(Clone, Default)]
pub struct PolicyDrops {
    /// By pod index of [`Tables::policy`]: ingress, egress.
    pods: Vec<[Arc<AtomicU64>; 2]>,
    /// By policy index.
    policies: Vec<Arc<AtomicU64>>,
}

impl PolicyDrops {
    fn build(policy: &PolicyTable, registry: &Mutex<BTreeMap<String, Arc<AtomicU64>>>) -> Self {
        let mut reg = registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut counter = |name: String| reg.entry(name).or_default().clone();
        let pods = (0..policy.pod_count() as u32)
            .map(|i| {
                let pod = policy.pod_name(i);
                [
                    counter(format!("pod {pod} ingress")),
                    counter(format!("pod {pod} egress")),
                ]
            })
            .collect();
        let policies = policy
            .policies()
            .iter()
            .map(|p| counter(format!("policy {p}")))
            .collect();
        PolicyDrops { pods, policies }
    }

    /// Counts a connection to (ingress) or from (egress) the pod at `pod_ip` refused: on
    /// the pod and on every policy isolating it in that direction.
    pub fn count(&self, policy: &PolicyTable, ty: PolicyType, pod_ip: IpAddr) {
        let Some(i) = policy.pod_index(pod_ip) else {
            return;
        };
        let dir = match ty {
            PolicyType::Ingress => 0,
            PolicyType::Egress => 1,
        };
        if let Some(c) = self.pods.get(i as usize) {
            c[dir].fetch_add(1, Ordering::Relaxed);
        }
        for &p in policy.isolating(ty, i) {
            if let Some(c) = self.policies.get(p as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The node's routes out of the uplink (connected networks and gateways, IPv4 and IPv6),
/// as the kernel of the node's namespace has them at start: where traffic leaving the
/// cluster goes next. Longest prefix first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UplinkRoutes {
    routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// `RTF_*` flags of `/proc/net/ipv6_route` (include/uapi/linux/ipv6_route.h).
const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

impl UplinkRoutes {
    /// Routes from (network, gateway) pairs; no gateway means on-link.
    pub fn new(routes: Vec<(ipnet::Ipv4Net, Option<Ipv4Addr>)>) -> UplinkRoutes {
        UplinkRoutes::of(
            routes
                .into_iter()
                .map(|(n, g)| (IpNet::V4(n), g.map(IpAddr::V4)))
                .collect(),
        )
    }

    /// Routes of either family from (network, gateway) pairs; no gateway means on-link.
    pub fn of(mut routes: Vec<(IpNet, Option<IpAddr>)>) -> UplinkRoutes {
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        UplinkRoutes { routes }
    }

    /// Reads the routes through `ifname` from `/proc/net/route` and `/proc/net/ipv6_route`
    /// (this network namespace's); a file that cannot be read gives no routes.
    pub fn from_kernel(ifname: &str) -> UplinkRoutes {
        let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        let mut routes = UplinkRoutes::parse(&v4, ifname).routes;
        routes.extend(UplinkRoutes::parse_v6(&v6, ifname).routes);
        UplinkRoutes::of(routes)
    }

    /// Parses `/proc/net/route` text (addresses in host-order hex of the kernel's
    /// little-endian layout).
    pub fn parse(text: &str, ifname: &str) -> UplinkRoutes {
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| Ipv4Addr::from(v.swap_bytes()))
        };
        let mut routes = Vec::new();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] != ifname {
                continue;
            }
            let (Some(dst), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
                continue;
            };
            let Ok(net) = ipnet::Ipv4Net::with_netmask(dst, mask) else {
                continue;
            };
            let gw = (!gw.is_unspecified()).then_some(gw);
            routes.push((net.trunc(), gw));
        }
        UplinkRoutes::new(routes)
    }

    /// Parses `/proc/net/ipv6_route` text: destination, prefix length, source, its length,
    /// next hop, metric, reference count, use, flags, device; addresses as 32 hex digits.
    /// Local, anycast and reject routes, and multicast and link-local destinations, are
    /// left out: none is where a packet leaving the cluster goes.
    pub fn parse_v6(text: &str, ifname: &str) -> UplinkRoutes {
        let addr = |s: &str| {
            (s.len() == 32)
                .then(|| u128::from_str_radix(s, 16).ok())
                .flatten()
                .map(Ipv6Addr::from)
        };
        let mut routes = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9] != ifname {
                continue;
            }
            let (Some(dst), Ok(len), Some(hop), Ok(flags)) = (
                addr(f[0]),
                u8::from_str_radix(f[1], 16),
                addr(f[4]),
                u32::from_str_radix(f[8], 16),
            ) else {
                continue;
            };
            if flags & RTF_UP == 0 || flags & (RTF_REJECT | RTF_ANYCAST | RTF_LOCAL) != 0 {
                continue;
            }
            let Ok(net) = ipnet::Ipv6Net::new(dst, len) else {
                continue;
            };
            if dst.is_multicast() || (dst.segments()[0] & 0xffc0) == 0xfe80 {
                continue;
            }
            let hop = (!hop.is_unspecified()).then_some(IpAddr::V6(hop));
            routes.push((IpNet::V6(net.trunc()), hop));
        }
        UplinkRoutes::of(routes)
    }

    /// The address to resolve for a packet to `dst`: `dst` itself on a connected network,
    /// a gateway otherwise; `None` without a route.
    pub fn next_hop(&self, dst: IpAddr) -> Option<IpAddr> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|(_, gw)| gw.unwrap_or(dst))
    }

    /// Whether there is no route.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod uplink_route_tests {
    use super::*;

    #[test]
    fn ipv6_routes_of_the_uplink_only_and_not_the_local_ones() {
        // From a namespace like the lab's node: a connected /64, a default route via a
        // link-local router, the kernel's link-local and local and multicast entries, a
        // route through another interface, and a line cut short.
        let text = "\
fd00019201680000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
fd000192016800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 kxup0
fd000192016800000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 kxup0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000004 00000000 00000001 kxup0
fd001024400000000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 kxhost
";
        let r = UplinkRoutes::parse_v6(text, "kxup0");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.next_hop(ip("fd00:192:168::1")),
            Some(ip("fd00:192:168::1")),
            "on-link"
        );
        assert_eq!(
            r.next_hop(ip("2001:db8::9")),
            Some(ip("fe80::1")),
            "the default router"
        );
        assert_eq!(r.routes.len(), 2, "{r:?}");
        assert_eq!(r.next_hop(ip("192.0.2.1")), None);
    }
}

/// A route to another node's pod network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRoute {
    /// The node's VTEP (outer destination).
    pub vtep: Ipv4Addr,
    /// The node's VTEP MAC (inner destination).
    pub vtep_mac: [u8; 6],
}

/// Longest-prefix match over the other nodes' pod networks: one hash map per prefix length
/// (a cluster uses one or two, /24 and /64 typically), longest first.
#[derive(Clone, Debug, Default)]
pub struct RemoteRoutes {
    by_len: Vec<(u8, bool, HashMap<u128, RemoteRoute, BuildFastHasher>)>,
}

fn masked(ip: IpAddr, len: u8) -> u128 {
    match ip {
        IpAddr::V4(a) => {
            let v = u32::from(a) as u128;
            if len == 0 {
                0
            } else {
                v & ((u32::MAX << (32 - len as u32)) as u128)
            }
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            if len == 0 {
                0
            } else {
                v & (u128::MAX << (128 - len as u32))
            }
        }
    }
}

impl RemoteRoutes {
    /// Builds the routes of `nodes`.
    pub fn build(nodes: &[nat::spec::RemoteNodeSpec]) -> RemoteRoutes {
        let mut r = RemoteRoutes::default();
        for n in nodes {
            let IpAddr::V4(vtep) = n.vtep_ip else {
                continue;
            };
            for net in &n.pod_cidrs {
                let (len, v6) = (net.prefix_len(), net.addr().is_ipv6());
                let idx = match r.by_len.iter().position(|(l, f, _)| *l == len && *f == v6) {
                    Some(i) => i,
                    None => {
                        r.by_len
                            .push((len, v6, HashMap::with_hasher(BuildFastHasher)));
                        r.by_len.len() - 1
                    }
                };
                r.by_len[idx].2.insert(
                    masked(net.addr(), len),
                    RemoteRoute {
                        vtep,
                        vtep_mac: n.vtep_mac,
                    },
                );
            }
        }
        r.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
        r
    }

    /// The node whose pod network holds `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<RemoteRoute> {
        let v6 = ip.is_ipv6();
        self.by_len
            .iter()
            .filter(|(_, f, _)| *f == v6)
            .find_map(|(len, _, m)| m.get(&masked(ip, *len)).copied())
    }
}

impl Tables {
    /// Compiles a spec; `uplink_mac` is the MAC of the node's uplink (the VTEP MAC when the
    /// node announces none).
    pub fn compile(
        generation: u64,
        spec: TableSpec,
        ring_size: (u32, bool),
        uplink_mac: Option<[u8; 6]>,
    ) -> Tables {
        let services = ServiceTable::build_with(&spec, ring_size.0, ring_size.1);
        let local_pods = local_pods(&spec.local_pods);
        let gateway_v4 = spec.node.pod_cidrs.iter().find_map(|n| match n {
            IpNet::V4(n) => n.hosts().next(),
            IpNet::V6(_) => None,
        });
        let gateway_v6 = spec.node.pod_cidrs.iter().find_map(|n| match n {
            IpNet::V6(n) => {
                let base = u128::from(n.network());
                Some(Ipv6Addr::from(base + 1))
            }
            IpNet::V4(_) => None,
        });
        let overlay = match (spec.node.vtep_ip, uplink_mac) {
            (Some(IpAddr::V4(ip)), Some(mac)) => Some(crate::vxlan::Overlay {
                vni: spec.cluster.vxlan_vni,
                port: spec.cluster.vxlan_port,
                local_vtep_ip: ip,
                local_vtep_mac: spec.node.vtep_mac.unwrap_or(mac),
                uplink_mac: mac,
            }),
            _ => None,
        };
        let policy = Arc::new(PolicyTable::build(&spec.policy));
        Tables {
            generation,
            policy_active: !policy.is_empty(),
            policy,
            policy_drops: PolicyDrops::default(),
            remote: RemoteRoutes::build(&spec.remote_nodes),
            overlay,
            services,
            local_pods,
            pod_cidrs: spec.node.pod_cidrs.clone(),
            gateway_v4,
            gateway_v6,
            node_addresses: spec.node.addresses.clone(),
            spec,
        }
    }

    /// The tables of `generation`: these with `delta` applied. Only what the delta
    /// names is compiled again — the Service ports it upserts, and the pods, remote nodes
    /// or policy when it carries them — the rest is shared with these tables. A delta that
    /// changes the node or the cluster settings (on which every Service port's compiled
    /// form depends) compiles everything.
    pub fn updated(
        &self,
        generation: u64,
        delta: &TableDelta,
        ring_size: (u32, bool),
        uplink_mac: Option<[u8; 6]>,
    ) -> Result<Tables, String> {
        self.spec
            .validate_delta(delta)
            .map_err(|e| format!("table generation {generation}: {e}"))?;
        let spec = self
            .spec
            .apply(delta)
            .map_err(|e| format!("table generation {generation}: {e}"))?;
        if delta.node.is_some() || delta.cluster.is_some() {
            return Ok(Tables::compile(generation, spec, ring_size, uplink_mac));
        }
        let services = self
            .services
            .updated(&self.spec, delta, &spec, ring_size.0, ring_size.1)
            .map_err(|e| format!("table generation {generation}: {e}"))?;
        let local_pods = match &delta.local_pods {
            Some(pods) => local_pods(pods),
            None => self.local_pods.clone(),
        };
        let (policy, policy_drops) = match &delta.policy {
            Some(p) => (Arc::new(PolicyTable::build(p)), PolicyDrops::default()),
            None => (self.policy.clone(), self.policy_drops.clone()),
        };
        let remote = match &delta.remote_nodes {
            Some(nodes) => RemoteRoutes::build(nodes),
            None => self.remote.clone(),
        };
        Ok(Tables {
            generation,
            services,
            local_pods,
            pod_cidrs: self.pod_cidrs.clone(),
            gateway_v4: self.gateway_v4,
            gateway_v6: self.gateway_v6,
            node_addresses: self.node_addresses.clone(),
            remote,
            overlay: self.overlay,
            policy_active: !policy.is_empty(),
            policy,
            policy_drops,
            spec,
        })
    }

    /// Empty tables: before control speaks, nothing is translated.
    pub fn empty() -> Tables {
        Tables::compile(0, TableSpec::default(), (13, false), None)
    }

    /// Whether `ip` is one of the addresses the dataplane itself owns (gateways).
    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.gateway_v4 == Some(a),
            IpAddr::V6(a) => self.gateway_v6 == Some(a),
        }
    }

    /// The source of pod traffic masqueraded out of the cluster: the node's first address of
    /// the family (its InternalIP, as flannel's ipMasq uses).
    pub fn egress_source(&self, family_v6: bool) -> Option<IpAddr> {
        self.node_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == family_v6)
    }

    /// Whether `ip` is in this node's pod networks.
    pub fn in_local_pod_network(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is in the cluster's pod networks (this node's or another's).
    pub fn in_cluster_network(&self, ip: IpAddr) -> bool {
        self.services.cluster_cidrs.iter().any(|n| n.contains(&ip))
    }

    /// The address used as masquerade source towards pods of this node (the gateway of the
    /// family), falling back to a node address.
    pub fn masquerade_source(&self, family_v6: bool) -> Option<IpAddr> {
        let gw = if family_v6 {
            self.gateway_v6.map(IpAddr::V6)
        } else {
            self.gateway_v4.map(IpAddr::V4)
        };
        gw.or_else(|| {
            self.node_addresses
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == family_v6)
        })
    }
}

/// Local pods by address.
fn local_pods(pods: &[nat::spec::PodSpec]) -> HashMap<IpAddr, Arc<str>, BuildFastHasher> {
    let mut by_ip = HashMap::with_hasher(BuildFastHasher);
    for p in pods {
        let name: Arc<str> = Arc::from(p.name.as_str());
        for ip in &p.ips {
            by_ip.insert(*ip, name.clone());
        }
    }
    by_ip
}

/// kxdp's own IPv6 link-local address on the uplink, from the uplink's MAC:
/// `fe80::6b78:6470:` ("kxdp") and the MAC's last four bytes. It is not the kernel's
/// (EUI-64, `…ff:fe…`), so neighbour discovery kxdp does from it is answered to kxdp: the
/// uplink's filter takes what is addressed to it, and leaves the kernel's to the kernel.
pub fn uplink_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0x6b78,
        0x6470,
        u16::from_be_bytes([mac[2], mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// A neighbour: where an address lives and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbor {
    /// The port it is reached on.
    pub port: usize,
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// How long a learned neighbour is trusted before it is solicited again (it stays in use
/// meanwhile, like the kernel's STALE state). The kernel's `base_reachable_time` is 30 s.
pub const NEIGHBOR_REFRESH: u64 = 30 * 1_000_000_000;

/// Learned neighbours. Read per packet without locks; written (copy on write) only when a
/// neighbour appears, moves, or is re-confirmed after [`NEIGHBOR_REFRESH`], which is rare.
#[derive(Default)]
pub struct Neighbors {
    map: ArcSwap<HashMap<IpAddr, (Neighbor, u64), BuildFastHasher>>,
}

impl Neighbors {
    /// Where `ip` lives, if learned.
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<Neighbor> {
        self.map.load().get(ip).map(|e| e.0)
    }

    /// Records `ip` at `n`, seen at `now`, unless that is already known and fresh.
    pub fn learn(&self, ip: IpAddr, n: Neighbor, now: u64) {
        if let Some((known, at)) = self.map.load().get(&ip) {
            if *known == n && now.saturating_sub(*at) < NEIGHBOR_REFRESH / 2 {
                return;
            }
        }
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(ip, (n, now));
            m
        });
    }

    /// Neighbours not confirmed for [`NEIGHBOR_REFRESH`]: to be solicited again.
    pub fn stale(&self, now: u64) -> Vec<IpAddr> {
        self.map
            .load()
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) >= NEIGHBOR_REFRESH)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Forgets neighbours not confirmed for `max_age`.
    pub fn expire(&self, now: u64, max_age: u64) {
        if self
            .map
            .load()
            .values()
            .all(|(_, at)| now.saturating_sub(*at) < max_age)
        {
            return;
        }
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, (_, at)| now.saturating_sub(*at) < max_age);
            m
        });
    }

    /// Forgets every neighbour on `port` (a pod interface that went); returns their
    /// addresses.
    pub fn forget_port(&self, port: usize) -> Vec<IpAddr> {
        let gone: Vec<IpAddr> = self
            .map
            .load()
            .iter()
            .filter(|(_, (n, _))| n.port == port)
            .map(|(ip, _)| *ip)
            .collect();
        if !gone.is_empty() {
            self.map.rcu(|m| {
                let mut m = HashMap::clone(m);
                m.retain(|_, (n, _)| n.port != port);
                m
            });
        }
        gone
    }

    /// Every neighbour (for inspection).
    pub fn all(&self) -> Vec<(IpAddr, Neighbor)> {
        self.map.load().iter().map(|(k, v)| (*k, v.0)).collect()
    }
}

/// Settings fixed at start.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Maglev ring size (a prime).
    pub ring_size: u32,
    /// Size each ring by its backend count (at most `ring_size`) instead of using
    /// `ring_size` for every Service (see `nat::tables::RING_LADDER`).
    pub ring_scaled: bool,
    /// Conntrack capacity.
    pub conntrack_capacity: usize,
    /// Session-affinity records (clients remembered across all Services).
    pub affinity_capacity: usize,
    /// Source ports (inclusive) for pod traffic masqueraded to the node's address on its
    /// way out of the cluster: outside the kernel's ephemeral range (`ip_local_port_range`,
    /// 32768–60999 by default), so they never collide with the node's own connections.
    pub egress_masquerade_ports: (u16, u16),
    /// Pod interfaces that may be attached at run time, beyond the ports given at start.
    pub max_pods: usize,
}

/// Pod interfaces a node attaches at most by default: the kubelet's default of 110 pods per
/// node. Each costs every worker 128 UMEM chunks (512 KiB) and one socket's rings.
pub const DEFAULT_MAX_PODS: usize = 110;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ring_size: nat::maglev::DEFAULT_RING_SIZE,
            ring_scaled: false,
            conntrack_capacity: 1 << 20,
            affinity_capacity: 1 << 16,
            egress_masquerade_ports: DEFAULT_EGRESS_MASQUERADE_PORTS,
            max_pods: DEFAULT_MAX_PODS,
        }
    }
}

/// What became of a delta from control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied; `retire` says whether stale flows should be retired now.
    Applied {
        /// A UDP or SCTP Service port changed, or the node did.
        retire: bool,
    },
    /// The tables in use are not the delta's base: they are generation `have`.
    Stale {
        /// The generation in use.
        have: u64,
    },
}

/// Whether applying `delta` to `spec` may leave a UDP or SCTP connection on a backend that
/// no longer serves its Service, or on a frontend that is gone: only then is every tracked
/// connection looked at ([`Shared::retire_stale_flows`], about 90 ms at 900k connections).
/// A delta that only adds endpoints, or changes TCP Services, strands nothing.
fn may_strand_datagram_flows(spec: &TableSpec, delta: &TableDelta) -> bool {
    use nat::spec::Protocol;
    if delta.node.is_some() || delta.cluster.is_some() {
        return true;
    }
    let old = |key: (&str, Protocol, bool)| {
        spec.services
            .binary_search_by(|s| s.key_ref().cmp(&key))
            .ok()
            .map(|i| &spec.services[i])
    };
    let serving = |s: &nat::spec::ServiceSpec| -> std::collections::HashSet<(IpAddr, u16)> {
        s.all_endpoints
            .iter()
            .filter(|e| e.serving)
            .map(|e| (e.ip, e.port))
            .collect()
    };
    delta.removed.iter().any(|k| k.protocol != Protocol::Tcp)
        || delta.upserted.iter().any(|new| {
            new.protocol != Protocol::Tcp
                && old(new.key_ref()).is_some_and(|old| {
                    old.frontends != new.frontends || !serving(old).is_subset(&serving(new))
                })
        })
}

/// A function called with each installed table.
pub type InstallHook = Box<dyn Fn(&Tables) + Send + Sync>;

/// The default of [`Limits::egress_masquerade_ports`]: above the kernel's ephemeral range.
pub const DEFAULT_EGRESS_MASQUERADE_PORTS: (u16, u16) = (61000, 65535);

/// A per-process secret from the standard library's randomly keyed hasher.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x6b78_6470u64)
}

/// Everything the workers of one dataplane share.
pub struct Shared {
    /// The current tables.
    pub tables: ArcSwap<Tables>,
    /// The connection table.
    pub conntrack: Conntrack,
    /// Learned neighbours.
    pub neighbors: Neighbors,
    /// ClientIP session affinity records.
    pub affinity: nat::affinity::AffinityTable,
    /// The ports, by index (equal on every worker): those given at start and pods
    /// attached at run time.
    pub ports: crate::ports::Ports,
    /// Per-worker published counters.
    pub counters: Vec<Published>,
    /// Start-up settings.
    pub limits: Limits,
    /// The MAC of the next hop behind the uplink (learned from IP traffic arriving there);
    /// 0 while unknown.
    pub uplink_next_hop: std::sync::atomic::AtomicU64,
    /// The MAC of the kernel's end of the host pair (learned from the frames it sends);
    /// 0 while unknown.
    pub host_kernel_mac: std::sync::atomic::AtomicU64,
    /// The uplink's port index, if there is one.
    pub uplink: Option<usize>,
    /// The host port's index, if there is one.
    pub host: Option<usize>,
    /// The node's routes out of the uplink, for traffic leaving the cluster.
    pub uplink_routes: ArcSwap<UplinkRoutes>,
    /// NetworkPolicy drop counters by name (`pod ns/name ingress`, `policy ns/name`).
    pub policy_drops: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    /// The flow monitor's rings.
    pub monitor: crate::monitor::Monitor,
    /// Tables control sent that failed validation (refused whole, with a reason).
    pub refused_tables: AtomicU64,
    /// Called with every newly installed table whose frontends, node or cluster settings
    /// may differ from the last one's (the binary keeps the uplink's XDP filter in step
    /// with them; a delta that only moves endpoints does not call it).
    pub on_install: Mutex<Option<InstallHook>>,
    /// Where a handover request goes: the process's main thread, which is given the
    /// successor's connection, stops the workers and writes the state on it.
    pub handover: Mutex<Option<std::sync::mpsc::Sender<crate::handover::Successor>>>,
    /// Attaches and detaches pod interfaces at run time (set by the binary, which owns
    /// the interfaces; absent in memory).
    pub pods: std::sync::OnceLock<crate::pods::PodPorts>,
}

impl Shared {
    /// State for `workers` workers on `ports`.
    pub fn new(ports: Vec<PortConfig>, workers: usize, limits: Limits) -> Shared {
        let uplink = ports.iter().position(|p| p.role == PortRole::Uplink);
        let host = ports.iter().position(|p| p.role == PortRole::Host);
        Shared {
            uplink,
            host,
            uplink_next_hop: std::sync::atomic::AtomicU64::new(0),
            host_kernel_mac: std::sync::atomic::AtomicU64::new(0),
            tables: ArcSwap::from_pointee(Tables::empty()),
            conntrack: Conntrack::with_seed(limits.conntrack_capacity, random_seed()),
            neighbors: Neighbors::default(),
            affinity: nat::affinity::AffinityTable::new(limits.affinity_capacity),
            ports: crate::ports::Ports::new(ports.clone(), workers, ports.len() + limits.max_pods),
            counters: (0..workers).map(|_| Published::default()).collect(),
            limits,
            policy_drops: Mutex::new(BTreeMap::new()),
            uplink_routes: ArcSwap::from_pointee(UplinkRoutes::default()),
            monitor: crate::monitor::Monitor::new(workers),
            handover: Mutex::new(None),
            pods: std::sync::OnceLock::new(),
            on_install: Mutex::new(None),
            refused_tables: AtomicU64::new(0),
        }
    }

    /// Installs a new table generation: compile, swap, then retire flows the new tables
    /// no longer allow (UDP to endpoints that are gone, so the next datagram picks a live
    /// one). Workers are never stopped.
    pub fn install(&self, generation: u64, spec: TableSpec, now: u64) {
        self.install_tables(generation, spec);
        self.retire_stale_flows(now);
    }

    /// Compiles `spec` and swaps it in; the caller retires stale flows
    /// ([`Shared::retire_stale_flows`]) when it suits it (the control socket does so after
    /// it has answered, so control's wait does not include a sweep of the connection
    /// table). Snapshots from control may list Service ports in any order: they are put in
    /// canonical order here, which deltas rely on.
    pub fn install_tables(&self, generation: u64, mut spec: TableSpec) {
        spec.sort_services();
        let uplink_mac = self.uplink_mac();
        let ring = (self.limits.ring_size, self.limits.ring_scaled);
        let tables = Tables::compile(generation, spec, ring, uplink_mac);
        self.swap_in(tables, true);
    }

    /// Applies control's `delta` to the tables in use, if they are generation `base`
    /// (else [`DeltaOutcome::Stale`], and nothing changes). Returns whether flows may need
    /// retiring (a UDP or SCTP Service port changed or went away).
    pub fn install_delta(
        &self,
        generation: u64,
        base: u64,
        delta: &TableDelta,
    ) -> Result<DeltaOutcome, String> {
        let current = self.tables.load();
        if current.generation != base {
            return Ok(DeltaOutcome::Stale {
                have: current.generation,
            });
        }
        let ring = (self.limits.ring_size, self.limits.ring_scaled);
        let tables = current.updated(generation, delta, ring, self.uplink_mac())?;
        let filter = delta.changes_frontends(&current.spec);
        let retire = may_strand_datagram_flows(&current.spec, delta);
        // A new policy table (carried by the delta, or compiled again with everything
        // when the node or cluster settings changed) needs its drop counters looked up.
        let policy_changed = !Arc::ptr_eq(&tables.policy, &current.policy);
        drop(current);
        let mut tables = tables;
        if policy_changed {
            tables.policy_drops = PolicyDrops::build(&tables.policy, &self.policy_drops);
        }
        self.swap_in_built(tables, filter);
        Ok(DeltaOutcome::Applied { retire })
    }

    fn uplink_mac(&self) -> Option<[u8; 6]> {
        self.uplink
            .and_then(|u| self.ports.load().get(u).map(|p| p.mac))
    }

    fn swap_in(&self, mut tables: Tables, filter: bool) {
        tables.policy_drops = PolicyDrops::build(&tables.policy, &self.policy_drops);
        self.swap_in_built(tables, filter);
    }

    /// Swaps `tables` in, then (when `filter`: frontends or the node may have changed)
    /// tells the install hook.
    fn swap_in_built(&self, tables: Tables, filter: bool) {
        let tables = Arc::new(tables);
        self.tables.store(tables.clone());
        if !filter {
            return;
        }
        if let Some(hook) = self
            .on_install
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(&tables);
        }
    }

    /// The NetworkPolicy drop counters that are not zero, by name.
    pub fn policy_drop_counts(&self) -> Vec<(String, u64)> {
        let reg = self.policy_drops.lock().unwrap_or_else(|e| e.into_inner());
        reg.iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Removes UDP (and SCTP) connections whose backend is no longer a serving endpoint of
    /// their Service (gone, or not serving any more), so the next datagram picks a live
    /// endpoint instead of vanishing into a dead one (kubernetes issues 48370, 59368). TCP
    /// connections keep their backend: a closing endpoint finishes its connections.
    pub fn retire_stale_flows(&self, now: u64) -> usize {
        let tables = self.tables.load();
        self.conntrack.sweep(now, |c| {
            if c.service == 0 || c.original.proto == nat::packet::PROTO_TCP {
                return false;
            }
            let Some(proto) = nat::spec::Protocol::from_number(c.original.proto) else {
                return false;
            };
            // Service ids are per generation: find the Service again by its frontend.
            let key = nat::tables::FrontendKey {
                ip: c.original.dst,
                port: c.original.dport,
                protocol: proto,
            };
            match tables
                .services
                .frontend(&key)
                .and_then(|f| tables.services.service(f.service))
            {
                Some(svc) => !svc
                    .serving_endpoints
                    .iter()
                    .any(|b| b.ip == c.reply.src && b.port == c.reply.sport),
                None => true,
            }
        })
    }
}

#[cfg(test)]
mod retire_tests {
    use super::*;
    use nat::spec::{EndpointSpec, FrontendKind, FrontendSpec, Protocol, ServiceSpec};

    fn svc(protocol: Protocol, port: u16, endpoints: &[(&str, bool)]) -> Arc<ServiceSpec> {
        let eps: Vec<EndpointSpec> = endpoints
            .iter()
            .map(|(ip, serving)| EndpointSpec {
                ip: ip.parse().unwrap(),
                port: 53,
                local: false,
                ready: *serving,
                serving: *serving,
                terminating: !*serving,
            })
            .collect();
        Arc::new(ServiceSpec {
            name: "kube-system/dns:dns".into(),
            protocol,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: "172.30.0.10".parse().unwrap(),
                port,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        })
    }

    fn strands(before: Arc<ServiceSpec>, after: Arc<ServiceSpec>) -> bool {
        let spec = TableSpec {
            services: vec![before],
            ..TableSpec::default()
        };
        let next = TableSpec {
            services: vec![after],
            ..TableSpec::default()
        };
        may_strand_datagram_flows(&spec, &TableDelta::between(&spec, &next))
    }

    #[test]
    fn only_a_lost_serving_endpoint_or_frontend_sends_the_sweep_looking_for_datagram_flows() {
        let (a, b) = ("10.244.1.2", "10.244.1.3");
        let udp = Protocol::Udp;
        // An endpoint added, or one of two going from serving to not: nothing / something.
        assert!(!strands(
            svc(udp, 53, &[(a, true)]),
            svc(udp, 53, &[(a, true), (b, true)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true), (b, true)]),
            svc(udp, 53, &[(a, true), (b, false)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true), (b, true)]),
            svc(udp, 53, &[(a, true)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true)]),
            svc(udp, 5353, &[(a, true)])
        ));
        assert!(!strands(
            svc(udp, 53, &[(a, false)]),
            svc(udp, 53, &[(a, true)])
        ));
        // TCP keeps its backends: a closing endpoint finishes its connections.
        let tcp = Protocol::Tcp;
        assert!(!strands(
            svc(tcp, 53, &[(a, true), (b, true)]),
            svc(tcp, 53, &[(a, true)])
        ));
        // A UDP Service removed, and the node changed: always.
        let spec = TableSpec {
            services: vec![svc(udp, 53, &[(a, true)])],
            ..TableSpec::default()
        };
        let empty = TableSpec::default();
        assert!(may_strand_datagram_flows(
            &spec,
            &TableDelta::between(&spec, &empty)
        ));
        let mut moved = spec.clone();
        moved.node.name = "elsewhere".into();
        assert!(may_strand_datagram_flows(
            &spec,
            &TableDelta::between(&spec, &moved)
        ));
    }
}

#[cfg(test)]
mod policy_drop_tests {
    use super::*;
    use nat::spec::{IsolationSpec, PodPolicySpec, PolicySpec};

    #[test]
    fn drops_are_counted_after_a_delta_that_recompiles_everything() {
        let shared = Shared::new(vec![], 1, Limits::default());
        let pod: IpAddr = "10.244.1.5".parse().unwrap();
        let spec = TableSpec {
            policy: PolicySpec {
                policies: vec!["default/deny".into()],
                pods: vec![PodPolicySpec {
                    pod: "default/web".into(),
                    ips: vec![pod],
                    ingress: Some(IsolationSpec {
                        policies: vec![0],
                        ..IsolationSpec::default()
                    }),
                    egress: None,
                }],
            },
            ..TableSpec::default()
        };
        shared.install_tables(1, spec.clone());
        // The node changes, the policy does not: every table is compiled again.
        let mut moved = spec.clone();
        moved.node.name = "node-b".into();
        let delta = TableDelta::between(&spec, &moved);
        assert!(delta.policy.is_none() && delta.node.is_some());
        assert!(matches!(
            shared.install_delta(2, 1, &delta),
            Ok(DeltaOutcome::Applied { .. })
        ));
        let t = shared.tables.load();
        t.policy_drops.count(&t.policy, PolicyType::Ingress, pod);
        let counts = shared.policy_drop_counts();
        assert!(
            counts.contains(&("pod default/web ingress".into(), 1))
                && counts.contains(&("policy default/deny".into(), 1)),
            "{counts:?}"
        );
    }
}
