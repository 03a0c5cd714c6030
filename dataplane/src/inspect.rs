//! Answers to inspection requests, computed from the tables the workers use, off the
//! packet path.

use std::net::IpAddr;

use nat::policy::{PolicyType, Verdict};
use nat::spec::Protocol;
use nat::tables::{Decision, FrontendKey};
use nat::wire::{ExplainedPath, ExplainedVerdict};

use crate::state::Tables;

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
) -> Vec<ExplainedPath> {
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
    targets
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
        .collect()
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
