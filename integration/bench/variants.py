"""What boot.py and io.py compare: the VMM variants, their command lines, the alternating
order of a run, and the table of medians and ratios.

Variants (all boot the same kernel, initramfs, vCPUs and memory, and the same kernel command
line but for `pci=off`, which the virtio-mmio variants get and the virtio-pci ones must not):
  thvc-mmio     thvc-vmm --transport mmio (the default): virtio-mmio devices in the DSDT
  thvc-pci      thvc-vmm --transport pci: virtio-pci functions with MSI-X behind a host bridge,
                one queue (pair) per vCPU on the disk and the NIC (the default; a multi_queue TAP)
  thvc-pci-1q   the same with one queue (pair) each (`queues=1`)
  qemu-microvm  QEMU microvm with virtio-mmio devices (no PIC, PIT, RTC: as thvc-vmm)
  qemu-q35      QEMU q35 (SeaBIOS, which loads the kernel through its linuxboot/PVH option
                ROM) with modern-only virtio-pci devices (disable-legacy=on), as ours
Every variant gets a virtio-rng device, as thvc-vmm always has one; io.py adds a virtio-blk
disk and a virtio-net NIC on a TAP (QEMU: the tap backend without vhost-net, as before).
"""
import argparse
import statistics

VARIANTS = ("thvc-mmio", "thvc-pci", "thvc-pci-1q", "qemu-microvm", "qemu-q35")
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "thvc-pci-1q")
# (numerator, denominator): the comparisons the issue asks for.
RATIOS = (("thvc-pci", "thvc-mmio"), ("thvc-pci", "qemu-q35"), ("thvc-mmio", "qemu-microvm"),
          ("thvc-pci", "thvc-pci-1q"))
SHORT = {"thvc-mmio": "mmio", "thvc-pci": "pci", "thvc-pci-1q": "pci-1q", "qemu-microvm": "microvm", "qemu-q35": "q35"}

MICROVM = "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on,acpi=on"


def add_arguments(ap, kernel_default, memory_default):
    """The options both benchmarks share."""
    ap.add_argument("--vmm", required=True, help="thvc-vmm binary (both thvc variants)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", default=kernel_default)
    ap.add_argument("--initrd", default=None)
    ap.add_argument("--variants", type=name_list, default=list(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {','.join(VARIANTS)} "
                         f"(default: {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--vcpus", "--cpus", type=int_list, default=[1, 2],
                    help="comma-separated vCPU counts, each run for every variant (default 1,2)")
    ap.add_argument("--memory", type=int, default=memory_default, help="MiB")


def name_list(text):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    return names


def int_list(text):
    values = [int(n) for n in text.split(",") if n]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"bad vCPU list {text!r}")
    return values


def is_pci(variant):
    return variant in ("thvc-pci", "thvc-pci-1q", "qemu-q35")


def multi_queue_tap(variant):
    """Whether the variant's TAP is created multi_queue: thvc-vmm attaches to either kind, QEMU
    (without queues=) only to a plain one."""
    return variant.startswith("thvc-")


def cmdline(variant, extra):
    """The guest kernel's command line: the same for all, but `pci=off` on virtio-mmio (a
    virtio-pci guest must scan PCI)."""
    return " ".join(["console=ttyS0 panic=1"] + ([] if is_pci(variant) else ["pci=off"]) +
                    ["quiet", extra])


def command(variant, args, cpus, extra_cmdline, disk=None, tap=None, mac=None):
    """The command that boots `variant` with `cpus` vCPUs: args.vmm/qemu/kernel/initrd/memory,
    optionally a raw root disk image and a NIC on an existing TAP."""
    line = cmdline(variant, extra_cmdline)
    if variant.startswith("thvc-"):
        cmd = [args.vmm, "--transport", "pci" if is_pci(variant) else "mmio",
               "--kernel", args.kernel, "--initrd", args.initrd, "--cmdline", line,
               "--cpus", str(cpus), "--memory", str(args.memory)]
        queues = ",queues=1" if variant == "thvc-pci-1q" else ""
        if disk:
            cmd += ["--disk", f"path={disk}{queues}"]
        if tap:
            cmd += ["--net", f"tap={tap},mac={mac}{queues}"]
        return cmd
    common = ["-cpu", "host", "-smp", str(cpus), "-m", str(args.memory),
              "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
              "-kernel", args.kernel, "-initrd", args.initrd, "-append", line]
    if variant == "qemu-microvm":
        cmd = [args.qemu, "-M", MICROVM, "-accel", "kvm"] + common
        # virtio-mmio devices: "-device virtio-X-device"; modern (virtio 1.0) by default.
        dev, opts = "device", ""
    elif variant == "qemu-q35":
        cmd = [args.qemu, "-M", "q35,accel=kvm", "-vga", "none"] + common
        dev, opts = "pci", ",disable-legacy=on"
    else:
        raise ValueError(variant)
    if disk:
        cmd += ["-drive", f"id=root,file={disk},format=raw,if=none",
                "-device", f"virtio-blk-{dev},drive=root{opts}"]
    if tap:
        # romfile=: no iPXE option ROM for SeaBIOS to run (io.py does not time the boot).
        rom = ",romfile=" if dev == "pci" else ""
        cmd += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-{dev},netdev=n0,mac={mac}{opts}{rom}"]
    cmd += ["-device", f"virtio-rng-{dev}{opts}"]
    return cmd


def schedule(rounds, vcpus, variants):
    """(round, cpus, variant) in run order. In every round each vCPU count runs every variant
    back to back; the variants' order rotates from one vCPU count and round to the next and
    is reversed every other round, and the vCPU counts alternate: no variant always runs
    first or last, or always before or after the same one."""
    for r in range(rounds):
        counts = vcpus if r % 2 == 0 else list(reversed(vcpus))
        for i, cpus in enumerate(counts):
            k = (r + i) % len(variants)
            order = variants[k:] + variants[:k]
            if r % 2:
                order.reverse()
            for variant in order:
                yield r, cpus, variant


def failures_text(failures):
    """{(variant, cpus): count} as text."""
    return ", ".join(f"{n} {c} vCPU: {k}" for (n, c), k in sorted(failures.items())) or "none"


def table(results, metrics, vcpus, variants, footnote=""):
    """The medians per variant and the ratios as a Markdown table.

    results: {(round, cpus, variant): {metric: value}} of the successful guests.
    metrics: [(key, row title, unit, format)]. Ratios are numerator/denominator of the
    medians, and in brackets the median of the per-round ratios (the two guests of a round
    ran minutes apart at most, so the machine's drift affects them less)."""
    pairs = [p for p in RATIOS if p[0] in variants and p[1] in variants]
    head = ["", "vCPUs"] + variants + [f"{SHORT[a]}/{SHORT[b]}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rounds = sorted({r for r, _, _ in results})
    for key, title, unit, fmt in metrics:
        for cpus in vcpus:
            def values(variant):
                return [results[(r, cpus, variant)][key] for r in rounds
                        if (r, cpus, variant) in results]
            med = {v: statistics.median(values(v)) if values(v) else None for v in variants}
            row = [title, str(cpus)]
            row += [f"{format(med[v], fmt)} {unit}" if med[v] is not None else "failed"
                    for v in variants]
            for a, b in pairs:
                if med[a] is None or med[b] is None or not med[b]:
                    row.append("-")
                    continue
                paired = [results[(r, cpus, a)][key] / results[(r, cpus, b)][key] for r in rounds
                          if (r, cpus, a) in results and (r, cpus, b) in results
                          and results[(r, cpus, b)][key]]
                # No round where both succeeded: no per-round ratio.
                each = f"{statistics.median(paired):.2f}x" if paired else "-"
                row.append(f"{med[a] / med[b]:.2f}x ({each})")
            lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines)
    return out + ("\n" + footnote if footnote else "")
