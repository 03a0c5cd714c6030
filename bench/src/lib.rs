//! Traffic generation, baselines and reports for kxdp (see issue 7).
#![forbid(unsafe_code)]
