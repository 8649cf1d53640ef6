//! The VM's GSI routing table: the in-kernel irqchip's default routes (PIC and IOAPIC pins
//! for GSIs 0-23) plus one MSI route per MSI-X vector the guest programmed.
//!
//! Each MSI-X vector gets a GSI and an irqfd at start-up; its device's worker raises the
//! vector by writing the irqfd, and KVM delivers the message the route holds without an exit.
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table is kept here and committed
//! whole, by the vCPU thread on which the guest programmed a vector (rare: driver set-up and
//! interrupt affinity changes).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// GSIs below this are the IOAPIC's pins.
pub const IOAPIC_PINS: u32 = 24;
/// The most GSIs handed out for MSI vectors (KVM allows 4096 routes).
const MAX_MSI_GSIS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    #[error("no GSI left for another MSI vector ({MAX_MSI_GSIS} in use)")]
    Exhausted,
    #[error("the routing table does not fit KVM's limit")]
    TooManyRoutes,
    #[error("KVM refused the interrupt routing table: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// An MSI message: where the guest wants it written, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

struct State {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouting {
            vm,
            state: Mutex::new(State {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// A routing table without a VM, for device tests that never unmask a vector.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        let kvm = kvm_ioctls::Kvm::new().ok();
        let vm = kvm.and_then(|k| k.create_vm().ok());
        GsiRouting {
            vm: Arc::new(vm.expect("the unit tests need /dev/kvm")),
            state: Mutex::new(State {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// A GSI of its own for one MSI vector; it has no route until `set` gives it one.
    pub fn allocate(&self) -> Result<u32, MsiError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.next_gsi >= IOAPIC_PINS + MAX_MSI_GSIS {
            return Err(MsiError::Exhausted);
        }
        state.next_gsi += 1;
        Ok(state.next_gsi - 1)
    }

    /// Routes `gsi` to `message` (None: no route, the vector delivers nothing) and commits
    /// the table. Nothing happens when the route is unchanged.
    pub fn set(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), MsiError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match message {
            Some(m) => state.msi.insert(gsi, m) != Some(m),
            None => state.msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let table = routing_table(&state.msi)?;
        self.vm.set_gsi_routing(&table).map_err(MsiError::Kvm)
    }
}

/// The default irqchip routes (as KVM sets them up) and the MSI routes.
fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Result<KvmIrqRouting, MsiError> {
    let mut entries = Vec::new();
    for pin in 0..IOAPIC_PINS {
        if pin < 16 {
            let chip = if pin < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_route(pin, chip, pin % 8));
        }
        entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
    }
    for (gsi, message) in msi {
        let mut entry = kvm_irq_routing_entry {
            gsi: *gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = message.address as u32;
        entry.u.msi.address_hi = (message.address >> 32) as u32;
        entry.u.msi.data = message.data;
        entries.push(entry);
    }
    KvmIrqRouting::from_entries(&entries).map_err(|_| MsiError::TooManyRoutes)
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_default_routes_and_adds_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let table = routing_table(&msi).expect("fits");
        let entries = table.as_slice();
        assert_eq!(entries.len(), 16 + 24 + 1);
        let ioapic: Vec<_> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY (test): irqchip entries hold the irqchip member.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .map(|e| e.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
        let last = entries[entries.len() - 1];
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY (test): an MSI entry holds the msi member.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
