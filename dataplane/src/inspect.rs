//! Answers to inspection requests, computed from the tables the workers use, off the
//! packet path.

use std::net::IpAddr;

use nat::policy::{PolicyType, Verdict};
use nat::spec::Protocol;
use nat::tables::{Decision, FrontendKey};
use nat::wire::{ExplainedPath, ExplainedVerdict};

use crate::tables::Tables;

/// Why a connection cannot be explained.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// An IPv4 source and an IPv6 destination, or the reverse: no such packet exists, so
    /// no policy decides it (judging the addresses apart would say ALLOWED for nothing).
    #[error("source {src} and destination {dst} are of different IP families: no packet goes from one to the other; ask with two IPv4 or two IPv6 addresses")]
    MixedFamilies {
        /// The client asked about.
        src: IpAddr,
        /// The destination asked about.
        dst: IpAddr,
    },
}

/// Whether a connection from `src` to `dst` can exist at all: both of one IP family.
pub fn check_families(src: IpAddr, dst: IpAddr) -> Result<(), ExplainError> {
    if src.is_ipv6() != dst.is_ipv6() {
        return Err(ExplainError::MixedFamilies { src, dst });
    }
    Ok(())
}

/// Which NetworkPolicy decides a new connection from `src` to `dst`:`port`, judged as the
/// pipeline judges it: after Service translation (each serving endpoint of a Service
/// frontend is a path), egress of the source pod towards the translated destination,
/// ingress of the destination pod from the source it sees (the masquerade address when
/// the Service masquerades; the node is always allowed in).
pub fn explain_policy(
    t: &Tables,
    src: IpAddr,
    dst: IpAddr,
    protocol: Option<Protocol>,
    port: u16,
) -> Result<Vec<ExplainedPath>, ExplainError> {
    check_families(src, dst)?;
    let mut targets: Vec<(Option<String>, IpAddr, u16, IpAddr)> = Vec::new();
    let frontend = protocol.and_then(|protocol| {
        t.services.frontend(&FrontendKey {
            ip: dst,
            port,
            protocol,
        })
    });
    if let Some(f) = frontend {
        if let Some(svc) = t.services.service(f.service) {
            let masquerade = matches!(
                t.services.decide(f, src, 0),
                Decision::Translate {
                    masquerade: true,
                    ..
                }
            );
            let peer = if masquerade {
                t.masquerade_source(src.is_ipv6()).unwrap_or(src)
            } else {
                src
            };
            for b in &svc.serving_endpoints {
                targets.push((Some(svc.name.clone()), b.ip, b.port, peer));
            }
        }
    }
    if targets.is_empty() {
        targets.push((None, dst, port, src));
    }
    Ok(targets
        .into_iter()
        .map(|(service, ip, port, peer)| {
            let l4 = protocol.map(|p| (p, port));
            let egress = explain(t, PolicyType::Egress, src, ip, l4, false);
            let from_node = t.is_gateway(peer) || t.node_addresses.contains(&peer);
            let ingress = explain(t, PolicyType::Ingress, ip, peer, l4, from_node);
            let allowed = egress.verdict != "denied" && ingress.verdict != "denied";
            ExplainedPath {
                service,
                dst: ip,
                port,
                peer,
                egress,
                ingress,
                allowed,
            }
        })
        .collect())
}

fn explain(
    t: &Tables,
    ty: PolicyType,
    pod_ip: IpAddr,
    peer: IpAddr,
    l4: Option<(Protocol, u16)>,
    from_node: bool,
) -> ExplainedVerdict {
    let e = t.policy.explain(ty, pod_ip, peer, l4);
    let isolating: Vec<String> = e
        .policies
        .iter()
        .map(|&p| t.policy.policy_name(p).to_string())
        .collect();
    let (verdict, allowed_by) = match e.verdict {
        Verdict::NotIsolated => ("not isolated", None),
        _ if from_node => ("node traffic", None),
        Verdict::Allowed { policy } => ("allowed", Some(t.policy.policy_name(policy).to_string())),
        Verdict::Denied => ("denied", None),
    };
    ExplainedVerdict {
        pod: e.pod.map(str::to_string),
        isolating,
        verdict: verdict.to_string(),
        allowed_by,
    }
}

/// Every Service port of the tables in use, with its endpoints' states and Maglev shares.
pub fn services(t: &Tables) -> Vec<nat::wire::ServiceView> {
    use nat::wire::{BackendView, ServiceView};
    let shares = |set: Option<&nat::tables::BackendSet>, ip: IpAddr, port: u16| -> f64 {
        let Some(set) = set else {
            return 0.0;
        };
        let Some(i) = set
            .backends
            .iter()
            .position(|b| b.ip == ip && b.port == port)
        else {
            return 0.0;
        };
        match set.ring() {
            Some(ring) => {
                let s = ring.shares(set.backends.len());
                s.get(i).copied().unwrap_or(0) as f64 / ring.len().max(1) as f64
            }
            None => 1.0,
        }
    };
    t.spec
        .services
        .iter()
        .map(|spec| {
            let compiled = spec.frontends.first().and_then(|f| {
                t.services
                    .frontend(&FrontendKey {
                        ip: f.ip,
                        port: f.port,
                        protocol: spec.protocol,
                    })
                    .and_then(|r| t.services.service(r.service))
            });
            let backends = spec
                .all_endpoints
                .iter()
                .map(|e| {
                    let state = if e.ready {
                        "serving"
                    } else if e.serving && e.terminating {
                        "terminating"
                    } else {
                        "not serving"
                    };
                    BackendView {
                        endpoint: sock(e.ip, e.port),
                        local: e.local,
                        state: state.to_string(),
                        weight: 1,
                        cluster_share: shares(compiled.map(|s| &s.cluster), e.ip, e.port),
                        local_share: shares(compiled.map(|s| &s.local), e.ip, e.port),
                    }
                })
                .collect();
            ServiceView {
                name: spec.name.clone(),
                protocol: format!("{:?}", spec.protocol).to_uppercase(),
                frontends: spec
                    .frontends
                    .iter()
                    .map(|f| format!("{:?} {}", f.kind, sock(f.ip, f.port)))
                    .collect(),
                internal_local: spec.internal_local,
                external_local: spec.external_local,
                affinity_timeout_s: spec.affinity_timeout_s,
                backends,
                refused: spec
                    .refused
                    .iter()
                    .map(|r| {
                        let f = &r.frontend;
                        format!("{} {:?} {}", r.service, f.kind, sock(f.ip, f.port))
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The tracked connections matching a filter (address and port in either tuple,
/// protocol), at most `limit`, ordered; with the table's total and the matching count.
pub fn conntrack(
    t: &Tables,
    ct: &nat::conntrack::Conntrack,
    now: u64,
    addr: Option<IpAddr>,
    port: Option<u16>,
    protocol: Option<u8>,
    limit: usize,
) -> (usize, usize, Vec<nat::wire::ConnView>) {
    use nat::conntrack::Connection;
    let all = ct.entries(now);
    let total = all.len();
    let keep = |c: &Connection| {
        let ends = [
            (c.original.src, c.original.sport),
            (c.original.dst, c.original.dport),
            (c.reply.src, c.reply.sport),
            (c.reply.dst, c.reply.dport),
        ];
        addr.is_none_or(|a| ends.iter().any(|e| e.0 == a))
            && port.is_none_or(|p| ends.iter().any(|e| e.1 == p))
            && protocol.is_none_or(|p| c.original.proto == p)
    };
    let mut matched: Vec<_> = all.into_iter().filter(|(c, _, _)| keep(c)).collect();
    let count = matched.len();
    matched.sort_by_key(|(c, _, _)| {
        (
            c.original.src,
            c.original.sport,
            c.original.dst,
            c.original.dport,
        )
    });
    let entries = matched
        .into_iter()
        .take(limit)
        .map(|(c, state, expires)| {
            let dnat = c.reply.src != c.original.dst || c.reply.sport != c.original.dport;
            let snat = c.reply.dst != c.original.src || c.reply.dport != c.original.sport;
            let nat = match (dnat, snat) {
                (true, true) => "dnat+snat",
                (true, false) => "dnat",
                (false, true) => "snat",
                (false, false) => "none",
            };
            let service = Protocol::from_number(c.original.proto).and_then(|protocol| {
                let f = t.services.frontend(&FrontendKey {
                    ip: c.original.dst,
                    port: c.original.dport,
                    protocol,
                })?;
                Some(t.services.service(f.service)?.name.clone())
            });
            let policy = match c.policy {
                0 => "not isolated".to_string(),
                p => format!("allowed by {}", t.policy.policy_name(p - 1)),
            };
            nat::wire::ConnView {
                protocol: proto_name(c.original.proto, c.original.src.is_ipv6()),
                original: format!(
                    "{} -> {}",
                    sock(c.original.src, c.original.sport),
                    sock(c.original.dst, c.original.dport)
                ),
                reply: format!(
                    "{} -> {}",
                    sock(c.reply.src, c.reply.sport),
                    sock(c.reply.dst, c.reply.dport)
                ),
                nat: nat.to_string(),
                state: format!("{:?}", nat::timeouts::State::from_u8(state)),
                expires_in_s: expires.saturating_sub(now) / 1_000_000_000,
                service,
                policy,
            }
        })
        .collect();
    (total, count, entries)
}

fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn proto_name(p: u8, v6: bool) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 if v6 => "icmpv6".into(),
        other => other.to_string(),
    }
}
