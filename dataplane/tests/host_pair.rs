//! The host pair set up by the dataplane (`dataplane::hostnet`, `kxdp-dataplane
//! --host-pair`), and the uplink's queues checked against the workers, in network
//! namespaces of their own (unique names, deleted on drop, also when a test fails). What
//! the code did is read back with the system's own tools (`ip`, `ethtool`, `sysctl`), not
//! with the code under test. Needs root; skipped (with a message) otherwise.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::hostnet::{HostPair, HostPairError, HostPairSpec};
use ipnet::IpNet;
use nat::wire::{self, Message};
use pktio::netns::{in_ns, NetnsGuard};

const NODE4: &str = "192.168.77.2";
const NODE6: &str = "fd00:77::2";

fn root() -> bool {
    if !pktio::netns::is_root() {
        eprintln!("skipped: needs root (network namespaces, veth pairs)");
        return false;
    }
    true
}

/// A namespace standing for a node: `up0` (one end of a veth pair, both ends up) with the
/// node's addresses.
fn node(prefix: &str) -> NetnsGuard {
    let ns = NetnsGuard::new(prefix).expect("create a namespace");
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"])
        .unwrap();
    ns.ip(&["link", "set", "up0p", "up"]).unwrap();
    ns.ip(&["link", "set", "up0", "up"]).unwrap();
    ns.ip(&["addr", "add", &format!("{NODE4}/24"), "dev", "up0"])
        .unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{NODE6}/64"),
        "dev",
        "up0",
        "nodad",
    ])
    .unwrap();
    ns
}

fn exec(ns: &NetnsGuard, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(cmd)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("literal")).collect()
}

/// The routes out of `dev`, one family, as `ip` prints them (`DST proto static scope link
/// src SRC`), sorted; the kernel's own (link-local, proto kernel) left out.
fn routes(ns: &NetnsGuard, family: &str, dev: &str) -> Vec<String> {
    let out = ns
        .ip(&[family, "route", "show", "dev", dev])
        .unwrap_or_default();
    let mut lines: Vec<String> = out
        .lines()
        .filter(|l| !l.contains("proto kernel"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

fn ifindex(ns: &NetnsGuard, dev: &str) -> String {
    exec(ns, &["cat", &format!("/sys/class/net/{dev}/ifindex")])
        .trim()
        .to_string()
}

/// Everything `kxdp-dataplane --host-pair` promises on the kernel's end `kernel` and kxdp's
/// end `xdp`, but the routes.
fn check_pair(ns: &NetnsGuard, kernel: &str, xdp: &str, queues: usize) {
    let link = ns.ip(&["-d", "link", "show", "dev", kernel]).unwrap();
    assert!(link.contains(&format!("{kernel}@{xdp}")), "{link}");
    assert!(link.contains("veth"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    assert!(link.contains(&format!("numrxqueues {queues}")), "{link}");
    let other = ns.ip(&["-d", "link", "show", "dev", xdp]).unwrap();
    assert!(other.contains(&format!("{xdp}@{kernel}")), "{other}");
    assert!(other.contains(",UP"), "{other}");
    assert!(other.contains(&format!("numrxqueues {queues}")), "{other}");
    let addr = ns.ip(&["-4", "addr", "show", "dev", kernel]).unwrap();
    assert!(
        addr.contains("inet 169.254.42.1/32 scope link"),
        "the link-scope address: {addr}"
    );
    for (key, want) in [("accept_local", "1"), ("rp_filter", "2")] {
        let got = exec(
            ns,
            &["sysctl", "-n", &format!("net.ipv4.conf.{kernel}.{key}")],
        );
        assert_eq!(got.trim(), want, "{key}");
    }
    for dev in [kernel, xdp] {
        let features = exec(ns, &["ethtool", "-k", dev]);
        for off in [
            "tx-checksumming: off",
            "rx-checksumming: off",
            "tcp-segmentation-offload: off",
            "generic-segmentation-offload: off",
            "generic-receive-offload: off",
        ] {
            assert!(features.contains(off), "{dev}: want {off:?} in\n{features}");
        }
    }
}

#[test]
fn host_pair_is_set_up_reused_resynced_and_removed() {
    if !root() {
        return;
    }
    let ns = node("kxhn-pair");
    // A route of the node's elsewhere, which no sync may touch.
    ns.ip(&["route", "add", "10.200.0.0/16", "dev", "up0"])
        .unwrap();
    let sources: Vec<IpAddr> = in_ns(&ns, || dataplane::hostnet::node_addresses("up0")).unwrap();
    assert_eq!(
        sources,
        vec![NODE4.parse::<IpAddr>().unwrap(), NODE6.parse().unwrap()]
    );
    let mut spec = HostPairSpec::named("kxhost", 2, sources).unwrap();
    spec.routes = nets(&[
        "10.244.0.0/16",
        "172.30.0.0/16",
        "fd00:10:244::/48",
        "fd00:172:30::/112",
    ]);

    let pair = in_ns(&ns, || HostPair::setup(&spec)).expect("set up");
    assert_eq!(pair.kxdp_end(), "kxhost-xdp");
    check_pair(&ns, "kxhost", "kxhost-xdp", 2);
    let v4 = vec![
        format!("10.244.0.0/16 proto static scope link src {NODE4}"),
        format!("172.30.0.0/16 proto static scope link src {NODE4}"),
    ];
    let v6 = vec![
        format!("fd00:10:244::/48 proto static src {NODE6} metric 1024 pref medium"),
        format!("fd00:172:30::/112 proto static src {NODE6} metric 1024 pref medium"),
    ];
    assert_eq!(routes(&ns, "-4", "kxhost"), v4);
    assert_eq!(routes(&ns, "-6", "kxhost"), v6);

    // Again, as after a crash: the same pair, nothing doubled.
    let index = ifindex(&ns, "kxhost");
    let again = in_ns(&ns, || HostPair::setup(&spec)).expect("set up again");
    assert_eq!(ifindex(&ns, "kxhost"), index, "the pair is reused");
    check_pair(&ns, "kxhost", "kxhost-xdp", 2);
    assert_eq!(routes(&ns, "-4", "kxhost"), v4);
    assert_eq!(routes(&ns, "-6", "kxhost"), v6);
    drop(pair);

    // The tables change the networks; a route added by hand through the pair goes too.
    ns.ip(&["route", "add", "10.1.0.0/16", "dev", "kxhost"])
        .unwrap();
    in_ns(&ns, || {
        again.sync_routes(&nets(&[
            "10.244.0.0/16",
            "10.96.0.0/12",
            "fd00:10:244::/56",
        ]))
    })
    .expect("sync");
    assert_eq!(
        routes(&ns, "-4", "kxhost"),
        vec![
            format!("10.244.0.0/16 proto static scope link src {NODE4}"),
            format!("10.96.0.0/12 proto static scope link src {NODE4}"),
        ]
    );
    assert_eq!(
        routes(&ns, "-6", "kxhost"),
        vec![format!(
            "fd00:10:244::/56 proto static src {NODE6} metric 1024 pref medium"
        )]
    );
    assert!(ns
        .ip(&["route", "show", "10.200.0.0/16"])
        .unwrap()
        .contains("dev up0"));

    in_ns(&ns, || again.teardown()).expect("teardown");
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("kxhost"), "{links}");
    for family in ["-4", "-6"] {
        let all = ns.ip(&[family, "route", "show"]).unwrap();
        for gone in ["10.244.", "10.96.", "fd00:10:244"] {
            assert!(!all.contains(gone), "{family}: {all}");
        }
    }
    assert!(ns
        .ip(&["route", "show", "10.200.0.0/16"])
        .unwrap()
        .contains("dev up0"));
    // Twice is fine.
    in_ns(&ns, || again.teardown()).expect("teardown again");
}

#[test]
fn leftovers_of_another_shape_are_recreated_and_foreign_interfaces_refused() {
    if !root() {
        return;
    }
    let ns = node("kxhn-left");
    // A pair from a run with 4 workers.
    ns.ip(&[
        "link",
        "add",
        "kxhost",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
        "type",
        "veth",
        "peer",
        "name",
        "kxhost-xdp",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
    ])
    .unwrap();
    let old = ifindex(&ns, "kxhost");
    let spec = HostPairSpec::named("kxhost", 1, vec![NODE4.parse().unwrap()]).unwrap();
    let pair = in_ns(&ns, || HostPair::setup(&spec)).expect("set up");
    assert_ne!(ifindex(&ns, "kxhost"), old, "recreated");
    check_pair(&ns, "kxhost", "kxhost-xdp", 1);
    in_ns(&ns, || pair.teardown()).unwrap();

    // Only one end left, alone in a pair of another name.
    ns.ip(&[
        "link", "add", "kxhost", "type", "veth", "peer", "name", "other",
    ])
    .unwrap();
    let pair = in_ns(&ns, || HostPair::setup(&spec)).expect("set up over a lone end");
    check_pair(&ns, "kxhost", "kxhost-xdp", 1);
    in_ns(&ns, || pair.teardown()).unwrap();

    // Not a veth: refused, and left as it was.
    ns.ip(&["link", "add", "kxhost", "type", "bridge"]).unwrap();
    let err = in_ns(&ns, || HostPair::setup(&spec)).expect_err("a bridge is not ours");
    assert!(
        matches!(&err, HostPairError::NameTaken { name, kind } if name == "kxhost" && kind == "bridge"),
        "{err}"
    );
    assert!(ns
        .ip(&["-d", "link", "show", "dev", "kxhost"])
        .unwrap()
        .contains("bridge"));
    assert!(ns.ip(&["link", "show", "dev", "kxhost-xdp"]).is_err());
}

/// `kxdp-dataplane` in `ns`, its stderr gathered by a thread.
struct Dataplane {
    child: Child,
    log: std::sync::mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Dataplane {
    fn start(ns: &NetnsGuard, args: &[&str]) -> Dataplane {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(env!("CARGO_BIN_EXE_kxdp-dataplane"))
            .args(args);
        Self::spawn(cmd)
    }

    /// Started as a container runtime starts a container that is not privileged, as far as
    /// sysctls go: `/proc/sys` mounted read-only. The read-only bind is made in a mount
    /// namespace of the child's own (`unshare --mount --propagation private`), so the
    /// machine's `/proc/sys` is never touched; that writes there do fail is checked first.
    fn start_with_proc_sys_read_only(ns: &NetnsGuard, args: &[&str]) -> Dataplane {
        let script = format!(
            "mount --bind -o ro /proc/sys /proc/sys || exit 1; \
             if test -w /proc/sys/net/ipv4/conf/all/accept_local; then \
               echo 'test set-up: /proc/sys is still writable' >&2; exit 1; fi; \
             exec ip netns exec {} \"$@\"",
            ns.name()
        );
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_kxdp-dataplane"))
        .args(args);
        Self::spawn(cmd)
    }

    /// Runs `cmd` (which ends by exec'ing the dataplane, so that its pid is the
    /// dataplane's) with stderr gathered.
    fn spawn(mut cmd: Command) -> Dataplane {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kxdp-dataplane");
        let stderr = child.stderr.take().expect("piped");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dataplane {
            child,
            log,
            lines: Vec::new(),
        }
    }

    /// Waits (10 s at most) for a line containing `what`; false if the process ended first.
    fn wait_for(&mut self, what: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            match self.log.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let found = line.contains(what);
                    self.lines.push(line);
                    if found {
                        return true;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }

    /// Its exit status if it ends within `limit` by itself.
    fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM (if it still runs), then its exit status (10 s at most) and the rest of its log.
    fn stop(mut self) -> (bool, String) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let status = self.child.wait().expect("wait");
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(2)) {
            self.lines.push(line);
        }
        (status.success(), self.lines.join("\n"))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Ended by its pid only (ip netns exec, unshare and sh exec the dataplane in place), if it still
        // runs (a failed test).
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.wait();
        }
    }
}

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{}.sock", std::process::id()))
}

/// An uplink: a veth with `queues` queues whose peer stays in the namespace.
fn uplink(ns: &NetnsGuard, queues: &str) {
    ns.ip(&[
        "link",
        "add",
        "up1",
        "numrxqueues",
        queues,
        "numtxqueues",
        queues,
        "type",
        "veth",
        "peer",
        "name",
        "up1p",
        "numrxqueues",
        queues,
        "numtxqueues",
        queues,
    ])
    .unwrap();
    ns.ip(&["addr", "add", "192.168.78.2/24", "dev", "up1"])
        .unwrap();
    for dev in ["up1", "up1p"] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
}

#[test]
fn an_uplink_with_queues_no_worker_serves_is_refused_or_its_channels_set() {
    if !root() {
        return;
    }
    let ns = node("kxhn-queues");
    uplink(&ns, "4");
    let sock = socket("kxhn-queues");
    let common = [
        "--uplink",
        "up1",
        "--workers",
        "2",
        "--pin",
        "false",
        "--frames",
        "1024",
        "--poll-mode",
        "interrupt",
        "--socket",
    ];
    let mut args: Vec<&str> = common.to_vec();
    args.push(sock.to_str().unwrap());

    let mut refused = Dataplane::start(&ns, &args);
    let exited = refused.exited_within(Duration::from_secs(10));
    let (ok, stderr) = refused.stop();
    assert!(exited.is_some() && !ok, "it must refuse to start: {stderr}");
    assert!(
        stderr.contains("up1: 4 receive queues, but only 2 worker(s)")
            && stderr.contains("--set-channels")
            && stderr.contains("ethtool -L up1"),
        "{stderr}"
    );
    assert!(exec(&ns, &["ethtool", "-l", "up1"])
        .contains("RX:\t\t4\nTX:\t\t4\nOther:\t\tn/a\nCombined:\tn/a\n"));

    args.push("--set-channels");
    let mut dp = Dataplane::start(&ns, &args);
    let running = dp.wait_for("kxdp-dataplane running");
    let queues = exec(&ns, &["ls", "/sys/class/net/up1/queues"]);
    let (ok, log) = dp.stop();
    assert!(running && ok, "{log}");
    assert!(log.contains("channels set"), "{log}");
    let rx: Vec<&str> = queues
        .split_whitespace()
        .filter(|q| q.starts_with("rx-"))
        .collect();
    assert_eq!(rx, ["rx-0", "rx-1"], "{queues}");
}

#[test]
fn dataplane_sets_up_its_host_pair_routes_it_by_the_tables_and_removes_it() {
    if !root() {
        return;
    }
    let ns = node("kxhn-dp");
    uplink(&ns, "2");
    let sock = socket("kxhn-dp");
    let mut dp = Dataplane::start(
        &ns,
        &[
            "--uplink",
            "up1",
            "--host-pair",
            "kxhost",
            "--workers",
            "2",
            "--pin",
            "false",
            "--frames",
            "1024",
            "--poll-mode",
            "interrupt",
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(
        dp.wait_for("kxdp-dataplane running"),
        "{}",
        dp.lines.join("\n")
    );
    check_pair(&ns, "kxhost", "kxhost-xdp", 2);
    // No routes before control's first table.
    assert_eq!(routes(&ns, "-4", "kxhost"), Vec::<String>::new());

    let mut tables = nat::spec::TableSpec::default();
    tables.node.name = "n1".into();
    tables.node.addresses = vec!["192.168.78.2".parse().unwrap()];
    tables.cluster.cluster_cidrs = nets(&["10.244.0.0/16", "fd00:10:244::/48"]);
    tables.cluster.service_cidrs = nets(&["10.96.0.0/12"]);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    wire::write_message(
        &mut s,
        &Message::Snapshot {
            generation: 1,
            tables: Box::new(tables),
        },
    )
    .unwrap();
    let answer = wire::read_message(&mut s).expect("an answer");
    assert!(
        matches!(answer, Message::Applied { generation: 1 }),
        "{answer:?}"
    );
    // The uplink (up1) has only an IPv4 address: the IPv6 network gets no route.
    assert_eq!(
        routes(&ns, "-4", "kxhost"),
        vec![
            "10.244.0.0/16 proto static scope link src 192.168.78.2".to_string(),
            "10.96.0.0/12 proto static scope link src 192.168.78.2".to_string(),
        ]
    );
    assert_eq!(routes(&ns, "-6", "kxhost"), Vec::<String>::new());
    drop(s);

    let (ok, log) = dp.stop();
    assert!(ok, "{log}");
    assert!(log.contains("host pair kxhost/kxhost-xdp deleted"), "{log}");
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("kxhost"), "{links}");
    assert!(!ns.ip(&["route", "show"]).unwrap().contains("10.244."));
}

#[test]
fn dataplane_sets_up_its_host_pair_with_proc_sys_read_only() {
    if !root() {
        return;
    }
    let ns = node("kxhn-ro");
    uplink(&ns, "2");
    let sock = socket("kxhn-ro");
    let mut dp = Dataplane::start_with_proc_sys_read_only(
        &ns,
        &[
            "--uplink",
            "up1",
            "--host-pair",
            "kxhost",
            "--workers",
            "2",
            "--pin",
            "false",
            "--frames",
            "1024",
            "--poll-mode",
            "interrupt",
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    let running = dp.wait_for("kxdp-dataplane running");
    if running {
        // accept_local and rp_filter included, read back outside the read-only mount.
        check_pair(&ns, "kxhost", "kxhost-xdp", 2);
    }
    let (ok, log) = dp.stop();
    assert!(running && ok, "{log}");
    assert!(log.contains("host pair kxhost/kxhost-xdp deleted"), "{log}");
}
