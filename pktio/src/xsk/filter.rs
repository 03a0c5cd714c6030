//! The filter tables of kxdp's XDP program: what, on a filtering interface (the uplink), goes
//! to AF_XDP; everything else goes to the kernel untouched.
//!
//! Each table is a BPF map the program reads per frame (layouts in
//! `bpf/kxdp_filter.bpf.c`, encoded here by the `*_key` functions):
//!
//! | method | map | matches |
//! | --- | --- | --- |
//! | [`XdpProgram::allow_prefix`] | `kxdp_prefix4`, `kxdp_prefix6` (LPM tries) | any packet to an address in the prefix |
//! | [`XdpProgram::allow_port`] | `kxdp_ports` (hash) | (destination, protocol, destination port) |
//! | [`XdpProgram::allow_port_range`] | `kxdp_ranges` (hash) | (destination, protocol) with the port in a range |
//! | [`XdpProgram::own_address`] | `kxdp_owned` (hash) | ARP and neighbour discovery about the address |
//! | [`XdpProgram::add_node_address`], [`XdpProgram::set_vxlan_port`] | `kxdp_nodes`, `kxdp_config` | UDP to the VXLAN port of a node address |
//!
//! ICMP errors quoting a packet that kxdp sent (its source, protocol and source port match
//! `kxdp_ports` or `kxdp_ranges`) go to AF_XDP too, so path-MTU and traceroute answers for
//! NodePort and masqueraded flows reach kxdp.
//!
//! Every update is one `bpf(BPF_MAP_*_ELEM)` call and is seen by the next frame; there is
//! no transaction across entries. [`XdpProgram::replace_tables`] orders its updates so that
//! no entry that stays is ever missing: it adds what is new before it removes what is
//! stale.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::MutexGuard;

use ipnet::IpNet;

use super::bpf::{BpfMap, XdpProgram};
use super::config::{config_value, Installed};
use super::config::{FilterTables, Protocol, Steering};
use super::{XskError, UPDATE_FILTER};

/// The program's decision counters, summed over CPUs since it was loaded. A redirect to a
/// queue whose XSKMAP slot is empty is counted as a redirect but reaches the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// Frames passed to the kernel (filtering: nothing matched, or not parsed).
    pub passed: u64,
    /// Frames redirected because the steering is [`Steering::RedirectAll`].
    pub redirect_all: u64,
    /// Redirected: destination in a prefix.
    pub prefix: u64,
    /// Redirected: (destination, protocol, port) entry.
    pub port: u64,
    /// Redirected: port in a (destination, protocol) range.
    pub port_range: u64,
    /// Redirected: VXLAN to a node address.
    pub vxlan: u64,
    /// Redirected: ARP about an owned address.
    pub arp: u64,
    /// Redirected: neighbour discovery about an owned address.
    pub ndp: u64,
    /// Redirected: an ICMP error about a packet kxdp sent.
    pub icmp_error: u64,
}

impl FilterStats {
    /// Every frame the program saw.
    pub fn total(&self) -> u64 {
        self.passed + self.redirected()
    }

    /// Every frame redirected, for whatever reason.
    pub fn redirected(&self) -> u64 {
        self.redirect_all
            + self.prefix
            + self.port
            + self.port_range
            + self.vxlan
            + self.arp
            + self.ndp
            + self.icmp_error
    }
}

/// Counters in the per-CPU array (`enum kxdp_counter` in the C source).
const COUNTERS: usize = 9;

/// Family byte of the hash keys (`FAMILY_V4`, `FAMILY_V6`).
fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

/// The first 16 bytes of every hash key: IPv6 as is, IPv4 in the first four, then zeros.
fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

/// `struct addr_key`.
fn addr_key(addr: IpAddr) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&addr_bytes(addr));
    k[16] = family(addr);
    k
}

/// `struct port_key`: address, family, protocol number, port in network order.
pub(super) fn port_key(addr: IpAddr, proto: Protocol, port: u16) -> [u8; 20] {
    let mut k = addr_key(addr);
    k[17] = proto.number(addr);
    k[18..].copy_from_slice(&port.to_be_bytes());
    k
}

/// `struct range_key`: address, family, protocol number.
fn range_key(addr: IpAddr, proto: Protocol) -> [u8; 20] {
    let mut k = addr_key(addr);
    k[17] = proto.number(addr);
    k
}

/// `struct port_range`: first and last port, host order.
fn range_value(range: &RangeInclusive<u16>) -> [u8; 4] {
    let mut v = [0u8; 4];
    v[..2].copy_from_slice(&range.start().to_ne_bytes());
    v[2..].copy_from_slice(&range.end().to_ne_bytes());
    v
}

/// `struct lpm4_key` or `struct lpm6_key`: prefix length (host order), then the address
/// with its host bits cleared. Returns the key and whether it is IPv6.
fn lpm_key(net: IpNet) -> (Vec<u8>, bool) {
    let net = net.trunc();
    let mut k = u32::from(net.prefix_len()).to_ne_bytes().to_vec();
    match net {
        IpNet::V4(n) => {
            k.extend_from_slice(&n.addr().octets());
            (k, false)
        }
        IpNet::V6(n) => {
            k.extend_from_slice(&n.addr().octets());
            (k, true)
        }
    }
}

impl XdpProgram {
    fn lock(&self) -> MutexGuard<'_, Installed> {
        // A panic while holding the lock left the mirror at worst one entry behind the maps;
        // the next replace_tables writes every entry it wants anyway.
        self.installed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn failed(&self, what: String, err: io::Error) -> XskError {
        XskError::os(UPDATE_FILTER, format!("{} ({what})", self.target), err)
    }

    fn prefix_map(&self, v6: bool) -> &BpfMap {
        if v6 {
            &self.maps.prefix6
        } else {
            &self.maps.prefix4
        }
    }

    /// Writes `kxdp_config` with these values (`what` names the change for an error).
    fn write_config(
        &self,
        (steering, vxlan_port, stamp): (Steering, u16, bool),
        what: impl FnOnce() -> String,
    ) -> Result<(), XskError> {
        self.maps
            .config
            .update(
                &0u32.to_ne_bytes(),
                &config_value(steering, vxlan_port, stamp),
            )
            .map_err(|e| self.failed(what(), e))
    }

    /// Switches between filtering and redirecting everything. Takes effect with the next
    /// frame; the tables are kept either way.
    pub fn set_steering(&self, steering: Steering) -> Result<(), XskError> {
        let mut inst = self.lock();
        let values = (steering, inst.tables.vxlan_port, inst.stamp);
        self.write_config(values, || format!("steering {steering:?}"))?;
        inst.steering = steering;
        Ok(())
    }

    /// The steering in effect.
    pub fn steering(&self) -> Steering {
        self.lock().steering
    }

    /// Stamps every frame redirected to a socket, from the next one on, with the time the
    /// program saw it, in 8 bytes in front of its Ethernet header; or stops. The sockets'
    /// device must expect them ([`super::XskConfig::stamped`]), which takes them off and
    /// leaves them for [`crate::DeviceExt::rx_stamp`]: how long frames wait in the receive
    /// ring for their worker, measured. Set it before the program is attached
    /// ([`XdpProgram::load_detached`], [`XdpProgram::link_to`]) and leave it: a frame
    /// already in a ring keeps the layout it came with.
    pub fn set_stamp(&self, on: bool) -> Result<(), XskError> {
        let mut inst = self.lock();
        let values = (inst.steering, inst.tables.vxlan_port, on);
        self.write_config(values, || format!("stamping {on}"))?;
        inst.stamp = on;
        Ok(())
    }

    /// Sends every packet to an address in `net` to AF_XDP (host bits are ignored).
    pub fn allow_prefix(&self, net: IpNet) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.insert_prefix(net)?;
        inst.tables.prefixes.insert(net.trunc());
        Ok(())
    }

    /// Removes prefix `net` (exactly that prefix; longer or shorter ones stay). Removing an
    /// absent prefix is not an error.
    pub fn remove_prefix(&self, net: IpNet) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.delete_prefix(net)?;
        inst.tables.prefixes.remove(&net.trunc());
        Ok(())
    }

    fn insert_prefix(&self, net: IpNet) -> Result<(), XskError> {
        let (key, v6) = lpm_key(net);
        self.prefix_map(v6)
            .update(&key, &[1])
            .map_err(|e| self.failed(format!("allow prefix {net}"), e))
    }

    fn delete_prefix(&self, net: IpNet) -> Result<(), XskError> {
        let (key, v6) = lpm_key(net);
        self.prefix_map(v6)
            .delete(&key)
            .map_err(|e| self.failed(format!("remove prefix {net}"), e))
    }

    /// Sends packets to (`addr`, `proto`, destination `port`) to AF_XDP: a NodePort on a node
    /// address. Other ports of `addr` still reach the kernel.
    pub fn allow_port(&self, addr: IpAddr, proto: Protocol, port: u16) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.insert_port(addr, proto, port)?;
        inst.tables.ports.insert((addr, proto, port));
        Ok(())
    }

    /// Removes a port entry; removing an absent one is not an error.
    pub fn remove_port(&self, addr: IpAddr, proto: Protocol, port: u16) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.delete_port(addr, proto, port)?;
        inst.tables.ports.remove(&(addr, proto, port));
        Ok(())
    }

    fn insert_port(&self, addr: IpAddr, proto: Protocol, port: u16) -> Result<(), XskError> {
        self.maps
            .ports
            .update(&port_key(addr, proto, port), &[1])
            .map_err(|e| self.failed(format!("allow {proto:?} {addr} port {port}"), e))
    }

    fn delete_port(&self, addr: IpAddr, proto: Protocol, port: u16) -> Result<(), XskError> {
        self.maps
            .ports
            .delete(&port_key(addr, proto, port))
            .map_err(|e| self.failed(format!("remove {proto:?} {addr} port {port}"), e))
    }

    /// Sends packets to (`addr`, `proto`) whose destination port is in `ports` to AF_XDP:
    /// the masquerade source-port range on the node address. Replaces the pair's previous
    /// range in one update.
    pub fn allow_port_range(
        &self,
        addr: IpAddr,
        proto: Protocol,
        ports: RangeInclusive<u16>,
    ) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.insert_range(addr, proto, &ports)?;
        inst.tables.port_ranges.insert((addr, proto), ports);
        Ok(())
    }

    /// Removes the port range of (`addr`, `proto`); removing an absent one is not an error.
    pub fn remove_port_range(&self, addr: IpAddr, proto: Protocol) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.maps
            .ranges
            .delete(&range_key(addr, proto))
            .map_err(|e| self.failed(format!("remove {proto:?} {addr} port range"), e))?;
        inst.tables.port_ranges.remove(&(addr, proto));
        Ok(())
    }

    fn insert_range(
        &self,
        addr: IpAddr,
        proto: Protocol,
        ports: &RangeInclusive<u16>,
    ) -> Result<(), XskError> {
        if ports.is_empty() {
            return Err(XskError::Config(format!(
                "{}: port range {}-{} for {proto:?} {addr} is empty: give first <= last",
                self.target,
                ports.start(),
                ports.end()
            )));
        }
        self.maps
            .ranges
            .update(&range_key(addr, proto), &range_value(ports))
            .map_err(|e| {
                self.failed(
                    format!(
                        "allow {proto:?} {addr} ports {}-{}",
                        ports.start(),
                        ports.end()
                    ),
                    e,
                )
            })
    }

    /// Sends ARP (target protocol address) and neighbour discovery (solicitation target,
    /// else destination) about `addr` to AF_XDP: an address kxdp answers for on this
    /// interface. The kernel then never sees them, so never own an address the kernel must
    /// answer for (the node's own).
    pub fn own_address(&self, addr: IpAddr) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.insert_addr(&self.maps.owned, addr, "own")?;
        inst.tables.owned.insert(addr);
        Ok(())
    }

    /// Gives ARP and neighbour discovery about `addr` back to the kernel.
    pub fn disown_address(&self, addr: IpAddr) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.delete_addr(&self.maps.owned, addr, "disown")?;
        inst.tables.owned.remove(&addr);
        Ok(())
    }

    /// Accepts VXLAN (UDP to the port of [`XdpProgram::set_vxlan_port`]) addressed to `addr`.
    pub fn add_node_address(&self, addr: IpAddr) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.insert_addr(&self.maps.nodes, addr, "add node address")?;
        inst.tables.node_addresses.insert(addr);
        Ok(())
    }

    /// Stops accepting VXLAN addressed to `addr`.
    pub fn remove_node_address(&self, addr: IpAddr) -> Result<(), XskError> {
        let mut inst = self.lock();
        self.delete_addr(&self.maps.nodes, addr, "remove node address")?;
        inst.tables.node_addresses.remove(&addr);
        Ok(())
    }

    fn insert_addr(&self, map: &BpfMap, addr: IpAddr, what: &str) -> Result<(), XskError> {
        map.update(&addr_key(addr), &[1])
            .map_err(|e| self.failed(format!("{what} {addr}"), e))
    }

    fn delete_addr(&self, map: &BpfMap, addr: IpAddr, what: &str) -> Result<(), XskError> {
        map.delete(&addr_key(addr))
            .map_err(|e| self.failed(format!("{what} {addr}"), e))
    }

    /// The VXLAN UDP port redirected when addressed to a node address (Linux and flannel use
    /// 8472, IANA 4789); 0 redirects no VXLAN.
    pub fn set_vxlan_port(&self, port: u16) -> Result<(), XskError> {
        let mut inst = self.lock();
        let values = (inst.steering, port, inst.stamp);
        self.write_config(values, || format!("VXLAN port {port}"))?;
        inst.tables.vxlan_port = port;
        Ok(())
    }

    /// The tables as installed.
    pub fn tables(&self) -> FilterTables {
        self.lock().tables.clone()
    }

    /// Makes the tables equal `want`: first every entry of `want` is written (new ones
    /// added, changed port ranges replaced in place, the VXLAN port set), then every entry
    /// not in `want` is removed. An entry in both is never missing, so a flow kxdp serves
    /// before and after never leaks to the kernel; a stale entry lives a few system calls
    /// longer, which only sends kxdp traffic it will drop or pass on. On an error the tables
    /// hold every entry written so far ([`XdpProgram::tables`] says which) and calling again
    /// continues.
    pub fn replace_tables(&self, want: &FilterTables) -> Result<(), XskError> {
        let mut inst = self.lock();
        // Adds (and in-place replacements) first.
        for &net in &want.prefixes {
            if !inst.tables.prefixes.contains(&net.trunc()) {
                self.insert_prefix(net)?;
                inst.tables.prefixes.insert(net.trunc());
            }
        }
        for &(addr, proto, port) in &want.ports {
            if inst.tables.ports.insert((addr, proto, port)) {
                if let Err(e) = self.insert_port(addr, proto, port) {
                    inst.tables.ports.remove(&(addr, proto, port));
                    return Err(e);
                }
            }
        }
        for (&(addr, proto), range) in &want.port_ranges {
            if inst.tables.port_ranges.get(&(addr, proto)) != Some(range) {
                self.insert_range(addr, proto, range)?;
                inst.tables.port_ranges.insert((addr, proto), range.clone());
            }
        }
        for &addr in &want.owned {
            if !inst.tables.owned.contains(&addr) {
                self.insert_addr(&self.maps.owned, addr, "own")?;
                inst.tables.owned.insert(addr);
            }
        }
        for &addr in &want.node_addresses {
            if !inst.tables.node_addresses.contains(&addr) {
                self.insert_addr(&self.maps.nodes, addr, "add node address")?;
                inst.tables.node_addresses.insert(addr);
            }
        }
        if inst.tables.vxlan_port != want.vxlan_port {
            let values = (inst.steering, want.vxlan_port, inst.stamp);
            self.write_config(values, || format!("VXLAN port {}", want.vxlan_port))?;
            inst.tables.vxlan_port = want.vxlan_port;
        }
        // Then removals of whatever `want` lacks.
        let wanted: BTreeSet<IpNet> = want.prefixes.iter().map(IpNet::trunc).collect();
        let stale: Vec<IpNet> = inst.tables.prefixes.difference(&wanted).copied().collect();
        for net in stale {
            self.delete_prefix(net)?;
            inst.tables.prefixes.remove(&net);
        }
        let stale: Vec<_> = inst.tables.ports.difference(&want.ports).copied().collect();
        for (addr, proto, port) in stale {
            self.delete_port(addr, proto, port)?;
            inst.tables.ports.remove(&(addr, proto, port));
        }
        let stale: Vec<_> = inst
            .tables
            .port_ranges
            .keys()
            .filter(|k| !want.port_ranges.contains_key(k))
            .copied()
            .collect();
        for (addr, proto) in stale {
            self.maps
                .ranges
                .delete(&range_key(addr, proto))
                .map_err(|e| self.failed(format!("remove {proto:?} {addr} port range"), e))?;
            inst.tables.port_ranges.remove(&(addr, proto));
        }
        let stale: Vec<_> = inst.tables.owned.difference(&want.owned).copied().collect();
        for addr in stale {
            self.delete_addr(&self.maps.owned, addr, "disown")?;
            inst.tables.owned.remove(&addr);
        }
        let stale: Vec<_> = inst
            .tables
            .node_addresses
            .difference(&want.node_addresses)
            .copied()
            .collect();
        for addr in stale {
            self.delete_addr(&self.maps.nodes, addr, "remove node address")?;
            inst.tables.node_addresses.remove(&addr);
        }
        Ok(())
    }

    /// The program's decision counters, summed over CPUs.
    pub fn stats(&self) -> Result<FilterStats, XskError> {
        let sums = super::bpf::percpu_counters::<COUNTERS>(&self.maps.stats)
            .map_err(|e| self.failed("read the counters".into(), e))?;
        let [passed, redirect_all, prefix, port, port_range, vxlan, arp, ndp, icmp_error] = sums;
        Ok(FilterStats {
            passed,
            redirect_all,
            prefix,
            port,
            port_range,
            vxlan,
            arp,
            ndp,
            icmp_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));

    #[test]
    fn hash_keys_have_the_c_layout() {
        let k = port_key(V4, Protocol::Tcp, 30080);
        assert_eq!(&k[..4], &[192, 0, 2, 7]);
        assert_eq!(&k[4..16], &[0; 12], "IPv4 padded with zeros");
        assert_eq!(k[16], 4, "family");
        assert_eq!(k[17], 6, "TCP");
        assert_eq!(&k[18..], &30080u16.to_be_bytes(), "port in network order");

        let k = port_key(V6, Protocol::IcmpEcho, 0x1234);
        assert_eq!(
            &k[..16],
            &match V6 {
                IpAddr::V6(a) => a.octets(),
                _ => unreachable!(),
            }
        );
        assert_eq!((k[16], k[17]), (6, 58), "ICMPv6 for an IPv6 address");
        assert_eq!(port_key(V4, Protocol::IcmpEcho, 1)[17], 1);
        assert_eq!(port_key(V4, Protocol::Sctp, 1)[17], 132);

        let r = range_key(V4, Protocol::Udp);
        assert_eq!((r[16], r[17], r[18], r[19]), (4, 17, 0, 0));
        let v = range_value(&(32768..=61000));
        assert_eq!(u16::from_ne_bytes([v[0], v[1]]), 32768);
        assert_eq!(u16::from_ne_bytes([v[2], v[3]]), 61000);

        let a = addr_key(V4);
        assert_eq!((a[16], &a[17..]), (4, &[0u8; 3][..]));
    }

    #[test]
    fn lpm_keys_carry_the_prefix_length_and_clear_host_bits() {
        let (k, v6) = lpm_key("10.96.3.9/12".parse().unwrap());
        assert!(!v6);
        assert_eq!(k.len(), 8, "struct lpm4_key");
        assert_eq!(u32::from_ne_bytes(k[..4].try_into().unwrap()), 12);
        assert_eq!(&k[4..], &[10, 96, 0, 0]);
        let (k, v6) = lpm_key("fd00:10:96::1/128".parse().unwrap());
        assert!(v6);
        assert_eq!(k.len(), 20, "struct lpm6_key");
        assert_eq!(u32::from_ne_bytes(k[..4].try_into().unwrap()), 128);
    }

    #[test]
    fn config_is_steering_then_vxlan_port_then_stamping() {
        let v = config_value(Steering::RedirectAll, 8472, true);
        assert_eq!(u32::from_ne_bytes(v[..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(v[4..8].try_into().unwrap()), 8472);
        assert_eq!(u32::from_ne_bytes(v[8..].try_into().unwrap()), 1);
        assert_eq!(&config_value(Steering::Filter, 0, false), &[0u8; 12]);
    }

    #[test]
    fn a_program_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<XdpProgram>();
    }

    #[test]
    fn stats_sum_every_redirect() {
        let s = FilterStats {
            passed: 1,
            prefix: 2,
            port: 3,
            arp: 4,
            ..FilterStats::default()
        };
        assert_eq!((s.redirected(), s.total()), (9, 10));
    }
}
