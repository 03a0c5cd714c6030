//! The plugin's record of its attachments, one empty file per attachment under
//! `<stateDir>/<network name>/`, named `<containerID>@<ifname>`.
//!
//! The host veth is gone with the pod's namespace when a container dies without a DEL, and
//! with it the alias naming its attachment; this record outlives it, so GC can still
//! release that attachment's address and tell the dataplane. ADD writes it before creating
//! anything (a crash half-way is then still found), DEL and a rolled-back ADD remove it.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::Attachment;

/// The records of one network.
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// The records of network `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Records {
        Records {
            dir: state_dir.join(name),
        }
    }

    fn file(&self, a: &Attachment) -> PathBuf {
        // A container ID holds no '@' (spec: alphanumerics, '_', '.', '-'), and an
        // interface name no '/': the name splits back at the first '@'.
        self.dir.join(format!("{}@{}", a.container_id, a.ifname))
    }

    /// Records `a`.
    pub fn add(&self, a: &Attachment) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.file(a), b"")
    }

    /// Whether `a` is recorded.
    pub fn contains(&self, a: &Attachment) -> bool {
        self.file(a).exists()
    }

    /// Forgets `a` (nothing if it was not recorded).
    pub fn remove(&self, a: &Attachment) -> io::Result<()> {
        match std::fs::remove_file(self.file(a)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every recorded attachment.
    pub fn list(&self) -> io::Result<Vec<Attachment>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other?,
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let Some((container_id, ifname)) = name.to_str().and_then(|n| n.split_once('@')) else {
                continue;
            };
            out.push(Attachment {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            });
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Records::new(tmp.path(), "kxdp");
        assert!(r.list().unwrap().is_empty());
        let a = Attachment {
            container_id: "c-1.x".into(),
            ifname: "eth0".into(),
        };
        let b = Attachment {
            container_id: "c2".into(),
            ifname: "net@1".into(),
        };
        r.add(&a).unwrap();
        r.add(&b).unwrap();
        assert!(r.contains(&a));
        assert_eq!(r.list().unwrap(), vec![a.clone(), b.clone()]);
        r.remove(&a).unwrap();
        r.remove(&a).unwrap();
        assert_eq!(r.list().unwrap(), vec![b]);
    }
}
