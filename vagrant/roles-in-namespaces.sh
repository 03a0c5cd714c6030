#!/usr/bin/env bash
# A rehearsal of bench.sh without VMs: the same three roles (kxdp-bench serve-dut, sink,
# gen) on one host, each "machine" a network namespace made here (both ends of every veth
# inside them; all deleted at the end, also on failure). The generator and the sink share
# core 0 here, so the round-trip times are not the VMs'; what it shows is that the roles
# find each other, translate, masquerade and reflect.
#
#   sudo KINDS="kxdp nftables xdp-fwd" SERVICES=100 vagrant/roles-in-namespaces.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$here/../target/release}
B=$BIN/kxdp-bench
KINDS=${KINDS:-"kxdp iptables nftables xdp-fwd"}
SERVICES=${SERVICES:-100}
out=$(mktemp -d /tmp/kxdp-roles-XXXXXX)
G=kxdp-roles-gen-$$; D=kxdp-roles-dut-$$; K=kxdp-roles-sink-$$
cleanup() { for n in $G $D $K; do ip netns del "$n" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in $G $D $K; do
  ip netns add "$n"
  ip -n "$n" link set lo up
  ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
done
ip -n $G link add eth1 type veth peer name eth1 netns $D
ip -n $D link add eth2 type veth peer name eth1 netns $K
ip -n $G link set eth1 up; ip -n $K link set eth1 up
ip -n $D link set eth1 up; ip -n $D link set eth2 up
ip -n $G addr add 192.168.50.10/24 dev eth1
gmac=$(ip netns exec $G cat /sys/class/net/eth1/address)
smac=$(ip netns exec $K cat /sys/class/net/eth1/address)
field() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$1"; }
for kind in $KINDS; do
  ip netns exec $D "$B" serve-dut --kind "$kind" --uplink eth1 --pods eth2 --services "$SERVICES" \
    --node-ip 192.168.50.2 --gen-ip 192.168.50.10 --gen-mac "$gmac" --sink-mac "$smac" \
    --hold 6 --bin-dir "$BIN" > "$out/dut-$kind.json" &
  dut=$!
  ready=""
  for _ in $(seq 1 300); do
    ready=$(grep -m1 '"frontend"' "$out/dut-$kind.json" 2>/dev/null || true)
    [ -n "$ready" ] && break
    kill -0 $dut 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$ready" ] || { echo "$kind did not come up" >&2; wait $dut || true; continue; }
  endpoints=$(sed -n 's/.*"endpoints":\[\([^]]*\)\].*/\1/p' <<<"$ready" | tr -d '"')
  ip netns exec $K "$B" sink --iface eth1 --arp "$endpoints" --reflect --seconds 4 > "$out/sink-$kind.json" &
  sink=$!
  sleep 0.5
  ip netns exec $G "$B" gen --iface eth1 --dst-mac "$(field "$ready" uplink_mac)" \
    --to "$(field "$ready" frontend)" --rate 20000 --seconds 2 > "$out/gen-$kind.json"
  wait $sink; wait $dut
done
"$B" vm-report "$out"
echo "JSON in $out" >&2
