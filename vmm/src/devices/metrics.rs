//! Device counters for the control API's `info`: each device registers itself once, gets a
//! [`Counter`] per thing it counts (bytes, requests, errors, ...) and bumps it from whatever
//! thread does the work (vCPU or device worker). A device that already keeps counters (the
//! virtio devices' `DeviceCounters`) registers them as a [`CounterSource`] instead. Counters are
//! relaxed atomics: cheap enough for every request and packet, and `info` only needs a
//! consistent-enough snapshot.
//!
//! ```text
//! let dev = registry.register("blk0", "virtio-blk");
//! let read_bytes = dev.counter("read_bytes");
//! read_bytes.add(n);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::virtio::{CounterKind, DeviceCounters};

/// One monotonically increasing count.
#[derive(Clone, Default, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Anything that keeps its own counters and can report them by name, such as the virtio
/// devices' [`DeviceCounters`].
pub trait CounterSource: Send + Sync {
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Per-queue counts, if the device has queues.
    fn queues(&self) -> Vec<u64> {
        Vec::new()
    }
}

impl CounterSource for DeviceCounters {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        match self.kind {
            CounterKind::Disk => vec![
                ("requests", get(&self.requests)),
                ("bytes_read", get(&self.bytes_read)),
                ("bytes_written", get(&self.bytes_written)),
                ("errors", get(&self.errors)),
            ],
            CounterKind::Net => vec![
                ("rx_bytes", get(&self.rx_bytes)),
                ("rx_packets", get(&self.rx_packets)),
                ("tx_bytes", get(&self.tx_bytes)),
                ("tx_packets", get(&self.tx_packets)),
                ("errors", get(&self.errors)),
            ],
            CounterKind::Entropy => vec![
                ("requests", get(&self.requests)),
                ("bytes", get(&self.bytes_read)),
                ("errors", get(&self.errors)),
            ],
        }
    }

    fn queues(&self) -> Vec<u64> {
        self.queue_used
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// Where a device sits on PCI, for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciLocation {
    /// Domain:bus:device.function, as lspci prints it.
    pub bdf: String,
    pub vendor_id: String,
    pub device_id: String,
    /// MSI-X vectors: one per queue and one for configuration changes.
    pub msix_vectors: usize,
}

struct DeviceEntry {
    name: String,
    kind: String,
    pci: std::sync::OnceLock<PciLocation>,
    counters: Mutex<Vec<(String, Counter)>>,
    source: Option<Arc<dyn CounterSource>>,
}

/// A registered device: hands out its counters.
#[derive(Clone)]
pub struct DeviceMetrics(Arc<DeviceEntry>);

impl DeviceMetrics {
    /// The counter called `name`; asking twice for the same name gives the same counter.
    pub fn counter(&self, name: &str) -> Counter {
        let mut counters = self.0.counters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = counters.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let counter = Counter::default();
        counters.push((name.to_string(), counter.clone()));
        counter
    }
}

/// All devices of the VM, in registration order.
#[derive(Clone, Default)]
pub struct DeviceRegistry {
    devices: Arc<Mutex<Vec<DeviceMetrics>>>,
}

/// What `info` reports for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSnapshot {
    pub name: String,
    pub kind: String,
    /// Counter name to value, sorted by name.
    pub counters: serde_json::Map<String, serde_json::Value>,
    /// Buffers each queue used, by queue number (virtio devices).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queue_used: Vec<u64>,
    /// Where it is on PCI (virtio devices on the PCI transport).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciLocation>,
}

impl DeviceRegistry {
    pub fn register(&self, name: &str, kind: &str) -> DeviceMetrics {
        self.add(name, kind, None)
    }

    /// Registers a device that keeps its own counters.
    pub fn register_source(&self, name: &str, kind: &str, source: Arc<dyn CounterSource>) {
        self.add(name, kind, Some(source));
    }

    /// Records where the device called `name` sits on PCI.
    pub fn set_pci_location(&self, name: &str, location: PciLocation) {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.iter().find(|d| d.0.name == name) {
            let _ = d.0.pci.set(location);
        }
    }

    fn add(&self, name: &str, kind: &str, source: Option<Arc<dyn CounterSource>>) -> DeviceMetrics {
        let dev = DeviceMetrics(Arc::new(DeviceEntry {
            name: name.to_string(),
            kind: kind.to_string(),
            pci: std::sync::OnceLock::new(),
            counters: Mutex::new(Vec::new()),
            source,
        }));
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dev.clone());
        dev
    }

    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices
            .iter()
            .map(|d| {
                let counters = d.0.counters.lock().unwrap_or_else(|e| e.into_inner());
                let mut all: serde_json::Map<String, serde_json::Value> = counters
                    .iter()
                    .map(|(n, c)| (n.clone(), c.get().into()))
                    .collect();
                if let Some(source) = &d.0.source {
                    all.extend(
                        source
                            .counters()
                            .into_iter()
                            .map(|(n, v)| (n.to_string(), v.into())),
                    );
                }
                DeviceSnapshot {
                    name: d.0.name.clone(),
                    kind: d.0.kind.clone(),
                    counters: all,
                    queue_used: d.0.source.as_ref().map(|s| s.queues()).unwrap_or_default(),
                    pci: d.0.pci.get().cloned(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_between_threads_and_reported() {
        let registry = DeviceRegistry::default();
        let serial = registry.register("serial0", "serial");
        let blk = registry.register("blk0", "virtio-blk");
        let tx = serial.counter("tx_bytes");
        tx.add(5);
        serial.counter("tx_bytes").add(2);
        let reads = blk.counter("reads");
        let from_other_thread = reads.clone();
        std::thread::spawn(move || from_other_thread.inc())
            .join()
            .expect("thread");
        blk.counter("read_bytes");
        let snap = registry.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(
            (snap[0].name.as_str(), snap[0].kind.as_str()),
            ("serial0", "serial")
        );
        assert_eq!(snap[0].counters["tx_bytes"], 7);
        assert_eq!(
            serde_json::to_string(&snap[1]).expect("json"),
            r#"{"name":"blk0","kind":"virtio-blk","counters":{"read_bytes":0,"reads":1}}"#
        );
    }

    #[test]
    fn pci_devices_say_where_they_are() {
        let registry = DeviceRegistry::default();
        registry.register("serial0", "serial");
        registry.register_source("blk0", "virtio-blk", Arc::new(DeviceCounters::default()));
        registry.set_pci_location(
            "blk0",
            PciLocation {
                bdf: "0000:00:01.0".into(),
                vendor_id: "0x1af4".into(),
                device_id: "0x1042".into(),
                msix_vectors: 2,
            },
        );
        registry.set_pci_location(
            "absent",
            PciLocation {
                bdf: String::new(),
                vendor_id: String::new(),
                device_id: String::new(),
                msix_vectors: 0,
            },
        );
        let snap = serde_json::to_value(registry.snapshot()).expect("json");
        assert!(snap[0].get("pci").is_none(), "not on PCI: no key");
        assert_eq!(snap[1]["pci"]["bdf"], "0000:00:01.0");
        assert_eq!(snap[1]["pci"]["device_id"], "0x1042");
        assert_eq!(snap[1]["pci"]["msix_vectors"], 2);
    }

    #[test]
    fn virtio_counters_are_reported_live_and_named_for_what_they_count() {
        let registry = DeviceRegistry::default();
        let rng = Arc::new(DeviceCounters::with_queues(CounterKind::Entropy, 1));
        registry.register_source("virtio-rng0", "virtio-rng", rng.clone());
        let net = Arc::new(DeviceCounters::with_queues(CounterKind::Net, 2));
        registry.register_source("net0", "virtio-net", net.clone());
        DeviceCounters::add(&rng.requests, 2);
        DeviceCounters::add(&rng.bytes_read, 64);
        DeviceCounters::add(&net.rx_bytes, 1500);
        DeviceCounters::add(&net.rx_packets, 1);
        DeviceCounters::add(&net.tx_bytes, 60);
        DeviceCounters::add(&net.tx_packets, 2);
        let snap = registry.snapshot();
        assert_eq!(snap[0].kind, "virtio-rng");
        assert_eq!(snap[0].counters["requests"], 2);
        assert_eq!(snap[0].counters["bytes"], 64);
        assert_eq!(snap[0].counters["errors"], 0);
        let names: Vec<&str> = snap[1].counters.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["errors", "rx_bytes", "rx_packets", "tx_bytes", "tx_packets"]
        );
        assert_eq!(snap[1].counters["rx_bytes"], 1500);
        assert_eq!(snap[1].counters["tx_packets"], 2);
    }
}
