//! The AF_XDP generator and sink against a real veth pair, each in a namespace of its own
//! (`bench::ceiling`): for one second at a fixed, modest rate, the sink must count at least
//! 90% of what the generator says it sent, every frame must have the configured size, and
//! every payload timestamp must parse into a latency. Nothing here asserts a rate: the
//! machine is shared, and a test never asserts a speed.
//!
//! Root only: without root each test says so and passes. Namespaces are deleted when the
//! run ends, also on failure.

use std::time::Duration;

use bench::ceiling::{self, CeilingConfig};
use pktio::xsk::XdpMode;

/// Frames per second: far below what the pair carries, so a busy machine loses nothing to
/// the generator outrunning the sink.
const RATE: u64 = 20_000;

fn skip(test: &str) -> bool {
    if bench::netns::is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root to create namespaces and attach AF_XDP sockets");
    true
}

fn one_second(size: usize, flows: u32, mode: XdpMode) {
    let cfg = CeilingConfig {
        size,
        flows,
        rate_pps: Some(RATE),
        duration: Duration::from_secs(1),
        mode,
        pin: false,
    };
    let r = ceiling::run(&cfg).expect("generator → sink run");
    let s = r.summary(size);
    eprintln!("{size} bytes, {flows} flows, {mode:?}: {s:?}");
    eprintln!(
        "generator device {:?}\nsink device {:?}",
        r.gen.device, r.sink.device
    );
    assert!(r.gen.sent > 0, "the generator sent");
    assert!(
        r.sink.frames * 10 >= r.gen.sent * 9,
        "the sink counted {} of {} frames sent (< 90%)",
        r.sink.frames,
        r.gen.sent
    );
    assert!(r.sink.frames <= r.gen.sent, "no frame counted twice");
    assert_eq!(r.sink.wrong_size, 0, "every frame is {size} bytes");
    assert_eq!(r.sink.bytes, r.sink.frames * size as u64);
    assert_eq!(r.sink.bad_timestamps, 0, "every timestamp parses");
    assert_eq!(r.sink.latency.len(), r.sink.frames, "one latency per frame");
    assert!(
        r.sink.max_seq.unwrap() < r.gen.sent,
        "sequence numbers are the generator's"
    );
    assert_eq!(
        r.sink.other, 0,
        "IPv6 is off: nothing but the generator's frames"
    );
}

#[test]
fn sink_counts_what_the_generator_sends_64_bytes() {
    if skip("sink_counts_what_the_generator_sends_64_bytes") {
        return;
    }
    one_second(64, 1, XdpMode::Auto);
}

#[test]
fn sink_counts_what_the_generator_sends_1514_bytes_many_flows_generic_xdp() {
    if skip("sink_counts_what_the_generator_sends_1514_bytes_many_flows_generic_xdp") {
        return;
    }
    one_second(1514, 1000, XdpMode::Generic);
}

#[test]
fn errors_are_one_line_without_a_backtrace_unless_verbose() {
    let missing =
        std::env::temp_dir().join(format!("kxdp-bench-missing-{}.json", std::process::id()));
    let run = |verbose: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kxdp-bench"));
        c.env("RUST_BACKTRACE", "1").arg("report").arg(&missing);
        if verbose {
            c.arg("--verbose");
        }
        c.output().expect("run kxdp-bench")
    };
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim_end(),
        format!(
            "kxdp-bench: read {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let out = run(true);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Caused by:"));
}
