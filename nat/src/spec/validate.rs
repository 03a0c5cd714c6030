//! What the dataplane checks in a table or a delta before it touches its state: a table
//! that fails is refused whole, with the first reason found.

use super::delta::TableDelta;
use super::policy::PolicySpec;
use super::service::{ServiceSpec, MAX_ENDPOINTS};
use super::table::{ClusterSpec, TableSpec};

impl TableSpec {
    /// Checks what the dataplane relies on before a table touches its state; a table
    /// that fails is refused whole, with the first reason found.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(w) = self
            .services
            .windows(2)
            .find(|w| w[0].key_ref() >= w[1].key_ref())
        {
            return Err(if w[0].key_ref() == w[1].key_ref() {
                format!(
                    "Service port {} ({:?}) is listed twice",
                    w[1].name, w[1].protocol
                )
            } else {
                format!(
                    "Service ports out of order: {} before {} (sort them by name, protocol, family)",
                    w[0].name, w[1].name
                )
            });
        }
        validate_cluster(&self.cluster)?;
        self.services.iter().try_for_each(|s| validate_service(s))?;
        validate_policy(&self.policy)
    }

    /// [`TableSpec::validate`] of `delta` applied to this table, which is valid, checking
    /// only what the delta brings (its order and the merge are checked by
    /// [`TableSpec::apply`]).
    pub fn validate_delta(&self, delta: &TableDelta) -> Result<(), String> {
        if let Some(c) = &delta.cluster {
            validate_cluster(c)?;
        }
        delta
            .upserted
            .iter()
            .try_for_each(|s| validate_service(s))?;
        match &delta.policy {
            Some(p) => validate_policy(p),
            None => Ok(()),
        }
    }
}

fn validate_cluster(c: &ClusterSpec) -> Result<(), String> {
    if c.vxlan_vni >= 1 << 24 {
        return Err(format!("VXLAN VNI {} needs more than 24 bits", c.vxlan_vni));
    }
    Ok(())
}

fn validate_service(s: &ServiceSpec) -> Result<(), String> {
    if s.name.is_empty() {
        return Err("a Service port without a name".into());
    }
    for list in [&s.cluster_endpoints, &s.local_endpoints, &s.all_endpoints] {
        if list.len() > MAX_ENDPOINTS {
            return Err(format!(
                "{}: {} endpoints, at most {MAX_ENDPOINTS}",
                s.name,
                list.len()
            ));
        }
    }
    if let Some(e) = s.local_endpoints.iter().find(|e| !e.local) {
        return Err(format!(
            "{}: endpoint {} listed as local is not",
            s.name, e.ip
        ));
    }
    Ok(())
}

fn validate_policy(policy: &PolicySpec) -> Result<(), String> {
    let policies = policy.policies.len();
    for p in &policy.pods {
        for iso in [&p.ingress, &p.egress].into_iter().flatten() {
            let bad = iso
                .policies
                .iter()
                .chain(iso.rules.iter().map(|r| &r.policy))
                .find(|&&i| i as usize >= policies);
            if let Some(i) = bad {
                return Err(format!(
                    "pod {}: policy index {i}, but the table names {policies} policies",
                    p.pod
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod validate_tests {
    use super::*;
    use crate::spec::policy::{IsolationSpec, PodPolicySpec};
    use crate::spec::protocol::Protocol;
    use crate::spec::service::{EndpointSpec, FrontendKind, FrontendSpec};
    use std::sync::Arc;

    fn svc(name: &str, ip: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            protocol: Protocol::Tcp,
            frontends: vec![FrontendSpec {
                kind: FrontendKind::ClusterIp,
                ip: ip.parse().unwrap(),
                port: 80,
            }],
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn bad_tables_are_refused_with_a_reason() {
        let mut t = TableSpec {
            services: vec![
                Arc::new(svc("a/x:p", "172.30.0.1")),
                Arc::new(svc("a/y:p", "172.30.0.2")),
            ],
            ..Default::default()
        };
        assert_eq!(t.validate(), Ok(()));
        Arc::make_mut(&mut t.services[1])
            .local_endpoints
            .push(EndpointSpec {
                ip: "10.244.2.5".parse().unwrap(),
                port: 80,
                local: false,
                ready: true,
                serving: true,
                terminating: false,
            });
        assert!(t.validate().unwrap_err().contains("listed as local"));
        t.services.pop();
        t.cluster.vxlan_vni = 1 << 24;
        assert!(t.validate().unwrap_err().contains("VNI"));
        t.cluster.vxlan_vni = 1;
        t.policy.pods.push(PodPolicySpec {
            pod: "a/p".into(),
            ips: vec![],
            ingress: Some(IsolationSpec {
                policies: vec![3],
                rules: vec![],
            }),
            egress: None,
        });
        assert!(t.validate().unwrap_err().contains("policy index 3"));
    }

    #[test]
    fn services_listed_twice_or_out_of_order_are_refused() {
        let mut t = TableSpec {
            services: vec![
                Arc::new(svc("a/y:p", "172.30.0.2")),
                Arc::new(svc("a/x:p", "172.30.0.1")),
            ],
            ..Default::default()
        };
        assert!(t.validate().unwrap_err().contains("out of order"));
        t.sort_services();
        assert_eq!(t.validate(), Ok(()));
        t.services.push(Arc::new(svc("a/y:p", "172.30.0.3")));
        assert!(t.validate().unwrap_err().contains("listed twice"));
    }
}
