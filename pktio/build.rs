//! Compiles kxdp's BPF programs with clang for the BPF target: the XDP program
//! (`bpf/kxdp_filter.bpf.c`) into `$OUT_DIR/kxdp_filter.bpf.o`, which `src/xsk/bpf.rs`
//! embeds with `include_bytes!`, and the host redirect (`bpf/kxdp_host.bpf.c`, a tc
//! program) into `$OUT_DIR/kxdp_host.bpf.o`, which `src/xsk/host.rs` embeds.
//!
//! Needs clang (any version with the BPF target, 14 or later) and the headers of
//! libbpf-dev (`bpf/bpf_helpers.h`) and linux-libc-dev: `scripts/deps.sh` installs them.
//! `CLANG` names another clang; `KXDP_BPF_CFLAGS` adds flags (say, `-I` for headers kept
//! elsewhere).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: [(&str, &str); 2] = [
    ("bpf/kxdp_filter.bpf.c", "kxdp_filter.bpf.o"),
    ("bpf/kxdp_host.bpf.c", "kxdp_host.bpf.o"),
];

fn main() {
    for (source, _) in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=KXDP_BPF_CFLAGS");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (source, object) in SOURCES {
        compile(source, &out.join(object));
    }
}

fn compile(source: &str, object: &std::path::Path) {
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]);
    // `-target bpf` leaves out the host's multiarch include directory, where Debian keeps
    // <asm/types.h> (included by <linux/types.h>); ask the host compiler where it is.
    if let Some(dir) = multiarch_include(&clang) {
        cmd.arg(format!("-I{dir}"));
    }
    if let Ok(extra) = env::var("KXDP_BPF_CFLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("-c").arg(source).arg("-o").arg(object);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "pktio: cannot run `{clang}` to build the BPF program {source}: {e}. Install clang \
             and libbpf-dev (scripts/deps.sh does), or point CLANG at a clang with the BPF target"
        )
    });
    if !status.success() {
        panic!(
            "pktio: `{cmd:?}` failed ({status}). If a header is missing, install libbpf-dev \
             and linux-libc-dev (scripts/deps.sh does) or add -I flags with KXDP_BPF_CFLAGS"
        );
    }
}

/// `/usr/include/<triple>` for the host's multiarch triple, if the compiler knows one and the
/// directory exists.
fn multiarch_include(clang: &str) -> Option<String> {
    let out = Command::new(clang).arg("-print-multiarch").output().ok()?;
    let triple = String::from_utf8(out.stdout).ok()?;
    let dir = format!("/usr/include/{}", triple.trim());
    (!triple.trim().is_empty() && std::path::Path::new(&dir).is_dir()).then_some(dir)
}
