//! The API source against an API server written here: plain HTTP/1.1 on 127.0.0.1 that
//! serves lists and watches as a real API server shapes them (`ServiceList` with
//! `metadata.resourceVersion` and items without `kind`, paginated with `continue`; watch
//! streams of `{"type":"ADDED","object":{...}}` lines in chunked encoding, `BOOKMARK`
//! events, an `ERROR` event with a 410 `Expired` Status, HTTP 410 for a compacted
//! resourceVersion, a connection dropped in the middle of an event). It takes writes too:
//! a `PATCH` of a Node with `application/merge-patch+json` is recorded as sent (method,
//! path, content type, body), applied as RFC 7386 says and seen by the watches.
//!
//! After each scenario the tables computed from the source's store must equal the tables
//! computed from the same objects loaded as manifests, and the store must hold exactly the
//! server's objects at the server's resourceVersions. Every wait is bounded; the server's
//! tasks and the source's watchers end with the test's runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use control::cni_conf::{self, CniConf};
use control::kube_source::{Connection, KubeSource};
use control::node_announce::{announce, Vtep};
use control::{Kind, Objects};
use ipnet::IpNet;
use nat::spec::{ClusterSpec, TableSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest any one wait may take. The source's backoff after an error is 0.8 s at
/// first, so a scenario with one or two errors settles in a few seconds.
const TIMEOUT: Duration = Duration::from_secs(30);

const NODE: &str = "node-a";

/// The collection path a kind is listed and watched at.
fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::Node => "/api/v1/nodes",
        Kind::Namespace => "/api/v1/namespaces",
        Kind::Pod => "/api/v1/pods",
        Kind::Service => "/api/v1/services",
        Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
    }
}

/// How the server says a resourceVersion is too old for a watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    /// HTTP 200, then an `ERROR` event with a 410 Status (what the watch cache does).
    Event,
    /// HTTP 410 with a Status body.
    Http,
}

/// One request the server answered.
#[derive(Clone, Debug)]
struct Request {
    kind: Kind,
    watch: bool,
    resource_version: Option<u64>,
    continue_token: Option<String>,
}

/// What the server holds of one kind.
#[derive(Default)]
struct KindState {
    /// Current objects by (namespace, name), with `metadata.resourceVersion` set.
    objects: BTreeMap<(String, String), Value>,
    /// Watch events still available: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// The oldest resourceVersion a watch may resume from.
    compacted: u64,
    /// Items per list page, if the list is paginated.
    page_size: Option<usize>,
    /// Watches that have started serving (and act on the counters below from then on).
    watches: usize,
    /// Counters the open watches act on when they grow.
    bookmarks: u64,
    expiries: u64,
    drops: u64,
}

/// One write request (anything but a GET), as the client sent it.
#[derive(Clone, Debug)]
struct Write {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

struct State {
    rv: u64,
    kinds: BTreeMap<Kind, KindState>,
    requests: Vec<Request>,
    writes: Vec<Write>,
    /// How many of the next writes are refused with 403.
    refuse_writes: usize,
    hold_pages: bool,
    gone: Gone,
}

/// The fake API server's state and the tests' handle on it.
#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<State>>,
    wake: Arc<watch::Sender<u64>>,
}

fn kind_of(obj: &Value) -> Kind {
    let name = obj["kind"].as_str().expect("fixture objects have a kind");
    Kind::from_name(name).expect("a kind the source watches")
}

fn key_of(kind: Kind, obj: &Value) -> (String, String) {
    let md = &obj["metadata"];
    let ns = if kind.is_namespaced() {
        md["namespace"].as_str().unwrap_or("default")
    } else {
        ""
    };
    (
        ns.to_string(),
        md["name"].as_str().expect("named").to_string(),
    )
}

impl FakeApi {
    fn new(objects: &[Value]) -> FakeApi {
        let mut state = State {
            rv: 100,
            kinds: Kind::ALL
                .into_iter()
                .map(|k| (k, KindState::default()))
                .collect(),
            requests: Vec::new(),
            writes: Vec::new(),
            refuse_writes: 0,
            hold_pages: false,
            gone: Gone::Event,
        };
        for obj in objects {
            state.rv += 1;
            let rv = state.rv;
            let kind = kind_of(obj);
            let mut obj = obj.clone();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let k = state.kinds.get_mut(&kind).expect("every kind");
            k.objects.insert(key_of(kind, &obj), obj);
        }
        for k in state.kinds.values_mut() {
            k.compacted = state.rv;
        }
        FakeApi {
            state: Arc::new(Mutex::new(state)),
            wake: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("server state")
    }

    /// Runs `f` on the state and wakes the open watches.
    fn change<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.wake.send_modify(|n| *n += 1);
        r
    }

    /// Stores `obj`; `event` says whether watches see it (else it is as if the event had
    /// been compacted away before anyone saw it).
    fn put(&self, obj: Value, event: bool) {
        self.change(|s| {
            s.rv += 1;
            let rv = s.rv;
            let kind = kind_of(&obj);
            let mut obj = obj;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let k = s.kinds.get_mut(&kind).expect("every kind");
            let old = k.objects.insert(key_of(kind, &obj), obj.clone());
            if event {
                let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
                k.history.push((rv, kind, obj));
            }
        });
    }

    fn apply(&self, obj: Value) {
        self.put(obj, true);
    }

    fn apply_silently(&self, obj: Value) {
        self.put(obj, false);
    }

    fn remove(&self, kind: Kind, ns: &str, name: &str, event: bool) {
        self.change(|s| {
            s.rv += 1;
            let rv = s.rv;
            let k = s.kinds.get_mut(&kind).expect("every kind");
            let ns = if kind.is_namespaced() { ns } else { "" };
            let mut obj = k
                .objects
                .remove(&(ns.to_string(), name.to_string()))
                .expect("deleting an object the server has");
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if event {
                k.history.push((rv, "DELETED", obj));
            }
        });
    }

    fn delete(&self, kind: Kind, ns: &str, name: &str) {
        self.remove(kind, ns, name, true);
    }

    fn delete_silently(&self, kind: Kind, ns: &str, name: &str) {
        self.remove(kind, ns, name, false);
    }

    /// Forgets `kind`'s history up to now: a watch from an older resourceVersion is gone.
    fn compact(&self, kind: Kind) {
        self.change(|s| {
            let rv = s.rv;
            let k = s.kinds.get_mut(&kind).expect("every kind");
            k.compacted = rv;
            k.history.retain(|(at, _, _)| *at > rv);
        });
    }

    /// Compacts `kind` and ends its open watches with an `ERROR` 410 event.
    fn expire(&self, kind: Kind) {
        self.compact(kind);
        self.change(|s| s.kinds.get_mut(&kind).expect("every kind").expiries += 1);
    }

    /// Cuts `kind`'s open watch connections in the middle of an event.
    fn drop_watches(&self, kind: Kind) {
        self.change(|s| s.kinds.get_mut(&kind).expect("every kind").drops += 1);
    }

    /// Sends a `BOOKMARK` at the current resourceVersion on `kind`'s open watches.
    fn bookmark(&self, kind: Kind) {
        self.change(|s| s.kinds.get_mut(&kind).expect("every kind").bookmarks += 1);
    }

    fn set_page_size(&self, kind: Kind, size: usize) {
        self.change(|s| s.kinds.get_mut(&kind).expect("every kind").page_size = Some(size));
    }

    fn hold_pages(&self, hold: bool) {
        self.change(|s| s.hold_pages = hold);
    }

    fn set_gone(&self, gone: Gone) {
        self.change(|s| s.gone = gone);
    }

    fn rv(&self) -> u64 {
        self.lock().rv
    }

    fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    fn refuse_writes(&self, n: usize) {
        self.change(|s| s.refuse_writes = n);
    }

    /// The server's copy of an object.
    fn object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let s = self.lock();
        let ns = if kind.is_namespaced() { ns } else { "" };
        s.kinds[&kind]
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    fn requests(&self, kind: Kind) -> Vec<Request> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.kind == kind)
            .cloned()
            .collect()
    }

    /// Watches of `kind` that started serving events.
    fn watches(&self, kind: Kind) -> usize {
        self.lock().kinds[&kind].watches
    }

    /// Waits until every kind has had more than `before` watches start.
    async fn wait_for_watches(&self, before: &[usize]) {
        wait_for("a watch of every kind", || {
            Kind::ALL
                .into_iter()
                .zip(before)
                .all(|(k, n)| self.watches(k) > *n)
        })
        .await;
    }

    fn lists(&self, kind: Kind) -> usize {
        self.requests(kind)
            .iter()
            .filter(|r| !r.watch && r.continue_token.is_none())
            .count()
    }

    /// The server's objects, loaded the way the manifest source loads them.
    fn as_manifests(&self) -> Objects {
        let s = self.lock();
        let mut objects = Objects::new();
        for k in s.kinds.values() {
            for obj in k.objects.values() {
                let value = serde_yaml::to_value(obj).expect("JSON is YAML");
                objects
                    .apply_document(value, "fake API server")
                    .expect("fixture objects are valid");
            }
        }
        objects
    }
}

impl FakeApi {
    /// Records a write and answers it: a JSON merge patch of a Node, applied and seen by
    /// the watches; anything else is refused.
    fn write(&self, w: Write) -> (&'static str, Value) {
        let status = |code: u16, reason: &str| {
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "reason": reason, "message": reason, "code": code})
        };
        let name = w.path.strip_prefix("/api/v1/nodes/").map(str::to_string);
        let merge = w.content_type == "application/merge-patch+json";
        let refused = self.change(|s| {
            s.writes.push(w.clone());
            let refused = s.refuse_writes > 0;
            s.refuse_writes = s.refuse_writes.saturating_sub(1);
            refused
        });
        if refused {
            return ("403 Forbidden", status(403, "Forbidden"));
        }
        let (Some(name), "PATCH", true) = (name, w.method.as_str(), merge) else {
            return ("405 Method Not Allowed", status(405, "MethodNotAllowed"));
        };
        let Some(mut node) = self.object(Kind::Node, "", &name) else {
            return ("404 Not Found", status(404, "NotFound"));
        };
        merge_patch(&mut node, &w.body);
        self.apply(node);
        let node = self.object(Kind::Node, "", &name).expect("just stored");
        ("200 OK", node)
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn status_410(reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": 410})
}

/// Starts the server; it (and every connection it serves) stops when the returned task is
/// aborted or the runtime ends.
async fn serve(api: FakeApi) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(connection(api.clone(), sock));
            while conns.try_join_next().is_some() {}
        }
    });
    (url, task)
}

/// Serves the requests of one connection: lists and errors keep it open, a watch ends it.
async fn connection(api: FakeApi, sock: TcpStream) {
    let (read, mut write) = sock.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let target = words.next().unwrap_or("").to_string();
        // Headers, up to the blank line; a GET has no body.
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if read.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let (path_part, query) = target.split_once('?').unwrap_or((&target, ""));
        if method != "GET" {
            let length = headers
                .get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if tokio::io::AsyncReadExt::read_exact(&mut read, &mut body)
                .await
                .is_err()
            {
                return;
            }
            let write_request = Write {
                method,
                path: path_part.to_string(),
                query: query.to_string(),
                content_type: headers.get("content-type").cloned().unwrap_or_default(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            };
            let (status, answer) = api.write(write_request);
            if respond(&mut write, status, &answer).await.is_err() {
                return;
            }
            continue;
        }
        let params: BTreeMap<&str, &str> =
            query.split('&').filter_map(|p| p.split_once('=')).collect();
        let Some(kind) = Kind::ALL.into_iter().find(|k| path(*k) == path_part) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": "NotFound", "code": 404});
            if respond(&mut write, "404 Not Found", &body).await.is_err() {
                return;
            }
            continue;
        };
        let request = Request {
            kind,
            watch: params.get("watch") == Some(&"true"),
            resource_version: params.get("resourceVersion").and_then(|v| v.parse().ok()),
            continue_token: params.get("continue").map(|c| c.to_string()),
        };
        api.lock().requests.push(request.clone());
        if request.watch {
            watch_kind(&api, kind, request.resource_version.unwrap_or(0), write).await;
            return;
        }
        let limit = params.get("limit").and_then(|l| l.parse::<usize>().ok());
        // `metadata.name=NAME`, the only field selector kxdp-control sends.
        let by_name = params
            .get("fieldSelector")
            .map(|f| f.replace("%3D", "="))
            .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
        let body = list(
            &api,
            kind,
            request.continue_token.as_deref(),
            limit,
            by_name.as_deref(),
        )
        .await;
        if respond(&mut write, "200 OK", &body).await.is_err() {
            return;
        }
    }
}

async fn respond(write: &mut OwnedWriteHalf, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await?;
    write.flush().await
}

/// A `XxxList` page as the API server sends it: items without `kind` and `apiVersion`.
async fn list(
    api: &FakeApi,
    kind: Kind,
    continue_token: Option<&str>,
    limit: Option<usize>,
    field_selector: Option<&str>,
) -> Value {
    let mut wake = api.wake.subscribe();
    // A continued list waits while the test holds pages back.
    while continue_token.is_some() && api.lock().hold_pages {
        if wake.changed().await.is_err() {
            break;
        }
    }
    let s = api.lock();
    let k = &s.kinds[&kind];
    let offset: usize = continue_token.and_then(|c| c.parse().ok()).unwrap_or(0);
    let page = match (k.page_size, limit) {
        (Some(p), Some(l)) => p.min(l),
        (Some(p), None) => p,
        (None, Some(l)) => l,
        (None, None) => usize::MAX,
    };
    let items: Vec<Value> = k
        .objects
        .values()
        .filter(|o| match field_selector {
            Some(name) => o["metadata"]["name"] == name,
            None => true,
        })
        .skip(offset)
        .take(page)
        .map(|o| {
            let mut o = o.clone();
            let m = o.as_object_mut().expect("object");
            m.remove("kind");
            m.remove("apiVersion");
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": s.rv.to_string()});
    if offset + items.len() < k.objects.len() {
        metadata["continue"] = json!((offset + items.len()).to_string());
    }
    json!({"kind": format!("{kind}List"), "apiVersion": kind.api_version(),
           "metadata": metadata, "items": items})
}

async fn chunk(write: &mut OwnedWriteHalf, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    let framed = format!("{:x}\r\n{line}\r\n", line.len());
    write.write_all(framed.as_bytes()).await?;
    write.flush().await
}

/// A watch from `from`: the events after it, then whatever the test makes happen, until
/// the test expires or drops it.
async fn watch_kind(api: &FakeApi, kind: Kind, from: u64, mut write: OwnedWriteHalf) {
    let mut wake = api.wake.subscribe();
    let (gone, compacted, mut seen) = {
        let mut s = api.lock();
        let gone = s.gone;
        let k = s.kinds.get_mut(&kind).expect("every kind");
        if from >= k.compacted {
            k.watches += 1;
        }
        (gone, k.compacted, (k.bookmarks, k.expiries, k.drops))
    };
    if from < compacted {
        let message = format!("too old resource version: {from} ({compacted})");
        if gone == Gone::Http {
            let _ = respond(&mut write, "410 Gone", &status_410("Gone", &message)).await;
            return;
        }
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if from < compacted {
        let message = format!("too old resource version: {from} ({compacted})");
        let event = json!({"type": "ERROR", "object": status_410("Expired", &message)});
        let _ = chunk(&mut write, &event).await;
        let _ = write.write_all(b"0\r\n\r\n").await;
        return;
    }
    let mut at = from;
    loop {
        let (events, bookmark, expire, drop) = {
            let s = api.lock();
            let k = &s.kinds[&kind];
            let events: Vec<Value> = k
                .history
                .iter()
                .filter(|(rv, _, _)| *rv > at)
                .map(|(_, t, o)| json!({"type": t, "object": o}))
                .collect();
            at = k.history.last().map_or(at, |(rv, _, _)| (*rv).max(at));
            let now = (k.bookmarks, k.expiries, k.drops);
            let bookmark = (now.0 > seen.0).then_some(s.rv);
            let acts = (bookmark, now.1 > seen.1, now.2 > seen.2);
            seen = now;
            (events, acts.0, acts.1, acts.2)
        };
        for e in &events {
            if chunk(&mut write, e).await.is_err() {
                return;
            }
        }
        if let Some(rv) = bookmark {
            let event = json!({"type": "BOOKMARK", "object": {"kind": kind.name(),
                "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}}});
            if chunk(&mut write, &event).await.is_err() {
                return;
            }
        }
        if expire {
            let message = format!("too old resource version: {at} ({})", api.rv());
            let event = json!({"type": "ERROR", "object": status_410("Expired", &message)});
            let _ = chunk(&mut write, &event).await;
            let _ = write.write_all(b"0\r\n\r\n").await;
            return;
        }
        if drop {
            // A chunk that promises 256 bytes and delivers part of an event: the connection
            // is lost in the middle of a line.
            let _ = write
                .write_all(b"100\r\n{\"type\":\"MODIFIED\",\"obj")
                .await;
            let _ = write.flush().await;
            return;
        }
        if wake.changed().await.is_err() {
            return;
        }
    }
}

/// A source watching a fake server, with what the tests accumulate from its changes.
struct Harness {
    api: FakeApi,
    /// The server's URL, for more clients.
    url: String,
    source: KubeSource,
    server: JoinHandle<()>,
    /// Every EndpointSlice trigger time the source reported.
    triggers: Vec<SystemTime>,
    /// Every kind the source reported as (re)listed.
    listed: Vec<Kind>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What the comparison looks at: the tables and which object versions are held.
#[derive(Debug, PartialEq)]
struct View {
    tables: Result<TableSpec, String>,
    versions: BTreeSet<String>,
}

fn view(objects: &Objects) -> View {
    let tables = control::compute_with_warnings(objects, NODE, &ClusterSpec::default())
        .map(|c| c.tables)
        .map_err(|e| e.to_string());
    let mut versions = BTreeSet::new();
    let mut add = |kind: Kind, md: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        versions.insert(format!(
            "{kind} {}/{}@{}",
            md.namespace.as_deref().unwrap_or(""),
            md.name.as_deref().unwrap_or(""),
            md.resource_version.as_deref().unwrap_or("")
        ));
    };
    objects.nodes().for_each(|o| add(Kind::Node, &o.metadata));
    objects
        .namespaces()
        .for_each(|o| add(Kind::Namespace, &o.metadata));
    objects.pods().for_each(|o| add(Kind::Pod, &o.metadata));
    objects
        .services()
        .for_each(|o| add(Kind::Service, &o.metadata));
    objects
        .endpoint_slices()
        .for_each(|o| add(Kind::EndpointSlice, &o.metadata));
    objects
        .network_policies()
        .for_each(|o| add(Kind::NetworkPolicy, &o.metadata));
    View { tables, versions }
}

impl Harness {
    async fn start(api: FakeApi) -> Harness {
        let _ = env_logger::builder().is_test(true).try_init();
        let (url, server) = serve(api.clone()).await;
        let connection = Connection {
            kubeconfig: None,
            master: Some(url.clone()),
        };
        let source = KubeSource::connect(&connection).await.expect("client");
        let mut h = Harness {
            api,
            url,
            source,
            server,
            triggers: Vec::new(),
            listed: Vec::new(),
        };
        h.settle("the initial lists").await;
        // The scenarios act on open watches.
        h.api.wait_for_watches(&[0; 6]).await;
        h
    }

    /// The source's view now, taking (and keeping) what changed.
    fn look(&mut self) -> (View, bool) {
        let (v, change) = self.source.take(|objects, change| (view(objects), change));
        self.triggers.extend(change.endpoint_slice_triggers);
        self.listed.extend(change.listed);
        (v, change.synced)
    }

    /// Waits until the source holds exactly the server's objects and so computes the same
    /// tables as the manifest path over them.
    async fn settle(&mut self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let expected = view(&self.api.as_manifests());
            assert!(
                expected.tables.is_ok(),
                "fixture computes: {:?}",
                expected.tables
            );
            let (got, synced) = self.look();
            if synced && got == expected {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let woke = tokio::time::timeout(left, self.source.changed()).await;
            if woke.is_err() {
                let missing: Vec<_> = expected.versions.difference(&got.versions).collect();
                let extra: Vec<_> = got.versions.difference(&expected.versions).collect();
                panic!(
                    "{what}: the source did not settle in {TIMEOUT:?} (synced {synced}); missing {missing:?}, extra {extra:?}, tables equal: {}",
                    got.tables == expected.tables
                );
            }
        }
    }

    fn tables(&mut self) -> TableSpec {
        self.look().0.tables.expect("tables")
    }
}

/// Waits, bounded, until `cond` holds.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn node(name: &str, ip: &str, subnet: u8, mac: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name,
            "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": format!("zone-{}", &name[5..])},
            "annotations": {"flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
                "flannel.alpha.coreos.com/public-ip": ip,
                "flannel.alpha.coreos.com/kube-subnet-manager": "true"},
            "managedFields": [{"manager": "flanneld", "operation": "Update", "apiVersion": "v1",
                "time": "2024-05-01T09:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]},
        "spec": {"podCIDR": format!("10.244.{subnet}.0/24"), "podCIDRs": [format!("10.244.{subnet}.0/24")]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "images": [{"names": ["registry.k8s.io/e2e-test-images/agnhost:2.47"], "sizeBytes": 51_000_000}]}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn pod(ns: &str, name: &str, app: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\"}"}},
        "spec": {"nodeName": node,
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
            "containers": [{"name": "main", "image": "registry.k8s.io/e2e-test-images/agnhost:2.47",
                "args": ["netexec", "--http-port=8080"], "env": [{"name": "MODE", "value": "serve"}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "containerStatuses": [{"name": "main", "image": "agnhost", "imageID": "", "ready": true, "restartCount": 0}]}})
}

fn service(name: &str, ip: &str, port: u16, target: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}})
}

fn slice(service: &str, suffix: &str, endpoints: &[(&str, &str)], trigger: Option<&str>) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| {
            json!({"addresses": [ip], "nodeName": node,
            "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let mut s = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    if let Some(t) = trigger {
        s["metadata"]["annotations"] = json!({TRIGGER: t});
    }
    s
}

fn policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"port": "http", "protocol": "TCP"}]}]}})
}

/// Two nodes, a client and a Service `web` with endpoints on both nodes, a Service `api`
/// with one, a Service `old`, and policies: the shapes of `shared/cases`.
fn fixture() -> Vec<Value> {
    vec![
        node("node-a", "192.168.0.2", 1, "9a:3c:2e:00:00:02"),
        node("node-b", "192.168.0.3", 2, "9a:3c:2e:11:22:33"),
        namespace("default"),
        namespace("x"),
        pod("default", "client", "client", "node-a", "10.244.1.2"),
        pod("default", "web-1", "web", "node-a", "10.244.1.5"),
        pod("default", "web-2", "web", "node-b", "10.244.2.5"),
        pod("default", "api-1", "api", "node-a", "10.244.1.7"),
        pod("x", "other", "other", "node-a", "10.244.1.9"),
        service("web", "172.30.0.41", 80, "http"),
        service("api", "172.30.0.42", 8080, "http"),
        service("old", "172.30.0.43", 80, "http"),
        slice(
            "web",
            "abc12",
            &[("10.244.1.5", "node-a"), ("10.244.2.5", "node-b")],
            Some("2024-05-01T09:00:00Z"),
        ),
        slice("api", "def34", &[("10.244.1.7", "node-a")], None),
        slice("old", "ghi56", &[("10.244.2.5", "node-b")], None),
        policy("default", "web-from-clients"),
        policy("x", "deny-other"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_of_every_kind() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    for kind in Kind::ALL {
        assert_eq!(api.lists(kind), 1, "{kind} listed once");
        assert!(h.listed.contains(&kind), "{kind} reported as listed");
    }
    let tables = h.tables();
    assert_eq!(tables.services.len(), 3);
    assert_eq!(tables.remote_nodes.len(), 1);
    assert!(
        h.triggers.is_empty(),
        "listed slices carry no trigger times"
    );
    // Stripped on the way in: the tables are equal (settled) though the store lacks them.
    h.source.take(|objects, _| {
        let n = objects.node("node-b").expect("listed");
        assert!(n.metadata.managed_fields.is_none());
        assert!(n.status.as_ref().and_then(|s| s.images.as_ref()).is_none());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_add_modify_and_delete() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    let before = h.tables();

    api.apply(pod("default", "web-3", "web", "node-a", "10.244.1.6"));
    api.apply(slice(
        "web",
        "abc12",
        &[
            ("10.244.1.5", "node-a"),
            ("10.244.2.5", "node-b"),
            ("10.244.1.6", "node-a"),
        ],
        Some("2024-05-01T10:00:00.250Z"),
    ));
    api.apply(service("web", "172.30.0.41", 8080, "http"));
    api.delete(Kind::Service, "default", "old");
    api.delete(Kind::EndpointSlice, "default", "old-ghi56");
    api.delete(Kind::NetworkPolicy, "x", "deny-other");
    api.apply(namespace("y"));
    api.apply(node("node-b", "192.168.0.3", 2, "9a:3c:2e:44:55:66"));
    h.settle("added, modified and deleted objects").await;

    let after = h.tables();
    assert_ne!(before, after);
    assert_eq!(after.services.len(), 2, "old is gone");
    assert_eq!(
        h.triggers,
        [SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_557_600_250)],
        "the modified slice's trigger time, parsed"
    );
    for kind in Kind::ALL {
        assert_eq!(api.lists(kind), 1, "{kind}: events, no relist");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_moves_the_resume_point() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    let listed_at = api.requests(Kind::Service)[0].clone();
    assert!(!listed_at.watch);
    // Other kinds move the resourceVersion on; the Service watch sees none of it.
    api.apply(pod("default", "web-3", "web", "node-a", "10.244.1.6"));
    api.apply(pod("default", "web-4", "web", "node-a", "10.244.1.8"));
    h.settle("pods added").await;
    let bookmark_rv = api.rv();
    assert!(listed_at.resource_version.is_none() && bookmark_rv > 0);
    let service_watches = || {
        api.requests(Kind::Service)
            .iter()
            .filter(|r| r.watch)
            .map(|r| r.resource_version)
            .collect::<Vec<_>>()
    };
    let first_watch = service_watches();
    assert_eq!(first_watch.len(), 1);
    assert!(first_watch[0] < Some(bookmark_rv));
    api.bookmark(Kind::Service);
    // History older than the bookmark is gone: resuming from before it would be a 410.
    api.compact(Kind::Service);
    api.drop_watches(Kind::Service);
    wait_for("the Service watch is resumed", || {
        service_watches().len() == 2
    })
    .await;
    assert_eq!(
        service_watches()[1],
        Some(bookmark_rv),
        "resumed from the bookmark"
    );
    api.apply(service("api", "172.30.0.42", 9090, "http"));
    h.settle("a Service changed after the reconnect").await;
    assert_eq!(api.lists(Kind::Service), 1, "no relist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_and_replaces_the_kind_whole() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    let old = h.look().0;

    // Changes the source never hears of as events, then the watch expires.
    api.set_page_size(Kind::Service, 1);
    api.hold_pages(true);
    api.delete_silently(Kind::Service, "default", "old");
    api.apply_silently(service("fresh", "172.30.0.44", 80, "http"));
    api.apply_silently(service("web", "172.30.0.41", 81, "http"));
    // Pages hold one Service each, in name order: the first page is this changed one.
    api.apply_silently(service("api", "172.30.0.42", 8081, "http"));
    api.expire(Kind::Service);

    // The relist has read its first page and waits for the second: nothing of it is
    // applied yet.
    wait_for("the relist's second page is asked for", || {
        api.requests(Kind::Service)
            .iter()
            .any(|r| r.continue_token.is_some())
    })
    .await;
    assert_eq!(h.look().0, old, "half a list is never applied");
    api.hold_pages(false);
    h.settle("the relist").await;

    assert_eq!(api.lists(Kind::Service), 2, "listed again after the 410");
    let relisted = h.listed.iter().filter(|k| **k == Kind::Service).count();
    assert_eq!(relisted, 2, "initial list and relist reported");
    h.source.take(|objects, _| {
        let names: Vec<&str> = objects
            .services()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        assert_eq!(
            names,
            ["api", "fresh", "web"],
            "old, absent from the new list, is gone"
        );
    });
    for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Service) {
        assert_eq!(
            api.lists(kind),
            1,
            "{kind}: only the expired kind is listed again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_410_for_a_stale_resource_version_relists() {
    let api = FakeApi::new(&fixture());
    api.set_gone(Gone::Http);
    let mut h = Harness::start(api.clone()).await;
    let watched_from = api.requests(Kind::Pod)[1].resource_version;
    assert!(watched_from.is_some());

    api.delete_silently(Kind::Pod, "default", "client");
    api.apply_silently(pod("default", "client-2", "client", "node-a", "10.244.1.3"));
    api.compact(Kind::Pod);
    api.drop_watches(Kind::Pod);
    h.settle("the relist after HTTP 410").await;

    let stale = api
        .requests(Kind::Pod)
        .iter()
        .filter(|r| r.watch && r.resource_version == watched_from)
        .count();
    assert_eq!(
        stale, 2,
        "the stale resourceVersion was tried once more, and answered 410"
    );
    assert_eq!(api.lists(Kind::Pod), 2, "listed again after the 410");
    let pods: Vec<String> = h
        .tables()
        .local_pods
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert!(pods.contains(&"default/client-2".to_string()), "{pods:?}");
    assert!(!pods.contains(&"default/client".to_string()), "{pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_reconnects_and_resumes() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    let watches_before: Vec<usize> = Kind::ALL.iter().map(|k| api.watches(*k)).collect();

    for kind in Kind::ALL {
        api.drop_watches(kind);
    }
    // Made while the watches are down or coming back: the resumed watches deliver them.
    api.apply(slice("api", "def34", &[], Some("2024-05-01T11:00:00Z")));
    api.delete(Kind::Pod, "default", "api-1");
    api.apply(service("old", "172.30.0.43", 8080, "http"));
    api.apply(namespace("z"));
    h.settle("events across the reconnect").await;
    api.wait_for_watches(&watches_before).await;
    for kind in Kind::ALL {
        assert_eq!(api.lists(kind), 1, "{kind}: resumed, not relisted");
    }
    assert_eq!(
        h.triggers,
        [SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_561_200)]
    );
}

/// What kxdp-control announces in these tests: the uplink's MAC, VNI 1.
const VTEP: Vtep = Vtep {
    mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01],
    vni: 1,
};

async fn client(url: &str) -> kube::Client {
    let connection = Connection {
        kubeconfig: None,
        master: Some(url.to_string()),
    };
    connection.client().await.expect("client")
}

/// The merge patch kxdp-control must send to announce [`VTEP`] on node-a (192.168.0.2),
/// spelt out from flannel's source rather than from kxdp's constants:
/// `pkg/subnet/kube/annotations.go` (`prefix + "backend-type"`, `"backend-data"`,
/// `"public-ip"`, `"kube-subnet-manager"` with the default prefix
/// `flannel.alpha.coreos.com/` of main.go's `--kube-annotation-prefix`), `kube.go`
/// `AcquireLease` (`kube-subnet-manager` = `"true"`, `public-ip` = `PublicIP.String()`),
/// `pkg/backend/vxlan/vxlan.go` (`BackendType: "vxlan"`, `json.Marshal(&vxlanLeaseAttrs{VNI,
/// VtepMAC})` with `hardwareAddr.MarshalJSON` writing `net.HardwareAddr.String()`).
fn announcement_patch() -> Value {
    json!({"metadata": {"annotations": {
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:01:01\"}",
        "flannel.alpha.coreos.com/public-ip": "192.168.0.2",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "kxdp.io/vtep-mac": "0a:58:0a:f4:01:01"}}})
}

/// Every write went to node-a's own Node, as a merge patch with kxdp-control's field
/// manager and exactly [`announcement_patch`] as its body.
fn assert_only_own_node_patched(writes: &[Write]) {
    for w in writes {
        assert_eq!(w.method, "PATCH", "{w:?}");
        assert_eq!(w.path, "/api/v1/nodes/node-a", "only its own Node: {w:?}");
        assert_eq!(w.content_type, "application/merge-patch+json", "{w:?}");
        assert!(w.query.contains("fieldManager=kxdp-control"), "{w:?}");
        assert_eq!(w.body, announcement_patch(), "{w:?}");
    }
}

/// A node moving from flannel to kxdp: its Node still carries flannel.1's VtepMAC. kxdp
/// replaces it with its own VTEP in the annotations flannel reads, writes nothing else and
/// no other Node, does not write again once the watch shows the patched Node, and puts the
/// announcement back when something overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kxdp_node_announces_its_vtep_on_its_own_node_as_flannel_reads_it() {
    let api = FakeApi::new(&fixture());
    let mut h = Harness::start(api.clone()).await;
    let own = h.source.node_watch(NODE);
    let task = tokio::spawn(announce(client(&h.url).await, own, VTEP));
    wait_for("the announcement", || !api.writes().is_empty()).await;
    h.settle("the patched Node").await;
    let writes = api.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_only_own_node_patched(&writes);

    // The server's Node now reads as flannel's kube.go reads it: the marker, the type,
    // backend-data as vxlanLeaseAttrs, public-ip as an IPv4 address; other annotations kept.
    let node_a = api.object(Kind::Node, "", NODE).expect("node-a");
    let ann = &node_a["metadata"]["annotations"];
    assert_eq!(ann["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
    assert_eq!(ann["flannel.alpha.coreos.com/backend-type"], "vxlan");
    let data: Value = serde_json::from_str(
        ann["flannel.alpha.coreos.com/backend-data"]
            .as_str()
            .expect("a string"),
    )
    .expect("JSON");
    assert_eq!(data["VNI"].as_u64(), Some(1));
    assert_eq!(data["VtepMAC"], "0a:58:0a:f4:01:01");
    let public_ip: std::net::Ipv4Addr = ann["flannel.alpha.coreos.com/public-ip"]
        .as_str()
        .expect("a string")
        .parse()
        .expect("IPv4");
    assert_eq!(public_ip.to_string(), "192.168.0.2");
    // And as kxdp's other nodes read it.
    let b = control::compute_with_warnings(&api.as_manifests(), "node-b", &ClusterSpec::default())
        .expect("tables")
        .tables;
    let remote = b
        .remote_nodes
        .iter()
        .find(|r| r.name == NODE)
        .expect("node-a");
    assert_eq!(remote.vtep_mac, VTEP.mac);
    assert_eq!(remote.vtep_ip.to_string(), "192.168.0.2");

    // Other objects change, node-b among them: nothing is written.
    api.apply(node("node-b", "192.168.0.3", 2, "9a:3c:2e:44:55:66"));
    api.apply(service("new", "172.30.0.44", 80, "http"));
    h.settle("other changes").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.writes().len(), 1, "{:?}", api.writes());

    // A flanneld still running on the node writes its own VtepMAC back: kxdp answers.
    let mut stale = api.object(Kind::Node, "", NODE).expect("node-a");
    stale["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] =
        json!("{\"VNI\":1,\"VtepMAC\":\"9a:3c:2e:00:00:02\"}");
    api.apply(stale);
    wait_for("the announcement again", || api.writes().len() == 2).await;
    h.settle("the Node patched again").await;
    assert_only_own_node_patched(&api.writes());
    task.abort();
}

/// A refused patch (RBAC without patch on nodes, say) is retried with growing waits until
/// it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_announcement_is_retried_with_backoff() {
    let api = FakeApi::new(&fixture());
    api.refuse_writes(2);
    let mut h = Harness::start(api.clone()).await;
    let own = h.source.node_watch(NODE);
    let started = Instant::now();
    let task = tokio::spawn(announce(client(&h.url).await, own, VTEP));
    wait_for("a third attempt", || api.writes().len() == 3).await;
    let waited = started.elapsed();
    // 0.5 s after the first refusal, 1 s after the second.
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    h.settle("the patched Node").await;
    let ann = &api.object(Kind::Node, "", NODE).expect("node-a")["metadata"]["annotations"];
    assert_eq!(ann["kxdp.io/vtep-mac"], "0a:58:0a:f4:01:01");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = api.writes();
    assert_eq!(writes.len(), 3, "no more once taken: {writes:?}");
    assert_only_own_node_patched(&writes);
    task.abort();
}

/// The init container's job: it waits while the Node has no podCIDRs, then writes the
/// config with the Node's networks, reading nothing but its own Node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_config_is_written_once_the_node_has_pod_cidrs() {
    let mut bare = node(NODE, "192.168.0.2", 1, "9a:3c:2e:00:00:02");
    bare["spec"] = json!({});
    let api = FakeApi::new(&[bare, node("node-b", "192.168.0.3", 2, "9a:3c:2e:11:22:33")]);
    let (url, server) = serve(api.clone()).await;
    let dir = std::env::temp_dir().join(format!("kxdp-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = CniConf {
        mtu: 1450,
        queues: 2,
        dataplane_socket: "/run/kxdp/dataplane.sock".into(),
    };
    let install = {
        let (dir, conf, client) = (dir.clone(), conf.clone(), client(&url).await);
        tokio::spawn(async move { cni_conf::install(client, NODE, &dir, &conf).await })
    };
    wait_for("a look at the Node", || api.lists(Kind::Node) >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!install.is_finished(), "no podCIDRs, no config");
    assert!(!dir.join(cni_conf::CONFLIST_NAME).exists());

    let mut assigned = api.object(Kind::Node, "", NODE).expect("node-a");
    assigned["spec"] = json!({"podCIDR": "10.244.1.0/24",
                              "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]});
    api.apply(assigned);
    let path = tokio::time::timeout(TIMEOUT, install)
        .await
        .expect("in time")
        .expect("task")
        .expect("written");
    let text = std::fs::read_to_string(&path).expect("the config");
    let nets: Vec<IpNet> = vec![
        "10.244.1.0/24".parse().expect("net"),
        "fd00:10:244:1::/64".parse().expect("net"),
    ];
    assert_eq!(Some(text), cni_conf::render(&nets, &conf));
    assert!(api.writes().is_empty(), "reads only");
    std::fs::remove_dir_all(&dir).expect("clean up");
    server.abort();
}
