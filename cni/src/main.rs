//! `kxdp-cni`: the CNI plugin binary. Reads the `CNI_*` environment and the network
//! configuration on stdin, prints a result or a CNI error object on stdout, and exits
//! non-zero on error. A panic is caught and reported as an error object too.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;

use cni::error::{code, CniError};

fn main() -> ExitCode {
    let vars: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Err(cni::Failure {
            error: CniError::new(
                code::IO_FAILURE,
                "failed to read the network configuration",
                e.to_string(),
            ),
            version: "1.1.0".into(),
        }),
        Ok(_) => std::panic::catch_unwind(|| cni::run(&vars, &stdin)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(cni::Failure {
                error: CniError::new(code::INTERNAL, "kxdp-cni failed unexpectedly", what),
                version: "1.1.0".into(),
            })
        }),
    };
    match outcome {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kxdp-cni: {}", f.error);
            println!("{}", f.error.to_json(&f.version));
            ExitCode::FAILURE
        }
    }
}
