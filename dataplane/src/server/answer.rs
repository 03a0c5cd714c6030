//! What the dataplane answers to each request that is not a stream of its own: a table
//! installed or refused, a pod interface attached or detached, and the queries answered
//! from the tables in use (counters, Services, connections, policy verdicts).

use std::time::Instant;

use nat::wire::Message;

use crate::pods::PodPorts;
use crate::state::{DeltaOutcome, Shared};

/// Acts on one message and returns the answer (stale flows retired before it, when a
/// table was installed).
pub fn handle(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    let (answer, retire) = handle_table_or(msg, shared, epoch);
    if retire {
        shared.retire_stale_flows(epoch.elapsed().as_nanos() as u64);
    }
    answer
}

/// The answer to a message that is not a table (tables go to [`handle_table_or`]).
fn answer_query(msg: Message, shared: &Shared, epoch: Instant) -> Message {
    match msg {
        Message::GetStats => Message::Stats {
            generation: shared.tables.load().generation,
            conntrack: shared.conntrack.len(),
            conntrack_capacity: shared.conntrack.capacity(),
            workers: shared.counters.iter().map(|p| p.read().named()).collect(),
            policy_drops: shared.policy_drop_counts(),
            refused_tables: shared
                .installs
                .refused_tables
                .load(std::sync::atomic::Ordering::Relaxed),
            poll_mode: shared
                .poll_mode
                .get()
                .map_or_else(String::new, |m| m.name().to_string()),
        },
        Message::ExplainPolicy {
            src,
            dst,
            protocol,
            port,
        } => {
            match crate::inspect::explain_policy(&shared.tables.load(), src, dst, protocol, port) {
                Ok(paths) => Message::PolicyExplained { paths },
                Err(e) => Message::Refused {
                    reason: e.to_string(),
                },
            }
        }
        Message::GetServices => {
            let tables = shared.tables.load();
            Message::Services {
                generation: tables.generation,
                services: crate::inspect::services(&tables),
            }
        }
        Message::GetConntrack {
            addr,
            port,
            protocol,
            limit,
        } => {
            let now = epoch.elapsed().as_nanos() as u64;
            let (total, matched, entries) = crate::inspect::conntrack(
                &shared.tables.load(),
                &shared.conntrack,
                now,
                addr,
                port,
                protocol,
                limit,
            );
            Message::Conntrack {
                total,
                matched,
                entries,
            }
        }
        other => Message::Refused {
            reason: format!("unexpected message {other:?}"),
        },
    }
}

/// A CNI plugin's request to attach or detach a pod interface.
pub(super) fn pod_request(
    msg: Message,
    shared: &Shared,
    pods: Option<&PodPorts>,
    epoch: Instant,
) -> Message {
    let Some(pods) = pods else {
        return Message::Refused {
            reason: "this dataplane attaches no pod interfaces at run time".into(),
        };
    };
    match msg {
        Message::AttachPod {
            ifname,
            container_id,
            ips,
        } => match pods.attach(shared, &ifname, &container_id, ips) {
            Ok(_) => Message::PodAttached { ifname },
            Err(reason) => {
                log::warn!("refused to attach {ifname} (container {container_id}): {reason}");
                Message::Refused { reason }
            }
        },
        Message::DetachPod {
            ifname,
            container_id,
        } => match pods.detach(shared, &ifname, epoch.elapsed().as_nanos() as u64) {
            Ok(found) => Message::PodDetached { ifname, found },
            Err(reason) => {
                log::warn!("refused to detach {ifname} (container {container_id}): {reason}");
                Message::Refused { reason }
            }
        },
        other => Message::Refused {
            reason: format!("unexpected message {other:?}"),
        },
    }
}

/// [`handle`], with whether stale flows are to be retired once the answer is out.
pub(super) fn handle_table_or(msg: Message, shared: &Shared, epoch: Instant) -> (Message, bool) {
    match msg {
        Message::Snapshot { generation, tables } => {
            match install_snapshot(generation, *tables, shared) {
                Ok(answer) => (answer, true),
                Err(answer) => (answer, false),
            }
        }
        Message::Delta {
            generation,
            base,
            delta,
        } => install_delta(generation, base, &delta, shared),
        other => (answer_query(other, shared, epoch), false),
    }
}

fn refuse(shared: &Shared, reason: String) -> Message {
    shared
        .installs
        .refused_tables
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log::error!("refusing {reason}; keeping the tables in use");
    Message::Refused { reason }
}

fn install_snapshot(
    generation: u64,
    mut tables: nat::spec::TableSpec,
    shared: &Shared,
) -> Result<Message, Message> {
    tables.sort_services();
    if let Err(reason) = tables.validate() {
        return Err(refuse(
            shared,
            format!("table generation {generation}: {reason}"),
        ));
    }
    let started = Instant::now();
    let services = tables.services.len();
    shared.install_tables(generation, tables);
    log::info!(
        "applied table generation {generation}: {services} service ports in {:?}",
        started.elapsed()
    );
    Ok(Message::Applied { generation })
}

fn install_delta(
    generation: u64,
    base: u64,
    delta: &nat::spec::TableDelta,
    shared: &Shared,
) -> (Message, bool) {
    let started = Instant::now();
    match shared.install_delta(generation, base, delta) {
        Ok(DeltaOutcome::Applied { retire }) => {
            log::debug!(
                "applied table generation {generation} (delta from {base}: {} service ports upserted, {} removed) in {:?}",
                delta.upserted.len(),
                delta.removed.len(),
                started.elapsed()
            );
            (Message::Applied { generation }, retire)
        }
        Ok(DeltaOutcome::Stale { have }) => {
            log::info!(
                "table generation {generation} is a delta from {base}, but generation {have} is in use: asking control for a snapshot"
            );
            (Message::NeedSnapshot { have }, false)
        }
        Err(reason) => (refuse(shared, reason), false),
    }
}
