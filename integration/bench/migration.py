#!/usr/bin/python3
"""Live migration benchmark: thvc-vmm against QEMU, run inside the test VM.

Both VMMs run the same guest (kernel, initramfs, vCPUs, memory; virtio-mmio devices: thvc-vmm
--transport mmio, QEMU microvm) with the counter action, idle or rewriting a part of its
memory all the time (thvc.dirty_mib), and migrate it to a second process of the same VMM on
the same machine over a Unix socket, with a 300 ms downtime target. Per migration:
  * downtime: the guest's pause, as the VMM reports it (thvc-vmm: from pausing the guest to
    the target's answer that it runs; QEMU: query-migrate's "downtime");
  * total: from the migrate request to the end (thvc-vmm: total_ms; QEMU: "total-time");
  * and that the guest's count goes on in the target (or the migration failed: counted).
Alternating, N rounds; prints medians and the ratio thvc/qemu (lower is better). Not a test:
nothing here passes or fails; a failed migration is reported and counted, the run goes on.
"""
import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("thvc", "qemu")
# With its option ROMs: QEMU 10's microvm loads a bzImage through the linuxboot ROM.
MICROVM = "microvm,rtc=off,pit=off,pic=off,isa-serial=on,acpi=on"
DOWNTIME_MS = 300


class Console:
    """A VMM process whose serial console is read line by line."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.buf = b""

    def wait_for(self, marker, timeout):
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no {marker!r} within {timeout}s:\n{self.buf[-2000:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the VMM ended before {marker!r}:\n{self.buf[-2000:]!r}")
                self.buf += chunk
        return self.buf

    def drain(self, quiet=0.5):
        """Reads what the process printed until it is quiet (or gone)."""
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], quiet)
            if not ready:
                return
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            self.buf += chunk

    def wait_count_above(self, n, timeout):
        """Waits until the guest printed a count above n."""
        deadline = time.monotonic() + timeout
        while (self.last_count() or -1) <= n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no count above {n} within {timeout}s:\n{self.buf[-2000:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the VMM ended:\n{self.buf[-2000:]!r}")
                self.buf += chunk

    def last_count(self):
        counts = [int(line.split(b"THVC-COUNT=")[1].split()[0])
                  for line in self.buf.split(b"\n") if b"THVC-COUNT=" in line and b" up=" in line]
        return counts[-1] if counts else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait_path(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def guest_cmdline(dirty_mib):
    extra = f" thvc.dirty_mib={dirty_mib}" if dirty_mib else ""
    return f"console=ttyS0 panic=1 pci=off quiet thvc.action=counter{extra}"


def thvc_once(args, work, mem, dirty):
    api, incoming = os.path.join(work, "api.sock"), os.path.join(work, "in.sock")
    shape = ["--transport", "mmio", "--cpus", str(args.cpus), "--memory", str(mem)]
    src = Console([args.vmm, "--kernel", args.kernel, "--initrd", args.initrd,
                   "--cmdline", guest_cmdline(dirty), "--api-socket", api] + shape)
    dst = Console([args.vmm, "--incoming", f"unix:{incoming}"] + shape)
    try:
        src.wait_for(b"THVC-COUNT=10 ", args.timeout)
        wait_path(incoming)
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.connect(incoming)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.connect(api)
        request = json.dumps({"request": "migrate", "downtime_ms": DOWNTIME_MS}) + "\n"
        socket.send_fds(ctl, [request.encode()], [stream.fileno()])
        stream.close()
        ctl.settimeout(args.timeout)
        answer = json.loads(ctl.makefile().readline())
        if not answer.get("ok"):
            raise RuntimeError(f"migrate: {answer}")
        src.drain()
        dst.wait_count_above(src.last_count() + 3, args.timeout)
        r = answer["result"]
        return {"downtime": r["downtime_ms"] / 1000, "total": r["total_ms"] / 1000,
                "bytes": r["bytes"] / 2**20}
    except Exception as e:
        src.drain(0.2)
        dst.drain(0.2)
        raise RuntimeError(f"{e}\nsource: {src.buf[-1500:]!r}\ntarget: {dst.buf[-1500:]!r}") from e
    finally:
        src.stop()
        dst.stop()


def qmp(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting

    def call(command, **arguments):
        f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    call("qmp_capabilities")
    return call


def qemu_once(args, work, mem, dirty):
    src_qmp, dst_qmp = os.path.join(work, "src.qmp"), os.path.join(work, "dst.qmp")
    incoming = os.path.join(work, "in.sock")
    common = ["-M", MICROVM, "-accel", "kvm", "-cpu", "host", "-smp", str(args.cpus),
              "-m", str(mem), "-nodefaults", "-no-user-config", "-nographic",
              "-serial", "stdio", "-no-reboot", "-kernel", args.kernel, "-initrd", args.initrd,
              "-append", guest_cmdline(dirty), "-device", "virtio-rng-device"]
    src = Console([args.qemu] + common + ["-qmp", f"unix:{src_qmp},server=on,wait=off"])
    dst = Console([args.qemu] + common + ["-qmp", f"unix:{dst_qmp},server=on,wait=off",
                                          "-incoming", f"unix:{incoming}"])
    try:
        src.wait_for(b"THVC-COUNT=10 ", args.timeout)
        wait_path(incoming)
        wait_path(src_qmp)
        call = qmp(src_qmp)
        call("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS})
        call("migrate", uri=f"unix:{incoming}")
        deadline = time.monotonic() + args.timeout
        while True:
            info = call("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU migration: {info}")
            time.sleep(0.05)
        src.drain()
        dst.wait_count_above(src.last_count() + 3, args.timeout)
        ram = info.get("ram", {})
        return {"downtime": info["downtime"] / 1000, "total": info["total-time"] / 1000,
                "bytes": ram.get("transferred", 0) / 2**20}
    finally:
        src.stop()
        dst.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", default=os.environ.get("THVC_GUEST_KERNEL"))
    ap.add_argument("--initrd", default=os.environ.get("THVC_GUEST_INITRAMFS"))
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", default="256,1024", help="MiB, comma-separated")
    ap.add_argument("--dirty", default="0,64", help="MiB the guest rewrites, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    if not (args.kernel and args.initrd):
        sys.exit("set THVC_GUEST_KERNEL and THVC_GUEST_INITRAMFS (integration/testvm/assets --print-env)")
    sizes = [int(m) for m in args.memory.split(",")]
    loads = [int(d) for d in args.dirty.split(",")]
    results, failures = {}, {}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for mem in sizes:
            for dirty in loads:
                for variant in order:
                    key = (variant, mem, dirty)
                    with tempfile.TemporaryDirectory() as work:
                        try:
                            once = thvc_once if variant == "thvc" else qemu_once
                            m = once(args, work, mem, dirty)
                            results.setdefault(key, []).append(m)
                            print(f"round {r + 1}: {variant} {mem} MiB dirty {dirty} MiB: "
                                  f"downtime {m['downtime'] * 1000:.0f} ms, total "
                                  f"{m['total']:.2f} s, {m['bytes']:.0f} MiB sent",
                                  file=sys.stderr, flush=True)
                        except Exception as e:  # noqa: BLE001 - reported and counted
                            failures[key] = failures.get(key, 0) + 1
                            print(f"round {r + 1}: {variant} {mem} MiB dirty {dirty} MiB "
                                  f"FAILED: {e}", file=sys.stderr, flush=True)
    print(f"\n{args.cpus} vCPU, downtime target {DOWNTIME_MS} ms, medians of {args.rounds} "
          "rounds (lower is better):\n")
    print("| guest | thvc downtime | qemu downtime | thvc/qemu | thvc total | qemu total | "
          "thvc/qemu | MiB sent thvc / qemu |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mem in sizes:
        for dirty in loads:
            def med(variant, metric):
                values = [m[metric] for m in results.get((variant, mem, dirty), [])]
                return statistics.median(values) if values else None

            def show(v, unit, scale=1, fmt=".0f"):
                return "failed" if v is None else f"{v * scale:{fmt}} {unit}"

            def ratio(a, b):
                return "-" if a is None or not b else f"{a / b:.2f}x"

            row = [f"{mem} MiB, " + (f"rewriting {dirty} MiB" if dirty else "idle")]
            td, qd = med("thvc", "downtime"), med("qemu", "downtime")
            tt, qt = med("thvc", "total"), med("qemu", "total")
            tb, qb = med("thvc", "bytes"), med("qemu", "bytes")
            row += [show(td, "ms", 1000), show(qd, "ms", 1000), ratio(td, qd),
                    show(tt, "s", 1, ".2f"), show(qt, "s", 1, ".2f"), ratio(tt, qt),
                    f"{show(tb, '', 1)}/ {show(qb, '', 1)}"]
            print("| " + " | ".join(row) + " |")
    print(f"\nfailed: {failures or 'none'}")


if __name__ == "__main__":
    main()
