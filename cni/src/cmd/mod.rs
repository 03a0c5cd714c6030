//! The CNI operations. ADD, DEL, CHECK and GC each have a module; STATUS and VERSION are a
//! few lines here.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Env, NetConf, SUPPORTED_VERSIONS};
use crate::dataplane;
use crate::error::{code, CniError};
use crate::ipam::Ipam;

/// VERSION: the versions spoken, in the version asked (the newest when stdin says none).
pub fn version(stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "1.1.0".to_string());
    serde_json::json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// STATUS (1.1.0): ready iff the dataplane answers; code 50 otherwise. An IPAM plugin
/// that speaks 1.1.0 is asked too, as the spec requires of a delegating plugin.
pub fn status(conf: &NetConf, env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    needs_1_1(conf, "STATUS")?;
    dataplane::ready(&conf.dataplane_socket).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "the kxdp dataplane is not available",
            e.to_string(),
        )
    })?;
    if !env.path.is_empty() {
        Ipam::find(conf.ipam_type()?, &env.path, stdin)?.run_if_1_1("STATUS")?;
    }
    Ok(())
}

/// Code 1 unless the config is 1.1.0 (STATUS and GC are 1.1.0's).
fn needs_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.is_v1_1() {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("config version does not allow {command}"),
        format!(
            "{command} needs cniVersion 1.1.0, the config is {}",
            conf.cni_version
        ),
    ))
}

/// A netlink failure as a CNI error.
fn netlink_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CniError {
    let what = what.into();
    move |e| CniError::new(code::NETLINK, what, e.to_string())
}

/// A state-directory failure as a CNI error.
fn state_error(e: std::io::Error) -> CniError {
    CniError::new(
        code::STATE,
        "could not update kxdp-cni's state directory",
        e.to_string(),
    )
}

/// The gateway of an address: the one IPAM gave, else the first address of its network
/// (host-local's default, and the address kxdp's dataplane answers as the pods' gateway).
pub fn gateway_of(address: IpNet, given: Option<IpAddr>) -> IpAddr {
    given.unwrap_or_else(|| match address.network() {
        IpAddr::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(n).wrapping_add(1))),
        IpAddr::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n).wrapping_add(1))),
    })
}

/// The default route of `ip`'s family.
pub fn default_route_of(ip: IpAddr) -> IpNet {
    // ipnet's defaults are 0.0.0.0/0 and ::/0.
    match ip {
        IpAddr::V4(_) => IpNet::V4(Default::default()),
        IpAddr::V6(_) => IpNet::V6(Default::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_answer_lists_1_0_and_1_1() {
        let v: serde_json::Value =
            serde_json::from_str(&version(br#"{"cniVersion":"1.0.0"}"#)).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
        let v: serde_json::Value = serde_json::from_str(&version(b"")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn gateway_defaults_to_the_first_address_as_the_dataplane_answers() {
        let a: IpNet = "10.244.1.5/24".parse().unwrap();
        assert_eq!(gateway_of(a, None), "10.244.1.1".parse::<IpAddr>().unwrap());
        let a: IpNet = "fd00:10:244:1::5/64".parse().unwrap();
        assert_eq!(
            gateway_of(a, None),
            "fd00:10:244:1::1".parse::<IpAddr>().unwrap()
        );
        let given: IpAddr = "10.244.1.254".parse().unwrap();
        assert_eq!(
            gateway_of("10.244.1.5/24".parse().unwrap(), Some(given)),
            given
        );
    }
}
