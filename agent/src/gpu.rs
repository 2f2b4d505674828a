//! GPU inventory: which accelerators this node has and how they are doing.
//!
//! [`Inventory`] is the boundary. [`NvmlInventory`] asks the NVIDIA driver through nvml-wrapper
//! (which holds the FFI; this crate stays `unsafe`-free). [`FakeInventory`] returns what a test
//! configured. [`detect`] never fails: without a driver it logs one line and returns an empty
//! inventory, and the agent runs CPU-only workers.

use std::fmt;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use serde::Serialize;

/// One GPU as the driver reports it. Figures the driver cannot give (a consumer card without
/// power readings, say) are `None` rather than an error for the whole device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// NVML UUID, e.g. `GPU-8d2b...`.
    pub uuid: String,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total framebuffer memory in bytes.
    pub memory_total_bytes: u64,
    /// Used framebuffer memory in bytes.
    pub memory_used_bytes: u64,
    /// GPU utilization in percent over the driver's last sample period.
    pub utilization_percent: Option<u32>,
    /// Die temperature in °C.
    pub temperature_c: Option<u32>,
    /// Power draw in milliwatts.
    pub power_mw: Option<u32>,
    /// PCI bus id, e.g. `00000000:3B:00.0`.
    pub pci_bus_id: Option<String>,
}

/// Registers the GPUs' figures, read from `inventory` at every scrape (nothing when it finds
/// no GPU or no driver).
pub fn register_metrics(registry: &mut crate::metrics::Registry, inventory: Arc<dyn Inventory>) {
    registry.register_collector(crate::metrics::collector("gpus", move |s| {
        let gpus = inventory
            .snapshot()
            .map(|snap| snap.gpus)
            .unwrap_or_default();
        type Field = fn(&GpuInfo) -> Option<f64>;
        let families: [(&str, &str, Field); 5] = [
            ("kvfleet_gpu_memory_used_bytes", "GPU memory in use", |g| {
                Some(g.memory_used_bytes as f64)
            }),
            (
                "kvfleet_gpu_memory_total_bytes",
                "GPU memory installed",
                |g| Some(g.memory_total_bytes as f64),
            ),
            (
                "kvfleet_gpu_utilization_ratio",
                "GPU busy fraction over the driver's last sample",
                |g| g.utilization_percent.map(|u| f64::from(u) / 100.0),
            ),
            (
                "kvfleet_gpu_temperature_celsius",
                "GPU die temperature",
                |g| g.temperature_c.map(f64::from),
            ),
            ("kvfleet_gpu_power_watts", "GPU power draw", |g| {
                g.power_mw.map(|p| f64::from(p) / 1000.0)
            }),
        ];
        for (name, help, field) in families {
            let samples = gpus.iter().filter_map(|g| {
                let labels = [("gpu", g.index.to_string()), ("uuid", g.uuid.clone())];
                field(g).map(|value| (labels, value))
            });
            s.gauges(name, help, samples)?;
        }
        Ok(())
    }));
}

/// The node's accelerators and driver.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Snapshot {
    /// Driver version, when a driver is loaded.
    pub driver_version: Option<String>,
    /// CUDA version the driver supports, e.g. `12.8`.
    pub cuda_version: Option<String>,
    /// The GPUs, by index.
    pub gpus: Vec<GpuInfo>,
}

/// Why the inventory could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// No NVIDIA driver (or no NVML library): the node is CPU-only.
    #[error("no NVIDIA driver: {0}")]
    NoDriver(String),
    /// The driver answered with an error.
    #[error("NVML query {call} failed: {reason}")]
    Query {
        /// What was asked.
        call: &'static str,
        /// The driver's answer.
        reason: String,
    },
}

/// A source of GPU facts.
pub trait Inventory: Send + Sync + fmt::Debug {
    /// Reads every GPU's current figures.
    fn snapshot(&self) -> Result<Snapshot, InventoryError>;
}

/// The real inventory, through NVML.
pub struct NvmlInventory {
    nvml: Nvml,
}

impl fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmlInventory").finish_non_exhaustive()
    }
}

impl NvmlInventory {
    /// Loads NVML. Fails (without panicking) when no driver is installed.
    pub fn init() -> Result<Self, InventoryError> {
        Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| InventoryError::NoDriver(e.to_string()))
    }
}

fn query<T>(
    call: &'static str,
    result: Result<T, nvml_wrapper::error::NvmlError>,
) -> Result<T, InventoryError> {
    result.map_err(|e| InventoryError::Query {
        call,
        reason: e.to_string(),
    })
}

impl Inventory for NvmlInventory {
    fn snapshot(&self) -> Result<Snapshot, InventoryError> {
        let count = query("device_count", self.nvml.device_count())?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = query("device_by_index", self.nvml.device_by_index(index))?;
            let memory = query("memory_info", device.memory_info())?;
            gpus.push(GpuInfo {
                index,
                uuid: query("uuid", device.uuid())?,
                name: query("name", device.name())?,
                memory_total_bytes: memory.total,
                memory_used_bytes: memory.used,
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                power_mw: device.power_usage().ok(),
                pci_bus_id: device.pci_info().ok().map(|p| p.bus_id),
            });
        }
        let cuda_version = self.nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        });
        Ok(Snapshot {
            driver_version: self.nvml.sys_driver_version().ok(),
            cuda_version,
            gpus,
        })
    }
}

/// A configurable inventory for tests: returns `snapshot`, or `error` when set.
#[derive(Debug, Clone, Default)]
pub struct FakeInventory {
    /// What `snapshot` returns.
    pub snapshot: Snapshot,
    /// When set, `snapshot` fails with this instead.
    pub error: Option<InventoryError>,
}

impl FakeInventory {
    /// `count` identical 80 GB GPUs with a driver. Each has a UUID of its own, as real ones do:
    /// the control plane refuses a GPU UUID another node owns, so two fake nodes must not share
    /// them.
    pub fn gpus(count: u32) -> Self {
        Self {
            snapshot: Snapshot {
                driver_version: Some("570.00.00".into()),
                cuda_version: Some("12.8".into()),
                gpus: (0..count)
                    .map(|index| GpuInfo {
                        index,
                        uuid: format!("GPU-{}", uuid::Uuid::new_v4()),
                        name: "Fake GPU 80GB".into(),
                        memory_total_bytes: 80 << 30,
                        memory_used_bytes: 1 << 30,
                        utilization_percent: Some(0),
                        temperature_c: Some(40),
                        power_mw: Some(70_000),
                        pci_bus_id: Some(format!("00000000:{:02X}:00.0", 0x10 + index)),
                    })
                    .collect(),
            },
            error: None,
        }
    }
}

impl Inventory for FakeInventory {
    fn snapshot(&self) -> Result<Snapshot, InventoryError> {
        match &self.error {
            Some(error) => Err(error.clone()),
            None => Ok(self.snapshot.clone()),
        }
    }
}

/// An inventory that is always empty: what a node without a driver has.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl Inventory for NoGpus {
    fn snapshot(&self) -> Result<Snapshot, InventoryError> {
        Ok(Snapshot::default())
    }
}

/// The node's inventory: NVML when a driver is present, otherwise [`NoGpus`] after one clear log
/// line. Never fails and never panics.
pub fn detect() -> Box<dyn Inventory> {
    match NvmlInventory::init() {
        Ok(nvml) => Box::new(nvml),
        Err(e) => {
            tracing::info!(reason = %e, "no NVIDIA driver found: this node runs CPU-only workers");
            Box::new(NoGpus)
        }
    }
}

/// The inventory as a table for `kvfleet-agent gpus`.
pub fn render(snapshot: &Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "driver {}  cuda {}  gpus {}",
        opt(&snapshot.driver_version),
        opt(&snapshot.cuda_version),
        snapshot.gpus.len()
    );
    if snapshot.gpus.is_empty() {
        out.push_str("no GPUs: workers run on CPU\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<5} {:<42} {:<26} {:>17} {:>5} {:>6} {:>8} {:<16}",
        "INDEX", "UUID", "NAME", "MEMORY USED/TOTAL", "UTIL", "TEMP", "POWER", "PCI"
    );
    for gpu in &snapshot.gpus {
        let memory = format!(
            "{}/{} MiB",
            gpu.memory_used_bytes >> 20,
            gpu.memory_total_bytes >> 20
        );
        let util = gpu
            .utilization_percent
            .map_or_else(|| "-".into(), |u| format!("{u}%"));
        let temp = gpu
            .temperature_c
            .map_or_else(|| "-".into(), |t| format!("{t}C"));
        let power = gpu
            .power_mw
            .map_or_else(|| "-".into(), |p| format!("{:.1}W", f64::from(p) / 1000.0));
        let _ = writeln!(
            out,
            "{:<5} {:<42} {:<26} {:>17} {:>5} {:>6} {:>8} {:<16}",
            gpu.index,
            gpu.uuid,
            gpu.name,
            memory,
            util,
            temp,
            power,
            opt(&gpu.pci_bus_id)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_inventory_returns_what_it_was_given() {
        let fake = FakeInventory::gpus(2);
        let snapshot = fake.snapshot().unwrap();
        assert_eq!(snapshot.gpus.len(), 2);
        assert_eq!(snapshot.gpus[1].index, 1);
        let failing = FakeInventory {
            error: Some(InventoryError::NoDriver("gone".into())),
            ..FakeInventory::default()
        };
        assert!(failing.snapshot().is_err());
    }

    #[test]
    fn render_lists_every_gpu_and_says_when_there_are_none() {
        let table = render(&FakeInventory::gpus(2).snapshot().unwrap());
        assert!(
            table.contains("driver 570.00.00  cuda 12.8  gpus 2"),
            "{table}"
        );
        assert!(table.contains("1024/81920 MiB"), "{table}");
        assert!(table.contains("70.0W"), "{table}");
        assert_eq!(table.lines().count(), 4);
        assert!(render(&Snapshot::default()).contains("no GPUs: workers run on CPU"));
    }

    /// On a machine without a driver this exercises the no-driver path; with one, the real
    /// inventory. Either way: no panic, and a driver means a version string.
    #[test]
    fn detect_never_panics() {
        let snapshot = detect().snapshot();
        if let Ok(snapshot) = snapshot
            && !snapshot.gpus.is_empty()
        {
            assert!(snapshot.driver_version.is_some());
        }
    }
}
