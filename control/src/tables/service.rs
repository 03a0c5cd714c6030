//! One Service as kube-proxy sees it: its ports per IP family with their frontends, its
//! endpoints joined over its EndpointSlices, and their categorisation (ready, serving and
//! terminating, topology hints), as the parent module's doc describes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nat::spec::{EndpointSpec, FrontendKind, FrontendSpec, Protocol, ServiceSpec};

use crate::objects::namespace_and_name;

use super::computed::{Here, Refusal, Warnings, MAX_AFFINITY_TIMEOUT_S};

pub(super) fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or(crate::defaults::PROTOCOL) {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

pub(super) fn family_name(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// `GetClusterIPByFamily`: the Service's ClusterIP of one family, as written.
pub(super) fn cluster_ip_of_family(spec: &K8sServiceSpec, v6: bool) -> Option<&str> {
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if families.is_empty() {
        let ip = spec.cluster_ip.as_deref()?;
        let is_v6 = ip.parse::<IpAddr>().ok()?.is_ipv6();
        return (is_v6 == v6).then_some(ip);
    }
    let idx = families.iter().position(|f| f == family_name(v6))?;
    spec.cluster_ips.as_deref()?.get(idx).map(String::as_str)
}

/// Addresses of a list, by family; a bad one is a warning.
pub(super) fn parse_ips<'a>(
    list: impl Iterator<Item = &'a str>,
    what: &str,
    object: &str,
    w: &mut Warnings,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in list {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => w.push(
                object.to_string(),
                format!("{what} {s:?} is not an IP address; ignored"),
            ),
        }
    }
    out
}

pub(super) fn service_specs(
    svc: &Service,
    slices: &[&EndpointSlice],
    here: &Here<'_>,
    w: &mut Warnings,
) -> Vec<ServiceSpec> {
    let (ns, name) = namespace_and_name(&svc.metadata);
    let object = format!("Service {ns}/{name}");
    if [ns, name].iter().any(|s| s.contains(['/', ':'])) {
        // The API server never lets these through; a Service port's name
        // (`namespace/name:port`) would not say which Service it is.
        w.push(
            object,
            "a namespace or name with '/' or ':' is not valid; skipped",
        );
        return Vec::new();
    }
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        return Vec::new();
    }
    // ShouldSkipService: headless, or no ClusterIP at all.
    match spec.cluster_ip.as_deref() {
        Some("None") => return Vec::new(),
        None | Some("") => {
            w.push(
                object,
                "no clusterIP: the API server would allocate one; write it in the manifest (clusterIP: None for a headless Service)",
            );
            return Vec::new();
        }
        Some(_) => {}
    }
    // A ClusterIP that is no address at all may belong to no family: said here, whatever
    // `ipFamilies` says.
    let written = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips,
        _ => spec.cluster_ip.as_slice(),
    };
    for s in written.iter().filter(|s| s.parse::<IpAddr>().is_err()) {
        w.refuse(
            Refusal::InvalidClusterIp,
            object.clone(),
            format!("clusterIP {s:?} is not an IP address; not programmed"),
        );
    }
    let mut families: Vec<(bool, IpAddr)> = Vec::new();
    let order = match spec.ip_families.as_deref() {
        Some([first, ..]) if first == "IPv6" => [true, false],
        _ => [false, true],
    };
    for v6 in order {
        let Some(s) = cluster_ip_of_family(spec, v6) else {
            continue;
        };
        match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => {
                // The API server allocates ClusterIPs from the Service ranges only; one
                // outside them (8.8.8.8, a node's address) would capture that address for
                // every pod of the node. A family without a range is not judged.
                let ranges = here
                    .service_cidrs
                    .iter()
                    .filter(|n| n.addr().is_ipv6() == v6);
                if ranges.clone().next().is_some() && !ranges.clone().any(|n| n.contains(&ip)) {
                    let all: Vec<String> =
                        here.service_cidrs.iter().map(ToString::to_string).collect();
                    w.refuse(
                        Refusal::OutsideServiceRanges,
                        object.clone(),
                        format!(
                            "clusterIP {ip} is outside the Service ranges ({}): that family is not programmed, so that the address stays the real one for every pod; fix the Service, or kxdp-control's --service-cidr",
                            all.join(", ")
                        ),
                    );
                    continue;
                }
                families.push((v6, ip));
            }
            // Not an address at all: said above.
            Err(_) => {}
            Ok(_) => w.push(
                object.clone(),
                format!(
                    "clusterIP {s:?} is not an {} address; that family is not programmed",
                    family_name(v6)
                ),
            ),
        }
    }

    let external_ips = parse_ips(
        spec.external_ips.iter().flatten().map(String::as_str),
        "externalIP",
        &object,
        w,
    );
    // Only VIP-mode ingress is the node's to capture; in Proxy mode the load balancer
    // delivers to the node itself (proxyutil.IsVIPMode).
    let lb_ips = parse_ips(
        svc.status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter(|i| matches!(i.ip_mode.as_deref(), None | Some("VIP")))
            .filter_map(|i| i.ip.as_deref()),
        "load-balancer ingress ip",
        &object,
        w,
    );
    // ServicePort.LoadBalancerSourceRanges: trimmed (validation lets padding through),
    // each family's for its proxier.
    let mut source_ranges: Vec<IpNet> = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => w.push(
                object.clone(),
                format!("loadBalancerSourceRanges {r:?} is not a CIDR; ignored"),
            ),
        }
    }
    let node_ports = ty == "NodePort" || ty == "LoadBalancer";
    // apiservice.ExternallyAccessible / ExternalPolicyLocal / InternalPolicyLocal.
    let externally_accessible = node_ports
        || (ty == "ClusterIP" && !spec.external_ips.as_deref().unwrap_or_default().is_empty());
    let external_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(crate::defaults::AFFINITY_TIMEOUT_S);
        let clamped = t.clamp(1, MAX_AFFINITY_TIMEOUT_S as i32) as u32;
        if clamped as i32 != t {
            w.push(
                object.clone(),
                format!("sessionAffinity timeout {t}s is outside 1..={MAX_AFFINITY_TIMEOUT_S}; using {clamped}s"),
            );
        }
        Some(clamped)
    } else {
        None
    };

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("");
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            w.push(
                object.clone(),
                format!(
                    "port {port_name:?}: protocol {:?} is not TCP, UDP or SCTP; skipped",
                    port.protocol.as_deref().unwrap_or("")
                ),
            );
            continue;
        };
        let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            w.push(
                object.clone(),
                format!(
                    "port {port_name:?}: {} is not a port number; skipped",
                    port.port
                ),
            );
            continue;
        };
        let node_port = match port.node_port.unwrap_or(0) {
            0 => {
                if ty == "NodePort" {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: type NodePort without nodePort: the API server would allocate one; write it in the manifest"),
                    );
                }
                None
            }
            n => match u16::try_from(n) {
                Ok(n) if node_ports => Some(n),
                Ok(_) => {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: nodePort on a Service of type {ty} is ignored (only NodePort and LoadBalancer have one)"),
                    );
                    None
                }
                Err(_) => {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: nodePort {n} is not a port number; ignored"),
                    );
                    None
                }
            },
        };
        for &(v6, cluster_ip) in &families {
            let fam = |ip: &&IpAddr| ip.is_ipv6() == v6;
            let mut frontends = vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: cluster_ip,
                port: svc_port,
            }];
            let at = |kind, ip: &IpAddr| FrontendSpec {
                kind,
                ip: *ip,
                port: svc_port,
            };
            frontends.extend(
                external_ips
                    .iter()
                    .filter(fam)
                    .map(|ip| at(FrontendKind::ExternalIp, ip)),
            );
            frontends.extend(
                lb_ips
                    .iter()
                    .filter(fam)
                    .map(|ip| at(FrontendKind::LoadBalancer, ip)),
            );
            if let Some(np) = node_port {
                frontends.extend(
                    here.node_addresses
                        .iter()
                        .filter(fam)
                        .map(|ip| FrontendSpec {
                            kind: FrontendKind::NodePort,
                            ip: *ip,
                            port: np,
                        }),
                );
            }
            // kube-proxy's firewall chain: only for load-balancer IPs of the family, and
            // the LB IPs are allowed sources too when a range holds the node's IP (a
            // node reaching its own VIP loops back from the VIP).
            let mut lb_source_ranges: Vec<IpNet> = Vec::new();
            let family_lb_ips: Vec<IpAddr> = lb_ips.iter().copied().filter(|ip| fam(&ip)).collect();
            if !family_lb_ips.is_empty() {
                lb_source_ranges.extend(source_ranges.iter().filter(|n| n.addr().is_ipv6() == v6));
                let node_ip = here.primary_ips[v6 as usize];
                if node_ip.is_some_and(|ip| lb_source_ranges.iter().any(|n| n.contains(&ip))) {
                    lb_source_ranges.extend(family_lb_ips.iter().map(|&ip| IpNet::from(ip)));
                }
            }
            let eps = endpoints_for(slices, port, proto, v6, here.node_name, &object, w);
            let (cluster, local) = categorize(&eps, here.node_name, here.zone);
            out.push(ServiceSpec {
                name: format!("{ns}/{name}:{port_name}"),
                protocol: proto,
                frontends,
                cluster_endpoints: cluster,
                local_endpoints: local,
                all_endpoints: eps.iter().map(|e| e.spec.clone()).collect(),
                internal_local,
                external_local,
                affinity_timeout_s: affinity,
                lb_source_ranges,
                refused: Vec::new(),
            });
        }
    }
    out
}

/// One endpoint of a Service port after defaulting, before categorisation.
#[derive(Clone, Debug)]
pub(super) struct Ep {
    spec: EndpointSpec,
    /// `hints.forZones`; empty means no hint.
    zones: BTreeSet<String>,
    /// `hints.forNodes`; empty means no hint.
    nodes: BTreeSet<String>,
}

/// The endpoints of one Service port and family, joined over its slices
/// (endpointslicecache.go `endpointInfoByServicePort` and `addEndpoints`).
pub(super) fn endpoints_for(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    proto: Protocol,
    v6: bool,
    node_name: &str,
    object: &str,
    w: &mut Warnings,
) -> Vec<Ep> {
    let want_name = port.name.as_deref().unwrap_or("");
    let mut by_addr: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != family_name(v6) {
            continue;
        }
        let slice_name = slice.metadata.name.as_deref().unwrap_or("");
        for target in slice.ports.iter().flatten().filter(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) {
            let Some(target_port) = target
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
            else {
                w.push(
                    object.to_string(),
                    format!("EndpointSlice {slice_name} port {want_name:?} has no valid port number; its endpoints are not used for it"),
                );
                continue;
            };
            for e in slice.endpoints.iter().flatten() {
                // kube-proxy uses an endpoint's first address only.
                let Some(first) = e.addresses.first() else {
                    continue;
                };
                let ip = match first.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv6() == v6 => ip,
                    _ => {
                        w.push(
                            object.to_string(),
                            format!("EndpointSlice {slice_name}: {first:?} is not an {} address; endpoint ignored", family_name(v6)),
                        );
                        continue;
                    }
                };
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let hints = e.hints.as_ref();
                let ep = Ep {
                    spec: EndpointSpec {
                        ip,
                        port: target_port,
                        local: !node_name.is_empty() && e.node_name.as_deref() == Some(node_name),
                        ready,
                        serving,
                        terminating,
                    },
                    zones: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    nodes: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                };
                let rank = |e: &Ep| (!e.spec.terminating, e.spec.ready);
                match by_addr.get(&(ip, target_port)) {
                    Some(existing) if rank(existing) >= rank(&ep) => {}
                    _ => {
                        by_addr.insert((ip, target_port), ep);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// The topology kube-proxy applies to cluster endpoints (`topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    /// Hints ignored.
    None,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

pub(super) fn topology(eps: &[Ep], node_name: &str, zone: Option<&str>) -> Topology {
    let ready: Vec<&Ep> = eps.iter().filter(|e| e.spec.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|e| !e.nodes.is_empty())
        && ready.iter().any(|e| e.nodes.contains(node_name))
    {
        return Topology::SameNode;
    }
    let Some(zone) = zone else {
        return Topology::None;
    };
    if ready.iter().all(|e| !e.zones.is_empty()) && ready.iter().any(|e| e.zones.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::None
}

/// kube-proxy's `CategorizeEndpoints`: (cluster endpoints, local endpoints).
pub(super) fn categorize(
    eps: &[Ep],
    node_name: &str,
    zone: Option<&str>,
) -> (Vec<EndpointSpec>, Vec<EndpointSpec>) {
    let mode = topology(eps, node_name, zone);
    let available = |e: &Ep| match mode {
        Topology::None => true,
        Topology::SameNode => e.nodes.contains(node_name),
        Topology::SameZone => zone.is_some_and(|z| e.zones.contains(z)),
    };
    let pick = |f: &dyn Fn(&Ep) -> bool| -> Vec<EndpointSpec> {
        eps.iter()
            .filter(|e| f(e))
            .map(|e| e.spec.clone())
            .collect()
    };
    let mut cluster = pick(&|e| e.spec.ready && available(e));
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology only filters when one is ready for us).
        cluster = pick(&|e| e.spec.serving && e.spec.terminating);
    }
    let mut local = pick(&|e| e.spec.local && e.spec.ready);
    if local.is_empty() {
        local = pick(&|e| e.spec.local && e.spec.serving && e.spec.terminating);
    }
    (cluster, local)
}
