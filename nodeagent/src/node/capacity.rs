//! Capacity: what the node has promised to its VMs, and the admission check every start
//! passes. A VM holds its vCPUs and memory while it runs and, if it autostarts, while it is
//! down too (it comes back at the next boot). Memory is never overcommitted: the VMs' memory
//! stays within the host's RAM minus a reserve for the host (`--memory-reserve-mib`, default
//! 1024). vCPUs may be, by a ratio (`--vcpu-overcommit`, default 4: four vCPUs per host CPU).
//! A start that would exceed either is refused (`NoCapacity`) with the numbers.
//!
//! Starts in progress are admitted under one lock (their VMs are counted from then on), so
//! two concurrent starts cannot both take the last free memory. Whatever else makes a VM
//! hold capacity passes the same check: creating a VM with autostart (reserved under that
//! lock until the VM is in the table, so no start slips in while its files are written),
//! setting `Autostart` on a VM that is down, an ApplyVms update that takes more.

use std::collections::HashMap;

use super::*;
use crate::hostinfo;

/// What is being admitted besides the VMs' states, under one lock.
#[derive(Debug, Default)]
pub(super) struct Admitted {
    /// VMs whose start is in progress.
    starts: HashSet<String>,
    /// Autostart VMs being created, not yet in the table: (vCPUs, memory MiB).
    creating: HashMap<String, (u64, u64)>,
}

/// The node's capacity and what is allocated of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpus_allocated: u64,
    pub vcpus_capacity: u64,
    pub memory_allocated_mib: u64,
    pub memory_capacity_mib: u64,
}

impl Node {
    fn holds_capacity(vm: &Vm) -> bool {
        !vm.state().is_down() || vm.autostart()
    }

    /// What is allocated now (running and autostart VMs, and starts being admitted).
    pub fn capacity(&self) -> Capacity {
        let admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        self.capacity_with(&admitted, None)
    }

    fn capacity_with(&self, admitted: &Admitted, except: Option<&str>) -> Capacity {
        let (mut vcpus, mut memory) = (0u64, 0u64);
        let vms = self.list();
        for vm in &vms {
            if Some(vm.name.as_str()) == except {
                continue;
            }
            if Self::holds_capacity(vm) || admitted.starts.contains(&vm.name) {
                let spec = vm.spec();
                vcpus += u64::from(spec.vcpus);
                memory += spec.memory_mib;
            }
        }
        // Once in the table, a VM being created counts as itself (autostart).
        for (name, (v, m)) in &admitted.creating {
            if Some(name.as_str()) != except && !vms.iter().any(|vm| &vm.name == name) {
                vcpus += v;
                memory += m;
            }
        }
        let host_mib = hostinfo::memory_bytes() >> 20;
        let cpus = u64::from(hostinfo::cpus());
        Capacity {
            vcpus_allocated: vcpus,
            // Whole vCPUs: the ratio is kept in tenths.
            vcpus_capacity: cpus * u64::from(self.cfg.vcpu_overcommit_tenths) / 10,
            memory_allocated_mib: memory,
            memory_capacity_mib: host_mib.saturating_sub(self.cfg.memory_reserve_mib),
        }
    }

    /// Free bytes in the image store's and the disk store's file systems (0 if unknown).
    pub async fn store_free_bytes(&self) -> (u64, u64) {
        let (images, disks) = (self.cfg.layout.images_dir(), self.cfg.layout.disks_dir());
        blocking(move || {
            let free = |d: &std::path::Path| crate::disks::fs_space(d).map_or(0, |(free, _)| free);
            (free(&images), free(&disks))
        })
        .await
        .unwrap_or((0, 0))
    }

    /// Admits a start of `vm` or refuses it; the returned guard keeps it counted until the
    /// start has ended (then its state counts, or nothing when it failed).
    pub(super) fn admit(&self, vm: &Vm) -> Result<Admission<'_>, NodeError> {
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        let have = self.capacity_with(&admitted, Some(&vm.name));
        let spec = vm.spec();
        self.fits(&vm.name, &have, (u64::from(spec.vcpus), spec.memory_mib))?;
        admitted.starts.insert(vm.name.clone());
        Ok(Admission {
            node: self,
            name: vm.name.clone(),
        })
    }

    /// Reserves what VM `name`, about to be created with `spec`, holds if it autostarts, or
    /// refuses it like a start (`NoCapacity`); the guard keeps it counted until the VM is in
    /// the table (then it counts as itself) or its creation failed. Nothing for a VM without
    /// autostart: it holds nothing until it starts.
    pub(super) fn reserve_creation(
        &self,
        name: &str,
        spec: &VmSpec,
    ) -> Result<Option<Creation<'_>>, NodeError> {
        if !spec.autostart {
            return Ok(None);
        }
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        let have = self.capacity_with(&admitted, Some(name));
        let held = (u64::from(spec.vcpus), spec.memory_mib);
        self.fits(name, &have, held)?;
        admitted.creating.insert(name.to_owned(), held);
        Ok(Some(Creation {
            node: self,
            name: name.to_owned(),
        }))
    }

    /// Replaces `vm`'s spec (ApplyVms' update, setting Autostart), unless that makes a VM
    /// that holds capacity (running, or autostart) hold more than the node has: more vCPUs
    /// or memory, or autostart newly set on a VM that is down. An update that takes nothing
    /// more always passes.
    pub(super) fn swap_spec_if_fits(&self, vm: &Vm, spec: VmSpec) -> Result<(), NodeError> {
        let admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        let up = !vm.state().is_down() || admitted.starts.contains(&vm.name);
        let held = |s: &VmSpec| {
            if up || s.autostart {
                (u64::from(s.vcpus), s.memory_mib)
            } else {
                (0, 0)
            }
        };
        let (before, after) = (held(&vm.spec()), held(&spec));
        if after.0 > before.0 || after.1 > before.1 {
            let have = self.capacity_with(&admitted, Some(&vm.name));
            self.fits(&vm.name, &have, after)?;
        }
        vm.lock().spec = spec;
        Ok(())
    }

    /// Whether VM `name` fits with `vcpus` and `memory` (MiB) beside what the others hold.
    fn fits(
        &self,
        name: &str,
        have: &Capacity,
        (vcpus, memory): (u64, u64),
    ) -> Result<(), NodeError> {
        if have.memory_allocated_mib + memory > have.memory_capacity_mib {
            return Err(NodeError::NoCapacity(format!(
                "VM {name} needs {memory} MiB of memory; {} MiB of the node's {} MiB for VMs \
                 are allocated (running and autostart VMs), memory is never overcommitted",
                have.memory_allocated_mib, have.memory_capacity_mib
            )));
        }
        if have.vcpus_allocated + vcpus > have.vcpus_capacity {
            return Err(NodeError::NoCapacity(format!(
                "VM {name} needs {vcpus} vCPUs; {} of the node's {} are allocated ({} CPUs, \
                 overcommit ratio {}.{})",
                have.vcpus_allocated,
                have.vcpus_capacity,
                hostinfo::cpus(),
                self.cfg.vcpu_overcommit_tenths / 10,
                self.cfg.vcpu_overcommit_tenths % 10
            )));
        }
        Ok(())
    }
}

/// A start being admitted (see [`Node::admit`]).
pub(super) struct Admission<'a> {
    node: &'a Node,
    name: String,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.node
            .admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .starts
            .remove(&self.name);
    }
}

/// An autostart VM being created (see [`Node::reserve_creation`]).
pub(super) struct Creation<'a> {
    node: &'a Node,
    name: String,
}

impl Drop for Creation<'_> {
    fn drop(&mut self) {
        self.node
            .admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .creating
            .remove(&self.name);
    }
}
