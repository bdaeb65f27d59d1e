//! A fused process layer: one post-norm Transformer encoder layer of the process stack
//! as one candle custom op, for models with narrow latents (`d` of 1, 2, 4 or 8; the
//! published model has 4). Unfused, a layer is some forty candle kernels whose
//! broadcast element-wise passes dominate a GPU profile (issue 17); fused, it reads a
//! batch's latents once and writes them once, and the feed-forward's hidden layer (2,048
//! wide in the published model) is never stored.
//!
//! * On the CPU ([`ProcessLayer`]'s `cpu_fwd`) the op runs the same arithmetic as the
//!   CUDA kernel (`kernels/process_layer.cu`), step by step; the tests check it against
//!   candle's unfused ops and the reference fixtures.
//! * On a GPU (`cuda_fwd`, in `cuda` builds) it launches that kernel: one block per
//!   cell, one thread per latent. The PTX is compiled by `build.rs` with `nvcc` (`make
//!   cuda`).
//!
//! Off by default: [`super::DeviceModel::with_fused_process`] turns it on. The CUDA
//! kernel has not run on a GPU yet (no session has had one since it was written), so
//! nothing turns it on by itself until a GPU run has checked its parity
//! (`gpu_bench --fused`). Inference only: the op has no backward pass, so training keeps
//! the unfused, differentiable layer.

use crate::model::config::Config;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

/// Latent widths the kernel is instantiated for.
pub(crate) const WIDTHS: [usize; 4] = [1, 2, 4, 8];
/// Most latents per cell (threads per block).
pub(crate) const MAX_LATENTS: usize = 1024;
/// Most latent values per cell: the kernel keeps a cell's keys and values (2·N·d f32)
/// in shared memory, within the 48 KiB a kernel gets without opting in to more.
pub(crate) const MAX_CELL_VALUES: usize = 6144;

/// Whether `cfg`'s process stack can run fused.
pub(crate) fn supports(cfg: &Config) -> bool {
    WIDTHS.contains(&cfg.seq_dim)
        && cfg.nhead > 0
        && cfg.seq_dim.is_multiple_of(cfg.nhead)
        && (1..=MAX_LATENTS).contains(&cfg.query_len)
        && cfg.query_len * cfg.seq_dim <= MAX_CELL_VALUES
        && cfg.dim_feedforward > 0
}

/// Length of one layer's packed weights (see [`Offsets`]).
pub(crate) fn packed_len(d: usize, ff: usize) -> usize {
    4 * d * d + 9 * d + 2 * ff * d + ff
}

/// Where each weight starts in a layer's packed weights: `wqkv [3d, d]`, `bqkv [3d]`,
/// `wo [d, d]`, `bo [d]`, `n1w`, `n1b [d]`, `w1 [ff, d]`, `b1 [ff]`, `w2 [d, ff]`,
/// `b2 [d]`, `n2w`, `n2b [d]`: the order `net.rs` packs them in and the kernel reads
/// them in.
struct Offsets {
    bqkv: usize,
    wo: usize,
    bo: usize,
    n1w: usize,
    n1b: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    n2w: usize,
    n2b: usize,
}

impl Offsets {
    fn new(d: usize, ff: usize) -> Offsets {
        let bqkv = 3 * d * d;
        let wo = bqkv + 3 * d;
        let bo = wo + d * d;
        let n1w = bo + d;
        let n1b = n1w + d;
        let w1 = n1b + d;
        let b1 = w1 + ff * d;
        let w2 = b1 + ff;
        let b2 = w2 + d * ff;
        let n2w = b2 + d;
        let n2b = n2w + d;
        Offsets {
            bqkv,
            wo,
            bo,
            n1w,
            n1b,
            w1,
            b1,
            w2,
            b2,
            n2w,
            n2b,
        }
    }
}

/// The op: `x [B, N, d]` (contiguous) and one layer's packed weights → the layer's
/// output `[B, N, d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcessLayer {
    pub(crate) d: usize,
    pub(crate) heads: usize,
    pub(crate) ff: usize,
    pub(crate) eps: f32,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("fused process layer: {what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused process layer: {what} must be contiguous"),
    }
}

impl ProcessLayer {
    /// `(B, N)` of an input layout, checked against the op and the packed weights.
    fn dims(&self, x: &Layout, p: &Layout) -> Result<(usize, usize)> {
        let (b, n, d) = x.shape().dims3()?;
        if d != self.d || !WIDTHS.contains(&d) || self.heads == 0 || !d.is_multiple_of(self.heads) {
            candle_core::bail!(
                "fused process layer: width {d} with {} heads (op for width {})",
                self.heads,
                self.d
            );
        }
        if n == 0 || n > MAX_LATENTS || n * d > MAX_CELL_VALUES {
            candle_core::bail!(
                "fused process layer: {n} latents of width {d} (1 to {MAX_LATENTS}, at most {MAX_CELL_VALUES} values)"
            );
        }
        let want = packed_len(self.d, self.ff);
        if p.shape().elem_count() != want {
            candle_core::bail!(
                "fused process layer: {} packed weights, expected {want}",
                p.shape().elem_count()
            );
        }
        Ok((b, n))
    }

    /// One cell `[N, d]` → `[N, d]`, as the kernel computes it (one latent per thread).
    fn cell(&self, x: &[f32], p: &[f32], y: &mut [f32]) {
        let (d, ff, heads) = (self.d, self.ff, self.heads);
        let n = x.len() / d;
        let o = Offsets::new(d, ff);
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // keys and values of every latent (the kernel's shared memory), queries
        let mut q = vec![0.0f32; n * d];
        let mut k = vec![0.0f32; n * d];
        let mut v = vec![0.0f32; n * d];
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            for r in 0..d {
                let (mut aq, mut ak, mut av) =
                    (p[o.bqkv + r], p[o.bqkv + d + r], p[o.bqkv + 2 * d + r]);
                for c in 0..d {
                    aq += p[r * d + c] * xi[c];
                    ak += p[(d + r) * d + c] * xi[c];
                    av += p[(2 * d + r) * d + c] * xi[c];
                }
                q[i * d + r] = aq * scale;
                k[i * d + r] = ak;
                v[i * d + r] = av;
            }
        }
        let mut att = vec![0.0f32; d];
        let mut t = vec![0.0f32; d];
        let mut f = vec![0.0f32; d];
        for i in 0..n {
            let qi = &q[i * d..(i + 1) * d];
            for h in 0..heads {
                let cs = h * hd..(h + 1) * hd;
                let logit = |j: usize| -> f32 {
                    let mut s = 0.0f32;
                    for c in cs.clone() {
                        s += qi[c] * k[j * d + c];
                    }
                    s
                };
                let mut m = f32::NEG_INFINITY;
                for j in 0..n {
                    m = m.max(logit(j));
                }
                let mut z = 0.0f32;
                let mut acc = [0.0f32; 8];
                for j in 0..n {
                    let e = (logit(j) - m).exp();
                    z += e;
                    for c in cs.clone() {
                        acc[c] += e * v[j * d + c];
                    }
                }
                for c in cs {
                    att[c] = acc[c] / z;
                }
            }
            for r in 0..d {
                let mut a = p[o.bo + r];
                for c in 0..d {
                    a += p[o.wo + r * d + c] * att[c];
                }
                t[r] = x[i * d + r] + a;
            }
            layer_norm(&mut t, &p[o.n1w..o.n1w + d], &p[o.n1b..o.n1b + d], self.eps);
            f.copy_from_slice(&p[o.b2..o.b2 + d]);
            for j in 0..ff {
                let mut hsum = p[o.b1 + j];
                for c in 0..d {
                    hsum += p[o.w1 + j * d + c] * t[c];
                }
                let g = 0.5 * hsum * (1.0 + libm::erff(hsum * std::f32::consts::FRAC_1_SQRT_2));
                for c in 0..d {
                    f[c] += p[o.w2 + c * ff + j] * g;
                }
            }
            for c in 0..d {
                t[c] += f[c];
            }
            layer_norm(&mut t, &p[o.n2w..o.n2w + d], &p[o.n2b..o.n2b + d], self.eps);
            y[i * d..(i + 1) * d].copy_from_slice(&t);
        }
    }
}

/// LayerNorm of one row in place, two-pass, as the kernel.
fn layer_norm(v: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = v.len() as f32;
    let mean = v.iter().sum::<f32>() / d;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d;
    let r = 1.0 / (var + eps).sqrt();
    for ((x, w), b) in v.iter_mut().zip(w).zip(b) {
        *x = (*x - mean) * r * w + b;
    }
}

impl CustomOp2 for ProcessLayer {
    fn name(&self) -> &'static str {
        "exceiver-process-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n) = self.dims(l1, l2)?;
        let x = contiguous(s1, l1, "the latents")?;
        let p = contiguous(s2, l2, "the packed weights")?;
        let cell = n * self.d;
        let mut y = vec![0.0f32; b * cell];
        for (xc, yc) in x.chunks(cell).zip(y.chunks_mut(cell)) {
            self.cell(xc, p, yc);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (b, n) = self.dims(l1, l2)?;
        let (x0, x1) = l1.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused process layer: latents not contiguous".into())
        })?;
        let (p0, p1) = l2.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused process layer: weights not contiguous".into())
        })?;
        let dev = s1.device.clone();
        let x = s1.as_cuda_slice::<f32>()?.slice(x0..x1);
        let p = s2.as_cuda_slice::<f32>()?.slice(p0..p1);
        let func = dev.get_or_load_custom_func(
            &format!("exceiver_process_layer_d{}", self.d),
            "exceiver_process_layer",
            PROCESS_LAYER_PTX,
        )?;
        // SAFETY: every element is written by the kernel (one thread per latent row).
        let y = unsafe { dev.alloc::<f32>(b * n * self.d)? };
        let cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (n as u32, 1, 1),
            shared_mem_bytes: (2 * n * self.d * std::mem::size_of::<f32>()) as u32,
        };
        let (n_i, heads, ff) = (n as i32, self.heads as i32, self.ff as i32);
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&y);
        builder.arg(&p);
        builder.arg(&n_i);
        builder.arg(&heads);
        builder.arg(&ff);
        builder.arg(&self.eps);
        // SAFETY: the arguments match the kernel's signature (process_layer.cu).
        unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev),
            l1.shape().clone(),
        ))
    }
}

/// The kernel's PTX, compiled by `build.rs` (nvcc) in `cuda` builds.
#[cfg(feature = "cuda")]
const PROCESS_LAYER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/process_layer.ptx"));
