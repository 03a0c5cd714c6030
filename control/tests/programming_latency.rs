//! Network programming latency through the whole control path: an EndpointSlice changed
//! 1,000 times on an API server written here (plain HTTP/1.1 on 127.0.0.1, a list and then
//! a chunked watch stream, as the real one shapes them), each change stamped with
//! `endpoints.kubernetes.io/last-change-trigger-time` when it is made; kxdp-control's API
//! source (kube-rs watchers), its sync loop (`follow`: settle, compute, send) and an
//! in-process dataplane (`dataplane::server::serve`, no AF_XDP) that answers `Applied`.
//!
//! Changes are made one at a time, each once the previous one was measured, so every
//! latency is that of a lone change (a burst would be computed once, see `Settle`). It
//! prints the histogram; it asserts that no change was lost (every trigger time measured
//! exactly once, the dataplane holding the last endpoint), never a speed.
//!
//! `cargo test --release -p control --test programming_latency -- --nocapture` prints
//! the figures. `KXDP_LATENCY_SERVICES=10000` lists that many more Services (ClusterIP, one
//! slice of ten endpoints each) beside the changed one, for the figure at scale.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::follow::{Follow, Settle};
use control::health::{ProxyHealth, DEFAULT_HEALTHZ_TIMEOUT};
use control::kube_source::{Connection, KubeSource, LAST_CHANGE_TRIGGER_TIME};
use control::metrics::ControlMetrics;
use control::stream::Stream;
use control::{Kind, Programmer};
use dataplane::state::{Limits, Shared};
use nat::spec::ClusterSpec;
use nat::wire::{self, Message};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const CHANGES: usize = 1_000;
/// The longest one change may take to be measured before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The API server: what it lists, and the EndpointSlice watch events made since.
struct Api {
    /// The resourceVersion of the lists.
    listed_at: u64,
    lists: BTreeMap<Kind, Vec<Value>>,
    /// `{"type":"MODIFIED","object":...}` lines, oldest first.
    slice_events: Mutex<Vec<String>>,
    /// Bumped after each new event.
    wake: watch::Sender<usize>,
}

fn path_kind(path: &str) -> Option<Kind> {
    Some(match path {
        "/api/v1/nodes" => Kind::Node,
        "/api/v1/namespaces" => Kind::Namespace,
        "/api/v1/pods" => Kind::Pod,
        "/api/v1/services" => Kind::Service,
        "/apis/discovery.k8s.io/v1/endpointslices" => Kind::EndpointSlice,
        "/apis/networking.k8s.io/v1/networkpolicies" => Kind::NetworkPolicy,
        _ => return None,
    })
}

async fn serve_api(listener: TcpListener, api: Arc<Api>) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(answer(conn, api.clone()));
    }
}

/// Answers one request: a list (then closes), or a watch (chunked, held open; events only
/// for EndpointSlices).
async fn answer(conn: TcpStream, api: Arc<Api>) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut request = String::new();
    r.read_line(&mut request).await?;
    loop {
        let mut header = String::new();
        if r.read_line(&mut header).await? == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let watching = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let Some(kind) = path_kind(path) else {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#;
        let head = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        w.write_all(head.as_bytes()).await?;
        return w.write_all(body.as_bytes()).await;
    };
    if !watching {
        let body = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": api.listed_at.to_string()},
            "items": api.lists.get(&kind).cloned().unwrap_or_default(),
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        w.write_all(head.as_bytes()).await?;
        return w.write_all(body.as_bytes()).await;
    }
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await?;
    w.flush().await?;
    if kind != Kind::EndpointSlice {
        // Nothing ever changes; hold the watch open until the test ends.
        std::future::pending::<()>().await;
    }
    let mut wake = api.wake.subscribe();
    let mut sent = 0;
    loop {
        wake.borrow_and_update();
        let lines: Vec<String> = api.slice_events.lock().expect("events")[sent..].to_vec();
        sent += lines.len();
        for line in lines {
            let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
            w.write_all(chunk.as_bytes()).await?;
        }
        w.flush().await?;
        if wake.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// The Service's slice with one ready local endpoint at 10.244.1.`host`.
fn slice(host: u32, rv: u64, trigger: Option<String>) -> Value {
    let mut s = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abcde",
            "namespace": "default",
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [format!("10.244.1.{host}")],
            "conditions": {"ready": true},
            "nodeName": "node-a",
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    });
    if let Some(t) = trigger {
        s["metadata"]["annotations"] = json!({ LAST_CHANGE_TRIGGER_TIME: t });
    }
    s
}

/// `n` more Services with one slice of ten ready endpoints each.
fn bystanders(n: u32) -> (Vec<Value>, Vec<Value>) {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for s in 0..n {
        let name = format!("svc-{s}");
        services.push(json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "12"},
            "spec": {"type": "ClusterIP", "clusterIP": format!("172.30.{}.{}", 1 + s / 250, s % 250 + 1),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }));
        let endpoints: Vec<Value> = (0..10u32)
            .map(|e| {
                let k = s * 10 + e;
                json!({"addresses": [format!("10.{}.{}.{}", 100 + k / 65536, (k / 256) % 256, k % 256)],
                       "conditions": {"ready": true}, "nodeName": "node-b"})
            })
            .collect();
        slices.push(json!({
            "metadata": {"name": format!("{name}-abc"), "namespace": "default", "resourceVersion": "13",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }));
    }
    (services, slices)
}

fn lists() -> BTreeMap<Kind, Vec<Value>> {
    let more = std::env::var("KXDP_LATENCY_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (mut services, mut slices) = bystanders(more);
    let mut lists = BTreeMap::from([
        (
            Kind::Node,
            vec![json!({
                "metadata": {"name": "node-a", "resourceVersion": "10"},
                "spec": {"podCIDR": "10.244.1.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]},
            })],
        ),
        (
            Kind::Namespace,
            vec![json!({"metadata": {"name": "default", "resourceVersion": "11"}})],
        ),
        (Kind::Pod, Vec::new()),
        (
            Kind::Service,
            vec![json!({
                "metadata": {"name": "web", "namespace": "default", "resourceVersion": "12"},
                "spec": {"type": "ClusterIP", "clusterIP": "172.30.0.10", "clusterIPs": ["172.30.0.10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
            })],
        ),
        (Kind::EndpointSlice, vec![slice(1, 13, None)]),
        (Kind::NetworkPolicy, Vec::new()),
    ]);
    if let Some(l) = lists.get_mut(&Kind::Service) {
        l.append(&mut services);
    }
    if let Some(l) = lists.get_mut(&Kind::EndpointSlice) {
        l.append(&mut slices);
    }
    lists
}

/// The dataplane's generation and the web Service's endpoints as it has them; `None`
/// while it has no such Service (or does not answer).
fn dataplane_endpoints(socket: &Path) -> Option<(u64, Vec<String>)> {
    let mut conn = UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(TIMEOUT)).ok()?;
    wire::write_message(&mut conn, &Message::GetServices).ok()?;
    match wire::read_message(&mut conn).ok()? {
        Message::Services {
            generation,
            services,
        } => {
            let web = services.iter().find(|s| s.name == "default/web:http")?;
            Some((
                generation,
                web.backends.iter().map(|b| b.endpoint.clone()).collect(),
            ))
        }
        _ => None,
    }
}

#[test]
fn a_thousand_endpoint_slice_changes_all_reach_the_dataplane() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    // The dataplane.
    let socket = std::env::temp_dir().join(format!("kxdp-latency-{}.sock", std::process::id()));
    let shared = Arc::new(Shared::new(
        Vec::new(),
        1,
        Limits {
            conntrack_capacity: 1024,
            affinity_capacity: 1024,
            ..Limits::default()
        },
    ));
    dataplane::server::serve(&socket, shared, Instant::now()).expect("serve the socket");

    // The API server.
    let api = Arc::new(Api {
        listed_at: 100,
        lists: lists(),
        slice_events: Mutex::new(Vec::new()),
        wake: watch::channel(0).0,
    });
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind the API server");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    rt.spawn(serve_api(listener, api.clone()));

    // kxdp-control: the API source and the sync loop, on their own thread as in the binary.
    let connection = Connection {
        kubeconfig: None,
        master: Some(url),
    };
    let mut source = rt
        .block_on(KubeSource::connect(&connection))
        .expect("API client");
    let metrics = Arc::new(ControlMetrics::new());
    let mut programmer = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&socket),
        metrics.clone(),
        Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let handle = rt.handle().clone();
    let follow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let how = Follow {
                settle: Settle::default(),
                poll: Duration::from_millis(50),
                once: false,
            };
            control::follow::follow(&mut source, &mut programmer, &handle, how, &stop)
                .expect("follow");
            programmer.latest_generation()
        })
    };

    // The first tables, from the lists.
    let deadline = Instant::now() + TIMEOUT;
    while dataplane_endpoints(&socket).is_none() {
        assert!(Instant::now() < deadline, "the first tables never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }

    let started = Instant::now();
    let mut last_host = 1;
    for i in 0..CHANGES {
        last_host = 2 + (i as u32 % 250);
        let trigger = k8s_openapi::jiff::Timestamp::now().to_string();
        let event =
            json!({"type": "MODIFIED", "object": slice(last_host, 101 + i as u64, Some(trigger))});
        api.slice_events
            .lock()
            .expect("events")
            .push(event.to_string());
        api.wake.send_modify(|n| *n += 1);
        let deadline = Instant::now() + TIMEOUT;
        while metrics.network_programming_count() < i as u64 + 1 {
            assert!(
                Instant::now() < deadline,
                "change {i} was never applied ({} measured)",
                metrics.network_programming_count()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let elapsed = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let generation = follow.join().expect("the sync loop");
    let (applied, endpoints) = dataplane_endpoints(&socket).expect("the dataplane's tables");
    let _ = std::fs::remove_file(&socket);

    let snapshot = metrics.snapshot();
    let latency = &snapshot.network_programming;
    let ms = |q: f64| latency.quantile(q) * 1e3;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "network programming latency over {} EndpointSlice changes ({:?} in all, {} generations, {} Service ports):\n  \
         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (settle {:?} quiet, {:?} at most)",
        latency.len(),
        elapsed,
        applied,
        snapshot.tables.service_ports,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        latency.max() * 1e3,
        control::follow::SETTLE_QUIET,
        control::follow::SETTLE_MAX,
    );
    let sync = &snapshot.sync_duration;
    let _ = writeln!(
        out,
        "sync duration (objects taken to Applied) over {} generations: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sync.len(),
        sync.quantile(0.5) * 1e3,
        sync.quantile(0.99) * 1e3,
        sync.max() * 1e3,
    );
    let _ = writeln!(out, "  bucket (ms)  changes");
    for (bound, count) in latency.buckets(&[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]) {
        let _ = writeln!(out, "  ≤ {:>9.0}  {count}", bound * 1e3);
    }

    // No change lost: each trigger time measured once, and the dataplane has the last one.
    assert_eq!(latency.len(), CHANGES as u64, "every change measured once");
    assert_eq!(endpoints, vec![format!("10.244.1.{last_host}:8080")]);
    assert_eq!(
        Some(applied),
        generation,
        "the dataplane has the last generation"
    );
}
