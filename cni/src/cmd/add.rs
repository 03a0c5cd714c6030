//! ADD: the veth pair, the addresses from IPAM, the pod's routes, the dataplane's attach;
//! on any failure, everything done so far undone.
//!
//! Routes: the pod's address keeps IPAM's prefix (`10.244.1.5/24`), as kxdp's lab pods
//! have it, and each family's default route goes via the gateway with `onlink`. The
//! dataplane answers ARP and neighbour solicitations on a pod's port for every address but
//! the pod's own, so the gateway and any same-node pod resolve to the dataplane, and all
//! the pod's traffic passes through it either way; `onlink` keeps the default route valid
//! when a configured gateway lies outside the prefix (ptp's /32 case) without a separate
//! link route for it, and costs nothing when it lies inside.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Attachment, Env, NetConf};
use crate::error::{code, CniError};
use crate::ipam::Ipam;
use crate::netlink::Netlink;
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::state::Records;
use crate::{dataplane, naming, netns, offload};

use super::{default_route_of, gateway_of, netlink_error, state_error};

/// What the pod's interface gets: addresses, then routes (destination, next hop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    /// Addresses with their prefix.
    pub addresses: Vec<IpNet>,
    /// Routes: destination and gateway.
    pub routes: Vec<(IpNet, IpAddr)>,
}

/// The pod's addresses and routes from IPAM's result: a default route per family via
/// that family's gateway, and IPAM's own routes (via their `gw`, or the family's gateway)
/// unless they repeat a destination.
pub fn plan(ipam: &CniResult) -> Result<PodPlan, CniError> {
    let addresses: Vec<IpNet> = ipam.ips.iter().map(|ip| ip.address).collect();
    let mut routes: Vec<(IpNet, IpAddr)> = Vec::new();
    let gateway_for = |v6: bool| {
        ipam.ips
            .iter()
            .find(|ip| ip.address.addr().is_ipv6() == v6)
            .map(|ip| gateway_of(ip.address, ip.gateway))
    };
    for ip in &ipam.ips {
        let gw = gateway_of(ip.address, ip.gateway);
        if gw == ip.address.addr() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the gateway is the pod's own address",
                format!("IPAM gave {} with gateway {gw}", ip.address),
            ));
        }
        let dst = default_route_of(gw);
        if !routes.iter().any(|(d, _)| *d == dst) {
            routes.push((dst, gw));
        }
    }
    for r in &ipam.routes {
        let Some(gw) = r.gw.or_else(|| gateway_for(r.dst.addr().is_ipv6())) else {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "an IPAM route has no gateway",
                format!("route to {} and no address of its family", r.dst),
            ));
        };
        if !routes.iter().any(|(d, _)| *d == r.dst) {
            routes.push((r.dst, gw));
        }
    }
    Ok(PodPlan { addresses, routes })
}

/// What has been done, for the rollback.
#[derive(Default)]
struct Done {
    recorded: bool,
    veth: bool,
    ipam: bool,
}

/// ADD, printing the result.
pub fn run(conf: &NetConf, env: &Env, stdin: &[u8]) -> Result<String, CniError> {
    let ipam = Ipam::find(conf.ipam_type()?, &env.path, stdin)?;
    let prev = conf
        .prev_result
        .clone()
        .map(|v| CniResult::parse(v, "prevResult"))
        .transpose()?;
    let host = naming::host_ifname(&env.container_id, &env.ifname);
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let records = Records::new(&conf.state_dir, &conf.name);
    let mut done = Done::default();
    let outcome = add(conf, env, &ipam, &host, &attachment, &records, &mut done);
    match outcome {
        Ok(own) => {
            let out = match prev {
                Some(prev) => own.chained_after(prev),
                None => own,
            };
            serde_json::to_string(&out.for_version(&conf.cni_version)).map_err(|e| {
                CniError::new(code::INTERNAL, "could not print the result", e.to_string())
            })
        }
        Err(e) => {
            rollback(&ipam, &host, &attachment, &records, &done);
            Err(e)
        }
    }
}

fn add(
    conf: &NetConf,
    env: &Env,
    ipam: &Ipam,
    host: &str,
    attachment: &Attachment,
    records: &Records,
    done: &mut Done,
) -> Result<CniResult, CniError> {
    let ns = netns::open(env.netns.as_ref()).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "invalid environment variable CNI_NETNS",
            format!("open {}: {e}", env.netns),
        )
    })?;
    let mut nl = Netlink::open().map_err(netlink_error("open a netlink socket"))?;
    if !records.contains(attachment) {
        records.add(attachment).map_err(state_error)?;
        done.recorded = true;
    }

    if let Err(e) = nl.create_veth(
        host,
        &env.ifname,
        std::os::fd::AsFd::as_fd(&ns),
        conf.mtu,
        conf.queues,
    ) {
        let why = if e.raw_os_error() == Some(nix::libc::EEXIST) {
            if nl.link_by_name(host).ok().flatten().is_some() {
                format!("the host interface {host} exists already: this attachment was added and not deleted")
            } else {
                format!("the container has an interface {} already", env.ifname)
            }
        } else {
            e.to_string()
        };
        return Err(CniError::new(
            code::NETLINK,
            "could not create the veth pair",
            why,
        ));
    }
    done.veth = true;
    let host_link = nl
        .link_by_name(host)
        .map_err(netlink_error("read the host interface"))?
        .ok_or_else(|| {
            CniError::new(
                code::NETLINK,
                "the host interface vanished",
                host.to_string(),
            )
        })?;
    nl.set_up(
        host_link.index,
        Some(&naming::alias(&env.container_id, &env.ifname)),
    )
    .map_err(netlink_error(format!("set {host} up")))?;

    done.ipam = true;
    let from_ipam = ipam.add()?;
    let plan = plan(&from_ipam)?;

    let ifname = env.ifname.clone();
    let pod_plan = plan.clone();
    let pod_link = netns::run_in(&ns, move || {
        let mut nl = Netlink::open()?;
        let link = nl.link_by_name(&ifname)?.ok_or_else(|| {
            std::io::Error::other(format!("{ifname} is not in the pod's namespace"))
        })?;
        offload::disable(link.index)
            .map_err(|e| std::io::Error::other(format!("turn {ifname}'s offloads off: {e}")))?;
        no_dad(&ifname)?;
        for a in &pod_plan.addresses {
            nl.add_address(link.index, *a)
                .map_err(|e| std::io::Error::other(format!("add {a} to {ifname}: {e}")))?;
        }
        nl.set_up(link.index, None)?;
        for (dst, gw) in &pod_plan.routes {
            nl.add_route(*dst, Some(*gw), link.index, true)
                .map_err(|e| std::io::Error::other(format!("add route {dst} via {gw}: {e}")))?;
        }
        Ok(link)
    })
    .map_err(netlink_error("could not configure the pod's interface"))?;

    let ips: Vec<IpAddr> = plan.addresses.iter().map(|a| a.addr()).collect();
    dataplane::attach(&conf.dataplane_socket, host, &env.container_id, ips)
        .map_err(|e| e.to_cni(&format!("could not attach {host} to the dataplane")))?;

    let mtu = Some(conf.mtu);
    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host.to_string(),
                mac: host_link.mac,
                mtu,
                ..Default::default()
            },
            Interface {
                name: env.ifname.clone(),
                mac: pod_link.mac,
                mtu,
                sandbox: env.netns.clone(),
                ..Default::default()
            },
        ],
        ips: from_ipam
            .ips
            .iter()
            .map(|ip| IpConfig {
                address: ip.address,
                gateway: Some(gateway_of(ip.address, ip.gateway)),
                interface: Some(1),
            })
            .collect(),
        routes: plan
            .routes
            .iter()
            .map(|(dst, gw)| Route::via(*dst, Some(*gw)))
            .collect(),
        dns: conf
            .dns
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or(from_ipam.dns),
    })
}

/// Turns IPv6 duplicate address detection off on the pod's interface before it goes up.
/// The dataplane answers every neighbour solicitation on a pod's port but the asker's own,
/// DAD's probes (sent from `::`) included: left on, DAD would find the pod's link-local
/// address "in use" and disable it. The sysctl file is the calling thread's namespace's.
/// A pod namespace without IPv6 has no such file, and needs nothing.
fn no_dad(ifname: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad");
    match std::fs::write(&path, b"0") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| std::io::Error::other(format!("write {path}: {e}"))),
    }
}

/// Undoes a failed ADD: the veth (deleting the host end deletes the pod's), the IPAM
/// allocation (also after a failed IPAM ADD, as the spec asks), the record. Failures here
/// are logged: the ADD's own error is what the runtime must see.
fn rollback(ipam: &Ipam, host: &str, attachment: &Attachment, records: &Records, done: &Done) {
    if done.veth {
        let deleted = Netlink::open().and_then(|mut nl| match nl.link_by_name(host)? {
            Some(l) => nl.delete_link(l.index),
            None => Ok(()),
        });
        if let Err(e) = deleted {
            eprintln!("kxdp-cni: ADD rollback: delete {host}: {e}");
        }
    }
    if done.ipam {
        if let Err(e) = ipam.del(None) {
            eprintln!("kxdp-cni: ADD rollback: IPAM DEL: {e}");
        }
    }
    if done.recorded {
        if let Err(e) = records.remove(attachment) {
            eprintln!("kxdp-cni: ADD rollback: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(json: serde_json::Value) -> CniResult {
        CniResult::parse(json, "test").unwrap()
    }

    #[test]
    fn plan_has_a_default_route_per_family_via_its_gateway() {
        let p = plan(&ipam(serde_json::json!({
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                    {"address": "fd00:10:244:1::5/64"}]
        })))
        .unwrap();
        assert_eq!(
            p.addresses,
            vec![
                "10.244.1.5/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::5/64".parse().unwrap()
            ]
        );
        assert_eq!(
            p.routes,
            vec![
                ("0.0.0.0/0".parse().unwrap(), "10.244.1.1".parse().unwrap()),
                ("::/0".parse().unwrap(), "fd00:10:244:1::1".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn plan_adds_ipam_routes_once() {
        let p = plan(&ipam(serde_json::json!({
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12"},
                       {"dst": "192.168.0.0/16", "gw": "10.244.1.254"}]
        })))
        .unwrap();
        assert_eq!(p.routes.len(), 3);
        assert_eq!(
            p.routes[1],
            (
                "10.96.0.0/12".parse().unwrap(),
                "10.244.1.1".parse().unwrap()
            )
        );
        assert_eq!(p.routes[2].1, "10.244.1.254".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn plan_refuses_what_cannot_route() {
        let own_gw = plan(&ipam(serde_json::json!({
            "ips": [{"address": "10.244.1.1/24", "gateway": "10.244.1.1"}]
        })));
        assert_eq!(own_gw.unwrap_err().code, code::INVALID_CONFIG);
        let v6_route_without_v6 = plan(&ipam(serde_json::json!({
            "ips": [{"address": "10.244.1.5/24"}], "routes": [{"dst": "fd00::/8"}]
        })));
        assert_eq!(v6_route_without_v6.unwrap_err().code, code::INVALID_CONFIG);
    }
}
