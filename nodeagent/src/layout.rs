//! Where the agent keeps things on disk.
//!
//! ```text
//! <state>/vms/<name>.json          VM spec (persistent, atomic writes)
//! <state>/vms/<name>.incoming      marker: the VM came with a live migration not yet
//!                                  known to run here (see `node::migrate`)
//! <state>/network.json             last applied network document
//! <state>/net/                     netconf ownership records (links and TAPs it created)
//! <state>/images/                  image store (kernels, initrds, read-only disks)
//! <state>/disks/                   disk store (VM writable disks)
//! <run>/booted                     marker: the agent already ran since the host booted
//! <run>/vms/<name>/process.json    supervisor process (pid + start time)
//! <run>/vms/<name>/vmm.json        VMM process (pid + start time), written by the supervisor
//! <run>/vms/<name>/exit.json       VMM exit status, written by the supervisor
//! <run>/vms/<name>/status.json     last terminal state (stopped/failed + reason)
//! <run>/vms/<name>/api.sock        VMM API socket
//! <run>/vms/<name>/vmm-args.json   argv for `thvc-nodeagent exec-vm` (systemd mode)
//! <run>/vms/<name>/seed.img        cloud-init NoCloud seed, rebuilt at every start
//! <log>/<name>/console.log         guest serial console (sparse, bounded window)
//! <log>/<name>/vmm.log             VMM stdout/stderr (direct mode)
//! ```
//! The run directory is expected on a tmpfs: its content describes this boot only.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: PathBuf, run_dir: PathBuf, log_dir: PathBuf) -> Self {
        Layout {
            state_dir,
            run_dir,
            log_dir,
        }
    }
    /// Present while the node is drained (`Drain`/`Undrain`).
    pub fn drained_file(&self) -> PathBuf {
        self.state_dir.join("drained")
    }
    /// The names of the VMs that ApplyVms documents manage (see `node::apply`).
    pub fn applied_file(&self) -> PathBuf {
        self.state_dir.join("applied-vms.json")
    }
    pub fn specs_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    /// The VM's own VMM uid (`--vmm-uids`), beside its spec.
    pub fn uid_file(&self, vm: &str) -> PathBuf {
        self.specs_dir().join(format!("{vm}.uid"))
    }
    pub fn spec_file(&self, vm: &str) -> PathBuf {
        self.specs_dir().join(format!("{vm}.json"))
    }
    /// Present from the start of a ReceiveVm until its guest runs here: an agent that
    /// finds it at its start knows the VM may never have arrived (see `node::recovery`).
    pub fn incoming_marker(&self, vm: &str) -> PathBuf {
        self.specs_dir().join(format!("{vm}.incoming"))
    }
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    pub fn disks_dir(&self) -> PathBuf {
        self.state_dir.join("disks")
    }
    /// The image versions systemd-boot rolled back from, with the boot that first saw each.
    pub fn failed_versions_file(&self) -> PathBuf {
        self.state_dir.join("failed-versions.json")
    }
    pub fn network_file(&self) -> PathBuf {
        self.state_dir.join("network.json")
    }
    pub fn boot_marker(&self) -> PathBuf {
        self.run_dir.join("booted")
    }
    pub fn vm_run_dir(&self, vm: &str) -> PathBuf {
        self.run_dir.join("vms").join(vm)
    }
    pub fn vm_log_dir(&self, vm: &str) -> PathBuf {
        self.log_dir.join(vm)
    }
    pub fn console_log(&self, vm: &str) -> PathBuf {
        self.vm_log_dir(vm).join("console.log")
    }
    pub fn vmm_log(&self, vm: &str) -> PathBuf {
        self.vm_log_dir(vm).join("vmm.log")
    }
    pub fn api_socket(&self, vm: &str) -> PathBuf {
        self.vm_run_dir(vm).join("api.sock")
    }
    /// Where the VMM of a VM migrating in here waits for the source's stream (`--incoming`).
    pub fn incoming_socket(&self, vm: &str) -> PathBuf {
        self.vm_run_dir(vm).join("incoming.sock")
    }
    /// The cloud-init seed volume of a VM with `metadata`: rebuilt from the spec at every
    /// start, so it lives with the run (tmpfs) and goes with the VM's run directory.
    pub fn seed_image(&self, vm: &str) -> PathBuf {
        self.vm_run_dir(vm).join("seed.img")
    }
    pub fn status_file(&self, vm: &str) -> PathBuf {
        self.vm_run_dir(vm).join("status.json")
    }
}

/// Run-directory files of one VM, for code (the supervisor) that only knows that directory.
pub fn process_file(vm_run_dir: &Path) -> PathBuf {
    vm_run_dir.join("process.json")
}
pub fn vmm_process_file(vm_run_dir: &Path) -> PathBuf {
    vm_run_dir.join("vmm.json")
}
pub fn exit_file(vm_run_dir: &Path) -> PathBuf {
    vm_run_dir.join("exit.json")
}
pub fn vmm_args_file(vm_run_dir: &Path) -> PathBuf {
    vm_run_dir.join("vmm-args.json")
}
