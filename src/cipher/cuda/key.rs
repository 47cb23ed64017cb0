//! [`CudaKey`]: a data key's material on the device (tables, round keys, powers of H), zeroed
//! when dropped, and the link between a tag and the GHASH value the device computes.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use zeroize::Zeroize;

use super::launch::{self, DeviceDescs, KeyTables};
use super::{Device, drv};
use crate::cipher::{NONCE_LEN, TAG_LEN};
use crate::error::Result;
use crate::keys::DataKey;

/// A data key prepared on the device. Its device copies (round keys, H tables, powers of H) are
/// zeroed when it is dropped.
pub struct CudaKey {
    dev: Arc<Device>,
    tables: KeyTables,
    /// `(H^32)^s` for `s` below the count, 2 words each.
    hpow: Mutex<(CudaSlice<u64>, u64)>,
    /// Host AES for `E_K(J0)` per chunk (zeroized on drop by the `aes` crate).
    aes: Aes256,
}

impl CudaKey {
    /// Uploads `key`, expands it on the device (the uploaded copy is zeroed at once) and
    /// computes the powers of H a 4 MiB chunk needs.
    pub(super) fn new(dev: &Arc<Device>, key: &DataKey) -> Result<CudaKey> {
        let s = &dev.stream;
        let mut raw = s
            .clone_htod(key.as_bytes().as_slice())
            .map_err(drv("uploading the key"))?;
        let mut tables = KeyTables::alloc(s)?;
        let launched = launch::setup(&dev.k, s, &raw, &mut tables);
        let zeroed = s.memset_zeros(&mut raw);
        launched?;
        zeroed.map_err(drv("zeroing the uploaded key"))?;
        let hpow = s
            .alloc_zeros::<u64>(2)
            .map_err(drv("allocating key tables"))?;
        let aes = Aes256::new(key.as_bytes().into());
        let k = CudaKey {
            dev: dev.clone(),
            tables,
            hpow: Mutex::new((hpow, 1)),
            aes,
        };
        k.ensure_powers(1 << 12)?;
        Ok(k)
    }

    /// The device this key was prepared on.
    pub(super) fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Makes sure `hpow` holds `(H^32)^s` for every `s < segments`.
    fn ensure_powers(&self, segments: u64) -> Result<()> {
        let mut g = self.hpow.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 >= segments {
            return Ok(());
        }
        let count = segments.next_power_of_two();
        let s = &self.dev.stream;
        let mut fresh = s
            .alloc_zeros::<u64>(2 * count as usize)
            .map_err(drv("allocating powers of H"))?;
        launch::hpowers(&self.dev.k, s, &self.tables, &mut fresh, count)?;
        let mut old = std::mem::replace(&mut g.0, fresh);
        let _ = s.memset_zeros(&mut old);
        g.1 = count;
        Ok(())
    }

    /// The GHASH value the device must produce for this tag: `tag XOR E_K(nonce || 1)`.
    pub(super) fn expected_ghash(
        &self,
        nonce: &[u8; NONCE_LEN],
        tag: &[u8; TAG_LEN],
    ) -> [u8; TAG_LEN] {
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        let mut b = j0.into();
        self.aes.encrypt_block(&mut b);
        let mut out = [0u8; TAG_LEN];
        for i in 0..TAG_LEN {
            out[i] = b[i] ^ tag[i];
        }
        b.zeroize();
        out
    }

    /// Enqueues on `stream` the GHASH of every chunk of `descs` (bytes in `src`, associated data
    /// in `aad`) into `acc`, 4 words per chunk, computing more powers of H first if needed.
    pub(crate) fn ghash(
        &self,
        stream: &Arc<CudaStream>,
        descs: &DeviceDescs,
        src: &CudaView<'_, u8>,
        aad: &CudaView<'_, u8>,
        acc: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        self.ensure_powers(descs.max_segments())?;
        let g = self.hpow.lock().unwrap_or_else(|p| p.into_inner());
        launch::ghash(
            &self.dev.k,
            stream,
            &self.tables,
            &g.0,
            descs,
            src,
            aad,
            acc,
        )
    }

    /// Enqueues on `stream` AES-CTR over every chunk of `descs` from `src` into `dst`, with the
    /// device's current [`super::CtrVariant`].
    pub(crate) fn ctr(
        &self,
        stream: &Arc<CudaStream>,
        descs: &DeviceDescs,
        src: &CudaView<'_, u8>,
        dst: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        let v = self.dev.ctr_variant();
        launch::ctr(&self.dev.k, v, stream, &self.tables, descs, src, dst)
    }
}

impl Drop for CudaKey {
    fn drop(&mut self) {
        let s = &self.dev.stream;
        let _ = s.memset_zeros(&mut self.tables.rk);
        let _ = s.memset_zeros(&mut self.tables.htab);
        let _ = s.memset_zeros(&mut self.tables.hseg);
        let g = self.hpow.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = s.memset_zeros(&mut g.0);
        let _ = s.synchronize();
    }
}

/// The 16 bytes of a GHASH accumulator (4 big-endian words, as cs_ghash XORs them).
pub(super) fn acc_bytes(acc: &[u32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in acc.iter().take(4).enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
    }
    out
}
