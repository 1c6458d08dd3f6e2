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

/// The host's CPU in words ("Intel(R) Xeon(R) Processor, 2 CPUs") for model cards and heartbeats:
/// step times on rented machines mean little without it. The CPU count is what this process may
/// use (cgroup quotas included).
pub fn cpu_model() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    cpu_model_from(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(), cpus)
}

/// `model name` from a /proc/cpuinfo text (x86); the architecture where there is none (ARM lists
/// parts by number).
fn cpu_model_from(cpuinfo: &str, cpus: usize) -> String {
    let model = cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name" && !value.trim().is_empty()).then(|| value.trim().to_string())
    });
    format!("{}, {cpus} CPUs", model.unwrap_or_else(|| std::env::consts::ARCH.to_string()))
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

#[cfg(test)]
mod tests {
    use super::cpu_model_from;

    #[test]
    fn cpu_model_reads_the_model_name_or_falls_back_to_the_architecture() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n";
        assert_eq!(cpu_model_from(x86, 2), "Intel(R) Xeon(R) Processor, 2 CPUs");
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n";
        assert_eq!(cpu_model_from(arm, 4), format!("{}, 4 CPUs", std::env::consts::ARCH));
        assert_eq!(cpu_model_from("", 1), format!("{}, 1 CPUs", std::env::consts::ARCH));
    }
}
