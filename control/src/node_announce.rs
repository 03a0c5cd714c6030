//! What a kxdp node announces on its own Node object: its VXLAN tunnel endpoint, under
//! kxdp's annotation and under the ones flannel's kube subnet manager writes, so that flannel
//! nodes of a cluster being migrated node by node program their FDB and neighbour entries
//! for it and reach its pods.
//!
//! The annotations are exactly flannel's (flannel-io/flannel, `pkg/subnet/kube`):
//! `annotations.go` makes the names from the prefix `flannel.alpha.coreos.com/`;
//! `kube.go`'s `AcquireLease` writes `backend-type`, `backend-data`, `public-ip` and
//! `kube-subnet-manager: "true"`, and its node informer ignores any Node without that last
//! one (`handleAddLeaseEvent`); `nodeToLease` parses `public-ip` as an IPv4 address. The
//! vxlan backend's `backend-data` is `json.Marshal(vxlanLeaseAttrs{VNI, VtepMAC})`
//! (`pkg/backend/vxlan/vxlan.go` `newSubnetAttrs`, `vxlan_network.go`), with the MAC in
//! `net.HardwareAddr`'s lower-case form: `{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}`.
//!
//! IPv6 (`backend-v6-data`, `public-ipv6`) is not announced: kxdp's overlay runs over IPv4
//! only, and a dual-stack flannel (`EnableIPv6`) drops the whole lease of a Node without
//! them, so node-by-node migration needs an IPv4-only flannel.
//!
//! kxdp-control patches its own Node and no other (`--node`), with a JSON merge patch of
//! these annotations alone, at start and whenever the Node stops carrying them; a refused
//! patch is retried with backoff. It deliberately never removes an annotation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use crate::kube_source::NodeWatch;
use crate::labels::{
    FLANNEL_BACKEND_DATA, FLANNEL_BACKEND_TYPE, FLANNEL_KUBE_SUBNET_MANAGER, FLANNEL_PUBLIC_IP,
    KXDP_VTEP_IP, KXDP_VTEP_MAC,
};
use crate::uplink::format_mac;

/// The field manager kxdp-control's writes are recorded under.
pub const FIELD_MANAGER: &str = "kxdp-control";

/// The first wait after a refused patch; doubled after each refusal up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait between two attempts (kube's watcher backoff caps at 30 s too).
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// This node's VXLAN tunnel endpoint, as far as kxdp-control knows it without the Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtep {
    /// The MAC other nodes put in the inner frames (the uplink's).
    pub mac: [u8; 6],
    /// The VXLAN network identifier (flannel's `VNI`).
    pub vni: u32,
}

/// Why a Node cannot be announced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// flannel's `public-ip` must be IPv4 and the Node gives none.
    #[error("Node {node}: no IPv4 address for flannel's public-ip ({KXDP_VTEP_IP} {vtep_ip:?}, {FLANNEL_PUBLIC_IP} {public_ip:?}, no IPv4 InternalIP); annotate it with {KXDP_VTEP_IP}: <the uplink's IPv4 address>")]
    NoIpv4 {
        /// The Node.
        node: String,
        /// Its `kxdp.io/vtep-ip`, if any.
        vtep_ip: Option<String>,
        /// Its flannel `public-ip`, if any.
        public_ip: Option<String>,
    },
}

/// flannel's `backend-data` for `vtep`, byte for byte as Go's `json.Marshal` writes
/// `vxlanLeaseAttrs` (field order, no spaces, lower-case MAC).
pub fn backend_data(vtep: &Vtep) -> String {
    format!(
        r#"{{"VNI":{},"VtepMAC":"{}"}}"#,
        vtep.vni,
        format_mac(vtep.mac)
    )
}

/// The address the node's VXLAN packets come from, chosen as the tables choose this
/// node's `vtep_ip` (so the announcement and the dataplane agree): `kxdp.io/vtep-ip`, else
/// flannel's `public-ip` already there, else the first IPv4 InternalIP. flannel reads it
/// as IPv4, so only IPv4 counts.
fn public_ip(node: &Node) -> Option<Ipv4Addr> {
    let ann = node.metadata.annotations.as_ref();
    let annotated = |key: &str| ann?.get(key)?.parse::<Ipv4Addr>().ok();
    let internal = || {
        node.status
            .as_ref()?
            .addresses
            .iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| match a.address.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            })
    };
    annotated(KXDP_VTEP_IP)
        .or_else(|| annotated(FLANNEL_PUBLIC_IP))
        .or_else(internal)
}

/// The annotations `node` must carry to announce `vtep`.
pub fn desired(node: &Node, vtep: &Vtep) -> Result<BTreeMap<String, String>, AnnounceError> {
    let Some(ip) = public_ip(node) else {
        let ann = node.metadata.annotations.as_ref();
        return Err(AnnounceError::NoIpv4 {
            node: node.metadata.name.clone().unwrap_or_default(),
            vtep_ip: ann.and_then(|a| a.get(KXDP_VTEP_IP)).cloned(),
            public_ip: ann.and_then(|a| a.get(FLANNEL_PUBLIC_IP)).cloned(),
        });
    };
    Ok(BTreeMap::from([
        (KXDP_VTEP_MAC.to_string(), format_mac(vtep.mac)),
        (FLANNEL_BACKEND_TYPE.to_string(), "vxlan".to_string()),
        (FLANNEL_BACKEND_DATA.to_string(), backend_data(vtep)),
        (FLANNEL_PUBLIC_IP.to_string(), ip.to_string()),
        (FLANNEL_KUBE_SUBNET_MANAGER.to_string(), "true".to_string()),
    ]))
}

/// The merge patch (RFC 7386) that makes `node` announce `vtep`, or `None` when it already
/// does. It carries all the announced annotations, not just the differing ones: each patch
/// states the whole announcement.
pub fn patch(node: &Node, vtep: &Vtep) -> Result<Option<Value>, AnnounceError> {
    let want = desired(node, vtep)?;
    let have = node.metadata.annotations.as_ref();
    let current = want
        .iter()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v));
    Ok((!current).then(|| json!({"metadata": {"annotations": want}})))
}

/// What to do after looking at the Node.
enum Step {
    /// Nothing until the store changes.
    Wait,
    /// Send this patch; the Node was at this resourceVersion.
    Send(Value, Option<String>),
}

/// Keeps this node's announcement on its Node until the runtime shuts down: patches the
/// Node named by `node` (and only it) whenever the store's copy lacks the announcement,
/// once per resourceVersion, retrying a refused patch with backoff.
pub async fn announce(client: kube::Client, mut node: NodeWatch, vtep: Vtep) {
    let api: Api<Node> = Api::all(client);
    let name = node.name().to_string();
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    // The resourceVersion of the Node the last successful patch was computed from: until
    // the store shows a newer one, the patch is in flight through the watch and is not
    // sent again.
    let mut patched_from: Option<Option<String>> = None;
    let mut said: Option<AnnounceError> = None;
    let mut backoff = RETRY_MIN;
    loop {
        let step = node.read(|n| {
            let Some(n) = n else { return Step::Wait };
            let rv = n.metadata.resource_version.clone();
            if patched_from.as_ref() == Some(&rv) {
                return Step::Wait;
            }
            match patch(n, &vtep) {
                Ok(Some(p)) => Step::Send(p, rv),
                Ok(None) => Step::Wait,
                Err(e) => {
                    if said.as_ref() != Some(&e) {
                        log::error!("{e}");
                        said = Some(e);
                    }
                    Step::Wait
                }
            }
        });
        if let Step::Send(body, rv) = step {
            match api.patch(&name, &params, &Patch::Merge(&body)).await {
                Ok(_) => {
                    log::info!(
                        "Node {name}: announced VTEP {} (VNI {}) as kxdp's and flannel's annotations",
                        format_mac(vtep.mac),
                        vtep.vni
                    );
                    patched_from = Some(rv);
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    let hint = match &e {
                        kube::Error::Api(s) if s.code == 403 => {
                            "; grant kxdp-control's service account patch on nodes (deploy/rbac.yaml)"
                        }
                        _ => "",
                    };
                    log::warn!(
                        "Node {name}: cannot annotate it with this node's VTEP: {e}{hint}; trying again in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        if !node.changed().await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VTEP: Vtep = Vtep {
        mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01],
        vni: 1,
    };

    fn node(annotations: Value, addresses: Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "node-a", "annotations": annotations},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    #[test]
    fn backend_data_is_what_go_marshals_and_flannel_unmarshals() {
        assert_eq!(
            backend_data(&VTEP),
            r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}"#
        );
        // flannel's vxlanLeaseAttrs: VNI uint32, VtepMAC (net.ParseMAC of a string).
        let v: Value = serde_json::from_str(&backend_data(&Vtep { vni: 4096, ..VTEP })).unwrap();
        assert_eq!(v["VNI"], json!(4096));
        assert_eq!(v["VtepMAC"], json!("0a:58:0a:f4:01:01"));
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn public_ip_follows_the_tables_precedence() {
        let internal = json!([{"type": "ExternalIP", "address": "203.0.113.9"},
                              {"type": "InternalIP", "address": "fd00::2"},
                              {"type": "InternalIP", "address": "192.168.0.2"}]);
        let want = |ann: Value| {
            desired(&node(ann, internal.clone()), &VTEP).unwrap()[FLANNEL_PUBLIC_IP].clone()
        };
        assert_eq!(want(json!({})), "192.168.0.2");
        assert_eq!(
            want(json!({FLANNEL_PUBLIC_IP: "192.168.1.2"})),
            "192.168.1.2"
        );
        assert_eq!(
            want(json!({FLANNEL_PUBLIC_IP: "192.168.1.2", KXDP_VTEP_IP: "192.168.2.2"})),
            "192.168.2.2"
        );
        // Not IPv4: skipped, as flannel could not read it.
        assert_eq!(want(json!({KXDP_VTEP_IP: "fd00::9"})), "192.168.0.2");
        let e = desired(&node(json!({KXDP_VTEP_IP: "fd00::9"}), json!([])), &VTEP).unwrap_err();
        assert!(e.to_string().contains("no IPv4 address"), "{e}");
    }

    #[test]
    fn the_patch_is_the_whole_announcement_or_nothing() {
        let addresses = json!([{"type": "InternalIP", "address": "192.168.0.2"}]);
        let fresh = node(json!({"other": "kept"}), addresses.clone());
        let p = patch(&fresh, &VTEP).unwrap().expect("a patch");
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {
                "kxdp.io/vtep-mac": "0a:58:0a:f4:01:01",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:01:01\"}",
                "flannel.alpha.coreos.com/public-ip": "192.168.0.2",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true"}}})
        );
        let mut done = p["metadata"]["annotations"].clone();
        done["other"] = json!("kept");
        assert_eq!(
            patch(&node(done.clone(), addresses.clone()), &VTEP).unwrap(),
            None
        );
        // flannel's old VtepMAC (its flannel.1 device) is replaced.
        done[FLANNEL_BACKEND_DATA] = json!(r#"{"VNI":1,"VtepMAC":"9a:3c:2e:00:00:02"}"#);
        assert!(patch(&node(done, addresses), &VTEP).unwrap().is_some());
    }
}
