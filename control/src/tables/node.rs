//! This node and the others, as the tables need them: the node's own addresses, zone and
//! VXLAN endpoint, the pods with their network here, and the remote nodes whose pod
//! networks are reached through the overlay.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use nat::spec::{NodeSpec, PodSpec, RemoteNodeSpec};

use crate::labels::{
    FLANNEL_BACKEND_DATA, FLANNEL_PUBLIC_IP, KXDP_VTEP_IP, KXDP_VTEP_MAC, ZONE_LABEL,
};
use crate::objects::{namespace_and_name, Objects};

use super::computed::Warnings;

/// Other nodes with pod networks, for routes through the overlay.
pub(super) fn remote_nodes(
    objects: &Objects,
    node_name: &str,
    w: &mut Warnings,
) -> Vec<RemoteNodeSpec> {
    let mut remote_nodes = Vec::new();
    for n in objects.nodes() {
        let name = n.metadata.name.as_deref().unwrap_or("");
        if name == node_name {
            continue;
        }
        let spec = node_spec(name, n, w);
        if spec.pod_cidrs.is_empty() {
            continue;
        }
        let Some(vtep_ip) = spec.vtep_ip else {
            w.push(
                format!("Node {name}"),
                "no flannel public-ip annotation and no IPv4 InternalIP: its pods are unreachable through the overlay",
            );
            continue;
        };
        let vtep_mac = spec.vtep_mac.unwrap_or_else(|| {
            w.push(
                format!("Node {name}"),
                "no VtepMAC in the flannel backend-data annotation: listed with MAC 00:00:00:00:00:00, which a flannel VXLAN device drops; start flannel on it or annotate it",
            );
            [0; 6]
        });
        remote_nodes.push(RemoteNodeSpec {
            name: name.to_string(),
            pod_cidrs: spec.pod_cidrs,
            vtep_ip,
            vtep_mac,
        });
    }
    remote_nodes
}

/// kube-proxy's node IP of each family (IPv4, IPv6), as `GetNodeHostIPs` finds it: the
/// first InternalIP of the family, else the first ExternalIP.
pub(super) fn primary_ips(node: &Node) -> [Option<IpAddr>; 2] {
    let addresses: Vec<(&str, IpAddr)> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| Some((a.type_.as_str(), a.address.parse().ok()?)))
        .collect();
    let first = |v6: bool| {
        ["InternalIP", "ExternalIP"].iter().find_map(|ty| {
            addresses
                .iter()
                .find(|(t, ip)| t == ty && ip.is_ipv6() == v6)
                .map(|(_, ip)| *ip)
        })
    };
    [first(false), first(true)]
}

pub(super) fn vtep_mac(data: &str) -> Option<[u8; 6]> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    parse_mac(v.get("VtepMAC")?.as_str()?)
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub(super) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

pub(super) fn node_spec(name: &str, node: &Node, w: &mut Warnings) -> NodeSpec {
    let object = || format!("Node {name}");
    let mut addresses = Vec::new();
    let mut internal = Vec::new();
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
    {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) => {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
                if a.type_ == "InternalIP" {
                    internal.push(ip);
                }
            }
            Err(_) => w.push(
                object(),
                format!("{} {:?} is not an IP address; ignored", a.type_, a.address),
            ),
        }
    }
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    if let Some(spec) = &node.spec {
        // podCIDRs[0] is podCIDR; an object written with only one of them still counts.
        let all = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
        for c in all {
            match c.parse::<IpNet>() {
                Ok(net) => {
                    let net = net.trunc();
                    if !pod_cidrs.contains(&net) {
                        pod_cidrs.push(net);
                    }
                }
                Err(_) => w.push(object(), format!("pod CIDR {c:?} is not a CIDR; ignored")),
            }
        }
    }
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let ann = node.metadata.annotations.as_ref();
    let mut annotated_ip = |key: &str| {
        let s = ann.and_then(|a| a.get(key))?;
        match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                w.push(
                    object(),
                    format!("{key} {s:?} is not an IP address; ignored"),
                );
                None
            }
        }
    };
    let vtep_ip = annotated_ip(KXDP_VTEP_IP)
        .or_else(|| annotated_ip(FLANNEL_PUBLIC_IP))
        .or_else(|| internal.iter().copied().find(IpAddr::is_ipv4));
    let kxdp_mac = ann.and_then(|a| a.get(KXDP_VTEP_MAC)).and_then(|s| {
        let mac = parse_mac(s);
        if mac.is_none() {
            w.push(
                object(),
                format!("{KXDP_VTEP_MAC} {s:?} is not a MAC address; ignored"),
            );
        }
        mac
    });
    let vtep_mac = kxdp_mac.or_else(|| {
        ann.and_then(|a| a.get(FLANNEL_BACKEND_DATA))
            .and_then(|d| vtep_mac(d))
    });
    NodeSpec {
        name: name.to_string(),
        addresses,
        pod_cidrs,
        zone,
        vtep_ip,
        vtep_mac,
    }
}

pub(super) fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in status.pod_ips.iter().flatten().map(|p| &p.ip) {
        if let Ok(ip) = ip.parse() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_ref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// Pods with their network on this node: scheduled here, not host-network, not finished
/// (a Succeeded or Failed pod's address is free for reuse), and with an address.
pub(super) fn local_pods(objects: &Objects, node_name: &str, w: &mut Warnings) -> Vec<PodSpec> {
    let mut out: Vec<PodSpec> = Vec::new();
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in objects.pods() {
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(node_name) || spec.host_network == Some(true) {
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let (ns, name) = namespace_and_name(&pod.metadata);
        let name = format!("{ns}/{name}");
        for ip in &ips {
            if let Some(other) = owners.insert(*ip, name.clone()) {
                w.push(
                    format!("Pod {name}"),
                    format!(
                        "address {ip} is also Pod {other}'s: traffic to it reaches one of them"
                    ),
                );
            }
        }
        out.push(PodSpec {
            name,
            ips,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        });
    }
    out
}
