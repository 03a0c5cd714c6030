//! The incremental computation: [`TableComputer`] keeps what it computed per Service, per
//! part (local pods, remote nodes, NetworkPolicy) and per claimed frontend, and computes
//! again only what the store's stamps say changed. It is the one way tables are computed:
//! [`super::compute_with_warnings`] is it with nothing cached.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nat::spec::{
    ClusterSpec, FrontendKind, FrontendSpec, PodSpec, Protocol, RefusedFrontend, RemoteNodeSpec,
    ServiceSpec, TableSpec,
};

use crate::objects::{Kind, Objects};
use crate::warning::Warning;

use super::computed::{Computed, Here, Refusal, Refusals, TableError, Warnings};
use super::node::{local_pods, node_spec, primary_ips, remote_nodes};
use super::service::service_specs;

/// Computes the tables of the node `node_name` from scratch, with the warnings: a
/// [`TableComputer`] with nothing cached, the one computation there is.
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
