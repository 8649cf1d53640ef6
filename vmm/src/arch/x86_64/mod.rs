//! x86_64 platform: memory layout, boot protocol, CPU state, CPUID, ACPI, interrupt setup.

pub mod acpi;
pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod pvh;
pub mod regs;
pub mod smbios;
