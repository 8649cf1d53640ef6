#!/usr/bin/python3
"""Boot benchmark: thvc-vmm against QEMU microvm, run inside the test VM.

Both boot the same guest kernel, initramfs, command line, vCPUs and memory, alternating, N
rounds. For each boot it measures:
  * boot time: wall time from spawning the VMM process to the guest's init printing
    THVC-GUEST-READY on the serial console;
  * VMM memory overhead: the process's peak RSS (VmHWM) minus the guest memory it touched
    (the resident part of the guest RAM mapping, from /proc/PID/smaps), read once the guest is
    up and idle.
Prints medians and the thvc/QEMU ratios. Not a test: nothing here passes or fails.
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
    ap.add_argument("--vmm", required=True, help="thvc-vmm binary")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    # The uncompressed ELF vmlinux by default, as production VMMs boot (Firecracker only boots
    # that), for both: QEMU loads it through its PVH entry. Pass --kernel "$THVC_GUEST_KERNEL"
    # for the bzImage, whose xz decompression inside the guest then dominates both.
    ap.add_argument("--kernel", default=os.environ.get("THVC_GUEST_VMLINUX"))
    ap.add_argument("--initrd", default=os.environ.get("THVC_GUEST_INITRAMFS"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=256, help="MiB")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    if not args.kernel or not args.initrd:
        sys.exit("boot.py: --kernel/--initrd (or THVC_GUEST_VMLINUX/THVC_GUEST_INITRAMFS) needed")

    cmdline = "console=ttyS0 panic=1 pci=off quiet thvc.action=hang"
    thvc = [args.vmm, "--kernel", args.kernel, "--initrd", args.initrd, "--cmdline", cmdline,
            "--cpus", str(args.cpus), "--memory", str(args.memory)]
    qemu = [args.qemu, "-M", "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on",
            "-accel", "kvm", "-cpu", "host", "-smp", str(args.cpus), "-m", str(args.memory),
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", args.kernel, "-initrd", args.initrd, "-append", cmdline]
    results = {"thvc-vmm": [], "qemu-microvm": []}
    for r in range(args.rounds):
        order = [("thvc-vmm", thvc), ("qemu-microvm", qemu)]
        if r % 2:
            order.reverse()
        for name, cmd in order:
            boot_s, overhead_kib = boot_once(cmd, args.memory, args.timeout)
            results[name].append((boot_s, overhead_kib))
            print(f"round {r + 1:2d} {name:13s} boot {boot_s:6.3f} s  overhead {overhead_kib / 1024:7.2f} MiB",
                  flush=True)

    med = {n: (statistics.median(b for b, _ in v), statistics.median(o for _, o in v))
           for n, v in results.items()}
    t, q = med["thvc-vmm"], med["qemu-microvm"]
    print()
    print(f"{'':14s}{'boot median':>14s}{'overhead median':>18s}")
    for name, (b, o) in med.items():
        print(f"{name:14s}{b:12.3f} s{o / 1024:14.2f} MiB")
    print(f"ratio thvc/qemu: boot {t[0] / q[0]:.2f}x, memory overhead {t[1] / q[1]:.2f}x "
          f"({args.rounds} rounds, {args.cpus} vCPU, {args.memory} MiB)")


if __name__ == "__main__":
    main()
