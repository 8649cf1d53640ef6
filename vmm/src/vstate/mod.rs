//! KVM state: the VM (memory slots, in-kernel irqchip) and its vCPUs.

pub mod vcpu;
pub mod vm;
