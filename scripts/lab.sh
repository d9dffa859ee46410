#!/usr/bin/env bash
# The main job (as root): install what is missing, build, bring up the two-node lab, create and
# start a protected VM from the tiny guest image (HA, or FT with PV_DEMO_MODE=ft), wait until
# it is protected, and show its console until COUNTER lines appear (on a terminal it keeps
# following; Ctrl-C stops watching, the lab keeps running).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
VM=${PV_DEMO_VM:-demo}
MODE=${PV_DEMO_MODE:-ha}

bash scripts/install-deps.sh
echo "== building (first build takes a few minutes)"
cargo build --workspace
pvctl=target/debug/pvctl
$pvctl lab up
if ! $pvctl vm-info "$VM" >/dev/null 2>&1; then
  $pvctl vm-create "$VM" --mode "$MODE" --cpu 1 --memory 256M --disk 16M:sg0 --network business --kernel-image tiny
fi
if ! $pvctl vm-info "$VM" --json | grep -q '"state":"running"'; then
  echo "== starting $VM"
  $pvctl vm-start "$VM" >/dev/null
fi
echo "== waiting until $VM is protected (HA: its disk mirrored to the other host over the A-Links; FT: also checkpointed to a standby there)"
for _ in $(seq 120); do
  if $pvctl vm-info "$VM" | grep -q '^protect: protected'; then break; fi
  sleep 1
done
$pvctl vm-info "$VM"
$pvctl node-info
lab_dir=${PV_LAB_DIR:-/var/lib/pairvisor-lab}
echo "== browser console: https://10.100.0.10:7400/  token: $(cat "$lab_dir/pki/admin.token")  (CA: $lab_dir/pki/ca.pem)"
echo "== serial console of $VM (each COUNTER line was written to its disk with O_DIRECT + fsync first)"
if [ -t 1 ]; then
  $pvctl vm-console "$VM" --follow
else
  $pvctl vm-console "$VM" --until 'COUNTER 5' --timeout 120
  echo "== watch it: $pvctl vm-console $VM -f    stop the lab: $pvctl lab down"
fi
