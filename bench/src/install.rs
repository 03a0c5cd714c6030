//! How long it takes to install N Services (10 endpoints each) and to apply one endpoint
//! change, kxdp against what kube-proxy runs:
//!
//! - kxdp: control's table computation (reported on its own), then the snapshot sent over
//!   the control socket until the dataplane answers Applied ([`control::Stream::send`]);
//!   one change: the tables with one endpoint replaced, sent the same way (control sends
//!   what its stream sends: the whole table, or a delta once the stream does deltas);
//! - iptables: kube-proxy's `iptables-restore --noflush` of its full sync into a fresh
//!   namespace (jump rules first), with the nf_tables backend and the legacy one; one change:
//!   its partial sync ([`iptables::partial_restore_input`]) with `--noflush`;
//! - nftables: kube-proxy's first-sync transaction with `nft -f`; one change: its partial
//!   transaction ([`nftables::update_transaction`]).
//!
//! Every kernel command is bounded ([`netns::exec_bounded`]); what does not finish is
//! reported as "not finished in N s", never waited for.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nat::spec::TableSpec;

use crate::baseline::{self, iptables, nftables, KubeProxyConfig};
use crate::dut::{self, Dut, DutKind};
use crate::netns::{self, Bounded, NetnsGuard};
use crate::record::{InstallPoint, InstallRow, Plan, SetupRecord};

/// The tables after change `c`: endpoint 0 of a Service picked by `c` moves to a new
/// address. Returns the changed Service port's name and its old endpoint.
pub fn change_endpoint(spec: &mut TableSpec, c: u32) -> Option<(String, (Ipv4Addr, u16))> {
    let n = spec.services.len();
    if n == 0 {
        return None;
    }
    // Spread the changes over the set: the first, then strides of a large prime.
    let i = (c as usize * 7919) % n;
    let s = &spec.services[i];
    let old = s.cluster_endpoints.first()?.ip;
    let IpAddr::V4(old4) = old else {
        return None;
    };
    let port = s.cluster_endpoints[0].port;
    // Tables share their Service specs behind an `Arc`: this one is copied first if
    // another table (the one `spec` was cloned from) still holds it.
    let s = std::sync::Arc::make_mut(&mut spec.services[i]);
    // 10.200.0.0/16 is inside the bench's /8 pod network and outside the endpoints it
    // numbers from 10.0.1.10 (a million of them end at 10.15.x.x).
    let new = IpAddr::V4(Ipv4Addr::new(10, 200, (c / 250) as u8, (c % 250) as u8 + 1));
    for list in [
        &mut s.cluster_endpoints,
        &mut s.local_endpoints,
        &mut s.all_endpoints,
    ] {
        for e in list.iter_mut().filter(|e| e.ip == old) {
            e.ip = new;
        }
    }
    Some((s.name.clone(), (old4, port)))
}

/// Measures install and change times at one Service count on every system, reusing the
/// devices already set up for the traffic runs (`duts`, `setup`): kxdp's and nftables'
/// install is the one their set-up timed (a fresh dataplane sent the snapshot; `nft -f` of
/// the first sync into a fresh namespace), and the changes are made on them. kube-proxy's
/// `iptables-restore --noflush` full sync is timed in a fresh namespace of its own (the
/// traffic runs load iptables without `--noflush`, which is quicker and leaves the same
/// kernel state).
#[allow(clippy::too_many_arguments)]
pub fn measure(
    plan: &Plan,
    spec: &TableSpec,
    services: u32,
    endpoints: u64,
    compute_s: f64,
    duts: &mut [Dut],
    setup: &[SetupRecord],
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<InstallPoint> {
    let mut point = InstallPoint {
        services,
        endpoints,
        compute_s,
        rows: Vec::new(),
    };
    let limit = Duration::from_secs(plan.restore_limit_s);
    let not_run = |kind: DutKind| {
        setup
            .iter()
            .find(|s| s.dut == kind.name())
            .and_then(|s| s.not_run.clone())
    };

    // kxdp.
    let mut row = InstallRow {
        system: "kxdp".into(),
        note: "control::Stream::send until Applied (encode, socket, decode, compile, swap) into a fresh kxdp-dataplane".into(),
        ..InstallRow::default()
    };
    match duts.iter_mut().find(|d| d.kind == DutKind::Kxdp) {
        Some(d) => {
            row.full_s = Some(d.install.seconds);
            let p = d.kxdp_mut().expect("a kxdp device has a process");
            p.resume();
            let mut changed = spec.clone();
            for c in 0..plan.changes {
                change_endpoint(&mut changed, c);
                if let Some(t) = p.install(2 + u64::from(c), &changed, limit)? {
                    row.change_s.push(t.as_secs_f64());
                }
            }
            p.suspend();
        }
        None => {
            row.note = not_run(DutKind::Kxdp).unwrap_or_else(|| "not in this run".into());
        }
    }
    progress(&format!(
        "  kxdp: install {} s, one change {} s",
        opt(row.full_s),
        opt(row.change_median())
    ));
    point.rows.push(row);

    let cfg = KubeProxyConfig::for_spec(spec);
    for (kind, restore) in [
        (DutKind::Iptables, "iptables-nft-restore"),
        (DutKind::IptablesLegacy, "iptables-legacy-restore"),
    ] {
        let dut_ns = duts
            .iter()
            .find(|d| d.kind == kind)
            .map(|d| d.topo.dut_ns());
        let row = iptables_row(spec, &cfg, restore, dut_ns, not_run(kind), plan, limit)?;
        progress(&format!(
            "  {}: install {} s, one change {} s; {}",
            row.system,
            opt(row.full_s),
            opt(row.change_median()),
            row.note
        ));
        point.rows.push(row);
    }

    let mut row = InstallRow {
        system: "nft -f".into(),
        note: "kube-proxy's nftables first sync into a fresh namespace, then its partial syncs"
            .into(),
        ..InstallRow::default()
    };
    match duts.iter().find(|d| d.kind == DutKind::Nftables) {
        Some(d) => {
            row.full_s = Some(d.install.seconds);
            nft_changes(d.topo.dut_ns(), spec, &cfg, plan, limit, &mut row)?;
        }
        None => match not_run(DutKind::Nftables) {
            Some(why) => row.note = format!("first sync {why}"),
            None => {
                let ns = crate::ceiling::quiet_namespace("kxdp-binst")?;
                let tx = nftables::transaction(spec, &cfg);
                match netns::exec_bounded(
                    ns.name(),
                    "nft",
                    &["-f", "-"],
                    Some(tx.as_bytes()),
                    limit,
                )? {
                    Bounded::Done(_, took) => {
                        row.full_s = Some(took.as_secs_f64());
                        nft_changes(&ns, spec, &cfg, plan, limit, &mut row)?;
                    }
                    Bounded::TimedOut(_) => {
                        row.note = format!("first sync not finished in {} s", limit.as_secs());
                    }
                }
            }
        },
    }
    progress(&format!(
        "  nft -f: install {} s, one change {} s; {}",
        opt(row.full_s),
        opt(row.change_median()),
        row.note
    ));
    point.rows.push(row);
    Ok(point)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.3}"))
}

/// kube-proxy's full sync with `restore --noflush` in a fresh namespace, then its partial
/// syncs: on that namespace if the full sync finished, else on the traffic runs' device
/// (`dut_ns`), else on a namespace loaded without `--noflush` — unless the device's own
/// load without `--noflush` already did not finish (`dut_not_run`).
fn iptables_row(
    spec: &TableSpec,
    cfg: &KubeProxyConfig,
    restore: &str,
    dut_ns: Option<&NetnsGuard>,
    dut_not_run: Option<String>,
    plan: &Plan,
    limit: Duration,
) -> anyhow::Result<InstallRow> {
    let ns = crate::ceiling::quiet_namespace("kxdp-binst")?;
    let mut row = InstallRow {
        system: format!("{restore} --noflush"),
        note: "kube-proxy's full sync (jump rules, then the restore) into a fresh namespace; its partial syncs".into(),
        ..InstallRow::default()
    };
    let jumps = iptables::jump_rules();
    netns::exec(ns.name(), restore, &["--noflush"], Some(jumps.as_bytes()))?;
    let rules = iptables::restore_input(spec, cfg);
    let finished = match netns::exec_bounded(
        ns.name(),
        restore,
        &["--noflush"],
        Some(rules.as_bytes()),
        limit,
    )? {
        Bounded::Done(_, took) => {
            row.full_s = Some(took.as_secs_f64());
            true
        }
        Bounded::TimedOut(_) => false,
    };
    if finished {
        changes_iptables(&ns, spec, cfg, restore, plan, limit, &mut row)?;
        return Ok(row);
    }
    drop(ns);
    row.note = format!(
        "full sync not finished in {} s; partial syncs timed on the ruleset loaded without --noflush",
        limit.as_secs()
    );
    if let Some(ns) = dut_ns {
        changes_iptables(ns, spec, cfg, restore, plan, limit, &mut row)?;
        return Ok(row);
    }
    if let Some(why) = dut_not_run {
        row.note = format!(
            "full sync not finished in {} s; no partial syncs (the device's own load: {why})",
            limit.as_secs()
        );
        return Ok(row);
    }
    let ns = crate::ceiling::quiet_namespace("kxdp-binst")?;
    if let Bounded::TimedOut(_) = netns::exec_bounded(
        ns.name(),
        restore,
        &[],
        Some(rules.as_bytes()),
        Duration::from_secs(plan.install_limit_s),
    )? {
        row.note = format!(
            "full sync not finished in {} s, nor a restore without --noflush in {} s",
            limit.as_secs(),
            plan.install_limit_s
        );
        return Ok(row);
    }
    netns::exec(
        ns.name(),
        restore,
        &["--noflush"],
        Some(dut::jump_inserts().as_bytes()),
    )?;
    changes_iptables(&ns, spec, cfg, restore, plan, limit, &mut row)?;
    Ok(row)
}

fn changes_iptables(
    ns: &NetnsGuard,
    spec: &TableSpec,
    cfg: &KubeProxyConfig,
    restore: &str,
    plan: &Plan,
    limit: Duration,
    row: &mut InstallRow,
) -> anyhow::Result<()> {
    partial_syncs(
        spec,
        plan,
        limit,
        row,
        |sp, old| iptables::sep_chain(&sp.name_string(), sp.protocol, &old.host_port()),
        |changed, names, stale| {
            let input = iptables::partial_restore_input(changed, cfg, names, stale);
            netns::exec_bounded(
                ns.name(),
                restore,
                &["--noflush"],
                Some(input.as_bytes()),
                limit,
            )
        },
    )
}

fn nft_changes(
    ns: &NetnsGuard,
    spec: &TableSpec,
    cfg: &KubeProxyConfig,
    plan: &Plan,
    limit: Duration,
    row: &mut InstallRow,
) -> anyhow::Result<()> {
    partial_syncs(
        spec,
        plan,
        limit,
        row,
        |sp, old| format!("endpoint-{}", nftables::endpoint_chain_base(sp, old)),
        |changed, names, stale| {
            let tx = nftables::update_transaction(changed, cfg, names, stale);
            netns::exec_bounded(ns.name(), "nft", &["-f", "-"], Some(tx.as_bytes()), limit)
        },
    )
}

/// Times `plan.changes` of kube-proxy's partial syncs into `row`, one endpoint change
/// ([`change_endpoint`]) each, stopping at the first that does not finish in `limit`.
/// `stale_chain` names the chain of the endpoint that went away; `apply` loads the partial
/// sync of the changed tables for the changed Service ports named, deleting the stale
/// chains.
fn partial_syncs(
    spec: &TableSpec,
    plan: &Plan,
    limit: Duration,
    row: &mut InstallRow,
    stale_chain: impl Fn(&baseline::ServicePort, &baseline::Endpoint) -> String,
    apply: impl Fn(&TableSpec, &[String], &[String]) -> Result<Bounded, netns::NetnsError>,
) -> anyhow::Result<()> {
    let mut changed = spec.clone();
    for c in 0..plan.changes {
        let before = baseline::service_ports(&changed);
        let Some((name, (ip, port))) = change_endpoint(&mut changed, c) else {
            break;
        };
        let old = baseline::Endpoint { ip, port };
        let stale: Vec<String> = before
            .iter()
            .filter(|sp| sp.name_string() == name)
            .map(|sp| stale_chain(sp, &old))
            .collect();
        match apply(&changed, std::slice::from_ref(&name), &stale)? {
            Bounded::Done(_, took) => row.change_s.push(took.as_secs_f64()),
            Bounded::TimedOut(_) => {
                row.note.push_str(&format!(
                    "; a partial sync did not finish in {} s",
                    limit.as_secs()
                ));
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ServiceSet;

    #[test]
    fn a_change_moves_one_endpoint_of_one_service() {
        let set = ServiceSet {
            services: 4,
            endpoints: 3,
            ..ServiceSet::default()
        };
        let spec = set.table_spec().unwrap();
        let mut changed = spec.clone();
        let (name, (old, _)) = change_endpoint(&mut changed, 1).unwrap();
        let differ: Vec<_> = spec
            .services
            .iter()
            .zip(&changed.services)
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(differ.len(), 1);
        assert_eq!(differ[0].1.name, name);
        assert!(!differ[0]
            .1
            .cluster_endpoints
            .iter()
            .any(|e| e.ip == IpAddr::V4(old)));
    }
}
