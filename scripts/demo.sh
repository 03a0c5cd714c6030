#!/usr/bin/env bash
# The demo (`kxdp-lab demo`): builds kxdp, brings up the namespace lab, runs kxdp-dataplane
# and kxdp-control on lab/manifests, calls the ClusterIPs from a pod over TCP and UDP,
# prints who answered and the per-worker counters, and takes the lab down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release --workspace --bins
exec ./target/release/kxdp-lab demo "$@"
