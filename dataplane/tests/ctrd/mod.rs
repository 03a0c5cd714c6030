//! A real container runtime on a lab node: Debian's containerd and runc, started by the test
//! inside the node's network namespace and a private mount namespace, with `ctr run --cni`
//! calling kxdp-cni (with `host-local` and `loopback`) from the test's own CNI folders.
//!
//! Why it is built this way (measured on Debian 12, containerd 1.6):
//! - containerd runs under `nsenter --net=/run/netns/NODE`, not `ip netns exec`, which
//!   remounts /sys and hides the cgroup mounts runc needs ("no cgroup mount found in
//!   mountinfo").
//! - `ctr run --cni` itself (not containerd) runs the plugins, found in /etc/cni/net.d and
//!   /opt/cni/bin, and libcni caches each ADD's result in /var/lib/cni. Inside the private
//!   mount namespace each of these is a folder of the test (where one is missing on the
//!   machine, an overlay over its nearest existing parent, written to the test's folder,
//!   gives it a mount point); every `ctr` and plugin run enters that namespace, so the
//!   machine's folders are neither read nor written.
//! - The shims put their sockets in /run/containerd/s (fixed in containerd 1.6) and runc
//!   its state in /run/containerd/runc: a folder of the test is mounted there too. That one
//!   mount point is made on the machine when missing (an empty folder, removed at the end):
//!   an overlay over /run would break connecting to sockets made outside it, such as the
//!   dataplane's.
//! - containerd 1.6 speaks CNI up to 1.0.0, so the `.conflist` says 1.0.0; GC and STATUS
//!   (1.1.0) are run against the plugin directly, as a 1.1 runtime would.
//! - `ctr run --rm --cni` runs the DEL when the container exits; `ctr run -d` never would.
//!   So every container here is a `ctr run --rm` child of the test, ended with `ctr task
//!   kill`. A `ctr run` whose ADD failed leaves its container and created task behind:
//!   [`Containerd::run_once`] removes them.
//!
//! Containers run `/bin/kxdp-lab` (the workspace's, bind-mounted read-only, with the C
//! libraries it links copied into the root filesystem) for echo servers and calls, and
//! busybox for the rest.
//!
//! Teardown, also on failure: every task killed through `ctr`, containerd ended by PID,
//! then any shim of this containerd (found by its socket path on the command line) and any
//! process left in this containerd namespace's cgroups ended by PID, the cgroups removed;
//! the mounts go with the mount namespace.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where Debian's containernetworking-plugins puts `host-local` and `loopback`.
const SYSTEM_CNI_BIN: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The network's name in the `.conflist` (host-local keys its leases by it).
pub const NETWORK: &str = "kxdp";

/// Whether the runtime is installed: `containerd`, `ctr`, `runc`, `nsenter`, `unshare`,
/// busybox and the two IPAM/loopback plugins. `Err` names what is missing.
pub fn available() -> Result<(), String> {
    let mut missing = Vec::new();
    for prog in ["containerd", "ctr", "runc", "nsenter", "unshare"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {prog}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            missing.push(prog.to_string());
        }
    }
    if busybox().is_none() {
        missing.push("busybox (busybox-static)".into());
    }
    for plugin in ["host-local", "loopback"] {
        if system_plugin(plugin).is_none() {
            missing.push(format!("{plugin} (containernetworking-plugins)"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// A statically linked busybox (a dynamic one would not run in the bare root filesystem).
fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            p.exists()
                && !Command::new("ldd")
                    .arg(p)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })
}

fn system_plugin(name: &str) -> Option<PathBuf> {
    SYSTEM_CNI_BIN
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// What the node's CNI configuration says.
pub struct CniSettings {
    /// The kxdp-cni binary (installed as `kxdp` in the CNI bin folder).
    pub plugin: PathBuf,
    /// The dataplane's control socket.
    pub dataplane_socket: PathBuf,
    /// The node's pod network, given to host-local.
    pub pod_cidr: String,
}

/// containerd running on a lab node. Dropped: everything it started is ended (see the
/// module comment).
pub struct Containerd {
    /// The test's folder for everything of this runtime.
    pub dir: PathBuf,
    /// The lab node's network namespace.
    pub node_ns: String,
    /// The containerd namespace the containers live in (also their cgroup folder's name);
    /// a container's CNI_CONTAINERID is `<namespace>-<id>`.
    pub namespace: String,
    /// containerd's socket.
    pub socket: PathBuf,
    /// The containers' root filesystem.
    pub rootfs: PathBuf,
    /// The plugin's entry of the `.conflist`, as the runtime hands it (without version).
    pub plugin_conf: serde_json::Value,
    kxdp: PathBuf,
    child: Child,
    made_run_containerd: bool,
    next_exec: AtomicU64,
}

/// A container started with [`Containerd::spawn`]: its `ctr run --rm --cni` process.
pub struct Container {
    /// Its ID in containerd.
    pub id: String,
    /// `ctr run`, which runs the CNI DEL once the task exits.
    pub ctr: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mount namespace's set-up, run by `unshare --mount --propagation private`: `$1` the
/// test's folder, `$2` the node's network namespace. Ends by becoming containerd.
const START: &str = r#"
set -eu
T="$1"; NODE="$2"; overlaid=""
# private TARGET SOURCE: SOURCE mounted on TARGET in this namespace only.
private() {
  t="$1"; a="$t"
  while [ ! -d "$a" ]; do a=$(dirname "$a"); done
  if [ "$a" != "$t" ]; then
    [ "$a" != / ] || { echo "nothing to overlay for $t" >&2; exit 1; }
    case " $overlaid " in
      *" $a "*) ;;
      *)
        n=$(echo "$a" | tr / _)
        mkdir -p "$T/overlay/$n/upper" "$T/overlay/$n/work"
        mount -t overlay kxdp-test -o "lowerdir=$a,upperdir=$T/overlay/$n/upper,workdir=$T/overlay/$n/work" "$a"
        overlaid="$overlaid $a"
        ;;
    esac
    mkdir -p "$t"
  fi
  mount --bind "$2" "$t"
}
private /etc/cni/net.d "$T/net.d"
private /opt/cni/bin "$T/bin"
private /var/lib/cni "$T/cache"
mount --bind "$T/run" /run/containerd
# Other tests' named network namespaces: not pinned by this copy of the mount table.
for m in $(awk '$2 ~ "^/run/netns/." {print $2}' /proc/self/mounts); do
  [ "$m" = "/run/netns/$NODE" ] || umount -l "$m" 2>/dev/null || true
done
exec nsenter --net="/run/netns/$NODE" containerd --config "$T/containerd.toml"
"#;

impl Containerd {
    /// Prepares `dir` (CNI folders and configuration, root filesystem, containerd's
    /// configuration) and starts containerd on `node_ns`; waits until it answers.
    pub fn start(dir: &Path, node_ns: &str, kxdp: &Path, cni: &CniSettings) -> Containerd {
        let _ = std::fs::remove_dir_all(dir);
        for sub in [
            "net.d",
            "bin",
            "cache",
            "run",
            "root",
            "state",
            "opt",
            "host-local",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // The CNI bin folder: the plugin under its type's name, and the system's IPAM and
        // loopback (containerd's ctr adds a loopback network to every container).
        std::fs::copy(&cni.plugin, dir.join("bin/kxdp")).expect("copy kxdp-cni");
        for p in ["host-local", "loopback"] {
            let from = system_plugin(p).expect("checked by available()");
            std::fs::copy(from, dir.join("bin").join(p)).unwrap();
        }
        // The conflist kxdp-control writes for a node (control::cni_conf), with this
        // test's network name and its own state folders: the one deploy/ installs is the
        // one containerd and host-local are shown to take.
        let rendered = control::cni_conf::render(
            &[cni.pod_cidr.parse().expect("the lab's podCIDR")],
            &control::cni_conf::CniConf {
                mtu: 1450,
                queues: 1,
                dataplane_socket: cni.dataplane_socket.clone(),
            },
        )
        .expect("a conflist for a node with a podCIDR");
        let mut conflist: serde_json::Value =
            serde_json::from_str(&rendered).expect("the rendered conflist is JSON");
        conflist["name"] = NETWORK.into();
        let plugin = &mut conflist["plugins"][0];
        plugin["stateDir"] = serde_json::json!(dir.join("cni-state"));
        plugin["ipam"]["dataDir"] = serde_json::json!(dir.join("host-local"));
        let plugin_conf = plugin.clone();
        std::fs::write(
            dir.join("net.d/10-kxdp.conflist"),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();

        let rootfs = dir.join("rootfs");
        make_rootfs(&rootfs, kxdp);

        let socket = dir.join("containerd.sock");
        let toml = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# No CRI: ctr is the client here, and the CRI plugin would watch the CNI folders itself.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            opt = dir.join("opt").display(),
        );
        std::fs::write(dir.join("containerd.toml"), toml).unwrap();

        let made_run_containerd = !Path::new("/run/containerd").exists();
        if made_run_containerd {
            std::fs::create_dir_all("/run/containerd").unwrap();
        }
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                START,
                "start",
            ])
            .arg(dir)
            .arg(node_ns)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let ctrd = Containerd {
            dir: dir.to_path_buf(),
            node_ns: node_ns.to_string(),
            namespace: format!("kxdp{}", std::process::id()),
            socket,
            rootfs,
            plugin_conf,
            kxdp: kxdp.to_path_buf(),
            child,
            made_run_containerd,
            next_exec: AtomicU64::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ctrd.socket.exists()
                && ctrd
                    .ctr(&["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer within 20 s:\n{}",
                    ctrd.log_tail("containerd.log")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ctrd
    }

    /// The last lines of a log in the runtime's folder.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command run in containerd's mount namespace and the node's network namespace.
    pub fn in_node(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.child.id()))
            .arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg(program);
        c
    }

    /// `ctr ARGS` against this containerd, in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = self.in_node("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args);
        c
    }

    fn run_args(&self, id: &str, cmd: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["run", "--rm", "--cni", "--env", "PATH=/bin", "--mount"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(format!(
            "type=bind,src={},dst=/bin/kxdp-lab,options=rbind:ro",
            self.kxdp.display()
        ));
        a.push("--rootfs".into());
        a.push(self.rootfs.display().to_string());
        a.push(id.to_string());
        a.extend(cmd.iter().map(|s| s.to_string()));
        a
    }

    /// Starts container `id` running `cmd` (`ctr run --rm --cni` in the background).
    pub fn spawn(&self, id: &str, cmd: &[&str]) -> Container {
        let log = self.dir.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let args = self.run_args(id, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ctr = self
            .ctr(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn ctr run");
        Container {
            id: id.to_string(),
            ctr,
            log,
        }
    }

    /// Runs container `id` with `cmd` to its end; what `ctr run` printed. When the run
    /// failed (its ADD, say), the container and task it left are removed, so the ID can be
    /// used again.
    pub fn run_once(&self, id: &str, cmd: &[&str]) -> Output {
        let args = self.run_args(id, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self
            .ctr(&args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
        if !out.status.success() {
            self.remove(id);
        }
        out
    }

    /// Removes container `id` and its task, whatever state they are in.
    pub fn remove(&self, id: &str) {
        let _ = self
            .ctr(&["task", "rm", "-f", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self
            .ctr(&["container", "rm", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Runs `cmd` inside running container `id` (`ctr task exec`).
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Output {
        let n = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let exec_id = format!("x{n}");
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr task exec")
    }

    /// [`Containerd::exec`] in the background.
    pub fn exec_spawn(&self, id: &str, cmd: &[&str]) -> Child {
        let n = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let exec_id = format!("x{n}");
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr task exec")
    }

    /// Kills container `id`'s task; its `ctr run --rm` then runs the DEL and removes it.
    pub fn kill(&self, id: &str) {
        let _ = self
            .ctr(&["task", "kill", "--signal", "SIGKILL", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The tasks and their state (`RUNNING`, `CREATED`, `STOPPED`), by container ID.
    pub fn tasks(&self) -> Vec<(String, u32, String)> {
        let out = run(&mut self.ctr(&["task", "ls"])).unwrap_or_default();
        out.lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.parse().ok()?,
                    w.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// The CNI_CONTAINERID of container `id`.
    pub fn cni_id(&self, id: &str) -> String {
        format!("{}-{id}", self.namespace)
    }

    /// The result of container `id`'s ADD, as libcni cached it (`None` before the ADD
    /// finished, and after the DEL).
    pub fn cni_result(&self, id: &str) -> Option<serde_json::Value> {
        let path = self
            .dir
            .join("cache/results")
            .join(format!("{NETWORK}-{}-eth0", self.cni_id(id)));
        let text = std::fs::read_to_string(path).ok()?;
        let cached: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(cached.get("result")?.clone())
    }

    /// Container `id`'s first address, from its ADD's result.
    pub fn ip(&self, id: &str) -> Option<IpAddr> {
        let r = self.cni_result(id)?;
        let addr = r["ips"][0]["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    }

    /// Waits until container `id` runs with its network set up; its address. Panics with
    /// what `ctr run` printed when it ended first (a failed ADD).
    pub fn wait_running(&self, c: &mut Container) -> IpAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.ctr.try_wait().unwrap() {
                panic!(
                    "container {}: `ctr run` ended ({status}) before it ran:\n{}",
                    c.id,
                    std::fs::read_to_string(&c.log).unwrap_or_default()
                );
            }
            let running = self
                .tasks()
                .iter()
                .any(|(id, _, state)| *id == c.id && state == "RUNNING");
            if let (true, Some(ip)) = (running, self.ip(&c.id)) {
                return ip;
            }
            assert!(
                Instant::now() < deadline,
                "container {} not running within 30 s:\n{}",
                c.id,
                std::fs::read_to_string(&c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills container `c` and waits for its `ctr run` (and so the DEL) to finish; what it
    /// printed.
    pub fn stop(&self, c: &mut Container) -> String {
        self.kill(&c.id);
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.ctr.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = c.ctr.kill();
                let _ = c.ctr.wait();
                self.remove(&c.id);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::read_to_string(&c.log).unwrap_or_default()
    }

    /// The task's PID of container `id` (its network namespace is `/proc/PID/ns/net`).
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.tasks()
            .into_iter()
            .find(|(t, _, _)| t == id)
            .map(|(_, pid, _)| pid)
    }

    /// Runs the plugin directly (as a runtime would) with `command` for attachment
    /// `container_id`/eth0 in `netns` (may be empty), on `conf` (the plugin's entry; this
    /// adds `cniVersion` and `name`, and `extra`'s keys). Exit status, stdout's JSON.
    pub fn plugin(
        &self,
        command: &str,
        version: &str,
        container_id: &str,
        netns: &str,
        extra: serde_json::Value,
    ) -> (bool, serde_json::Value, String) {
        let mut conf = self.plugin_conf.clone();
        conf["cniVersion"] = version.into();
        conf["name"] = NETWORK.into();
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                conf[k] = v;
            }
        }
        let mut cmd = self.in_node(&self.dir.join("bin/kxdp").to_string_lossy());
        cmd.env("CNI_COMMAND", command)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.dir.join("bin"));
        if !container_id.is_empty() {
            cmd.env("CNI_CONTAINERID", container_id);
        }
        if !netns.is_empty() {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kxdp-cni");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(conf.to_string().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
        (
            out.status.success(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The addresses host-local has leased on this network.
    pub fn leases(&self) -> BTreeSet<IpAddr> {
        std::fs::read_dir(self.dir.join("host-local").join(NETWORK))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The attachments kxdp-cni has recorded (its state folder's entries).
    pub fn records(&self) -> Vec<String> {
        let mut out: Vec<String> = walk(&self.dir.join("cni-state"))
            .into_iter()
            .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
            .collect();
        out.sort();
        out
    }

    /// Host-side veths on the node that kxdp-cni made: (name, container ID from the alias).
    pub fn host_veths(&self) -> Vec<(String, String)> {
        let out = run(Command::new("ip").args(["-n", &self.node_ns, "-j", "-d", "link", "show"]))
            .unwrap_or_default();
        let links: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        links
            .iter()
            .filter_map(|l| {
                let name = l["ifname"].as_str()?;
                let alias = l["ifalias"].as_str().unwrap_or_default();
                let owner = alias
                    .strip_prefix("kxdp-cni ")
                    .and_then(|r| r.split('/').next())
                    .unwrap_or_default();
                (name.starts_with("kxdp") || !owner.is_empty())
                    .then(|| (name.to_string(), owner.to_string()))
            })
            .collect()
    }

    /// Ends every task, containerd, its shims and whatever is left in its cgroups.
    fn teardown(&mut self) {
        for (id, _, _) in self.tasks() {
            self.kill(&id);
        }
        std::thread::sleep(Duration::from_millis(200));
        for (id, _, _) in self.tasks() {
            self.remove(&id);
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims of this containerd: their command line names its socket.
        let sock = self.socket.to_string_lossy().to_string();
        for pid in pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("containerd-shim") && cmdline.contains(&sock) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        // Containers' processes and cgroups: /sys/fs/cgroup[/<controller>]/<namespace>.
        for group in self.cgroups() {
            for procs in walk(&group)
                .into_iter()
                .filter(|p| p.ends_with("cgroup.procs"))
            {
                for pid in std::fs::read_to_string(procs).unwrap_or_default().lines() {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for group in self.cgroups() {
            let mut dirs: Vec<PathBuf> = walk_dirs(&group);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
        if self.made_run_containerd {
            let _ = std::fs::remove_dir("/run/containerd");
        }
    }

    fn cgroups(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut out = vec![root.join(&self.namespace)];
        if let Ok(d) = std::fs::read_dir(root) {
            out.extend(d.filter_map(|e| Some(e.ok()?.path().join(&self.namespace))));
        }
        out.into_iter().filter(|p| p.is_dir()).collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Files under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `dir` and the folders under it.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

/// The containers' root filesystem: busybox and its applets, mount points for what runc
/// mounts, the C libraries `kxdp-lab` links (it is bind-mounted at /bin/kxdp-lab per container).
fn make_rootfs(rootfs: &Path, kxdp: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(busybox().expect("checked"), rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "ip", "ping", "sleep", "nc", "wget", "ls", "grep", "true",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("bin/kxdp-lab"), b"").unwrap();
    let ldd = run(Command::new("ldd").arg(kxdp)).expect("ldd kxdp");
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
    {
        let to = rootfs.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &to).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
}
