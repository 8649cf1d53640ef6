//! virtio devices seen from real guests: a root file system on virtio-blk, a read-only disk,
//! two guests talking over virtio-net through TAPs on a Linux bridge, /dev/hwrng, and what a
//! virtio interrupt costs the guest in exits to the VMM.
//!
//! Each guest boots Debian's kernel with the test initramfs, which loads the virtio modules and
//! (with `thvc.action=root thvc.root=/dev/vda`) switches to an ext4 root image built here with
//! `mkfs.ext4 -d`: a static busybox and a /sbin/init script that does the test's work in the
//! guest and reports on the console. Like guest_boot.rs these run inside the test VM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const BUSYBOX: &str = "/bin/busybox";

/// An ext4 image of `size_mib` with busybox and `init` as /sbin/init.
fn root_image(dir: &Path, name: &str, init: &str, size_mib: u64) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    for sub in ["bin", "sbin", "dev", "proc", "sys", "tmp", "mnt"] {
        std::fs::create_dir_all(tree.join(sub)).expect("mkdir");
    }
    let busybox =
        std::fs::read(BUSYBOX).expect("a static busybox at /bin/busybox (busybox-static)");
    std::fs::write(tree.join("bin/busybox"), busybox).expect("copy busybox");
    let script = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\nexec </dev/console >/dev/console 2>&1\n{init}\n\
         sync\npoweroff -f\n"
    );
    std::fs::write(tree.join("sbin/init"), script).expect("init");
    let chmod = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    chmod(&tree.join("bin/busybox"));
    chmod(&tree.join("sbin/init"));
    let image = dir.join(format!("{name}.ext4"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", name, "-d"])
        .arg(&tree)
        .arg(&image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 runs");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

fn boot_root(image: &Path, extra: &[&str]) -> Guest {
    boot_root_on(Transport::Mmio, image, extra)
}

/// Boots `image` as the root disk with the devices on `transport`.
fn boot_root_on(transport: Transport, image: &Path, extra: &[&str]) -> Guest {
    let disk = format!("path={},serial=root-disk", image.display());
    let mut args = vec!["--disk", disk.as_str()];
    args.extend_from_slice(extra);
    Guest::boot_on(transport, "thvc.action=root thvc.root=/dev/vda", &args)
}

/// A file's content inside an ext4 image, read without mounting it.
fn file_in_image(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs runs");
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn root_on_virtio_blk_keeps_what_the_guest_wrote() {
    root_on_virtio_blk(Transport::Mmio);
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn root_on_virtio_blk_keeps_what_the_guest_wrote_on_pci() {
    root_on_virtio_blk(Transport::Pci);
}

fn root_on_virtio_blk(transport: Transport) {
    let tmp = tempdir("root");
    let dir = tmp.path();
    let nonce = format!(
        "written-by-guest-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let init = format!(
        "grep ' / ' /proc/mounts | grep -q '^/dev/vda / ext4 rw' && echo THVC-ROOT=vda-ext4-rw\n\
         echo THVC-SERIAL=$(cat /sys/block/vda/serial)\n\
         case $(readlink -f /sys/block/vda) in *pci0000*) echo THVC-BUS=pci;; *) echo THVC-BUS=platform;; esac\n\
         echo '{nonce}' > /written.txt\nsync\necho THVC-WRITTEN"
    );
    let image = root_image(dir, "root", &init, 32);
    let mut guest = boot_root_on(transport, &image, &[]);
    assert_eq!(guest.wait_for("THVC-ROOT="), "vda-ext4-rw");
    let bus = match transport {
        Transport::Mmio => "platform",
        Transport::Pci => "pci",
    };
    assert_eq!(guest.wait_for("THVC-BUS="), bus, "the disk's parent device");
    assert_eq!(
        guest.wait_for("THVC-SERIAL="),
        "root-disk",
        "virtio-blk get-id"
    );
    guest.wait_for("THVC-WRITTEN");
    let (status, console, stderr) = guest.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    assert_eq!(file_in_image(&image, "/written.txt").trim_end(), nonce);
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn read_only_disk_cannot_be_written_from_the_guest() {
    let tmp = tempdir("ro");
    let dir = tmp.path();
    let data = root_image(dir, "data", "true", 16);
    let before = sha256(&data);
    let init = "echo THVC-RO-FLAG=$(cat /sys/block/vdb/ro)\n\
        if dd if=/dev/zero of=/dev/vdb bs=4096 count=4 oflag=direct 2>/dev/null; then \
        echo THVC-RO-WRITE=succeeded; else echo THVC-RO-WRITE=failed; fi\n\
        blockdev --setrw /dev/vdb\n\
        if dd if=/dev/zero of=/dev/vdb bs=4096 count=4 oflag=direct 2>/dev/null; then \
        echo THVC-RO-FORCED-WRITE=succeeded; else echo THVC-RO-FORCED-WRITE=failed; fi\n\
        if dd if=/dev/vdb of=/dev/null bs=4096 count=4 iflag=direct 2>/dev/null; then \
        echo THVC-RO-READ=ok; else echo THVC-RO-READ=failed; fi";
    let root = root_image(dir, "root", init, 32);
    let ro = format!("path={},readonly=on", data.display());
    let mut guest = boot_root(&root, &["--disk", &ro]);
    assert_eq!(
        guest.wait_for("THVC-RO-FLAG="),
        "1",
        "the guest sees a read-only disk"
    );
    assert_eq!(guest.wait_for("THVC-RO-WRITE="), "failed");
    // With the block layer's flag cleared, the write reaches the device, which refuses it.
    assert_eq!(guest.wait_for("THVC-RO-FORCED-WRITE="), "failed");
    assert_eq!(guest.wait_for("THVC-RO-READ="), "ok");
    let (status, console, _) = guest.finish();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    assert_eq!(sha256(&data), before, "the read-only image is unchanged");
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn hwrng_gives_the_guest_entropy() {
    let tmp = tempdir("rng");
    let dir = tmp.path();
    let init = "echo THVC-RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current)\n\
        echo THVC-RNG-A=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')\n\
        echo THVC-RNG-B=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')";
    let root = root_image(dir, "root", init, 32);
    let mut guest = boot_root(&root, &[]);
    assert!(guest
        .wait_for("THVC-RNG-CURRENT=")
        .starts_with("virtio_rng"));
    let a = guest.wait_for("THVC-RNG-A=");
    let b = guest.wait_for("THVC-RNG-B=");
    assert_eq!(a.len(), 64, "32 bytes read: {a:?}");
    assert_eq!(b.len(), 64, "32 bytes read: {b:?}");
    assert_ne!(a, b, "two reads differ");
    let (status, _, _) = guest.finish();
    assert_eq!(status.code(), Some(0));
}

/// The VM's exits of `kind` ("io", "mmio", ...) over all vCPUs, from an `info` answer.
fn vcpu_exits(info: &serde_json::Value, kind: &str) -> u64 {
    let exits = info["vcpu_exits"].as_array().expect("vcpu_exits");
    exits.iter().filter_map(|e| e[kind].as_u64()).sum()
}

/// On virtio-mmio the driver reads the registers from a page mapped into the guest and
/// acknowledges interrupts into an ioeventfd; on virtio-pci each queue has its own MSI-X
/// vector and nothing to read or acknowledge: either way thousands of virtio interrupts (one
/// per direct 4 KiB read) must cost almost no exits to the VMM. With trapped registers each
/// interrupt costs two (status read, acknowledgement).
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn virtio_interrupts_cost_the_guest_no_exits_to_the_vmm() {
    virtio_interrupt_exits(Transport::Mmio);
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn virtio_interrupts_cost_the_guest_no_exits_to_the_vmm_on_pci() {
    virtio_interrupt_exits(Transport::Pci);
}

fn virtio_interrupt_exits(transport: Transport) {
    let tmp = tempdir("irq-exits");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let init = "dd if=/dev/vda of=/dev/null bs=4096 count=3000 iflag=direct 2>/dev/null\n\
        echo THVC-VIRTIO-IRQS=$(awk '/virtio/ { for (i = 2; i <= NF; i++) \
        if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' /proc/interrupts)\n\
        sleep 600";
    let root = root_image(dir, "root", init, 32);
    let mut guest = boot_root_on(
        transport,
        &root,
        &["--api-socket", socket.to_str().expect("utf-8")],
    );
    let interrupts: u64 = guest
        .wait_for("THVC-VIRTIO-IRQS=")
        .parse()
        .expect("an interrupt count");
    assert!(
        interrupts >= 2000,
        "one interrupt per request expected, got {interrupts}"
    );
    let info = api_call(&socket, "info");
    let mmio = vcpu_exits(&info, "mmio");
    eprintln!("{mmio} MMIO exits to the VMM for {interrupts} virtio interrupts");
    // Left: the register writes of the drivers' setup (a few dozen per device).
    assert!(
        mmio * 4 < interrupts,
        "{mmio} MMIO exits to the VMM for {interrupts} virtio interrupts: {info}"
    );
    api_call(&socket, "stop");
    let (status, console, _) = guest.finish();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
}

/// x86 Linux reads the first 256 bytes of each function's configuration space through
/// 0xCF8/0xCFC even with ECAM announced: two port accesses per read. The address write is
/// coalesced by KVM (see vstate::coalesced), so a configuration read costs one exit, not two.
/// The guest reads the host bridge's configuration space in batches of 640 dword reads and
/// counts them on the console; the VMM's port-exit counter over a window of batches gives
/// the exits per read.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_pci_configuration_read_costs_one_exit_on_pci() {
    const READS_PER_BATCH: u64 = 640; // 10 x 256 bytes, one dword read per 4 bytes
    let tmp = tempdir("cfg-exits");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let init = "n=0\n\
        while [ $n -lt 60 ]; do\n\
        for i in 0 1 2 3 4 5 6 7 8 9; do \
        dd if=/sys/bus/pci/devices/0000:00:00.0/config of=/dev/null bs=256 count=1 2>/dev/null; done\n\
        n=$((n + 1)); echo THVC-PCICFG=$n\n\
        done\nsleep 600";
    let root = root_image(dir, "root", init, 32);
    let mut guest = boot_root_on(
        Transport::Pci,
        &root,
        &["--api-socket", socket.to_str().expect("utf-8")],
    );
    let port_exits = |guest: &Guest| {
        let io = vcpu_exits(&api_call(&socket, "info"), "io");
        // The last batch the guest reported once the counter was read: the reads between
        // two samples are known to a batch either way.
        let batch = guest
            .seen()
            .iter()
            .filter_map(|l| l.split("THVC-PCICFG=").nth(1))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (io, batch)
    };
    guest.wait_for("THVC-PCICFG=5");
    let (io1, batch1) = port_exits(&guest);
    guest.wait_for("THVC-PCICFG=45");
    let (io2, batch2) = port_exits(&guest);
    let reads = (batch2 - batch1) * READS_PER_BATCH;
    assert!(reads >= 30 * READS_PER_BATCH, "batches {batch1}..{batch2}");
    let per_read = (io2 - io1) as f64 / reads as f64;
    eprintln!(
        "{} port exits for about {reads} configuration reads: {per_read:.2} per read",
        io2 - io1
    );
    // One exit per read plus the console lines; two per read without coalescing.
    assert!(
        per_read < 1.4,
        "{per_read:.2} port exits per configuration read ({} for about {reads})",
        io2 - io1
    );
    api_call(&socket, "stop");
    let (status, console, _) = guest.finish();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn two_guests_on_a_bridge_ping_and_move_16_mib() {
    bridge_transfer(Transport::Mmio);
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn two_guests_on_a_bridge_ping_and_move_16_mib_on_pci() {
    bridge_transfer(Transport::Pci);
}

fn bridge_transfer(transport: Transport) {
    let _lan = Lan::new();
    let tmp = tempdir("net");
    let dir = tmp.path();
    let receiver = "ip link set eth0 up\nip addr add 10.77.0.3/24 dev eth0\necho THVC-NET-UP\n\
        mkfifo /tmp/hold\nnc -l -p 5000 <>/tmp/hold >/tmp/recv\n\
        echo THVC-RECV-BYTES=$(wc -c </tmp/recv)\n\
        echo THVC-RECV-SHA=$(sha256sum /tmp/recv | cut -d' ' -f1)\n\
        if ping -c 2 -W 5 10.77.0.1 >/dev/null; then echo THVC-PING-HOST=ok; else echo THVC-PING-HOST=failed; fi";
    // The receiver's nc must not see end-of-input (busybox nc then half-closes, and the
    // sender's nc quits on that, mid-transfer): its stdin is a FIFO it holds open itself
    // (opened read-write), so it never ends, yet nc exits when the sender closes. (A
    // `sleep | nc` pipeline would keep the shell waiting for sleep after nc is done.)
    // The sender waits for the receiver with a bounded retry on a real condition (the
    // peer answering), not a fixed sleep.
    let sender = "ip link set eth0 up\nip addr add 10.77.0.2/24 dev eth0\n\
        n=0; until ping -c 1 -W 1 10.77.0.3 >/dev/null; do n=$((n+1)); [ $n -ge 120 ] && break; done\n\
        if ping -c 3 -W 5 10.77.0.3 >/dev/null; then echo THVC-PING-PEER=ok; else echo THVC-PING-PEER=failed; fi\n\
        if ping -c 2 -W 5 10.77.0.1 >/dev/null; then echo THVC-PING-HOST=ok; else echo THVC-PING-HOST=failed; fi\n\
        dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null\n\
        echo THVC-SEND-SHA=$(sha256sum /tmp/data | cut -d' ' -f1)\n\
        n=0; until nc 10.77.0.3 5000 </tmp/data; do n=$((n+1)); [ $n -ge 50 ] && break; sleep 0.2; done\n\
        echo THVC-SENT";
    let rx_image = root_image(dir, "receiver", receiver, 32);
    let tx_image = root_image(dir, "sender", sender, 32);
    let mut rx = boot_root_on(
        transport,
        &rx_image,
        &[
            "--net",
            "tap=thvctap-b,mac=52:54:00:77:00:03",
            "--memory",
            "384",
        ],
    );
    rx.wait_for("THVC-NET-UP");
    let mut tx = boot_root_on(
        transport,
        &tx_image,
        &[
            "--net",
            "tap=thvctap-a,mac=52:54:00:77:00:02",
            "--memory",
            "384",
        ],
    );
    assert_eq!(
        tx.wait_for("THVC-PING-PEER="),
        "ok",
        "guest A pings guest B"
    );
    assert_eq!(
        tx.wait_for("THVC-PING-HOST="),
        "ok",
        "guest A pings the host's bridge address"
    );
    let sent = tx.wait_for("THVC-SEND-SHA=");
    // 16 MiB (4096 pages, the RX and TX queues wrap dozens of times) through two nested
    // guests in a software-emulated VM: allow minutes, not seconds.
    let transfer = std::time::Duration::from_secs(600);
    tx.wait_for_within("THVC-SENT", transfer);
    let received = rx.wait_for_within("THVC-RECV-BYTES=", transfer);
    assert_eq!(received.trim(), (16u64 << 20).to_string());
    assert_eq!(
        rx.wait_for("THVC-RECV-SHA="),
        sent,
        "the receiver got exactly what was sent"
    );
    assert_eq!(
        rx.wait_for("THVC-PING-HOST="),
        "ok",
        "guest B pings the host's bridge address"
    );
    let (tx_status, tx_console, _) = tx.finish();
    let (rx_status, rx_console, _) = rx.finish();
    assert_eq!(tx_status.code(), Some(0), "sender console:\n{tx_console}");
    assert_eq!(rx_status.code(), Some(0), "receiver console:\n{rx_console}");
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn two_guests_on_a_bridge_ping_each_other_and_the_host() {
    let _lan = Lan::new();
    let tmp = tempdir("ping");
    let dir = tmp.path();
    // Each guest stays up after its pings (so its peer can still reach it) until the test
    // stops it with SIGTERM.
    let guest = |me: &str, peer: &str| {
        format!(
            "ip link set eth0 up\nip addr add {me}/24 dev eth0\n\
             n=0; until ping -c 1 -W 1 {peer} >/dev/null; do n=$((n+1)); [ $n -ge 120 ] && break; done\n\
             if ping -c 3 -W 5 {peer} >/dev/null; then echo THVC-PING-PEER=ok; else echo THVC-PING-PEER=failed; fi\n\
             if ping -c 2 -W 5 10.77.0.1 >/dev/null; then echo THVC-PING-HOST=ok; else echo THVC-PING-HOST=failed; fi\n\
             while :; do sleep 3600; done"
        )
    };
    let a_image = root_image(dir, "a", &guest("10.77.0.2", "10.77.0.3"), 32);
    let b_image = root_image(dir, "b", &guest("10.77.0.3", "10.77.0.2"), 32);
    let mut a = boot_root(&a_image, &["--net", "tap=thvctap-a"]);
    let mut b = boot_root(&b_image, &["--net", "tap=thvctap-b"]);
    for (name, g) in [("A", &mut a), ("B", &mut b)] {
        assert_eq!(
            g.wait_for("THVC-PING-PEER="),
            "ok",
            "guest {name} pings its peer"
        );
        assert_eq!(
            g.wait_for("THVC-PING-HOST="),
            "ok",
            "guest {name} pings the host"
        );
    }
    for g in [&a, &b] {
        // SAFETY: signalling our own child process.
        assert_eq!(
            unsafe { libc::kill(g.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
    }
    let (a_status, _, a_err) = a.finish();
    let (b_status, _, b_err) = b.finish();
    assert_eq!(a_status.code(), Some(0), "stderr A:\n{a_err}");
    assert_eq!(b_status.code(), Some(0), "stderr B:\n{b_err}");
}

/// Debian's kernel on the PCI transport: every virtio device is a virtio-pci function bound
/// to its driver, each queue has its own MSI-X vector that moves with traffic, and the
/// interrupts cost no exits (see the test above for the count).
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn pci_functions_use_msix_vectors_per_queue() {
    let _lan = Lan::new();
    let tmp = tempdir("pci");
    let dir = tmp.path();
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0x5au8; 4 << 20]).expect("disk image");
    let disk_arg = format!("path={},readonly=on", disk.display());
    let mut guest = Guest::boot_on(
        Transport::Pci,
        "thvc.action=pci",
        &["--disk", &disk_arg, "--net", "tap=thvctap-a"],
    );
    assert_eq!(guest.wait_for("THVC-HWRNG="), "64", "hwrng over virtio-pci");
    guest.wait_for("THVC-ACTION=");
    let (status, console, stderr) = guest.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    let lines = |prefix: &str| -> Vec<String> {
        console
            .lines()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
            .collect()
    };
    let functions = lines("THVC-PCI=");
    let has = |id: &str, driver: &str| {
        functions
            .iter()
            .any(|f| f.contains(id) && f.ends_with(&format!("driver={driver}")))
    };
    assert!(
        functions
            .iter()
            .any(|f| f.starts_with("0000:00:00.0 0x8086:0x0d57")),
        "host bridge: {functions:?}"
    );
    for (id, what) in [
        ("0x1af4:0x1042", "blk"),
        ("0x1af4:0x1041", "net"),
        ("0x1af4:0x1044", "rng"),
    ] {
        assert!(
            has(id, "virtio-pci"),
            "virtio-{what} bound to virtio-pci: {functions:?}"
        );
    }
    let virtio = lines("THVC-VIRTIO=");
    assert_eq!(virtio.len(), 3, "{virtio:?}");
    assert!(virtio.iter().all(|v| v.ends_with("bus=pci")), "{virtio:?}");
    // One vector per queue plus one for configuration changes, each its own interrupt.
    let irqs: Vec<(String, u64)> = lines("THVC-IRQ=")
        .iter()
        .filter_map(|l| {
            let (name, count) = l.rsplit_once(' ')?;
            Some((name.to_string(), count.parse().ok()?))
        })
        .collect();
    let count = |suffix: &str| {
        irqs.iter()
            .filter(|(name, _)| name.ends_with(suffix))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        count("-config").len(),
        3,
        "a config vector per device: {irqs:?}"
    );
    assert!(
        count("-req.0").iter().any(|n| *n > 0),
        "the disk's queue interrupted: {irqs:?}"
    );
    assert_eq!(count("-input.0").len(), 1, "net RX queue: {irqs:?}");
    assert_eq!(count("-output.0").len(), 1, "net TX queue: {irqs:?}");
    assert!(
        count("-input").iter().any(|n| *n > 0),
        "the rng's queue interrupted: {irqs:?}"
    );
}

/// A hostile driver on the PCI transport: random values at random offsets of every virtio
/// function's BAR 0, garbage MSI-X messages unmasked, random configuration space (command,
/// BARs moved anywhere, MSI-X control). The guest keeps running and the VMM stays up and
/// answers.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn pci_garbage_from_the_guest_leaves_the_vmm_running() {
    let _lan = Lan::new();
    let tmp = tempdir("pci-garbage");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let disk_arg = format!("path={},readonly=on", disk.display());
    // iomem=relaxed: /dev/mem may reach BARs a driver owns (Debian's IO_STRICT_DEVMEM).
    let mut guest = Guest::boot_on(
        Transport::Pci,
        "iomem=relaxed thvc.action=pci_garbage",
        &[
            "--disk",
            &disk_arg,
            "--net",
            "tap=thvctap-a",
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    // 69 writes per function (48 random, 9 MSI-X, 12 common config), all reaching it.
    let done = guest.wait_for("THVC-GARBAGE-DONE ");
    assert_eq!(
        done, "writes=207 failed=0",
        "every garbage write reached a virtio function"
    );
    // The guest lives on: its clock and console still work a second later.
    guest.wait_until("THVC-TICK=10", |l| l == "THVC-TICK=10");
    let info = api_call(&socket, "info");
    assert!(info["vcpu_exits"].is_array(), "the VMM answers: {info}");
    // info lists where each virtio device is on PCI and its vectors (queues + config).
    let devices = info["devices"].as_array().expect("devices");
    let pci: Vec<(String, String, u64)> = devices
        .iter()
        .filter_map(|d| {
            let p = d.get("pci")?;
            Some((
                p["bdf"].as_str()?.to_string(),
                p["device_id"].as_str()?.to_string(),
                p["msix_vectors"].as_u64()?,
            ))
        })
        .collect();
    assert_eq!(
        pci,
        [
            ("0000:00:01.0".to_string(), "0x1042".to_string(), 2),
            ("0000:00:02.0".to_string(), "0x1041".to_string(), 3),
            ("0000:00:03.0".to_string(), "0x1044".to_string(), 2),
        ],
        "{info}"
    );
    api_call(&socket, "stop");
    let (status, console, stderr) = guest.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    eprintln!("console:\n{console}\nwhat the VMM logged of it:\n{stderr}");
}

/// Multiqueue devices on PCI: two vCPUs give the disk two queues and the NIC two queue pairs
/// by default, each queue with its own MSI-X vector and each queue (pair) with its own worker
/// thread. A reader and a pinger pinned to each CPU put requests on every disk queue (blk-mq
/// maps a queue to each CPU) and frames on every transmit queue (virtio-net's XPS), and
/// `info` counts each queue's buffers.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn multiqueue_disk_and_nic_on_pci_use_every_queue() {
    let _lan = Lan::multi_queue();
    let tmp = tempdir("mq");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0x33u8; 8 << 20]).expect("disk image");
    let disk_arg = format!("path={},readonly=on", disk.display());
    let mut guest = Guest::boot_on(
        Transport::Pci,
        "thvc.action=mq thvc.ip=10.77.0.2/24 thvc.peer=10.77.0.1",
        &[
            "--cpus",
            "2",
            "--disk",
            &disk_arg,
            "--net",
            "tap=thvctap-a",
            "--no-rng",
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    guest.wait_for("THVC-MQ-DONE");
    let info = api_call(&socket, "info");
    let blk = info["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "virtio-blk"))
        .unwrap_or_else(|| panic!("no virtio-blk in {info}"));
    let used: Vec<u64> = blk["queue_used"]
        .as_array()
        .map(|q| q.iter().filter_map(|n| n.as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(used.len(), 2, "one queue per vCPU: {blk}");
    assert!(
        used.iter().all(|n| *n >= 100),
        "every queue served requests: {used:?}"
    );
    assert_eq!(
        blk["pci"]["msix_vectors"], 3,
        "two queues and the configuration"
    );
    api_call(&socket, "stop");
    let (status, console, stderr) = guest.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    // Each queue's own vector interrupted the guest.
    for queue in ["-req.0 ", "-req.1 ", "-output.0 ", "-output.1 "] {
        let line = console
            .lines()
            .find(|l| l.starts_with("THVC-IRQ=") && l.contains(queue))
            .unwrap_or_else(|| panic!("no interrupt line for {queue}: {console}"));
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(count > 0, "{line}");
    }
}

/// A hostile guest floods its disk with requests whose data buffer lies outside guest RAM
/// (integration/guest/init's blk_flood: 2560 of them, set up by hand through /dev/mem). Each
/// fails with an I/O error status and counts as an error, and the VMM, even logging the block
/// device at debug level, writes a bounded number of lines, not one per request.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_guest_flooding_bad_descriptors_gets_errors_and_cannot_flood_the_host_log() {
    let tmp = tempdir("blk-flood");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let disk_arg = format!("path={}", disk.display());
    let started = std::time::Instant::now();
    let cmdline = format!(
        "{} iomem=relaxed memmap=64K$0x8000000 thvc.action=blk_flood",
        Transport::Mmio.cmdline()
    );
    let mut guest = Guest::start_with(
        &[
            "--kernel",
            kernel().to_str().expect("utf-8"),
            "--initrd",
            initramfs().to_str().expect("utf-8"),
            "--cmdline",
            &cmdline,
            "--transport",
            "mmio",
            "--disk",
            &disk_arg,
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
        // Every bad request is worth a debug line: without the limit, thousands of them.
        |cmd| {
            cmd.env("RUST_LOG", "warn,thvc_vmm::devices::virtio::block=debug");
        },
    );
    let done = guest.wait_for("THVC-FLOOD-DONE ");
    assert_eq!(
        done, "requests=2560 status=1",
        "every request failed with IOERR"
    );
    let info = api_call(&socket, "info");
    let blk = info["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "virtio-blk"))
        .unwrap_or_else(|| panic!("no disk in {info}"));
    let errors = blk["counters"]["errors"].as_u64().unwrap_or(0);
    assert_eq!(errors, 2560, "the device saw every bad request: {blk}");
    api_call(&socket, "stop");
    let (status, console, stderr) = guest.finish();
    let elapsed = started.elapsed().as_secs();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    let flood: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("bad virtio-blk request"))
        .collect();
    // 10 lines per 5 s window (devices::log_limit), over the whole run.
    let bound = 10 * (elapsed / 5 + 2) as usize;
    eprintln!(
        "{} lines about 2560 bad requests in {elapsed} s (bound {bound})",
        flood.len()
    );
    assert!(
        !flood.is_empty() && flood.len() <= bound,
        "{} lines about bad requests in {elapsed} s (bound {bound}); stderr:\n{stderr}",
        flood.len()
    );
    assert!(
        stderr.lines().count() <= bound + 20,
        "the VMM's stderr stays short:\n{stderr}"
    );
}

/// One raw request line on the API socket; the whole answer.
fn api_line(socket: &Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("API socket");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    serde_json::from_str(&answer).expect("JSON answer")
}

/// MiB/s of one guest dd run of `RATE_DD_MIB` MiB, from its console line (centiseconds).
fn dd_rate(guest: &mut Guest, run: u32) -> f64 {
    let cs: f64 = guest
        .wait_for(&format!("THVC-DD-{run}="))
        .trim()
        .parse()
        .expect("centiseconds");
    RATE_DD_MIB as f64 / (cs.max(1.0) / 100.0)
}

const RATE_DD_MIB: u64 = 20;

/// A disk limited to 10 MiB/s (`bandwidth=10M`): the guest's O_DIRECT reads of it run at
/// that rate, and raising the limit through the API (`update-device`) to 50 MiB/s shows in
/// the next run. The guest reads the disk in a loop and prints each run's time; the first
/// run is before the change, the third wholly after it.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_disk_bandwidth_limit_holds_and_changes_at_run_time() {
    let tmp = tempdir("blk-limit");
    let dir = tmp.path();
    let socket = dir.join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let data = dir.join("data.raw");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(RATE_DD_MIB << 20))
        .expect("data disk");
    let init = format!(
        "cs() {{ t=$(cut -d' ' -f1 /proc/uptime); echo ${{t%.*}}${{t#*.}}; }}\n\
         i=0\nwhile true; do a=$(cs)\n\
         dd if=/dev/vdb of=/dev/null bs=1M count={RATE_DD_MIB} iflag=direct 2>/dev/null\n\
         b=$(cs); echo THVC-DD-$i=$((b - a)); i=$((i + 1)); done"
    );
    let root = root_image(dir, "root", &init, 32);
    let limited = format!("path={},bandwidth=10M", data.display());
    let mut guest = boot_root(
        &root,
        &[
            "--disk",
            &limited,
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    let throttled = dd_rate(&mut guest, 0);
    let answer = api_line(
        &socket,
        r#"{"request":"update-device","device":"virtio-blk1","bandwidth":"50M"}"#,
    );
    assert_eq!(answer["ok"], true, "{answer}");
    let _straddling = dd_rate(&mut guest, 1);
    let raised = dd_rate(&mut guest, 2);
    eprintln!("guest dd: {throttled:.1} MiB/s at bandwidth=10M, {raised:.1} MiB/s at 50M");
    // The first MiB is the bucket's burst: 20 MiB in 1.9 s, 10.5 MiB/s.
    assert!(
        (8.0..=12.0).contains(&throttled),
        "{throttled:.1} MiB/s at bandwidth=10M"
    );
    assert!(
        raised > RAISED_AT_LEAST,
        "{raised:.1} MiB/s after raising the limit to 50M"
    );
    api_call(&socket, "stop");
    let _ = guest.finish();
}

/// The test VM (TCG with nested KVM) measured 51 MiB/s with the limit at 50 MiB/s; anything
/// over 35 is clearly no longer the 10 MiB/s limit.
const RAISED_AT_LEAST: f64 = 35.0;
