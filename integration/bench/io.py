#!/usr/bin/python3
"""I/O benchmark: virtio-blk and virtio-net throughput of thvc-vmm (virtio-mmio and virtio-pci)
against QEMU microvm (virtio-mmio) and QEMU q35 (virtio-pci), run inside the test VM.

Each round boots one guest per variant (see variants.py) and per vCPU count of --vcpus,
alternating, with the same kernel, initramfs, command line (but `pci=off` on virtio-mmio),
memory and a fresh copy of the same ext4 root image on virtio-blk, a virtio-net NIC and a
virtio-rng device. The guest's /sbin/init:
  * writes a --blk-mib (256) MiB file with direct I/O and reads it back with direct I/O
    (busybox dd, timed with the guest's clock),
  * sends --net-mib (32) MiB over TCP to a receiver on the host side of a bridge (this
    script), which measures the rate from the first to the last byte.
Prints medians and the ratios thvc-pci/thvc-mmio, thvc-pci/qemu-q35 and
thvc-mmio/qemu-microvm (rates: above 1.0x is faster). Not a test: nothing here passes or fails.
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import variants

HOST_IP, GUEST_IP, PORT = "10.88.0.1", "10.88.0.2", 5201
BRIDGE, TAP = "thvcbenchbr", "thvcbenchtap"


def parallel(streams, command):
    """Shell lines that run `command` (with $i, the stream's number) `streams` times at once,
    stream i pinned to CPU i modulo the guest's CPUs, and wait for all; one stream runs
    unpinned (as this benchmark always did)."""
    if streams == 1:
        return command.replace("$i", "0")
    return (f"i=0; while [ $i -lt {streams} ]; do "
            f"taskset -c $((i % ncpu)) sh -c \"{command}\" & i=$((i + 1)); done; wait")


def guest_init(blk_mib, net_mib, streams):
    blk_each, net_each = blk_mib // streams, net_mib // streams
    write = parallel(streams, f"dd if=/dev/zero of=/bench$i.dat bs=1M count={blk_each} "
                              "oflag=direct conv=fsync 2>/dev/null")
    read = parallel(streams, "dd if=/bench$i.dat of=/dev/null bs=1M iflag=direct 2>/dev/null")
    send = parallel(streams, f"dd if=/dev/zero bs=1M count={net_each} 2>/dev/null | nc {HOST_IP} {PORT}")
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0
ncpu=$(grep -c ^processor /proc/cpuinfo)
# busybox dd reports no rate: time it with the guest's clock (/proc/uptime, 10 ms steps).
now() {{ read -r up _ </proc/uptime; echo "$up"; }}
t0=$(now); {write}; t1=$(now)
echo "BENCH-WRITE $(({blk_each * streams} << 20)) $t0 $t1"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); {read}; t1=$(now)
echo "BENCH-READ $(({blk_each * streams} << 20)) $t0 $t1"
n=0; until ping -c 1 -W 1 {HOST_IP} >/dev/null; do n=$((n+1)); [ $n -ge 60 ] && break; done
# Where a guest that dies got to (nested guests under TCG do, now and then).
echo "BENCH-NET-START after $n failed pings"
{send}
echo BENCH-SENT
# Average transmitted frame: ~1.5 KB means no TSO, tens of KB means TSO frames reach the device.
read -r txp </sys/class/net/eth0/statistics/tx_packets; read -r txb </sys/class/net/eth0/statistics/tx_bytes
echo "BENCH-TX-FRAMES $txp $txb"
# Which queues carried the load (virtio-pci: one MSI-X vector per queue).
grep -E 'virtio[0-9]+-(req|input|output)' /proc/interrupts | awk '{{s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print "BENCH-QUEUE-IRQS " $NF " " s}}'
# Let the console send the line above before the power goes (busybox stty drains on tcsetattr).
stty -F /dev/console "$(stty -F /dev/console -g)"
sync; poweroff -f
"""


def make_tap(multi_queue):
    """(Re)creates the bench TAP on the bridge: multi_queue for the variants that can attach
    several queues to it."""
    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
       *(["multi_queue"] if multi_queue else []))
    sh("ip", "link", "set", TAP, "master", BRIDGE, "up")


def sh(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_image(workdir, blk_mib, net_mib, streams):
    tree = os.path.join(workdir, "tree")
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(tree, "bin/busybox"))
    with open(os.path.join(tree, "sbin/init"), "w") as f:
        f.write(guest_init(blk_mib, net_mib, streams))
    os.chmod(os.path.join(tree, "sbin/init"), 0o755)
    image = os.path.join(workdir, "root.ext4")
    sh("mkfs.ext4", "-q", "-F", "-d", tree, image, f"{max(512, blk_mib + 128)}M")
    return image


def rate_mb_s(line):
    """The guest's 'BYTES START END' (START and END in seconds of guest uptime) as MB/s."""
    m = re.fullmatch(r"(\d+) ([\d.]+) ([\d.]+)", line.strip())
    if not m or float(m.group(3)) <= float(m.group(2)):
        raise RuntimeError(f"cannot parse the guest's timing: {line!r}")
    return int(m.group(1)) / (float(m.group(3)) - float(m.group(2))) / 1e6


KVM_DEBUGFS = "/sys/kernel/debug/kvm"
# Per-VM KVM counters (vCPU counters summed over the VM's vCPUs), the same for both VMMs:
# what the TCP transfer costs in exits, kicks and injected interrupts.
KVM_STATS = ("exits", "io_exits", "mmio_exits", "irq_injections", "halt_exits",
             "halt_wakeup", "signal_exits", "irq_exits")


def kvm_stats(pid):
    """The KVM counters of process `pid`'s VM, or None if it has none (yet)."""
    if pid is None or not os.path.isdir(KVM_DEBUGFS):
        return None
    for entry in os.listdir(KVM_DEBUGFS):
        if entry.split("-", 1)[0] == str(pid):
            stats = {}
            for name in KVM_STATS:
                try:
                    with open(os.path.join(KVM_DEBUGFS, entry, name)) as f:
                        stats[name] = int(f.read())
                except (OSError, ValueError):
                    pass
            return stats
    return None


TRACEFS = "/sys/kernel/tracing"
TRACE_EVENT = os.path.join(TRACEFS, "events/kvm/kvm_exit")


def mount_tracefs():
    """Mounts tracefs unless its kvm events are already there (the test VM starts without)."""
    if not os.path.isdir(os.path.join(TRACEFS, "events/kvm")):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS], stderr=subprocess.DEVNULL)


# SVM exit codes (the test VM's CPU is AMD): what each kind of exit is.
SVM_EXITS = {0x60: "intr", 0x61: "nmi", 0x64: "vintr", 0x72: "cpuid", 0x78: "hlt", 0x7b: "ioio",
             0x7c: "msr", 0x81: "vmmcall", 0x400: "npf(mmio)", 0x401: "avic_ipi",
             0x402: "avic_noaccel", 0x7f: "shutdown", 0x77: "pause"}


def exit_reasons():
    """Exits by reason since the histogram trigger was set (all VMs), or None."""
    try:
        with open(os.path.join(TRACE_EVENT, "hist")) as f:
            text = f.read()
    except OSError:
        return None
    counts = {}
    for m in re.finditer(r"exit_reason:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)", text):
        code = int(m.group(1))
        counts[SVM_EXITS.get(code, hex(code))] = int(m.group(2))
    return counts


def set_exit_histogram(on):
    """Sets (and returns the empty counts) or removes the kvm_exit histogram trigger."""
    with open(os.path.join(TRACE_EVENT, "trigger"), "w") as f:
        f.write(("" if on else "!") + "hist:keys=exit_reason:size=256")
    return {} if on else None


class Receiver:
    """Accepts `streams` connections and measures how fast they deliver `nbytes` together
    (from the first byte of any to the last of all); meanwhile takes the VM's KVM counters at
    the first and the last byte (set `pid` to the VMM's process)."""

    def __init__(self, nbytes, streams=1):
        self.nbytes = nbytes
        self.streams = streams
        self.pid = None
        self.kvm_delta = None
        self.trace_exits = False
        self.reason_delta = None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_IP, PORT))
        self.sock.listen(streams)
        self.sock.settimeout(600)
        self.result = None
        self.lock = threading.Lock()
        self.total = 0
        self.start = self.first = self.first_reasons = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        readers = []
        try:
            for _ in range(self.streams):
                conn, _ = self.sock.accept()
                t = threading.Thread(target=self.read, args=(conn,), daemon=True)
                t.start()
                readers.append(t)
        except OSError:  # stop() shut the listening socket down
            return
        for t in readers:
            t.join()
        end = time.monotonic()
        start = self.start
        self.result = (self.total, self.total / (end - start) / 1e6 if start and end > start else 0.0)

    def read(self, conn):
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            with self.lock:
                if self.start is None:
                    self.start = time.monotonic()
                    self.first = kvm_stats(self.pid)
                    # The histogram costs time on every exit: on during the transfer only.
                    self.first_reasons = set_exit_histogram(True) if self.trace_exits else None
                before = self.total
                self.total += len(data)
                if before < self.nbytes <= self.total:
                    self.finished()
        conn.close()

    def finished(self):
        """At the last byte: the counters' deltas since the first."""
        last = kvm_stats(self.pid)
        if self.first and last:
            self.kvm_delta = {k: last[k] - self.first[k] for k in self.first if k in last}
        last_reasons = exit_reasons() if self.trace_exits else None
        if self.trace_exits:
            set_exit_histogram(False)
        if self.first_reasons is not None and last_reasons:
            self.reason_delta = {k: v - self.first_reasons.get(k, 0)
                                 for k, v in last_reasons.items()}

    def stop(self):
        """Gives up on the connection: wakes the accepting thread and frees the port."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)

    def wait(self):
        self.thread.join(600)
        self.sock.close()
        if not self.result or self.result[0] != self.nbytes:
            raise RuntimeError(f"receiver got {self.result}")
        return self.result[1]


def stuck_report(pid):
    """Why a guest that timed out is silent: each VMM thread's state and where it waits, and
    the VM's KVM counters over 3 s. Tells a VMM that hangs in user space (a vCPU thread not in
    the KVM_RUN ioctl) from a guest that halted and waits for an interrupt that never comes
    (halt_exits flat, vCPU threads asleep in KVM_RUN) from one that runs in a loop (exits
    climbing)."""
    lines = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"no threads to report: {e}"
    for tid in tids:
        fields = {}
        for name in ("comm", "wchan", "syscall"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    fields[name] = f.read().strip()
            except OSError:
                fields[name] = "?"
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        syscall = fields["syscall"].split()[0] if fields["syscall"] != "?" else "?"
        lines.append(f"  thread {tid} {fields['comm']}: state {state}, wchan {fields['wchan']}, "
                     f"syscall {syscall}")
    before = kvm_stats(pid)
    time.sleep(3)
    after = kvm_stats(pid)
    if before and after:
        lines.append("  KVM counters over 3 s: " + ", ".join(
            f"{k} +{after[k] - before[k]}" for k in before if k in after))
    else:
        lines.append("  no KVM counters (debugfs)")
    lines.append(exit_trace(tids))
    return "\n".join(lines)


def exit_trace(tids, seconds=1.0):
    """The most frequent exits and page faults of threads `tids` over `seconds` (the
    kvm:kvm_exit and kvm:kvm_page_fault tracepoints): where a guest that makes KVM exit in a
    loop is stuck (exit reason, guest RIP, faulting guest-physical address)."""
    events = ("kvm/kvm_exit", "kvm/kvm_page_fault")
    mount_tracefs()

    def put(path, text):
        with open(os.path.join(TRACEFS, path), "w") as f:
            f.write(text)

    try:
        put("trace", "")
        try:
            for event in events:
                put(f"events/{event}/filter", " || ".join(f"common_pid == {t}" for t in tids))
                put(f"events/{event}/enable", "1")
            time.sleep(seconds)
        finally:
            # Tracing left on would slow every later guest of the run.
            for event in events:
                put(f"events/{event}/enable", "0")
                put(f"events/{event}/filter", "0")
        with open(os.path.join(TRACEFS, "trace")) as f:
            text = f.read()
        put("trace", "")
    except OSError as e:
        return f"  no exit trace: {e}"
    counts = {}
    for line in text.splitlines():
        m = re.search(r"(kvm_exit|kvm_page_fault): (.*)", line)
        if m:
            key = f"{m.group(1)}: {m.group(2)}"
            counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return (f"  exits and page faults in {seconds:.0f} s (most frequent):\n" +
            "\n".join(f"    {n:6d} x {what}" for what, n in top) if top
            else "  no exits or page faults traced")


def run_guest(name, cmd, timeout, receiver):
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    receiver.pid = proc.pid
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Say how far the guest got and what the VMM and KVM are doing: a timeout without
        # its console explains nothing.
        report = stuck_report(proc.pid)
        proc.kill()
        stdout, stderr = proc.communicate()
        # The report last: the caller prints only the end of the message.
        raise RuntimeError(f"{name} timed out after {timeout:.0f} s; console:\n"
                           f"{stdout.decode(errors='replace')[-1500:]}\n"
                           f"{stderr.decode(errors='replace')[-1000:]}\n"
                           f"state when it timed out:\n{report}") from None
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    console = out.stdout.decode(errors="replace")
    lines = {l.split(" ", 1)[0]: l.split(" ", 1)[1] for l in console.splitlines()
             if l.startswith("BENCH-") and " " in l}
    if "BENCH-WRITE" not in lines or "BENCH-READ" not in lines or "BENCH-SENT" not in console:
        raise RuntimeError(f"{name} exited {out.returncode}; console:\n{console[-3000:]}\n"
                           f"{out.stderr.decode(errors='replace')[-2000:]}")
    queues = [l.split(" ", 2)[1:] for l in console.splitlines() if l.startswith("BENCH-QUEUE-IRQS ")]
    if queues:
        print(f"  {name}: interrupts per queue: " + ", ".join(f"{q} {n}" for q, n in queues), flush=True)
    if "BENCH-TX-FRAMES" in lines:
        packets, octets = (int(x) for x in lines["BENCH-TX-FRAMES"].split())
        print(f"  {name}: guest sent {packets} frames, {octets // max(packets, 1)} bytes on average",
              flush=True)
    return rate_mb_s(lines["BENCH-WRITE"]), rate_mb_s(lines["BENCH-READ"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants.add_arguments(ap, os.environ.get("THVC_GUEST_KERNEL"), memory_default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blk-mib", type=int, default=256, help="MiB written, then read (default 256)")
    # TCP through nested KVM in a software-emulated VM moves a few MB/s: 32 MiB keeps a round
    # within minutes and is still thousands of full-size segments.
    ap.add_argument("--net-mib", type=int, default=32, help="MiB sent over TCP (default 32)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per guest")
    ap.add_argument("--streams", type=int, default=1,
                    help="parallel writers, readers and TCP connections, stream i pinned to "
                         "vCPU i mod vCPUs (default 1, unpinned): what a multiqueue device "
                         "needs to use more than one queue")
    ap.add_argument("--exit-reasons", action="store_true",
                    help="count KVM exits by reason during the TCP transfer (kvm_exit histogram)")
    args = ap.parse_args()
    args.initrd = args.initrd or os.environ.get("THVC_GUEST_INITRAMFS")
    if not args.kernel or not args.initrd:
        sys.exit("io.py: --kernel/--initrd (or THVC_GUEST_KERNEL/THVC_GUEST_INITRAMFS) needed")
    if args.streams < 1 or args.blk_mib % args.streams or args.net_mib % args.streams:
        sys.exit("io.py: --streams must be at least 1 and divide --blk-mib and --net-mib")
    net_bytes = args.net_mib << 20

    if not os.path.isdir(KVM_DEBUGFS):
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
                       stderr=subprocess.DEVNULL)
    if args.exit_reasons:
        mount_tracefs()
        if not os.path.isdir(TRACE_EVENT):
            sys.exit("io.py: --exit-reasons needs tracefs with the kvm:kvm_exit event")
    subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    work = tempfile.mkdtemp(prefix="thvc-io-bench-")
    golden = make_image(work, args.blk_mib, args.net_mib, args.streams)
    mac = "52:54:00:88:00:02"

    # (round, vCPUs, variant) -> rates of the successful guests.
    results = {}
    failures = {}
    try:
        for r, cpus, name in variants.schedule(args.rounds, args.vcpus, args.variants):
            make_tap(variants.multi_queue_tap(name))
            image = os.path.join(work, f"{name}.ext4")
            shutil.copyfile(golden, image)
            cmd = variants.command(name, args, cpus, "thvc.action=root thvc.root=/dev/vda",
                                   disk=image, tap=TAP, mac=mac)
            receiver = Receiver(net_bytes, args.streams)
            receiver.trace_exits = args.exit_reasons
            tag = f"{cpus} vCPU {name}"
            try:
                write, read = run_guest(tag, cmd, args.timeout, receiver)
                net = receiver.wait()
                if receiver.kvm_delta:
                    print(f"  {tag}: KVM per MiB sent: " + ", ".join(
                        f"{k} {v / args.net_mib:.0f}" for k, v in receiver.kvm_delta.items()),
                        flush=True)
                if receiver.reason_delta:
                    top = sorted(receiver.reason_delta.items(), key=lambda kv: -kv[1])
                    print(f"  {tag}: exits per MiB by reason: " + ", ".join(
                        f"{k} {v / args.net_mib:.0f}" for k, v in top if v), flush=True)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                # Nested guests under TCG occasionally die (any VMM): count it, go on.
                receiver.stop()
                failures[(name, cpus)] = failures.get((name, cpus), 0) + 1
                # The first line says what happened; the end of the console, how far it got.
                text = str(e) or type(e).__name__
                head, _, rest = text.partition("\n")
                print(f"round {r + 1} {tag:19s} FAILED: {head}\n{rest[-3000:]}", flush=True)
                continue
            finally:
                os.unlink(image)
            results[(r, cpus, name)] = {"write": write, "read": read, "net": net}
            print(f"round {r + 1} {tag:19s} blk write {write:8.1f} MB/s  read {read:8.1f} MB/s"
                  f"  net guest->host {net:8.1f} MB/s", flush=True)
    finally:
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    # The host's speed drifts over minutes here (other work on the machine, the nested
    # setup); a round's guests of one vCPU count ran back to back, so their per-round ratios
    # drift less: both kinds of ratio are printed; they should agree.
    print()
    print(variants.table(
        results,
        [("write", f"blk seq write {args.blk_mib} MiB", "MB/s", ".1f"),
         ("read", f"blk seq read {args.blk_mib} MiB", "MB/s", ".1f"),
         ("net", f"TCP guest->host {args.net_mib} MiB", "MB/s", ".2f")],
        args.vcpus, args.variants,
        footnote=f"medians of {args.rounds} rounds, {args.memory} MiB, kernel "
                 f"{os.path.basename(args.kernel)}; ratios of medians (median of per-round "
                 f"ratios); higher is better; failed guests: {variants.failures_text(failures)}"))


if __name__ == "__main__":
    main()
