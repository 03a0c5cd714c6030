//! The node's CNI network config for `kxdp-cni`, written from its Node object, as flanneld
//! writes `subnet.env` for flannel's plugin: `host-local` allocates from the Node's
//! `spec.podCIDRs` (IPv4 and IPv6), the pods' MTU is what fits in the overlay, and the
//! plugin reaches the dataplane on the socket kxdp-control uses.
//!
//! The file is `05-kxdp.conflist`: container runtimes (containerd, CRI-O, through libcni's
//! `ConfFiles`) take the first config in lexical order, and flannel's `10-flannel.conflist`
//! and Calico's `10-calico.conflist` sort before `10-kxdp`, so a node migrated from them
//! would keep using their config had kxdp's the same prefix. It is written atomically (a
//! temporary file whose name the runtime ignores, then a rename), and not at all when it
//! already holds the same text, so the runtime's directory watch sees no spurious change.
//!
//! A Node's podCIDRs are set once (the API server refuses to change them afterwards), so
//! the config is written once its Node has them: [`install`] waits for that and returns.
//! The DaemonSet runs it in an init container, as root, because the host's CNI directory
//! belongs to root and kxdp-control proper runs unprivileged.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::Api;
use serde_json::json;

/// The config's file name in the CNI config directory.
pub const CONFLIST_NAME: &str = "05-kxdp.conflist";

/// Where kxdp-cni records attachments (its default, said explicitly).
pub const STATE_DIR: &str = "/var/lib/cni/kxdp";

/// How long [`install`] waits between two looks at a Node without podCIDRs, and at most
/// after a failed request (the node IPAM controller assigns them within seconds of the
/// Node's registration).
const POLL: Duration = Duration::from_secs(2);
/// The first wait after a failed request, doubled up to [`POLL_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait after failed requests.
const POLL_MAX: Duration = Duration::from_secs(30);

/// What the config says besides the Node's pod networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConf {
    /// The pods' MTU (the uplink's less VXLAN's overhead).
    pub mtu: u32,
    /// RX/TX queues of each pod veth: `kxdp-dataplane --workers`.
    pub queues: u32,
    /// The dataplane's control socket, as the host sees it (kxdp-cni runs on the host).
    pub dataplane_socket: PathBuf,
}

/// Why the config could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    /// Writing, syncing or renaming the file failed.
    #[error("cannot write the CNI config {}: {source}; the directory must exist and be writable (the host's /etc/cni/net.d, mounted read-write)", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// The Node's pod networks: `spec.podCIDRs` (whose first is `spec.podCIDR`), else
/// `spec.podCIDR`; host bits cleared, duplicates and invalid entries left out (the latter
/// with a warning).
pub fn pod_cidrs(node: &Node) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = Vec::new();
    let Some(spec) = &node.spec else {
        return nets;
    };
    for c in spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter()) {
        match c.parse::<IpNet>() {
            Ok(net) if !nets.contains(&net.trunc()) => nets.push(net.trunc()),
            Ok(_) => {}
            Err(_) => log::warn!(
                "Node {}: pod CIDR {c:?} is not a CIDR; left out of the CNI config",
                node.metadata.name.as_deref().unwrap_or("")
            ),
        }
    }
    nets
}

/// The config's text for a node with these pod networks; `None` without any (no config
/// is better than one that gives pods no address).
pub fn render(pod_cidrs: &[IpNet], conf: &CniConf) -> Option<String> {
    if pod_cidrs.is_empty() {
        return None;
    }
    // One range set per network: host-local gives each pod one address from each.
    let ranges: Vec<_> = pod_cidrs
        .iter()
        .map(|n| json!([{"subnet": n.to_string()}]))
        .collect();
    let list = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "kxdp",
        "plugins": [{
            "type": "kxdp",
            "mtu": conf.mtu,
            "queues": conf.queues,
            "dataplaneSocket": conf.dataplane_socket,
            "stateDir": STATE_DIR,
            "ipam": {"type": "host-local", "ranges": ranges},
        }],
    });
    let mut text = serde_json::to_string_pretty(&list).expect("a JSON value serializes");
    text.push('\n');
    Some(text)
}

/// Puts `text` in `dir`/[`CONFLIST_NAME`] atomically, unless the file already holds it;
/// `true` when it was written.
pub fn write_if_changed(dir: &Path, text: &str) -> Result<bool, CniConfError> {
    let path = dir.join(CONFLIST_NAME);
    if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    // libcni reads only *.conf, *.conflist and *.json: the runtime never sees this name.
    let tmp = dir.join(format!(".{CONFLIST_NAME}.{}.tmp", std::process::id()));
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CniConfError::Write { path, source }
    };
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written.map_err(err(&tmp)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, &path).map_err(err(&path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself is durable once the directory is synced; a failure here leaves a
    // correct file that a crash might lose, which the next start writes again.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Waits until the Node `node` has podCIDRs, then writes its config into `dir`; returns the
/// file's path. Lists only that Node (by field selector), so it needs no more than the
/// `list` on nodes kxdp-control has anyway. Failed requests are retried with backoff.
pub async fn install(
    client: kube::Client,
    node: &str,
    dir: &Path,
    conf: &CniConf,
) -> Result<PathBuf, CniConfError> {
    let api: Api<Node> = Api::all(client);
    let params = ListParams::default().fields(&format!("metadata.name={node}"));
    let mut retry = RETRY_MIN;
    let mut said = None;
    loop {
        let wait = match api.list(&params).await {
            Ok(list) => {
                retry = RETRY_MIN;
                let found = list
                    .items
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(node));
                let cidrs = found.map(pod_cidrs).unwrap_or_default();
                if let Some(text) = render(&cidrs, conf) {
                    let written = write_if_changed(dir, &text)?;
                    let path = dir.join(CONFLIST_NAME);
                    let nets: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                    let how = if written { "wrote" } else { "kept" };
                    log::info!(
                        "{how} {} for Node {node}'s pod networks {}",
                        path.display(),
                        nets.join(", ")
                    );
                    return Ok(path);
                }
                let why = match found {
                    None => format!("Node {node} does not exist yet"),
                    Some(_) => format!("Node {node} has no podCIDRs yet (the controller manager's --allocate-node-cidrs assigns them)"),
                };
                if said.as_ref() != Some(&why) {
                    log::info!("{why}; waiting");
                    said = Some(why);
                }
                POLL
            }
            Err(e) => {
                let hint = match &e {
                    kube::Error::Api(s) if s.code == 403 => {
                        "; grant kxdp-control's service account list on nodes"
                    }
                    _ => "",
                };
                log::warn!("Node {node}: cannot list it: {e}{hint}; trying again in {retry:?}");
                let wait = retry;
                retry = (retry * 2).min(POLL_MAX);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn node(spec: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "node-a"}, "spec": spec})).unwrap()
    }

    fn conf() -> CniConf {
        CniConf {
            mtu: 1450,
            queues: 2,
            dataplane_socket: PathBuf::from("/run/kxdp/dataplane.sock"),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kxdp-cni-conf-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ranges(text: &str) -> Value {
        let v: Value = serde_json::from_str(text).unwrap();
        v["plugins"][0]["ipam"]["ranges"].clone()
    }

    #[test]
    fn one_pod_cidr_is_one_range() {
        let n = node(json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}));
        let text = render(&pod_cidrs(&n), &conf()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "kxdp");
        let p = &v["plugins"][0];
        assert_eq!(p["type"], "kxdp");
        assert_eq!(p["mtu"], 1450);
        assert_eq!(p["queues"], 2);
        assert_eq!(p["dataplaneSocket"], "/run/kxdp/dataplane.sock");
        assert_eq!(p["stateDir"], STATE_DIR);
        assert_eq!(p["ipam"]["type"], "host-local");
        assert_eq!(ranges(&text), json!([[{"subnet": "10.244.1.0/24"}]]));
    }

    #[test]
    fn two_pod_cidrs_are_two_ranges_in_the_nodes_order() {
        let n = node(json!({"podCIDR": "fd00:10:244:1::/64",
                            "podCIDRs": ["fd00:10:244:1::/64", "10.244.1.0/24"]}));
        let text = render(&pod_cidrs(&n), &conf()).unwrap();
        assert_eq!(
            ranges(&text),
            json!([[{"subnet": "fd00:10:244:1::/64"}], [{"subnet": "10.244.1.0/24"}]])
        );
        // Only podCIDR (an object from before podCIDRs), host bits set, junk: cleaned up.
        let n = node(json!({"podCIDR": "10.244.1.7/24", "podCIDRs": ["bogus"]}));
        assert_eq!(
            pod_cidrs(&n),
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn no_pod_cidr_no_config() {
        assert_eq!(render(&pod_cidrs(&node(json!({}))), &conf()), None);
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(render(&pod_cidrs(&n), &conf()), None);
    }

    #[test]
    fn the_shipped_example_has_the_same_shape() {
        // deploy/cni/10-kxdp.conflist is what an operator installing by hand starts from.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cni/10-kxdp.conflist"
        );
        let example: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cidrs: Vec<IpNet> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        let conf = CniConf {
            queues: 1,
            ..conf()
        };
        let ours: Value = serde_json::from_str(&render(&cidrs, &conf).unwrap()).unwrap();
        assert_eq!(ours, example);
    }

    #[test]
    fn written_atomically_and_only_when_changed() {
        let dir = temp_dir("write");
        let path = dir.join(CONFLIST_NAME);
        let one = render(&["10.244.1.0/24".parse().unwrap()], &conf()).unwrap();
        assert!(write_if_changed(&dir, &one).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), one);
        // Same podCIDRs: the file is not touched (same inode, no temporary left).
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&path);
        assert!(!write_if_changed(&dir, &one).unwrap());
        assert_eq!(ino(&path), before);
        // Changed: replaced by a rename (a new inode), never rewritten in place, so a
        // runtime reading it sees the old text or the new one.
        let two = render(
            &[
                "10.244.1.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            &conf(),
        )
        .unwrap();
        assert!(write_if_changed(&dir, &two).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), two);
        assert_ne!(ino(&path), before);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CONFLIST_NAME]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let dir = temp_dir("missing").join("absent");
        let e = write_if_changed(&dir, "{}").unwrap_err().to_string();
        assert!(e.contains("cannot write the CNI config"), "{e}");
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn runtimes_pick_kxdps_config_before_flannels_and_calicos() {
        let mut names = [
            "10-flannel.conflist",
            "10-calico.conflist",
            CONFLIST_NAME,
            "99-loopback.conf",
        ];
        names.sort();
        assert_eq!(names[0], CONFLIST_NAME);
    }
}
