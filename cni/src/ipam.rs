//! Delegation to the IPAM plugin (spec section 4): found by name on `CNI_PATH`, run with
//! the plugin's own environment and the complete network configuration on stdin, its
//! stderr passed through, its stdout read as a result or an error object.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{code, CniError};
use crate::result::CniResult;

/// The version an IPAM plugin older than 1.1.0 is asked in, when it refuses the config's
/// 1.1.0 (Debian's host-local 1.1.1 speaks up to 1.0.0). Both versions' results have the
/// same shape for what IPAM returns.
const FALLBACK_VERSION: &str = "1.0.0";

/// One IPAM plugin, ready to be run.
pub struct Ipam {
    binary: PathBuf,
    config: serde_json::Value,
}

/// Which attachment a delegated call is about, when it is not the plugin's own
/// (GC releasing the lease of a stale attachment).
pub struct For<'a> {
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
}

impl Ipam {
    /// Finds `plugin` on `path`. Code 7 when it is not there (the config names a plugin the
    /// node lacks).
    pub fn find(plugin: &str, path: &[PathBuf], stdin: &[u8]) -> Result<Ipam, CniError> {
        let binary = path
            .iter()
            .map(|dir| dir.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("IPAM plugin {plugin:?} not found"),
                    format!(
                        "looked in CNI_PATH {:?}",
                        path.iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                    ),
                )
            })?;
        let config = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        Ok(Ipam { binary, config })
    }

    /// ADD: the addresses (and routes, DNS) for this attachment.
    pub fn add(&self) -> Result<CniResult, CniError> {
        let out = self.run("ADD", None)?;
        let value: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
            CniError::new(
                code::IPAM,
                "the IPAM plugin's result is not JSON",
                e.to_string(),
            )
        })?;
        let result = CniResult::parse(value, "the IPAM plugin's result")?;
        if result.ips.is_empty() {
            return Err(CniError::new(
                code::IPAM,
                "the IPAM plugin gave no address",
                "",
            ));
        }
        Ok(result)
    }

    /// DEL: release the addresses of this attachment (or of `other`).
    pub fn del(&self, other: Option<For<'_>>) -> Result<(), CniError> {
        self.run("DEL", other).map(drop)
    }

    /// CHECK: the addresses are still this attachment's.
    pub fn check(&self) -> Result<(), CniError> {
        self.run("CHECK", None).map(drop)
    }

    /// GC and STATUS are 1.1.0's: delegated only to a plugin that speaks 1.1.0.
    pub fn run_if_1_1(&self, command: &str) -> Result<bool, CniError> {
        if !self.speaks("1.1.0") {
            return Ok(false);
        }
        self.run(command, None).map(|_| true)
    }

    /// Whether the plugin lists `version` in its VERSION answer.
    fn speaks(&self, version: &str) -> bool {
        let answer = self.exec("VERSION", None, &serde_json::json!({"cniVersion": version}));
        let Ok(out) = answer else { return false };
        serde_json::from_slice::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| {
                v.get("supportedVersions")?
                    .as_array()
                    .map(|a| a.iter().any(|x| x == version))
            })
            .unwrap_or(false)
    }

    /// Runs `command` with the config; a 1.1.0 config the plugin refuses as an
    /// incompatible version (code 1) is retried as 1.0.0.
    fn run(&self, command: &str, other: Option<For<'_>>) -> Result<Vec<u8>, CniError> {
        match self.exec(command, other.as_ref(), &self.config) {
            Err(e)
                if e.code == code::INCOMPATIBLE_VERSION && self.config["cniVersion"] == "1.1.0" =>
            {
                let mut older = self.config.clone();
                older["cniVersion"] = FALLBACK_VERSION.into();
                self.exec(command, other.as_ref(), &older)
            }
            other => other,
        }
    }

    fn exec(
        &self,
        command: &str,
        other: Option<&For<'_>>,
        config: &serde_json::Value,
    ) -> Result<Vec<u8>, CniError> {
        let stdin = serde_json::to_vec(config).unwrap_or_default();
        let mut cmd = Command::new(&self.binary);
        cmd.env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(o) = other {
            cmd.env("CNI_CONTAINERID", o.container_id)
                .env("CNI_IFNAME", o.ifname)
                .env_remove("CNI_NETNS");
        }
        let failed = |e: std::io::Error| {
            CniError::new(
                code::IPAM,
                format!("could not run the IPAM plugin {}", display(&self.binary)),
                e.to_string(),
            )
        };
        let mut child = cmd.spawn().map_err(failed)?;
        if let Some(mut i) = child.stdin.take() {
            // A plugin that exits without reading its stdin (VERSION may) closes the pipe:
            // that is not an error of ours.
            let _ = i.write_all(&stdin);
        }
        let out = child.wait_with_output().map_err(failed)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        // A CNI plugin reports its failure as an error object on stdout: pass it on as it
        // is, so the runtime sees host-local's own code and message.
        match serde_json::from_slice::<CniError>(&out.stdout) {
            Ok(mut e) if e.code != 0 => {
                e.cni_version.clear();
                Err(e)
            }
            _ => Err(CniError::new(
                code::IPAM,
                format!(
                    "the IPAM plugin {} failed ({})",
                    display(&self.binary),
                    out.status
                ),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )),
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
