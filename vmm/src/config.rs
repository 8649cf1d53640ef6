//! VM configuration: the command line and the JSON config file, merged and validated.
//!
//! Every flag can also be given in a JSON file (`--config FILE`, unknown fields rejected); a
//! flag given on the command line wins over the file. Validation happens once, here, so the
//! rest of the VMM works with a [`VmConfig`] that is known to be sane.

use crate::arch::x86_64::cpu_template::{CpuTemplate, CpuTemplateError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Parser;
use serde::Deserialize;

use crate::rate_limiter::{LimitConfig, RateError};

/// Default kernel command line: console on COM1, reboot through the ACPI reset register,
/// reboot one second after a panic so a supervisor sees the reset status, no PCI probing
/// (all devices are announced through ACPI).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1 pci=off";
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_VCPUS: u8 = 32;
/// The x86 kernel's COMMAND_LINE_SIZE, including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpu-template: {0}")]
    CpuTemplate(#[from] CpuTemplateError),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("nothing to boot: use --kernel PATH or --firmware PATH (or \"kernel\"/\"firmware\" in the config file), or --restore DIR")]
    MissingKernel,
    #[error("--restore and --incoming continue a guest whose kernel is in its memory: no --{0}")]
    RestoreWith(&'static str),
    #[error("--restore and --incoming exclude each other")]
    RestoreAndIncoming,
    #[error("invalid --incoming '{0}': expected unix:PATH or tcp:HOST:PORT")]
    Incoming(String),
    #[error(
        "--kernel and --firmware exclude each other: the firmware loads the kernel from a disk"
    )]
    KernelAndFirmware,
    #[error("--{0} needs --kernel: with --firmware the boot loader on the disk chooses kernel, initrd and command line")]
    FirmwareWith(&'static str),
    #[error("--firmware needs the pci transport (the firmware drives virtio-pci devices, not virtio-mmio)")]
    FirmwareNeedsPci,
    #[error("--firmware needs a disk to boot from (--disk path=FILE)")]
    FirmwareWithoutDisk,
    #[error("invalid --platform '{spec}': {why}")]
    Platform { spec: String, why: String },
    #[error("cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u64),
    #[error("memory must be at least {MIN_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error("memory {requested} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("kernel command line is {0} bytes long; the limit is {max} bytes", max = MAX_CMDLINE_LEN - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("invalid serial '{0}': expected stdout, none or file:PATH")]
    Serial(String),
    #[error("invalid --disk '{spec}': {why}")]
    Disk { spec: String, why: String },
    #[error("invalid --net '{spec}': {why}")]
    Net { spec: String, why: String },
    #[error("invalid --rng '{spec}': {why}")]
    Rng { spec: String, why: String },
    #[error("--rng and --no-rng exclude each other")]
    RngAndNoRng,
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} are supported")]
    TooManyDevices(usize),
    #[error("invalid seccomp mode '{0}': expected on, off or log")]
    Seccomp(String),
    #[error("invalid user '{0}': expected UID:GID, two numbers other than 0 (root)")]
    User(String),
    #[error("invalid kvm fd {0}: expected an inherited descriptor number of 3 or more")]
    KvmFd(i64),
    #[error("invalid transport '{0}': expected mmio or pci")]
    Transport(String),
    #[error("api socket path must not be empty")]
    ApiSocketEmpty,
    #[error("api socket group access was asked for, but there is no api socket")]
    ApiSocketGroupWithoutSocket,
}

/// Interrupt lines 5..=20 go to virtio devices, one each.
pub const MAX_VIRTIO_DEVICES: usize = 16;
/// The virtio-blk serial (VIRTIO_BLK_ID_BYTES).
pub const MAX_DISK_SERIAL_LEN: usize = 20;
/// The most queues (virtio-blk) or queue pairs (virtio-net) per device.
pub const MAX_QUEUES: u16 = 16;

/// A virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub serial: Option<String>,
    /// Request queues, each served by its own thread; None: one per vCPU on PCI, one on
    /// virtio-mmio (resolved by `VmConfig::merge`).
    #[serde(default)]
    pub queues: Option<u16>,
    /// Rate limit (see `rate_limiter`): bytes per second (K/M/G = 1024^n), its burst in
    /// bytes, operations per second, their burst; absent or 0: unlimited.
    #[serde(default)]
    pub bandwidth: Option<Amount>,
    #[serde(default, alias = "bandwidth-burst")]
    pub bandwidth_burst: Option<Amount>,
    #[serde(default)]
    pub ops: Option<Amount>,
    #[serde(default, alias = "ops-burst")]
    pub ops_burst: Option<Amount>,
}

/// A virtio-net NIC on an existing (or, with the right to, new) TAP device, named or handed
/// over as an open descriptor (`fd`, already attached with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Empty when `fd` is given.
    #[serde(default)]
    pub tap: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub fd: Option<i32>,
    /// Queue pairs (each a TAP queue and a thread); None: one per vCPU on PCI where the TAP
    /// allows it (multi_queue), else one (resolved when the TAP is opened).
    #[serde(default)]
    pub queues: Option<u16>,
    /// Rate limit (see `rate_limiter`): bytes per second (K/M/G = 1024^n), its burst in
    /// bytes, operations per second, their burst; absent or 0: unlimited. Applies to
    /// receiving and to transmitting, each limited on its own.
    #[serde(default)]
    pub bandwidth: Option<Amount>,
    #[serde(default, alias = "bandwidth-burst")]
    pub bandwidth_burst: Option<Amount>,
    #[serde(default)]
    pub ops: Option<Amount>,
    #[serde(default, alias = "ops-burst")]
    pub ops_burst: Option<Amount>,
    /// The receive direction's own setting of a key above, replacing it for receiving
    /// (Firecracker's rx_rate_limiter); see [`NetConfig::limits`].
    #[serde(default)]
    pub rx_bandwidth: Option<Amount>,
    #[serde(default, alias = "rx_bandwidth-burst")]
    pub rx_bandwidth_burst: Option<Amount>,
    #[serde(default)]
    pub rx_ops: Option<Amount>,
    #[serde(default, alias = "rx_ops-burst")]
    pub rx_ops_burst: Option<Amount>,
    /// The same for transmitting (Firecracker's tx_rate_limiter).
    #[serde(default)]
    pub tx_bandwidth: Option<Amount>,
    #[serde(default, alias = "tx_bandwidth-burst")]
    pub tx_bandwidth_burst: Option<Amount>,
    #[serde(default)]
    pub tx_ops: Option<Amount>,
    #[serde(default, alias = "tx_ops-burst")]
    pub tx_ops_burst: Option<Amount>,
}

/// The virtio-rng device's settings: only its rate limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Rate limit (see `rate_limiter`): bytes per second (K/M/G = 1024^n), its burst in
    /// bytes, operations per second, their burst; absent or 0: unlimited.
    #[serde(default)]
    pub bandwidth: Option<Amount>,
    #[serde(default, alias = "bandwidth-burst")]
    pub bandwidth_burst: Option<Amount>,
    #[serde(default)]
    pub ops: Option<Amount>,
    #[serde(default, alias = "ops-burst")]
    pub ops_burst: Option<Amount>,
}

/// A rate or burst as written: a number, or a string with an optional K/M/G suffix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Number(u64),
    Text(String),
}

/// The four rate limit settings of a device, parsed.
pub fn parse_limits(
    bandwidth: &Option<Amount>,
    bandwidth_burst: &Option<Amount>,
    ops: &Option<Amount>,
    ops_burst: &Option<Amount>,
) -> Result<LimitConfig, String> {
    let limits = parse_amounts([bandwidth, bandwidth_burst, ops, ops_burst], "")?;
    limits.check()?;
    Ok(limits)
}

/// The four amounts of a limit parsed, not yet checked together; `prefix` names their keys
/// in errors (`rx_`).
fn parse_amounts(amounts: [&Option<Amount>; 4], prefix: &str) -> Result<LimitConfig, String> {
    use crate::rate_limiter::{parse_bytes, parse_ops};
    let get = |a: &Option<Amount>, what: &str, parse: fn(&str) -> Result<u64, RateError>| match a {
        None => Ok(None),
        Some(Amount::Number(n)) => Ok(Some(*n)),
        Some(Amount::Text(t)) => parse(t)
            .map(Some)
            .map_err(|e| format!("{prefix}{what}: {e}")),
    };
    let [bandwidth, bandwidth_burst, ops, ops_burst] = amounts;
    Ok(LimitConfig {
        bandwidth: get(bandwidth, "bandwidth", parse_bytes)?,
        bandwidth_burst: get(bandwidth_burst, "bandwidth-burst", parse_bytes)?,
        ops: get(ops, "ops", parse_ops)?,
        ops_burst: get(ops_burst, "ops-burst", parse_ops)?,
    })
}

/// One direction of a NIC: its own keys (`rx_*` or `tx_*`, parsed into `own`) replace the
/// NIC's (`both`, checked), key by key. A burst the direction inherits goes with the
/// direction's rate when the direction removes that rate (`rx_bandwidth=0`); a burst of its
/// own needs a rate in that direction.
pub fn direction_limits(
    both: &LimitConfig,
    own: &LimitConfig,
    direction: &str,
) -> Result<LimitConfig, String> {
    let pick = |rate: Option<u64>,
                burst: Option<u64>,
                own_rate: Option<u64>,
                own_burst: Option<u64>,
                key: &str|
     -> Result<(Option<u64>, Option<u64>), String> {
        let rate = own_rate.or(rate);
        let limited = rate.unwrap_or(0) > 0;
        match own_burst {
            Some(_) if !limited => Err(format!(
                "{direction}_{key}-burst needs a {direction}_{key} or {key} above 0"
            )),
            Some(b) => Ok((rate, Some(b))),
            None => Ok((rate, burst.filter(|_| limited))),
        }
    };
    let (bandwidth, bandwidth_burst) = pick(
        both.bandwidth,
        both.bandwidth_burst,
        own.bandwidth,
        own.bandwidth_burst,
        "bandwidth",
    )?;
    let (ops, ops_burst) = pick(both.ops, both.ops_burst, own.ops, own.ops_burst, "ops")?;
    let limits = LimitConfig {
        bandwidth,
        bandwidth_burst,
        ops,
        ops_burst,
    };
    limits.check().map_err(|e| format!("{direction}_*: {e}"))?;
    Ok(limits)
}

/// Takes a rate limit key of a device spec; false if `key` is not one.
fn limit_key(key: &str, value: &str, slots: [&mut Option<Amount>; 4]) -> bool {
    let [bandwidth, bandwidth_burst, ops, ops_burst] = slots;
    let slot = match key {
        "bandwidth" => bandwidth,
        "bandwidth-burst" | "bandwidth_burst" => bandwidth_burst,
        "ops" => ops,
        "ops-burst" | "ops_burst" => ops_burst,
        _ => return false,
    };
    *slot = Some(Amount::Text(value.to_string()));
    true
}

macro_rules! limits_of {
    ($c:expr) => {
        parse_limits(&$c.bandwidth, &$c.bandwidth_burst, &$c.ops, &$c.ops_burst)
    };
}

macro_rules! limit_slots {
    ($c:expr) => {
        [
            &mut $c.bandwidth,
            &mut $c.bandwidth_burst,
            &mut $c.ops,
            &mut $c.ops_burst,
        ]
    };
}

impl DiskConfig {
    /// The disk's rate limit (validated by parsing).
    pub fn limits(&self) -> LimitConfig {
        limits_of!(self).unwrap_or_default()
    }
}

impl NetConfig {
    /// The NIC's rate limits, receiving and transmitting (validated by parsing).
    pub fn limits(&self) -> (LimitConfig, LimitConfig) {
        self.parse_limits().unwrap_or_default()
    }

    /// The `rx_*` (`rx` true) or `tx_*` settings, for [`limit_key`].
    fn direction_slots(&mut self, rx: bool) -> [&mut Option<Amount>; 4] {
        if rx {
            [
                &mut self.rx_bandwidth,
                &mut self.rx_bandwidth_burst,
                &mut self.rx_ops,
                &mut self.rx_ops_burst,
            ]
        } else {
            [
                &mut self.tx_bandwidth,
                &mut self.tx_bandwidth_burst,
                &mut self.tx_ops,
                &mut self.tx_ops_burst,
            ]
        }
    }

    /// `bandwidth`, `ops` and their bursts for both directions, each overridden key by key
    /// by the direction's own `rx_*` or `tx_*` key (see [`direction_limits`]).
    fn parse_limits(&self) -> Result<(LimitConfig, LimitConfig), String> {
        let both = limits_of!(self)?;
        let rx = parse_amounts(
            [
                &self.rx_bandwidth,
                &self.rx_bandwidth_burst,
                &self.rx_ops,
                &self.rx_ops_burst,
            ],
            "rx_",
        )?;
        let tx = parse_amounts(
            [
                &self.tx_bandwidth,
                &self.tx_bandwidth_burst,
                &self.tx_ops,
                &self.tx_ops_burst,
            ],
            "tx_",
        )?;
        Ok((
            direction_limits(&both, &rx, "rx")?,
            direction_limits(&both, &tx, "tx")?,
        ))
    }
}

impl RngConfig {
    pub fn limits(&self) -> LimitConfig {
        limits_of!(self).unwrap_or_default()
    }
}

impl FromStr for RngConfig {
    type Err = ConfigError;

    /// `bandwidth=RATE[,bandwidth-burst=N][,ops=N][,ops-burst=N]`
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Rng {
            spec: spec.to_string(),
            why,
        };
        let mut rng = RngConfig::default();
        for (key, value) in key_values(spec).map_err(err)? {
            if !limit_key(key, value, limit_slots!(rng)) {
                return Err(err(format!(
                    "unknown key '{key}' (bandwidth, bandwidth-burst, ops, ops-burst)"
                )));
            }
        }
        limits_of!(rng).map_err(err)?;
        Ok(rng)
    }
}

/// Splits "a=1,b=2" into pairs; every part must be key=value.
fn key_values(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    spec.split(',')
        .map(|part| {
            part.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("'{part}' is not key=value"))
        })
        .collect()
}

/// Queues (virtio-blk) or queue pairs (virtio-net) when not given: one per vCPU on PCI, where
/// each queue has its own interrupt vector; one on virtio-mmio, whose one line they would share.
pub fn default_queues(transport: Transport, vcpus: u8) -> u16 {
    match transport {
        Transport::Pci => u16::from(vcpus).min(MAX_QUEUES),
        Transport::Mmio => 1,
    }
}

fn queue_count(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(format!(
            "queues '{value}' is not a number from 1 to {MAX_QUEUES}"
        )),
    }
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("'{value}' is not on or off")),
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `path=FILE[,readonly=on][,serial=ID][,queues=N]`
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Disk {
            spec: spec.to_string(),
            why,
        };
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            serial: None,
            queues: None,
            bandwidth: None,
            bandwidth_burst: None,
            ops: None,
            ops_burst: None,
        };
        for (key, value) in key_values(spec).map_err(err)? {
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" => disk.readonly = on_off(value).map_err(err)?,
                "serial" => disk.serial = Some(value.to_string()),
                "queues" => disk.queues = Some(queue_count(value).map_err(err)?),
                _ if limit_key(key, value, limit_slots!(disk)) => {}
                _ => {
                    return Err(err(format!(
                        "unknown key '{key}' (path, readonly, serial, queues, bandwidth, \
                         bandwidth-burst, ops, ops-burst)"
                    )))
                }
            }
        }
        disk.validate().map_err(err)?;
        Ok(disk)
    }
}

impl DiskConfig {
    fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("path is required".into());
        }
        limits_of!(self)?;
        if let Some(n) = self.queues {
            queue_count(&n.to_string())?;
        }
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_DISK_SERIAL_LEN || !serial.is_ascii() {
                return Err(format!(
                    "serial must be at most {MAX_DISK_SERIAL_LEN} ASCII characters"
                ));
            }
        }
        Ok(())
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// `tap=NAME[,mac=MAC][,queues=N]` or `fd=N[,mac=MAC]`, and the rate limit keys, each also
    /// with `rx_` or `tx_` before it for one direction.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Net {
            spec: spec.to_string(),
            why,
        };
        let mut net = NetConfig {
            tap: String::new(),
            mac: None,
            fd: None,
            queues: None,
            bandwidth: None,
            bandwidth_burst: None,
            ops: None,
            ops_burst: None,
            rx_bandwidth: None,
            rx_bandwidth_burst: None,
            rx_ops: None,
            rx_ops_burst: None,
            tx_bandwidth: None,
            tx_bandwidth_burst: None,
            tx_ops: None,
            tx_ops_burst: None,
        };
        for (key, value) in key_values(spec).map_err(err)? {
            let direction = |prefix| key.strip_prefix(prefix).unwrap_or("");
            match key {
                "tap" => net.tap = value.to_string(),
                "mac" => net.mac = Some(value.to_string()),
                "fd" => {
                    net.fd = Some(
                        value
                            .parse()
                            .map_err(|_| err(format!("fd '{value}' is not a number")))?,
                    )
                }
                "queues" => net.queues = Some(queue_count(value).map_err(err)?),
                _ if limit_key(key, value, limit_slots!(net)) => {}
                _ if limit_key(direction("rx_"), value, net.direction_slots(true)) => {}
                _ if limit_key(direction("tx_"), value, net.direction_slots(false)) => {}
                _ => {
                    return Err(err(format!(
                        "unknown key '{key}' (tap, fd, mac, queues, bandwidth, \
                         bandwidth-burst, ops, ops-burst, and each of these four with rx_ or \
                         tx_ before it for one direction)"
                    )))
                }
            }
        }
        net.validate().map_err(err)?;
        Ok(net)
    }
}

impl NetConfig {
    fn validate(&self) -> Result<(), String> {
        self.parse_limits()?;
        if let Some(n) = self.queues {
            queue_count(&n.to_string())?;
        }
        match self.fd {
            Some(_) if !self.tap.is_empty() => {
                return Err("give either tap=NAME or fd=N, not both".into())
            }
            Some(fd) if fd < 3 => {
                return Err(format!(
                    "fd {fd} is not an inherited descriptor (3 or more)"
                ))
            }
            Some(_) if self.queues.is_some_and(|n| n > 1) => {
                return Err("queues needs tap=NAME (one TAP queue is opened per queue pair)".into())
            }
            Some(_) => {}
            None if self.tap.is_empty() => return Err("tap=NAME or fd=N is required".into()),
            None => {}
        }
        if self.fd.is_none() && !crate::devices::virtio::tap::valid_name(&self.tap) {
            return Err(format!(
                "tap name '{}' must be 1-15 bytes without '/' or spaces",
                self.tap
            ));
        }
        if let Some(mac) = &self.mac {
            match crate::devices::virtio::net::parse_mac(mac) {
                Some(m) if m[0] & 1 == 0 && m != [0; 6] => {}
                Some(_) => return Err(format!("mac {mac} is not a unicast address")),
                None => return Err(format!("mac '{mac}' is not of the form 52:54:00:12:34:56")),
            }
        }
        Ok(())
    }
}

/// How the virtio devices attach to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// virtio-mmio windows announced in the DSDT, one interrupt line each: the fewest exits
    /// and the smallest platform, for Linux guests.
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI Express root bus with MSI-X: what firmware, other
    /// operating systems and multiqueue devices need.
    Pci,
}

impl FromStr for Transport {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            _ => Err(ConfigError::Transport(s.to_string())),
        }
    }
}

/// Whether and how the seccomp filters are enforced (see `sandbox::seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Any syscall outside a thread's allow-list kills the process.
    #[default]
    On,
    /// No filters: for debugging only.
    Off,
    /// Syscalls outside the allow-lists are allowed but logged by the kernel (audit log /
    /// dmesg): for finding what a new code path needs.
    Log,
}

impl FromStr for SeccompMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(ConfigError::Seccomp(s.to_string())),
        }
    }
}

/// The unprivileged user and group to switch to after the resources are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for UserIds {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::User(s.to_string());
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        let number = |v: &str| {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            v.parse::<u32>().map_err(|_| bad())
        };
        let (uid, gid) = (number(uid)?, number(gid)?);
        // 0 is root; u32::MAX is (uid_t)-1, "no change" to setresuid.
        if uid == 0 || gid == 0 || uid == u32::MAX || gid == u32::MAX {
            return Err(bad());
        }
        Ok(UserIds { uid, gid })
    }
}

/// What the process may do once it runs: see `sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    pub seccomp: SeccompMode,
    /// An inherited, already open /dev/kvm; None: open /dev/kvm.
    pub kvm_fd: Option<i32>,
    /// Switch to this user after opening everything (needs to start as root).
    pub user: Option<UserIds>,
}

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
    None,
}

impl FromStr for SerialTarget {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialTarget::Stdout),
            "none" => Ok(SerialTarget::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialTarget::File(PathBuf::from(path))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

impl fmt::Display for SerialTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialTarget::Stdout => f.write_str("stdout"),
            SerialTarget::None => f.write_str("none"),
            SerialTarget::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// The command line. Every option is optional here so that the config file can supply it.
#[derive(Debug, Default, Parser)]
#[command(
    name = "thvc-vmm",
    version,
    about = "A minimal KVM virtual machine monitor: one process per VM.",
    after_help = "Exit status: 0 guest powered off or VMM stopped by SIGTERM/SIGINT or the \
                  API; 1 error; 2 invalid usage or configuration; 3 guest reset (reboot, \
                  or a panic with panic=N). Killed by SIGSYS: a seccomp violation."
)]
pub struct Cli {
    /// Guest kernel: a bzImage or an uncompressed ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; replaces the default "console=ttyS0 panic=1 pci=off".
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// UEFI firmware (a PVH ELF such as edk2's CloudHv build, see vmm/firmware) instead of
    /// --kernel: it boots the first disk's boot loader. Implies --transport pci.
    #[arg(long, value_name = "PATH")]
    pub firmware: Option<PathBuf>,
    /// The machine identity in the SMBIOS tables: uuid=UUID[,serial=STR][,product=STR].
    #[arg(long, value_name = "SPEC")]
    pub platform: Option<String>,
    /// Number of vCPUs (1-32) [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Guest memory in MiB (at least 64) [default: 256].
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Guest serial console (COM1): stdout, file:PATH or none [default: stdout].
    #[arg(long, value_name = "TARGET")]
    pub serial: Option<String>,
    /// virtio-blk disk from a raw image: path=FILE[,readonly=on][,serial=ID][,queues=N]
    /// [,bandwidth=RATE][,bandwidth-burst=BYTES][,ops=N][,ops-burst=N] (repeatable; RATE in
    /// bytes per second, K/M/G = 1024^n).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// virtio-net NIC on a TAP device: tap=NAME[,mac=MAC][,queues=N] and the rate limit keys
    /// of --disk, which limit receiving and transmitting each on its own; the same keys with
    /// rx_ or tx_ before them (rx_bandwidth=RATE, tx_ops=N, ...) replace them for one
    /// direction (repeatable).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// Do not give the guest a virtio-rng device (it has one by default).
    #[arg(long)]
    pub no_rng: bool,
    /// Rate limit of the virtio-rng device: bandwidth=RATE[,bandwidth-burst=BYTES][,ops=N]
    /// [,ops-burst=N].
    #[arg(long, value_name = "SPEC")]
    pub rng: Option<String>,
    /// The CPU model: host (default; KVM's CPU without PMU, WAITPKG and brand string) or a
    /// fleet baseline: x86-64-v2, x86-64-v3, x86-64-v4 (see vmm/README.md).
    #[arg(long, value_name = "TEMPLATE")]
    pub cpu_template: Option<String>,
    /// How virtio devices attach: mmio (default) or pci (virtio-pci with MSI-X)
    #[arg(long, value_name = "mmio|pci")]
    pub transport: Option<String>,
    /// Serve the control API on this Unix socket (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Let the VMM's group use the API socket too (mode 0660): for a supervisor that shares
    /// the VMM's group but not its user and has no right to override file permissions.
    #[arg(long)]
    pub api_socket_group: bool,
    /// Seccomp filters: on, off (debugging only) or log (log instead of kill) [default: on].
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<String>,
    /// Use this inherited file descriptor as /dev/kvm instead of opening it.
    #[arg(long, value_name = "N")]
    pub kvm_fd: Option<i64>,
    /// Switch to UID:GID (numeric) after opening all resources; needs root.
    #[arg(long, value_name = "UID:GID")]
    pub user: Option<String>,
    /// Continue the guest of a snapshot directory (the API's `snapshot`) instead of booting:
    /// give the VM's --cpus, --memory, --transport, --cpu-template and devices as it had them
    /// (disks with their content; TAPs may be others).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Wait for a live migration from another VMM on unix:PATH or tcp:HOST:PORT and continue
    /// its guest: the VM's shape and devices as for --restore.
    #[arg(long, value_name = "ADDR")]
    pub incoming: Option<String>,
    /// JSON file with any of the settings above; command-line flags take precedence.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The JSON config file: the same settings as the command line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub firmware: Option<PathBuf>,
    pub platform: Option<PlatformConfig>,
    pub cpus: Option<u64>,
    pub cpu_template: Option<String>,
    pub memory: Option<u64>,
    pub serial: Option<String>,
    pub disks: Option<Vec<DiskConfig>>,
    pub nets: Option<Vec<NetConfig>>,
    /// true, false, or the device's rate limit: {"bandwidth": "1K"}.
    pub rng: Option<RngFile>,
    pub transport: Option<String>,
    pub api_socket: Option<PathBuf>,
    pub api_socket_group: Option<bool>,
    pub seccomp: Option<String>,
    pub kvm_fd: Option<i64>,
    pub user: Option<String>,
    pub restore: Option<PathBuf>,
    pub incoming: Option<String>,
}

impl FileConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// `"rng"` in the config file: on/off, or on with a rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RngFile {
    Enabled(bool),
    Limited(RngConfig),
}

/// What the first vCPU runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A Linux kernel loaded by the VMM (64-bit boot protocol), with its initrd and command
    /// line: the fastest boot, for guests the operator provides.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// UEFI firmware entered through PVH: it finds the boot loader on the disks, as on a
    /// physical server, so tenants can bring their own images.
    Firmware(PathBuf),
    /// No boot: the guest of a snapshot directory continues (see `persist`).
    Restore(PathBuf),
    /// No boot: a guest migrated from another VMM continues (see `persist::migration`).
    Incoming(MigrationAddr),
}

/// Where a migration target listens for its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddr {
    Unix(PathBuf),
    /// HOST:PORT, resolved when the VMM starts.
    Tcp(String),
}

impl FromStr for MigrationAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Incoming(s.chars().take(200).collect());
        match s.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(MigrationAddr::Unix(path.into())),
            Some(("tcp", addr)) => match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(MigrationAddr::Tcp(addr.to_string()))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for MigrationAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// The identity the guest reads from the SMBIOS tables (`/sys/class/dmi/id/`): what
/// cloud-init, licensing and inventory tools use to recognise the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// RFC 4122 text form; None: the tables say "no UUID".
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    /// The product name; None: "thvc-vmm".
    #[serde(default)]
    pub product: Option<String>,
}

/// The longest SMBIOS string we accept: a string in the tables is NUL-terminated text.
pub const MAX_SMBIOS_STRING_LEN: usize = 64;

/// Parses the RFC 4122 text form (8-4-4-4-12 hex digits) into its 16 bytes, in text order.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl FromStr for PlatformConfig {
    type Err = ConfigError;

    /// `uuid=UUID[,serial=STR][,product=STR]`
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Platform {
            spec: spec.to_string(),
            why,
        };
        let mut platform = PlatformConfig::default();
        for (key, value) in key_values(spec).map_err(err)? {
            match key {
                "uuid" => platform.uuid = Some(value.to_string()),
                "serial" => platform.serial = Some(value.to_string()),
                "product" => platform.product = Some(value.to_string()),
                _ => return Err(err(format!("unknown key '{key}' (uuid, serial, product)"))),
            }
        }
        platform.validate().map_err(err)?;
        Ok(platform)
    }
}

impl PlatformConfig {
    fn validate(&self) -> Result<(), String> {
        if let Some(uuid) = &self.uuid {
            if parse_uuid(uuid).is_none() {
                return Err(format!(
                    "uuid '{uuid}' is not of the form 01234567-89ab-cdef-0123-456789abcdef"
                ));
            }
        }
        for (name, value) in [("serial", &self.serial), ("product", &self.product)] {
            if let Some(v) = value {
                if v.is_empty()
                    || v.len() > MAX_SMBIOS_STRING_LEN
                    || !v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                {
                    return Err(format!(
                        "{name} must be 1-{MAX_SMBIOS_STRING_LEN} printable ASCII characters"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub boot: Boot,
    pub platform: PlatformConfig,
    pub vcpus: u8,
    pub cpu_template: CpuTemplate,
    pub memory_mib: u64,
    pub serial: SerialTarget,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// The virtio-rng device, if any.
    pub rng: Option<RngConfig>,
    pub transport: Transport,
    pub api_socket: Option<PathBuf>,
    /// The API socket is mode 0660 instead of 0600.
    pub api_socket_group: bool,
    pub sandbox: SandboxConfig,
}

impl VmConfig {
    /// The inherited descriptors the VMM was handed and uses (`--kvm-fd`, `--net fd=N`);
    /// every other inherited descriptor is closed at start.
    pub fn inherited_fds(&self) -> Vec<i32> {
        self.sandbox
            .kvm_fd
            .into_iter()
            .chain(self.nets.iter().filter_map(|n| n.fd))
            .collect()
    }

    /// Merges the command line over the config file (if any) and validates the result.
    /// `host_memory_mib` is the host's physical RAM, the upper bound for guest memory.
    pub fn from_cli(cli: Cli, host_memory_mib: u64) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file, host_memory_mib)
    }

    pub fn merge(cli: Cli, file: FileConfig, host_memory_mib: u64) -> Result<Self, ConfigError> {
        let kernel = cli.kernel.or(file.kernel);
        let firmware = cli.firmware.or(file.firmware);
        let initrd = cli.initrd.or(file.initrd);
        let cmdline = cli.cmdline.or(file.cmdline);
        let restore = cli.restore.or(file.restore);
        let incoming = cli.incoming.or(file.incoming);
        let given = [
            ("kernel", kernel.is_some()),
            ("firmware", firmware.is_some()),
            ("initrd", initrd.is_some()),
            ("cmdline", cmdline.is_some()),
        ];
        let boot = match (kernel, firmware) {
            _ if restore.is_some() || incoming.is_some() => {
                if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::RestoreWith(name));
                }
                match (restore, incoming) {
                    (Some(_), Some(_)) => return Err(ConfigError::RestoreAndIncoming),
                    (Some(dir), None) => Boot::Restore(dir),
                    (None, Some(addr)) => Boot::Incoming(addr.parse()?),
                    (None, None) => return Err(ConfigError::MissingKernel),
                }
            }
            (Some(_), Some(_)) => return Err(ConfigError::KernelAndFirmware),
            (None, None) => return Err(ConfigError::MissingKernel),
            (None, Some(firmware)) => {
                if initrd.is_some() {
                    return Err(ConfigError::FirmwareWith("initrd"));
                }
                if cmdline.is_some() {
                    return Err(ConfigError::FirmwareWith("cmdline"));
                }
                Boot::Firmware(firmware)
            }
            (Some(kernel), None) => {
                let cmdline = cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
                if cmdline.len() >= MAX_CMDLINE_LEN {
                    return Err(ConfigError::CmdlineTooLong(cmdline.len()));
                }
                if cmdline.contains('\0') {
                    return Err(ConfigError::CmdlineNul);
                }
                Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                }
            }
        };
        let platform = match (cli.platform, file.platform) {
            (Some(spec), _) => spec.parse()?,
            (None, Some(platform)) => {
                platform.validate().map_err(|why| ConfigError::Platform {
                    spec: "(config file)".into(),
                    why,
                })?;
                platform
            }
            (None, None) => PlatformConfig::default(),
        };
        let cpus = cli.cpus.or(file.cpus).unwrap_or(u64::from(DEFAULT_VCPUS));
        let vcpus = match u8::try_from(cpus) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => return Err(ConfigError::Cpus(cpus)),
        };
        let memory_mib = cli.memory.or(file.memory).unwrap_or(DEFAULT_MEMORY_MIB);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(memory_mib));
        }
        if memory_mib > host_memory_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: memory_mib,
                host: host_memory_mib,
            });
        }
        let serial = match cli.serial.or(file.serial) {
            Some(s) => s.parse()?,
            None => SerialTarget::Stdout,
        };
        // Devices: the command line's list replaces the file's when given.
        let disks: Vec<DiskConfig> = if cli.disks.is_empty() {
            let disks = file.disks.unwrap_or_default();
            for d in &disks {
                d.validate().map_err(|why| ConfigError::Disk {
                    spec: d.path.display().to_string(),
                    why,
                })?;
            }
            disks
        } else {
            cli.disks
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?
        };
        let nets = if cli.nets.is_empty() {
            let nets = file.nets.unwrap_or_default();
            for n in &nets {
                n.validate().map_err(|why| ConfigError::Net {
                    spec: n.fd.map_or_else(|| n.tap.clone(), |fd| format!("fd={fd}")),
                    why,
                })?;
            }
            nets
        } else {
            cli.nets
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?
        };
        let mut taps: Vec<String> = nets
            .iter()
            .map(|n| match n.fd {
                Some(fd) => format!("fd={fd}"),
                None => n.tap.clone(),
            })
            .collect();
        taps.sort_unstable();
        if let Some(dup) = taps.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Net {
                spec: dup[0].to_string(),
                why: "the same TAP is given twice".into(),
            });
        }
        if let Some(kvm) = cli.kvm_fd.or(file.kvm_fd) {
            if nets.iter().any(|n| n.fd.map(i64::from) == Some(kvm)) {
                return Err(ConfigError::Net {
                    spec: format!("fd={kvm}"),
                    why: "the same descriptor is also --kvm-fd".into(),
                });
            }
        }
        let rng = match (cli.no_rng, cli.rng, file.rng) {
            (true, Some(_), _) => return Err(ConfigError::RngAndNoRng),
            (true, None, _) | (false, None, Some(RngFile::Enabled(false))) => None,
            (false, Some(spec), _) => Some(spec.parse()?),
            (false, None, Some(RngFile::Limited(rng))) => {
                limits_of!(rng).map_err(|why| ConfigError::Rng {
                    spec: "(config file)".into(),
                    why,
                })?;
                Some(rng)
            }
            (false, None, Some(RngFile::Enabled(true)) | None) => Some(RngConfig::default()),
        };
        let devices = disks.len() + nets.len() + usize::from(rng.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        let transport = match (cli.transport.or(file.transport), &boot) {
            (Some(t), _) => t.parse()?,
            (None, Boot::Firmware(_)) => Transport::Pci,
            (None, Boot::Kernel { .. } | Boot::Restore(_) | Boot::Incoming(_)) => {
                Transport::default()
            }
        };
        if let Boot::Firmware(_) = boot {
            if transport != Transport::Pci {
                return Err(ConfigError::FirmwareNeedsPci);
            }
            if disks.is_empty() {
                return Err(ConfigError::FirmwareWithoutDisk);
            }
        }
        let default_queues = default_queues(transport, vcpus);
        let disks = disks
            .into_iter()
            .map(|d| DiskConfig {
                queues: Some(d.queues.unwrap_or(default_queues)),
                ..d
            })
            .collect();
        let api_socket = cli.api_socket.or(file.api_socket);
        if api_socket
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::ApiSocketEmpty);
        }
        let api_socket_group = cli.api_socket_group || file.api_socket_group.unwrap_or(false);
        if api_socket_group && api_socket.is_none() {
            return Err(ConfigError::ApiSocketGroupWithoutSocket);
        }
        let seccomp = match cli.seccomp.or(file.seccomp) {
            Some(s) => s.parse()?,
            None => SeccompMode::default(),
        };
        let kvm_fd = match cli.kvm_fd.or(file.kvm_fd) {
            Some(fd) => match i32::try_from(fd) {
                Ok(n) if n >= 3 => Some(n),
                _ => return Err(ConfigError::KvmFd(fd)),
            },
            None => None,
        };
        let user = match cli.user.or(file.user) {
            Some(s) => Some(s.parse()?),
            None => None,
        };
        let cpu_template = match cli.cpu_template.or(file.cpu_template) {
            Some(s) => s.parse()?,
            None => CpuTemplate::default(),
        };
        Ok(VmConfig {
            boot,
            platform,
            vcpus,
            cpu_template,
            memory_mib,
            serial,
            disks,
            nets,
            rng,
            transport,
            api_socket,
            api_socket_group,
            sandbox: SandboxConfig {
                seccomp,
                kvm_fd,
                user,
            },
        })
    }
}

/// The host's physical RAM in MiB, from sysinfo(2).
pub fn host_memory_mib() -> std::io::Result<u64> {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.totalram.saturating_mul(u64::from(info.mem_unit)) >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_MIB: u64 = 16 * 1024;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("thvc-vmm").chain(args.iter().copied()))
            .expect("test arguments parse")
    }

    #[test]
    fn defaults() {
        let cfg = VmConfig::merge(cli(&["--kernel", "/k"]), FileConfig::default(), HOST_MIB)
            .expect("valid");
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 256);
        assert_eq!(
            cfg.boot,
            Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: DEFAULT_CMDLINE.into()
            }
        );
        assert_eq!(cfg.serial, SerialTarget::Stdout);
        assert_eq!(cfg.platform, PlatformConfig::default());
    }

    #[test]
    fn file_supplies_everything_and_cli_wins() {
        let file = FileConfig::parse(
            r#"{"kernel": "/file-k", "initrd": "/i", "cmdline": "x=1", "cpus": 4,
                "memory": 512, "serial": "file:/tmp/s.log"}"#,
            Path::new("cfg.json"),
        )
        .expect("valid file");
        let cfg = VmConfig::merge(cli(&["--cpus", "2"]), file, HOST_MIB).expect("valid");
        assert_eq!(
            cfg.boot,
            Boot::Kernel {
                kernel: "/file-k".into(),
                initrd: Some("/i".into()),
                cmdline: "x=1".into()
            }
        );
        assert_eq!(cfg.vcpus, 2, "the command line wins over the file");
        assert_eq!(cfg.memory_mib, 512);
        assert_eq!(cfg.serial, SerialTarget::File("/tmp/s.log".into()));
    }

    #[test]
    fn firmware_boots_the_disks_over_pci() {
        let cfg = VmConfig::merge(
            cli(&["--firmware", "/fw", "--disk", "path=/d"]),
            FileConfig::default(),
            HOST_MIB,
        )
        .expect("valid");
        assert_eq!(cfg.boot, Boot::Firmware("/fw".into()));
        assert_eq!(cfg.transport, Transport::Pci, "firmware implies PCI");
        let bad = |args: &[&str]| {
            VmConfig::merge(cli(args), FileConfig::default(), HOST_MIB)
                .expect_err("must be rejected")
                .to_string()
        };
        let with_disk = |extra: &[&'static str]| {
            let mut a = vec!["--firmware", "/fw", "--disk", "path=/d"];
            a.extend_from_slice(extra);
            a
        };
        assert!(bad(&with_disk(&["--kernel", "/k"])).contains("exclude each other"));
        assert!(bad(&with_disk(&["--initrd", "/i"])).contains("--initrd needs --kernel"));
        assert!(bad(&with_disk(&["--cmdline", "x"])).contains("--cmdline needs --kernel"));
        assert!(bad(&with_disk(&["--transport", "mmio"])).contains("needs the pci transport"));
        assert!(bad(&["--firmware", "/fw"]).contains("needs a disk"));
        let file = FileConfig::parse(
            r#"{"firmware": "/fw", "disks": [{"path": "/d"}],
                "platform": {"uuid": "0123abcd-0000-4000-8000-00000000beef", "serial": "s1"}}"#,
            Path::new("c.json"),
        )
        .expect("valid file");
        let cfg = VmConfig::merge(Cli::default(), file, HOST_MIB).expect("valid");
        assert_eq!(cfg.boot, Boot::Firmware("/fw".into()));
        assert_eq!(cfg.platform.serial.as_deref(), Some("s1"));
    }

    #[test]
    fn platform_identity() {
        let p: PlatformConfig = "uuid=0123ABCD-0000-4000-8000-00000000beef,serial=vm 7,product=p"
            .parse()
            .expect("valid");
        assert_eq!(
            parse_uuid(p.uuid.as_deref().expect("uuid")),
            Some([0x01, 0x23, 0xab, 0xcd, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0xbe, 0xef])
        );
        assert_eq!(
            (p.serial.as_deref(), p.product.as_deref()),
            (Some("vm 7"), Some("p"))
        );
        for (spec, why) in [
            (
                "uuid=0123abcd-0000-4000-8000-00000000bee",
                "not of the form",
            ),
            ("uuid=0123abcd00004000800000000000beef", "not of the form"),
            (
                "uuid=0123abcg-0000-4000-8000-00000000beef",
                "not of the form",
            ),
            (
                "uuid=+123abcd-0000-4000-8000-00000000beef",
                "not of the form",
            ),
            ("serial=", "1-64 printable"),
            ("serial=tab\there", "1-64 printable"),
            ("product=é", "1-64 printable"),
            ("vendor=x", "unknown key 'vendor'"),
        ] {
            let err = spec.parse::<PlatformConfig>().expect_err(spec).to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
        let long = format!("serial={}", "x".repeat(MAX_SMBIOS_STRING_LEN + 1));
        assert!(long.parse::<PlatformConfig>().is_err());
    }

    #[test]
    fn unknown_field_in_file_is_rejected() {
        let err = FileConfig::parse(r#"{"kernel": "/k", "cpu": 2}"#, Path::new("c.json"))
            .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
        assert!(err.to_string().contains("c.json"), "{err}");
    }

    #[test]
    fn wrong_type_in_file_is_rejected() {
        let err = FileConfig::parse(r#"{"cpus": "two"}"#, Path::new("c.json")).expect_err("type");
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn limits() {
        let bad = |args: &[&str]| {
            VmConfig::merge(cli(args), FileConfig::default(), HOST_MIB)
                .expect_err("must be rejected")
                .to_string()
        };
        assert!(bad(&["--kernel", "k", "--cpus", "0"]).contains("between 1 and 32"));
        assert!(bad(&["--kernel", "k", "--cpus", "33"]).contains("between 1 and 32"));
        assert!(bad(&["--kernel", "k", "--cpus", "4294967297"]).contains("between 1 and 32"));
        assert!(bad(&["--kernel", "k", "--memory", "63"]).contains("at least 64"));
        assert!(bad(&["--kernel", "k", "--memory", "16385"]).contains("more than this host"));
        assert!(bad(&["--cpus", "2"]).contains("nothing to boot"));
        assert!(bad(&["--kernel", "k", "--serial", "tty"]).contains("invalid serial"));
        assert!(bad(&["--kernel", "k", "--serial", "file:"]).contains("invalid serial"));
        let long = "a".repeat(MAX_CMDLINE_LEN);
        assert!(bad(&["--kernel", "k", "--cmdline", &long]).contains("limit is 2047"));
        assert!(bad(&["--kernel", "k", "--cpu-template", "skylake"])
            .contains("--cpu-template: unknown CPU template \"skylake\""));
        let merge = |args: &[&str], file: &str| {
            VmConfig::merge(
                cli(args),
                FileConfig::parse(file, Path::new("c")).expect("file"),
                HOST_MIB,
            )
            .expect("valid")
            .cpu_template
        };
        assert_eq!(merge(&["--kernel", "k"], "{}"), CpuTemplate::Host);
        let v3 = r#"{"cpu_template": "x86-64-v3"}"#;
        assert_eq!(merge(&["--kernel", "k"], v3), CpuTemplate::X86_64V3);
        let cli_wins = merge(&["--kernel", "k", "--cpu-template", "x86-64-v2"], v3);
        assert_eq!(cli_wins, CpuTemplate::X86_64V2);
        let ok = VmConfig::merge(
            cli(&["--kernel", "k", "--cpus", "32", "--memory", "64"]),
            FileConfig::default(),
            HOST_MIB,
        )
        .expect("edge values are valid");
        assert_eq!((ok.vcpus, ok.memory_mib), (32, 64));
    }

    #[test]
    fn nets_on_handed_tap_descriptors() {
        let cfg = VmConfig::merge(
            cli(&[
                "--kernel",
                "k",
                "--net",
                "fd=5,mac=52:54:00:00:00:01",
                "--net",
                "fd=6",
            ]),
            FileConfig::default(),
            HOST_MIB,
        )
        .expect("valid");
        assert_eq!((cfg.nets[0].fd, cfg.nets[0].tap.as_str()), (Some(5), ""));
        assert_eq!(cfg.nets[1].fd, Some(6));
        let file = FileConfig::parse(r#"{"kernel": "k", "nets": [{"fd": 7}]}"#, Path::new("c"))
            .expect("parses");
        let cfg = VmConfig::merge(cli(&[]), file, HOST_MIB).expect("valid");
        assert_eq!(cfg.nets[0].fd, Some(7));
        let bad = |args: &[&str]| {
            let mut all = vec!["--kernel", "k"];
            all.extend_from_slice(args);
            VmConfig::merge(cli(&all), FileConfig::default(), HOST_MIB)
                .expect_err("must be rejected")
                .to_string()
        };
        assert!(bad(&["--net", "fd=5,tap=t0"]).contains("not both"));
        assert!(bad(&["--net", "fd=2"]).contains("not an inherited descriptor"));
        assert!(bad(&["--net", "fd=x"]).contains("not a number"));
        assert!(bad(&["--net", "mac=52:54:00:00:00:01"]).contains("is required"));
        assert!(bad(&["--net", "fd=5", "--net", "fd=5"]).contains("twice"));
        assert!(bad(&["--net", "fd=5", "--kvm-fd", "5"]).contains("also --kvm-fd"));
    }

    #[test]
    fn disks_and_nets_from_flags() {
        let cfg = VmConfig::merge(
            cli(&[
                "--kernel",
                "k",
                "--disk",
                "path=/img/root.raw",
                "--disk",
                "path=/img/data.raw,readonly=on,serial=data-1",
                "--net",
                "tap=tap0,mac=52:54:00:00:00:01",
                "--net",
                "tap=tap1",
                "--no-rng",
            ]),
            FileConfig::default(),
            HOST_MIB,
        )
        .expect("valid");
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.disks[1].path, PathBuf::from("/img/data.raw"));
        assert!(cfg.disks[1].readonly && !cfg.disks[0].readonly);
        assert_eq!(cfg.disks[1].serial.as_deref(), Some("data-1"));
        assert_eq!(cfg.nets[0].mac.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(cfg.nets[1].tap, "tap1");
        assert!(cfg.rng.is_none());
    }

    #[test]
    fn queues_default_to_one_per_vcpu_on_pci_and_one_on_mmio() {
        let merge = |args: &[&str]| {
            let mut all = vec!["--kernel", "k", "--cpus", "4"];
            all.extend_from_slice(args);
            VmConfig::merge(cli(&all), FileConfig::default(), HOST_MIB).expect("valid")
        };
        let pci = merge(&[
            "--transport",
            "pci",
            "--disk",
            "path=/a",
            "--disk",
            "path=/b,queues=2",
        ]);
        assert_eq!(pci.transport, Transport::Pci);
        assert_eq!(pci.disks[0].queues, Some(4), "one per vCPU");
        assert_eq!(pci.disks[1].queues, Some(2), "as asked");
        let mmio = merge(&["--disk", "path=/a", "--net", "tap=t0,queues=3"]);
        assert_eq!(mmio.transport, Transport::Mmio, "the default");
        assert_eq!(mmio.disks[0].queues, Some(1));
        assert_eq!(mmio.nets[0].queues, Some(3));
    }

    #[test]
    fn devices_from_file() {
        let file = FileConfig::parse(
            r#"{"kernel": "k", "disks": [{"path": "/a", "readonly": true}],
                "nets": [{"tap": "tap9"}], "rng": true}"#,
            Path::new("c.json"),
        )
        .expect("valid");
        let cfg = VmConfig::merge(cli(&[]), file, HOST_MIB).expect("valid");
        assert_eq!(cfg.disks[0].path, PathBuf::from("/a"));
        assert!(cfg.disks[0].readonly);
        assert_eq!(cfg.nets[0].tap, "tap9");
        assert!(cfg.rng.is_some(), "rng is on by default");
        let unknown =
            FileConfig::parse(r#"{"disks": [{"path": "/a", "ro": true}]}"#, Path::new("c"));
        assert!(unknown.is_err(), "unknown disk field");
    }

    #[test]
    fn rate_limits_from_flags_and_file() {
        let merge = |args: &[&str], file: &str| {
            let mut all = vec!["--kernel", "k"];
            all.extend_from_slice(args);
            let file = FileConfig::parse(file, Path::new("c.json")).expect("valid file");
            VmConfig::merge(cli(&all), file, HOST_MIB)
        };
        let cfg = merge(
            &[
                "--disk",
                "path=/a,bandwidth=10M,ops=2000,bandwidth-burst=512K",
                "--net",
                "tap=t0,bandwidth=1G,ops-burst=5,ops=100",
                "--rng",
                "bandwidth=1K",
            ],
            "{}",
        )
        .expect("valid");
        let disk = cfg.disks[0].limits();
        assert_eq!(disk.bandwidth, Some(10 << 20), "M is 1024 * 1024");
        assert_eq!(disk.bandwidth_burst, Some(512 << 10));
        assert_eq!((disk.ops, disk.ops_burst), (Some(2000), None));
        let (rx, tx) = cfg.nets[0].limits();
        assert_eq!(
            rx, tx,
            "without rx_/tx_ keys both directions get the same limit"
        );
        assert_eq!(
            (rx.bandwidth, rx.ops, rx.ops_burst),
            (Some(1 << 30), Some(100), Some(5))
        );
        assert_eq!(cfg.rng.expect("rng").limits().bandwidth, Some(1024));
        let cfg = merge(
            &[],
            r#"{"disks": [{"path": "/a", "bandwidth": "10M", "ops": 2000}],
                "nets": [{"tap": "t0", "bandwidth_burst": 4096, "bandwidth": 8192}],
                "rng": {"bandwidth": "2K"}}"#,
        )
        .expect("valid");
        assert_eq!(cfg.disks[0].limits().bandwidth, Some(10 << 20));
        assert_eq!(cfg.disks[0].limits().ops, Some(2000));
        assert_eq!(cfg.nets[0].limits().0.bandwidth_burst, Some(4096));
        assert_eq!(cfg.nets[0].limits().1.bandwidth_burst, Some(4096));
        assert_eq!(cfg.rng.expect("rng").limits().bandwidth, Some(2048));
        assert!(merge(&[], r#"{"rng": false}"#)
            .expect("valid")
            .rng
            .is_none());
        let bad = |args: &[&str], file: &str| {
            merge(args, file).expect_err("must be rejected").to_string()
        };
        assert!(bad(&["--disk", "path=/a,bandwidth=fast"], "{}").contains("bandwidth"));
        assert!(bad(&["--disk", "path=/a,bandwidth=10MB"], "{}").contains("K, M or G"));
        assert!(bad(&["--disk", "path=/a,ops=2K"], "{}").contains("ops"));
        assert!(bad(&["--disk", "path=/a,bandwidth=99999999999G"], "{}").contains("too large"));
        assert!(bad(&["--net", "tap=t0,ops-burst=3"], "{}").contains("ops-burst needs ops"));
        assert!(
            bad(&["--disk", "path=/a,bandwidth=1M,bandwidth-burst=0"], "{}").contains("at least 1")
        );
        assert!(bad(&["--rng", "bandwidth=1K", "--no-rng"], "{}").contains("exclude"));
        assert!(bad(&["--rng", "speed=1K"], "{}").contains("unknown key 'speed'"));
        assert!(bad(&[], r#"{"disks": [{"path": "/a", "ops": "x"}]}"#).contains("ops"));
        assert!(bad(&[], r#"{"rng": {"bandwidth": "1T"}}"#).contains("--rng"));
    }

    #[test]
    fn a_nics_directions_take_their_own_limits_over_the_shared_ones() {
        use crate::rate_limiter::RateLimiter;
        use std::time::Duration;
        let merge = |args: &[&str], file: &str| {
            let mut all = vec!["--kernel", "k"];
            all.extend_from_slice(args);
            let file = FileConfig::parse(file, Path::new("c.json")).expect("valid file");
            VmConfig::merge(cli(&all), file, HOST_MIB)
        };
        let nic = |spec: &str| {
            merge(&["--net", spec], "{}")
                .unwrap_or_else(|e| panic!("{spec}: {e}"))
                .nets[0]
                .limits()
        };
        let limit = |bandwidth, bandwidth_burst, ops, ops_burst| LimitConfig {
            bandwidth,
            bandwidth_burst,
            ops,
            ops_burst,
        };
        // Shared keys for both, a direction's key replaces one of them for that direction.
        let (rx, tx) = nic("tap=t0,bandwidth=10M,ops=100,rx_bandwidth=1M,tx_ops=5");
        assert_eq!(rx, limit(Some(1 << 20), None, Some(100), None));
        assert_eq!(tx, limit(Some(10 << 20), None, Some(5), None));
        // Only one direction limited; both spellings of the bursts.
        let (rx, tx) = nic("tap=t0,tx_bandwidth=2K,tx_bandwidth-burst=512,rx_ops=7,rx_ops_burst=2");
        assert_eq!(rx, limit(None, None, Some(7), Some(2)));
        assert_eq!(tx, limit(Some(2048), Some(512), None, None));
        // A shared burst goes with its rate: kept where the direction sets another rate,
        // dropped where the direction removes the rate ("0": unlimited).
        let (rx, tx) =
            nic("tap=t0,bandwidth=10M,bandwidth-burst=1M,rx_bandwidth=0,tx_bandwidth=20M");
        assert_eq!(rx, limit(Some(0), None, None, None));
        assert_eq!(tx, limit(Some(20 << 20), Some(1 << 20), None, None));
        assert!(RateLimiter::new(&rx, Duration::ZERO).is_unlimited());
        // A direction's own burst over the shared rate.
        let (rx, tx) = nic("tap=t0,ops=100,rx_ops-burst=1");
        assert_eq!(rx, limit(None, None, Some(100), Some(1)));
        assert_eq!(tx, limit(None, None, Some(100), None));
        // The JSON config file: the same keys.
        let cfg = merge(
            &[],
            r#"{"nets": [{"tap": "t0", "bandwidth": "1M", "rx_bandwidth": 4096,
                          "tx_ops": 10, "tx_ops-burst": 3, "rx_bandwidth_burst": 100}]}"#,
        )
        .expect("valid");
        let (rx, tx) = cfg.nets[0].limits();
        assert_eq!(rx, limit(Some(4096), Some(100), None, None));
        assert_eq!(tx, limit(Some(1 << 20), None, Some(10), Some(3)));
        // Invalid combinations, each named.
        let bad = |args: &[&str], file: &str| {
            merge(args, file).expect_err("must be rejected").to_string()
        };
        for (spec, why) in [
            (
                "tap=t0,rx_bandwidth=fast",
                "rx_bandwidth: 'fast' is not a number",
            ),
            ("tap=t0,tx_ops=2K", "tx_ops: '2K'"),
            (
                "tap=t0,rx_bandwidth-burst=4K",
                "rx_bandwidth-burst needs a rx_bandwidth or bandwidth",
            ),
            (
                "tap=t0,bandwidth=1M,tx_bandwidth=0,tx_bandwidth-burst=4K",
                "tx_bandwidth-burst needs",
            ),
            (
                "tap=t0,tx_ops-burst=3",
                "tx_ops-burst needs a tx_ops or ops",
            ),
            (
                "tap=t0,ops=5,rx_ops-burst=0",
                "rx_*: a burst must be at least 1",
            ),
            (
                "tap=t0,bandwidth-burst=4K,rx_bandwidth=1M",
                "bandwidth-burst needs a bandwidth",
            ),
            ("tap=t0,rx_speed=1M", "unknown key 'rx_speed'"),
            ("tap=t0,rx_=1M", "unknown key 'rx_'"),
            ("tap=t0,up_bandwidth=1M", "unknown key 'up_bandwidth'"),
        ] {
            let e = bad(&["--net", spec], "{}");
            assert!(e.contains(why), "{spec}: {e}");
        }
        let e = bad(&[], r#"{"nets": [{"tap": "t0", "tx_ops_burst": 3}]}"#);
        assert!(e.contains("tx_ops-burst needs"), "{e}");
        let e = FileConfig::parse(
            r#"{"nets": [{"tap": "t0", "rx_speed": 3}]}"#,
            Path::new("c"),
        )
        .expect_err("unknown field")
        .to_string();
        assert!(e.contains("rx_speed"), "{e}");
    }

    #[test]
    fn bad_device_specs() {
        let bad = |args: &[&str]| {
            let mut all = vec!["--kernel", "k"];
            all.extend_from_slice(args);
            VmConfig::merge(cli(&all), FileConfig::default(), HOST_MIB)
                .expect_err("must be rejected")
                .to_string()
        };
        assert!(bad(&["--disk", "/img"]).contains("not key=value"));
        assert!(bad(&["--disk", "readonly=on"]).contains("path is required"));
        assert!(bad(&["--disk", "path=/a,readonly=maybe"]).contains("not on or off"));
        assert!(bad(&["--disk", "path=/a,cache=none"]).contains("unknown key 'cache'"));
        assert!(bad(&["--disk", "path=/a,serial=012345678901234567890"]).contains("at most 20"));
        assert!(bad(&["--net", "tap=this-name-is-too-long"]).contains("1-15 bytes"));
        assert!(bad(&["--net", "tap=t0,mac=01:00:5e:00:00:01"]).contains("not a unicast"));
        assert!(bad(&["--net", "tap=t0,mac=52:54"]).contains("not of the form"));
        assert!(bad(&["--net", "tap=t0", "--net", "tap=t0"]).contains("twice"));
        assert!(bad(&["--disk", "path=/a,queues=0"]).contains("from 1 to 16"));
        assert!(bad(&["--disk", "path=/a,queues=17"]).contains("from 1 to 16"));
        assert!(bad(&["--net", "tap=t0,queues=x"]).contains("from 1 to 16"));
        assert!(bad(&["--net", "fd=5,queues=2"]).contains("queues needs tap=NAME"));
        assert!(bad(&["--transport", "isa"]).contains("expected mmio or pci"));
        let many: Vec<String> = (0..17).map(|i| format!("path=/d{i}")).collect();
        let mut args = Vec::new();
        for m in &many {
            args.extend_from_slice(&["--disk", m.as_str()]);
        }
        assert!(bad(&args).contains("at most 16"));
    }

    #[test]
    fn sandbox_and_api_settings() {
        let cfg = VmConfig::merge(cli(&["--kernel", "k"]), FileConfig::default(), HOST_MIB)
            .expect("valid");
        assert_eq!(cfg.sandbox, SandboxConfig::default());
        assert_eq!(cfg.sandbox.seccomp, SeccompMode::On, "on by default");
        assert_eq!(cfg.api_socket, None);
        assert!(!cfg.api_socket_group);
        let file = FileConfig::parse(
            r#"{"kernel": "/k", "api_socket": "/run/vm.sock", "api_socket_group": true,
                "seccomp": "log", "kvm_fd": 7, "user": "1000:1001"}"#,
            Path::new("c.json"),
        )
        .expect("valid file");
        let cfg = VmConfig::merge(cli(&["--seccomp", "off"]), file, HOST_MIB).expect("valid");
        assert_eq!(cfg.api_socket, Some(PathBuf::from("/run/vm.sock")));
        assert!(cfg.api_socket_group);
        assert_eq!(
            cfg.sandbox.seccomp,
            SeccompMode::Off,
            "the command line wins"
        );
        assert_eq!(cfg.sandbox.kvm_fd, Some(7));
        assert_eq!(
            cfg.sandbox.user,
            Some(UserIds {
                uid: 1000,
                gid: 1001
            })
        );
    }

    #[test]
    fn bad_sandbox_settings_are_rejected() {
        let bad = |args: &[&str]| {
            VmConfig::merge(cli(args), FileConfig::default(), HOST_MIB)
                .expect_err("must be rejected")
                .to_string()
        };
        assert!(bad(&["--kernel", "k", "--seccomp", "maybe"]).contains("invalid seccomp"));
        assert!(bad(&["--kernel", "k", "--api-socket-group"]).contains("no api socket"));
        for user in [
            "1000",
            "0:0",
            "1000:0",
            "a:b",
            ":5",
            "5:",
            "+5:5",
            "4294967295:5",
            "99999999999:5",
        ] {
            assert!(
                bad(&["--kernel", "k", "--user", user]).contains("invalid user"),
                "{user}"
            );
        }
        for fd in ["0", "2", "4294967296"] {
            assert!(
                bad(&["--kernel", "k", "--kvm-fd", fd]).contains("invalid kvm fd"),
                "{fd}"
            );
        }
        let empty_socket =
            FileConfig::parse(r#"{"kernel": "k", "api_socket": ""}"#, Path::new("c"))
                .expect("parses");
        let err = VmConfig::merge(cli(&[]), empty_socket, HOST_MIB).expect_err("empty path");
        assert!(err.to_string().contains("must not be empty"), "{err}");
    }

    #[test]
    fn serial_round_trip() {
        for s in ["stdout", "none", "file:/var/log/x.log"] {
            assert_eq!(s.parse::<SerialTarget>().expect("valid").to_string(), s);
        }
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().expect("sysinfo") > 0);
    }
}
