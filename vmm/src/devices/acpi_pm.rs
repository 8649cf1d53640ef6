//! The ACPI PM device of a hardware-reduced platform: one I/O port that is at once the FADT's
//! sleep control register (the guest writes SLP_TYP|SLP_EN to power off) and its reset register.
//!
//! Both sit where Cloud Hypervisor has them, the ports edk2's CloudHv firmware hard-codes
//! (`OvmfPkg/Include/IndustryStandard/CloudHv.h`): the firmware's ResetSystem(Shutdown)
//! writes SLP_TYP|SLP_EN to 0x600 (Linux booted through UEFI on a hardware-reduced platform
//! powers off through that runtime service), and it times its delays with the ACPI PM timer
//! at 0x608 (`PmTimer`).

use std::time::Instant;

use super::log_limit::LogLimit;
use super::{BusDevice, VmExitRequest};
use crate::exit::ExitReason;

/// The I/O port of the sleep control, sleep status and reset registers.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 1;
/// The ACPI PM timer edk2's CloudHv firmware reads (CLOUDHV_ACPI_TIMER_IO_ADDRESS).
pub const PM_TIMER_PORT: u16 = 0x608;
/// The PM timer's length in ports: one 32-bit register.
pub const PM_TIMER_LEN: u16 = 4;
/// The PM timer runs at 3.579545 MHz.
const PM_TIMER_HZ: u128 = 3_579_545;
/// A 32-bit counter (TMR_VAL_EXT), as in Cloud Hypervisor: edk2's delay loop computes the
/// deadline in 32-bit arithmetic (`Ticks = now + delay`, wait until bit 23 of
/// `Ticks - now` flips), which a counter wrapping at 24 bits breaks near the wrap (a delay
/// then lasts until the counter is half a wrap, up to 2.3 s, further).
const PM_TIMER_MASK: u32 = u32::MAX;
/// SLP_TYP of \_S5_ (soft off) in the DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLEEP_ENABLE: u8 = 1 << 5;

pub struct AcpiPm {
    exit: VmExitRequest,
    /// Writes that end nothing (other sleep states) can come in a loop: rate-limited.
    log: LogLimit,
}

impl AcpiPm {
    pub fn new(exit: VmExitRequest) -> Self {
        AcpiPm {
            exit,
            log: LogLimit::default(),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        crate::guest_log!(
            tracing::Level::DEBUG,
            self.log,
            "ACPI PM register write {value:#x}"
        );
        if value == RESET_VALUE {
            self.exit.request(ExitReason::GuestReset);
        } else if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            self.exit.request(ExitReason::GuestPowerOff);
        }
        // Other sleep states are not offered in the DSDT; writes to them are ignored.
    }
}

/// The ACPI PM timer: a free-running 32-bit counter at 3.579545 MHz, read-only.
pub struct PmTimer {
    start: Instant,
}

impl Default for PmTimer {
    fn default() -> Self {
        PmTimer {
            start: Instant::now(),
        }
    }
}

impl PmTimer {
    fn ticks(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks as u32) & PM_TIMER_MASK
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.ticks().to_le_bytes();
        // Byte reads at an offset see that part of the register; beyond it, zeros.
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i);
            *byte = value.get(at).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_timer_counts_at_its_rate() {
        let mut timer = PmTimer::default();
        let read = |t: &mut PmTimer| {
            let mut b = [0u8; 4];
            t.read(0, &mut b);
            u32::from_le_bytes(b)
        };
        let before = Instant::now();
        let first = read(&mut timer);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = read(&mut timer);
        let wall = before.elapsed().as_nanos();
        let elapsed = u128::from(second.wrapping_sub(first) & PM_TIMER_MASK);
        // Between the two reads: at least the 20 ms slept, at most the time measured around
        // them (plus one tick of rounding), whatever the machine's load.
        assert!(elapsed >= 20 * PM_TIMER_HZ / 1000 - 1, "{elapsed} ticks");
        assert!(
            elapsed <= wall * PM_TIMER_HZ / 1_000_000_000 + 1,
            "{elapsed} ticks"
        );
        assert_eq!(second & !PM_TIMER_MASK, 0, "24 bits");
        let mut high = [0xaau8; 2];
        timer.read(3, &mut high);
        assert_eq!(
            high,
            [0, 0],
            "the top byte of a 24-bit counter, then nothing"
        );
    }

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
    fn a_guest_writing_in_a_loop_gets_a_bounded_number_of_debug_lines() {
        use crate::devices::log_limit::{logged_lines, DEFAULT_BURST};
        let exit = VmExitRequest::new().expect("eventfd");
        let mut pm = AcpiPm::new(exit.clone());
        let s3 = (3 << 2) | SLEEP_ENABLE;
        let lines = logged_lines(tracing::Level::DEBUG, || {
            for _ in 0..1000 {
                pm.write(0, &[s3]);
            }
        });
        assert_eq!(lines.len(), DEFAULT_BURST as usize, "{lines:?}");
        assert!(
            lines[0].contains("ACPI PM register write 0x2c"),
            "{lines:?}"
        );
        assert_eq!(exit.reason(), None, "S3 is ignored");
    }

    #[test]
    fn empty_write_is_ignored() {
        let exit = VmExitRequest::new().expect("eventfd");
        AcpiPm::new(exit.clone()).write(0, &[]);
        assert_eq!(exit.reason(), None);
    }
}
