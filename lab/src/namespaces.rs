//! The lab's network namespaces: building them from a [`LabSpec`] (veth pairs, addresses,
//! routes, offloads, the pods' echo servers), naming them, reporting and removing them.
//!
//! Every namespace and interface the lab creates lives inside namespaces it made itself
//! (both ends of every veth); nothing in the root namespace is touched. Names carry the
//! lab's name, so two labs (or a rerun) never collide. Processes the lab starts are
//! recorded by PID and ended by PID on `down`.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{LabError, LabSpec};

/// The address of the kernel's end of the host pair (`kxhost`): link scope, never used as a
/// source (the routes through the pair name the node's), there so that the reverse-path
/// check accepts packets kxdp hands over from the node's own addresses.
pub const HOST_PAIR_ADDRESS: &str = "169.254.42.1/32";

/// Runs `ip` (or any command) and fails with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args))
}

/// A lab built (or to be built) from a description.
pub struct Lab {
    /// The description.
    pub spec: LabSpec,
}

impl Lab {
    /// A lab for `spec`.
    pub fn new(spec: LabSpec) -> Lab {
        Lab { spec }
    }

    /// The node's namespace.
    pub fn node_ns(&self) -> String {
        format!("kxdp-{}-node", self.spec.name)
    }

    /// The outside host's namespace.
    pub fn outside_ns(&self) -> String {
        format!("kxdp-{}-out", self.spec.name)
    }

    /// Pod `i`'s namespace.
    pub fn pod_ns(&self, i: usize) -> String {
        format!("kxdp-{}-p{}", self.spec.name, i)
    }

    /// Pod `i`'s interface on the node (the host side of its veth).
    pub fn pod_if(&self, i: usize) -> String {
        format!("kxp{i}")
    }

    /// The node's uplink interface.
    pub fn uplink_if(&self) -> &'static str {
        "kxup0"
    }

    /// The node kernel's end of the host veth pair.
    pub fn host_kernel_if(&self) -> &'static str {
        "kxhost"
    }

    /// kxdp's end of the host veth pair.
    pub fn host_if(&self) -> &'static str {
        "kxhp"
    }

    /// The index of a pod by `namespace/name` (or bare name).
    pub fn pod_index(&self, name: &str) -> Option<usize> {
        self.spec
            .pods
            .iter()
            .position(|p| p.name == name || p.name.rsplit('/').next() == Some(name))
    }

    /// Where the lab keeps PIDs and logs.
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/kxdp/lab-{}", self.spec.name))
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out = vec![self.node_ns(), self.outside_ns()];
        out.extend((0..self.spec.pods.len()).map(|i| self.pod_ns(i)));
        out
    }

    /// A command run inside namespace `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Builds the namespaces, veths, addresses and routes, and starts each pod's echo
    /// server (`echo_binary echo …`). On failure, whatever was built is torn down.
    pub fn up(&self, echo_binary: &Path) -> Result<(), LabError> {
        let result = self.build(echo_binary);
        if result.is_err() {
            let _ = self.down();
        }
        result
    }

    fn build(&self, echo_binary: &Path) -> Result<(), LabError> {
        let s = &self.spec;
        let node = self.node_ns();
        let q = s.queues.max(1).to_string();
        std::fs::create_dir_all(self.state_dir())?;
        for ns in self.namespaces() {
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // Uplink: node kxup0 <-> outside eth0.
        let out = self.outside_ns();
        veth(&node, self.uplink_if(), &out, &q)?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &s.node.address.to_string(),
            "dev",
            self.uplink_if(),
        ])?;
        ip(&["-n", &node, "link", "set", self.uplink_if(), "up"])?;
        ip(&[
            "-n",
            &out,
            "addr",
            "add",
            &s.outside.address.to_string(),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &out, "link", "set", "eth0", "up"])?;
        offload_off(&out, "eth0")?;
        for (ns, dev, addr) in [
            (&node, self.uplink_if(), s.node.address6),
            (&out, "eth0", s.outside.address6),
        ] {
            if let Some(a) = addr {
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &a.to_string(),
                    "dev",
                    dev,
                    "nodad",
                ])?;
            }
        }
        // The node's kernel reaches the pod networks and Services through kxdp.
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            self.host_kernel_if(),
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            self.host_if(),
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ])?;
        for dev in [self.host_kernel_if(), self.host_if()] {
            ip(&["-n", &node, "link", "set", dev, "up"])?;
            offload_off(&node, dev)?;
        }
        let route = |family: &str, net: &str, src: &str| {
            let dev = self.host_kernel_if();
            ip(&[
                "-n", &node, family, "route", "add", net, "dev", dev, "src", src,
            ])
        };
        let node_ip = s.node.address.addr().to_string();
        for net in &s.host_routes {
            route("-4", &net.to_string(), &node_ip)?;
        }
        // IPv6 routes only when the node has an IPv6 address to give them as source.
        if let Some(node6) = s.node.address6 {
            for net in &s.host_routes6 {
                route("-6", &net.to_string(), &node6.addr().to_string())?;
            }
        }
        // Packets for the node that kxdp hands over arrive on kxhost while the kernel's
        // route back may be the uplink: loose reverse-path filtering (RFC 3704) for them.
        run(Lab::exec(&node, "sysctl").args([
            "-qw",
            &format!("net.ipv4.conf.{}.rp_filter=2", self.host_kernel_if()),
        ]))?;
        // kxdp's answers to host processes' NodePort connections come from the node's own
        // address (the NodePort's) to the node's own address: accepted on kxhost only, and
        // passing the reverse-path check there, which fails any source on an interface
        // without an address of its own; a link-scope one does.
        run(Lab::exec(&node, "sysctl").args([
            "-qw",
            &format!("net.ipv4.conf.{}.accept_local=1", self.host_kernel_if()),
        ]))?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            HOST_PAIR_ADDRESS,
            "dev",
            self.host_kernel_if(),
            "scope",
            "link",
        ])?;
        let gw = s
            .node
            .pod_cidr
            .hosts()
            .next()
            .ok_or_else(|| LabError::Command {
                command: "lab".into(),
                stderr: format!("pod network {} has no host address", s.node.pod_cidr),
            })?;
        let prefix = s.node.pod_cidr.prefix_len();
        for (i, pod) in s.pods.iter().enumerate() {
            let pns = self.pod_ns(i);
            let host_if = self.pod_if(i);
            veth(&node, &host_if, &pns, &q)?;
            ip(&["-n", &node, "link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{}/{prefix}", pod.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ])?;
            if let (Some(ip6), Some(net6)) = (pod.ip6, s.node.pod_cidr6) {
                let gw6 = Ipv6Addr::from(u128::from(net6.network()) + 1);
                let addr = format!("{ip6}/{}", net6.prefix_len());
                ip(&[
                    "-n", &pns, "-6", "addr", "add", &addr, "dev", "eth0", "nodad",
                ])?;
                ip(&[
                    "-n",
                    &pns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw6.to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
            // The dataplane rewrites packets without the kernel's help: the pod must send
            // complete checksums and no segments larger than the MTU.
            offload_off(&pns, "eth0")?;
            if !pod.ports.is_empty() {
                let ports: Vec<String> = pod.ports.iter().map(|p| p.to_string()).collect();
                let log = std::fs::File::create(self.state_dir().join(format!("echo-{i}.log")))?;
                let child = Lab::exec(&pns, &echo_binary.to_string_lossy())
                    .args(["echo", "--name", &pod.name, "--ports", &ports.join(",")])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?;
                self.record_pid(child.id())?;
            }
        }
        Ok(())
    }

    /// Records a PID for `down` to end.
    pub fn record_pid(&self, pid: u32) -> Result<(), LabError> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir().join("pids"))?;
        writeln!(f, "{pid}")?;
        Ok(())
    }

    /// Ends the processes the lab started (by PID) and deletes its namespaces.
    pub fn down(&self) -> Result<(), LabError> {
        let pids = std::fs::read_to_string(self.state_dir().join("pids")).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let _ = Command::new("kill")
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let existing = ip(&["netns", "list"]).unwrap_or_default();
        for ns in self.namespaces() {
            if existing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
            {
                ip(&["netns", "del", &ns])?;
            }
        }
        let _ = std::fs::remove_dir_all(self.state_dir());
        Ok(())
    }

    /// A short report: which namespaces exist.
    pub fn status(&self) -> String {
        let existing = ip(&["netns", "list"]).unwrap_or_default();
        let mut out = String::new();
        for ns in self.namespaces() {
            let up = existing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns.as_str()));
            out.push_str(&format!("{ns:<24} {}\n", if up { "up" } else { "absent" }));
        }
        out
    }

    /// The command that runs `kxdp-dataplane` (at `binary`) on this lab's node: the uplink
    /// and every pod interface, `workers` workers, its control socket at `socket`.
    pub fn dataplane_command(&self, binary: &Path, workers: u32, socket: &Path) -> Command {
        let mut c = Lab::exec(&self.node_ns(), &binary.to_string_lossy());
        c.args(["--uplink", self.uplink_if(), "--host", self.host_if()]);
        if !self.spec.pods.is_empty() {
            c.args(["--pods", &self.pod_interfaces().join(",")]);
        }
        c.args([
            "--workers",
            &workers.to_string(),
            "--socket",
            &socket.to_string_lossy(),
        ]);
        c
    }

    /// Puts the uplinks of `others` on one Ethernet segment with this lab's, as nodes of a
    /// cluster share a network: a bridge `br0` in this lab's outside namespace takes this
    /// lab's outside end (its address moves to the bridge) and each other lab's outside
    /// end, moved here as `kxj<i>`. The other labs' outside namespaces are left empty and
    /// everything still goes away with the labs' `down`.
    pub fn join_uplinks(&self, others: &[&Lab]) -> Result<(), LabError> {
        let out = self.outside_ns();
        let addr = self.spec.outside.address.to_string();
        ip(&["-n", &out, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &out, "addr", "del", &addr, "dev", "eth0"])?;
        ip(&["-n", &out, "link", "set", "eth0", "master", "br0"])?;
        ip(&["-n", &out, "addr", "add", &addr, "dev", "br0"])?;
        ip(&["-n", &out, "link", "set", "br0", "up"])?;
        for (i, other) in others.iter().enumerate() {
            let theirs = other.outside_ns();
            let name = format!("kxj{i}");
            ip(&["-n", &theirs, "link", "set", "eth0", "down"])?;
            ip(&["-n", &theirs, "link", "set", "eth0", "name", &name])?;
            ip(&["-n", &theirs, "link", "set", &name, "netns", &out])?;
            ip(&["-n", &out, "link", "set", &name, "master", "br0"])?;
            ip(&["-n", &out, "link", "set", &name, "up"])?;
        }
        Ok(())
    }

    /// The pod interfaces on the node, in pod order.
    pub fn pod_interfaces(&self) -> Vec<String> {
        (0..self.spec.pods.len()).map(|i| self.pod_if(i)).collect()
    }
}

/// Creates a veth pair with `queues` queues each way: `host_if` in namespace `node`, its
/// peer `eth0` in namespace `peer_ns` (both ends inside the lab's namespaces).
fn veth(node: &str, host_if: &str, peer_ns: &str, queues: &str) -> Result<(), LabError> {
    ip(&[
        "-n",
        node,
        "link",
        "add",
        host_if,
        "numtxqueues",
        queues,
        "numrxqueues",
        queues,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer_ns,
        "numtxqueues",
        queues,
        "numrxqueues",
        queues,
    ])
    .map(|_| ())
}

/// Turns off checksum offload and segmentation on an interface inside `ns`.
fn offload_off(ns: &str, dev: &str) -> Result<(), LabError> {
    run(Lab::exec(ns, "ethtool").args([
        "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off",
    ]))
    .map(|_| ())
}
