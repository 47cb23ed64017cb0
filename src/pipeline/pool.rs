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

use crate::error::{Error, Result};

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

/// The layout of a buffer of `len` bytes: rounded up to whole pages (at least one). `None` when
/// the rounded size overflows or exceeds `isize::MAX` (what `Layout` accepts).
fn page_layout(len: usize) -> Option<Layout> {
    let size = len.max(1).checked_next_multiple_of(HOST_ALIGN)?;
    Layout::from_size_align(size, HOST_ALIGN).ok()
}

/// The error for a buffer that cannot be had.
fn too_large(len: usize, why: &str) -> Error {
    Error::InvalidArgument(format!("a host buffer of {len} bytes {why}"))
}

impl AlignedBuf {
    /// Allocates `len` bytes (rounded up to whole pages), touching every page now so that the
    /// first use in the pipeline does not pay the page-fault cost. A length whose rounded size
    /// does not fit a `Layout`, or an allocation the system refuses, is an error (nothing is
    /// allocated), never a panic or an abort.
    pub fn new(
        len: usize,
        pin: Option<Arc<dyn PinHook>>,
        counter: Option<Arc<AtomicU64>>,
    ) -> Result<Self> {
        let layout = page_layout(len).ok_or_else(|| too_large(len, "is too large to allocate"))?;
        Self::with_layout(len, layout, pin, counter)
    }

    /// Allocates a buffer of `len` bytes with `layout`, which comes from [`page_layout`]`(len)`
    /// (checked again here, once per allocation: `Deref`'s soundness rests on it).
    fn with_layout(
        len: usize,
        layout: Layout,
        pin: Option<Arc<dyn PinHook>>,
        counter: Option<Arc<AtomicU64>>,
    ) -> Result<Self> {
        let size = layout.size();
        if size == 0 || size < len {
            return Err(too_large(len, "does not fit its layout (internal)"));
        }
        // SAFETY: non-zero size (checked above), a power-of-two alignment and a size of at most
        // isize::MAX (both guaranteed by `Layout`).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| too_large(len, "could not be allocated"))?;
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
        Ok(AlignedBuf {
            ptr,
            len,
            layout,
            pin,
            counter,
        })
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
        // SAFETY: ptr is valid for `layout.size() >= len` initialized (zeroed) bytes, owned
        // (`with_layout`, the only constructor, checks that the layout covers `len`).
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
        // SAFETY: allocated in `with_layout` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A free list of equal-sized buffers: `get` reuses one or allocates, `put` keeps up to `cap`.
pub struct BufPool {
    len: usize,
    /// Checked once at construction: every buffer of the pool has this layout.
    layout: Layout,
    cap: usize,
    free: Mutex<Vec<AlignedBuf>>,
    pin: Option<Arc<dyn PinHook>>,
    counter: Arc<AtomicU64>,
    /// Buffers allocated after construction (steady state: stays constant).
    pub allocations: AtomicU64,
}

impl BufPool {
    /// A pool of buffers of `len` bytes with `prealloc` allocated now, keeping at most `cap`.
    /// A `len` no buffer can have, or an allocation that fails, is an error.
    pub fn new(
        len: usize,
        prealloc: usize,
        cap: usize,
        pin: Option<Arc<dyn PinHook>>,
        counter: Arc<AtomicU64>,
    ) -> Result<Self> {
        let layout = page_layout(len).ok_or_else(|| too_large(len, "is too large to allocate"))?;
        let free = (0..prealloc)
            .map(|_| AlignedBuf::with_layout(len, layout, pin.clone(), Some(counter.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(BufPool {
            len,
            layout,
            cap: cap.max(prealloc),
            free: Mutex::new(free),
            pin,
            counter,
            allocations: AtomicU64::new(0),
        })
    }

    /// A free buffer (contents are whatever the last user left: callers overwrite it); an
    /// error only if a new one must be allocated and the system refuses.
    pub fn get(&self) -> Result<AlignedBuf> {
        if let Some(b) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(b);
        }
        self.allocations.fetch_add(1, Ordering::Relaxed);
        AlignedBuf::with_layout(
            self.len,
            self.layout,
            self.pin.clone(),
            Some(self.counter.clone()),
        )
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
        let pool = BufPool::new(10_000, 2, 2, None, counter.clone()).unwrap();
        let a = pool.get().unwrap();
        assert_eq!(a.as_ptr() as usize % HOST_ALIGN, 0);
        assert_eq!(a.len(), 10_000);
        let p = a.as_ptr();
        pool.put(a);
        let b = pool.get().unwrap();
        assert_eq!(b.as_ptr(), p);
        assert_eq!(pool.allocations.load(Ordering::Relaxed), 0);
        assert_eq!(counter.load(Ordering::Relaxed), 2 * 12_288);
    }

    #[test]
    fn cast_checks_dtype_and_alignment() {
        let b = AlignedBuf::new(16, None, None).unwrap();
        assert_eq!(cast_slice::<f32>(&b, "F32").map(|s| s.len()), Some(4));
        assert!(cast_slice::<f32>(&b, "I32").is_none());
        assert!(cast_slice::<f32>(&b[1..9], "F32").is_none());
        assert!(cast_slice::<u64>(&b[..12], "U64").is_none());
    }

    /// Lengths whose page-rounded size overflows `usize` or exceeds what a `Layout` accepts are
    /// refused before anything is allocated (before the fix, `usize::MAX` wrapped to a
    /// zero-size layout and `Deref` built a slice of `usize::MAX` bytes); so is a valid layout
    /// the allocator refuses (2^60 bytes: beyond any address space here), instead of aborting.
    #[test]
    fn huge_lengths_are_refused_without_allocating() {
        let counter = Arc::new(AtomicU64::new(0));
        for len in [
            usize::MAX,
            usize::MAX - HOST_ALIGN + 1,
            isize::MAX as usize,
            isize::MAX as usize + 1,
            1 << 60,
        ] {
            let e = AlignedBuf::new(len, None, Some(counter.clone()))
                .err()
                .unwrap_or_else(|| panic!("{len} bytes were allocated"));
            assert!(e.to_string().contains(&len.to_string()), "{e}");
            assert!(BufPool::new(len, 1, 1, None, counter.clone()).is_err());
        }
        assert_eq!(
            counter.load(Ordering::Relaxed),
            0,
            "nothing counted as allocated"
        );
        // The edges that still fit: 0 bytes (one page) and a length one page short of rounding.
        assert_eq!(AlignedBuf::new(0, None, None).unwrap().len(), 0);
        assert_eq!(page_layout(HOST_ALIGN).map(|l| l.size()), Some(HOST_ALIGN));
        assert_eq!(
            page_layout(HOST_ALIGN + 1).map(|l| l.size()),
            Some(2 * HOST_ALIGN)
        );
    }
}
