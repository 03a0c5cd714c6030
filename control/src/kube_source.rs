//! The Kubernetes API source: watches Services, EndpointSlices, Nodes, Pods, Namespaces and
//! NetworkPolicies cluster-wide and keeps an [`Objects`] store equal to what the API server
//! holds, as the manifest-directory source ([`crate::manifests`]) does for a folder.
//!
//! Each kind has its own kube-rs [`watcher`]: a paginated list, then a watch from the
//! list's resourceVersion, resumed from the last event or bookmark after a disconnect, with
//! kube's default backoff (0.8 s doubling to 30 s) after each failed request. A list is
//! never applied half-read: its objects are buffered until the watcher's `InitDone` and
//! then replace that kind's objects in one step under the store's lock, so objects the new
//! list lacks are deleted and a reader sees either the old kind or the new one.
//!
//! A `410 Gone` (the resourceVersion to resume from was compacted away) must lead to a
//! relist. kube's watcher relists when the watch stream carries an `ERROR` event with code
//! 410, but when the watch *request* is answered with HTTP 410 it retries the same stale
//! resourceVersion forever; so every error carrying 410 restarts the watcher here, which
//! begins again with a list (client-go's reflector does the same on `IsResourceExpired`).
//!
//! Objects go into the store through [`Objects::insert`], which applies the same defaults
//! as the manifest path (idempotent on what the API server already defaulted), after fields
//! the tables never read are dropped to keep a large cluster's memory down ([`strip`]).
//! After every applied batch the source says so on a [`tokio::sync::watch`] channel; the
//! reader takes the accumulated [`Change`] together with the objects it describes
//! ([`KubeSource::take`]).
//!
//! It deliberately does not compute tables, rate-limit recomputation or talk to the
//! dataplane: that is the caller's, the same for both sources.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::objects::{namespace_and_name, Kind, Object, Objects};

/// The EndpointSlice controller's record of when the change that produced a slice's
/// current content happened (RFC 3339); network-programming latency is measured from it.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `kubectl apply`'s copy of the whole object: large, and never read by the tables.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How many events that are ready at once are applied under one lock and announced as one
/// batch. Bounds how long a burst holds the store; not tuned by a benchmark.
const BATCH_LIMIT: usize = 1024;

/// Where the API server is and how to reach it, as kube-proxy takes it: a kubeconfig file,
/// a server URL that overrides the kubeconfig's (or is used alone, without credentials), or
/// neither, for the in-cluster service account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// `--kubeconfig`: the kubeconfig file; its current context is used.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server URL.
    pub master: Option<String>,
}

/// Why no client for the API server could be made.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Neither `--kubeconfig` nor `--master` was given and this is not a pod.
    #[error("no --kubeconfig or --master and no in-cluster service account: {0}; run kxdp-control in a pod with a service account, or give --kubeconfig PATH or --master URL")]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig file cannot be read or used.
    #[error("--kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// `--master` is not a URL.
    #[error("--master {url}: not a URL ({message}); write it as https://HOST:PORT")]
    Master {
        /// What was given.
        url: String,
        /// What the parser says.
        message: String,
    },
    /// The client could not be built from the configuration (TLS setup, credentials).
    #[error("cannot build an API client: {0}")]
    Client(#[source] kube::Error),
}

impl Connection {
    /// The client configuration this connection describes.
    pub async fn config(&self) -> Result<kube::Config, SourceError> {
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                    SourceError::Kubeconfig {
                        path: path.clone(),
                        source,
                    }
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|source| SourceError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })?
            }
            None if self.master.is_some() => kube::Config::new(Default::default()),
            None => kube::Config::incluster().map_err(SourceError::InCluster)?,
        };
        if let Some(master) = &self.master {
            config.cluster_url = master.parse().map_err(|e| SourceError::Master {
                url: master.clone(),
                message: format!("{e}"),
            })?;
        }
        Ok(config)
    }

    /// A client for the API server. Must run inside a tokio runtime.
    pub async fn client(&self) -> Result<kube::Client, SourceError> {
        kube::Client::try_from(self.config().await?).map_err(SourceError::Client)
    }
}

/// What the source applied since the last [`KubeSource::take`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Batches applied since the last take; 0 when nothing changed.
    pub batches: u64,
    /// The kinds those batches touched.
    pub kinds: BTreeSet<Kind>,
    /// Kinds that were listed (first time or relist) and replaced whole.
    pub listed: BTreeSet<Kind>,
    /// Whether every kind has been listed at least once. Until then the store is a partial
    /// view (Services without their EndpointSlices, no Node): tables computed from it would
    /// take working Services down.
    pub synced: bool,
    /// The [`LAST_CHANGE_TRIGGER_TIME`] of each EndpointSlice added or modified by a watch
    /// event, in the order applied. Slices from a (re)list are not counted: their trigger
    /// times date from before the source was watching. Deletions carry none, as in
    /// kube-proxy.
    pub endpoint_slice_triggers: Vec<SystemTime>,
}

/// What the watchers and the reader share.
#[derive(Default)]
struct Shared {
    objects: Objects,
    pending: Change,
    listed_once: BTreeSet<Kind>,
}

/// Watches the API server and keeps an [`Objects`] store up to date; stops its watchers
/// when dropped.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    changes: watch::Receiver<u64>,
    watchers: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Every update is applied whole before anything can panic in it, so a poisoned store
    // is still consistent.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KubeSource {
    /// Starts one watcher per kind on `client`. Must run inside a tokio runtime, whose
    /// tasks then do the watching.
    pub fn start(client: kube::Client) -> KubeSource {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, changes) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let watchers = vec![
            spawn::<Node>(&client, &shared, &tx),
            spawn::<Namespace>(&client, &shared, &tx),
            spawn::<Pod>(&client, &shared, &tx),
            spawn::<Service>(&client, &shared, &tx),
            spawn::<EndpointSlice>(&client, &shared, &tx),
            spawn::<NetworkPolicy>(&client, &shared, &tx),
        ];
        KubeSource {
            shared,
            changes,
            watchers,
        }
    }

    /// Connects as `connection` says and starts watching.
    pub async fn connect(connection: &Connection) -> Result<KubeSource, SourceError> {
        Ok(KubeSource::start(connection.client().await?))
    }

    /// Waits until a batch is applied that this source's reader has not been woken for;
    /// returns at once if one already was. `false` means the watchers are gone (they only
    /// stop when the runtime shuts down).
    pub async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }

    /// Calls `read` with the objects and what changed since the last take, under the
    /// store's lock: the change describes exactly the objects shown. Watchers wait for
    /// `read` to return, so it should compute and not block.
    pub fn take<R>(&self, read: impl FnOnce(&Objects, Change) -> R) -> R {
        let mut shared = lock(&self.shared);
        let mut change = std::mem::take(&mut shared.pending);
        change.synced = shared.listed_once.len() == Kind::ALL.len();
        read(&shared.objects, change)
    }

    /// A handle on one Node of the store, for a task that acts on this node's own Node
    /// (announcing its VTEP) while [`KubeSource::changed`] and [`KubeSource::take`] serve
    /// the tables.
    pub fn node_watch(&self, name: &str) -> NodeWatch {
        NodeWatch {
            shared: self.shared.clone(),
            changes: self.changes.clone(),
            name: name.to_string(),
        }
    }

    /// The kinds that have not been listed yet.
    pub fn unsynced(&self) -> Vec<Kind> {
        let shared = lock(&self.shared);
        Kind::ALL
            .into_iter()
            .filter(|k| !shared.listed_once.contains(k))
            .collect()
    }
}

/// One Node of a [`KubeSource`]'s store; see [`KubeSource::node_watch`].
pub struct NodeWatch {
    shared: Arc<Mutex<Shared>>,
    changes: watch::Receiver<u64>,
    name: String,
}

impl NodeWatch {
    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls `read` with the Node as the store holds it now (`None` before the Nodes are
    /// listed, or when it does not exist), under the store's lock.
    pub fn read<R>(&self, read: impl FnOnce(Option<&Node>) -> R) -> R {
        read(lock(&self.shared).objects.node(&self.name))
    }

    /// Waits until the store has applied a batch (of any kind) since the last call;
    /// `false` when the watchers are gone.
    pub async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }
}

/// The k8s-openapi types the source watches.
trait Watched:
    kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn into_object(self) -> Object;
    /// Drops fields the tables never read (beyond the metadata [`strip`] drops).
    fn strip_more(&mut self) {}
}

impl Watched for Node {
    const KIND: Kind = Kind::Node;
    fn into_object(self) -> Object {
        Object::Node(self)
    }
    fn strip_more(&mut self) {
        if let Some(status) = &mut self.status {
            // Every image on the node with its size: often the bulk of a Node.
            status.images = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
        }
    }
}

impl Watched for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn into_object(self) -> Object {
        Object::Namespace(self)
    }
}

impl Watched for Pod {
    const KIND: Kind = Kind::Pod;
    fn into_object(self) -> Object {
        Object::Pod(self)
    }
    fn strip_more(&mut self) {
        // Containers keep their names and ports: named target ports and NetworkPolicy
        // named ports are resolved against them.
        fn ports_only(c: &mut Vec<Container>) {
            for c in c {
                *c = Container {
                    name: std::mem::take(&mut c.name),
                    ports: c.ports.take(),
                    restart_policy: c.restart_policy.take(),
                    ..Container::default()
                };
            }
        }
        if let Some(spec) = &mut self.spec {
            ports_only(&mut spec.containers);
            if let Some(init) = &mut spec.init_containers {
                ports_only(init);
            }
            spec.ephemeral_containers = None;
            spec.volumes = None;
        }
        if let Some(status) = &mut self.status {
            status.container_statuses = None;
            status.init_container_statuses = None;
            status.ephemeral_container_statuses = None;
        }
    }
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn into_object(self) -> Object {
        Object::Service(self)
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn into_object(self) -> Object {
        Object::EndpointSlice(self)
    }
}

impl Watched for NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    fn into_object(self) -> Object {
        Object::NetworkPolicy(self)
    }
}

/// Drops what the tables never read: the field managers' records and `kubectl apply`'s
/// copy of the object on every kind, and per kind what `strip_more` says.
fn strip<K: Watched>(object: &mut K) {
    let md = object.meta_mut();
    md.managed_fields = None;
    if let Some(a) = &mut md.annotations {
        a.remove(LAST_APPLIED);
    }
    object.strip_more();
}

/// The store's key of an object: namespaced kinds without a namespace go to `default`.
fn key(kind: Kind, md: &ObjectMeta) -> (String, String) {
    let (ns, name) = namespace_and_name(md);
    let ns = if kind.is_namespaced() { ns } else { "" };
    (ns.to_string(), name.to_string())
}

/// The keys of the stored objects of `kind`.
fn stored_keys(objects: &Objects, kind: Kind) -> Vec<(String, String)> {
    let metas: Vec<&ObjectMeta> = match kind {
        Kind::Node => objects.nodes().map(|o| &o.metadata).collect(),
        Kind::Namespace => objects.namespaces().map(|o| &o.metadata).collect(),
        Kind::Pod => objects.pods().map(|o| &o.metadata).collect(),
        Kind::Service => objects.services().map(|o| &o.metadata).collect(),
        Kind::EndpointSlice => objects.endpoint_slices().map(|o| &o.metadata).collect(),
        Kind::NetworkPolicy => objects.network_policies().map(|o| &o.metadata).collect(),
    };
    metas.into_iter().map(|md| key(kind, md)).collect()
}

/// The [`LAST_CHANGE_TRIGGER_TIME`] of an object, if it has a valid one.
pub fn last_change_trigger_time(md: &ObjectMeta) -> Option<SystemTime> {
    let text = md.annotations.as_ref()?.get(LAST_CHANGE_TRIGGER_TIME)?;
    match text.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => Some(SystemTime::from(t)),
        Err(e) => {
            log::debug!(
                "EndpointSlice {}/{}: {LAST_CHANGE_TRIGGER_TIME} {text:?} is not RFC 3339: {e}",
                md.namespace.as_deref().unwrap_or(""),
                md.name.as_deref().unwrap_or("")
            );
            None
        }
    }
}

/// Whether a watcher error means the resourceVersion to resume from is gone.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 410,
        watcher::Error::WatchError(s) => s.code == 410,
        _ => false,
    }
}

/// The events of `kind`, from a watcher that is started afresh (with a list) after any
/// error carrying 410, with kube's default backoff after every error.
fn events<K: Watched>(api: Api<K>) -> BoxStream<'static, Result<Event<K>, watcher::Error>> {
    type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;
    stream::unfold(None::<Events<K>>, move |current| {
        let api = api.clone();
        async move {
            let mut events =
                current.unwrap_or_else(|| watcher(api, watcher::Config::default()).boxed());
            let item = events.next().await?;
            let keep = !matches!(&item, Err(e) if is_gone(e));
            Some((item, keep.then_some(events)))
        }
    })
    .default_backoff()
    .boxed()
}

fn spawn<K: Watched>(
    client: &kube::Client,
    shared: &Arc<Mutex<Shared>>,
    tx: &Arc<watch::Sender<u64>>,
) -> JoinHandle<()> {
    let events = events(Api::<K>::all(client.clone()));
    tokio::spawn(run(events, shared.clone(), tx.clone()))
}

/// Applies the events of one kind to the store until the stream ends (it does not: the
/// watcher retries forever).
async fn run<K: Watched>(
    events: BoxStream<'static, Result<Event<K>, watcher::Error>>,
    shared: Arc<Mutex<Shared>>,
    tx: Arc<watch::Sender<u64>>,
) {
    let mut events = events.ready_chunks(BATCH_LIMIT);
    // The list being read, between `Init` and `InitDone`.
    let mut listing: Option<Vec<K>> = None;
    while let Some(batch) = events.next().await {
        let mut applied = false;
        let mut guard = None;
        for event in batch {
            match event {
                Ok(Event::Init) => listing = Some(Vec::new()),
                Ok(Event::InitApply(mut o)) => {
                    strip(&mut o);
                    listing.get_or_insert_with(Vec::new).push(o);
                }
                Ok(Event::InitDone) => {
                    let list = listing.take().unwrap_or_default();
                    let s = guard.get_or_insert_with(|| lock(&shared));
                    replace_kind(s, list);
                    applied = true;
                }
                Ok(Event::Apply(mut o)) => {
                    strip(&mut o);
                    let s = guard.get_or_insert_with(|| lock(&shared));
                    if K::KIND == Kind::EndpointSlice {
                        if let Some(t) = last_change_trigger_time(o.meta()) {
                            s.pending.endpoint_slice_triggers.push(t);
                        }
                    }
                    if let Err(e) = s.objects.insert(o.into_object()) {
                        log::warn!("{}: skipped: {e}", K::KIND);
                    }
                    applied = true;
                }
                Ok(Event::Delete(o)) => {
                    let (ns, name) = key(K::KIND, o.meta());
                    let s = guard.get_or_insert_with(|| lock(&shared));
                    s.objects.delete(K::KIND.name(), &ns, &name);
                    applied = true;
                }
                Err(e) => log::warn!("{}", describe(K::KIND, &e)),
            }
        }
        if let Some(mut s) = guard.filter(|_| applied) {
            s.pending.batches += 1;
            s.pending.kinds.insert(K::KIND);
            drop(s);
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Replaces every stored object of `K`'s kind by `list`, which is complete.
fn replace_kind<K: Watched>(s: &mut Shared, list: Vec<K>) {
    let kind = K::KIND;
    let fresh: HashSet<(String, String)> = list.iter().map(|o| key(kind, o.meta())).collect();
    let mut gone = 0;
    for (ns, name) in stored_keys(&s.objects, kind) {
        if !fresh.contains(&(ns.clone(), name.clone())) {
            s.objects.delete(kind.name(), &ns, &name);
            gone += 1;
        }
    }
    let count = list.len();
    for o in list {
        if let Err(e) = s.objects.insert(o.into_object()) {
            log::warn!("{kind}: skipped: {e}");
        }
    }
    let first = s.listed_once.insert(kind);
    s.pending.listed.insert(kind);
    if first {
        log::info!("{kind}: listed {count}");
    } else {
        log::info!("{kind}: relisted {count}, {gone} no longer there");
    }
}

/// A watcher error as a log line that says what to do about it.
fn describe(kind: Kind, e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    let hint = match status {
        Some(410) => "the resourceVersion expired; listing again".to_string(),
        Some(401) => "the API server does not accept kxdp-control's credentials".to_string(),
        Some(403) => format!(
            "grant kxdp-control's service account list and watch on {} ({})",
            plural(kind),
            kind.api_version()
        ),
        _ => "retrying with backoff".to_string(),
    };
    format!("{kind} watch: {e}; {hint}")
}

fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Node => "nodes",
        Kind::Namespace => "namespaces",
        Kind::Pod => "pods",
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
        Kind::NetworkPolicy => "networkpolicies",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn trigger_time_is_parsed_as_rfc3339() {
        let md = ObjectMeta {
            annotations: Some(BTreeMap::from([(
                LAST_CHANGE_TRIGGER_TIME.to_string(),
                "2024-05-01T10:00:00.5Z".to_string(),
            )])),
            ..ObjectMeta::default()
        };
        let t = last_change_trigger_time(&md).expect("valid");
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).expect("after"),
            Duration::from_millis(1_714_557_600_500)
        );
        let bad = ObjectMeta {
            annotations: Some(BTreeMap::from([(
                LAST_CHANGE_TRIGGER_TIME.to_string(),
                "yesterday".to_string(),
            )])),
            ..ObjectMeta::default()
        };
        assert_eq!(last_change_trigger_time(&bad), None);
    }

    #[test]
    fn strip_keeps_what_the_tables_read() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x", "labels": {"app": "web"},
                "annotations": {LAST_APPLIED: "{}", "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"nodeName": "node-a", "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [{"name": "main", "image": "i", "env": [{"name": "A", "value": "1"}],
                    "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}],
                "containerStatuses": [{"name": "main", "image": "i", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .expect("pod");
        strip(&mut pod);
        let md = &pod.metadata;
        assert!(md.managed_fields.is_none());
        let annotations = md.annotations.as_ref().expect("kept");
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["keep"]);
        let spec = pod.spec.as_ref().expect("spec");
        assert!(spec.volumes.is_none());
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        let c = &spec.containers[0];
        assert_eq!(c.name, "main");
        assert!(c.env.is_none() && c.image.is_none());
        assert_eq!(c.ports.as_ref().map(Vec::len), Some(1));
        let status = pod.status.as_ref().expect("status");
        assert!(status.container_statuses.is_none());
        assert_eq!(status.pod_ips.as_ref().map(Vec::len), Some(1));
    }

    #[tokio::test]
    async fn master_overrides_the_kubeconfig_server() {
        let dir = std::env::temp_dir().join(format!("kxdp-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster: {server: 'https://10.0.0.1:6443'}\nusers:\n- name: u\n  user: {token: secret}\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\n",
        )
        .expect("write");
        let from_file = Connection {
            kubeconfig: Some(path.clone()),
            master: None,
        };
        let config = from_file.config().await.expect("kubeconfig");
        assert_eq!(config.cluster_url.to_string(), "https://10.0.0.1:6443/");
        let overridden = Connection {
            master: Some("https://127.0.0.1:9443".into()),
            ..from_file
        };
        let config = overridden.config().await.expect("kubeconfig");
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:9443/");
        std::fs::remove_dir_all(&dir).expect("clean up");

        let bad = Connection {
            kubeconfig: None,
            master: Some("not a url".into()),
        };
        let e = bad.config().await.expect_err("bad URL");
        assert!(
            e.to_string().starts_with("--master not a url: not a URL"),
            "{e}"
        );
        let missing = Connection {
            kubeconfig: Some(dir.join("absent")),
            master: None,
        };
        assert!(matches!(
            missing.config().await,
            Err(SourceError::Kubeconfig { .. })
        ));
    }
}
