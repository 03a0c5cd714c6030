//! The desired dataplane tables as a pure function of the objects, with kube-proxy's
//! semantics. Upstream files read (kubernetes/kubernetes, pkg/proxy): `servicechangetracker.go`
//! and `serviceport.go` (what a Service port is), `util/utils.go` (`ShouldSkipService`,
//! `GetClusterIPByFamily`), `endpointslicecache.go` (how slices join), `topology.go`
//! (`CategorizeEndpoints`), `pkg/api/v1/service/util.go` (traffic policies).
//!
//! - One [`ServiceSpec`] per (Service, port, IP family), as kube-proxy keeps one
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
//! [`Warning`] and are otherwise skipped; only a missing Node for this dataplane is an
//! error. Everything is ordered by name and address, so equal objects give equal tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nat::spec::{
    ClusterSpec, EndpointSpec, FrontendKind, FrontendSpec, NodeSpec, PodSpec, Protocol,
    RefusedFrontend, RemoteNodeSpec, ServiceSpec, TableSpec,
};

use crate::objects::{namespace_and_name, Kind, Objects};

/// Label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label of the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Flannel's public IP annotation: the node's VXLAN tunnel address.
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Flannel's backend data annotation (`{"VNI":1,"VtepMAC":"..."}`).
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// kxdp's own annotation of a kxdp node's VTEP MAC (`aa:bb:cc:dd:ee:ff`); it wins over
/// flannel's `VtepMAC` when both are present.
pub const KXDP_VTEP_MAC: &str = "kxdp.io/vtep-mac";
/// kxdp's own annotation of a kxdp node's VTEP address; it wins over flannel's `public-ip`.
pub const KXDP_VTEP_IP: &str = "kxdp.io/vtep-ip";
/// The largest `sessionAffinityConfig.clientIP.timeoutSeconds` the API server accepts.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// Part of an object that could not be used; the rest of the tables is still computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Which object (`Service default/web`).
    pub object: String,
    /// What was skipped and why.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Why no table could be computed at all.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// There is no Node object for the node this dataplane serves.
    #[error("no Node object named {0}: give kxdp-control the node's own name (--node) or add its Node manifest")]
    NoSuchNode(String),
}

/// How many Service addresses a computation refused, by reason; each also has its
/// [`Warning`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Frontends (address, port, protocol) that an older Service's port holds.
    pub taken: usize,
    /// ClusterIPs outside the cluster's Service ranges: that family of the Service is
    /// not programmed.
    pub outside_service_ranges: usize,
    /// ClusterIPs that are not IP addresses.
    pub invalid_cluster_ip: usize,
}

impl Refusals {
    /// Each reason, named as the metric labels it, with its count.
    pub fn by_reason(&self) -> [(&'static str, usize); 3] {
        [
            ("taken", self.taken),
            ("outside_service_ranges", self.outside_service_ranges),
            ("invalid_cluster_ip", self.invalid_cluster_ip),
        ]
    }

    fn add(&mut self, other: &Refusals) {
        self.taken += other.taken;
        self.outside_service_ranges += other.outside_service_ranges;
        self.invalid_cluster_ip += other.invalid_cluster_ip;
    }
}

/// The tables and what had to be skipped to compute them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Computed {
    /// The tables.
    pub tables: TableSpec,
    /// Parts of objects that could not be used.
    pub warnings: Vec<Warning>,
    /// Service addresses refused (counted among the warnings too).
    pub refused: Refusals,
}

/// Computes the tables of the node `node_name`, returning the warnings too.
pub fn compute_with_warnings(
    objects: &Objects,
    node_name: &str,
    cluster: &ClusterSpec,
) -> Result<Computed, TableError> {
    TableComputer::new(node_name, cluster.clone()).compute(objects)
}

/// Computes one node's tables again and again as its objects change, redoing only what
/// the changes touch: a Service port's entries are computed again when its Service group
/// (the Service, or an EndpointSlice labelled with its name) or this node's Node changed,
/// the local pods when Pods did, the remote nodes when Nodes did, NetworkPolicy when Pods,
/// Namespaces or NetworkPolicies did. What it returns equals [`compute_with_warnings`] of
/// the same objects (that function is this with nothing cached), and shares every
/// unchanged Service port (`Arc`) with the previous result, so that the stream's delta
/// ([`nat::spec::TableDelta::between`]) finds the changes by pointer.
///
/// What changed is told by the store's stamps ([`Objects::group_stamp`] and friends), so a
/// computation after one EndpointSlice change costs one stamp comparison per Service and
/// the join and categorisation of that one Service.
///
/// Two Service ports may claim one frontend (address, port and protocol: TCP 53 and UDP
/// 53 are two): the API server never allows it for ClusterIPs and NodePorts, so it comes
/// from hand-written manifests or a bug, and it must not let a newcomer take a working
/// Service's address. The port of the older Service holds it (`creationTimestamp`; one
/// without comes after one with; then namespace and name), lists the others in
/// [`ServiceSpec::refused`], and the others lose that frontend only, with a warning naming
/// both; a port left without frontends is not programmed. Which Services share a frontend
/// is kept in an index, so a change looks again only at the Services that claim what the
/// changed one claimed or claims.
pub struct TableComputer {
    node_name: String,
    cluster: ClusterSpec,
    /// The stamp of this node's Node when the cached Service ports were computed: they
    /// depend on its addresses (NodePorts) and zone (topology).
    node_stamp: u64,
    services: HashMap<Key, CachedService>,
    /// Who claims each frontend, oldest first (the one that holds it), with the kind of
    /// frontend each claims it as.
    claims: HashMap<Claim, BTreeMap<Claimant, FrontendKind>>,
    /// The warnings of the Services that have some, in the store's order.
    service_warnings: BTreeMap<Key, Warnings>,
    /// The store computed from last ([`Objects::id`]) and its newest stamp then: the next
    /// computation from the same store looks only at the groups changed since.
    seen: Option<(u64, u64)>,
    /// Bumped by each full pass; a cached Service not seen in one is gone.
    pass: u64,
    local_pods: Option<Cached<Vec<PodSpec>>>,
    remote_nodes: Option<Cached<Vec<RemoteNodeSpec>>>,
    policy: Option<Cached<nat::spec::PolicySpec>>,
    /// The last result's Service ports, in canonical order.
    last: Vec<Arc<ServiceSpec>>,
}

/// `(namespace, name)` of a Service.
type Key = (String, String);

/// A frontend as the dataplane looks it up: address, port, protocol.
type Claim = (IpAddr, u16, Protocol);

/// A Service port claiming a frontend: its Service's age, then its name; the least holds
/// the frontend.
type Claimant = (Age, String);

/// How old a Service is, for which of two holds a frontend: the older, by
/// `creationTimestamp` (one without comes after one with), then namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Age {
    unknown: bool,
    created: Option<Time>,
    key: Key,
}

impl Age {
    fn of(svc: &Service, key: &Key) -> Age {
        let created = svc.metadata.creation_timestamp.clone();
        Age {
            unknown: created.is_none(),
            created,
            key: key.clone(),
        }
    }
}

struct CachedService {
    stamp: u64,
    pass: u64,
    age: Age,
    /// As computed from the Service's objects, in canonical order: what it claims.
    computed: Vec<Arc<ServiceSpec>>,
    /// The computation's warnings.
    warnings: Warnings,
    /// As published: `computed` without the frontends older Services hold, with those it
    /// holds against others; in canonical order.
    specs: Vec<Arc<ServiceSpec>>,
}

/// What a computation changed: the Services computed again or gone, and the frontends
/// they claimed or claim. Every Service claiming one of those is published again.
#[derive(Default)]
struct Touched {
    services: BTreeSet<Key>,
    claims: BTreeSet<Claim>,
}

/// A part of the tables with the stamps it was computed at.
struct Cached<T> {
    stamps: Vec<u64>,
    value: T,
    warnings: Vec<Warning>,
}

impl<T: Clone> Cached<T> {
    /// `slot`'s value if it was computed at `stamps`, else computed again by `f`.
    fn get_or(
        slot: &mut Option<Cached<T>>,
        stamps: Vec<u64>,
        w: &mut Warnings,
        f: impl FnOnce(&mut Warnings) -> T,
    ) -> T {
        if let Some(c) = slot.as_ref().filter(|c| c.stamps == stamps) {
            w.list.extend(c.warnings.iter().cloned());
            return c.value.clone();
        }
        let mut own = Warnings::default();
        let value = f(&mut own);
        w.list.extend(own.list.iter().cloned());
        *slot = Some(Cached {
            stamps,
            value: value.clone(),
            warnings: own.list,
        });
        value
    }
}

impl TableComputer {
    /// A computer for node `node_name` with nothing computed yet.
    pub fn new(node_name: &str, cluster: ClusterSpec) -> TableComputer {
        TableComputer {
            node_name: node_name.to_string(),
            cluster,
            node_stamp: 0,
            services: HashMap::new(),
            claims: HashMap::new(),
            service_warnings: BTreeMap::new(),
            seen: None,
            pass: 0,
            local_pods: None,
            remote_nodes: None,
            policy: None,
            last: Vec::new(),
        }
    }

    /// The node computed for.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The tables of `objects`, with the warnings of every object (also those of objects
    /// not computed again).
    pub fn compute(&mut self, objects: &Objects) -> Result<Computed, TableError> {
        let node_name = self.node_name.clone();
        let node_name = node_name.as_str();
        let node = objects
            .node(node_name)
            .ok_or_else(|| TableError::NoSuchNode(node_name.to_string()))?;
        let mut w = Warnings::default();
        let me = node_spec(node_name, node, &mut w);

        // Every Service port depends on this node (NodePort addresses, topology zone):
        // when it changed, all are computed again, and compared with their old entries so
        // that those that stay equal stay shared.
        let node_stamp = objects.node_stamp(node_name);
        let all_dirty = node_stamp != self.node_stamp;
        self.node_stamp = node_stamp;
        // kube-proxy's --nodeport-addresses: NodePorts only on the node addresses it names;
        // unset, only on the node's primary address of each family, as its nftables mode
        // defaults to (`--nodeport-addresses primary`).
        let primary = primary_ips(node);
        let nodeport_addresses: Vec<IpAddr> = me
            .addresses
            .iter()
            .copied()
            .filter(|a| {
                if self.cluster.nodeport_addresses.is_empty() {
                    primary.contains(&Some(*a))
                } else {
                    self.cluster
                        .nodeport_addresses
                        .iter()
                        .any(|n| n.contains(a))
                }
            })
            .collect();
        let service_cidrs = self.cluster.service_cidrs.clone();
        let here = Here {
            node_name,
            zone: me.zone.as_deref(),
            node_addresses: &nodeport_addresses,
            primary_ips: primary,
            service_cidrs: &service_cidrs,
        };
        let mut delta = nat::spec::TableDelta::default();
        let mut touched = Touched::default();
        let since = match self.seen {
            Some((store, stamp))
                if store == objects.id() && stamp >= objects.horizon() && !all_dirty =>
            {
                Some(stamp)
            }
            _ => None,
        };
        match since {
            // The same store as last time, continued: only the groups changed since.
            Some(stamp) => {
                let changed: BTreeSet<&(String, String)> =
                    objects.groups_changed_since(stamp).collect();
                for key in changed {
                    match objects.service(key) {
                        Some(svc) => self.compute_service(objects, key, svc, &here, &mut touched),
                        None => self.forget_service(key, &mut touched, &mut delta),
                    }
                }
            }
            // Another store, or everything may have changed: every Service is looked at,
            // and those gone from the store are found by not being seen.
            None => {
                self.pass += 1;
                let pass = self.pass;
                for (key, svc) in objects.services_by_key() {
                    let stamp = objects.group_stamp(key);
                    if let Some(c) = self
                        .services
                        .get_mut(key)
                        .filter(|c| c.stamp == stamp && !all_dirty)
                    {
                        c.pass = pass;
                        continue;
                    }
                    self.compute_service(objects, key, svc, &here, &mut touched);
                }
                let gone: Vec<Key> = self
                    .services
                    .iter()
                    .filter(|(_, c)| c.pass != pass)
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in &gone {
                    self.forget_service(key, &mut touched, &mut delta);
                }
            }
        }
        self.publish(touched, &mut delta);
        self.seen = Some((objects.id(), objects.last_stamp()));
        let mut refused = Refusals::default();
        for ws in self.service_warnings.values() {
            w.list.extend(ws.list.iter().cloned());
            refused.add(&ws.refused);
        }
        delta.removed.sort();
        delta.upserted.sort_by(|a, b| a.key_ref().cmp(&b.key_ref()));
        let last = TableSpec {
            services: std::mem::take(&mut self.last),
            ..TableSpec::default()
        };
        let services = match last.apply(&delta) {
            Ok(t) => t.services,
            // Cannot happen (the cache and `last` hold the same Service ports); if it
            // did, compute everything again rather than send a wrong table.
            Err(e) => {
                log::error!("incremental table computation out of step ({e}); computing every Service again");
                self.services.clear();
                self.claims.clear();
                self.service_warnings.clear();
                self.last.clear();
                self.seen = None;
                return self.compute(objects);
            }
        };
        self.last = services.clone();

        let local_pods = Cached::get_or(
            &mut self.local_pods,
            vec![objects.kind_stamp(Kind::Pod)],
            &mut w,
            |w| local_pods(objects, node_name, w),
        );
        let remote_nodes = Cached::get_or(
            &mut self.remote_nodes,
            vec![objects.kind_stamp(Kind::Node)],
            &mut w,
            |w| remote_nodes(objects, node_name, w),
        );
        let policy = Cached::get_or(
            &mut self.policy,
            vec![
                objects.kind_stamp(Kind::Pod),
                objects.kind_stamp(Kind::Namespace),
                objects.kind_stamp(Kind::NetworkPolicy),
            ],
            &mut w,
            |w| crate::policy::compile(objects, node_name, &mut w.list),
        );

        Ok(Computed {
            tables: TableSpec {
                node: me,
                cluster: self.cluster.clone(),
                services,
                local_pods,
                remote_nodes,
                policy,
            },
            warnings: w.list,
            refused,
        })
    }
}

impl TableComputer {
    /// Computes the entries of Service `key` again and claims their frontends; what it
    /// claimed before and claims now is `touched`, to be published.
    fn compute_service(
        &mut self,
        objects: &Objects,
        key: &Key,
        svc: &Service,
        here: &Here<'_>,
        touched: &mut Touched,
    ) {
        let mut own = Warnings::default();
        let joined = objects.slices_of(key);
        let mut specs: Vec<Arc<ServiceSpec>> = service_specs(svc, &joined, here, &mut own)
            .into_iter()
            .map(Arc::new)
            .collect();
        specs.sort_by(|a, b| a.key_ref().cmp(&b.key_ref()));
        let before = specs.len();
        specs.dedup_by(|a, b| a.key_ref() == b.key_ref());
        if specs.len() < before {
            own.push(
                format!("Service {}/{}", key.0, key.1),
                "two ports with the same name and protocol: only the first is programmed",
            );
        }
        let age = Age::of(svc, key);
        let (old_specs, old_computed) = match self.services.remove(key) {
            Some(c) => {
                self.unclaim(&c.age, &c.computed, touched);
                (c.specs, c.computed)
            }
            None => (Vec::new(), Vec::new()),
        };
        share_equal(&old_computed, &mut specs);
        self.claim(&age, &specs, touched);
        touched.services.insert(key.clone());
        self.services.insert(
            key.clone(),
            CachedService {
                stamp: objects.group_stamp(key),
                pass: self.pass,
                age,
                computed: specs,
                warnings: own,
                specs: old_specs,
            },
        );
    }

    /// Drops Service `key`, gone from the store, and what it claimed.
    fn forget_service(
        &mut self,
        key: &Key,
        touched: &mut Touched,
        delta: &mut nat::spec::TableDelta,
    ) {
        if let Some(c) = self.services.remove(key) {
            self.unclaim(&c.age, &c.computed, touched);
            delta.removed.extend(c.specs.iter().map(|s| s.key()));
        }
        self.service_warnings.remove(key);
    }

    fn claim(&mut self, age: &Age, specs: &[Arc<ServiceSpec>], touched: &mut Touched) {
        for s in specs {
            for f in &s.frontends {
                let claim = (f.ip, f.port, s.protocol);
                self.claims
                    .entry(claim)
                    .or_default()
                    .insert((age.clone(), s.name.clone()), f.kind);
                touched.claims.insert(claim);
            }
        }
    }

    fn unclaim(&mut self, age: &Age, specs: &[Arc<ServiceSpec>], touched: &mut Touched) {
        for s in specs {
            for f in &s.frontends {
                let claim = (f.ip, f.port, s.protocol);
                if let Some(claimants) = self.claims.get_mut(&claim) {
                    claimants.remove(&(age.clone(), s.name.clone()));
                    if claimants.is_empty() {
                        self.claims.remove(&claim);
                    }
                }
                touched.claims.insert(claim);
            }
        }
    }

    /// Publishes again every Service `touched` names or whose frontends it names: each
    /// keeps the frontends it holds, and records in `delta` how its entries changed.
    fn publish(&mut self, touched: Touched, delta: &mut nat::spec::TableDelta) {
        let mut keys = touched.services;
        for claim in &touched.claims {
            for (age, _) in self.claims.get(claim).into_iter().flat_map(|c| c.keys()) {
                if !keys.contains(&age.key) {
                    keys.insert(age.key.clone());
                }
            }
        }
        for key in keys {
            let Some(c) = self.services.get_mut(&key) else {
                continue;
            };
            let mut w = c.warnings.clone();
            let object = format!("Service {}/{}", key.0, key.1);
            let mut specs = held(&c.computed, &c.age, &self.claims, &object, &mut w);
            diff_specs(&c.specs, &mut specs, delta);
            c.specs = specs;
            if w.list.is_empty() {
                self.service_warnings.remove(&key);
            } else {
                self.service_warnings.insert(key, w);
            }
        }
    }
}

/// The Service ports of `computed` (all of one Service, of age `age`) as they are
/// published: each without the frontends an older claimant holds (warned about, and
/// counted), and listing the claimants refused the frontends it holds; a port left
/// without frontends is left out.
fn held(
    computed: &[Arc<ServiceSpec>],
    age: &Age,
    claims: &HashMap<Claim, BTreeMap<Claimant, FrontendKind>>,
    object: &str,
    w: &mut Warnings,
) -> Vec<Arc<ServiceSpec>> {
    let mut out = Vec::with_capacity(computed.len());
    for s in computed {
        let mut kept = Vec::with_capacity(s.frontends.len());
        let mut refused = Vec::new();
        for f in &s.frontends {
            let Some(claimants) = claims.get(&(f.ip, f.port, s.protocol)) else {
                // Not claimed (cannot happen: each computed port claims its frontends).
                kept.push(*f);
                continue;
            };
            let mine = |(a, name): &Claimant| a == age && *name == s.name;
            match claimants.iter().next() {
                Some((holder, _)) if !mine(holder) => {
                    w.refuse(
                        Refusal::Taken,
                        object.to_string(),
                        format!(
                            "port {}: {:?} {} {:?} is also claimed by Service port {}, whose Service is older (creationTimestamp, then name): left to it",
                            port_name(&s.name),
                            f.kind,
                            std::net::SocketAddr::new(f.ip, f.port),
                            s.protocol,
                            holder.1
                        ),
                    );
                }
                _ => {
                    kept.push(*f);
                    refused.extend(claimants.iter().filter(|(c, _)| !mine(c)).map(
                        |((_, name), kind)| RefusedFrontend {
                            service: name.clone(),
                            frontend: FrontendSpec { kind: *kind, ..*f },
                        },
                    ));
                }
            }
        }
        if kept.len() == s.frontends.len() && refused.is_empty() {
            out.push(Arc::clone(s));
        } else if !kept.is_empty() {
            let mut p = ServiceSpec::clone(s);
            p.frontends = kept;
            p.refused = refused;
            out.push(Arc::new(p));
        }
    }
    out
}

/// The port name of a Service port's name (`namespace/name:port`), quoted.
fn port_name(spec_name: &str) -> String {
    format!("{:?}", spec_name.rsplit_once(':').map_or("", |(_, p)| p))
}

/// Replaces each entry of `new` equal to one of `old` (both in canonical order) by the
/// old `Arc`, so that it stays shared.
fn share_equal(old: &[Arc<ServiceSpec>], new: &mut [Arc<ServiceSpec>]) {
    for n in new.iter_mut() {
        if let Ok(i) = old.binary_search_by(|o| o.key_ref().cmp(&n.key_ref())) {
            if old[i] == *n {
                *n = Arc::clone(&old[i]);
            }
        }
    }
}

/// Records in `delta` how one Service's entries went from `old` to `new` (both in
/// canonical order); an entry equal to its old one is replaced by the old `Arc`, so that
/// it stays shared.
fn diff_specs(
    old: &[Arc<ServiceSpec>],
    new: &mut [Arc<ServiceSpec>],
    delta: &mut nat::spec::TableDelta,
) {
    for n in new.iter_mut() {
        match old.binary_search_by(|o| o.key_ref().cmp(&n.key_ref())) {
            Ok(i) if old[i] == *n => *n = old[i].clone(),
            _ => delta.upserted.push(n.clone()),
        }
    }
    for o in old {
        if new
            .binary_search_by(|n| n.key_ref().cmp(&o.key_ref()))
            .is_err()
        {
            delta.removed.push(o.key());
        }
    }
}

/// Other nodes with pod networks, for routes through the overlay.
fn remote_nodes(objects: &Objects, node_name: &str, w: &mut Warnings) -> Vec<RemoteNodeSpec> {
    let mut remote_nodes = Vec::new();
    for n in objects.nodes() {
        let name = n.metadata.name.as_deref().unwrap_or("");
        if name == node_name {
            continue;
        }
        let spec = node_spec(name, n, w);
        if spec.pod_cidrs.is_empty() {
            continue;
        }
        let Some(vtep_ip) = spec.vtep_ip else {
            w.push(
                format!("Node {name}"),
                "no flannel public-ip annotation and no IPv4 InternalIP: its pods are unreachable through the overlay",
            );
            continue;
        };
        let vtep_mac = spec.vtep_mac.unwrap_or_else(|| {
            w.push(
                format!("Node {name}"),
                "no VtepMAC in the flannel backend-data annotation: listed with MAC 00:00:00:00:00:00, which a flannel VXLAN device drops; start flannel on it or annotate it",
            );
            [0; 6]
        });
        remote_nodes.push(RemoteNodeSpec {
            name: name.to_string(),
            pod_cidrs: spec.pod_cidrs,
            vtep_ip,
            vtep_mac,
        });
    }
    remote_nodes
}

/// Computes the tables of the node `node_name`; warnings go to the log.
pub fn compute(
    objects: &Objects,
    node_name: &str,
    cluster: &ClusterSpec,
) -> Result<TableSpec, TableError> {
    let computed = compute_with_warnings(objects, node_name, cluster)?;
    for w in &computed.warnings {
        log::warn!("{w}");
    }
    Ok(computed.tables)
}

/// Warnings as a computation collects them, with the refusals among them counted.
#[derive(Clone, Default)]
struct Warnings {
    list: Vec<Warning>,
    refused: Refusals,
}

/// Why a Service address was refused (see [`Refusals`]).
#[derive(Clone, Copy)]
enum Refusal {
    Taken,
    OutsideServiceRanges,
    InvalidClusterIp,
}

impl Warnings {
    fn push(&mut self, object: String, message: impl Into<String>) {
        self.list.push(Warning {
            object,
            message: message.into(),
        });
    }

    /// A warning about a refused Service address, counted.
    fn refuse(&mut self, why: Refusal, object: String, message: impl Into<String>) {
        let n = match why {
            Refusal::Taken => &mut self.refused.taken,
            Refusal::OutsideServiceRanges => &mut self.refused.outside_service_ranges,
            Refusal::InvalidClusterIp => &mut self.refused.invalid_cluster_ip,
        };
        *n += 1;
        self.push(object, message);
    }
}

/// What the computation needs to know about the node it runs for.
struct Here<'a> {
    node_name: &'a str,
    zone: Option<&'a str>,
    node_addresses: &'a [IpAddr],
    /// The node's primary address of each family (IPv4, IPv6), kube-proxy's `nodeIP`.
    primary_ips: [Option<IpAddr>; 2],
    /// The cluster's Service ClusterIP ranges.
    service_cidrs: &'a [IpNet],
}

/// kube-proxy's node IP of each family (IPv4, IPv6), as `GetNodeHostIPs` finds it: the
/// first InternalIP of the family, else the first ExternalIP.
fn primary_ips(node: &Node) -> [Option<IpAddr>; 2] {
    let addresses: Vec<(&str, IpAddr)> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| Some((a.type_.as_str(), a.address.parse().ok()?)))
        .collect();
    let first = |v6: bool| {
        ["InternalIP", "ExternalIP"].iter().find_map(|ty| {
            addresses
                .iter()
                .find(|(t, ip)| t == ty && ip.is_ipv6() == v6)
                .map(|(_, ip)| *ip)
        })
    };
    [first(false), first(true)]
}

fn vtep_mac(data: &str) -> Option<[u8; 6]> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    parse_mac(v.get("VtepMAC")?.as_str()?)
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

fn node_spec(name: &str, node: &Node, w: &mut Warnings) -> NodeSpec {
    let object = || format!("Node {name}");
    let mut addresses = Vec::new();
    let mut internal = Vec::new();
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
    {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) => {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
                if a.type_ == "InternalIP" {
                    internal.push(ip);
                }
            }
            Err(_) => w.push(
                object(),
                format!("{} {:?} is not an IP address; ignored", a.type_, a.address),
            ),
        }
    }
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    if let Some(spec) = &node.spec {
        // podCIDRs[0] is podCIDR; an object written with only one of them still counts.
        let all = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
        for c in all {
            match c.parse::<IpNet>() {
                Ok(net) => {
                    let net = net.trunc();
                    if !pod_cidrs.contains(&net) {
                        pod_cidrs.push(net);
                    }
                }
                Err(_) => w.push(object(), format!("pod CIDR {c:?} is not a CIDR; ignored")),
            }
        }
    }
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let ann = node.metadata.annotations.as_ref();
    let mut annotated_ip = |key: &str| {
        let s = ann.and_then(|a| a.get(key))?;
        match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                w.push(
                    object(),
                    format!("{key} {s:?} is not an IP address; ignored"),
                );
                None
            }
        }
    };
    let vtep_ip = annotated_ip(KXDP_VTEP_IP)
        .or_else(|| annotated_ip(FLANNEL_PUBLIC_IP))
        .or_else(|| internal.iter().copied().find(IpAddr::is_ipv4));
    let kxdp_mac = ann.and_then(|a| a.get(KXDP_VTEP_MAC)).and_then(|s| {
        let mac = parse_mac(s);
        if mac.is_none() {
            w.push(
                object(),
                format!("{KXDP_VTEP_MAC} {s:?} is not a MAC address; ignored"),
            );
        }
        mac
    });
    let vtep_mac = kxdp_mac.or_else(|| {
        ann.and_then(|a| a.get(FLANNEL_BACKEND_DATA))
            .and_then(|d| vtep_mac(d))
    });
    NodeSpec {
        name: name.to_string(),
        addresses,
        pod_cidrs,
        zone,
        vtep_ip,
        vtep_mac,
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in status.pod_ips.iter().flatten().map(|p| &p.ip) {
        if let Ok(ip) = ip.parse() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_ref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// Pods with their network on this node: scheduled here, not host-network, not finished
/// (a Succeeded or Failed pod's address is free for reuse), and with an address.
fn local_pods(objects: &Objects, node_name: &str, w: &mut Warnings) -> Vec<PodSpec> {
    let mut out: Vec<PodSpec> = Vec::new();
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in objects.pods() {
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(node_name) || spec.host_network == Some(true) {
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
        let name = format!("{ns}/{name}");
        for ip in &ips {
            if let Some(other) = owners.insert(*ip, name.clone()) {
                w.push(
                    format!("Pod {name}"),
                    format!(
                        "address {ip} is also Pod {other}'s: traffic to it reaches one of them"
                    ),
                );
            }
        }
        out.push(PodSpec {
            name,
            ips,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        });
    }
    out
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or(crate::defaults::PROTOCOL) {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn family_name(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// `GetClusterIPByFamily`: the Service's ClusterIP of one family, as written.
fn cluster_ip_of_family(spec: &K8sServiceSpec, v6: bool) -> Option<&str> {
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if families.is_empty() {
        let ip = spec.cluster_ip.as_deref()?;
        let is_v6 = ip.parse::<IpAddr>().ok()?.is_ipv6();
        return (is_v6 == v6).then_some(ip);
    }
    let idx = families.iter().position(|f| f == family_name(v6))?;
    spec.cluster_ips.as_deref()?.get(idx).map(String::as_str)
}

/// Addresses of a list, by family; a bad one is a warning.
fn parse_ips<'a>(
    list: impl Iterator<Item = &'a str>,
    what: &str,
    object: &str,
    w: &mut Warnings,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in list {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => w.push(
                object.to_string(),
                format!("{what} {s:?} is not an IP address; ignored"),
            ),
        }
    }
    out
}

fn service_specs(
    svc: &Service,
    slices: &[&EndpointSlice],
    here: &Here<'_>,
    w: &mut Warnings,
) -> Vec<ServiceSpec> {
    let (ns, name) = namespace_and_name(&svc.metadata);
    let object = format!("Service {ns}/{name}");
    if [ns, name].iter().any(|s| s.contains(['/', ':'])) {
        // The API server never lets these through; a Service port's name
        // (`namespace/name:port`) would not say which Service it is.
        w.push(
            object,
            "a namespace or name with '/' or ':' is not valid; skipped",
        );
        return Vec::new();
    }
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        return Vec::new();
    }
    // ShouldSkipService: headless, or no ClusterIP at all.
    match spec.cluster_ip.as_deref() {
        Some("None") => return Vec::new(),
        None | Some("") => {
            w.push(
                object,
                "no clusterIP: the API server would allocate one; write it in the manifest (clusterIP: None for a headless Service)",
            );
            return Vec::new();
        }
        Some(_) => {}
    }
    // A ClusterIP that is no address at all may belong to no family: said here, whatever
    // `ipFamilies` says.
    let written = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips,
        _ => spec.cluster_ip.as_slice(),
    };
    for s in written.iter().filter(|s| s.parse::<IpAddr>().is_err()) {
        w.refuse(
            Refusal::InvalidClusterIp,
            object.clone(),
            format!("clusterIP {s:?} is not an IP address; not programmed"),
        );
    }
    let mut families: Vec<(bool, IpAddr)> = Vec::new();
    let order = match spec.ip_families.as_deref() {
        Some([first, ..]) if first == "IPv6" => [true, false],
        _ => [false, true],
    };
    for v6 in order {
        let Some(s) = cluster_ip_of_family(spec, v6) else {
            continue;
        };
        match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => {
                // The API server allocates ClusterIPs from the Service ranges only; one
                // outside them (8.8.8.8, a node's address) would capture that address for
                // every pod of the node. A family without a range is not judged.
                let ranges = here
                    .service_cidrs
                    .iter()
                    .filter(|n| n.addr().is_ipv6() == v6);
                if ranges.clone().next().is_some() && !ranges.clone().any(|n| n.contains(&ip)) {
                    let all: Vec<String> =
                        here.service_cidrs.iter().map(ToString::to_string).collect();
                    w.refuse(
                        Refusal::OutsideServiceRanges,
                        object.clone(),
                        format!(
                            "clusterIP {ip} is outside the Service ranges ({}): that family is not programmed, so that the address stays the real one for every pod; fix the Service, or kxdp-control's --service-cidr",
                            all.join(", ")
                        ),
                    );
                    continue;
                }
                families.push((v6, ip));
            }
            // Not an address at all: said above.
            Err(_) => {}
            Ok(_) => w.push(
                object.clone(),
                format!(
                    "clusterIP {s:?} is not an {} address; that family is not programmed",
                    family_name(v6)
                ),
            ),
        }
    }

    let external_ips = parse_ips(
        spec.external_ips.iter().flatten().map(String::as_str),
        "externalIP",
        &object,
        w,
    );
    // Only VIP-mode ingress is the node's to capture; in Proxy mode the load balancer
    // delivers to the node itself (proxyutil.IsVIPMode).
    let lb_ips = parse_ips(
        svc.status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter(|i| matches!(i.ip_mode.as_deref(), None | Some("VIP")))
            .filter_map(|i| i.ip.as_deref()),
        "load-balancer ingress ip",
        &object,
        w,
    );
    // ServicePort.LoadBalancerSourceRanges: trimmed (validation lets padding through),
    // each family's for its proxier.
    let mut source_ranges: Vec<IpNet> = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => w.push(
                object.clone(),
                format!("loadBalancerSourceRanges {r:?} is not a CIDR; ignored"),
            ),
        }
    }
    let node_ports = ty == "NodePort" || ty == "LoadBalancer";
    // apiservice.ExternallyAccessible / ExternalPolicyLocal / InternalPolicyLocal.
    let externally_accessible = node_ports
        || (ty == "ClusterIP" && !spec.external_ips.as_deref().unwrap_or_default().is_empty());
    let external_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(crate::defaults::AFFINITY_TIMEOUT_S);
        let clamped = t.clamp(1, MAX_AFFINITY_TIMEOUT_S as i32) as u32;
        if clamped as i32 != t {
            w.push(
                object.clone(),
                format!("sessionAffinity timeout {t}s is outside 1..={MAX_AFFINITY_TIMEOUT_S}; using {clamped}s"),
            );
        }
        Some(clamped)
    } else {
        None
    };

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("");
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            w.push(
                object.clone(),
                format!(
                    "port {port_name:?}: protocol {:?} is not TCP, UDP or SCTP; skipped",
                    port.protocol.as_deref().unwrap_or("")
                ),
            );
            continue;
        };
        let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            w.push(
                object.clone(),
                format!(
                    "port {port_name:?}: {} is not a port number; skipped",
                    port.port
                ),
            );
            continue;
        };
        let node_port = match port.node_port.unwrap_or(0) {
            0 => {
                if ty == "NodePort" {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: type NodePort without nodePort: the API server would allocate one; write it in the manifest"),
                    );
                }
                None
            }
            n => match u16::try_from(n) {
                Ok(n) if node_ports => Some(n),
                Ok(_) => {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: nodePort on a Service of type {ty} is ignored (only NodePort and LoadBalancer have one)"),
                    );
                    None
                }
                Err(_) => {
                    w.push(
                        object.clone(),
                        format!("port {port_name:?}: nodePort {n} is not a port number; ignored"),
                    );
                    None
                }
            },
        };
        for &(v6, cluster_ip) in &families {
            let fam = |ip: &&IpAddr| ip.is_ipv6() == v6;
            let mut frontends = vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: cluster_ip,
                port: svc_port,
            }];
            let at = |kind, ip: &IpAddr| FrontendSpec {
                kind,
                ip: *ip,
                port: svc_port,
            };
            frontends.extend(
                external_ips
                    .iter()
                    .filter(fam)
                    .map(|ip| at(FrontendKind::ExternalIp, ip)),
            );
            frontends.extend(
                lb_ips
                    .iter()
                    .filter(fam)
                    .map(|ip| at(FrontendKind::LoadBalancer, ip)),
            );
            if let Some(np) = node_port {
                frontends.extend(
                    here.node_addresses
                        .iter()
                        .filter(fam)
                        .map(|ip| FrontendSpec {
                            kind: FrontendKind::NodePort,
                            ip: *ip,
                            port: np,
                        }),
                );
            }
            // kube-proxy's firewall chain: only for load-balancer IPs of the family, and
            // the LB IPs are allowed sources too when a range holds the node's IP (a
            // node reaching its own VIP loops back from the VIP).
            let mut lb_source_ranges: Vec<IpNet> = Vec::new();
            let family_lb_ips: Vec<IpAddr> = lb_ips.iter().copied().filter(|ip| fam(&ip)).collect();
            if !family_lb_ips.is_empty() {
                lb_source_ranges.extend(source_ranges.iter().filter(|n| n.addr().is_ipv6() == v6));
                let node_ip = here.primary_ips[v6 as usize];
                if node_ip.is_some_and(|ip| lb_source_ranges.iter().any(|n| n.contains(&ip))) {
                    lb_source_ranges.extend(family_lb_ips.iter().map(|&ip| IpNet::from(ip)));
                }
            }
            let eps = endpoints_for(slices, port, proto, v6, here.node_name, &object, w);
            let (cluster, local) = categorize(&eps, here.node_name, here.zone);
            out.push(ServiceSpec {
                name: format!("{ns}/{name}:{port_name}"),
                protocol: proto,
                frontends,
                cluster_endpoints: cluster,
                local_endpoints: local,
                all_endpoints: eps.iter().map(|e| e.spec.clone()).collect(),
                internal_local,
                external_local,
                affinity_timeout_s: affinity,
                lb_source_ranges,
                refused: Vec::new(),
            });
        }
    }
    out
}

/// One endpoint of a Service port after defaulting, before categorisation.
#[derive(Clone, Debug)]
struct Ep {
    spec: EndpointSpec,
    /// `hints.forZones`; empty means no hint.
    zones: BTreeSet<String>,
    /// `hints.forNodes`; empty means no hint.
    nodes: BTreeSet<String>,
}

/// The endpoints of one Service port and family, joined over its slices
/// (endpointslicecache.go `endpointInfoByServicePort` and `addEndpoints`).
fn endpoints_for(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    proto: Protocol,
    v6: bool,
    node_name: &str,
    object: &str,
    w: &mut Warnings,
) -> Vec<Ep> {
    let want_name = port.name.as_deref().unwrap_or("");
    let mut by_addr: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != family_name(v6) {
            continue;
        }
        let slice_name = slice.metadata.name.as_deref().unwrap_or("");
        for target in slice.ports.iter().flatten().filter(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) {
            let Some(target_port) = target
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
            else {
                w.push(
                    object.to_string(),
                    format!("EndpointSlice {slice_name} port {want_name:?} has no valid port number; its endpoints are not used for it"),
                );
                continue;
            };
            for e in slice.endpoints.iter().flatten() {
                // kube-proxy uses an endpoint's first address only.
                let Some(first) = e.addresses.first() else {
                    continue;
                };
                let ip = match first.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv6() == v6 => ip,
                    _ => {
                        w.push(
                            object.to_string(),
                            format!("EndpointSlice {slice_name}: {first:?} is not an {} address; endpoint ignored", family_name(v6)),
                        );
                        continue;
                    }
                };
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let hints = e.hints.as_ref();
                let ep = Ep {
                    spec: EndpointSpec {
                        ip,
                        port: target_port,
                        local: !node_name.is_empty() && e.node_name.as_deref() == Some(node_name),
                        ready,
                        serving,
                        terminating,
                    },
                    zones: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    nodes: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                };
                let rank = |e: &Ep| (!e.spec.terminating, e.spec.ready);
                match by_addr.get(&(ip, target_port)) {
                    Some(existing) if rank(existing) >= rank(&ep) => {}
                    _ => {
                        by_addr.insert((ip, target_port), ep);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// The topology kube-proxy applies to cluster endpoints (`topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Hints ignored.
    None,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

fn topology(eps: &[Ep], node_name: &str, zone: Option<&str>) -> Topology {
    let ready: Vec<&Ep> = eps.iter().filter(|e| e.spec.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|e| !e.nodes.is_empty())
        && ready.iter().any(|e| e.nodes.contains(node_name))
    {
        return Topology::SameNode;
    }
    let Some(zone) = zone else {
        return Topology::None;
    };
    if ready.iter().all(|e| !e.zones.is_empty()) && ready.iter().any(|e| e.zones.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::None
}

/// kube-proxy's `CategorizeEndpoints`: (cluster endpoints, local endpoints).
fn categorize(
    eps: &[Ep],
    node_name: &str,
    zone: Option<&str>,
) -> (Vec<EndpointSpec>, Vec<EndpointSpec>) {
    let mode = topology(eps, node_name, zone);
    let available = |e: &Ep| match mode {
        Topology::None => true,
        Topology::SameNode => e.nodes.contains(node_name),
        Topology::SameZone => zone.is_some_and(|z| e.zones.contains(z)),
    };
    let pick = |f: &dyn Fn(&Ep) -> bool| -> Vec<EndpointSpec> {
        eps.iter()
            .filter(|e| f(e))
            .map(|e| e.spec.clone())
            .collect()
    };
    let mut cluster = pick(&|e| e.spec.ready && available(e));
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology only filters when one is ready for us).
        cluster = pick(&|e| e.spec.serving && e.spec.terminating);
    }
    let mut local = pick(&|e| e.spec.local && e.spec.ready);
    if local.is_empty() {
        local = pick(&|e| e.spec.local && e.spec.serving && e.spec.terminating);
    }
    (cluster, local)
}

#[cfg(test)]
mod tests;
