//! ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG when there is PCI}.
//!
//! The platform is "hardware-reduced ACPI" like Firecracker's and Cloud Hypervisor's: no PM
//! timer, no legacy PIC, no SCI. Power-off and reset go through the FADT's sleep control and
//! reset registers, both served by the ACPI PM device (see `devices::acpi_pm`); CPUs are found in
//! the MADT; devices (virtio-mmio) are announced in the DSDT because distro kernels cannot take
//! them from the command line.
//!
//! With PCI, there is no firmware to have set up a host bridge, so the tables describe one (see
//! [`PciHostBridge`]): the MCFG gives the ECAM area of its buses, and `\_SB_.PCI0` in the DSDT is
//! the PCI Express root bridge whose `_CRS` says which buses and memory windows are behind it.
//! Linux scans the bus from that device and keeps or assigns BARs only inside those windows.
//! A `PNP0C02` motherboard-resources device also claims the ECAM range, which Linux checks when
//! E820 does not reserve it, and which keeps anything else from being placed there.

use crate::vstate::memory::GuestMemoryMmap;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_START, GED_GSI, GED_MMIO_BASE, IOAPIC_ADDR, LAPIC_ADDR, SMBIOS_START};
use crate::devices::acpi_pm::{ACPI_PM_PORT, RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::ged::GED_EVENT_POWER_BUTTON;
use crate::devices::pci::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT};
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

/// A PCI Express host bridge (PCI segment 0, buses 0 to `bus_end`) as the guest is told about
/// it: its ECAM area and the memory windows its devices' BARs live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostBridge {
    /// ECAM base address, that of bus 0; 1 MiB per bus.
    pub ecam_base: u64,
    /// The last bus number behind the bridge.
    pub bus_end: u8,
    /// The memory window below 4 GiB: (start, size).
    pub mmio32: (u64, u64),
    /// The memory window above 4 GiB, if there is room for one: (start, size).
    pub mmio64: Option<(u64, u64)>,
}

impl PciHostBridge {
    /// The ECAM range (start, size), to be reserved in the E820 map.
    pub fn ecam_range(&self) -> (u64, u64) {
        (self.ecam_base, (u64::from(self.bus_end) + 1) << 20)
    }
}

/// Everything the tables describe.
#[derive(Debug, Clone, Default)]
pub struct AcpiPlatform {
    pub vcpus: u8,
    pub virtio_mmio: Vec<MmioDeviceInfo>,
    /// The PCI host bridge; None: no PCI (no MCFG, no `PCI0`).
    pub pci: Option<PciHostBridge>,
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

/// The UUID of the PCI host bridge's `_OSC` (PCI Firmware Specification 3.3, 4.5.1).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33db4d5b-1ff7-401c-9657-7441c03dd766";
/// `_OSC` status bit (in the first capabilities DWORD): "unrecognised UUID".
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;

/// A memory range as an address space descriptor: DWordMemory when it lies below 4 GiB,
/// QWordMemory otherwise; non-cacheable (Linux then takes it for any BAR, prefetchable or
/// not), read-write, fixed. Nothing for an empty range.
fn memory_range(start: u64, size: u64) -> Option<RawAml> {
    let end = start.checked_add(size.checked_sub(1)?)?;
    let bytes = match (u32::try_from(start), u32::try_from(end)) {
        (Ok(start), Ok(end)) => bytes_of(&aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            end,
            None,
        )),
        _ => bytes_of(&aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            end,
            None,
        )),
    };
    Some(RawAml(bytes))
}

/// The PCI Express root bridge, `\_SB_.PCI0`, and the motherboard resource that reserves its
/// ECAM area, `\_SB_.MRES`. No `_PRT`: devices interrupt through MSI-X only.
///
/// ```text
/// Device (PCI0) {
///     Name (_HID, EisaId ("PNP0A08"))  Name (_CID, EisaId ("PNP0A03"))
///     Name (_ADR, 0)  Name (_SEG, 0)  Name (_UID, 0)  Name (_BBN, 0)
///     Name (_CRS, ResourceTemplate () {
///         WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, .. 0 to bus_end)
///         IO (Decode16, 0xCF8, 0xCF8, 1, 8)        // the configuration ports
///         DWordMemory (ResourceProducer, .., NonCacheable, ReadWrite, .. mmio32)
///         QWordMemory (ResourceProducer, .., NonCacheable, ReadWrite, .. mmio64)  // if any
///     })
///     Method (_OSC, 4, Serialized) {   // the OS may control every PCIe feature it asks for
///         If (Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766")) { Return (Arg3) }
///         Else { CreateDWordField (Arg3, 0, CDW1)  CDW1 |= 4  Return (Arg3) }
///     }
/// }
/// Device (MRES) {
///     Name (_HID, EisaId ("PNP0C02"))  Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, ecam_base, ecam_size) })
/// }
/// ```
///
/// Without `_OSC` Linux logs that the platform retains control of PCIe features; handing it
/// everything is harmless here, as bus 0 has no root ports (no hotplug, AER, PME or DPC).
fn pci_devices(pci: &PciHostBridge) -> Vec<RawAml> {
    let bus = aml::AddressSpace::new_bus_number(0u16, u16::from(pci.bus_end));
    let config_ports = aml::IO::new(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT,
        1,
        PCI_CONFIG_PORT_COUNT as u8,
    );
    let mut windows: Vec<RawAml> = Vec::new();
    windows.extend(memory_range(pci.mmio32.0, pci.mmio32.1));
    if let Some((start, size)) = pci.mmio64 {
        windows.extend(memory_range(start, size));
    }
    let mut resources: Vec<&dyn Aml> = vec![&bus, &config_ports];
    resources.extend(windows.iter().map(|w| w as &dyn Aml));
    let crs = aml::ResourceTemplate::new(resources);

    let uuid = aml::Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &uuid);
    let grant = aml::Return::new(&aml::Arg(3));
    let cdw1 = aml::Path::new("CDW1");
    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &aml::Arg(3), &aml::ZERO);
    let unrecognized = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let if_pci = aml::If::new(&is_pci, vec![&grant]);
    let otherwise = aml::Else::new(vec![&create_cdw1, &unrecognized, &grant]);
    let osc = aml::Method::new("_OSC".into(), 4, true, vec![&if_pci, &otherwise]);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &osc],
    );

    let (ecam_start, ecam_size) = pci.ecam_range();
    let ecam = match (u32::try_from(ecam_start), u32::try_from(ecam_size)) {
        (Ok(start), Ok(size)) if start.checked_add(size - 1).is_some() => Some(RawAml(bytes_of(
            &aml::Memory32Fixed::new(true, start, size),
        ))),
        // Beyond 4 GiB: Linux accepts any memory address space descriptor as well.
        _ => memory_range(ecam_start, ecam_size),
    };
    let mres_crs = aml::ResourceTemplate::new(ecam.iter().map(|e| e as &dyn Aml).collect());
    let mres_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let mres_crs = aml::Name::new("_CRS".into(), &mres_crs);
    let mres = aml::Device::new("MRES".into(), vec![&mres_hid, &uid, &mres_crs]);
    vec![RawAml(bytes_of(&pci0)), RawAml(bytes_of(&mres))]
}

/// The MCFG: the ECAM area of the host bridge's segment 0, buses 0 to `bus_end`.
pub fn mcfg(pci: &PciHostBridge) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"THVCMCFG", OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, 0, 0, pci.bus_end);
    bytes_of(&mcfg)
}

/// The DSDT: the S5 sleep state (power off), the power button with its Generic Event Device,
/// one `LNRO0005` device per virtio-mmio window, and the PCI host bridge if there is one.
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
    if let Some(pci) = &platform.pci {
        devices.extend(pci_devices(pci));
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
    let mcfg = platform.pci.as_ref().map(|pci| {
        let table = mcfg(pci);
        (place(table.len()), table)
    });
    let mut xsdt = XSDT::new(OEM_ID, *b"THVCXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some((addr, _)) = &mcfg {
        xsdt.add_entry(*addr);
    }
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    if next > SMBIOS_START {
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
    if let Some((addr, table)) = &mcfg {
        mem.write_slice(table, GuestAddress(*addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{
        PCI_BUS_END, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    };

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
            pci: None,
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
            pci: None,
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

    /// Writes the tables and returns the signatures of those the XSDT links, in order, and
    /// their addresses.
    fn linked_tables(
        mem: &GuestMemoryMmap,
        platform: &AcpiPlatform,
    ) -> Vec<([u8; 4], GuestAddress)> {
        let rsdp = write_acpi_tables(mem, platform).expect("fits");
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
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr))
            .expect("read");
        assert!(checksum_ok(&xsdt));
        (0..(len - 36) / 8)
            .map(|i| {
                let addr = GuestAddress(u64_at(&xsdt, 36 + i * 8));
                let mut sig = [0u8; 4];
                mem.read_slice(&mut sig, addr).expect("read");
                (sig, addr)
            })
            .collect()
    }

    #[test]
    fn tables_are_written_and_linked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let platform = AcpiPlatform {
            vcpus: 2,
            virtio_mmio: vec![],
            pci: None,
        };
        let sigs: Vec<_> = linked_tables(&mem, &platform)
            .into_iter()
            .map(|(sig, _)| sig)
            .collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC"], "no MCFG without PCI");
    }

    fn pci_bridge() -> PciHostBridge {
        PciHostBridge {
            ecam_base: PCI_ECAM_START,
            bus_end: PCI_BUS_END,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64: Some((4 << 30, 64 << 30)),
        }
    }

    fn pci_platform(pci: PciHostBridge) -> AcpiPlatform {
        AcpiPlatform {
            vcpus: 2,
            virtio_mmio: vec![],
            pci: Some(pci),
        }
    }

    #[test]
    fn pci_adds_a_linked_mcfg() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let tables = linked_tables(&mem, &pci_platform(pci_bridge()));
        let sigs: Vec<_> = tables.iter().map(|(sig, _)| *sig).collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"MCFG"]);
        let mut t = vec![0u8; 60];
        mem.read_slice(&mut t, tables[2].1).expect("read");
        assert_eq!(t, mcfg(&pci_bridge()), "the MCFG as built");
    }

    #[test]
    fn mcfg_gives_the_ecam_of_segment_0() {
        let t = mcfg(&pci_bridge());
        assert_eq!(&t[0..4], b"MCFG");
        // 36-byte header, 8 reserved bytes, one 16-byte allocation.
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(t.len(), 36 + 8 + 16);
        assert!(checksum_ok(&t));
        assert_eq!(u64_at(&t, 44), PCI_ECAM_START, "base address");
        assert_eq!(u16::from_le_bytes([t[52], t[53]]), 0, "segment");
        assert_eq!((t[54], t[55]), (0, PCI_BUS_END), "start and end bus");
        let more_buses = mcfg(&PciHostBridge {
            bus_end: 3,
            ..pci_bridge()
        });
        assert_eq!(more_buses[55], 3);
    }

    #[test]
    fn ecam_range_is_one_mib_per_bus() {
        assert_eq!(pci_bridge().ecam_range(), (PCI_ECAM_START, PCI_ECAM_SIZE));
        let four = PciHostBridge {
            bus_end: 3,
            ..pci_bridge()
        };
        assert_eq!(four.ecam_range(), (PCI_ECAM_START, 4 << 20));
    }

    /// The DSDT's bytes, and a search in them.
    struct AmlBytes(Vec<u8>);

    impl AmlBytes {
        fn contains(&self, needle: &[u8]) -> bool {
            self.0.windows(needle.len()).any(|w| w == needle)
        }
    }

    /// An address space descriptor as acpi_tables writes it: producer, fixed min and max.
    fn address_space(descriptor: u8, kind: u8, flags: u8, fields: &[u64], width: usize) -> Vec<u8> {
        let mut d = vec![descriptor];
        d.extend_from_slice(&((3 + 5 * width) as u16).to_le_bytes());
        d.extend_from_slice(&[kind, 0x0c, flags]);
        for f in fields {
            d.extend_from_slice(&f.to_le_bytes()[..width]);
        }
        d
    }

    #[test]
    fn dsdt_has_the_pci_root_bridge() {
        let t = dsdt(&pci_platform(pci_bridge()));
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        let t = AmlBytes(t);
        assert!(t.contains(b"PCI0") && t.contains(b"_OSC"));
        // Name (_HID, EisaId ("PNP0A08")), Name (_CID, EisaId ("PNP0A03"))
        assert!(t.contains(&[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(t.contains(&[0x08, b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        for name in [b"_ADR", b"_SEG", b"_UID", b"_BBN"] {
            let mut zero = vec![0x08];
            zero.extend_from_slice(name);
            zero.push(0x00);
            assert!(
                t.contains(&zero),
                "Name ({}, Zero)",
                String::from_utf8_lossy(name)
            );
        }
        // WordBusNumber 0..0, length 1.
        assert!(t.contains(&address_space(0x88, 2, 0, &[0, 0, 0, 0, 1], 2)));
        // IO (Decode16, 0xCF8, 0xCF8, 1, 8)
        assert!(t.contains(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]));
        // DWordMemory, non-cacheable, read-write: 0xc000_0000..=0xcfff_ffff.
        let end32 = PCI_MMIO32_START + PCI_MMIO32_SIZE - 1;
        let dword = [0, PCI_MMIO32_START, end32, 0, PCI_MMIO32_SIZE];
        assert!(t.contains(&address_space(0x87, 0, 1, &dword, 4)));
        // QWordMemory for the 64-bit window.
        let qword = [0, 4 << 30, (68 << 30) - 1, 0, 64 << 30];
        assert!(t.contains(&address_space(0x8a, 0, 1, &qword, 8)));
        // The _OSC's UUID, mixed-endian: 33db4d5b-1ff7-401c-9657-7441c03dd766.
        let uuid = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        assert!(t.contains(&uuid));
        // No interrupt routing: MSI-X only.
        assert!(!t.contains(b"_PRT"));
    }

    #[test]
    fn dsdt_reserves_the_ecam_as_a_motherboard_resource() {
        let t = AmlBytes(dsdt(&pci_platform(pci_bridge())));
        assert!(t.contains(b"MRES"));
        // PNP0C02
        assert!(t.contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // Memory32Fixed (ReadWrite, PCI_ECAM_START, PCI_ECAM_SIZE)
        let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
        fixed.extend_from_slice(&0xe000_0000u32.to_le_bytes());
        fixed.extend_from_slice(&0x0010_0000u32.to_le_bytes());
        assert!(t.contains(&fixed));
    }

    #[test]
    fn dsdt_without_a_64_bit_window_has_no_qword_memory() {
        let t = AmlBytes(dsdt(&pci_platform(PciHostBridge {
            mmio64: None,
            ..pci_bridge()
        })));
        assert!(t.contains(b"PCI0"));
        assert!(!t.contains(&[0x8a, 0x2b, 0x00]), "no QWordMemory");
    }

    #[test]
    fn windows_above_4_gib_become_qword_memory() {
        let t = AmlBytes(dsdt(&pci_platform(PciHostBridge {
            ecam_base: 0x40_0000_0000,
            mmio32: (0xf000_0000, 0x2000_0000),
            mmio64: None,
            ..pci_bridge()
        })));
        let window = [0, 0xf000_0000, 0x1_0fff_ffff, 0, 0x2000_0000];
        assert!(t.contains(&address_space(0x8a, 0, 1, &window, 8)));
        let ecam = [0, 0x40_0000_0000, 0x40_000f_ffff, 0, 0x10_0000];
        assert!(t.contains(&address_space(0x8a, 0, 1, &ecam, 8)));
        assert!(!t.contains(&[0x86, 0x09, 0x00]), "no Memory32Fixed");
    }

    /// Disassembles `table` with iasl, compiles the result again and returns the ASL; panics on
    /// any iasl error. (Compiling the DSDT warns that `PCI0` has both `_HID` and `_ADR`, as
    /// QEMU's and Cloud Hypervisor's do: the specification says "should not", Linux ignores
    /// the `_ADR`.)
    fn iasl_disassemble(name: &str, table: &[u8]) -> String {
        let tmp = tempfile::Builder::new()
            .prefix("thvc-acpi-")
            .tempdir()
            .expect("tmp");
        let dir = tmp.path();
        let aml = dir.join(format!("{name}.dat"));
        std::fs::write(&aml, table).expect("write");
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .expect("iasl (acpica-tools) is installed");
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains("Error") && !log.contains("Warning"), "{log}");
        let dsl = dir.join(format!("{name}.dsl"));
        // Compiling the ASL back checks it against the specification's rules too.
        let out = std::process::Command::new("iasl")
            .arg("-p")
            .arg(dir.join(format!("{name}-again")))
            .arg(&dsl)
            .output()
            .expect("iasl runs");
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && log.contains(" 0 Errors"), "{log}");
        std::fs::read_to_string(dsl).expect("iasl wrote the ASL")
    }

    #[test]
    #[ignore = "needs iasl (apt install acpica-tools)"]
    fn iasl_accepts_the_pci_tables() {
        let dsl = iasl_disassemble("dsdt", &dsdt(&pci_platform(pci_bridge())));
        let compact: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
        for expected in [
            "Device (PCI0)",
            "Name (_HID, EisaId (\"PNP0A08\")",
            "Name (_CID, EisaId (\"PNP0A03\")",
            "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, // Granularity 0x0000, // Range Minimum 0x0000, // Range Maximum",
            "IO (Decode16, 0x0CF8, // Range Minimum 0x0CF8, // Range Maximum 0x01, // Alignment 0x08, // Length",
            "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, // Granularity 0xC0000000, // Range Minimum 0xCFFFFFFF, // Range Maximum",
            "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x0000000000000000, // Granularity 0x0000000100000000, // Range Minimum 0x00000010FFFFFFFF, // Range Maximum",
            "Method (_OSC, 4, Serialized)",
            "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
            "CreateDWordField (Arg3, Zero, CDW1)",
            "Device (MRES)",
            "Name (_HID, EisaId (\"PNP0C02\")",
            "Memory32Fixed (ReadWrite, 0xE0000000, // Address Base 0x00100000, // Address Length",
        ] {
            assert!(compact.contains(expected), "{expected}\n{dsl}");
        }
        let mcfg = iasl_disassemble("mcfg", &mcfg(&pci_bridge()));
        let compact: String = mcfg.split_whitespace().collect::<Vec<_>>().join(" ");
        for expected in [
            "Base Address : 00000000E0000000",
            "Segment Group Number : 0000",
            "Start Bus Number : 00",
            "End Bus Number : 00",
        ] {
            assert!(compact.contains(expected), "{expected}\n{mcfg}");
        }
    }

    #[test]
    fn no_pci_means_no_pci_devices() {
        let t = AmlBytes(dsdt(&AcpiPlatform {
            vcpus: 1,
            virtio_mmio: vec![],
            pci: None,
        }));
        assert!(!t.contains(b"PCI0") && !t.contains(b"MRES"));
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
            pci: Some(pci_bridge()),
        };
        write_acpi_tables(&mem, &platform).expect("fits below 1 MiB");
    }
}
