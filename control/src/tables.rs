//! The desired dataplane tables as a pure function of the objects, with kube-proxy's
//! semantics. Upstream files read (kubernetes/kubernetes, pkg/proxy): `servicechangetracker.go`
//! and `serviceport.go` (what a Service port is), `util/utils.go` (`ShouldSkipService`,
//! `GetClusterIPByFamily`), `endpointslicecache.go` (how slices join), `topology.go`
//! (`CategorizeEndpoints`), `pkg/api/v1/service/util.go` (traffic policies).
//!
//! - One [`ServiceSpec`](nat::spec::ServiceSpec) per (Service, port, IP family), as kube-proxy keeps one
//!   `ServicePortName` per proxier family. A Service is skipped when its `clusterIP` is
//!   `None` (headless) or empty, or it is `ExternalName`; a family is programmed only when
//!   the Service has a ClusterIP of that family, whose frontends are then that ClusterIP,
//!   the externalIPs and the VIP-mode load-balancer ingress IPs of the family, and every
//!   node address of the family with the port's `nodePort`.
//! - What the API server would refuse is refused here, with a counted warning
//!   ([`Refusals`]): a ClusterIP outside the cluster's Service ranges (of its family, when
//!   any is configured) leaves that family unprogrammed, a ClusterIP that is no address is
//!   said; a frontend two Services claim is held by the older ([`TableComputer`]).
//! - `loadBalancerSourceRanges` (trimmed, of the family) guard the load-balancer IPs only,
//!   as kube-proxy's firewall chain does, with the IPs themselves allowed as sources when a
//!   range holds the node's IP; NodePorts, externalIPs and the ClusterIP stay open.
//! - EndpointSlices are authoritative: a Service's endpoints are those of the slices
//!   labelled `kubernetes.io/service-name: <name>` in its namespace, of the family's address
//!   type, whatever its selector says; an address of the other family inside a slice is
//!   ignored too. A slice port joins a Service port by name and protocol; the slice port's
//!   number is the target port, which is how named target ports resolve per pod. An
//!   `ip:port` listed twice counts once: kube-proxy (since kubernetes#135593) lets a later
//!   listing replace an earlier one unless it is terminating, so a running pod wins over a
//!   terminating one whose address it reuses, wherever either runs; its slice order is a
//!   Go map's, so here a non-terminating listing wins, then a ready one, then the first in
//!   slice-name order.
//! - `CategorizeEndpoints`: cluster endpoints are the ready ones, filtered by topology when
//!   the hints allow it, else (no ready endpoint anywhere) the serving-and-terminating ones,
//!   unfiltered. Local endpoints are the local ready ones, else the local serving-and-
//!   terminating ones; topology never applies to them.
//! - Topology follows the hints alone, as `topologyModeFromHints` does today: the Service's
//!   `trafficDistribution` and `service.kubernetes.io/topology-mode` only tell the
//!   EndpointSlice controller to write hints. If every ready endpoint has node hints and
//!   one names this node, only endpoints hinted for this node are used (PreferSameNode);
//!   else if every ready endpoint has zone hints and one names this node's zone
//!   (`topology.kubernetes.io/zone`), only endpoints hinted for the zone are used; else
//!   hints are ignored. Non-ready endpoints neither need hints nor count.
//!
//! Objects that cannot be used in part (a bad address, an unknown protocol) produce a
//! [`Warning`](crate::warning::Warning) and are otherwise skipped; only a missing Node for this dataplane is an
//! error. Everything is ordered by name and address, so equal objects give equal tables.

mod computed;
mod computer;
mod node;
mod service;

pub use computed::{Computed, Refusals, TableError, MAX_AFFINITY_TIMEOUT_S};
pub use computer::{compute_with_warnings, TableComputer};

#[cfg(test)]
mod tests;
