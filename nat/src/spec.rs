//! The desired state of one node's dataplane, as control computes it from Kubernetes objects.
//!
//! This is the contract between `kxdp-control` and `kxdp-dataplane`: control turns Nodes, Pods,
//! Services, EndpointSlices and NetworkPolicies into a [`TableSpec`] (a pure function), streams
//! it, and the dataplane compiles it into lookup tables. Everything here is already resolved:
//! named ports are numbers, endpoint categorisation (ready / serving-terminating fallback,
//! traffic policies, topology) is done, policy selectors are addresses, defaults are applied.
//! The dataplane never sees a Kubernetes object.
//!
//! Fields added later carry `#[serde(default)]`, so an older control still talks to a newer
//! dataplane; a change that breaks that bumps [`SPEC_VERSION`].

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Version of the table format; the stream header carries it and a mismatch is refused.
pub const SPEC_VERSION: u32 = 1;

/// Layer-4 protocols that Services and conntrack know about.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Protocol {
    /// IP protocol 6: the API's default for a port without a protocol.
    #[default]
    Tcp,
    /// IP protocol 17.
    Udp,
    /// IP protocol 132.
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol for an IP protocol number, if it is one Services carry.
    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// Everything one node's dataplane needs, computed by control.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    /// The node this dataplane serves.
    pub node: NodeSpec,
    /// Cluster-wide settings.
    pub cluster: ClusterSpec,
    /// One entry per (Service, port, IP family): the unit kube-proxy programs. Ordered by
    /// [`ServiceSpec::key`], each key once ([`TableSpec::validate`] checks it): both ends
    /// of the stream apply a [`TableDelta`] by merging in that order. Shared (`Arc`), so a
    /// table that differs from the last in a few Services costs a few new entries.
    pub services: Vec<Arc<ServiceSpec>>,
    /// Pods whose network interface is on this node.
    pub local_pods: Vec<PodSpec>,
    /// Other nodes, for routes to their pod networks through the overlay.
    #[serde(default)]
    pub remote_nodes: Vec<RemoteNodeSpec>,
    /// NetworkPolicy isolation of this node's pods.
    #[serde(default)]
    pub policy: PolicySpec,
}

/// The node under this dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Kubernetes Node name.
    pub name: String,
    /// The node's own addresses (InternalIP, ExternalIP), used for NodePorts and masquerade.
    pub addresses: Vec<IpAddr>,
    /// The node's pod networks (`spec.podCIDRs`).
    pub pod_cidrs: Vec<IpNet>,
    /// `topology.kubernetes.io/zone`, for topology-aware routing.
    #[serde(default)]
    pub zone: Option<String>,
    /// Outer source address of this node's VXLAN packets (flannel `public-ip`, else the
    /// first IPv4 InternalIP).
    #[serde(default)]
    pub vtep_ip: Option<IpAddr>,
    /// This node's VTEP MAC as other nodes know it (flannel `VtepMAC`); the uplink's MAC
    /// when the node does not announce one.
    #[serde(default)]
    pub vtep_mac: Option<[u8; 6]>,
}

/// Settings that hold for the whole cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// The pod networks of the cluster; traffic from outside them is "external".
    pub cluster_cidrs: Vec<IpNet>,
    /// The Service ClusterIP ranges; an address there that no Service holds is dropped.
    pub service_cidrs: Vec<IpNet>,
    /// SNAT every connection to a ClusterIP (kube-proxy `--masquerade-all`, "all traffic
    /// sent via Service cluster IPs"); external frontends keep their traffic policy's rule.
    #[serde(default)]
    pub masquerade_all: bool,
    /// Masquerade pod traffic leaving the cluster networks (flannel `--ip-masq`).
    #[serde(default = "yes")]
    pub ip_masq: bool,
    /// kube-proxy's `--nodeport-addresses`: NodePorts answer only on node addresses inside
    /// these networks; empty means the node's primary address of each family (its first
    /// InternalIP, else ExternalIP), as kube-proxy's nftables mode defaults to.
    #[serde(default)]
    pub nodeport_addresses: Vec<IpNet>,
    /// VXLAN network identifier of the overlay.
    #[serde(default = "default_vni")]
    pub vxlan_vni: u32,
    /// VXLAN UDP destination port of the overlay.
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
}

fn yes() -> bool {
    true
}
fn default_vni() -> u32 {
    1
}
fn default_vxlan_port() -> u16 {
    8472
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().expect("literal"),
                "fd00:10:244::/48".parse().expect("literal"),
            ],
            service_cidrs: vec![
                "172.30.0.0/16".parse().expect("literal"),
                "fd00:172:30::/112".parse().expect("literal"),
            ],
            masquerade_all: false,
            ip_masq: true,
            nodeport_addresses: Vec::new(),
            vxlan_vni: default_vni(),
            vxlan_port: default_vxlan_port(),
        }
    }
}

/// How a frontend address is reached, which decides the traffic policy that applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`: internal traffic policy.
    ClusterIp,
    /// A node address with `spec.ports[].nodePort`: external traffic policy.
    NodePort,
    /// `status.loadBalancer.ingress[].ip`: external traffic policy.
    LoadBalancer,
    /// `spec.externalIPs`: external traffic policy.
    ExternalIp,
}

impl FrontendKind {
    /// Whether `externalTrafficPolicy` governs this frontend.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// One address:port a Service is reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrontendSpec {
    /// What kind of address this is.
    pub kind: FrontendKind,
    /// The destination address clients use.
    pub ip: IpAddr,
    /// The destination port clients use.
    pub port: u16,
}

/// One endpoint of a Service port, after named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// Endpoint address (a pod IP, or any address for hand-made slices).
    pub ip: IpAddr,
    /// Target port on the endpoint.
    pub port: u16,
    /// Whether the endpoint is on this node (`nodeName` equals ours).
    pub local: bool,
    /// EndpointSlice `conditions.ready` after defaulting.
    pub ready: bool,
    /// EndpointSlice `conditions.serving` after defaulting.
    pub serving: bool,
    /// EndpointSlice `conditions.terminating` after defaulting.
    pub terminating: bool,
}

/// One (Service, port, IP family): frontends and the endpoint lists each traffic policy uses.
/// The default is an unnamed TCP port with nothing in it, for building one field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// `namespace/name:portName`, for counters and inspection.
    pub name: String,
    /// Transport protocol of this port.
    pub protocol: Protocol,
    /// Every address:port that reaches this Service port.
    pub frontends: Vec<FrontendSpec>,
    /// Endpoints for traffic under policy `Cluster` (already categorised: ready ones, else the
    /// serving-and-terminating ones; topology hints applied).
    pub cluster_endpoints: Vec<EndpointSpec>,
    /// Endpoints for traffic under policy `Local`: the local subset, same categorisation.
    pub local_endpoints: Vec<EndpointSpec>,
    /// Every endpoint the slices list for this port, whatever their state: used to tell
    /// "endpoint gone" (flush its flows) from "endpoint not chosen for new flows".
    #[serde(default)]
    pub all_endpoints: Vec<EndpointSpec>,
    /// `internalTrafficPolicy: Local`.
    #[serde(default)]
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    #[serde(default)]
    pub affinity_timeout_s: Option<u32>,
    /// The sources that may open connections to the [`FrontendKind::LoadBalancer`]
    /// frontends: `loadBalancerSourceRanges` of this family, plus the load-balancer IPs
    /// themselves when a range holds the node's address (kube-proxy's firewall chain).
    /// Empty: no filter. NodePorts, externalIPs and the ClusterIP are never filtered.
    #[serde(default)]
    pub lb_source_ranges: Vec<IpNet>,
    /// Frontends of other Service ports that claimed one of this port's frontends (the
    /// same address, port and protocol) and were refused it, this port's Service being the
    /// older (control's rule: `creationTimestamp`, then namespace and name). For inspection
    /// only: the refused frontends are already left out of their own ports. Left out of the
    /// stream when empty, so a table without conflicts is sent as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedFrontend>,
}

/// A frontend a Service port claimed and was refused, because an older Service's port
/// holds the same address, port and protocol (see [`ServiceSpec::refused`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedFrontend {
    /// The Service port refused (`namespace/name:port`).
    pub service: String,
    /// The frontend it claimed.
    pub frontend: FrontendSpec,
}

/// What identifies a [`ServiceSpec`] within a table: its name, protocol and IP family. The
/// order of the tuple is the order of [`TableSpec::services`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// [`ServiceSpec::name`].
    pub name: String,
    /// [`ServiceSpec::protocol`].
    pub protocol: Protocol,
    /// Whether the Service port's addresses are IPv6.
    pub ipv6: bool,
}

impl ServiceSpec {
    /// Whether this is the IPv6 family of its Service (by its first frontend, the
    /// ClusterIP).
    pub fn is_ipv6(&self) -> bool {
        self.frontends.first().is_some_and(|f| f.ip.is_ipv6())
    }

    /// The key, borrowed: what [`TableSpec::services`] is ordered by.
    pub fn key_ref(&self) -> (&str, Protocol, bool) {
        (&self.name, self.protocol, self.is_ipv6())
    }

    /// The key, owned.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            name: self.name.clone(),
            protocol: self.protocol,
            ipv6: self.is_ipv6(),
        }
    }
}

impl ServiceKey {
    /// The key, borrowed like [`ServiceSpec::key_ref`].
    pub fn as_ref(&self) -> (&str, Protocol, bool) {
        (&self.name, self.protocol, self.ipv6)
    }
}

/// What changed from one [`TableSpec`] to the next: what control sends once the dataplane
/// has a table, instead of the whole of it. Services are sent one by one (a change to one
/// EndpointSlice sends the Service ports it feeds); the other parts are small, or change
/// rarely, and are sent whole when they change at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDelta {
    /// The node, when it changed.
    #[serde(default)]
    pub node: Option<NodeSpec>,
    /// The cluster settings, when they changed.
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
    /// Every local pod, when any changed.
    #[serde(default)]
    pub local_pods: Option<Vec<PodSpec>>,
    /// Every remote node, when any changed.
    #[serde(default)]
    pub remote_nodes: Option<Vec<RemoteNodeSpec>>,
    /// The whole NetworkPolicy table, when it changed.
    #[serde(default)]
    pub policy: Option<PolicySpec>,
    /// Service ports that are gone, in key order.
    #[serde(default)]
    pub removed: Vec<ServiceKey>,
    /// Service ports that are new or changed (each replaces the one with its key), in key
    /// order.
    #[serde(default)]
    pub upserted: Vec<Arc<ServiceSpec>>,
}

/// Why a [`TableDelta`] does not apply to a table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// `removed` or `upserted` is not in strictly increasing key order.
    #[error("the delta's {0} Service ports are not in strictly increasing key order")]
    Unordered(&'static str),
    /// A removed Service port is not in the table.
    #[error("the delta removes Service port {0:?}, which the table does not have")]
    NotThere(String),
    /// The same Service port is both removed and upserted.
    #[error("the delta both removes and upserts Service port {0:?}")]
    Both(String),
}

fn strictly_ordered<'a>(keys: impl Iterator<Item = (&'a str, Protocol, bool)>) -> bool {
    let mut last: Option<(&str, Protocol, bool)> = None;
    for k in keys {
        if last.is_some_and(|l| l >= k) {
            return false;
        }
        last = Some(k);
    }
    true
}

impl TableDelta {
    /// What turns `old` into `new`; both in canonical order (see [`TableSpec::services`]).
    /// Service ports are compared by pointer first, so tables that share most of their
    /// entries (as control's successive tables do) are compared in time proportional to
    /// their Service count, with a deep comparison only where pointers differ.
    pub fn between(old: &TableSpec, new: &TableSpec) -> TableDelta {
        fn changed<T: PartialEq + Clone>(old: &T, new: &T) -> Option<T> {
            (old != new).then(|| new.clone())
        }
        let mut d = TableDelta {
            node: changed(&old.node, &new.node),
            cluster: changed(&old.cluster, &new.cluster),
            local_pods: changed(&old.local_pods, &new.local_pods),
            remote_nodes: changed(&old.remote_nodes, &new.remote_nodes),
            policy: changed(&old.policy, &new.policy),
            ..TableDelta::default()
        };
        let (mut a, mut b) = (
            old.services.iter().peekable(),
            new.services.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), None) => {
                    d.removed.push(x.key());
                    a.next();
                }
                (None, Some(y)) => {
                    d.upserted.push(Arc::clone(y));
                    b.next();
                }
                // The same allocation: the same entry, found without reading it (most
                // entries of successive tables are shared).
                (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) => match x.key_ref().cmp(&y.key_ref()) {
                    Ordering::Less => {
                        d.removed.push(x.key());
                        a.next();
                    }
                    Ordering::Greater => {
                        d.upserted.push(Arc::clone(y));
                        b.next();
                    }
                    Ordering::Equal => {
                        if x != y {
                            d.upserted.push(Arc::clone(y));
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        d
    }

    /// Whether applying it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.cluster.is_none()
            && self.local_pods.is_none()
            && self.remote_nodes.is_none()
            && self.policy.is_none()
            && self.removed.is_empty()
            && self.upserted.is_empty()
    }

    /// Whether the set of Service frontends (or what decides the uplink's filter: the
    /// node, the cluster settings) may differ after it, compared with `old`'s services.
    pub fn changes_frontends(&self, old: &TableSpec) -> bool {
        if self.node.is_some() || self.cluster.is_some() || !self.removed.is_empty() {
            return true;
        }
        self.upserted.iter().any(|u| {
            match old
                .services
                .binary_search_by(|s| s.key_ref().cmp(&u.key_ref()))
            {
                Ok(i) => old.services[i].frontends != u.frontends,
                Err(_) => true,
            }
        })
    }
}

/// How one Service port of the old table fares in a delta, in the order of the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep<'a> {
    /// Kept as it was: the old index.
    Kept(usize),
    /// Replaced: the old index and its successor.
    Replaced(usize, &'a Arc<ServiceSpec>),
    /// Removed: the old index.
    Removed(usize),
    /// New.
    Added(&'a Arc<ServiceSpec>),
}

impl TableSpec {
    /// Sorts the Service ports into canonical order (see [`TableSpec::services`]). Stable:
    /// of two entries with the same key (which [`TableSpec::validate`] refuses) the first
    /// stays first.
    pub fn sort_services(&mut self) {
        self.services.sort_by(|a, b| a.key_ref().cmp(&b.key_ref()));
    }

    /// Walks the merge of `delta` into this table's Service ports in key order: `step` is
    /// called once per old entry and once per new one. Checks the delta as it goes.
    pub fn merge_services<'a>(
        &self,
        delta: &'a TableDelta,
        mut step: impl FnMut(MergeStep<'a>),
    ) -> Result<(), DeltaError> {
        if !strictly_ordered(delta.removed.iter().map(ServiceKey::as_ref)) {
            return Err(DeltaError::Unordered("removed"));
        }
        if !strictly_ordered(delta.upserted.iter().map(|s| s.key_ref())) {
            return Err(DeltaError::Unordered("upserted"));
        }
        let mut removed = delta.removed.iter().peekable();
        let mut upserted = delta.upserted.iter().peekable();
        for (i, old) in self.services.iter().enumerate() {
            if removed.peek().is_none() && upserted.peek().is_none() {
                // Nothing left to merge: the rest is kept, without reading it.
                (i..self.services.len()).for_each(|i| step(MergeStep::Kept(i)));
                return Ok(());
            }
            let k = old.key_ref();
            while let Some(u) = upserted.next_if(|u| u.key_ref() < k) {
                if removed.peek().is_some_and(|r| r.as_ref() == u.key_ref()) {
                    return Err(DeltaError::Both(u.name.clone()));
                }
                step(MergeStep::Added(u));
            }
            if let Some(r) = removed.peek() {
                if r.as_ref() < k {
                    return Err(DeltaError::NotThere(r.name.clone()));
                }
            }
            let gone = removed.next_if(|r| r.as_ref() == k).is_some();
            let replacement = upserted.next_if(|u| u.key_ref() == k);
            match (gone, replacement) {
                (true, Some(u)) => return Err(DeltaError::Both(u.name.clone())),
                (true, None) => step(MergeStep::Removed(i)),
                (false, Some(u)) => step(MergeStep::Replaced(i, u)),
                (false, None) => step(MergeStep::Kept(i)),
            }
        }
        if let Some(r) = removed.next() {
            return Err(DeltaError::NotThere(r.name.clone()));
        }
        for u in upserted {
            step(MergeStep::Added(u));
        }
        Ok(())
    }

    /// This table with `delta` applied.
    pub fn apply(&self, delta: &TableDelta) -> Result<TableSpec, DeltaError> {
        let mut services = Vec::with_capacity(self.services.len() + delta.upserted.len());
        self.merge_services(delta, |step| match step {
            MergeStep::Kept(i) => services.push(Arc::clone(&self.services[i])),
            MergeStep::Replaced(_, s) | MergeStep::Added(s) => services.push(Arc::clone(s)),
            MergeStep::Removed(_) => {}
        })?;
        Ok(TableSpec {
            node: delta.node.clone().unwrap_or_else(|| self.node.clone()),
            cluster: delta
                .cluster
                .clone()
                .unwrap_or_else(|| self.cluster.clone()),
            services,
            local_pods: delta
                .local_pods
                .clone()
                .unwrap_or_else(|| self.local_pods.clone()),
            remote_nodes: delta
                .remote_nodes
                .clone()
                .unwrap_or_else(|| self.remote_nodes.clone()),
            policy: delta.policy.clone().unwrap_or_else(|| self.policy.clone()),
        })
    }
}

/// A pod whose interface is on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// `namespace/name`.
    pub name: String,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// Pod labels (NetworkPolicy selects on them).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Another node of the cluster, reached through the VXLAN overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteNodeSpec {
    /// Kubernetes Node name.
    pub name: String,
    /// The node's pod networks.
    pub pod_cidrs: Vec<IpNet>,
    /// Outer destination of VXLAN packets (flannel `public-ip`, else its InternalIP).
    pub vtep_ip: IpAddr,
    /// Inner destination MAC (flannel `VtepMAC`).
    pub vtep_mac: [u8; 6],
}

/// NetworkPolicy (`networking.k8s.io/v1`) for the pods of this node, resolved to addresses
/// and port numbers: selectors are already matched against pods and namespaces, `ipBlock`
/// excepts are already subtracted, named ports are already numbers. The dataplane compiles
/// it into a [`crate::policy::PolicyTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// `namespace/name` of every NetworkPolicy that selects a pod of this node, ordered by
    /// namespace and name; [`RuleSpec::policy`] and [`IsolationSpec::policies`] index it.
    pub policies: Vec<String>,
    /// One entry per pod of this node that is isolated in at least one direction, ordered
    /// by namespace and name. A pod not listed is not isolated at all.
    pub pods: Vec<PodPolicySpec>,
}

/// The isolation of one pod of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPolicySpec {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's addresses (`status.podIPs`); the verdict is asked by these.
    pub ips: Vec<IpAddr>,
    /// Ingress isolation; `None` when no policy with policy type `Ingress` selects the pod,
    /// so all ingress is allowed.
    pub ingress: Option<IsolationSpec>,
    /// Egress isolation; `None` when no policy with policy type `Egress` selects the pod,
    /// so all egress is allowed.
    pub egress: Option<IsolationSpec>,
}

/// How a pod is isolated in one direction: what selects it and what its rules allow.
/// Traffic is allowed when at least one rule matches; with no rules, nothing is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationSpec {
    /// Every policy that selects the pod for this direction, ascending, including those
    /// without rules (they only isolate); kept for explaining a verdict.
    pub policies: Vec<u32>,
    /// The rules of those policies for this pod (ingress `from` or egress `to`), in policy
    /// order. A rule that can match nothing (a named port the pod lacks, peers that select
    /// no pod) is left out.
    pub rules: Vec<RuleSpec>,
}

/// One NetworkPolicy rule, resolved: it matches a peer address inside one of `peers` on a
/// protocol and port inside one of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Index of the policy the rule belongs to, in [`PolicySpec::policies`].
    pub policy: u32,
    /// Peer prefixes (a selected pod is one /32 or /128 per address; an `ipBlock` is its
    /// CIDR minus its excepts); `None` matches every peer (`from`/`to` absent or empty).
    /// Prefixes may overlap.
    pub peers: Option<Vec<IpNet>>,
    /// Port ranges; `None` matches every port of every protocol (`ports` absent or
    /// empty). For ingress the port is the pod's own, for egress the destination's after
    /// Service translation.
    pub ports: Option<Vec<PortRangeSpec>>,
}

/// An inclusive range of ports of one protocol (`port`, or `port`..=`endPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRangeSpec {
    /// Transport protocol.
    pub protocol: Protocol,
    /// First port of the range.
    pub first: u16,
    /// Last port of the range, included; a range with `last < first` matches nothing.
    pub last: u16,
}

/// The most endpoints one Service port may have (a Maglev ring slot holds a 16-bit index).
pub const MAX_ENDPOINTS: usize = u16::MAX as usize;

impl TableSpec {
    /// Checks what the dataplane relies on before a table touches its state; a table
    /// that fails is refused whole, with the first reason found.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(w) = self
            .services
            .windows(2)
            .find(|w| w[0].key_ref() >= w[1].key_ref())
        {
            return Err(if w[0].key_ref() == w[1].key_ref() {
                format!(
                    "Service port {} ({:?}) is listed twice",
                    w[1].name, w[1].protocol
                )
            } else {
                format!(
                    "Service ports out of order: {} before {} (sort them by name, protocol, family)",
                    w[0].name, w[1].name
                )
            });
        }
        validate_cluster(&self.cluster)?;
        self.services.iter().try_for_each(|s| validate_service(s))?;
        validate_policy(&self.policy)
    }

    /// [`TableSpec::validate`] of `delta` applied to this table, which is valid, checking
    /// only what the delta brings (its order and the merge are checked by
    /// [`TableSpec::apply`]).
    pub fn validate_delta(&self, delta: &TableDelta) -> Result<(), String> {
        if let Some(c) = &delta.cluster {
            validate_cluster(c)?;
        }
        delta
            .upserted
            .iter()
            .try_for_each(|s| validate_service(s))?;
        match &delta.policy {
            Some(p) => validate_policy(p),
            None => Ok(()),
        }
    }
}

fn validate_cluster(c: &ClusterSpec) -> Result<(), String> {
    if c.vxlan_vni >= 1 << 24 {
        return Err(format!("VXLAN VNI {} needs more than 24 bits", c.vxlan_vni));
    }
    Ok(())
}

fn validate_service(s: &ServiceSpec) -> Result<(), String> {
    if s.name.is_empty() {
        return Err("a Service port without a name".into());
    }
    for list in [&s.cluster_endpoints, &s.local_endpoints, &s.all_endpoints] {
        if list.len() > MAX_ENDPOINTS {
            return Err(format!(
                "{}: {} endpoints, at most {MAX_ENDPOINTS}",
                s.name,
                list.len()
            ));
        }
    }
    if let Some(e) = s.local_endpoints.iter().find(|e| !e.local) {
        return Err(format!(
            "{}: endpoint {} listed as local is not",
            s.name, e.ip
        ));
    }
    Ok(())
}

fn validate_policy(policy: &PolicySpec) -> Result<(), String> {
    let policies = policy.policies.len();
    for p in &policy.pods {
        for iso in [&p.ingress, &p.egress].into_iter().flatten() {
            let bad = iso
                .policies
                .iter()
                .chain(iso.rules.iter().map(|r| &r.policy))
                .find(|&&i| i as usize >= policies);
            if let Some(i) = bad {
                return Err(format!(
                    "pod {}: policy index {i}, but the table names {policies} policies",
                    p.pod
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod validate_tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            protocol: Protocol::Tcp,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: ip.parse().unwrap(),
                port: 80,
            }],
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn bad_tables_are_refused_with_a_reason() {
        let mut t = TableSpec {
            services: vec![
                Arc::new(svc("a/x:p", "172.30.0.1")),
                Arc::new(svc("a/y:p", "172.30.0.2")),
            ],
            ..Default::default()
        };
        assert_eq!(t.validate(), Ok(()));
        Arc::make_mut(&mut t.services[1])
            .local_endpoints
            .push(EndpointSpec {
                ip: "10.244.2.5".parse().unwrap(),
                port: 80,
                local: false,
                ready: true,
                serving: true,
                terminating: false,
            });
        assert!(t.validate().unwrap_err().contains("listed as local"));
        t.services.pop();
        t.cluster.vxlan_vni = 1 << 24;
        assert!(t.validate().unwrap_err().contains("VNI"));
        t.cluster.vxlan_vni = 1;
        t.policy.pods.push(PodPolicySpec {
            pod: "a/p".into(),
            ips: vec![],
            ingress: Some(IsolationSpec {
                policies: vec![3],
                rules: vec![],
            }),
            egress: None,
        });
        assert!(t.validate().unwrap_err().contains("policy index 3"));
    }

    #[test]
    fn services_listed_twice_or_out_of_order_are_refused() {
        let mut t = TableSpec {
            services: vec![
                Arc::new(svc("a/y:p", "172.30.0.2")),
                Arc::new(svc("a/x:p", "172.30.0.1")),
            ],
            ..Default::default()
        };
        assert!(t.validate().unwrap_err().contains("out of order"));
        t.sort_services();
        assert_eq!(t.validate(), Ok(()));
        t.services.push(Arc::new(svc("a/y:p", "172.30.0.3")));
        assert!(t.validate().unwrap_err().contains("listed twice"));
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;
    use proptest::prelude::*;

    fn svc(name: &str, protocol: Protocol, v6: bool, endpoints: u8) -> ServiceSpec {
        let ip: IpAddr = if v6 {
            "fd00:172:30::1".parse().unwrap()
        } else {
            "172.30.0.1".parse().unwrap()
        };
        let ep = |i: u8| EndpointSpec {
            ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, i)),
            port: 8080,
            local: false,
            ready: true,
            serving: true,
            terminating: false,
        };
        let eps: Vec<EndpointSpec> = (0..endpoints).map(ep).collect();
        ServiceSpec {
            name: name.into(),
            protocol,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip,
                port: 80,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        }
    }

    /// A table from (name index, protocol, family, endpoint count) entries.
    fn table(entries: &[(u8, u8, bool, u8)]) -> TableSpec {
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
        let mut t = TableSpec::default();
        for &(n, p, v6, e) in entries {
            t.services.push(Arc::new(svc(
                &format!("ns/s{n}:p"),
                protocols[p as usize % 3],
                v6,
                e,
            )));
        }
        t.sort_services();
        t.services.dedup_by(|a, b| a.key_ref() == b.key_ref());
        t
    }

    proptest! {
        #[test]
        fn applying_the_delta_between_two_tables_gives_the_second(
            a in prop::collection::vec((0u8..20, 0u8..3, any::<bool>(), 0u8..4), 0..30),
            b in prop::collection::vec((0u8..20, 0u8..3, any::<bool>(), 0u8..4), 0..30),
            pods in any::<bool>(),
        ) {
            let old = table(&a);
            let mut new = table(&b);
            if pods {
                new.local_pods.push(PodSpec {
                    name: "ns/p".into(),
                    ips: vec!["10.244.1.9".parse().unwrap()],
                    labels: Default::default(),
                });
            }
            let d = TableDelta::between(&old, &new);
            prop_assert_eq!(d.is_empty(), old == new);
            prop_assert_eq!(d.local_pods.is_some(), pods);
            prop_assert!(d.node.is_none() && d.policy.is_none());
            prop_assert_eq!(old.apply(&d).unwrap(), new.clone());
            // Sent as JSON, the same.
            let wire: TableDelta = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            prop_assert_eq!(old.apply(&wire).unwrap(), new);
        }
    }

    #[test]
    fn only_what_changed_is_in_the_delta() {
        let old = table(&[(1, 0, false, 2), (2, 0, false, 2), (3, 1, true, 1)]);
        let mut new = old.clone();
        Arc::make_mut(&mut new.services[1]).cluster_endpoints.pop();
        let d = TableDelta::between(&old, &new);
        assert!(d.removed.is_empty());
        assert_eq!(d.upserted.len(), 1);
        assert_eq!(d.upserted[0].name, "ns/s2:p");
        assert!(!d.changes_frontends(&old), "only endpoints changed");
        // A copy that is equal but not shared is not sent either.
        let mut copy = old.clone();
        copy.services[0] = Arc::new((*old.services[0]).clone());
        assert!(TableDelta::between(&old, &copy).is_empty());
    }

    #[test]
    fn a_delta_that_does_not_fit_the_table_is_refused() {
        let old = table(&[(1, 0, false, 2), (2, 0, false, 2)]);
        let gone = ServiceKey {
            name: "ns/s9:p".into(),
            protocol: Protocol::Tcp,
            ipv6: false,
        };
        let d = TableDelta {
            removed: vec![gone.clone()],
            ..Default::default()
        };
        assert_eq!(old.apply(&d), Err(DeltaError::NotThere("ns/s9:p".into())));
        let both = TableDelta {
            removed: vec![old.services[0].key()],
            upserted: vec![old.services[0].clone()],
            ..Default::default()
        };
        assert!(matches!(old.apply(&both), Err(DeltaError::Both(_))));
        let unordered = TableDelta {
            upserted: vec![old.services[1].clone(), old.services[0].clone()],
            ..Default::default()
        };
        assert_eq!(
            old.apply(&unordered),
            Err(DeltaError::Unordered("upserted"))
        );
        let mut moved = (*old.services[0]).clone();
        moved.frontends[0].port = 81;
        let d = TableDelta {
            upserted: vec![Arc::new(moved)],
            ..Default::default()
        };
        assert!(d.changes_frontends(&old));
    }
}
