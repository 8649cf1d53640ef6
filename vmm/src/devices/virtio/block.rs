//! virtio-blk backed by a raw image file.
//!
//! Requests are parsed from the descriptor chain into a [`Request`] (pure, unit-tested and
//! fuzzed against hostile chains), then executed with vectored positional I/O straight into
//! guest memory. Flush is `fdatasync`, so data the guest flushed survives a host crash; discard
//! punches holes and write-zeroes zeroes ranges where the host file system supports it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::throttle::{Admit, Throttle};
use super::{
    serve_first_queue, Activation, CounterKind, DeviceCounters, DeviceInfo, QueueHandler,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments one request may have: the queue size minus header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most data one request may carry. Linux sends at most max_sectors_kb (a few MiB) and
/// UEFI's driver at most 1 GiB per request; the bound keeps the used length (a u32, data plus
/// status byte) from overflowing whatever a hostile driver puts in its descriptors.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;
pub const ID_BYTES: usize = 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Discard and write-zeroes take one range per request (max_*_seg = 1).
const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Upper bound on one discard/write-zeroes range, in sectors (the config space field is u32).
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
    #[error("disk serial '{0}' is longer than {ID_BYTES} bytes")]
    SerialTooLong(String),
}

/// Why a descriptor chain is not a well-formed request. The request then fails with IOERR
/// (if there is a status byte to write it to), and the device carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("chain has no descriptors")]
    Empty,
    #[error("request header is missing, too short or device-writable")]
    BadHeader,
    #[error("status descriptor is missing or not device-writable")]
    BadStatus,
    #[error("cannot read the request header from guest memory")]
    HeaderMemory,
    #[error("data descriptor {0} has the wrong direction for this request")]
    WrongDirection(usize),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{bytes} bytes lie beyond the disk's end")]
    OutOfRange { sector: u64, bytes: u64 },
    #[error("too many data descriptors ({0})")]
    TooManySegments(usize),
    #[error("{0} bytes of data, more than {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("malformed discard/write-zeroes range")]
    BadRange,
}

/// A parsed request: its kind, where it reads or writes in the disk and guest memory, and
/// where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Guest buffers, in order (device-writable for reads and get-id, readable for writes).
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// The disk as the request parser needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    pub size_bytes: u64,
    pub read_only: bool,
    pub discard: bool,
}

impl DiskGeometry {
    fn check_range(&self, offset: u64, bytes: u64, sector: u64) -> Result<(), RequestError> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(RequestError::OutOfRange { sector, bytes }),
        }
    }
}

/// Parses a request from its descriptors: a 16-byte device-readable header, data buffers, and a
/// device-writable status byte at the very end.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    disk: &DiskGeometry,
) -> Result<Request, RequestError> {
    let (first, rest) = descriptors.split_first().ok_or(RequestError::Empty)?;
    let (last, data) = rest.split_last().ok_or(RequestError::BadStatus)?;
    if first.is_write_only() || first.len() < 16 {
        return Err(RequestError::BadHeader);
    }
    if !last.is_write_only() || last.len() < 1 {
        return Err(RequestError::BadStatus);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(RequestError::BadStatus)?;
    let mut header = [0u8; 16];
    mem.read_slice(&mut header, first.addr())
        .map_err(|_| RequestError::HeaderMemory)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    if data.len() > SEG_MAX as usize {
        return Err(RequestError::TooManySegments(data.len()));
    }
    let segments: Vec<(GuestAddress, u32)> = data.iter().map(|d| (d.addr(), d.len())).collect();
    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if total > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(total));
    }
    let expect_direction =
        |writable: bool| match data.iter().position(|d| d.is_write_only() != writable) {
            Some(i) => Err(RequestError::WrongDirection(i)),
            None => Ok(()),
        };
    let offset = sector.checked_mul(SECTOR_SIZE);
    let kind = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = request_type == VIRTIO_BLK_T_OUT;
            if write && disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            expect_direction(!write)?;
            if !total.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Unaligned(total));
            }
            let offset = offset.ok_or(RequestError::OutOfRange {
                sector,
                bytes: total,
            })?;
            disk.check_range(offset, total, sector)?;
            if write {
                RequestKind::Write { offset }
            } else {
                RequestKind::Read { offset }
            }
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            expect_direction(true)?;
            RequestKind::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !disk.discard {
                return Err(RequestError::Unsupported(request_type));
            }
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            expect_direction(false)?;
            // Exactly one range: {sector u64, num_sectors u32, flags u32}.
            if segments.len() != 1 || segments[0].1 != DISCARD_SEGMENT_SIZE {
                return Err(RequestError::BadRange);
            }
            let mut range = [0u8; 16];
            mem.read_slice(&mut range, segments[0].0)
                .map_err(|_| RequestError::BadRange)?;
            let start = u64::from_le_bytes([
                range[0], range[1], range[2], range[3], range[4], range[5], range[6], range[7],
            ]);
            let sectors = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
            let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = start
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::BadRange)?;
            if sectors == 0 || sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::BadRange);
            }
            disk.check_range(offset, len, start)?;
            if request_type == VIRTIO_BLK_T_DISCARD {
                if flags != 0 {
                    return Err(RequestError::BadRange);
                }
                RequestKind::Discard { offset, len }
            } else {
                if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                    return Err(RequestError::BadRange);
                }
                RequestKind::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    Ok(Request {
        kind,
        data: segments,
        status,
    })
}

/// Guest buffers as iovecs for vectored I/O.
fn iovecs(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) -> io::Result<Vec<libc::iovec>> {
    data.iter()
        .map(|(addr, len)| {
            let slice = mem
                .get_slice(*addr, *len as usize)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            Ok(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: *len as usize,
            })
        })
        .collect()
}

/// Drops the first `n` bytes from a list of iovecs (after a partial transfer).
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    while let Some(first) = iovs.first_mut() {
        if n < first.iov_len {
            // SAFETY: stays within the buffer the iovec describes.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n).cast() };
            first.iov_len -= n;
            return;
        }
        n -= first.iov_len;
        iovs.remove(0);
    }
}

/// preadv/pwritev until every byte moved; a read past the end of the file is an error.
fn transfer_all(
    file: &File,
    mut iovs: Vec<libc::iovec>,
    mut offset: u64,
    write: bool,
) -> io::Result<u64> {
    let mut done = 0u64;
    iovs.retain(|v| v.iov_len > 0);
    while !iovs.is_empty() {
        let count = iovs.len().min(1024) as libc::c_int;
        // SAFETY: the iovecs point into guest memory that stays mapped for the VM's lifetime
        // and were bounds-checked by get_slice; the kernel reads or writes only within them.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    iovs.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    iovs.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "disk image shrank",
            ));
        }
        done += n as u64;
        offset += n as u64;
        advance(&mut iovs, n as usize);
    }
    Ok(done)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an owned fd with checked, in-range values.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the file system can punch holes: try it past the end of the file, where it
/// changes nothing.
fn supports_punch_hole(file: &File, size: u64) -> bool {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        size,
        4096,
    )
    .is_ok()
}

/// The worker half of one request queue of a disk; a disk with several queues has one per
/// queue, each on its own thread, sharing the image file (positional I/O needs no lock).
pub struct BlockDevice {
    file: Arc<File>,
    disk: DiskGeometry,
    serial: [u8; ID_BYTES],
    counters: Arc<DeviceCounters>,
    active: Option<Activation>,
    /// The disk's rate limit (see `throttle`), shared by its queues.
    throttle: Option<Throttle>,
}

/// A virtio-blk disk with `queues` request queues (at least one): its transport description
/// and the worker half of each queue.
pub fn open(
    path: &Path,
    read_only: bool,
    serial: Option<&str>,
    queues: u16,
) -> Result<(DeviceInfo, Vec<BlockDevice>), BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let size = file
        .metadata()
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let size_bytes = size - size % SECTOR_SIZE;
    if size_bytes == 0 {
        return Err(BlockError::TooSmall(path.to_path_buf()));
    }
    let mut id = [0u8; ID_BYTES];
    if let Some(serial) = serial {
        if serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        id[..serial.len()].copy_from_slice(serial.as_bytes());
    }
    let discard = !read_only && supports_punch_hole(&file, size);
    let disk = DiskGeometry {
        size_bytes,
        read_only,
        discard,
    };
    let queues = queues.max(1);
    let info = DeviceInfo {
        device_type: TYPE_BLOCK,
        queue_max_sizes: vec![QUEUE_SIZE; usize::from(queues)],
        features: features(&disk, queues),
        config_space: config_space(&disk, queues),
    };
    let file = Arc::new(file);
    let counters = Arc::new(DeviceCounters::with_queues(
        CounterKind::Disk,
        usize::from(queues),
    ));
    let workers = (0..queues)
        .map(|_| BlockDevice {
            file: file.clone(),
            disk,
            serial: id,
            counters: counters.clone(),
            active: None,
            throttle: None,
        })
        .collect();
    Ok((info, workers))
}

fn features(disk: &DiskGeometry, queues: u16) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_FLUSH;
    if disk.read_only {
        f |= VIRTIO_BLK_F_RO;
    }
    if queues > 1 {
        f |= VIRTIO_BLK_F_MQ;
    }
    if disk.discard {
        f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// struct virtio_blk_config up to write_zeroes_may_unmap.
fn config_space(disk: &DiskGeometry, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&(disk.size_bytes / SECTOR_SIZE).to_le_bytes());
    c[34..36].copy_from_slice(&queues.to_le_bytes()); // num_queues
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    if disk.discard {
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

impl BlockDevice {
    /// Limits this queue's requests by `throttle` (bytes: the request's data buffers).
    pub fn set_throttle(&mut self, throttle: Throttle) {
        self.throttle = Some(throttle);
    }

    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    /// Executes a parsed request; returns its status and the bytes written to guest buffers.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        // The host's disk failing (or the guest provoking it over and over): logged, but
        // rate-limited per device.
        let io_status = |r: io::Result<u64>| match r {
            Ok(_) => VIRTIO_BLK_S_OK,
            Err(e) => {
                crate::guest_log!(
                    tracing::Level::WARN,
                    self.counters.guest_log,
                    "virtio-blk: disk I/O failed: {e}"
                );
                VIRTIO_BLK_S_IOERR
            }
        };
        let c = &self.counters;
        match req.kind {
            RequestKind::Read { offset } | RequestKind::Write { offset } => {
                let write = matches!(req.kind, RequestKind::Write { .. });
                // Buffers outside guest memory are the guest's error: an I/O error for this
                // request, and at most a rate-limited debug line.
                let iovs = match iovecs(mem, &req.data) {
                    Ok(iovs) => iovs,
                    Err(e) => {
                        crate::guest_log!(
                            tracing::Level::DEBUG,
                            c.guest_log,
                            "bad virtio-blk request: {e}"
                        );
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                };
                let r = transfer_all(&self.file, iovs, offset, write);
                if !write {
                    // Written behind vm-memory's back: for live migration's dirty set.
                    for (addr, len) in &req.data {
                        crate::vstate::memory::mark_written(mem, *addr, *len as usize);
                    }
                }
                if let Ok(n) = r {
                    DeviceCounters::add(
                        if write {
                            &c.bytes_written
                        } else {
                            &c.bytes_read
                        },
                        n,
                    );
                }
                match io_status(r) {
                    VIRTIO_BLK_S_OK if !write => (VIRTIO_BLK_S_OK, data_len(&req.data)),
                    VIRTIO_BLK_S_OK => (VIRTIO_BLK_S_OK, 0),
                    s => (s, 0),
                }
            }
            RequestKind::Flush => (io_status(self.file.sync_data().map(|_| 0)), 0),
            RequestKind::GetId => {
                let mut written = 0u32;
                let mut id = &self.serial[..];
                for (addr, len) in &req.data {
                    let n = (*len as usize).min(id.len());
                    if mem.write_slice(&id[..n], *addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    written += n as u32;
                    id = &id[n..];
                }
                (VIRTIO_BLK_S_OK, written)
            }
            RequestKind::Discard { offset, len } => (
                io_status(
                    fallocate(
                        &self.file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                    .map(|_| 0),
                ),
                0,
            ),
            RequestKind::WriteZeroes { offset, len, unmap } => {
                let r = if unmap {
                    fallocate(
                        &self.file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                } else {
                    fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, offset, len).or_else(|_| {
                        // Not every file system zeroes ranges; a hole reads as zeroes too.
                        fallocate(
                            &self.file,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            offset,
                            len,
                        )
                    })
                };
                (io_status(r.map(|_| 0)), 0)
            }
        }
    }

    /// Parses and executes one request, writes its status byte; returns the used length.
    fn handle_chain(&self, mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> u32 {
        DeviceCounters::add(&self.counters.requests, 1);
        let (status, len, status_addr) = match parse_request(mem, descriptors, &self.disk) {
            Ok(req) => {
                let (status, len) = self.execute(mem, &req);
                (status, len, Some(req.status))
            }
            Err(e) => {
                crate::guest_log!(
                    tracing::Level::DEBUG,
                    self.counters.guest_log,
                    "bad virtio-blk request: {e}"
                );
                let status = match e {
                    RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                // Answer on the status byte when the chain has one.
                let addr = descriptors
                    .last()
                    .filter(|d| d.is_write_only() && d.len() > 0)
                    .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1));
                (status, 0, addr)
            }
        };
        if status != VIRTIO_BLK_S_OK {
            DeviceCounters::add(&self.counters.errors, 1);
        }
        match status_addr {
            Some(addr) if mem.write_obj(status, addr).is_ok() => len.saturating_add(1),
            _ => len,
        }
    }
}

/// The used length of a read: all its data buffers. Parsing bounds them by
/// [`MAX_REQUEST_BYTES`]; past u32 (which cannot happen then) it saturates rather than wraps.
fn data_len(data: &[(GuestAddress, u32)]) -> u32 {
    let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
    u32::try_from(total).unwrap_or(u32::MAX)
}

impl QueueHandler for BlockDevice {
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize) {
        if self.throttle.as_ref().is_some_and(Throttle::is_blocked) {
            return;
        }
        let mut active = self.active.take();
        let mut throttle = self.throttle.take();
        serve_first_queue(&mut active, &self.counters, |mem, d| {
            if let Some(t) = &mut throttle {
                // The data between header and status: what a read or write moves.
                let bytes: u64 = d
                    .iter()
                    .skip(1)
                    .take(d.len().saturating_sub(2))
                    .map(|d| u64::from(d.len()))
                    .sum();
                if t.admit(bytes) == Admit::Wait {
                    return None;
                }
            }
            Some(self.handle_chain(mem, d))
        });
        self.throttle = throttle;
        self.active = active;
    }

    fn timer_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.throttle.iter().map(Throttle::timer_fd).collect()
    }

    fn timer_fired(&mut self, _index: Option<usize>) {
        if let Some(t) = &mut self.throttle {
            t.unblock();
        }
        self.queue_notified(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;

    const DISK: DiskGeometry = DiskGeometry {
        size_bytes: 1 << 20,
        read_only: false,
        discard: true,
    };

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    #[test]
    fn parses_well_formed_requests() {
        let mem = memory();
        header(&mem, DATA, VIRTIO_BLK_T_IN, 2);
        let req = parse_request(
            &mem,
            &[
                desc(DATA, 16, false),
                desc(DATA + 512, 1024, true),
                desc(DATA + 4096, 1, true),
            ],
            &DISK,
        )
        .expect("valid read");
        assert_eq!(req.kind, RequestKind::Read { offset: 1024 });
        assert_eq!(req.data, vec![(GuestAddress(DATA + 512), 1024)]);
        assert_eq!(req.status, GuestAddress(DATA + 4096));

        header(&mem, DATA, VIRTIO_BLK_T_FLUSH, 0);
        let flush = parse_request(
            &mem,
            &[desc(DATA, 16, false), desc(DATA + 4096, 1, true)],
            &DISK,
        );
        assert_eq!(flush.expect("flush").kind, RequestKind::Flush);

        // A status descriptor longer than one byte: the status is its last byte.
        header(&mem, DATA, VIRTIO_BLK_T_GET_ID, 0);
        let id = parse_request(
            &mem,
            &[desc(DATA, 16, false), desc(DATA + 100, 21, true)],
            &DISK,
        )
        .expect("get-id");
        assert_eq!(id.status, GuestAddress(DATA + 120));
    }

    #[test]
    fn rejects_hostile_chains() {
        let mem = memory();
        let status = desc(DATA + 4096, 1, true);
        let hdr = desc(DATA, 16, false);
        let case = |kind: u32, sector: u64, chain: &[Descriptor], disk: &DiskGeometry| {
            header(&mem, DATA, kind, sector);
            parse_request(&mem, chain, disk).expect_err("must be rejected")
        };
        use RequestError::*;
        assert_eq!(case(0, 0, &[], &DISK), Empty);
        assert_eq!(case(0, 0, &[hdr], &DISK), BadStatus);
        assert_eq!(
            case(0, 0, &[hdr, desc(DATA + 4096, 1, false)], &DISK),
            BadStatus
        );
        assert_eq!(
            case(0, 0, &[hdr, desc(DATA + 4096, 0, true)], &DISK),
            BadStatus
        );
        assert_eq!(
            case(0, 0, &[desc(DATA, 15, false), status], &DISK),
            BadHeader
        );
        assert_eq!(
            case(0, 0, &[desc(DATA, 16, true), status], &DISK),
            BadHeader
        );
        assert_eq!(
            case(0, 0, &[desc(MEM_SIZE as u64 - 8, 16, false), status], &DISK),
            HeaderMemory,
            "header straddling the end of guest memory"
        );
        let read_into_readonly_buffer = [hdr, desc(DATA + 512, 512, false), status];
        assert_eq!(
            case(VIRTIO_BLK_T_IN, 0, &read_into_readonly_buffer, &DISK),
            WrongDirection(0)
        );
        let write_from_writable = [hdr, desc(DATA + 512, 512, true), status];
        assert_eq!(
            case(VIRTIO_BLK_T_OUT, 0, &write_from_writable, &DISK),
            WrongDirection(0)
        );
        assert_eq!(
            case(
                VIRTIO_BLK_T_IN,
                0,
                &[hdr, desc(DATA + 512, 100, true), status],
                &DISK
            ),
            Unaligned(100)
        );
        let past_end = [hdr, desc(DATA + 512, 1024, true), status];
        assert!(matches!(
            case(VIRTIO_BLK_T_IN, 2047, &past_end, &DISK),
            OutOfRange { .. }
        ));
        assert!(matches!(
            case(VIRTIO_BLK_T_IN, u64::MAX, &past_end, &DISK),
            OutOfRange { .. }
        ));
        assert!(matches!(
            case(VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, &past_end, &DISK),
            OutOfRange { .. }
        ));
        let mut long = vec![hdr];
        long.extend(std::iter::repeat_n(desc(DATA + 512, 512, true), 300));
        long.push(status);
        assert_eq!(case(VIRTIO_BLK_T_IN, 0, &long, &DISK), TooManySegments(300));
        let ro = DiskGeometry {
            read_only: true,
            ..DISK
        };
        let write = [hdr, desc(DATA + 512, 512, false), status];
        assert_eq!(case(VIRTIO_BLK_T_OUT, 0, &write, &ro), ReadOnly);
        assert_eq!(case(99, 0, &[hdr, status], &DISK), Unsupported(99));
        // Discard: exactly one 16-byte range inside the disk.
        let range = |sector: u64, n: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&r, GuestAddress(DATA + 512))
                .expect("range");
        };
        let discard = [hdr, desc(DATA + 512, 16, false), status];
        range(0, 0, 0);
        assert_eq!(case(VIRTIO_BLK_T_DISCARD, 0, &discard, &DISK), BadRange);
        range(2040, 16, 0);
        assert!(matches!(
            case(VIRTIO_BLK_T_DISCARD, 0, &discard, &DISK),
            OutOfRange { .. }
        ));
        range(0, 8, 1);
        assert_eq!(
            case(VIRTIO_BLK_T_DISCARD, 0, &discard, &DISK),
            BadRange,
            "discard has no flags"
        );
        range(0, 8, 0);
        assert_eq!(case(VIRTIO_BLK_T_DISCARD, 0, &discard, &ro), ReadOnly);
        let nodiscard = DiskGeometry {
            discard: false,
            ..DISK
        };
        assert_eq!(
            case(VIRTIO_BLK_T_DISCARD, 0, &discard, &nodiscard),
            Unsupported(VIRTIO_BLK_T_DISCARD)
        );
    }

    /// A sparse disk image of `size` bytes in a directory of its own; returns the directory
    /// guard (the image goes with it) and the image's path.
    fn temp_disk(name: &str, size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("thvc-blk-{name}-"))
            .tempdir()
            .expect("tmp");
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).expect("create");
        f.set_len(size).expect("size");
        (dir, path)
    }

    /// Drives the device through a real ring in guest memory, as the guest driver does.
    struct Harness {
        ring: TestRing,
        dev: BlockDevice,
        irq: vmm_sys_util::eventfd::EventFd,
        next_desc: u16,
        used_seen: u16,
    }

    impl Harness {
        fn new(path: &Path, read_only: bool) -> Self {
            let mem = memory();
            let ring = TestRing::new(&mem, 256);
            let (_, mut devs) = open(path, read_only, Some("disk-7"), 1).expect("open");
            let mut dev = devs.pop().expect("one queue");
            let (activation, irq) = ring.activation(vec![ring.queue()], VIRTIO_F_VERSION_1);
            dev.activate(activation);
            Harness {
                ring,
                dev,
                irq,
                next_desc: 0,
                used_seen: 0,
            }
        }

        /// Submits one request; returns (status byte, used length).
        fn submit(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mem = self.ring.mem.clone();
            header(&mem, DATA, kind, sector);
            mem.write_obj(0xffu8, GuestAddress(DATA + 0x8000))
                .expect("status");
            let mut chain = vec![(DATA, 16, false)];
            chain.extend_from_slice(data);
            chain.push((DATA + 0x8000, 1, true));
            let first = self.next_desc;
            self.next_desc = (self.next_desc + chain.len() as u16) % 200;
            self.ring.add_chain(first, &chain);
            self.dev.queue_notified(0);
            assert_eq!(
                self.ring.used_idx(),
                self.used_seen + 1,
                "request completed"
            );
            let (id, len) = self.ring.used(self.used_seen);
            assert_eq!(id, u32::from(first));
            self.used_seen += 1;
            assert!(self.irq.read().is_ok(), "interrupt raised");
            (
                mem.read_obj(GuestAddress(DATA + 0x8000)).expect("status"),
                len,
            )
        }
    }

    #[test]
    fn a_throttled_read_waits_on_the_queue_until_its_tokens_are_back() {
        use crate::devices::virtio::throttle::{Clock, SharedLimit};
        use crate::rate_limiter::LimitConfig;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::Duration;

        let (_dir, path) = temp_disk("throttled", 1 << 20);
        let mut h = Harness::new(&path, false);
        let now = Arc::new(AtomicU64::new(0));
        let clock_now = now.clone();
        let clock: Clock =
            Arc::new(move || Duration::from_millis(clock_now.load(Ordering::SeqCst)));
        // 4 KiB/s with a 4 KiB burst: the first 4 KiB read goes, the second waits a second.
        let limit = SharedLimit::with_clock(
            LimitConfig {
                bandwidth: Some(4096),
                bandwidth_burst: Some(4096),
                ..Default::default()
            },
            clock,
        );
        h.dev
            .set_throttle(Throttle::new(limit.clone()).expect("timerfd"));
        let read = [(DATA + 0x1000, 4096, true)];
        assert_eq!(h.submit(VIRTIO_BLK_T_IN, 0, &read), (VIRTIO_BLK_S_OK, 4097));
        let mem = h.ring.mem.clone();
        header(&mem, DATA, VIRTIO_BLK_T_IN, 8);
        h.ring.add_chain(
            h.next_desc,
            &[(DATA, 16, false), read[0], (DATA + 0x8000, 1, true)],
        );
        h.dev.queue_notified(0);
        assert_eq!(h.ring.used_idx(), 1, "the second read waits on the queue");
        now.store(500, Ordering::SeqCst);
        h.dev.queue_notified(0);
        assert_eq!(
            h.ring.used_idx(),
            1,
            "a kick while throttled changes nothing"
        );
        now.store(1000, Ordering::SeqCst);
        h.dev.timer_fired(Some(0));
        assert_eq!(h.ring.used_idx(), 2, "the timer let it through");
        assert_eq!(h.ring.used(1).1, 4097);
        assert!(h.irq.read().is_ok());
        // Limit removed at run time: nothing waits any more.
        limit.update(LimitConfig::default());
        h.used_seen = 2;
        h.next_desc += 3;
        for sector in 0..4 {
            assert_eq!(
                h.submit(VIRTIO_BLK_T_IN, sector * 8, &read),
                (VIRTIO_BLK_S_OK, 4097)
            );
        }
    }

    #[test]
    fn write_read_flush_get_id_discard_on_a_real_file() {
        let (_dir, path) = temp_disk("rw", 1 << 20);
        let mut h = Harness::new(&path, false);
        let mem = h.ring.mem.clone();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA + 0x1000))
            .expect("data");
        // Write 1 KiB from two buffers at sector 4.
        let (status, len) = h.submit(
            VIRTIO_BLK_T_OUT,
            4,
            &[(DATA + 0x1000, 512, false), (DATA + 0x1200, 512, false)],
        );
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
        let on_disk = std::fs::read(&path).expect("read back");
        assert_eq!(&on_disk[2048..3072], &pattern[..]);
        // Read it back into other buffers.
        let (status, len) = h.submit(VIRTIO_BLK_T_IN, 4, &[(DATA + 0x4000, 1024, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x4000))
            .expect("read");
        assert_eq!(back, pattern);
        assert_eq!(h.submit(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
        let (status, len) = h.submit(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x5000, 20, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA + 0x5000))
            .expect("id");
        assert_eq!(&id[..7], b"disk-7\0");
        if h.dev.disk.discard {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&4u64.to_le_bytes());
            r[8..12].copy_from_slice(&2u32.to_le_bytes());
            mem.write_slice(&r, GuestAddress(DATA + 0x6000))
                .expect("range");
            let (status, _) = h.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x6000, 16, false)]);
            assert_eq!(status, VIRTIO_BLK_S_OK);
            let on_disk = std::fs::read(&path).expect("read back");
            assert!(on_disk[2048..3072].iter().all(|b| *b == 0), "zeroed");
        }
        // Bad requests fail with a status and the device carries on.
        assert_eq!(
            h.submit(VIRTIO_BLK_T_IN, 2048, &[(DATA + 0x4000, 512, true)])
                .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(h.submit(77, 0, &[]).0, VIRTIO_BLK_S_UNSUPP);
        assert_eq!(h.submit(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
        assert_eq!(
            h.dev
                .counters
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn requests_over_the_size_cap_fail_and_used_lengths_never_wrap() {
        let mem = memory();
        header(&mem, DATA, VIRTIO_BLK_T_IN, 0);
        let huge = DiskGeometry {
            size_bytes: u64::MAX / 2,
            ..DISK
        };
        // Three 512 MiB buffers: 1.5 GiB in one request (parsing never touches the data).
        let chain = [
            desc(DATA, 16, false),
            desc(DATA + 0x1000, 1 << 29, true),
            desc(DATA + 0x1000, 1 << 29, true),
            desc(DATA + 0x1000, 1 << 29, true),
            desc(DATA + 0x800, 1, true),
        ];
        assert_eq!(
            parse_request(&mem, &chain, &huge),
            Err(RequestError::TooLarge(3 << 29))
        );
        // Exactly the cap is still a request.
        let at_cap = [chain[0], chain[1], chain[2], chain[4]];
        assert!(parse_request(&mem, &at_cap, &huge).is_ok());
        // What the device would report for buffers summing past u32: saturated, not wrapped.
        let big = [(GuestAddress(DATA), u32::MAX); 3];
        assert_eq!(data_len(&big), u32::MAX);
        assert_eq!(data_len(&[(GuestAddress(DATA), 512); 2]), 1024);
    }

    #[test]
    fn buffers_outside_guest_memory_fail_the_request_only() {
        let (_dir, path) = temp_disk("outside", 1 << 20);
        let mut h = Harness::new(&path, false);
        let outside = MEM_SIZE as u64 + 0x10_0000;
        for _ in 0..1000 {
            let (status, len) = h.submit(VIRTIO_BLK_T_IN, 0, &[(outside, 512, true)]);
            assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
            let (status, len) = h.submit(VIRTIO_BLK_T_OUT, 0, &[(outside, 512, false)]);
            assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
        }
        let c = h.dev.counters();
        assert_eq!(c.errors.load(std::sync::atomic::Ordering::Relaxed), 2000);
        // The device still works.
        let (status, len) = h.submit(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 513));
    }

    #[test]
    fn read_only_disk_refuses_writes_with_ioerr_and_keeps_data() {
        let (_dir, path) = temp_disk("ro", 64 * 1024);
        std::fs::write(&path, vec![0xabu8; 64 * 1024]).expect("fill");
        let (info, _) = open(&path, true, None, 1).expect("open");
        assert_ne!(info.features & VIRTIO_BLK_F_RO, 0);
        assert_eq!(info.features & VIRTIO_BLK_F_DISCARD, 0);
        let mut h = Harness::new(&path, true);
        let (status, _) = h.submit(VIRTIO_BLK_T_OUT, 0, &[(DATA + 0x1000, 512, false)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert!(std::fs::read(&path)
            .expect("read")
            .iter()
            .all(|b| *b == 0xab));
        assert_eq!(
            h.submit(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512, true)])
                .0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn several_queues_share_the_disk_and_announce_mq() {
        let (_dir, path) = temp_disk("mq", 64 * 1024);
        let (one, _) = open(&path, false, None, 1).expect("open");
        assert_eq!(one.features & VIRTIO_BLK_F_MQ, 0, "one queue: no MQ");
        let (info, workers) = open(&path, false, None, 4).expect("open");
        assert_eq!(workers.len(), 4, "a worker half per queue");
        assert_eq!(info.queue_max_sizes, vec![QUEUE_SIZE; 4]);
        assert_ne!(info.features & VIRTIO_BLK_F_MQ, 0);
        assert_eq!(
            u16::from_le_bytes([info.config_space[34], info.config_space[35]]),
            4
        );
        assert!(Arc::ptr_eq(&workers[0].counters(), &workers[3].counters()));
        assert_eq!(workers[0].counters().queue_used.len(), 4);
    }

    #[test]
    fn config_space_and_open_errors() {
        let (_dir, path) = temp_disk("cfg", 10 * 512 + 100);
        let (info, _) = open(&path, false, None, 1).expect("open");
        assert_eq!(
            u64::from_le_bytes(info.config_space[0..8].try_into().expect("8")),
            10,
            "capacity in sectors"
        );
        assert_eq!(
            u32::from_le_bytes(info.config_space[12..16].try_into().expect("4")),
            SEG_MAX
        );
        assert!(matches!(
            open(Path::new("/nonexistent/disk"), false, None, 1),
            Err(BlockError::Open { .. })
        ));
        let (_tiny_dir, tiny) = temp_disk("tiny", 100);
        assert!(matches!(
            open(&tiny, false, None, 1),
            Err(BlockError::TooSmall(_))
        ));
        assert!(matches!(
            open(&path, false, Some("x".repeat(21).as_str()), 1),
            Err(BlockError::SerialTooLong(_))
        ));
    }

    /// Found by the fuzzer: an available index more than a queue's worth ahead made the
    /// worker spin forever. Now the queue is declared broken and the device needs a reset.
    #[test]
    fn avail_index_far_ahead_breaks_the_queue_instead_of_spinning() {
        let (_dir, path) = temp_disk("ahead", 1 << 20);
        let mut h = Harness::new(&path, false);
        h.ring
            .mem
            .write_obj(300u16, GuestAddress(AVAIL_RING + 2))
            .expect("avail idx");
        h.dev.queue_notified(0);
        assert!(h.dev.active.is_none(), "device stopped using the queue");
        assert_eq!(h.ring.used_idx(), 0);
        assert!(h.irq.read().is_ok(), "driver told (config interrupt)");
    }

    /// Property: whatever a driver writes into the descriptor table and available ring, the
    /// device neither panics nor hangs, and every request it completes is reported in the used
    /// ring with a valid head index.
    #[test]
    fn random_rings_never_break_the_device() {
        let (_dir, path) = temp_disk("fuzz", 1 << 20);
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut completed = 0u32;
        for round in 0..300 {
            let mut h = Harness::new(&path, round % 3 == 0);
            for i in 0..16u16 {
                let addr = match rng.below(4) {
                    0 => rng.next_u64(),                  // anywhere, mostly unmapped
                    1 => MEM_SIZE as u64 - rng.below(64), // straddling the end
                    _ => DATA + rng.below(0x10000),       // plausible
                };
                let len = match rng.below(3) {
                    0 => rng.next_u64() as u32,
                    1 => rng.below(17) as u32,
                    _ => 512 * rng.below(4) as u32,
                };
                let flags = rng.below(8) as u16; // NEXT, WRITE, INDIRECT in any mix
                let next = rng.below(20) as u16; // loops and out-of-range links included
                h.ring.set_desc(i, addr, len, flags, next);
            }
            header(&h.ring.mem, DATA, rng.below(16) as u32, rng.below(4096));
            for _ in 0..rng.below(6) {
                h.ring.publish(rng.below(300) as u16); // heads beyond the queue too
            }
            h.dev.queue_notified(0);
            let used = h.ring.used_idx();
            for n in 0..used {
                assert!(h.ring.used(n).0 < 256, "used id within the queue");
            }
            completed += u32::from(used);
        }
        assert!(
            completed > 100,
            "the random rings reached the request code ({completed})"
        );
    }
}
