//! GC (1.1.0): every attachment kxdp-cni knows of — recorded in its state directory, or
//! named by the alias of a host veth — that is not in `cni.dev/valid-attachments` is
//! removed as DEL would remove it (dataplane, veth, IPAM allocation, record). Then GC is
//! passed on to the IPAM plugin if it speaks 1.1.0. Errors do not stop the sweep; the
//! first is returned with the others in its details.

use std::collections::BTreeSet;

use crate::config::{Attachment, Env, NetConf};
use crate::error::{code, CniError};
use crate::ipam::Ipam;
use crate::naming;
use crate::netlink::Netlink;
use crate::state::Records;

use super::{del, needs_1_1, netlink_error, state_error};

/// The attachments to remove: known ones not in `valid`.
pub fn stale(
    recorded: &[Attachment],
    aliased: &[Attachment],
    valid: &[Attachment],
) -> Vec<Attachment> {
    let valid: BTreeSet<&Attachment> = valid.iter().collect();
    let known: BTreeSet<&Attachment> = recorded.iter().chain(aliased).collect();
    known
        .into_iter()
        .filter(|a| !valid.contains(a))
        .cloned()
        .collect()
}

/// GC of the network.
pub fn run(conf: &NetConf, env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    needs_1_1(conf, "GC")?;
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments",
            "without the list every attachment would look stale; nothing was removed",
        )
    })?;
    let ipam = Ipam::find(conf.ipam_type()?, &env.path, stdin)?;
    let recorded = Records::new(&conf.state_dir, &conf.name)
        .list()
        .map_err(state_error)?;
    let aliased: Vec<Attachment> = Netlink::open()
        .and_then(|mut nl| nl.links())
        .map_err(netlink_error("list the links"))?
        .into_iter()
        .filter_map(|l| {
            let a = naming::parse_alias(&l.alias)?;
            (l.name == naming::host_ifname(&a.container_id, &a.ifname)).then_some(a)
        })
        .collect();
    let mut errors = Vec::new();
    for a in stale(&recorded, &aliased, &valid) {
        if let Err(e) = del::remove(conf, &ipam, &a, true) {
            errors.push(format!("{}/{}: {e}", a.container_id, a.ifname));
        }
    }
    if let Err(e) = ipam.run_if_1_1("GC") {
        errors.push(format!("IPAM GC: {e}"));
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        code::STATE,
        format!("GC could not remove everything ({} errors)", errors.len()),
        errors.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(id: &str, ifname: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: ifname.into(),
        }
    }

    #[test]
    fn stale_is_known_and_not_valid() {
        let recorded = [a("c1", "eth0"), a("c2", "eth0"), a("c3", "eth0")];
        let aliased = [a("c2", "eth0"), a("c4", "eth0"), a("c1", "eth1")];
        let valid = [a("c1", "eth0"), a("c4", "eth0"), a("c9", "eth0")];
        assert_eq!(
            stale(&recorded, &aliased, &valid),
            vec![a("c1", "eth1"), a("c2", "eth0"), a("c3", "eth0")]
        );
        assert!(stale(&recorded, &[], &recorded).is_empty());
    }
}
