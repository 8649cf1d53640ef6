//! Emulated devices, the buses (port I/O and MMIO) that dispatch guest accesses to them, and
//! the per-device counters the control API reports (`metrics`).

pub mod acpi_pm;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod log_limit;
pub mod metrics;
pub mod pci;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

pub use crate::exit::VmExitRequest;

/// A device on a bus. `offset` is relative to the device's base port or address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address-range dispatch, shared by all vCPU threads: one for port I/O, one for MMIO.
/// Unclaimed reads see all ones, as on real hardware with nothing on the bus; unclaimed writes
/// are dropped.
#[derive(Default, Clone)]
pub struct Bus {
    /// Sorted by base address, non-overlapping.
    devices: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        if self
            .devices
            .iter()
            .any(|(b, l, _)| base < b + l && *b < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.push((base, len, dev));
        self.devices.sort_by_key(|(b, _, _)| *b);
        Ok(())
    }

    fn find(&self, port: u64) -> Option<(u64, &SharedDevice)> {
        let idx = self.devices.partition_point(|(b, _, _)| *b <= port);
        let (base, len, dev) = self.devices.get(idx.checked_sub(1)?)?;
        (port - base < *len).then_some((port - base, dev))
    }

    pub fn read(&self, port: u64, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u64, data: &[u8]) {
        tracing::trace!("bus write {data:x?} at {port:#x}");
        if let Some((offset, dev)) = self.find(port) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, u8)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).expect("free");
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .expect("free");
        bus.write(0x3f8 + 3, &[7]);
        bus.write(0x3f8 + 8, &[9]); // just past the end
        bus.write(0x3f7, &[9]); // just before
        assert_eq!(a.lock().expect("lock").0, vec![(3u64, 7u8)]);
        let mut data = [0u8; 1];
        bus.read(0x3fa, &mut data);
        assert_eq!(data, [2]);
        bus.read(0x2f8, &mut data);
        assert_eq!(data, [0xff], "nothing there");
        bus.read(0, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x10, 4, dev()).expect("free");
        assert!(bus.insert(0x13, 1, dev()).is_err());
        assert!(bus.insert(0x0e, 3, dev()).is_err());
        assert!(bus.insert(0x14, 1, dev()).is_ok());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        assert!(bus.insert(0x100, 0, dev()).is_err());
    }
}
