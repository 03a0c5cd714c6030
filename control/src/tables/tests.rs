//! Table-driven tests of the computation, in the manner of kube-proxy's proxier tests
//! (pkg/proxy/iptables/proxier_test.go, pkg/proxy/topology_test.go): objects in, the
//! categorised endpoint lists and frontends out.

use std::net::IpAddr;
use std::sync::Arc;

use nat::spec::{ClusterSpec, EndpointSpec, FrontendKind, Protocol, ServiceSpec, TableSpec};

use super::service::family_name;
use super::*;
use crate::manifests::load_text;
use crate::objects::Objects;
use crate::warning::Warning;

/// node-a (zone-a, dual-stack) is the node under test; node-b (zone-b) announces flannel
/// data; node-c (zone-a) announces none.
const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
  annotations:
    flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:00:00:02"}'
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
  labels: {topology.kubernetes.io/zone: zone-b}
  annotations:
    flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:11:22:33"}'
    flannel.alpha.coreos.com/public-ip: 192.168.0.3
spec: {podCIDR: 10.244.2.0/24}
status:
  addresses: [{type: InternalIP, address: 192.168.0.3}]
---
apiVersion: v1
kind: Node
metadata:
  name: node-c
  labels: {topology.kubernetes.io/zone: zone-a}
spec: {podCIDRs: [10.244.3.0/24]}
status:
  addresses: [{type: ExternalIP, address: 198.51.100.4}, {type: InternalIP, address: 192.168.0.4}]
"#;

fn computed(extra: &str) -> Computed {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    load_text(&mut objects, "nodes", NODES, &mut errors);
    load_text(&mut objects, "test", extra, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    compute_with_warnings(&objects, "node-a", &ClusterSpec::default()).expect("node-a exists")
}

/// The warnings about Services (the fixture's node-c always has one).
fn service_warnings(c: &Computed) -> Vec<&Warning> {
    c.warnings
        .iter()
        .filter(|w| w.object.starts_with("Service "))
        .collect()
}

fn tables(extra: &str) -> TableSpec {
    computed(extra).tables
}

fn entry<'a>(t: &'a TableSpec, name: &str, v6: bool) -> &'a ServiceSpec {
    t.services
        .iter()
        .find(|s| s.name == name && s.frontends.first().is_some_and(|f| f.ip.is_ipv6() == v6))
        .unwrap_or_else(|| {
            panic!(
                "no {name} ({}) in {:?}",
                family_name(v6),
                t.services.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
}

fn addrs(eps: &[EndpointSpec]) -> Vec<String> {
    eps.iter()
        .map(|e| match e.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", e.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", e.port),
        })
        .collect()
}

fn frontends(s: &ServiceSpec, kind: FrontendKind) -> Vec<String> {
    s.frontends
        .iter()
        .filter(|f| f.kind == kind)
        .map(|f| match f.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", f.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", f.port),
        })
        .collect()
}

/// A Service in `default` with a spec written in YAML flow style.
fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n---\n")
}

/// An EndpointSlice in `default` for `svc`; `endpoints` are YAML flow mappings.
fn slice(name: &str, svc: &str, family: &str, ports: &str, endpoints: &[&str]) -> String {
    let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: {family}\nports: {ports}\nendpoints:\n{eps}---\n"
    )
}

const WEB: &str = "{clusterIP: 172.30.0.41, ports: [{name: http, port: 80, targetPort: 8080}]}";
const HTTP: &str = "[{name: http, port: 8080}]";

/// One row: objects in, one Service port's endpoint lists out.
struct Row {
    name: &'static str,
    objects: String,
    /// `ServiceSpec::name` and family of the entry checked.
    entry: (&'static str, bool),
    cluster: &'static [&'static str],
    local: &'static [&'static str],
    all: usize,
}

fn rows() -> Vec<Row> {
    let web = || service("web", WEB);
    let hinted = |ip: &str, node: &str, zone: &str, hint: &str| {
        format!("{{addresses: [{ip}], nodeName: {node}, zone: {zone}, hints: {{forZones: [{{name: {hint}}}]}}}}")
    };
    let topo = "{clusterIP: 172.30.0.41, trafficDistribution: PreferClose, ports: [{name: http, port: 80}]}";
    vec![
        Row {
            name: "ready endpoints only; absent conditions mean ready",
            objects: web()
                + &slice("w", "web", "IPv4", HTTP, &[
                    "{addresses: [10.244.1.5], nodeName: node-a}",
                    "{addresses: [10.244.2.5], nodeName: node-b, conditions: {ready: true}}",
                    "{addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false}}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:8080", "10.244.2.5:8080"],
            local: &["10.244.1.5:8080"],
            all: 3,
        },
        Row {
            name: "no ready endpoint: the serving-and-terminating ones, not the non-serving",
            objects: web()
                + &slice("w", "web", "IPv4", HTTP, &[
                    "{addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                    "{addresses: [10.244.2.5], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}",
                    "{addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false}}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:8080"],
            local: &["10.244.1.5:8080"],
            all: 3,
        },
        Row {
            name: "terminating endpoints unused while one is ready",
            objects: web()
                + &slice("w", "web", "IPv4", HTTP, &[
                    "{addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                    "{addresses: [10.244.2.7], nodeName: node-b}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.2.7:8080"],
            // Local falls back on its own: no local ready endpoint, one local serving-terminating.
            local: &["10.244.1.5:8080"],
            all: 2,
        },
        Row {
            name: "named target port differs per pod: the slice port is the target",
            objects: service("web", "{clusterIP: 172.30.0.48, ports: [{name: http, port: 80, targetPort: http}]}")
                + &slice("a", "web", "IPv4", "[{name: http, port: 8080}]", &["{addresses: [10.244.1.5]}"])
                + &slice("b", "web", "IPv4", "[{name: http, port: 9090}]", &["{addresses: [10.244.2.5]}"]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:8080", "10.244.2.5:9090"],
            local: &[],
            all: 2,
        },
        Row {
            name: "slices join by label, in the Service's namespace only",
            objects: web()
                + &slice("web-1", "web", "IPv4", HTTP, &["{addresses: [10.244.1.5]}"])
                + &slice("web-2", "web", "IPv4", HTTP, &["{addresses: [10.244.2.5]}"])
                + &slice("other", "other", "IPv4", HTTP, &["{addresses: [10.244.2.9]}"])
                + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: elsewhere, namespace: prod, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.2.8]}]\n---\n"
                + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: unlabelled, namespace: default}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.2.10]}]\n",
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:8080", "10.244.2.5:8080"],
            local: &[],
            all: 2,
        },
        Row {
            name: "ports join by name and protocol (DNS on UDP and TCP)",
            objects: service("dns", "{clusterIP: 172.30.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}")
                + &slice("d", "dns", "IPv4", "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354}, {name: dns, port: 6000, protocol: SCTP}]", &["{addresses: [10.244.1.53]}"]),
            entry: ("default/dns:dns", false),
            cluster: &["10.244.1.53:5353"],
            local: &[],
            all: 1,
        },
        Row {
            name: "an unnamed port joins the unnamed slice port",
            objects: service("one", "{clusterIP: 172.30.0.11, ports: [{port: 80}]}")
                + &slice("o", "one", "IPv4", "[{port: 8081}]", &["{addresses: [10.244.2.3]}"]),
            entry: ("default/one:", false),
            cluster: &["10.244.2.3:8081"],
            local: &[],
            all: 1,
        },
        Row {
            name: "a slice port without a number is not used",
            objects: web() + &slice("w", "web", "IPv4", "[{name: http}]", &["{addresses: [10.244.2.3]}"]),
            entry: ("default/web:http", false),
            cluster: &[],
            local: &[],
            all: 0,
        },
        Row {
            name: "dual-stack: the IPv6 entry takes the IPv6 slice only",
            objects: service("web", "{clusterIPs: [172.30.0.41, \"fd00:172:30::41\"], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80}]}")
                + &slice("v4", "web", "IPv4", HTTP, &["{addresses: [10.244.1.5], nodeName: node-a}"])
                + &slice("v6", "web", "IPv6", HTTP, &["{addresses: [\"fd00:10:244:1::5\"], nodeName: node-a}", "{addresses: [10.244.1.9]}"])
                + &slice("fqdn", "web", "FQDN", HTTP, &["{addresses: [web.example.com]}"]),
            entry: ("default/web:http", true),
            cluster: &["[fd00:10:244:1::5]:8080"],
            local: &["[fd00:10:244:1::5]:8080"],
            all: 1,
        },
        Row {
            name: "an address in two slices counts once, the ready listing wins",
            objects: web()
                + &slice("a", "web", "IPv4", HTTP, &["{addresses: [10.244.2.5], conditions: {ready: false}}"])
                + &slice("b", "web", "IPv4", HTTP, &["{addresses: [10.244.2.5]}"]),
            entry: ("default/web:http", false),
            cluster: &["10.244.2.5:8080"],
            local: &[],
            all: 1,
        },
        Row {
            // kubernetes#135593: a pod reusing the address of one still terminating wins,
            // even where the terminating one is local.
            name: "an address in two slices counts once, a running listing wins over a terminating one",
            objects: web()
                + &slice("a", "web", "IPv4", HTTP, &["{addresses: [10.244.1.5], nodeName: node-b}"])
                + &slice("b", "web", "IPv4", HTTP, &["{addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}"]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:8080"],
            local: &[],
            all: 1,
        },
        Row {
            name: "zone hints complete and one for our zone: only our zone's endpoints",
            objects: service("web", topo)
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    &hinted("10.244.1.5", "node-a", "zone-a", "zone-a"),
                    &hinted("10.244.3.5", "node-c", "zone-a", "zone-a"),
                    &hinted("10.244.2.5", "node-b", "zone-b", "zone-b"),
                    // Not ready: needs no hint and does not block topology.
                    "{addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false}}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:80", "10.244.3.5:80"],
            local: &["10.244.1.5:80"],
            all: 4,
        },
        Row {
            name: "zone hints incomplete: ignored",
            objects: service("web", topo)
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    &hinted("10.244.1.5", "node-a", "zone-a", "zone-a"),
                    "{addresses: [10.244.1.6], nodeName: node-a, zone: zone-a}",
                    &hinted("10.244.2.5", "node-b", "zone-b", "zone-b"),
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:80", "10.244.1.6:80", "10.244.2.5:80"],
            local: &["10.244.1.5:80", "10.244.1.6:80"],
            all: 3,
        },
        Row {
            name: "zone hints complete but none for our zone: ignored",
            objects: service("web", topo)
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    &hinted("10.244.2.5", "node-b", "zone-b", "zone-b"),
                    &hinted("10.244.2.6", "node-b", "zone-b", "zone-c"),
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.2.5:80", "10.244.2.6:80"],
            local: &[],
            all: 2,
        },
        Row {
            name: "zone hints are followed without trafficDistribution (kube-proxy reads only hints)",
            objects: service("web", "{clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}")
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    &hinted("10.244.1.5", "node-a", "zone-a", "zone-a"),
                    &hinted("10.244.2.5", "node-b", "zone-b", "zone-b"),
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:80"],
            local: &["10.244.1.5:80"],
            all: 2,
        },
        Row {
            name: "node hints complete and one for this node: PreferSameNode",
            objects: service("web", topo)
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    "{addresses: [10.244.1.5], nodeName: node-a, hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}",
                    "{addresses: [10.244.3.5], nodeName: node-c, hints: {forNodes: [{name: node-c}], forZones: [{name: zone-a}]}}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.1.5:80"],
            local: &["10.244.1.5:80"],
            all: 2,
        },
        Row {
            name: "topology does not apply to the terminating fallback",
            objects: service("web", topo)
                + &slice("w", "web", "IPv4", "[{name: http, port: 80}]", &[
                    "{addresses: [10.244.2.5], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}}",
                    "{addresses: [10.244.3.5], nodeName: node-c, conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}",
                ]),
            entry: ("default/web:http", false),
            cluster: &["10.244.2.5:80", "10.244.3.5:80"],
            local: &[],
            all: 2,
        },
    ]
}

#[test]
fn endpoint_categorisation() {
    for row in rows() {
        let t = tables(&row.objects);
        let s = entry(&t, row.entry.0, row.entry.1);
        assert_eq!(
            addrs(&s.cluster_endpoints),
            row.cluster,
            "{}: cluster endpoints",
            row.name
        );
        assert_eq!(
            addrs(&s.local_endpoints),
            row.local,
            "{}: local endpoints",
            row.name
        );
        assert_eq!(
            s.all_endpoints.len(),
            row.all,
            "{}: all endpoints",
            row.name
        );
    }
}

#[test]
fn defaults_applied_before_computing() {
    // No protocol anywhere, no conditions, no affinity timeout, no traffic policies.
    let t = tables(
        &(service(
            "web",
            "{clusterIP: 172.30.0.41, sessionAffinity: ClientIP, ports: [{name: http, port: 80}]}",
        ) + &slice("w", "web", "IPv4", HTTP, &["{addresses: [10.244.2.5]}"])),
    );
    let s = entry(&t, "default/web:http", false);
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(addrs(&s.cluster_endpoints), ["10.244.2.5:8080"]);
    let e = &s.cluster_endpoints[0];
    assert!(e.ready && e.serving && !e.terminating && !e.local);
    assert_eq!(s.affinity_timeout_s, Some(10800));
    assert!(!s.internal_local && !s.external_local);
    let t = tables(&service("web", "{clusterIP: 172.30.0.41, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, ports: [{port: 80}]}"));
    assert_eq!(t.services[0].affinity_timeout_s, Some(30));
}

#[test]
fn traffic_policies() {
    let ep = &[
        "{addresses: [10.244.1.5], nodeName: node-a}",
        "{addresses: [10.244.2.5], nodeName: node-b}",
    ];
    let cases = [
        // (type and policies, internal_local, external_local)
        ("type: NodePort, externalTrafficPolicy: Local", false, true),
        (
            "type: LoadBalancer, externalTrafficPolicy: Local, internalTrafficPolicy: Local",
            true,
            true,
        ),
        ("internalTrafficPolicy: Local", true, false),
        // eTP Local means nothing on a Service no external traffic reaches.
        ("externalTrafficPolicy: Local", false, false),
        (
            "externalTrafficPolicy: Local, externalIPs: [192.168.99.11]",
            false,
            true,
        ),
    ];
    for (spec, internal, external) in cases {
        let t = tables(
            &(service("web", &format!("{{clusterIP: 172.30.0.41, {spec}, ports: [{{name: http, port: 80, nodePort: 30080}}]}}"))
                + &slice("w", "web", "IPv4", HTTP, ep)),
        );
        let s = entry(&t, "default/web:http", false);
        assert_eq!(
            (s.internal_local, s.external_local),
            (internal, external),
            "{spec}"
        );
        // Both lists are always there; the dataplane picks by frontend kind and policy.
        assert_eq!(addrs(&s.local_endpoints), ["10.244.1.5:8080"], "{spec}");
        assert_eq!(s.cluster_endpoints.len(), 2, "{spec}");
    }
}

#[test]
fn frontends_by_kind_and_family() {
    let lb = r#"apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIPs: [172.30.0.50, "fd00:172:30::50"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [192.168.99.11, "2001:db8::11"]
  ports: [{name: http, port: 80, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}, {ip: 1.2.3.5, ipMode: Proxy}, {hostname: lb.example.com}, {ip: 1.2.3.6, ipMode: VIP}]
"#;
    let t = tables(lb);
    let v4 = entry(&t, "default/lb:http", false);
    assert_eq!(frontends(v4, FrontendKind::ClusterIp), ["172.30.0.50:80"]);
    assert_eq!(
        frontends(v4, FrontendKind::ExternalIp),
        ["192.168.99.11:80"]
    );
    assert_eq!(
        frontends(v4, FrontendKind::LoadBalancer),
        ["1.2.3.4:80", "1.2.3.6:80"]
    );
    assert_eq!(frontends(v4, FrontendKind::NodePort), ["192.168.0.2:30081"]);
    let v6 = entry(&t, "default/lb:http", true);
    assert_eq!(
        frontends(v6, FrontendKind::ClusterIp),
        ["[fd00:172:30::50]:80"]
    );
    assert_eq!(
        frontends(v6, FrontendKind::ExternalIp),
        ["[2001:db8::11]:80"]
    );
    assert!(frontends(v6, FrontendKind::LoadBalancer).is_empty());
    assert_eq!(
        frontends(v6, FrontendKind::NodePort),
        ["[fd00:192:168::2]:30081"]
    );
    // No endpoints at all: empty lists, so the dataplane rejects.
    assert!(v4.cluster_endpoints.is_empty() && v4.all_endpoints.is_empty());
}

#[test]
fn nodeport_needs_its_number_and_type() {
    let c = computed(
        &(service(
            "np",
            "{type: NodePort, clusterIP: 172.30.0.60, ports: [{name: a, port: 80}]}",
        ) + &service(
            "cip",
            "{clusterIP: 172.30.0.61, ports: [{name: a, port: 80, nodePort: 30000}]}",
        )),
    );
    for s in &c.tables.services {
        assert!(
            frontends(s, FrontendKind::NodePort).is_empty(),
            "{}",
            s.name
        );
    }
    let w = service_warnings(&c);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].message
            .contains("nodePort on a Service of type ClusterIP"),
        "{}",
        w[0]
    );
    assert!(w[1].message.contains("without nodePort"), "{}", w[1]);
}

#[test]
fn services_that_are_not_programmed() {
    let c = computed(
        &(service("headless", "{clusterIP: None, ports: [{port: 80}]}")
            + &service("ext", "{type: ExternalName, externalName: example.com}")
            + &service("unallocated", "{ports: [{port: 80}]}")
            + &service(
                "badproto",
                "{clusterIP: 172.30.0.70, ports: [{port: 80, protocol: HTTP}]}",
            )),
    );
    assert!(c.tables.services.is_empty(), "{:?}", c.tables.services);
    let objects: Vec<&str> = service_warnings(&c)
        .iter()
        .map(|w| w.object.as_str())
        .collect();
    assert_eq!(
        objects,
        ["Service default/badproto", "Service default/unallocated"]
    );
}

#[test]
fn node_local_pods_and_remote_nodes() {
    let pods = r#"apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: c}}
spec: {nodeName: node-a, containers: [{name: m, image: i}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: "fd00:10:244:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old-style}
spec: {nodeName: node-a, containers: [{name: m, image: i}]}
status: {podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: default}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: m, image: i}]}
status: {podIP: 192.168.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: default}
spec: {nodeName: node-a, containers: [{name: m, image: i}]}
status: {phase: Succeeded, podIP: 10.244.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: default}
spec: {nodeName: node-a, containers: [{name: m, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: default}
spec: {nodeName: node-b, containers: [{name: m, image: i}]}
status: {podIP: 10.244.2.9}
"#;
    let c = computed(pods);
    let t = &c.tables;
    assert_eq!(t.node.name, "node-a");
    assert_eq!(t.node.addresses.len(), 2);
    assert_eq!(t.node.pod_cidrs.len(), 2);
    assert_eq!(t.node.zone.as_deref(), Some("zone-a"));
    assert_eq!(
        t.node.vtep_ip,
        Some("192.168.0.2".parse().expect("literal"))
    );
    assert_eq!(t.node.vtep_mac, Some([0x9a, 0x3c, 0x2e, 0, 0, 2]));
    let pods: Vec<(&str, usize)> = t
        .local_pods
        .iter()
        .map(|p| (p.name.as_str(), p.ips.len()))
        .collect();
    assert_eq!(pods, [("default/client", 2), ("default/old-style", 1)]);
    assert_eq!(
        t.local_pods[0].labels.get("app").map(String::as_str),
        Some("c")
    );

    let remote: Vec<(&str, String, [u8; 6])> = t
        .remote_nodes
        .iter()
        .map(|n| (n.name.as_str(), n.vtep_ip.to_string(), n.vtep_mac))
        .collect();
    assert_eq!(
        remote,
        [
            (
                "node-b",
                "192.168.0.3".to_string(),
                [0x9a, 0x3c, 0x2e, 0x11, 0x22, 0x33]
            ),
            // No public-ip: the InternalIP, not the ExternalIP listed first; no MAC: zeros.
            ("node-c", "192.168.0.4".to_string(), [0; 6]),
        ]
    );
    assert!(c
        .warnings
        .iter()
        .any(|w| w.object == "Node node-c" && w.message.contains("VtepMAC")));
}

#[test]
fn equal_objects_in_any_order_give_equal_tables() {
    let docs = [
        service("web", WEB),
        service(
            "dns",
            "{clusterIP: 172.30.0.10, ports: [{name: dns, port: 53, protocol: UDP}]}",
        ),
        slice(
            "w2",
            "web",
            "IPv4",
            HTTP,
            &[
                "{addresses: [10.244.2.5]}",
                "{addresses: [10.244.1.5], nodeName: node-a}",
            ],
        ),
        slice("w1", "web", "IPv4", HTTP, &["{addresses: [10.244.3.5]}"]),
        slice(
            "d",
            "dns",
            "IPv4",
            "[{name: dns, port: 53, protocol: UDP}]",
            &["{addresses: [10.244.1.53]}"],
        ),
    ];
    let forward = tables(&docs.concat());
    let mut reversed = docs.clone();
    reversed.reverse();
    assert_eq!(forward, tables(&reversed.concat()));
    let names: Vec<&str> = forward.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/dns:dns", "default/web:http"]);
    assert_eq!(
        addrs(&entry(&forward, "default/web:http", false).cluster_endpoints),
        ["10.244.1.5:8080", "10.244.2.5:8080", "10.244.3.5:8080"]
    );
}

#[test]
fn bad_addresses_are_warnings_not_failures() {
    let c = computed(
        &(service(
            "web",
            "{clusterIP: 172.30.0.41, externalIPs: [not-an-ip], ports: [{name: http, port: 80}]}",
        ) + &slice(
            "w",
            "web",
            "IPv4",
            HTTP,
            &["{addresses: [10.244.999.1]}", "{addresses: [10.244.2.5]}"],
        )),
    );
    let s = entry(&c.tables, "default/web:http", false);
    assert_eq!(addrs(&s.cluster_endpoints), ["10.244.2.5:8080"]);
    assert_eq!(service_warnings(&c).len(), 2, "{:?}", c.warnings);
}

#[test]
fn unknown_node_is_an_error() {
    let objects = Objects::default();
    let err =
        compute_with_warnings(&objects, "nope", &ClusterSpec::default()).expect_err("no node");
    assert!(err.to_string().contains("no Node object named nope"));
}

#[test]
fn nodeport_addresses_limit_where_node_ports_answer() {
    let text = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
  - {type: ExternalIP, address: 203.0.113.9}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.60
  ports: [{port: 80, nodePort: 30060}]
"#;
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    crate::manifests::load_text(&mut objects, "np.yaml", text, &mut errors);
    let node_ports = |cluster: &ClusterSpec| -> Vec<String> {
        let t = compute_with_warnings(&objects, "node-a", cluster)
            .unwrap()
            .tables;
        t.services[0]
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| f.ip.to_string())
            .collect()
    };
    let mut cluster = ClusterSpec::default();
    // Unset: the primary address only, as kube-proxy's nftables mode defaults to.
    assert_eq!(node_ports(&cluster), ["192.168.0.2"]);
    cluster.nodeport_addresses = vec!["0.0.0.0/0".parse().unwrap()];
    assert_eq!(node_ports(&cluster), ["192.168.0.2", "203.0.113.9"]);
    cluster.nodeport_addresses = vec!["203.0.113.0/24".parse().unwrap()];
    assert_eq!(node_ports(&cluster), ["203.0.113.9"]);
}

#[test]
fn kxdp_vtep_annotations_win_over_flannels() {
    let extra = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-d
  annotations:
    kxdp.io/vtep-mac: "02:6b:78:00:00:04"
    kxdp.io/vtep-ip: 192.168.0.40
    flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:00:00:04"}'
    flannel.alpha.coreos.com/public-ip: 192.168.0.4
spec: {podCIDR: 10.244.4.0/24}
status:
  addresses: [{type: InternalIP, address: 192.168.0.41}]
---
apiVersion: v1
kind: Node
metadata:
  name: node-e
  annotations:
    kxdp.io/vtep-mac: "not-a-mac"
    flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:00:00:05"}'
spec: {podCIDR: 10.244.5.0/24}
status:
  addresses: [{type: InternalIP, address: 192.168.0.5}]
"#;
    let c = computed(extra);
    let find = |name: &str| {
        c.tables
            .remote_nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| (n.vtep_ip.to_string(), n.vtep_mac))
    };
    assert_eq!(
        find("node-d"),
        Some(("192.168.0.40".to_string(), [2, 0x6b, 0x78, 0, 0, 4]))
    );
    // A bad kxdp annotation is reported and flannel's value is used.
    assert_eq!(
        find("node-e"),
        Some(("192.168.0.5".to_string(), [0x9a, 0x3c, 0x2e, 0, 0, 5]))
    );
    assert!(c
        .warnings
        .iter()
        .any(|w| w.object == "Node node-e" && w.message.contains("kxdp.io/vtep-mac")));
}

/// A store of `n` Services with one slice of three endpoints each, on top of the nodes.
fn services_store(n: usize) -> Objects {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    load_text(&mut objects, "nodes", NODES, &mut errors);
    for i in 0..n {
        load_text(&mut objects, "svc", &service_yaml(i, 3), &mut errors);
    }
    assert!(errors.is_empty(), "{errors:?}");
    objects
}

fn service_yaml(i: usize, endpoints: usize) -> String {
    let eps: String = (0..endpoints)
        .map(|e| {
            format!(
                "\n- addresses: [10.244.{}.{}]\n  nodeName: {}",
                1 + e % 2,
                4 * i + e,
                if e % 2 == 0 { "node-a" } else { "node-b" }
            )
        })
        .collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: s{i}, namespace: ns}}
spec:
  clusterIP: 172.30.{}.{}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s{i}-x
  namespace: ns
  labels: {{kubernetes.io/service-name: s{i}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{eps}
"#,
        1 + i / 250,
        i % 250
    )
}

#[test]
fn incremental_computation_equals_from_scratch_and_recomputes_only_what_changed() {
    let mut objects = services_store(20);
    let cluster = ClusterSpec::default();
    let mut computer = TableComputer::new("node-a", cluster.clone());
    let mut last = computer.compute(&objects).expect("node-a").tables;
    assert_eq!(
        last,
        compute_with_warnings(&objects, "node-a", &cluster)
            .unwrap()
            .tables
    );
    let mut errors = Vec::new();
    // Each step: a change, and the Service ports expected in the delta.
    type Change = Box<dyn Fn(&mut Objects, &mut Vec<crate::manifests::ManifestError>) -> usize>;
    let steps: Vec<(&str, Change, usize)> = vec![
        ("nothing", Box::new(|_, _| 0), 0),
        (
            "one slice loses an endpoint",
            Box::new(|o, e| load_text(o, "svc", &service_yaml(3, 2), e)),
            1,
        ),
        (
            "a slice is relabelled to another Service",
            Box::new(|o, e| {
                let moved = service_yaml(5, 3).replace(
                    "kubernetes.io/service-name: s5}",
                    "kubernetes.io/service-name: s6}",
                );
                load_text(o, "svc", &moved, e)
            }),
            2,
        ),
        (
            "a Service is deleted",
            Box::new(|o, _| {
                assert!(o.delete("Service", "ns", "s7"));
                0
            }),
            1,
        ),
        (
            "a slice is deleted",
            Box::new(|o, _| {
                assert!(o.delete("EndpointSlice", "ns", "s8-x"));
                0
            }),
            1,
        ),
        (
            "a Service is added",
            Box::new(|o, e| load_text(o, "svc", &service_yaml(40, 3), e)),
            1,
        ),
        (
            "another node changes: no Service port",
            Box::new(|o, e| {
                let b = NODES
                    .split("---")
                    .nth(2)
                    .unwrap()
                    .replace("198.51.100.4", "198.51.100.5");
                load_text(o, "nodes", &b, e)
            }),
            0,
        ),
        (
            "this node gets another address: every NodePort-less port stays equal",
            Box::new(|o, e| {
                let a = NODES.split("---").next().unwrap().replace(
                    "{type: Hostname",
                    "{type: ExternalIP, address: 203.0.113.9}\n  - {type: Hostname",
                );
                load_text(o, "nodes", &a, e)
            }),
            0,
        ),
    ];
    for (what, change, upserted_or_removed) in steps {
        change(&mut objects, &mut errors);
        assert!(errors.is_empty(), "{what}: {errors:?}");
        let incremental = computer.compute(&objects).expect("node-a");
        let scratch = compute_with_warnings(&objects, "node-a", &cluster).unwrap();
        assert_eq!(incremental, scratch, "{what}");
        let d = nat::spec::TableDelta::between(&last, &incremental.tables);
        assert_eq!(
            d.upserted.len() + d.removed.len(),
            upserted_or_removed,
            "{what}: {d:?}"
        );
        // Unchanged Service ports are the same allocation as before.
        let shared = incremental
            .tables
            .services
            .iter()
            .filter(|s| last.services.iter().any(|o| Arc::ptr_eq(o, s)))
            .count();
        assert_eq!(
            shared,
            incremental.tables.services.len() - d.upserted.len(),
            "{what}"
        );
        last = incremental.tables;
    }
}

#[test]
fn services_coming_and_going_keep_the_store_bounded_and_the_computation_right() {
    let mut objects = services_store(3);
    let cluster = ClusterSpec::default();
    let mut computer = TableComputer::new("node-a", cluster.clone());
    let mut errors = Vec::new();
    for i in 100..1700 {
        load_text(&mut objects, "svc", &service_yaml(i, 3), &mut errors);
        if i % 7 == 0 {
            let incremental = computer.compute(&objects).expect("node-a");
            assert_eq!(
                incremental,
                compute_with_warnings(&objects, "node-a", &cluster).unwrap()
            );
        }
        assert!(objects.delete("Service", "ns", &format!("s{i}")));
        assert!(objects.delete("EndpointSlice", "ns", &format!("s{i}-x")));
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert!(objects.horizon() > 0, "gone groups were forgotten");
    let incremental = computer.compute(&objects).expect("node-a");
    assert_eq!(
        incremental,
        compute_with_warnings(&objects, "node-a", &cluster).unwrap()
    );
    assert_eq!(incremental.tables.services.len(), 3);
}

#[test]
fn load_balancer_source_ranges_by_family_and_node() {
    // nftables proxier: the firewall holds the family's ranges (trimmed), plus the LB VIPs
    // when a range holds the node's IP; a Service without VIPs of a family has none there.
    let objects = [
        service(
            "open",
            "{type: LoadBalancer, clusterIP: 172.30.0.50, ports: [{port: 80, nodePort: 30081}]}",
        ),
        service(
            "outside",
            "{type: LoadBalancer, clusterIPs: [172.30.0.51, 'fd00:172:30::51'], ipFamilies: [IPv4, IPv6], loadBalancerSourceRanges: [' 203.0.113.0/24', '2001:db8::/32', 'bogus'], ports: [{port: 80, nodePort: 30082}]}",
        ),
        service(
            "node",
            "{type: LoadBalancer, clusterIP: 172.30.0.52, loadBalancerSourceRanges: [192.168.0.0/24], ports: [{port: 80, nodePort: 30083}]}",
        ),
    ]
    .concat();
    // The load balancer's status, in each Service's own document.
    let with_status = objects
        .replace(
            "metadata: {name: open, namespace: default}\n",
            "metadata: {name: open, namespace: default}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n",
        )
        .replace(
            "metadata: {name: outside, namespace: default}\n",
            "metadata: {name: outside, namespace: default}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.5}]}}\n",
        )
        .replace(
            "metadata: {name: node, namespace: default}\n",
            "metadata: {name: node, namespace: default}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.6}, {ip: 1.2.3.7, ipMode: Proxy}]}}\n",
        );
    let c = computed(&with_status);
    let ranges = |name: &str, v6: bool| -> Vec<String> {
        entry(&c.tables, name, v6)
            .lb_source_ranges
            .iter()
            .map(|n| n.to_string())
            .collect()
    };
    assert!(ranges("default/open:", false).is_empty());
    assert_eq!(ranges("default/outside:", false), ["203.0.113.0/24"]);
    // No IPv6 VIP: no firewall for that family.
    assert!(ranges("default/outside:", true).is_empty());
    assert_eq!(
        ranges("default/node:", false),
        ["192.168.0.0/24", "1.2.3.6/32"]
    );
    assert!(service_warnings(&c)
        .iter()
        .any(|w| w.message.contains("\"bogus\"")));
}

#[test]
fn a_cloned_store_changed_apart_from_its_original_is_computed_as_another_store() {
    let mut a = services_store(3);
    let cluster = ClusterSpec::default();
    let mut computer = TableComputer::new("node-a", cluster.clone());
    let mut errors = Vec::new();
    computer.compute(&a).expect("node-a");
    let mut b = a.clone();
    // The clone changes first, the original after it: the original's stamps are newer.
    load_text(&mut b, "svc", &service_yaml(50, 2), &mut errors);
    load_text(&mut a, "svc", &service_yaml(60, 2), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    for store in [&a, &b, &a] {
        assert_eq!(
            computer.compute(store).expect("node-a"),
            compute_with_warnings(store, "node-a", &cluster).unwrap()
        );
    }
}

/// A Service in `default` created at `created` (RFC 3339; empty: no creationTimestamp).
fn service_at(name: &str, created: &str, spec: &str) -> String {
    let created = match created {
        "" => String::new(),
        t => format!(", creationTimestamp: \"{t}\""),
    };
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default{created}}}\nspec: {spec}\n---\n")
}

fn refused(s: &ServiceSpec) -> Vec<String> {
    s.refused
        .iter()
        .map(|r| {
            let f = &r.frontend;
            format!(
                "{} {:?} {}",
                r.service,
                f.kind,
                std::net::SocketAddr::new(f.ip, f.port)
            )
        })
        .collect()
}

/// Issue 16 item 3: two Services on one ClusterIP:port. The older holds it whatever the
/// names and the input order, so an endpoint-less newcomer (whose name sorts first) does
/// not turn a working Service into "Connection refused"; the newcomer keeps what nobody
/// else claims (its NodePort); the same address and port under another protocol is no
/// conflict.
#[test]
fn two_services_on_one_cluster_ip_port_the_older_holds_it() {
    let docs = [
        service_at("web", "2024-01-01T00:00:00Z", WEB),
        slice("w", "web", "IPv4", HTTP, &["{addresses: [10.244.2.5]}"]),
        service_at(
            "a-newcomer",
            "2024-06-01T00:00:00Z",
            "{type: NodePort, clusterIP: 172.30.0.41, ports: [{name: http, port: 80, nodePort: 30099}]}",
        ),
        service_at(
            "udp",
            "2024-06-01T00:00:00Z",
            "{clusterIP: 172.30.0.41, ports: [{name: u, port: 80, protocol: UDP}]}",
        ),
    ];
    let mut reversed = docs.clone();
    reversed.reverse();
    for order in [docs.concat(), reversed.concat()] {
        let c = computed(&order);
        let web = entry(&c.tables, "default/web:http", false);
        assert_eq!(frontends(web, FrontendKind::ClusterIp), ["172.30.0.41:80"]);
        assert_eq!(addrs(&web.cluster_endpoints), ["10.244.2.5:8080"]);
        assert_eq!(
            refused(web),
            ["default/a-newcomer:http ClusterIp 172.30.0.41:80"]
        );
        let newcomer = entry(&c.tables, "default/a-newcomer:http", false);
        assert!(frontends(newcomer, FrontendKind::ClusterIp).is_empty());
        assert_eq!(
            frontends(newcomer, FrontendKind::NodePort),
            ["192.168.0.2:30099"]
        );
        let udp = entry(&c.tables, "default/udp:u", false);
        assert_eq!(frontends(udp, FrontendKind::ClusterIp), ["172.30.0.41:80"]);
        assert!(udp.refused.is_empty());
        let w = service_warnings(&c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].object, "Service default/a-newcomer");
        assert!(w[0].message.contains("default/web:http"), "{}", w[0]);
        assert!(w[0].message.contains("172.30.0.41:80"), "{}", w[0]);
        assert_eq!(c.refused.taken, 1);
        c.tables.validate().expect("a valid table");
    }
}

/// Of two Services created at the same time, or both without a creationTimestamp (as
/// manifests are written), the name decides; one with a creationTimestamp is older than
/// one without. A port left without frontends is not programmed at all.
#[test]
fn same_age_the_name_decides_and_a_known_age_is_older() {
    let two = |a: &str, b: &str| {
        service_at(
            "a",
            a,
            "{clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}",
        ) + &service_at(
            "b",
            b,
            "{clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}",
        )
    };
    let t = "2024-01-01T00:00:00Z";
    for (a, b, holder, other) in [
        (t, t, "default/a:http", "default/b:http"),
        ("", "", "default/a:http", "default/b:http"),
        ("", t, "default/b:http", "default/a:http"),
    ] {
        let c = computed(&two(a, b));
        let names: Vec<&str> = c.tables.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [holder], "{a:?} {b:?}");
        assert_eq!(
            refused(&c.tables.services[0]),
            [format!("{other} ClusterIp 172.30.0.41:80")]
        );
        assert_eq!(c.refused.taken, 1);
    }
}

/// The conflicts follow changes: the newcomer takes the address when the older Service
/// goes and gives it back when it returns, each computation equal to one from scratch.
#[test]
fn conflicts_follow_changes_incrementally() {
    let cluster = ClusterSpec::default();
    let mut objects = services_store(3);
    let mut computer = TableComputer::new("node-a", cluster.clone());
    let mut errors = Vec::new();
    let older = service_at("old", "2024-01-01T00:00:00Z", WEB);
    let newer = service_at("new", "2024-06-01T00:00:00Z", WEB);
    let holder = |c: &Computed| -> Vec<String> {
        c.tables
            .services
            .iter()
            .filter(|s| {
                s.frontends
                    .iter()
                    .any(|f| f.ip.to_string() == "172.30.0.41")
            })
            .map(|s| format!("{} refused {:?}", s.name, refused(s)))
            .collect()
    };
    enum Step<'a> {
        Store(&'a str),
        Delete(&'a str),
    }
    let holds = "default/old:http refused [\"default/new:http ClusterIp 172.30.0.41:80\"]";
    let steps = [
        (
            "the older alone",
            Step::Store(&older),
            "default/old:http refused []",
        ),
        ("a newcomer", Step::Store(&newer), holds),
        (
            "the older goes",
            Step::Delete("old"),
            "default/new:http refused []",
        ),
        ("the older comes back", Step::Store(&older), holds),
    ];
    for (what, step, want) in steps {
        match step {
            Step::Store(yaml) => {
                load_text(&mut objects, "svc", yaml, &mut errors);
            }
            Step::Delete(name) => assert!(objects.delete("Service", "default", name)),
        }
        assert!(errors.is_empty(), "{what}: {errors:?}");
        let incremental = computer.compute(&objects).expect("node-a");
        assert_eq!(
            incremental,
            compute_with_warnings(&objects, "node-a", &cluster).unwrap(),
            "{what}"
        );
        assert_eq!(holder(&incremental), [want], "{what}");
    }
}

/// Issue 16 item 4: a ClusterIP outside the Service ranges would capture that address
/// for every pod: that family is refused, with a warning naming the Service and the
/// ranges, and counted; a ClusterIP that is no address is reported, not dropped silently.
/// Where no range of the family is known, nothing is judged.
#[test]
fn cluster_ips_outside_the_service_ranges_or_invalid_are_refused() {
    let docs = service("google", "{clusterIP: 8.8.8.8, ports: [{port: 53, protocol: UDP}]}")
        + &service("gateway", "{clusterIP: 192.168.0.1, ports: [{port: 80}]}")
        + &service(
            "dual",
            "{clusterIPs: [10.0.0.1, \"fd00:172:30::7\"], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80}]}",
        )
        + &service("banana", "{clusterIP: banana, ports: [{port: 80}]}")
        + &service(
            "typo",
            "{clusterIPs: [\"172.30.0.300\"], ipFamilies: [IPv4], ports: [{port: 80}]}",
        )
        + &service("fine", "{clusterIP: 172.30.0.9, ports: [{port: 80}]}");
    let c = computed(&docs);
    let names: Vec<(&str, bool)> = c
        .tables
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.is_ipv6()))
        .collect();
    assert_eq!(
        names,
        [("default/dual:http", true), ("default/fine:", false)]
    );
    let w = service_warnings(&c);
    let about = |name: &str| -> Vec<&str> {
        w.iter()
            .filter(|w| w.object == format!("Service default/{name}"))
            .map(|w| w.message.as_str())
            .collect()
    };
    for (name, ip) in [
        ("google", "8.8.8.8"),
        ("gateway", "192.168.0.1"),
        ("dual", "10.0.0.1"),
    ] {
        let m = about(name);
        assert_eq!(m.len(), 1, "{name}: {m:?}");
        assert!(m[0].contains(ip), "{}", m[0]);
        assert!(
            m[0].contains("172.30.0.0/16") && m[0].contains("fd00:172:30::/112"),
            "{}",
            m[0]
        );
    }
    for (name, s) in [("banana", "\"banana\""), ("typo", "\"172.30.0.300\"")] {
        let m = about(name);
        assert_eq!(m.len(), 1, "{name}: {m:?}");
        assert!(
            m[0].contains(s) && m[0].contains("not an IP address"),
            "{}",
            m[0]
        );
    }
    assert_eq!(
        c.refused,
        Refusals {
            taken: 0,
            outside_service_ranges: 3,
            invalid_cluster_ip: 2
        }
    );

    // Only IPv6 ranges known: IPv4 ClusterIPs are not judged.
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    load_text(&mut objects, "nodes", NODES, &mut errors);
    load_text(&mut objects, "test", &docs, &mut errors);
    let v6_only = ClusterSpec {
        service_cidrs: vec!["fd00:172:30::/112".parse().unwrap()],
        ..ClusterSpec::default()
    };
    let c = compute_with_warnings(&objects, "node-a", &v6_only).unwrap();
    assert!(c
        .tables
        .services
        .iter()
        .any(|s| s.name == "default/google:"
            && frontends(s, FrontendKind::ClusterIp) == ["8.8.8.8:53"]));
    assert_eq!(c.refused.outside_service_ranges, 0);
}
