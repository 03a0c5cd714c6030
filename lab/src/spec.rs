//! The lab's description (`lab/lab.yaml`): the node, the outside host, the pods and the
//! routes the node's kernel sends through kxdp. Read from YAML; nothing here touches the OS
//! beyond reading the file.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::LabError;

/// A lab description.
#[derive(Clone, Debug, Deserialize)]
pub struct LabSpec {
    /// The lab's name: every namespace is `kxdp-<name>-…`.
    pub name: String,
    /// The node under the dataplane.
    pub node: LabNode,
    /// The host on the other end of the node's uplink.
    pub outside: LabOutside,
    /// The node's pods.
    pub pods: Vec<LabPod>,
    /// Queues per veth (one per worker); default 1.
    #[serde(default = "one")]
    pub queues: u32,
    /// The cluster's pod networks and Service range: the node's kernel routes them to
    /// kxdp through the host veth pair.
    #[serde(default = "default_host_routes", rename = "hostRoutes")]
    pub host_routes: Vec<Ipv4Net>,
    /// The same for IPv6 (used when the node has an IPv6 address).
    #[serde(default = "default_host_routes6", rename = "hostRoutes6")]
    pub host_routes6: Vec<ipnet::Ipv6Net>,
}

fn default_host_routes6() -> Vec<ipnet::Ipv6Net> {
    vec![
        "fd00:10:244::/48".parse().expect("literal"),
        "fd00:172:30::/112".parse().expect("literal"),
    ]
}

fn default_host_routes() -> Vec<Ipv4Net> {
    vec![
        "10.244.0.0/16".parse().expect("literal"),
        "172.30.0.0/16".parse().expect("literal"),
    ]
}

fn one() -> u32 {
    1
}

/// The lab's node.
#[derive(Clone, Debug, Deserialize)]
pub struct LabNode {
    /// Kubernetes Node name (as in the manifests).
    pub name: String,
    /// Address on the uplink, with prefix.
    pub address: Ipv4Net,
    /// IPv6 address on the uplink, with prefix, if the node has one.
    #[serde(default)]
    pub address6: Option<ipnet::Ipv6Net>,
    /// The node's pod network; its first address is the pods' gateway.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
    /// The node's IPv6 pod network, if pods are dual-stack; its first address is their
    /// IPv6 gateway.
    #[serde(rename = "podCIDR6", default)]
    pub pod_cidr6: Option<ipnet::Ipv6Net>,
}

/// The outside host.
#[derive(Clone, Debug, Deserialize)]
pub struct LabOutside {
    /// Its address on the uplink, with prefix.
    pub address: Ipv4Net,
    /// Its IPv6 address on the uplink, with prefix, if any.
    #[serde(default)]
    pub address6: Option<ipnet::Ipv6Net>,
}

/// One pod.
#[derive(Clone, Debug, Deserialize)]
pub struct LabPod {
    /// `namespace/name`, as in the manifests.
    pub name: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if any.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    /// Ports its echo server answers on (TCP and UDP).
    #[serde(default)]
    pub ports: Vec<u16>,
}

impl LabSpec {
    /// Reads a description file.
    pub fn load(path: &Path) -> Result<LabSpec, LabError> {
        let text = std::fs::read_to_string(path).map_err(|source| LabError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|e| LabError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}
