//! The `iptables-restore` input kube-proxy's iptables mode writes (pkg/proxy/iptables,
//! `syncProxyRules`, full sync), for one IP family.
//!
//! Shape, as kube-proxy writes it: a `*filter` section (KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
//! KUBE-FORWARD, KUBE-NODEPORTS, KUBE-PROXY-FIREWALL and, with localhost NodePorts,
//! KUBE-FIREWALL) and a `*nat` section: KUBE-SERVICES with one rule per ClusterIP, external
//! IP and load-balancer IP jumping to the Service's `KUBE-SVC-<hash>` (or `KUBE-EXT-`,
//! `KUBE-SVL-`) chain; in it one rule per endpoint, each but the last with `-m statistic
//! --mode random --probability 1/k` for the k endpoints left, printed `%0.10f`; one
//! `KUBE-SEP-<hash>` chain per endpoint doing the DNAT; KUBE-MARK-MASQ setting the
//! masquerade mark and KUBE-POSTROUTING masquerading marked packets. Chain hashes are the
//! first 16 characters of base32(sha256(servicePortName + protocol [+ endpoint])).
//! Above 1000 endpoints kube-proxy's "large cluster mode" drops the per-rule comments; so
//! does this.
//!
//! kube-proxy also inserts jumps from the built-in chains (PREROUTING, OUTPUT, …) with
//! single `iptables -I` calls before its first restore; [`jump_rules`] gives those as a
//! restore input of their own. Load both with `iptables-restore --noflush`, jumps first.

use std::fmt::Write as _;

use nat::spec::TableSpec;

use super::hash::hash_prefix;
use super::{Endpoint, KubeProxyConfig, ServicePort};

/// Above this many endpoints kube-proxy leaves comments out (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// `KUBE-SVC-<hash>`: the Service port's Cluster-policy chain.
pub fn svc_chain(port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_prefix(&format!("{port_name}{protocol}"), 16)
    )
}

/// `KUBE-SVL-<hash>`: the Service port's Local-policy chain.
pub fn svl_chain(port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-SVL-{}",
        hash_prefix(&format!("{port_name}{protocol}"), 16)
    )
}

/// `KUBE-EXT-<hash>`: where external traffic (NodePort, load-balancer and external IPs) goes.
pub fn ext_chain(port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-EXT-{}",
        hash_prefix(&format!("{port_name}{protocol}"), 16)
    )
}

/// `KUBE-SEP-<hash>`: one endpoint of one Service port.
pub fn sep_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_prefix(&format!("{port_name}{protocol}{endpoint}"), 16)
    )
}

/// kube-proxy's `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Lines of one restore section, words joined by single spaces (kube-proxy's LineBuffer).
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn write(&mut self, words: &[&str]) {
        for (i, w) in words.iter().enumerate() {
            if i > 0 {
                self.0.push(' ');
            }
            self.0.push_str(w);
        }
        self.0.push('\n');
    }

    fn chain(&mut self, name: &str) {
        let _ = writeln!(self.0, ":{name} - [0:0]");
    }
}

/// The restore input kube-proxy would write for the IPv4 Service ports of `spec`.
pub fn restore_input(spec: &TableSpec, cfg: &KubeProxyConfig) -> String {
    restore_input_for(&super::service_ports(spec), cfg)
}

/// The restore input kube-proxy would write for `ports`.
pub fn restore_input_for(ports: &[ServicePort], cfg: &KubeProxyConfig) -> String {
    let mark = cfg.masquerade_mark();
    let mark_mask = format!("{mark}/{mark}");
    let mut filter_chains = Lines::default();
    let mut filter_rules = Lines::default();
    let mut nat_chains = Lines::default();
    let mut nat_rules = Lines::default();

    for c in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        filter_chains.chain(c);
    }
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        nat_chains.chain(c);
    }
    nat_rules.write(&[
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "mark",
        "!",
        "--mark",
        &mark_mask,
        "-j",
        "RETURN",
    ]);
    nat_rules.write(&["-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", &mark]);
    let mut masq = vec![
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "comment",
        "--comment",
        "\"kubernetes service traffic requiring SNAT\"",
        "-j",
        "MASQUERADE",
    ];
    if cfg.random_fully {
        masq.push("--random-fully");
    }
    nat_rules.write(&masq);
    nat_rules.write(&["-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", &mark]);

    let localhost_nodeports = cfg.localhost_nodeports_effective();
    if localhost_nodeports {
        filter_chains.chain(KUBE_FIREWALL);
        filter_rules.write(&[
            "-A",
            KUBE_FIREWALL,
            "-m",
            "comment",
            "--comment",
            "\"block incoming localnet connections\"",
            "-d",
            "127.0.0.0/8",
            "!",
            "-s",
            "127.0.0.0/8",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "DROP",
        ]);
    }

    let total: usize = ports.iter().map(|p| p.total_endpoints).sum();
    let large = total > LARGE_CLUSTER_ENDPOINTS;
    let cidr = cfg.cluster_cidr.map(|c| c.to_string());

    for sp in ports {
        let name = sp.name_string();
        let proto = sp.protocol;
        let cip = sp.cluster_ip.to_string();
        let port = sp.port.to_string();
        let cluster = sp.cluster();
        let local = sp.local();
        let cluster_chain = svc_chain(&name, proto);
        let local_chain = svl_chain(&name, proto);
        let external_chain = ext_chain(&name, proto);
        let uses_cluster_chain = !cluster.is_empty();
        let uses_local_chain = !local.is_empty();

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

        let (internal_target, internal_comment, external_target, external_comment) =
            if !sp.has_endpoints {
                let c = format!("\"{name} has no endpoints\"");
                ("REJECT", c.clone(), "REJECT", c)
            } else {
                let c = format!("\"{name} has no local endpoints\"");
                ("DROP", c.clone(), "DROP", c)
            };

        let cluster_ip_comment = format!("\"{name} cluster IP\"");
        if has_internal {
            nat_rules.write(&[
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                &cluster_ip_comment,
                "-m",
                proto,
                "-p",
                proto,
                "-d",
                &cip,
                "--dport",
                &port,
                "-j",
                internal_chain,
            ]);
        } else {
            filter_rules.write(&[
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                &internal_comment,
                "-m",
                proto,
                "-p",
                proto,
                "-d",
                &cip,
                "--dport",
                &port,
                "-j",
                internal_target,
            ]);
        }

        let external_ip_comment = format!("\"{name} external IP\"");
        for ip in &sp.external_ips {
            let ip = ip.to_string();
            if sp.has_endpoints {
                nat_rules.write(&[
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_ip_comment,
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    &external_chain,
                ]);
            }
            if !has_external {
                filter_rules.write(&[
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    external_target,
                ]);
            }
        }
        let lb_comment = format!("\"{name} loadbalancer IP\"");
        for ip in &sp.lb_ips {
            if sp.has_endpoints {
                nat_rules.write(&[
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &lb_comment,
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "-d",
                    &ip.to_string(),
                    "--dport",
                    &port,
                    "-j",
                    &external_chain,
                ]);
            }
        }
        if !has_external {
            for ip in &sp.lb_ips {
                filter_rules.write(&[
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "-d",
                    &ip.to_string(),
                    "--dport",
                    &port,
                    "-j",
                    external_target,
                ]);
            }
        }
        if let Some(np) = sp.node_port {
            let np = np.to_string();
            if sp.has_endpoints {
                nat_rules.write(&[
                    "-A",
                    KUBE_NODEPORTS,
                    "-m",
                    "comment",
                    "--comment",
                    &name,
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "--dport",
                    &np,
                    "-j",
                    &external_chain,
                ]);
            }
            if !has_external {
                filter_rules.write(&[
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "--dport",
                    &np,
                    "-j",
                    external_target,
                ]);
            }
        }

        // Off-cluster traffic to the ClusterIP is masqueraded (it may have been routed here
        // from elsewhere and must come back the same way).
        if has_internal {
            let head = [
                "-A",
                internal_chain.as_str(),
                "-m",
                "comment",
                "--comment",
                &cluster_ip_comment,
                "-m",
                proto,
                "-p",
                proto,
                "-d",
                &cip,
                "--dport",
                &port,
            ];
            if cfg.masquerade_all {
                let mut r = head.to_vec();
                r.extend(["-j", KUBE_MARK_MASQ]);
                nat_rules.write(&r);
            } else if let Some(cidr) = &cidr {
                let mut r = head.to_vec();
                r.extend(["!", "-s", cidr, "-j", KUBE_MARK_MASQ]);
                nat_rules.write(&r);
            }
        }

        if uses_external_chain {
            nat_chains.chain(&external_chain);
            if !sp.external_policy_local() {
                nat_rules.write(&[
                    "-A",
                    &external_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("\"masquerade traffic for {name} external destinations\""),
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
            } else {
                if let Some(cidr) = &cidr {
                    nat_rules.write(&[
                        "-A",
                        &external_chain,
                        "-m",
                        "comment",
                        "--comment",
                        &format!("\"pod traffic for {name} external destinations\""),
                        "-s",
                        cidr,
                        "-j",
                        &cluster_chain,
                    ]);
                }
                nat_rules.write(&[
                    "-A",
                    &external_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("\"masquerade LOCAL traffic for {name} external destinations\""),
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
                nat_rules.write(&[
                    "-A",
                    &external_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("\"route LOCAL traffic for {name} external destinations\""),
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    &cluster_chain,
                ]);
            }
            if has_external {
                nat_rules.write(&["-A", &external_chain, "-j", external_policy_chain]);
            }
        }

        if uses_cluster_chain {
            nat_chains.chain(&cluster_chain);
            endpoint_rules(&mut nat_rules, sp, &name, &cluster_chain, cluster, large);
        }
        if uses_local_chain {
            nat_chains.chain(&local_chain);
            endpoint_rules(&mut nat_rules, sp, &name, &local_chain, local, large);
        }

        for ep in sp.reachable() {
            let hp = ep.host_port();
            let chain = sep_chain(&name, proto, &hp);
            nat_chains.chain(&chain);
            let mut head = vec!["-A", chain.as_str()];
            if !large {
                head.extend(["-m", "comment", "--comment", &name]);
            }
            let ip = ep.ip.to_string();
            let mut masq = head.clone();
            masq.extend(["-s", &ip, "-j", KUBE_MARK_MASQ]);
            nat_rules.write(&masq);
            let mut dnat = head;
            if sp.affinity_timeout_s.is_some() {
                dnat.extend(["-m", "recent", "--name", &chain, "--set"]);
            }
            dnat.extend([
                "-m",
                proto,
                "-p",
                proto,
                "-j",
                "DNAT",
                "--to-destination",
                &hp,
            ]);
            nat_rules.write(&dnat);
        }
    }

    let nodeports_comment =
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    if cfg.nodeports_match_all() {
        let mut r = vec![
            "-A",
            KUBE_SERVICES,
            "-m",
            "comment",
            "--comment",
            nodeports_comment,
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
        ];
        if !localhost_nodeports {
            r.extend(["!", "-d", "127.0.0.0/8"]);
        }
        r.extend(["-j", KUBE_NODEPORTS]);
        nat_rules.write(&r);
    } else {
        for ip in cfg.nodeport_ips() {
            if ip.is_loopback() && !localhost_nodeports {
                continue;
            }
            nat_rules.write(&[
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                nodeports_comment,
                "-d",
                &ip.to_string(),
                "-j",
                KUBE_NODEPORTS,
            ]);
        }
    }

    if !cfg.conntrack_tcp_liberal {
        filter_rules.write(&[
            "-A",
            KUBE_FORWARD,
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
    }
    filter_rules.write(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        "\"kubernetes forwarding rules\"",
        "-m",
        "mark",
        "--mark",
        &mark_mask,
        "-j",
        "ACCEPT",
    ]);
    filter_rules.write(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        "\"kubernetes forwarding conntrack rule\"",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]);

    let mut out = String::with_capacity(
        filter_chains.0.len() + filter_rules.0.len() + nat_chains.0.len() + nat_rules.0.len() + 32,
    );
    out.push_str("*filter\n");
    out.push_str(&filter_chains.0);
    out.push_str(&filter_rules.0);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains.0);
    out.push_str(&nat_rules.0);
    out.push_str("COMMIT\n");
    out
}

/// `writeServiceToEndpointRules`: affinity checks first, then one rule per endpoint, each
/// but the last taken with probability 1/(endpoints left).
fn endpoint_rules(
    rules: &mut Lines,
    sp: &ServicePort,
    name: &str,
    chain: &str,
    endpoints: &[Endpoint],
    large: bool,
) {
    let proto = sp.protocol;
    if let Some(timeout) = sp.affinity_timeout_s {
        let seconds = timeout.to_string();
        for ep in endpoints {
            let hp = ep.host_port();
            let sep = sep_chain(name, proto, &hp);
            let comment = format!("\"{name} -> {hp}\"");
            let mut r = vec!["-A", chain];
            if !large {
                r.extend(["-m", "comment", "--comment", &comment]);
            }
            r.extend([
                "-m",
                "recent",
                "--name",
                &sep,
                "--rcheck",
                "--seconds",
                &seconds,
                "--reap",
                "-j",
                &sep,
            ]);
            rules.write(&r);
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let hp = ep.host_port();
        let sep = sep_chain(name, proto, &hp);
        let comment = format!("\"{name} -> {hp}\"");
        let p = probability(n - i);
        let mut r = vec!["-A", chain];
        if !large {
            r.extend(["-m", "comment", "--comment", &comment]);
        }
        if i + 1 < n {
            r.extend(["-m", "statistic", "--mode", "random", "--probability", &p]);
        }
        r.extend(["-j", &sep]);
        rules.write(&r);
    }
}

/// The jumps from the built-in chains that kube-proxy ensures before its first restore
/// (`iptablesJumpChains` and kubelet's KUBE-FIREWALL jumps), as a restore input that creates
/// the target chains and inserts the jumps at the head of each built-in chain.
pub fn jump_rules() -> String {
    // (table, target chain, built-in chain, comment, extra match)
    let new = "-m conntrack --ctstate NEW";
    let jumps: [(&str, &str, &str, &str, &str); 14] = [
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "INPUT",
            "kubernetes externally-visible service portals",
            new,
        ),
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "FORWARD",
            "kubernetes externally-visible service portals",
            new,
        ),
        (
            "filter",
            KUBE_NODEPORTS,
            "INPUT",
            "kubernetes health check service ports",
            "",
        ),
        (
            "filter",
            KUBE_SERVICES,
            "FORWARD",
            "kubernetes service portals",
            new,
        ),
        (
            "filter",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            new,
        ),
        (
            "filter",
            KUBE_FORWARD,
            "FORWARD",
            "kubernetes forwarding rules",
            "",
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "INPUT",
            "kubernetes load balancer firewall",
            new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "OUTPUT",
            "kubernetes load balancer firewall",
            new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "FORWARD",
            "kubernetes load balancer firewall",
            new,
        ),
        (
            "nat",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            KUBE_SERVICES,
            "PREROUTING",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            KUBE_POSTROUTING,
            "POSTROUTING",
            "kubernetes postrouting rules",
            "",
        ),
        ("filter", KUBE_FIREWALL, "INPUT", "", ""),
        ("filter", KUBE_FIREWALL, "OUTPUT", "", ""),
    ];
    let mut out = String::new();
    for table in ["filter", "nat"] {
        let _ = writeln!(out, "*{table}");
        let mut declared: Vec<&str> = Vec::new();
        for (t, target, _, _, _) in &jumps {
            if *t == table && !declared.contains(target) {
                declared.push(target);
                let _ = writeln!(out, ":{target} - [0:0]");
            }
        }
        for (t, target, builtin, comment, extra) in &jumps {
            if *t != table {
                continue;
            }
            let mut line = format!("-I {builtin}");
            if !extra.is_empty() {
                let _ = write!(line, " {extra}");
            }
            if !comment.is_empty() {
                let _ = write!(line, " -m comment --comment \"{comment}\"");
            }
            let _ = writeln!(out, "{line} -j {target}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The chains of `sp` (its Service, external and Local chains, and one per endpoint).
pub fn chains_of(sp: &ServicePort) -> Vec<String> {
    let name = sp.name_string();
    let mut out = vec![
        svc_chain(&name, sp.protocol),
        svl_chain(&name, sp.protocol),
        ext_chain(&name, sp.protocol),
    ];
    for ep in sp.reachable() {
        out.push(sep_chain(&name, sp.protocol, &ep.host_port()));
    }
    out
}

/// Whether a restore line declares or appends to a per-Service chain, and which.
fn per_service_chain(line: &str) -> Option<&str> {
    let chain = line
        .strip_prefix(':')
        .map(|l| l.split(' ').next().unwrap_or(l))
        .or_else(|| line.strip_prefix("-A ").and_then(|l| l.split(' ').next()))?;
    [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-SEP-",
        "KUBE-FW-",
    ]
    .iter()
    .any(|p| chain.starts_with(p))
    .then_some(chain)
}

/// The restore input of kube-proxy's partial sync (`MinimizeIPTablesRestore`, on by default
/// since Kubernetes 1.27) after the Service ports named in `changed` changed: every
/// top-level chain (KUBE-SERVICES and the rest) written whole, as kube-proxy always does,
/// the changed Services' own chains rewritten, the other Services' chains left out, and
/// `stale` chains (an endpoint that went away) declared, flushed and deleted (`-X`). Load
/// with `--noflush`.
pub fn partial_restore_input(
    spec: &TableSpec,
    cfg: &KubeProxyConfig,
    changed: &[String],
    stale: &[String],
) -> String {
    let ports = super::service_ports(spec);
    let keep: std::collections::HashSet<String> = ports
        .iter()
        .filter(|sp| changed.contains(&sp.name_string()))
        .flat_map(chains_of)
        .collect();
    let full = restore_input_for(&ports, cfg);
    let mut out = String::with_capacity(full.len() / 4);
    let mut in_nat = false;
    let mut declared_stale = false;
    for line in full.lines() {
        if line == "*nat" {
            in_nat = true;
        }
        if in_nat && !declared_stale && !line.starts_with(':') && line != "*nat" {
            for c in stale {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            declared_stale = true;
        }
        if in_nat && line == "COMMIT" {
            for c in stale {
                let _ = writeln!(out, "-X {c}");
            }
            in_nat = false;
        }
        if let Some(chain) = per_service_chain(line) {
            if !keep.contains(chain) {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_the_ones_kube_proxy_tests_expect() {
        // pkg/proxy/iptables/proxier_test.go: Service ns1/svc1 port p80/TCP, endpoint
        // 10.180.0.1:80.
        assert_eq!(
            svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn a_cluster_ip_service_is_written_as_kube_proxy_writes_it() {
        // The rules kube-proxy's TestOverallIPTablesRules expects for ns1/svc1, except the
        // mark, which its fake proxier sets to "0x4000" and kube-proxy prints "0x004000".
        let sp = ServicePort {
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
        };
        let cfg = KubeProxyConfig {
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
            ..KubeProxyConfig::default()
        };
        let out = restore_input_for(&[sp], &cfg);
        for want in [
            ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ] {
            assert!(out.lines().any(|l| l == want), "missing {want:?} in\n{out}");
        }
        assert!(out.starts_with("*filter\n:KUBE-SERVICES - [0:0]\n"));
        assert!(out.ends_with("COMMIT\n"));
    }

    #[test]
    fn a_partial_sync_rewrites_only_the_changed_service_and_deletes_the_stale_chain() {
        let set = crate::scenario::ServiceSet {
            services: 3,
            endpoints: 2,
            ..crate::scenario::ServiceSet::default()
        };
        let spec = set.table_spec().unwrap();
        let cfg = KubeProxyConfig::for_spec(&spec);
        let ports = crate::baseline::service_ports(&spec);
        let changed = ports[1].name_string();
        let stale = "KUBE-SEP-STALESTALESTALE".to_string();
        let out = partial_restore_input(&spec, &cfg, &[changed], std::slice::from_ref(&stale));
        let mine = chains_of(&ports[1]);
        let other = chains_of(&ports[0]);
        assert!(out.contains(&format!(":{} - [0:0]", mine[0])));
        assert!(
            out.contains(&format!("-A {} ", mine[3])),
            "an endpoint chain"
        );
        for c in &other {
            assert!(
                !out.contains(&format!(":{c} ")) && !out.contains(&format!("-A {c} ")),
                "another Service's chain {c} is left alone"
            );
        }
        assert!(
            out.contains(&format!("-j {}", other[0])),
            "KUBE-SERVICES still jumps to it"
        );
        assert!(out.contains(&format!(":{stale} - [0:0]\n")));
        assert!(out.contains(&format!("-X {stale}\nCOMMIT\n")));
        // Every Service is still in KUBE-SERVICES, jumping to chains that exist.
        assert_eq!(out.matches("-A KUBE-SERVICES").count(), 3 + 1);
        let decl = out.find(&format!(":{stale}")).unwrap();
        let first_rule =
            out[out.find("*nat").unwrap()..].find("\n-A ").unwrap() + out.find("*nat").unwrap();
        assert!(decl < first_rule, "declarations come before rules");
    }

    #[test]
    fn probabilities_are_printed_like_go_percent_0_10f() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(10), "0.1000000000");
        assert_eq!(probability(7), "0.1428571429");
    }
}
