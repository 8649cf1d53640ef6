//! MSI-X: the vector table and pending-bit array (PBA) a device exposes in a BAR, the
//! capability that enables them, and delivery through KVM.
//!
//! ```text
//! guest programs an entry ──> MsixTable (vCPU thread) ──> GsiRouting: GSI -> MSI message
//! worker raises vector v ──> MsixVectors::trigger ──> irqfd of v's GSI ──> KVM delivers
//!                                 └── masked? set v's pending bit instead; unmask delivers it
//! ```
//!
//! Each vector has its own GSI and irqfd from start-up, so raising one is a single eventfd
//! write from the worker, and changing a route never needs a new irqfd. Masking is honoured in
//! the VMM: a masked vector's interrupt sets its pending bit, and unmasking delivers it, as the
//! PCI spec asks. The table is guest input: any offset, width and value is harmless, and an
//! entry's message only reaches KVM once the guest unmasks it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::msi::{GsiRouting, MsiError, MsiMessage};

/// The MSI-X capability's ID.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: message address (8), data (4), vector control (4).
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a table may have (the capability's 11-bit table size).
pub const MAX_VECTORS: usize = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Offset of the message control word inside the capability.
pub const CONTROL_OFFSET: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("an MSI-X table needs 1 to {MAX_VECTORS} vectors, not {0}")]
    VectorCount(usize),
    #[error(transparent)]
    Routing(#[from] MsiError),
    #[error("cannot create or register a vector's irqfd: {0}")]
    Irqfd(std::io::Error),
}

struct Vector {
    irqfd: EventFd,
    gsi: u32,
    masked: AtomicBool,
    pending: AtomicBool,
}

/// The delivery side, shared with the device's worker.
pub struct MsixVectors {
    vectors: Vec<Vector>,
}

impl MsixVectors {
    /// `count` vectors, each with a GSI and an irqfd registered with KVM; all masked.
    pub fn new(count: usize, routing: &GsiRouting, vm: &VmFd) -> Result<Self, MsixError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(MsixError::VectorCount(count));
        }
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            let gsi = routing.allocate()?;
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MsixError::Irqfd)?;
            vm.register_irqfd(&irqfd, gsi)
                .map_err(|e| MsixError::Irqfd(std::io::Error::from_raw_os_error(e.errno())))?;
            vectors.push(Vector {
                irqfd,
                gsi,
                masked: AtomicBool::new(true),
                pending: AtomicBool::new(false),
            });
        }
        Ok(MsixVectors { vectors })
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Raises `vector`, or marks it pending while it is masked. A vector past the table
    /// (the guest's choice) raises nothing.
    pub fn trigger(&self, vector: u16) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        if v.masked.load(Ordering::SeqCst) {
            v.pending.store(true, Ordering::SeqCst);
            // Unmasked meanwhile, after the unmasking thread looked for pending bits?
            if v.masked.load(Ordering::SeqCst) || !v.pending.swap(false, Ordering::SeqCst) {
                return;
            }
        }
        fire(v);
    }

    fn set_masked(&self, vector: usize, masked: bool) {
        let Some(v) = self.vectors.get(vector) else {
            return;
        };
        v.masked.store(masked, Ordering::SeqCst);
        if !masked && v.pending.swap(false, Ordering::SeqCst) {
            fire(v);
        }
    }

    /// Marks `vector` pending (a snapshot's PBA); it fires when unmasked.
    pub fn set_pending(&self, vector: usize) {
        if let Some(v) = self.vectors.get(vector) {
            v.pending.store(true, Ordering::SeqCst);
        }
    }

    pub fn pending(&self, vector: usize) -> bool {
        self.vectors
            .get(vector)
            .is_some_and(|v| v.pending.load(Ordering::SeqCst))
    }
}

fn fire(v: &Vector) {
    if let Err(e) = v.irqfd.write(1) {
        tracing::warn!("cannot raise an MSI-X interrupt: {e}");
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    message: MsiMessage,
    control: u32,
}

/// The guest-programmed side: the table, the capability's enable and function-mask bits.
pub struct MsixTable {
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
    vectors: Arc<MsixVectors>,
    routing: Arc<GsiRouting>,
    warnings_left: u32,
}

impl MsixTable {
    pub fn new(vectors: Arc<MsixVectors>, routing: Arc<GsiRouting>) -> Self {
        let entries = vec![
            Entry {
                message: MsiMessage::default(),
                control: VECTOR_MASKED,
            };
            vectors.len()
        ];
        MsixTable {
            entries,
            enabled: false,
            function_masked: false,
            vectors,
            routing,
            warnings_left: 8,
        }
    }

    pub fn vectors(&self) -> &Arc<MsixVectors> {
        &self.vectors
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability's bytes after its ID and next pointer, and the writable-bit mask from
    /// the ID on: the table at `table_offset` of BAR `bar`, the PBA at `pba_offset` of it.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let size_field = (self.entries.len() - 1) as u16;
        let mut body = size_field.to_le_bytes().to_vec();
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let writable = vec![
            0,
            0,
            0,
            ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8,
        ];
        (body, writable)
    }

    /// The table's entries as the guest wrote them (address low, high, data, control), and
    /// the pending bits, for a snapshot.
    pub fn state(&self) -> (Vec<[u32; 4]>, Vec<bool>) {
        let entries = self
            .entries
            .iter()
            .map(|e| {
                [
                    e.message.address as u32,
                    (e.message.address >> 32) as u32,
                    e.message.data,
                    e.control,
                ]
            })
            .collect();
        let pending = (0..self.entries.len())
            .map(|i| self.vectors.pending(i))
            .collect();
        (entries, pending)
    }

    /// Takes a snapshot's table by writing it as the guest did (routes follow), the pending
    /// bits, then the capability's `control` word (a pending vector it unmasks fires).
    pub fn restore(
        &mut self,
        entries: &[[u32; 4]],
        pending: &[bool],
        control: u16,
    ) -> Result<(), String> {
        if entries.len() != self.entries.len() || pending.len() != self.entries.len() {
            return Err(format!(
                "{} MSI-X entries in the snapshot, {} here",
                entries.len(),
                self.entries.len()
            ));
        }
        for (i, words) in entries.iter().enumerate() {
            for (w, value) in words.iter().enumerate() {
                self.write_table(i as u64 * ENTRY_SIZE + w as u64 * 4, &value.to_le_bytes());
            }
        }
        for (i, p) in pending.iter().enumerate() {
            if *p {
                self.vectors.set_pending(i);
            }
        }
        self.write_control(control);
        Ok(())
    }

    /// The guest wrote the capability's message control word (already masked to its
    /// writable bits).
    pub fn write_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for i in 0..self.entries.len() {
            self.update(i);
        }
    }

    /// A table read: dword or qword, aligned; anything else reads all ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(entry) = self.entries.get(index as usize) else {
            data.fill(0xff);
            return;
        };
        let words = [
            entry.message.address as u32,
            (entry.message.address >> 32) as u32,
            entry.message.data,
            entry.control,
        ];
        let word = (field / 4) as usize;
        match (data.len(), field % 4) {
            (4, 0) => data.copy_from_slice(&words[word].to_le_bytes()),
            (8, 0) if word.is_multiple_of(2) => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => data.fill(0xff),
        }
    }

    /// A table write: dword or qword, aligned; anything else is ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let index = index as usize;
        if index >= self.entries.len() || field % 4 != 0 {
            return;
        }
        let values: Vec<u32> = match data.len() {
            4 => vec![u32::from_le_bytes([data[0], data[1], data[2], data[3]])],
            8 if field % 8 == 0 => vec![
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                u32::from_le_bytes([data[4], data[5], data[6], data[7]]),
            ],
            _ => return,
        };
        for (i, value) in values.into_iter().enumerate() {
            let entry = &mut self.entries[index];
            match field / 4 + i as u64 {
                0 => {
                    entry.message.address =
                        (entry.message.address & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    entry.message.address =
                        (entry.message.address & 0xffff_ffff) | (u64::from(value) << 32)
                }
                2 => entry.message.data = value,
                _ => entry.control = value & VECTOR_MASKED,
            }
        }
        self.update(index);
    }

    /// A PBA read: one bit per vector, read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = offset.saturating_add(i as u64).saturating_mul(8);
            *byte = (0..8u64).fold(0u8, |b, bit| {
                let vector = first.saturating_add(bit);
                let set = usize::try_from(vector).is_ok_and(|v| self.vectors.pending(v));
                b | (u8::from(set) << bit)
            });
        }
    }

    /// Makes vector `index`'s route and mask what the guest asked for. While it is masked
    /// its route is left as it was: nothing is delivered through it anyway.
    fn update(&mut self, index: usize) {
        let Some(entry) = self.entries.get(index).copied() else {
            return;
        };
        let masked = !self.enabled || self.function_masked || entry.control & VECTOR_MASKED != 0;
        if !masked {
            let gsi = self.vectors.vectors[index].gsi;
            if let Err(e) = self.routing.set(gsi, Some(entry.message)) {
                if self.warnings_left > 0 {
                    self.warnings_left -= 1;
                    tracing::warn!("MSI-X vector {index}: {e}");
                }
            }
        }
        self.vectors.set_masked(index, masked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors with irqfds KVM never sees: the delivery logic without a VM.
    fn vectors(count: usize) -> Arc<MsixVectors> {
        let vectors = (0..count)
            .map(|i| Vector {
                irqfd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                gsi: 100 + i as u32,
                masked: AtomicBool::new(true),
                pending: AtomicBool::new(false),
            })
            .collect();
        Arc::new(MsixVectors { vectors })
    }

    fn fired(v: &MsixVectors, i: usize) -> bool {
        v.vectors[i].irqfd.read().is_ok()
    }

    #[test]
    fn masked_vectors_pend_and_unmasking_delivers() {
        let v = vectors(2);
        v.trigger(1);
        assert!(!fired(&v, 1), "masked");
        assert!(v.pending(1));
        v.set_masked(1, false);
        assert!(fired(&v, 1), "delivered on unmask");
        assert!(!v.pending(1));
        v.trigger(1);
        assert!(fired(&v, 1));
        v.trigger(7);
        v.trigger(u16::MAX);
        assert!(!fired(&v, 0), "vectors past the table raise nothing");
    }

    #[test]
    fn capability_and_pba_layout() {
        let v = vectors(3);
        let routing_less = MsixTable {
            entries: vec![
                Entry {
                    message: MsiMessage::default(),
                    control: VECTOR_MASKED,
                };
                3
            ],
            enabled: false,
            function_masked: false,
            vectors: v.clone(),
            routing: Arc::new(GsiRouting::for_tests()),
            warnings_left: 0,
        };
        let (body, writable) = routing_less.capability(0, 0x4000, 0x5000);
        assert_eq!(body, [2, 0, 0x00, 0x40, 0, 0, 0x00, 0x50, 0, 0]);
        assert_eq!(writable, [0, 0, 0, 0xc0]);
        v.trigger(2);
        let mut pba = [0u8; 8];
        routing_less.read_pba(0, &mut pba);
        assert_eq!(pba, [0b100, 0, 0, 0, 0, 0, 0, 0]);
        routing_less.read_pba(u64::MAX, &mut pba);
        assert_eq!(pba, [0; 8], "no overflow");
    }

    #[test]
    fn table_accesses_of_any_shape_are_harmless_and_masked_entries_stay_local() {
        let v = vectors(2);
        let mut t = MsixTable::new(v.clone(), Arc::new(GsiRouting::for_tests()));
        // Program entry 1 while masked: nothing reaches KVM (the test routing has no VM).
        t.write_table(16, &0xfee0_0000u32.to_le_bytes());
        t.write_table(16 + 8, &0x41u32.to_le_bytes());
        let mut d = [0u8; 8];
        t.read_table(16, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xfee0_0000);
        let mut w = [0u8; 4];
        t.read_table(16 + 12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1, "entries start masked");
        for (offset, len) in [(1u64, 4usize), (2, 2), (4, 8), (32, 4), (u64::MAX - 3, 4)] {
            let mut buf = vec![0u8; len];
            t.read_table(offset, &mut buf);
            assert!(buf.iter().all(|b| *b == 0xff), "{offset:#x}+{len}");
            t.write_table(offset, &buf);
        }
        t.write_table(12, &[1, 2, 3]);
        t.read_table(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1);
        assert!(!t.enabled());
    }
}
