//! ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The platform is "hardware-reduced ACPI" like Firecracker's and Cloud Hypervisor's: no PM
//! timer, no legacy PIC, no SCI. Power-off and reset go through the FADT's sleep control and
//! reset registers, both served by the ACPI PM device (see `devices::acpi_pm`); CPUs are found in
//! the MADT; devices (virtio-mmio) are announced in the DSDT because distro kernels cannot take
//! them from the command line.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_START, GED_GSI, GED_MMIO_BASE, IOAPIC_ADDR, LAPIC_ADDR, RESET_VECTOR};
use crate::devices::acpi_pm::{ACPI_PM_PORT, RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::ged::GED_EVENT_POWER_BUTTON;
use crate::devices::serial::{COM1_IRQ, COM1_PORT, UART_PORT_COUNT};

pub const OEM_ID: [u8; 6] = *b"THVC  ";
const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit below the reset vector")]
    TooLarge(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// A device announced in the DSDT: a virtio-mmio window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// Everything the tables describe.
#[derive(Debug, Clone, Default)]
pub struct AcpiPlatform {
    pub vcpus: u8,
    pub virtio_mmio: Vec<MmioDeviceInfo>,
}

/// Already-serialised AML, so that objects built in a loop can be children of a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Serialises any AML object into bytes.
fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    aml.to_aml_bytes(&mut out);
    out
}

/// ACPI notification value for "power button pressed" on a PNP0C0C device.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The power button (`\_SB.PWRB`, PNP0C0C) and the Generic Event Device (`\_SB.GED_`,
/// ACPI0013) that notifies it; see `devices::ged` for how an event travels.
///
/// ```text
/// Device (GED_) {
///     Name (_HID, "ACPI0013")  Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () { Interrupt (Consumer, Edge, ActiveHigh, Exclusive) { GED_GSI } })
///     OperationRegion (GDST, SystemMemory, GED_MMIO_BASE, 1)
///     Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {      // Arg0: the GSI
///         Local0 = GDAT                    // read-to-clear event bits
///         Local1 = Local0 & 1
///         If (Local1 == 1) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// Device (PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, 0) }
/// ```
fn power_button_devices() -> Vec<RawAml> {
    let hid: aml::AmlStr = "ACPI0013";
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let region_len: u8 = 1;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &GED_MMIO_BASE,
        &region_len,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let mask = aml::And::new(&aml::Local(1), &aml::Local(0), &GED_EVENT_POWER_BUTTON);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb_path, &NOTIFY_BUTTON_PRESSED);
    let pressed = aml::Equal::new(&aml::Local(1), &GED_EVENT_POWER_BUTTON);
    let if_pressed = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &mask, &if_pressed]);
    let ged_hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_crs = aml::Name::new("_CRS".into(), &crs);
    let ged = aml::Device::new(
        "GED_".into(),
        vec![&ged_hid, &uid, &ged_crs, &region, &field, &evt],
    );
    let button_id = aml::EISAName::new("PNP0C0C");
    let pwrb_hid = aml::Name::new("_HID".into(), &button_id);
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid, &uid]);
    vec![RawAml(bytes_of(&ged)), RawAml(bytes_of(&pwrb))]
}

/// The DSDT: the S5 sleep state (power off), the power button with its Generic Event Device,
/// and one `LNRO0005` device per virtio-mmio window.
pub fn dsdt(platform: &AcpiPlatform) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: SLP_TYP for soft-off, written by the guest to the sleep control register.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut devices = power_button_devices();
    // COM1. Hardware-reduced ACPI has no legacy PIC, so Linux maps no ISA interrupts by
    // default: the UART's interrupt must come from its _CRS, or the guest's tty output (which
    // waits for "transmitter empty" interrupts) stalls while printk still polls through.
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, UART_PORT_COUNT as u8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid_name, &com1_crs_name],
    );
    devices.push(RawAml(bytes_of(&com1)));
    for (i, dev) in platform.virtio_mmio.iter().enumerate() {
        let name = format!("V{i:03X}");
        let hid: aml::AmlStr = "LNRO0005";
        let uid = i as u32;
        let mmio = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mmio, &irq]);
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let cca_name = aml::Name::new("_CCA".into(), &aml::ONE);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let device = aml::Device::new(
            name.as_str().into(),
            vec![&hid_name, &uid_name, &cca_name, &crs_name],
        );
        devices.push(RawAml(bytes_of(&device)));
    }
    let device_refs: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("_SB_".into(), device_refs).to_aml_bytes(&mut body);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"THVCDSDT", OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The FADT: hardware-reduced, sleep control/status and reset registers on the ACPI PM port.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |width: u8| {
        GAS::new(
            AddressSpace::SystemIo,
            width,
            0,
            AccessSize::ByteAccess,
            u64::from(ACPI_PM_PORT),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, *b"THVCFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .dsdt_64(dsdt_addr);
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5); bit 1 (8042) clear so the guest does
    // not probe a keyboard controller we do not have.
    builder.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    builder.reset_reg = port(8);
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = port(8);
    builder.sleep_status_reg = port(8);
    bytes_of(&builder.finalize())
}

/// The MADT: one local APIC per vCPU (APIC ID = vCPU index) and the IOAPIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"THVCMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes_of(&madt)
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds all tables and writes them at `ACPI_START`. Returns the RSDP's guest address.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    platform: &AcpiPlatform,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align8(next + len as u64);
        at
    };

    let dsdt = dsdt(platform);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(platform.vcpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, *b"THVCXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    if next > RESET_VECTOR {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([t[off], t[off + 1], t[off + 2], t[off + 3]])
    }

    fn u64_at(t: &[u8], off: usize) -> u64 {
        u64::from(u32_at(t, off)) | (u64::from(u32_at(t, off + 4)) << 32)
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let t = madt(4);
        assert_eq!(&t[0..4], b"APIC");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        assert_eq!(u32_at(&t, 36), LAPIC_ADDR);
        // 44-byte header, then 4 local APICs of 8 bytes, then the 12-byte IOAPIC.
        assert_eq!(t.len(), 44 + 4 * 8 + 12);
        for cpu in 0..4u8 {
            let e = &t[44 + usize::from(cpu) * 8..];
            assert_eq!(
                (e[0], e[1], e[2], e[3]),
                (0, 8, cpu, cpu),
                "type, len, uid, apic id"
            );
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let io = &t[44 + 32..];
        assert_eq!((io[0], io[1]), (1, 12));
        assert_eq!(u32_at(io, 4), IOAPIC_ADDR);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = fadt(0x1234_5678);
        assert_eq!(&t[0..4], b"FACP");
        assert_eq!(t.len(), 276, "ACPI 6.5 FADT size");
        assert!(checksum_ok(&t));
        let flags = u32_at(&t, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: system I/O space at the PM port; RESET_VALUE follows.
        assert_eq!(t[116], 1);
        assert_eq!(u64_at(&t, 120), u64::from(ACPI_PM_PORT));
        assert_eq!(t[128], RESET_VALUE);
        assert_eq!(u64_at(&t, 140), 0x1234_5678, "X_DSDT");
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!((t[244], u64_at(&t, 248)), (1, u64::from(ACPI_PM_PORT)));
        assert_eq!((t[256], u64_at(&t, 260)), (1, u64::from(ACPI_PM_PORT)));
        let boot_arch = u16::from_le_bytes([t[109], t[110]]);
        assert_eq!(boot_arch & 0b10, 0, "no 8042");
    }

    #[test]
    fn dsdt_has_s5_and_virtio_devices() {
        let platform = AcpiPlatform {
            vcpus: 1,
            virtio_mmio: vec![
                MmioDeviceInfo {
                    base: 0xd000_0000,
                    size: 0x1000,
                    gsi: 5,
                },
                MmioDeviceInfo {
                    base: 0xd000_1000,
                    size: 0x1000,
                    gsi: 6,
                },
            ],
        };
        let t = dsdt(&platform);
        assert_eq!(&t[0..4], b"DSDT");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        let contains = |needle: &[u8]| t.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"_S5_"));
        assert!(
            contains(b"COM1"),
            "the UART is announced with its interrupt"
        );
        assert!(contains(b"LNRO0005"));
        assert!(contains(b"V000") && contains(b"V001"));
        assert!(contains(&0xd000_1000u32.to_le_bytes()));
    }

    #[test]
    fn dsdt_has_the_power_button_and_its_event_device() {
        let t = dsdt(&AcpiPlatform {
            vcpus: 1,
            virtio_mmio: vec![],
        });
        assert!(checksum_ok(&t));
        let contains = |needle: &[u8]| t.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"ACPI0013\0"), "GED _HID");
        assert!(contains(b"GED_") && contains(b"PWRB") && contains(b"_EVT"));
        // PNP0C0C as an EISA ID: 0x0C0CD041 little-endian after a DWord prefix.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]), "PNP0C0C");
        // OperationRegion (GDST, SystemMemory, GED_MMIO_BASE, 1)
        let mut region = vec![0x5b, 0x80];
        region.extend_from_slice(b"GDST");
        region.push(0x00); // SystemMemory
        region.push(0x0c); // DWordPrefix
        region.extend_from_slice(&u32::try_from(GED_MMIO_BASE).expect("32-bit").to_le_bytes());
        region.push(0x01); // One
        assert!(contains(&region), "GDST region at the GED's MMIO address");
        // Notify (\_SB.PWRB, 0x80)
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_PWRB");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(contains(&notify), "notify PWRB with 0x80");
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, GED_GSI.
        let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        irq.extend_from_slice(&GED_GSI.to_le_bytes());
        assert!(contains(&irq), "GED interrupt");
    }

    #[test]
    fn tables_are_written_and_linked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let platform = AcpiPlatform {
            vcpus: 2,
            virtio_mmio: vec![],
        };
        let rsdp = write_acpi_tables(&mem, &platform).expect("fits");
        assert_eq!(rsdp, GuestAddress(ACPI_START));
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).expect("read");
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[0..20]) && checksum_ok(&r));
        let xsdt_addr = u64_at(&r, 24);
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(xsdt_addr))
            .expect("read");
        assert_eq!(&hdr[0..4], b"XSDT");
        let len = u32_at(&hdr, 4) as usize;
        assert_eq!(len, 36 + 16, "two entries");
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr))
            .expect("read");
        assert!(checksum_ok(&xsdt));
        let mut sigs = Vec::new();
        for i in 0..2 {
            let addr = u64_at(&xsdt, 36 + i * 8);
            let mut sig = [0u8; 4];
            mem.read_slice(&mut sig, GuestAddress(addr)).expect("read");
            sigs.push(sig);
        }
        assert_eq!(sigs, [*b"FACP", *b"APIC"]);
    }

    #[test]
    fn thirty_two_cpus_fit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let platform = AcpiPlatform {
            vcpus: 32,
            virtio_mmio: (0..16)
                .map(|i| MmioDeviceInfo {
                    base: 0xd000_0000 + i * 0x1000,
                    size: 0x1000,
                    gsi: 5 + i as u32,
                })
                .collect(),
        };
        write_acpi_tables(&mem, &platform).expect("fits below 1 MiB");
    }
}
