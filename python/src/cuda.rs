//! Device batches (`Loader(..., device="cuda")`): the CUDA loader's batches exported through
//! DLPack as `kDLCUDA` tensors, with the array-API stream protocol.
//!
//! Producer → consumer: a [`CudaBatch`] is handed out only after its gathers completed (the
//! loader waited on their event), so the bytes are final before any consumer sees them and
//! `__dlpack__(stream=...)` needs no wait on the consumer's stream.
//!
//! Consumer → producer (buffer reuse): a consumer (PyTorch) may release its tensor while its
//! kernels that read the buffer are still queued on its stream. So each DLPack export remembers
//! the consumer's stream, and its deleter records an event on that stream *at release time*
//! (covering every kernel queued so far). When the last view of a batch is gone, the loader's
//! gather stream waits on those events (`cuStreamWaitEvent`, no host block) before the buffers
//! go back to the pool; every later gather into them is queued on that same stream, after the
//! wait. An export made with `stream=-1` ("consumer synchronises itself") or whose event
//! cannot be recorded falls back to `cuCtxSynchronize` before reuse (blocks, always safe).
//!
//! Two things hold whichever thread drops the last reference:
//! - The per-thread default stream (handle 2) names a different stream on every thread, so an
//!   event is recorded on it only when the release happens on the thread that exported; a
//!   release elsewhere synchronises the context instead (that covers the per-thread streams).
//! - The driver calls here bind our context to the releasing thread; [`CurrentContext`] puts
//!   back whatever context that thread had current (or none), so a deleter run by a thread that
//!   works on another GPU leaves that thread as it found it.

use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

use ciphershard::pipeline::CudaBatch;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result, sys};
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;

use crate::dlpack::{DEVICE_CUDA, DLDevice};
use crate::tensor::Storage;

/// What must complete before a released view's buffer may be written again.
enum Release {
    /// Work queued on the consumer's stream up to the release.
    Event(CudaEvent),
    /// Unknown consumer stream: synchronise the whole context.
    Context,
}

type Releases = Arc<Mutex<Vec<Release>>>;

/// The CUDA stream handle DLPack uses for the calling thread's per-thread default stream.
const PER_THREAD_DEFAULT_STREAM: usize = 2;

/// The context current on this thread when created, restored when dropped: a deleter runs on
/// whatever thread releases the last view, and must not leave our context current there.
struct CurrentContext(Option<sys::CUcontext>);

impl CurrentContext {
    /// `None` when the driver cannot say which context is current (a broken driver state, in
    /// which every later call fails too).
    fn save() -> Option<Self> {
        result::ctx::get_current().ok().map(Self)
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        let previous = self.0.unwrap_or(std::ptr::null_mut());
        // SAFETY: `previous` was current on this very thread when `save` ran (or is null, which
        // unbinds); a context stays alive while any thread has it current.
        let _ = unsafe { result::ctx::set_current(previous) };
    }
}

/// A device batch's column buffers, kept out of the pool by every tensor and export viewing
/// them. Dropping the last holder makes the gather stream wait for every consumer release, then
/// drops the batch (its buffers return to the pool).
pub struct DeviceBatchStorage {
    regions: Vec<(*mut u8, usize)>,
    ordinal: i32,
    stream: Arc<CudaStream>,
    releases: Releases,
    batch: Option<CudaBatch>,
}

// SAFETY: the pointers are device addresses of buffers owned by `batch`, which keeps them
// allocated until it is dropped in `Drop` below (after the consumer waits). This struct never
// dereferences them; `CudaBatch`, `CudaStream` and `CudaEvent` are used from any thread by the
// loader itself (channels, pool), and every driver call binds the context first.
unsafe impl Send for DeviceBatchStorage {}
// SAFETY: see `Send`; shared access only reads `regions` or locks `releases`.
unsafe impl Sync for DeviceBatchStorage {}

impl DeviceBatchStorage {
    /// Wraps a batch handed out by the device loader on device `ordinal`.
    pub fn new(batch: CudaBatch, ordinal: i32) -> Self {
        let regions = batch
            .tensors()
            .map(|t| (t.device_ptr() as usize as *mut u8, t.len()))
            .collect();
        Self {
            regions,
            ordinal,
            stream: batch.stream().clone(),
            releases: Arc::new(Mutex::new(Vec::new())),
            batch: Some(batch),
        }
    }
}

impl Drop for DeviceBatchStorage {
    fn drop(&mut self) {
        let _restore = CurrentContext::save();
        let releases =
            std::mem::take(&mut *self.releases.lock().unwrap_or_else(|e| e.into_inner()));
        let ctx = self.stream.context();
        let mut sync_all = false;
        for r in releases {
            match r {
                Release::Event(e) => sync_all |= self.stream.wait(&e).is_err(),
                Release::Context => sync_all = true,
            }
        }
        if sync_all {
            // A failure here means the context is broken: nothing more can run on it anyway.
            let _ = ctx.synchronize();
        }
        drop(self.batch.take());
    }
}

impl Storage for DeviceBatchStorage {
    fn region(&self, index: usize) -> (*mut u8, usize) {
        self.regions[index]
    }
    fn device(&self) -> DLDevice {
        DLDevice {
            device_type: DEVICE_CUDA,
            device_id: self.ordinal,
        }
    }
    fn consumer_view(
        &self,
        me: Arc<dyn Storage>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Arc<dyn Storage>> {
        let consumer = parse_stream(stream)?;
        Ok(Arc::new(ConsumerView {
            keep: me,
            ctx: self.stream.context().clone(),
            consumer,
            exported_on: thread::current().id(),
            releases: self.releases.clone(),
        }))
    }
}

/// The consumer's stream as the DLPack/array-API protocol passes it for CUDA.
#[derive(Clone, Copy)]
enum ConsumerStream {
    /// A `CUstream` handle: `1` legacy default, `2` per-thread default, else a stream pointer.
    Handle(usize),
    /// `-1`: the consumer synchronises on its own.
    NoSync,
}

fn parse_stream(stream: Option<&Bound<'_, PyAny>>) -> PyResult<ConsumerStream> {
    let Some(s) = stream.filter(|s| !s.is_none()) else {
        // None: the consumer works on the legacy default stream.
        return Ok(ConsumerStream::Handle(1));
    };
    let v: i64 = s.extract().map_err(|_| {
        PyTypeError::new_err("stream must be None or an int (a CUDA stream handle)")
    })?;
    match v {
        -1 => Ok(ConsumerStream::NoSync),
        0 => Err(PyBufferError::new_err(
            "stream=0 is ambiguous for CUDA (DLPack): pass 1 (legacy default), 2 (per-thread \
             default) or a stream handle",
        )),
        v if v > 0 => Ok(ConsumerStream::Handle(v as usize)),
        v => Err(PyBufferError::new_err(format!(
            "stream={v} is not a CUDA stream (expected None, -1, 1, 2 or a stream handle)"
        ))),
    }
}

/// One DLPack export of a device tensor: keeps the batch alive and, when the consumer releases
/// it, records where the consumer's queued work ends.
struct ConsumerView {
    keep: Arc<dyn Storage>,
    ctx: Arc<CudaContext>,
    consumer: ConsumerStream,
    /// The thread that called `__dlpack__`: the one whose per-thread default stream handle 2
    /// meant.
    exported_on: ThreadId,
    releases: Releases,
}

impl ConsumerView {
    /// The stream to record the release on, if one can stand for the consumer's work here.
    fn release_stream(&self) -> Option<usize> {
        match self.consumer {
            ConsumerStream::NoSync => None,
            ConsumerStream::Handle(PER_THREAD_DEFAULT_STREAM)
                if thread::current().id() != self.exported_on =>
            {
                None
            }
            ConsumerStream::Handle(h) => Some(h),
        }
    }

    fn record_release(&self) -> Option<CudaEvent> {
        let h = self.release_stream()?;
        let event = self.ctx.new_event(None).ok()?; // binds the context to this thread
        // SAFETY: `event` is a live event of this context; `h` is the stream the consumer
        // passed to `__dlpack__` (or a special handle 1/2), which by the DLPack contract stays
        // valid while it uses the tensor. An invalid handle makes the call fail, not crash, in
        // which case the release falls back to a context synchronisation.
        let recorded = unsafe { result::event::record(event.cu_event(), h as sys::CUstream) };
        recorded.ok().map(|()| event)
    }
}

impl Drop for ConsumerView {
    fn drop(&mut self) {
        let _restore = CurrentContext::save();
        let release = match self.record_release() {
            Some(e) => Release::Event(e),
            None => Release::Context,
        };
        self.releases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(release);
        // `keep` drops after this: the release is registered before the storage can go.
    }
}

impl Storage for ConsumerView {
    fn region(&self, index: usize) -> (*mut u8, usize) {
        self.keep.region(index)
    }
    fn device(&self) -> DLDevice {
        self.keep.device()
    }
}
