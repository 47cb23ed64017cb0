//! Host-side staging: copying chunks from wherever they lie (a mapped shard) into a slot's
//! pinned buffer, with a few threads because one cannot saturate PCIe with `memcpy`.
#![forbid(unsafe_code)]

/// Copies each chunk's bytes to `region[offs[i] - base..]`, split in pieces of at most 1 MiB
/// over a few threads (one thread cannot saturate PCIe with memcpy).
pub(super) fn parallel_copy(datas: &[&[u8]], offs: &[usize], base: usize, region: &mut [u8]) {
    const PIECE: usize = 1 << 20;
    let mut pieces: Vec<(&[u8], &mut [u8])> = Vec::new();
    let mut rest: &mut [u8] = region;
    let mut pos = base;
    for (&data, &o) in datas.iter().zip(offs) {
        let r = std::mem::take(&mut rest);
        let (_, tail) = r.split_at_mut(o - pos);
        let (mut dst, tail) = tail.split_at_mut(data.len());
        rest = tail;
        pos = o + data.len();
        let mut src = data;
        while !src.is_empty() {
            let n = src.len().min(PIECE);
            let (s0, s1) = src.split_at(n);
            let (d0, d1) = std::mem::take(&mut dst).split_at_mut(n);
            pieces.push((s0, d0));
            src = s1;
            dst = d1;
        }
    }
    let total: usize = pieces.iter().map(|p| p.0.len()).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(pieces.len());
    if threads <= 1 || total < 4 * PIECE {
        for (s, d) in pieces {
            d.copy_from_slice(s);
        }
        return;
    }
    let mut lanes: Vec<Vec<(&[u8], &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, p) in pieces.into_iter().enumerate() {
        lanes[i % threads].push(p);
    }
    std::thread::scope(|sc| {
        for lane in lanes {
            sc.spawn(move || {
                for (s, d) in lane {
                    d.copy_from_slice(s);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_places_every_chunk_at_its_offset() {
        let mut rng = crate::cipher::conformance::SplitMix(3);
        for case in 0..20 {
            let n = 1 + rng.below(12) as usize;
            let mut datas = Vec::new();
            for _ in 0..n {
                let len = if case % 2 == 0 {
                    rng.below(3 << 20)
                } else {
                    rng.below(100)
                } as usize;
                let mut d = vec![0u8; len];
                rng.fill(&mut d);
                datas.push(d);
            }
            let base = 16 * rng.below(4) as usize;
            let mut offs = Vec::new();
            let mut at = base;
            for d in &datas {
                offs.push(at);
                at += d.len().next_multiple_of(16);
            }
            let mut region = vec![0xEEu8; at - base];
            let refs: Vec<&[u8]> = datas.iter().map(|d| d.as_slice()).collect();
            parallel_copy(&refs, &offs, base, &mut region);
            let mut want = vec![0xEEu8; at - base];
            for (d, &o) in datas.iter().zip(&offs) {
                want[o - base..o - base + d.len()].copy_from_slice(d);
            }
            assert!(region == want, "case {case}: staging layout differs");
        }
    }
}
