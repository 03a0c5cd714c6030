//! Table-driven tests of the computation, in the spirit of kube-proxy's proxier tests: a
//! handful of objects in, the expected frontends and endpoint lists out.

use super::*;
use crate::manifests::load_text;

const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: "fd00:192:168::2"}
  - {type: Hostname, address: node-a}
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
  annotations:
    flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:11:22:33"}'
    flannel.alpha.coreos.com/public-ip: 192.168.0.3
spec: {podCIDR: 10.244.2.0/24}
status:
  addresses: [{type: InternalIP, address: 192.168.0.3}]
"#;

fn tables(extra: &str) -> TableSpec {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    load_text(&mut objects, "nodes", NODES, &mut errors);
    load_text(&mut objects, "test", extra, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    compute(&objects, "node-a", &ClusterSpec::default()).unwrap()
}

fn svc<'a>(t: &'a TableSpec, name: &str) -> &'a ServiceSpec {
    t.services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} in {:?}",
                t.services.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
}

fn ips(eps: &[EndpointSpec]) -> Vec<String> {
    eps.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
}

fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}\n---\n")
}

fn slice(name: &str, svc: &str, family: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: {family}\nports: {ports}\nendpoints:\n{endpoints}\n---\n"
    )
}

const WEB: &str = "  clusterIP: 172.30.0.41\n  ports: [{name: http, port: 80, targetPort: 8080}]";

#[test]
fn ready_endpoints_only_and_defaults_applied() {
    let t = tables(&(service("web", WEB)
        + &slice(
            "web-1",
            "web",
            "IPv4",
            "[{name: http, port: 8080}]",
            "  - {addresses: [10.244.1.5], nodeName: node-a}\n  - {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: node-b}\n  - {addresses: [10.244.2.6], conditions: {ready: false}, nodeName: node-b}",
        )));
    let s = svc(&t, "default/web:http");
    // protocol defaults to TCP on both the Service and the slice port.
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(
        ips(&s.cluster_endpoints),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    assert_eq!(ips(&s.local_endpoints), ["10.244.1.5:8080"]);
    assert_eq!(s.all_endpoints.len(), 3);
    assert_eq!(
        s.frontends,
        [FrontendSpec {
            kind: FrontendKind::ClusterIp,
            ip: "172.30.0.41".parse().unwrap(),
            port: 80
        }]
    );
    assert!(!s.internal_local && !s.external_local && s.affinity_timeout_s.is_none());
}

#[test]
fn terminating_endpoints_only_when_none_is_ready() {
    let eps = "  - {addresses: [10.244.1.5], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-a}\n  - {addresses: [10.244.2.5], conditions: {ready: false, serving: false, terminating: true}, nodeName: node-b}";
    let t = tables(
        &(service("web", WEB) + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", eps)),
    );
    assert_eq!(
        ips(&svc(&t, "default/web:http").cluster_endpoints),
        ["10.244.1.5:8080"]
    );
    let eps2 = format!("{eps}\n  - {{addresses: [10.244.2.7], nodeName: node-b}}");
    let t = tables(
        &(service("web", WEB) + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", &eps2)),
    );
    assert_eq!(
        ips(&svc(&t, "default/web:http").cluster_endpoints),
        ["10.244.2.7:8080"]
    );
}

#[test]
fn nodeport_with_local_policy() {
    let spec = "  type: NodePort\n  clusterIP: 172.30.0.41\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]";
    let eps = "  - {addresses: [10.244.1.5], nodeName: node-a}\n  - {addresses: [10.244.2.5], nodeName: node-b}";
    let t = tables(
        &(service("web", spec) + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", eps)),
    );
    let s = svc(&t, "default/web:http");
    assert!(s.external_local);
    assert_eq!(ips(&s.local_endpoints), ["10.244.1.5:8080"]);
    assert_eq!(
        ips(&s.cluster_endpoints),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    let np: Vec<String> = s
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort)
        .map(|f| format!("{}:{}", f.ip, f.port))
        .collect();
    // Only the node addresses of the Service's family.
    assert_eq!(np, ["192.168.0.2:30080"]);
}

#[test]
fn named_target_ports_resolve_per_slice() {
    let spec = "  clusterIP: 172.30.0.48\n  ports: [{name: http, port: 80, targetPort: http}]";
    let t = tables(
        &(service("web", spec)
            + &slice(
                "a",
                "web",
                "IPv4",
                "[{name: http, port: 8080}]",
                "  - {addresses: [10.244.1.5]}",
            )
            + &slice(
                "b",
                "web",
                "IPv4",
                "[{name: http, port: 9090}]",
                "  - {addresses: [10.244.2.5]}",
            )
            + &slice(
                "c",
                "other",
                "IPv4",
                "[{name: http, port: 7070}]",
                "  - {addresses: [10.244.2.9]}",
            )),
    );
    assert_eq!(
        ips(&svc(&t, "default/web:http").cluster_endpoints),
        ["10.244.1.5:8080", "10.244.2.5:9090"]
    );
}

#[test]
fn multiport_matches_slice_ports_by_name_and_protocol() {
    let spec = "  clusterIP: 172.30.0.10\n  ports:\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}";
    let t = tables(&(service("dns", spec)
        + &slice("d", "dns", "IPv4", "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}]", "  - {addresses: [10.244.1.53]}")));
    assert_eq!(svc(&t, "default/dns:dns").protocol, Protocol::Udp);
    assert_eq!(
        ips(&svc(&t, "default/dns:dns").cluster_endpoints),
        ["10.244.1.53:5353"]
    );
    assert_eq!(
        ips(&svc(&t, "default/dns:dns-tcp").cluster_endpoints),
        ["10.244.1.53:5354"]
    );
}

#[test]
fn dual_stack_gives_one_entry_per_family() {
    let spec = "  clusterIP: 172.30.0.41\n  clusterIPs: [172.30.0.41, \"fd00:172:30::41\"]\n  ipFamilies: [IPv4, IPv6]\n  ports: [{name: http, port: 80, targetPort: 8080}]";
    let t = tables(
        &(service("web", spec)
            + &slice(
                "v4",
                "web",
                "IPv4",
                "[{name: http, port: 8080}]",
                "  - {addresses: [10.244.1.5]}",
            )
            + &slice(
                "v6",
                "web",
                "IPv6",
                "[{name: http, port: 8080}]",
                "  - {addresses: [\"fd00:10:244:1::5\"]}",
            )),
    );
    let both: Vec<&ServiceSpec> = t
        .services
        .iter()
        .filter(|s| s.name == "default/web:http")
        .collect();
    assert_eq!(both.len(), 2);
    for s in both {
        let v6 = s.frontends[0].ip.is_ipv6();
        assert!(s.cluster_endpoints.iter().all(|e| e.ip.is_ipv6() == v6));
        assert_eq!(s.cluster_endpoints.len(), 1);
    }
}

#[test]
fn topology_hints_used_only_when_complete() {
    let spec = "  clusterIP: 172.30.0.41\n  trafficDistribution: PreferClose\n  ports: [{name: http, port: 80, targetPort: 8080}]";
    let complete = "  - {addresses: [10.244.1.5], zone: zone-a, hints: {forZones: [{name: zone-a}]}}\n  - {addresses: [10.244.2.5], zone: zone-b, hints: {forZones: [{name: zone-b}]}}";
    let t = tables(
        &(service("web", spec)
            + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", complete)),
    );
    assert_eq!(
        ips(&svc(&t, "default/web:http").cluster_endpoints),
        ["10.244.1.5:8080"]
    );
    let incomplete = "  - {addresses: [10.244.1.5], zone: zone-a, hints: {forZones: [{name: zone-a}]}}\n  - {addresses: [10.244.2.5], zone: zone-b}";
    let t = tables(
        &(service("web", spec)
            + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", incomplete)),
    );
    assert_eq!(svc(&t, "default/web:http").cluster_endpoints.len(), 2);
    // Without PreferClose the hints are ignored.
    let t = tables(
        &(service("web", WEB) + &slice("w", "web", "IPv4", "[{name: http, port: 8080}]", complete)),
    );
    assert_eq!(svc(&t, "default/web:http").cluster_endpoints.len(), 2);
}

#[test]
fn headless_and_external_name_are_not_programmed() {
    let t = tables(
        &(service("h", "  clusterIP: None\n  ports: [{port: 80}]")
            + &service("e", "  type: ExternalName\n  externalName: example.com")),
    );
    assert!(t.services.is_empty());
}

#[test]
fn external_ips_load_balancer_and_affinity() {
    let lb = r#"apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.50
  externalIPs: [192.168.99.11]
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}, {ip: 1.2.3.5, ipMode: Proxy}]
"#;
    let t = tables(lb);
    let s = svc(&t, "default/lb:http");
    let kinds: Vec<(FrontendKind, String)> = s
        .frontends
        .iter()
        .map(|f| (f.kind, format!("{}:{}", f.ip, f.port)))
        .collect();
    assert_eq!(
        kinds,
        [
            (FrontendKind::ClusterIp, "172.30.0.50:80".to_string()),
            (FrontendKind::ExternalIp, "192.168.99.11:80".to_string()),
            (FrontendKind::LoadBalancer, "1.2.3.4:80".to_string()),
            (FrontendKind::NodePort, "192.168.0.2:30081".to_string()),
        ]
    );
    assert_eq!(s.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT));
    // No endpoints at all: empty lists, so the dataplane rejects.
    assert!(s.cluster_endpoints.is_empty());
}

#[test]
fn an_address_in_two_slices_counts_once_ready_wins() {
    let t = tables(
        &(service("web", WEB)
            + &slice(
                "a",
                "web",
                "IPv4",
                "[{name: http, port: 8080}]",
                "  - {addresses: [10.244.1.5], conditions: {ready: false}}",
            )
            + &slice(
                "b",
                "web",
                "IPv4",
                "[{name: http, port: 8080}]",
                "  - {addresses: [10.244.1.5], conditions: {ready: true}}",
            )),
    );
    let s = svc(&t, "default/web:http");
    assert_eq!(s.all_endpoints.len(), 1);
    assert_eq!(ips(&s.cluster_endpoints), ["10.244.1.5:8080"]);
}

#[test]
fn node_pods_and_remote_nodes() {
    let pods = r#"apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: c}}
spec: {nodeName: node-a, containers: [{name: m, image: i}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: "fd00:10:244:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: default}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: m, image: i}]}
status: {podIP: 192.168.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: default}
spec: {nodeName: node-b, containers: [{name: m, image: i}]}
status: {podIP: 10.244.2.9}
"#;
    let t = tables(pods);
    assert_eq!(t.node.addresses.len(), 2);
    assert_eq!(t.node.zone.as_deref(), Some("zone-a"));
    assert_eq!(t.local_pods.len(), 1);
    assert_eq!(t.local_pods[0].name, "default/client");
    assert_eq!(t.local_pods[0].ips.len(), 2);
    assert_eq!(t.remote_nodes.len(), 1);
    let b = &t.remote_nodes[0];
    assert_eq!(
        (b.name.as_str(), b.vtep_ip.to_string()),
        ("node-b", "192.168.0.3".to_string())
    );
    assert_eq!(b.vtep_mac, [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33]);
}

#[test]
fn unknown_node_is_an_error() {
    let objects = Objects::default();
    let err = compute(&objects, "nope", &ClusterSpec::default()).unwrap_err();
    assert!(err.to_string().contains("no Node object named nope"));
}
