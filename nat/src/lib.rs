//! Service translation for kxdp: the desired-state format control sends ([`spec`]), its
//! framing on the control stream ([`wire`]), the compiled service tables ([`tables`]),
//! Maglev backend selection ([`maglev`]), connection tracking ([`conntrack`]), NetworkPolicy
//! verdicts for new connections ([`policy`]) and in-place header rewrites with incremental
//! checksums ([`packet`], [`checksum`]).
//!
//! Pure by design: no sockets, threads, clocks or files. Time and bytes come in as
//! arguments, decisions go out as values, so every behaviour is testable in memory.

#![forbid(unsafe_code)]

pub mod affinity;
pub mod checksum;
pub mod conntrack;
pub mod maglev;
pub mod packet;
pub mod policy;
pub mod spec;
pub mod tables;
pub mod timeouts;
pub mod wire;
