//! [`CudaOpener`]: the [`ChunkOpener`] of the CUDA backend, one chunk at a time through host
//! buffers (upload, GHASH and/or AES-CTR, download), so the conformance suite and the
//! cross-backend tests run on it exactly as on the CPU.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use zeroize::Zeroize;

use super::drv;
use super::key::{CudaKey, acc_bytes};
use super::launch::{ChunkDesc, DeviceDescs};
use crate::cipher::{ChunkOpener, ChunkParams, NONCE_LEN, OpenError, TAG_LEN};
use crate::cipher::{ct_eq, same_len};
use crate::error::Result;

/// The trait-level opener: one chunk at a time through host buffers.
pub struct CudaOpener {
    key: Arc<CudaKey>,
    lock: Mutex<()>,
}

enum Mode {
    Verify,
    Ctr,
    Seal,
}

impl CudaOpener {
    pub(super) fn new(key: Arc<CudaKey>) -> CudaOpener {
        CudaOpener {
            key,
            lock: Mutex::new(()),
        }
    }

    /// Uploads `data`, runs the kernels `mode` needs, returns (output bytes, GHASH value).
    /// `open` calls it twice (verify, then decrypt) so no plaintext is downloaded before the
    /// tag has been checked.
    fn run(
        &self,
        mode: Mode,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        aad: &[u8],
        plain: bool,
        data: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16])> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let k = &self.key;
        let s = &k.device().stream;
        let len = data.len();
        let mut d_src = s
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("device allocation"))?;
        if len > 0 {
            s.memcpy_htod(data, &mut d_src.slice_mut(..len))
                .map_err(drv("host-to-device copy"))?;
        }
        let mut d_aad = s
            .alloc_zeros::<u8>(aad.len().max(16))
            .map_err(drv("device allocation"))?;
        if !aad.is_empty() {
            s.memcpy_htod(aad, &mut d_aad.slice_mut(..aad.len()))
                .map_err(drv("host-to-device copy"))?;
        }
        let desc = ChunkDesc::new(nonce, 0, 0, len as u64)
            .seek(offset)
            .aad(0, aad.len() as u64)
            .plain(plain);
        let d_desc = DeviceDescs::upload(s, &[desc])?;
        let mut acc = s.alloc_zeros::<u32>(4).map_err(drv("device allocation"))?;
        let mut d_dst = s
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("device allocation"))?;
        let (src_v, aad_v) = (d_src.as_view(), d_aad.as_view());
        let mut out = Vec::new();
        match mode {
            Mode::Verify => k.ghash(s, &d_desc, &src_v, &aad_v, &mut acc.as_view_mut())?,
            Mode::Ctr => k.ctr(s, &d_desc, &src_v, &mut d_dst.as_view_mut())?,
            Mode::Seal => {
                if plain {
                    k.ghash(s, &d_desc, &src_v, &aad_v, &mut acc.as_view_mut())?;
                } else {
                    k.ctr(s, &d_desc, &src_v, &mut d_dst.as_view_mut())?;
                    let sealed = d_dst.as_view();
                    k.ghash(s, &d_desc, &sealed, &aad_v, &mut acc.as_view_mut())?;
                }
            }
        }
        let accv = s.clone_dtoh(&acc).map_err(drv("device-to-host copy"))?;
        if matches!(mode, Mode::Ctr | Mode::Seal) && !plain && len > 0 {
            out = s
                .clone_dtoh(&d_dst.slice(..len))
                .map_err(drv("device-to-host copy"))?;
        }
        let _ = s.memset_zeros(&mut d_dst);
        Ok((out, acc_bytes(&accv)))
    }
}

impl ChunkOpener for CudaOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        same_len("open", src, dst)?;
        // Verify first, on the device; only then decrypt and copy plaintext out.
        let verified = self.verify(chunk, src);
        if let Err(e) = verified {
            dst.zeroize();
            return Err(e);
        }
        if !chunk.encrypted {
            dst.copy_from_slice(src);
            return Ok(());
        }
        match self.run(Mode::Ctr, &chunk.nonce, 0, chunk.aad, false, src) {
            Ok((pt, _)) => {
                dst.copy_from_slice(&pt);
                Ok(())
            }
            Err(e) => {
                dst.zeroize();
                Err(OpenError::Backend(e))
            }
        }
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        let src = zeroize::Zeroizing::new(buf.to_vec());
        self.open(chunk, &src, buf)
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        let (_, ghash) = self.run(
            Mode::Verify,
            &chunk.nonce,
            0,
            chunk.aad,
            !chunk.encrypted,
            src,
        )?;
        if ct_eq(&ghash, &self.key.expected_ghash(&chunk.nonce, &chunk.tag)) {
            Ok(())
        } else {
            Err(OpenError::TagMismatch)
        }
    }

    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        same_len("ctr_apply", src, dst)?;
        match self.run(Mode::Ctr, nonce, offset, &[], false, src) {
            Ok((out, _)) => {
                dst.copy_from_slice(&out);
                Ok(())
            }
            Err(e) => {
                dst.zeroize();
                Err(e)
            }
        }
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let (out, ghash) = self.run(Mode::Seal, nonce, 0, aad, !encrypted, buf)?;
        if encrypted {
            buf.copy_from_slice(&out);
        }
        // tag = GHASH ^ E_K(J0) = expected_ghash(nonce, ghash)
        Ok(self.key.expected_ghash(nonce, &ghash))
    }
}
