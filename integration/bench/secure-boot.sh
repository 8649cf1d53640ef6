#!/bin/bash
# Benchmark: what Secure Boot and the TPM2 cost a node's boot (issue 14's numbers). Not a
# test: it prints numbers (medians), nothing passes or fails. QEMU, TCG, one vCPU, as the
# boot test; alternating, on this machine.
#   secure+tpm: the image as built: the firmware verifies systemd-boot, the UKI and its
#               add-ons, the TPM2 (swtpm) measures them; /var LUKS2, its key sealed to PCR 7
#               + signed PCR 11 (made at the first boot, unsealed at every boot).
#   plain:      the same commit with /var plain ext4 (repart.d without Encrypt=, no
#               crypttab line, no provisioning generator: an extra tree), Secure Boot off
#               (setup mode, no keys offered), no TPM2.
# Each round boots a new disk of each (first boot: /var made) and powers it on again
# (later boots); ready = `thvcctl -H` status answers, from QEMU's start.
#
#   integration/bench/secure-boot.sh [--rounds N] [IMAGE]   (default 3, image/out/thvc-host.raw)
# shellcheck disable=SC2154,SC2034 # qemu_pid, qemu_started, ssh_port: set by node_start; node_tpm: read by it (lib.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
rounds=3
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        -*) echo "usage: integration/bench/secure-boot.sh [--rounds N] [IMAGE]" >&2; exit 2 ;;
        *) break ;;
    esac
done
image=$(readlink -f "${1:-$repo/image/out/thvc-host.raw}")
[ -e "$image" ] || { echo "secure-boot.sh: no image $image (image/build)" >&2; exit 1; }
thvcctl=$(dirname "$image")/bin/thvcctl
. "$repo/integration/image/lib.sh"
image_install_host_tools
work=$(mktemp -d /var/tmp/thvc-bench-secure-boot.XXXXXX)
cleanup() { node_stop; rm -rf "$work"; }
trap cleanup EXIT
log() { echo "[secure-boot] $*" >&2; }

# The plain variant: the same commit and Debian archive state, an extra tree on top.
tree=$work/plain-tree
mkdir -p "$tree/usr/lib/repart.d" "$tree/etc" "$tree/usr/lib/systemd/system-generators"
grep -v '^Encrypt=' "$repo/systemd/repart.d/50-var.conf" > "$tree/usr/lib/repart.d/50-var.conf"
: > "$tree/etc/crypttab"
sed 's|^/dev/mapper/var |/dev/disk/by-partlabel/thvc-var |' "$repo/image/mkosi/mkosi.extra/etc/fstab" > "$tree/etc/fstab"
printf '#!/bin/sh\nexit 0\n' > "$tree/usr/lib/systemd/system-generators/thvc-provisioning-generator"
chmod 0755 "$tree/usr/lib/systemd/system-generators/thvc-provisioning-generator"
log "building the plain variant (image/build --keep-archive, an extra tree)"
"$repo/image/build" --keep-archive --no-zst --output "$work/plain" -- --extra-tree="$tree" > "$work/plain-build.log" 2>&1 ||
    { tail -n 30 "$work/plain-build.log" >&2; exit 1; }

ssh-keygen -q -t ed25519 -N "" -f "$work/ctl_key"
cat > "$work/network.json" <<NET
{"links": [{"name": "mgmt", "kind": "physical", "mac": "$MGMT_MAC", "zone": "management",
  "addresses": ["10.0.2.15/24"], "routes": [{"to": "0.0.0.0/0", "via": "10.0.2.2"}]}]}
NET
creds=(system.hostname=thvc-bench ssh.authorized_keys.thvc-ctl=@"$work/ctl_key.pub"
       ssh.authorized_keys.root=@"$work/ctl_key.pub" thvc.network=@"$work/network.json")
# ready: seconds from QEMU's start until thvcctl -H status answers (at most 600).
ready() {
    local deadline=$(( $(date +%s) + 600 )) t
    rm -f "$work/known_hosts"   # each disk has host keys of its own
    node_ssh_setup
    until THVCCTL_SSH="$work/ssh-ctl" "$thvcctl" -H thvc-ctl@127.0.0.1 status > /dev/null 2>&1; do
        node_alive && [ "$(date +%s)" -lt "$deadline" ] || { tail -n 20 "$work/console.log" >&2; return 1; }
        sleep 1
    done
    t=$(date +%s)
    echo $(( t - qemu_started ))
}
# poweroff: a clean shutdown (root's key), QEMU's exit awaited.
poweroff() {
    ssh "${sshopts[@]}" -i "$work/ctl_key" root@127.0.0.1 systemctl poweroff > /dev/null 2>&1 || true
    local deadline=$(( $(date +%s) + 120 ))
    while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
    node_stop
}
# boot VARIANT: a new disk of it, two power-ons; sets first and later (ready seconds).
boot() {
    if [ "$1" = secure+tpm ]; then
        node_tpm=swtpm
        node_disk "$image"
        node_enroll || return 1
    else
        node_tpm=none
        node_disk "$work/plain/thvc-host.raw"
        node_secure_boot_off
    fi
    node_start "${creds[@]}"
    first=$(ready) || return 1
    poweroff
    node_start "${creds[@]}"
    later=$(ready) || return 1
    poweroff
}
results=()
for r in $(seq "$rounds"); do
    order=(secure+tpm plain)
    [ $((r % 2)) = 0 ] && order=(plain secure+tpm)
    for v in "${order[@]}"; do
        boot "$v" || { log "round $r: $v did not get ready"; exit 1; }
        log "round $r: $v: ready after ${first} s (first boot), ${later} s (later boot)"
        results+=("$v $first $later")
    done
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
d = {}
for line in sys.stdin:
    v, a, b = line.split()
    d.setdefault(v, ([], []))
    d[v][0].append(int(a)); d[v][1].append(int(b))
print("| variant | first boot ready (s) | later boot ready (s) |")
print("| --- | --- | --- |")
for v in ("secure+tpm", "plain"):
    a, b = d[v]
    print("| %s | %s (median %g) | %s (median %g) |" % (v, " ".join(map(str, a)), statistics.median(a), " ".join(map(str, b)), statistics.median(b)))
s, p = d["secure+tpm"], d["plain"]
print("secure+tpm / plain: first boot %.2fx, later boot %.2fx" % (statistics.median(s[0]) / statistics.median(p[0]), statistics.median(s[1]) / statistics.median(p[1])))
'
