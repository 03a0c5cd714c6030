//! What a computation yields and collects on the way: the [`Computed`] tables with their
//! [`Warning`]s and [`Refusals`], the [`TableError`] when there are none, and what every
//! part of the computation shares ([`Warnings`] as collected, [`Here`], the node computed
//! for).

use std::net::IpAddr;

use ipnet::IpNet;
use nat::spec::TableSpec;

use crate::warning::Warning;

/// The largest `sessionAffinityConfig.clientIP.timeoutSeconds` the API server accepts.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// Why no table could be computed at all.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// There is no Node object for the node this dataplane serves.
    #[error("no Node object named {0}: give kxdp-control the node's own name (--node) or add its Node manifest")]
    NoSuchNode(String),
}

/// How many Service addresses a computation refused, by reason; each also has its
/// [`Warning`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Frontends (address, port, protocol) that an older Service's port holds.
    pub taken: usize,
    /// ClusterIPs outside the cluster's Service ranges: that family of the Service is
    /// not programmed.
    pub outside_service_ranges: usize,
    /// ClusterIPs that are not IP addresses.
    pub invalid_cluster_ip: usize,
}

impl Refusals {
    /// Each reason, named as the metric labels it, with its count.
    pub fn by_reason(&self) -> [(&'static str, usize); 3] {
        [
            ("taken", self.taken),
            ("outside_service_ranges", self.outside_service_ranges),
            ("invalid_cluster_ip", self.invalid_cluster_ip),
        ]
    }

    pub(super) fn add(&mut self, other: &Refusals) {
        self.taken += other.taken;
        self.outside_service_ranges += other.outside_service_ranges;
        self.invalid_cluster_ip += other.invalid_cluster_ip;
    }
}

/// The tables and what had to be skipped to compute them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Computed {
    /// The tables.
    pub tables: TableSpec,
    /// Parts of objects that could not be used.
    pub warnings: Vec<Warning>,
    /// Service addresses refused (counted among the warnings too).
    pub refused: Refusals,
}

/// Warnings as a computation collects them, with the refusals among them counted.
#[derive(Clone, Default)]
pub(super) struct Warnings {
    pub(super) list: Vec<Warning>,
    pub(super) refused: Refusals,
}

/// Why a Service address was refused (see [`Refusals`]).
#[derive(Clone, Copy)]
pub(super) enum Refusal {
    Taken,
    OutsideServiceRanges,
    InvalidClusterIp,
}

impl Warnings {
    pub(super) fn push(&mut self, object: String, message: impl Into<String>) {
        self.list.push(Warning {
            object,
            message: message.into(),
        });
    }

    /// A warning about a refused Service address, counted.
    pub(super) fn refuse(&mut self, why: Refusal, object: String, message: impl Into<String>) {
        let n = match why {
            Refusal::Taken => &mut self.refused.taken,
            Refusal::OutsideServiceRanges => &mut self.refused.outside_service_ranges,
            Refusal::InvalidClusterIp => &mut self.refused.invalid_cluster_ip,
        };
        *n += 1;
        self.push(object, message);
    }
}

/// What the computation needs to know about the node it runs for.
pub(super) struct Here<'a> {
    pub(super) node_name: &'a str,
    pub(super) zone: Option<&'a str>,
    pub(super) node_addresses: &'a [IpAddr],
    /// The node's primary address of each family (IPv4, IPv6), kube-proxy's `nodeIP`.
    pub(super) primary_ips: [Option<IpAddr>; 2],
    /// The cluster's Service ClusterIP ranges.
    pub(super) service_cidrs: &'a [IpNet],
}
