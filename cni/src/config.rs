//! What the runtime gives the plugin: the network configuration on stdin and the `CNI_*`
//! environment variables (spec sections 1 and 2), parsed and checked.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{code, CniError};

/// The protocol versions kxdp-cni speaks. 0.x is left out on purpose: its result shape
/// (an `ips[].version` field, optional interfaces) differs, and every runtime that can run
/// kxdp (containerd 1.7+, CRI-O 1.26+) speaks 1.0.0.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// Where the dataplane's control socket is unless the config says otherwise.
pub const DEFAULT_DATAPLANE_SOCKET: &str = "/run/kxdp/dataplane.sock";
/// Where kxdp-cni records its attachments unless the config says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni/kxdp";
/// The pods' MTU unless the config says otherwise: 1500 less VXLAN's 50 bytes over IPv4,
/// as flannel's default.
pub const DEFAULT_MTU: u32 = 1450;

/// The plugin's network configuration (one entry of a `.conflist`'s `plugins`, with
/// `cniVersion` and `name` inserted by the runtime). Unknown keys are ignored, as the spec
/// lets other plugins' and runtimes' keys pass through.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The protocol version the runtime chose.
    #[serde(default)]
    pub cni_version: String,
    /// The network's name (host-local keys its leases by it).
    #[serde(default)]
    pub name: String,
    /// The plugin type (`kxdp`).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The delegated IPAM plugin's section; only its `type` is read here.
    pub ipam: Option<IpamConf>,
    /// The dataplane's control socket.
    #[serde(default = "default_socket")]
    pub dataplane_socket: PathBuf,
    /// The veth pair's MTU (both ends).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// RX and TX queues of each veth end: kxdp's worker i serves queue i of every
    /// interface, so this is `kxdp-dataplane --workers`.
    #[serde(default = "default_queues")]
    pub queues: u32,
    /// Where attachments are recorded for GC (one file per attachment).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// DNS settings for the result (the network config's `dns`, spec section 1).
    pub dns: Option<crate::result::Dns>,
    /// The previous plugin's result (chained ADD; CHECK and DEL).
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still has.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_DATAPLANE_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_mtu() -> u32 {
    DEFAULT_MTU
}
fn default_queues() -> u32 {
    1
}

/// The `ipam` section.
#[derive(Clone, Debug, Deserialize)]
pub struct IpamConf {
    /// The IPAM plugin's executable name, looked up on `CNI_PATH`.
    #[serde(rename = "type")]
    pub plugin_type: String,
}

/// One attachment: what `CNI_CONTAINERID` and `CNI_IFNAME` were on its ADD.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name in the container.
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin. Malformed JSON is code 6; a config the plugin cannot work with is 7;
    /// a version it does not speak is 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        conf.check_version()?;
        if conf.name.is_empty() || conf.name.contains('/') || conf.name == "." || conf.name == ".."
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network name",
                format!("name {:?}: must be non-empty and not a path", conf.name),
            ));
        }
        if !(68..=65535).contains(&conf.mtu) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid mtu",
                format!("mtu {}: must be 68 to 65535", conf.mtu),
            ));
        }
        if !(1..=256).contains(&conf.queues) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid queues",
                format!("queues {}: must be 1 to 256", conf.queues),
            ));
        }
        Ok(conf)
    }

    /// Code 1 unless `cniVersion` is one of [`SUPPORTED_VERSIONS`].
    fn check_version(&self) -> Result<(), CniError> {
        if SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Ok(());
        }
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "config is {:?}, kxdp-cni supports {}",
                self.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }

    /// Whether the config's version has STATUS and GC (1.1.0).
    pub fn is_v1_1(&self) -> bool {
        self.cni_version == "1.1.0"
    }

    /// The IPAM plugin's name, or code 7 when the config has none.
    pub fn ipam_type(&self) -> Result<&str, CniError> {
        match &self.ipam {
            Some(i) if !i.plugin_type.is_empty() && !i.plugin_type.contains('/') => {
                Ok(&i.plugin_type)
            }
            _ => Err(CniError::new(
                code::INVALID_CONFIG,
                "missing ipam",
                "kxdp-cni delegates addresses to an IPAM plugin: set ipam.type (e.g. host-local)",
            )),
        }
    }
}

/// The operation asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create the attachment.
    Add,
    /// Remove it.
    Del,
    /// Verify it.
    Check,
    /// Is the plugin ready (1.1)?
    Status,
    /// Remove what belongs to attachments no longer valid (1.1).
    Gc,
    /// Which versions the plugin speaks.
    Version,
}

/// The `CNI_*` environment variables of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for STATUS, GC, VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, split into pairs.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`, split.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the variables from `vars` (the process environment, or a test's map), and
    /// checks that each one the command requires is there and well-formed (code 4, naming
    /// the variable).
    pub fn parse(vars: &BTreeMap<String, String>) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let bad = |var: &str, why: String| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("invalid environment variable {var}"),
                why,
            )
        };
        let command = match get("CNI_COMMAND").as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            "" => return Err(bad("CNI_COMMAND", "not set".into())),
            other => return Err(bad("CNI_COMMAND", format!("unknown command {other:?}"))),
        };
        let env = Env {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS")).map_err(|e| bad("CNI_ARGS", e))?,
            path: std::env::split_paths(&get("CNI_PATH"))
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        };
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        if attachment {
            validate_container_id(&env.container_id).map_err(|e| bad("CNI_CONTAINERID", e))?;
            validate_ifname(&env.ifname).map_err(|e| bad("CNI_IFNAME", e))?;
        }
        if matches!(command, Command::Add | Command::Check) && env.netns.is_empty() {
            return Err(bad("CNI_NETNS", "not set".into()));
        }
        Ok(env)
    }
}

/// `KEY=VALUE;KEY=VALUE`.
fn parse_args(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{kv:?} is not KEY=VALUE")),
        })
        .collect()
}

/// Spec: not empty, an alphanumeric first, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => Err("not set".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            Err(format!("{id:?} must start with a letter or digit"))
        }
        _ if chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) => Ok(()),
        _ => Err(format!(
            "{id:?} may hold only letters, digits, '_', '.' and '-'"
        )),
    }
}

/// What the kernel takes as an interface name: 1 to 15 bytes, no `/`, `:` or white space,
/// not `.` or `..`.
fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("not set".into());
    }
    if name.len() > 15 {
        return Err(format!("{name:?} is longer than 15 bytes"));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
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

    const CONF: &str = r#"{
        "cniVersion": "1.1.0", "name": "kxdp", "type": "kxdp",
        "mtu": 1400, "queues": 2, "dataplaneSocket": "/tmp/dp.sock",
        "somebodyElses": {"key": true},
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}
    }"#;

    #[test]
    fn config_is_parsed_with_unknown_keys_ignored() {
        let c = NetConf::parse(CONF.as_bytes()).unwrap();
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.queues, 2);
        assert_eq!(c.dataplane_socket, PathBuf::from("/tmp/dp.sock"));
        assert_eq!(c.ipam_type().unwrap(), "host-local");
        assert!(c.is_v1_1());
        // Defaults.
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"kxdp","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.dataplane_socket, PathBuf::from(DEFAULT_DATAPLANE_SOCKET));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(!c.is_v1_1());
    }

    #[test]
    fn the_shipped_conflist_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cni/10-kxdp.conflist"
        );
        let list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        // What a runtime hands the plugin: its entry, with the list's version and name.
        let mut entry = list["plugins"][0].clone();
        entry["cniVersion"] = list["cniVersion"].clone();
        entry["name"] = list["name"].clone();
        let c = NetConf::parse(entry.to_string().as_bytes()).unwrap();
        assert_eq!(c.plugin_type, "kxdp");
        assert_eq!(c.ipam_type().unwrap(), "host-local");
        assert_eq!(c.dataplane_socket, PathBuf::from(DEFAULT_DATAPLANE_SOCKET));
        assert_eq!(c.mtu, DEFAULT_MTU);
    }

    #[test]
    fn malformed_json_is_code_6() {
        for bad in [&b"{"[..], b"", b"[1,2]", br#"{"cniVersion": 3}"#, b"\xff"] {
            assert_eq!(
                NetConf::parse(bad).unwrap_err().code,
                code::DECODE,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for v in ["0.4.0", "0.3.1", "2.0.0", ""] {
            let conf = format!(r#"{{"cniVersion":"{v}","name":"n","type":"kxdp"}}"#);
            let e = NetConf::parse(conf.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
            assert!(e.details.contains("1.0.0, 1.1.0"), "{}", e.details);
        }
    }

    #[test]
    fn bad_settings_are_code_7() {
        for conf in [
            r#"{"cniVersion":"1.0.0","name":"","type":"kxdp"}"#,
            r#"{"cniVersion":"1.0.0","name":"../x","type":"kxdp"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"kxdp","mtu":20}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"kxdp","queues":0}"#,
        ] {
            assert_eq!(
                NetConf::parse(conf.as_bytes()).unwrap_err().code,
                code::INVALID_CONFIG,
                "{conf}"
            );
        }
        let no_ipam = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"kxdp"}"#);
        assert_eq!(
            no_ipam.unwrap().ipam_type().unwrap_err().code,
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn valid_attachments_are_read() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"kxdp",
                 "cni.dev/valid-attachments":[{"containerID":"a1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "a1".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn environment_is_checked_per_command() {
        let ok = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=web;IgnoreUnknown=1"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]);
        let env = Env::parse(&ok).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.path.len(), 2);
        assert_eq!(env.args[0], ("K8S_POD_NAME".into(), "web".into()));

        let missing = |drop: &str, cmd: &str| {
            let mut v = ok.clone();
            v.insert("CNI_COMMAND".into(), cmd.into());
            v.remove(drop);
            Env::parse(&v)
        };
        for (var, cmd) in [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ADD"),
            ("CNI_NETNS", "ADD"),
            ("CNI_IFNAME", "ADD"),
            ("CNI_CONTAINERID", "DEL"),
            ("CNI_NETNS", "CHECK"),
        ] {
            let e = missing(var, cmd).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENVIRONMENT, "{var} {cmd}");
            assert!(e.msg.contains(var), "the message names {var}: {}", e.msg);
        }
        // DEL needs no netns (it may be gone); STATUS, GC and VERSION no attachment.
        assert!(missing("CNI_NETNS", "DEL").is_ok());
        for cmd in ["STATUS", "GC", "VERSION"] {
            assert!(Env::parse(&vars(&[("CNI_COMMAND", cmd)])).is_ok(), "{cmd}");
        }
        for (var, value) in [
            ("CNI_COMMAND", "FROB"),
            ("CNI_CONTAINERID", "-leading-dash"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "averyveryverylongname"),
            ("CNI_IFNAME", "et/h0"),
            ("CNI_ARGS", "novalue"),
        ] {
            let mut v = ok.clone();
            v.insert(var.into(), value.into());
            let e = Env::parse(&v).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENVIRONMENT, "{var}={value}");
            assert!(e.msg.contains(var));
        }
    }
}
