//! The host end's name and alias: both follow from the attachment, so DEL finds the veth
//! without state, and GC tells kxdp-cni's veths (and their attachments) from any other.

use sha2::{Digest, Sha256};

use crate::config::Attachment;

/// Every host end's name starts with this.
pub const HOST_PREFIX: &str = "kxdp";
/// Every host end's alias (`ip link` shows it) starts with this.
pub const ALIAS_PREFIX: &str = "kxdp-cni ";

/// The host end of an attachment's veth: `kxdp` and the first 11 hex digits of SHA-256 of
/// `containerID/ifname` (15 bytes, the kernel's limit). Hashing both keeps two interfaces
/// of one container apart; SHA-256 (not the standard library's hasher, whose output may
/// change between Rust releases) keeps the name the same for the binary that DELs as for
/// the one that ADDed. 44 bits: a collision among a node's pods is negligible, and one
/// would fail the ADD (the name exists), not hijack a veth.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOST_PREFIX}{}", &hex[..11])
}

/// The alias set on the host end: `kxdp-cni <containerID>/<ifname>` (a container ID
/// holds no `/`).
pub fn alias(container_id: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}{container_id}/{ifname}")
}

/// The attachment a host end's alias names, if the alias is one of ours.
pub fn parse_alias(alias: &str) -> Option<Attachment> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?;
    let (container_id, ifname) = rest.split_once('/')?;
    if container_id.is_empty() || ifname.is_empty() {
        return None;
    }
    Some(Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_is_deterministic_short_and_distinct() {
        let a = host_ifname("9f86d081884c7d659a2feaa0c55ad015", "eth0");
        assert_eq!(a, host_ifname("9f86d081884c7d659a2feaa0c55ad015", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("kxdp"));
        assert!(a[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_ifname("9f86d081884c7d659a2feaa0c55ad015", "eth1"));
        assert_ne!(a, host_ifname("9f86d081884c7d659a2feaa0c55ad016", "eth0"));
        // Pinned: DEL by a later release must find what this one ADDed. SHA-256 of
        // "abc/eth0" is 538f587a23655f38... (`printf abc/eth0 | sha256sum`).
        assert_eq!(host_ifname("abc", "eth0"), "kxdp538f587a236");
    }

    #[test]
    fn alias_round_trips_and_others_are_not_ours() {
        let a = alias("c-1.x_y", "eth0");
        assert_eq!(
            parse_alias(&a),
            Some(Attachment {
                container_id: "c-1.x_y".into(),
                ifname: "eth0".into()
            })
        );
        for other in [
            "",
            "flannel",
            "kxdp-cni ",
            "kxdp-cni c1",
            "kxdp-cni /eth0",
            "kxdp-cni c1/",
        ] {
            assert_eq!(parse_alias(other), None, "{other:?}");
        }
    }
}
