#!/usr/bin/env bash
# Benchmark (not a test): thvc-netconf against the floor, one `ip -batch` file making the
# same state. COUNT tenant VLANs on a veth "NIC", each in its own bridge with an address.
# Every run uses fresh network namespaces. Prints per-run times, medians and ratios.
#
#   nodeagent/netconf/bench/bench.sh                  # needs a kernel with 8021q
#   integration/testvm/run -- nodeagent/netconf/bench/bench.sh   # on hosts without it
#   NO_VLANS=1 nodeagent/netconf/bench/bench.sh       # bridges only (no 8021q here)
#
# Env: RUNS (default 5), COUNT (default 200), THVC_NETCONF_BIN (default: build release).
set -euo pipefail

runs=${RUNS:-5}
count=${COUNT:-200}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)

die() { echo "bench: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
command -v ip >/dev/null || die "needs iproute2"

bin=${THVC_NETCONF_BIN:-}
if [[ -z $bin ]]; then
    target=${CARGO_TARGET_DIR:-$repo/target-netconf}
    (cd "$repo" && CARGO_TARGET_DIR=$target cargo build --quiet --release -p thvc-netconf) ||
        die "cargo build failed"
    bin=$target/release/thvc-netconf
fi
[[ -x $bin ]] || die "$bin is not executable"

vlans=1
if ! unshare -n sh -c 'ip link add n0 type veth peer name n1 && ip link add link n0 name n0.5 type vlan id 5' 2>/dev/null; then
    [[ ${NO_VLANS:-0} == 1 ]] ||
        die "this kernel cannot create VLAN links; run it in the test VM (see the header) or set NO_VLANS=1"
    vlans=0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The document and the equivalent ip batch.
{
    echo '{"links": [{"name": "uplink0", "kind": "physical"}'
    for ((i = 1; i <= count; i++)); do
        addr="10.$((i / 256)).$((i % 256)).1/24"
        if ((vlans)); then
            echo ",{\"name\": \"uplink0.$i\", \"kind\": \"vlan\", \"vlan\": {\"parent\": \"uplink0\", \"id\": $i}}"
            echo ",{\"name\": \"br$i\", \"kind\": \"bridge\", \"bridge\": {\"ports\": [\"uplink0.$i\"]}, \"addresses\": [\"$addr\"]}"
        else
            echo ",{\"name\": \"br$i\", \"kind\": \"bridge\", \"addresses\": [\"$addr\"]}"
        fi
    done
    echo ']}'
} >"$work/doc.json"
{
    echo "link set uplink0 up"
    for ((i = 1; i <= count; i++)); do
        if ((vlans)); then
            echo "link add link uplink0 name uplink0.$i type vlan id $i"
            echo "link add br$i type bridge"
            echo "link set uplink0.$i master br$i"
            echo "link set uplink0.$i up"
        else
            echo "link add br$i type bridge"
        fi
        echo "link set br$i up"
        echo "addr add 10.$((i / 256)).$((i % 256)).1/24 dev br$i"
    done
} >"$work/batch.ip"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
export -f now_ms
export bin work

# One run of our tool in a fresh namespace: "first_ms reapply_ms".
ours() {
    unshare -n bash -c '
        set -e
        ip link add uplink0 type veth peer name uplink0-sw
        state=$(mktemp -d -p "$work")
        t0=$(now_ms)
        "$bin" --state-dir "$state" apply "$work/doc.json" >"$work/first.out"
        t1=$(now_ms)
        "$bin" --state-dir "$state" apply "$work/doc.json" >"$work/again.out"
        t2=$(now_ms)
        grep -q "^no changes" "$work/again.out" || { echo "re-apply changed something:" >&2; cat "$work/again.out" >&2; exit 1; }
        echo "$((t1 - t0)) $((t2 - t1))"
    '
}

# The floor: one ip -batch in a fresh namespace.
floor() {
    unshare -n bash -c '
        set -e
        ip link add uplink0 type veth peer name uplink0-sw
        t0=$(now_ms)
        ip -batch "$work/batch.ip"
        t1=$(now_ms)
        echo "$((t1 - t0))"
    '
}

median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

what=$( ((vlans)) && echo "$count VLANs on a veth + $count bridges with an address" || echo "$count bridges with an address (no VLANs on this kernel)")
echo "thvc-netconf bench: $what, $runs runs, kernel $(uname -r)"
first=() again=() batch=()
for ((r = 1; r <= runs; r++)); do
    read -r f a < <(ours) || die "thvc-netconf run $r failed"
    b=$(floor) || die "ip -batch run $r failed"
    first+=("$f") again+=("$a") batch+=("$b")
    printf 'run %d: first apply %5d ms   no-change re-apply %5d ms   ip -batch %5d ms\n' "$r" "$f" "$a" "$b"
done
mf=$(printf '%s\n' "${first[@]}" | median)
ma=$(printf '%s\n' "${again[@]}" | median)
mb=$(printf '%s\n' "${batch[@]}" | median)
echo
echo "median: first apply $mf ms, no-change re-apply $ma ms, ip -batch $mb ms"
awk -v f="$mf" -v a="$ma" -v b="$mb" 'BEGIN {
    printf "ratio: first apply / ip -batch = %.2fx, re-apply / ip -batch = %.2fx\n", f / b, a / b }'
