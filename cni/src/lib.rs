//! kxdp-cni: the CNI plugin (spec 1.0.0 and 1.1.0) that gives each pod a veth pair and
//! hands its host end to the running `kxdp-dataplane`.
//!
//! ADD creates the pair (the pod's end in its namespace as `CNI_IFNAME`, the host end named
//! from the attachment), gets the addresses from the IPAM plugin the config names
//! (`host-local`), configures the pod's end (addresses, default routes via the gateway,
//! offloads off) and asks the dataplane, over its control socket, to attach the host end.
//! DEL undoes that and is idempotent; CHECK verifies it; STATUS asks whether the dataplane
//! answers; GC removes what belongs to attachments the runtime no longer has.
//!
//! What it deliberately does not do: forward packets, program Service tables, or decide
//! addresses itself. It touches only interfaces it created (named `kxdp…`, aliased
//! `kxdp-cni <container>/<ifname>`), and runs in whatever namespace the runtime runs it in.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

pub mod cmd;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod ipam;
pub mod naming;
pub mod netns;
// The route-netlink client and the offloads, shared with kxdp-dataplane's host pair.
pub use netconf::{netlink, offload};
pub mod result;
pub mod state;

use config::{Command, Env, NetConf};
use error::CniError;

/// What one invocation printed when it failed: the error and the version to print it in.
#[derive(Debug)]
pub struct Failure {
    /// The error object.
    pub error: CniError,
    /// The protocol version in use (the config's, when it could be read).
    pub version: String,
}

/// Runs one invocation: the `CNI_*` variables and stdin in, what to print on stdout (if
/// anything) out.
pub fn run(vars: &BTreeMap<String, String>, stdin: &[u8]) -> Result<Option<String>, Failure> {
    let version = lenient_version(stdin);
    let fail = |error: CniError| Failure {
        error,
        version: version.clone(),
    };
    let env = Env::parse(vars).map_err(fail)?;
    if env.command == Command::Version {
        return Ok(Some(cmd::version(stdin)));
    }
    let conf = NetConf::parse(stdin).map_err(fail)?;
    match env.command {
        Command::Add => cmd::add::run(&conf, &env, stdin).map(Some),
        Command::Del => cmd::del::run(&conf, &env, stdin).map(|()| None),
        Command::Check => cmd::check::run(&conf, &env, stdin).map(|()| None),
        Command::Status => cmd::status(&conf, &env, stdin).map(|()| None),
        Command::Gc => cmd::gc::run(&conf, &env, stdin).map(|()| None),
        Command::Version => Ok(Some(cmd::version(stdin))),
    }
    .map_err(fail)
}

/// The config's `cniVersion` if stdin is JSON with one, else the newest this plugin speaks:
/// the version an error is printed in even when the config could not be read.
fn lenient_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "1.1.0".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn errors_carry_the_code_and_the_config_version() {
        let add = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let conf =
            br#"{"cniVersion":"1.0.0","name":"n","type":"kxdp","ipam":{"type":"host-local"}}"#;
        // CNI_NETNS missing: 4, printed as 1.0.0 (the config's version).
        let f = run(&add, conf).unwrap_err();
        assert_eq!(f.error.code, error::code::INVALID_ENVIRONMENT);
        assert_eq!(f.version, "1.0.0");
        // Malformed stdin: 6, printed in the newest version.
        let f = run(
            &vars(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ]),
            b"{not json",
        )
        .unwrap_err();
        assert_eq!(f.error.code, error::code::DECODE);
        assert_eq!(f.version, "1.1.0");
        // STATUS and GC are 1.1.0's: 1 for a 1.0.0 config.
        for cmd in ["STATUS", "GC"] {
            let f = run(&vars(&[("CNI_COMMAND", cmd)]), conf).unwrap_err();
            assert_eq!(f.error.code, error::code::INCOMPATIBLE_VERSION, "{cmd}");
        }
        // VERSION needs no config at all.
        assert!(run(&vars(&[("CNI_COMMAND", "VERSION")]), b"")
            .unwrap()
            .is_some());
    }

    #[test]
    fn gc_without_the_valid_list_removes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let records = state::Records::new(tmp.path(), "n");
        let a = config::Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        records.add(&a).unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"kxdp","ipam":{{"type":"host-local"}},"stateDir":{:?}}}"#,
            tmp.path()
        );
        let f = run(&vars(&[("CNI_COMMAND", "GC")]), conf.as_bytes()).unwrap_err();
        assert_eq!(f.error.code, error::code::INVALID_CONFIG);
        assert_eq!(records.list().unwrap(), vec![a]);
    }
}
