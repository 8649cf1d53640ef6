//! Just enough of the i8042 keyboard controller for a guest to reset the machine through it
//! (`reboot=k`, and Linux's fallback when the ACPI reset does not take): the controller always
//! looks idle, and the "pulse reset line" command (0xfe on the command port) resets the VM.
//! The FADT says there is no 8042, so the guest's keyboard driver does not probe it.

use super::log_limit::LogLimit;
use super::{BusDevice, VmExitRequest};
use crate::exit::ExitReason;

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
const CMD_PULSE_RESET: u8 = 0xfe;

pub struct I8042 {
    exit: VmExitRequest,
    /// The guest writes these ports as often as it likes: its debug lines are rate-limited.
    log: LogLimit,
}

impl I8042 {
    pub fn new(exit: VmExitRequest) -> Self {
        I8042 {
            exit,
            log: LogLimit::default(),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty. Data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        crate::guest_log!(
            tracing::Level::DEBUG,
            self.log,
            "i8042 write {data:x?} at offset {offset}"
        );
        // Registered at the data port; the command port is 4 bytes further.
        if offset == u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT)
            && data.first() == Some(&CMD_PULSE_RESET)
        {
            self.exit.request(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_reset_resets_only_on_the_command_port() {
        let exit = VmExitRequest::new().expect("eventfd");
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_PULSE_RESET]);
        assert_eq!(
            exit.reason(),
            None,
            "0xfe on the data port is keyboard data"
        );
        dev.write(4, &[0xaa]);
        assert_eq!(exit.reason(), None);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "idle");
        dev.write(4, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn a_guest_writing_in_a_loop_gets_a_bounded_number_of_debug_lines() {
        use crate::devices::log_limit::{logged_lines, DEFAULT_BURST};
        let exit = VmExitRequest::new().expect("eventfd");
        let mut dev = I8042::new(exit.clone());
        let lines = logged_lines(tracing::Level::DEBUG, || {
            for i in 0..1000u32 {
                dev.write(0, &[i as u8]);
            }
        });
        assert_eq!(lines.len(), DEFAULT_BURST as usize, "{lines:?}");
        assert!(
            lines[0].contains("i8042 write [0] at offset 0"),
            "{lines:?}"
        );
        assert_eq!(exit.reason(), None);
    }
}
