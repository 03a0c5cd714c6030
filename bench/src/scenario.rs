//! Service sets for benchmarks and tests: N Services with M endpoints each, written as the
//! Kubernetes objects an API server would hold and turned into a [`TableSpec`] by control's
//! own table computation, so kxdp and the kernel baselines get the same input the real
//! control path would produce.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use nat::spec::{ClusterSpec, TableSpec};

/// Node name used by every scenario.
pub const NODE: &str = "bench-node";
/// The node's InternalIP (its uplink address in the bench topology).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

/// A set of ClusterIP Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSet {
    /// How many Services (each with one port).
    pub services: u32,
    /// Ready endpoints per Service.
    pub endpoints: u32,
    /// Protocol of every Service port: `TCP` or `UDP`.
    pub protocol: &'static str,
    /// Service port.
    pub port: u16,
    /// Endpoint (target) port.
    pub target_port: u16,
    /// ClusterIP of Service 0; Service i has the i-th address after it.
    pub first_cluster_ip: Ipv4Addr,
    /// Address of endpoint 0 of Service 0; endpoints are numbered consecutively across
    /// Services (Service i, endpoint j is address `first + i * endpoints + j`).
    pub first_endpoint: Ipv4Addr,
    /// The node's pod network, which is also the cluster's (one node): endpoints inside it
    /// are the node's own pods.
    pub pod_cidr: Ipv4Net,
    /// The Service ClusterIP range.
    pub service_cidr: Ipv4Net,
    /// The node's InternalIP (its uplink address).
    pub node_ip: Ipv4Addr,
}

impl Default for ServiceSet {
    fn default() -> Self {
        ServiceSet {
            services: 1,
            endpoints: 10,
            protocol: "UDP",
            port: 80,
            target_port: 8080,
            first_cluster_ip: Ipv4Addr::new(172, 30, 0, 10),
            first_endpoint: Ipv4Addr::new(10, 244, 1, 10),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("literal"),
            service_cidr: Ipv4Net::new(Ipv4Addr::new(172, 30, 0, 0), 16).expect("literal"),
            node_ip: NODE_IP,
        }
    }
}

/// Why a scenario could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// An address ran past the end of IPv4.
    #[error("{what}: {count} addresses from {first} run past 255.255.255.255; start lower or ask for fewer")]
    AddressSpace {
        /// Which addresses.
        what: &'static str,
        /// The first one.
        first: Ipv4Addr,
        /// How many were needed.
        count: u64,
    },
    /// The generated manifests did not load (a bug in this module).
    #[error("generated manifests did not load: {0}")]
    Manifests(String),
    /// Control refused to compute tables.
    #[error("control could not compute tables: {0}")]
    Tables(#[from] control::TableError),
}

fn nth(first: Ipv4Addr, n: u64, what: &'static str, count: u64) -> Result<Ipv4Addr, ScenarioError> {
    u32::from(first)
        .checked_add(u32::try_from(n).unwrap_or(u32::MAX))
        .map(Ipv4Addr::from)
        .ok_or(ScenarioError::AddressSpace { what, first, count })
}

impl ServiceSet {
    /// ClusterIP of Service `i`.
    pub fn cluster_ip(&self, i: u32) -> Result<Ipv4Addr, ScenarioError> {
        nth(
            self.first_cluster_ip,
            u64::from(i),
            "ClusterIPs",
            u64::from(self.services),
        )
    }

    /// Address of endpoint `j` of Service `i`.
    pub fn endpoint(&self, i: u32, j: u32) -> Result<Ipv4Addr, ScenarioError> {
        let count = u64::from(self.services) * u64::from(self.endpoints);
        nth(
            self.first_endpoint,
            u64::from(i) * u64::from(self.endpoints) + u64::from(j),
            "endpoint addresses",
            count,
        )
    }

    /// Name of Service `i`.
    pub fn service_name(i: u32) -> String {
        format!("svc-{i}")
    }

    /// The Node, Namespace, Services and EndpointSlices as one multi-document YAML text.
    pub fn manifests(&self) -> Result<String, ScenarioError> {
        let mut y =
            String::with_capacity(self.services as usize * (400 + 90 * self.endpoints as usize));
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nspec: {{podCIDR: {}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: bench}}\n",
            self.pod_cidr, self.node_ip
        );
        for i in 0..self.services {
            let name = Self::service_name(i);
            let cip = self.cluster_ip(i)?;
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  type: ClusterIP\n  clusterIP: {cip}\n  clusterIPs: [{cip}]\n  ports:\n  - {{name: p, port: {}, targetPort: {}, protocol: {}}}\n",
                self.port, self.target_port, self.protocol
            );
            let _ = write!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints:\n"
            );
            for j in 0..self.endpoints {
                let _ = writeln!(
                    y,
                    "- {{addresses: [{}], conditions: {{ready: true}}, nodeName: {NODE}}}",
                    self.endpoint(i, j)?
                );
            }
            let _ = write!(
                y,
                "ports:\n- {{name: p, port: {}, protocol: {}}}\n",
                self.target_port, self.protocol
            );
        }
        Ok(y)
    }

    /// The cluster settings: [`ClusterSpec::default`] with this set's pod network and
    /// Service range as the only IPv4 ones.
    pub fn cluster(&self) -> ClusterSpec {
        let mut c = ClusterSpec::default();
        c.cluster_cidrs.retain(|n| !matches!(n, IpNet::V4(_)));
        c.cluster_cidrs.insert(0, IpNet::V4(self.pod_cidr));
        c.service_cidrs.retain(|n| !matches!(n, IpNet::V4(_)));
        c.service_cidrs.insert(0, IpNet::V4(self.service_cidr));
        c
    }

    /// [`ServiceSet::manifests`] loaded into control's object store, as control holds them
    /// after reading a directory or watching an API server.
    pub fn objects(&self) -> Result<control::Objects, ScenarioError> {
        let text = self.manifests()?;
        let mut objects = control::Objects::new();
        let mut errors = Vec::new();
        control::load_text(&mut objects, "bench-scenario.yaml", &text, &mut errors);
        if let Some(e) = errors.first() {
            return Err(ScenarioError::Manifests(e.to_string()));
        }
        Ok(objects)
    }

    /// The tables control computes from `objects` (see [`ServiceSet::objects`]).
    pub fn compute(&self, objects: &control::Objects) -> Result<TableSpec, ScenarioError> {
        let computed = control::compute_with_warnings(objects, NODE, &self.cluster())?;
        for w in &computed.warnings {
            log::warn!("{w}");
        }
        Ok(computed.tables)
    }

    /// The tables control computes from [`ServiceSet::manifests`].
    pub fn table_spec(&self) -> Result<TableSpec, ScenarioError> {
        self.compute(&self.objects()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sees_every_service_and_endpoint() {
        let set = ServiceSet {
            services: 3,
            endpoints: 4,
            ..ServiceSet::default()
        };
        let spec = set.table_spec().unwrap();
        let v4: Vec<_> = spec
            .services
            .iter()
            .filter(|s| s.frontends.iter().all(|f| f.ip.is_ipv4()))
            .collect();
        assert_eq!(v4.len(), 3);
        for s in v4 {
            assert_eq!(s.cluster_endpoints.len(), 4, "{}", s.name);
        }
        assert_eq!(set.endpoint(2, 3).unwrap(), Ipv4Addr::new(10, 244, 1, 21));
    }
}
