#!/usr/bin/python3
"""Boot benchmark: thvc-vmm (virtio-mmio and virtio-pci) against QEMU microvm and QEMU q35,
run inside the test VM.

All variants (see variants.py) boot the same guest kernel, initramfs, command line (but
`pci=off` on virtio-mmio), vCPUs and memory, with a virtio-rng device each, alternating, N
rounds, for each vCPU count of --vcpus. For each boot it measures:
  * boot time: wall time from spawning the VMM process to the guest's init printing
    THVC-GUEST-READY on the serial console (for q35 this includes SeaBIOS);
  * VMM memory overhead: the process's peak RSS (VmHWM) minus the guest memory it touched
    (the resident part of the guest RAM mapping, from /proc/PID/smaps), read once the guest is
    up and idle.
Prints medians and the ratios thvc-pci/thvc-mmio, thvc-pci/qemu-q35 and thvc-mmio/qemu-microvm
(times: below 1.0x is faster). Not a test: nothing here passes or fails; a boot that fails is
reported with its console and counted, and the run goes on.
"""
import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

import variants

MARKER = b"THVC-GUEST-READY"


def guest_ram_rss_kib(pid, mem_mib):
    """Resident KiB of the mappings that hold guest RAM.

    Guest RAM is the anonymous mappings whose sizes add up to the guest's memory: one mapping
    of exactly mem_mib (both VMMs below 3 GiB). Falls back to the largest anonymous mapping.
    """
    want_kib = mem_mib * 1024
    mappings = []
    size = rss = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                if size is not None:
                    mappings.append((size, rss))
                size = rss = None
            elif line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    if size is not None:
        mappings.append((size, rss))
    exact = [r for s, r in mappings if s == want_kib]
    if exact:
        return exact[0]
    near = [m for m in mappings if want_kib <= m[0] <= want_kib + 4096]
    return max(near or mappings)[1]


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def boot_once(cmd, mem_mib, timeout):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    buf = b""
    try:
        while MARKER not in buf:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise RuntimeError(f"no {MARKER!r} within {timeout}s from {cmd[0]}:\n{buf[-2000:]!r}")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{cmd[0]} exited early ({proc.wait()}):\n{buf[-2000:]!r}")
                buf += chunk
        boot_s = time.monotonic() - start
        # Let the guest settle (its init is in a sleep loop with thvc.action=hang) before
        # reading memory, so both VMMs are measured in the same state.
        time.sleep(0.5)
        hwm = vm_hwm_kib(proc.pid)
        guest = guest_ram_rss_kib(proc.pid, mem_mib)
        return boot_s, hwm - guest
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The uncompressed ELF vmlinux by default, as production VMMs boot (Firecracker only boots
    # that), for all: QEMU loads it through its PVH entry. Pass --kernel "$THVC_GUEST_KERNEL"
    # for the bzImage, whose xz decompression inside the guest then dominates every variant.
    variants.add_arguments(ap, os.environ.get("THVC_GUEST_VMLINUX"), memory_default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=120, help="seconds per boot")
    args = ap.parse_args()
    args.initrd = args.initrd or os.environ.get("THVC_GUEST_INITRAMFS")
    if not args.kernel or not args.initrd:
        sys.exit("boot.py: --kernel/--initrd (or THVC_GUEST_VMLINUX/THVC_GUEST_INITRAMFS) needed")

    results = {}
    failures = {}
    for r, cpus, name in variants.schedule(args.rounds, args.vcpus, args.variants):
        cmd = variants.command(name, args, cpus, "thvc.action=hang")
        try:
            boot_s, overhead_kib = boot_once(cmd, args.memory, args.timeout)
        except (RuntimeError, OSError) as e:
            failures[(name, cpus)] = failures.get((name, cpus), 0) + 1
            print(f"round {r + 1:2d} {cpus} vCPU {name:13s} FAILED: {e}", flush=True)
            continue
        results[(r, cpus, name)] = {"boot": boot_s, "overhead": overhead_kib / 1024}
        print(f"round {r + 1:2d} {cpus} vCPU {name:13s} boot {boot_s:6.3f} s  "
              f"overhead {overhead_kib / 1024:7.2f} MiB", flush=True)

    print()
    print(variants.table(
        results,
        [("boot", "boot to init", "s", ".2f"),
         ("overhead", "VMM memory overhead", "MiB", ".1f")],
        args.vcpus, args.variants,
        footnote=f"medians of {args.rounds} rounds, {args.memory} MiB, kernel "
                 f"{os.path.basename(args.kernel)}; ratios of medians (median of per-round "
                 f"ratios); lower is better; failed boots: {variants.failures_text(failures)}"))


if __name__ == "__main__":
    main()
