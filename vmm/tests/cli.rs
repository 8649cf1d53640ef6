//! The thvc-vmm binary's answers to bad input, which need no guest: one clear line on stderr
//! and the documented status, never a panic or a backtrace.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_thvc-vmm");

fn run(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("thvc-vmm runs")
}

fn assert_one_line_error(out: &Output, status: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr:?}");
    assert!(stderr.starts_with("thvc-vmm: "), "{stderr}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    assert!(out.stdout.is_empty());
}

#[test]
fn unknown_flag_is_a_usage_error() {
    assert_one_line_error(
        &run(&["--kernel", "k", "--bogus"]),
        2,
        "unexpected argument '--bogus'",
    );
}

#[test]
fn non_numeric_value_is_a_usage_error() {
    assert_one_line_error(
        &run(&["--kernel", "k", "--cpus", "many"]),
        2,
        "invalid value",
    );
}

#[test]
fn missing_kernel_is_a_usage_error() {
    assert_one_line_error(&run(&[]), 2, "nothing to boot");
}

#[test]
fn out_of_range_values_are_usage_errors() {
    assert_one_line_error(
        &run(&["--kernel", "k", "--cpus", "33"]),
        2,
        "between 1 and 32",
    );
    assert_one_line_error(
        &run(&["--kernel", "k", "--memory", "8"]),
        2,
        "at least 64 MiB",
    );
    assert_one_line_error(
        &run(&["--kernel", "k", "--memory", "100000000"]),
        2,
        "more than this host's",
    );
}

#[test]
fn bad_config_files_are_usage_errors() {
    let tmp = tempfile::Builder::new()
        .prefix("thvc-vmm-cli-")
        .tempdir()
        .expect("tmp");
    let dir = tmp.path();
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, r#"{"kernel": "k", "vcpus": 2}"#).expect("write");
    assert_one_line_error(
        &run(&["--config", unknown.to_str().expect("utf-8")]),
        2,
        "unknown field `vcpus`",
    );
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{\"kernel\": ").expect("write");
    assert_one_line_error(
        &run(&["--config", broken.to_str().expect("utf-8")]),
        2,
        "invalid config file",
    );
    assert_one_line_error(
        &run(&["--config", "/nonexistent/vm.json"]),
        2,
        "cannot read config file /nonexistent/vm.json",
    );
}

#[test]
fn help_and_version_succeed() {
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status"));
    assert_eq!(run(&["--version"]).status.code(), Some(0));
}

/// Without access to /dev/kvm (here: as an unprivileged user, /dev/kvm being root-only) the
/// VMM says so in one line and exits 1. Needs root to switch users, which CI has.
#[test]
fn no_usable_kvm_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs as root (as CI does)"
    );
    let kvm_mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if let Ok(mode) = kvm_mode {
        assert_eq!(
            mode & 0o006,
            0,
            "/dev/kvm must not be world-accessible for this test"
        );
    }
    let out = Command::new(VMM)
        .args(["--kernel", "/nonexistent"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("thvc-vmm runs as nobody");
    assert_one_line_error(&out, 1, "cannot open /dev/kvm");
}

/// Errors carry their cause once, not repeated by the error chain.
#[test]
fn missing_kernel_file_is_one_line_with_the_cause_once() {
    let out = run(&["--kernel", "/nonexistent/vmlinuz", "--seccomp", "off"]);
    assert_one_line_error(&out, 1, "cannot open kernel /nonexistent/vmlinuz");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn firmware_usage_errors_and_missing_file() {
    assert_one_line_error(
        &run(&["--firmware", "/fw", "--kernel", "/k", "--disk", "path=/d"]),
        2,
        "exclude each other",
    );
    assert_one_line_error(&run(&["--firmware", "/fw"]), 2, "needs a disk");
    assert_one_line_error(
        &run(&["--kernel", "/k", "--platform", "uuid=nope"]),
        2,
        "invalid --platform 'uuid=nope'",
    );
    let out = run(&[
        "--firmware",
        "/nonexistent/CLOUDHV.fd",
        "--disk",
        "path=/nonexistent/disk",
        "--seccomp",
        "off",
    ]);
    assert_one_line_error(&out, 1, "cannot open firmware /nonexistent/CLOUDHV.fd");
}

/// `--restore` replaces the boot source; a snapshot that is missing, not one, or of another
/// format version is one clear line, before any guest runs.
#[test]
fn restore_usage_errors_and_bad_snapshots() {
    assert_one_line_error(
        &run(&["--restore", "/snap", "--kernel", "/k"]),
        2,
        "no --kernel",
    );
    assert_one_line_error(
        &run(&["--restore", "/snap", "--cmdline", "quiet"]),
        2,
        "no --cmdline",
    );
    let out = run(&["--restore", "/nonexistent/snap", "--seccomp", "off"]);
    assert_one_line_error(
        &out,
        1,
        "snapshot /nonexistent/snap: cannot open state.json",
    );
    let tmp = tempfile::Builder::new()
        .prefix("thvc-cli-restore-")
        .tempdir()
        .expect("dir");
    let dir = tmp.path();
    std::fs::write(dir.join("memory"), b"").expect("memory");
    let snap = dir.to_str().expect("utf-8");
    for (state, needle) in [
        (
            &b"\x7fELF garbage"[..],
            "state.json is not a thvc-vmm snapshot",
        ),
        (
            &b"{\"format\":\"thvc-vmm-snapshot\",\"version\":7}"[..],
            "format version 7; this thvc-vmm restores version 1",
        ),
        (
            &b"{\"format\":\"thvc-vmm-snapshot\",\"version\":1}"[..],
            "missing field",
        ),
    ] {
        std::fs::write(dir.join("state.json"), state).expect("state");
        assert_one_line_error(&run(&["--restore", snap, "--seccomp", "off"]), 1, needle);
    }
}
