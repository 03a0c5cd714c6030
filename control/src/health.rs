//! Health as kube-proxy reports it, so that the probes, load balancers and dashboards built
//! for kube-proxy work unchanged. Upstream files read (kubernetes/kubernetes,
//! pkg/proxy/healthcheck): `proxy_health.go` (the `/healthz` and `/livez` server) and
//! `service_health.go` (the health-check node ports); `pkg/proxy/endpointschangetracker.go`
//! (`LocalReadyEndpoints`).
//!
//! - [`ProxyHealth`] is kube-proxy's `ProxyHealthServer` state. A change the source
//!   reports marks an update as queued (the first unapplied one's time is kept); the
//!   dataplane applying tables that contain every change taken so far clears it. Healthy
//!   means no update has been queued for longer than the timeout. `/healthz` is healthy
//!   and the node eligible; `/livez` ignores eligibility. The node is not eligible while
//!   its Node has a `deletionTimestamp` or the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint, or is gone. Bodies are kube-proxy's JSON,
//!   times in Go's `time.Time` format, `lastUpdated` equal to `currentTime` when healthy.
//! - One difference: kube-proxy counts itself healthy until its first successful sync,
//!   however long that takes; kxdp counts a change queued since start-up like any other,
//!   so a dataplane that never takes its first tables is reported, not hidden.
//! - Another: kube-proxy is its own dataplane, kxdp's forwards in another process. When
//!   control finds it unreachable (killed, crashed, not started) it is marked lost, and
//!   stays lost until it has applied the current tables again (a restarted dataplane
//!   starts empty). Lost for longer than the grace ([`DEFAULT_DATAPLANE_GRACE`]) is
//!   unhealthy at once, without waiting for the update timeout: `/healthz` and `/livez`
//!   fail, and the health-check node ports answer 503 with `localEndpoints: 0`, since no
//!   local endpoint can be reached through this node meanwhile.
//! - [`service_health_checks`] is a pure function of the objects and the computed tables:
//!   every Service with `externalTrafficPolicy: Local` (externally reachable, not skipped)
//!   and a `healthCheckNodePort`, with its count of distinct local ready endpoint addresses
//!   over all its ports and families (a pod serving ports 80 and 443 counts once;
//!   terminating endpoints do not count, as in kube-proxy).
//! - [`ServiceHealthServers`] opens an HTTP server on each such port and closes those no
//!   longer wanted (a Service gone, or its port changed); a port that cannot be bound is
//!   tried again at the next sync. Every path and method answers: 200 with at least one
//!   local endpoint and a healthy proxy, else 503; while the proxy is unhealthy the count
//!   is reported as 0 (kube-proxy reports its count with `serviceProxyHealthy: false`).
//!
//! It deliberately does not decide when to sync: the caller says when a change was
//! queued and when the dataplane applied it.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Node;
use nat::spec::TableSpec;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::objects::{namespace_and_name, Objects};

/// How long an update may wait for the dataplane before `/healthz` fails. kube-proxy uses
/// twice its sync period (2 × 30 s by default). kxdp applies changes in milliseconds, but
/// compiling 100k Service ports takes seconds and a restarting dataplane is retried with up
/// to 5 s of backoff; a false alarm costs more than a late one, because a node that fails
/// its health check is taken out of every `externalTrafficPolicy: Local` load balancer.
pub const DEFAULT_HEALTHZ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the dataplane may be unreachable, or without the current tables after a
/// reconnection, before health fails. A dataplane handover leaves the socket without a
/// server for about half a second and control reconnects with a backoff from 100 ms; 5 s
/// covers that several times over (no false alarm during an upgrade) while a dead
/// dataplane is reported within seconds, where load balancers probe every 5–10 s.
pub const DEFAULT_DATAPLANE_GRACE: Duration = Duration::from_secs(5);

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's `/healthz` port, on localhost unless told otherwise (kube-proxy binds
/// 0.0.0.0; load balancers that probe it need that, which deploy/ passes explicitly).
pub const DEFAULT_HEALTHZ_BIND: &str = "127.0.0.1:10256";

/// How long one HTTP connection may take from accept to the end of its answer: a client
/// that sends nothing is dropped after this. Health checkers and scrapers ask once per
/// connection (keep-alive is off).
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Wait after a failed `accept` (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What kube-proxy's health state holds.
#[derive(Debug)]
struct State {
    /// When the dataplane last caught up with every change taken.
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet applied was queued.
    oldest_pending: Option<Instant>,
    /// Since when the dataplane has been unreachable or, once reached again, without the
    /// current tables.
    dataplane_lost: Option<Instant>,
    node_eligible: bool,
}

/// kube-proxy's proxy health: whether updates reach the dataplane in time, and whether
/// this node should receive traffic from load balancers.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    dataplane_grace: Duration,
    state: Mutex<State>,
}

/// An HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    fn json(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body,
        }
    }

    pub(crate) fn not_found() -> Reply {
        Reply {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "404 page not found\n".into(),
        }
    }
}

impl ProxyHealth {
    /// Healthy and eligible, nothing queued; `/healthz` fails once an update has waited
    /// longer than `timeout`.
    pub fn new(timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            timeout,
            dataplane_grace: DEFAULT_DATAPLANE_GRACE,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                dataplane_lost: None,
                // As kube-proxy: eligible until a Node says otherwise.
                node_eligible: true,
            }),
        }
    }

    /// Sets how long the dataplane may be lost before health fails (default
    /// [`DEFAULT_DATAPLANE_GRACE`]).
    pub fn with_dataplane_grace(mut self, grace: Duration) -> ProxyHealth {
        self.dataplane_grace = grace;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each method sets fields without anything that can panic in between.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change arrived that the dataplane does not have yet (kube-proxy `QueuedUpdate`);
    /// only the oldest such time is kept.
    pub fn queued_update(&self, now: Instant) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
    }

    /// The dataplane has every change taken so far (kube-proxy `Updated`).
    pub fn updated(&self, wall: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.dataplane_lost = None;
        s.last_updated = Some(wall);
    }

    /// The dataplane could not be reached (or the connection to it broke); only the
    /// first such time since it last had the current tables is kept.
    pub fn dataplane_lost(&self, now: Instant) {
        self.lock().dataplane_lost.get_or_insert(now);
    }

    /// The dataplane has the latest tables computed, on a live connection (whether or not
    /// they hold every change taken: that is [`ProxyHealth::updated`]).
    pub fn dataplane_current(&self) {
        self.lock().dataplane_lost = None;
    }

    /// Follows this node's Node (kube-proxy `SyncNode`): not eligible while it is being
    /// deleted, tainted for deletion by the autoscaler, or gone.
    pub fn sync_node(&self, node: Option<&Node>) {
        let eligible = node.is_some_and(|n| {
            let deleting = n.metadata.deletion_timestamp.is_some();
            let tainted = n
                .spec
                .iter()
                .flat_map(|s| s.taints.iter().flatten())
                .any(|t| t.key == TO_BE_DELETED_TAINT);
            !deleting && !tainted
        });
        self.lock().node_eligible = eligible;
    }

    /// Whether load balancers should send traffic to this node.
    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// How long the oldest unapplied update has waited, if one has.
    pub fn pending_for(&self, now: Instant) -> Option<Duration> {
        self.lock()
            .oldest_pending
            .map(|t| now.saturating_duration_since(t))
    }

    /// Whether no update has waited longer than the timeout and the dataplane has not
    /// been lost for longer than the grace (node eligibility aside), and when the
    /// dataplane last caught up.
    pub fn is_healthy(&self, now: Instant) -> (bool, Option<SystemTime>) {
        let s = self.lock();
        let late = s
            .oldest_pending
            .is_some_and(|t| now.saturating_duration_since(t) >= self.timeout);
        let lost = s
            .dataplane_lost
            .is_some_and(|t| now.saturating_duration_since(t) >= self.dataplane_grace);
        (!late && !lost, s.last_updated)
    }

    /// The answer to `/healthz`.
    pub fn healthz(&self, now: Instant, wall: SystemTime) -> Reply {
        let eligible = self.node_eligible();
        let (healthy, last) = self.is_healthy(now);
        let healthy = healthy && eligible;
        // As kube-proxy: a healthy answer says it was updated just now.
        let last = if healthy { Some(wall) } else { last };
        Reply::json(
            if healthy { 200 } else { 503 },
            format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}}}"#,
                go_time(last),
                go_time(Some(wall))
            ),
        )
    }

    /// The answer to `/livez`: `/healthz` without node eligibility.
    pub fn livez(&self, now: Instant, wall: SystemTime) -> Reply {
        let (healthy, last) = self.is_healthy(now);
        let last = if healthy { Some(wall) } else { last };
        Reply::json(
            if healthy { 200 } else { 503 },
            format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
                go_time(last),
                go_time(Some(wall))
            ),
        )
    }
}

/// A time as Go prints a `time.Time` in UTC (`2006-01-02 15:04:05.999999999 +0000 UTC`),
/// which is how kube-proxy's JSON carries it; `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(ts) = t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok()) else {
        return "0001-01-01 00:00:00 +0000 UTC".into();
    };
    let nanos = ts.subsec_nanosecond();
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_string()
    };
    format!("{}{fraction} +0000 UTC", ts.strftime("%Y-%m-%d %H:%M:%S"))
}

/// One Service's health-check node port and what it reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceHealthCheck {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Distinct addresses of this node's ready endpoints of the Service.
    pub local_endpoints: usize,
}

/// The health-check node ports this node serves, from the objects and the tables computed
/// from them (which say which Services are programmed with `externalTrafficPolicy: Local`
/// and which endpoints are local and ready). Ordered by namespace and name.
pub fn service_health_checks(objects: &Objects, tables: &TableSpec) -> Vec<ServiceHealthCheck> {
    let mut external_local: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut local: BTreeMap<(&str, &str), BTreeSet<IpAddr>> = BTreeMap::new();
    // Only Services with `externalTrafficPolicy: Local` have a health check: the others
    // are skipped before anything is collected, so this stays cheap at 10k Services.
    for s in tables.services.iter().filter(|s| s.external_local) {
        // `namespace/name:port`; neither a namespace nor a name holds '/' or ':'.
        let Some((ns, rest)) = s.name.split_once('/') else {
            continue;
        };
        let name = rest.split_once(':').map_or(rest, |(n, _)| n);
        external_local.insert((ns, name));
        let ips = s
            .all_endpoints
            .iter()
            .filter(|e| e.local && e.ready)
            .map(|e| e.ip);
        local.entry((ns, name)).or_default().extend(ips);
    }
    let mut out = Vec::new();
    for svc in objects.services() {
        let (ns, name) = namespace_and_name(&svc.metadata);
        let port = svc
            .spec
            .as_ref()
            .and_then(|s| s.health_check_node_port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let Some(port) = port else { continue };
        if !external_local.contains(&(ns, name)) {
            continue;
        }
        out.push(ServiceHealthCheck {
            namespace: ns.to_string(),
            name: name.to_string(),
            port,
            local_endpoints: local.get(&(ns, name)).map_or(0, BTreeSet::len),
        });
    }
    out.sort();
    out
}

/// The answer of a health-check node port, byte for byte kube-proxy's.
pub fn service_health_reply(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> Reply {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    Reply::json(
        if local_endpoints != 0 && proxy_healthy {
            200
        } else {
            503
        },
        format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
            q(namespace),
            q(name)
        ),
    )
}

/// An HTTP server task; stops (and closes its socket) when dropped.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` now (so that a taken port is an error here, not later) and answers
    /// every request with `handler(path)` on `runtime`.
    pub(crate) fn start<H, F>(addr: SocketAddr, runtime: &Handle, handler: H) -> io::Result<Self>
    where
        H: Fn(String) -> F + Send + Sync + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let task = runtime.spawn(serve_http(listener, Arc::new(handler)));
        Ok(HttpServer { addr: bound, task })
    }

    /// The address bound (with the port the kernel chose, for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_http<H, F>(listener: tokio::net::TcpListener, handler: Arc<H>)
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("HTTP accept on {:?}: {e}", listener.local_addr().ok());
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let reply = handler(req.uri().path().to_string());
                async move { Ok::<_, Infallible>(response(reply.await)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("HTTP connection: {e}"),
                Err(_) => log::debug!("HTTP connection dropped after {CONNECTION_LIMIT:?}"),
            }
        });
    }
}

fn response(reply: Reply) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(reply.body)));
    *r.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap_or(hyper::StatusCode::OK);
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    h.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// Serves `/healthz` and `/livez` on `addr` (kube-proxy's `--healthz-bind-address`).
pub fn serve_healthz(
    addr: SocketAddr,
    health: Arc<ProxyHealth>,
    runtime: &Handle,
) -> io::Result<HttpServer> {
    HttpServer::start(addr, runtime, move |path| {
        let health = health.clone();
        async move {
            let (now, wall) = (Instant::now(), SystemTime::now());
            match path.as_str() {
                "/healthz" => health.healthz(now, wall),
                "/livez" => health.livez(now, wall),
                _ => Reply::not_found(),
            }
        }
    })
}

/// Which port a health-check server binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthCheckPort {
    /// The Service's `healthCheckNodePort`, as kube-proxy does.
    NodePort,
    /// Any free port (tests, which must not take fixed ports);
    /// [`ServiceHealthServers::bound`] says which.
    Ephemeral,
}

struct Instance {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    server: HttpServer,
}

/// The open health-check node ports, kept equal to the wanted set by
/// [`ServiceHealthServers::sync`].
pub struct ServiceHealthServers {
    bind: IpAddr,
    ports: HealthCheckPort,
    proxy: Arc<ProxyHealth>,
    runtime: Handle,
    open: Mutex<BTreeMap<(String, String), Instance>>,
}

impl ServiceHealthServers {
    /// Servers on `bind` (kube-proxy listens on every address), answering with the
    /// `proxy`'s health, run on `runtime`.
    pub fn new(
        bind: IpAddr,
        ports: HealthCheckPort,
        proxy: Arc<ProxyHealth>,
        runtime: Handle,
    ) -> ServiceHealthServers {
        ServiceHealthServers {
            bind,
            ports,
            proxy,
            runtime,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Instance>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a server for each check not served yet, closes those of Services no longer
    /// listed or whose port changed (first, so a port can move between Services), and
    /// updates every count. Returns how many are open.
    pub fn sync(&self, checks: &[ServiceHealthCheck]) -> usize {
        let wanted: BTreeMap<(String, String), &ServiceHealthCheck> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c))
            .collect();
        let mut open = self.lock();
        open.retain(|key, inst| {
            let keep = wanted.get(key).is_some_and(|c| c.port == inst.port);
            if !keep {
                log::info!(
                    "closing the health check of Service {}/{} on port {}",
                    key.0,
                    key.1,
                    inst.port
                );
            }
            keep
        });
        for (key, c) in wanted {
            if let Some(inst) = open.get(&key) {
                inst.local_endpoints
                    .store(c.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let port = match self.ports {
                HealthCheckPort::NodePort => c.port,
                HealthCheckPort::Ephemeral => 0,
            };
            let local_endpoints = Arc::new(AtomicUsize::new(c.local_endpoints));
            let handler = {
                let (ns, name) = (c.namespace.clone(), c.name.clone());
                let count = local_endpoints.clone();
                let proxy = self.proxy.clone();
                move |_path: String| {
                    let healthy = proxy.is_healthy(Instant::now()).0;
                    // While the proxy is unhealthy the dataplane may be gone: no local
                    // endpoint can be reached through this node.
                    let local = if healthy {
                        count.load(Ordering::Relaxed)
                    } else {
                        0
                    };
                    let reply = service_health_reply(&ns, &name, local, healthy);
                    async move { reply }
                }
            };
            match HttpServer::start(SocketAddr::new(self.bind, port), &self.runtime, handler) {
                Ok(server) => {
                    log::info!(
                        "health check of Service {}/{} on {} ({} local endpoints)",
                        c.namespace,
                        c.name,
                        server.addr(),
                        c.local_endpoints
                    );
                    open.insert(
                        key,
                        Instance {
                            port: c.port,
                            local_endpoints,
                            server,
                        },
                    );
                }
                // As kube-proxy: reported, and tried again at the next sync.
                Err(e) => log::error!(
                    "cannot open the health check of Service {}/{} on {}:{}: {e}; is another process (kube-proxy?) on that port?",
                    c.namespace,
                    c.name,
                    self.bind,
                    c.port
                ),
            }
        }
        open.len()
    }

    /// Where the health check of a Service listens, if it is open.
    pub fn bound(&self, namespace: &str, name: &str) -> Option<SocketAddr> {
        self.lock()
            .get(&(namespace.to_string(), name.to_string()))
            .map(|i| i.server.addr())
    }

    /// How many health checks are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).expect("node")
    }

    #[test]
    fn healthy_until_an_update_waits_past_the_timeout() {
        let h = ProxyHealth::new(TIMEOUT);
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600);
        assert_eq!(h.healthz(t0, wall).status, 200);
        h.queued_update(t0);
        assert_eq!(h.healthz(t0 + TIMEOUT / 2, wall).status, 200);
        // A later change does not restart the clock.
        h.queued_update(t0 + TIMEOUT / 2);
        let late = h.healthz(t0 + TIMEOUT, wall);
        assert_eq!(late.status, 503);
        assert_eq!(
            late.body,
            r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": "2024-05-01 10:00:00 +0000 UTC", "nodeEligible": true}"#
        );
        assert_eq!(h.livez(t0 + TIMEOUT, wall).status, 503);
        h.updated(wall);
        assert_eq!(h.healthz(t0 + TIMEOUT * 2, wall).status, 200);
        assert_eq!(h.pending_for(t0 + TIMEOUT * 2), None);
    }

    #[test]
    fn a_lost_dataplane_fails_after_the_grace_until_it_has_the_tables_again() {
        let grace = Duration::from_secs(5);
        let h = ProxyHealth::new(TIMEOUT).with_dataplane_grace(grace);
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600);
        h.updated(wall);
        h.dataplane_lost(t0);
        // A handover's gap is not an outage.
        assert_eq!(h.healthz(t0 + grace / 2, wall).status, 200);
        // Later failures do not restart the clock.
        h.dataplane_lost(t0 + grace / 2);
        let r = h.healthz(t0 + grace, wall);
        assert_eq!(r.status, 503);
        assert!(r.body.ends_with(r#""nodeEligible": true}"#), "{}", r.body);
        assert_eq!(h.livez(t0 + grace, wall).status, 503);
        assert!(!h.is_healthy(t0 + grace).0);
        h.dataplane_current();
        assert_eq!(h.healthz(t0 + grace, wall).status, 200);
        assert_eq!(h.livez(t0 + grace, wall).status, 200);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let h = ProxyHealth::new(TIMEOUT);
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_714_557_600_123_456_700);
        h.sync_node(Some(&node(
            "metadata: {name: n, deletionTimestamp: '2024-05-01T10:00:00Z'}",
        )));
        let r = h.healthz(now, wall);
        assert_eq!(r.status, 503);
        assert!(r.body.ends_with(r#""nodeEligible": false}"#), "{}", r.body);
        let live = h.livez(now, wall);
        assert_eq!(live.status, 200);
        assert_eq!(
            live.body,
            r#"{"lastUpdated": "2024-05-01 10:00:00.1234567 +0000 UTC","currentTime": "2024-05-01 10:00:00.1234567 +0000 UTC"}"#
        );
        h.sync_node(Some(&node(
            "metadata: {name: n}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}",
        )));
        assert!(!h.node_eligible());
        h.sync_node(Some(&node("metadata: {name: n}")));
        assert!(h.node_eligible());
        h.sync_node(None);
        assert!(!h.node_eligible());
    }

    #[test]
    fn service_reply_is_kube_proxys() {
        let r = service_health_reply("default", "web", 2, true);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(service_health_reply("default", "web", 0, true).status, 503);
        assert_eq!(service_health_reply("default", "web", 3, false).status, 503);
    }

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports:
  - {name: http, port: 80, nodePort: 30080, protocol: TCP}
  - {name: https, port: 443, nodePort: 30443, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: cluster, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.11
  externalTrafficPolicy: Cluster
  healthCheckNodePort: 32001
  ports: [{port: 80, nodePort: 30081, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: internal, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 172.30.0.12
  externalTrafficPolicy: Local
  healthCheckNodePort: 32002
  ports: [{port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.1.6], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-a}
- {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: node-b}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: https, port: 8443, protocol: TCP}
"#;

    #[test]
    fn only_local_policy_services_with_a_port_and_ready_local_addresses_counted_once() {
        let mut objects = Objects::new();
        let mut errors = Vec::new();
        crate::load_text(&mut objects, "objects.yaml", OBJECTS, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let tables =
            crate::compute_with_warnings(&objects, "node-a", &nat::spec::ClusterSpec::default())
                .expect("tables")
                .tables;
        assert_eq!(
            service_health_checks(&objects, &tables),
            vec![ServiceHealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                port: 32000,
                // 10.244.1.5 on both ports counts once; the terminating one not at all.
                local_endpoints: 1,
            }]
        );
    }
}
