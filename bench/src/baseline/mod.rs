//! The kernel baselines: the rulesets kube-proxy would write for the same Services and
//! EndpointSlices kxdp is given, in its iptables mode ([`iptables`]) and its nftables mode
//! ([`nftables`]).
//!
//! Both generators start from the [`nat::spec::TableSpec`] control computes, so the kernel
//! and kxdp are measured on exactly the same Services and endpoints. They reproduce
//! kube-proxy's full-sync output for one IP family (IPv4): the chains, rules, comments,
//! probabilities, chain-name hashes and masquerade mark kube-proxy writes, so a benchmark
//! against them is a benchmark against kube-proxy, not against a hand-made shortcut.
//!
//! What they do not reproduce: rules kube-proxy takes from objects the spec does not carry
//! (`loadBalancerSourceRanges`, `healthCheckNodePort`), nfacct counters (kube-proxy only
//! uses them when the kernel has `nfnetlink_acct`), and the order of Services, which in
//! kube-proxy follows Go's randomised map iteration (here: the spec's order).

pub mod hash;
pub mod iptables;
pub mod nftables;

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use nat::spec::{EndpointSpec, FrontendKind, ServiceSpec, TableSpec};

/// kube-proxy's settings that change the rules it writes, with kube-proxy's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `--masquerade-all`: mark every ClusterIP packet for SNAT.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit`: the bit of the packet mark that asks for SNAT (default
    /// 14, i.e. 0x4000).
    pub masquerade_bit: u32,
    /// `--cluster-cidr` with `--detect-local-mode=ClusterCIDR` (the default): traffic from
    /// outside it to a ClusterIP is masqueraded. `None` writes no such rule.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The ClusterIP ranges (nftables mode drops traffic to unallocated ClusterIPs in them).
    pub service_cidrs: Vec<Ipv4Net>,
    /// `--nodeport-addresses`; empty means every local address.
    pub nodeport_addresses: Vec<Ipv4Net>,
    /// This node's IPv4 addresses (NodePort rules when `nodeport_addresses` is set).
    pub node_ips: Vec<Ipv4Addr>,
    /// `--iptables-localhost-nodeports` (default true); only effective when
    /// `nodeport_addresses` contains 127.0.0.1, as in kube-proxy.
    pub localhost_nodeports: bool,
    /// iptables supports `--random-fully` (every iptables since 1.6.2 does).
    pub random_fully: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set (then kube-proxy writes no DROP
    /// rule for conntrack-INVALID packets).
    pub conntrack_tcp_liberal: bool,
}

impl Default for KubeProxyConfig {
    fn default() -> Self {
        KubeProxyConfig {
            masquerade_all: false,
            masquerade_bit: 14,
            cluster_cidr: None,
            service_cidrs: Vec::new(),
            nodeport_addresses: Vec::new(),
            node_ips: Vec::new(),
            localhost_nodeports: true,
            random_fully: true,
            conntrack_tcp_liberal: false,
        }
    }
}

impl KubeProxyConfig {
    /// The settings a kube-proxy would run with next to kxdp for `spec`: the cluster's
    /// first IPv4 pod network as `--cluster-cidr`, its masquerade-all and NodePort address
    /// settings, the node's IPv4 addresses; everything else at kube-proxy's defaults.
    pub fn for_spec(spec: &TableSpec) -> KubeProxyConfig {
        let v4 = |n: &ipnet::IpNet| match n {
            ipnet::IpNet::V4(n) => Some(*n),
            ipnet::IpNet::V6(_) => None,
        };
        KubeProxyConfig {
            masquerade_all: spec.cluster.masquerade_all,
            cluster_cidr: spec.cluster.cluster_cidrs.iter().find_map(v4),
            service_cidrs: spec.cluster.service_cidrs.iter().filter_map(v4).collect(),
            nodeport_addresses: spec
                .cluster
                .nodeport_addresses
                .iter()
                .filter_map(v4)
                .collect(),
            node_ips: spec
                .node
                .addresses
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect(),
            ..KubeProxyConfig::default()
        }
    }

    /// The mark as kube-proxy prints it: `fmt.Sprintf("%#08x", 1<<bit)`, so `0x004000`.
    pub fn masquerade_mark(&self) -> String {
        format!("{:#08x}", 1u32 << self.masquerade_bit.min(31))
    }

    /// No `--nodeport-addresses`, or one that contains 0.0.0.0/0: NodePorts on every local
    /// address.
    pub fn nodeports_match_all(&self) -> bool {
        self.nodeport_addresses.is_empty()
            || self.nodeport_addresses.iter().any(|n| n.prefix_len() == 0)
    }

    /// Whether NodePorts answer on 127.0.0.1 (iptables mode only).
    pub fn localhost_nodeports_effective(&self) -> bool {
        let loopback = Ipv4Addr::new(127, 0, 0, 1);
        self.localhost_nodeports
            && (self.nodeport_addresses.is_empty()
                || self
                    .nodeport_addresses
                    .iter()
                    .any(|n| n.contains(&loopback)))
    }

    /// The node addresses NodePorts answer on when they do not match all.
    pub fn nodeport_ips(&self) -> Vec<Ipv4Addr> {
        self.node_ips
            .iter()
            .copied()
            .filter(|ip| self.nodeport_addresses.iter().any(|n| n.contains(ip)))
            .collect()
    }
}

/// One endpoint as kube-proxy prints it (`ip:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its target port.
    pub port: u16,
}

impl Endpoint {
    /// `net.JoinHostPort(ip, port)`.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// One Service port of one family, in the terms kube-proxy's proxiers work with.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port (may be empty).
    pub port_name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    /// The ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` of this family.
    pub lb_ips: Vec<Ipv4Addr>,
    /// The NodePort, if any.
    pub node_port: Option<u16>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (only meaningful when externally accessible).
    pub external_local: bool,
    /// Session affinity timeout, if `ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// Endpoints for Cluster policy, in kube-proxy's order (sorted by `ip:port` text).
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints for Local policy, same order.
    pub local_endpoints: Vec<Endpoint>,
    /// Whether any endpoint anywhere is usable (kube-proxy's `hasAnyEndpoints`).
    pub has_endpoints: bool,
    /// Every endpoint the slices list, usable or not (counts toward large-cluster mode).
    pub total_endpoints: usize,
}

impl ServicePort {
    /// `proxy.ServicePortName.String()`: `namespace/name`, then `:port` when the port is
    /// named.
    pub fn name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// NodePort, LoadBalancer IPs or externalIPs (`ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.lb_ips.is_empty() || !self.external_ips.is_empty()
    }

    /// Whether the external policy is Local (kube-proxy's `ExternalPolicyLocal`).
    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible() && self.external_local
    }

    /// `UsesClusterEndpoints`: internal policy Cluster, or any external access at all
    /// (external policy Local still short-circuits pod and host traffic to the Cluster
    /// endpoints).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible()
    }

    /// `UsesLocalEndpoints`.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.externally_accessible() && self.external_local)
    }

    /// The Cluster-policy endpoints kube-proxy uses (none when the policy is unused).
    pub fn cluster(&self) -> &[Endpoint] {
        if self.uses_cluster_endpoints() {
            &self.cluster_endpoints
        } else {
            &[]
        }
    }

    /// The Local-policy endpoints kube-proxy uses (none when the policy is unused).
    pub fn local(&self) -> &[Endpoint] {
        if self.uses_local_endpoints() {
            &self.local_endpoints
        } else {
            &[]
        }
    }

    /// `allLocallyReachableEndpoints`: the union of the used endpoint lists, sorted.
    pub fn reachable(&self) -> Vec<Endpoint> {
        let mut all: Vec<Endpoint> = self.cluster().to_vec();
        for e in self.local() {
            if !all.contains(e) {
                all.push(e.clone());
            }
        }
        all.sort_by_key(Endpoint::host_port);
        all
    }
}

/// The IPv4 Service ports of `spec`, in the spec's order. A Service port whose ClusterIP is
/// IPv6 belongs to the other family's proxier and is left out.
pub fn service_ports(spec: &TableSpec) -> Vec<ServicePort> {
    spec.services
        .iter()
        .filter_map(|s| service_port(s))
        .collect()
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

fn endpoints(list: &[EndpointSpec]) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = list
        .iter()
        .filter_map(|e| {
            Some(Endpoint {
                ip: v4(e.ip)?,
                port: e.port,
            })
        })
        .collect();
    // endpointslicecache.go sorts each Service port's endpoints by their String().
    out.sort_by_key(Endpoint::host_port);
    out.dedup();
    out
}

fn service_port(s: &ServiceSpec) -> Option<ServicePort> {
    let cluster_ip = s
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .and_then(|f| v4(f.ip))?;
    let port = s
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)?
        .port;
    let of = |kind: FrontendKind| -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = s
            .frontends
            .iter()
            .filter(|f| f.kind == kind)
            .filter_map(|f| v4(f.ip))
            .collect();
        ips.dedup();
        ips
    };
    let node_port = s
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::NodePort)
        .map(|f| f.port);
    // control names a Service port `namespace/name:portName`, the colon always present.
    let (svc, port_name) = s.name.rsplit_once(':').unwrap_or((s.name.as_str(), ""));
    let (namespace, name) = svc.split_once('/').unwrap_or(("", svc));
    let protocol = match s.protocol {
        nat::spec::Protocol::Tcp => "tcp",
        nat::spec::Protocol::Udp => "udp",
        nat::spec::Protocol::Sctp => "sctp",
    };
    let cluster_endpoints = endpoints(&s.cluster_endpoints);
    let usable = |e: &&EndpointSpec| e.ready || (e.serving && e.terminating);
    let has_endpoints = !cluster_endpoints.is_empty()
        || s.all_endpoints
            .iter()
            .filter(usable)
            .any(|e| e.ip.is_ipv4());
    Some(ServicePort {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port_name: port_name.to_string(),
        protocol,
        cluster_ip,
        port,
        external_ips: of(FrontendKind::ExternalIp),
        lb_ips: of(FrontendKind::LoadBalancer),
        node_port,
        internal_local: s.internal_local,
        external_local: s.external_local,
        affinity_timeout_s: s.affinity_timeout_s,
        local_endpoints: endpoints(&s.local_endpoints),
        cluster_endpoints,
        has_endpoints,
        total_endpoints: s.all_endpoints.len().max(s.cluster_endpoints.len()),
    })
}
