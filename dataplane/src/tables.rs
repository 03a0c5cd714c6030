//! One generation of compiled tables: everything a worker looks up per packet, built from
//! control's spec (whole, or from the last generation and a delta) and swapped in whole.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use nat::policy::{PolicyTable, PolicyType};
use nat::spec::{TableDelta, TableSpec};
use nat::tables::{net_contains, BuildFastHasher, ServiceTable};

use crate::routes::RemoteRoutes;

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
/// isolating the pod. The counters live in [`crate::state::Shared`] by name, so they keep
/// counting across table generations; a generation holds them by index for the packet path.
#[derive(Clone, Default)]
pub struct PolicyDrops {
    /// By pod index of [`Tables::policy`]: ingress, egress.
    pods: Vec<[Arc<AtomicU64>; 2]>,
    /// By policy index.
    policies: Vec<Arc<AtomicU64>>,
}

impl PolicyDrops {
    pub(crate) fn build(
        policy: &PolicyTable,
        registry: &Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    ) -> Self {
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
        self.pod_cidrs.iter().any(|n| net_contains(n, ip))
    }

    /// Whether `ip` is in the cluster's pod networks (this node's or another's).
    pub fn in_cluster_network(&self, ip: IpAddr) -> bool {
        self.services.in_cluster_network(ip)
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
