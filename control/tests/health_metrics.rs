//! `/healthz`, `/livez`, a health-check node port and `/metrics` over real HTTP on
//! 127.0.0.1, with kxdp-control's sync path (`Programmer`) programming an in-process
//! dataplane (`dataplane::server::serve` on a temporary socket, no AF_XDP, no root).
//!
//! Every server binds an ephemeral port on 127.0.0.1 (the health-check node port too:
//! `HealthCheckPort::Ephemeral`, and the test asks where it went); every wait is bounded;
//! sockets are removed at the end. The dataplane's socket thread lives until the test
//! process ends (`serve` has no stop), which is harmless.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use control::health::{
    serve_healthz, HealthCheckPort, ProxyHealth, ServiceHealthServers, DEFAULT_HEALTHZ_TIMEOUT,
};
use control::kube_source::Change;
use control::metrics::{serve_metrics, ControlMetrics};
use control::stream::{Progress, Stream};
use control::{Objects, Programmer};
use dataplane::state::{Limits, Shared};
use nat::spec::ClusterSpec;
use nat::wire::{self, Message};
use serde_json::Value;

/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(10);

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kxdp-health-metrics-{name}-{}.sock",
        std::process::id()
    ))
}

/// A dataplane without interfaces, two workers, serving its control socket at `path`.
fn dataplane(path: &Path) -> Arc<Shared> {
    let shared = Arc::new(Shared::new(
        Vec::new(),
        2,
        Limits {
            conntrack_capacity: 1024,
            affinity_capacity: 1024,
            ..Limits::default()
        },
    ));
    dataplane::server::serve(path, shared.clone(), Instant::now()).expect("serve the socket");
    shared
}

/// A dataplane that answers each table with `answer(generation)` and can be killed as
/// `kill -9` kills one: its connections close and its socket file stays, with nobody
/// listening.
struct FakeDataplane {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: JoinHandle<()>,
}

impl FakeDataplane {
    fn start(path: &Path, answer: fn(u64) -> Message) -> FakeDataplane {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut conn = match listener.accept() {
                        Ok((conn, _)) => conn,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) => panic!("accept: {e}"),
                    };
                    conn.set_nonblocking(false).expect("blocking");
                    conns.lock().unwrap().push(conn.try_clone().expect("clone"));
                    std::thread::spawn(move || {
                        while let Ok(m) = wire::read_message(&mut conn) {
                            let reply = match m {
                                Message::Snapshot { generation, .. }
                                | Message::Delta { generation, .. } => answer(generation),
                                _ => return,
                            };
                            if wire::write_message(&mut conn, &reply).is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        FakeDataplane {
            stop,
            conns,
            accept,
        }
    }

    fn kill(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.accept.join().expect("accept thread");
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// One HTTP/1.1 GET: status, headers (lower-cased names), body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_lowercase(), body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::new();
    let mut errors = Vec::new();
    control::load_text(&mut objects, "test.yaml", yaml, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    objects
}

/// Takes `objects` as one change (with an EndpointSlice trigger time of now) and syncs
/// until the dataplane has the result.
fn program(p: &mut Programmer, objects: &Objects) {
    let change = Change {
        batches: 1,
        endpoint_slice_triggers: vec![SystemTime::now()],
        ..Change::default()
    };
    assert!(
        p.objects_changed(objects, &change, Instant::now()),
        "tables"
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match p.sync() {
            Ok(Progress::Applied(_)) | Ok(Progress::UpToDate(_)) => return,
            other => {
                assert!(Instant::now() < deadline, "never applied: {other:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
"#;

const NODE_DELETING: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a, deletionTimestamp: '2024-05-01T10:00:00Z', finalizers: [x]}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
"#;

const SERVICE: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]
"#;

/// The Service's slice with endpoints on the given nodes (addresses 10.244.<i>.5).
fn slice(nodes: &[&str]) -> String {
    let mut eps = String::new();
    for (i, n) in nodes.iter().enumerate() {
        eps.push_str(&format!(
            "- {{addresses: [10.244.{}.5], conditions: {{ready: true}}, nodeName: {n}}}\n",
            i + 1
        ));
    }
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

#[test]
fn healthz_and_livez_follow_the_dataplane_and_the_node() {
    let rt = runtime();
    let path = socket_path("healthz");
    let _dp = dataplane(&path);
    let metrics = Arc::new(ControlMetrics::new());
    let health = Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT));
    let server = serve_healthz(localhost(), health.clone(), rt.handle()).expect("healthz");
    let addr = server.addr();
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&path),
        metrics,
        health.clone(),
    );

    // Nothing queued yet: healthy, as kube-proxy while it starts.
    let (status, head, body) = get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let v = json(&body);
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["lastUpdated"], v["currentTime"], "healthy: updated now");

    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a"]))),
    );
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/livez").0, 200);

    // The Node is being deleted: not eligible; alive all the same.
    program(
        &mut p,
        &objects(&format!("{NODE_DELETING}{SERVICE}{}", slice(&["node-a"]))),
    );
    let (status, _, body) = get(addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["nodeEligible"], false);
    let (status, _, body) = get(addr, "/livez");
    assert_eq!(status, 200, "{body}");
    assert!(json(&body).get("nodeEligible").is_none(), "{body}");
    assert_eq!(get(addr, "/nothing").0, 404);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_update_waiting_past_the_timeout_fails_healthz_until_applied() {
    let rt = runtime();
    let path = socket_path("late");
    let _ = std::fs::remove_file(&path);
    let timeout = Duration::from_millis(300);
    let health = Arc::new(ProxyHealth::new(timeout));
    let server = serve_healthz(localhost(), health.clone(), rt.handle()).expect("healthz");
    let addr = server.addr();
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&path),
        Arc::new(ControlMetrics::new()),
        health.clone(),
    );
    // No dataplane on the socket yet: the change waits.
    let objects = objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a"])));
    assert!(p.objects_changed(&objects, &Change::default(), Instant::now()));
    assert!(p.sync().is_err(), "nobody listening");
    assert_eq!(get(addr, "/healthz").0, 200, "not late yet");
    std::thread::sleep(timeout + Duration::from_millis(50));
    let (status, _, body) = get(addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    let v = json(&body);
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC", "{body}");
    assert_eq!(get(addr, "/livez").0, 503);

    // The dataplane comes up; the stream's backoff lets it reconnect within a second.
    let _dp = dataplane(&path);
    let deadline = Instant::now() + TIMEOUT;
    while !matches!(p.sync(), Ok(Progress::Applied(1))) {
        assert!(Instant::now() < deadline, "never applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/livez").0, 200);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn health_check_node_port_follows_the_local_endpoints() {
    let rt = runtime();
    let path = socket_path("hcnp");
    let _dp = dataplane(&path);
    let health = Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT));
    let servers = Arc::new(ServiceHealthServers::new(
        "127.0.0.1".parse().expect("ip"),
        HealthCheckPort::Ephemeral,
        health.clone(),
        rt.handle().clone(),
    ));
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&path),
        Arc::new(ControlMetrics::new()),
        health,
    )
    .with_service_health(servers.clone());
    let check = |expect_status: u16, expect_local: u64| {
        let addr = servers.bound("default", "web").expect("health check open");
        // Any path answers, as kube-proxy's.
        let (status, head, body) = get(addr, "/anything");
        assert_eq!(status, expect_status, "{body}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v = json(&body);
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], expect_local, "{body}");
        assert_eq!(v["serviceProxyHealthy"], true);
        addr
    };

    // Only an endpoint on another node: this node must not get the load balancer's traffic.
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-b"]))),
    );
    let first = check(503, 0);
    // A local ready endpoint appears.
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a", "node-b"]))),
    );
    assert_eq!(check(200, 1), first, "the same server, not reopened");
    // ... and goes away.
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-b"]))),
    );
    check(503, 0);

    // The Service goes: its port is closed.
    program(&mut p, &objects(&format!("{NODE}{}", slice(&["node-b"]))));
    assert_eq!(servers.bound("default", "web"), None);
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect_timeout(&first, Duration::from_secs(1)).is_ok() {
        assert!(Instant::now() < deadline, "{first} still open");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn metrics_show_control_and_dataplane_or_say_the_dataplane_is_down() {
    let rt = runtime();
    let path = socket_path("metrics");
    let dp = dataplane(&path);
    let metrics = Arc::new(ControlMetrics::new());
    let server =
        serve_metrics(localhost(), metrics.clone(), path.clone(), rt.handle()).expect("metrics");
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&path),
        metrics.clone(),
        Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT)),
    );
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a", "node-b"]))),
    );

    let (status, head, text) = get(server.addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
    // Every sample line is `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("name and value");
        assert!(value.parse::<f64>().is_ok(), "{line}");
        assert!(name.starts_with("kxdp_"), "{line}");
    }
    let capacity = dp.conntrack.capacity();
    for expected in [
        "kxdp_dataplane_up 1".to_string(),
        "kxdp_dataplane_generation 1".into(),
        "kxdp_generation_applied 1".into(),
        format!("kxdp_conntrack_capacity {capacity}"),
        "kxdp_conntrack_entries 0".into(),
        "kxdp_worker_packets_total{worker=\"0\",direction=\"rx\"} 0".into(),
        "kxdp_worker_packets_total{worker=\"1\",direction=\"tx\"} 0".into(),
        "kxdp_worker_drops_total{worker=\"1\",reason=\"conntrack_full\"} 0".into(),
        "kxdp_worker_drops_total{worker=\"0\",reason=\"policy_denied\"} 0".into(),
        "kxdp_worker_nat_new_total{worker=\"0\"} 0".into(),
        "kxdp_worker_bytes_total{worker=\"0\",direction=\"rx\"} 0".into(),
        "kxdp_worker_bytes_total{worker=\"1\",direction=\"tx\"} 0".into(),
        "kxdp_stream_tables_sent_total{kind=\"snapshot\"} 1".into(),
        "kxdp_stream_tables_sent_total{kind=\"delta\"} 0".into(),
        "kxdp_table_entries{table=\"service_ports\"} 1".into(),
        "kxdp_table_entries{table=\"endpoints\"} 2".into(),
        "kxdp_network_programming_duration_seconds_count 1".into(),
        "kxdp_network_programming_duration_seconds_bucket{le=\"0.25\"} 1".into(),
        "kxdp_sync_duration_seconds_count 1".into(),
        "kxdp_sync_queue_depth_count 1".into(),
        "# TYPE kxdp_network_programming_duration_seconds histogram".into(),
        "# TYPE kxdp_worker_drops counter".into(),
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "no {expected:?} in\n{text}"
        );
    }
    assert_eq!(get(server.addr(), "/").0, 404);

    // A change goes as a delta, and the bytes sent are counted by kind.
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a"]))),
    );
    let (_, _, text) = get(server.addr(), "/metrics");
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(sample("kxdp_stream_tables_sent_total{kind=\"delta\"}"), 1.0);
    assert_eq!(
        sample("kxdp_stream_tables_sent_total{kind=\"snapshot\"}"),
        1.0
    );
    let (snapshot, delta) = (
        sample("kxdp_stream_sent_bytes_total{kind=\"snapshot\"}"),
        sample("kxdp_stream_sent_bytes_total{kind=\"delta\"}"),
    );
    assert!(snapshot > 0.0 && delta > 0.0, "{snapshot} {delta}");
    assert_eq!(sample("kxdp_table_entries{table=\"endpoints\"}"), 1.0);

    // A dataplane that does not answer.
    let gone = socket_path("metrics-gone");
    let _ = std::fs::remove_file(&gone);
    let down = serve_metrics(localhost(), metrics, gone, rt.handle()).expect("metrics");
    let (status, _, text) = get(down.addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(text.lines().any(|l| l == "kxdp_dataplane_up 0"), "{text}");
    assert!(!text.contains("kxdp_worker_"), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "kxdp_network_programming_duration_seconds_count 2"),
        "control's own metrics stay: {text}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_dead_dataplane_fails_healthz_livez_and_the_health_check_node_ports() {
    let rt = runtime();
    let path = socket_path("dies");
    let grace = Duration::from_millis(300);
    let health = Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT).with_dataplane_grace(grace));
    let server = serve_healthz(localhost(), health.clone(), rt.handle()).expect("healthz");
    let addr = server.addr();
    let servers = Arc::new(ServiceHealthServers::new(
        "127.0.0.1".parse().expect("ip"),
        HealthCheckPort::Ephemeral,
        health.clone(),
        rt.handle().clone(),
    ));
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&path),
        Arc::new(ControlMetrics::new()),
        health,
    )
    .with_service_health(servers.clone());
    let applies = |generation| Message::Applied { generation };
    let dp = FakeDataplane::start(&path, applies);
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a"]))),
    );
    let check = |status: u16, local: u64, healthy: bool| {
        let addr = servers.bound("default", "web").expect("health check open");
        let (got, _, body) = get(addr, "/");
        assert_eq!(got, status, "{body}");
        let v = json(&body);
        assert_eq!(v["localEndpoints"], local, "{body}");
        assert_eq!(v["serviceProxyHealthy"], healthy, "{body}");
    };
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/livez").0, 200);
    check(200, 1, true);

    // kill -9: control notices at its next look and, after the grace, says so.
    let killed = Instant::now();
    dp.kill();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let _ = p.sync();
        if get(addr, "/healthz").0 == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(killed.elapsed() >= grace, "failed within the grace");
    let (_, _, body) = get(addr, "/healthz");
    assert_eq!(
        json(&body)["nodeEligible"],
        true,
        "the Node is fine: {body}"
    );
    assert_eq!(get(addr, "/livez").0, 503);
    check(503, 0, false);

    // A dataplane that comes back but does not take the tables stays unhealthy.
    let refuses = FakeDataplane::start(&path, |_| Message::Refused {
        reason: "no".into(),
    });
    let deadline = Instant::now() + TIMEOUT;
    while !matches!(p.sync(), Err(control::StreamError::Refused { .. })) {
        assert!(Instant::now() < deadline, "never refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(addr, "/healthz").0, 503);
    check(503, 0, false);
    refuses.kill();

    // One that applies them: healthy again, its endpoint counted.
    let dp = FakeDataplane::start(&path, applies);
    // A new generation, as a new edit would make (the refused one is not sent again).
    program(
        &mut p,
        &objects(&format!("{NODE}{SERVICE}{}", slice(&["node-a", "node-b"]))),
    );
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/livez").0, 200);
    check(200, 1, true);
    dp.kill();
    let _ = std::fs::remove_file(&path);
}
