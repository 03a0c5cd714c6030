//! What the namespace tests share: the lab brought up under a unique name with
//! `kxdp-dataplane` and `kxdp-control` running, torn down on drop (also on failure), and
//! helpers to run `kxdp-lab` (echo server, clients) inside the lab's namespaces.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{Lab, LabSpec};
use nat::wire::{self, Message};

/// Whether the test runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the workspace, built beside `kxdp`.
pub fn bin(name: &str) -> PathBuf {
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
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Deletes the lab on drop, also when the test fails.
pub struct LabGuard(pub Lab);
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

/// The dataplane's table generation, or `None` when it does not answer.
pub fn generation(socket: &Path) -> Option<u64> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    wire::write_message(&mut s, &Message::GetStats).ok()?;
    match wire::read_message(&mut s).ok()? {
        Message::Stats { generation, .. } => Some(generation),
        _ => None,
    }
}

/// A lab node with the dataplane and control running. Fields drop in order: control,
/// dataplane, then the lab.
pub struct Running {
    /// kxdp-control, when running.
    pub control: Option<Proc>,
    /// kxdp-dataplane.
    pub dataplane: Proc,
    /// The dataplane's control socket.
    pub socket: PathBuf,
    /// The Kubernetes Node this lab node is.
    pub node_name: String,
    /// The lab (deleted on drop).
    pub guard: LabGuard,
}

impl Running {
    /// Brings the lab up as `kxdp-<prefix><pid>-…` with `workers` workers, copies the lab
    /// manifests to a folder the test may edit, and waits until the dataplane is
    /// programmed. `None` (with a message) when not root.
    pub fn start(test: &str, prefix: &str, workers: u32) -> Option<Running> {
        Running::start_args(test, prefix, workers, &[])
    }

    /// [`Running::start`] with extra `kxdp-dataplane` arguments.
    pub fn start_args(test: &str, prefix: &str, workers: u32, extra: &[&str]) -> Option<Running> {
        if !is_root() {
            eprintln!("SKIPPED {test}: needs root for network namespaces and XDP");
            return None;
        }
        let mut spec = LabSpec::load(&repo().join("lab/lab.yaml")).unwrap();
        spec.name = format!("{prefix}{}", std::process::id());
        spec.queues = workers;
        Some(Running::start_node(
            spec,
            &repo().join("lab/manifests"),
            workers,
            extra,
        ))
    }

    /// Brings up the lab `spec` (its node named `spec.node.name` in the manifests), with
    /// control reading a copy of the manifests in `manifests_from` and the dataplane run
    /// with `extra` arguments, and waits until the dataplane is programmed. The caller
    /// checks for root.
    pub fn start_node(
        spec: LabSpec,
        manifests_from: &Path,
        workers: u32,
        extra: &[&str],
    ) -> Running {
        let node_name = spec.node.name.clone();
        let guard = LabGuard(Lab::new(spec));
        let lab = &guard.0;
        lab.up(&bin("kxdp-lab")).expect("lab up");
        std::fs::create_dir_all(manifests(lab)).unwrap();
        for f in std::fs::read_dir(manifests_from).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, manifests(lab).join(f.file_name().unwrap())).unwrap();
        }
        let socket = lab.state_dir().join("dataplane.sock");
        // Append mode, as every later writer of the log (a handover's successor) opens it:
        // a writer at its own offset would write over what the others appended.
        let dp_log_path = lab.state_dir().join("dataplane.log");
        let _ = std::fs::remove_file(&dp_log_path);
        let dp_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dp_log_path)
            .unwrap();
        let dataplane = Proc(
            lab.dataplane_command(&bin("kxdp-dataplane"), workers, &socket)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(dp_log.try_clone().unwrap())
                .stderr(dp_log)
                .spawn()
                .expect("start kxdp-dataplane"),
        );
        let mut running = Running {
            control: None,
            dataplane,
            socket,
            node_name,
            guard,
        };
        running.start_control();
        let deadline = Instant::now() + Duration::from_secs(15);
        while generation(&running.socket).unwrap_or(0) == 0 {
            if Instant::now() > deadline {
                running.dump_logs();
                panic!("the dataplane was not programmed within 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        running
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.guard.0
    }

    /// (Re)starts kxdp-control on the test's manifests.
    pub fn start_control(&mut self) {
        self.control = None;
        let lab = self.lab();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lab.state_dir().join("control.log"))
            .unwrap();
        let child = Command::new(bin("kxdp-control"))
            .args([
                "--manifests",
                &manifests(lab).to_string_lossy(),
                "--node",
                &self.node_name,
            ])
            .args(["--socket", &self.socket.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kxdp-control");
        self.control = Some(Proc(child));
    }

    /// Prints the dataplane's and control's logs (for a failing test).
    pub fn dump_logs(&self) {
        eprintln!("=== node {}", self.node_name);
        for f in ["dataplane.log", "control.log"] {
            eprintln!(
                "--- {f}\n{}",
                std::fs::read_to_string(self.lab().state_dir().join(f)).unwrap_or_default()
            );
        }
        let stats = Command::new(bin("kxdp"))
            .args(["stats", "--socket", &self.socket.to_string_lossy()])
            .output();
        if let Ok(out) = stats {
            eprintln!("--- kxdp stats\n{}", String::from_utf8_lossy(&out.stdout));
        }
    }

    /// `kxdp stats -o json` of the dataplane.
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(bin("kxdp"))
            .args(["stats", "-o", "json", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("run kxdp stats");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kxdp stats -o json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The namespace of pod `name`, or of "outside".
    pub fn ns(&self, name: &str) -> String {
        if name == "outside" {
            return self.lab().outside_ns();
        }
        let i = self
            .lab()
            .pod_index(name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        self.lab().pod_ns(i)
    }

    /// Runs `kxdp-lab ARGS` in namespace `ns` and parses its JSON lines.
    pub fn kxdp_lab_in(&self, ns: &str, args: &[&str]) -> Vec<serde_json::Value> {
        let out = Lab::exec(ns, &bin("kxdp-lab").to_string_lossy())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kxdp-lab");
        assert!(
            out.status.success(),
            "kxdp-lab {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// `kxdp-lab call` from namespace `ns`: `count` connections to `to` over `proto`, each
    /// given two seconds.
    pub fn call(&self, ns: &str, to: &str, proto: &str, count: &str) -> Vec<serde_json::Value> {
        self.kxdp_lab_in(
            ns,
            &[
                "call",
                "--to",
                to,
                "--proto",
                proto,
                "--count",
                count,
                "--timeout-ms",
                "2000",
            ],
        )
    }

    /// Waits until the dataplane runs a newer table generation than `before`.
    pub fn wait_generation_after(&self, before: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while generation(&self.socket).unwrap_or(0) <= before {
            assert!(
                Instant::now() < deadline,
                "no new table generation within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The test's own copy of the lab manifests, which it edits while control runs.
pub fn manifests(lab: &Lab) -> PathBuf {
    lab.state_dir().join("manifests")
}

/// Who answered each call (`error: …` for failures), and the source each backend saw.
pub fn answers(lines: &[serde_json::Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|v| match v.get("answer").and_then(|a| a.as_str()) {
            Some(a) => (
                a.to_string(),
                v.get("peer")
                    .and_then(|p| p.as_str())
                    .unwrap_or_default()
                    .to_string(),
            ),
            None => (
                format!(
                    "error: {}",
                    v.get("error").and_then(|e| e.as_str()).unwrap_or("?")
                ),
                String::new(),
            ),
        })
        .collect()
}

/// The distinct answerers, sorted.
pub fn who(lines: &[serde_json::Value]) -> Vec<String> {
    let mut w: Vec<String> = answers(lines).into_iter().map(|a| a.0).collect();
    w.sort();
    w.dedup();
    w
}
