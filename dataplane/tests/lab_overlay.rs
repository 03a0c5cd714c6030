//! The overlay with a real flannel node (issue 4): the lab's node A runs kxdp; the host on
//! its uplink becomes node B, a plain Linux node with a kernel VXLAN device configured as
//! flannel configures it (vxlan id 1, dstport 8472, nolearning, static FDB and neighbour
//! entries) and one pod. TCP and UDP cross the overlay both ways, a ClusterIP on A whose
//! endpoint is on B answers, and a large-payload TCP stream completes (path MTU works).
//! Needs root; skips with a message otherwise.

mod common;

use common::{answers, manifests, Running};

const B_VTEP_MAC: &str = "9a:3c:2e:11:22:33";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pods_across_the_overlay_with_a_kernel_flannel_node() {
    let Some(node) = Running::start(
        "pods_across_the_overlay_with_a_kernel_flannel_node",
        "ovl",
        1,
    ) else {
        return;
    };
    let lab = node.lab();
    let b = lab.outside_ns();
    let bpod = format!("kxdp-{}-bpod", lab.spec.name);
    // Node A's VTEP MAC as its Node announces it (lab/manifests/00-node.yaml), which node
    // B's flannel would read: kxdp takes tunnelled frames for any inner MAC, so it need not
    // be the uplink's.
    let a_mac = "02:6b:78:00:00:02";

    // Node B: 192.168.0.3 on the uplink's network, flannel.1 as flannel sets it up, one pod.
    ip(&["-n", &b, "addr", "add", "192.168.0.3/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &b,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "eth0",
        "local",
        "192.168.0.3",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ip(&[
        "-n",
        &b,
        "link",
        "set",
        "flannel.1",
        "address",
        B_VTEP_MAC,
        "up",
    ]);
    ip(&["-n", &b, "addr", "add", "10.244.2.0/32", "dev", "flannel.1"]);
    ip(&[
        "-n",
        &b,
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "10.244.1.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    ip(&[
        "-n",
        &b,
        "neigh",
        "add",
        "10.244.1.0",
        "lladdr",
        a_mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    let fdb = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            "bridge",
            "fdb",
            "append",
            a_mac,
            "dev",
            "flannel.1",
            "dst",
            "192.168.0.2",
        ])
        .output()
        .unwrap();
    assert!(
        fdb.status.success(),
        "bridge fdb: {}",
        String::from_utf8_lossy(&fdb.stderr)
    );
    ip(&["netns", "add", &bpod]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _bpod_guard = Del(bpod.clone());
    ip(&[
        "-n", &b, "link", "add", "vb0", "type", "veth", "peer", "name", "eth0", "netns", &bpod,
    ]);
    ip(&["-n", &b, "addr", "add", "10.244.2.1/24", "dev", "vb0"]);
    ip(&["-n", &b, "link", "set", "vb0", "up"]);
    ip(&["-n", &bpod, "addr", "add", "10.244.2.5/24", "dev", "eth0"]);
    ip(&["-n", &bpod, "link", "set", "eth0", "up"]);
    ip(&["-n", &bpod, "link", "set", "lo", "up"]);
    ip(&["-n", &bpod, "route", "add", "default", "via", "10.244.2.1"]);
    let sysctl = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()
        .unwrap();
    assert!(sysctl.success());
    let _echo = common::Proc(
        lab::Lab::exec(&bpod, &common::bin("kxdp-lab").to_string_lossy())
            .args(["echo", "--name", "default/web-b", "--ports", "8080"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Control learns about node B, its pod and a Service backed by it.
    let before = common::generation(&node.socket).unwrap();
    std::fs::write(
        manifests(lab).join("60-node-b.yaml"),
        format!(
            r#"apiVersion: v1
kind: Node
metadata:
  name: node-b
  annotations:
    flannel.alpha.coreos.com/backend-type: vxlan
    flannel.alpha.coreos.com/backend-data: '{{"VNI":1,"VtepMAC":"{B_VTEP_MAC}"}}'
    flannel.alpha.coreos.com/public-ip: 192.168.0.3
spec: {{podCIDR: 10.244.2.0/24}}
status:
  addresses: [{{type: InternalIP, address: 192.168.0.3}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web-b, namespace: default, labels: {{app: remote}}}}
spec: {{nodeName: node-b, containers: [{{name: m, image: kxdp-echo:lab}}]}}
status: {{phase: Running, podIP: 10.244.2.5, podIPs: [{{ip: 10.244.2.5}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: default}}
spec:
  clusterIP: 172.30.0.70
  ports: [{{name: p, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-lab01
  namespace: default
  labels: {{kubernetes.io/service-name: remote}}
addressType: IPv4
endpoints:
- addresses: [10.244.2.5]
  nodeName: node-b
ports:
- {{name: p, port: 8080}}
"#
        ),
    )
    .unwrap();
    node.wait_generation_after(before);

    let client = node.ns("default/client");
    // A → B, pod to pod and through a ClusterIP on A; B sees A's pod address.
    for (proto, to) in [
        ("tcp", "10.244.2.5:8080"),
        ("udp", "10.244.2.5:8080"),
        ("tcp", "172.30.0.70:80"),
    ] {
        {
            let got = node.call(&client, to, proto, "10");
            for (who, peer) in answers(&got) {
                if who != "default/web-b" {
                    node.dump_logs();
                }
                assert_eq!(who, "default/web-b", "{proto} to {to}: {got:?}");
                assert_eq!(peer, "10.244.1.2", "{proto} to {to}: source not kept");
            }
        }
    }
    // B → A, pod to pod.
    for proto in ["tcp", "udp"] {
        let got = node.call(&bpod, "10.244.1.5:8080", proto, "10");
        for (who, peer) in answers(&got) {
            assert_eq!(who, "default/web-1", "{proto} from B: {got:?}");
            assert_eq!(peer, "10.244.2.5");
        }
    }
    // A large-payload stream from a 1500-MTU pod on A into the 1450-byte overlay: it only
    // completes if the too-big answers make path-MTU discovery work.
    let held = node.kxdp_lab_in(
        &client,
        &[
            "hold",
            "--to",
            "10.244.2.5:8080",
            "--millis",
            "1500",
            "--size",
            "16000",
            "--interval-ms",
            "1",
        ],
    );
    if held[0].get("error").is_some() {
        let stats = std::process::Command::new(common::bin("kxdp"))
            .args(["stats", "--socket", &node.socket.to_string_lossy()])
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&stats.stdout));
    }
    assert!(
        held[0].get("error").is_none(),
        "large transfer across the overlay: {held:?}"
    );
    assert!(
        held[0]["bytes"].as_u64().unwrap_or(0) >= 16000 * 10,
        "{held:?}"
    );
}
