//! The shipped D-Bus policy (`systemd/de.thueringen.thvc.node1.conf`) enforced by a real
//! dbus-daemon: the bus is configured like Debian's system bus (method calls denied by
//! default, signals and replies allowed, the bus driver open) and includes the repository's
//! file, the real agent owns its name as root, and one caller per role group sends every
//! method the agent serves with dbus-send, which prints the error name. The agent's own
//! check hides whether the bus let a call through, so the test tells them apart: a call the
//! policy refuses fails with `org.freedesktop.DBus.Error.AccessDenied` from dbus-daemon
//! ("Rejected send message") and leaves no audit record; one the agent refuses fails with
//! `de.thueringen.thvc.node1.Error.AccessDenied` and is audited as denied.
//!
//! The role groups do not exist on a CI host, and tests create no users: the scenario runs
//! on a thread with a mount namespace of its own in which a copy of the host's /etc/group with
//! the six groups is bound over /etc/group, each group with one existing system user
//! (daemon, bin, sys, games, man, lp; nobody stays in none). dbus-daemon, the agent and the
//! callers are spawned from that thread, so they resolve groups through that file; the host's
//! /etc/group is untouched.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

const DEST: &str = "de.thueringen.thvc.node1";
const MANAGER_PATH: &str = "/de/thueringen/thvc/node1";
const MANAGER: &str = "de.thueringen.thvc.node1.Manager";
const VM: &str = "de.thueringen.thvc.node1.Vm";
const JOB: &str = "de.thueringen.thvc.node1.Job";
const PROPS: &str = "org.freedesktop.DBus.Properties";

const CONTROL: &str = "thvc-control";
const VMCTL: &str = "thvc-vmctl";
const CONSOLE: &str = "thvc-console";
const NETWORK: &str = "thvc-network";
const IMAGES: &str = "thvc-images";
const HOST: &str = "thvc-host";

/// Who calls: an existing system user and the role group the test makes it a member of.
const MEMBERS: [(&str, Option<&str>); 7] = [
    ("daemon", Some(CONTROL)),
    ("bin", Some(VMCTL)),
    ("sys", Some(CONSOLE)),
    ("games", Some(NETWORK)),
    ("man", Some(IMAGES)),
    ("lp", Some(HOST)),
    ("nobody", None),
];

/// The policy of Debian 12's /usr/share/dbus-1/system.conf (the parts that decide who may
/// send what), then the shipped file, included as system.d files are.
fn system_bus_policy(shipped: &Path) -> String {
    format!(
        r#"  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <include>{}</include>"#,
        shipped.display()
    )
}

/// A caller: a system user, its primary group, and the role group's gid (if any).
#[derive(Debug, Clone)]
struct Caller {
    user: &'static str,
    uid: u32,
    gid: u32,
    group: Option<&'static str>,
    group_gid: Option<u32>,
}

impl Caller {
    /// May this caller do what `groups` may (empty: everyone)? thvc-control may everything.
    fn in_any(&self, groups: &[&str]) -> bool {
        groups.is_empty()
            || self
                .group
                .is_some_and(|g| g == CONTROL || groups.contains(&g))
    }

    /// Makes `cmd` run as this caller: its uid, primary gid and exactly the role group as
    /// supplementary group.
    fn apply(&self, cmd: &mut Command) {
        let (uid, gid) = (self.uid, self.gid);
        let groups: Vec<libc::gid_t> = self.group_gid.into_iter().collect();
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // setgroups, setgid and setuid system calls (async-signal-safe) on memory allocated
        // before the fork. Not Command::uid/gid: std switches the uid (and drops the
        // supplementary groups) before pre_exec closures run, and setgroups needs
        // CAP_SETGID, which is gone after that.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// uid and primary gid of `user` in passwd text; fails the test if the user is missing.
fn passwd_ids(passwd: &str, user: &str) -> (u32, u32) {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .unwrap_or_else(|| {
            panic!(
                "user {user} is not in /etc/passwd (or malformed): this test needs the Debian \
                 system users {:?}",
                MEMBERS.map(|m| m.0)
            )
        })
}

/// The callers, checked: every user exists, none is root, all uids differ.
fn callers(passwd: &str) -> Vec<Caller> {
    let list: Vec<Caller> = MEMBERS
        .iter()
        .map(|&(user, group)| {
            let (uid, gid) = passwd_ids(passwd, user);
            Caller {
                user,
                uid,
                gid,
                group,
                group_gid: None,
            }
        })
        .collect();
    let uids: BTreeSet<u32> = list.iter().map(|c| c.uid).collect();
    assert_eq!(
        uids.len(),
        list.len(),
        "the callers' uids must differ: {list:?}"
    );
    assert!(!uids.contains(&0), "no caller may be root: {list:?}");
    list
}

/// The host's group file without any role group lines, plus each role group with a free gid
/// and its member. Fills in the callers' `group_gid`.
fn group_file(host: &str, callers: &mut [Caller]) -> String {
    let role_groups: Vec<&str> = callers.iter().filter_map(|c| c.group).collect();
    // Free gids, and none that is a caller's primary group (no line may stand for both).
    let mut used: BTreeSet<u32> = callers.iter().map(|c| c.gid).collect();
    let mut out = String::new();
    for line in host.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first().is_some_and(|n| role_groups.contains(n)) {
            continue;
        }
        if let Some(gid) = fields.get(2).and_then(|g| g.parse().ok()) {
            used.insert(gid);
        }
        out.push_str(line);
        out.push('\n');
    }
    let mut next = 61000;
    for c in callers.iter_mut() {
        let Some(group) = c.group else { continue };
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        c.group_gid = Some(next);
        out.push_str(&format!("{group}:x:{next}:{}\n", c.user));
    }
    out
}

/// Where a call goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Manager,
    /// The VM `big` (stopped; too big to start).
    Vm,
    /// The shutdown job of the VM `slow` (its guest ignores the power button).
    Job,
}

/// One method call and who may make it.
struct Call {
    target: Target,
    interface: &'static str,
    member: &'static str,
    /// dbus-send arguments (`string:...`).
    args: Vec<String>,
    /// Groups the policy lets send it (empty: everyone).
    bus: &'static [&'static str],
    /// Groups the agent authorizes (empty: everyone) and the audit action of its refusal.
    agent: &'static [&'static str],
    audit: &'static str,
}

fn call(
    target: Target,
    interface: &'static str,
    member: &'static str,
    args: &[&str],
    groups: &'static [&'static str],
) -> Call {
    Call {
        target,
        interface,
        member,
        args: args.iter().map(|a| a.to_string()).collect(),
        bus: groups,
        agent: groups,
        audit: "",
    }
}

/// Every method the agent serves, with arguments that the agent refuses or that change
/// nothing once authorized (a nonexistent name, an invalid document, a zero timeout, a VM
/// beyond capacity), so the calls do not depend on each other.
fn calls() -> Vec<Call> {
    use Target::*;
    let zero = format!("string:{}", "0".repeat(64));
    let zero: &str = &zero;
    let pull = "string:http://127.0.0.1:9/x.img";
    let mut list = vec![
        // Reads: everyone.
        call(Manager, MANAGER, "ListVms", &[], &[]),
        call(Manager, MANAGER, "GetVm", &["string:big"], &[]),
        call(Manager, MANAGER, "GetNetwork", &[], &[]),
        call(Manager, MANAGER, "ListImages", &[], &[]),
        call(Manager, MANAGER, "ListDisks", &[], &[]),
        call(Manager, MANAGER, "ListJobs", &[], &[]),
        call(
            Manager,
            PROPS,
            "Get",
            &["string:de.thueringen.thvc.node1.Manager", "string:Drained"],
            &[],
        ),
        call(
            Vm,
            PROPS,
            "GetAll",
            &["string:de.thueringen.thvc.node1.Vm"],
            &[],
        ),
        call(
            Job,
            PROPS,
            "GetAll",
            &["string:de.thueringen.thvc.node1.Job"],
            &[],
        ),
        call(
            Manager,
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
            &[],
            &[],
        ),
        call(
            Manager,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
            &[],
            &[],
        ),
        call(Vm, "org.freedesktop.DBus.Peer", "Ping", &[], &[]),
        // ApplyNetwork: a dry run is a read.
        call(
            Manager,
            MANAGER,
            "ApplyNetwork",
            &["string:{", "boolean:true"],
            &[],
        ),
        // vm-control.
        call(
            Manager,
            MANAGER,
            "CreateVm",
            &["string:new", "string:{}"],
            &[VMCTL],
        ),
        call(
            Manager,
            MANAGER,
            "DeleteVm",
            &["string:nonexistent"],
            &[VMCTL],
        ),
        call(
            Manager,
            MANAGER,
            "MigrateVm",
            &["string:nonexistent", "string:node2"],
            &[VMCTL],
        ),
        call(
            Manager,
            MANAGER,
            "ApplyVms",
            &["string:", "boolean:false"],
            &[VMCTL],
        ),
        call(
            Manager,
            MANAGER,
            "ApplyVms",
            &["string:", "boolean:true"],
            &[VMCTL],
        ),
        call(Vm, VM, "Start", &[], &[VMCTL]),
        call(Vm, VM, "Shutdown", &[], &[VMCTL]),
        call(Vm, VM, "Stop", &[], &[VMCTL]),
        call(Vm, VM, "StartJob", &[], &[VMCTL]),
        call(Vm, VM, "StopJob", &[], &[VMCTL]),
        call(Vm, VM, "ShutdownJob", &[], &[VMCTL]),
        call(Vm, VM, "Pause", &[], &[VMCTL]),
        call(Vm, VM, "Resume", &[], &[VMCTL]),
        call(Vm, VM, "Info", &[], &[VMCTL]),
        call(
            Vm,
            PROPS,
            "Set",
            &[
                "string:de.thueringen.thvc.node1.Vm",
                "string:Autostart",
                "variant:boolean:false",
            ],
            &[VMCTL],
        ),
        // console.
        call(Vm, VM, "ReadConsole", &["uint64:0"], &[CONSOLE]),
        // images.
        call(Manager, MANAGER, "PullImage", &[pull, zero], &[IMAGES]),
        call(Manager, MANAGER, "PullImageJob", &[pull, zero], &[IMAGES]),
        call(
            Manager,
            MANAGER,
            "DeleteImage",
            &["string:nonexistent.img"],
            &[IMAGES],
        ),
        call(
            Manager,
            MANAGER,
            "CreateDisk",
            &["string:d1", "string:not json"],
            &[IMAGES],
        ),
        call(
            Manager,
            MANAGER,
            "ResizeDisk",
            &["string:nonexistent", "uint64:1"],
            &[IMAGES],
        ),
        call(
            Manager,
            MANAGER,
            "DeleteDisk",
            &["string:nonexistent"],
            &[IMAGES],
        ),
        // host.
        call(Manager, MANAGER, "Drain", &["uint64:0"], &[HOST]),
        call(
            Manager,
            MANAGER,
            "DrainTo",
            &["uint64:0", "string:node2"],
            &[HOST],
        ),
        call(Manager, MANAGER, "Undrain", &[], &[HOST]),
        call(
            Manager,
            MANAGER,
            "Update",
            &["string:", "boolean:true"],
            &[HOST],
        ),
        call(
            Manager,
            MANAGER,
            "Update",
            &["string:", "boolean:false"],
            &[HOST],
        ),
        call(Manager, MANAGER, "Reboot", &["uint64:0"], &[HOST]),
    ];
    // The bus lets everyone send ApplyNetwork (it cannot see dry_run); the agent wants the
    // network role for a real apply.
    list.push(Call {
        agent: &[NETWORK],
        audit: "ApplyNetwork",
        ..call(
            Manager,
            MANAGER,
            "ApplyNetwork",
            &["string:{", "boolean:false"],
            &[],
        )
    });
    // Cancel is one method for every job: the bus lets the roles with cancelable jobs send
    // it, the agent wants the job's role (vm-control for a VM's shutdown job).
    list.push(Call {
        agent: &[VMCTL],
        audit: "CancelJob",
        ..call(Job, JOB, "Cancel", &[], &[VMCTL, IMAGES, HOST])
    });
    list
}

#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Neither the bus nor the agent refused it (it may have failed for other reasons).
    No,
    /// The policy refused it (dbus-daemon's AccessDenied "Rejected send message").
    ByBus,
    /// The agent refused it (de.thueringen.thvc.node1.Error.AccessDenied).
    ByAgent,
}

impl Call {
    fn expected(&self, caller: &Caller) -> Refused {
        if !caller.in_any(self.bus) {
            Refused::ByBus
        } else if !caller.in_any(self.agent) {
            Refused::ByAgent
        } else {
            Refused::No
        }
    }

    fn label(&self) -> String {
        format!(
            "{}.{}({})",
            self.interface,
            self.member,
            self.args.join(", ")
        )
    }
}

/// Sends `call` as `caller` with dbus-send; returns its outcome and stderr.
fn send(bus: &TestBus, caller: &Caller, call: &Call, job: &str) -> (Refused, String) {
    let path = match call.target {
        Target::Manager => MANAGER_PATH.to_owned(),
        Target::Vm => format!("{MANAGER_PATH}/vm/big"),
        Target::Job => job.to_owned(),
    };
    let mut cmd = Command::new("dbus-send");
    cmd.arg(format!("--bus={}", bus.address))
        .arg("--print-reply")
        .arg("--reply-timeout=20000")
        .arg(format!("--dest={DEST}"))
        .arg(&path)
        .arg(format!("{}.{}", call.interface, call.member))
        .args(&call.args)
        .stdin(Stdio::null());
    caller.apply(&mut cmd);
    let out = cmd.output().expect("run dbus-send");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let outcome = if err.contains("Error org.freedesktop.DBus.Error.AccessDenied: Rejected send") {
        Refused::ByBus
    } else if err.contains("Error de.thueringen.thvc.node1.Error.AccessDenied:") {
        Refused::ByAgent
    } else if err.contains("AccessDenied") {
        panic!(
            "{}: an AccessDenied from neither the policy nor the agent: {err}",
            call.label()
        );
    } else {
        Refused::No
    };
    (outcome, err)
}

/// Runs thvcctl as `caller`; returns (success, stdout, stderr).
fn thvcctl(bin: &Path, bus: &TestBus, caller: &Caller, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin);
    cmd.arg("--bus")
        .arg(&bus.address)
        .args(args)
        .stdin(Stdio::null());
    caller.apply(&mut cmd);
    let out = cmd.output().expect("run thvcctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Collects the agent's audit records from a datagram socket standing in for journald.
struct AuditSink {
    records: Arc<Mutex<Vec<HashMap<String, String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditSink {
    fn bind(path: &Path) -> AuditSink {
        let socket = UnixDatagram::bind(path).expect("bind the fake journal socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (records.clone(), stop.clone());
        // Read all the time: a full socket queue would block the agent's sends.
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buf) {
                    r.lock().unwrap().push(journal_fields(&buf[..n]));
                }
            }
        });
        AuditSink {
            records,
            stop,
            thread: Some(thread),
        }
    }

    /// Every record received until now (after a short pause for datagrams in flight).
    fn finish(mut self) -> Vec<HashMap<String, String>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("audit reader");
        }
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

/// Runs `scenario` on its own thread in a mount namespace where `group_text` is /etc/group.
fn with_group_file(group_text: String, scenario: impl FnOnce() + Send + 'static) {
    let thread = std::thread::spawn(move || {
        let dir = tempfile::Builder::new()
            .prefix("thvc-policy-group-")
            .tempdir()
            .expect("temp dir");
        let file = dir.path().join("group");
        std::fs::write(&file, group_text).expect("write the group file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        // Namespaces are per thread: this thread and what it spawns get the new one.
        unshare(CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNS) failed: this test must run as root");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make mounts private");
        mount(
            Some(&file),
            "/etc/group",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind the group file over /etc/group");
        scenario();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn the_shipped_policy_lets_each_role_group_send_its_class_only() {
    require_tool("dbus-send", "dbus-bin");
    let shipped = crate_file("../systemd/de.thueringen.thvc.node1.conf");
    assert!(shipped.is_file(), "{} is missing", shipped.display());
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let host_groups = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    let mut callers = callers(&passwd);
    let group_text = group_file(&host_groups, &mut callers);

    with_group_file(group_text, move || scenario(&shipped, &callers));

    // The bind mount stayed in the scenario's namespace.
    assert_eq!(
        std::fs::read_to_string("/etc/group").expect("read /etc/group"),
        host_groups
    );
}

fn scenario(shipped: &Path, callers: &[Caller]) {
    // The namespace's group database is what dbus-daemon and the agent will see.
    for c in callers {
        let Some(group) = c.group else { continue };
        let out = Command::new("getent")
            .args(["group", group])
            .output()
            .expect("run getent");
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(
            line.trim_end().ends_with(&format!(":{}", c.user)),
            "group {group} in the namespace: {line:?}"
        );
    }

    let bus = TestBus::start_with_policy(&system_bus_policy(shipped));
    let dirs = NodeDirs::new();
    let bin = thvcctl_copy(bus.dir.path());
    let journal = bus.dir.path().join("journal.socket");
    let audit = AuditSink::bind(&journal);
    // 512 MiB for VMs: `big` (1 GiB) can never start.
    let reserve = (host_memory_mib() - 512).to_string();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--memory-reserve-mib",
            &reserve,
            "--shutdown-timeout",
            "300",
            "--journal-socket",
            journal.to_str().expect("UTF-8 path"),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // As root (allowed everything by the policy): `big`, and a shutdown job that stays
    // while the guest ignores the power button.
    let (slow, job) = rt.block_on(async {
        let conn = connect(&bus).await;
        let m = manager(&conn).await;
        m.create_vm("big", r#"{"vcpus":1,"memory_mib":1024,"kernel":"vmlinuz"}"#)
            .await
            .expect("create big");
        let slow = vm(
            &conn,
            m.create_vm("slow", &spec_cmdline("fake.ignore_shutdown=1"))
                .await
                .expect("create slow"),
        )
        .await;
        slow.start().await.expect("start slow");
        let job = slow.shutdown_job().await.expect("shutdown job");
        (conn, job.to_string())
    });

    let mut wrong = Vec::new();
    for caller in callers {
        for call in calls() {
            let (outcome, err) = send(&bus, caller, &call, &job);
            let want = call.expected(caller);
            if outcome != want {
                wrong.push(format!(
                    "{} ({:?}): {}: {outcome:?}, expected {want:?}: {err}",
                    caller.user,
                    caller.group,
                    call.label()
                ));
            }
        }
        // thvcctl's reads work for everyone; the spec shows for vm-control only.
        for args in [
            &["status"][..],
            &["--json", "vm", "list"],
            &["net", "show"],
            &["image", "list"],
            &["disk", "list"],
        ] {
            let (ok, _, err) = thvcctl(&bin, &bus, caller, args);
            if !ok {
                wrong.push(format!("{}: thvcctl {args:?}: {err}", caller.user));
            }
        }
        let (ok, out, err) = thvcctl(&bin, &bus, caller, &["--json", "vm", "info", "big"]);
        assert!(ok, "{}: vm info: {err}", caller.user);
        let info: serde_json::Value = serde_json::from_str(&out).expect("vm info JSON");
        assert_eq!(info["state"], "defined", "{out}");
        let sees_spec = caller.in_any(&[VMCTL]);
        assert_eq!(
            info["spec"]["memory_mib"] == 1024,
            sees_spec,
            "{}: {out}",
            caller.user
        );
        assert_eq!(info["spec"].get("hidden").is_some(), !sees_spec, "{out}");
    }
    assert!(
        wrong.is_empty(),
        "{} calls not as the policy and the agent should treat them:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    rt.block_on(async {
        let m = manager(&slow).await;
        let path = m.get_vm("slow").await.expect("slow");
        vm(&slow, path).await.stop().await.expect("stop slow");
    });

    // Only the agent's own refusals were audited as denied: the calls the policy refused
    // never reached it.
    let denied: BTreeSet<(String, String)> = audit
        .finish()
        .into_iter()
        .filter(|r| r["THVC_RESULT"] == "denied")
        .map(|r| (r["THVC_CALLER_UID"].clone(), r["THVC_ACTION"].clone()))
        .collect();
    let mut expected = BTreeSet::new();
    for caller in callers {
        for call in calls() {
            if call.expected(caller) == Refused::ByAgent {
                expected.insert((caller.uid.to_string(), call.audit.to_owned()));
            }
        }
    }
    assert_eq!(denied, expected);
}

/// A copy of thvcctl the callers can execute wherever the build directory is.
fn thvcctl_copy(dir: &Path) -> PathBuf {
    let bin = dir.join("thvcctl");
    std::fs::copy(THVCCTL, &bin).expect("copy thvcctl");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}
