//! GPU telemetry through NVML (`nvml-wrapper`, which loads libnvidia-ml at run time): where the
//! library or a GPU is missing, the first reading says so once and every later one is empty.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub temperature_c: u32,
    pub utilization_pct: u32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub power_w: f64,
}

/// An NVML session, or the reason there is none.
pub struct Telemetry {
    nvml: Option<nvml_wrapper::Nvml>,
}

impl Telemetry {
    /// Starts NVML; logs once (warn) when it is unavailable.
    pub fn start() -> Telemetry {
        match nvml_wrapper::Nvml::init() {
            Ok(nvml) => Telemetry { nvml: Some(nvml) },
            Err(e) => {
                tracing::warn!("no GPU telemetry (NVML unavailable: {e}); continuing without it");
                Telemetry { nvml: None }
            }
        }
    }

    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// One reading per GPU (empty without NVML; a GPU that fails to answer is skipped).
    pub fn read(&self) -> Vec<GpuReading> {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        let Some(nvml) = &self.nvml else { return Vec::new() };
        let n = nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok()?;
                Some(GpuReading {
                    index: i,
                    name: d.name().unwrap_or_default(),
                    temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                    utilization_pct: d.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                    memory_used_mib: mem.used / (1 << 20),
                    memory_total_mib: mem.total / (1 << 20),
                    power_w: d.power_usage().map(|mw| mw as f64 / 1000.0).unwrap_or(0.0),
                })
            })
            .collect()
    }
}
