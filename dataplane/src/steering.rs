//! What the uplink's XDP program sends to kxdp, computed from the tables: everything kxdp
//! serves, and nothing else, so the node's own traffic (SSH, the kubelet, the API server,
//! DHCP, BGP, ARP for the node's addresses) stays with the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use nat::spec::{FrontendKind, Protocol};
use pktio::xsk::{FilterTables, Protocol as XdpProtocol, Steering, XdpMode, XdpProgram, XskError};

use crate::state::Limits;
use crate::tables::Tables;

/// How this dataplane loads kxdp's XDP program on an interface: the same for the uplink,
/// host ports and pods, at start, when a pod comes and when a successor takes over.
#[derive(Clone, Copy, Debug)]
pub struct XdpSetup {
    /// XSKMAP slots: one per worker (queue `w` to worker `w`).
    pub queues: u32,
    /// Native, generic, or native falling back to generic.
    pub mode: XdpMode,
    /// Whether every frame is stamped with the time the program saw it, for the workers'
    /// `rx_waited_*` counters (`--measure-ring-wait`).
    pub stamp: bool,
}

impl XdpSetup {
    /// The program for `ifindex`, its steering and stamping written, not attached (a
    /// successor's, to take a predecessor's link).
    pub fn load(&self, ifindex: u32, steering: Steering) -> Result<XdpProgram, XskError> {
        let program = XdpProgram::load_detached(ifindex, self.queues, steering)?;
        if self.stamp {
            program.set_stamp(true)?;
        }
        Ok(program)
    }

    /// The program for `ifindex`, loaded as [`XdpSetup::load`] does and attached.
    pub fn attach(&self, ifindex: u32, steering: Steering) -> Result<XdpProgram, XskError> {
        self.load(ifindex, steering)?.link_to(self.mode)
    }
}

/// The uplink filter's tables for `t`:
/// - every Service address that is not a node address (ClusterIPs, load-balancer and
///   external IPs), the Service ranges and this node's pod networks, whole;
/// - NodePorts on the node's addresses, by protocol and port;
/// - the masquerade port range on the node's addresses (TCP, UDP, SCTP, ICMP echo
///   identifiers), where replies to pods' outside connections come back;
/// - VXLAN to the node's addresses on the overlay's port;
/// - ARP and neighbour discovery for the Service addresses, and for 0.0.0.0: kxdp
///   resolves its next hops on the uplink with ARP probes (RFC 5227, sender 0.0.0.0),
///   whose replies are addressed to 0.0.0.0 — the kernel's own ARP stays the kernel's;
/// - neighbour discovery for kxdp's own link-local address on the uplink
///   ([`crate::neighbors::uplink_link_local`] of `uplink_mac`): kxdp solicits its IPv6 next
///   hops from it, so their advertisements come back to it, and answers for it.
pub fn uplink_filter(t: &Tables, limits: &Limits, uplink_mac: [u8; 6]) -> FilterTables {
    let mut f = FilterTables::default();
    let node: BTreeSet<IpAddr> = t.node_addresses.iter().copied().collect();
    for svc in &t.spec.services {
        for fe in &svc.frontends {
            if node.contains(&fe.ip) {
                if fe.kind == FrontendKind::NodePort {
                    f.ports.insert((fe.ip, xdp_protocol(svc.protocol), fe.port));
                }
                continue;
            }
            f.prefixes.insert(IpNet::from(fe.ip));
            f.owned.insert(fe.ip);
        }
    }
    for net in t.spec.cluster.service_cidrs.iter().chain(&t.pod_cidrs) {
        f.prefixes.insert(net.trunc());
    }
    let (first, last) = limits.egress_masquerade_ports;
    let mut ranges = BTreeMap::new();
    for a in &node {
        for p in [
            XdpProtocol::Tcp,
            XdpProtocol::Udp,
            XdpProtocol::Sctp,
            XdpProtocol::IcmpEcho,
        ] {
            ranges.insert((*a, p), first..=last);
        }
    }
    f.port_ranges = ranges;
    f.node_addresses = node;
    f.vxlan_port = t.spec.cluster.vxlan_port;
    f.owned.insert(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    f.owned
        .insert(IpAddr::V6(crate::neighbors::uplink_link_local(uplink_mac)));
    f
}

/// What the host redirect ([`pktio::xsk::HostRedirect`], on the egress of `lo` and the
/// uplink) hands to kxdp: the frontends a host process would not reach otherwise —
/// NodePorts on the node's own addresses (the kernel delivers those locally) and
/// load-balancer and external IPs (the kernel routes those out of the uplink) — by
/// destination, protocol and port. ClusterIPs and pod networks need no entry: the node's
/// routes send them to the host pair.
pub fn host_redirect_ports(t: &Tables) -> BTreeSet<(IpAddr, XdpProtocol, u16)> {
    let node: BTreeSet<IpAddr> = t.node_addresses.iter().copied().collect();
    let mut out = BTreeSet::new();
    for svc in &t.spec.services {
        for fe in &svc.frontends {
            let wanted = match fe.kind {
                FrontendKind::NodePort => node.contains(&fe.ip),
                FrontendKind::LoadBalancer | FrontendKind::ExternalIp => true,
                FrontendKind::ClusterIp => false,
            };
            if wanted {
                out.insert((fe.ip, xdp_protocol(svc.protocol), fe.port));
            }
        }
    }
    out
}

fn xdp_protocol(p: Protocol) -> XdpProtocol {
    match p {
        Protocol::Tcp => XdpProtocol::Tcp,
        Protocol::Udp => XdpProtocol::Udp,
        Protocol::Sctp => XdpProtocol::Sctp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat::spec::{EndpointSpec, FrontendSpec, NodeSpec, ServiceSpec, TableSpec};

    #[test]
    fn the_uplink_takes_services_nodeports_masquerade_replies_and_vxlan_only() {
        let ep = EndpointSpec {
            ip: "10.244.1.5".parse().unwrap(),
            port: 8080,
            local: true,
            ready: true,
            serving: true,
            terminating: false,
        };
        let fe = |kind, ip: &str, port| FrontendSpec {
            kind,
            ip: ip.parse().unwrap(),
            port,
        };
        let spec = TableSpec {
            node: NodeSpec {
                name: "node-a".into(),
                addresses: vec!["192.168.0.2".parse().unwrap()],
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                ..Default::default()
            },
            services: vec![std::sync::Arc::new(ServiceSpec {
                name: "default/web:http".into(),
                protocol: Protocol::Udp,
                frontends: vec![
                    fe(FrontendKind::ClusterIp, "172.30.0.41", 80),
                    fe(FrontendKind::NodePort, "192.168.0.2", 30080),
                    fe(FrontendKind::LoadBalancer, "1.2.3.4", 80),
                ],
                cluster_endpoints: vec![ep.clone()],
                local_endpoints: vec![ep.clone()],
                all_endpoints: vec![ep],
                ..ServiceSpec::default()
            })],
            ..Default::default()
        };
        let t = Tables::compile(1, spec, (251, false), Some([2, 0, 0, 0, 0, 1]));
        let f = uplink_filter(&t, &Limits::default(), [2, 0, 0, 0, 0, 1]);
        let node: IpAddr = "192.168.0.2".parse().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(f.prefixes.contains(&net("172.30.0.41/32")));
        assert!(f.prefixes.contains(&net("1.2.3.4/32")));
        assert!(f.prefixes.contains(&net("10.244.1.0/24")), "pod network");
        assert!(f.prefixes.contains(&net("172.30.0.0/16")), "Service range");
        assert!(
            !f.prefixes.iter().any(|p| p.contains(&node)),
            "the node's address is the kernel's: {:?}",
            f.prefixes
        );
        assert_eq!(
            f.ports.iter().copied().collect::<Vec<_>>(),
            [(node, XdpProtocol::Udp, 30080)],
            "the NodePort, by protocol"
        );
        assert_eq!(
            f.port_ranges.len(),
            4,
            "masquerade replies: TCP, UDP, SCTP, echo"
        );
        assert_eq!(f.port_ranges[&(node, XdpProtocol::Tcp)], 61000..=65535);
        assert!(f.owned.contains(&"1.2.3.4".parse().unwrap()));
        assert!(
            f.owned.contains(&IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            "ARP probe replies"
        );
        assert!(!f.owned.contains(&node));
        assert!(
            f.owned
                .contains(&"fe80::6b78:6470:0:1".parse::<IpAddr>().unwrap()),
            "kxdp's link-local address, for its neighbour discovery: {:?}",
            f.owned
        );
        assert_eq!(f.node_addresses.iter().copied().collect::<Vec<_>>(), [node]);
        assert_eq!(f.vxlan_port, 8472);
        // The host redirect: the NodePort on the node's address and the load-balancer
        // IP, not the ClusterIP.
        assert_eq!(
            host_redirect_ports(&t).into_iter().collect::<Vec<_>>(),
            [
                ("1.2.3.4".parse().unwrap(), XdpProtocol::Udp, 80),
                (node, XdpProtocol::Udp, 30080)
            ]
        );
    }
}
