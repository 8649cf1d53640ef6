//! Booting UEFI firmware through the PVH entry point.
//!
//! edk2's CloudHv platform, the firmware thvc-vmm boots (see vmm/firmware), is a PVH ELF: the
//! VMM loads its segments like a kernel's and enters it in 32-bit protected mode with EBX
//! pointing at a `hvm_start_info`. That structure carries everything the firmware would
//! otherwise have to ask an emulated device for (QEMU's fw_cfg, CMOS): the memory map and the
//! ACPI tables' RSDP. No flash device is emulated: the firmware runs from RAM.
//!
//! A data-only firmware image (edk2 before 2022.05, or OVMF built for QEMU) has no PVH note and
//! is refused with a clear error instead of being jumped into.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress};

use super::boot::e820_map;
use super::layout::{HIMEM_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START};

#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    #[error("cannot open firmware {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is not a PVH firmware: not an ELF file (data-only images such as QEMU's OVMF.fd \
         cannot be booted; build one with vmm/firmware/build)"
    )]
    NotElf(PathBuf),
    #[error("{0} is an ELF file without a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY): not a firmware thvc-vmm can enter")]
    NoPvhEntry(PathBuf),
    #[error("cannot load firmware {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "the memory map has {0} entries; the start info has room for {PVH_MEMMAP_MAX_ENTRIES}"
    )]
    MemmapTooLarge(usize),
    #[error("cannot write the PVH start info to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// `hvm_start_info.magic` ("xEn3" with the high bit of every byte flipped).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Version 1 of the start info has the memory map.
const START_INFO_VERSION: u32 = 1;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

/// Opens the firmware file (done early, before privileges are dropped).
pub fn open_firmware(path: &Path) -> Result<File, PvhError> {
    File::open(path).map_err(|source| PvhError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the firmware's segments into guest memory; returns its 32-bit PVH entry point.
pub fn load_firmware(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
) -> Result<GuestAddress, PvhError> {
    let io_err = |source| PvhError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    if !is_elf {
        return Err(PvhError::NotElf(path.to_path_buf()));
    }
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
        PvhError::Load {
            path: path.to_path_buf(),
            source,
        }
    })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry),
        _ => Err(PvhError::NoPvhEntry(path.to_path_buf())),
    }
}

/// The start info and memory map as guest memory holds them.
pub fn start_info(
    mem_size: u64,
    rsdp: GuestAddress,
    reserved: &[(u64, u64)],
) -> Result<(hvm_start_info, Vec<hvm_memmap_table_entry>), PvhError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size, reserved)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.r#type,
            reserved: 0,
        })
        .collect();
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::MemmapTooLarge(memmap.len()));
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    Ok((info, memmap))
}

/// Writes the start info (at `PVH_INFO_START`, where EBX will point) and its memory map.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    rsdp: GuestAddress,
    reserved: &[(u64, u64)],
) -> Result<GuestAddress, PvhError> {
    let (info, memmap) = start_info(mem_size, rsdp, reserved)?;
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    let mut at = GuestAddress(PVH_MEMMAP_START);
    for entry in memmap {
        mem.write_obj(entry, at)?;
        at = at.unchecked_add(std::mem::size_of::<hvm_memmap_table_entry>() as u64);
    }
    Ok(GuestAddress(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory")
    }

    fn temp_file(bytes: &[u8]) -> (TempFile, File) {
        let f = TempFile::new().expect("temp file");
        f.as_file().write_all(bytes).expect("write");
        let file = File::open(f.as_path()).expect("open");
        (f, file)
    }

    /// A minimal ELF64 with one PT_LOAD segment at `load` and, if `pvh_entry` is given, a
    /// PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY.
    fn elf(load: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let phoff = 64u64;
        let data_off = phoff + 56 * u64::from(phnum);
        let code = [0xf4u8; 16]; // hlt
        let note_off = data_off + code.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(&ELF_MAGIC);
        f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&load.to_le_bytes()); // e_entry
        f.extend_from_slice(&phoff.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // no sections
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&[0; 6]);
        let phdr = |f: &mut Vec<u8>, kind: u32, off: u64, addr: u64, len: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, len, len, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(&mut f, 1, data_off, load, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(&mut f, 4, note_off, 0, 20);
        }
        f.extend_from_slice(&code);
        if let Some(entry) = pvh_entry {
            f.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
            f.extend_from_slice(&4u32.to_le_bytes()); // descsz
            f.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            f.extend_from_slice(b"Xen\0");
            f.extend_from_slice(&entry.to_le_bytes());
        }
        f
    }

    #[test]
    fn loads_a_pvh_elf_and_returns_its_entry() {
        let (path, mut file) = temp_file(&elf(0x50_0000, Some(0x50_0008)));
        let mem = mem();
        let entry = load_firmware(&mem, &mut file, path.as_path()).expect("loads");
        assert_eq!(entry, GuestAddress(0x50_0008));
        let byte: u8 = mem.read_obj(GuestAddress(0x50_0000)).expect("read");
        assert_eq!(byte, 0xf4, "the segment is in guest memory");
    }

    #[test]
    fn refuses_what_is_not_a_pvh_firmware() {
        let mem = mem();
        let (path, mut file) = temp_file(&elf(0x50_0000, None));
        let err = load_firmware(&mem, &mut file, path.as_path()).expect_err("no PVH note");
        assert!(matches!(err, PvhError::NoPvhEntry(_)), "{err}");
        // A flash image as QEMU's OVMF ships it: no ELF header at all.
        let (path, mut file) = temp_file(&[0xffu8; 4096]);
        let err = load_firmware(&mem, &mut file, path.as_path()).expect_err("not ELF");
        assert!(err.to_string().contains("not an ELF file"), "{err}");
        let (path, mut file) = temp_file(b"\x7fEL");
        assert!(matches!(
            load_firmware(&mem, &mut file, path.as_path()),
            Err(PvhError::NotElf(_))
        ));
        // Segments outside guest memory are an error, not a write elsewhere.
        let (path, mut file) = temp_file(&elf(0x1_0000_0000, Some(0xffff_0000)));
        let err = load_firmware(&mem, &mut file, path.as_path()).expect_err("outside RAM");
        assert!(matches!(err, PvhError::Load { .. }), "{err}");
    }

    #[test]
    fn start_info_describes_memory_and_acpi() {
        let mem = mem();
        let ecam = (0xe000_0000, 0x10_0000);
        let at = write_start_info(&mem, 64 << 20, GuestAddress(0xe0000), &[ecam]).expect("fits");
        assert_eq!(at, GuestAddress(PVH_INFO_START));
        let info: hvm_start_info = mem.read_obj(at).expect("read");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        let entries: Vec<(u64, u64, u32)> = (0..3u64)
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(PVH_MEMMAP_START + i * 24))
                    .expect("read");
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, 0x9fc00, 1),
                (0x10_0000, (64 << 20) - 0x10_0000, 1),
                (0xe000_0000, 0x10_0000, 2)
            ]
        );
    }
}
