//! CHECK: what ADD did is still there, judged against `prevResult` (the chain's final
//! result): the host veth with its alias, the pod's interface with the MTU, every address
//! `prevResult` gives it and every route `prevResult` lists through it; IPAM's own CHECK;
//! and the dataplane answering.
//!
//! The dataplane is asked whether it is up, not whether it serves this very interface:
//! the control socket has no per-pod query, and the dataplane re-attaches every pod
//! interface it finds after a restart by itself. Down, CHECK fails with code 11 (try
//! again later): the spec lists "a daemon required for connectivity" among what CHECK
//! must report, and 11 tells the runtime the condition is transient.

use crate::config::{Env, NetConf};
use crate::error::{code, CniError};
use crate::ipam::Ipam;
use crate::netlink::Netlink;
use crate::result::CniResult;
use crate::{dataplane, naming, netns};

use super::{gateway_of, netlink_error};

fn failed(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::CHECK_FAILED, msg, details)
}

/// CHECK of the invocation's attachment.
pub fn run(conf: &NetConf, env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "the runtime must pass the result of the ADD",
        )
    })?;
    let prev = CniResult::parse(prev, "prevResult")?;
    let ipam = Ipam::find(conf.ipam_type()?, &env.path, stdin)?;
    let host = naming::host_ifname(&env.container_id, &env.ifname);

    let mut nl = Netlink::open().map_err(netlink_error("open a netlink socket"))?;
    let link = nl
        .link_by_name(&host)
        .map_err(netlink_error(format!("look {host} up")))?
        .ok_or_else(|| failed(format!("the host interface {host} is missing"), ""))?;
    if naming::parse_alias(&link.alias).map(|a| (a.container_id, a.ifname))
        != Some((env.container_id.clone(), env.ifname.clone()))
    {
        return Err(failed(
            format!("{host} is not this attachment's"),
            format!("its alias is {:?}", link.alias),
        ));
    }

    let index = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox == env.netns)
        .ok_or_else(|| {
            failed(
                format!(
                    "prevResult has no interface {} in {}",
                    env.ifname, env.netns
                ),
                "",
            )
        })?;
    let expected = expectations(&prev, index);
    let ns = netns::open(env.netns.as_ref()).map_err(|e| {
        failed(
            "the pod's network namespace is gone",
            format!("{}: {e}", env.netns),
        )
    })?;
    let (ifname, mtu) = (env.ifname.clone(), conf.mtu);
    netns::run_in(&ns, move || check_pod(&ifname, mtu, &expected))
        .map_err(netlink_error("could not read the pod's interface"))?
        .map_err(|why| {
            failed(
                format!("the pod's interface {} is not as ADD left it", env.ifname),
                why,
            )
        })?;

    ipam.check()?;
    dataplane::ready(&conf.dataplane_socket)
        .map_err(|e| e.to_cni("the kxdp dataplane is not available"))?;
    Ok(())
}

/// The addresses and routes (destination, gateway) the pod's interface must have.
type Expected = (
    Vec<ipnet::IpNet>,
    Vec<(ipnet::IpNet, Option<std::net::IpAddr>)>,
);

fn expectations(prev: &CniResult, index: usize) -> Expected {
    let addresses: Vec<_> = prev.ips_of(index).map(|ip| ip.address).collect();
    // Routes of a family the interface has an address of are this interface's (a chained
    // plugin's routes through other interfaces are not ours to judge). Without `gw`, the
    // route goes via that family's gateway.
    let routes = prev
        .routes
        .iter()
        .filter_map(|r| {
            let ip = prev
                .ips_of(index)
                .find(|ip| ip.address.addr().is_ipv6() == r.dst.addr().is_ipv6())?;
            Some((
                r.dst,
                Some(r.gw.unwrap_or(gateway_of(ip.address, ip.gateway))),
            ))
        })
        .collect();
    (addresses, routes)
}

/// Inside the pod's namespace: `Ok(Err(why))` when something is missing.
fn check_pod(ifname: &str, mtu: u32, expected: &Expected) -> std::io::Result<Result<(), String>> {
    let mut nl = Netlink::open()?;
    let Some(link) = nl.link_by_name(ifname)? else {
        return Ok(Err(format!("{ifname} is missing")));
    };
    if link.mtu != mtu {
        return Ok(Err(format!("MTU {} instead of {mtu}", link.mtu)));
    }
    if !link.up {
        return Ok(Err("it is down".into()));
    }
    let have = nl.addresses(link.index)?;
    for a in &expected.0 {
        if !have.contains(a) {
            return Ok(Err(format!("address {a} is missing (has {have:?})")));
        }
    }
    for (dst, gw) in &expected.1 {
        let routes = nl.routes(dst.addr().is_ipv6())?;
        if !routes
            .iter()
            .any(|r| r.dst == *dst && r.oif == Some(link.index) && (gw.is_none() || r.gw == *gw))
        {
            return Ok(Err(format!(
                "route to {dst} via {} is missing",
                gw.map(|g| g.to_string()).unwrap_or_default()
            )));
        }
    }
    Ok(Ok(()))
}
