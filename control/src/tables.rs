//! The desired dataplane tables as a pure function of the objects, with kube-proxy's
//! semantics (pkg/proxy: servicechangetracker.go, endpointslicecache.go, topology.go).
//!
//! - One [`ServiceSpec`] per (Service, port, IP family), like kube-proxy's ServicePortName
//!   per proxier family. Headless and ExternalName Services are not programmed.
//! - EndpointSlices are authoritative: a Service's endpoints are those of the slices
//!   labelled `kubernetes.io/service-name: <name>` in its namespace, of the family's address
//!   type, whatever its selector says. A slice port matches a Service port by name (and
//!   protocol); the slice port's number is the target port, which is how named target ports
//!   resolve per pod. An address listed by several slices counts once, the ready listing
//!   winning (endpointslicecache.go).
//! - Endpoints are categorised as `CategorizeEndpoints` does (topology.go): for `Cluster`
//!   policy the ready ones (filtered by topology hints when usable), else the serving and
//!   terminating ones; for `Local` policy the local ready ones, else the local serving and
//!   terminating ones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use nat::spec::{
    ClusterSpec, EndpointSpec, FrontendKind, FrontendSpec, NodeSpec, PodSpec, Protocol,
    RemoteNodeSpec, ServiceSpec, TableSpec,
};

use crate::objects::Objects;

/// Label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label of the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation that turns on topology-aware hints (older spelling of PreferClose).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// Flannel's public IP annotation.
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Flannel's backend data annotation (`{"VNI":1,"VtepMAC":"..."}`).
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// Something in the objects that could not be used, reported but not fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning(pub String);

/// Why no table could be computed at all.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// There is no Node object for the node this dataplane serves.
    #[error("no Node object named {0}: start kxdp-control with the node's name (--node) or add the Node manifest")]
    NoSuchNode(String),
}

/// Computes the tables for `node_name`, also returning what was skipped and why.
pub fn compute_with_warnings(
    objects: &Objects,
    node_name: &str,
    cluster: &ClusterSpec,
) -> Result<(TableSpec, Vec<Warning>), TableError> {
    let node = objects
        .nodes
        .get(node_name)
        .ok_or_else(|| TableError::NoSuchNode(node_name.to_string()))?;
    let mut warnings = Vec::new();
    let me = node_spec(node_name, node);
    let zone = me.zone.clone();
    let mut services = Vec::new();
    for ((ns, name), svc) in &objects.services {
        services.extend(service_specs(
            objects,
            ns,
            name,
            svc,
            node_name,
            &me,
            zone.as_deref(),
            &mut warnings,
        ));
    }
    let mut local_pods = Vec::new();
    for ((ns, name), pod) in &objects.pods {
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(node_name) || spec.host_network == Some(true) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        local_pods.push(PodSpec {
            name: format!("{ns}/{name}"),
            ips,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        });
    }
    let mut remote_nodes = Vec::new();
    for (name, n) in &objects.nodes {
        if name == node_name {
            continue;
        }
        let spec = node_spec(name, n);
        if spec.pod_cidrs.is_empty() {
            continue;
        }
        let Some(vtep_ip) = spec.vtep_ip else {
            warnings.push(Warning(format!("node {name}: no public-ip annotation and no IPv4 InternalIP; its pods are unreachable")));
            continue;
        };
        remote_nodes.push(RemoteNodeSpec {
            name: name.clone(),
            pod_cidrs: spec.pod_cidrs,
            vtep_ip,
            vtep_mac: spec.vtep_mac.unwrap_or([0; 6]),
        });
    }
    Ok((
        TableSpec {
            node: me,
            cluster: cluster.clone(),
            services,
            local_pods,
            remote_nodes,
        },
        warnings,
    ))
}

/// Computes the tables for `node_name` (warnings are logged).
pub fn compute(
    objects: &Objects,
    node_name: &str,
    cluster: &ClusterSpec,
) -> Result<TableSpec, TableError> {
    let (spec, warnings) = compute_with_warnings(objects, node_name, cluster)?;
    for w in warnings {
        log::warn!("{}", w.0);
    }
    Ok(spec)
}

fn vtep_mac(data: &str) -> Option<[u8; 6]> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    let s = v.get("VtepMAC")?.as_str()?;
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

fn node_spec(name: &str, node: &Node) -> NodeSpec {
    let mut addresses = Vec::new();
    if let Some(status) = &node.status {
        for a in status.addresses.iter().flatten() {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
        }
    }
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    if let Some(spec) = &node.spec {
        let list = spec.pod_cidrs.clone().unwrap_or_default();
        let all = list.iter().chain(spec.pod_cidr.iter());
        for c in all {
            if let Ok(net) = c.parse::<IpNet>() {
                if !pod_cidrs.contains(&net) {
                    pod_cidrs.push(net);
                }
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
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    let vtep_ip = ann
        .get(FLANNEL_PUBLIC_IP)
        .and_then(|s| s.parse::<IpAddr>().ok())
        .or_else(|| addresses.iter().copied().find(|a| a.is_ipv4()));
    let vtep_mac = ann.get(FLANNEL_BACKEND_DATA).and_then(|d| vtep_mac(d));
    NodeSpec {
        name: name.to_string(),
        addresses,
        pod_cidrs,
        zone,
        vtep_ip,
        vtep_mac,
    }
}

fn pod_ips(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
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

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// One endpoint after defaulting, before categorisation.
#[derive(Clone, Debug)]
struct Ep {
    spec: EndpointSpec,
    zone_hints: Option<BTreeSet<String>>,
}

#[allow(clippy::too_many_arguments)]
fn service_specs(
    objects: &Objects,
    ns: &str,
    name: &str,
    svc: &Service,
    node_name: &str,
    node: &NodeSpec,
    zone: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Vec<ServiceSpec> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for s in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if s == "None" {
            // Headless: no virtual IP, nothing to program.
            return Vec::new();
        }
        match s.parse::<IpAddr>() {
            Ok(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
            Ok(_) => {}
            Err(_) if s.is_empty() => {}
            Err(_) => warnings.push(Warning(format!(
                "service {ns}/{name}: clusterIP {s:?} is not an address"
            ))),
        }
    }
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    let lb_ips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        // ipMode Proxy: the load balancer delivers to the node, not to the VIP.
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref()?.parse().ok())
        .collect();
    let node_ports = matches!(
        spec.type_.as_deref(),
        Some("NodePort") | Some("LoadBalancer")
    );
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let externally_accessible = node_ports || !external_ips.is_empty() || !lb_ips.is_empty();
    let external_local =
        spec.external_traffic_policy.as_deref() == Some("Local") && externally_accessible;
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.clamp(1, 86400) as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
        )
    } else {
        None
    };
    let use_hints = spec.traffic_distribution.as_deref() == Some("PreferClose")
        || svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION))
            .is_some_and(|m| m == "Auto" || m == "auto");
    let slices: Vec<&EndpointSlice> = objects
        .endpoint_slices
        .iter()
        .filter(|((sns, _), s)| {
            sns == ns
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
        })
        .map(|(_, s)| s)
        .collect();
    let mut out = Vec::new();
    let families: Vec<bool> = {
        let mut f: Vec<bool> = cluster_ips.iter().map(|ip| ip.is_ipv6()).collect();
        f.dedup();
        f
    };
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            warnings.push(Warning(format!(
                "service {ns}/{name}: protocol {:?} is not supported",
                port.protocol
            )));
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            warnings.push(Warning(format!(
                "service {ns}/{name}: port {} out of range",
                port.port
            )));
            continue;
        };
        for &v6 in &families {
            let fam = |ip: &IpAddr| ip.is_ipv6() == v6;
            let mut frontends = Vec::new();
            for ip in cluster_ips.iter().filter(|i| fam(i)) {
                frontends.push(FrontendSpec {
                    kind: FrontendKind::ClusterIp,
                    ip: *ip,
                    port: svc_port,
                });
            }
            for ip in external_ips.iter().filter(|i| fam(i)) {
                frontends.push(FrontendSpec {
                    kind: FrontendKind::ExternalIp,
                    ip: *ip,
                    port: svc_port,
                });
            }
            for ip in lb_ips.iter().filter(|i| fam(i)) {
                frontends.push(FrontendSpec {
                    kind: FrontendKind::LoadBalancer,
                    ip: *ip,
                    port: svc_port,
                });
            }
            if node_ports {
                if let Some(np) = port
                    .node_port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                {
                    for ip in node.addresses.iter().filter(|i| fam(i)) {
                        frontends.push(FrontendSpec {
                            kind: FrontendKind::NodePort,
                            ip: *ip,
                            port: np,
                        });
                    }
                }
            }
            let eps = endpoints_for(&slices, port, proto, v6, node_name);
            let (cluster, local) = categorize(&eps, use_hints, zone);
            out.push(ServiceSpec {
                name: format!("{ns}/{name}:{}", port.name.as_deref().unwrap_or("")),
                protocol: proto,
                frontends,
                cluster_endpoints: cluster,
                local_endpoints: local,
                all_endpoints: eps.iter().map(|e| e.spec.clone()).collect(),
                internal_local,
                external_local,
                affinity_timeout_s: affinity,
            });
        }
    }
    out
}

fn condition(e: &Endpoint) -> (bool, bool, bool) {
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving, terminating)
}

/// The endpoints of one Service port and family, merged over its slices.
fn endpoints_for(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    proto: Protocol,
    v6: bool,
    node_name: &str,
) -> Vec<Ep> {
    let want_name = port.name.as_deref().unwrap_or("");
    let address_type = if v6 { "IPv6" } else { "IPv4" };
    let mut by_addr: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != address_type {
            continue;
        }
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for e in slice.endpoints.iter().flatten() {
            // kube-proxy uses an endpoint's first address.
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let (ready, serving, terminating) = condition(e);
            let zone_hints = e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect::<BTreeSet<_>>());
            let ep = Ep {
                spec: EndpointSpec {
                    ip,
                    port: target_port,
                    local: e.node_name.as_deref() == Some(node_name),
                    ready,
                    serving,
                    terminating,
                },
                zone_hints,
            };
            let key = (ip, target_port);
            // Listed twice: the ready listing wins (endpointslicecache.go).
            match by_addr.get(&key) {
                Some(existing) if existing.spec.ready && !ready => {}
                _ => {
                    by_addr.insert(key, ep);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// kube-proxy's CategorizeEndpoints: (cluster endpoints, local endpoints).
fn categorize(
    eps: &[Ep],
    use_hints: bool,
    zone: Option<&str>,
) -> (Vec<EndpointSpec>, Vec<EndpointSpec>) {
    let topology = use_hints && can_use_topology(eps, zone);
    let mut cluster: Vec<EndpointSpec> = eps
        .iter()
        .filter(|e| e.spec.ready)
        .filter(|e| {
            !topology || zone.is_some_and(|z| e.zone_hints.as_ref().is_some_and(|h| h.contains(z)))
        })
        .map(|e| e.spec.clone())
        .collect();
    if cluster.is_empty() {
        cluster = eps
            .iter()
            .filter(|e| e.spec.serving && e.spec.terminating)
            .map(|e| e.spec.clone())
            .collect();
    }
    let local_ready: Vec<EndpointSpec> = eps
        .iter()
        .filter(|e| e.spec.local && e.spec.ready)
        .map(|e| e.spec.clone())
        .collect();
    let local = if !local_ready.is_empty() {
        local_ready
    } else {
        eps.iter()
            .filter(|e| e.spec.local && e.spec.serving && e.spec.terminating)
            .map(|e| e.spec.clone())
            .collect()
    };
    (cluster, local)
}

/// topology.go canUseTopology: hints are used only when this node has a zone, every ready
/// endpoint carries zone hints, and at least one is hinted for this node's zone.
fn can_use_topology(eps: &[Ep], zone: Option<&str>) -> bool {
    let Some(zone) = zone else { return false };
    let mut for_zone = false;
    for e in eps.iter().filter(|e| e.spec.ready) {
        match &e.zone_hints {
            Some(h) if !h.is_empty() => for_zone |= h.contains(zone),
            _ => return false,
        }
    }
    for_zone
}

#[cfg(test)]
mod tests;
