//! thvc-vmm: a minimal KVM virtual machine monitor, one process per VM.
//!
//! * [`config`]: command line and JSON config, validated into a `VmConfig`.
//! * [`arch`]: the x86_64 platform: memory layout, boot protocol, CPU state, ACPI.
//! * [`vstate`]: KVM VM and vCPUs (one thread per vCPU), their start/pause gate.
//! * [`devices`]: serial console, reset and power devices, the ACPI power button, virtio.
//! * [`api`]: the control socket (ping, info, pause, resume, shutdown, stop) on its own thread.
//! * [`persist`]: snapshots of a paused VM, restoring them, and live migration.
//! * [`rate_limiter`]: token buckets for the virtio devices' rate limits.
//! * [`sandbox`]: per-thread seccomp filters, privilege drop, inherited descriptors.
//! * [`vmm`]: builds the VM and runs its event loop; [`exit`]: how it ends.

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod exit;
pub mod persist;
pub mod rate_limiter;
pub mod sandbox;
pub mod vmm;
pub mod vstate;

/// Stack size of the threads the VMM starts (vCPUs, device workers, API). Rust's default of
/// 2 MiB is both more than these loops need and, on hosts with transparent huge pages set to
/// `always`, a whole 2 MiB huge page of resident memory per thread whenever the kernel places
/// the stack 2 MiB-aligned: a mapping smaller than 2 MiB can never be backed by one.
pub const THREAD_STACK_SIZE: usize = 512 << 10;
