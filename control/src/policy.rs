//! NetworkPolicy (`networking.k8s.io/v1`) compiled for the pods of one node: selectors
//! matched against pods and namespaces, `ipBlock` excepts subtracted, named ports resolved,
//! so the dataplane only compares addresses and numbers ([`nat::spec::PolicySpec`]).
//!
//! Semantics are those of the v1 API (the field documentation of
//! `k8s.io/api/networking/v1/types.go`):
//!
//! - A pod is isolated for a direction when a policy of its namespace selects it
//!   (`podSelector`, empty = every pod) and lists that direction in `policyTypes` (defaulted
//!   in [`crate::defaults::network_policy`]). Policies add up: traffic is allowed when any
//!   rule of any selecting policy matches. Only pods scheduled on this node, not on the host
//!   network and with an address are compiled: they are the ones this dataplane serves.
//! - A peer is `podSelector` alone (pods of the policy's namespace), `namespaceSelector`
//!   alone (every pod of the matching namespaces), both in one peer (pods matching the first
//!   in namespaces matching the second) or `ipBlock` (`cidr` minus `except`). Peers of one
//!   rule add up; absent or empty `from`/`to` is every peer. Peer pods are those with an
//!   address that are neither Succeeded nor Failed (their address may already be another's)
//!   nor on the host network (their address is the node's). A namespace without a Namespace
//!   object has only the `kubernetes.io/metadata.name` label.
//! - Ports: absent or empty is every port of every protocol; a port entry without `port` is
//!   every port of its protocol; `endPort` makes a range. A named port is resolved on the
//!   container ports (name and protocol) of the pod that receives: for ingress the selected
//!   pod itself, for egress each destination pod, so one egress rule becomes one rule per
//!   resolved number, whose peers are the destination pods with that number (inside the
//!   rule's peers: selected pods, or pods with an address inside its ipBlocks, or every pod
//!   when it has no peers). A name that resolves nowhere contributes nothing.
//!
//! What cannot be used yields a [`Warning`] and fails closed: a peer or port entry that
//! cannot be read matches nothing, and a policy whose `podSelector` cannot be read selects
//! every pod of its namespace (so a typo isolates rather than opens). Only policies that
//! select a pod of this node are compiled or warned about. Everything is ordered by
//! namespace and name, so equal objects give equal specs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nat::spec::{IsolationSpec, PodPolicySpec, PolicySpec, PortRangeSpec, Protocol, RuleSpec};

use crate::labels::NAMESPACE_NAME_LABEL;
use crate::objects::{namespace_and_name, Objects};
use crate::warning::Warning;

mod selector;
use selector::Selector;

/// How a warning about a peer ends.
const NOTHING: &str = "the peer matches nothing";

/// Compiles the NetworkPolicies that select pods of `node_name` into the dataplane's
/// [`PolicySpec`], pushing a [`Warning`] for every part that cannot be used.
pub fn compile(objects: &Objects, node_name: &str, warnings: &mut Vec<Warning>) -> PolicySpec {
    let cluster = Cluster::new(objects);
    let mut w = Warn(warnings);

    // Pods of this node, in the order of the cluster's pod list (namespace, name).
    let local: Vec<usize> = cluster
        .pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.node == Some(node_name))
        .map(|(i, _)| i)
        .collect();

    let mut spec = PolicySpec::default();
    // Per local pod: (ingress, egress) isolation being built.
    let mut isolation: BTreeMap<usize, [Option<IsolationSpec>; 2]> = BTreeMap::new();
    for policy in objects.network_policies() {
        let (ns, name) = namespace_and_name(&policy.metadata);
        let object = format!("NetworkPolicy {ns}/{name}");
        let empty = Default::default();
        let p = policy.spec.as_ref().unwrap_or(&empty);
        let selects = match p.pod_selector.as_ref().map(Selector::new) {
            None => Selector::everything(),
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                let instead = "so it isolates rather than opens";
                let message = format!(
                    "podSelector: {e}; the policy selects every pod of namespace {ns}, {instead}"
                );
                w.push(&object, message);
                Selector::everything()
            }
        };
        let selected: Vec<usize> = local
            .iter()
            .copied()
            .filter(|&i| {
                let pod = &cluster.pods[i];
                pod.namespace == ns && selects.matches(pod.labels)
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        let (mut ingress, mut egress) = (false, false);
        for t in p.policy_types.iter().flatten() {
            match t.as_str() {
                "Ingress" => ingress = true,
                "Egress" => egress = true,
                other => w.push(
                    &object,
                    format!("policyTypes: {other:?} is neither Ingress nor Egress; ignored"),
                ),
            }
        }
        if p.policy_types.is_none() {
            // Not defaulted (an object built in code): the API server's default.
            ingress = true;
            egress = p.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        if !ingress && !egress {
            continue;
        }
        let index = spec.policies.len() as u32;
        spec.policies.push(format!("{ns}/{name}"));

        let rules = Rules {
            cluster: &cluster,
            namespace: ns,
            object: &object,
            policy: index,
        };
        // Ingress peers and ports, resolved once; named ports wait for the selected pod.
        let ingress_rules: Vec<IngressRule> = if ingress {
            p.ingress
                .iter()
                .flatten()
                .map(|r| IngressRule {
                    peers: rules.prefixes(&rules.peers(r.from.as_deref(), &mut w)),
                    ports: rules.ports(r.ports.as_deref(), &mut w),
                })
                .collect()
        } else {
            Vec::new()
        };
        // Egress rules do not depend on the selected pod at all.
        let egress_rules: Vec<RuleSpec> = if egress {
            p.egress
                .iter()
                .flatten()
                .flat_map(|r| rules.egress(r.to.as_deref(), r.ports.as_deref(), &mut w))
                .collect()
        } else {
            Vec::new()
        };

        for i in selected {
            let iso = isolation.entry(i).or_default();
            if ingress {
                let iso = iso[0].get_or_insert_with(IsolationSpec::default);
                iso.policies.push(index);
                for r in &ingress_rules {
                    if let Some(rule) = r.for_pod(index, cluster.pods[i].pod) {
                        iso.rules.push(rule);
                    }
                }
            }
            if egress {
                let iso = iso[1].get_or_insert_with(IsolationSpec::default);
                iso.policies.push(index);
                iso.rules.extend(egress_rules.iter().cloned());
            }
        }
    }

    for (i, [ingress, egress]) in isolation {
        let pod = &cluster.pods[i];
        spec.pods.push(PodPolicySpec {
            pod: pod.name.clone(),
            ips: pod.ips.clone(),
            ingress,
            egress,
        });
    }
    spec
}

struct Warn<'a>(&'a mut Vec<Warning>);

impl Warn<'_> {
    fn push(&mut self, object: &str, message: impl Into<String>) {
        self.0.push(Warning {
            object: object.to_string(),
            message: message.into(),
        });
    }
}

/// A pod that can be a peer (and, on this node, be selected).
struct ClusterPod<'a> {
    pod: &'a Pod,
    /// `namespace/name`.
    name: String,
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    node: Option<&'a str>,
    ips: Vec<IpAddr>,
}

/// What the selectors are matched against.
struct Cluster<'a> {
    pods: Vec<ClusterPod<'a>>,
    /// Labels of every namespace with an object or a pod.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> Cluster<'a> {
    fn new(objects: &'a Objects) -> Cluster<'a> {
        let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for ns in objects.namespaces() {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            namespaces.insert(name, labels);
        }
        let mut pods = Vec::new();
        for pod in objects.pods() {
            let Some(spec) = &pod.spec else { continue };
            if spec.host_network == Some(true) {
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
            namespaces.entry(ns.to_string()).or_insert_with(|| {
                BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())])
            });
            pods.push(ClusterPod {
                pod,
                name: format!("{ns}/{name}"),
                namespace: ns,
                labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                node: spec.node_name.as_deref(),
                ips,
            });
        }
        Cluster { pods, namespaces }
    }
}

/// `status.podIPs`, else `status.podIP`; unparsable ones skipped (the table computation
/// warns about pods of this node).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = ip.parse() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

/// The peers of one rule.
enum Peers {
    /// `from`/`to` absent or empty.
    Any,
    /// Pods (indices into [`Cluster::pods`], every address) and ipBlock prefixes.
    Listed {
        pods: BTreeSet<usize>,
        blocks: BTreeSet<IpNet>,
    },
}

/// A `ports` entry, before named ports are resolved.
#[derive(Clone, Debug)]
enum PortEntry {
    Range(PortRangeSpec),
    Named(String, Protocol),
}

/// Rule compilation for one policy.
struct Rules<'c, 'a> {
    cluster: &'c Cluster<'a>,
    namespace: &'c str,
    object: &'c str,
    policy: u32,
}

impl Rules<'_, '_> {
    /// The peers of a rule's `from` or `to`.
    fn peers(&self, list: Option<&[NetworkPolicyPeer]>, w: &mut Warn<'_>) -> Peers {
        let list = list.unwrap_or_default();
        if list.is_empty() {
            return Peers::Any;
        }
        let mut pods = BTreeSet::new();
        let mut blocks = BTreeSet::new();
        for (i, peer) in list.iter().enumerate() {
            match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
                (Some(b), None, None) => blocks.extend(self.ip_block(b, w)),
                (Some(_), _, _) => w.push(
                    self.object,
                    format!("peer {i}: ipBlock together with a selector; {NOTHING}"),
                ),
                (None, None, None) => w.push(
                    self.object,
                    format!("peer {i}: no podSelector, namespaceSelector or ipBlock; {NOTHING}"),
                ),
                (None, pod_sel, ns_sel) => {
                    let parse =
                        |s: &Option<LabelSelector>| s.as_ref().map(Selector::new).transpose();
                    let (pod_sel, ns_sel) = match (parse(pod_sel), parse(ns_sel)) {
                        (Ok(p), Ok(n)) => (p, n),
                        (Err(e), _) | (_, Err(e)) => {
                            w.push(self.object, format!("peer {i}: {e}; {NOTHING}"));
                            continue;
                        }
                    };
                    for (j, pod) in self.cluster.pods.iter().enumerate() {
                        let ns_ok = match &ns_sel {
                            None => pod.namespace == self.namespace,
                            Some(sel) => self
                                .cluster
                                .namespaces
                                .get(pod.namespace)
                                .is_some_and(|labels| sel.matches(labels)),
                        };
                        if ns_ok && pod_sel.as_ref().is_none_or(|s| s.matches(pod.labels)) {
                            pods.insert(j);
                        }
                    }
                }
            }
        }
        Peers::Listed { pods, blocks }
    }

    /// The prefixes of [`RuleSpec::peers`]: every address of the peer pods, and the
    /// ipBlocks.
    fn prefixes(&self, peers: &Peers) -> Option<Vec<IpNet>> {
        match peers {
            Peers::Any => None,
            Peers::Listed { pods, blocks } => {
                let mut out: BTreeSet<IpNet> = blocks.clone();
                for &i in pods {
                    out.extend(self.cluster.pods[i].ips.iter().map(|ip| IpNet::from(*ip)));
                }
                Some(out.into_iter().collect())
            }
        }
    }

    /// An ipBlock's prefixes (`cidr` minus `except`); nothing when it cannot be read.
    fn ip_block(&self, b: &IPBlock, w: &mut Warn<'_>) -> Vec<IpNet> {
        let Ok(cidr) = b.cidr.trim().parse::<IpNet>() else {
            w.push(
                self.object,
                format!("ipBlock cidr {:?} is not a CIDR; {NOTHING}", b.cidr),
            );
            return Vec::new();
        };
        let mut except = Vec::new();
        for e in b.except.iter().flatten() {
            match e.trim().parse::<IpNet>() {
                Ok(n) => except.push(n),
                Err(_) => {
                    w.push(
                        self.object,
                        format!("ipBlock {}: except {e:?} is not a CIDR; {NOTHING}", b.cidr),
                    );
                    return Vec::new();
                }
            }
        }
        nat::policy::subtract(cidr, &except)
    }

    /// A rule's `ports`: `None` for every port of every protocol; entries that cannot be
    /// used are left out (so a list of only such entries matches nothing).
    fn ports(
        &self,
        list: Option<&[NetworkPolicyPort]>,
        w: &mut Warn<'_>,
    ) -> Option<Vec<PortEntry>> {
        let list = list.unwrap_or_default();
        if list.is_empty() {
            return None;
        }
        Some(list.iter().filter_map(|p| self.port(p, w)).collect())
    }

    fn port(&self, p: &NetworkPolicyPort, w: &mut Warn<'_>) -> Option<PortEntry> {
        let object = self.object;
        let proto_name = p.protocol.as_deref().unwrap_or(crate::defaults::PROTOCOL);
        let Some(protocol) = protocol(proto_name) else {
            let message = format!("port protocol {proto_name:?} is not TCP, UDP or SCTP");
            w.push(object, format!("{message}; the port matches nothing"));
            return None;
        };
        let number = |n: i32, what: &str, w: &mut Warn<'_>| match u16::try_from(n) {
            Ok(n) if n != 0 => Some(n),
            _ => {
                w.push(
                    object,
                    format!("{what} {n} is not a port number; the port matches nothing"),
                );
                None
            }
        };
        let range = |first, last| {
            Some(PortEntry::Range(PortRangeSpec {
                protocol,
                first,
                last,
            }))
        };
        match (&p.port, p.end_port) {
            (None, None) => range(0, u16::MAX),
            (None, Some(_)) => {
                w.push(object, "endPort without port; the port matches nothing");
                None
            }
            (Some(IntOrString::Int(n)), None) => {
                let n = number(*n, "port", w)?;
                range(n, n)
            }
            (Some(IntOrString::Int(n)), Some(end)) => {
                let first = number(*n, "port", w)?;
                let last = number(end, "endPort", w)?;
                if last < first {
                    w.push(
                        object,
                        format!("endPort {last} is below port {first}; the port matches nothing"),
                    );
                    return None;
                }
                range(first, last)
            }
            (Some(IntOrString::String(name)), None) => {
                Some(PortEntry::Named(name.clone(), protocol))
            }
            (Some(IntOrString::String(name)), Some(_)) => {
                w.push(
                    object,
                    format!("endPort with the named port {name:?}; the port matches nothing"),
                );
                None
            }
        }
    }

    /// One egress rule, as rules with numbers: one for its numbered ports (or for every
    /// port), and one per number its named ports resolve to on the destination pods.
    fn egress(
        &self,
        to: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        w: &mut Warn<'_>,
    ) -> Vec<RuleSpec> {
        let peers = self.peers(to, w);
        let prefixes = self.prefixes(&peers);
        if prefixes.as_ref().is_some_and(Vec::is_empty) {
            return Vec::new();
        }
        let Some(ports) = self.ports(ports, w) else {
            return vec![RuleSpec {
                policy: self.policy,
                peers: prefixes,
                ports: None,
            }];
        };
        let mut out = Vec::new();
        let numbered: Vec<PortRangeSpec> = ports
            .iter()
            .filter_map(|p| match p {
                PortEntry::Range(r) => Some(*r),
                PortEntry::Named(..) => None,
            })
            .collect();
        if !numbered.is_empty() {
            out.push(RuleSpec {
                policy: self.policy,
                peers: prefixes,
                ports: Some(numbered),
            });
        }
        let named: Vec<(&str, Protocol)> = ports
            .iter()
            .filter_map(|p| match p {
                PortEntry::Named(n, proto) => Some((n.as_str(), *proto)),
                PortEntry::Range(_) => None,
            })
            .collect();
        if named.is_empty() {
            return out;
        }
        // The destination pods within the peers, with the addresses the peers cover.
        let mut destinations: BTreeMap<usize, BTreeSet<IpAddr>> = BTreeMap::new();
        for (i, pod) in self.cluster.pods.iter().enumerate() {
            let ips: BTreeSet<IpAddr> = match &peers {
                Peers::Any => pod.ips.iter().copied().collect(),
                Peers::Listed { pods, .. } if pods.contains(&i) => {
                    pod.ips.iter().copied().collect()
                }
                Peers::Listed { blocks, .. } => pod
                    .ips
                    .iter()
                    .copied()
                    .filter(|ip| blocks.iter().any(|b| b.contains(ip)))
                    .collect(),
            };
            if !ips.is_empty() {
                destinations.insert(i, ips);
            }
        }
        for (name, protocol) in named {
            let mut by_number: BTreeMap<u16, BTreeSet<IpAddr>> = BTreeMap::new();
            for (&i, ips) in &destinations {
                if let Some(n) = named_port(self.cluster.pods[i].pod, name, protocol) {
                    by_number.entry(n).or_default().extend(ips);
                }
            }
            for (n, ips) in by_number {
                out.push(RuleSpec {
                    policy: self.policy,
                    peers: Some(ips.into_iter().map(IpNet::from).collect()),
                    ports: Some(vec![PortRangeSpec {
                        protocol,
                        first: n,
                        last: n,
                    }]),
                });
            }
        }
        out
    }
}

/// An ingress rule with its peers resolved; its named ports wait for the selected pod.
struct IngressRule {
    peers: Option<Vec<IpNet>>,
    ports: Option<Vec<PortEntry>>,
}

impl IngressRule {
    /// The rule for the selected `pod`, its named ports resolved there; `None` when it
    /// can match nothing.
    fn for_pod(&self, policy: u32, pod: &Pod) -> Option<RuleSpec> {
        if self.peers.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }
        let ports = match &self.ports {
            None => None,
            Some(entries) => {
                let mut resolved: Vec<PortRangeSpec> = Vec::new();
                for e in entries {
                    let r = match e {
                        PortEntry::Range(r) => *r,
                        PortEntry::Named(name, protocol) => {
                            let Some(n) = named_port(pod, name, *protocol) else {
                                continue;
                            };
                            PortRangeSpec {
                                protocol: *protocol,
                                first: n,
                                last: n,
                            }
                        }
                    };
                    if !resolved.contains(&r) {
                        resolved.push(r);
                    }
                }
                if resolved.is_empty() {
                    return None;
                }
                Some(resolved)
            }
        };
        Some(RuleSpec {
            policy,
            peers: self.peers.clone(),
            ports,
        })
    }
}

/// The number of the container port called `name` with `protocol` on `pod`: its
/// containers and its sidecars (init containers with `restartPolicy: Always`), which are
/// the ones that serve.
fn named_port(pod: &Pod, name: &str, protocol: Protocol) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name)
                && self::protocol(p.protocol.as_deref().unwrap_or(crate::defaults::PROTOCOL))
                    == Some(protocol)
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|n| *n != 0)
}

fn protocol(name: &str) -> Option<Protocol> {
    match name {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}
