//! The process's one wgpu instance, the adapter it picks, and opening that adapter's device.
#![forbid(unsafe_code)]

use super::failure::unavailable;
use crate::error::Result;

/// A summary of the adapter wgpu would use here.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// Adapter (device) name.
    pub name: String,
    /// Graphics API backend (Vulkan, Metal, Dx12, Gl).
    pub api: ::wgpu::Backend,
    /// Discrete, integrated, virtual, CPU...
    pub device_type: ::wgpu::DeviceType,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?}, {:?})", self.name, self.api, self.device_type)
    }
}

impl AdapterSummary {
    /// `true` for software rasterizers (lavapipe, WARP, SwiftShader): slower than the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.device_type == ::wgpu::DeviceType::Cpu
    }
}

/// The process's one wgpu instance (created on first use): every backend, probe and device
/// comes from it, as wgpu intends. One instance per device ran out on the H200: its Vulkan
/// driver (580) found no adapter for the 29th instance a process had created and dropped.
fn instance() -> ::wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<::wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            if std::env::var_os("WGPU_BACKEND").is_none() {
                // Vulkan, Metal, DX12: the APIs with compute shaders everywhere. (GL only if
                // asked for through WGPU_BACKEND; probing it on a headless box prints EGL
                // noise.)
                desc.backends = ::wgpu::Backends::PRIMARY;
            }
            ::wgpu::Instance::new(desc)
        })
        .clone()
}

fn request_adapter(instance: &::wgpu::Instance) -> std::result::Result<::wgpu::Adapter, String> {
    let adapter = pollster::block_on(instance.request_adapter(&::wgpu::RequestAdapterOptions {
        power_preference: ::wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| {
        format!(
            "no wgpu adapter found ({e}); install a Vulkan driver (e.g. Debian: mesa-vulkan-drivers \
             libvulkan1) or use --backend cpu"
        )
    })?;
    let info = adapter.get_info();
    if !adapter
        .get_downlevel_capabilities()
        .flags
        .contains(::wgpu::DownlevelFlags::COMPUTE_SHADERS)
    {
        return Err(format!(
            "adapter {} has no compute shader support",
            info.name
        ));
    }
    Ok(adapter)
}

fn summarize(adapter: &::wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        name: info.name,
        api: info.backend,
        device_type: info.device_type,
    }
}

/// The adapter wgpu would use, or why there is none.
pub fn probe_adapter() -> std::result::Result<AdapterSummary, String> {
    request_adapter(&instance()).map(|a| summarize(&a))
}

/// Whether the adapter wgpu would pick is a real GPU (not a CPU-type driver such as lavapipe).
pub fn gpu_adapter_present() -> bool {
    probe_adapter().is_ok_and(|a| !a.is_cpu())
}

/// `Ok("adapter name (backend, device type)")`, or `Err(reason)`.
pub fn probe() -> std::result::Result<String, String> {
    probe_adapter().map(|a| a.to_string())
}

/// An open device on the best adapter.
pub(super) struct OpenDevice {
    pub(super) adapter: AdapterSummary,
    pub(super) device: ::wgpu::Device,
    pub(super) queue: ::wgpu::Queue,
    /// The adapter's limits, all of which the device was opened with.
    pub(super) limits: ::wgpu::Limits,
}

/// Opens the device of the best adapter with every limit the adapter offers; a CPU-type
/// adapter (lavapipe) only if `allow_cpu_adapter`.
pub(super) fn open_device(allow_cpu_adapter: bool) -> Result<OpenDevice> {
    let adapter = request_adapter(&instance()).map_err(unavailable)?;
    let summary = summarize(&adapter);
    if summary.is_cpu() && !allow_cpu_adapter {
        return Err(unavailable(format!(
            "the only adapter, {summary}, is a CPU (software) driver: slower than the CPU \
             backend (`--backend wgpu` uses it all the same)"
        )));
    }
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
        label: Some("ciphershard"),
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| unavailable(format!("{summary}: cannot open the device: {e}")))?;
    Ok(OpenDevice {
        adapter: summary,
        device,
        queue,
        limits,
    })
}
