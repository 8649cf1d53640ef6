//! Why the VMM exits, and the status it exits with. A supervisor tells these apart:
//!
//! | status | meaning                                                                 |
//! |--------|-------------------------------------------------------------------------|
//! | 0      | the guest powered off, or SIGTERM/SIGINT or the API stopped the VMM     |
//! | 1      | an error (KVM, a device, a missing or corrupt kernel, ...)               |
//! | 2      | invalid usage or configuration                                         |
//! | 3      | the guest reset: reboot, or a panic with panic=N; restart it            |
//! | 4      | the guest crashed its vCPU: an instruction KVM cannot emulate, an        |
//! |        | exception it cannot deliver, an unknown hardware exit. The guest's fault, |
//! |        | not the host's: restarting it may well crash it again                    |
//! | 5      | a migration target (`--incoming`) ended before its guest ran here: the   |
//! |        | guest is still on its source; nothing here needs cleaning up but the VM   |
//!
//! A triple fault stays a reset (3): it is how Linux reboots when nothing else works, and
//! what a PC does.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_GUEST_RESET: i32 = 3;
pub const EXIT_GUEST_FAULT: i32 = 4;
pub const EXIT_NOT_ARRIVED: i32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 from the guest.
    GuestPowerOff,
    /// ACPI reset register, i8042 reset line or triple fault.
    GuestReset,
    /// SIGTERM, SIGINT or the control API's `stop`.
    Stopped,
    /// A vCPU failed in a way the guest cannot recover from, through the host's fault (KVM,
    /// the VMM).
    VcpuError,
    /// The guest made its vCPU fail (emulation failure, undeliverable exception, unknown
    /// exit).
    GuestFault,
    /// The guest was migrated and runs in another VMM now.
    Migrated,
}

impl ExitReason {
    pub fn status(self) -> i32 {
        match self {
            ExitReason::GuestPowerOff | ExitReason::Stopped | ExitReason::Migrated => EXIT_OK,
            ExitReason::GuestReset => EXIT_GUEST_RESET,
            ExitReason::VcpuError => EXIT_ERROR,
            ExitReason::GuestFault => EXIT_GUEST_FAULT,
        }
    }
}

/// A one-shot "this VM should end" latch shared by vCPUs, devices and the main loop. The first
/// reason wins; the eventfd wakes the main loop.
#[derive(Clone)]
pub struct VmExitRequest {
    reason: Arc<Mutex<Option<ExitReason>>>,
    event: Arc<EventFd>,
}

impl VmExitRequest {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExitRequest {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none() {
            *current = Some(reason);
            // A full counter still wakes the reader: nothing to handle on error.
            let _ = self.event.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let exit = VmExitRequest::new().expect("eventfd");
        assert_eq!(exit.reason(), None);
        exit.request(ExitReason::GuestReset);
        exit.clone().request(ExitReason::GuestPowerOff);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        assert_eq!(exit.event().read().expect("signalled"), 1, "signalled once");
    }

    #[test]
    fn statuses_are_distinct_where_it_matters() {
        assert_eq!(ExitReason::GuestPowerOff.status(), 0);
        assert_eq!(ExitReason::Stopped.status(), 0);
        assert_eq!(ExitReason::GuestReset.status(), 3);
        assert_eq!(ExitReason::VcpuError.status(), 1);
        assert_eq!(ExitReason::GuestFault.status(), 4);
        assert_ne!(ExitReason::GuestFault.status(), EXIT_USAGE);
    }
}
