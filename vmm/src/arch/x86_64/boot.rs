//! Loading the guest: kernel (bzImage or ELF vmlinux), initrd, command line, and the zero page
//! (struct boot_params with the E820 map) of the Linux 64-bit boot protocol.
//!
//! Besides RAM the E820 map can carry reserved ranges, such as the PCI ECAM window: Linux uses
//! the ECAM area the MCFG table announces only if E820 also reserves it (else it logs
//! "MMCONFIG ... not reserved" and falls back to port I/O configuration access).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither a bzImage nor an ELF vmlinux")]
    UnknownKernelFormat(PathBuf),
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} does not fit in guest memory ({end:#x} > {limit:#x})")]
    KernelTooLarge { path: PathBuf, end: u64, limit: u64 },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(linux_loader::loader::Error),
    #[error("cannot write boot parameters to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// bzImage: the 64-bit entry point is 0x200 bytes into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// The highest address an initrd may end at if the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// The kernel as loaded into guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Where vCPU 0 starts executing, in 64-bit mode.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header; None for ELF kernels.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Opens the kernel image (done early, before privileges are dropped).
pub fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens the initrd (done early, before privileges are dropped).
pub fn open_initrd(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a bzImage or ELF vmlinux, told apart by their magic numbers. `path` names `file` in
/// errors.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let mut hdrs = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let is_bzimage = file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut hdrs).is_ok()
        && u32::from_le_bytes(hdrs) == KERNEL_HDR_MAGIC;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let load_err = |source| BootError::LoadKernel {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = if is_elf {
        let r = Elf::load(mem, None, file, himem).map_err(load_err)?;
        let entry = r.kernel_load;
        (r, entry)
    } else if is_bzimage {
        let r = BzImage::load(mem, None, file, himem).map_err(load_err)?;
        let entry = r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
        (r, entry)
    } else {
        return Err(BootError::UnknownKernelFormat(path.to_path_buf()));
    };
    let end = result.kernel_end;
    let limit = low_ram_end(mem.last_addr().raw_value() + 1);
    if end > limit {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            end,
            limit,
        });
    }
    Ok(LoadedKernel {
        entry,
        end,
        setup_header: result.setup_header,
    })
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of low RAM, below the kernel's
/// `initrd_addr_max`, above the kernel.
pub fn initrd_placement(
    low_ram_end: u64,
    kernel_end: u64,
    initrd_addr_max: u64,
    size: u64,
) -> Option<u64> {
    let top = low_ram_end.min(initrd_addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

pub fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<LoadedInitrd, BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let low_end = low_ram_end(mem.last_addr().raw_value() + 1);
    let addr = initrd_placement(low_end, kernel.end, addr_max, size).ok_or_else(|| {
        BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
        }
    })?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(BootError::GuestMemory)?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let cmdline =
        Cmdline::try_from(cmdline, crate::config::MAX_CMDLINE_LEN).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::LoadCmdline)?;
    Ok(cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0))
}

/// The E820 map, sorted by address: low RAM below the EBDA, RAM from 1 MiB to the MMIO hole,
/// RAM above 4 GiB, and each `(start, size)` of `reserved` (empty ranges left out) as a
/// reserved entry. Reserved ranges are meant for the MMIO hole, outside RAM.
pub fn e820_map(mem_size: u64, reserved: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![entry(0, EBDA_START, E820_RAM)];
    let low_end = low_ram_end(mem_size);
    map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map.extend(
        reserved
            .iter()
            .filter(|(_, size)| *size > 0)
            .map(|&(addr, size)| entry(addr, size, E820_RESERVED)),
    );
    map.sort_by_key(|e| e.addr);
    map
}

/// The zero page handed to the kernel in RSI; `reserved` as for [`e820_map`].
pub fn boot_params(
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline_len: usize,
    mem_size: u64,
    rsdp: GuestAddress,
    reserved: &[(u64, u64)],
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    let map = e820_map(mem_size, reserved);
    let mut entries = 0u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
        entries += 1;
    }
    params.e820_entries = entries;
    params
}

/// Real-mode code at the reset vector (F000:FFF0), where a guest lands when it reboots through
/// the "BIOS" (Linux's `reboot=b`, which it also picks by itself on some paths): like firmware
/// would, it resets the machine, here by writing the ACPI reset value to the reset register.
///   mov al, RESET_VALUE; mov dx, ACPI_PM_PORT; out dx, al; hlt; jmp hlt
pub fn reset_vector_stub() -> [u8; 10] {
    let port = crate::devices::acpi_pm::ACPI_PM_PORT.to_le_bytes();
    [
        0xb0,
        crate::devices::acpi_pm::RESET_VALUE,
        0xba,
        port[0],
        port[1],
        0xee,
        0xf4,
        0xeb,
        0xfd,
        0x90,
    ]
}

pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&reset_vector_stub(), GuestAddress(RESET_VECTOR))?;
    Ok(())
}

pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(512 << 20, &[]);
        let spans: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            spans,
            vec![(0, 0x9fc00, 1), (0x100000, (512 << 20) - 0x100000, 1)]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_hole() {
        let size = 3500u64 << 20;
        let map = e820_map(size, &[]);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[1].addr, map[1].addr + map[1].size),
            (HIMEM_START, MMIO_GAP_START)
        );
        assert_eq!(
            (map[2].addr, map[2].size),
            (MMIO_GAP_END, size - MMIO_GAP_START)
        );
        let usable: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(
            usable,
            size - (HIMEM_START - EBDA_START),
            "only the legacy area is lost"
        );
    }

    #[test]
    fn e820_reserves_the_ecam_window_in_address_order() {
        let ecam = (PCI_ECAM_START, PCI_ECAM_SIZE);
        let spans = |size| {
            e820_map(size, &[ecam])
                .iter()
                .map(|e| (e.addr, e.size, e.r#type))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            spans(512 << 20),
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, (512 << 20) - HIMEM_START, 1),
                (0xe000_0000, 0x10_0000, 2),
            ]
        );
        let size = 5u64 << 30;
        assert_eq!(
            spans(size),
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, 1),
                (0xe000_0000, 0x10_0000, 2),
                (MMIO_GAP_END, size - MMIO_GAP_START, 1),
            ],
            "sorted: the reserved range sits in the hole, before high RAM"
        );
        let map = e820_map(size, &[ecam]);
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "no overlap");
        }
    }

    #[test]
    fn e820_leaves_out_empty_reserved_ranges() {
        assert_eq!(e820_map(512 << 20, &[(0xe000_0000, 0)]).len(), 2);
    }

    #[test]
    fn zero_page_carries_the_reserved_entry() {
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100200),
            end: 0x200_0000,
            setup_header: None,
        };
        let p = boot_params(
            &kernel,
            None,
            0,
            256 << 20,
            GuestAddress(0xe0000),
            &[(PCI_ECAM_START, PCI_ECAM_SIZE)],
        );
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (PCI_ECAM_START, PCI_ECAM_SIZE, 2)
        );
    }

    #[test]
    fn zero_page_keeps_at_most_its_table_of_e820_entries() {
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100200),
            end: 0x200_0000,
            setup_header: None,
        };
        let many: Vec<(u64, u64)> = (0..200)
            .map(|i| (0xe000_0000 + i * 0x1000, 0x1000))
            .collect();
        let p = boot_params(&kernel, None, 0, 256 << 20, GuestAddress(0xe0000), &many);
        assert_eq!(usize::from(p.e820_entries), p.e820_table.len());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        assert_eq!(
            initrd_placement(256 << 20, 16 << 20, 0x7fff_ffff, 0x1234),
            Some(((256 << 20) - 0x1234) & !0xfff)
        );
        // Respects initrd_addr_max.
        assert_eq!(
            initrd_placement(3 << 30, 16 << 20, 0x37ff_ffff, 0x2000),
            Some(0x3800_0000 - 0x2000)
        );
        // Never overlaps the kernel, never underflows.
        assert_eq!(
            initrd_placement(64 << 20, 60 << 20, u64::MAX, 8 << 20),
            None
        );
        assert_eq!(initrd_placement(64 << 20, 0, u64::MAX, 1 << 40), None);
    }

    #[test]
    fn zero_page_fields() {
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100200),
            end: 0x200_0000,
            setup_header: None,
        };
        let initrd = LoadedInitrd {
            addr: GuestAddress(0x0f00_0000),
            size: 0x1000,
        };
        let p = boot_params(
            &kernel,
            Some(initrd),
            42,
            256 << 20,
            GuestAddress(0xe0000),
            &[],
        );
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 2);
        let bytes = vm_memory::ByteValued::as_slice(&p);
        assert_eq!(bytes.len(), 4096, "the zero page is one page");
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(bytes[0x1e8], 2, "e820_entries at its documented offset");
    }

    fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("thvc-boot-")
            .tempdir()
            .expect("tmp")
    }

    fn temp_file(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path
    }

    fn load_kernel_at(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
        load_kernel(mem, &mut open_kernel(path)?, path)
    }

    #[test]
    fn garbage_kernels_give_clear_errors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let dir = temp_dir();
        let junk = temp_file(&dir, "junk", &[0x42; 8192]);
        let err = load_kernel_at(&mem, &junk).expect_err("junk");
        assert!(
            err.to_string().contains("neither a bzImage nor an ELF"),
            "{err}"
        );
        let empty = temp_file(&dir, "empty", &[]);
        assert!(load_kernel_at(&mem, &empty).is_err());
        let mut bad_elf = b"\x7fELF".to_vec();
        bad_elf.resize(100, 0);
        let bad_elf = temp_file(&dir, "bad-elf", &bad_elf);
        let err = load_kernel_at(&mem, &bad_elf).expect_err("truncated ELF");
        assert!(err.to_string().starts_with("cannot load kernel"), "{err}");
        let mut bad_bz = vec![0u8; 0x300];
        bad_bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bad_bz = temp_file(&dir, "bad-bz", &bad_bz);
        assert!(load_kernel_at(&mem, &bad_bz).is_err());
        let missing = load_kernel_at(&mem, Path::new("/nonexistent/vmlinuz")).expect_err("missing");
        assert!(
            missing.to_string().contains("cannot open kernel"),
            "{missing}"
        );
    }

    #[test]
    fn reset_vector_resets_through_the_acpi_port() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_reset_vector(&mem).expect("below 1 MiB");
        let mut code = [0u8; 10];
        mem.read_slice(&mut code, GuestAddress(0xffff0))
            .expect("read");
        assert_eq!(&code[..7], &[0xb0, 1, 0xba, 0x00, 0x06, 0xee, 0xf4]);
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let len = write_cmdline(&mem, "console=ttyS0 x=1").expect("fits");
        assert_eq!(len, 17);
        let mut buf = [0u8; 18];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&buf, b"console=ttyS0 x=1\0");
    }
}
