//! Real guests booted by the node agent: the real `thvc-nodeagent` (direct runner) on a
//! private dbus-daemon starts the real `thvc-vmm` (built next to it by cargo), which boots
//! Debian's kernel with the test initramfs and an ext4 root disk from the agent's disk
//! store. The agent runs in its own network namespace, applies a network document with a
//! bridge carrying an address, and gives the VM's NIC a TAP on it. The guest's /sbin/init
//! (written here) configures its address, starts busybox acpid for the power button and
//! reports on the console, which the test reads through `ReadConsole`; the host side of the
//! bridge then pings the guest. The lifecycle test's guest also ticks on the console every
//! second and reboots itself when the host connects to a TCP port, so pause, resume, a
//! guest-initiated reboot and a crashed VMM are seen through the agent as they happen.
//!
//! They need KVM that boots Linux, so they are `#[ignore]`d and run in the test VM:
//! ```text
//! cargo test -p thvc-nodeagent -p thvc-vmm --no-run    # builds thvc-vmm next to the agent
//! eval "$(integration/testvm/assets --print-env)"
//! integration/testvm/run --memory 4096 --timeout 1200 -- \
//!     target/debug/deps/vm_guest-HASH --ignored --test-threads=1
//! ```
//! Without their assets they fail and say so; they never pass by skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Bound for every wait on the guest (boot, network, power-off): a nested guest under the
/// software-emulated test VM needs 15-60 s to boot, more when the 2 cores are busy.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const BRIDGE_ADDRESS: &str = "10.78.0.1";
const GUEST_ADDRESS: &str = "10.78.0.2";
/// Same as the VMM's guest tests; the root disk replaces the initramfs' action.
const CMDLINE: &str = "console=ttyS0 panic=1 pci=off quiet thvc.action=root thvc.root=/dev/vda";
const STATIC_BUSYBOX: &str = "/bin/busybox";
/// How long a paused guest must print no tick. It ticks every second, so a guest that kept
/// running would print about three.
const QUIET_WINDOW: Duration = Duration::from_secs(3);
/// A connection to this port of the lifecycle guest makes it reboot (`reboot -f`).
const REBOOT_PORT: &str = "7000";

/// An ext4 image at `image` whose /sbin/init is `init` under a static busybox, with the
/// power button handler acpid runs.
fn root_image(work: &Path, image: &Path, init: &str) {
    let tree = work.join("root-tree");
    for sub in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc/acpi/PWRF"] {
        std::fs::create_dir_all(tree.join(sub)).expect("mkdir");
    }
    let busybox = std::fs::read(STATIC_BUSYBOX)
        .expect("a static busybox at /bin/busybox (Debian package busybox-static)");
    std::fs::write(tree.join("bin/busybox"), busybox).expect("copy busybox");
    let script = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mountpoint -q /proc || mount -t proc proc /proc\n\
         mountpoint -q /sys || mount -t sysfs sysfs /sys\n\
         mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\nexec </dev/console >/dev/console 2>&1\n\
         drain_console() {{ s=$(stty -F /dev/console -g) && stty -F /dev/console \"$s\"; }}\n\
         {init}\n"
    );
    std::fs::write(tree.join("sbin/init"), script).expect("init");
    // The initramfs' acpid is left behind by switch_root: this root runs its own. Drain the
    // console (stty re-applies its settings with TCSADRAIN) so the line arrives before the
    // power goes.
    std::fs::write(
        tree.join("etc/acpi/PWRF/00000080"),
        "#!/bin/sh\necho THVC-POWER-BUTTON >/dev/console\nsync\n\
         s=$(stty -F /dev/console -g) && stty -F /dev/console \"$s\"\npoweroff -f\n",
    )
    .expect("power button handler");
    for exe in ["bin/busybox", "sbin/init", "etc/acpi/PWRF/00000080"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tree.join(exe), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let out = Command::new(require_tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F", "-L", "guestroot", "-d"])
        .arg(&tree)
        .arg(image)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 runs");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest's init: address on eth0, acpid, report, then `then` (which must not return).
fn guest_init(then: &str) -> String {
    format!(
        "ip link set lo up\nip link set eth0 up\nip addr add {GUEST_ADDRESS}/24 dev eth0\n\
         if acpid -c /etc/acpi -l /dev/null; then echo THVC-ACPID=started; else echo THVC-ACPID=failed; fi\n\
         echo THVC-NET-UP=$(cat /sys/class/net/eth0/address)\n\
         {then}"
    )
}

/// Idles until powered off.
const IDLE: &str = "while :; do sleep 3600; done";

/// The lifecycle guest's work: count this boot on the root disk (`THVC-BOOT=<n>`, so a
/// reboot shows as the next number), reboot when someone connects to [`REBOOT_PORT`], and
/// print `THVC-TICK=<n>` every second, a visible sign that the vCPUs run.
fn tick_and_reboot_on_request() -> String {
    format!(
        "boot=$(( $(cat /boot-count 2>/dev/null || echo 0) + 1 ))\necho $boot >/boot-count\nsync\n\
         echo THVC-BOOT=$boot\n\
         (nc -l -p {REBOOT_PORT} </dev/null >/dev/null 2>&1; echo THVC-REBOOT-REQUESTED; sync; \
         drain_console; reboot -f) &\n\
         tick=0\nwhile :; do echo THVC-TICK=$tick; tick=$((tick + 1)); sleep 1; done"
    )
}

/// One node: a private bus, the real agent in its own network namespace with the real VMM,
/// the guest kernel, initramfs and root disk in its stores, and a bridge with an address.
struct GuestNode {
    dirs: NodeDirs,
    agent_log: PathBuf,
    agent: Agent,
    /// The agent's arguments beyond the common ones, for a restart.
    agent_args: Vec<String>,
    bus: TestBus,
}

impl GuestNode {
    /// `init`: the root disk's /sbin/init after its mounts (see [`guest_init`]).
    async fn start(extra: &[&str], init: &str) -> GuestNode {
        require_tool("unshare", "util-linux");
        require_tool("nsenter", "util-linux");
        let vmm = real_vmm();
        let dirs = node_dirs_with_guest_images();
        root_image(dirs.root.path(), &dirs.state().join("disks/root.img"), init);
        let bus = TestBus::start();
        let agent_log = dirs.root.path().join("agent.log");
        let mut args = vec![
            "--vmm",
            vmm.to_str().expect("utf-8 path"),
            "--start-timeout",
            "60",
            // Longer than any wait below: Shutdown must end by the guest powering off.
            "--shutdown-timeout",
            "170",
        ];
        args.extend_from_slice(extra);
        let agent_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let agent = Agent::start_full(
            &bus,
            &dirs,
            &args,
            IN_NEW_NETNS,
            &[("RUST_LOG", "info")],
            Some(&agent_log),
        );
        let node = GuestNode {
            dirs,
            agent_log,
            agent,
            agent_args,
            bus,
        };
        let m = manager(&node.connect().await).await;
        let doc = format!(
            r#"{{"links": [{{"name": "br0", "kind": "bridge", "addresses": ["{BRIDGE_ADDRESS}/24"]}}]}}"#
        );
        m.apply_network(&doc, false)
            .await
            .expect("apply the network");
        node
    }

    /// Kills the agent with SIGKILL, as a crash would, and starts a new one with the same
    /// arguments in the same network and mount namespaces (kept alive by the VMM).
    fn kill9_and_restart_agent(&mut self, vmm_pid: i32) {
        self.agent.kill9();
        let pid = vmm_pid.to_string();
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        self.agent = Agent::start_full(
            &self.bus,
            &self.dirs,
            &args,
            &["nsenter", "-t", &pid, "-n", "-m", "-r", "--"],
            &[("RUST_LOG", "info")],
            Some(&self.agent_log),
        );
    }

    async fn connect(&self) -> zbus::Connection {
        connect(&self.bus).await
    }

    fn netns_pid(&self) -> i32 {
        self.agent.pid()
    }

    /// Runs `args` in the agent's network and mount namespaces (its sysfs); returns success
    /// and stdout+stderr. `-r`: entering a mount namespace resets the root directory to the
    /// namespace's, and the test VM runs tests in a chroot; keep the agent's root.
    fn in_netns(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.netns_pid().to_string(), "-n", "-m", "-r", "--"])
            .args(args)
            .output()
            .expect("run nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Pings the guest from the host side of the bridge until it answers (bounded).
    fn ping_guest(&self) {
        self.retry_in_netns(
            "ping the guest",
            &[STATIC_BUSYBOX, "ping", "-c", "1", "-W", "3", GUEST_ADDRESS],
        );
    }

    /// Runs `args` (which must bound their own time) in the agent's namespaces until they
    /// succeed, for at most [`GUEST_TIMEOUT`]; `what` says what they do.
    fn retry_in_netns(&self, what: &str, args: &[&str]) {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (ok, out) = self.in_netns(args);
            if ok {
                eprintln!("{what}: done after {attempts} attempt(s)");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: failed for {GUEST_TIMEOUT:?} ({attempts} attempts); last:\n{out}"
            );
        }
    }

    /// Everything that helps when a guest test fails.
    fn diagnostics(&self, vm: &str) -> String {
        let read = |p: PathBuf| {
            format!(
                "---- {}:\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({e})"))
            )
        };
        let mut s = read(self.agent_log.clone());
        s += &read(self.dirs.log().join(vm).join("vmm.log"));
        s += &read(self.dirs.log().join(vm).join("console.log"));
        s
    }
}

/// The lines of `console` the guest has finished (a line still being written, one byte per
/// UART exit, may be cut anywhere), without the serial line's `\r`.
fn complete_lines(console: &str) -> impl Iterator<Item = &str> {
    console
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| l.trim_end_matches('\r'))
}

/// Reads the console through `ReadConsole` until `find` accepts a complete line, for at
/// most `timeout`, or until the VM is `failed` (its VMM exited with an error: nothing more
/// will come); returns what `find` returned. `console` accumulates what was read, `offset`
/// where to go on.
async fn wait_console_line<T>(
    v: &thvc_nodeagent::client::VmProxy<'_>,
    console: &mut String,
    offset: &mut u64,
    timeout: Duration,
    mut find: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = complete_lines(console).find_map(&mut find) {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        if v.state().await.is_ok_and(|s| s == "failed") {
            read_console_to_end(v, console, offset).await;
            return complete_lines(console).find_map(&mut find);
        }
        if !read_console_step(v, console, offset).await {
            // The guest prints a line every second at best under nested KVM; poll gently
            // rather than spin on the bus.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One `ReadConsole` from `offset`; false when there was nothing new.
async fn read_console_step(
    v: &thvc_nodeagent::client::VmProxy<'_>,
    console: &mut String,
    offset: &mut u64,
) -> bool {
    let (data, next) = v.read_console(*offset).await.expect("ReadConsole");
    console.push_str(&String::from_utf8_lossy(&data));
    *offset = next;
    !data.is_empty()
}

/// Reads the console up to what the VMM has written so far.
async fn read_console_to_end(
    v: &thvc_nodeagent::client::VmProxy<'_>,
    console: &mut String,
    offset: &mut u64,
) {
    while read_console_step(v, console, offset).await {}
}

/// Waits (at most [`GUEST_TIMEOUT`]) for a console line containing `prefix`; returns the
/// rest of that line.
async fn wait_console(
    v: &thvc_nodeagent::client::VmProxy<'_>,
    console: &mut String,
    offset: &mut u64,
    prefix: &str,
) -> Option<String> {
    wait_console_line(v, console, offset, GUEST_TIMEOUT, |l| {
        l.split_once(prefix).map(|(_, rest)| rest.to_owned())
    })
    .await
}

/// The number of a `THVC-TICK=<n>` line.
fn tick_number(line: &str) -> Option<u64> {
    line.split_once("THVC-TICK=")?.1.trim().parse().ok()
}

/// The highest tick in the console so far.
fn last_tick(console: &str) -> Option<u64> {
    complete_lines(console).filter_map(tick_number).max()
}

/// Waits (at most `timeout`) for a tick numbered above `n`; returns its number.
async fn wait_tick_above(
    v: &thvc_nodeagent::client::VmProxy<'_>,
    console: &mut String,
    offset: &mut u64,
    n: u64,
    timeout: Duration,
) -> Option<u64> {
    wait_console_line(v, console, offset, timeout, |l| {
        tick_number(l).filter(|&t| t > n)
    })
    .await
}

/// The VMM's `Info` through the agent, parsed.
async fn info_json(v: &thvc_nodeagent::client::VmProxy<'_>) -> serde_json::Value {
    serde_json::from_str(&v.info().await.expect("Info")).expect("Info is JSON")
}

/// KVM exits of all vCPUs in an `Info` result: they only grow while the vCPUs run.
fn total_vcpu_exits(info: &serde_json::Value) -> u64 {
    info["vcpu_exits"]
        .as_array()
        .unwrap_or_else(|| panic!("no vcpu_exits in {info}"))
        .iter()
        .map(|e| e["total"].as_u64().expect("exit total"))
        .sum()
}

/// Polls the VM's State until it is `want` (bounded); returns the last value seen.
async fn wait_state(v: &thvc_nodeagent::client::VmProxy<'_>, want: &str) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let state = v.state().await.expect("State");
        if state == want || Instant::now() >= deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn guest_spec() -> String {
    format!(
        r#"{{"vcpus":1,"memory_mib":256,"kernel":"vmlinuz","initrd":"guest.cpio.gz",
            "cmdline":"{CMDLINE}","disks":[{{"path":"root.img","serial":"root"}}],
            "nics":[{{"bridge":"br0"}}]}}"#
    )
}

/// Panics with the node's logs when `ok` is false.
fn check(node: &GuestNode, vm: &str, ok: bool, what: &str) {
    if !ok {
        panic!("{what}\n{}", node.diagnostics(vm));
    }
}

/// Calls a Vm method (within GUEST_TIMEOUT), then waits for State `want`; on failure the
/// panic carries the node's diagnostics.
async fn call_then_wait_state(
    node: &GuestNode,
    v: &thvc_nodeagent::client::VmProxy<'_>,
    what: &str,
    call: impl std::future::Future<Output = zbus::Result<()>>,
    want: &str,
) {
    let result = tokio::time::timeout(GUEST_TIMEOUT, call).await;
    check(
        node,
        "guest",
        matches!(result, Ok(Ok(()))),
        &format!("{what}: {result:?}"),
    );
    let state = wait_state(v, want).await;
    check(node, "guest", state == want, &format!("state {state}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn agent_boots_a_linux_guest_on_a_bridge_pings_it_and_shuts_it_down() {
    let started = Instant::now();
    let node = GuestNode::start(&["--metrics-interval", "1"], &guest_init(IDLE)).await;
    let conn = node.connect().await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("guest", &guest_spec()).await.unwrap()).await;
    let spec: serde_json::Value = serde_json::from_str(&v.spec().await.unwrap()).unwrap();
    let mac = spec["nics"][0]["mac"]
        .as_str()
        .expect("generated MAC")
        .to_owned();

    v.start().await.expect("Start");
    check(
        &node,
        "guest",
        v.state().await.unwrap() == "running",
        "running after Start",
    );
    let info = info_json(&v).await;
    assert_eq!(info["vcpus"], 1, "{info}");
    let tap = thvc_nodeagent::names::tap_name("guest", 0);
    let (ok, link) = node.in_netns(&["ip", "-j", "link", "show", &tap]);
    assert!(ok && link.contains("\"master\":\"br0\""), "{link}");

    let (mut console, mut offset) = (String::new(), 0);
    let up = wait_console(&v, &mut console, &mut offset, "THVC-NET-UP=").await;
    check(
        &node,
        "guest",
        up.is_some(),
        "the guest never reported its network",
    );
    eprintln!("guest network up after {:?}", started.elapsed());
    assert_eq!(
        up.unwrap().trim(),
        mac,
        "the guest's eth0 has the spec's MAC"
    );
    assert!(console.contains("THVC-ACPID=started"), "{console}");
    node.ping_guest();
    real_vmm_metrics(&node).await;

    // Graceful: the power button, the guest's acpid powers off, the VMM exits 0.
    let shutdown_started = Instant::now();
    call_then_wait_state(&node, &v, "Shutdown", v.shutdown(), "stopped").await;
    eprintln!("Shutdown took {:?}", shutdown_started.elapsed());
    assert_eq!(v.state_reason().await.unwrap(), "stopped");
    // What the guest printed last shows it powered itself off (not the SIGTERM fallback).
    let (rest, _) = v.read_console(offset).await.unwrap();
    console.push_str(&String::from_utf8_lossy(&rest));
    check(
        &node,
        "guest",
        console.contains("THVC-POWER-BUTTON"),
        "the guest saw the power button",
    );
    let exit = std::fs::read_to_string(node.dirs.run().join("vms/guest/exit.json")).unwrap();
    assert!(exit.contains("\"code\":0"), "{exit}");
    assert!(
        !node.in_netns(&["ip", "link", "show", &tap]).0,
        "TAP removed"
    );
    eprintln!("whole test {:?}", started.elapsed());
}

/// The metrics file (default path, `--metrics-interval 1`) of a booted guest that read its
/// root disk and answered pings: the real VMM's device counters under their series, non-zero.
async fn real_vmm_metrics(node: &GuestNode) {
    let file = node.dirs.run().join("metrics/thvc.prom");
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let wanted = [
        "thvc_vm_running{vm=\"guest\"}",
        "thvc_vm_metrics_up{vm=\"guest\"}",
        "thvc_vm_cpu_seconds_total{vm=\"guest\"}",
        "thvc_vm_memory_rss_bytes{vm=\"guest\"}",
        "thvc_vm_disk_read_bytes_total{vm=\"guest\",device=\"virtio-blk0\"}",
        "thvc_vm_disk_requests_total{vm=\"guest\",device=\"virtio-blk0\"}",
        "thvc_vm_net_rx_bytes_total{vm=\"guest\",device=\"virtio-net0\"}",
        "thvc_vm_net_tx_bytes_total{vm=\"guest\",device=\"virtio-net0\"}",
        "thvc_vm_net_rx_packets_total{vm=\"guest\",device=\"virtio-net0\"}",
        "thvc_vm_net_tx_packets_total{vm=\"guest\",device=\"virtio-net0\"}",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if wanted
            .iter()
            .all(|s| value(&text, s).is_some_and(|v| v > 0.0))
        {
            eprintln!(
                "metrics of the real VMM:\n{}",
                text.lines()
                    .filter(|l| l.contains("vm=\"guest\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            return;
        }
        check(
            node,
            "guest",
            Instant::now() < deadline,
            &format!(
                "metrics: each of {wanted:?} > 0 in {}:\n{text}",
                file.display()
            ),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With `--vmm-user`, the real VMM switches to that user (`--user`) and its TAP belongs to
/// it; the guest boots and answers on the bridge. Then the agent is killed with SIGKILL
/// and restarted: the new agent re-adopts the running VMM (state, Info, console), the
/// guest keeps answering, and the new agent stops it and removes its TAP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn unprivileged_guest_is_readopted_after_an_agent_sigkill() {
    let started = Instant::now();
    let mut node = GuestNode::start(&["--vmm-user", "nobody"], &guest_init(IDLE)).await;
    let conn = node.connect().await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("guest", &guest_spec()).await.unwrap()).await;
    v.start().await.expect("Start");
    let (mut console, mut offset) = (String::new(), 0);
    let up = wait_console(&v, &mut console, &mut offset, "THVC-NET-UP=").await;
    check(
        &node,
        "guest",
        up.is_some(),
        "the guest never reported its network",
    );
    eprintln!("guest network up after {:?}", started.elapsed());

    let vmm = node.dirs.vmm_process("guest").expect("VMM recorded").pid;
    assert_eq!(
        proc_ids(vmm, "Uid:"),
        vec![65534; 4],
        "the VMM runs as nobody"
    );
    assert_eq!(proc_ids(vmm, "Gid:"), vec![65534; 4]);
    let tap = thvc_nodeagent::names::tap_name("guest", 0);
    for attr in ["owner", "group"] {
        let (ok, value) = node.in_netns(&["cat", &format!("/sys/class/net/{tap}/{attr}")]);
        assert!(ok && value.trim() == "65534", "{attr}: {value}");
    }
    node.ping_guest();

    node.kill9_and_restart_agent(vmm);
    let conn = node.connect().await;
    let m = manager(&conn).await;
    let v = vm(
        &conn,
        m.get_vm("guest").await.expect("the VM is still known"),
    )
    .await;
    check(
        &node,
        "guest",
        v.state().await.unwrap() == "running",
        "re-adopted as running",
    );
    assert_eq!(
        node.dirs.vmm_process("guest").map(|p| p.pid),
        Some(vmm),
        "the same VMM, not a new one"
    );
    let info = info_json(&v).await;
    assert_eq!(info["state"], "running", "{info}");
    let (again, _) = v.read_console(0).await.unwrap();
    assert!(String::from_utf8_lossy(&again).contains("THVC-NET-UP="));
    node.ping_guest();

    call_then_wait_state(&node, &v, "Stop", v.stop(), "stopped").await;
    assert!(
        !node.in_netns(&["ip", "link", "show", &tap]).0,
        "TAP removed by the new agent"
    );
    eprintln!("whole test {:?}", started.elapsed());
}

/// `--vmm-uids` with the real VMM: two guests at once, each VMM as a uid of its own with no
/// supplementary group (its launcher opened /dev/kvm for it, which that uid cannot open
/// itself), each booted from its own root disk. Each VM's user opens its own disk, console
/// and API socket and nothing of the other VM's, and cannot attach to the other's TAP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn two_guests_run_as_their_own_users_and_reach_nothing_of_each_other() {
    let started = Instant::now();
    let node = GuestNode::start(&["--vmm-uids", "500000-500099"], &guest_init(IDLE)).await;
    let disks = node.dirs.state().join("disks");
    std::fs::copy(disks.join("root.img"), disks.join("root-b.img")).expect("copy the root disk");
    let conn = node.connect().await;
    let m = manager(&conn).await;
    let specs = [
        ("a", 500000u32, guest_spec()),
        ("b", 500001, guest_spec().replace("root.img", "root-b.img")),
    ];
    let mut vms = Vec::new();
    for (name, _, spec) in &specs {
        let v = vm(&conn, m.create_vm(name, spec).await.unwrap()).await;
        let started = v.start().await;
        check(
            &node,
            name,
            started.is_ok(),
            &format!("Start {name}: {started:?}"),
        );
        vms.push(v);
    }
    for ((name, uid, _), v) in specs.iter().zip(&vms) {
        let (mut console, mut offset) = (String::new(), 0);
        let up = wait_console(v, &mut console, &mut offset, "THVC-NET-UP=").await;
        check(
            &node,
            name,
            up.is_some(),
            &format!("guest {name} never reported its network"),
        );
        let vmm = node.dirs.vmm_process(name).expect("VMM recorded").pid;
        assert_eq!(proc_ids(vmm, "Uid:"), vec![*uid; 4], "VM {name}'s VMM");
        assert_eq!(
            proc_ids(vmm, "Gid:"),
            vec![*uid; 4],
            "VM {name}: its private group"
        );
        assert_eq!(
            proc_ids(vmm, "Groups:"),
            Vec::<u32>::new(),
            "VM {name}: no other group"
        );
        assert_eq!(
            try_as(*uid, *uid, "rw", Path::new("/dev/kvm")),
            Err(libc::EACCES),
            "VM {name}'s user cannot open KVM itself: its VMM got it from the launcher"
        );
    }
    eprintln!("both guests up after {:?}", started.elapsed());

    let (a, b) = (specs[0].1, specs[1].1);
    let file = |vm: &str, f: &str| match f {
        "disk" if vm == "a" => disks.join("root.img"),
        "disk" => disks.join("root-b.img"),
        "console" => node.dirs.log().join(vm).join("console.log"),
        _ => node.dirs.run().join("vms").join(vm).join("api.sock"),
    };
    for (me, my, other) in [("a", a, "b"), ("b", b, "a")] {
        for (what, op) in [("disk", "rw"), ("console", "rw"), ("api", "connect")] {
            assert_eq!(
                try_as(my, my, op, &file(me, what)),
                Ok(()),
                "{me}: its own {what}"
            );
            assert_eq!(
                try_as(
                    my,
                    my,
                    if op == "rw" { "read" } else { op },
                    &file(other, what)
                ),
                Err(libc::EACCES),
                "{me}: {other}'s {what}"
            );
        }
        let tap = thvc_nodeagent::names::tap_name(other, 0);
        let e = attach_tap_as(node.netns_pid(), my, my, &tap).expect_err("not the other's TAP");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{me} on {tap}: {e}");
    }

    for ((name, _, _), v) in specs.iter().zip(&vms) {
        call_then_wait_state(&node, v, &format!("Stop {name}"), v.stop(), "stopped").await;
    }
    eprintln!("whole test {:?}", started.elapsed());
}

/// The agent's lifecycle with the real VMM and a real guest, in one boot sequence: Pause
/// stops the guest (no tick, no vCPU exit) and Resume continues it where it stopped; a
/// reboot inside the guest makes the agent start a new VMM that boots the guest again;
/// a VMM killed behind the agent's back leaves the VM `failed`, saying why, and it starts
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn guest_pause_resume_reboot_and_vmm_crash_through_the_agent() {
    let started = Instant::now();
    let node = GuestNode::start(&[], &guest_init(&tick_and_reboot_on_request())).await;
    let conn = node.connect().await;
    let m = manager(&conn).await;
    let path = m.create_vm("guest", &guest_spec()).await.unwrap();
    let v = vm(&conn, path.clone()).await;
    v.start().await.expect("Start");
    let (mut console, mut offset) = (String::new(), 0);
    let ticking = wait_tick_above(&v, &mut console, &mut offset, 1, GUEST_TIMEOUT).await;
    check(&node, "guest", ticking.is_some(), "the guest never ticked");
    check(
        &node,
        "guest",
        complete_lines(&console).any(|l| l == "THVC-BOOT=1"),
        "the first boot counted itself",
    );
    eprintln!("guest ticking after {:?}", started.elapsed());

    // Pause: the vCPUs stop, so no tick arrives and no vCPU exits KVM.
    v.pause().await.expect("Pause");
    let state = v.state().await.unwrap();
    check(
        &node,
        "guest",
        state == "paused",
        &format!("state {state} after Pause"),
    );
    // Pause returned after the VMM parked its vCPUs: what they wrote before is in the log.
    read_console_to_end(&v, &mut console, &mut offset).await;
    let frozen_tick = last_tick(&console).expect("ticks seen");
    let frozen = info_json(&v).await;
    assert_eq!(frozen["state"], "paused", "{frozen}");
    let while_paused =
        wait_tick_above(&v, &mut console, &mut offset, frozen_tick, QUIET_WINDOW).await;
    check(
        &node,
        "guest",
        while_paused.is_none(),
        &format!("tick {while_paused:?} arrived while paused (last before: {frozen_tick})"),
    );
    let still = info_json(&v).await;
    assert!(total_vcpu_exits(&frozen) > 0, "{frozen}");
    assert_eq!(
        total_vcpu_exits(&still),
        total_vcpu_exits(&frozen),
        "vCPUs ran while paused: {still}"
    );

    // Resume: ticks go on from where they stopped (the same guest, not a new one).
    v.resume().await.expect("Resume");
    let state = v.state().await.unwrap();
    check(
        &node,
        "guest",
        state == "running",
        &format!("state {state} after Resume"),
    );
    let next = wait_tick_above(&v, &mut console, &mut offset, frozen_tick, GUEST_TIMEOUT).await;
    check(
        &node,
        "guest",
        next == Some(frozen_tick + 1),
        &format!("after tick {frozen_tick} came {next:?}"),
    );
    assert!(total_vcpu_exits(&info_json(&v).await) > total_vcpu_exits(&still));
    eprintln!("pause and resume checked after {:?}", started.elapsed());

    // Reboot from inside the guest: the VMM exits 3, the agent starts a new one, which
    // boots the guest from the same root disk (its boot counter says 2).
    let first_vmm = node.dirs.vmm_process("guest").expect("VMM recorded");
    let mut states = StateWatcher::new(&conn, &path).await;
    node.retry_in_netns(
        "send the guest its reboot request",
        &[
            STATIC_BUSYBOX,
            "timeout",
            "10",
            STATIC_BUSYBOX,
            "nc",
            "-w",
            "3",
            GUEST_ADDRESS,
            REBOOT_PORT,
        ],
    );
    let second_boot = wait_console_line(&v, &mut console, &mut offset, GUEST_TIMEOUT, |l| {
        (l == "THVC-BOOT=2").then_some(())
    })
    .await;
    check(
        &node,
        "guest",
        second_boot.is_some(),
        "the guest never booted a second time",
    );
    assert!(console.contains("THVC-REBOOT-REQUESTED"), "{console}");
    eprintln!("second boot after {:?}", started.elapsed());
    assert_eq!(
        states.wait_for("running").await,
        ["starting", "running"],
        "the agent restarted the VM"
    );
    let second_vmm = node.dirs.vmm_process("guest").expect("VMM recorded");
    check(
        &node,
        "guest",
        second_vmm.pid != first_vmm.pid && second_vmm.is_alive() && !first_vmm.is_alive(),
        &format!("a new VMM runs the guest: {first_vmm:?} then {second_vmm:?}"),
    );
    let state = v.state().await.unwrap();
    check(
        &node,
        "guest",
        state == "running",
        &format!("state {state} after the reboot"),
    );

    // The VMM dies behind the agent's back: failed, with the reason, and its TAP is gone.
    assert_eq!(
        second_vmm.signal(libc::SIGKILL).ok(),
        Some(true),
        "SIGKILL the VMM"
    );
    let state = wait_state(&v, "failed").await;
    check(
        &node,
        "guest",
        state == "failed",
        &format!("state {state} after SIGKILL"),
    );
    let reason = v.state_reason().await.unwrap();
    check(
        &node,
        "guest",
        reason.contains("killed by signal 9") && reason.contains("vmm.log"),
        &format!("StateReason: {reason}"),
    );
    let tap = thvc_nodeagent::names::tap_name("guest", 0);
    assert!(
        !node.in_netns(&["ip", "link", "show", &tap]).0,
        "TAP removed after the crash"
    );

    // A failed VM starts again: a new VMM, its TAP back on the bridge; then Stop.
    v.start().await.expect("Start after the crash");
    let state = v.state().await.unwrap();
    check(
        &node,
        "guest",
        state == "running",
        &format!("state {state} after the restart"),
    );
    let third_vmm = node.dirs.vmm_process("guest").expect("VMM recorded");
    assert!(
        third_vmm.pid != second_vmm.pid && third_vmm.is_alive(),
        "{third_vmm:?}"
    );
    let (ok, link) = node.in_netns(&["ip", "-j", "link", "show", &tap]);
    assert!(ok && link.contains("\"master\":\"br0\""), "{link}");
    call_then_wait_state(&node, &v, "Stop", v.stop(), "stopped").await;
    eprintln!("whole test {:?}", started.elapsed());
}

/// A tenant's cloud image through the agent, as a control plane drives it: the image is in
/// the image store, `CreateDisk` clones it into the disk store, `CreateVm` with
/// `"firmware": "uefi"`, a UUID and cloud-init metadata (host name, SSH key, a static
/// address), `Start`. The firmware boots the image's own boot loader; cloud-init reads the
/// agent's NoCloud seed: the host pings the address and logs in with the key, and the guest
/// sees the VM's UUID in its SMBIOS tables. `Shutdown` powers it off (VMM status 0).
/// One vCPU: see vmm/tests/guest_uefi.rs (the test VM's emulator and firmware MP start-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn agent_boots_a_cloud_image_through_uefi_configured_by_cloud_init() {
    const UUID: &str = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c";
    const HOSTNAME: &str = "tenant-vm";
    let started = Instant::now();
    let firmware = asset("THVC_FIRMWARE");
    let node = GuestNode::start(
        &["--firmware", firmware.to_str().expect("utf-8")],
        &guest_init(IDLE),
    )
    .await;
    let copy = Command::new("cp")
        .arg("--sparse=always")
        .arg(asset("THVC_CLOUD_IMAGE"))
        .arg(node.dirs.state().join("images/cloud.raw"))
        .status()
        .expect("cp runs");
    assert!(
        copy.success(),
        "copying the cloud image into the image store"
    );
    let key = node.dirs.root.path().join("tenant-key");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs (openssh-client)");
    assert!(keygen.success());
    let public_key = std::fs::read_to_string(key.with_extension("pub")).expect("public key");

    let conn = node.connect().await;
    let m = manager(&conn).await;
    let disk: serde_json::Value = serde_json::from_str(
        &m.create_disk("tenant", r#"{"from_image": "cloud.raw"}"#)
            .await
            .expect("CreateDisk from the image"),
    )
    .expect("disk JSON");
    eprintln!("CreateDisk: {disk}");
    let spec = serde_json::json!({
        "vcpus": 1,
        "memory_mib": 1024,
        "firmware": "uefi",
        "uuid": UUID,
        "disks": [{"path": "tenant"}],
        "nics": [{"bridge": "br0"}],
        "metadata": {
            "hostname": HOSTNAME,
            "ssh_authorized_keys": [public_key.trim()],
            "network": [{"addresses": [format!("{GUEST_ADDRESS}/24")]}],
        },
    });
    let v = vm(
        &conn,
        m.create_vm("tenant", &spec.to_string()).await.unwrap(),
    )
    .await;
    assert_eq!(v.uuid().await.unwrap(), UUID);
    v.start().await.expect("Start");

    let (mut console, mut offset) = (String::new(), 0);
    let done = wait_console_line(
        &v,
        &mut console,
        &mut offset,
        Duration::from_secs(600),
        |l| (l.contains("Cloud-init v.") && l.contains("finished")).then_some(()),
    )
    .await;
    check(&node, "tenant", done.is_some(), "cloud-init never finished");
    eprintln!("cloud-init finished after {:?}", started.elapsed());
    node.ping_guest();
    let ssh = |command: &str| {
        node.in_netns(&[
            "ssh",
            "-i",
            key.to_str().expect("utf-8"),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            &format!("debian@{GUEST_ADDRESS}"),
            command,
        ])
    };
    let (ok, out) = ssh("hostname; sudo cat /sys/class/dmi/id/product_uuid");
    check(
        &node,
        "tenant",
        ok,
        &format!("ssh with the metadata's key: {out}"),
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [HOSTNAME, UUID],
        "host name from the seed, UUID from SMBIOS"
    );
    let users: serde_json::Value =
        serde_json::from_str(&m.list_disks().await.unwrap()).expect("ListDisks JSON");
    assert!(users.to_string().contains("\"tenant\""), "{users}");

    call_then_wait_state(&node, &v, "Shutdown", v.shutdown(), "stopped").await;
    let exit = std::fs::read_to_string(node.dirs.run().join("vms/tenant/exit.json")).unwrap();
    assert!(exit.contains("\"code\":0"), "{exit}");
    eprintln!("whole test {:?}", started.elapsed());
}

/// sshd for a migration's link, as a node runs it for the thvc-migrate account: key only,
/// the forced command `thvc-nodeagent migrate-receive` talking to the target agent's bus.
/// It listens on 127.0.0.1:[`SSHD_PORT`] in the source agent's network namespace (where
/// the source agent's ssh connects); the source's ssh_config calls it `alias`.
struct MigrationSsh {
    dir: tempfile::TempDir,
    sshd: std::process::Child,
}

const SSHD_PORT: &str = "2222";

impl MigrationSsh {
    fn start(source: &GuestNode, target: &GuestNode, alias: &str) -> MigrationSsh {
        let sshd_bin = Path::new("/usr/sbin/sshd");
        assert!(
            sshd_bin.is_file(),
            "/usr/sbin/sshd is not installed, but the migration test needs it: install the \
             Debian package openssh-server (nodeagent/tests/install-deps.sh does)"
        );
        let keygen = require_tool("ssh-keygen", "openssh-client");
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for key in ["host_key", "id_ed25519"] {
            let out = Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(d.join(key))
                .output()
                .expect("run ssh-keygen");
            assert!(out.status.success(), "ssh-keygen: {out:?}");
        }
        let public = |key: &str| {
            std::fs::read_to_string(d.join(format!("{key}.pub")))
                .expect("public key")
                .trim()
                .to_owned()
        };
        let receive = format!(
            "{AGENT} --bus {} migrate-receive",
            target.bus.address.replace(',', "\\,")
        );
        std::fs::write(
            d.join("authorized_keys"),
            format!("restrict,command=\"{receive}\" {}\n", public("id_ed25519")),
        )
        .unwrap();
        std::fs::write(
            d.join("known_hosts"),
            format!("{alias} {}\n", public("host_key")),
        )
        .unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:{SSHD_PORT}\nHostKey {host}\nPidFile none\n\
                 AuthorizedKeysFile {keys}\nPermitRootLogin forced-commands-only\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\n",
                host = d.join("host_key").display(),
                keys = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host {alias}\n  HostName 127.0.0.1\n  Port {SSHD_PORT}\n  User root\n  \
                 HostKeyAlias {alias}\n  IdentityFile {id}\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n  ConnectTimeout 20\n",
                id = d.join("id_ed25519").display(),
                known = d.join("known_hosts").display(),
            ),
        )
        .unwrap();
        // sshd's privilege separation directory (systemd's unit makes it on a node).
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let (ok, out) = source.in_netns(&["ip", "link", "set", "lo", "up"]);
        assert!(ok, "loopback up: {out}");
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let sshd = Command::new("nsenter")
            .args([
                "-t",
                &source.netns_pid().to_string(),
                "-n",
                "-m",
                "-r",
                "--",
            ])
            .arg(sshd_bin)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let started = MigrationSsh { dir, sshd };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !started.log().contains("Server listening") {
            assert!(
                Instant::now() < deadline,
                "sshd did not start:\n{}",
                started.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        started
    }

    fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for MigrationSsh {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// Where each thread of the node's VMM for "guest" waits (for a migration that hangs).
fn vmm_threads(node: &GuestNode) -> String {
    let Some(p) = node.dirs.vmm_process("guest") else {
        return "(no VMM recorded)".into();
    };
    let pid = p.pid;
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(VMM {pid} is gone)");
    };
    for t in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        out += &format!(
            "{} {}: wchan {} syscall {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("syscall").trim()
        );
    }
    out
}

/// Which migration job to run.
enum MoveBy<'a> {
    /// MigrateVm(name, target).
    MigrateVm(&'a str),
    /// DrainTo(600 s, target): every running VM.
    DrainTo,
}

/// Runs a migration job on `m` to `target` and returns its result and message (bounded),
/// with each migration phase its Status showed (MigrateVm's is the VMM's progress, DrainTo's
/// has it under `migration`), printed as it goes.
async fn migration_job(
    conn: &zbus::Connection,
    m: &thvc_nodeagent::client::ManagerProxy<'_>,
    how: MoveBy<'_>,
    target: &str,
) -> (String, String, Vec<String>) {
    use futures_util::StreamExt;
    let mut removed = m.receive_job_removed().await.expect("subscribe");
    let job = match how {
        MoveBy::MigrateVm(name) => m.migrate_vm(name, target).await.expect("MigrateVm"),
        MoveBy::DrainTo => m.drain_to(600, target).await.expect("DrainTo"),
    };
    let proxy = thvc_nodeagent::client::JobProxy::builder(conn)
        .path(job.clone())
        .unwrap()
        .build()
        .await
        .unwrap();
    let phase = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        let progress = v.get("migration").unwrap_or(&v);
        progress["state"].as_str().map(str::to_owned)
    };
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut timed_out = false;
    loop {
        tokio::select! {
            signal = removed.next() => {
                let signal = signal.expect("the bus stays");
                let args = signal.args().unwrap();
                if args.path.as_str() == job.as_str() {
                    return (args.result.to_string(), args.message.to_string(), seen);
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if Instant::now() >= deadline {
                    if timed_out {
                        return ("timeout".into(), format!("the job did not end: {seen:?}"), seen);
                    }
                    // Once more, with its cancel: the caller shows what hung.
                    timed_out = true;
                    let _ = proxy.cancel().await;
                }
                // Each phase once: connecting, precopy, stop-and-copy, switching.
                if let Some(now) = proxy.status().await.ok().as_deref().and_then(phase) {
                    if seen.last() != Some(&now) {
                        eprintln!("migration: {now}");
                        seen.push(now);
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
async fn a_running_guest_migrates_to_another_node_over_ssh_and_goes_on_there() {
    let started = Instant::now();
    let init = guest_init(&tick_and_reboot_on_request());
    // The source's ssh_config names the target node2; the sshd its ssh reaches runs in the
    // source's network namespace, its forced command talks to the target's bus.
    let ssh_dir = tempfile::tempdir().unwrap();
    let config = ssh_dir.path().join("to-node2");
    let config_arg = config.to_str().unwrap().to_owned();
    let target = GuestNode::start(&[], &init).await;
    let source = GuestNode::start(&["--migration-ssh-config", &config_arg], &init).await;
    let ssh = MigrationSsh::start(&source, &target, "node2");
    std::fs::copy(ssh.ssh_config(), &config).unwrap();
    // One disk on storage both nodes reach: the target's store has the same file.
    let shared = source.dirs.state().join("disks/root.img");
    let target_disk = target.dirs.state().join("disks/root.img");
    std::fs::remove_file(&target_disk).unwrap();
    std::fs::hard_link(&shared, &target_disk).unwrap();

    let src_conn = source.connect().await;
    let src = manager(&src_conn).await;
    let path = src.create_vm("guest", &guest_spec()).await.unwrap();
    let v = vm(&src_conn, path).await;
    v.start().await.expect("Start");
    let uuid = v.uuid().await.unwrap();
    let (mut console, mut offset) = (String::new(), 0);
    let ticking = wait_tick_above(&v, &mut console, &mut offset, 1, GUEST_TIMEOUT).await;
    check(
        &source,
        "guest",
        ticking.is_some(),
        "the guest never ticked",
    );
    eprintln!("guest ticking on the source after {:?}", started.elapsed());

    // A migration to a target that refuses (a VM of that name exists there) leaves the guest
    // running here, and the job says why in the target's words.
    let dst_conn = target.connect().await;
    let dst = manager(&dst_conn).await;
    dst.create_vm("guest", &guest_spec()).await.unwrap();
    let (result, message, _) =
        migration_job(&src_conn, &src, MoveBy::MigrateVm("guest"), "node2").await;
    assert_eq!(result, "failed", "{message}");
    assert!(
        message.contains("exists on this node already") && message.contains("is running here"),
        "{message}\n{}",
        ssh.log()
    );
    assert_eq!(v.state().await.unwrap(), "running");
    let before = last_tick(&console).unwrap_or(0);
    let still = wait_tick_above(&v, &mut console, &mut offset, before, GUEST_TIMEOUT).await;
    check(
        &source,
        "guest",
        still.is_some(),
        "the guest stopped ticking after a refused migration",
    );
    dst.delete_vm("guest").await.unwrap();
    eprintln!("refused migration checked after {:?}", started.elapsed());

    // The real one: the node drained to node2 (DrainTo migrates each running VM as
    // MigrateVm does; its failures: tests/drain.rs, drain_to_an_unreachable_node_...).
    read_console_to_end(&v, &mut console, &mut offset).await;
    let before = last_tick(&console).expect("ticks seen");
    let (result, message, progress) =
        migration_job(&src_conn, &src, MoveBy::DrainTo, "node2").await;
    if result != "done" {
        panic!(
            "migration {result}: {message}\nsource VMM threads:\n{}\ntarget VMM threads:\n{}\n\
             sshd:\n{}\n---- source:\n{}\n---- target:\n{}",
            vmm_threads(&source),
            vmm_threads(&target),
            ssh.log(),
            source.diagnostics("guest"),
            target.diagnostics("guest")
        );
    }
    assert_eq!(message, "the node is drained: 1 VM(s) migrated to node2");
    assert!(src.drained().await.unwrap());
    assert!(
        progress.iter().any(|p| p == "precopy"),
        "the job showed the migration's progress: {progress:?}"
    );
    eprintln!(
        "migrated after {:?}: {message}; progress seen: {progress:?}",
        started.elapsed()
    );
    assert!(
        !vm_names(&src).await.contains(&"guest".to_owned()),
        "the VM left the source"
    );
    assert!(src.get_vm("guest").await.is_err());

    // It exists on the target: same UUID, running, the guest going on from where it was
    // (no boot on the target: its console has no THVC-BOOT line) and on the target's
    // network (its TAP on the target's bridge).
    let dv = vm(
        &dst_conn,
        dst.get_vm("guest").await.expect("the VM is on the target"),
    )
    .await;
    assert_eq!(dv.state().await.unwrap(), "running");
    assert_eq!(dv.uuid().await.unwrap(), uuid);
    let (mut dconsole, mut doffset) = (String::new(), 0);
    let next = wait_tick_above(&dv, &mut dconsole, &mut doffset, before, GUEST_TIMEOUT).await;
    check(
        &target,
        "guest",
        next.is_some(),
        &format!("no tick above {before} on the target"),
    );
    let first = complete_lines(&dconsole).find_map(tick_number);
    assert!(
        first.is_some_and(|t| t > before),
        "the target's first tick {first:?} follows the source's {before}"
    );
    assert!(
        !dconsole.contains("THVC-BOOT="),
        "the guest booted on the target:\n{dconsole}"
    );
    target.ping_guest();
    let info = info_json(&dv).await;
    assert!(info["migrated_in_on"].is_string(), "{info}");

    // The target's agent controls it like any of its VMs.
    call_then_wait_state(&target, &dv, "Stop", dv.stop(), "stopped").await;
    eprintln!("done after {:?}", started.elapsed());
}
