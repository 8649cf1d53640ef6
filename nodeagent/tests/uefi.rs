//! UEFI VMs through the agent: `firmware: "uefi"`, the VM's UUID and its cloud-init seed.
//! The VMM is the fake one (it checks its command line the way thvc-vmm does and boots
//! nothing); the command line checked here is the one the agent really ran, read from
//! `/proc/PID/cmdline` of the VMM process its supervisor recorded. The seed volume is read
//! back with fatfs and probed with blkid, as the guest's cloud-init would find it.

mod common;

use std::io::{Cursor, Read};
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKr0tOeV1Wc admin@ops";

/// The argv (without the program) of the VMM process recorded for `vm`.
fn vmm_argv(dirs: &NodeDirs, vm: &str) -> Vec<String> {
    let p = dirs.vmm_process(vm).expect("VMM recorded");
    let raw = std::fs::read(format!("/proc/{}/cmdline", p.pid)).expect("VMM cmdline");
    let mut args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(args.remove(0).ends_with("thvc-fake-vmm"), "{args:?}");
    args
}

/// The value after each occurrence of `opt`.
fn values<'a>(args: &'a [String], opt: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == opt)
        .map(|w| w[1].as_str())
        .collect()
}

/// Files of the FAT seed volume at `path`, and its label.
fn read_seed(path: &Path) -> (String, Vec<(String, String)>) {
    let data = std::fs::read(path).expect("seed volume");
    let fs = fatfs::FileSystem::new(Cursor::new(data), fatfs::FsOptions::new()).expect("FAT");
    let mut files = Vec::new();
    for e in fs.root_dir().iter() {
        let e = e.unwrap();
        let mut s = String::new();
        e.to_file().read_to_string(&mut s).unwrap();
        files.push((e.file_name(), s));
    }
    files.sort();
    (fs.volume_label(), files)
}

fn doc(files: &[(String, String)], name: &str) -> String {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, c)| c.clone())
        .unwrap_or_else(|| panic!("no {name} in the seed: {files:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uefi_vm_with_uuid_and_cloud_init_seed() {
    require_tool("unshare", "util-linux");
    let blkid = require_tool("blkid", "util-linux");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let firmware = dirs.root.path().join("fw/CLOUDHV.fd");
    let fw = firmware.to_str().unwrap();
    let agent = Agent::start_with(&bus, &dirs, &["--firmware", fw], IN_NEW_NETNS);
    let _ = agent.pid();
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    m.apply_network(
        r#"{"links": [{"name": "br0", "kind": "bridge", "mtu": 1500}]}"#,
        false,
    )
    .await
    .expect("bridge");
    std::fs::write(dirs.state().join("disks/root.img"), vec![0u8; 1 << 20]).unwrap();

    let cloud_spec = json!({
        "vcpus": 1, "memory_mib": 128, "firmware": "uefi",
        "uuid": "0F3C1B2A-9D4E-4F6A-8B7C-1D2E3F4A5B6C",
        "disks": [{"path": "root.img"}],
        "nics": [{"bridge": "br0"}],
        "metadata": {
            "hostname": "cloud-1.example.org",
            "ssh_authorized_keys": [KEY],
            "network": [{"addresses": ["10.0.0.5/24"], "gateway": "10.0.0.1",
                         "nameservers": ["10.0.0.1"]}]
        }
    });
    let path = m
        .create_vm("cloud-1", &cloud_spec.to_string())
        .await
        .expect("create");
    assert_eq!(m.get_vm("cloud-1").await.unwrap(), path);
    let v = vm(&conn, path).await;
    let uuid = "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c";
    assert_eq!(v.uuid().await.unwrap(), uuid, "normalized to lower case");
    let stored: Value = serde_json::from_str(&v.spec().await.unwrap()).unwrap();
    assert_eq!(stored["uuid"], uuid);
    assert_eq!(stored["firmware"], "uefi");
    let mac = stored["nics"][0]["mac"].as_str().unwrap().to_owned();
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(dirs.spec_file("cloud-1")).unwrap()).unwrap();
    assert_eq!(on_disk, stored, "the UUID is stored with the spec");

    // No firmware file yet: Start fails clearly, and no VMM ran.
    let e = v.start().await.unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Io");
    let msg = error_message(&e);
    assert!(
        msg.contains("UEFI firmware") && msg.contains(fw) && msg.contains("--firmware"),
        "{msg}"
    );
    assert_eq!(v.state().await.unwrap(), "failed");
    assert!(dirs.vmm_process("cloud-1").is_none());

    std::fs::create_dir_all(firmware.parent().unwrap()).unwrap();
    std::fs::write(&firmware, b"not really edk2").unwrap();
    v.start().await.expect("start with firmware");
    assert_eq!(v.state().await.unwrap(), "running");

    let args = vmm_argv(&dirs, "cloud-1");
    let joined = args.join(" ");
    assert_eq!(values(&args, "--firmware"), [fw], "{joined}");
    assert_eq!(values(&args, "--transport"), ["pci"], "{joined}");
    assert_eq!(
        values(&args, "--platform"),
        [format!("uuid={uuid}")],
        "{joined}"
    );
    for absent in ["--kernel", "--initrd", "--cmdline"] {
        assert!(!args.iter().any(|a| a == absent), "{joined}");
    }
    let disks = values(&args, "--disk");
    let root = dirs.state().join("disks/root.img").canonicalize().unwrap();
    let seed = dirs.run().join("vms/cloud-1/seed.img");
    assert_eq!(
        disks,
        [
            format!("path={}", root.display()),
            format!("path={},readonly=on", seed.display())
        ],
        "boot disk first, the seed last and read-only"
    );

    // The seed as the guest sees it.
    let (label, files) = read_seed(&seed);
    assert_eq!(label, "cidata");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["meta-data", "network-config", "user-data"]);
    let meta: Value = serde_json::from_str(&doc(&files, "meta-data")).unwrap();
    assert_eq!(
        meta,
        json!({"instance-id": uuid, "local-hostname": "cloud-1.example.org",
               "public-keys": [KEY]})
    );
    let user = doc(&files, "user-data");
    let cc: Value = serde_json::from_str(user.strip_prefix("#cloud-config\n").unwrap()).unwrap();
    assert_eq!(cc["ssh_authorized_keys"], json!([KEY]));
    let net: Value = serde_json::from_str(&doc(&files, "network-config")).unwrap();
    assert_eq!(
        net["ethernets"]["nic0"],
        json!({"match": {"macaddress": mac}, "addresses": ["10.0.0.5/24"],
               "routes": [{"to": "0.0.0.0/0", "via": "10.0.0.1"}],
               "nameservers": {"addresses": ["10.0.0.1"]}})
    );
    // blkid (what cloud-init's device search uses) sees a FAT volume labelled cidata.
    let probe = Command::new(&blkid)
        .args(["-p", "-o", "export"])
        .arg(&seed)
        .output()
        .unwrap();
    let probe = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.contains("TYPE=vfat"), "{probe}");
    assert!(probe.lines().any(|l| l == "LABEL=cidata"), "{probe}");

    // Rebuilt at every start: a damaged seed is whole again after Stop and Start.
    v.stop().await.expect("stop");
    std::fs::write(&seed, b"garbage").unwrap();
    v.start().await.expect("start again");
    assert_eq!(read_seed(&seed).1, files);
    v.stop().await.expect("stop");

    // Kernel boot gets a generated UUID, passed the same way; no seed without metadata.
    let path = m.create_vm("plain", &spec("")).await.unwrap();
    let plain = vm(&conn, path).await;
    let generated = plain.uuid().await.unwrap();
    assert_eq!(generated.len(), 36, "{generated}");
    assert_eq!(&generated[14..15], "4", "random (version 4): {generated}");
    plain.start().await.expect("start kernel VM");
    let args = vmm_argv(&dirs, "plain");
    assert_eq!(values(&args, "--platform"), [format!("uuid={generated}")]);
    assert_eq!(values(&args, "--kernel").len(), 1);
    assert!(values(&args, "--firmware").is_empty());
    assert!(values(&args, "--disk").is_empty());
    plain.stop().await.unwrap();

    // Deleting the VM removes its seed.
    m.delete_vm("cloud-1").await.expect("delete");
    assert!(!seed.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_specs_are_validated_at_creation() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    std::fs::write(dirs.state().join("disks/root.img"), b"disk").unwrap();
    let cases = [
        (r#","firmware":"uefi""#, "at least one disk"),
        (
            r#","firmware":"uefi","disks":[{"path":"root.img"}],"transport":"mmio""#,
            "transport",
        ),
        (
            r#","firmware":"uefi","disks":[{"path":"root.img"}],"cmdline":"x""#,
            "cmdline belongs to direct kernel boot",
        ),
        (r#","uuid":"nope""#, "is not a UUID"),
        (
            r#","metadata":{"user_data":"x"},"disks":[]"#,
            "", // valid: checked below that it is accepted
        ),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        // `spec` adds a kernel; firmware specs replace it.
        let json = if extra.contains("firmware") {
            format!(r#"{{"vcpus":1,"memory_mib":128{extra}}}"#)
        } else {
            spec(extra)
        };
        let name = format!("vm{i}");
        match m.create_vm(&name, &json).await {
            Ok(_) => assert!(want.is_empty(), "{json} was accepted"),
            Err(e) => {
                assert!(!want.is_empty(), "{json}: {e}");
                assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.InvalidSpec");
                assert!(error_message(&e).contains(want), "{json}: {e}");
                assert!(!dirs.spec_file(&name).exists());
            }
        }
    }
    // The seed limit is checked at creation, not at start.
    let big = "x".repeat(70 * 1024);
    let e = m
        .create_vm(
            "big",
            &spec(&format!(r#","metadata":{{"user_data":"{big}"}}"#)),
        )
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.InvalidSpec");
    assert!(error_message(&e).contains("at most 65536"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_from_before_uuids_gets_one_for_good() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    std::fs::create_dir_all(dirs.state().join("vms")).unwrap();
    std::fs::write(dirs.spec_file("old"), spec("")).unwrap();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.get_vm("old").await.unwrap()).await;
    let uuid = v.uuid().await.unwrap();
    assert_eq!(uuid.len(), 36, "{uuid}");
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(dirs.spec_file("old")).unwrap()).unwrap();
    assert_eq!(on_disk["uuid"], uuid.as_str(), "persisted");
    // The next agent keeps it.
    agent.terminate();
    drop(agent);
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.get_vm("old").await.unwrap()).await;
    assert_eq!(v.uuid().await.unwrap(), uuid);
}
