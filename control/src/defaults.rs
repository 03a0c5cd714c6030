//! The defaults the API server fills in before an object is stored.
//!
//! Manifests are written as a user writes them, so control applies the defaults itself when
//! an object enters the store; the table computation then reads every field as a watch of
//! the API server would deliver it. Only defaults that something downstream reads are
//! applied (pkg/apis/core/v1/defaults.go, pkg/apis/discovery/v1/defaults.go,
//! pkg/apis/networking/v1/defaults.go, and the namespace name label of the namespace
//! controller); each function is idempotent.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ClientIPConfig, Namespace, Pod, Service, SessionAffinityConfig};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::NAMESPACE_NAME_LABEL;

/// `protocol` of Service, EndpointSlice, NetworkPolicy and container ports.
pub const PROTOCOL: &str = "TCP";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` with `sessionAffinity: ClientIP`.
pub const AFFINITY_TIMEOUT_S: i32 = 10800;

fn default_protocol(p: &mut Option<String>) {
    if matches!(p.as_deref(), None | Some("")) {
        *p = Some(PROTOCOL.to_string());
    }
}

/// Service defaults: port protocol TCP and `targetPort` = `port`; `type: ClusterIP`;
/// `sessionAffinity: None`, and the ClientIP timeout 10800 s; traffic policies `Cluster`
/// (external only for externally reachable types, as the API server does); `clusterIP` and
/// `clusterIPs` filled from each other and `ipFamilies` from the cluster IPs.
pub fn service(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec
        .type_
        .get_or_insert_with(|| "ClusterIP".to_string())
        .clone();
    for port in spec.ports.iter_mut().flatten() {
        default_protocol(&mut port.protocol);
        if port.target_port.is_none() {
            port.target_port = Some(IntOrString::Int(port.port));
        }
    }
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".to_string());
    if affinity == "ClientIP" {
        let timeout = &mut spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default)
            .client_ip
            .get_or_insert_with(ClientIPConfig::default)
            .timeout_seconds;
        timeout.get_or_insert(AFFINITY_TIMEOUT_S);
    }
    if ty != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".to_string());
    }
    let externally_reachable = ty == "NodePort"
        || ty == "LoadBalancer"
        || (ty == "ClusterIP" && spec.external_ips.as_ref().is_some_and(|e| !e.is_empty()));
    if externally_reachable {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".to_string());
    }
    // clusterIP and clusterIPs describe the same thing; the API server keeps them equal.
    match (&spec.cluster_ip, &spec.cluster_ips) {
        (Some(ip), None) if !ip.is_empty() => spec.cluster_ips = Some(vec![ip.clone()]),
        (None, Some(ips)) if !ips.is_empty() => spec.cluster_ip = Some(ips[0].clone()),
        _ => {}
    }
    if spec.ip_families.as_deref().unwrap_or_default().is_empty() {
        let families: Vec<String> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .map(|ip| if ip.is_ipv6() { "IPv6" } else { "IPv4" }.to_string())
            .collect();
        if !families.is_empty() {
            spec.ip_families = Some(families);
        }
    }
}

/// EndpointSlice defaults: port name `""` and protocol TCP; conditions: absent `ready` is
/// ready, absent `serving` is the value of `ready`, absent `terminating` is false (the
/// cases' README; kube-proxy itself reads an absent `serving` as true, which only differs
/// for an endpoint written `ready: false` without `serving`).
pub fn endpoint_slice(slice: &mut EndpointSlice) {
    for port in slice.ports.iter_mut().flatten() {
        port.name.get_or_insert_with(String::new);
        default_protocol(&mut port.protocol);
    }
    for ep in slice.endpoints.iter_mut().flatten() {
        let c = ep
            .conditions
            .get_or_insert_with(EndpointConditions::default);
        let ready = *c.ready.get_or_insert(true);
        c.serving.get_or_insert(ready);
        c.terminating.get_or_insert(false);
    }
}

/// NetworkPolicy defaults: port protocol TCP; `policyTypes` `[Ingress]`, plus `Egress` when
/// the policy has egress rules.
pub fn network_policy(policy: &mut NetworkPolicy) {
    let Some(spec) = policy.spec.as_mut() else {
        return;
    };
    let ports = |p: &mut Option<Vec<NetworkPolicyPort>>| {
        for port in p.iter_mut().flatten() {
            default_protocol(&mut port.protocol);
        }
    };
    for rule in spec.ingress.iter_mut().flatten() {
        ports(&mut rule.ports);
    }
    for rule in spec.egress.iter_mut().flatten() {
        ports(&mut rule.ports);
    }
    if spec.policy_types.as_deref().unwrap_or_default().is_empty() {
        let mut types = vec!["Ingress".to_string()];
        if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
            types.push("Egress".to_string());
        }
        spec.policy_types = Some(types);
    }
}

/// Pod defaults: container port protocol TCP (NetworkPolicy named ports resolve through
/// them).
pub fn pod(pod: &mut Pod) {
    if let Some(spec) = pod.spec.as_mut() {
        let containers = spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten());
        for c in containers {
            for port in c.ports.iter_mut().flatten() {
                default_protocol(&mut port.protocol);
            }
        }
    }
}

/// Namespace defaults: the `kubernetes.io/metadata.name` label, which the API server sets
/// on every Namespace.
pub fn namespace(ns: &mut Namespace) {
    if let Some(name) = ns.metadata.name.clone() {
        ns.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(NAMESPACE_NAME_LABEL.to_string(), name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).expect("test YAML")
    }

    #[test]
    fn service_defaults() {
        let mut svc: Service = yaml(
            "metadata: {name: s}\nspec: {clusterIP: 172.30.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}",
        );
        service(&mut svc);
        let spec = svc.spec.as_ref().expect("spec");
        let port = &spec.ports.as_ref().expect("ports")[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        assert_eq!(port.target_port, Some(IntOrString::Int(80)));
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        // Not externally reachable: the API server leaves it unset.
        assert_eq!(spec.external_traffic_policy, None);
        assert_eq!(
            spec.cluster_ips.as_deref(),
            Some(&["172.30.0.1".to_string()][..])
        );
        assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_string()][..]));
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        assert_eq!(timeout, Some(AFFINITY_TIMEOUT_S));

        let mut np: Service =
            yaml("metadata: {name: s}\nspec: {type: NodePort, clusterIPs: [\"fd00::1\"]}");
        service(&mut np);
        let spec = np.spec.as_ref().expect("spec");
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00::1"));
        assert_eq!(spec.ip_families.as_deref(), Some(&["IPv6".to_string()][..]));
    }

    #[test]
    fn endpoint_conditions_defaults() {
        let mut s: EndpointSlice = yaml(
            "metadata: {name: s}\naddressType: IPv4\nports: [{port: 80}]\nendpoints:\n- {addresses: [10.0.0.1]}\n- {addresses: [10.0.0.2], conditions: {ready: false}}\n- {addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}",
        );
        endpoint_slice(&mut s);
        let got: Vec<(bool, bool, bool)> = s
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.as_ref().expect("defaulted");
                (
                    c.ready.unwrap_or_default(),
                    c.serving.unwrap_or_default(),
                    c.terminating.unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (true, true, false),
                (false, false, false),
                (false, true, true)
            ]
        );
        let port = &s.ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.protocol.as_deref()),
            (Some(""), Some("TCP"))
        );
    }

    #[test]
    fn policy_types_follow_the_rules() {
        let mut p: NetworkPolicy =
            yaml("metadata: {name: p}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}");
        network_policy(&mut p);
        let spec = p.spec.as_ref().expect("spec");
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let port = &spec.ingress.as_ref().expect("ingress")[0]
            .ports
            .as_ref()
            .expect("ports")[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));

        let mut p: NetworkPolicy =
            yaml("metadata: {name: p}\nspec: {podSelector: {}, egress: [{}]}");
        network_policy(&mut p);
        assert_eq!(
            p.spec.as_ref().and_then(|s| s.policy_types.clone()),
            Some(vec!["Ingress".to_string(), "Egress".to_string()])
        );
    }

    #[test]
    fn namespace_gets_its_name_label() {
        let mut ns: Namespace = yaml("metadata: {name: prod}");
        namespace(&mut ns);
        assert_eq!(
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(NAMESPACE_NAME_LABEL))
                .map(String::as_str),
            Some("prod")
        );
    }
}
