#!/usr/bin/python3
"""Boot benchmark of a cloud image through UEFI firmware, in the test VM.

The guest is the Debian trixie cloud-style image of integration/guest/cloud/build (GPT, an
EFI system partition with systemd-boot, cloud-init), with a NoCloud seed (hostname, network
config) on a second, read-only disk, and one NIC on a TAP. Three ways to boot it, alternating,
N rounds, each from a fresh copy of the image (so cloud-init does its first boot every time):

  thvc-uefi      thvc-vmm --firmware (edk2 CloudHv from vmm/firmware/build), virtio-pci
  qemu-q35-ovmf  QEMU q35 with Debian's OVMF (pflash code + a copy of the variables), KVM,
                 virtio-blk-pci and virtio-net-pci
  thvc-direct    thvc-vmm --kernel with the kernel, initrd and command line of the image's
                 own boot entry (read from its ESP): what the firmware and boot loader cost

Measured: wall time from spawning the VMM to the guest's login prompt on the serial console
and to cloud-init's "finished" line. Prints medians and ratios, and the firmware's size.
Not a test: nothing passes or fails. The test VM's emulator aborts now and then while a
firmware boots (see vmm/tests/guest_uefi.rs: CR8 writes in edk2's interrupt handlers), taking
the run with it: `--rounds 1 --order K` in separate test VMs (K = 0, 1, 2, ...) gives the
rounds one by one. QEMU q35 with OVMF aborted it in every try (OVMF takes more interrupts);
`--variants thvc-uefi,thvc-direct` leaves it out.
"""
import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TAP = "thvcbench0"
LOGIN = re.compile(rb"login: ")
FINISHED = re.compile(rb"Cloud-init v\. \S+ finished")


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def boot_once(cmd, timeout):
    """Seconds from spawn to the login prompt and to cloud-init's end."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    buf = b""
    seen = {}
    try:
        while len(seen) < 2:
            for name, pattern in (("login", LOGIN), ("cloud-init", FINISHED)):
                if name not in seen and pattern.search(buf):
                    seen[name] = time.monotonic() - start
            if len(seen) == 2:
                break
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise RuntimeError(f"not booted within {timeout}s ({seen}):\n{buf[-1500:]!r}")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"exited early ({proc.wait()}):\n{buf[-1500:]!r}")
                buf += chunk
        return seen["login"], seen["cloud-init"]
    finally:
        proc.kill()
        proc.wait()


def esp_offset(image):
    table = json.loads(sh("sfdisk", "--json", image, capture_output=True).stdout)
    for p in table["partitiontable"]["partitions"]:
        if p["type"].upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B":
            return p["start"] * 512
    sys.exit(f"uefi-boot.py: {image} has no EFI system partition")


def boot_entry(image, work):
    """The kernel, initrd and options of the image's first Boot Loader Specification entry."""
    esp = f"{image}@@{esp_offset(image)}"
    names = sh("mdir", "-b", "-i", esp, "::/loader/entries", capture_output=True,
               text=True).stdout.split()
    entries = sorted(n for n in names if n.endswith(".conf"))
    if not entries:
        sys.exit("uefi-boot.py: no loader entry on the image's ESP")
    text = sh("mtype", "-i", esp, entries[0], capture_output=True, text=True).stdout
    fields = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        fields.setdefault(key, value.strip())
    out = []
    for key in ("linux", "initrd"):
        dest = os.path.join(work, key)
        sh("mcopy", "-n", "-i", esp, "::" + fields[key], dest)
        out.append(dest)
    return out[0], out[1], fields.get("options", "")


def write_seed(work):
    """A NoCloud seed: hostname and a static address; nothing that waits on the network."""
    files = os.path.join(work, "seed")
    os.makedirs(files, exist_ok=True)
    docs = {
        "meta-data": {"instance-id": "bench", "local-hostname": "bench"},
        "network-config": {"version": 2, "ethernets": {"nic0": {
            "match": {"macaddress": "52:54:00:99:00:02"}, "addresses": ["10.99.0.2/24"]}}},
    }
    for name, doc in docs.items():
        with open(os.path.join(files, name), "w") as f:
            json.dump(doc, f)
    with open(os.path.join(files, "user-data"), "w") as f:
        f.write("#cloud-config\n{}\n")
    seed = os.path.join(work, "seed.img")
    sh("mformat", "-C", "-f", "1440", "-v", "cidata", "-i", seed, "::")
    for name in ("meta-data", "network-config", "user-data"):
        sh("mcopy", "-i", seed, os.path.join(files, name), "::" + name)
    return seed


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--firmware", default=os.environ.get("THVC_FIRMWARE"))
    ap.add_argument("--image", default=os.environ.get("THVC_CLOUD_IMAGE"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--ovmf-code", default="/usr/share/OVMF/OVMF_CODE_4M.fd")
    ap.add_argument("--ovmf-vars", default="/usr/share/OVMF/OVMF_VARS_4M.fd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="thvc-uefi,qemu-q35-ovmf,thvc-direct",
                    help="comma-separated subset of the variants")
    ap.add_argument("--order", type=int, default=0,
                    help="rotate the variants' order by this much in the first round (to "
                         "alternate across separate runs of one round each)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if not args.firmware or not args.image:
        sys.exit("uefi-boot.py: --firmware and --image (or THVC_FIRMWARE, THVC_CLOUD_IMAGE "
                 "from integration/testvm/assets --print-env) are needed")
    work = tempfile.mkdtemp(prefix="thvc-uefi-bench-")
    kernel, initrd, options = boot_entry(args.image, work)
    seed = write_seed(work)
    disk = os.path.join(work, "disk.raw")
    net = f"tap={TAP},mac=52:54:00:99:00:02"
    common = ["--cpus", str(args.cpus), "--memory", str(args.memory),
              "--disk", f"path={disk}", "--disk", f"path={seed},readonly=on", "--net", net]

    def thvc_uefi():
        return [args.vmm, "--firmware", args.firmware] + common

    def thvc_direct():
        return [args.vmm, "--transport", "pci", "--kernel", kernel, "--initrd", initrd,
                "--cmdline", options] + common

    def qemu():
        vars_copy = os.path.join(work, "vars.fd")
        shutil.copy(args.ovmf_vars, vars_copy)
        return [args.qemu, "-M", "q35", "-accel", "kvm", "-cpu", "host",
                "-smp", str(args.cpus), "-m", str(args.memory),
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                "-drive", f"if=pflash,format=raw,readonly=on,file={args.ovmf_code}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}",
                "-drive", f"id=d0,file={disk},format=raw,if=none",
                "-device", "virtio-blk-pci,drive=d0",
                "-drive", f"id=d1,file={seed},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-pci,drive=d1",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:99:00:02"]

    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", TAP)
    sh("ip", "link", "set", TAP, "up")
    wanted = args.variants.split(",")
    variants = [(n, f) for n, f in (("thvc-uefi", thvc_uefi), ("qemu-q35-ovmf", qemu),
                                    ("thvc-direct", thvc_direct)) if n in wanted]
    if not variants:
        sys.exit(f"uefi-boot.py: no known variant in {args.variants}")
    names = [n for n, _ in variants]
    times = {n: [] for n in names}
    failures = {n: 0 for n in names}
    try:
        for r in range(args.rounds):
            k = (r + args.order) % len(variants)
            order = variants[k:] + variants[:k]
            for name, make_cmd in order:
                sh("cp", "--sparse=always", args.image, disk)
                try:
                    login, done = boot_once(make_cmd(), args.timeout)
                except RuntimeError as e:
                    # Nested guests under TCG occasionally die (any VMM): count it, go on.
                    failures[name] += 1
                    print(f"round {r + 1} {name:14s} FAILED: {str(e)[-1500:]}", flush=True)
                    continue
                times[name].append((login, done))
                print(f"round {r + 1} {name:14s} login prompt {login:6.1f} s, "
                      f"cloud-init finished {done:6.1f} s", flush=True)
    finally:
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    if not all(times.values()):
        sys.exit(f"uefi-boot.py: no successful boot for some variant: failures {failures}")
    med = {n: [statistics.median(t[i] for t in v) for i in (0, 1)] for n, v in times.items()}
    print()
    for n in names:
        print(f"{n:14s} median: login prompt {med[n][0]:6.1f} s, cloud-init finished "
              f"{med[n][1]:6.1f} s ({len(times[n])} boots, {failures[n]} failed)")
    for other in (n for n in ("qemu-q35-ovmf", "thvc-direct") if n in med and "thvc-uefi" in med):
        print(f"ratio thvc-uefi/{other}: login {med['thvc-uefi'][0] / med[other][0]:.2f}x, "
              f"cloud-init {med['thvc-uefi'][1] / med[other][1]:.2f}x")
    print(f"firmware: {args.firmware} {os.path.getsize(args.firmware)} bytes; OVMF code "
          f"{os.path.getsize(args.ovmf_code)} bytes ({args.cpus} vCPUs, {args.memory} MiB)")


if __name__ == "__main__":
    main()
