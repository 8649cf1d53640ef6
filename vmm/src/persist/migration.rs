//! Live migration: the guest's memory sent while it runs, then a short pause for the last
//! pages and the device state, and the guest continues in the target VMM.
//!
//! Pre-copy, as QEMU and Cloud Hypervisor do it: the first round sends all memory that is not
//! zero; each further round sends what was written meanwhile, by the guest (KVM's dirty log)
//! and by the VMM's devices (vm-memory's dirty bitmap, see `vstate::memory`); once a round's
//! pages would go over the link within the downtime target, the source pauses the guest and
//! its devices, sends the rest and the state of a snapshot (`persist`), and the target restores
//! and resumes it. A guest that writes faster than the link carries never converges: after
//! `max_rounds` the migration ends with an error and the guest keeps running where it was.
//!
//! The stream, both ways (all integers little-endian):
//!
//! ```text
//! message = kind: u32, length: u64, payload[length]
//! source -> target  HELLO   the machine description (JSON, `persist::Machine`)
//! target -> source  READY   {"ok":true} or {"ok":false,"error":"..."}: the target can take it
//! source -> target  MEMORY  guest address: u64, then the bytes from there (whole pages)
//! source -> target  ZERO    guest address: u64, length: u64 (whole pages that are now zero)
//!                   ...     (as many as the rounds need)
//! source -> target  STATE   the state of a snapshot (JSON, `persist::Snapshot`)
//! target -> source  RESUMED {"ok":true} once the guest runs there, or an error
//! ```
//!
//! The source stops only on the target's RESUMED. Before STATE has gone out, any failure
//! (the target refusing, dying, the link breaking, no convergence) leaves the source running
//! as if nothing had happened. After it, without RESUMED the source cannot know whether the
//! target runs the guest, and two copies of a guest on one disk would corrupt it: the source
//! stays paused and says so, and the caller decides (QEMU's "postmigrate" state).
//!
//! The VMM opens no connection once it runs (seccomp): the source gets its stream, already
//! connected, with the `migrate` request (SCM_RIGHTS); the target (`--incoming`) listens and
//! accepts before its sandbox is on.

use std::fs::File;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde_json::{json, Value};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::outgoing::{MigrationControl, Phase};
use super::{Machine, Persist, Snapshot, SnapshotError};
use crate::vstate::control::VcpuControl;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::DirtyLog;

pub const HELLO: u32 = 1;
pub const READY: u32 = 2;
pub const MEMORY: u32 = 3;
pub const STATE: u32 = 4;
pub const RESUMED: u32 = 5;
pub const ZERO: u32 = 6;

const PAGE: u64 = 4096;
/// The largest message: a state file, or a run of pages.
const MAX_MESSAGE: u64 = 64 << 20;
/// Pages sent in one MEMORY message at most.
const MAX_RUN: u64 = 1 << 20;
/// How long either side waits for the other's next message.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// The `migrate` request's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The pause the guest may see: the last round starts when its pages would take no
    /// longer to send at the speed measured so far.
    pub downtime: Duration,
    /// Rounds after the first before giving up on a guest that writes faster than the link.
    pub max_rounds: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent message {found} where {expected} belongs")]
    Unexpected { expected: u32, found: u32 },
    #[error("the peer sent a message of {0} bytes")]
    TooLarge(u64),
    #[error("the peer: {0}")]
    Peer(String),
    #[error("the peer's answer is not JSON: {0}")]
    Answer(String),
    #[error("memory at {addr:#x} (+{len}) is not guest RAM")]
    Range { addr: u64, len: u64 },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("KVM cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "the guest writes its memory faster than the link carries it: {dirty} bytes still \
         to send after {rounds} rounds ({rate} bytes/s); migration abandoned, the guest runs \
         on here"
    )]
    NoConvergence { rounds: u32, dirty: u64, rate: u64 },
    #[error("canceled (migrate-cancel)")]
    Canceled,
    #[error("{0}")]
    Vm(String),
}

pub fn write_message(stream: &mut impl Write, kind: u32, payload: &[&[u8]]) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut header = [0u8; 12];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[4..].copy_from_slice(&(len as u64).to_le_bytes());
    stream.write_all(&header)?;
    for part in payload {
        stream.write_all(part)?;
    }
    Ok(())
}

/// The next message's kind and length; the caller reads the payload.
pub fn read_header(stream: &mut impl Read) -> Result<(u32, u64), MigrationError> {
    let mut header = [0u8; 12];
    stream.read_exact(&mut header)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[4..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(MigrationError::TooLarge(len));
    }
    Ok((kind, len))
}

fn read_payload(stream: &mut impl Read, len: u64) -> Result<Vec<u8>, MigrationError> {
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Reads a message that must be of `kind`.
pub fn expect(stream: &mut impl Read, kind: u32) -> Result<Vec<u8>, MigrationError> {
    let (found, len) = read_header(stream)?;
    if found != kind {
        return Err(MigrationError::Unexpected {
            expected: kind,
            found,
        });
    }
    read_payload(stream, len)
}

/// A READY or RESUMED answer: Ok, or the peer's error.
fn answer(payload: &[u8]) -> Result<(), MigrationError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| MigrationError::Answer(e.to_string()))?;
    if v["ok"] == true {
        Ok(())
    } else {
        Err(MigrationError::Peer(
            v["error"].as_str().unwrap_or("no reason given").to_string(),
        ))
    }
}

/// The answer to send: `{"ok":true}` or the error.
pub fn answer_json(result: &Result<(), String>) -> Vec<u8> {
    let v = match result {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    v.to_string().into_bytes()
}

/// Bounds every read and write on the stream to the target: a target that stops answering
/// ends the migration instead of holding the API thread.
fn set_timeouts(stream: &File, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval of the given size from a local.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Turns KVM's dirty page logging on or off for every RAM slot (the slots are the regions'
/// indices, as `Vm::register_memory` numbers them).
pub fn set_dirty_logging(fd: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), MigrationError> {
    for (slot, region) in mem.iter().enumerate() {
        let host =
            mem.get_host_address(region.start_addr())
                .map_err(|_| MigrationError::Range {
                    addr: region.start_addr().0,
                    len: region.len(),
                })?;
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the same live mapping that is already registered in this slot, with only
        // the logging flag changed.
        unsafe { fd.set_user_memory_region(region) }.map_err(|source| MigrationError::Kvm {
            what: "change dirty page logging",
            source,
        })?;
    }
    Ok(())
}

// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`, which kvm-ioctls does not wrap.
vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Pages one KVM_CLEAR_DIRTY_LOG covers at most (256 MiB: KVM holds its MMU lock while it
/// write-protects them, so a large slot goes in several steps, as QEMU does).
const CLEAR_CHUNK_PAGES: usize = 1 << 16;

/// Write-protects again, and clears in KVM's log, the pages set in `bits` of `slot`
/// ([`DirtyLog::Manual`]); chunks without a set bit are skipped.
fn clear_dirty_log(fd: &VmFd, slot: u32, bits: &[u64], pages: u64) -> Result<(), MigrationError> {
    use vmm_sys_util::ioctl::ioctl_with_ref;
    for (first_page, num_pages, chunk) in clear_ranges(bits, pages) {
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: num_pages as u32,
            first_page,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk.as_ptr() as *mut std::ffi::c_void,
            },
        };
        // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which points into `chunk`
        // (at least that many bits long), and writes nothing of ours.
        let rc = unsafe { ioctl_with_ref(fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(MigrationError::Kvm {
                what: "clear the dirty log",
                source: kvm_ioctls::Error::last(),
            });
        }
    }
    Ok(())
}

/// What [`clear_dirty_log`] hands KVM for a slot of `pages` pages: (first page, pages, the
/// bitmap's words for them) per chunk of [`CLEAR_CHUNK_PAGES`] that has a set bit. KVM wants
/// the first page and the count a multiple of 64, but for a range that ends at the slot's end.
fn clear_ranges(bits: &[u64], pages: u64) -> impl Iterator<Item = (u64, u64, &[u64])> {
    bits.chunks(CLEAR_CHUNK_PAGES / 64)
        .enumerate()
        .filter(|(_, chunk)| chunk.iter().any(|w| *w != 0))
        .map(move |(i, chunk)| {
            let first_page = (i * CLEAR_CHUNK_PAGES) as u64;
            let num_pages = (chunk.len() as u64 * 64).min(pages.saturating_sub(first_page));
            (first_page, num_pages, chunk)
        })
}

/// The pages written since the last call, per region, by the guest (KVM) or the VMM
/// (bitmap): one bit per page. With [`DirtyLog::Manual`] the first call after logging was
/// turned on finds every page set (KVM_DIRTY_LOG_INITIALLY_SET).
fn take_dirty(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    mode: DirtyLog,
) -> Result<Vec<Vec<u64>>, MigrationError> {
    let mut all = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bits = fd
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| MigrationError::Kvm {
                what: "read the dirty log",
                source,
            })?;
        if mode == DirtyLog::Manual {
            clear_dirty_log(fd, slot as u32, &bits, region.len() / PAGE)?;
        }
        let ours: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        for (word, mine) in bits.iter_mut().zip(ours.get_and_reset()) {
            *word |= mine;
        }
        all.push(bits);
    }
    Ok(all)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    Skip,
    Zero,
    Data,
}

/// Whether a page holds only zeros (OR-folded in blocks: the compiler vectorises a fold, not
/// a short-circuiting search, and a page with data usually shows it in its first block).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Runs of set bits in `bits` (pages of a region with `pages` pages), each at most `max`
/// pages: (first page, count).
fn dirty_runs(bits: &[u64], pages: u64, max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<(u64, u64)> = None;
    for (w, &word) in bits.iter().enumerate() {
        if word == 0 {
            if let Some(run) = open.take() {
                runs.push(run);
            }
            continue;
        }
        for b in 0..64 {
            let page = w as u64 * 64 + b;
            if page >= pages {
                break;
            }
            if word & (1 << b) != 0 {
                open = match open {
                    Some((first, count)) if count < max => Some((first, count + 1)),
                    Some(full) => {
                        runs.push(full);
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            } else if let Some(run) = open.take() {
                runs.push(run);
            }
        }
    }
    runs.extend(open);
    runs
}

/// What one call of [`send_pages`] did.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    /// Page data that went out (MEMORY).
    bytes: u64,
    /// Pages looked at, whatever went out for them: what the next round's time depends on.
    handled: u64,
}

/// Sends the pages whose bits are set (all pages that are not zero for `None`: the target's
/// memory starts zeroed), in runs of whole pages. Later rounds read only their dirty runs, so
/// a last round of a few pages spread over a large guest costs those pages, not the guest.
fn send_pages(
    stream: &mut impl Write,
    mem: &GuestMemoryMmap,
    dirty: Option<&[Vec<u64>]>,
    control: &MigrationControl,
) -> Result<Sent, MigrationError> {
    // Small runs (a last round's scattered pages) go out several to a write.
    let mut stream = io::BufWriter::with_capacity(256 << 10, stream);
    let stream = &mut stream;
    let mut sent = Sent::default();
    let max = MAX_RUN / PAGE;
    let mut chunk = vec![0u8; MAX_RUN as usize];
    for (r, region) in mem.iter().enumerate() {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE;
        let runs: Vec<(u64, u64)> = match dirty {
            None => (0..pages)
                .step_by(max as usize)
                .map(|first| (first, max.min(pages - first)))
                .collect(),
            Some(d) => dirty_runs(d.get(r).map_or(&[][..], Vec::as_slice), pages, max),
        };
        for (first, count) in runs {
            let addr = base + first * PAGE;
            let len = count * PAGE;
            let chunk = &mut chunk[..len as usize];
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(|_| MigrationError::Range { addr, len })?;
            sent.handled += len;
            // Runs of pages of one kind: data to send, or (in later rounds) pages that became
            // zero, sent as their range only; the first round skips zeros altogether (the
            // target's memory starts zeroed).
            let kind = |p: u64| match (
                is_zero(&chunk[(p * PAGE) as usize..((p + 1) * PAGE) as usize]),
                dirty,
            ) {
                (true, None) => Page::Skip,
                (true, Some(_)) => Page::Zero,
                (false, _) => Page::Data,
            };
            let mut p = 0;
            let mut this = (count > 0).then(|| kind(0));
            while let Some(current) = this {
                let start = p;
                this = None;
                p += 1;
                while p < count {
                    let next = kind(p);
                    if next != current {
                        this = Some(next);
                        break;
                    }
                    p += 1;
                }
                let at = addr + start * PAGE;
                let run = &chunk[(start * PAGE) as usize..(p * PAGE) as usize];
                if current != Page::Skip {
                    control.check()?;
                }
                match current {
                    Page::Skip => {}
                    Page::Zero => {
                        write_message(
                            stream,
                            ZERO,
                            &[&at.to_le_bytes(), &(run.len() as u64).to_le_bytes()],
                        )?;
                    }
                    Page::Data => {
                        write_message(stream, MEMORY, &[&at.to_le_bytes(), run])?;
                        sent.bytes += run.len() as u64;
                        control.add_bytes(run.len() as u64);
                    }
                }
            }
        }
    }
    stream.flush()?;
    Ok(sent)
}

fn dirty_bytes(dirty: &[Vec<u64>]) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum::<u64>()
        * PAGE
}

/// What a migration did, for the caller.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub rounds: u32,
    pub bytes: u64,
    pub downtime: Duration,
    pub total: Duration,
}

impl Persist {
    /// Migrates the running (or paused) VM over `stream`; on success the target runs it and
    /// this VMM must end. See the module documentation for what a failure leaves. Runs on
    /// the migration thread (`outgoing`), reporting to and canceled through `control`.
    pub fn migrate(
        &self,
        vcpus: &VcpuControl,
        stream: &mut File,
        options: MigrateOptions,
        control: &MigrationControl,
    ) -> Result<MigrationReport, String> {
        let started = Instant::now();
        let machine: Machine = self
            .machine
            .describe(self.devices.iter().map(|d| d.description.clone()).collect());
        let hello = serde_json::to_vec(&machine).map_err(|e| e.to_string())?;
        let was_paused = vcpus.is_paused();
        let fail = |e: MigrationError| format!("migration failed, the VM runs on here: {e}");
        set_timeouts(stream, PEER_TIMEOUT).map_err(|e| {
            format!("the file sent with migrate must be a connected stream socket: {e}")
        })?;
        write_message(stream, HELLO, &[&hello]).map_err(|e| fail(e.into()))?;
        expect(stream, READY)
            .and_then(|p| answer(&p))
            .map_err(fail)?;
        set_dirty_logging(&self.vm, &self.mem, true).map_err(fail)?;
        control.set_phase(Phase::Precopy);
        let precopy = self.precopy(stream, options, control);
        let mut report = match precopy {
            Ok(report) => report,
            Err(e) => {
                let _ = set_dirty_logging(&self.vm, &self.mem, false);
                return Err(fail(e));
            }
        };
        // Stop and copy.
        control.set_phase(Phase::StopAndCopy);
        let paused_at = Instant::now();
        let pause = || -> Result<(), String> {
            if !was_paused {
                vcpus
                    .pause(crate::vstate::control::PAUSE_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                if let Err(e) = self.pause_devices() {
                    vcpus.resume();
                    return Err(e);
                }
            }
            Ok(())
        };
        let resume = || {
            if !was_paused {
                self.resume_devices();
                vcpus.resume();
            }
        };
        if let Err(e) = pause() {
            let _ = set_dirty_logging(&self.vm, &self.mem, false);
            return Err(fail(MigrationError::Vm(e)));
        }
        let state = self.save_vcpus(vcpus).and_then(|vcpu_states| {
            let sent = take_dirty(&self.vm, &self.mem, self.dirty_log)
                .and_then(|dirty| send_pages(stream, &self.mem, Some(&dirty), control))
                .map_err(|e| e.to_string())?;
            report.bytes += sent.bytes;
            self.state(vcpu_states)
        });
        let state = state.and_then(|state| {
            control.switch().map_err(|e| e.to_string())?;
            Ok(state)
        });
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                let _ = set_dirty_logging(&self.vm, &self.mem, false);
                resume();
                return Err(format!("migration failed, the VM runs on here: {e}"));
            }
        };
        if let Err(e) = write_message(stream, STATE, &[&state]) {
            // Whether the target got all of it is unknown: see the module documentation.
            return Err(format!(
                "migration stream broke while sending the device state ({e}); the VM stays \
                 paused here: the target may run it. Check the target, then stop or resume \
                 this VM"
            ));
        }
        match expect(stream, RESUMED).and_then(|p| answer(&p)) {
            Ok(()) => {
                report.downtime = paused_at.elapsed();
                report.total = started.elapsed();
                Ok(report)
            }
            Err(MigrationError::Peer(e)) => {
                // The target said it could not resume: it does not run the guest.
                let _ = set_dirty_logging(&self.vm, &self.mem, false);
                resume();
                Err(format!(
                    "migration failed, the VM runs on here: the target could not resume it: {e}"
                ))
            }
            Err(e) => Err(format!(
                "no answer from the target after the device state ({e}); the VM stays paused \
                 here: the target may run it. Check the target, then stop or resume this VM"
            )),
        }
    }

    /// The rounds while the guest runs: everything once, then what changed, until what is
    /// left fits the downtime.
    fn precopy(
        &self,
        stream: &mut File,
        options: MigrateOptions,
        control: &MigrationControl,
    ) -> Result<MigrationReport, MigrationError> {
        let mut report = MigrationReport::default();
        // What was written before logging began is in the first round anyway.
        take_dirty(&self.vm, &self.mem, self.dirty_log)?;
        let t = Instant::now();
        let first = send_pages(stream, &self.mem, None, control)?;
        report.bytes += first.bytes;
        // The speed that predicts the last round: dirty pages handled per second (read,
        // checked, sent as data or as a zero range) over the later rounds; after the first
        // round only its data rate is known (it also skipped every zero page, which is fast
        // and says little about dirty ones).
        let first_rate = first.bytes as f64 / t.elapsed().as_secs_f64().max(1e-3);
        let (mut handled, mut later) = (0u64, Duration::ZERO);
        loop {
            let rate = if handled > 0 {
                handled as f64 / later.as_secs_f64().max(1e-3)
            } else {
                first_rate
            }
            .max(PAGE as f64);
            let dirty = take_dirty(&self.vm, &self.mem, self.dirty_log)?;
            let left = dirty_bytes(&dirty);
            control.round(report.rounds, left, rate as u64);
            control.check()?;
            if left as f64 / rate <= options.downtime.as_secs_f64() {
                // Small enough: these go in the stop-and-copy round, with what comes meanwhile.
                for (region, bits) in self.mem.iter().zip(&dirty) {
                    // Put them back: the last round reads the bitmaps again.
                    let ours: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
                    for (w, word) in bits.iter().enumerate() {
                        for b in 0..64 {
                            if word & (1 << b) != 0 {
                                ours.set_bit(w * 64 + b);
                            }
                        }
                    }
                }
                return Ok(report);
            }
            if report.rounds >= options.max_rounds {
                return Err(MigrationError::NoConvergence {
                    rounds: report.rounds,
                    dirty: left,
                    rate: rate as u64,
                });
            }
            report.rounds += 1;
            let t = Instant::now();
            let n = send_pages(stream, &self.mem, Some(&dirty), control)?;
            later += t.elapsed();
            handled += n.handled;
            report.bytes += n.bytes;
        }
    }
}

/// The target's side, after HELLO's check: reads MEMORY into `mem` until STATE, and returns
/// the snapshot state that came last.
pub fn receive_memory(
    stream: &mut impl Read,
    mem: &GuestMemoryMmap,
) -> Result<Snapshot, MigrationError> {
    let mut received = 0u64;
    loop {
        let (kind, len) = read_header(stream)?;
        match kind {
            MEMORY => {
                if len < 8 {
                    return Err(MigrationError::Range { addr: 0, len });
                }
                let mut addr = [0u8; 8];
                stream.read_exact(&mut addr)?;
                let addr = u64::from_le_bytes(addr);
                let payload = read_payload(stream, len - 8)?;
                mem.write_slice(&payload, GuestAddress(addr))
                    .map_err(|_| MigrationError::Range { addr, len: len - 8 })?;
                received += len - 8;
            }
            ZERO => {
                let payload = read_payload(stream, len)?;
                let field = |i: usize| {
                    payload
                        .get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                };
                let (Some(addr), Some(zeros), 16) = (field(0), field(1), len) else {
                    return Err(MigrationError::Range { addr: 0, len });
                };
                let blank = [0u8; PAGE as usize];
                let mut done = 0;
                while done < zeros {
                    let n = (zeros - done).min(PAGE);
                    let at = addr
                        .checked_add(done)
                        .ok_or(MigrationError::Range { addr, len: zeros })?;
                    mem.write_slice(&blank[..n as usize], GuestAddress(at))
                        .map_err(|_| MigrationError::Range { addr, len: zeros })?;
                    done += n;
                }
            }
            STATE => {
                let payload = read_payload(stream, len)?;
                tracing::info!(received, "guest memory received");
                return Ok(Snapshot::parse_state(&payload, "(migration stream)")?);
            }
            other => {
                return Err(MigrationError::Unexpected {
                    expected: STATE,
                    found: other,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dirty_log_is_cleared_in_chunks_that_end_with_the_slot() {
        // 100 pages: one range, to the slot's end (not a multiple of 64).
        let small = [1u64, 1 << 35];
        let ranges: Vec<_> = clear_ranges(&small, 100)
            .map(|(f, n, w)| (f, n, w.len()))
            .collect();
        assert_eq!(ranges, [(0, 100, 2)]);
        // Two chunks and a bit: the empty first chunk is skipped, the last ends the slot.
        let pages = 2 * CLEAR_CHUNK_PAGES as u64 + 70;
        let mut bits = vec![0u64; (pages as usize).div_ceil(64)];
        bits[CLEAR_CHUNK_PAGES / 64] = 1;
        *bits.last_mut().unwrap() = 1 << 5;
        let ranges: Vec<_> = clear_ranges(&bits, pages)
            .map(|(f, n, w)| (f, n, w.len()))
            .collect();
        let chunk = CLEAR_CHUNK_PAGES as u64;
        assert_eq!(
            ranges,
            [(chunk, chunk, CLEAR_CHUNK_PAGES / 64), (2 * chunk, 70, 2)]
        );
        assert!(clear_ranges(&[0, 0], 128).next().is_none());
    }

    #[test]
    fn messages_round_trip_and_oversized_or_unexpected_ones_are_refused() {
        let mut wire = Vec::new();
        write_message(&mut wire, HELLO, &[b"{\"a\":", b"1}"]).expect("write");
        let payload = expect(&mut wire.as_slice(), HELLO).expect("read");
        assert_eq!(payload, b"{\"a\":1}");
        let e = expect(&mut wire.as_slice(), READY).expect_err("kind");
        assert!(matches!(e, MigrationError::Unexpected { .. }), "{e}");
        let mut huge = Vec::new();
        huge.extend_from_slice(&MEMORY.to_le_bytes());
        huge.extend_from_slice(&(MAX_MESSAGE + 1).to_le_bytes());
        let e = read_header(&mut huge.as_slice()).expect_err("too large");
        assert!(matches!(e, MigrationError::TooLarge(_)), "{e}");
        let e = expect(&mut &wire[..5], HELLO).expect_err("cut");
        assert!(matches!(e, MigrationError::Io(_)), "{e}");
    }

    #[test]
    fn memory_outside_ram_is_refused_and_pages_land_where_sent() {
        let mem = crate::vstate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut wire = Vec::new();
        write_message(&mut wire, MEMORY, &[&0x2000u64.to_le_bytes(), &[7u8; 4096]]).expect("w");
        write_message(
            &mut wire,
            MEMORY,
            &[&(1u64 << 20).to_le_bytes(), &[1u8; 4096]],
        )
        .expect("w");
        let e = receive_memory(&mut wire.as_slice(), &mem).expect_err("outside RAM");
        assert!(
            matches!(e, MigrationError::Range { addr, .. } if addr == 1 << 20),
            "{e}"
        );
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x2000)).expect("r");
        assert_eq!(page, [7u8; 4096]);
    }

    #[test]
    fn dirty_runs_follow_the_bits_across_words_and_stop_at_the_limits() {
        let mut bits = vec![0u64; 3];
        bits[0] = 0b1011 | 1 << 63;
        bits[1] = 0b1;
        bits[2] = u64::MAX;
        assert_eq!(
            dirty_runs(&bits, 150, 1000),
            [(0, 2), (3, 1), (63, 2), (128, 22)],
            "a run crosses a word boundary; pages past the region's end are not in it"
        );
        assert_eq!(
            dirty_runs(&bits, 192, 40),
            [(0, 2), (3, 1), (63, 2), (128, 40), (168, 24)]
        );
        assert!(dirty_runs(&[0, 0], 128, 8).is_empty());
        assert!(is_zero(&[0u8; 4096]));
        let mut page = [0u8; 4096];
        page[4095] = 1;
        assert!(!is_zero(&page));
    }

    #[test]
    fn the_first_round_skips_zero_pages_and_later_rounds_send_dirty_ones() {
        let mem = crate::vstate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        mem.write_slice(&[9u8; 10], GuestAddress(0x5000))
            .expect("w");
        let control = MigrationControl::default();
        let mut wire = Vec::new();
        assert_eq!(
            send_pages(&mut wire, &mem, None, &control)
                .expect("send")
                .bytes,
            4096
        );
        // Later: page 5 (data) and pages 1-2, which became zero: their range only.
        let mut dirty = vec![vec![0u64; 4]];
        dirty[0][0] = 0b10_0110;
        let mut later = Vec::new();
        let sent = send_pages(&mut later, &mem, Some(&dirty), &control).expect("send");
        assert_eq!(sent.bytes, 4096, "the zero pages go as a range");
        assert_eq!(sent.handled, 3 * 4096, "only the dirty pages were read");
        let target = crate::vstate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("t");
        target
            .write_slice(&[5u8; 8192], GuestAddress(0x1000))
            .expect("stale data on the target");
        wire.extend_from_slice(&later);
        write_message(&mut wire, STATE, &[b"{}"]).expect("w");
        let e = receive_memory(&mut wire.as_slice(), &target).expect_err("not a state");
        assert!(e.to_string().contains("not a thvc-vmm snapshot"), "{e}");
        let mut got = [0u8; 10];
        target
            .read_slice(&mut got, GuestAddress(0x5000))
            .expect("r");
        assert_eq!(got, [9u8; 10]);
    }
}
