//! kxdp-cni against real kernels: the built binary run as a runtime runs it, inside a
//! "node" network namespace this test creates, setting up a "pod" namespace, with Debian's
//! host-local as IPAM (`/usr/lib/cni`, package containernetworking-plugins; its dataDir in
//! a temporary folder) and a fake dataplane serving the control socket with `nat::wire`.
//!
//! Needs root; skipped (with a message saying so) otherwise, or without host-local.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nat::wire::{self, Message};

const CNI_PATH: &str = "/usr/lib/cni";

/// Network namespaces made by the test, deleted when it ends, however it ends.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", name]);
        self.0.push(name.to_string());
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stand-in for kxdp-dataplane's control socket: answers AttachPod, DetachPod and
/// GetStats as the dataplane does, and records what it was asked.
struct FakeDataplane {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDataplane {
    fn start(path: &Path, seen: Arc<Mutex<Vec<Message>>>) -> FakeDataplane {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the fake dataplane's socket");
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut attached: Vec<String> = Vec::new();
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let Ok(msg) = wire::read_message(&mut stream) else {
                    continue;
                };
                seen2.lock().unwrap().push(msg.clone());
                let answer = match msg {
                    Message::AttachPod { ifname, .. } => {
                        attached.push(ifname.clone());
                        Message::PodAttached { ifname }
                    }
                    Message::DetachPod { ifname, .. } => {
                        let found = attached.contains(&ifname);
                        attached.retain(|i| *i != ifname);
                        Message::PodDetached { ifname, found }
                    }
                    Message::GetStats => Message::Stats {
                        generation: 1,
                        conntrack: 0,
                        conntrack_capacity: 1024,
                        workers: vec![],
                        policy_drops: vec![],
                        refused_tables: 0,
                        poll_mode: "adaptive".into(),
                    },
                    other => Message::Refused {
                        reason: format!("fake dataplane: {other:?}"),
                    },
                };
                let _ = wire::write_message(&mut stream, &answer);
            }
        });
        FakeDataplane {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDataplane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One test run's surroundings.
struct Lab {
    node: String,
    tmp: tempfile::TempDir,
}

/// What one plugin invocation gave.
struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }
    fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("an error code")
    }
    fn assert_ok(&self, what: &str) {
        assert!(self.ok, "{what}: {} / {}", self.stdout, self.stderr);
    }
}

impl Lab {
    fn socket(&self) -> PathBuf {
        self.tmp.path().join("dataplane.sock")
    }

    fn conf(&self, version: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut conf = serde_json::json!({
            "cniVersion": version,
            "name": "kxdp-test",
            "type": "kxdp",
            "mtu": 1400,
            "dataplaneSocket": self.socket(),
            "stateDir": self.tmp.path().join("state"),
            "ipam": {
                "type": "host-local",
                "dataDir": self.tmp.path().join("ipam"),
                "ranges": [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]]
            }
        });
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        conf
    }

    /// Runs kxdp-cni inside the node namespace.
    fn cni(&self, command: &str, id: &str, netns: &str, conf: &serde_json::Value) -> Outcome {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, env!("CARGO_BIN_EXE_kxdp-cni")])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kxdp-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The node namespace's kxdp-cni host interfaces.
    fn host_veths(&self) -> Vec<String> {
        let links: serde_json::Value =
            serde_json::from_str(&run("ip", &["-n", &self.node, "-j", "link", "show"])).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("kxdp"))
            .map(str::to_string)
            .collect()
    }

    /// host-local's leases: files named by an address in its dataDir.
    fn leases(&self) -> Vec<String> {
        let dir = self.tmp.path().join("ipam").join("kxdp-test");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

fn skip_reason() -> Option<String> {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return Some("needs root (network namespaces, veth pairs)".into());
    }
    if !Path::new(CNI_PATH).join("host-local").is_file() {
        return Some(format!(
            "needs host-local in {CNI_PATH}: apt-get install -y containernetworking-plugins"
        ));
    }
    None
}

#[test]
fn add_check_del_gc_status_in_namespaces() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED kxdp-cni namespace test: {why}");
        return;
    }
    let tag = std::process::id();
    let node = format!("kxdpcni-node-{tag}");
    let pod = format!("kxdpcni-pod-{tag}");
    let pod2 = format!("kxdpcni-pod2-{tag}");
    let mut namespaces = Namespaces(Vec::new());
    for ns in [&node, &pod, &pod2] {
        namespaces.add(ns);
    }
    let lab = Lab {
        node: node.clone(),
        tmp: tempfile::tempdir().unwrap(),
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let conf = lab.conf("1.1.0", serde_json::json!({}));

    // STATUS and ADD while the dataplane is down.
    let status = lab.cni("STATUS", "", "", &conf);
    assert_eq!(status.code(), 50, "{}", status.stdout);
    let down = lab.cni("ADD", "c1", &netns_path(&pod), &conf);
    assert_eq!(down.code(), 11, "{}", down.stdout);
    assert_eq!(down.json()["cniVersion"], "1.1.0");
    assert!(
        lab.host_veths().is_empty(),
        "rolled back: {:?}",
        lab.host_veths()
    );
    assert!(
        !run("ip", &["-n", &pod, "link", "show"]).contains("eth0"),
        "the pod's end went with the host end"
    );
    assert!(
        lab.leases().is_empty(),
        "lease released: {:?}",
        lab.leases()
    );

    // The dataplane up: STATUS, ADD.
    let dp = FakeDataplane::start(&lab.socket(), seen.clone());
    lab.cni("STATUS", "", "", &conf).assert_ok("STATUS up");
    let add = lab.cni("ADD", "c1", &netns_path(&pod), &conf);
    add.assert_ok("ADD");
    let result = add.json();
    assert_eq!(result["cniVersion"], "1.1.0");
    let host = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(host.starts_with("kxdp") && host.len() == 15, "{host}");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], netns_path(&pod));
    assert_eq!(result["interfaces"][1]["mtu"], 1400);
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["ips"][0]["gateway"], "10.244.7.1");
    assert_eq!(result["ips"][1]["gateway"], "fd00:10:244:7::1");
    let pod_ip4 = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        pod_ip4.starts_with("10.244.7.") && pod_ip4.ends_with("/24"),
        "{pod_ip4}"
    );

    // The pod's end: address, MTU, default routes.
    let addr = run("ip", &["-n", &pod, "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("inet {pod_ip4}")), "{addr}");
    assert!(addr.contains("mtu 1400"), "{addr}");
    assert!(addr.contains("inet6 fd00:10:244:7::"), "{addr}");
    // No duplicate address detection: the dataplane answers every solicitation, DAD's
    // too, and would make the pod's addresses "duplicates".
    let dad = run(
        "ip",
        &[
            "netns",
            "exec",
            &pod,
            "sysctl",
            "-n",
            "net.ipv6.conf.eth0.accept_dad",
        ],
    );
    assert_eq!(dad.trim(), "0");
    assert!(addr.contains("nodad"), "{addr}");
    let r4 = run("ip", &["-n", &pod, "route", "show", "default"]);
    assert!(r4.contains("default via 10.244.7.1 dev eth0"), "{r4}");
    let r6 = run("ip", &["-n", &pod, "-6", "route", "show", "default"]);
    assert!(r6.contains("default via fd00:10:244:7::1 dev eth0"), "{r6}");
    if Command::new("ethtool").arg("--version").output().is_ok() {
        let k = run("ip", &["netns", "exec", &pod, "ethtool", "-k", "eth0"]);
        for f in [
            "tx-checksum-ip-generic: off",
            "tcp-segmentation-offload: off",
            "generic-segmentation-offload: off",
        ] {
            assert!(k.contains(f), "{f}: {k}");
        }
    }
    // The host end, in the node namespace, named for the dataplane.
    let h = run("ip", &["-n", &node, "link", "show", &host]);
    assert!(
        h.contains("mtu 1400") && h.contains("alias kxdp-cni c1/eth0"),
        "{h}"
    );
    assert_eq!(lab.leases().len(), 2);
    {
        let seen = seen.lock().unwrap();
        let attach = seen.iter().find_map(|m| match m {
            Message::AttachPod {
                ifname,
                container_id,
                ips,
            } => Some((ifname, container_id, ips)),
            _ => None,
        });
        let (ifname, container_id, ips) = attach.expect("AttachPod reached the dataplane");
        assert_eq!(
            (ifname.as_str(), container_id.as_str()),
            (host.as_str(), "c1")
        );
        assert_eq!(ips.len(), 2);
        assert_eq!(format!("{}/24", ips[0]), pod_ip4);
    }

    // CHECK with the ADD's result.
    let with_prev = lab.conf("1.1.0", serde_json::json!({"prevResult": result}));
    lab.cni("CHECK", "c1", &netns_path(&pod), &with_prev)
        .assert_ok("CHECK");
    let no_prev = lab.cni("CHECK", "c1", &netns_path(&pod), &conf);
    assert_eq!(no_prev.code(), 7);

    // DEL, twice; DEL of an unknown container; DEL with the netns gone.
    lab.cni("DEL", "c1", &netns_path(&pod), &with_prev)
        .assert_ok("DEL");
    assert!(lab.host_veths().is_empty());
    assert!(lab.leases().is_empty(), "{:?}", lab.leases());
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|m| matches!(m, Message::DetachPod { ifname, .. } if *ifname == host)));
    lab.cni("DEL", "c1", &netns_path(&pod), &with_prev)
        .assert_ok("second DEL");
    lab.cni("DEL", "never-added", &netns_path(&pod), &conf)
        .assert_ok("DEL unknown");
    lab.cni("DEL", "c1", "/var/run/netns/kxdpcni-gone", &conf)
        .assert_ok("DEL without netns");

    // GC: c2 and c3 added (c3 at 1.0.0), c2 not in the valid list: c2's veth, lease and
    // record go, c3's stay.
    let add2 = lab.cni("ADD", "c2", &netns_path(&pod), &conf);
    add2.assert_ok("ADD c2");
    let v1_0 = lab.conf("1.0.0", serde_json::json!({}));
    let add3 = lab.cni("ADD", "c3", &netns_path(&pod2), &v1_0);
    add3.assert_ok("ADD c3 at 1.0.0");
    assert_eq!(add3.json()["cniVersion"], "1.0.0");
    assert!(
        add3.json()["interfaces"][1].get("mtu").is_none(),
        "1.0.0 has no interface mtu"
    );
    assert_eq!(lab.host_veths().len(), 2);
    assert_eq!(lab.leases().len(), 4);
    let gc = lab.conf(
        "1.1.0",
        serde_json::json!({"cni.dev/valid-attachments": [{"containerID": "c3", "ifname": "eth0"}]}),
    );
    lab.cni("GC", "", "", &gc).assert_ok("GC");
    let host3 = add3.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(lab.host_veths(), vec![host3.clone()]);
    assert_eq!(
        lab.leases().len(),
        2,
        "c2's leases released: {:?}",
        lab.leases()
    );
    assert!(!run("ip", &["-n", &pod, "link", "show"]).contains("eth0"));

    // CHECK after the host end was deleted by hand fails; STATUS after the dataplane
    // stopped fails; DEL still succeeds.
    let prev3 = lab.conf("1.0.0", serde_json::json!({"prevResult": add3.json()}));
    lab.cni("CHECK", "c3", &netns_path(&pod2), &prev3)
        .assert_ok("CHECK c3");
    drop(dp);
    assert_eq!(
        lab.cni("CHECK", "c3", &netns_path(&pod2), &prev3).code(),
        11
    );
    assert_eq!(lab.cni("STATUS", "", "", &conf).code(), 50);
    run("ip", &["-n", &node, "link", "del", &host3]);
    assert_eq!(
        lab.cni("CHECK", "c3", &netns_path(&pod2), &prev3).code(),
        103
    );
    lab.cni("DEL", "c3", &netns_path(&pod2), &prev3)
        .assert_ok("DEL c3, dataplane down");
    assert!(lab.leases().is_empty());
}
