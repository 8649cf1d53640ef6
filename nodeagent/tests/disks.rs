//! The disk API over D-Bus with real qemu-img: empty sparse disks, raw and qcow2 images
//! imported as raw disks (content compared byte for byte with what was written), hostile
//! and broken images refused with nothing left in the store, the space check, grow-only
//! resizing, and deletion refused while a VM's spec names the disk. Images are named to
//! mislead (a qcow2 called `.img`, a raw file called `.qcow2`): the format comes from the
//! content.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn qemu(tool: &str, args: &[&str]) {
    let out = Command::new(require_tool(tool, "qemu-utils"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every entry of `dir`, hidden ones included.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A 64 MiB qcow2 named `name` in the image store holding 0xab at [1 MiB, 3 MiB) and 0xcd at
/// [40 MiB, 40 MiB + 64 KiB), written through qemu-io; returns the raw content it stands for.
fn qcow2_image(images: &Path, name: &str) -> Vec<u8> {
    let path = images.join(name);
    let p = path.to_str().unwrap();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "write -P 0xcd 40M 64k",
            p,
        ],
    );
    let mut expected = vec![0u8; 64 << 20];
    expected[1 << 20..3 << 20].fill(0xab);
    expected[40 << 20..(40 << 20) + (64 << 10)].fill(0xcd);
    expected
}

/// A raw image of `len` bytes with data in a few places and holes elsewhere.
fn raw_image(path: &Path, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut expected = vec![0u8; len as usize];
    for (i, off) in [0u64, 5 * MIB + 4096, len - MIB].iter().enumerate() {
        let chunk: Vec<u8> = (0..MIB).map(|b| (b as u8) ^ (i as u8 * 37 + 1)).collect();
        f.write_all_at(&chunk, *off).unwrap();
        expected[*off as usize..(*off + MIB) as usize].copy_from_slice(&chunk);
    }
    expected
}

/// A compressed qcow2 whose header and tables are sound but whose first data cluster is
/// garbage: `info` and `measure` accept it, the conversion fails half-way.
fn corrupt_compressed_qcow2(images: &Path, name: &str) {
    let plain = images.join(".plain.qcow2");
    qcow2_image(images, ".plain.qcow2");
    let path = images.join(name);
    qemu(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            plain.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&plain).unwrap();
    let mut data = std::fs::read(&path).unwrap();
    let be32 = |d: &[u8], o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap()) as u64;
    let be64 = |d: &[u8], o: usize| u64::from_be_bytes(d[o..o + 8].try_into().unwrap());
    let cluster_bits = be32(&data, 20);
    let l1 = be64(&data, 40) as usize;
    let l2 = (be64(&data, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // 1 MiB into the image: L2 index 1 MiB / cluster size.
    let entry = be64(&data, l2 + 8 * ((1 << 20) >> cluster_bits));
    assert_eq!(entry >> 62 & 1, 1, "the cluster is compressed");
    let offset_bits = 62 - (cluster_bits - 8);
    let off = (entry & ((1 << offset_bits) - 1)) as usize;
    data[off..off + 64].fill(0xff);
    std::fs::write(&path, data).unwrap();
}

async fn list(m: &thvc_nodeagent::client::ManagerProxy<'_>) -> Vec<Value> {
    serde_json::from_str(&m.list_disks().await.unwrap()).unwrap()
}

fn listed<'a>(disks: &'a [Value], name: &str) -> &'a Value {
    disks
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {disks:?}"))
}

fn assert_error(e: &zbus::Error, name: &str, text: &str) {
    assert_eq!(
        error_name(e),
        format!("de.thueringen.thvc.node1.Error.{name}"),
        "{e}"
    );
    assert!(error_message(e).contains(text), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_disks_empty_and_from_raw_and_qcow2_images() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");
    let store = dirs.state().join("disks");

    // Empty and sparse.
    let created: Value = serde_json::from_str(
        &m.create_disk("empty", r#"{"size": 1073741824}"#)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(created["method"], "empty");
    assert_eq!(created["size"], 1u64 << 30);
    let path = store.join("empty");
    assert_eq!(created["path"], path.display().to_string());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
    assert!(allocated(&path) < MIB, "sparse: {}", allocated(&path));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660,
        "the VMM's group may write it"
    );

    // Raw, named like a qcow2: copied (or reflinked) as raw, holes kept.
    let expected = raw_image(&images.join("raw.qcow2"), 32 * MIB);
    let created: Value = serde_json::from_str(
        &m.create_disk("from-raw", r#"{"from_image": "raw.qcow2"}"#)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(created["source_format"], "raw");
    let method = created["method"].as_str().unwrap().to_owned();
    assert!(method == "reflink" || method == "sparse-copy", "{created}");
    assert_eq!(std::fs::read(store.join("from-raw")).unwrap(), expected);
    if method == "sparse-copy" {
        let a = allocated(&store.join("from-raw"));
        assert!(a <= 4 * MIB, "only the 3 MiB of data were written: {a}");
    }
    // Grown on the way.
    m.create_disk(
        "from-raw-big",
        r#"{"from_image": "raw.qcow2", "size": 67108864}"#,
    )
    .await
    .unwrap();
    let big = std::fs::read(store.join("from-raw-big")).unwrap();
    assert_eq!(big.len() as u64, 64 * MIB);
    assert_eq!(&big[..expected.len()], &expected[..]);
    assert!(big[expected.len()..].iter().all(|b| *b == 0));
    let e = m
        .create_disk("small", r#"{"from_image": "raw.qcow2", "size": 1048576}"#)
        .await
        .unwrap_err();
    assert_error(&e, "InvalidArgument", "never shrunk");

    // qcow2 named like a raw image: converted; zeros stay holes.
    let expected = qcow2_image(&images, "cloud.img");
    let created: Value = serde_json::from_str(
        &m.create_disk("from-qcow2", r#"{"from_image": "cloud.img"}"#)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(created["source_format"], "qcow2");
    assert_eq!(created["method"], "qemu-img-convert");
    let disk = store.join("from-qcow2");
    assert_eq!(std::fs::read(&disk).unwrap(), expected, "content equal");
    assert!(allocated(&disk) < 4 * MIB, "sparse: {}", allocated(&disk));
    assert_eq!(created["size"], 64 * MIB);

    let disks = list(&m).await;
    let names: Vec<&str> = disks.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["empty", "from-qcow2", "from-raw", "from-raw-big"]);
    let e = listed(&disks, "empty");
    assert_eq!(e["size"], 1u64 << 30);
    assert!(e["allocated"].as_u64().unwrap() < MIB, "{e}");
    assert_eq!(e["users"], json!([]));

    // Names and options are checked; an existing disk is never replaced.
    let e = m
        .create_disk("empty", r#"{"size": 1048576}"#)
        .await
        .unwrap_err();
    assert_error(&e, "AlreadyExists", "empty");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
    let e = m
        .create_disk("../x", r#"{"size": 1048576}"#)
        .await
        .unwrap_err();
    assert_error(&e, "InvalidArgument", "invalid disk name");
    let e = m.create_disk("x", r#"{"size": 1000}"#).await.unwrap_err();
    assert_error(&e, "InvalidArgument", "multiple of 512");
    let e = m
        .create_disk("x", r#"{"from_image": "nope.img"}"#)
        .await
        .unwrap_err();
    assert_error(&e, "NotFound", "no image named");
    std::os::unix::fs::symlink("/etc/hostname", images.join("link.img")).unwrap();
    let e = m
        .create_disk("x", r#"{"from_image": "link.img"}"#)
        .await
        .unwrap_err();
    assert_error(&e, "InvalidImage", "not a regular file");
    assert!(!entries(&store).iter().any(|n| n.starts_with('.')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_broken_images_are_refused_and_leave_nothing() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");
    let store = dirs.state().join("disks");
    let img = |n: &str| images.join(n).to_str().unwrap().to_owned();

    // A backing file: here a host file the guest would read.
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            &img("backed.img"),
            "1M",
        ],
    );
    // An external data file.
    std::fs::write(images.join("data.raw"), vec![0u8; MIB as usize]).unwrap();
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", img("data.raw")),
            &img("external.img"),
            "1M",
        ],
    );
    // The qcow2 magic followed by garbage.
    let mut garbage = b"QFI\xfb".to_vec();
    garbage.extend(std::iter::repeat_n(0xffu8, 64 << 10));
    std::fs::write(images.join("garbage.qcow2"), garbage).unwrap();
    // Sound tables, broken data: fails during the conversion.
    corrupt_compressed_qcow2(&images, "broken.img");
    // Another format (its parser is not wanted either).
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", &img("disk.vmdk"), "1M"],
    );

    let cases = [
        ("backed.img", "backing file"),
        ("external.img", "external data file"),
        ("garbage.qcow2", "qcow2"),
        ("broken.img", "convert failed"),
        ("disk.vmdk", "only raw and qcow2"),
    ];
    for (image, why) in cases {
        let e = m
            .create_disk("victim", &json!({"from_image": image}).to_string())
            .await
            .unwrap_err();
        assert_error(&e, "InvalidImage", why);
        assert!(error_message(&e).contains("nothing was stored"), "{e}");
        assert_eq!(
            entries(&store),
            Vec::<String>::new(),
            "{image}: store empty"
        );
    }
    assert_eq!(list(&m).await, Vec::<Value>::new());
    // The refusals did not make the name unusable.
    m.create_disk("victim", r#"{"size": 1048576}"#)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_that_do_not_fit_are_refused_before_writing() {
    require_tool("unshare", "util-linux");
    let nsenter = require_tool("nsenter", "util-linux");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let store = dirs.state().join("disks");
    // The disk store on a 48 MiB tmpfs of the agent's own mount namespace.
    let script = format!(
        "mount -t tmpfs -o size=48m thvc-test '{}' && exec \"$0\" \"$@\"",
        store.display()
    );
    let agent = Agent::start_with(
        &bus,
        &dirs,
        &[],
        &["unshare", "--mount", "--", "sh", "-c", &script],
    );
    let in_store = || {
        let out = Command::new(&nsenter)
            .args(["-t", &agent.pid().to_string(), "-m", "ls", "-A"])
            .arg(&store)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");

    // 64 MiB of data, raw and as qcow2: neither fits.
    let raw = images.join("big.raw");
    std::fs::write(
        &raw,
        (0..64 * MIB)
            .map(|i| (i % 251) as u8 + 1)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            images.join("big.qcow2").to_str().unwrap(),
        ],
    );
    for image in ["big.raw", "big.qcow2"] {
        let e = m
            .create_disk("big", &json!({"from_image": image}).to_string())
            .await
            .unwrap_err();
        assert_error(&e, "NoSpace", "not enough space");
        assert_eq!(in_store(), "", "{image}: nothing written");
    }
    // What fits, fits: the check is not a blanket refusal.
    qcow2_image(&images, "small.qcow2");
    m.create_disk("small", r#"{"from_image": "small.qcow2"}"#)
        .await
        .expect("a 2 MiB import fits");
    assert_eq!(in_store(), "small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_images_are_reflinked_where_the_file_system_can() {
    require_tool("unshare", "util-linux");
    let nsenter = require_tool("nsenter", "util-linux");
    let mkfs = require_tool("mkfs.xfs", "xfsprogs");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // The state directory (both stores) on a loop-mounted XFS with reflink, in the agent's
    // own mount namespace; the image is copied in before the agent starts.
    let fs_image = dirs.root.path().join("state.xfs");
    std::fs::File::create(&fs_image)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let out = Command::new(mkfs)
        .args(["-q", "-m", "reflink=1"])
        .arg(&fs_image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = dirs.root.path().join("source.raw");
    let expected = raw_image(&source, 32 * MIB);
    let state = dirs.state();
    let script = format!(
        "mount -o loop '{}' '{s}' && mkdir -p '{s}/images' '{s}/disks' && \
         cp '{}' '{s}/images/raw.img' && exec \"$0\" \"$@\"",
        fs_image.display(),
        source.display(),
        s = state.display()
    );
    let agent = Agent::start_with(
        &bus,
        &dirs,
        &[],
        &["unshare", "--mount", "--", "sh", "-c", &script],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let created: Value = serde_json::from_str(
        &m.create_disk("clone", r#"{"from_image": "raw.img", "size": 67108864}"#)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(created["method"], "reflink", "{created}");
    assert_eq!(created["size"], 64 * MIB, "grown after the clone");
    let ns = |args: &[&str]| {
        Command::new(&nsenter)
            .args(["-t", &agent.pid().to_string(), "-m"])
            .args(args)
            .output()
            .unwrap()
    };
    let disk = state.join("disks/clone");
    let image = state.join("images/raw.img");
    let cmp = ns(&[
        "cmp",
        "-n",
        &expected.len().to_string(),
        image.to_str().unwrap(),
        disk.to_str().unwrap(),
    ]);
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // Shared extents: filefrag marks them "shared".
    let frag = ns(&["filefrag", "-v", disk.to_str().unwrap()]);
    let frag = String::from_utf8_lossy(&frag.stdout);
    assert!(frag.contains("shared"), "{frag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_only_and_disks_in_use_are_protected() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let store = dirs.state().join("disks");

    m.create_disk("root", r#"{"size": 8388608}"#).await.unwrap();
    std::fs::write(store.join("root"), b"guest data").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(store.join("root"))
        .unwrap();
    f.set_len(8 * MIB).unwrap();
    drop(f);
    m.resize_disk("root", 16 * MIB).await.expect("grow");
    let data = std::fs::read(store.join("root")).unwrap();
    assert_eq!(data.len() as u64, 16 * MIB);
    assert_eq!(&data[..10], b"guest data", "data kept");
    m.resize_disk("root", 16 * MIB)
        .await
        .expect("same size: nothing to do");
    let e = m.resize_disk("root", 8 * MIB).await.unwrap_err();
    assert_error(&e, "InvalidArgument", "only grow");
    assert_eq!(
        std::fs::metadata(store.join("root")).unwrap().len(),
        16 * MIB
    );
    let e = m.resize_disk("root", 16 * MIB + 1).await.unwrap_err();
    assert_error(&e, "InvalidArgument", "multiple of 512");
    let e = m.resize_disk("ghost", 16 * MIB).await.unwrap_err();
    assert_error(&e, "NotFound", "ghost");

    // A VM naming the disk (through a symlink, too) uses it.
    m.create_disk("other", r#"{"size": 1048576}"#)
        .await
        .unwrap();
    std::os::unix::fs::symlink("other", store.join("alias")).unwrap();
    let path = m
        .create_vm(
            "user",
            &spec(r#","disks":[{"path":"root"},{"path":"alias","readonly":true}]"#),
        )
        .await
        .unwrap();
    let disks = list(&m).await;
    assert_eq!(listed(&disks, "root")["users"], json!(["user"]));
    assert_eq!(listed(&disks, "other")["users"], json!(["user"]));
    for name in ["root", "other"] {
        let e = m.delete_disk(name).await.unwrap_err();
        assert_error(&e, "InUse", "user");
        assert!(store.join(name).exists());
    }
    // Stopped: it may grow; running: not.
    m.resize_disk("root", 24 * MIB)
        .await
        .expect("grow while the VM is down");
    let v = vm(&conn, path).await;
    v.start().await.unwrap();
    let e = m.resize_disk("root", 32 * MIB).await.unwrap_err();
    assert_error(&e, "InUse", "running VM user");
    assert_eq!(
        std::fs::metadata(store.join("root")).unwrap().len(),
        24 * MIB
    );
    v.stop().await.unwrap();
    m.resize_disk("root", 32 * MIB)
        .await
        .expect("grow after stop");

    m.delete_vm("user").await.unwrap();
    m.delete_disk("root").await.expect("unused now");
    assert!(!store.join("root").exists());
    assert_eq!(listed(&list(&m).await, "other")["users"], json!([]));
    let e = m.delete_disk("root").await.unwrap_err();
    assert_error(&e, "NotFound", "root");
}

/// A qemu-img that waits for `go` before doing its job (and says it started), so a slow
/// import can be held open deterministically.
fn gated_qemu_img(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (started, go) = (dir.join("started"), dir.join("go"));
    let script = dir.join("qemu-img");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntouch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.02; done\nexec {} \"$@\"\n",
            started.display(),
            go.display(),
            require_tool("qemu-img", "qemu-utils").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, started, go)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_import_blocks_neither_the_bus_nor_other_disks() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let (script, started, go) = gated_qemu_img(dirs.root.path());
    let _agent = Agent::start(&bus, &dirs, &["--qemu-img", script.to_str().unwrap()]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    qcow2_image(&dirs.state().join("images"), "cloud.qcow2");

    let slow = {
        let m = m.clone();
        tokio::spawn(async move {
            m.create_disk("cloud", r#"{"from_image": "cloud.qcow2"}"#)
                .await
        })
    };
    eventually("qemu-img started", || {
        let started = started.clone();
        async move { started.exists() }
    })
    .await;
    // Meanwhile: the same name is busy, everything else answers.
    let e = m
        .create_disk("cloud", r#"{"size": 1048576}"#)
        .await
        .unwrap_err();
    assert_error(&e, "Busy", "cloud");
    m.create_disk("other", r#"{"size": 1048576}"#)
        .await
        .expect("other disks");
    m.create_vm("vm", &spec("")).await.expect("CreateVm");
    assert_eq!(m.list_vms().await.unwrap().len(), 1);
    let names: Vec<String> = list(&m)
        .await
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["other"], "an import in progress is not listed");
    std::fs::write(&go, b"").unwrap();
    let created = slow.await.unwrap().expect("import finishes");
    assert!(created.contains("qemu-img-convert"), "{created}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thvcctl_disk_commands() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    qcow2_image(&dirs.state().join("images"), "debian.qcow2");
    let run = |args: &[&str]| {
        let out = Command::new(THVCCTL)
            .args(["--bus", bus.address.as_str()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["disk", "create", "data", "--size", "2G"]);
    assert!(ok && out.contains("created data (2.0 GiB"), "{out}{err}");
    let (ok, out, err) = run(&[
        "disk",
        "create",
        "root",
        "--from",
        "debian.qcow2",
        "--size",
        "128M",
    ]);
    assert!(
        ok && out.contains("128.0 MiB") && out.contains("qemu-img-convert"),
        "{out}{err}"
    );
    let (ok, _, err) = run(&["disk", "create", "nothing"]);
    assert!(!ok && err.contains("--size"), "{err}");
    let (ok, _, err) = run(&["disk", "create", "x", "--size", "12Q"]);
    assert!(!ok && err.contains("not a size"), "{err}");
    let conn = connect(&bus).await;
    manager(&conn)
        .await
        .create_vm("web", &spec(r#","disks":[{"path":"root"}]"#))
        .await
        .unwrap();
    let (ok, out, _) = run(&["disk", "list"]);
    assert!(ok, "{out}");
    let root_line = out.lines().find(|l| l.starts_with("root ")).expect(&out);
    assert!(
        root_line.contains("128.0 MiB") && root_line.ends_with("web"),
        "{out}"
    );
    let data_line = out.lines().find(|l| l.starts_with("data ")).expect(&out);
    assert!(
        data_line.contains("2.0 GiB") && data_line.ends_with('-'),
        "{out}"
    );
    let (ok, _, err) = run(&["disk", "resize", "data", "3G"]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["--json", "disk", "list"]);
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(listed(&v, "data")["size"], 3u64 << 30);
    assert_eq!(listed(&v, "root")["users"], json!(["web"]));
    let (ok, _, err) = run(&["disk", "resize", "data", "1G"]);
    assert!(!ok && err.contains("Error.InvalidArgument"), "{err}");
    let (ok, _, err) = run(&["disk", "delete", "root"]);
    assert!(
        !ok && err.contains("Error.InUse") && err.contains("web"),
        "{err}"
    );
    let (ok, _, err) = run(&["disk", "delete", "data"]);
    assert!(ok, "{err}");
    assert!(!dirs.state().join("disks/data").exists());
}
