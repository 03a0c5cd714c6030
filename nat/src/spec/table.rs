//! The whole table one node's dataplane takes ([`TableSpec`]), and what describes the
//! node, the cluster, this node's pods and the other nodes.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::policy::PolicySpec;
use super::service::ServiceSpec;

/// Everything one node's dataplane needs, computed by control.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    /// The node this dataplane serves.
    pub node: NodeSpec,
    /// Cluster-wide settings.
    pub cluster: ClusterSpec,
    /// One entry per (Service, port, IP family): the unit kube-proxy programs. Ordered by
    /// [`ServiceSpec::key`], each key once ([`TableSpec::validate`] checks it): both ends
    /// of the stream apply a [`TableDelta`](super::delta::TableDelta) by merging in that order. Shared (`Arc`), so a
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
