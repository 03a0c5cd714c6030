//! Where a packet leaving this node goes next: the node's own routes out of the uplink
//! (for traffic leaving the cluster) and the other nodes' pod networks behind the overlay.
//! Both are plain lookups built elsewhere: the uplink's from the text of the kernel's route
//! files, which the binary reads; the other nodes' from control's spec, with each table
//! generation.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nat::tables::{net_contains, BuildFastHasher};

/// The node's routes out of the uplink (connected networks and gateways, IPv4 and IPv6),
/// as the kernel of the node's namespace has them at start: where traffic leaving the
/// cluster goes next. Longest prefix first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UplinkRoutes {
    routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// `RTF_*` flags of `/proc/net/ipv6_route` (include/uapi/linux/ipv6_route.h).
const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

impl UplinkRoutes {
    /// Routes from (network, gateway) pairs; no gateway means on-link.
    pub fn new(routes: Vec<(ipnet::Ipv4Net, Option<Ipv4Addr>)>) -> UplinkRoutes {
        UplinkRoutes::of(
            routes
                .into_iter()
                .map(|(n, g)| (IpNet::V4(n), g.map(IpAddr::V4)))
                .collect(),
        )
    }

    /// Routes of either family from (network, gateway) pairs; no gateway means on-link.
    pub fn of(mut routes: Vec<(IpNet, Option<IpAddr>)>) -> UplinkRoutes {
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        UplinkRoutes { routes }
    }

    /// The routes through `ifname` in the text of this network namespace's
    /// `/proc/net/route` and `/proc/net/ipv6_route` (the binary reads them).
    pub fn from_proc(route: &str, ipv6_route: &str, ifname: &str) -> UplinkRoutes {
        let mut routes = UplinkRoutes::parse(route, ifname).routes;
        routes.extend(UplinkRoutes::parse_v6(ipv6_route, ifname).routes);
        UplinkRoutes::of(routes)
    }

    /// Parses `/proc/net/route` text (addresses in host-order hex of the kernel's
    /// little-endian layout).
    pub fn parse(text: &str, ifname: &str) -> UplinkRoutes {
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| Ipv4Addr::from(v.swap_bytes()))
        };
        let mut routes = Vec::new();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] != ifname {
                continue;
            }
            let (Some(dst), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
                continue;
            };
            let Ok(net) = ipnet::Ipv4Net::with_netmask(dst, mask) else {
                continue;
            };
            let gw = (!gw.is_unspecified()).then_some(gw);
            routes.push((net.trunc(), gw));
        }
        UplinkRoutes::new(routes)
    }

    /// Parses `/proc/net/ipv6_route` text: destination, prefix length, source, its length,
    /// next hop, metric, reference count, use, flags, device; addresses as 32 hex digits.
    /// Local, anycast and reject routes, and multicast and link-local destinations, are
    /// left out: none is where a packet leaving the cluster goes.
    pub fn parse_v6(text: &str, ifname: &str) -> UplinkRoutes {
        let addr = |s: &str| {
            (s.len() == 32)
                .then(|| u128::from_str_radix(s, 16).ok())
                .flatten()
                .map(Ipv6Addr::from)
        };
        let mut routes = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9] != ifname {
                continue;
            }
            let (Some(dst), Ok(len), Some(hop), Ok(flags)) = (
                addr(f[0]),
                u8::from_str_radix(f[1], 16),
                addr(f[4]),
                u32::from_str_radix(f[8], 16),
            ) else {
                continue;
            };
            if flags & RTF_UP == 0 || flags & (RTF_REJECT | RTF_ANYCAST | RTF_LOCAL) != 0 {
                continue;
            }
            let Ok(net) = ipnet::Ipv6Net::new(dst, len) else {
                continue;
            };
            if dst.is_multicast() || (dst.segments()[0] & 0xffc0) == 0xfe80 {
                continue;
            }
            let hop = (!hop.is_unspecified()).then_some(IpAddr::V6(hop));
            routes.push((IpNet::V6(net.trunc()), hop));
        }
        UplinkRoutes::of(routes)
    }

    /// The address to resolve for a packet to `dst`: `dst` itself on a connected network,
    /// a gateway otherwise; `None` without a route.
    pub fn next_hop(&self, dst: IpAddr) -> Option<IpAddr> {
        self.routes
            .iter()
            .find(|(net, _)| net_contains(net, dst))
            .map(|(_, gw)| gw.unwrap_or(dst))
    }

    /// Whether there is no route.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// A route to another node's pod network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRoute {
    /// The node's VTEP (outer destination).
    pub vtep: Ipv4Addr,
    /// The node's VTEP MAC (inner destination).
    pub vtep_mac: [u8; 6],
}

/// Longest-prefix match over the other nodes' pod networks: one hash map per prefix length
/// (a cluster uses one or two, /24 and /64 typically), longest first.
#[derive(Clone, Debug, Default)]
pub struct RemoteRoutes {
    by_len: Vec<(u8, bool, HashMap<u128, RemoteRoute, BuildFastHasher>)>,
}

fn masked(ip: IpAddr, len: u8) -> u128 {
    match ip {
        IpAddr::V4(a) => {
            let v = u32::from(a) as u128;
            if len == 0 {
                0
            } else {
                v & ((u32::MAX << (32 - len as u32)) as u128)
            }
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            if len == 0 {
                0
            } else {
                v & (u128::MAX << (128 - len as u32))
            }
        }
    }
}

impl RemoteRoutes {
    /// Builds the routes of `nodes`.
    pub fn build(nodes: &[nat::spec::RemoteNodeSpec]) -> RemoteRoutes {
        let mut r = RemoteRoutes::default();
        for n in nodes {
            let IpAddr::V4(vtep) = n.vtep_ip else {
                continue;
            };
            for net in &n.pod_cidrs {
                let (len, v6) = (net.prefix_len(), net.addr().is_ipv6());
                let idx = match r.by_len.iter().position(|(l, f, _)| *l == len && *f == v6) {
                    Some(i) => i,
                    None => {
                        r.by_len
                            .push((len, v6, HashMap::with_hasher(BuildFastHasher)));
                        r.by_len.len() - 1
                    }
                };
                r.by_len[idx].2.insert(
                    masked(net.addr(), len),
                    RemoteRoute {
                        vtep,
                        vtep_mac: n.vtep_mac,
                    },
                );
            }
        }
        r.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
        r
    }

    /// The node whose pod network holds `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<RemoteRoute> {
        let v6 = ip.is_ipv6();
        self.by_len
            .iter()
            .filter(|(_, f, _)| *f == v6)
            .find_map(|(len, _, m)| m.get(&masked(ip, *len)).copied())
    }
}

#[cfg(test)]
mod uplink_route_tests {
    use super::*;

    #[test]
    fn ipv6_routes_of_the_uplink_only_and_not_the_local_ones() {
        // From a namespace like the lab's node: a connected /64, a default route via a
        // link-local router, the kernel's link-local and local and multicast entries, a
        // route through another interface, and a line cut short.
        let text = "\
fd00019201680000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
fd000192016800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 kxup0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 kxup0
fd000192016800000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 kxup0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000004 00000000 00000001 kxup0
fd001024400000000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 kxhost
";
        let r = UplinkRoutes::parse_v6(text, "kxup0");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.next_hop(ip("fd00:192:168::1")),
            Some(ip("fd00:192:168::1")),
            "on-link"
        );
        assert_eq!(
            r.next_hop(ip("2001:db8::9")),
            Some(ip("fe80::1")),
            "the default router"
        );
        assert_eq!(r.routes.len(), 2, "{r:?}");
        assert_eq!(r.next_hop(ip("192.0.2.1")), None);
    }

    #[test]
    fn both_families_from_the_kernels_route_files_text() {
        // /proc/net/route: a connected 192.168.0.0/24 and a default route via .1 on the
        // uplink, and a route through another interface.
        let v4 = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
kxup0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
kxup0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
kxhost\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";
        let v6 = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 kxup0
";
        let r = UplinkRoutes::from_proc(v4, v6, "kxup0");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(r.next_hop(ip("192.168.0.7")), Some(ip("192.168.0.7")));
        assert_eq!(r.next_hop(ip("10.244.0.5")), Some(ip("192.168.0.1")));
        assert_eq!(r.next_hop(ip("2001:db8::9")), Some(ip("fe80::1")));
        assert_eq!(r.routes.len(), 3, "{r:?}");
    }
}
