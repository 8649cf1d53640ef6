//! The ACPI PM device of a hardware-reduced platform: one I/O port that is at once the FADT's
//! sleep control register (the guest writes SLP_TYP|SLP_EN to power off) and its reset register.

use super::{BusDevice, VmExitRequest};
use crate::exit::ExitReason;

/// The I/O port of the sleep control, sleep status and reset registers.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of \_S5_ (soft off) in the DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLEEP_ENABLE: u8 = 1 << 5;

pub struct AcpiPm {
    exit: VmExitRequest,
}

impl AcpiPm {
    pub fn new(exit: VmExitRequest) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        tracing::debug!("ACPI PM register write {value:#x}");
        if value == RESET_VALUE {
            self.exit.request(ExitReason::GuestReset);
        } else if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            self.exit.request(ExitReason::GuestPowerOff);
        }
        // Other sleep states are not offered in the DSDT; writes to them are ignored.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        for (value, want) in [
            (
                (S5_SLEEP_TYPE << 2) | SLEEP_ENABLE,
                Some(ExitReason::GuestPowerOff),
            ),
            (RESET_VALUE, Some(ExitReason::GuestReset)),
            (S5_SLEEP_TYPE << 2, None),      // SLP_EN not set
            ((3 << 2) | SLEEP_ENABLE, None), // S3 is not offered
        ] {
            let exit = VmExitRequest::new().expect("eventfd");
            let mut pm = AcpiPm::new(exit.clone());
            pm.write(0, &[value]);
            assert_eq!(exit.reason(), want, "value {value:#x}");
        }
    }

    #[test]
    fn empty_write_is_ignored() {
        let exit = VmExitRequest::new().expect("eventfd");
        AcpiPm::new(exit.clone()).write(0, &[]);
        assert_eq!(exit.reason(), None);
    }
}
