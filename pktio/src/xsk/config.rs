//! What kxdp's XDP program is told, as values: which frames it steers to AF_XDP, and the
//! filter tables of a filtering interface. [`super::filter`] writes them into the
//! program's maps; [`super::bpf`] keeps the [`Installed`] mirror under the program's lock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// What the program sends to AF_XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steering {
    /// Only what the filter tables name; the rest passes to the kernel (the uplink).
    Filter,
    /// Every frame (pod-facing ports, where kxdp is the only router).
    RedirectAll,
}

impl Steering {
    /// The value of `kxdp_config.steering` (`STEER_*` in the C source).
    pub(super) fn code(self) -> u32 {
        match self {
            Steering::Filter => 0,
            Steering::RedirectAll => 1,
        }
    }
}

/// A transport protocol of a port entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
    /// ICMP echo (1) or ICMPv6 echo (58), by address family; the "port" is the echo
    /// identifier, matched on echo replies only (a ping to the node still reaches the
    /// kernel), as masquerade allocates identifiers like ports.
    IcmpEcho,
}

impl Protocol {
    /// The IP protocol number for an address of `addr`'s family.
    pub fn number(self, addr: IpAddr) -> u8 {
        match (self, addr) {
            (Protocol::Tcp, _) => 6,
            (Protocol::Udp, _) => 17,
            (Protocol::Sctp, _) => 132,
            (Protocol::IcmpEcho, IpAddr::V4(_)) => 1,
            (Protocol::IcmpEcho, IpAddr::V6(_)) => 58,
        }
    }
}

/// A whole set of filter tables, for [`XdpProgram::replace_tables`] and as
/// [`XdpProgram::tables`] reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterTables {
    /// Destinations whose every packet is kxdp's: Service addresses (ClusterIP, load
    /// balancer, external) as /32 or /128, pod networks.
    pub prefixes: BTreeSet<IpNet>,
    /// (destination, protocol, port) entries: NodePorts on each node address.
    pub ports: BTreeSet<(IpAddr, Protocol, u16)>,
    /// Port ranges per (destination, protocol), inclusive: masquerade source ports on the
    /// node address. One range per pair.
    pub port_ranges: BTreeMap<(IpAddr, Protocol), RangeInclusive<u16>>,
    /// Addresses kxdp answers ARP and neighbour discovery for, on this interface.
    pub owned: BTreeSet<IpAddr>,
    /// The node's addresses that VXLAN to `vxlan_port` is accepted on.
    pub node_addresses: BTreeSet<IpAddr>,
    /// The VXLAN UDP port; 0 redirects no VXLAN.
    pub vxlan_port: u16,
}

/// What is installed in the maps, mirrored under the program's lock.
#[derive(Debug)]
pub(super) struct Installed {
    pub(super) steering: Steering,
    pub(super) tables: FilterTables,
    /// Whether frames are stamped with the time the program saw them.
    pub(super) stamp: bool,
}

impl Installed {
    pub(super) fn new(steering: Steering) -> Installed {
        Installed {
            steering,
            tables: FilterTables::default(),
            stamp: false,
        }
    }

    /// `struct kxdp_config` with the steering, the VXLAN port and the stamping as
    /// installed.
    pub(super) fn config_value(&self) -> [u8; 12] {
        config_value(self.steering, self.tables.vxlan_port, self.stamp)
    }
}

/// `struct kxdp_config`: the steering, the VXLAN port (host order) and the stamping, as
/// u32s.
pub(super) fn config_value(steering: Steering, vxlan_port: u16, stamp: bool) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&steering.code().to_ne_bytes());
    v[4..8].copy_from_slice(&u32::from(vxlan_port).to_ne_bytes());
    v[8..].copy_from_slice(&u32::from(stamp).to_ne_bytes());
    v
}
