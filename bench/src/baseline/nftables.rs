//! The `nft -f` transaction kube-proxy's nftables mode runs on its first full sync
//! (pkg/proxy/nftables, `setupNFTables` then `syncProxyRules`), for the IPv4 family.
//!
//! Shape: `table ip kube-proxy` with base chains at the netfilter hooks; a `services`
//! chain that looks the destination up in the `service-ips` verdict map
//! (`ip daddr . meta l4proto . th dport vmap @service-ips`); per Service port a chain
//! `service-<hash>-ns/name/proto/port` that marks off-cluster sources for masquerade and
//! picks an endpoint with `numgen random mod N vmap { 0 : goto endpoint-…, … }`; per endpoint
//! a chain that marks hairpin traffic and does `dnat to ip:port`; `mark-for-masquerade` and
//! `masquerading` for SNAT with the same mark as iptables mode. Chain names carry the first
//! 8 characters of base32(sha256(name)) before the name, as kube-proxy writes them.
//!
//! One deliberate textual difference: kube-proxy (through knftables) names the base chains'
//! priorities (`dstnat-10`, `srcnat`), which nft 1.0.6 (Debian 12) refuses outside the
//! prerouting/postrouting hooks; this writes the same priorities as numbers.

use std::collections::HashSet;
use std::fmt::Write as _;

use nat::spec::TableSpec;

use super::hash::hash_prefix;
use super::{Endpoint, KubeProxyConfig, ServicePort};

/// The table every kube-proxy object lives in.
pub const TABLE: &str = "ip kube-proxy";

const SERVICES: &str = "services";
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NODEPORT_IPS: &str = "nodeport-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const REJECT_CHAIN: &str = "reject-chain";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const FIREWALL_IPS: &str = "firewall-ips";
const FIREWALL_CHECK: &str = "firewall-check";
const MARK_MASQ: &str = "mark-for-masquerade";
const MASQUERADING: &str = "masquerading";

/// Base chains: name, type, hook, priority. kube-proxy names the priorities (`dstnat-10`,
/// `dstnat+10`, `dstnat`, `srcnat`); nft 1.0.6 accepts `dstnat` only at prerouting, so the
/// same values are written as numbers (dstnat is -100, srcnat 100), as `nft list` prints
/// them and as kube-proxy's own test dumps show them.
const BASE_CHAINS: [(&str, &str, &str, &str); 8] = [
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("filter-output-post-dnat", "filter", "output", "-90"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
];

/// Regular chains jumped to from base chains: target, base chain, match.
const JUMPS: [(&str, &str, &str); 11] = [
    (NODEPORT_ENDPOINTS_CHECK, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-forward", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-output", "ct state new"),
    (FIREWALL_CHECK, "filter-prerouting", "ct state new"),
    (FIREWALL_CHECK, "filter-output", "ct state new"),
    (SERVICES, "nat-output", ""),
    (SERVICES, "nat-prerouting", ""),
    (MASQUERADING, "nat-postrouting", ""),
    (CLUSTER_IPS_CHECK, "filter-forward", "ct state new"),
    (CLUSTER_IPS_CHECK, "filter-output-post-dnat", "ct state new"),
];

/// kube-proxy's `hashAndTruncate`: 8 base32 characters of the name's SHA-256, a dash, the
/// name (never long enough here to be truncated).
fn hash_and_name(name: &str) -> String {
    format!("{}-{name}", hash_prefix(name, 8))
}

/// `namespace/name/protocol/portName` with its hash: the base of a Service port's chains.
pub fn service_chain_base(sp: &ServicePort) -> String {
    hash_and_name(&format!(
        "{}/{}/{}/{}",
        sp.namespace, sp.name, sp.protocol, sp.port_name
    ))
}

/// `…__ip/port` with its hash: the base of an endpoint's chain and affinity set.
pub fn endpoint_chain_base(sp: &ServicePort, ep: &Endpoint) -> String {
    hash_and_name(&format!(
        "{}/{}/{}/{}__{}/{}",
        sp.namespace, sp.name, sp.protocol, sp.port_name, ep.ip, ep.port
    ))
}

/// A transaction being written: one nft command per line.
struct Tx {
    out: String,
    /// Chains already added in this transaction (a set: 100k Services make a million).
    created: HashSet<String>,
}

impl Tx {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = self.out.write_fmt(args);
        self.out.push('\n');
    }

    /// `ensureChain`: add and flush a regular chain once per transaction.
    fn ensure_chain(&mut self, name: &str) {
        if !self.created.insert(name.to_string()) {
            return;
        }
        self.line(format_args!("add chain {TABLE} {name}"));
        self.line(format_args!("flush chain {TABLE} {name}"));
    }

    fn rule(&mut self, chain: &str, rule: &str) {
        self.line(format_args!("add rule {TABLE} {chain} {rule}"));
    }

    fn rule_commented(&mut self, chain: &str, rule: &str, comment: &str) {
        self.line(format_args!(
            "add rule {TABLE} {chain} {rule} comment \"{comment}\""
        ));
    }

    fn element(&mut self, set: &str, key: &str, comment: Option<&str>, value: Option<&str>) {
        let mut e = key.to_string();
        if let Some(c) = comment {
            let _ = write!(e, " comment \"{c}\"");
        }
        if let Some(v) = value {
            let _ = write!(e, " : {v}");
        }
        self.line(format_args!("add element {TABLE} {set} {{ {e} }}"));
    }
}

/// The transaction kube-proxy would run for the IPv4 Service ports of `spec`.
pub fn transaction(spec: &TableSpec, cfg: &KubeProxyConfig) -> String {
    transaction_for(&super::service_ports(spec), cfg)
}

/// The transaction kube-proxy would run for `ports`.
pub fn transaction_for(ports: &[ServicePort], cfg: &KubeProxyConfig) -> String {
    let mut tx = Tx {
        out: String::new(),
        created: HashSet::new(),
    };
    setup(&mut tx, cfg);
    let cidr = cfg.cluster_cidr.map(|c| c.to_string());
    for sp in ports {
        service(&mut tx, sp, cfg, cidr.as_deref());
    }
    tx.out
}

/// `setupNFTables` on the first sync: table, base chains (added and deleted once, so stale
/// properties are dropped, then created), jumps, masquerading, sets and maps.
fn setup(tx: &mut Tx, cfg: &KubeProxyConfig) {
    let mark = cfg.masquerade_mark();
    tx.line(format_args!(
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    for (name, _, _, _) in BASE_CHAINS {
        tx.line(format_args!("add chain {TABLE} {name}"));
        tx.line(format_args!("delete chain {TABLE} {name}"));
    }
    for (name, ty, hook, prio) in BASE_CHAINS {
        tx.line(format_args!(
            "add chain {TABLE} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        ));
        tx.line(format_args!("flush chain {TABLE} {name}"));
    }
    for (target, base, extra) in JUMPS {
        tx.ensure_chain(target);
        if extra.is_empty() {
            tx.rule(base, &format!("jump {target}"));
        } else {
            tx.rule(base, &format!("{extra} jump {target}"));
        }
    }
    for chain in [SERVICES, CLUSTER_IPS_CHECK, MASQUERADING, MARK_MASQ] {
        tx.ensure_chain(chain);
    }
    tx.rule(MARK_MASQ, &format!("mark set mark or {mark}"));
    tx.rule(MASQUERADING, &format!("mark and {mark} == 0 return"));
    tx.rule(MASQUERADING, &format!("mark set mark xor {mark}"));
    tx.rule(MASQUERADING, "masquerade fully-random");

    tx.line(format_args!(
        "add set {TABLE} {CLUSTER_IPS} {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    ));
    tx.rule_commented(
        CLUSTER_IPS_CHECK,
        &format!("ip daddr @{CLUSTER_IPS} reject"),
        "Reject traffic to invalid ports of ClusterIPs",
    );
    if !cfg.service_cidrs.is_empty() {
        let cidrs: Vec<String> = cfg.service_cidrs.iter().map(|c| c.to_string()).collect();
        tx.rule_commented(
            CLUSTER_IPS_CHECK,
            &format!("ip daddr {{ {} }} drop", cidrs.join(",")),
            "Drop traffic to unallocated ClusterIPs",
        );
    }

    tx.line(format_args!(
        "add set {TABLE} {NODEPORT_IPS} {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    ));
    let match_all = cfg.nodeports_match_all();
    if match_all {
        tx.line(format_args!("delete set {TABLE} {NODEPORT_IPS}"));
    } else {
        tx.line(format_args!("flush set {TABLE} {NODEPORT_IPS}"));
        for ip in cfg.nodeport_ips() {
            if ip.is_loopback() {
                continue;
            }
            tx.element(NODEPORT_IPS, &ip.to_string(), None, None);
        }
    }

    tx.line(format_args!(
        "add map {TABLE} {NO_ENDPOINT_SERVICES} {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add map {TABLE} {NO_ENDPOINT_NODEPORTS} {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add chain {TABLE} {REJECT_CHAIN} {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    ));
    tx.line(format_args!("flush chain {TABLE} {REJECT_CHAIN}"));
    tx.rule(REJECT_CHAIN, "reject");
    tx.rule(
        SERVICE_ENDPOINTS_CHECK,
        &format!("ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"),
    );
    if match_all {
        tx.rule(
            NODEPORT_ENDPOINTS_CHECK,
            &format!(
                "ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
            ),
        );
    } else {
        tx.rule(
            NODEPORT_ENDPOINTS_CHECK,
            &format!(
                "ip daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
            ),
        );
    }

    tx.line(format_args!(
        "add map {TABLE} {FIREWALL_IPS} {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    ));
    tx.ensure_chain(FIREWALL_CHECK);
    tx.rule(
        FIREWALL_CHECK,
        &format!("ip daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"),
    );

    tx.line(format_args!(
        "add map {TABLE} {SERVICE_IPS} {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    tx.line(format_args!(
        "add map {TABLE} {SERVICE_NODEPORTS} {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    ));
    tx.rule(
        SERVICES,
        &format!("ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
    );
    if match_all {
        tx.rule(
            SERVICES,
            &format!("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        );
    } else {
        tx.rule(
            SERVICES,
            &format!("ip daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        );
    }

    tx.line(format_args!("flush set {TABLE} {CLUSTER_IPS}"));
    for map in [
        SERVICE_IPS,
        FIREWALL_IPS,
        NO_ENDPOINT_SERVICES,
        NO_ENDPOINT_NODEPORTS,
        SERVICE_NODEPORTS,
    ] {
        tx.line(format_args!("flush map {TABLE} {map}"));
    }
}

/// One Service port: its chains, map elements and rules, in `syncProxyRules`' order.
fn service(tx: &mut Tx, sp: &ServicePort, cfg: &KubeProxyConfig, cidr: Option<&str>) {
    let name = sp.name_string();
    let proto = sp.protocol;
    let base = service_chain_base(sp);
    let cluster_chain = format!("service-{base}");
    let local_chain = format!("local-{base}");
    let external_chain = format!("external-{base}");
    let cluster = sp.cluster();
    let local = sp.local();
    let reachable = sp.reachable();

    for ep in &reachable {
        tx.ensure_chain(&format!("endpoint-{}", endpoint_chain_base(sp, ep)));
    }
    let uses_cluster_chain = !cluster.is_empty();
    if uses_cluster_chain {
        tx.ensure_chain(&cluster_chain);
    }
    let uses_local_chain = !local.is_empty();
    if uses_local_chain {
        tx.ensure_chain(&local_chain);
    }
    let mut internal_chain = &cluster_chain;
    let mut has_internal = sp.has_endpoints;
    if sp.internal_local {
        internal_chain = &local_chain;
        if local.is_empty() {
            has_internal = false;
        }
    }
    let mut external_policy_chain = &cluster_chain;
    let mut has_external = sp.has_endpoints;
    if sp.external_policy_local() {
        external_policy_chain = &local_chain;
        if local.is_empty() {
            has_external = false;
        }
    }
    let uses_external_chain = sp.has_endpoints && sp.externally_accessible();
    if uses_external_chain {
        tx.ensure_chain(&external_chain);
    }
    let reject = format!("goto {REJECT_CHAIN}");
    let (internal_verdict, external_verdict) = if !sp.has_endpoints {
        (reject.as_str(), reject.as_str())
    } else {
        ("drop", "drop")
    };

    let cip = sp.cluster_ip;
    let port = sp.port;
    tx.element(CLUSTER_IPS, &cip.to_string(), None, None);
    let key = |ip: &dyn std::fmt::Display| format!("{ip} . {proto} . {port}");
    if has_internal {
        tx.element(
            SERVICE_IPS,
            &key(&cip),
            None,
            Some(&format!("goto {internal_chain}")),
        );
    } else {
        tx.element(
            NO_ENDPOINT_SERVICES,
            &key(&cip),
            Some(&name),
            Some(internal_verdict),
        );
    }
    for ip in &sp.external_ips {
        if sp.has_endpoints {
            tx.element(
                SERVICE_IPS,
                &key(ip),
                None,
                Some(&format!("goto {external_chain}")),
            );
        }
        if !has_external {
            tx.element(
                NO_ENDPOINT_SERVICES,
                &key(ip),
                Some(&name),
                Some(external_verdict),
            );
        }
    }
    for ip in &sp.lb_ips {
        if sp.has_endpoints {
            tx.element(
                SERVICE_IPS,
                &key(ip),
                None,
                Some(&format!("goto {external_chain}")),
            );
        }
    }
    if !has_external {
        for ip in &sp.lb_ips {
            tx.element(
                NO_ENDPOINT_SERVICES,
                &key(ip),
                Some(&name),
                Some(external_verdict),
            );
        }
    }
    if let Some(np) = sp.node_port {
        let k = format!("{proto} . {np}");
        if sp.has_endpoints {
            tx.element(
                SERVICE_NODEPORTS,
                &k,
                None,
                Some(&format!("goto {external_chain}")),
            );
        }
        if !has_external {
            tx.element(
                NO_ENDPOINT_NODEPORTS,
                &k,
                Some(&name),
                Some(external_verdict),
            );
        }
    }

    if has_internal {
        if cfg.masquerade_all {
            tx.rule(
                internal_chain,
                &format!("ip daddr {cip} {proto} dport {port} jump {MARK_MASQ}"),
            );
        } else if let Some(cidr) = cidr {
            tx.rule(
                internal_chain,
                &format!("ip daddr {cip} {proto} dport {port} ip saddr != {cidr} jump {MARK_MASQ}"),
            );
        }
    }
    if uses_external_chain {
        if !sp.external_policy_local() {
            tx.rule(&external_chain, &format!("jump {MARK_MASQ}"));
        } else {
            if let Some(cidr) = cidr {
                tx.rule_commented(
                    &external_chain,
                    &format!("ip saddr {cidr} goto {cluster_chain}"),
                    "short-circuit pod traffic",
                );
            }
            tx.rule_commented(
                &external_chain,
                &format!("fib saddr type local jump {MARK_MASQ}"),
                "masquerade local traffic",
            );
            tx.rule_commented(
                &external_chain,
                &format!("fib saddr type local goto {cluster_chain}"),
                "short-circuit local traffic",
            );
        }
        if has_external {
            tx.rule(&external_chain, &format!("goto {external_policy_chain}"));
        }
    }
    if let Some(timeout) = sp.affinity_timeout_s {
        for ep in &reachable {
            tx.line(format_args!(
                "add set {TABLE} affinity-{} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}",
                endpoint_chain_base(sp, ep)
            ));
        }
    }
    if uses_cluster_chain {
        endpoint_rules(tx, sp, &cluster_chain, cluster);
    }
    if uses_local_chain {
        endpoint_rules(tx, sp, &local_chain, local);
    }
    for ep in &reachable {
        let epbase = endpoint_chain_base(sp, ep);
        let chain = format!("endpoint-{epbase}");
        tx.rule(&chain, &format!("ip saddr {} jump {MARK_MASQ}", ep.ip));
        if sp.affinity_timeout_s.is_some() {
            tx.rule(&chain, &format!("update @affinity-{epbase} {{ ip saddr }}"));
        }
        tx.rule(
            &chain,
            &format!("meta l4proto {proto} dnat to {}", ep.host_port()),
        );
    }
}

/// `writeServiceToEndpointRules`: affinity lookups, then one `numgen random mod N vmap`.
fn endpoint_rules(tx: &mut Tx, sp: &ServicePort, chain: &str, endpoints: &[Endpoint]) {
    if sp.affinity_timeout_s.is_some() {
        for ep in endpoints {
            let epbase = endpoint_chain_base(sp, ep);
            tx.rule(
                chain,
                &format!("ip saddr @affinity-{epbase} goto endpoint-{epbase}"),
            );
        }
    }
    let mut vmap = String::new();
    for (i, ep) in endpoints.iter().enumerate() {
        if i > 0 {
            vmap.push_str(" , ");
        }
        let _ = write!(vmap, "{i} : goto endpoint-{}", endpoint_chain_base(sp, ep));
    }
    tx.rule(
        chain,
        &format!("numgen random mod {} vmap {{ {vmap} }}", endpoints.len()),
    );
}

/// The transaction of kube-proxy's partial sync after the Service ports named in
/// `changed` changed: their chains flushed and rewritten and their map elements added
/// again, and `stale` chains (an endpoint that went away) flushed and deleted. Nothing else
/// is touched.
pub fn update_transaction(
    spec: &TableSpec,
    cfg: &KubeProxyConfig,
    changed: &[String],
    stale: &[String],
) -> String {
    let mut tx = Tx {
        out: String::new(),
        created: HashSet::new(),
    };
    let cidr = cfg.cluster_cidr.map(|c| c.to_string());
    for sp in super::service_ports(spec)
        .iter()
        .filter(|sp| changed.contains(&sp.name_string()))
    {
        service(&mut tx, sp, cfg, cidr.as_deref());
    }
    for c in stale {
        tx.line(format_args!("flush chain {TABLE} {c}"));
        tx.line(format_args!("delete chain {TABLE} {c}"));
    }
    tx.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc1() -> ServicePort {
        ServicePort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            protocol: "tcp",
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            external_ips: vec![],
            lb_ips: vec![],
            node_port: None,
            internal_local: false,
            external_local: false,
            affinity_timeout_s: None,
            cluster_endpoints: vec![Endpoint {
                ip: "10.180.0.1".parse().unwrap(),
                port: 80,
            }],
            local_endpoints: vec![],
            has_endpoints: true,
            total_endpoints: 1,
        }
    }

    #[test]
    fn chain_names_are_the_ones_kube_proxy_tests_expect() {
        // pkg/proxy/nftables/proxier_test.go, TestOverallNFTablesRules.
        let sp = svc1();
        assert_eq!(service_chain_base(&sp), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            endpoint_chain_base(&sp, &sp.cluster_endpoints[0]),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn a_cluster_ip_service_is_written_as_kube_proxy_writes_it() {
        let cfg = KubeProxyConfig {
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
            ..KubeProxyConfig::default()
        };
        let tx = transaction_for(&[svc1()], &cfg);
        for want in [
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x004000",
            "add rule ip kube-proxy masquerading mark and 0x004000 == 0 return",
        ] {
            assert!(tx.lines().any(|l| l == want), "missing {want:?} in\n{tx}");
        }
    }
}
