//! KVM state: the VM (memory slots, in-kernel irqchip) and its vCPUs.

pub mod coalesced;
pub mod control;
pub mod memory;
pub mod msi;
pub mod state;
pub mod vcpu;
pub mod vm;
