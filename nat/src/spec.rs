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

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Version of the table format; the stream header carries it and a mismatch is refused.
pub const SPEC_VERSION: u32 = 1;

/// Layer-4 protocols that Services and conntrack know about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// IP protocol 6.
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
    /// One entry per (Service, port, IP family): the unit kube-proxy programs.
    pub services: Vec<ServiceSpec>,
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
    /// SNAT every Service flow (kube-proxy `--masquerade-all`).
    #[serde(default)]
    pub masquerade_all: bool,
    /// Masquerade pod traffic leaving the cluster networks (flannel `--ip-masq`).
    #[serde(default = "yes")]
    pub ip_masq: bool,
    /// kube-proxy's `--nodeport-addresses`: NodePorts answer only on node addresses inside
    /// these networks; empty means every node address.
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        if self.cluster.vxlan_vni >= 1 << 24 {
            return Err(format!(
                "VXLAN VNI {} needs more than 24 bits",
                self.cluster.vxlan_vni
            ));
        }
        for s in &self.services {
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
        }
        let policies = self.policy.policies.len();
        for p in &self.policy.pods {
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
            cluster_endpoints: vec![],
            local_endpoints: vec![],
            all_endpoints: vec![],
            internal_local: false,
            external_local: false,
            affinity_timeout_s: None,
        }
    }

    #[test]
    fn bad_tables_are_refused_with_a_reason() {
        let mut t = TableSpec {
            services: vec![svc("a/x:p", "172.30.0.1"), svc("a/y:p", "172.30.0.2")],
            ..Default::default()
        };
        assert_eq!(t.validate(), Ok(()));
        t.services[1].local_endpoints.push(EndpointSpec {
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
}
