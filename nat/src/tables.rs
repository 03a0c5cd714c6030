//! Service tables compiled from a [`TableSpec`]: frontend lookup, endpoint choice by traffic
//! policy and Maglev, and kube-proxy's masquerade rules.
//!
//! A [`ServiceTable`] is immutable once built; the dataplane swaps a whole new one in when
//! control sends a table, so workers read it without locks. A new table is either compiled
//! whole ([`ServiceTable::build_with`]) or derived from the one in use and a
//! [`TableDelta`] ([`ServiceTable::updated`]): then only the Service ports the delta names
//! are compiled (their Maglev rings built), the rest are shared with the old table, and
//! every Service port keeps its id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::maglev::{MaglevRing, DEFAULT_RING_SIZE};
use crate::spec::{
    DeltaError, EndpointSpec, FrontendKind, MergeStep, Protocol, ServiceSpec, TableDelta, TableSpec,
};

/// A frontend's lookup key: destination address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// What a frontend lookup finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRef {
    /// Dense service id (index into the table's services; 0 is never used).
    pub service: u32,
    /// The kind of address that matched.
    pub kind: FrontendKind,
}

/// One backend of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Endpoint address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// On this node.
    pub local: bool,
}

/// Backends for one traffic policy and their Maglev ring.
#[derive(Clone, Debug, Default)]
pub struct BackendSet {
    /// The backends, in the order control sent them.
    pub backends: Vec<Backend>,
    ring: Option<std::sync::Arc<MaglevRing>>,
}

/// Maglev ring sizes for the scaled mode: primes roughly doubling. A Service port gets the
/// smallest one that holds at least [`SLOTS_PER_BACKEND`] slots per backend, up to the
/// configured maximum.
///
/// The default is one fixed size for every Service (Maglev's paper), which costs 32 KiB
/// per Service port at 16381 slots: 3.2 GiB for 100k. The scaled mode keeps a 3-backend
/// Service at 509 slots (1 KiB). Its consistency holds within a rung: adding or removing
/// a backend moves only its own share of new flows unless the count crosses a rung, when
/// new flows are spread afresh (established flows keep their backend through conntrack
/// either way).
pub const RING_LADDER: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
/// Ring slots per backend at least (Maglev's paper keeps M ≥ 100 N for ≤ 1% imbalance).
pub const SLOTS_PER_BACKEND: u32 = 100;

/// The ring size for `backends` backends, at most `max`.
pub fn ring_size_for(backends: usize, max: u32) -> u32 {
    let want = (backends as u32).saturating_mul(SLOTS_PER_BACKEND);
    RING_LADDER
        .iter()
        .copied()
        .find(|&p| p >= want && p <= max)
        .unwrap_or(max)
}

impl BackendSet {
    fn build(endpoints: &[EndpointSpec], ring_size: u32, scaled: bool) -> BackendSet {
        let mut backends: Vec<Backend> = endpoints
            .iter()
            .map(|e| Backend {
                ip: e.ip,
                port: e.port,
                local: e.local,
            })
            .collect();
        // Maglev's fill is order-dependent: sort so that every node (two gateways behind
        // ECMP) builds the same ring from the same set, whatever order it was listed in.
        backends.sort_by_key(|b| (b.ip, b.port));
        let ring = if backends.len() > 1 {
            let keys: Vec<String> = backends
                .iter()
                .map(|b| format!("{}:{}", b.ip, b.port))
                .collect();
            let size = if scaled {
                ring_size_for(backends.len(), ring_size)
            } else {
                ring_size
            };
            MaglevRing::build(&keys, size).map(std::sync::Arc::new)
        } else {
            None
        };
        BackendSet { backends, ring }
    }

    /// The backend Maglev gives a flow hash, or `None` without backends.
    #[inline]
    pub fn pick(&self, hash: u64) -> Option<Backend> {
        match (&self.ring, self.backends.first()) {
            (Some(ring), _) => self.backends.get(ring.pick(hash)).copied(),
            (None, first) => first.copied(),
        }
    }

    /// The Maglev ring, when there are two or more backends.
    pub fn ring(&self) -> Option<&MaglevRing> {
        self.ring.as_deref()
    }
}

/// One compiled (Service, port, family).
#[derive(Clone, Debug)]
pub struct Service {
    /// `namespace/name:port`.
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Backends under policy Cluster.
    pub cluster: BackendSet,
    /// Backends under policy Local.
    pub local: BackendSet,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// Every endpoint the slices list, whatever their state.
    pub all_endpoints: Vec<Backend>,
    /// The endpoints that are serving (ready, or terminating but still serving): UDP
    /// flows to any other are retired so their next datagram picks a live endpoint.
    pub serving_endpoints: Vec<Backend>,
    /// Stable key of this Service port in the affinity table.
    pub affinity_key: u64,
    /// Who may open connections to the load-balancer frontends; empty: anyone
    /// ([`ServiceSpec::lb_source_ranges`]).
    pub lb_source_ranges: Vec<IpNet>,
}

/// What to do with the first packet of a connection to a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send it to `backend`; `masquerade` says whether the source is rewritten to the node.
    Translate {
        /// The chosen backend.
        backend: Backend,
        /// SNAT the source, as kube-proxy's KUBE-MARK-MASQ would.
        masquerade: bool,
    },
    /// No usable endpoint at all: tell the client (ICMP port unreachable / TCP RST).
    Reject,
    /// Endpoints exist, but none for this traffic under a `Local` policy: drop silently.
    Drop,
    /// A load-balancer frontend and a source outside its `loadBalancerSourceRanges`:
    /// dropped silently, as kube-proxy's firewall chain does.
    SourceFiltered,
}

/// Where the first packet of a connection comes from, as kube-proxy classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A pod (source inside the cluster CIDRs).
    Pod,
    /// A host-network process on this node (source is one of the node's addresses).
    Node,
    /// Anything else: outside the cluster.
    External,
}

/// The compiled Service tables of one node.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    frontends: HashMap<FrontendKey, FrontendRef, BuildFastHasher>,
    /// External frontend addresses (NodePort, LoadBalancer, externalIP), with the number
    /// of frontends at each.
    frontend_ips: HashMap<IpAddr, u32, BuildFastHasher>,
    /// ClusterIPs, with the number of Service ports at each: kube-proxy rejects what
    /// reaches one on a port or protocol none of them serves.
    cluster_ips: HashMap<IpAddr, u32, BuildFastHasher>,
    /// By dense id; id 0, and the ids of removed Service ports until they are reused, hold
    /// a placeholder without a name.
    services: Vec<Arc<Service>>,
    /// The id of each Service port of the spec this table was compiled from, in the spec's
    /// order.
    order: Vec<u32>,
    /// Ids of removed Service ports, free for new ones.
    free: Vec<u32>,
    /// Frontends that more than one Service port claims: the first in the spec's order
    /// holds each (two Services with the same external IP and port; the API server
    /// prevents it for ClusterIPs and NodePorts).
    contested: usize,
    /// Service ClusterIP ranges.
    pub service_cidrs: Vec<IpNet>,
    /// Pod networks of the cluster.
    pub cluster_cidrs: Vec<IpNet>,
    /// The node's own addresses.
    pub node_addresses: Vec<IpAddr>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// flannel's `--ip-masq`: pods reaching addresses outside the pod networks are
    /// masqueraded, also when a Service sent them there.
    pub ip_masq: bool,
}

/// The placeholder at id 0 and at free ids.
fn placeholder_arc() -> Arc<Service> {
    static PLACEHOLDER: std::sync::OnceLock<Arc<Service>> = std::sync::OnceLock::new();
    PLACEHOLDER.get_or_init(|| Arc::new(placeholder())).clone()
}

impl ServiceTable {
    /// Compiles `spec` with Maglev rings of `ring_size` slots for every Service port (the
    /// paper's Maglev: a backend change moves only its own share of flows).
    pub fn build(spec: &TableSpec, ring_size: u32) -> ServiceTable {
        ServiceTable::build_with(spec, ring_size, false)
    }

    /// Compiles `spec`; with `scaled`, each ring is sized from [`RING_LADDER`] by its
    /// backend count, at most `ring_size` (for very many Services; see [`ring_size_for`]).
    pub fn build_with(spec: &TableSpec, ring_size: u32, scaled: bool) -> ServiceTable {
        let mut t = ServiceTable {
            frontends: HashMap::with_hasher(BuildFastHasher),
            frontend_ips: HashMap::with_hasher(BuildFastHasher),
            cluster_ips: HashMap::with_hasher(BuildFastHasher),
            // Id 0 means "unset"; keep a placeholder there.
            services: vec![placeholder_arc()],
            order: Vec::with_capacity(spec.services.len()),
            free: Vec::new(),
            contested: 0,
            service_cidrs: spec.cluster.service_cidrs.clone(),
            cluster_cidrs: spec.cluster.cluster_cidrs.clone(),
            node_addresses: spec.node.addresses.clone(),
            masquerade_all: spec.cluster.masquerade_all,
            ip_masq: spec.cluster.ip_masq,
        };
        for s in &spec.services {
            let id = t.services.len() as u32;
            t.services.push(Arc::new(compile(s, ring_size, scaled)));
            t.order.push(id);
            t.count_frontend_ips(s, true);
            t.claim(id, s);
        }
        t
    }

    /// The table for `new`, which is `old` (the spec this table was compiled from) with
    /// `delta` applied and has the same node and cluster settings: the Service ports the
    /// delta removes are dropped, those it upserts compiled, every other one shared with
    /// this table. Ids stay: a replaced Service port keeps its own, a new one takes a free
    /// id (ids removed by this same delta are free only for later ones) or the next.
    pub fn updated(
        &self,
        old: &TableSpec,
        delta: &TableDelta,
        new: &TableSpec,
        ring_size: u32,
        scaled: bool,
    ) -> Result<ServiceTable, DeltaError> {
        let mut t = ServiceTable {
            frontends: self.frontends.clone(),
            frontend_ips: self.frontend_ips.clone(),
            cluster_ips: self.cluster_ips.clone(),
            services: self.services.clone(),
            order: Vec::with_capacity(new.services.len()),
            free: self.free.clone(),
            contested: self.contested,
            service_cidrs: self.service_cidrs.clone(),
            cluster_cidrs: self.cluster_cidrs.clone(),
            node_addresses: self.node_addresses.clone(),
            masquerade_all: self.masquerade_all,
            ip_masq: self.ip_masq,
        };
        let mut freed = Vec::new();
        let mut clash = false;
        old.merge_services(delta, |step| match step {
            MergeStep::Kept(i) => t.order.push(self.order[i]),
            MergeStep::Removed(i) => {
                let id = self.order[i];
                t.unclaim(id, &old.services[i]);
                t.services[id as usize] = placeholder_arc();
                freed.push(id);
            }
            MergeStep::Replaced(i, s) => {
                let id = self.order[i];
                t.unclaim(id, &old.services[i]);
                t.services[id as usize] = Arc::new(compile(s, ring_size, scaled));
                t.count_frontend_ips(s, true);
                clash |= !t.claim(id, s);
                t.order.push(id);
            }
            MergeStep::Added(s) => {
                let compiled = Arc::new(compile(s, ring_size, scaled));
                let id = match t.free.pop() {
                    Some(id) => {
                        t.services[id as usize] = compiled;
                        id
                    }
                    None => {
                        t.services.push(compiled);
                        (t.services.len() - 1) as u32
                    }
                };
                t.count_frontend_ips(s, true);
                clash |= !t.claim(id, s);
                t.order.push(id);
            }
        })?;
        t.free.extend(freed);
        if clash || self.contested > 0 {
            // Who holds a contested frontend depends on the order of every claimant:
            // claim them all again in the spec's order.
            t.frontends.clear();
            t.contested = 0;
            let order = std::mem::take(&mut t.order);
            for (s, &id) in new.services.iter().zip(&order) {
                t.claim(id, s);
            }
            t.order = order;
        }
        Ok(t)
    }

    /// Claims `s`'s frontends for `id`; `false` if one is another Service port's already
    /// (it keeps it, and the claim is counted as contested).
    fn claim(&mut self, id: u32, s: &ServiceSpec) -> bool {
        let mut all = true;
        for f in &s.frontends {
            let key = FrontendKey {
                ip: f.ip,
                port: f.port,
                protocol: s.protocol,
            };
            match self.frontends.entry(key) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(FrontendRef {
                        service: id,
                        kind: f.kind,
                    });
                }
                std::collections::hash_map::Entry::Occupied(e) => {
                    if e.get().service != id {
                        self.contested += 1;
                        all = false;
                    }
                }
            }
        }
        all
    }

    /// Gives up the frontends of `s` that `id` holds.
    fn unclaim(&mut self, id: u32, s: &ServiceSpec) {
        for f in &s.frontends {
            let key = FrontendKey {
                ip: f.ip,
                port: f.port,
                protocol: s.protocol,
            };
            if self.frontends.get(&key).is_some_and(|r| r.service == id) {
                self.frontends.remove(&key);
            }
        }
        self.count_frontend_ips(s, false);
    }

    fn count_frontend_ips(&mut self, s: &ServiceSpec, add: bool) {
        for f in &s.frontends {
            let ips = if f.kind.is_external() {
                &mut self.frontend_ips
            } else {
                &mut self.cluster_ips
            };
            if add {
                *ips.entry(f.ip).or_insert(0) += 1;
            } else if let Some(n) = ips.get_mut(&f.ip) {
                *n -= 1;
                if *n == 0 {
                    ips.remove(&f.ip);
                }
            }
        }
    }

    /// The id of each Service port of the spec this table was compiled from, in its order.
    pub fn ids(&self) -> &[u32] {
        &self.order
    }

    /// Compiles `spec` with the default ring size.
    pub fn from_spec(spec: &TableSpec) -> ServiceTable {
        ServiceTable::build(spec, DEFAULT_RING_SIZE)
    }

    /// The frontend at a destination, if any.
    #[inline]
    pub fn frontend(&self, key: &FrontendKey) -> Option<FrontendRef> {
        self.frontends.get(key).copied()
    }

    /// Brings in the lines the decisions of a burst's new connections will read
    /// (`keys[i]` the frontend, `hashes[i]` the flow hash), one level at a time for all of
    /// them: the frontend map's entries, each Service's place and the Service, its two
    /// Maglev rings' headers, the slots the hashes fall on, and the backends they name. A
    /// decision reads these one after the other, each address taken from the line before,
    /// so one decision's misses never overlap; staged over a burst, each level's do.
    /// Returns a value folded from what was read, for the caller's `black_box`.
    pub fn warm(&self, keys: &[FrontendKey], hashes: &[u64]) -> u64 {
        const MAX: usize = 64;
        let n = keys.len().min(hashes.len()).min(MAX);
        let mut ids = [0u32; MAX];
        for (id, k) in ids.iter_mut().zip(&keys[..n]) {
            *id = self.frontends.get(k).map_or(0, |f| f.service);
        }
        let mut services: [Option<&Service>; MAX] = [None; MAX];
        for (s, id) in services.iter_mut().zip(&ids[..n]) {
            *s = self.services.get(*id as usize).map(Arc::as_ref);
        }
        let mut sets: [[Option<&BackendSet>; 2]; MAX] = [[None; 2]; MAX];
        let mut rings: [[Option<&MaglevRing>; 2]; MAX] = [[None; 2]; MAX];
        for ((set, ring), s) in sets.iter_mut().zip(rings.iter_mut()).zip(&services[..n]) {
            if let Some(s) = s {
                *set = [Some(&s.cluster), Some(&s.local)];
                *ring = [s.cluster.ring(), s.local.ring()];
            }
        }
        let mut folded = 0u64;
        for ring in rings[..n].iter().flatten().flatten() {
            folded ^= ring.len() as u64;
        }
        let mut picks = [[0usize; 2]; MAX];
        for ((pick, ring), hash) in picks.iter_mut().zip(&rings[..n]).zip(&hashes[..n]) {
            for (p, r) in pick.iter_mut().zip(ring) {
                *p = r.map_or(0, |r| r.pick(*hash));
            }
        }
        for (set, pick) in sets[..n].iter().zip(&picks[..n]) {
            for (s, p) in set.iter().zip(pick) {
                if let Some(b) = s.and_then(|s| s.backends.get(*p)) {
                    folded ^= u64::from(b.port);
                }
            }
        }
        folded
    }

    /// Whether `ip` is a NodePort, LoadBalancer or external IP frontend address (the
    /// uplink answers ARP for these; ClusterIPs are not reachable from outside).
    pub fn is_frontend_ip(&self, ip: IpAddr) -> bool {
        self.frontend_ips.contains_key(&ip)
    }

    /// The service with a dense id.
    #[inline]
    pub fn service(&self, id: u32) -> Option<&Service> {
        if id == 0 {
            return None;
        }
        self.services
            .get(id as usize)
            .map(Arc::as_ref)
            .filter(|s| !s.name.is_empty())
    }

    /// Every Service port with its id, in id order.
    pub fn services(&self) -> impl Iterator<Item = (u32, &Service)> {
        self.services
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, s)| !s.name.is_empty())
            .map(|(i, s)| (i as u32, s.as_ref()))
    }

    /// Frontends claimed by more than one Service port.
    pub fn contested(&self) -> usize {
        self.contested
    }

    /// Whether `ip` is some Service port's ClusterIP. Traffic to it that no frontend takes
    /// (another port or protocol) is rejected, as kube-proxy's nftables `cluster-ips` set
    /// does ("Reject traffic to invalid ports of ClusterIPs"), wherever the address lies.
    pub fn is_cluster_ip(&self, ip: IpAddr) -> bool {
        self.cluster_ips.contains_key(&ip)
    }

    /// Whether `ip` lies in the Service range (then an unknown address there is dropped).
    pub fn in_service_range(&self, ip: IpAddr) -> bool {
        self.service_cidrs.iter().any(|n| net_contains(n, ip))
    }

    /// Whether `ip` is in the cluster's pod networks (any node's).
    pub fn in_cluster_network(&self, ip: IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|n| net_contains(n, ip))
    }

    /// How kube-proxy classifies a client address.
    pub fn origin(&self, src: IpAddr) -> Origin {
        if self.node_addresses.contains(&src) {
            Origin::Node
        } else if self.in_cluster_network(src) {
            Origin::Pod
        } else {
            Origin::External
        }
    }

    /// kube-proxy's decision for a new connection from `src` to frontend `f`, with `hash`
    /// the flow hash Maglev uses.
    pub fn decide(&self, f: FrontendRef, src: IpAddr, hash: u64) -> Decision {
        self.decide_with_affinity(f, src, hash, None, 0)
    }

    /// [`ServiceTable::decide`] honouring `sessionAffinity: ClientIP`: a client goes back
    /// to the backend it last reached while that backend is still usable and the timeout
    /// (counted from its last new connection, as kube-proxy's `recent` match does) has not
    /// run out. `now` is in nanoseconds.
    pub fn decide_with_affinity(
        &self,
        f: FrontendRef,
        src: IpAddr,
        hash: u64,
        affinity: Option<&crate::affinity::AffinityTable>,
        now: u64,
    ) -> Decision {
        let Some(svc) = self.service(f.service) else {
            return Decision::Drop;
        };
        let origin = self.origin(src);
        // kube-proxy's firewall check (loadBalancerSourceRanges) runs before DNAT and
        // before the no-endpoint reject, for every client, pods included; only this node's
        // own processes meet the reject first (nftables' filter-output jumps to the
        // endpoints check before the firewall check).
        let rejected_first = origin == Origin::Node && svc.cluster.backends.is_empty();
        if f.kind == FrontendKind::LoadBalancer
            && !svc.lb_source_ranges.is_empty()
            && !svc.lb_source_ranges.iter().any(|n| net_contains(n, src))
            && !rejected_first
        {
            return Decision::SourceFiltered;
        }
        // Which endpoint set, and whether the policy itself asks for masquerade.
        // (endpoints, whether they are the Local policy's, whether the policy masquerades)
        let (set, local_set, policy_masq) = if f.kind.is_external() {
            if svc.external_local && origin == Origin::External {
                // eTP Local: external clients only reach local endpoints, source kept.
                (&svc.local, true, false)
            } else if svc.external_local {
                // Pods short-circuit to the cluster endpoints; the node's own traffic does
                // too but is masqueraded (iptables KUBE-EXT-* `--src-type LOCAL`).
                (&svc.cluster, false, origin == Origin::Node)
            } else {
                // eTP Cluster: every external-frontend connection is masqueraded.
                (&svc.cluster, false, true)
            }
        } else if svc.internal_local {
            (&svc.local, true, false)
        } else {
            (&svc.cluster, false, false)
        };
        let remembered = match (affinity, svc.affinity_timeout_s) {
            (Some(table), Some(_)) => {
                let key = svc.affinity_key ^ (local_set as u64) << 1;
                table.get(key, src, now).and_then(|(ip, port)| {
                    set.backends
                        .iter()
                        .copied()
                        .find(|b| b.ip == ip && b.port == port)
                })
            }
            _ => None,
        };
        let Some(backend) = remembered.or_else(|| set.pick(hash)) else {
            return if svc.cluster.backends.is_empty() {
                Decision::Reject
            } else {
                Decision::Drop
            };
        };
        if let (Some(table), Some(timeout)) = (affinity, svc.affinity_timeout_s) {
            let key = svc.affinity_key ^ (local_set as u64) << 1;
            let expires = now.saturating_add(timeout as u64 * 1_000_000_000);
            table.set(key, src, (backend.ip, backend.port), expires);
        }
        let masquerade = policy_masq
            // --masquerade-all: kube-proxy's rule matches the ClusterIP as destination, so
            // eTP Local traffic to the external frontends keeps its source even then.
            || (self.masquerade_all && !f.kind.is_external())
            // ClusterIP from outside the pod networks (KUBE-SVC-* `! -s clusterCIDR`).
            || (!f.kind.is_external() && origin != Origin::Pod)
            // Hairpin: a pod reaching itself through its Service (KUBE-SEP-* `-s endpoint`).
            || backend.ip == src
            // A pod sent outside the pod networks (an endpoint of a hand-made slice, a
            // host-network pod of another node): flannel's ip-masq rule sees the address
            // after DNAT. This node's own addresses are delivered locally, not routed.
            || (self.ip_masq && origin == Origin::Pod && self.origin(backend.ip) == Origin::External);
        Decision::Translate {
            backend,
            masquerade,
        }
    }
}

fn placeholder() -> Service {
    Service {
        name: String::new(),
        protocol: Protocol::Tcp,
        cluster: BackendSet::default(),
        local: BackendSet::default(),
        internal_local: false,
        external_local: false,
        affinity_timeout_s: None,
        lb_source_ranges: Vec::new(),
        all_endpoints: Vec::new(),
        serving_endpoints: Vec::new(),
        affinity_key: 0,
    }
}

fn backend_of(e: &EndpointSpec) -> Backend {
    Backend {
        ip: e.ip,
        port: e.port,
        local: e.local,
    }
}

fn compile(s: &ServiceSpec, ring_size: u32, scaled: bool) -> Service {
    let cluster = BackendSet::build(&s.cluster_endpoints, ring_size, scaled);
    // Often the same list (all endpoints local, or none): share the ring.
    let local = if s.local_endpoints == s.cluster_endpoints {
        cluster.clone()
    } else {
        BackendSet::build(&s.local_endpoints, ring_size, scaled)
    };
    Service {
        name: s.name.clone(),
        protocol: s.protocol,
        cluster,
        local,
        internal_local: s.internal_local,
        external_local: s.external_local,
        affinity_timeout_s: s.affinity_timeout_s,
        all_endpoints: s.all_endpoints.iter().map(backend_of).collect(),
        serving_endpoints: s
            .all_endpoints
            .iter()
            .filter(|e| e.serving)
            .map(backend_of)
            .collect(),
        affinity_key: crate::affinity::service_key(&s.name, s.is_ipv6()),
        lb_source_ranges: s.lb_source_ranges.clone(),
    }
}

/// Whether `net` holds `ip`, as ipnet's `contains` says, in a few instructions: the
/// pipeline asks it of several networks per packet.
#[inline]
pub fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(n.prefix_len()))
                .unwrap_or(0);
            (u32::from(a) ^ u32::from(n.addr())) & mask == 0
        }
        (IpNet::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(n.prefix_len()))
                .unwrap_or(0);
            (u128::from(a) ^ u128::from(n.addr())) & mask == 0
        }
        _ => false,
    }
}

/// A fast, deterministic hasher for small fixed keys (FxHash's multiply-rotate); table keys
/// come from control, not from the wire, so flooding the map is not a concern here.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildFastHasher;

impl std::hash::BuildHasher for BuildFastHasher {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

/// See [`BuildFastHasher`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{EndpointSpec, FrontendSpec};

    #[test]
    fn net_contains_agrees_with_ipnet() {
        let nets: Vec<IpNet> = [
            "0.0.0.0/0",
            "10.244.1.0/24",
            "10.244.1.7/32",
            "10.244.1.9/31",
            "172.16.0.0/12",
            "::/0",
            "fd00:10:244:1::/64",
            "fd00::1/128",
            "fd00::/7",
            "::ffff:10.0.0.0/104",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let ips: Vec<IpAddr> = [
            "10.244.1.7",
            "10.244.1.8",
            "10.244.2.1",
            "172.31.255.255",
            "172.32.0.0",
            "0.0.0.0",
            "255.255.255.255",
            "fd00:10:244:1::5",
            "fd00::1",
            "fd00::2",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for n in &nets {
            for ip in &ips {
                assert_eq!(net_contains(n, *ip), n.contains(ip), "{n} {ip}");
            }
        }
    }

    fn ep(ip: &str, local: bool) -> EndpointSpec {
        EndpointSpec {
            ip: ip.parse().unwrap(),
            port: 8080,
            local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn table(
        cluster: Vec<EndpointSpec>,
        etp_local: bool,
    ) -> (ServiceTable, FrontendRef, FrontendRef) {
        let local: Vec<EndpointSpec> = cluster.iter().filter(|e| e.local).cloned().collect();
        let spec = TableSpec {
            node: crate::spec::NodeSpec {
                name: "node-a".into(),
                addresses: vec!["192.168.0.2".parse().unwrap()],
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                zone: None,
                ..Default::default()
            },
            services: vec![Arc::new(ServiceSpec {
                name: "default/web:http".into(),
                protocol: Protocol::Tcp,
                frontends: vec![
                    FrontendSpec {
                        kind: FrontendKind::ClusterIp,
                        ip: "172.30.0.41".parse().unwrap(),
                        port: 80,
                    },
                    FrontendSpec {
                        kind: FrontendKind::NodePort,
                        ip: "192.168.0.2".parse().unwrap(),
                        port: 30080,
                    },
                ],
                all_endpoints: cluster.clone(),
                cluster_endpoints: cluster,
                local_endpoints: local,
                external_local: etp_local,
                ..ServiceSpec::default()
            })],
            ..TableSpec::default()
        };
        let t = ServiceTable::build(&spec, 251);
        let key = |ip: &str, port| FrontendKey {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        let cip = t.frontend(&key("172.30.0.41", 80)).unwrap();
        let np = t.frontend(&key("192.168.0.2", 30080)).unwrap();
        (t, cip, np)
    }

    /// Whether `t` translates a connection from `src` to `f` with masquerade (panics if it
    /// does not translate it).
    fn masquerades(t: &ServiceTable, f: FrontendRef, src: &str) -> bool {
        match t.decide(f, src.parse().unwrap(), 1) {
            Decision::Translate { masquerade, .. } => masquerade,
            other => panic!("{src}: {other:?}"),
        }
    }

    #[test]
    fn clusterip_from_pod_keeps_source_and_from_outside_masquerades() {
        let (t, cip, _) = table(vec![ep("10.244.1.5", true), ep("10.244.2.5", false)], false);
        assert!(!masquerades(&t, cip, "10.244.1.2"));
        assert!(masquerades(&t, cip, "203.0.113.2"));
    }

    #[test]
    fn hairpin_masquerades() {
        let (t, cip, _) = table(vec![ep("10.244.1.5", true)], false);
        let me = "10.244.1.5".parse().unwrap();
        assert!(matches!(
            t.decide(cip, me, 9),
            Decision::Translate {
                masquerade: true,
                ..
            }
        ));
    }

    #[test]
    fn etp_local_without_local_endpoint_drops_external_and_serves_pods() {
        let (t, _, np) = table(vec![ep("10.244.2.5", false)], true);
        assert_eq!(
            t.decide(np, "203.0.113.2".parse().unwrap(), 3),
            Decision::Drop
        );
        assert!(matches!(
            t.decide(np, "10.244.1.2".parse().unwrap(), 3),
            Decision::Translate {
                masquerade: false,
                ..
            }
        ));
    }

    #[test]
    fn ring_size_grows_with_backends_up_to_the_maximum() {
        assert_eq!(ring_size_for(2, 16381), 251);
        assert_eq!(ring_size_for(3, 16381), 509);
        assert_eq!(ring_size_for(100, 16381), 16381);
        assert_eq!(ring_size_for(1000, 16381), 16381);
        assert_eq!(ring_size_for(3, 251), 251);
    }

    #[test]
    fn no_endpoints_rejects() {
        let (t, cip, np) = table(vec![], true);
        assert_eq!(
            t.decide(cip, "10.244.1.2".parse().unwrap(), 3),
            Decision::Reject
        );
        assert_eq!(
            t.decide(np, "203.0.113.2".parse().unwrap(), 3),
            Decision::Reject
        );
    }

    #[test]
    fn two_gateways_choose_the_same_backend_for_every_flow() {
        let eps = vec![
            ep("10.244.1.5", true),
            ep("10.244.1.6", true),
            ep("10.244.2.5", false),
            ep("10.244.3.9", false),
        ];
        let mut listed_otherwise = eps.clone();
        listed_otherwise.reverse();
        let (a, cip_a, _) = table(eps, false);
        let (b, cip_b, _) = table(listed_otherwise, false);
        let mut chosen = std::collections::HashSet::new();
        for port in 0..2000u16 {
            let flow = crate::conntrack::FlowKey {
                proto: 6,
                src: "203.0.113.2".parse().unwrap(),
                dst: "172.30.0.41".parse().unwrap(),
                sport: 10000 + port,
                dport: 80,
            };
            let src = flow.src;
            let pick = |t: &ServiceTable, f| match t.decide(f, src, flow.flow_hash()) {
                Decision::Translate { backend, .. } => backend,
                other => panic!("{other:?}"),
            };
            let on_a = pick(&a, cip_a);
            assert_eq!(on_a, pick(&b, cip_b), "flow from port {}", flow.sport);
            chosen.insert(on_a.ip);
        }
        assert_eq!(chosen.len(), 4, "the flows spread over every backend");
    }

    /// Warming reads what the decisions will read and nothing else: any frontends (known or
    /// not, Services with one backend and so no ring, more keys than it takes at once) are
    /// fine, and the decisions after it are the same as without it.
    #[test]
    fn warming_a_burst_changes_no_decision() {
        let (t, cip, _) = table(vec![ep("10.244.1.5", true), ep("10.244.2.5", false)], false);
        let (single, single_cip, _) = table(vec![ep("10.244.1.5", true)], false);
        let key = |ip: &str, port| FrontendKey {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        let keys: Vec<FrontendKey> = (0..100u16)
            .map(|i| match i % 3 {
                0 => key("172.30.0.41", 80),
                1 => key("192.168.0.2", 30080),
                _ => key("172.30.0.99", 80 + i),
            })
            .collect();
        let hashes: Vec<u64> = (0..100u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
        let before: Vec<Decision> = hashes
            .iter()
            .map(|h| t.decide(cip, "10.244.1.2".parse().unwrap(), *h))
            .collect();
        std::hint::black_box(t.warm(&keys, &hashes));
        std::hint::black_box(single.warm(&keys, &hashes[..7]));
        std::hint::black_box(t.warm(&[], &hashes));
        let after: Vec<Decision> = hashes
            .iter()
            .map(|h| t.decide(cip, "10.244.1.2".parse().unwrap(), *h))
            .collect();
        assert_eq!(before, after);
        assert!(matches!(
            single.decide(single_cip, "10.244.1.2".parse().unwrap(), 5),
            Decision::Translate { .. }
        ));
    }

    #[test]
    fn every_backend_is_chosen_across_flows() {
        let (t, cip, _) = table(
            vec![
                ep("10.244.1.5", true),
                ep("10.244.1.6", true),
                ep("10.244.2.5", false),
            ],
            false,
        );
        let mut seen = std::collections::HashSet::new();
        for h in 0..200u64 {
            if let Decision::Translate { backend, .. } = t.decide(
                cip,
                "10.244.1.2".parse().unwrap(),
                h.wrapping_mul(0x9e3779b97f4a7c15),
            ) {
                seen.insert(backend.ip);
            }
        }
        assert_eq!(seen.len(), 3);
    }

    /// What a table answers, independent of ids: per frontend the Service port's name,
    /// kind and backends under both policies; and which addresses are external frontends.
    /// One frontend's answer: key, Service port name, kind, backends under both policies.
    type Answer = (
        FrontendKey,
        String,
        FrontendKind,
        Vec<Backend>,
        Vec<Backend>,
    );

    fn behaviour(t: &ServiceTable, spec: &TableSpec) -> (Vec<Answer>, usize) {
        let mut out = Vec::new();
        for s in &spec.services {
            for f in &s.frontends {
                let key = FrontendKey {
                    ip: f.ip,
                    port: f.port,
                    protocol: s.protocol,
                };
                let r = t.frontend(&key).expect("every frontend answers");
                let svc = t.service(r.service).expect("a live Service port");
                assert!(!f.kind.is_external() || t.is_frontend_ip(f.ip));
                out.push((
                    key,
                    svc.name.clone(),
                    r.kind,
                    svc.cluster.backends.clone(),
                    svc.local.backends.clone(),
                ));
            }
        }
        out.sort_by_key(|e| (e.0.ip, e.0.port, e.0.protocol as u8));
        out.dedup_by(|a, b| a.0 == b.0);
        (out, t.services().count())
    }

    fn random_spec(entries: &[(u8, u8, u8, u8)]) -> TableSpec {
        let mut spec = TableSpec::default();
        for &(name, ip, external_ip, endpoints) in entries {
            let eps: Vec<EndpointSpec> = (0..endpoints)
                .map(|e| ep(&format!("10.244.1.{}", e + name), e % 2 == 0))
                .collect();
            let mut frontends = vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: format!("172.30.0.{ip}").parse().unwrap(),
                port: 80,
            }];
            if external_ip < 4 {
                // Few external IPs, so that Service ports contest them.
                frontends.push(FrontendSpec {
                    kind: FrontendKind::ExternalIp,
                    ip: format!("203.0.113.{external_ip}").parse().unwrap(),
                    port: 443,
                });
            }
            spec.services.push(Arc::new(ServiceSpec {
                name: format!("ns/s{name}:p"),
                protocol: Protocol::Tcp,
                frontends,
                local_endpoints: eps.iter().filter(|e| e.local).cloned().collect(),
                all_endpoints: eps.clone(),
                cluster_endpoints: eps,
                ..ServiceSpec::default()
            }));
        }
        spec.sort_services();
        spec.services.dedup_by(|a, b| a.key_ref() == b.key_ref());
        spec
    }

    proptest::proptest! {
        #[test]
        fn a_table_updated_by_a_delta_answers_as_one_built_whole(
            a in proptest::collection::vec((0u8..12, 0u8..16, 0u8..8, 0u8..4), 0..14),
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..12, 0u8..16, 0u8..8, 0u8..4), 0..14), 1..4),
        ) {
            let mut spec = random_spec(&a);
            let mut table = ServiceTable::build_with(&spec, 251, true);
            for b in &steps {
                let next = random_spec(b);
                let delta = TableDelta::between(&spec, &next);
                let updated = table.updated(&spec, &delta, &next, 251, true).unwrap();
                let whole = ServiceTable::build_with(&next, 251, true);
                proptest::prop_assert_eq!(behaviour(&updated, &next), behaviour(&whole, &next));
                proptest::prop_assert_eq!(updated.contested(), whole.contested());
                // Ids of Service ports in both tables stay.
                for (i, s) in next.services.iter().enumerate() {
                    if let Ok(j) = spec.services.binary_search_by(|o| o.key_ref().cmp(&s.key_ref())) {
                        proptest::prop_assert_eq!(updated.ids()[i], table.ids()[j]);
                    }
                }
                spec = next;
                table = updated;
            }
        }
    }

    #[test]
    fn an_unchanged_service_port_is_shared_not_recompiled() {
        let spec = random_spec(&[(1, 1, 9, 3), (2, 2, 9, 3)]);
        let table = ServiceTable::build_with(&spec, 251, true);
        let mut next = spec.clone();
        Arc::make_mut(&mut next.services[1]).cluster_endpoints.pop();
        let delta = TableDelta::between(&spec, &next);
        let updated = table.updated(&spec, &delta, &next, 251, true).unwrap();
        let (a, b) = (table.ids()[0], updated.ids()[0]);
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(
            &table.services[a as usize],
            &updated.services[b as usize]
        ));
        let changed = updated.ids()[1];
        assert_eq!(
            changed,
            table.ids()[1],
            "a replaced Service port keeps its id"
        );
        assert_eq!(updated.services[changed as usize].cluster.backends.len(), 2);
    }

    #[test]
    fn source_ranges_filter_only_load_balancer_frontends() {
        let lb = FrontendSpec {
            kind: FrontendKind::LoadBalancer,
            ip: "1.2.3.4".parse().unwrap(),
            port: 80,
        };
        let mk = |endpoints: Vec<EndpointSpec>| {
            let s = ServiceSpec {
                name: "default/web:http".into(),
                protocol: Protocol::Tcp,
                frontends: vec![
                    FrontendSpec {
                        kind: FrontendKind::ClusterIp,
                        ip: "172.30.0.41".parse().unwrap(),
                        port: 80,
                    },
                    lb,
                    FrontendSpec {
                        kind: FrontendKind::NodePort,
                        ip: "192.168.0.2".parse().unwrap(),
                        port: 30080,
                    },
                ],
                all_endpoints: endpoints.clone(),
                local_endpoints: endpoints.clone(),
                cluster_endpoints: endpoints,
                lb_source_ranges: vec!["203.0.113.0/24".parse().unwrap()],
                ..ServiceSpec::default()
            };
            let spec = TableSpec {
                node: crate::spec::NodeSpec {
                    addresses: vec!["192.168.0.2".parse().unwrap()],
                    ..Default::default()
                },
                services: vec![Arc::new(s)],
                ..TableSpec::default()
            };
            ServiceTable::build(&spec, 251)
        };
        let key = |ip: &str, port| FrontendKey {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        let t = mk(vec![ep("10.244.1.5", true)]);
        let at = |ip, port| t.frontend(&key(ip, port)).unwrap();
        let allowed = "203.0.113.2".parse().unwrap();
        let other = "198.51.100.7".parse().unwrap();
        let pod = "10.244.1.2".parse().unwrap();
        assert!(matches!(
            t.decide(at("1.2.3.4", 80), allowed, 1),
            Decision::Translate { .. }
        ));
        assert_eq!(
            t.decide(at("1.2.3.4", 80), other, 1),
            Decision::SourceFiltered
        );
        assert_eq!(
            t.decide(at("1.2.3.4", 80), pod, 1),
            Decision::SourceFiltered
        );
        // The NodePort and the ClusterIP are not filtered.
        assert!(matches!(
            t.decide(at("192.168.0.2", 30080), other, 1),
            Decision::Translate { .. }
        ));
        assert!(matches!(
            t.decide(at("172.30.0.41", 80), pod, 1),
            Decision::Translate { .. }
        ));
        // Without endpoints the filter still drops outsiders; the node itself is rejected
        // first (nftables' output hook checks endpoints before the firewall).
        let t = mk(Vec::new());
        let at = |ip, port| t.frontend(&key(ip, port)).unwrap();
        assert_eq!(
            t.decide(at("1.2.3.4", 80), other, 1),
            Decision::SourceFiltered
        );
        assert_eq!(
            t.decide(at("1.2.3.4", 80), "192.168.0.2".parse().unwrap(), 1),
            Decision::Reject
        );
    }

    #[test]
    fn cluster_ips_are_known_by_address() {
        let (t, _, _) = table(vec![ep("10.244.1.5", true)], false);
        assert!(t.is_cluster_ip("172.30.0.41".parse().unwrap()));
        assert!(!t.is_cluster_ip("172.30.0.42".parse().unwrap()));
        // NodePort addresses are frontends, not ClusterIPs.
        assert!(!t.is_cluster_ip("192.168.0.2".parse().unwrap()));
    }

    #[test]
    fn pods_sent_outside_the_pod_networks_are_masqueraded() {
        let (t, cip, _) = table(vec![ep("198.51.100.10", false)], false);
        assert!(masquerades(&t, cip, "10.244.1.2"));
        // The node's own address is delivered locally: no masquerade for pods.
        let (t, cip, _) = table(vec![ep("192.168.0.2", true)], false);
        assert!(!masquerades(&t, cip, "10.244.1.2"));
        // From outside the ClusterIP masquerades anyway.
        assert!(masquerades(&t, cip, "203.0.113.2"));
    }
}
