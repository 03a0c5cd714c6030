#!/usr/bin/env bash
# Installs what kxdp's demo and tests need on a fresh Debian machine: iproute2 (ip netns,
# veth, bridge), ethtool (the lab turns pod offloads off) and procps (sysctl, for the
# overlay test's kernel node). pktio's XDP program is C built at compile time by clang
# (with libbpf-dev's and linux-libc-dev's headers) and loaded by libbpf-rs, which builds
# libbpf from source (make) against libelf and zlib (found with pkg-config); bpftool is
# how an operator removes a BPF-link attachment by hand (README) and what the XDP filter
# test checks that with. iputils-ping and
# traceroute run through a kxdp node in issue 9's namespace test. iptables (iptables-nft
# and iptables-legacy) and nftables load the bench's kube-proxy baselines; fonts-dejavu-core
# gives its plots a font. Rust crates
# come through cargo.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
command -v iptables-nft-restore >/dev/null 2>&1 || need+=(iptables)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v clang >/dev/null 2>&1 || need+=(clang)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -e /usr/include/linux/bpf.h ] || need+=(linux-libc-dev)
[ -e /usr/include/gelf.h ] || need+=(libelf-dev)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v make >/dev/null 2>&1 || need+=(make)
command -v bpftool >/dev/null 2>&1 || need+=(bpftool)
# vagrant validates the VM bench's Vagrantfile in the test command.
command -v vagrant >/dev/null 2>&1 || need+=(vagrant)
# ping and traceroute through a kxdp node (issue 9's namespace test).
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v traceroute >/dev/null 2>&1 || need+=(traceroute)
# the control socket's permission test speaks the wire format as an unprivileged user.
command -v python3 >/dev/null 2>&1 || need+=(python3)
# the bench's PNG plots draw their text with a TrueType font.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# the per-node CNI test runs real containers: containerd (with ctr) and runc, busybox-static
# for their root filesystem, containernetworking-plugins for host-local and loopback.
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
if [ ! -e /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then need+=(busybox-static); fi
[ -e /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "kxdp: missing ${need[*]} and not root: install them with apt-get" >&2
    exit 1
  fi
  echo "kxdp: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
