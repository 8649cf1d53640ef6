//! A stock distribution guest as a tenant brings it (issue #21): Debian trixie built from
//! Debian's packages by integration/guest/stock/build (Debian's cloud kernel, its
//! initramfs-tools initrd, systemd, udev, systemd-networkd with a `[Match] Name=e*` .network
//! file). No test code runs in it but one unit that reports, once systemd says the boot is
//! over, how it went (see integration/guest/stock/overlay). Run in the test VM, like
//! guest_boot.rs.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{api_call, tempdir, Guest, HostTap, Transport};

const TAP: &str = "thvcstock0";
const HOST_IP: &str = "10.99.0.1";
/// What the guest's own .network file gives its first NIC.
const GUEST_IP: &str = "10.99.0.2";

fn stock(file: &str) -> PathBuf {
    let dir = std::env::var_os("THVC_STOCK_DIR").unwrap_or_else(|| {
        panic!(
            "THVC_STOCK_DIR is not set: these tests run inside the test VM with the env from \
             integration/testvm/assets --print-env (integration/run-tests does both)"
        )
    });
    let path = PathBuf::from(dir).join(file);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Accepts one connection and passes on what it sends (the guest's report over TCP).
fn tcp_receiver() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind((HOST_IP, 0)).expect("listen on the TAP's address");
    let port = listener.local_addr().expect("port").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut text = String::new();
            let _ = conn.read_to_string(&mut text);
            let _ = tx.send(text.trim().to_string());
        }
    });
    (port, rx)
}

/// Lines of one kind of the guest's report (`THVC-STOCK-<kind> ...`), without the prefix.
fn report(guest: &Guest, kind: &str) -> Vec<String> {
    let prefix = format!("THVC-STOCK-{kind} ");
    guest
        .seen()
        .iter()
        .filter_map(|l| l.find(&prefix).map(|at| l[at + prefix.len()..].to_string()))
        .collect()
}

#[test]
#[ignore = "needs the test VM (real KVM); run by integration/run-tests"]
fn a_stock_debian_guest_boots_to_running_configures_its_network_and_powers_off() {
    stock_guest(Transport::Mmio);
}

/// The same guest on the PCI platform: its kernel finds the disk and the NIC as virtio-pci
/// functions with MSI-X (virtio-mmio is not there at all), and nothing else changes.
#[test]
#[ignore = "needs the test VM (real KVM); run by integration/run-tests"]
fn a_stock_debian_guest_on_pci_boots_to_running_configures_its_network_and_powers_off() {
    stock_guest(Transport::Pci);
}

fn stock_guest(transport: Transport) {
    let tmp = tempdir("stock");
    let dir = tmp.path();
    let root = dir.join("root.ext4");
    let copy = Command::new("cp")
        .arg("--sparse=always")
        .arg(stock("root.ext4"))
        .arg(&root)
        .status()
        .expect("cp runs");
    assert!(copy.success(), "copying the stock root image failed");
    let socket = dir.join("api.sock");
    let _tap = HostTap::new(TAP, &format!("{HOST_IP}/24"));
    let (port, tcp) = tcp_receiver();
    let kernel = stock("vmlinuz");
    let initrd = stock("initrd.img");
    let cmdline = format!("console=ttyS0 root=/dev/vda rw quiet thvc.report={HOST_IP}:{port}");
    let disk = format!("path={}", root.display());
    let net = format!("tap={TAP}");
    let mut args = transport.args().to_vec();
    args.extend_from_slice(&[
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--initrd",
        initrd.to_str().expect("utf-8"),
        "--cmdline",
        &cmdline,
        "--cpus",
        "2",
        "--memory",
        "1024",
        "--disk",
        &disk,
        "--net",
        &net,
        "--api-socket",
        socket.to_str().expect("utf-8"),
    ]);
    let mut guest = Guest::start(&args);

    // systemd says the boot is over, and how it ended.
    let state = guest.wait_for("THVC-STOCK-STATE ");
    guest.wait_for("THVC-STOCK-DONE");
    guest.collect();
    println!("boot: {state}; {:?}", report(&guest, "ANALYZE"));
    for w in report(&guest, "WARNING") {
        println!("journal warning: {w}");
    }
    let all = guest.seen().join("\n");
    assert!(
        state.starts_with("running "),
        "the boot ended {state:?}, not running; console:\n{all}"
    );
    assert!(
        report(&guest, "FAILED").is_empty(),
        "failed units: {:?}",
        report(&guest, "FAILED")
    );
    assert!(
        report(&guest, "ERROR").is_empty(),
        "the guest's journal has errors: {:#?}",
        report(&guest, "ERROR")
    );
    assert_eq!(
        report(&guest, "VIRT-CPUS"),
        ["0"],
        "CPUs offering VMX/SVM to the guest (nested virtualization is hidden)"
    );
    let addrs = report(&guest, "ADDR");
    assert!(
        addrs.iter().any(|a| a.contains(&format!("{GUEST_IP}/24"))),
        "systemd-networkd did not give the NIC its address: {addrs:?}"
    );

    // The guest's own network stack reaches the host (TCP, so checksums and offloads are
    // exercised too) and the host reaches the guest.
    let boot_id = report(&guest, "BOOT-ID").concat();
    let sent = tcp
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("nothing arrived over TCP from the guest; console:\n{all}"));
    assert_eq!(sent, format!("boot-id {boot_id}"), "what the guest sent");
    let ping = Command::new("ping")
        .args(["-c", "3", "-W", "5", GUEST_IP])
        .output()
        .expect("ping runs (iputils-ping, installed by integration/setup)");
    assert!(
        ping.status.success(),
        "the host cannot ping the guest:\n{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // The API's shutdown is a clean power-off through the guest's own systemd.
    api_call(&socket, "shutdown");
    let (status, console, stderr) = guest.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after shutdown; stderr:\n{stderr}\nconsole:\n{console}"
    );
}
