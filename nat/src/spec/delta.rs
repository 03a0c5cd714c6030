//! What changed from one table to the next ([`TableDelta`]), and the merge by Service key
//! that both ends of the control stream use to apply it.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::policy::PolicySpec;
use super::protocol::Protocol;
use super::service::{ServiceKey, ServiceSpec};
use super::table::{ClusterSpec, NodeSpec, PodSpec, RemoteNodeSpec, TableSpec};

/// What changed from one [`TableSpec`] to the next: what control sends once the dataplane
/// has a table, instead of the whole of it. Services are sent one by one (a change to one
/// EndpointSlice sends the Service ports it feeds); the other parts are small, or change
/// rarely, and are sent whole when they change at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDelta {
    /// The node, when it changed.
    #[serde(default)]
    pub node: Option<NodeSpec>,
    /// The cluster settings, when they changed.
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
    /// Every local pod, when any changed.
    #[serde(default)]
    pub local_pods: Option<Vec<PodSpec>>,
    /// Every remote node, when any changed.
    #[serde(default)]
    pub remote_nodes: Option<Vec<RemoteNodeSpec>>,
    /// The whole NetworkPolicy table, when it changed.
    #[serde(default)]
    pub policy: Option<PolicySpec>,
    /// Service ports that are gone, in key order.
    #[serde(default)]
    pub removed: Vec<ServiceKey>,
    /// Service ports that are new or changed (each replaces the one with its key), in key
    /// order.
    #[serde(default)]
    pub upserted: Vec<Arc<ServiceSpec>>,
}

/// Why a [`TableDelta`] does not apply to a table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// `removed` or `upserted` is not in strictly increasing key order.
    #[error("the delta's {0} Service ports are not in strictly increasing key order")]
    Unordered(&'static str),
    /// A removed Service port is not in the table.
    #[error("the delta removes Service port {0:?}, which the table does not have")]
    NotThere(String),
    /// The same Service port is both removed and upserted.
    #[error("the delta both removes and upserts Service port {0:?}")]
    Both(String),
}

fn strictly_ordered<'a>(keys: impl Iterator<Item = (&'a str, Protocol, bool)>) -> bool {
    let mut last: Option<(&str, Protocol, bool)> = None;
    for k in keys {
        if last.is_some_and(|l| l >= k) {
            return false;
        }
        last = Some(k);
    }
    true
}

impl TableDelta {
    /// What turns `old` into `new`; both in canonical order (see [`TableSpec::services`]).
    /// Service ports are compared by pointer first, so tables that share most of their
    /// entries (as control's successive tables do) are compared in time proportional to
    /// their Service count, with a deep comparison only where pointers differ.
    pub fn between(old: &TableSpec, new: &TableSpec) -> TableDelta {
        fn changed<T: PartialEq + Clone>(old: &T, new: &T) -> Option<T> {
            (old != new).then(|| new.clone())
        }
        let mut d = TableDelta {
            node: changed(&old.node, &new.node),
            cluster: changed(&old.cluster, &new.cluster),
            local_pods: changed(&old.local_pods, &new.local_pods),
            remote_nodes: changed(&old.remote_nodes, &new.remote_nodes),
            policy: changed(&old.policy, &new.policy),
            ..TableDelta::default()
        };
        let (mut a, mut b) = (
            old.services.iter().peekable(),
            new.services.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), None) => {
                    d.removed.push(x.key());
                    a.next();
                }
                (None, Some(y)) => {
                    d.upserted.push(Arc::clone(y));
                    b.next();
                }
                // The same allocation: the same entry, found without reading it (most
                // entries of successive tables are shared).
                (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) => match x.key_ref().cmp(&y.key_ref()) {
                    Ordering::Less => {
                        d.removed.push(x.key());
                        a.next();
                    }
                    Ordering::Greater => {
                        d.upserted.push(Arc::clone(y));
                        b.next();
                    }
                    Ordering::Equal => {
                        if x != y {
                            d.upserted.push(Arc::clone(y));
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        d
    }

    /// Whether applying it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.cluster.is_none()
            && self.local_pods.is_none()
            && self.remote_nodes.is_none()
            && self.policy.is_none()
            && self.removed.is_empty()
            && self.upserted.is_empty()
    }

    /// Whether the set of Service frontends (or what decides the uplink's filter: the
    /// node, the cluster settings) may differ after it, compared with `old`'s services.
    pub fn changes_frontends(&self, old: &TableSpec) -> bool {
        if self.node.is_some() || self.cluster.is_some() || !self.removed.is_empty() {
            return true;
        }
        self.upserted.iter().any(|u| {
            match old
                .services
                .binary_search_by(|s| s.key_ref().cmp(&u.key_ref()))
            {
                Ok(i) => old.services[i].frontends != u.frontends,
                Err(_) => true,
            }
        })
    }
}

/// How one Service port of the old table fares in a delta, in the order of the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep<'a> {
    /// Kept as it was: the old index.
    Kept(usize),
    /// Replaced: the old index and its successor.
    Replaced(usize, &'a Arc<ServiceSpec>),
    /// Removed: the old index.
    Removed(usize),
    /// New.
    Added(&'a Arc<ServiceSpec>),
}

impl TableSpec {
    /// Sorts the Service ports into canonical order (see [`TableSpec::services`]). Stable:
    /// of two entries with the same key (which [`TableSpec::validate`] refuses) the first
    /// stays first.
    pub fn sort_services(&mut self) {
        self.services.sort_by(|a, b| a.key_ref().cmp(&b.key_ref()));
    }

    /// Walks the merge of `delta` into this table's Service ports in key order: `step` is
    /// called once per old entry and once per new one. Checks the delta as it goes.
    pub fn merge_services<'a>(
        &self,
        delta: &'a TableDelta,
        mut step: impl FnMut(MergeStep<'a>),
    ) -> Result<(), DeltaError> {
        if !strictly_ordered(delta.removed.iter().map(ServiceKey::as_ref)) {
            return Err(DeltaError::Unordered("removed"));
        }
        if !strictly_ordered(delta.upserted.iter().map(|s| s.key_ref())) {
            return Err(DeltaError::Unordered("upserted"));
        }
        let mut removed = delta.removed.iter().peekable();
        let mut upserted = delta.upserted.iter().peekable();
        for (i, old) in self.services.iter().enumerate() {
            if removed.peek().is_none() && upserted.peek().is_none() {
                // Nothing left to merge: the rest is kept, without reading it.
                (i..self.services.len()).for_each(|i| step(MergeStep::Kept(i)));
                return Ok(());
            }
            let k = old.key_ref();
            while let Some(u) = upserted.next_if(|u| u.key_ref() < k) {
                if removed.peek().is_some_and(|r| r.as_ref() == u.key_ref()) {
                    return Err(DeltaError::Both(u.name.clone()));
                }
                step(MergeStep::Added(u));
            }
            if let Some(r) = removed.peek() {
                if r.as_ref() < k {
                    return Err(DeltaError::NotThere(r.name.clone()));
                }
            }
            let gone = removed.next_if(|r| r.as_ref() == k).is_some();
            let replacement = upserted.next_if(|u| u.key_ref() == k);
            match (gone, replacement) {
                (true, Some(u)) => return Err(DeltaError::Both(u.name.clone())),
                (true, None) => step(MergeStep::Removed(i)),
                (false, Some(u)) => step(MergeStep::Replaced(i, u)),
                (false, None) => step(MergeStep::Kept(i)),
            }
        }
        if let Some(r) = removed.next() {
            return Err(DeltaError::NotThere(r.name.clone()));
        }
        for u in upserted {
            step(MergeStep::Added(u));
        }
        Ok(())
    }

    /// This table with `delta` applied.
    pub fn apply(&self, delta: &TableDelta) -> Result<TableSpec, DeltaError> {
        let mut services = Vec::with_capacity(self.services.len() + delta.upserted.len());
        self.merge_services(delta, |step| match step {
            MergeStep::Kept(i) => services.push(Arc::clone(&self.services[i])),
            MergeStep::Replaced(_, s) | MergeStep::Added(s) => services.push(Arc::clone(s)),
            MergeStep::Removed(_) => {}
        })?;
        Ok(TableSpec {
            node: delta.node.clone().unwrap_or_else(|| self.node.clone()),
            cluster: delta
                .cluster
                .clone()
                .unwrap_or_else(|| self.cluster.clone()),
            services,
            local_pods: delta
                .local_pods
                .clone()
                .unwrap_or_else(|| self.local_pods.clone()),
            remote_nodes: delta
                .remote_nodes
                .clone()
                .unwrap_or_else(|| self.remote_nodes.clone()),
            policy: delta.policy.clone().unwrap_or_else(|| self.policy.clone()),
        })
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;
    use crate::spec::service::{EndpointSpec, FrontendKind, FrontendSpec};
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn svc(name: &str, protocol: Protocol, v6: bool, endpoints: u8) -> ServiceSpec {
        let ip: IpAddr = if v6 {
            "fd00:172:30::1".parse().unwrap()
        } else {
            "172.30.0.1".parse().unwrap()
        };
        let ep = |i: u8| EndpointSpec {
            ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, i)),
            port: 8080,
            local: false,
            ready: true,
            serving: true,
            terminating: false,
        };
        let eps: Vec<EndpointSpec> = (0..endpoints).map(ep).collect();
        ServiceSpec {
            name: name.into(),
            protocol,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip,
                port: 80,
            }],
            cluster_endpoints: eps.clone(),
            all_endpoints: eps,
            ..ServiceSpec::default()
        }
    }

    /// A table from (name index, protocol, family, endpoint count) entries.
    fn table(entries: &[(u8, u8, bool, u8)]) -> TableSpec {
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
        let mut t = TableSpec::default();
        for &(n, p, v6, e) in entries {
            t.services.push(Arc::new(svc(
                &format!("ns/s{n}:p"),
                protocols[p as usize % 3],
                v6,
                e,
            )));
        }
        t.sort_services();
        t.services.dedup_by(|a, b| a.key_ref() == b.key_ref());
        t
    }

    proptest! {
        #[test]
        fn applying_the_delta_between_two_tables_gives_the_second(
            a in prop::collection::vec((0u8..20, 0u8..3, any::<bool>(), 0u8..4), 0..30),
            b in prop::collection::vec((0u8..20, 0u8..3, any::<bool>(), 0u8..4), 0..30),
            pods in any::<bool>(),
        ) {
            let old = table(&a);
            let mut new = table(&b);
            if pods {
                new.local_pods.push(PodSpec {
                    name: "ns/p".into(),
                    ips: vec!["10.244.1.9".parse().unwrap()],
                    labels: Default::default(),
                });
            }
            let d = TableDelta::between(&old, &new);
            prop_assert_eq!(d.is_empty(), old == new);
            prop_assert_eq!(d.local_pods.is_some(), pods);
            prop_assert!(d.node.is_none() && d.policy.is_none());
            prop_assert_eq!(old.apply(&d).unwrap(), new.clone());
            // Sent as JSON, the same.
            let wire: TableDelta = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            prop_assert_eq!(old.apply(&wire).unwrap(), new);
        }
    }

    #[test]
    fn only_what_changed_is_in_the_delta() {
        let old = table(&[(1, 0, false, 2), (2, 0, false, 2), (3, 1, true, 1)]);
        let mut new = old.clone();
        Arc::make_mut(&mut new.services[1]).cluster_endpoints.pop();
        let d = TableDelta::between(&old, &new);
        assert!(d.removed.is_empty());
        assert_eq!(d.upserted.len(), 1);
        assert_eq!(d.upserted[0].name, "ns/s2:p");
        assert!(!d.changes_frontends(&old), "only endpoints changed");
        // A copy that is equal but not shared is not sent either.
        let mut copy = old.clone();
        copy.services[0] = Arc::new((*old.services[0]).clone());
        assert!(TableDelta::between(&old, &copy).is_empty());
    }

    #[test]
    fn a_delta_that_does_not_fit_the_table_is_refused() {
        let old = table(&[(1, 0, false, 2), (2, 0, false, 2)]);
        let gone = ServiceKey {
            name: "ns/s9:p".into(),
            protocol: Protocol::Tcp,
            ipv6: false,
        };
        let d = TableDelta {
            removed: vec![gone.clone()],
            ..Default::default()
        };
        assert_eq!(old.apply(&d), Err(DeltaError::NotThere("ns/s9:p".into())));
        let both = TableDelta {
            removed: vec![old.services[0].key()],
            upserted: vec![old.services[0].clone()],
            ..Default::default()
        };
        assert!(matches!(old.apply(&both), Err(DeltaError::Both(_))));
        let unordered = TableDelta {
            upserted: vec![old.services[1].clone(), old.services[0].clone()],
            ..Default::default()
        };
        assert_eq!(
            old.apply(&unordered),
            Err(DeltaError::Unordered("upserted"))
        );
        let mut moved = (*old.services[0]).clone();
        moved.frontends[0].port = 81;
        let d = TableDelta {
            upserted: vec![Arc::new(moved)],
            ..Default::default()
        };
        assert!(d.changes_frontends(&old));
    }
}
