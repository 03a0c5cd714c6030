//! Service translation for kxdp: the desired-state format control sends ([`spec`]), its
//! framing on the control stream ([`wire`]), the compiled service tables, Maglev backend
//! selection, connection tracking and in-place header rewrites.
//!
//! Pure by design: no sockets, threads, clocks or files. Time and bytes come in as
//! arguments, decisions go out as values, so every behaviour is testable in memory.

#![forbid(unsafe_code)]

pub mod spec;
pub mod wire;
