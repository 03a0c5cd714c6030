//! One Service port of one IP family, as the dataplane takes it: its frontends, its
//! endpoints per traffic policy, and the key that orders a table's Service ports.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::protocol::Protocol;

/// How a frontend address is reached, which decides the traffic policy that applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`: internal traffic policy.
    ClusterIp,
    /// A node address with `spec.ports[].nodePort`: external traffic policy.
    NodePort,
    /// `status.loadBalancer.ingress[].ip`: external traffic policy.
    LoadBalancer,
    /// `spec.externalIPs`: external traffic policy.
    ExternalIp,
}

impl FrontendKind {
    /// Whether `externalTrafficPolicy` governs this frontend.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// One address:port a Service is reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrontendSpec {
    /// What kind of address this is.
    pub kind: FrontendKind,
    /// The destination address clients use.
    pub ip: IpAddr,
    /// The destination port clients use.
    pub port: u16,
}

/// One endpoint of a Service port, after named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// Endpoint address (a pod IP, or any address for hand-made slices).
    pub ip: IpAddr,
    /// Target port on the endpoint.
    pub port: u16,
    /// Whether the endpoint is on this node (`nodeName` equals ours).
    pub local: bool,
    /// EndpointSlice `conditions.ready` after defaulting.
    pub ready: bool,
    /// EndpointSlice `conditions.serving` after defaulting.
    pub serving: bool,
    /// EndpointSlice `conditions.terminating` after defaulting.
    pub terminating: bool,
}

/// One (Service, port, IP family): frontends and the endpoint lists each traffic policy uses.
/// The default is an unnamed TCP port with nothing in it, for building one field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// `namespace/name:portName`, for counters and inspection.
    pub name: String,
    /// Transport protocol of this port.
    pub protocol: Protocol,
    /// Every address:port that reaches this Service port.
    pub frontends: Vec<FrontendSpec>,
    /// Endpoints for traffic under policy `Cluster` (already categorised: ready ones, else the
    /// serving-and-terminating ones; topology hints applied).
    pub cluster_endpoints: Vec<EndpointSpec>,
    /// Endpoints for traffic under policy `Local`: the local subset, same categorisation.
    pub local_endpoints: Vec<EndpointSpec>,
    /// Every endpoint the slices list for this port, whatever their state: used to tell
    /// "endpoint gone" (flush its flows) from "endpoint not chosen for new flows".
    #[serde(default)]
    pub all_endpoints: Vec<EndpointSpec>,
    /// `internalTrafficPolicy: Local`.
    #[serde(default)]
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    #[serde(default)]
    pub affinity_timeout_s: Option<u32>,
    /// The sources that may open connections to the [`FrontendKind::LoadBalancer`]
    /// frontends: `loadBalancerSourceRanges` of this family, plus the load-balancer IPs
    /// themselves when a range holds the node's address (kube-proxy's firewall chain).
    /// Empty: no filter. NodePorts, externalIPs and the ClusterIP are never filtered.
    #[serde(default)]
    pub lb_source_ranges: Vec<IpNet>,
    /// Frontends of other Service ports that claimed one of this port's frontends (the
    /// same address, port and protocol) and were refused it, this port's Service being the
    /// older (control's rule: `creationTimestamp`, then namespace and name). For inspection
    /// only: the refused frontends are already left out of their own ports. Left out of the
    /// stream when empty, so a table without conflicts is sent as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedFrontend>,
}

/// A frontend a Service port claimed and was refused, because an older Service's port
/// holds the same address, port and protocol (see [`ServiceSpec::refused`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedFrontend {
    /// The Service port refused (`namespace/name:port`).
    pub service: String,
    /// The frontend it claimed.
    pub frontend: FrontendSpec,
}

/// What identifies a [`ServiceSpec`] within a table: its name, protocol and IP family. The
/// order of the tuple is the order of [`TableSpec::services`](super::table::TableSpec::services).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// [`ServiceSpec::name`].
    pub name: String,
    /// [`ServiceSpec::protocol`].
    pub protocol: Protocol,
    /// Whether the Service port's addresses are IPv6.
    pub ipv6: bool,
}

impl ServiceSpec {
    /// Whether this is the IPv6 family of its Service (by its first frontend, the
    /// ClusterIP).
    pub fn is_ipv6(&self) -> bool {
        self.frontends.first().is_some_and(|f| f.ip.is_ipv6())
    }

    /// The key, borrowed: what [`TableSpec::services`](super::table::TableSpec::services) is ordered by.
    pub fn key_ref(&self) -> (&str, Protocol, bool) {
        (&self.name, self.protocol, self.is_ipv6())
    }

    /// The key, owned.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            name: self.name.clone(),
            protocol: self.protocol,
            ipv6: self.is_ipv6(),
        }
    }
}

impl ServiceKey {
    /// The key, borrowed like [`ServiceSpec::key_ref`].
    pub fn as_ref(&self) -> (&str, Protocol, bool) {
        (&self.name, self.protocol, self.ipv6)
    }
}

/// The most endpoints one Service port may have (a Maglev ring slot holds a 16-bit index).
pub const MAX_ENDPOINTS: usize = u16::MAX as usize;
