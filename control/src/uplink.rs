//! What kxdp-control needs to know about the dataplane's uplink: its MAC (this node's VTEP
//! MAC, announced on its Node) and its MTU (the pods' MTU is that less VXLAN's overhead).
//!
//! Both are read from sysfs (`/sys/class/net/IFACE/{address,mtu}`): the DaemonSet runs
//! kxdp-control in the host's network namespace, where the container's `/sys` shows the
//! host's interfaces, so no question to the dataplane is needed and the control socket's
//! protocol stays as it is.

use std::path::{Path, PathBuf};

/// Where the kernel lists network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Bytes VXLAN over IPv4 adds to a frame (outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8):
/// the overlay carries inner packets of at most the uplink's MTU less this, as flannel's
/// `encapOverhead`.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The smallest MTU an IPv4 link may have (RFC 791); kxdp-cni refuses less.
const MIN_MTU: u32 = 68;

/// The uplink as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    /// Its name (`--uplink`).
    pub name: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
}

/// Why the uplink could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The sysfs file is missing or unreadable (no such interface, no sysfs).
    #[error("--uplink {name}: cannot read {}: {source}; is {name} this node's uplink (kxdp-dataplane --uplink), and does the container see the host's /sys (hostNetwork: true)?", .path.display())]
    Read {
        /// The interface.
        name: String,
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold what the kernel writes there.
    #[error("--uplink {name}: {} holds {text:?}, not {what}", .path.display())]
    Malformed {
        /// The interface.
        name: String,
        /// The file.
        path: PathBuf,
        /// Its content.
        text: String,
        /// What was expected.
        what: &'static str,
    },
    /// The MTU leaves no room for a pod's packets inside VXLAN.
    #[error("--uplink {name}: MTU {mtu} less VXLAN's {VXLAN_OVERHEAD} bytes is below {MIN_MTU}")]
    MtuTooSmall {
        /// The interface.
        name: String,
        /// Its MTU.
        mtu: u32,
    },
}

impl Uplink {
    /// Reads interface `name` under `sys_class_net` ([`SYS_CLASS_NET`] outside tests).
    pub fn read(sys_class_net: &Path, name: &str) -> Result<Uplink, UplinkError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(UplinkError::Malformed {
                name: name.to_string(),
                path: sys_class_net.to_path_buf(),
                text: name.to_string(),
                what: "an interface name",
            });
        }
        let dir = sys_class_net.join(name);
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .map(|t| (t.trim().to_string(), path.clone()))
                .map_err(|source| UplinkError::Read {
                    name: name.to_string(),
                    path,
                    source,
                })
        };
        let malformed = |path: PathBuf, text: String, what| UplinkError::Malformed {
            name: name.to_string(),
            path,
            text,
            what,
        };
        let (text, path) = read("address")?;
        let mac = parse_mac(&text).ok_or_else(|| malformed(path, text, "a MAC address"))?;
        let (text, path) = read("mtu")?;
        let mtu: u32 = text
            .parse()
            .map_err(|_| malformed(path, text.clone(), "an MTU"))?;
        if mtu < MIN_MTU + VXLAN_OVERHEAD {
            return Err(UplinkError::MtuTooSmall {
                name: name.to_string(),
                mtu,
            });
        }
        Ok(Uplink {
            name: name.to_string(),
            mac,
            mtu,
        })
    }

    /// The pods' MTU: what fits in the overlay.
    pub fn pod_mtu(&self) -> u32 {
        self.mtu - VXLAN_OVERHEAD
    }
}

/// `aa:bb:cc:dd:ee:ff` (either case) as bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A MAC as Go's `net.HardwareAddr.String()` writes it (lower-case, colons), which is the
/// form flannel's `VtepMAC` has.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(name: &str, address: &str, mtu: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "kxdp-sysfs-{}-{name}-{}",
            std::process::id(),
            mtu.trim()
        ));
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("address"), address).unwrap();
        std::fs::write(dir.join("mtu"), mtu).unwrap();
        root
    }

    #[test]
    fn reads_mac_and_mtu_as_the_kernel_writes_them() {
        let root = sysfs("eth0", "52:54:00:AB:cd:0f\n", "1500\n");
        let up = Uplink::read(&root, "eth0").unwrap();
        assert_eq!(up.mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(up.mtu, 1500);
        assert_eq!(up.pod_mtu(), 1450);
        assert_eq!(format_mac(up.mac), "52:54:00:ab:cd:0f");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_sysfs_content_is_a_clear_error() {
        let root = sysfs("eth1", "not-a-mac\n", "1500\n");
        let e = Uplink::read(&root, "eth1").unwrap_err().to_string();
        assert!(e.contains("not a MAC address"), "{e}");
        let root2 = sysfs("eth2", "52:54:00:ab:cd:0f\n", "100\n");
        let e = Uplink::read(&root2, "eth2").unwrap_err().to_string();
        assert!(e.contains("MTU 100"), "{e}");
        let e = Uplink::read(&root, "absent").unwrap_err().to_string();
        assert!(e.starts_with("--uplink absent: cannot read"), "{e}");
        assert!(Uplink::read(&root, "../etc").is_err());
        std::fs::remove_dir_all(root).unwrap();
        std::fs::remove_dir_all(root2).unwrap();
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("0a:58:0a:f4:01:01"),
            Some([10, 88, 10, 244, 1, 1])
        );
        for bad in [
            "",
            "0a:58:0a:f4:01",
            "0a:58:0a:f4:01:01:02",
            "a:58:0a:f4:01:01",
            "zz:58:0a:f4:01:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
