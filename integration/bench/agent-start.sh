#!/usr/bin/env bash
# Benchmark: the node agent defining and starting real VMs, run inside the test VM (the only
# place with KVM that boots Linux). Builds the release thvc-vmm and thvc-nodeagent (cargo puts
# them side by side, where the benchmark finds the VMM) and the start_rate bench binary
# (nodeagent/bench/start_rate.rs), then runs it in the test VM with the guest assets.
# Not a test: it prints numbers (medians), nothing passes or fails.
#
#   integration/bench/agent-start.sh [--vms N] [--memory MIB] [--rounds R]
#
# Arguments go to the benchmark (defaults: 8 VMs, 128 MiB, 3 rounds). Honours
# CARGO_TARGET_DIR. THVC_BENCH_VM_TIMEOUT: the test VM's time limit (default 1800 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

log() { echo "[agent-start] $*" >&2; }

log "building the release thvc-vmm, thvc-nodeagent and the start_rate benchmark"
cargo build --release -p thvc-vmm -p thvc-nodeagent
# The bench binary's path from cargo's own report (its hash changes with every build).
bench=$(cargo bench -p thvc-nodeagent --bench start_rate --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["name"] == "start_rate" and "bench" in msg["target"]["kind"]:
        print(msg["executable"])
')
[[ -n $bench && -x $bench ]] || { log "cargo reported no start_rate bench binary"; exit 1; }

eval "$(integration/testvm/assets --print-env)"
log "host load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# The test VM replaces /tmp, /var/tmp and /run: a checkout there is shared into it.
vm_share=()
case $PWD in /tmp/* | /var/tmp/* | /run/*) vm_share=(--ro "$PWD") ;; esac
status=0
integration/testvm/run "${vm_share[@]}" --memory 4096 --timeout "${THVC_BENCH_VM_TIMEOUT:-1800}" \
    -- "$bench" "$@" || status=$?
log "host load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
