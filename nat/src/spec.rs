//! The desired state of one node's dataplane, as control computes it from Kubernetes objects.
//!
//! This is the contract between `kxdp-control` and `kxdp-dataplane`: control turns Nodes, Pods,
//! Services, EndpointSlices and NetworkPolicies into a [`TableSpec`] (a pure function), streams
//! it, and the dataplane compiles it into lookup tables. Everything here is already resolved:
//! named ports are numbers, endpoint categorisation (ready / serving-terminating fallback,
//! traffic policies, topology) is done, policy selectors are addresses, defaults are applied.
//! The dataplane never sees a Kubernetes object.
//!
//! Fields added later carry `#[serde(default)]`, so an older control still talks to a newer
//! dataplane; a change that breaks that bumps [`SPEC_VERSION`].
//!
//! The rooms: `table` for the whole table and what describes the node, the cluster and
//! the pods; `service` for one Service port (frontends, endpoints, traffic policies);
//! `protocol` for the layer-4 protocols both know; `policy` for NetworkPolicy resolved to
//! addresses; `delta` for what changed from one table to the next and how it merges;
//! `validate` for what the dataplane checks before it takes a table. Every type is used
//! from here, `nat::spec::…`.

mod delta;
mod policy;
mod protocol;
mod service;
mod table;
mod validate;

pub use delta::{DeltaError, MergeStep, TableDelta};
pub use policy::{IsolationSpec, PodPolicySpec, PolicySpec, PortRangeSpec, RuleSpec};
pub use protocol::Protocol;
pub use service::{
    EndpointSpec, FrontendKind, FrontendSpec, RefusedFrontend, ServiceKey, ServiceSpec,
    MAX_ENDPOINTS,
};
pub use table::{ClusterSpec, NodeSpec, PodSpec, RemoteNodeSpec, TableSpec};

/// Version of the table format; the stream header carries it and a mismatch is refused.
pub const SPEC_VERSION: u32 = 1;
