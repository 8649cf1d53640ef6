# Shared by integration/image/{boot-test,tamper-test,provisioning-test,e2e} and
# integration/bench/secure-boot.sh: host tools, the node's SSH, and one
# QEMU node (TCG, -cpu max, q35, OVMF, two virtio NICs) booted with SMBIOS
# type 11 credentials. Source it; it expects `work` (a scratch directory) set.
#
# The node's firmware is OVMF's Secure Boot build (SMM, its variables in a secure
# flash) with an empty variable store: a server in setup mode, like one fresh from its
# vendor with the keys cleared. node_enroll boots it once, and systemd-boot enrolls the
# image's keys from the ESP; every boot after that verifies systemd-boot, the UKI and
# its add-ons. Without node_enroll Secure Boot stays off only if the ESP offers no keys
# (the tamper test's verity boot removes them: it needs SMBIOS's extra command line).

OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
# Fixed MACs: the network document finds the NICs by them (names are the kernel's).
MGMT_MAC=52:54:00:7e:00:01
LAN_MAC=52:54:00:7e:00:02
[ -n "${qemu_extra+set}" ] || qemu_extra=()

image_install_host_tools() {
    local need=() p
    "$(dirname "${BASH_SOURCE[0]}")/../lib/install-qemu" || return 1
    [ -e "$OVMF_CODE" ] || need+=(ovmf)
    # sbsign: the tamper test signs a UKI with a key the node does not know.
    command -v sbsign >/dev/null || need+=(sbsigntool)
    # The node's TPM2 (swtpm, a software TPM 2.0 QEMU talks to over a socket).
    command -v swtpm >/dev/null || need+=(swtpm)
    command -v swtpm_setup >/dev/null || need+=(swtpm-tools)
    command -v ssh >/dev/null || need+=(openssh-client)
    # The boot test tries /var's escrowed recovery key on its LUKS2 header.
    command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
    # The e2e test's second build signs with keys in a software HSM (SoftHSM2, PKCS#11).
    command -v softhsm2-util >/dev/null || need+=(softhsm2)
    for p in python3 zstd curl openssl socat; do command -v "$p" >/dev/null || need+=("$p"); done
    # The boot test's log collector (systemd-journal-remote: its package enables nothing;
    # socat its TLS).
    [ -x /usr/lib/systemd/systemd-journal-remote ] || need+=(systemd-journal-remote)
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing ${need[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    fi
}

# image_chronyd DIR: prints a chronyd to run: the host's, or the one of Debian's chrony
# package unpacked into DIR (installed, the package would enable and start a time service
# on a host that runs systemd).
image_chronyd() {
    if command -v chronyd; then return; fi
    mkdir -p "$1"
    (cd "$1" && apt-get download -q chrony >&2 && dpkg-deb -x chrony_*.deb pkg) || return
    # The libraries it links (libraries start nothing when installed).
    local libs=() l
    for l in libgnutls30 libnettle8 libedit2 libseccomp2 libcap2; do
        dpkg-query -W -f '${Status}' "$l" 2>/dev/null | grep -q 'ok installed' || libs+=("$l")
    done
    ((${#libs[@]} == 0)) ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${libs[@]}" >&2 || return
    echo "$1/pkg/usr/sbin/chronyd"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
free_udp_port() { python3 -c 'import socket;s=socket.socket(type=socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# GPT partition of IMAGE by label (a shell pattern) and, if given, type GUID: prints
# "OFFSET SIZE" in bytes of the first that matches.
image_partition() { # IMAGE LABEL [TYPE]
    python3 - "$1" "$2" "${3:-}" <<'PY'
import fnmatch, struct, sys, uuid
f = open(sys.argv[1], "rb")
f.seek(512)
hdr = f.read(92)
if hdr[:8] != b"EFI PART":
    sys.exit("no GPT in " + sys.argv[1])
lba, count, size = struct.unpack("<QII", hdr[72:88])
f.seek(lba * 512)
for _ in range(count):
    e = f.read(size)
    first, last = struct.unpack("<QQ", e[32:48])
    label = e[56:128].decode("utf-16le").rstrip("\0")
    ptype = str(uuid.UUID(bytes_le=e[:16]))
    if fnmatch.fnmatchcase(label, sys.argv[2]) and sys.argv[3].lower() in ("", ptype):
        print(first * 512, (last - first + 1) * 512)
        sys.exit(0)
sys.exit("no partition labelled %s %s in %s" % (sys.argv[2], sys.argv[3], sys.argv[1]))
PY
}

# uki_files UKI: the files in a UKI's early-microcode (.ucode) and initrd (.initrd)
# sections, one "SECTION PATH" line each (PE sections read here; each initrd member is a
# cpio, plain or zstd-compressed, padded to 4 bytes).
uki_files() {
    python3 - "$1" <<'PY'
import struct, subprocess, sys
d = open(sys.argv[1], "rb").read()
pe = struct.unpack_from("<I", d, 0x3C)[0]
if d[pe:pe + 4] != b"PE\0\0":
    sys.exit("not a PE file: " + sys.argv[1])
nsect, optsize = struct.unpack_from("<H", d, pe + 6)[0], struct.unpack_from("<H", d, pe + 20)[0]
table = pe + 24 + optsize
def cpio_names(b):
    off, names = 0, []
    while b[off:off + 6] == b"070701":
        namesize, filesize = int(b[off + 94:off + 102], 16), int(b[off + 54:off + 62], 16)
        name = b[off + 110:off + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            off = (off + 110 + namesize + 3) & ~3
            break
        names.append(name)
        off = (((off + 110 + namesize + 3) & ~3) + filesize + 3) & ~3
    return names, off
def zstd_frame_end(b, off):
    # RFC 8878: frame header, then blocks (3-byte headers) up to the last, then a checksum.
    fhd = b[off + 4]
    single = (fhd >> 5) & 1
    pos = off + 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
    while True:
        hdr = int.from_bytes(b[pos:pos + 3], "little")
        pos += 3 + (1 if (hdr >> 1) & 3 == 1 else hdr >> 3)
        if hdr & 1:
            return pos + (4 if (fhd >> 2) & 1 else 0)
for i in range(nsect):
    name, _, _, size, ptr = struct.unpack_from("<8sIIII", d, table + 40 * i)
    name = name.rstrip(b"\0").decode()
    if name not in (".ucode", ".initrd"):
        continue
    data, off = d[ptr:ptr + size], 0
    while off < len(data):
        if data[off:off + 4] == b"\x28\xb5\x2f\xfd":
            end = zstd_frame_end(data, off)
            member = subprocess.run(["zstd", "-dcq"], input=data[off:end], capture_output=True,
                                    check=True).stdout
            names, _ = cpio_names(member)
            off = end
        elif data[off:off + 6] == b"070701":
            names, used = cpio_names(data[off:])
            off += used
        elif data[off] == 0:
            off += 1
            continue
        else:
            sys.exit("%s: unknown data at %s+%d" % (sys.argv[1], name, off))
        for n in names:
            print(name, n)
PY
}

# node_disk IMAGE: a new server: a sparse copy of IMAGE with 4 GiB more for /var, firmware
# variables in setup mode, a TPM2 that never saw a boot.
node_disk() {
    cp --sparse=always "$(readlink -f "$1")" "$work/disk.raw"
    truncate -s +4G "$work/disk.raw"
    cp "$OVMF_VARS" "$work/vars.fd"
    rm -rf "$work/tpm" && mkdir -p "$work/tpm"
}

# node_esp: the ESP of $work/disk.raw as mtools names it (DISK@@OFFSET).
node_esp() {
    local off
    read -r off _ < <(image_partition "$work/disk.raw" '*' c12a7328-f81f-11d2-ba4b-00a0c93ec93b) || return 1
    echo "$work/disk.raw@@$off"
}

# node_secure_boot_off: the firmware back in setup mode and no keys on the ESP for
# systemd-boot to enroll: the next power-on runs with Secure Boot off.
node_secure_boot_off() {
    local esp
    esp=$(node_esp) || return 1
    cp "$OVMF_VARS" "$work/vars.fd"
    MTOOLS_SKIP_CHECK=1 mdeltree -i "$esp" ::/loader/keys
}

# node_tpm_start: the node's TPM2 (swtpm, state in $work/tpm: it keeps its keys and
# counters across power cycles, like the chip); sets tpm_pid and the QEMU arguments tpm_qemu.
# A new chip gets the SHA-256 PCR bank only (node_tpm_banks=sha1,sha256,... for others), as
# a server's TPM2 should be set up in its firmware (image/README.md, "Encrypted /var"): all
# policies use SHA-256, and SHA-1 is broken. swtpm alone allocates SHA-1, SHA-256, SHA-384
# and SHA-512 (measured: the boot time under TCG is the same within its noise either way,
# integration/bench/secure-boot.sh).
node_tpm_start() {
    if [ -z "$(ls -A "$work/tpm" 2>/dev/null)" ]; then
        mkdir -p "$work/tpm"
        swtpm_setup --tpm2 --tpmstate "$work/tpm" --pcr-banks "${node_tpm_banks:-sha256}" > "$work/swtpm-setup.log" 2>&1 ||
            { echo "lib.sh: swtpm_setup failed:" >&2; cat "$work/swtpm-setup.log" >&2; return 1; }
    fi
    # The previous power-on's swtpm, if QEMU's exit did not end it.
    if [ -n "${tpm_pid:-}" ] && kill -0 "$tpm_pid" 2>/dev/null; then
        kill "$tpm_pid"; wait "$tpm_pid" 2>/dev/null || true
    fi
    rm -f "$work/tpm.sock"
    swtpm socket --tpm2 --tpmstate dir="$work/tpm" --ctrl type=unixio,path="$work/tpm.sock" \
        --log file="$work/swtpm.log" &
    tpm_pid=$!
    local _
    for _ in $(seq 50); do [ -S "$work/tpm.sock" ] && break; sleep 0.1; done
    [ -S "$work/tpm.sock" ] || { echo "lib.sh: swtpm did not start (log: $work/swtpm.log)" >&2; return 1; }
    tpm_qemu=(-chardev socket,id=chrtpm,path="$work/tpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm
              -device tpm-crb,tpmdev=tpm0)
}

# node_start [NAME=VALUE | NAME=@FILE]...: boots $work/disk.raw with those
# credentials; sets qemu_pid, qemu_started (its start, seconds since the epoch), ssh_port
# and metrics_port (node-exporter's :9100);
# console in $work/console.log. Extra QEMU arguments in the array qemu_extra.
# node_tpm=none: no TPM2. node_console=ttyS1: the node has two serial ports and console.log is the second's (the
# first's output goes to console-ttyS0.log), for a node given the ttyS1 console add-on.
node_start() {
    local creds=() c name value serial=(-serial file:"$work/console.log")
    for c in "$@"; do
        name=${c%%=*}; value=${c#*=}
        if [ "${value:0:1}" = @ ]; then
            creds+=(-smbios "type=11,value=io.systemd.credential.binary:$name=$(base64 -w0 < "${value:1}")")
        else
            creds+=(-smbios "type=11,value=io.systemd.credential:$name=$value")
        fi
    done
    ssh_port=$(free_port)
    metrics_port=$(free_port)
    : > "$work/console.log"
    if [ "${node_console:-ttyS0}" = ttyS1 ]; then
        : > "$work/console-ttyS0.log"
        serial=(-serial file:"$work/console-ttyS0.log" -serial file:"$work/console.log")
    fi
    # One vCPU: with two, the node's kernel died in 3 of ~8 boot tests on one machine, each
    # time right at a nested VM's start or reset, where KVM flips static keys and the kernel
    # patches its own code while the other vCPU runs it (multi-threaded TCG); with one, 5
    # of 5 passed, about 100 s slower each.
    # node_tpm=none: a server without a TPM2 (benchmarks).
    if [ "${node_tpm:-swtpm}" = none ]; then tpm_qemu=(); else node_tpm_start || return 1; fi
    # SMM and a secure flash: the Secure Boot build keeps its variables where the OS cannot
    # write them.
    qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 3072 -machine q35,smm=on \
        -global driver=cfi.pflash01,property=secure,value=on \
        -drive if=pflash,format=raw,readonly=on,file="$OVMF_CODE" \
        -drive if=pflash,format=raw,file="$work/vars.fd" \
        -drive if=virtio,format=raw,file="$work/disk.raw",werror=report,rerror=report \
        -netdev user,id=mgmt,hostfwd=tcp:127.0.0.1:$ssh_port-:22,hostfwd=tcp:127.0.0.1:$metrics_port-:9100 \
        -device virtio-net-pci,netdev=mgmt,mac=$MGMT_MAC \
        -netdev user,id=lan,restrict=on,net=10.77.0.0/24 \
        -device virtio-net-pci,netdev=lan,mac=$LAN_MAC \
        "${tpm_qemu[@]}" "${creds[@]}" "${qemu_extra[@]}" \
        -display none "${serial[@]}" -monitor none &
    qemu_pid=$!
    qemu_started=$(date +%s)
}

# node_enroll: the first power-on of a server in setup mode (a new node_disk): systemd-boot
# finds the image's keys in /loader/keys/auto, enrolls db, KEK and PK (in a VM without
# asking; on a server it asks, or the BMC enrolls them: image/README.md) and resets, which
# -no-reboot turns into QEMU's exit. Secure Boot is on from the next power-on.
node_enroll() {
    local saved=("${qemu_extra[@]}") rc=0
    qemu_extra=(-no-reboot)
    node_start || { qemu_extra=("${saved[@]}"); return 1; }
    qemu_extra=("${saved[@]}")
    wait_console 'Custom Secure Boot keys successfully enrolled' 300 || rc=$?
    if [ "$rc" = 0 ]; then
        local deadline=$(( $(date +%s) + 60 ))
        while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
        kill -0 "$qemu_pid" 2>/dev/null && rc=3
    fi
    node_stop
    cp "$work/console.log" "$work/console-enroll.log"
    case $rc in
        0) return 0 ;;
        3) echo "node_enroll: the firmware did not reset within 60 s of the enrolment" >&2 ;;
        *) echo "node_enroll: systemd-boot did not enroll the Secure Boot keys (wait status $rc); console:" >&2
           tail -n 20 "$work/console.log" >&2 ;;
    esac
    return 1
}

# node_ssh_setup [KEY]: SSH to the node through QEMU's forward of $ssh_port (again after
# every node_start: a new port): sets sshopts, and $work/ssh-ctl, an ssh that thvcctl -H
# runs (THVCCTL_SSH) with KEY (default $work/ctl_key). Keepalives: a node that dies (a kernel
# panic) ends a command within 30 s instead of leaving it waiting forever.
node_ssh_setup() {
    sshopts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile="$work/known_hosts" -o BatchMode=yes
             -o ConnectTimeout=5 -o ServerAliveInterval=5 -o ServerAliveCountMax=6
             -o LogLevel=ERROR -p "$ssh_port")
    cat > "$work/ssh-ctl" <<W
#!/bin/sh
exec ssh ${sshopts[*]} -i ${1:-$work/ctl_key} "\$@"
W
    chmod +x "$work/ssh-ctl"
}
# vm COMMAND: COMMAND as root on the node (key $work/root_key).
vm() { ssh "${sshopts[@]}" -i "$work/root_key" root@127.0.0.1 "$@"; }
# check DESCRIPTION COMMAND: COMMAND as root on the node must succeed; says "ok" with its
# output through the script's log, or fails through the script's fail.
check() {
    local what=$1 out; shift
    if out=$(vm "$@" 2>&1); then log "ok: $what${out:+ ($(echo "$out" | tr '\n' ' ' | cut -c1-200))}"
    else echo "$out" >&2; fail "$what"; fi
}
# node_seal NAME=VALUE|NAME=@FILE: the node seals the credential to its TPM2 onto its ESP
# (/usr/lib/thvc/seal-credential, as root); prints what it says.
node_seal() {
    local name=${1%%=*} value=${1#*=}
    if [ "${value:0:1}" = @ ]; then vm "/usr/lib/thvc/seal-credential $name" < "${value:1}"
    else printf '%s' "$value" | vm "/usr/lib/thvc/seal-credential $name"
    fi
}

node_stop() {
    if [ -n "${qemu_pid:-}" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true
    fi
    qemu_pid=
    if [ -n "${tpm_pid:-}" ] && kill -0 "$tpm_pid" 2>/dev/null; then
        kill "$tpm_pid"; wait "$tpm_pid" 2>/dev/null || true
    fi
    tpm_pid=
}

# node_alive: QEMU still runs and the node's kernel has not panicked (the console says so;
# a panicked kernel without panic= hangs with QEMU still running). Every wait on the node
# asks this, so a dead node ends the wait at once instead of at its deadline.
node_alive() {
    [ -n "${qemu_pid:-}" ] && kill -0 "$qemu_pid" 2>/dev/null &&
        ! grep -qa 'Kernel panic - not syncing' "$work/console.log" 2>/dev/null
}

# wait_console PATTERN TIMEOUT: until the console shows PATTERN (extended regex);
# fails when QEMU exits or the time is up.
wait_console() {
    local deadline=$(( $(date +%s) + $2 ))
    until grep -qaE "$1" "$work/console.log"; do
        kill -0 "$qemu_pid" 2>/dev/null || return 2
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 2
    done
}
