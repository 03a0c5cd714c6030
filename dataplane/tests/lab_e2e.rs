//! End to end through AF_XDP: the lab's namespaces, `kxdp-dataplane` on the node's
//! interfaces, `kxdp-control` on the bundled manifests, and real TCP and UDP sockets in
//! the pods. Needs root (namespaces, XDP); skips with a message otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, generation, manifests, who, Running};

const WEB: [&str; 3] = ["default/web-1", "default/web-2", "default/web-3"];

#[test]
fn clusterip_over_af_xdp_and_control_restart() {
    let Some(mut node) = Running::start("clusterip_over_af_xdp_and_control_restart", "e2e", 2)
    else {
        return;
    };
    // A malformed manifest is reported with its file and field; the others still apply.
    std::fs::write(
        manifests(node.lab()).join("99-bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec:\n  ports: [{port: eighty}]\n",
    )
    .unwrap();
    let client = node.ns("default/client");

    // Every ready endpoint answers over 30 connections; the not-ready one never does.
    let web = node.call(&client, "172.30.0.41:80", "tcp", "30");
    if who(&web) != WEB {
        node.dump_logs();
    }
    assert_eq!(who(&web), WEB, "web over TCP: {web:?}");
    for proto in ["udp", "tcp"] {
        let dns = node.call(&client, "172.30.0.10:53", proto, "30");
        assert_eq!(
            who(&dns),
            ["default/dns-1", "default/dns-2", "default/dns-3"],
            "dns over {proto}: {dns:?}"
        );
    }

    // Killing control loses nothing: short connections keep being answered and a long one
    // keeps streaming while control is down and after a new one resyncs.
    let run_in_client = |args: Vec<&'static str>| {
        let ns = client.clone();
        let kxdp_lab = bin("kxdp-lab");
        std::thread::spawn(move || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&kxdp_lab)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("run kxdp-lab");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let calls = run_in_client(vec![
        "call",
        "--to",
        "172.30.0.41:80",
        "--count",
        "150",
        "--interval-ms",
        "20",
        "--timeout-ms",
        "2000",
    ]);
    let held = run_in_client(vec!["hold", "--to", "172.30.0.41:80", "--millis", "3000"]);
    std::thread::sleep(Duration::from_millis(500));
    node.control = None;
    assert!(
        generation(&node.socket).unwrap_or(0) > 0,
        "the dataplane kept its tables without control"
    );
    std::thread::sleep(Duration::from_millis(1000));
    node.start_control();
    let out = calls.join().unwrap();
    let errors: Vec<&str> = out.lines().filter(|l| l.contains("\"error\"")).collect();
    assert_eq!(out.lines().count(), 150);
    assert!(
        errors.is_empty(),
        "connections lost across the control restart: {errors:?}"
    );
    let held: serde_json::Value =
        serde_json::from_str(held.join().unwrap().trim()).expect("hold prints JSON");
    assert!(
        held.get("error").is_none(),
        "the long connection broke: {held}"
    );
    assert!(
        held["bytes"].as_u64().unwrap_or(0) >= 64 * 50,
        "the long connection streamed: {held}"
    );
    let after = node.call(&client, "172.30.0.41:80", "tcp", "30");
    assert_eq!(who(&after), WEB, "after restart: {after:?}");
    let log = std::fs::read_to_string(node.lab().state_dir().join("control.log")).unwrap();
    assert!(
        log.contains("99-bad.yaml document 1: spec.ports[0].port"),
        "control log: {log}"
    );

    // A change to the directory reaches the dataplane without a restart: web-3 stops
    // being ready, and new connections stop going to it.
    let web = manifests(node.lab()).join("20-web.yaml");
    let text = std::fs::read_to_string(&web).unwrap();
    let edited = text.replacen(
        "- addresses: [10.244.1.7]\n  conditions: {ready: true}",
        "- addresses: [10.244.1.7]\n  conditions: {ready: false}",
        1,
    );
    assert_ne!(edited, text, "the test edits web-3's condition");
    let before = generation(&node.socket).unwrap();
    std::fs::write(&web, edited).unwrap();
    node.wait_generation_after(before);
    let edited = node.call(&client, "172.30.0.41:80", "tcp", "30");
    assert_eq!(
        who(&edited),
        ["default/web-1", "default/web-2"],
        "after the edit: {edited:?}"
    );
}
