//! The kxdp dataplane: poll-mode workers that pull frames from AF_XDP sockets (or any
//! [`pktio::Device`]), run them through the [`pipeline`] (ARP, Service translation with
//! connection tracking, routing between pod interfaces) and send them on; and the server
//! side of the control stream that swaps new tables in without stopping a worker.
//!
//! It composes `pktio` and `nat`; it never parses Kubernetes objects (control does).

#![forbid(unsafe_code)]

pub mod cores;
pub mod counters;
pub mod handover;
pub mod hostnet;
pub mod idle;
pub mod inspect;
pub mod monitor;
pub mod neighbors;
pub mod pipeline;
pub mod pods;
pub mod ports;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod steering;
pub mod tables;
pub mod vxlan;
pub mod worker;
