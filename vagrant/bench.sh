#!/usr/bin/env bash
# kxdp's bench across the three VMs of this Vagrantfile: the generator on `gen`, the device
# under test on `dut`, the sink (answering ARP for the endpoints, reflecting every frame)
# on `sink`. Run `vagrant up` first. This machine's project has no hypervisor: the script
# has been rehearsed with the same roles in three network namespaces
# (./roles-in-namespaces.sh), never on VMs.
#
#   SERVICES=10000 DURATION=10 RATE=0 DUTS="kxdp iptables nftables xdp-fwd" ./bench.sh
#
# 1. `kxdp-bench run --quick` inside the DUT VM (the namespace bench, same command as on a
#    host), its Markdown saved;
# 2. per device: `kxdp-bench serve-dut` on dut (moves its two private NICs into a namespace,
#    sets the device up, holds it for DURATION + 30 s), `kxdp-bench sink` on sink,
#    `kxdp-bench gen` on gen for DURATION seconds (RATE frames/s, 0 flat out);
# 3. `kxdp-bench vm-report` tables the JSON each wrote.
# Results go to results/<UTC time>/.
set -euo pipefail
cd "$(dirname "$0")"
SERVICES=${SERVICES:-10000}
DURATION=${DURATION:-10}
RATE=${RATE:-0}
DUTS=${DUTS:-"kxdp iptables nftables xdp-fwd"}
BIN=/kxdp/target/release/kxdp-bench
out=results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

on() { vagrant ssh "$1" -c "$2" -- -T; }
# The VM's NIC that holds address $2.
nic() { on "$1" "ip -o -4 addr show | awk '\$4 ~ /^$2\\// {print \$2}'" | tr -d '\r\n'; }
mac() { on "$1" "cat /sys/class/net/$2/address" | tr -d '\r\n'; }
# A field of the DUT's ready line (serde_json prints no spaces).
field() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$1"; }

GEN_IF=$(nic gen 192.168.50.10)
SINK_IF=$(nic sink 192.168.60.10)
DUT_UP=$(nic dut 192.168.50.2)
DUT_POD=$(nic dut 192.168.60.2)
for v in GEN_IF SINK_IF DUT_UP DUT_POD; do
  [ -n "${!v}" ] || { echo "bench.sh: no NIC for $v (did vagrant reload dut after a run?)" >&2; exit 1; }
done
GEN_MAC=$(mac gen "$GEN_IF")
SINK_MAC=$(mac sink "$SINK_IF")
{
  echo "command: SERVICES=$SERVICES DURATION=$DURATION RATE=$RATE DUTS=\"$DUTS\" vagrant/bench.sh"
  for vm in gen dut sink; do
    echo "$vm: $(on $vm 'nproc; uname -r; grep -m1 "model name" /proc/cpuinfo; cat /proc/loadavg' | tr '\r\n' '  ')"
  done
} > "$out/machines.txt"

on dut "cd /kxdp && sudo $BIN run --quick --out /var/tmp/kxdp-bench/quick >/dev/null && cat /var/tmp/kxdp-bench/quick/results.md" \
  > "$out/namespace-bench-in-dut.md" || echo "bench.sh: the namespace bench in the DUT VM failed" >&2

for kind in $DUTS; do
  hold=$((DURATION + 30))
  on dut "cd /kxdp && sudo $BIN serve-dut --kind $kind --uplink $DUT_UP --pods $DUT_POD \
    --services $SERVICES --node-ip 192.168.50.2 --gen-ip 192.168.50.10 --gen-mac $GEN_MAC \
    --sink-mac $SINK_MAC --hold $hold --bin-dir /kxdp/target/release" > "$out/dut-$kind.json" &
  dut=$!
  ready=""
  # Bound: 15 minutes for the tables (iptables and nft at 100k Services are slow).
  for _ in $(seq 1 900); do
    ready=$(grep -m1 '"frontend"' "$out/dut-$kind.json" 2>/dev/null || true)
    [ -n "$ready" ] && break
    kill -0 "$dut" 2>/dev/null || break
    sleep 1
  done
  if [ -z "$ready" ]; then
    echo "bench.sh: $kind did not come up; see $out/dut-$kind.json" >&2
    wait "$dut" || true
    continue
  fi
  frontend=$(field "$ready" frontend)
  uplink_mac=$(field "$ready" uplink_mac)
  endpoints=$(sed -n 's/.*"endpoints":\[\([^]]*\)\].*/\1/p' <<<"$ready" | tr -d '"')
  on sink "sudo $BIN sink --iface $SINK_IF --arp $endpoints --reflect --seconds $((DURATION + 10))" \
    > "$out/sink-$kind.json" &
  sink=$!
  sleep 3
  on gen "sudo $BIN gen --iface $GEN_IF --dst-mac $uplink_mac --to $frontend --rate $RATE --seconds $DURATION" \
    > "$out/gen-$kind.json" || echo "bench.sh: the generator failed for $kind" >&2
  wait "$sink" || echo "bench.sh: the sink failed for $kind" >&2
  wait "$dut" || echo "bench.sh: the DUT failed for $kind" >&2
done

# The report, by the DUT VM's kxdp-bench (the host may not have one).
tar -C "$out" -cf - . | on dut "rm -rf /tmp/kxdp-vm && mkdir -p /tmp/kxdp-vm && tar -C /tmp/kxdp-vm -xf - && $BIN vm-report /tmp/kxdp-vm" \
  > "$out/report.md"
cat "$out/machines.txt" "$out/report.md"
echo "results in vagrant/$out; the DUT's NICs lost their addresses: vagrant reload dut before the next run" >&2
