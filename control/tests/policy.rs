//! NetworkPolicy semantics, objects in, verdicts out: each test compiles policies against one
//! fixture cluster with `control::compute_with_warnings` and asks `nat::policy::PolicyTable`
//! for exact verdicts, so a wrong selector, peer or port shows up as a wrong verdict.

use std::net::IpAddr;

use control::{compute_with_warnings, load_text, Objects, Warning};
use nat::policy::{PolicyTable, PolicyType, Verdict};
use nat::spec::{PolicySpec, PortRangeSpec, Protocol, RuleSpec};
use Protocol::{Sctp, Tcp, Udp};
use Verdict::{Denied, NotIsolated};

/// node-a is the node under test. Namespaces x and y have objects, z has none. Pods:
///
/// | pod | node | labels | addresses | container ports |
/// |---|---|---|---|---|
/// | x/a | a | app=a tier=web | 10.244.1.10, fd00:10:244:1::10 | serve TCP 80, dns UDP 53, sidecar metrics TCP 9100 |
/// | x/b | a | app=b | 10.244.1.11 | |
/// | x/c | a | app=c tier=db | 10.244.1.12 | |
/// | y/a | a | app=a | 10.244.1.20, fd00:10:244:1::20 | |
/// | y/b | b | app=b tier=web | 10.244.2.21 | web TCP 8080 |
/// | y/c | b | app=c | 10.244.2.22 | web TCP 9090 |
/// | z/q | b | app=q | 10.244.2.30 | |
/// | y/done | b | app=b, Succeeded | 10.244.2.40 | |
/// | y/pending | b | app=b, no address | | |
/// | y/host | b | app=b, host network | 192.168.0.3 | |
const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
  annotations: {flannel.alpha.coreos.com/backend-data: '{"VNI":1,"VtepMAC":"9a:3c:2e:11:22:33"}'}
spec: {podCIDRs: [10.244.2.0/24]}
status: {addresses: [{type: InternalIP, address: 192.168.0.3}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a, tier: web}}
spec:
  nodeName: node-a
  initContainers:
  - {name: metrics, image: m, restartPolicy: Always, ports: [{name: metrics, containerPort: 9100}]}
  - {name: setup, image: s, ports: [{name: setup, containerPort: 7000}]}
  containers:
  - name: main
    image: i
    ports:
    - {name: serve, containerPort: 80}
    - {name: dns, containerPort: 53, protocol: UDP}
status: {phase: Running, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:10:244:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: node-a, containers: [{name: main, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {app: c, tier: db}}
spec: {nodeName: node-a, containers: [{name: main, image: i}]}
status: {phase: Running, podIP: 10.244.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {app: a}}
spec: {nodeName: node-a, containers: [{name: main, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.20}, {ip: "fd00:10:244:1::20"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {app: b, tier: web}}
spec: {nodeName: node-b, containers: [{name: main, image: i, ports: [{name: web, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.21}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {nodeName: node-b, containers: [{name: main, image: i, ports: [{name: web, containerPort: 9090}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.22}]}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: z, labels: {app: q}}
spec: {nodeName: node-b, containers: [{name: main, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.30}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: y, labels: {app: b}}
spec: {nodeName: node-b, containers: [{name: main, image: i}]}
status: {phase: Succeeded, podIPs: [{ip: 10.244.2.40}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: y, labels: {app: b}}
spec: {nodeName: node-b, containers: [{name: main, image: i}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: y, labels: {app: b}}
spec: {nodeName: node-b, hostNetwork: true, containers: [{name: main, image: i}]}
status: {phase: Running, podIPs: [{ip: 192.168.0.3}]}
"#;

const XA: &str = "10.244.1.10";
const XA6: &str = "fd00:10:244:1::10";
const XB: &str = "10.244.1.11";
const XC: &str = "10.244.1.12";
const YA: &str = "10.244.1.20";
const YA6: &str = "fd00:10:244:1::20";
const YB: &str = "10.244.2.21";
const YC: &str = "10.244.2.22";
const ZQ: &str = "10.244.2.30";
const OUTSIDE: &str = "203.0.113.2";

/// Every peer pod of the fixture but x/a, with its name.
const PEERS: [(&str, &str); 6] = [
    ("x/b", XB),
    ("x/c", XC),
    ("y/a", YA),
    ("y/b", YB),
    ("y/c", YC),
    ("z/q", ZQ),
];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The policy spec of `node` with `policies` added to the fixture, and the warnings
/// about NetworkPolicies.
fn compile_on(node: &str, policies: &str) -> (PolicySpec, Vec<Warning>) {
    let mut objects = Objects::new();
    let mut errors = Vec::new();
    load_text(&mut objects, "cluster", CLUSTER, &mut errors);
    load_text(&mut objects, "policies", policies, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let c = compute_with_warnings(&objects, node, &Default::default()).expect("node exists");
    let warnings = c
        .warnings
        .into_iter()
        .filter(|w| w.object.starts_with("NetworkPolicy "))
        .collect();
    (c.tables.policy, warnings)
}

/// node-a's table for `policies`, which must compile without warnings.
fn table(policies: &str) -> PolicyTable {
    let (spec, warnings) = compile_on("node-a", policies);
    assert!(warnings.is_empty(), "{warnings:?}");
    PolicyTable::build(&spec)
}

fn ingress(t: &PolicyTable, pod: &str, peer: &str, proto: Protocol, port: u16) -> Verdict {
    t.ingress(ip(pod), ip(peer), proto, port)
}

fn egress(t: &PolicyTable, pod: &str, peer: &str, proto: Protocol, port: u16) -> Verdict {
    t.egress(ip(pod), ip(peer), proto, port)
}

fn allowed(policy: u32) -> Verdict {
    Verdict::Allowed { policy }
}

/// The names of the peers that may reach x/a on TCP 80.
fn allowed_into_xa(t: &PolicyTable) -> Vec<&'static str> {
    PEERS
        .iter()
        .filter(|(_, addr)| !ingress(t, XA, addr, Tcp, 80).is_denied())
        .map(|(name, _)| *name)
        .collect()
}

fn policy(name: &str, body: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{body}\n---\n")
}

#[test]
fn without_policies_nothing_is_isolated() {
    let t = table("");
    assert!(t.is_empty());
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), NotIsolated);
    // A policy of namespace y does not isolate pods of x.
    let t = table(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: y}\nspec: {podSelector: {}}",
    );
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), NotIsolated);
    assert_eq!(ingress(&t, YA, XA, Tcp, 80), Denied);
}

#[test]
fn default_deny_ingress_isolates_every_local_pod_of_the_namespace_for_ingress_only() {
    let (spec, warnings) = compile_on(
        "node-a",
        &policy("deny-all", "  podSelector: {}\n  policyTypes: [Ingress]"),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(spec.policies, ["x/deny-all"]);
    let pods: Vec<&str> = spec.pods.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(pods, ["x/a", "x/b", "x/c"]);
    assert_eq!(spec.pods[0].ips, [ip(XA), ip(XA6)]);
    assert!(spec.pods.iter().all(|p| p.egress.is_none()));
    let t = PolicyTable::build(&spec);
    for pod in [XA, XB, XC] {
        assert_eq!(ingress(&t, pod, YB, Tcp, 80), Denied, "{pod}");
        assert_eq!(egress(&t, pod, YB, Tcp, 80), NotIsolated, "{pod}");
    }
    assert_eq!(ingress(&t, XA6, YA6, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, XB, Udp, 53), Denied);
    assert_eq!(ingress(&t, YA, XA, Tcp, 80), NotIsolated);
}

#[test]
fn policy_types_default_from_the_rules() {
    // Egress rules and no policyTypes: isolated for ingress too.
    let egress_rules = "  podSelector: {matchLabels: {app: a}}\n  egress:\n  - to: [{podSelector: {matchLabels: {app: b}}}]";
    let t = table(&policy("egress-only", egress_rules));
    assert_eq!(egress(&t, XA, XB, Tcp, 80), allowed(0));
    assert_eq!(egress(&t, XA, XC, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), Denied);
    // Written out as Egress only: ingress stays open.
    let t = table(&policy(
        "egress-only",
        &format!("{egress_rules}\n  policyTypes: [Egress]"),
    ));
    assert_eq!(egress(&t, XA, XC, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), NotIsolated);
    // Ingress rules only: not isolated for egress.
    let t = table(&policy(
        "ingress-only",
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]",
    ));
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), allowed(0));
    assert_eq!(egress(&t, XA, OUTSIDE, Tcp, 80), NotIsolated);
}

#[test]
fn pod_selector_alone_means_the_policys_namespace() {
    let t = table(&policy(
        "from-b",
        "  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]",
    ));
    assert_eq!(allowed_into_xa(&t), ["x/b"]);
    // x/b itself is not selected.
    assert_eq!(ingress(&t, XB, YB, Tcp, 80), NotIsolated);
    let t = table(&policy(
        "same-ns",
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]",
    ));
    assert_eq!(allowed_into_xa(&t), ["x/b", "x/c"]);
    assert_eq!(ingress(&t, XA, OUTSIDE, Tcp, 80), Denied);
}

#[test]
fn namespace_selector_alone_means_every_pod_of_those_namespaces() {
    let t = table(&policy(
        "from-blue",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
    ));
    assert_eq!(allowed_into_xa(&t), ["y/a", "y/b", "y/c"]);
    // Both addresses of a dual-stack peer.
    assert_eq!(ingress(&t, XA6, YA6, Tcp, 80), allowed(0));
    // z has no Namespace object but still its name label.
    let t = table(&policy(
        "from-z",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]",
    ));
    assert_eq!(allowed_into_xa(&t), ["z/q"]);
    let t = table(&policy(
        "from-all",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]",
    ));
    assert_eq!(
        allowed_into_xa(&t),
        ["x/b", "x/c", "y/a", "y/b", "y/c", "z/q"]
    );
    assert_eq!(ingress(&t, XA, OUTSIDE, Tcp, 80), Denied);
}

#[test]
fn selectors_in_one_peer_are_and_in_two_peers_or() {
    let t = table(&policy(
        "and",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: blue}}\n      podSelector: {matchLabels: {app: b}}",
    ));
    assert_eq!(allowed_into_xa(&t), ["y/b"]);
    let t = table(&policy(
        "or",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: blue}}\n    - podSelector: {matchLabels: {app: b}}",
    ));
    assert_eq!(allowed_into_xa(&t), ["x/b", "y/a", "y/b", "y/c"]);
}

#[test]
fn match_expressions_follow_label_selector_rules() {
    let cases: [(&str, &[&str]); 6] = [
        ("[{key: app, operator: In, values: [a, b]}]", &["x/b", "y/a", "y/b"]),
        // NotIn and DoesNotExist match a pod without the key.
        (
            "[{key: tier, operator: NotIn, values: [db]}]",
            &["x/b", "y/a", "y/b", "y/c", "z/q"],
        ),
        ("[{key: tier, operator: Exists}]", &["x/c", "y/b"]),
        (
            "[{key: tier, operator: DoesNotExist}]",
            &["x/b", "y/a", "y/c", "z/q"],
        ),
        (
            "[{key: app, operator: In, values: [b, c]}, {key: tier, operator: NotIn, values: [web]}]",
            &["x/b", "x/c", "y/c"],
        ),
        ("[{key: app, operator: NotIn, values: [a, b, c, q]}]", &[]),
    ];
    for (expr, want) in cases {
        let t = table(&policy(
            "expr",
            &format!("  podSelector: {{matchLabels: {{app: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n      podSelector: {{matchExpressions: {expr}}}"),
        ));
        assert_eq!(allowed_into_xa(&t), want, "{expr}");
    }
    // matchLabels and matchExpressions together, selecting the isolated pods.
    let t = table(&policy(
        "db",
        "  podSelector: {matchLabels: {app: c}, matchExpressions: [{key: tier, operator: In, values: [db]}]}",
    ));
    assert_eq!(ingress(&t, XC, XB, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), NotIsolated);
    assert_eq!(ingress(&t, XB, XC, Tcp, 80), NotIsolated);
}

#[test]
fn ip_block_is_its_cidr_minus_its_excepts_in_both_families() {
    let t = table(&policy(
        "blocks",
        "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24, 10.244.1.20/32]}\n    - ipBlock: {cidr: 'fd00:10:244::/48', except: ['fd00:10:244:1::20/128']}",
    ));
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, "10.244.3.1", Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, "10.244.1.21", Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, YA, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, "10.245.0.1", Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA6, "fd00:10:244:1::21", Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA6, "fd00:10:244:ffff::1", Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA6, YA6, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA6, "fd00:10:245::1", Tcp, 80), Denied);
    // An outside client by ipBlock.
    let t = table(&policy(
        "office",
        "  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.113.0/24}}]}]",
    ));
    assert_eq!(ingress(&t, XA, OUTSIDE, Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, "198.51.100.7", Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), Denied);
}

#[test]
fn ports_numbers_ranges_and_protocols() {
    let t = table(&policy(
        "ports",
        "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports:\n    - {port: 80}\n    - {port: 81, endPort: 90, protocol: UDP}\n    - {protocol: SCTP}\n  - from: [{podSelector: {matchLabels: {app: b}}}]",
    ));
    for (proto, port, want) in [
        (Tcp, 80, allowed(0)),
        (Tcp, 79, Denied),
        (Tcp, 81, Denied),
        (Udp, 80, Denied),
        (Udp, 81, allowed(0)),
        (Udp, 90, allowed(0)),
        (Udp, 91, Denied),
        (Sctp, 1, allowed(0)),
        (Sctp, 65535, allowed(0)),
    ] {
        assert_eq!(ingress(&t, XA, YB, proto, port), want, "{proto:?} {port}");
    }
    // The second rule has no ports: every port and protocol from x/b.
    assert_eq!(ingress(&t, XA, XB, Tcp, 12345), allowed(0));
    assert_eq!(ingress(&t, XA, XB, Udp, 9), allowed(0));
    assert_eq!(
        t.verdict(PolicyType::Ingress, ip(XA), ip(XB), None),
        allowed(0)
    );
    assert_eq!(t.verdict(PolicyType::Ingress, ip(XA), ip(YB), None), Denied);
}

#[test]
fn named_ports_resolve_on_the_selected_pod_for_ingress() {
    let t = table(&policy(
        "named",
        "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: serve}, {port: dns, protocol: UDP}, {port: metrics}, {port: setup}]\n  - ports: [{port: dns}]",
    ));
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, YB, Udp, 80), Denied);
    assert_eq!(ingress(&t, XA, YB, Udp, 53), allowed(0));
    // dns is a UDP port: as TCP it names nothing.
    assert_eq!(ingress(&t, XA, YB, Tcp, 53), Denied);
    // A sidecar's port counts, a plain init container's does not.
    assert_eq!(ingress(&t, XA, YB, Tcp, 9100), allowed(0));
    assert_eq!(ingress(&t, XA, YB, Tcp, 7000), Denied);
    // A pod without those names is isolated and allows nothing.
    let t = table(&policy(
        "named",
        "  podSelector: {}\n  ingress: [{ports: [{port: serve}]}]",
    ));
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XB, YB, Tcp, 80), Denied);
}

#[test]
fn named_ports_resolve_on_each_destination_pod_for_egress() {
    let (spec, warnings) = compile_on(
        "node-a",
        &policy(
            "to-web",
            "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {team: blue}}}]\n    ports: [{port: web}]",
        ),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let rules = &spec.pods[0].egress.as_ref().expect("isolated").rules;
    let rule = |addr: &str, port| RuleSpec {
        policy: 0,
        peers: Some(vec![format!("{addr}/32").parse().unwrap()]),
        ports: Some(vec![PortRangeSpec {
            protocol: Tcp,
            first: port,
            last: port,
        }]),
    };
    assert_eq!(rules, &[rule(YB, 8080), rule(YC, 9090)]);
    let t = PolicyTable::build(&spec);
    assert_eq!(egress(&t, XA, YB, Tcp, 8080), allowed(0));
    assert_eq!(egress(&t, XA, YB, Tcp, 9090), Denied);
    assert_eq!(egress(&t, XA, YC, Tcp, 9090), allowed(0));
    assert_eq!(egress(&t, XA, YC, Tcp, 8080), Denied);
    assert_eq!(egress(&t, XA, YA, Tcp, 8080), Denied);

    // No `to`: every pod of the cluster with that port name.
    let t = table(&policy(
        "to-web",
        "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: web}]}]",
    ));
    assert_eq!(egress(&t, XA, YB, Tcp, 8080), allowed(0));
    assert_eq!(egress(&t, XA, YC, Tcp, 9090), allowed(0));
    assert_eq!(egress(&t, XA, "10.244.9.9", Tcp, 8080), Denied);

    // ipBlock peers: the pods with an address inside.
    let t = table(&policy(
        "to-web",
        "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.244.2.20/31}}], ports: [{port: web}]}]",
    ));
    assert_eq!(egress(&t, XA, YB, Tcp, 8080), allowed(0));
    assert_eq!(egress(&t, XA, YC, Tcp, 9090), Denied);

    // Named and numbered ports in one rule.
    let t = table(&policy(
        "mixed",
        "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {team: blue}}}], ports: [{port: web}, {port: 53, protocol: UDP}]}]",
    ));
    assert_eq!(egress(&t, XA, YA, Udp, 53), allowed(0));
    assert_eq!(egress(&t, XA, YB, Udp, 53), allowed(0));
    assert_eq!(egress(&t, XA, YB, Tcp, 8080), allowed(0));
    assert_eq!(egress(&t, XA, YA, Tcp, 8080), Denied);
    assert_eq!(egress(&t, XA, XB, Udp, 53), Denied);
}

#[test]
fn finished_unaddressed_and_host_network_pods_are_not_peers() {
    let t = table(&policy(
        "from-b",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}]}]",
    ));
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), allowed(0));
    assert_eq!(ingress(&t, XA, "10.244.2.40", Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, "192.168.0.3", Tcp, 80), Denied);
}

#[test]
fn the_lowest_allowing_policy_is_named() {
    let body = "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]";
    let deny = "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Ingress, Egress]";
    let t = table(&format!(
        "{}{}{}",
        policy("b-second", body),
        policy("a-first", body),
        policy("0-deny", deny)
    ));
    assert_eq!(t.policies(), ["x/0-deny", "x/a-first", "x/b-second"]);
    assert_eq!(ingress(&t, XA, XB, Tcp, 80), allowed(1));
    assert_eq!(t.policy_name(1), "x/a-first");
    let e = t.explain(PolicyType::Ingress, ip(XA), ip(XB), Some((Tcp, 80)));
    assert_eq!(e.pod, Some("x/a"));
    assert_eq!(e.policies, [0, 1, 2]);
    assert_eq!(e.verdict, allowed(1));
    let e = t.explain(PolicyType::Egress, ip(XA), ip(XB), Some((Tcp, 80)));
    assert_eq!((e.policies, e.verdict), (&[0][..], Denied));
    let e = t.explain(PolicyType::Ingress, ip(XB), ip(XC), Some((Tcp, 80)));
    assert_eq!(
        (e.pod, e.policies, e.verdict),
        (Some("x/b"), &[1, 2][..], Denied)
    );
}

#[test]
fn unusable_parts_warn_and_match_nothing() {
    let (spec, warnings) = compile_on(
        "node-a",
        &policy(
            "broken",
            "  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.244.1.300/24}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [nonsense]}\n    - podSelector: {matchExpressions: [{key: app, operator: Equals, values: [c]}]}\n    - podSelector: {matchLabels: {app: c}}\n      ipBlock: {cidr: 0.0.0.0/0}\n    - {}\n    - podSelector: {matchLabels: {app: b}}\n  - ports: [{port: 80, protocol: ICMP}, {port: 70000}, {port: 90, endPort: 85}, {endPort: 85}, {port: serve, endPort: 85}]",
        ),
    );
    assert_eq!(warnings.len(), 10, "{warnings:#?}");
    assert!(warnings
        .iter()
        .all(|w| w.object == "NetworkPolicy x/broken"));
    assert!(
        warnings[0].message.contains("10.244.1.300/24"),
        "{warnings:?}"
    );
    let t = PolicyTable::build(&spec);
    assert_eq!(allowed_into_xa(&t), ["x/b"]);
    assert_eq!(ingress(&t, XA, "10.1.1.1", Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, YB, Tcp, 80), Denied);
    assert_eq!(ingress(&t, XA, YB, Tcp, 87), Denied);

    // A podSelector that cannot be read isolates the whole namespace.
    let (spec, warnings) = compile_on(
        "node-a",
        &policy(
            "typo",
            "  podSelector: {matchExpressions: [{key: app, operator: in, values: [a]}]}\n  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]",
        ),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let t = PolicyTable::build(&spec);
    for pod in [XA, XB, XC] {
        assert_eq!(ingress(&t, pod, XB, Tcp, 80), allowed(0));
        assert_eq!(ingress(&t, pod, YB, Tcp, 80), Denied);
    }

    // A policy type that is neither Ingress nor Egress isolates nothing.
    let (spec, warnings) = compile_on(
        "node-a",
        &policy(
            "lower",
            "  podSelector: {}
  policyTypes: [ingress]",
        ),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(spec, PolicySpec::default());
}

#[test]
fn only_pods_of_this_node_are_compiled_and_output_is_deterministic() {
    let policies = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: y}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: y}\nspec: {podSelector: {matchLabels: {tier: web}}, ingress: [{}]}";
    let (a, _) = compile_on("node-a", policies);
    assert_eq!(a.policies, ["y/deny"]);
    let pods: Vec<&str> = a.pods.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(pods, ["y/a"]);
    let (b, _) = compile_on("node-b", policies);
    assert_eq!(b.policies, ["y/deny", "y/web"]);
    let pods: Vec<&str> = b.pods.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(pods, ["y/b", "y/c"]);
    // An empty rule allows everything into y/b, nothing into y/c.
    let t = PolicyTable::build(&b);
    assert_eq!(ingress(&t, YB, OUTSIDE, Udp, 1), allowed(1));
    assert_eq!(ingress(&t, YC, OUTSIDE, Udp, 1), Denied);
    assert_eq!(compile_on("node-b", policies).0, b);
}
