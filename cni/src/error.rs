//! The CNI error object (spec section 5, "Error"): what the plugin prints on stdout, with a
//! non-zero exit, whenever an operation fails.

use serde::{Deserialize, Serialize};

/// Well-known error codes (spec section 5), and kxdp-cni's own (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure (reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (the dataplane is not reachable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// A netlink request (link, address, route, offload) failed.
    pub const NETLINK: u32 = 100;
    /// The dataplane refused a request or answered something unexpected.
    pub const DATAPLANE_REFUSED: u32 = 101;
    /// The delegated IPAM plugin could not be run, or its answer was not a result.
    pub const IPAM: u32 = 102;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 103;
    /// The plugin's state directory could not be read or written.
    pub const STATE: u32 = 104;
    /// A bug: the plugin panicked (caught, reported instead of a crash).
    pub const INTERNAL: u32 = 199;
}

/// A CNI error object. `cni_version` is filled in when printed (the version in use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The protocol version in use.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The error code (see [`code`]).
    pub code: u32,
    /// A short message characterizing the error.
    pub msg: String,
    /// A longer message describing it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with `code`, a short message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            cni_version: String::new(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON printed on stdout, for protocol version `version`.
    pub fn to_json(&self, version: &str) -> String {
        let mut e = self.clone();
        if e.cni_version.is_empty() {
            e.cni_version = version.to_string();
        }
        serde_json::to_string(&e).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{version}","code":{},"msg":"unprintable error"}}"#,
                e.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_keys() {
        let e = CniError::new(
            code::TRY_AGAIN_LATER,
            "dataplane not reachable",
            "connect: ENOENT",
        );
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "dataplane not reachable");
        assert_eq!(v["details"], "connect: ENOENT");
        // Details are optional: left out when empty, as the reference library does.
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(1, "x", "").to_json("1.0.0")).unwrap();
        assert!(v.get("details").is_none());
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}
