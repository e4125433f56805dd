//! Sampling on the GPU: the candidates a sampling step needs, so that only
//! they come back instead of the whole logits row.
//!
//! The kernel (`shaders/sample_topk.wgsl`) returns every logit ranking among
//! the `want` largest (ties at the threshold included) and the raw logits of
//! the repetition penalty's window. It does no arithmetic on a logit (only
//! comparisons of an order-preserving key, and copies), so its output is the
//! same on every device, and the CPU sampler ([`crate::sampling`]) then runs
//! on it, unchanged, with the same RNG stream. Why that gives exactly the ids
//! of the CPU sampler over the whole row, for `want = k + h` (`k` = top-k, 1
//! for greedy; `h` = distinct ids in the penalty window, 0 without penalty):
//!
//! - The sampler's result depends only on its top-k list after the penalty
//!   (sorted by value, then id): softmax, top-p, min-p and the draw run on
//!   that list alone. So any candidate set containing that list, with the
//!   same values, gives the same list and the same id.
//! - A penalty > 1 only lowers the window's logits. A token in the top-k
//!   after it is beaten by fewer than k tokens after it, hence by fewer
//!   than k + h before it (only window tokens can change rank): it is among
//!   the raw top-(k + h). A penalty < 1 only raises the window's logits: a
//!   token outside the window in the top-k after it is in the raw top-k. In
//!   both cases the window's own tokens are returned with their raw values.
//! - The raw values are bit copies, and the penalty is applied on the host
//!   by the same code as for a full row, so every value the sampler sees is
//!   the one it would have computed.
//!
//! When more candidates tie at the threshold than the output holds, the
//! kernel says so and the caller reads the full row instead.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};

pub const SRC: &str = include_str!("../../shaders/sample_topk.wgsl");

/// Candidates the output holds (`want` may not exceed it).
pub const CAP: usize = 1024;
/// Ids of the penalty window the output holds.
pub const MAX_EXTRA: usize = 1024;
/// u32 words of the output buffer.
pub const OUT_WORDS: usize = 2 + 2 * CAP + MAX_EXTRA;

/// Mirrors `Params` in sample_topk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub vocab: u32,
    pub want: u32,
    pub n_extra: u32,
    pub cap: u32,
}

/// The compiled candidate kernel (one workgroup).
pub struct TopK {
    pub kernel: Kernel,
}

/// Bindings of one logits row; built once at load. The host writes
/// `params` and `extra` per step (no allocation).
pub struct TopKBinding {
    pub params: wgpu::Buffer,
    pub extra: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub bind: wgpu::BindGroup,
    pub vocab: usize,
}

/// What a candidate step read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// (id, raw logit), in no particular order; empty when `overflow`.
    pub pairs: Vec<(u32, f32)>,
    /// Raw logits of the extra ids, in their order.
    pub extra: Vec<f32>,
    /// More candidates tied at the threshold than [`CAP`].
    pub overflow: bool,
}

impl Candidates {
    /// From the kernel's output words.
    pub fn from_words(w: &[u32], n_extra: usize) -> Self {
        let n = w[0] as usize;
        let overflow = n > CAP;
        let pairs = if overflow {
            Vec::new()
        } else {
            (0..n)
                .map(|j| (w[2 + 2 * j], f32::from_bits(w[3 + 2 * j])))
                .collect()
        };
        let extra = (0..n_extra)
            .map(|e| f32::from_bits(w[2 + 2 * CAP + e]))
            .collect();
        Candidates {
            pairs,
            extra,
            overflow,
        }
    }

    /// The candidates and the extra ids' values as one (id, logit) list.
    pub fn with_extra(&self, extra_ids: &[u32]) -> Vec<(u32, f32)> {
        let mut v = self.pairs.clone();
        for (&id, &x) in extra_ids.iter().zip(&self.extra) {
            if !v.iter().any(|c| c.0 == id) {
                v.push((id, x));
            }
        }
        v
    }
}

impl TopK {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // One workgroup scans the row: as wide as the adapter allows, up to
        // 256 (CPU-type adapters run it as SIMD lanes on one core either way).
        let mut wg: u32 = 256;
        while wg > gpu.caps.max_invocations.max(1) {
            wg /= 2;
        }
        let src = format!("const WG: u32 = {wg}u;\n{}{SRC}", super::sample_full::KEYS);
        let kernel = gpu.kernel("sample_topk", &src, "main", &[])?;
        Ok(TopK { kernel })
    }

    /// Bind row 0 of `logits` (`vocab` wide).
    pub fn bind(&self, gpu: &Gpu, logits: &wgpu::Buffer, vocab: usize) -> Result<TopKBinding> {
        if vocab == 0 || (vocab as u64) * 4 > logits.size() || vocab > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "sample candidates: vocab {vocab} does not fit the logits buffer ({} bytes)",
                logits.size()
            )));
        }
        let params = gpu.uniform(
            "sample_topk.params",
            &Params {
                vocab: vocab as u32,
                want: 1,
                n_extra: 0,
                cap: CAP as u32,
            },
        )?;
        let extra = gpu.storage("sample_topk.extra", (MAX_EXTRA * 4) as u64);
        let out = gpu.storage("sample_topk.out", (OUT_WORDS * 4) as u64);
        let bind = gpu.bind(&self.kernel, &[&params, logits, &extra, &out]);
        Ok(TopKBinding {
            params,
            extra,
            out,
            bind,
            vocab,
        })
    }

    /// Write this step's `want` and extra ids (before the pass is submitted).
    pub fn prepare(&self, gpu: &Gpu, b: &TopKBinding, want: usize, extra: &[u32]) -> Result<()> {
        if want == 0 || want > CAP || extra.len() > MAX_EXTRA {
            return Err(Error::invalid(format!(
                "sample candidates: want {want} (1..={CAP}) and {} extra ids (at most {MAX_EXTRA})",
                extra.len()
            )));
        }
        if let Some(&bad) = extra.iter().find(|&&t| t as usize >= b.vocab) {
            return Err(Error::invalid(format!(
                "sample candidates: id {bad} is outside the vocabulary ({})",
                b.vocab
            )));
        }
        let p = Params {
            vocab: b.vocab as u32,
            want: want as u32,
            n_extra: extra.len() as u32,
            cap: CAP as u32,
        };
        gpu.queue.write_buffer(&b.params, 0, bytemuck::bytes_of(&p));
        if !extra.is_empty() {
            gpu.queue
                .write_buffer(&b.extra, 0, bytemuck::cast_slice(extra));
        }
        Ok(())
    }

    pub fn encode(&self, gpu: &Gpu, pass: &mut wgpu::ComputePass<'_>, b: &TopKBinding) {
        gpu.dispatch_in(pass, &self.kernel, &b.bind, 1);
    }
}

/// Order-preserving key of a finite f32, with -0 and +0 equal (so a tie
/// between them is a tie, as `==` and the greedy argmax see it; the
/// sampler's `total_cmp` order only splits a tied group, which the
/// candidates include whole).
pub fn key(x: f32) -> u32 {
    let b = if x == 0.0 { 0 } else { x.to_bits() };
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// CPU reference: the ids whose finite logits rank among the `want`
/// largest, ties at the threshold included (every finite one when fewer),
/// sorted by id.
pub fn reference(logits: &[f32], want: usize) -> Vec<u32> {
    let mut keys: Vec<u32> = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| key(x))
        .collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let thr = if keys.len() <= want.max(1) {
        0
    } else {
        keys[want.max(1) - 1]
    };
    (0..logits.len() as u32)
        .filter(|&i| {
            let x = logits[i as usize];
            x.is_finite() && key(x) >= thr
        })
        .collect()
}

/// One-shot candidates of one row on the device (tests).
#[cfg(not(target_arch = "wasm32"))]
pub fn candidates_once(
    gpu: &Gpu,
    logits: &[f32],
    want: usize,
    extra: &[u32],
) -> Result<Candidates> {
    let op = TopK::new(gpu)?;
    let lb = gpu.storage_init("sample_once.logits", bytemuck::cast_slice(logits))?;
    let b = op.bind(gpu, &lb, logits.len())?;
    op.prepare(gpu, &b, want, extra)?;
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("sample_once"),
            timestamp_writes: None,
        });
        op.encode(gpu, &mut pass, &b);
    }
    gpu.submit_wait(enc)?;
    let w = gpu.read_u32(&b.out, OUT_WORDS)?;
    Ok(Candidates::from_words(&w, extra.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gpu, rand_vec};

    fn ids(c: &Candidates) -> Vec<u32> {
        let mut v: Vec<u32> = c.pairs.iter().map(|p| p.0).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn key_orders_like_total_cmp() {
        let v = [-f32::MAX, -3.5, -1e-40, 0.0, 1e-40, 2.0, f32::MAX];
        for w in v.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{w:?}");
        }
        assert_eq!(key(-0.0), key(0.0));
    }

    #[test]
    fn candidates_match_the_reference() {
        let g = gpu();
        for (vocab, seed) in [(7usize, 1u64), (300, 2), (5000, 3), (49_152, 4)] {
            let mut l = rand_vec(vocab, 8.0, seed);
            // coarse values: many ties at every threshold
            if seed % 2 == 0 {
                for x in l.iter_mut() {
                    *x = (*x * 2.0).round() / 2.0;
                }
            }
            for want in [1usize, 2, 5, 40, 64, 300] {
                let c = candidates_once(g, &l, want, &[]).unwrap();
                let want_ids = reference(&l, want);
                if want_ids.len() > CAP {
                    assert!(c.overflow, "vocab {vocab} want {want}");
                    continue;
                }
                assert!(!c.overflow);
                assert_eq!(ids(&c), want_ids, "vocab {vocab} want {want}");
                for &(i, x) in &c.pairs {
                    assert_eq!(x.to_bits(), l[i as usize].to_bits());
                }
            }
        }
    }

    #[test]
    fn non_finite_never_candidates_and_extras_are_raw() {
        let g = gpu();
        let mut l = rand_vec(1000, 1.0, 9);
        l[3] = f32::INFINITY;
        l[4] = f32::NAN;
        l[5] = 5.0;
        l[6] = -0.0;
        let c = candidates_once(g, &l, 1, &[6, 4, 999]).unwrap();
        assert_eq!(c.pairs, vec![(5, 5.0)]);
        assert_eq!(c.extra[0].to_bits(), (-0.0f32).to_bits());
        assert!(c.extra[1].is_nan());
        assert_eq!(c.extra[2], l[999]);
        // -0 and +0 tie: both are candidates
        let c = candidates_once(g, &[-1.0, -0.0, 0.0, -2.0], 1, &[]).unwrap();
        assert_eq!(ids(&c), vec![1, 2]);
        // fewer finite values than wanted: all of them
        let c = candidates_once(g, &[1.0, f32::NAN, 2.0], 10, &[]).unwrap();
        assert_eq!(ids(&c), vec![0, 2]);
        assert!(candidates_once(g, &l, 0, &[]).is_err());
        assert!(candidates_once(g, &l, CAP + 1, &[]).is_err());
        assert!(candidates_once(g, &l, 3, &[1000]).is_err());
    }

    #[test]
    fn overflow_on_too_many_ties() {
        let l = vec![1.0f32; 3000];
        let c = candidates_once(gpu(), &l, 1, &[]).unwrap();
        assert!(c.overflow && c.pairs.is_empty());
    }
}
