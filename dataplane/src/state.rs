//! What the workers of one dataplane share ([`Shared`]: the current tables, swapped whole
//! and read without locks, the connection table, the neighbours, the ports), and how a
//! table generation from control is installed: compiled ([`crate::tables`]), swapped in,
//! and the flows it strands retired.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use nat::conntrack::Conntrack;
use nat::spec::{TableDelta, TableSpec};

use crate::counters::Published;
use crate::neighbors::Neighbors;
use crate::ports::{PortConfig, PortRole};
use crate::routes::UplinkRoutes;
use crate::tables::{PolicyDrops, Tables};

/// Settings fixed at start.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Maglev ring size (a prime).
    pub ring_size: u32,
    /// Size each ring by its backend count (at most `ring_size`) instead of using
    /// `ring_size` for every Service (see `nat::tables::RING_LADDER`).
    pub ring_scaled: bool,
    /// Conntrack capacity.
    pub conntrack_capacity: usize,
    /// Session-affinity records (clients remembered across all Services).
    pub affinity_capacity: usize,
    /// Source ports (inclusive) for pod traffic masqueraded to the node's address on its
    /// way out of the cluster: outside the kernel's ephemeral range (`ip_local_port_range`,
    /// 32768–60999 by default), so they never collide with the node's own connections.
    pub egress_masquerade_ports: (u16, u16),
    /// Pod interfaces that may be attached at run time, beyond the ports given at start.
    pub max_pods: usize,
}

/// Pod interfaces a node attaches at most by default: the kubelet's default of 110 pods per
/// node. Each costs every worker 128 UMEM chunks (512 KiB) and one socket's rings.
pub const DEFAULT_MAX_PODS: usize = 110;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ring_size: nat::maglev::DEFAULT_RING_SIZE,
            ring_scaled: false,
            conntrack_capacity: 1 << 20,
            affinity_capacity: 1 << 16,
            egress_masquerade_ports: DEFAULT_EGRESS_MASQUERADE_PORTS,
            max_pods: DEFAULT_MAX_PODS,
        }
    }
}

/// What became of a delta from control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied; `retire` says whether stale flows should be retired now.
    Applied {
        /// A UDP or SCTP Service port changed, or the node did.
        retire: bool,
    },
    /// The tables in use are not the delta's base: they are generation `have`.
    Stale {
        /// The generation in use.
        have: u64,
    },
}

/// Whether applying `delta` to `spec` may leave a UDP or SCTP connection on a backend that
/// no longer serves its Service, or on a frontend that is gone: only then is every tracked
/// connection looked at ([`Shared::retire_stale_flows`], about 90 ms at 900k connections).
/// A delta that only adds endpoints, or changes TCP Services, strands nothing.
fn may_strand_datagram_flows(spec: &TableSpec, delta: &TableDelta) -> bool {
    use nat::spec::Protocol;
    if delta.node.is_some() || delta.cluster.is_some() {
        return true;
    }
    let old = |key: (&str, Protocol, bool)| {
        spec.services
            .binary_search_by(|s| s.key_ref().cmp(&key))
            .ok()
            .map(|i| &spec.services[i])
    };
    let serving = |s: &nat::spec::ServiceSpec| -> std::collections::HashSet<(IpAddr, u16)> {
        s.all_endpoints
            .iter()
            .filter(|e| e.serving)
            .map(|e| (e.ip, e.port))
            .collect()
    };
    delta.removed.iter().any(|k| k.protocol != Protocol::Tcp)
        || delta.upserted.iter().any(|new| {
            new.protocol != Protocol::Tcp
                && old(new.key_ref()).is_some_and(|old| {
                    old.frontends != new.frontends || !serving(old).is_subset(&serving(new))
                })
        })
}

/// A function called with each installed table.
pub type InstallHook = Box<dyn Fn(&Tables) + Send + Sync>;

/// The default of [`Limits::egress_masquerade_ports`]: above the kernel's ephemeral range.
pub const DEFAULT_EGRESS_MASQUERADE_PORTS: (u16, u16) = (61000, 65535);

/// A per-process secret from the standard library's randomly keyed hasher.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x6b78_6470u64)
}

/// What the workers of one dataplane read as they forward: its fields are on the packet
/// path, but for [`Shared::installs`], which only installing a table generation uses.
pub struct Shared {
    /// The current tables.
    pub tables: ArcSwap<Tables>,
    /// The connection table.
    pub conntrack: Conntrack,
    /// Learned neighbours.
    pub neighbors: Neighbors,
    /// ClientIP session affinity records.
    pub affinity: nat::affinity::AffinityTable,
    /// The ports, by index (equal on every worker): those given at start and pods
    /// attached at run time.
    pub ports: crate::ports::Ports,
    /// Per-worker published counters.
    pub counters: Vec<Published>,
    /// Start-up settings.
    pub limits: Limits,
    /// The MAC of the next hop behind the uplink (learned from IP traffic arriving there);
    /// 0 while unknown.
    pub uplink_next_hop: std::sync::atomic::AtomicU64,
    /// The MAC of the kernel's end of the host pair (learned from the frames it sends);
    /// 0 while unknown.
    pub host_kernel_mac: std::sync::atomic::AtomicU64,
    /// The uplink's port index, if there is one.
    pub uplink: Option<usize>,
    /// The host port's index, if there is one.
    pub host: Option<usize>,
    /// The node's routes out of the uplink, for traffic leaving the cluster.
    pub uplink_routes: ArcSwap<UplinkRoutes>,
    /// The flow monitor's rings.
    pub monitor: crate::monitor::Monitor,
    /// How table generations are installed; never read per packet.
    pub installs: Installs,
    /// Each worker's eventfd, written to wake it when it sleeps (`crate::idle`).
    pub wakers: Arc<crate::idle::Wakers>,
    /// How the workers wait for packets, once they are started (`kxdp stats` shows it).
    pub poll_mode: std::sync::OnceLock<crate::idle::PollMode>,
}

/// How table generations are installed, beside the tables themselves: the policy drop
/// counters each generation takes up, the refusals, and the hook the binary keeps its XDP
/// filter in step with. No worker reads it. (What else the control socket's server owns,
/// the pod interfaces and the handover, is `server::ServerState`: this module, which they
/// build on, names neither.)
#[derive(Default)]
pub struct Installs {
    /// NetworkPolicy drop counters by name (`pod ns/name ingress`, `policy ns/name`); each
    /// table generation holds those of its policy by index ([`PolicyDrops`]).
    pub policy_drops: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    /// Tables control sent that failed validation (refused whole, with a reason).
    pub refused_tables: AtomicU64,
    /// Called with every newly installed table whose frontends, node or cluster settings
    /// may differ from the last one's (the binary keeps the uplink's XDP filter in step
    /// with them; a delta that only moves endpoints does not call it).
    pub on_install: Mutex<Option<InstallHook>>,
}

impl Installs {
    /// Sets the hook called with newly installed tables, or (`None`) drops it.
    pub fn set_install_hook(&self, hook: Option<InstallHook>) {
        *self.on_install.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }
}

impl Shared {
    /// State for `workers` workers on `ports`.
    pub fn new(ports: Vec<PortConfig>, workers: usize, limits: Limits) -> Shared {
        let uplink = ports.iter().position(|p| p.role == PortRole::Uplink);
        let host = ports.iter().position(|p| p.role == PortRole::Host);
        let wakers = Arc::new(crate::idle::Wakers::new(workers));
        Shared {
            uplink,
            host,
            uplink_next_hop: std::sync::atomic::AtomicU64::new(0),
            host_kernel_mac: std::sync::atomic::AtomicU64::new(0),
            tables: ArcSwap::from_pointee(Tables::empty()),
            conntrack: Conntrack::with_seed(limits.conntrack_capacity, random_seed()),
            neighbors: Neighbors::default(),
            affinity: nat::affinity::AffinityTable::new(limits.affinity_capacity),
            ports: crate::ports::Ports::new(
                ports.clone(),
                workers,
                ports.len() + limits.max_pods,
                wakers.clone(),
            ),
            counters: (0..workers).map(|_| Published::default()).collect(),
            limits,
            uplink_routes: ArcSwap::from_pointee(UplinkRoutes::default()),
            monitor: crate::monitor::Monitor::new(workers),
            installs: Installs::default(),
            wakers,
            poll_mode: std::sync::OnceLock::new(),
        }
    }

    /// Installs a new table generation: compile, swap, then retire flows the new tables
    /// no longer allow (UDP to endpoints that are gone, so the next datagram picks a live
    /// one). Workers are never stopped.
    pub fn install(&self, generation: u64, spec: TableSpec, now: u64) {
        self.install_tables(generation, spec);
        self.retire_stale_flows(now);
    }

    /// Compiles `spec` and swaps it in; the caller retires stale flows
    /// ([`Shared::retire_stale_flows`]) when it suits it (the control socket does so after
    /// it has answered, so control's wait does not include a sweep of the connection
    /// table). Snapshots from control may list Service ports in any order: they are put in
    /// canonical order here, which deltas rely on.
    pub fn install_tables(&self, generation: u64, mut spec: TableSpec) {
        spec.sort_services();
        let uplink_mac = self.uplink_mac();
        let ring = (self.limits.ring_size, self.limits.ring_scaled);
        let tables = Tables::compile(generation, spec, ring, uplink_mac);
        self.swap_in(tables, true);
    }

    /// Applies control's `delta` to the tables in use, if they are generation `base`
    /// (else [`DeltaOutcome::Stale`], and nothing changes). Returns whether flows may need
    /// retiring (a UDP or SCTP Service port changed or went away).
    pub fn install_delta(
        &self,
        generation: u64,
        base: u64,
        delta: &TableDelta,
    ) -> Result<DeltaOutcome, String> {
        let current = self.tables.load();
        if current.generation != base {
            return Ok(DeltaOutcome::Stale {
                have: current.generation,
            });
        }
        let ring = (self.limits.ring_size, self.limits.ring_scaled);
        let tables = current.updated(generation, delta, ring, self.uplink_mac())?;
        let filter = delta.changes_frontends(&current.spec);
        let retire = may_strand_datagram_flows(&current.spec, delta);
        // A new policy table (carried by the delta, or compiled again with everything
        // when the node or cluster settings changed) needs its drop counters looked up.
        let policy_changed = !Arc::ptr_eq(&tables.policy, &current.policy);
        drop(current);
        let mut tables = tables;
        if policy_changed {
            tables.policy_drops = PolicyDrops::build(&tables.policy, &self.installs.policy_drops);
        }
        self.swap_in_built(tables, filter);
        Ok(DeltaOutcome::Applied { retire })
    }

    fn uplink_mac(&self) -> Option<[u8; 6]> {
        self.uplink
            .and_then(|u| self.ports.load().get(u).map(|p| p.mac))
    }

    fn swap_in(&self, mut tables: Tables, filter: bool) {
        tables.policy_drops = PolicyDrops::build(&tables.policy, &self.installs.policy_drops);
        self.swap_in_built(tables, filter);
    }

    /// Swaps `tables` in, then (when `filter`: frontends or the node may have changed)
    /// tells the install hook.
    fn swap_in_built(&self, tables: Tables, filter: bool) {
        // Before workers see the generation, so the monitor can name its policies.
        self.monitor
            .tables_in_use(tables.generation, &tables.policy);
        let tables = Arc::new(tables);
        self.tables.store(tables.clone());
        // Sleeping workers pass once with them. Nothing waits on it (a sleeping worker
        // holds no frame for the tables to decide, and worker 0 solicits new pods at its
        // next housekeeping, within 100 ms, awake or not): a wake-up is cheap, and a pass
        // that begins with the new tables is what table changes promise.
        self.wakers.wake_all();
        if !filter {
            return;
        }
        if let Some(hook) = self
            .installs
            .on_install
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(&tables);
        }
    }

    /// The NetworkPolicy drop counters that are not zero, by name.
    pub fn policy_drop_counts(&self) -> Vec<(String, u64)> {
        let reg = self
            .installs
            .policy_drops
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reg.iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Removes UDP (and SCTP) connections whose backend is no longer a serving endpoint of
    /// their Service (gone, or not serving any more), so the next datagram picks a live
    /// endpoint instead of vanishing into a dead one (kubernetes issues 48370, 59368). TCP
    /// connections keep their backend: a closing endpoint finishes its connections.
    pub fn retire_stale_flows(&self, now: u64) -> usize {
        let tables = self.tables.load();
        self.conntrack.sweep(now, |c| {
            if c.service == 0 || c.original.proto == nat::packet::PROTO_TCP {
                return false;
            }
            let Some(proto) = nat::spec::Protocol::from_number(c.original.proto) else {
                return false;
            };
            // Service ids are per generation: find the Service again by its frontend.
            let key = nat::tables::FrontendKey {
                ip: c.original.dst,
                port: c.original.dport,
                protocol: proto,
            };
            match tables
                .services
                .frontend(&key)
                .and_then(|f| tables.services.service(f.service))
            {
                Some(svc) => !svc
                    .serving_endpoints
                    .iter()
                    .any(|b| b.ip == c.reply.src && b.port == c.reply.sport),
                None => true,
            }
        })
    }
}

#[cfg(test)]
mod retire_tests {
    use super::*;
    use nat::spec::{EndpointSpec, FrontendKind, FrontendSpec, Protocol, ServiceSpec};

    fn svc(protocol: Protocol, port: u16, endpoints: &[(&str, bool)]) -> Arc<ServiceSpec> {
        let eps: Vec<EndpointSpec> = endpoints
            .iter()
            .map(|(ip, serving)| EndpointSpec {
                ip: ip.parse().unwrap(),
                port: 53,
                local: false,
                ready: *serving,
                serving: *serving,
                terminating: !*serving,
            })
            .collect();
        Arc::new(ServiceSpec {
            name: "kube-system/dns:dns".into(),
            protocol,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: "172.30.0.10".parse().unwrap(),
                port,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        })
    }

    fn strands(before: Arc<ServiceSpec>, after: Arc<ServiceSpec>) -> bool {
        let spec = TableSpec {
            services: vec![before],
            ..TableSpec::default()
        };
        let next = TableSpec {
            services: vec![after],
            ..TableSpec::default()
        };
        may_strand_datagram_flows(&spec, &TableDelta::between(&spec, &next))
    }

    #[test]
    fn only_a_lost_serving_endpoint_or_frontend_sends_the_sweep_looking_for_datagram_flows() {
        let (a, b) = ("10.244.1.2", "10.244.1.3");
        let udp = Protocol::Udp;
        // An endpoint added, or one of two going from serving to not: nothing / something.
        assert!(!strands(
            svc(udp, 53, &[(a, true)]),
            svc(udp, 53, &[(a, true), (b, true)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true), (b, true)]),
            svc(udp, 53, &[(a, true), (b, false)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true), (b, true)]),
            svc(udp, 53, &[(a, true)])
        ));
        assert!(strands(
            svc(udp, 53, &[(a, true)]),
            svc(udp, 5353, &[(a, true)])
        ));
        assert!(!strands(
            svc(udp, 53, &[(a, false)]),
            svc(udp, 53, &[(a, true)])
        ));
        // TCP keeps its backends: a closing endpoint finishes its connections.
        let tcp = Protocol::Tcp;
        assert!(!strands(
            svc(tcp, 53, &[(a, true), (b, true)]),
            svc(tcp, 53, &[(a, true)])
        ));
        // A UDP Service removed, and the node changed: always.
        let spec = TableSpec {
            services: vec![svc(udp, 53, &[(a, true)])],
            ..TableSpec::default()
        };
        let empty = TableSpec::default();
        assert!(may_strand_datagram_flows(
            &spec,
            &TableDelta::between(&spec, &empty)
        ));
        let mut moved = spec.clone();
        moved.node.name = "elsewhere".into();
        assert!(may_strand_datagram_flows(
            &spec,
            &TableDelta::between(&spec, &moved)
        ));
    }
}

#[cfg(test)]
mod policy_drop_tests {
    use super::*;
    use nat::policy::PolicyType;
    use nat::spec::{IsolationSpec, PodPolicySpec, PolicySpec};

    #[test]
    fn drops_are_counted_after_a_delta_that_recompiles_everything() {
        let shared = Shared::new(vec![], 1, Limits::default());
        let pod: IpAddr = "10.244.1.5".parse().unwrap();
        let spec = TableSpec {
            policy: PolicySpec {
                policies: vec!["default/deny".into()],
                pods: vec![PodPolicySpec {
                    pod: "default/web".into(),
                    ips: vec![pod],
                    ingress: Some(IsolationSpec {
                        policies: vec![0],
                        ..IsolationSpec::default()
                    }),
                    egress: None,
                }],
            },
            ..TableSpec::default()
        };
        shared.install_tables(1, spec.clone());
        // The node changes, the policy does not: every table is compiled again.
        let mut moved = spec.clone();
        moved.node.name = "node-b".into();
        let delta = TableDelta::between(&spec, &moved);
        assert!(delta.policy.is_none() && delta.node.is_some());
        assert!(matches!(
            shared.install_delta(2, 1, &delta),
            Ok(DeltaOutcome::Applied { .. })
        ));
        let t = shared.tables.load();
        t.policy_drops.count(&t.policy, PolicyType::Ingress, pod);
        let counts = shared.policy_drop_counts();
        assert!(
            counts.contains(&("pod default/web ingress".into(), 1))
                && counts.contains(&("policy default/deny".into(), 1)),
            "{counts:?}"
        );
    }
}
