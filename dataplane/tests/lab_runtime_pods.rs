//! Pod interfaces attached and detached while the dataplane forwards (issue 17), as
//! kxdp-cni asks for them: a pod namespace made the way the CNI plugin makes one (veth,
//! host end aliased `kxdp-cni <container>/eth0`), attached with `AttachPod`, reaching a
//! ClusterIP and reached by another pod; detached with `DetachPod` (its AF_XDP sockets and
//! connections gone, a second DEL answered "not found"); found again by its alias by a
//! dataplane started after a `kill -9`, and by a successor taking over; detached by itself
//! when the interface vanishes.
//! Needs root; skips with a message otherwise.

mod common;

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{generation, Proc, Running};
use lab::Lab;
use nat::wire::{self, Message};

/// The runtime pod's address (in the lab's pod network, outside its static pods).
const POD_IP: &str = "10.244.1.100";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pod's namespace, deleted on drop (its veth goes with it).
struct PodNs(String);

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Makes a pod the way kxdp-cni does: namespace `ns` with `eth0`, its peer `host_if` in
/// the node's namespace with the plugin's alias.
fn make_pod(node_ns: &str, ns: &str, host_if: &str, container: &str) {
    ip(&["netns", "add", ns]);
    ip(&[
        "-n", node_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ]);
    ip(&[
        "-n",
        node_ns,
        "link",
        "set",
        host_if,
        "alias",
        &format!("kxdp-cni {container}/eth0"),
    ]);
    ip(&["-n", node_ns, "link", "set", host_if, "up"]);
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{POD_IP}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", ns, "link", "set", "eth0", "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "10.244.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    for (n, dev) in [(node_ns, host_if), (ns, "eth0")] {
        let _ = Lab::exec(n, "ethtool")
            .args([
                "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
            ])
            .output();
    }
}

/// Sends `msg` on the dataplane's socket and returns the answer.
fn ask(node: &Running, msg: &Message) -> Message {
    let mut s = UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    wire::write_message(&mut s, msg).unwrap();
    wire::read_message(&mut s).unwrap()
}

/// Connections in the dataplane's table with `addr` in a tuple.
fn tracked(node: &Running, addr: &str) -> usize {
    match ask(
        node,
        &Message::GetConntrack {
            addr: Some(addr.parse().unwrap()),
            port: None,
            protocol: None,
            limit: 0,
        },
    ) {
        Message::Conntrack { matched, .. } => matched,
        other => panic!("{other:?}"),
    }
}

/// The dataplane process's AF_XDP sockets: its sockets that no other family's table in
/// `/proc/PID/net` lists (this kernel has no xsk_diag for `ss --xdp`). Control and
/// inspection connections, which come and go, are Unix sockets and left out.
fn sockets(node: &Running) -> usize {
    let pid = node.dataplane.0.id();
    let mut known = std::collections::HashSet::new();
    for (table, column) in [
        ("unix", 6),
        ("netlink", 9),
        ("packet", 8),
        ("tcp", 9),
        ("tcp6", 9),
        ("udp", 9),
        ("udp6", 9),
        ("raw", 9),
        ("raw6", 9),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        known.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(column).map(str::to_string)),
        );
    }

    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            let inode = l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string();
            Some(inode)
        })
        .filter(|inode| !known.contains(inode))
        .count()
}

/// `count` TCP calls from namespace `ns` to `to`, each answered (by a name starting with
/// `who`)?
fn calls_answered(node: &Running, ns: &str, to: &str, who: &str, count: usize) -> bool {
    let lines = node.call(ns, to, "tcp", &count.to_string());
    let answers = common::answers(&lines);
    answers.len() == count && answers.iter().all(|a| a.0.starts_with(who))
}

fn eventually(what: &str, node: &Running, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        if Instant::now() > deadline {
            node.dump_logs();
            panic!("{what}: not within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_attached_and_detached_at_run_time() {
    let Some(mut node) = Running::start("pods_attached_and_detached_at_run_time", "rt", 1) else {
        return;
    };
    let node_ns = node.lab().node_ns();
    let pod_ns = PodNs(format!("kxdp-rtpod{}", std::process::id()));
    let host_if = format!("kxrt{}", std::process::id() % 100_000);
    let client = node.ns("default/client");
    let sockets_before = sockets(&node);
    make_pod(&node_ns, &pod_ns.0, &host_if, "rt-c1");
    let attach = Message::AttachPod {
        ifname: host_if.clone(),
        container_id: "rt-c1".into(),
        ips: vec![POD_IP.parse().unwrap()],
    };
    assert_eq!(
        ask(&node, &attach),
        Message::PodAttached {
            ifname: host_if.clone()
        }
    );
    // A repeated ADD of the same container is answered the same; another container's
    // claim on the interface is refused.
    assert_eq!(
        ask(&node, &attach),
        Message::PodAttached {
            ifname: host_if.clone()
        }
    );
    let other = ask(
        &node,
        &Message::AttachPod {
            ifname: host_if.clone(),
            container_id: "someone-else".into(),
            ips: vec![],
        },
    );
    assert!(matches!(other, Message::Refused { .. }), "{other:?}");
    // (The server closes an inspection connection's socket when it reads the hang-up.)
    eventually("one socket per worker", &node, || {
        sockets(&node) == sockets_before + 1
    });

    // The pod reaches a ClusterIP, and another pod reaches it.
    let echo = Proc(
        Lab::exec(&pod_ns.0, &common::bin("kxdp-lab").to_string_lossy())
            .args(["echo", "--name", "default/runtime-pod", "--ports", "8080"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the runtime pod reaches the web ClusterIP", &node, || {
        calls_answered(&node, &pod_ns.0, "172.30.0.41:80", "default/web-", 5)
    });
    eventually("a static pod reaches the runtime pod", &node, || {
        calls_answered(
            &node,
            &client,
            &format!("{POD_IP}:8080"),
            "default/runtime-pod",
            5,
        )
    });
    assert!(
        tracked(&node, POD_IP) > 0,
        "the pod's connections are tracked"
    );

    // DEL: the sockets, the connections and the neighbour go; a second DEL finds nothing.
    assert_eq!(
        ask(
            &node,
            &Message::DetachPod {
                ifname: host_if.clone(),
                container_id: "rt-c1".into()
            }
        ),
        Message::PodDetached {
            ifname: host_if.clone(),
            found: true
        }
    );
    assert_eq!(
        tracked(&node, POD_IP),
        0,
        "the pod's connections were retired"
    );
    eventually("its socket is closed", &node, || {
        sockets(&node) == sockets_before
    });
    assert_eq!(
        ask(
            &node,
            &Message::DetachPod {
                ifname: host_if.clone(),
                container_id: "rt-c1".into()
            }
        ),
        Message::PodDetached {
            ifname: host_if.clone(),
            found: false
        }
    );
    assert!(
        !calls_answered(
            &node,
            &client,
            &format!("{POD_IP}:8080"),
            "default/runtime-pod",
            1
        ),
        "a detached pod is not served"
    );
    // The rest of the node forwarded throughout.
    assert!(calls_answered(
        &node,
        &client,
        "172.30.0.41:80",
        "default/web-",
        5
    ));

    // Attached again, then the dataplane is killed (-9) and started again: it finds the
    // pod by its alias, with nobody calling ADD.
    assert!(matches!(ask(&node, &attach), Message::PodAttached { .. }));
    node.dataplane.0.kill().unwrap();
    let _ = node.dataplane.0.wait();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(node.lab().state_dir().join("dataplane.log"))
        .unwrap();
    let before = generation(&node.socket);
    assert_eq!(before, None, "the old dataplane is gone");
    node.dataplane = Proc(
        node.lab()
            .dataplane_command(&common::bin("kxdp-dataplane"), 1, &node.socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    eventually("the restarted dataplane is programmed", &node, || {
        generation(&node.socket).unwrap_or(0) > 0
    });
    eventually(
        "the restarted dataplane serves the runtime pod",
        &node,
        || {
            calls_answered(
                &node,
                &client,
                &format!("{POD_IP}:8080"),
                "default/runtime-pod",
                3,
            )
        },
    );

    // A successor taking over (an upgrade) serves it too: it finds it by its alias and
    // takes its socket and XDP link over in place with the rest.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(node.lab().state_dir().join("dataplane.log"))
        .unwrap();
    let next = Proc(
        node.lab()
            .dataplane_command(&common::bin("kxdp-dataplane"), 1, &node.socket)
            .arg("--takeover")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut old = std::mem::replace(&mut node.dataplane, next);
    eventually("the old dataplane hands over and exits", &node, || {
        old.0.try_wait().unwrap().is_some()
    });
    // Reaped already: not to be signalled by its guard.
    std::mem::forget(old);
    eventually("the successor serves the runtime pod", &node, || {
        calls_answered(
            &node,
            &client,
            &format!("{POD_IP}:8080"),
            "default/runtime-pod",
            3,
        )
    });
    let text = std::fs::read_to_string(node.lab().state_dir().join("dataplane.log")).unwrap();
    assert!(
        text.contains("the rings in place")
            && text.contains(&format!("{host_if}: kxdp XDP program")),
        "the pod's ring was not taken over in place: {text}"
    );

    // The pod's namespace goes without a DEL (its veth with it): detached by itself.
    drop(echo);
    drop(pod_ns);
    eventually("the vanished interface is detached", &node, || {
        std::fs::read_to_string(node.lab().state_dir().join("dataplane.log"))
            .unwrap_or_default()
            .contains(&format!("pod interface {host_if} vanished"))
            && sockets(&node) == sockets_before
    });
    assert!(calls_answered(
        &node,
        &client,
        "172.30.0.41:80",
        "default/web-",
        5
    ));
}
