//! NetworkPolicy of this node's pods, resolved by control to addresses and port numbers.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::protocol::Protocol;

/// NetworkPolicy (`networking.k8s.io/v1`) for the pods of this node, resolved to addresses
/// and port numbers: selectors are already matched against pods and namespaces, `ipBlock`
/// excepts are already subtracted, named ports are already numbers. The dataplane compiles
/// it into a [`crate::policy::PolicyTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// `namespace/name` of every NetworkPolicy that selects a pod of this node, ordered by
    /// namespace and name; [`RuleSpec::policy`] and [`IsolationSpec::policies`] index it.
    pub policies: Vec<String>,
    /// One entry per pod of this node that is isolated in at least one direction, ordered
    /// by namespace and name. A pod not listed is not isolated at all.
    pub pods: Vec<PodPolicySpec>,
}

/// The isolation of one pod of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPolicySpec {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's addresses (`status.podIPs`); the verdict is asked by these.
    pub ips: Vec<IpAddr>,
    /// Ingress isolation; `None` when no policy with policy type `Ingress` selects the pod,
    /// so all ingress is allowed.
    pub ingress: Option<IsolationSpec>,
    /// Egress isolation; `None` when no policy with policy type `Egress` selects the pod,
    /// so all egress is allowed.
    pub egress: Option<IsolationSpec>,
}

/// How a pod is isolated in one direction: what selects it and what its rules allow.
/// Traffic is allowed when at least one rule matches; with no rules, nothing is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationSpec {
    /// Every policy that selects the pod for this direction, ascending, including those
    /// without rules (they only isolate); kept for explaining a verdict.
    pub policies: Vec<u32>,
    /// The rules of those policies for this pod (ingress `from` or egress `to`), in policy
    /// order. A rule that can match nothing (a named port the pod lacks, peers that select
    /// no pod) is left out.
    pub rules: Vec<RuleSpec>,
}

/// One NetworkPolicy rule, resolved: it matches a peer address inside one of `peers` on a
/// protocol and port inside one of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Index of the policy the rule belongs to, in [`PolicySpec::policies`].
    pub policy: u32,
    /// Peer prefixes (a selected pod is one /32 or /128 per address; an `ipBlock` is its
    /// CIDR minus its excepts); `None` matches every peer (`from`/`to` absent or empty).
    /// Prefixes may overlap.
    pub peers: Option<Vec<IpNet>>,
    /// Port ranges; `None` matches every port of every protocol (`ports` absent or
    /// empty). For ingress the port is the pod's own, for egress the destination's after
    /// Service translation.
    pub ports: Option<Vec<PortRangeSpec>>,
}

/// An inclusive range of ports of one protocol (`port`, or `port`..=`endPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRangeSpec {
    /// Transport protocol.
    pub protocol: Protocol,
    /// First port of the range.
    pub first: u16,
    /// Last port of the range, included; a range with `last < first` matches nothing.
    pub last: u16,
}
