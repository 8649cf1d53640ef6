//! The Generic Event Device (ACPI0013) of a hardware-reduced ACPI platform, used for the
//! power button, as in Cloud Hypervisor.
//!
//! A hardware-reduced platform has no fixed power button and no SCI, so an event reaches the
//! guest's ACPI interpreter like this: the VMM sets a bit in the one-byte event register and
//! raises the GED's interrupt (an irqfd); the guest's GED driver runs `\_SB.GED._EVT`, which
//! reads the register (reading clears it) and, for the power-button bit, does
//! `Notify(\_SB.PWRB, 0x80)`. The guest's ACPI button driver turns that into a KEY_POWER input
//! event, and its acpid (or systemd-logind) powers off. See `acpi::dsdt` for the AML.

use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::metrics::{Counter, DeviceMetrics};
use super::BusDevice;

/// Bit of the event register: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1;
/// Size of the MMIO window (one byte register, rest reads as zero).
pub const GED_MMIO_SIZE: u64 = 0x10;

pub struct Ged {
    /// Events raised but not yet read by the guest.
    pending: u8,
    irq: Arc<EventFd>,
    presses: Counter,
}

impl Ged {
    pub fn new(irq: Arc<EventFd>, metrics: &DeviceMetrics) -> Self {
        Ged {
            pending: 0,
            irq,
            presses: metrics.counter("power_button_presses"),
        }
    }

    fn raise(&mut self, event: u8) -> io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.pending;
                self.pending = 0;
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        // The register is read-only; the AML never writes it.
    }
}

/// Presses the power button; shared with the control API.
#[derive(Clone)]
pub struct PowerButton(Arc<Mutex<Ged>>);

impl PowerButton {
    pub fn new(ged: Arc<Mutex<Ged>>) -> Self {
        PowerButton(ged)
    }

    pub fn press(&self) -> io::Result<()> {
        let mut ged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ged.presses.inc();
        ged.raise(GED_EVENT_POWER_BUTTON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::metrics::DeviceRegistry;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn press_raises_the_irq_and_the_register_clears_on_read() {
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let registry = DeviceRegistry::default();
        let ged = Arc::new(Mutex::new(Ged::new(
            irq.clone(),
            &registry.register("ged", "acpi-ged"),
        )));
        let button = PowerButton::new(ged.clone());
        let mut byte = [0xffu8];
        ged.lock().expect("lock").read(0, &mut byte);
        assert_eq!(byte, [0], "nothing pending");
        assert!(irq.read().is_err(), "no interrupt yet");

        button.press().expect("press");
        assert_eq!(irq.read().expect("interrupt raised"), 1);
        ged.lock().expect("lock").read(0, &mut byte);
        assert_eq!(byte, [GED_EVENT_POWER_BUTTON]);
        ged.lock().expect("lock").read(0, &mut byte);
        assert_eq!(byte, [0], "read clears");

        let mut wide = [0xffu8; 4];
        ged.lock().expect("lock").read(1, &mut wide);
        assert_eq!(wide, [0; 4], "past the register reads zero");
        ged.lock().expect("lock").write(0, &[0xff]);
        ged.lock().expect("lock").read(0, &mut byte);
        assert_eq!(byte, [0], "writes are ignored");
        assert_eq!(registry.snapshot()[0].counters["power_button_presses"], 1);
    }
}
