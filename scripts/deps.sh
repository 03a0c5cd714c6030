#!/usr/bin/env bash
# Installs what kxdp's demo and tests need on a fresh Debian machine: iproute2 (ip netns,
# veth, bridge), ethtool (the lab turns pod offloads off) and procps (sysctl, for the
# overlay test's kernel node). Rust crates come through cargo.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "kxdp: missing ${need[*]} and not root: install them with apt-get" >&2
    exit 1
  fi
  echo "kxdp: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
