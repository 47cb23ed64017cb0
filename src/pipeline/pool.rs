//! Page-aligned host buffers, allocated once and recycled.
//!
//! All of the loader's `unsafe` lives in this file: the aligned allocation and the typed view
//! of a buffer's bytes.

#![allow(unsafe_code)] // the aligned allocation and the typed views (see above); the crate denies it elsewhere

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Alignment of every host buffer: a page, so a GPU backend can page-lock (register) it.
pub const HOST_ALIGN: usize = 4096;

/// A hook called once for every host buffer the pool allocates and before it frees it, so a
/// GPU backend can page-lock the memory (e.g. `cuMemHostRegister`) for asynchronous copies.
pub trait PinHook: Send + Sync {
    /// The buffer `[ptr, ptr + len)` was allocated.
    fn register(&self, ptr: *mut u8, len: usize);
    /// The buffer is about to be freed.
    fn unregister(&self, ptr: *mut u8, len: usize);
}

/// A zero-initialized, 4096-aligned heap buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    pin: Option<Arc<dyn PinHook>>,
    counter: Option<Arc<AtomicU64>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior mutability.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes (rounded up to whole pages), touching every page now so that the
    /// first use in the pipeline does not pay the page-fault cost.
    pub fn new(len: usize, pin: Option<Arc<dyn PinHook>>, counter: Option<Arc<AtomicU64>>) -> Self {
        let size = len.max(1).next_multiple_of(HOST_ALIGN);
        let layout = Layout::from_size_align(size, HOST_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size and a power-of-two alignment.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // Touch each page (alloc_zeroed may hand back lazily-mapped zero pages).
        for off in (0..size).step_by(HOST_ALIGN) {
            // SAFETY: off < size, inside the allocation.
            unsafe { ptr.as_ptr().add(off).write_volatile(0) };
        }
        if let Some(p) = &pin {
            p.register(ptr.as_ptr(), size);
        }
        if let Some(c) = &counter {
            c.fetch_add(size as u64, Ordering::Relaxed);
        }
        AlignedBuf {
            ptr,
            len,
            layout,
            pin,
            counter,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when the length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the first byte (page-aligned), for zero-copy hand-off (DLPack, CUDA).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `layout.size() >= len` initialized (zeroed) bytes, owned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(p) = &self.pin {
            p.unregister(self.ptr.as_ptr(), self.layout.size());
        }
        if let Some(c) = &self.counter {
            c.fetch_sub(self.layout.size() as u64, Ordering::Relaxed);
        }
        // SAFETY: allocated in `new` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A free list of equal-sized buffers: `get` reuses one or allocates, `put` keeps up to `cap`.
pub struct BufPool {
    len: usize,
    cap: usize,
    free: Mutex<Vec<AlignedBuf>>,
    pin: Option<Arc<dyn PinHook>>,
    counter: Arc<AtomicU64>,
    /// Buffers allocated after construction (steady state: stays constant).
    pub allocations: AtomicU64,
}

impl BufPool {
    /// A pool of buffers of `len` bytes with `prealloc` allocated now, keeping at most `cap`.
    pub fn new(
        len: usize,
        prealloc: usize,
        cap: usize,
        pin: Option<Arc<dyn PinHook>>,
        counter: Arc<AtomicU64>,
    ) -> Self {
        let free = (0..prealloc)
            .map(|_| AlignedBuf::new(len, pin.clone(), Some(counter.clone())))
            .collect();
        BufPool {
            len,
            cap: cap.max(prealloc),
            free: Mutex::new(free),
            pin,
            counter,
            allocations: AtomicU64::new(0),
        }
    }

    /// A free buffer (contents are whatever the last user left: callers overwrite it).
    pub fn get(&self) -> AlignedBuf {
        if let Some(b) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return b;
        }
        self.allocations.fetch_add(1, Ordering::Relaxed);
        AlignedBuf::new(self.len, self.pin.clone(), Some(self.counter.clone()))
    }

    /// Returns a buffer to the pool (freed if the pool already holds `cap`).
    pub fn put(&self, b: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.cap {
            free.push(b);
        }
    }
}

/// Element types a column can be viewed as (little-endian hosts only, as safetensors is LE).
pub trait Element: Copy + 'static + private::Sealed {
    /// The safetensors dtype names this type reads.
    const DTYPES: &'static [&'static str];
}

mod private {
    pub trait Sealed {}
}

macro_rules! element {
    ($t:ty, $($d:literal),+) => {
        impl private::Sealed for $t {}
        impl Element for $t {
            const DTYPES: &'static [&'static str] = &[$($d),+];
        }
    };
}
element!(f32, "F32");
element!(f64, "F64");
element!(i8, "I8");
element!(i16, "I16");
element!(i32, "I32");
element!(i64, "I64");
element!(u8, "U8", "BOOL", "F8_E4M3", "F8_E5M2");
element!(u16, "U16", "F16", "BF16");
element!(u32, "U32");
element!(u64, "U64");

/// Views `bytes` as `&[T]` if `dtype` is one of `T`'s, the length is a multiple of its size and
/// the start is aligned for it. Every bit pattern is a valid value of these types.
pub fn cast_slice<'a, T: Element>(bytes: &'a [u8], dtype: &str) -> Option<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if !cfg!(target_endian = "little")
        || !T::DTYPES.contains(&dtype)
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: alignment and length checked above; T is a plain integer/float type for which
    // every bit pattern is valid; the lifetime is that of `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_recycled() {
        let counter = Arc::new(AtomicU64::new(0));
        let pool = BufPool::new(10_000, 2, 2, None, counter.clone());
        let a = pool.get();
        assert_eq!(a.as_ptr() as usize % HOST_ALIGN, 0);
        assert_eq!(a.len(), 10_000);
        let p = a.as_ptr();
        pool.put(a);
        let b = pool.get();
        assert_eq!(b.as_ptr(), p);
        assert_eq!(pool.allocations.load(Ordering::Relaxed), 0);
        assert_eq!(counter.load(Ordering::Relaxed), 2 * 12_288);
    }

    #[test]
    fn cast_checks_dtype_and_alignment() {
        let b = AlignedBuf::new(16, None, None);
        assert_eq!(cast_slice::<f32>(&b, "F32").map(|s| s.len()), Some(4));
        assert!(cast_slice::<f32>(&b, "I32").is_none());
        assert!(cast_slice::<f32>(&b[1..9], "F32").is_none());
        assert!(cast_slice::<u64>(&b[..12], "U64").is_none());
    }
}
