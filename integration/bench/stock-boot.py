#!/usr/bin/python3
"""Boot benchmark of a stock distribution guest: thvc-vmm against QEMU microvm, in the test VM.

The guest is the stock Debian trixie of integration/guest/stock/build (Debian's cloud kernel
and initramfs-tools initrd, systemd, udev, systemd-networkd, root on virtio-blk, one
virtio-net NIC on a TAP). Both VMMs boot it with the same kernel, initrd, command line, vCPUs
and memory, from a fresh copy of the root image each time, alternating, N rounds. Measured:
wall time from spawning the VMM to the guest's report that systemd finished booting
(THVC-STOCK-STATE, printed once `systemctl is-system-running --wait` returns), and the
state it reached. Prints medians and the thvc/QEMU ratio. Not a test: nothing passes or fails.
"""
import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MARKER = b"THVC-STOCK-STATE "
TAP = "thvcbench0"


def sh(*cmd):
    subprocess.run(cmd, check=True)


def boot_once(cmd, timeout):
    """Seconds from spawn to the marker, and the state the guest reported."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    buf = b""
    try:
        while True:
            at = buf.find(MARKER)
            if at >= 0 and b"\n" in buf[at:]:
                line = buf[at + len(MARKER):].split(b"\n", 1)[0]
                return time.monotonic() - start, line.decode(errors="replace").split()[0]
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise RuntimeError(f"no {MARKER!r} within {timeout}s:\n{buf[-1500:]!r}")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"exited early ({proc.wait()}):\n{buf[-1500:]!r}")
                buf += chunk
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--stock-dir", default=os.environ.get("THVC_STOCK_DIR"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    if not args.stock_dir:
        sys.exit("stock-boot.py: --stock-dir (or THVC_STOCK_DIR from integration/testvm/assets) needed")
    kernel = os.path.join(args.stock_dir, "vmlinuz")
    initrd = os.path.join(args.stock_dir, "initrd.img")
    golden = os.path.join(args.stock_dir, "root.ext4")
    cmdline = "console=ttyS0 root=/dev/vda rw quiet"

    def thvc(image):
        return [args.vmm, "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
                "--cpus", str(args.cpus), "--memory", str(args.memory),
                "--disk", f"path={image}", "--net", f"tap={TAP}"]

    def qemu(image):
        return [args.qemu, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=on",
                "-accel", "kvm", "-cpu", "host", "-smp", str(args.cpus), "-m", str(args.memory),
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                "-drive", f"id=root,file={image},format=raw,if=none",
                "-device", "virtio-blk-device,drive=root",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", "virtio-net-device,netdev=n0"]

    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", TAP)
    sh("ip", "link", "set", TAP, "up")
    work = tempfile.mkdtemp(prefix="thvc-stock-bench-")
    names = ("thvc-vmm", "qemu-microvm")
    times = {n: [] for n in names}
    failures = {n: 0 for n in names}
    try:
        for r in range(args.rounds):
            order = [("thvc-vmm", thvc), ("qemu-microvm", qemu)]
            if r % 2:
                order.reverse()
            for name, make_cmd in order:
                image = os.path.join(work, "root.ext4")
                subprocess.run(["cp", "--sparse=always", golden, image], check=True)
                try:
                    seconds, state = boot_once(make_cmd(image), args.timeout)
                except RuntimeError as e:
                    # Nested guests under TCG occasionally die (either VMM): count it, go on.
                    failures[name] += 1
                    print(f"round {r + 1} {name:13s} FAILED: {str(e)[-1500:]}", flush=True)
                    continue
                times[name].append(seconds)
                print(f"round {r + 1} {name:13s} {state:9s} after {seconds:6.1f} s", flush=True)
    finally:
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    if not all(times.values()):
        sys.exit(f"stock-boot.py: no successful boot for some VMM: failures {failures}")
    med = {n: statistics.median(v) for n, v in times.items()}
    print()
    for n in names:
        print(f"{n:14s} boot to systemd's end of boot: median {med[n]:6.1f} s "
              f"({len(times[n])} boots, {failures[n]} failed)")
    print(f"ratio thvc/qemu: {med['thvc-vmm'] / med['qemu-microvm']:.2f}x "
          f"({args.cpus} vCPUs, {args.memory} MiB)")


if __name__ == "__main__":
    main()
