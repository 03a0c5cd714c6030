//! A simulated node for the case runner: the dataplane under test on an in-memory device,
//! surrounded by simulated pods (one port each), other nodes behind the VXLAN overlay, and
//! hosts outside the cluster behind the uplink.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dataplane::counters::DropReason;
use dataplane::pipeline::SECOND;
use dataplane::ports::{PortConfig, PortRole};
use dataplane::state::{Limits, Shared};
use dataplane::worker::Worker;
use etherparse::PacketBuilder;
use nat::packet::{self, Headers};
use nat::spec::ClusterSpec;
use pktio::{Device, MemDevice};
use serde::Deserialize;
use serde_yaml::Value;

/// One case file.
#[derive(Deserialize)]
pub struct Case {
    /// Case name.
    #[allow(dead_code)]
    pub name: String,
    /// The node under test.
    pub node: String,
    /// Dataplane settings.
    #[serde(default)]
    pub config: Config,
    /// Objects present from the start.
    #[serde(default)]
    pub objects: Vec<Value>,
    /// Steps, in order.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// A case's `config`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(rename = "clusterCIDRs")]
    cluster_cidrs: Option<Vec<String>>,
    #[serde(rename = "serviceCIDRs")]
    service_cidrs: Option<Vec<String>>,
    masquerade_all: Option<bool>,
    ip_masq: Option<bool>,
}

/// One step of a case.
#[derive(Deserialize)]
pub struct Step {
    #[serde(default)]
    apply: Vec<Value>,
    #[serde(default)]
    delete: Vec<ObjRef>,
    advance: Option<String>,
    #[serde(default)]
    probes: Vec<Probe>,
}

#[derive(Deserialize)]
struct ObjRef {
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

#[derive(Deserialize)]
struct Probe {
    from: Origin,
    to: Target,
    flow: Option<String>,
    count: Option<u32>,
    expect: Expect,
}

#[derive(Deserialize, Clone, Debug)]
struct Origin {
    pod: Option<String>,
    ip: Option<IpAddr>,
    node: Option<String>,
}

#[derive(Deserialize, Clone, Copy, Debug)]
struct Target {
    ip: IpAddr,
    port: u16,
    protocol: Proto,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => packet::PROTO_TCP,
            Proto::Udp => packet::PROTO_UDP,
            Proto::Sctp => packet::PROTO_SCTP,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Expect {
    Word(String),
    Deliver(DeliverSpec),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeliverSpec {
    deliver: Vec<String>,
    masquerade: Option<bool>,
    #[serde(default)]
    spread: bool,
    #[serde(default)]
    same: bool,
    same_as: Option<String>,
}

/// MAC of the uplink port.
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of the router in front of the uplink (where outside hosts' frames come from).
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xff, 0x01];
/// The router's address: the node's default gateway on the uplink.
const ROUTER_IP: [u8; 4] = [192, 168, 0, 1];
/// The overlay's VXLAN port (flannel's default; cases use it).
const VXLAN_PORT: u16 = 8472;

fn port_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 1, (i >> 8) as u8, i as u8]
}
fn node_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 2, (i >> 8) as u8, i as u8]
}
/// MAC of the dataplane's host port.
const HOST_PORT_MAC: [u8; 6] = [0x02, 0, 0, 3, 0, 1];
/// MAC of the node kernel's end of the host veth pair.
const HOST_KERNEL_MAC: [u8; 6] = [0x02, 0, 0, 3, 0, 2];

fn pod_mac(i: usize) -> [u8; 6] {
    [0x0a, 0x58, 0, 1, (i >> 8) as u8, i as u8]
}

/// Where a simulated host sits relative to the node under test.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Place {
    /// A pod on this node, on its own port.
    LocalPod(usize),
    /// A pod on another node, behind the overlay.
    RemotePod(String),
    /// A host outside the cluster, behind the uplink.
    Outside,
    /// The node's own kernel (host-network processes), behind the host port.
    Host,
}

/// A simulated host's view of a pod.
#[derive(Clone, Debug)]
struct PodInfo {
    ips: Vec<IpAddr>,
    node: String,
    host_network: bool,
}

#[derive(Clone, Debug, Default)]
struct NodeInfo {
    addresses: Vec<IpAddr>,
    vtep_ip: Option<IpAddr>,
    vtep_mac: [u8; 6],
}

/// What a connection attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Reached `dest` (address and port after translation), the destination seeing `seen_src`
    /// as the source; the reply came back un-translated.
    Delivered { dest: SocketAddr, seen_src: IpAddr },
    /// The client was told (ICMP unreachable or RST).
    Rejected,
    /// Nothing reached anyone and nothing came back.
    Dropped,
}

/// A frame the dataplane sent, and where.
struct Arrival {
    place: Place,
    frame: Vec<u8>,
    h: Headers,
}

/// The simulated node and its surroundings.
pub struct World {
    node: String,
    cluster: ClusterSpec,
    objects: control::Objects,
    raw: BTreeMap<(String, String, String), Value>,
    shared: Arc<Shared>,
    worker: Worker<MemDevice>,
    now: u64,
    generation: u64,
    /// Control's incremental computation, as `kxdp-control` runs it.
    computer: control::tables::TableComputer,
    /// The last tables sent: after the first snapshot, each sync sends the delta from
    /// them, as the control stream does.
    sent: Option<nat::spec::TableSpec>,
    local_ports: BTreeMap<String, usize>,
    /// The host port: the node's kernel.
    host_port: usize,
    flows: HashMap<String, (Origin, IpAddr, u16, Outcome)>,
    next_sport: u16,
    /// Drop counters when the last connection was dropped, for error messages.
    last_drops: Vec<(&'static str, u64)>,
}

fn key_of(v: &Value) -> Option<(String, String, String)> {
    let kind = v.get("kind")?.as_str()?.to_string();
    let md = v.get("metadata")?;
    let name = md.get("name")?.as_str()?.to_string();
    let ns = match kind.as_str() {
        "Node" | "Namespace" => String::new(),
        _ => md
            .get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string(),
    };
    Some((kind, ns, name))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

impl World {
    /// Builds the node: one port per pod of this node that appears anywhere in the case.
    pub fn new(case: &Case) -> Result<World, String> {
        let mut cluster = ClusterSpec::default();
        if let Some(c) = &case.config.cluster_cidrs {
            cluster.cluster_cidrs = c
                .iter()
                .map(|s| s.parse().map_err(|e| format!("clusterCIDRs {s}: {e}")))
                .collect::<Result<_, _>>()?;
        }
        if let Some(c) = &case.config.service_cidrs {
            cluster.service_cidrs = c
                .iter()
                .map(|s| s.parse().map_err(|e| format!("serviceCIDRs {s}: {e}")))
                .collect::<Result<_, _>>()?;
        }
        if let Some(m) = case.config.masquerade_all {
            cluster.masquerade_all = m;
        }
        if let Some(m) = case.config.ip_masq {
            cluster.ip_masq = m;
        }
        let mut local_ports = BTreeMap::new();
        let all = case
            .objects
            .iter()
            .chain(case.steps.iter().flat_map(|s| s.apply.iter()));
        for v in all {
            if str_at(v, &["kind"]) == Some("Pod")
                && str_at(v, &["spec", "nodeName"]) == Some(case.node.as_str())
                && v.get("spec")
                    .and_then(|s| s.get("hostNetwork"))
                    .and_then(|h| h.as_bool())
                    != Some(true)
            {
                if let Some((_, ns, name)) = key_of(v) {
                    let n = local_ports.len() + 1;
                    local_ports.entry(format!("{ns}/{name}")).or_insert(n);
                }
            }
        }
        let mut ports = vec![PortConfig {
            name: "uplink".into(),
            role: PortRole::Uplink,
            mac: UPLINK_MAC,
            mtu: 1500,
        }];
        for (name, i) in &local_ports {
            ports.push(PortConfig {
                name: name.clone(),
                role: PortRole::Pod,
                mac: port_mac(*i),
                mtu: 1450,
            });
        }
        let host_port = ports.len();
        ports.push(PortConfig {
            name: "host".into(),
            role: PortRole::Host,
            mac: HOST_PORT_MAC,
            mtu: 1500,
        });
        let nports = ports.len();
        let limits = Limits {
            ring_size: 1021,
            conntrack_capacity: 1 << 16,
            affinity_capacity: 1 << 12,
            ring_scaled: false,
            ..Limits::default()
        };
        let shared = Arc::new(Shared::new(ports, 1, limits));
        // The node's default route, as kxdp-dataplane reads it from the kernel.
        shared
            .uplink_routes
            .store(Arc::new(dataplane::routes::UplinkRoutes::new(vec![(
                "0.0.0.0/0".parse().expect("literal"),
                Some(ROUTER_IP.into()),
            )])));
        let worker = Worker::new(0, MemDevice::new(nports, 512), shared.clone());
        let mut w = World {
            node: case.node.clone(),
            computer: control::tables::TableComputer::new(&case.node, cluster.clone()),
            sent: None,
            cluster,
            objects: control::Objects::default(),
            raw: BTreeMap::new(),
            shared,
            worker,
            now: 1000 * SECOND,
            generation: 0,
            local_ports,
            host_port,
            flows: HashMap::new(),
            next_sport: 40000,
            last_drops: Vec::new(),
        };
        for v in &case.objects {
            w.apply(v)?;
        }
        w.sync()?;
        Ok(w)
    }

    fn apply(&mut self, v: &Value) -> Result<(), String> {
        let key = key_of(v).ok_or("object without kind or metadata.name")?;
        control::apply_value(&mut self.objects, v, "case")
            .map_err(|e| format!("apply {key:?}: {e}"))?;
        self.raw.insert(key, v.clone());
        Ok(())
    }

    fn delete(&mut self, r: &ObjRef) {
        let ns = match r.kind.as_str() {
            "Node" | "Namespace" => String::new(),
            _ => r.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        self.objects.delete(&r.kind, &ns, &r.name);
        self.raw.remove(&(r.kind.clone(), ns, r.name.clone()));
    }

    /// Brings the dataplane to the objects as control would: computed incrementally
    /// (checked against the computation from scratch), the first time sent whole, then as
    /// deltas from the last tables sent.
    fn sync(&mut self) -> Result<(), String> {
        let spec = control::compute_with_warnings(&self.objects, &self.node, &self.cluster)
            .map(|c| c.tables)
            .map_err(|e| format!("compute tables: {e}"))?;
        let incremental = self
            .computer
            .compute(&self.objects)
            .map_err(|e| format!("compute tables: {e}"))?
            .tables;
        if incremental != spec {
            return Err(format!(
                "control's incremental computation differs from the computation from scratch by {:?}",
                nat::spec::TableDelta::between(&spec, &incremental),
            ));
        }
        self.generation += 1;
        match self.sent.take() {
            None => self.shared.install(self.generation, spec.clone(), self.now),
            Some(prev) => {
                let delta = nat::spec::TableDelta::between(&prev, &spec);
                match self
                    .shared
                    .install_delta(self.generation, self.generation - 1, &delta)
                {
                    Ok(dataplane::state::DeltaOutcome::Applied { retire }) => {
                        if retire {
                            self.shared.retire_stale_flows(self.now);
                        }
                    }
                    other => return Err(format!("delta refused: {other:?}")),
                }
                let applied = self.shared.tables.load();
                if applied.spec != spec {
                    return Err("the dataplane's table after a delta is not control's".into());
                }
            }
        }
        self.sent = Some(spec);
        // Let the dataplane resolve its pods before traffic, as it does after a table change.
        self.pump();
        Ok(())
    }

    fn pods(&self) -> BTreeMap<String, PodInfo> {
        let mut out = BTreeMap::new();
        for ((kind, ns, name), v) in &self.raw {
            if kind != "Pod" {
                continue;
            }
            let mut ips: Vec<IpAddr> = Vec::new();
            if let Some(list) = v
                .get("status")
                .and_then(|s| s.get("podIPs"))
                .and_then(|l| l.as_sequence())
            {
                ips.extend(
                    list.iter()
                        .filter_map(|e| str_at(e, &["ip"])?.parse::<IpAddr>().ok()),
                );
            }
            if ips.is_empty() {
                if let Some(ip) = str_at(v, &["status", "podIP"]).and_then(|s| s.parse().ok()) {
                    ips.push(ip);
                }
            }
            out.insert(
                format!("{ns}/{name}"),
                PodInfo {
                    ips,
                    node: str_at(v, &["spec", "nodeName"])
                        .unwrap_or_default()
                        .to_string(),
                    host_network: v
                        .get("spec")
                        .and_then(|s| s.get("hostNetwork"))
                        .and_then(|h| h.as_bool())
                        == Some(true),
                },
            );
        }
        out
    }

    fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        let mut out = BTreeMap::new();
        for ((kind, _, name), v) in &self.raw {
            if kind != "Node" {
                continue;
            }
            let mut info = NodeInfo::default();
            if let Some(list) = v
                .get("status")
                .and_then(|s| s.get("addresses"))
                .and_then(|l| l.as_sequence())
            {
                for a in list {
                    if matches!(
                        str_at(a, &["type"]),
                        Some("InternalIP") | Some("ExternalIP")
                    ) {
                        if let Some(ip) = str_at(a, &["address"]).and_then(|s| s.parse().ok()) {
                            info.addresses.push(ip);
                        }
                    }
                }
            }
            let ann = v.get("metadata").and_then(|m| m.get("annotations"));
            info.vtep_ip = ann
                .and_then(|a| a.get("flannel.alpha.coreos.com/public-ip"))
                .and_then(|s| s.as_str())
                .and_then(|s| s.parse().ok())
                .or_else(|| info.addresses.iter().copied().find(|a| a.is_ipv4()));
            if let Some(data) = ann
                .and_then(|a| a.get("flannel.alpha.coreos.com/backend-data"))
                .and_then(|s| s.as_str())
            {
                if let Ok(j) = serde_json::from_str::<serde_json::Value>(data) {
                    if let Some(mac) = j.get("VtepMAC").and_then(|m| m.as_str()) {
                        let bytes: Vec<u8> = mac
                            .split(':')
                            .filter_map(|b| u8::from_str_radix(b, 16).ok())
                            .collect();
                        if bytes.len() == 6 {
                            info.vtep_mac.copy_from_slice(&bytes);
                        }
                    }
                }
            }
            out.insert(name.clone(), info);
        }
        out
    }

    /// Runs every step of the case.
    pub fn run(&mut self, case: &Case) -> Result<(), String> {
        for (si, step) in case.steps.iter().enumerate() {
            for v in &step.apply {
                self.apply(v).map_err(|e| format!("step {si}: {e}"))?;
            }
            for r in &step.delete {
                self.delete(r);
            }
            if let Some(adv) = &step.advance {
                self.now += parse_duration(adv).ok_or(format!("step {si}: bad advance `{adv}`"))?;
            }
            if !step.apply.is_empty() || !step.delete.is_empty() {
                self.sync().map_err(|e| format!("step {si}: {e}"))?;
            }
            for (pi, probe) in step.probes.iter().enumerate() {
                self.probe(probe).map_err(|e| {
                    format!(
                        "step {si} probe {pi} ({:?} -> {}:{} {:?}): {e}",
                        probe.from, probe.to.ip, probe.to.port, probe.to.protocol
                    )
                })?;
            }
        }
        Ok(())
    }

    fn probe(&mut self, p: &Probe) -> Result<(), String> {
        let count = p.count.unwrap_or(1).max(1);
        let mut outcomes = Vec::new();
        for _ in 0..count {
            let outcome = match p.flow.as_ref().and_then(|f| self.flows.get(f)).cloned() {
                Some((origin, src, sport, _)) => self.connect(&origin, src, sport, p.to, false)?,
                None => {
                    let src = self.source_ip(&p.from, p.to.ip)?;
                    self.next_sport = self.next_sport.wrapping_add(1).max(1024);
                    let sport = self.next_sport;
                    let o = self.connect(&p.from, src, sport, p.to, true)?;
                    if let Some(f) = &p.flow {
                        self.flows
                            .insert(f.clone(), (p.from.clone(), src, sport, o.clone()));
                    }
                    o
                }
            };
            outcomes.push(outcome);
        }
        self.check(p, &outcomes)
    }

    fn check(&self, p: &Probe, outcomes: &[Outcome]) -> Result<(), String> {
        match &p.expect {
            Expect::Word(w) if w == "reject" => {
                for o in outcomes {
                    if *o != Outcome::Rejected {
                        return Err(format!("expected reject, got {o:?}"));
                    }
                }
                Ok(())
            }
            Expect::Word(w) if w == "drop" => {
                for o in outcomes {
                    if *o != Outcome::Dropped {
                        return Err(format!("expected drop, got {o:?}"));
                    }
                }
                Ok(())
            }
            Expect::Word(w) => Err(format!("unknown expectation `{w}`")),
            Expect::Deliver(d) => {
                let allowed: Vec<SocketAddr> = d
                    .deliver
                    .iter()
                    .map(|s| s.parse().map_err(|e| format!("deliver `{s}`: {e}")))
                    .collect::<Result<_, _>>()?;
                let client_ip = self.source_ip(&p.from, p.to.ip)?;
                let masq_sources = self.masquerade_sources();
                let mut reached = Vec::new();
                for o in outcomes {
                    let Outcome::Delivered { dest, seen_src } = o else {
                        return Err(format!("expected delivery to {allowed:?}, got {o:?} (dataplane drops so far: {:?})", self.last_drops));
                    };
                    if !allowed.contains(dest) {
                        return Err(format!("delivered to {dest}, not one of {allowed:?}"));
                    }
                    match d.masquerade {
                        Some(true) if !masq_sources.contains(seen_src) => {
                            return Err(format!(
                                "expected masquerade, destination saw source {seen_src}"
                            ));
                        }
                        Some(false) if *seen_src != client_ip => {
                            return Err(format!("expected the client's own source {client_ip}, destination saw {seen_src}"));
                        }
                        _ => {}
                    }
                    reached.push(*dest);
                }
                if d.spread {
                    for a in &allowed {
                        if !reached.contains(a) {
                            return Err(format!(
                                "spread: {a} never chosen in {} connections ({reached:?})",
                                reached.len()
                            ));
                        }
                    }
                }
                if d.same && reached.windows(2).any(|w| w[0] != w[1]) {
                    return Err(format!(
                        "same: connections reached different endpoints {reached:?}"
                    ));
                }
                if let Some(f) = &d.same_as {
                    let Some((_, _, _, Outcome::Delivered { dest, .. })) = self.flows.get(f) else {
                        return Err(format!("sameAs: flow `{f}` was not delivered"));
                    };
                    if let Some(other) = reached.iter().find(|r| *r != dest) {
                        return Err(format!(
                            "sameAs {f}: reached {other}, flow {f} reached {dest}"
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    fn masquerade_sources(&self) -> Vec<IpAddr> {
        let tables = self.shared.tables.load();
        let mut out = tables.node_addresses.clone();
        out.extend(tables.gateway_v4.map(IpAddr::V4));
        out.extend(tables.gateway_v6.map(IpAddr::V6));
        for net in &tables.pod_cidrs {
            out.push(net.network());
        }
        out
    }

    fn source_ip(&self, from: &Origin, dst: IpAddr) -> Result<IpAddr, String> {
        if let Some(ip) = from.ip {
            return Ok(ip);
        }
        if let Some(pod) = &from.pod {
            let pods = self.pods();
            let info = pods.get(pod).ok_or(format!("no pod {pod}"))?;
            return info
                .ips
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == dst.is_ipv6())
                .ok_or(format!("pod {pod} has no address of {dst}'s family"));
        }
        if let Some(node) = &from.node {
            let nodes = self.nodes();
            let info = nodes.get(node).ok_or(format!("no node {node}"))?;
            return info
                .addresses
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == dst.is_ipv6())
                .ok_or(format!("node {node} has no address of {dst}'s family"));
        }
        Err("probe `from` names no pod, ip or node".into())
    }

    fn place_of_origin(&self, from: &Origin) -> Result<Place, String> {
        if from.ip.is_some() {
            return Ok(Place::Outside);
        }
        if let Some(pod) = &from.pod {
            let pods = self.pods();
            let info = pods.get(pod).ok_or(format!("no pod {pod}"))?;
            if info.host_network {
                // A host-network pod is a process of its node: this node's are behind the
                // host port, another node's reach this one through the uplink.
                return Ok(if info.node == self.node {
                    Place::Host
                } else {
                    Place::Outside
                });
            }
            if info.node == self.node {
                return self
                    .local_ports
                    .get(pod)
                    .map(|p| Place::LocalPod(*p))
                    .ok_or(format!("pod {pod} has no port"));
            }
            return Ok(Place::RemotePod(info.node.clone()));
        }
        if let Some(node) = &from.node {
            // This node's own processes are behind the host port; another node's reach
            // this one over the network, through the uplink.
            return Ok(if *node == self.node {
                Place::Host
            } else {
                Place::Outside
            });
        }
        Err("probe `from` names no pod, ip or node".into())
    }

    /// Where a packet to `ip` would be delivered by the world, if it is a pod.
    fn place_of_address(&self, ip: IpAddr) -> Place {
        for (name, info) in self.pods() {
            if info.ips.contains(&ip) && !info.host_network {
                if info.node == self.node {
                    if let Some(p) = self.local_ports.get(&name) {
                        return Place::LocalPod(*p);
                    }
                }
                return Place::RemotePod(info.node);
            }
        }
        let me = self
            .nodes()
            .get(&self.node)
            .map(|n| n.addresses.contains(&ip));
        if me == Some(true) {
            return Place::Host;
        }
        Place::Outside
    }

    /// Injects a frame (Ethernet, addressed to the dataplane) as sent from `place`.
    fn inject(&mut self, place: &Place, mut frame: Vec<u8>) -> Result<(), String> {
        match place {
            Place::LocalPod(port) => {
                frame[0..6].copy_from_slice(&port_mac(*port));
                frame[6..12].copy_from_slice(&pod_mac(*port));
                self.worker.dev.inject(*port, &frame);
            }
            Place::Outside => {
                frame[0..6].copy_from_slice(&UPLINK_MAC);
                frame[6..12].copy_from_slice(&ROUTER_MAC);
                self.worker.dev.inject(0, &frame);
            }
            Place::Host => {
                frame[0..6].copy_from_slice(&HOST_PORT_MAC);
                frame[6..12].copy_from_slice(&HOST_KERNEL_MAC);
                self.worker.dev.inject(self.host_port, &frame);
            }
            Place::RemotePod(node) => {
                let nodes = self.nodes();
                let from = nodes.get(node).ok_or(format!("no node {node}"))?;
                let me = nodes
                    .get(&self.node)
                    .ok_or("node under test has no Node object")?;
                let (Some(IpAddr::V4(src)), Some(IpAddr::V4(dst))) = (from.vtep_ip, me.vtep_ip)
                else {
                    return Err("VXLAN needs IPv4 VTEP addresses".into());
                };
                frame[0..6].copy_from_slice(&me.vtep_mac);
                frame[6..12].copy_from_slice(&from.vtep_mac);
                let mut payload = vec![0x08, 0, 0, 0, 0, 0, self.cluster.vxlan_vni as u8, 0];
                payload[4] = (self.cluster.vxlan_vni >> 16) as u8;
                payload[5] = (self.cluster.vxlan_vni >> 8) as u8;
                payload[6] = self.cluster.vxlan_vni as u8;
                payload.extend_from_slice(&frame);
                let mut outer = Vec::new();
                PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
                    .ipv4(src.octets(), dst.octets(), 64)
                    .udp(49152, VXLAN_PORT)
                    .write(&mut outer, &payload)
                    .map_err(|e| e.to_string())?;
                self.worker.dev.inject(0, &outer);
            }
        }
        Ok(())
    }

    /// Runs the worker until nothing is in flight; answers ARP as the pods; returns every
    /// IP frame the dataplane sent.
    fn pump(&mut self) -> Vec<Arrival> {
        let mut arrivals = Vec::new();
        let pods = self.pods();
        let port_ips: HashMap<usize, Vec<IpAddr>> = self
            .local_ports
            .iter()
            .map(|(name, p)| {
                (
                    *p,
                    pods.get(name).map(|i| i.ips.clone()).unwrap_or_default(),
                )
            })
            .collect();
        // Bounded: each round the world answers at most one ARP per pod.
        for _ in 0..16 {
            self.worker.poll(self.now);
            let mut any = false;
            for port in 0..self.worker.dev.port_count() {
                for frame in self.worker.dev.take_sent(port) {
                    any = true;
                    if packet::ethertype(&frame) == Some(packet::ETH_ARP) {
                        if port == 0 {
                            // The router and the other nodes answer for their addresses on
                            // the uplink.
                            if let Some(reply) =
                                arp_answer(&frame, &[IpAddr::from(ROUTER_IP)], ROUTER_MAC)
                            {
                                self.worker.dev.inject(0, &reply);
                            }
                            let nodes = self.nodes();
                            for (i, n) in nodes.values().enumerate() {
                                if let Some(reply) = arp_answer(&frame, &n.addresses, node_mac(i)) {
                                    self.worker.dev.inject(0, &reply);
                                }
                            }
                        } else if port == self.host_port {
                            // The node's kernel answers for the node's addresses.
                            let mine = self
                                .nodes()
                                .get(&self.node)
                                .map(|n| n.addresses.clone())
                                .unwrap_or_default();
                            if let Some(reply) = arp_answer(&frame, &mine, HOST_KERNEL_MAC) {
                                self.worker.dev.inject(port, &reply);
                            }
                        } else {
                            if let Some(reply) = arp_answer(
                                &frame,
                                port_ips.get(&port).map(|v| v.as_slice()).unwrap_or(&[]),
                                pod_mac(port),
                            ) {
                                self.worker.dev.inject(port, &reply);
                            }
                        }
                        continue;
                    }
                    let Ok(h) = packet::parse(&frame) else {
                        continue;
                    };
                    if h.proto == packet::PROTO_ICMPV6 && h.icmp_type == 135 {
                        if port != 0 {
                            if let Some(reply) = na_answer(
                                &frame,
                                &h,
                                port_ips.get(&port).map(|v| v.as_slice()).unwrap_or(&[]),
                                pod_mac(port),
                            ) {
                                self.worker.dev.inject(port, &reply);
                            }
                        }
                        continue;
                    }
                    if port == 0 && h.proto == packet::PROTO_UDP && h.dport == VXLAN_PORT {
                        let inner_start = h.l4 + 8 + 8;
                        if let Some(inner) = frame.get(inner_start..h.end) {
                            if let Ok(ih) = packet::parse(inner) {
                                let node = self.node_of_vtep(h.dst).unwrap_or_default();
                                arrivals.push(Arrival {
                                    place: Place::RemotePod(node),
                                    frame: inner.to_vec(),
                                    h: ih,
                                });
                            }
                        }
                        continue;
                    }
                    let place = if port == 0 {
                        Place::Outside
                    } else if port == self.host_port {
                        Place::Host
                    } else {
                        Place::LocalPod(port)
                    };
                    arrivals.push(Arrival { place, frame, h });
                }
            }
            if !any {
                break;
            }
        }
        arrivals
    }

    fn node_of_vtep(&self, ip: IpAddr) -> Option<String> {
        self.nodes()
            .into_iter()
            .find(|(_, n)| n.vtep_ip == Some(ip))
            .map(|(k, _)| k)
    }

    /// One connection attempt (or one more packet of an existing one), and its reply.
    fn connect(
        &mut self,
        from: &Origin,
        src: IpAddr,
        sport: u16,
        to: Target,
        first: bool,
    ) -> Result<Outcome, String> {
        let place = self.place_of_origin(from)?;
        let frame = build(src, sport, to.ip, to.port, to.protocol, first, false)?;
        let mut arrivals = Vec::new();
        // Like a client retransmitting: a packet dropped while the dataplane resolved a
        // neighbour is sent again, at most three times.
        for _ in 0..3 {
            let unresolved_before = self.unresolved();
            self.inject(&place, frame.clone())?;
            arrivals = self.pump();
            if !arrivals.is_empty() || self.unresolved() == unresolved_before {
                break;
            }
            self.now += SECOND;
        }
        // Rejected: an ICMP error or RST back to the client.
        for a in &arrivals {
            if a.place == place && a.h.dst == src && is_reject(&a.frame, &a.h, to.protocol) {
                return Ok(Outcome::Rejected);
            }
        }
        let delivered: Vec<&Arrival> = arrivals
            .iter()
            .filter(|a| a.h.proto == to.protocol.number())
            .collect();
        let Some(a) = delivered.first() else {
            self.last_drops = self.drops();
            return Ok(Outcome::Dropped);
        };
        if delivered.len() > 1 {
            return Err(format!("one packet arrived {} times", delivered.len()));
        }
        // The world delivers by address: the packet must be at the place that address lives.
        let expected_place = self.place_of_address(a.h.dst);
        if a.place != expected_place {
            return Err(format!(
                "packet for {} came out at {:?}, but that address lives at {:?}",
                a.h.dst, a.place, expected_place
            ));
        }
        let dest = SocketAddr::new(a.h.dst, a.h.dport);
        let seen_src = a.h.src;
        if a.place == Place::Host
            && place == Place::Outside
            && (a.h.dst, a.h.dport, a.h.src) == (to.ip, to.port, src)
        {
            // Untranslated traffic from outside to the node itself: the node's kernel
            // answers out of its own uplink interface, never through the dataplane (in a
            // real node kxdp's uplink filter passes such traffic to the kernel untouched).
            return Ok(Outcome::Delivered { dest, seen_src });
        }
        // The destination answers.
        let reply = build(
            a.h.dst,
            a.h.dport,
            a.h.src,
            a.h.sport,
            to.protocol,
            false,
            first,
        )?;
        let dest_place = a.place.clone();
        self.inject(&dest_place, reply)?;
        let back = self.pump();
        let ok = back.iter().any(|b| {
            b.place == place
                && b.h.proto == to.protocol.number()
                && b.h.dst == src
                && b.h.dport == sport
                && b.h.src == to.ip
                && b.h.sport == to.port
        });
        if !ok {
            let seen: Vec<String> = back
                .iter()
                .map(|b| {
                    format!(
                        "{:?} {}:{} -> {}:{}",
                        b.place, b.h.src, b.h.sport, b.h.dst, b.h.dport
                    )
                })
                .collect();
            return Err(format!(
                "reached {dest}, but the reply did not come back to {src}:{sport} from {}:{} (saw {seen:?}; drops {:?})",
                to.ip,
                to.port,
                self.drops()
            ));
        }
        Ok(Outcome::Delivered { dest, seen_src })
    }

    fn unresolved(&self) -> u64 {
        self.worker.counters().drops[DropReason::NeighborUnresolved as usize]
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let c = self.worker.counters();
        DropReason::ALL
            .iter()
            .filter(|r| c.drops[**r as usize] > 0)
            .map(|r| (r.label(), c.drops[*r as usize]))
            .collect()
    }
}

fn is_reject(frame: &[u8], h: &Headers, proto: Proto) -> bool {
    match h.proto {
        packet::PROTO_ICMP => h.icmp_type == 3,
        packet::PROTO_ICMPV6 => h.icmp_type == 1,
        packet::PROTO_TCP if proto == Proto::Tcp => {
            frame.get(h.l4 + 13).is_some_and(|f| f & 0x04 != 0)
        }
        _ => false,
    }
}

/// Builds an Ethernet frame (MACs filled in by `inject`). TCP: a SYN when `syn`, a SYN-ACK
/// when `synack`, else an ACK with data.
fn build(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: Proto,
    syn: bool,
    synack: bool,
) -> Result<Vec<u8>, String> {
    let eth = PacketBuilder::ethernet2([0; 6], [0; 6]);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => return Err(format!("{src} and {dst} are of different families")),
    };
    let mut out = Vec::new();
    let payload = b"kxdp-probe";
    match proto {
        Proto::Tcp => {
            let mut t = ip.tcp(sport, dport, 1000, 65535);
            if syn {
                t = t.syn();
            } else if synack {
                t = t.syn().ack(1001);
            } else {
                t = t.ack(1);
            }
            let data: &[u8] = if syn || synack { &[] } else { payload };
            t.write(&mut out, data).map_err(|e| e.to_string())?;
        }
        Proto::Udp => ip
            .udp(sport, dport)
            .write(&mut out, payload)
            .map_err(|e| e.to_string())?,
        Proto::Sctp => {
            // SCTP common header and an INIT-like chunk; CRC32c filled in below.
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&sport.to_be_bytes());
            sctp.extend_from_slice(&dport.to_be_bytes());
            sctp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
            sctp.extend_from_slice(&[1, 0, 0, 20]);
            sctp.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
            nat::packet::sctp_fix_crc(&mut sctp);
            ip.write(&mut out, etherparse::IpNumber(packet::PROTO_SCTP), &sctp)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// A pod's answer to an ARP request for one of its addresses.
fn arp_answer(req: &[u8], ips: &[IpAddr], mac: [u8; 6]) -> Option<Vec<u8>> {
    let a = req.get(14..42)?;
    if a[6..8] != [0, 1] {
        return None;
    }
    let target = IpAddr::from([a[24], a[25], a[26], a[27]]);
    if !ips.contains(&target) {
        return None;
    }
    let mut out = vec![0u8; 42];
    out[0..6].copy_from_slice(&a[8..14]);
    out[6..12].copy_from_slice(&mac);
    out[12..14].copy_from_slice(&packet::ETH_ARP.to_be_bytes());
    out[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    out[20..22].copy_from_slice(&[0, 2]);
    out[22..28].copy_from_slice(&mac);
    out[28..32].copy_from_slice(&a[24..28]);
    out[32..38].copy_from_slice(&a[8..14]);
    out[38..42].copy_from_slice(&a[14..18]);
    Some(out)
}

/// A pod's neighbour advertisement answering a solicitation for one of its addresses.
fn na_answer(req: &[u8], h: &Headers, ips: &[IpAddr], mac: [u8; 6]) -> Option<Vec<u8>> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr,
        NdiscNeighborFlags, NdiscRepr,
    };
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (h.src, h.dst) else {
        return None;
    };
    let icmp = Icmpv6Packet::new_checked(req.get(h.l4..h.end)?).ok()?;
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, .. }) =
        Icmpv6Repr::parse(&src, &dst, &icmp, &ChecksumCapabilities::default()).ok()?
    else {
        return None;
    };
    if !ips.contains(&IpAddr::V6(target_addr)) {
        return None;
    }
    let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
        target_addr,
        lladdr: Some(EthernetAddress(mac).into()),
    });
    let ip = Ipv6Repr {
        src_addr: target_addr,
        dst_addr: src,
        next_header: IpProtocol::Icmpv6,
        payload_len: na.buffer_len(),
        hop_limit: 255,
    };
    let mut out = vec![0u8; 14 + ip.buffer_len() + na.buffer_len()];
    out[0..6].copy_from_slice(&req[6..12]);
    out[6..12].copy_from_slice(&mac);
    out[12..14].copy_from_slice(&packet::ETH_IPV6.to_be_bytes());
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[14..]));
    na.emit(
        &target_addr,
        &src,
        &mut Icmpv6Packet::new_unchecked(&mut out[14 + 40..]),
        &ChecksumCapabilities::default(),
    );
    Some(out)
}

/// `590s`, `10m`, `3h`, `1h30m`, `250ms` → nanoseconds.
fn parse_duration(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600 * SECOND,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                SECOND / 1000
            }
            'm' => 60 * SECOND,
            's' => SECOND,
            _ => return None,
        };
        total += n * unit;
    }
    if !num.is_empty() {
        return None;
    }
    Some(total)
}

impl World {
    /// One new connection from the pod `from` (`namespace/name`) to `ip`:`port` over
    /// `protocol` (`TCP`, `UDP` or `SCTP`), for tests that compute their own expectations
    /// rather than writing a case: `Some(dest)` when it reached `dest` (after translation)
    /// and the reply came back, `None` when nothing reached anyone (dropped), `Err` when the
    /// client was rejected or the world saw something wrong.
    #[allow(dead_code)] // used by tests/netpol_matrix.rs, not by the case runner
    pub fn connect_from_pod(
        &mut self,
        from: &str,
        ip: IpAddr,
        port: u16,
        protocol: &str,
    ) -> Result<Option<SocketAddr>, String> {
        let protocol = match protocol {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            "SCTP" => Proto::Sctp,
            other => return Err(format!("unknown protocol `{other}`")),
        };
        let origin = Origin {
            pod: Some(from.to_string()),
            ip: None,
            node: None,
        };
        let to = Target { ip, port, protocol };
        let src = self.source_ip(&origin, ip)?;
        self.next_sport = self.next_sport.wrapping_add(1).max(1024);
        let sport = self.next_sport;
        match self.connect(&origin, src, sport, to, true)? {
            Outcome::Delivered { dest, .. } => Ok(Some(dest)),
            Outcome::Dropped => Ok(None),
            Outcome::Rejected => Err(format!("{from} -> {ip}:{port} was rejected")),
        }
    }
}
