//! The upstream NetworkPolicy e2e model (kubernetes test/e2e/network/netpol) rebuilt in
//! memory: namespaces x, y and z, pods a, b and c in each, ports 80 and 81 over TCP and UDP,
//! and for each policy (or small set of policies) the full "truth table" of which pod reaches
//! which. kxdp's answer comes from the real pipeline in the case runner's world (control
//! computes the tables, the dataplane judges each new connection, simulated pods send and
//! answer real frames). The expected answer comes from a model written here from the
//! NetworkPolicy v1 API definition alone, over the same declared objects, using none of
//! control's or nat's code. The test fails on any cell where the two differ, and prints both
//! tables the way the e2e suite does (rows from, columns to, `.` allowed, `X` denied).
//!
//! All nine pods are on node-a, the node under test, so that both the source's egress and
//! the destination's ingress are judged by this dataplane: a pod on another node has its
//! ingress judged by that node's dataplane, which the world does not run.
//!
//! Besides the nine pods, each table has a tenth column: the ClusterIP of Service `y/web`,
//! whose one endpoint is `y/b`, its port 80 going to the pod's 81 and 81 to 80. Policy is
//! judged on the translated destination (address and port), so that column's 80 must equal
//! the `y/b` column's 81 and the other way round, except for `y/b` reaching itself through
//! the Service: that connection does reach kxdp, is masqueraded to the node (kube-proxy's
//! hairpin masquerade), and traffic from the node into its pods is always allowed, so only
//! `y/b`'s egress applies to it. The model states that choice explicitly (`Source::Node`).
//!
//! The diagonal (a pod to its own address) is probed and shown but not compared, as the e2e
//! suite does (`ignoreLoopback`, kubernetes issue 95879: CNIs disagree on it). On a real
//! node that traffic stays on the pod's loopback and never reaches kxdp, so "a pod cannot
//! block access to itself" (Kubernetes docs, Network Policies) holds whatever kxdp does. In
//! the world, though, the packet leaves the pod's port and crosses the pipeline like any
//! other, which no real pod does: comparing it would pin behaviour that has no meaning.
//! The probe still has to come to a clean delivered-or-dropped answer.

#[allow(dead_code)] // the case runner's own entry points are used by tests/cases.rs only
mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;
use serde_yaml::Value;

use world::{Case, World};

// ---------------------------------------------------------------------------------------
// The scenario's objects, as declared types. The pipeline gets them as Kubernetes objects;
// the model reads the same values.
// ---------------------------------------------------------------------------------------

/// A transport protocol, as a NetworkPolicy port or container port names it.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

/// Every table is computed for these ports, as the e2e suite does (it probes 80 and 81).
const PORTS: [(u16, Protocol); 4] = [(80, TCP), (81, TCP), (80, UDP), (81, UDP)];

type Labels = BTreeMap<String, String>;

struct Namespace {
    name: String,
    labels: Labels,
}

struct ContainerPort {
    name: String,
    port: u16,
    protocol: Protocol,
}

struct Pod {
    namespace: String,
    name: String,
    labels: Labels,
    ip: Ipv4Addr,
    ports: Vec<ContainerPort>,
}

impl Pod {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: `port`/`protocol` on the ClusterIP goes to `target` on the endpoints.
/// The cluster's Service crosses 80 and 81, so that a policy judged on the Service's port
/// instead of the endpoint's shows.
struct ServicePort {
    name: String,
    port: u16,
    protocol: Protocol,
    target: u16,
}

struct Service {
    namespace: String,
    name: String,
    cluster_ip: Ipv4Addr,
    ports: Vec<ServicePort>,
    /// Indexes into the cluster's pods: the EndpointSlice's endpoints.
    endpoints: Vec<usize>,
}

/// The objects every scenario shares.
struct Cluster {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    service: Service,
}

/// A NetworkPolicy as a user writes it (before the API server's defaults).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct NetworkPolicy {
    metadata: Metadata,
    spec: PolicySpec,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    namespace: String,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    pod_selector: Selector,
    policy_types: Option<Vec<PolicyType>>,
    #[serde(default)]
    ingress: Vec<IngressRule>,
    #[serde(default)]
    egress: Vec<EgressRule>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct IngressRule {
    #[serde(default)]
    from: Vec<Peer>,
    #[serde(default)]
    ports: Vec<PolicyPort>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct EgressRule {
    #[serde(default)]
    to: Vec<Peer>,
    #[serde(default)]
    ports: Vec<PolicyPort>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Peer {
    pod_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    ip_block: Option<IpBlock>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct IpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyPort {
    protocol: Option<Protocol>,
    port: Option<PortValue>,
    end_port: Option<u16>,
}

/// An IntOrString port: a number, or the name of a container port.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum PortValue {
    Number(u16),
    Name(String),
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: Labels,
    #[serde(default)]
    match_expressions: Vec<Requirement>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Requirement {
    key: String,
    operator: Operator,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

// ---------------------------------------------------------------------------------------
// The cluster: the e2e suite's namespaces and pods.
// ---------------------------------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Namespaces x, y, z labelled `ns: <name>` (the e2e suite's label) and
/// `kubernetes.io/metadata.name`; z also carries `env: dev`, so that `Exists` and
/// `DoesNotExist` have a label that some namespaces have and others lack. Pods a, b, c in
/// each, labelled `pod: <name>`, with 10.244.1.<10 × namespace + pod>. Every pod declares
/// serve-80-tcp, serve-81-tcp, serve-80-udp and serve-81-udp, except z/c, which declares only
/// the port-80 ones: a named port must resolve on the destination pod, and does not on z/c.
fn cluster() -> Cluster {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    for (n, ns) in ["x", "y", "z"].into_iter().enumerate() {
        let mut ns_labels = labels(&[("ns", ns), ("kubernetes.io/metadata.name", ns)]);
        if ns == "z" {
            ns_labels.insert("env".into(), "dev".into());
        }
        namespaces.push(Namespace {
            name: ns.into(),
            labels: ns_labels,
        });
        for (p, pod) in ["a", "b", "c"].into_iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                if ns == "z" && pod == "c" && port == 81 {
                    continue;
                }
                for protocol in [TCP, UDP] {
                    ports.push(ContainerPort {
                        name: format!("serve-{port}-{}", protocol.as_str().to_lowercase()),
                        port,
                        protocol,
                    });
                }
            }
            pods.push(Pod {
                namespace: ns.into(),
                name: pod.into(),
                labels: labels(&[("pod", pod)]),
                ip: Ipv4Addr::new(10, 244, 1, (10 * (n + 1) + p) as u8),
                ports,
            });
        }
    }
    let y_b = pods
        .iter()
        .position(|p| p.key() == "y/b")
        .expect("y/b is declared above");
    let service = Service {
        namespace: "y".into(),
        name: "web".into(),
        cluster_ip: Ipv4Addr::new(172, 30, 0, 10),
        ports: PORTS
            .iter()
            .map(|&(port, protocol)| ServicePort {
                name: format!("{}-{port}", protocol.as_str().to_lowercase()),
                port,
                protocol,
                target: if port == 80 { 81 } else { 80 },
            })
            .collect(),
        endpoints: vec![y_b],
    };
    Cluster {
        namespaces,
        pods,
        service,
    }
}

/// The cluster as Kubernetes objects, as a case file writes them.
fn cluster_objects(c: &Cluster) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": "node-a",
            "labels": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "zone-a"},
            "annotations": {
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"9a:3c:2e:00:00:02\"}",
                "flannel.alpha.coreos.com/public-ip": "192.168.0.2",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            },
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.0.2"},
            {"type": "Hostname", "address": "node-a"},
        ]},
    })];
    for ns in &c.namespaces {
        out.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns.name, "labels": ns.labels},
        }));
    }
    for pod in &c.pods {
        let ports: Vec<_> = pod
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol.as_str()}))
            .collect();
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
            "spec": {
                "nodeName": "node-a",
                "containers": [{
                    "name": "main",
                    "image": "registry.k8s.io/e2e-test-images/agnhost:2.47",
                    "ports": ports,
                }],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip.to_string(),
                "podIPs": [{"ip": pod.ip.to_string()}],
            },
        }));
    }
    let s = &c.service;
    let endpoint_labels = c.pods[s.endpoints[0]].labels.clone();
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.cluster_ip.to_string(),
            "clusterIPs": [s.cluster_ip.to_string()],
            "selector": endpoint_labels,
            "ports": s.ports.iter().map(|p| json!({
                "name": p.name, "port": p.port, "targetPort": p.target, "protocol": p.protocol.as_str(),
            })).collect::<Vec<_>>(),
        },
    }));
    out.push(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-1", s.name),
            "namespace": s.namespace,
            "labels": {
                "kubernetes.io/service-name": s.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": s.endpoints.iter().map(|&i| json!({
            "addresses": [c.pods[i].ip.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-a",
            "targetRef": {"kind": "Pod", "namespace": c.pods[i].namespace, "name": c.pods[i].name},
        })).collect::<Vec<_>>(),
        "ports": s.ports.iter().map(|p| json!({
            "name": p.name, "port": p.target, "protocol": p.protocol.as_str(),
        })).collect::<Vec<_>>(),
    }));
    out.into_iter()
        .map(|j| serde_yaml::to_value(j).expect("JSON converts to YAML"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The policies under test.
// ---------------------------------------------------------------------------------------

/// One table: the policies present (a YAML list of NetworkPolicies without apiVersion and
/// kind) and a few cells whose answer the documentation states outright (for the Service
/// hairpin: together with the masquerade the module comment describes), checked against the
/// model so that the model itself is pinned to the documented meaning.
struct Scenario {
    name: &'static str,
    policies: &'static str,
    /// `(from, to, port, protocol, allowed)`; `to` may be `y/web`, the Service.
    spot: &'static [(&'static str, &'static str, u16, Protocol, bool)],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "no-policy",
        policies: "[]",
        spot: &[("x/a", "z/c", 81, UDP, true)],
    },
    Scenario {
        name: "default-deny-ingress",
        policies: r#"
        - metadata: {name: deny-ingress, namespace: x}
          spec: {podSelector: {}, policyTypes: [Ingress]}
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, false),
            ("x/a", "y/a", 80, TCP, true),
        ],
    },
    Scenario {
        name: "default-deny-egress",
        policies: r#"
        - metadata: {name: deny-egress, namespace: x}
          spec: {podSelector: {}, policyTypes: [Egress]}
        "#,
        spot: &[
            ("x/a", "x/b", 80, TCP, false),
            ("y/a", "x/a", 80, TCP, true),
        ],
    },
    Scenario {
        name: "default-deny-all",
        policies: r#"
        - metadata: {name: deny-all, namespace: x}
          spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
        "#,
        spot: &[
            ("x/a", "y/a", 80, TCP, false),
            ("y/a", "x/a", 80, TCP, false),
            ("y/a", "z/a", 80, TCP, true),
        ],
    },
    Scenario {
        name: "allow-all-ingress",
        policies: r#"
        - metadata: {name: allow-all, namespace: x}
          spec: {podSelector: {}, ingress: [{}]}
        "#,
        spot: &[("z/c", "x/a", 81, UDP, true)],
    },
    Scenario {
        name: "deny-ingress-plus-allow-all-ingress",
        policies: r#"
        - metadata: {name: deny-ingress, namespace: x}
          spec: {podSelector: {}, policyTypes: [Ingress]}
        - metadata: {name: allow-all, namespace: x}
          spec: {podSelector: {}, ingress: [{}]}
        "#,
        spot: &[("z/c", "x/a", 81, UDP, true)],
    },
    Scenario {
        name: "allow-from-same-namespace",
        policies: r#"
        - metadata: {name: same-ns, namespace: x}
          spec:
            podSelector: {}
            ingress: [{from: [{podSelector: {}}]}]
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, true),
            ("y/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "allow-from-pod-label",
        policies: r#"
        - metadata: {name: from-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, true),
            ("y/b", "x/a", 80, TCP, false),
            ("x/c", "x/a", 80, TCP, false),
            ("x/c", "x/b", 80, TCP, true),
        ],
    },
    Scenario {
        name: "allow-from-namespace-label",
        policies: r#"
        - metadata: {name: from-y, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        "#,
        spot: &[
            ("y/c", "x/a", 81, UDP, true),
            ("x/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "namespace-and-pod-selector-in-one-peer",
        policies: r#"
        - metadata: {name: from-y-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - namespaceSelector: {matchLabels: {ns: y}}
                podSelector: {matchLabels: {pod: b}}
        "#,
        spot: &[
            ("y/b", "x/a", 80, TCP, true),
            ("y/a", "x/a", 80, TCP, false),
            ("x/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "namespace-or-pod-selector-as-two-peers",
        policies: r#"
        - metadata: {name: from-y-or-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - namespaceSelector: {matchLabels: {ns: y}}
              - podSelector: {matchLabels: {pod: b}}
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, true),
            ("x/b", "x/a", 80, TCP, true),
            ("z/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "empty-namespace-selector-is-all-namespaces",
        policies: r#"
        - metadata: {name: from-any-c, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - namespaceSelector: {}
                podSelector: {matchLabels: {pod: c}}
        "#,
        spot: &[
            ("z/c", "x/a", 80, TCP, true),
            ("x/c", "x/a", 80, TCP, true),
            ("z/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "match-expressions-in",
        policies: r#"
        - metadata: {name: from-y-z, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - namespaceSelector:
                  matchExpressions: [{key: ns, operator: In, values: [y, z]}]
        "#,
        spot: &[
            ("z/b", "x/a", 80, TCP, true),
            ("x/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "match-expressions-not-in",
        policies: r#"
        - metadata: {name: from-not-a-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - namespaceSelector: {}
                podSelector:
                  matchExpressions: [{key: pod, operator: NotIn, values: [a, b]}]
        "#,
        spot: &[
            ("y/c", "x/a", 80, TCP, true),
            ("y/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "match-expressions-exists-egress",
        policies: r#"
        - metadata: {name: to-env, namespace: x}
          spec:
            podSelector: {}
            policyTypes: [Egress]
            egress:
            - to:
              - namespaceSelector:
                  matchExpressions: [{key: env, operator: Exists}]
        "#,
        spot: &[
            ("x/a", "z/a", 80, TCP, true),
            ("x/a", "y/a", 80, TCP, false),
            ("x/a", "x/b", 80, TCP, false),
        ],
    },
    Scenario {
        name: "match-expressions-does-not-exist",
        policies: r#"
        - metadata: {name: from-no-env, namespace: y}
          spec:
            podSelector: {}
            ingress:
            - from:
              - namespaceSelector:
                  matchExpressions: [{key: env, operator: DoesNotExist}]
        "#,
        spot: &[
            ("x/a", "y/a", 80, TCP, true),
            ("z/a", "y/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "ip-block-except-ingress",
        policies: r#"
        - metadata: {name: from-pods-but-y-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from:
              - ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.21/32]}
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, true),
            ("y/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "ip-block-except-egress",
        policies: r#"
        - metadata: {name: to-pods-but-z-c, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            policyTypes: [Egress]
            egress:
            - to:
              - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.32/32]}
        "#,
        spot: &[
            ("x/a", "z/b", 80, TCP, true),
            ("x/a", "z/c", 80, TCP, false),
            ("x/a", "y/web", 80, TCP, true),
        ],
    },
    Scenario {
        name: "named-port-ingress",
        policies: r#"
        - metadata: {name: serve-81-tcp-only, namespace: z}
          spec:
            podSelector: {}
            ingress: [{ports: [{port: serve-81-tcp}]}]
        "#,
        spot: &[
            ("x/a", "z/a", 81, TCP, true),
            ("x/a", "z/a", 80, TCP, false),
            ("x/a", "z/a", 81, UDP, false),
            ("x/a", "z/c", 81, TCP, false),
        ],
    },
    Scenario {
        name: "named-port-egress",
        policies: r#"
        - metadata: {name: to-named, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            policyTypes: [Egress]
            egress:
            - ports:
              - {port: serve-81-tcp}
              - {port: serve-80-udp, protocol: UDP}
        "#,
        spot: &[
            ("x/a", "y/a", 81, TCP, true),
            ("x/a", "z/c", 81, TCP, false),
            ("x/a", "z/c", 80, UDP, true),
            ("x/a", "y/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "port-80-only",
        policies: r#"
        - metadata: {name: port-80, namespace: x}
          spec:
            podSelector: {}
            ingress: [{ports: [{port: 80}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, true),
            ("y/a", "x/a", 81, TCP, false),
            ("y/a", "x/a", 80, UDP, false),
        ],
    },
    Scenario {
        name: "port-81-only",
        policies: r#"
        - metadata: {name: port-81, namespace: x}
          spec:
            podSelector: {}
            ingress: [{ports: [{port: 81, protocol: TCP}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 81, TCP, true),
            ("y/a", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "end-port-80-to-81",
        policies: r#"
        - metadata: {name: ports-80-81, namespace: x}
          spec:
            podSelector: {}
            ingress: [{ports: [{port: 80, endPort: 81}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, true),
            ("y/a", "x/a", 81, TCP, true),
            ("y/a", "x/a", 81, UDP, false),
        ],
    },
    Scenario {
        name: "udp-only",
        policies: r#"
        - metadata: {name: udp, namespace: x}
          spec:
            podSelector: {}
            ingress: [{ports: [{protocol: UDP}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 81, UDP, true),
            ("y/a", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "peer-and-ports-in-one-rule",
        policies: r#"
        - metadata: {name: b-on-80-tcp-or-81-udp, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from: [{podSelector: {matchLabels: {pod: b}}}]
              ports: [{port: 80}, {port: 81, protocol: UDP}]
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, true),
            ("x/b", "x/a", 81, UDP, true),
            ("x/b", "x/a", 81, TCP, false),
            ("x/c", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "egress-to-namespace",
        policies: r#"
        - metadata: {name: to-y, namespace: x}
          spec:
            podSelector: {}
            policyTypes: [Egress]
            egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        "#,
        spot: &[
            ("x/a", "y/c", 81, UDP, true),
            ("x/a", "x/b", 80, TCP, false),
            ("x/a", "y/web", 80, TCP, true),
        ],
    },
    Scenario {
        name: "egress-deny-plus-allow-to-service-endpoints",
        policies: r#"
        - metadata: {name: deny-egress, namespace: x}
          spec: {podSelector: {}, policyTypes: [Egress]}
        - metadata: {name: to-web-endpoints, namespace: x}
          spec:
            podSelector: {}
            policyTypes: [Egress]
            egress:
            - to:
              - namespaceSelector: {matchLabels: {ns: y}}
                podSelector: {matchLabels: {pod: b}}
              ports: [{port: 80}]
        "#,
        spot: &[
            ("x/a", "y/web", 81, TCP, true),
            ("x/a", "y/b", 80, TCP, true),
            ("x/a", "y/web", 80, TCP, false),
            ("x/a", "y/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "policy-does-not-reach-other-namespaces",
        policies: r#"
        - metadata: {name: isolate-b, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: b}}
            policyTypes: [Ingress, Egress]
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, false),
            ("x/a", "x/b", 80, TCP, false),
            ("x/a", "y/b", 80, TCP, true),
            ("y/b", "z/b", 80, TCP, true),
        ],
    },
    Scenario {
        name: "two-policies-add-up",
        policies: r#"
        - metadata: {name: from-y, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        - metadata: {name: from-c, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, true),
            ("x/c", "x/a", 80, TCP, true),
            ("x/b", "x/a", 80, TCP, false),
            ("z/c", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "egress-and-ingress-both-needed",
        policies: r#"
        - metadata: {name: to-y, namespace: x}
          spec:
            podSelector: {}
            policyTypes: [Egress]
            egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        - metadata: {name: from-x-a, namespace: y}
          spec:
            podSelector: {}
            ingress:
            - from:
              - namespaceSelector: {matchLabels: {ns: x}}
                podSelector: {matchLabels: {pod: a}}
        "#,
        spot: &[
            ("x/a", "y/b", 80, TCP, true),
            ("x/b", "y/b", 80, TCP, false),
            ("x/a", "z/b", 80, TCP, false),
            ("z/a", "y/b", 80, TCP, false),
        ],
    },
    Scenario {
        name: "implicit-policy-types-with-egress-rules",
        policies: r#"
        - metadata: {name: egress-only-rules, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        "#,
        spot: &[
            ("x/a", "y/a", 80, TCP, true),
            ("x/a", "z/a", 80, TCP, false),
            ("y/a", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "egress-policy-type-ignores-ingress-rules",
        policies: r#"
        - metadata: {name: egress-type, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            policyTypes: [Egress]
            ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
            egress: [{}]
        "#,
        spot: &[("z/c", "x/a", 80, TCP, true)],
    },
    Scenario {
        name: "two-rules-in-one-policy",
        policies: r#"
        - metadata: {name: b-on-80-or-y-on-81, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: a}}
            ingress:
            - from: [{podSelector: {matchLabels: {pod: b}}}]
              ports: [{port: 80}]
            - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
              ports: [{port: 81}]
        "#,
        spot: &[
            ("x/b", "x/a", 80, TCP, true),
            ("x/b", "x/a", 81, TCP, false),
            ("y/b", "x/a", 81, TCP, true),
            ("y/b", "x/a", 80, TCP, false),
        ],
    },
    Scenario {
        name: "selector-match-labels-and-expressions",
        policies: r#"
        - metadata: {name: from-c-not-in-x, namespace: y}
          spec:
            podSelector:
              matchLabels: {pod: a}
              matchExpressions: [{key: pod, operator: In, values: [a, b]}]
            ingress:
            - from:
              - namespaceSelector:
                  matchLabels: {kubernetes.io/metadata.name: z}
                podSelector:
                  matchLabels: {pod: c}
                  matchExpressions: [{key: pod, operator: Exists}]
        "#,
        spot: &[
            ("z/c", "y/a", 80, TCP, true),
            ("x/c", "y/a", 80, TCP, false),
            ("x/c", "y/b", 80, TCP, true),
        ],
    },
    Scenario {
        name: "policy-selecting-no-pod",
        policies: r#"
        - metadata: {name: deny-nobody, namespace: x}
          spec:
            podSelector: {matchLabels: {pod: d}}
            policyTypes: [Ingress, Egress]
        "#,
        spot: &[("x/a", "x/b", 80, TCP, true)],
    },
    Scenario {
        name: "named-port-protocol-mismatch",
        policies: r#"
        - metadata: {name: udp-name-as-tcp, namespace: x}
          spec:
            podSelector: {}
            ingress: [{ports: [{port: serve-80-udp}]}]
        "#,
        spot: &[
            ("y/a", "x/a", 80, TCP, false),
            ("y/a", "x/a", 80, UDP, false),
        ],
    },
    Scenario {
        name: "ip-block-wide-except-egress",
        policies: r#"
        - metadata: {name: anywhere-but-16-31, namespace: x}
          spec:
            podSelector: {}
            policyTypes: [Egress]
            egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.244.1.16/28]}}]}]
        "#,
        spot: &[
            ("x/a", "x/b", 80, TCP, true),
            ("x/a", "y/a", 80, TCP, false),
            ("x/a", "z/b", 80, TCP, false),
            ("x/a", "z/c", 80, TCP, true),
        ],
    },
    Scenario {
        name: "service-hairpin-under-ingress-deny",
        policies: r#"
        - metadata: {name: deny-ingress, namespace: y}
          spec: {podSelector: {}, policyTypes: [Ingress]}
        "#,
        spot: &[
            ("y/b", "y/web", 80, TCP, true),
            ("y/a", "y/web", 80, TCP, false),
        ],
    },
    Scenario {
        name: "service-hairpin-under-egress-deny",
        policies: r#"
        - metadata: {name: deny-egress-b, namespace: y}
          spec:
            podSelector: {matchLabels: {pod: b}}
            policyTypes: [Egress]
        "#,
        spot: &[
            ("y/b", "y/web", 80, TCP, false),
            ("y/a", "y/web", 80, TCP, true),
        ],
    },
];

fn parse_policies(s: &Scenario) -> (Vec<NetworkPolicy>, Vec<Value>) {
    let raw: Vec<Value> = serde_yaml::from_str(s.policies)
        .unwrap_or_else(|e| panic!("scenario {}: policies: {e}", s.name));
    let typed = raw
        .iter()
        .map(|v| {
            serde_yaml::from_value(v.clone())
                .unwrap_or_else(|e| panic!("scenario {}: policy {v:?}: {e}", s.name))
        })
        .collect();
    let objects = raw
        .into_iter()
        .map(|mut v| {
            let m = v.as_mapping_mut().expect("a policy is a mapping");
            m.insert("apiVersion".into(), "networking.k8s.io/v1".into());
            m.insert("kind".into(), "NetworkPolicy".into());
            v
        })
        .collect();
    (typed, objects)
}

// ---------------------------------------------------------------------------------------
// The model: NetworkPolicy v1 from the API reference (networking.k8s.io/v1, NetworkPolicySpec
// and friends), written for reading, not speed.
// ---------------------------------------------------------------------------------------

/// Where a connection comes from, as the destination pod sees it.
enum Source<'a> {
    Pod(&'a Pod),
    /// The node itself: a pod reaching itself through a Service is masqueraded to the node
    /// (kube-proxy's hairpin masquerade), and "traffic to and from the node where a Pod is
    /// running is always allowed" (Kubernetes docs, Network Policies).
    Node,
}

/// LabelSelector: every matchLabels pair holds and every requirement holds; the empty
/// selector selects everything.
fn selects(sel: &Selector, labels: &Labels) -> bool {
    let pairs = sel
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs = sel.match_expressions.iter().all(|r| {
        let value = labels.get(&r.key);
        match r.operator {
            Operator::In => value.is_some_and(|v| r.values.contains(v)),
            // NotIn also matches objects without the key.
            Operator::NotIn => !value.is_some_and(|v| r.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    });
    pairs && exprs
}

/// `policyTypes`, defaulted as the API server does: Ingress always, Egress when the policy
/// has egress rules.
fn policy_types(p: &NetworkPolicy) -> Vec<PolicyType> {
    match &p.spec.policy_types {
        Some(t) => t.clone(),
        None if p.spec.egress.is_empty() => vec![PolicyType::Ingress],
        None => vec![PolicyType::Ingress, PolicyType::Egress],
    }
}

/// The policies that isolate `pod` in direction `ty`: in its namespace, selecting it, with
/// `ty` among their policy types.
fn isolating<'a>(
    policies: &'a [NetworkPolicy],
    pod: &'a Pod,
    ty: PolicyType,
) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
    policies.iter().filter(move |p| {
        p.metadata.namespace == pod.namespace
            && selects(&p.spec.pod_selector, &pod.labels)
            && policy_types(p).contains(&ty)
    })
}

fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (net, len) = cidr.split_once('/').expect("a CIDR has a prefix length");
    let net: Ipv4Addr = net.parse().expect("an IPv4 CIDR");
    let len: u32 = len.parse().expect("a prefix length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A rule's peer list (`from` or `to`) against a pod; `policy_ns` is the policy's namespace.
/// An empty list matches every peer; otherwise any one peer must match.
fn peers_match(c: &Cluster, peers: &[Peer], policy_ns: &str, pod: &Pod) -> bool {
    if peers.is_empty() {
        return true;
    }
    peers.iter().any(|peer| {
        if let Some(block) = &peer.ip_block {
            return cidr_contains(&block.cidr, pod.ip)
                && !block.except.iter().any(|e| cidr_contains(e, pod.ip));
        }
        assert!(
            peer.pod_selector.is_some() || peer.namespace_selector.is_some(),
            "a peer needs podSelector, namespaceSelector or ipBlock"
        );
        // Without namespaceSelector: the policy's own namespace. With it: the namespaces it
        // selects (`{}`: all of them).
        let ns_ok = match &peer.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => c
                .namespaces
                .iter()
                .any(|ns| ns.name == pod.namespace && selects(sel, &ns.labels)),
        };
        // Without podSelector: every pod of the selected namespaces.
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selects(sel, &pod.labels));
        ns_ok && pod_ok
    })
}

/// A rule's ports against the destination `dst`:`port`/`protocol`. An empty list matches all
/// ports; otherwise any one entry must match. A named port is looked up among `dst`'s
/// container ports (for ingress `dst` is the selected pod, for egress the peer).
fn ports_match(ports: &[PolicyPort], dst: &Pod, port: u16, protocol: Protocol) -> bool {
    if ports.is_empty() {
        return true;
    }
    ports.iter().any(|pp| {
        if pp.protocol.unwrap_or(Protocol::Tcp) != protocol {
            return false;
        }
        match (&pp.port, pp.end_port) {
            (None, _) => true,
            (Some(PortValue::Number(n)), None) => port == *n,
            (Some(PortValue::Number(n)), Some(end)) => *n <= port && port <= end,
            (Some(PortValue::Name(name)), _) => dst
                .ports
                .iter()
                .any(|cp| cp.name == *name && cp.protocol == protocol && cp.port == port),
        }
    })
}

fn egress_allows(
    c: &Cluster,
    policies: &[NetworkPolicy],
    src: &Pod,
    dst: &Pod,
    port: u16,
    protocol: Protocol,
) -> bool {
    let mut isolated = false;
    for p in isolating(policies, src, PolicyType::Egress) {
        isolated = true;
        let allowed = p.spec.egress.iter().any(|rule| {
            peers_match(c, &rule.to, &p.metadata.namespace, dst)
                && ports_match(&rule.ports, dst, port, protocol)
        });
        if allowed {
            return true;
        }
    }
    !isolated
}

fn ingress_allows(
    c: &Cluster,
    policies: &[NetworkPolicy],
    src: &Source,
    dst: &Pod,
    port: u16,
    protocol: Protocol,
) -> bool {
    let mut isolated = false;
    for p in isolating(policies, dst, PolicyType::Ingress) {
        isolated = true;
        let Source::Pod(src) = src else {
            return true;
        };
        let allowed = p.spec.ingress.iter().any(|rule| {
            peers_match(c, &rule.from, &p.metadata.namespace, src)
                && ports_match(&rule.ports, dst, port, protocol)
        });
        if allowed {
            return true;
        }
    }
    !isolated
}

/// A column of the table: a pod's own address, or the Service's ClusterIP.
#[derive(Clone, Copy)]
enum Column {
    Pod(usize),
    Service,
}

fn columns(c: &Cluster) -> Vec<Column> {
    let mut cols: Vec<Column> = (0..c.pods.len()).map(Column::Pod).collect();
    cols.push(Column::Service);
    cols
}

fn column_name(c: &Cluster, col: Column) -> String {
    match col {
        Column::Pod(i) => c.pods[i].key(),
        Column::Service => format!("{}/{}", c.service.namespace, c.service.name),
    }
}

/// The endpoint port behind the Service's `port`/`protocol`.
fn service_target(c: &Cluster, port: u16, protocol: Protocol) -> u16 {
    c.service
        .ports
        .iter()
        .find(|sp| sp.port == port && sp.protocol == protocol)
        .map(|sp| sp.target)
        .expect("the Service has every probed port")
}

/// The model's answer for one cell: the source's egress and the destination's ingress must
/// both allow the connection (after Service translation).
fn model_allows(
    c: &Cluster,
    policies: &[NetworkPolicy],
    from: usize,
    to: Column,
    port: u16,
    protocol: Protocol,
) -> bool {
    let src = &c.pods[from];
    let (dst_index, dst_port) = match to {
        Column::Pod(i) => (i, port),
        Column::Service => (c.service.endpoints[0], service_target(c, port, protocol)),
    };
    let dst = &c.pods[dst_index];
    let seen = match to {
        Column::Service if dst_index == from => Source::Node,
        _ => Source::Pod(src),
    };
    egress_allows(c, policies, src, dst, dst_port, protocol)
        && ingress_allows(c, policies, &seen, dst, dst_port, protocol)
}

// ---------------------------------------------------------------------------------------
// Tables, the pipeline's and the model's, and how they are shown.
// ---------------------------------------------------------------------------------------

/// `table[from][to][k]`: allowed or not, for `PORTS[k]`.
type Table = Vec<Vec<[bool; PORTS.len()]>>;

fn model_table(c: &Cluster, policies: &[NetworkPolicy]) -> Table {
    (0..c.pods.len())
        .map(|from| {
            columns(c)
                .into_iter()
                .map(|to| {
                    PORTS.map(|(port, proto)| model_allows(c, policies, from, to, port, proto))
                })
                .collect()
        })
        .collect()
}

/// kxdp's table: one new connection per cell through the world's pipeline.
fn pipeline_table(c: &Cluster, name: &str, policies: Vec<Value>) -> Result<Table, String> {
    let mut objects = cluster_objects(c);
    objects.extend(policies);
    let case = Case {
        name: name.to_string(),
        node: "node-a".into(),
        config: Default::default(),
        objects,
        steps: Vec::new(),
    };
    let mut world = World::new(&case)?;
    let mut table = Table::new();
    for from in &c.pods {
        let mut row = Vec::new();
        for to in columns(c) {
            let mut cell = [false; PORTS.len()];
            for (k, &(port, proto)) in PORTS.iter().enumerate() {
                let (ip, expect_dest) = match to {
                    Column::Pod(i) => (c.pods[i].ip, SocketAddr::new(c.pods[i].ip.into(), port)),
                    Column::Service => {
                        let endpoint = &c.pods[c.service.endpoints[0]];
                        let target = service_target(c, port, proto);
                        (
                            c.service.cluster_ip,
                            SocketAddr::new(endpoint.ip.into(), target),
                        )
                    }
                };
                let what = format!(
                    "{} -> {}:{port}/{}",
                    from.key(),
                    column_name(c, to),
                    proto.as_str()
                );
                let reached = world
                    .connect_from_pod(&from.key(), IpAddr::V4(ip), port, proto.as_str())
                    .map_err(|e| format!("{what}: {e}"))?;
                cell[k] = match reached {
                    None => false,
                    Some(dest) if dest == expect_dest => true,
                    Some(dest) => return Err(format!("{what}: reached {dest}, not {expect_dest}")),
                };
            }
            row.push(cell);
        }
        table.push(row);
    }
    Ok(table)
}

/// A truth table in the e2e suite's layout: a `-` corner, column names, one row per source.
fn truth_table(c: &Cluster, title: &str, cell: impl Fn(usize, usize) -> char) -> String {
    let mut out = format!("{title}\n-");
    for col in columns(c) {
        write!(out, "\t{}", column_name(c, col)).unwrap();
    }
    out.push('\n');
    for (i, pod) in c.pods.iter().enumerate() {
        out.push_str(&pod.key());
        for j in 0..columns(c).len() {
            write!(out, "\t{}", cell(i, j)).unwrap();
        }
        out.push('\n');
    }
    out
}

/// A pod to its own address: probed, shown, not compared (see the module comment). Columns
/// list the pods first, in the same order as the rows.
fn loopback(row: usize, col: usize) -> bool {
    row == col
}

/// Both tables and their comparison for each port that differs, and the differing cells.
/// Cells not compared show `-`, as the e2e suite prints an unset expectation.
fn report(
    c: &Cluster,
    s: &Scenario,
    policies: &[NetworkPolicy],
    expected: &Table,
    observed: &Table,
) -> Option<String> {
    let cols = columns(c);
    let mut out = String::new();
    let mark = |b: bool| if b { '.' } else { 'X' };
    let verb = |b: bool| if b { "allows" } else { "denies" };
    for (k, &(port, proto)) in PORTS.iter().enumerate() {
        let differs =
            |i: usize, j: usize| !loopback(i, j) && expected[i][j][k] != observed[i][j][k];
        if !(0..c.pods.len()).any(|i| (0..cols.len()).any(|j| differs(i, j))) {
            continue;
        }
        let what = format!("{port}/{}", proto.as_str());
        out += &truth_table(c, &format!("expected (model), {what}:"), |i, j| {
            if loopback(i, j) {
                '-'
            } else {
                mark(expected[i][j][k])
            }
        });
        out += &truth_table(c, &format!("observed (kxdp), {what}:"), |i, j| {
            mark(observed[i][j][k])
        });
        out += &truth_table(c, &format!("comparison (X: differs), {what}:"), |i, j| {
            if loopback(i, j) {
                '-'
            } else {
                mark(!differs(i, j))
            }
        });
        for (i, from) in c.pods.iter().enumerate() {
            for (j, &to) in cols.iter().enumerate() {
                if differs(i, j) {
                    writeln!(
                        out,
                        "  {} -> {} {what}: model {}, kxdp {}",
                        from.key(),
                        column_name(c, to),
                        verb(expected[i][j][k]),
                        verb(observed[i][j][k]),
                    )
                    .unwrap();
                }
            }
        }
    }
    if out.is_empty() {
        return None;
    }
    let names: Vec<String> = policies
        .iter()
        .map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name))
        .collect();
    Some(format!(
        "=== {}: kxdp and the model disagree (policies {names:?}):{}\n{out}",
        s.name, s.policies
    ))
}

fn cell_index(
    c: &Cluster,
    from: &str,
    to: &str,
    port: u16,
    proto: Protocol,
) -> (usize, usize, usize) {
    let i = c
        .pods
        .iter()
        .position(|p| p.key() == from)
        .unwrap_or_else(|| panic!("no pod {from}"));
    let j = columns(c)
        .into_iter()
        .position(|col| column_name(c, col) == to)
        .unwrap_or_else(|| panic!("no column {to}"));
    let k = PORTS
        .iter()
        .position(|&p| p == (port, proto))
        .unwrap_or_else(|| panic!("{port}/{} is not probed", proto.as_str()));
    (i, j, k)
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

/// The model agrees with the cells the API documentation states outright, so a mistake in
/// the model cannot quietly agree with the same mistake in kxdp.
#[test]
fn model_matches_documented_cells() {
    let c = cluster();
    let mut wrong = Vec::new();
    for s in SCENARIOS {
        let (policies, _) = parse_policies(s);
        let table = model_table(&c, &policies);
        for &(from, to, port, proto, allowed) in s.spot {
            let (i, j, k) = cell_index(&c, from, to, port, proto);
            if table[i][j][k] != allowed {
                wrong.push(format!(
                    "{}: {from} -> {to} {port}/{}: model says {}, the documentation {}",
                    s.name,
                    proto.as_str(),
                    table[i][j][k],
                    allowed
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// For every scenario, kxdp's full table equals the model's.
#[test]
fn pipeline_matches_model() {
    let c = cluster();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut cells = 0;
    for s in SCENARIOS {
        let (policies, objects) = parse_policies(s);
        let expected = model_table(&c, &policies);
        match pipeline_table(&c, s.name, objects) {
            Err(e) => failures.push(format!("=== {}: {e}", s.name)),
            Ok(observed) => {
                cells += observed.len() * observed[0].len() * PORTS.len();
                if let Some(r) = report(&c, s, &policies, &expected, &observed) {
                    failures.push(r);
                }
            }
        }
    }
    println!(
        "{} scenarios, {cells} connections in {:?}",
        SCENARIOS.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
