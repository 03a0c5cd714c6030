//! The state workers share: the current tables (swapped whole, read without locks), the
//! connection table and the neighbour table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use nat::conntrack::Conntrack;
use nat::spec::TableSpec;
use nat::tables::{BuildFastHasher, ServiceTable};

use crate::counters::Published;

/// What a port is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// The node's link to the rest of the network.
    Uplink,
    /// The host side of a pod's veth.
    Pod,
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
    /// The spec these tables were compiled from (for inspection and diffs).
    pub spec: TableSpec,
}

impl Tables {
    /// Compiles a spec.
    pub fn compile(generation: u64, spec: TableSpec, ring_size: u32) -> Tables {
        let services = ServiceTable::build(&spec, ring_size);
        let mut local_pods = HashMap::with_hasher(BuildFastHasher);
        for p in &spec.local_pods {
            let name: Arc<str> = Arc::from(p.name.as_str());
            for ip in &p.ips {
                local_pods.insert(*ip, name.clone());
            }
        }
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
        Tables {
            generation,
            services,
            local_pods,
            pod_cidrs: spec.node.pod_cidrs.clone(),
            gateway_v4,
            gateway_v6,
            node_addresses: spec.node.addresses.clone(),
            spec,
        }
    }

    /// Empty tables: before control speaks, nothing is translated.
    pub fn empty() -> Tables {
        Tables::compile(0, TableSpec::default(), 13)
    }

    /// Whether `ip` is one of the addresses the dataplane itself owns (gateways).
    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.gateway_v4 == Some(a),
            IpAddr::V6(a) => self.gateway_v6 == Some(a),
        }
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

/// A neighbour: where an address lives and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbor {
    /// The port it is reached on.
    pub port: usize,
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// Learned neighbours. Read per packet without locks; written (copy on write) only when a
/// neighbour appears or moves, which is rare.
#[derive(Default)]
pub struct Neighbors {
    map: ArcSwap<HashMap<IpAddr, Neighbor, BuildFastHasher>>,
}

impl Neighbors {
    /// Where `ip` lives, if learned.
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<Neighbor> {
        self.map.load().get(ip).copied()
    }

    /// Records `ip` at `n` unless that is already known.
    pub fn learn(&self, ip: IpAddr, n: Neighbor) {
        if self.get(&ip) == Some(n) {
            return;
        }
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(ip, n);
            m
        });
    }

    /// Every neighbour (for inspection).
    pub fn all(&self) -> Vec<(IpAddr, Neighbor)> {
        self.map.load().iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Settings fixed at start.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Maglev ring size (a prime).
    pub ring_size: u32,
    /// Conntrack capacity.
    pub conntrack_capacity: usize,
    /// Session-affinity records (clients remembered across all Services).
    pub affinity_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ring_size: nat::maglev::DEFAULT_RING_SIZE,
            conntrack_capacity: 1 << 20,
            affinity_capacity: 1 << 16,
        }
    }
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
    /// The ports, by index (equal on every worker).
    pub ports: Vec<PortConfig>,
    /// Per-worker published counters.
    pub counters: Vec<Published>,
    /// Start-up settings.
    pub limits: Limits,
    /// The MAC of the next hop behind the uplink (learned from IP traffic arriving there);
    /// 0 while unknown.
    pub uplink_next_hop: std::sync::atomic::AtomicU64,
    /// The uplink's port index, if there is one.
    pub uplink: Option<usize>,
}

impl Shared {
    /// State for `workers` workers on `ports`.
    pub fn new(ports: Vec<PortConfig>, workers: usize, limits: Limits) -> Shared {
        let uplink = ports.iter().position(|p| p.role == PortRole::Uplink);
        Shared {
            uplink,
            uplink_next_hop: std::sync::atomic::AtomicU64::new(0),
            tables: ArcSwap::from_pointee(Tables::empty()),
            conntrack: Conntrack::new(limits.conntrack_capacity),
            neighbors: Neighbors::default(),
            affinity: nat::affinity::AffinityTable::new(limits.affinity_capacity),
            ports,
            counters: (0..workers).map(|_| Published::default()).collect(),
            limits,
        }
    }

    /// Installs a new table generation: compile, swap, then retire flows the new tables
    /// no longer allow (UDP to endpoints that are gone, so the next datagram picks a live
    /// one). Workers are never stopped.
    pub fn install(&self, generation: u64, spec: TableSpec, now: u64) {
        let tables = Tables::compile(generation, spec, self.limits.ring_size);
        self.tables.store(Arc::new(tables));
        self.retire_stale_flows(now);
    }

    /// Removes UDP (and SCTP) connections whose backend is no longer an endpoint of their
    /// Service; TCP connections keep their backend while it exists in any state.
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
                    .all_endpoints
                    .iter()
                    .any(|b| b.ip == c.reply.src && b.port == c.reply.sport),
                None => true,
            }
        })
    }
}
