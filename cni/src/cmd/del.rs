//! DEL: detach, delete, release. Idempotent, and best-effort where the spec wants it: an
//! unreachable dataplane, a missing veth or a missing namespace are not errors (the
//! dataplane notices vanished interfaces itself); a failing IPAM DEL is, so the runtime
//! retries and the address is not leaked.

use crate::config::{Attachment, Env, NetConf};
use crate::error::CniError;
use crate::ipam::{For, Ipam};
use crate::netlink::Netlink;
use crate::state::Records;
use crate::{dataplane, naming};

use super::{netlink_error, state_error};

/// DEL of the invocation's attachment.
pub fn run(conf: &NetConf, env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    let ipam = Ipam::find(conf.ipam_type()?, &env.path, stdin)?;
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    remove(conf, &ipam, &attachment, false)
}

/// Removes one attachment: the dataplane's port, the host veth, the IPAM allocation, the
/// record. `other` says the attachment is not the invocation's own (GC), so IPAM is told
/// which one it is.
pub fn remove(conf: &NetConf, ipam: &Ipam, a: &Attachment, other: bool) -> Result<(), CniError> {
    let host = naming::host_ifname(&a.container_id, &a.ifname);
    if let Err(e) = dataplane::detach(&conf.dataplane_socket, &host, &a.container_id) {
        eprintln!("kxdp-cni: detach {host} (ignored): {e}");
    }
    let mut nl = Netlink::open().map_err(netlink_error("open a netlink socket"))?;
    if let Some(link) = nl
        .link_by_name(&host)
        .map_err(netlink_error(format!("look {host} up")))?
    {
        // Only a veth of ours: the name is a hash, but never delete what we did not make.
        if naming::parse_alias(&link.alias).as_ref() == Some(a)
            || link.kind.as_deref() == Some("veth")
        {
            match nl.delete_link(link.index) {
                Err(e) if e.raw_os_error() != Some(nix::libc::ENODEV) => {
                    return Err(netlink_error(format!("delete {host}"))(e))
                }
                _ => {}
            }
        }
    }
    let whose = other.then_some(For {
        container_id: &a.container_id,
        ifname: &a.ifname,
    });
    ipam.del(whose)?;
    Records::new(&conf.state_dir, &conf.name)
        .remove(a)
        .map_err(state_error)
}
