//! End to end through AF_XDP: the lab's namespaces, `kxdp-dataplane` on the node's
//! interfaces, `kxdp-control` on the bundled manifests, and real TCP and UDP sockets in
//! the pods. Needs root (namespaces, XDP); skips with a message otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::lab::{Lab, LabSpec};
use nat::wire::{self, Message};

fn is_root() -> bool {
    // /proc/self/status "Uid:" real effective ...; the effective uid is the second field.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin(name: &str) -> PathBuf {
    let kxdp = PathBuf::from(env!("CARGO_BIN_EXE_kxdp"));
    let p = kxdp.with_file_name(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Ends a child by PID on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Deletes the lab on drop, also when the test fails.
struct LabGuard(Lab);
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn generation(socket: &Path) -> Option<u64> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    wire::write_message(&mut s, &Message::GetStats).ok()?;
    match wire::read_message(&mut s).ok()? {
        Message::Stats { generation, .. } => Some(generation),
        _ => None,
    }
}

/// The test's own copy of the lab manifests, which it edits while control runs.
fn manifests(lab: &Lab) -> PathBuf {
    lab.state_dir().join("manifests")
}

fn start_control(lab: &Lab, socket: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.state_dir().join("control.log"))
        .unwrap();
    Proc(
        Command::new(bin("kxdp-control"))
            .args([
                "--manifests",
                &manifests(lab).to_string_lossy(),
                "--node",
                "node-a",
            ])
            .args(["--socket", &socket.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kxdp-control"),
    )
}

/// Runs `kxdp call` in the client pod and tallies who answered (errors under "error").
fn call(lab: &Lab, client: usize, to: &str, proto: &str, count: u32) -> BTreeMap<String, u32> {
    let out = Lab::exec(&lab.pod_ns(client), &bin("kxdp").to_string_lossy())
        .args([
            "call",
            "--to",
            to,
            "--proto",
            proto,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "2000",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run kxdp call");
    assert!(
        out.status.success(),
        "kxdp call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tally = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let who = match v.get("answer").and_then(|a| a.as_str()) {
            Some(a) => a.to_string(),
            None => format!(
                "error: {}",
                v.get("error").and_then(|e| e.as_str()).unwrap_or("?")
            ),
        };
        *tally.entry(who).or_insert(0) += 1;
    }
    tally
}

fn names(t: &BTreeMap<String, u32>) -> Vec<&str> {
    t.keys().map(|k| k.as_str()).collect()
}

#[test]
fn clusterip_over_af_xdp_and_control_restart() {
    if !is_root() {
        eprintln!("SKIPPED clusterip_over_af_xdp_and_control_restart: needs root for network namespaces and XDP");
        return;
    }
    let mut spec = LabSpec::load(&repo().join("lab/lab.yaml")).unwrap();
    spec.name = format!("e2e{}", std::process::id());
    spec.queues = 2;
    let lab = LabGuard(Lab::new(spec));
    let lab = &lab.0;
    lab.up(&bin("kxdp")).expect("lab up");
    std::fs::create_dir_all(manifests(lab)).unwrap();
    for f in std::fs::read_dir(repo().join("lab/manifests")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, manifests(lab).join(f.file_name().unwrap())).unwrap();
    }
    // A malformed manifest is reported with its file and field; the others still apply.
    std::fs::write(
        manifests(lab).join("99-bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec:\n  ports: [{port: eighty}]\n",
    )
    .unwrap();
    let socket = lab.state_dir().join("dataplane.sock");
    let dp_log = std::fs::File::create(lab.state_dir().join("dataplane.log")).unwrap();
    let _dataplane = Proc(
        Lab::exec(&lab.node_ns(), &bin("kxdp-dataplane").to_string_lossy())
            .args([
                "--uplink",
                lab.uplink_if(),
                "--pods",
                &lab.pod_interfaces().join(","),
            ])
            .args(["--workers", "2", "--socket", &socket.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(dp_log.try_clone().unwrap())
            .stderr(dp_log)
            .spawn()
            .expect("start kxdp-dataplane"),
    );
    let dump_logs = || {
        for f in ["dataplane.log", "control.log"] {
            eprintln!(
                "--- {f}\n{}",
                std::fs::read_to_string(lab.state_dir().join(f)).unwrap_or_default()
            );
        }
    };
    let mut control = start_control(lab, &socket);
    let deadline = Instant::now() + Duration::from_secs(15);
    while generation(&socket).unwrap_or(0) == 0 {
        if Instant::now() > deadline {
            dump_logs();
            panic!("the dataplane was not programmed within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = lab.pod_index("default/client").unwrap();

    // Every ready endpoint answers over 30 connections; the not-ready one never does.
    let web = call(lab, client, "172.30.0.41:80", "tcp", 30);
    if names(&web) != ["default/web-1", "default/web-2", "default/web-3"] {
        dump_logs();
    }
    assert_eq!(
        names(&web),
        ["default/web-1", "default/web-2", "default/web-3"],
        "web over TCP: {web:?}"
    );
    for proto in ["udp", "tcp"] {
        let dns = call(lab, client, "172.30.0.10:53", proto, 30);
        assert_eq!(
            names(&dns),
            ["default/dns-1", "default/dns-2", "default/dns-3"],
            "dns over {proto}: {dns:?}"
        );
    }

    // Killing control loses nothing: short connections keep being answered and a long one
    // keeps streaming while control is down and after a new one resyncs.
    let run_in_client = |args: Vec<String>| {
        let ns = lab.pod_ns(client);
        let kxdp = bin("kxdp");
        std::thread::spawn(move || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&kxdp)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("run kxdp");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let calls = run_in_client(
        [
            "call",
            "--to",
            "172.30.0.41:80",
            "--count",
            "150",
            "--interval-ms",
            "20",
            "--timeout-ms",
            "2000",
        ]
        .map(String::from)
        .to_vec(),
    );
    let held = run_in_client(
        ["hold", "--to", "172.30.0.41:80", "--millis", "3000"]
            .map(String::from)
            .to_vec(),
    );
    std::thread::sleep(Duration::from_millis(500));
    drop(control);
    assert!(
        generation(&socket).unwrap_or(0) > 0,
        "the dataplane kept its tables without control"
    );
    std::thread::sleep(Duration::from_millis(1000));
    control = start_control(lab, &socket);
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(&socket).is_none() {
        assert!(Instant::now() < deadline, "dataplane stopped answering");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = call(lab, client, "172.30.0.41:80", "tcp", 30);
    assert_eq!(
        names(&after),
        ["default/web-1", "default/web-2", "default/web-3"],
        "after restart: {after:?}"
    );
    let log = std::fs::read_to_string(lab.state_dir().join("control.log")).unwrap();
    assert!(
        log.contains("99-bad.yaml document 1: spec.ports[0].port"),
        "control log: {log}"
    );

    // A change to the directory reaches the dataplane without a restart: web-3 stops
    // being ready, and new connections stop going to it.
    let web = manifests(lab).join("20-web.yaml");
    let text = std::fs::read_to_string(&web).unwrap();
    let edited = text.replacen(
        "- addresses: [10.244.1.7]\n  conditions: {ready: true}",
        "- addresses: [10.244.1.7]\n  conditions: {ready: false}",
        1,
    );
    assert_ne!(edited, text, "the test edits web-3's condition");
    let before = generation(&socket).unwrap();
    std::fs::write(&web, edited).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(&socket).unwrap_or(0) == before {
        assert!(
            Instant::now() < deadline,
            "the edit did not reach the dataplane within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let edited = call(lab, client, "172.30.0.41:80", "tcp", 30);
    assert_eq!(
        names(&edited),
        ["default/web-1", "default/web-2"],
        "after the edit: {edited:?}"
    );
    drop(control);
}
