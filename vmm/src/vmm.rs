//! Building a VM from a [`VmConfig`] and running it until it ends.
//!
//! The main thread owns the event loop (exit requests, signals, terminal input); each vCPU runs
//! on its own thread and talks to devices through the shared buses; the control API has its
//! own thread (see `api::server`).
//!
//! Start-up is ordered for the sandbox: everything is opened first (KVM, images, console file,
//! API socket) while the process is single-threaded and may still be privileged; privileges
//! are dropped; then threads start, each installing its seccomp filter before any work; the
//! main thread installs its own last and only then lets the vCPUs run.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

use kvm_ioctls::IoEventAddress;
use seccompiler::BpfProgram;

use crate::api::{self, ApiError, VmApi, VmSummary};
use crate::arch::x86_64::acpi::{self, AcpiPlatform, MmioDeviceInfo, PciHostBridge};
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{boot, cpu_template, cpuid, layout, pvh, regs, smbios};
use crate::config::{Boot, Transport, VmConfig};
use crate::devices::acpi_pm::{AcpiPm, PmTimer, ACPI_PM_PORT, PM_TIMER_LEN, PM_TIMER_PORT};
use crate::devices::cmos::{Cmos, CMOS_PORT, CMOS_PORT_COUNT};
use crate::devices::ged::{Ged, PowerButton, GED_MMIO_SIZE};
use crate::devices::i8042::{I8042, I8042_DATA_PORT};
use crate::devices::metrics::{DeviceRegistry, PciLocation};
use crate::devices::pci::{
    PciConfigIo, PciEcam, PciError, PciRoot, PciWindow, PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT,
};
use crate::devices::serial::{SerialDevice, SerialSink, COM1_IRQ, COM1_PORT, UART_PORT_COUNT};
use crate::devices::virtio::mmio::{
    MmioInterrupt, MmioTransport, REG_INTERRUPT_ACK, REG_QUEUE_NOTIFY,
};
use crate::devices::virtio::pci::{
    self as virtio_pci, PciPlatform, VirtioPciDevice, VirtioPciError,
};
use crate::devices::virtio::registers::RegisterPage;
use crate::devices::virtio::tap::TapError;
use crate::devices::virtio::throttle::{
    DeviceLimits, LimitHandle, LimitRegistry, SharedLimit, Throttle,
};
use crate::devices::virtio::transport::WorkerGroup;
use crate::devices::virtio::worker::{self, WorkerControl};
use crate::devices::virtio::{
    block, net, rng, type_name, DeviceCounters, DeviceInfo, QueueGroup, QueueHandler,
    VIRTIO_MMIO_INT_VRING,
};
use crate::devices::{Bus, BusError};
use crate::exit::{ExitReason, VmExitRequest};
use crate::persist::migration;
use crate::persist::outgoing::Outgoing;
use crate::persist::restore::{self, RestoreError};
use crate::persist::{
    DeviceDescription, DeviceTransport, MachineShape, PciPersist, Persist, PersistDevice, Snapshot,
};
use crate::sandbox::{
    self, check_tap_owner, Filters, KvmFdError, PrivilegeError, SeccompError, ThreadKind,
};
use crate::vstate::coalesced::CoalescedError;
use crate::vstate::control::{install_kick_handler, ControlError, VcpuControl};
use crate::vstate::msi::GsiRouting;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuRuntime};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::CpuTemplateError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Coalesced(#[from] CoalescedError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Firmware(#[from] pvh::PvhError),
    #[error(transparent)]
    Smbios(#[from] smbios::SmbiosError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("{0} vCPUs requested, but KVM on this host allows at most {1}")]
    TooManyVcpus(u8, usize),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    GuestMemory {
        mib: u64,
        source: crate::vstate::memory::MemoryError,
    },
    #[error("cannot open the serial output: {0}")]
    SerialOutput(io::Error),
    #[error("cannot set up devices: {0}")]
    Bus(#[from] BusError),
    #[error("cannot wire interrupt {gsi}: {source}")]
    Irq { gsi: u32, source: kvm_ioctls::Error },
    #[error("event loop: {0}")]
    EventLoop(io::Error),
    #[error("cannot install the SIGSYS handler that reports forbidden syscalls: {0}")]
    SigsysReporter(io::Error),
    #[error("cannot start the migration thread: {0}")]
    MigrationThread(io::Error),
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot set up {device}: {source}")]
    DeviceSetup { device: String, source: io::Error },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Kvm(#[from] KvmFdError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot drop privileges: {0}")]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    VcpuControl(#[from] ControlError),
    #[error("cannot set up the PCI bus: {0}")]
    Pci(#[from] PciError),
    #[error("cannot set up a virtio-pci device: {0}")]
    VirtioPci(#[from] VirtioPciError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// Anything that ended a migration target (`--incoming`) before its guest ran: the
    /// guest is still on its source, nothing of it ran here (exit status 5).
    #[error("the migrated guest did not arrive: {0}")]
    NotArrived(Box<VmmError>),
}

impl VmmError {
    /// The exit status that tells a supervisor how the VMM ended (see [`crate::exit`]).
    pub fn status(&self) -> i32 {
        match self {
            VmmError::NotArrived(_) => crate::exit::EXIT_NOT_ARRIVED,
            _ => crate::exit::EXIT_ERROR,
        }
    }
}

/// First interrupt line for virtio devices (4 is COM1).
const VIRTIO_FIRST_GSI: u32 = 5;
/// First KVM memory slot for virtio register pages (guest RAM takes the slots below).
const FIRST_DEVICE_SLOT: u32 = 16;

/// A virtio device opened but not yet wired: name, transport description, the handlers of
/// its queue groups (one worker thread each), counters.
type PendingDevice = (
    String,
    DeviceInfo,
    Vec<QueueGroup>,
    Arc<DeviceCounters>,
    DeviceLimits,
);

/// A device whose queues are all served by one handler.
fn one_group(info: &DeviceInfo, handler: impl QueueHandler + 'static) -> Vec<QueueGroup> {
    vec![QueueGroup {
        handler: Box::new(handler),
        queues: 0..info.queue_max_sizes.len(),
    }]
}

/// Opens the virtio devices' backends (disk images, TAPs). Done before privileges are
/// dropped, like every other open.
fn open_virtio_backends(config: &VmConfig) -> Result<Vec<PendingDevice>, VmmError> {
    let mut devices: Vec<PendingDevice> = Vec::new();
    let default_queues = crate::config::default_queues(config.transport, config.vcpus);
    for (i, disk) in config.disks.iter().enumerate() {
        let queues = disk.queues.unwrap_or(1);
        let name = format!("virtio-blk{i}");
        let (info, workers) =
            block::open(&disk.path, disk.readonly, disk.serial.as_deref(), queues)?;
        let counters = workers.first().map(|w| w.counters()).unwrap_or_default();
        // One limit for the disk, shared by its queues.
        let limit = SharedLimit::new(disk.limits());
        // A thread per queue: requests of different vCPUs run in parallel.
        let mut groups = Vec::with_capacity(workers.len());
        for (q, mut w) in workers.into_iter().enumerate() {
            w.set_throttle(Throttle::new(limit.clone()).map_err(timer_error(&name))?);
            groups.push(QueueGroup {
                handler: Box::new(w),
                queues: q..q + 1,
            });
        }
        devices.push((name, info, groups, counters, DeviceLimits::One(limit)));
    }
    for (i, nic) in config.nets.iter().enumerate() {
        let mac = nic.mac.as_deref().and_then(net::parse_mac);
        // Receiving and transmitting each have their own limit (`rx_*`, `tx_*` keys).
        let (rx, tx) = nic.limits();
        let limits = net::NetLimits {
            rx: SharedLimit::new(rx),
            tx: SharedLimit::new(tx),
        };
        let nic = match nic.fd {
            Some(fd) => net::open_fd(fd, mac, Some(&limits))?,
            None => {
                let pairs = match nic.queues {
                    Some(n) => net::Pairs::Exactly(n),
                    None => net::Pairs::UpTo(default_queues),
                };
                let mac = mac.unwrap_or_else(|| net::default_mac(&nic.tap));
                net::open(&nic.tap, mac, pairs, Some(&limits))?
            }
        };
        devices.push((
            format!("virtio-net{i}"),
            nic.info,
            nic.groups,
            nic.counters,
            DeviceLimits::RxTx {
                rx: limits.rx,
                tx: limits.tx,
            },
        ));
    }
    if let Some(rng_config) = &config.rng {
        let name = "virtio-rng0".to_string();
        let (info, mut dev) = rng::new();
        let limit = SharedLimit::new(rng_config.limits());
        dev.set_throttle(Throttle::new(limit.clone()).map_err(timer_error(&name))?);
        let counters = dev.counters();
        let groups = one_group(&info, dev);
        devices.push((name, info, groups, counters, DeviceLimits::One(limit)));
    }
    Ok(devices)
}

fn timer_error(device: &str) -> impl FnOnce(io::Error) -> VmmError + '_ {
    move |source| VmmError::DeviceSetup {
        device: device.to_string(),
        source,
    }
}

/// Makes a device's rate limits changeable through the API, waking `workers` on a change.
fn register_limits(
    limits: &LimitRegistry,
    device: &str,
    shared: DeviceLimits,
    workers: &[WorkerGroup],
) {
    limits.add(LimitHandle {
        device: device.to_string(),
        limits: shared,
        workers: workers.iter().map(|w| w.control.clone()).collect(),
    });
}

/// Starts a device's worker threads, one per queue group (each installs `worker_filter`),
/// each waiting on its own queues' eventfds; returns the transport's lines to them.
fn start_workers(
    name: &str,
    groups: Vec<QueueGroup>,
    queue_events: Vec<EventFd>,
    worker_filter: Option<&BpfProgram>,
) -> io::Result<Vec<WorkerGroup>> {
    let single = groups.len() == 1;
    let mut events = queue_events.into_iter();
    let mut workers = Vec::with_capacity(groups.len());
    for (g, group) in groups.into_iter().enumerate() {
        let control = WorkerControl::new()?;
        let thread = if single {
            name.to_string()
        } else {
            format!("{name}-q{g}")
        };
        let mine: Vec<EventFd> = events.by_ref().take(group.queues.len()).collect();
        worker::spawn(
            thread,
            group.handler,
            mine,
            control.clone(),
            worker_filter.cloned(),
        )?;
        workers.push(WorkerGroup {
            control,
            queues: group.queues,
        });
    }
    Ok(workers)
}

/// Wires the opened virtio devices as virtio-mmio: starts their worker threads, wires their
/// notifications (ioeventfd) and interrupts (irqfd), puts their register windows on the MMIO
/// bus and their counters in the registry. Returns what the DSDT must announce.
fn virtio_mmio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    devices: Vec<PendingDevice>,
    mmio_bus: &mut Bus,
    worker_filter: Option<&BpfProgram>,
    registry: &DeviceRegistry,
    limits: &LimitRegistry,
) -> Result<(Vec<MmioDeviceInfo>, Vec<PersistDevice>), VmmError> {
    let mut announced = Vec::new();
    let mut persisted = Vec::new();
    for (i, (name, info, groups, counters, shared)) in devices.into_iter().enumerate() {
        let description = DeviceDescription::new(&name, &info);
        let setup = |source: io::Error| VmmError::DeviceSetup {
            device: name.clone(),
            source,
        };
        let kvm = |source: kvm_ioctls::Error| setup(io::Error::from_raw_os_error(source.errno()));
        let base = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(setup)?);
        vm.fd().register_irqfd(&irqfd, gsi).map_err(kvm)?;
        let mut queue_events = Vec::new();
        for q in 0..info.queue_max_sizes.len() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
            vm.fd()
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(kvm)?;
            queue_events.push(evt);
        }
        registry.register_source(&name, type_name(info.device_type), counters);
        let workers = start_workers(&name, groups, queue_events, worker_filter).map_err(setup)?;
        register_limits(limits, &name, shared, &workers);
        // The register window as memory the guest reads without exits (see
        // devices/virtio/registers); writes still exit to the transport.
        let registers = Arc::new(RegisterPage::new().map_err(setup)?);
        // SAFETY: the page is kept by the transport and the interrupt, which live on the MMIO
        // bus and in the worker for as long as the VM.
        unsafe {
            vm.map_readonly(
                FIRST_DEVICE_SLOT + i as u32,
                base,
                registers.host_address(),
                RegisterPage::SIZE as u64,
            )
        }?;
        // The driver acknowledges the used-buffer interrupt (value 1) on every interrupt;
        // the bit is sticky (see `MmioInterrupt`), so that write only needs to end in the
        // kernel. Other acknowledgements (configuration change) still reach the transport.
        let ack_sink = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
        vm.fd()
            .register_ioevent(
                &ack_sink,
                &IoEventAddress::Mmio(base + REG_INTERRUPT_ACK),
                VIRTIO_MMIO_INT_VRING,
            )
            .map_err(kvm)?;
        let interrupt = MmioInterrupt::new(registers, irqfd);
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            info,
            mem.clone(),
            interrupt,
            workers,
            Some(ack_sink),
        )));
        mmio_bus.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone())?;
        announced.push(MmioDeviceInfo {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            gsi,
        });
        persisted.push(PersistDevice {
            description,
            transport: DeviceTransport::Mmio(transport),
        });
    }
    Ok((announced, persisted))
}

/// Wires the opened virtio devices as virtio-pci functions on `root`: starts their workers,
/// places their BARs in the 32-bit window (the guest may move them), gives each queue and
/// the configuration an MSI-X vector.
fn virtio_pci_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    devices: Vec<PendingDevice>,
    root: &mut PciRoot,
    routing: &Arc<GsiRouting>,
    worker_filter: Option<&BpfProgram>,
    (registry, limits): (&DeviceRegistry, &LimitRegistry),
) -> Result<Vec<PersistDevice>, VmmError> {
    let vm_fd = vm.shared_fd();
    let windows = root.windows().to_vec();
    let mut persisted = Vec::new();
    for (name, info, groups, counters, shared) in devices {
        let description = DeviceDescription::new(&name, &info);
        let setup = |source: io::Error| VmmError::DeviceSetup {
            device: name.clone(),
            source,
        };
        let queue_events = (0..info.queue_max_sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(setup)?;
        // KVM signals the same eventfd through a duplicate: the device moves the
        // notification addresses, the worker waits on the originals.
        let notify_events = queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(setup)?;
        registry.register_source(&name, type_name(info.device_type), counters);
        let workers = start_workers(&name, groups, queue_events, worker_filter).map_err(setup)?;
        register_limits(limits, &name, shared, &workers);
        let bar = root.allocate_bar(0, virtio_pci::BAR_SIZE)?;
        let device = VirtioPciDevice::new(
            info,
            PciPlatform {
                mem,
                vm: &vm_fd,
                routing,
                windows: &windows,
            },
            workers,
            notify_events,
            bar,
        )?;
        let summary = device.summary();
        let device = Arc::new(Mutex::new(device));
        let slot = root.add(device.clone())?;
        persisted.push(PersistDevice {
            description,
            transport: DeviceTransport::Pci(device),
        });
        tracing::debug!("{name}: PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}");
        registry.set_pci_location(
            &name,
            PciLocation {
                bdf: format!("0000:00:{slot:02x}.0"),
                vendor_id: format!("{:#06x}", summary.vendor),
                device_id: format!("{:#06x}", summary.device),
                msix_vectors: summary.vectors,
            },
        );
    }
    Ok(persisted)
}

/// The files the guest boots from, opened before privileges are dropped, with their paths
/// for error messages.
enum BootFiles {
    Kernel {
        kernel: (File, PathBuf),
        initrd: Option<(File, PathBuf)>,
        cmdline: String,
    },
    Firmware(File, PathBuf),
    /// A snapshot to continue, and its open memory file.
    Restore(Box<Snapshot>, File),
    /// Where a migration's source will connect.
    Incoming(restore::IncomingListener),
}

impl BootFiles {
    /// `group_access` as the API socket's (`--api-socket-group`): an incoming migration's
    /// Unix socket is as private as the API, since whoever connects to it gives the guest.
    fn open(boot: &Boot, group_access: bool) -> Result<Self, VmmError> {
        Ok(match boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => BootFiles::Kernel {
                kernel: (boot::open_kernel(kernel)?, kernel.clone()),
                initrd: match initrd {
                    Some(path) => Some((boot::open_initrd(path)?, path.clone())),
                    None => None,
                },
                cmdline: cmdline.clone(),
            },
            Boot::Firmware(path) => BootFiles::Firmware(pvh::open_firmware(path)?, path.clone()),
            Boot::Restore(dir) => {
                let (snapshot, memory) = Snapshot::open(dir).map_err(RestoreError::from)?;
                BootFiles::Restore(Box::new(snapshot), memory)
            }
            Boot::Incoming(addr) => {
                BootFiles::Incoming(restore::IncomingListener::bind(addr, group_access)?)
            }
        })
    }
}

/// Everything opened before privileges are dropped.
struct Resources {
    kvm: kvm_ioctls::Kvm,
    boot: BootFiles,
    serial: SerialSink,
    virtio: Vec<PendingDevice>,
    api: Option<api::ApiListener>,
}

impl Resources {
    fn acquire(config: &VmConfig) -> Result<Resources, VmmError> {
        let kvm = sandbox::open_kvm(config.sandbox.kvm_fd)?;
        // The API socket first, so that a supervisor can connect as early as possible.
        let api = config
            .api_socket
            .as_deref()
            .map(|path| api::bind(path, config.api_socket_group))
            .transpose()?;
        for nic in config.nets.iter().filter(|n| n.fd.is_none()) {
            check_tap_owner(&nic.tap, config.sandbox.user)?;
        }
        let boot = BootFiles::open(&config.boot, config.api_socket_group)?;
        let serial = SerialSink::open(&config.serial).map_err(VmmError::SerialOutput)?;
        let virtio = open_virtio_backends(config)?;
        Ok(Resources {
            kvm,
            boot,
            serial,
            virtio,
            api,
        })
    }
}

/// Everything the guest needs in memory before the first instruction: the kernel and its boot
/// parameters, or the firmware and its PVH start info; ACPI and SMBIOS tables for both.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    platform: &AcpiPlatform,
    files: &mut BootFiles,
) -> Result<BootEntry, VmmError> {
    let mem_size = config.memory_mib << 20;
    let rsdp = acpi::write_acpi_tables(mem, platform)?;
    smbios::write_smbios(mem, &config.platform)?;
    // Linux uses ECAM only where E820 reserves it.
    let reserved: Vec<(u64, u64)> = platform.pci.iter().map(|p| p.ecam_range()).collect();
    let entry = match files {
        BootFiles::Kernel {
            kernel: (kernel, kernel_path),
            initrd,
            cmdline,
        } => {
            let loaded = boot::load_kernel(mem, kernel, kernel_path)?;
            let initrd = match initrd {
                Some((file, path)) => Some(boot::load_initrd(mem, file, path, &loaded)?),
                None => None,
            };
            let cmdline_len = boot::write_cmdline(mem, cmdline)?;
            let params = boot::boot_params(&loaded, initrd, cmdline_len, mem_size, rsdp, &reserved);
            boot::write_boot_params(mem, &params)?;
            BootEntry::Linux64(loaded.entry)
        }
        BootFiles::Firmware(file, path) => BootEntry::Pvh {
            entry: pvh::load_firmware(mem, file, path)?,
            start_info: pvh::write_start_info(mem, mem_size, rsdp, &reserved)?,
        },
        BootFiles::Restore(..) | BootFiles::Incoming(_) => {
            return Err(RestoreError::Invalid(
                "a restored guest is not booted (internal error)".into(),
            )
            .into())
        }
    };
    boot::write_reset_vector(mem)?;
    regs::setup_boot_memory(mem, &entry)?;
    Ok(entry)
}

/// An eventfd wired to interrupt `gsi`.
fn irqfd(vm: &Vm, gsi: u32) -> Result<Arc<EventFd>, VmmError> {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventLoop)?);
    vm.fd()
        .register_irqfd(&irq, gsi)
        .map_err(|source| VmmError::Irq { gsi, source })?;
    Ok(irq)
}

/// The port-I/O bus and the devices on it the VMM talks to later.
struct LegacyDevices {
    bus: Bus,
    /// For terminal input, and snapshots.
    serial: Arc<Mutex<SerialDevice>>,
    /// For snapshots (the PCI configuration address register).
    config_io: Arc<Mutex<PciConfigIo>>,
}

/// The legacy devices on the port-I/O bus.
fn legacy_devices(
    vm: &Vm,
    sink: SerialSink,
    exit: &VmExitRequest,
    registry: &DeviceRegistry,
    pci_root: Arc<PciRoot>,
    mem_size: u64,
) -> Result<LegacyDevices, VmmError> {
    let irq = irqfd(vm, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(irq, sink).with_metrics(&registry.register("serial0", "serial")),
    ));
    let mut bus = Bus::default();
    bus.insert(COM1_PORT.into(), UART_PORT_COUNT.into(), serial.clone())?;
    bus.insert(
        I8042_DATA_PORT.into(),
        5,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    bus.insert(
        ACPI_PM_PORT.into(),
        1,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
    )?;
    bus.insert(
        PM_TIMER_PORT.into(),
        PM_TIMER_LEN.into(),
        Arc::new(Mutex::new(PmTimer::default())),
    )?;
    bus.insert(
        CMOS_PORT.into(),
        CMOS_PORT_COUNT.into(),
        Arc::new(Mutex::new(Cmos::new(
            layout::low_ram_end(mem_size),
            mem_size,
        ))),
    )?;

    let config_io = Arc::new(Mutex::new(PciConfigIo::new(pci_root, exit.clone())));
    bus.insert(
        PCI_CONFIG_PORT.into(),
        PCI_CONFIG_PORT_COUNT.into(),
        config_io.clone(),
    )?;
    Ok(LegacyDevices {
        bus,
        serial,
        config_io,
    })
}

/// The PCI host bridge of a guest with `mem_size` bytes of RAM and CPUs of `phys_bits`
/// physical address bits: the 32-bit window below the MMIO hole's devices, the 64-bit one
/// above RAM (for large BARs), ECAM for bus 0.
fn pci_host_bridge(mem_size: u64, phys_bits: u8) -> PciHostBridge {
    PciHostBridge {
        ecam_base: layout::PCI_ECAM_START,
        bus_end: layout::PCI_BUS_END,
        mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
        mmio64: layout::pci_mmio64_window(mem_size, phys_bits),
    }
}

/// ECAM and the host bridge's memory windows on the MMIO bus.
fn pci_buses(
    mmio_bus: &mut Bus,
    root: &Arc<PciRoot>,
    bridge: &PciHostBridge,
) -> Result<(), VmmError> {
    mmio_bus.insert(
        bridge.ecam_base,
        layout::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciEcam(root.clone()))),
    )?;
    for (base, size) in std::iter::once(bridge.mmio32).chain(bridge.mmio64) {
        let window = PciWindow {
            root: root.clone(),
            base,
        };
        mmio_bus.insert(base, size, Arc::new(Mutex::new(window)))?;
    }
    Ok(())
}

/// Blocks the stop signals in the calling thread (and so in every thread it spawns later) and
/// returns a signalfd that receives them instead.
fn stop_signals() -> io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a sigset we own; the returned fd is checked and owned.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Puts the host terminal into raw mode while the VM runs, so keystrokes go to the guest;
/// restores it on drop.
struct RawTerminal;

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                tracing::warn!("cannot put the terminal in raw mode, guest input disabled: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = io::stdin().lock().set_canon_mode() {
            tracing::warn!("cannot restore the terminal: {e}");
        }
    }
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_STDIN: u64 = 2;

fn add_to_epoll(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// The Generic Event Device on the MMIO bus; returns the power button that drives it.
fn power_button(
    vm: &Vm,
    mmio_bus: &mut Bus,
    registry: &DeviceRegistry,
) -> Result<PowerButton, VmmError> {
    let irq = irqfd(vm, layout::GED_GSI)?;
    let ged = Arc::new(Mutex::new(Ged::new(
        irq,
        &registry.register("ged", "acpi-ged"),
    )));
    mmio_bus.insert(layout::GED_MMIO_BASE, GED_MMIO_SIZE, ged.clone())?;
    Ok(PowerButton::new(ged))
}

/// Builds the VM and runs it until the guest powers off or resets, a signal or the API stops
/// it, or a vCPU fails.
pub fn run(config: VmConfig) -> Result<ExitReason, VmmError> {
    let incoming = matches!(config.boot, Boot::Incoming(_));
    let mut started = false;
    run_vm(config, &mut started).map_err(|e| {
        if incoming && !started {
            VmmError::NotArrived(Box::new(e))
        } else {
            e
        }
    })
}

/// [`run`]'s work; `started` turns true once the guest's vCPUs run.
fn run_vm(config: VmConfig, started: &mut bool) -> Result<ExitReason, VmmError> {
    let signals = stop_signals().map_err(VmmError::EventLoop)?;
    let filters = Filters::build(config.sandbox.seccomp, config.transport)?;
    let mut resources = Resources::acquire(&config)?;
    sandbox::drop_privileges(config.sandbox.user)?;
    install_kick_handler()?;
    sandbox::install_sigsys_reporter().map_err(VmmError::SigsysReporter)?;

    let exit = VmExitRequest::new().map_err(VmmError::EventLoop)?;
    let vcpu_control = Arc::new(VcpuControl::new());
    let registry = DeviceRegistry::default();
    let limits = LimitRegistry::default();
    let vm_api = Arc::new(
        VmApi::new(
            VmSummary {
                vcpus: config.vcpus,
                memory_mib: config.memory_mib,
                boot: config.boot.clone(),
                uuid: config.platform.uuid.clone(),
                cpu_template: config.cpu_template.to_string(),
            },
            vcpu_control.clone(),
            registry.clone(),
            exit.clone(),
        )
        .with_limits(limits.clone()),
    );
    if let Some(listener) = resources.api.take() {
        tracing::info!("control API on {}", listener.path().display());
        api::spawn(listener, vm_api.clone(), filters.api.clone())?;
    }

    let vm = Vm::with_kvm(resources.kvm)?;
    tracing::info!(pmu = vm.pmu().as_str(), "the guest has no PMU");
    vm_api.set_pmu(vm.pmu().as_str());
    if usize::from(config.vcpus) > vm.max_vcpus() {
        return Err(VmmError::TooManyVcpus(config.vcpus, vm.max_vcpus()));
    }
    let mem_size = config.memory_mib << 20;
    let mem = crate::vstate::memory::create(&layout::ram_regions(mem_size)).map_err(|source| {
        VmmError::GuestMemory {
            mib: config.memory_mib,
            source,
        }
    })?;
    vm.register_memory(&mem)?;

    let mut mmio_bus = Bus::default();
    vm_api.set_power_button(power_button(&vm, &mut mmio_bus, &registry)?);
    let virtio = std::mem::take(&mut resources.virtio);
    let worker_filter = filters.device_worker.as_ref();
    let cpuid = cpu_template::guest_cpuid(&vm.supported_cpuid()?, config.cpu_template)?;
    let bridge = pci_host_bridge(mem_size, cpuid::phys_address_bits(&cpuid));
    let windows = std::iter::once(bridge.mmio32)
        .chain(bridge.mmio64)
        .collect();
    let mut pci_root = PciRoot::new(windows);
    let descriptions: Vec<DeviceDescription> = virtio
        .iter()
        .map(|(name, info, ..)| DeviceDescription::new(name, info))
        .collect();
    let (virtio_mmio, pci, persist_devices) = match config.transport {
        Transport::Mmio => {
            let (announced, persisted) = virtio_mmio_devices(
                &vm,
                &mem,
                virtio,
                &mut mmio_bus,
                worker_filter,
                &registry,
                &limits,
            )?;
            (announced, None, persisted)
        }
        Transport::Pci => {
            let routing = Arc::new(GsiRouting::new(vm.shared_fd()));
            let persisted = virtio_pci_devices(
                &vm,
                &mem,
                virtio,
                &mut pci_root,
                &routing,
                worker_filter,
                (&registry, &limits),
            )?;
            (Vec::new(), Some(bridge), persisted)
        }
    };
    let pci_root = Arc::new(pci_root);
    if let Some(bridge) = &pci {
        pci_buses(&mut mmio_bus, &pci_root, bridge)?;
    }
    let LegacyDevices {
        bus,
        serial,
        config_io,
    } = legacy_devices(
        &vm,
        resources.serial,
        &exit,
        &registry,
        pci_root.clone(),
        mem_size,
    )?;
    let pci_persist = pci.is_some().then(|| PciPersist {
        root: pci_root.clone(),
        config_io,
    });
    let platform = AcpiPlatform {
        vcpus: config.vcpus,
        virtio_mmio,
        pci,
    };
    let shape = MachineShape {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        transport: config.transport,
        cpu_template: config.cpu_template.to_string(),
        // As the first vCPU gets it: KVM's supported CPUID carries the APIC ID of whichever
        // host CPU the VMM ran on, which the per-vCPU CPUID replaces.
        cpuid: cpuid::vcpu_cpuid(&cpuid, 0, config.vcpus),
    };
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(
            &vm,
            id,
            bus.clone(),
            mmio_bus.clone(),
            exit.clone(),
        )?);
    }
    // An incoming migration's stream, kept to tell the source once the guest runs here.
    let mut incoming: Option<File> = None;
    let restored = matches!(
        resources.boot,
        BootFiles::Restore(..) | BootFiles::Incoming(_)
    );
    match &mut resources.boot {
        BootFiles::Incoming(listener) => {
            let Some(mut stream) = listener.accept(&signals)? else {
                tracing::info!("stop signal received while waiting for the migration source");
                return Ok(ExitReason::Stopped);
            };
            let here = shape.describe(descriptions);
            let snapshot = restore::receive_migration(&mut stream, &mem, &here)?;
            let restored = restore::restore_state(
                &vm,
                &vcpus,
                &serial,
                (&persist_devices, pci_persist.as_ref()),
                &snapshot,
            );
            if let Err(e) = &restored {
                let answer = migration::answer_json(&Err(e.to_string()));
                let _ = migration::write_message(&mut stream, migration::RESUMED, &[&answer]);
            }
            restored?;
            tracing::info!("guest state received; resuming the migrated guest");
            incoming = Some(stream);
        }
        BootFiles::Restore(snapshot, memory) => {
            restore::restore(
                &vm,
                &mem,
                &vcpus,
                &serial,
                (&persist_devices, pci_persist.as_ref()),
                (snapshot, memory),
                shape.describe(descriptions),
            )?;
            tracing::info!("guest memory and state restored from the snapshot");
        }
        files => {
            let entry = load_guest(&mem, &config, &platform, files)?;
            for vcpu in &vcpus {
                vcpu.configure(&cpuid, config.vcpus, entry)?;
            }
        }
    }
    let persist = Arc::new(Persist {
        machine: shape,
        vm: vm.shared_fd(),
        dirty_log: vm.dirty_log(),
        mem: mem.clone(),
        serial: serial.clone(),
        devices: persist_devices,
        pci: pci_persist,
        workers: limits.workers(),
    });
    vm_api.set_persist(persist.clone());
    let outgoing = Outgoing::spawn(persist, vcpu_control.clone(), filters.migration.clone())
        .map_err(VmmError::MigrationThread)?;
    vm_api.set_outgoing(outgoing);
    // The PCI address port's writes do not exit (see vstate::coalesced): half the exits of
    // every configuration access through 0xCF8/0xCFC.
    if let Some(first) = vcpus.first() {
        if let Some(ring) = vm.coalesced_ports(first.fd(), &[(PCI_CONFIG_PORT, 4)])? {
            let ring = Arc::new(ring);
            for vcpu in &mut vcpus {
                vcpu.set_coalesced(ring.clone());
            }
        }
    }

    let epoll = Epoll::new().map_err(VmmError::EventLoop)?;
    add_to_epoll(&epoll, exit.event().as_raw_fd(), TOKEN_EXIT).map_err(VmmError::EventLoop)?;
    add_to_epoll(&epoll, signals.as_raw_fd(), TOKEN_SIGNAL).map_err(VmmError::EventLoop)?;
    // From here on the loop below sees exit requests (the eventfd is in the epoll set).
    vm_api.set_event_loop_running();
    let terminal = RawTerminal::enable();
    if terminal.is_some() {
        add_to_epoll(&epoll, libc::STDIN_FILENO, TOKEN_STDIN).map_err(VmmError::EventLoop)?;
    }

    for vcpu in vcpus {
        // The threads are never joined: the process exits when the VM ends, and the kernel
        // tears down vCPUs stuck in KVM_RUN. They wait at the gate until released below.
        let id = vcpu.id();
        vcpu.spawn(VcpuRuntime {
            control: vcpu_control.clone(),
            stats: vm_api.vcpu_stats(id),
            filter: filters.vcpu.clone(),
        })?;
    }
    // The signalfd as a File before the filter: no dup() needed in the loop.
    let mut signal_file = File::from(signals);
    sandbox::seccomp::apply(ThreadKind::Main, filters.main.as_ref())?;
    sandbox::test_forbidden_syscall(ThreadKind::Main);
    vcpu_control.release();
    *started = true;
    if restored {
        // The guest may be on another port of the network now (another TAP, another host).
        for worker in limits.workers() {
            worker.announce();
        }
    }
    if let Some(mut stream) = incoming.take() {
        // The source stops once it reads this; if it never does, it stays paused.
        let answer = migration::answer_json(&Ok(()));
        if let Err(e) = migration::write_message(&mut stream, migration::RESUMED, &[&answer]) {
            tracing::warn!("cannot tell the migration source that the guest runs here: {e}");
        }
    }
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        "guest started"
    );

    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VmmError::EventLoop(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_SIGNAL => {
                    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
                    if signal_file.read(&mut info).is_ok() {
                        tracing::info!("stop signal received; stopping the VM");
                        exit.request(ExitReason::Stopped);
                    }
                }
                TOKEN_STDIN => {
                    let mut buf = [0u8; 64];
                    match io::stdin().lock().read(&mut buf) {
                        Ok(0) | Err(_) => {
                            // Terminal gone: stop listening, keep the VM running.
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                libc::STDIN_FILENO,
                                EpollEvent::default(),
                            );
                        }
                        Ok(n) => {
                            serial
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .enqueue_input(&buf[..n]);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(reason) = exit.reason() {
            drop(terminal);
            return Ok(reason);
        }
    }
}
