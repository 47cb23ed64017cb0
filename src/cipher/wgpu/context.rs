//! Everything created once per device and shared by the openers and the batch engine: the
//! device and queue, the AES-CTR and GHASH pipelines, the T-table, the piece size, the lanes of
//! staging buffers, and the failure slot; and the helpers every GPU call goes through (error
//! scopes, bounded waits and mappings, dispatch grids).
#![forbid(unsafe_code)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::WgpuOptions;
use super::adapter::{AdapterSummary, OpenDevice, open_device};
use super::failure::{GPU_TIMEOUT, backend_err, invalid, lock, record};
use super::params::{GhashParams, Params, ghash_groups};
use super::pipelines::{SHADER, build_ghash_pipeline, build_pipeline};
use super::tables::{sbox_table, t0_table};
use super::variants::KernelVariant;
use crate::cipher::BLOCK_LEN;
use crate::error::{Error, Result};

/// Piece sizes are multiples of this many blocks (the largest workgroup span of any variant
/// need not divide them: the kernels bound-check every block).
const WORKGROUP_SIZE: u64 = 256;
/// Default cap on one dispatch (lavapipe's binding limit): bounds the three staging buffers
/// (upload, work, readback) on adapters with huge limits, and keeps the grid within 65535
/// workgroups per dimension.
const DEFAULT_MAX_PIECE: u64 = 128 << 20;
/// Concurrent `open`/`ctr_apply` calls: each holds one lane for its whole round trip (upload,
/// dispatch, read-back), so calls from the host loader's threads overlap instead of queueing
/// on one set of buffers. A call is latency-bound (map, submit, wait): on the H200 the host
/// loader's eight threads sharing one set ran at 1.12 GB/s, below the 2.65 of a single verified
/// open in `kernel_bench` (different benches; docs/BENCHMARKS.md, run 3). Unmeasured on a GPU
/// since.
const LANES: usize = 4;

/// One call's buffers, reused across calls: staging grown on demand up to the piece size, and
/// its own CTR and GHASH parameters and GHASH partial sums (a `queue.write_buffer` is applied
/// at the next submission of *any* thread, so parameters cannot be shared between calls).
pub(super) struct Lane {
    pub(super) capacity: u64,
    upload: Option<::wgpu::Buffer>,
    work: Option<::wgpu::Buffer>,
    readback: Option<::wgpu::Buffer>,
    pub(super) params: ::wgpu::Buffer,
    pub(super) ghash_params: ::wgpu::Buffer,
    /// GHASH partial sums (`shaders/ghash.wgsl`; one 16-byte sum per workgroup of a piece),
    /// and their read-back copy.
    pub(super) partials: ::wgpu::Buffer,
    pub(super) partials_readback: ::wgpu::Buffer,
}

impl Lane {
    fn new(device: &::wgpu::Device, partials_bytes: u64) -> Lane {
        let make = |label, size, usage| {
            device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use ::wgpu::BufferUsages as U;
        Lane {
            capacity: 0,
            upload: None,
            work: None,
            readback: None,
            params: make(
                "aes_params",
                std::mem::size_of::<Params>() as u64,
                U::UNIFORM | U::COPY_DST,
            ),
            ghash_params: make(
                "ghash_params",
                std::mem::size_of::<GhashParams>() as u64,
                U::UNIFORM | U::COPY_DST,
            ),
            partials: make("ghash_partials", partials_bytes, U::STORAGE | U::COPY_SRC),
            partials_readback: make(
                "ghash_partials_readback",
                partials_bytes,
                U::MAP_READ | U::COPY_DST,
            ),
        }
    }

    /// Grows the staging buffers to hold `need` bytes (a power of two, at most `piece_bytes`).
    pub(super) fn grow(&mut self, device: &::wgpu::Device, need: u64, piece_bytes: u64) {
        if self.capacity >= need {
            return;
        }
        let cap = need.next_power_of_two().min(piece_bytes);
        let make = |label, usage| {
            device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size: cap,
                usage,
                mapped_at_creation: false,
            })
        };
        use ::wgpu::BufferUsages as U;
        self.upload = Some(make("aes_upload", U::MAP_WRITE | U::COPY_SRC));
        self.work = Some(make("aes_work", U::STORAGE | U::COPY_DST | U::COPY_SRC));
        self.readback = Some(make("aes_readback", U::MAP_READ | U::COPY_DST));
        self.capacity = cap;
    }

    /// The work buffer as an earlier call left it (benchmarks run over resident data).
    pub(super) fn resident_work(&self) -> Result<&::wgpu::Buffer> {
        self.work
            .as_ref()
            .ok_or_else(|| backend_err("no work buffer yet"))
    }

    /// The upload, work and read-back buffers ([`Lane::grow`] first).
    pub(super) fn staging(&self) -> Result<(&::wgpu::Buffer, &::wgpu::Buffer, &::wgpu::Buffer)> {
        match (&self.upload, &self.work, &self.readback) {
            (Some(u), Some(w), Some(r)) => Ok((u, w, r)),
            _ => Err(backend_err("staging buffers missing")),
        }
    }
}

/// Everything created once per device and shared by all openers and batch engines.
pub(super) struct Context {
    pub(super) adapter: AdapterSummary,
    pub(super) device: ::wgpu::Device,
    pub(super) queue: ::wgpu::Queue,
    /// The AES-CTR pipeline (`pipelines::build_pipeline`) and its layout.
    pub(super) pipeline: ::wgpu::ComputePipeline,
    pub(super) layout: ::wgpu::BindGroupLayout,
    /// The T-table every AES kernel reads (1 KiB).
    pub(super) t0: ::wgpu::Buffer,
    /// The AES S-box (key expansion on the host).
    pub(super) sbox: [u8; 256],
    /// The GHASH pipeline (`shaders/ghash.wgsl`) and its layout.
    pub(super) ghash_pipeline: ::wgpu::ComputePipeline,
    pub(super) ghash_layout: ::wgpu::BindGroupLayout,
    /// Whether openers prepared from now on check tags on the GPU ([`WgpuOptions::gpu_ghash`],
    /// [`super::WgpuCipher::set_gpu_ghash`]).
    pub(super) gpu_ghash: AtomicBool,
    /// Largest piece, in bytes (a multiple of the workgroup's span).
    pub(super) piece_bytes: u64,
    /// Whether the pipeline copies the table into workgroup memory.
    pub(super) shared_table: bool,
    /// The kernel variant the pipeline runs.
    pub(super) variant: KernelVariant,
    pub(super) max_workgroups: u32,
    lanes: Vec<Mutex<Lane>>,
    /// Set by the device-lost callback or the first failed GPU operation.
    failure: Arc<Mutex<Option<String>>>,
}

impl Context {
    /// Opens the best adapter and builds the device, pipelines and buffers.
    pub(super) fn open(options: &WgpuOptions) -> Result<Context> {
        let OpenDevice {
            adapter: summary,
            device,
            queue,
            limits,
        } = open_device(options.allow_cpu_adapter)?;

        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        // Errors outside an error scope are recorded, never the default panic.
        let sink = failure.clone();
        device.on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
            record(&sink, format!("uncaptured GPU error: {e}"));
        }));
        let sink = failure.clone();
        device.set_device_lost_callback(move |reason, msg| {
            record(&sink, format!("device lost ({reason:?}): {msg}"));
        });

        let shared_table = options.shared_table.unwrap_or(true);
        let variant = KernelVariant::for_device(options.kernel, shared_table, &summary, &limits)?;
        let (pipeline, layout) =
            build_pipeline(&device, SHADER, shared_table, variant).map_err(|e| {
                backend_err(format!(
                    "{summary}: shader aes_ctr.wgsl failed to build: {e}"
                ))
            })?;
        let (ghash_pipeline, ghash_layout) = build_ghash_pipeline(&device).map_err(|e| {
            backend_err(format!("{summary}: shader ghash.wgsl failed to build: {e}"))
        })?;

        let sbox = sbox_table();
        let t0 = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("aes_t0"),
            size: 1024,
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&t0, 0, bytemuck::cast_slice(&t0_table(&sbox)));

        let span = WORKGROUP_SIZE * BLOCK_LEN as u64;
        let device_cap = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let cap = options
            .max_piece_bytes
            .unwrap_or(DEFAULT_MAX_PIECE)
            .min(device_cap);
        let piece_bytes = (cap / span) * span;
        if piece_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "wgpu piece size {cap} bytes is below one workgroup's span ({span} bytes)"
            )));
        }
        let partials_bytes = ghash_groups(piece_bytes / BLOCK_LEN as u64) * 16;
        let lanes = (0..LANES)
            .map(|_| Mutex::new(Lane::new(&device, partials_bytes)))
            .collect();
        Ok(Context {
            adapter: summary,
            device,
            queue,
            pipeline,
            layout,
            t0,
            sbox,
            ghash_pipeline,
            ghash_layout,
            gpu_ghash: AtomicBool::new(options.gpu_ghash),
            piece_bytes,
            shared_table,
            variant,
            max_workgroups: limits.max_compute_workgroups_per_dimension.max(1),
            lanes,
            failure,
        })
    }

    /// The first free lane (a single caller always gets lane 0, whose buffers stay grown), or
    /// if every lane is busy, a wait for one of them.
    pub(super) fn lane(&self) -> std::sync::MutexGuard<'_, Lane> {
        for l in &self.lanes {
            match l.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.lanes.len();
        lock(&self.lanes[i])
    }

    /// `Ok` while the device works; the first recorded failure (device lost, validation,
    /// out of memory in a submission, timeout) as `Error::Backend` afterwards.
    pub(super) fn health(&self) -> Result<()> {
        match lock(&self.failure).as_ref() {
            None => Ok(()),
            Some(reason) => Err(backend_err(format!("{}: {reason}", self.adapter))),
        }
    }

    /// The recorded failure's text, if any (the error for it: [`Context::health`]).
    pub(super) fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Records `e` as the device's failure (the first one wins) and returns it.
    pub(super) fn record_error(&self, e: Error) -> Error {
        record(&self.failure, e.to_string());
        e
    }

    /// Records a device failure (the first one wins) and returns it as an error naming the
    /// adapter.
    pub(super) fn fail(&self, reason: String) -> Error {
        let err = backend_err(format!("{}: {reason}", self.adapter));
        record(&self.failure, reason);
        err
    }

    /// Runs `f` inside out-of-memory and validation error scopes; returns its result and the
    /// first error either scope caught (validation first).
    pub(super) fn error_scope<T>(&self, f: impl FnOnce() -> T) -> (T, Option<::wgpu::Error>) {
        let oom = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let validation = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let out = f();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        (out, validation.or(oom))
    }

    /// Runs `f` (queue writes, encoding, submission) inside error scopes; an error there is
    /// recorded as a device failure and returned, naming `step`.
    pub(super) fn scoped<T>(&self, step: &str, f: impl FnOnce() -> T) -> Result<T> {
        match self.error_scope(f) {
            (_, Some(e)) => Err(self.fail(format!("{step}: {e}"))),
            (out, None) => Ok(out),
        }
    }

    /// Waits (at most [`GPU_TIMEOUT`]) for a submission; a lost device or a timeout is `Err`
    /// (and recorded), as is any failure recorded before.
    pub(super) fn wait(&self, s: ::wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(::wgpu::PollType::Wait {
                submission_index: Some(s),
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| self.fail(format!("waiting for the GPU failed (device lost?): {e}")))?;
        self.health()
    }

    /// Maps `buf[..size]` and waits (bounded) for it; `after` is the submission to wait for.
    /// A failure is returned, not recorded (the caller records it).
    pub(super) fn map_blocking(
        &self,
        buf: &::wgpu::Buffer,
        mode: ::wgpu::MapMode,
        size: u64,
        after: Option<::wgpu::SubmissionIndex>,
    ) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        buf.map_async(mode, 0..size, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(::wgpu::PollType::Wait {
                submission_index: after,
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| backend_err(format!("{}: waiting for the GPU: {e}", self.adapter)))?;
        match rx.recv_timeout(GPU_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(backend_err(format!(
                "{}: mapping a buffer failed: {e}",
                self.adapter
            ))),
            Err(_) => Err(backend_err(format!(
                "{}: a buffer never mapped",
                self.adapter
            ))),
        }
    }

    /// Grid for `workgroups` workgroups: (x, y), x at most `max_workgroups`; more than a
    /// square grid holds is an argument error naming `what`.
    pub(super) fn grid(
        &self,
        max_workgroups: u32,
        workgroups: u64,
        what: &str,
    ) -> Result<(u32, u32)> {
        let max = u64::from(max_workgroups.max(1));
        let x = workgroups.clamp(1, max);
        let y = workgroups.div_ceil(x).max(1);
        if y > max {
            return Err(invalid(format!(
                "{what}: {workgroups} workgroups exceed the grid of {} ({max} x {max})",
                self.adapter
            )));
        }
        Ok((x as u32, y as u32))
    }
}

/// A scratch buffer created on first use and replaced by a bigger one when too small (a
/// submission still using the old one keeps it alive).
pub(super) struct Grown {
    label: &'static str,
    usage: ::wgpu::BufferUsages,
    buf: Option<::wgpu::Buffer>,
}

impl Grown {
    pub(super) fn new(label: &'static str, usage: ::wgpu::BufferUsages) -> Self {
        Grown {
            label,
            usage,
            buf: None,
        }
    }

    /// A buffer of at least `need` bytes (call inside an error scope).
    pub(super) fn ensure(&mut self, device: &::wgpu::Device, need: u64) -> &::wgpu::Buffer {
        if self.buf.as_ref().is_none_or(|b| b.size() < need) {
            self.buf = Some(device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(self.label),
                size: need.next_power_of_two().max(256),
                usage: self.usage,
                mapped_at_creation: false,
            }));
        }
        self.buf.as_ref().expect("created above")
    }
}
