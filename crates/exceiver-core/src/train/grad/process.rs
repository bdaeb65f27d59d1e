//! The processor's self-attention layers, forward and backward.

#![allow(clippy::needless_range_loop)]

use super::add_into;
use super::blocks::{attn_bwd, attn_fwd};
use super::state::{Acc, LayerWs, Shared, Ws, R2};
use crate::model::kernels::{Kernels, LANES};
use crate::train::kernels::TrainKernels;
use crate::train::ops::{add_from_soa, buf, lin_bwd, lin_fwd, ln_bwd, ln_fwd, to_soa, zeroed};

/// Forward of every layer, from the encoder output in `ws.xl` to the cell embedding
/// in `ws.xl`.
pub(super) fn forward(sh: &Shared, ws: &mut Ws) {
    let cfg = sh.cfg;
    if ws.layers.len() < cfg.num_layers {
        ws.layers.resize_with(cfg.num_layers, LayerWs::default);
    }
    for l in 0..cfg.num_layers {
        layer_forward(sh, l, ws);
    }
}

fn layer_forward(sh: &Shared, l: usize, ws: &mut Ws) {
    let p = sh.p;
    let tk = TrainKernels::get();
    let kern = Kernels::get();
    let (d, n, ph, phd, npad) = (sh.d, sh.n, sh.ph, sh.phd, sh.npad);
    let lp = &p.layers[l];
    let lw = &mut ws.layers[l];
    let xin = buf(&mut lw.xin, n * d);
    xin.copy_from_slice(&ws.xl[..n * d]);
    let w = &lp.self_attn.in_proj_weight;
    let b = &lp.self_attn.in_proj_bias;
    let qs = buf(&mut lw.qs, n * d);
    lin_fwd(&w[..d * d], &b[..d], xin, d, d, qs);
    qs.iter_mut().for_each(|v| *v *= sh.sc_p);
    let tmp = buf(&mut ws.g2, n * d);
    let kt = zeroed(&mut lw.kt, d * npad);
    let vt = zeroed(&mut lw.vt, d * npad);
    lin_fwd(&w[d * d..2 * d * d], &b[d..2 * d], xin, d, d, tmp);
    to_soa(tmp, d, npad, kt);
    lin_fwd(&w[2 * d * d..], &b[2 * d..], xin, d, d, tmp);
    to_soa(tmp, d, npad, vt);
    let m = buf(&mut lw.m, ph * n);
    let z = buf(&mut lw.z, ph * n);
    let o = buf(&mut lw.o, n * d);
    attn_fwd(tk, ph, phd, qs, kt, vt, npad, n, m, z, o, &mut ws.sums);
    let y = buf(&mut ws.g3, n * d);
    let op = &lp.self_attn.out_proj;
    lin_fwd(&op.weight, &op.bias, o, d, d, y);
    add_into(y, xin);
    let x1 = buf(&mut lw.x1, n * d);
    ln_fwd(
        &lp.norm1,
        y,
        d,
        x1,
        buf(&mut lw.xhat1, n * d),
        buf(&mut lw.rstd1, n),
    );
    let x1t = buf(&mut lw.x1t, n * d);
    to_soa(x1, d, n, x1t);
    let f = buf(&mut ws.g4, n * d);
    let fw = &sh.ffn[l];
    if d == 4 {
        kern.ffn_d4(x1t, &fw.w1t, &fw.b1, &fw.w2, f);
    } else {
        let scratch = buf(&mut ws.scratch, d * LANES);
        kern.ffn_gen(d, x1t, &fw.w1t, &fw.b1, &fw.w2, f, scratch);
    }
    // y2 = x1 + f + b2 (row-major)
    for i in 0..n {
        for c in 0..d {
            y[i * d + c] = x1[i * d + c] + f[c * n + i] + lp.linear2.bias[c];
        }
    }
    let xo = buf(&mut ws.xl, n * d);
    ln_fwd(
        &lp.norm2,
        y,
        d,
        xo,
        buf(&mut lw.xhat2, n * d),
        buf(&mut lw.rstd2, n),
    );
}

/// Backward of every layer, last first: `ws.gt2` holds ∂ of the cell embedding on
/// entry and ∂ of the encoder output on return.
pub(super) fn backward(sh: &Shared, ws: &mut Ws, acc: &mut Acc) {
    for l in (0..sh.cfg.num_layers).rev() {
        layer_backward(sh, l, ws, acc);
    }
}

fn layer_backward(sh: &Shared, l: usize, ws: &mut Ws, acc: &mut Acc) {
    let p = sh.p;
    let tk = TrainKernels::get();
    let (d, n, ph, phd, npad) = (sh.d, sh.n, sh.ph, sh.phd, sh.npad);
    let lp = &p.layers[l];
    let gl = &mut acc.grads.layers[l];
    let lw = &ws.layers[l];
    let dx2 = &ws.gt2[..n * d];
    // LN2
    let dy2 = zeroed(&mut ws.gt1, n * d);
    ln_bwd(
        &lp.norm2.weight,
        &lw.xhat2,
        &lw.rstd2,
        dx2,
        d,
        dy2,
        &mut gl.norm2.weight,
        &mut gl.norm2.bias,
    );
    // FFN (residual: ∂x1 = ∂y2 + FFN')
    let dft = buf(&mut ws.g3, n * d);
    to_soa(dy2, d, n, dft);
    for c in 0..d {
        gl.linear2.bias[c] += dft[c * n..(c + 1) * n].iter().sum::<f32>();
    }
    let dx1t = zeroed(&mut ws.g4, n * d);
    let fw = &sh.ffn[l];
    let fg = &mut acc.ffn[l];
    tk.ffn_bwd(
        d,
        &lw.x1t[..n * d],
        dft,
        &fw.w1t,
        &fw.b1,
        &fw.w2,
        &mut fg.w1t,
        &mut fg.b1,
        &mut fg.w2,
        dx1t,
    );
    add_from_soa(dx1t, d, n, n, dy2);
    // LN1
    let dy = zeroed(&mut ws.gt3, n * d);
    ln_bwd(
        &lp.norm1.weight,
        &lw.xhat1,
        &lw.rstd1,
        dy2,
        d,
        dy,
        &mut gl.norm1.weight,
        &mut gl.norm1.bias,
    );
    // residual + out_proj
    let dxin = buf(&mut ws.gt2, n * d);
    dxin.copy_from_slice(dy);
    let d_o = zeroed(&mut ws.gt4, n * d);
    lin_bwd(
        &lp.self_attn.out_proj.weight,
        &lw.o[..n * d],
        dy,
        d,
        d,
        Some(d_o),
        &mut gl.self_attn.out_proj.weight,
        &mut gl.self_attn.out_proj.bias,
    );
    let dqs = zeroed(&mut ws.gt1, n * d);
    let dkt = zeroed(&mut ws.g3, d * npad);
    let dvt = zeroed(&mut ws.g4, d * npad);
    attn_bwd(
        tk,
        ph,
        phd,
        &lw.qs[..n * d],
        &lw.kt,
        &lw.vt,
        npad,
        n,
        &lw.m,
        &lw.z,
        &lw.o[..n * d],
        d_o,
        dqs,
        dkt,
        dvt,
        &mut ws.dq,
    );
    dqs.iter_mut().for_each(|v| *v *= sh.sc_p);
    let dk = zeroed(&mut ws.g1, n * d);
    add_from_soa(dkt, d, npad, n, dk);
    let dv = zeroed(&mut ws.g5, n * d);
    add_from_soa(dvt, d, npad, n, dv);
    let w = &lp.self_attn.in_proj_weight;
    let ga = &mut gl.self_attn;
    let (gwq, rest) = ga.in_proj_weight.split_at_mut(d * d);
    let (gwk, gwv) = rest.split_at_mut(d * d);
    let (gbq, rest) = ga.in_proj_bias.split_at_mut(d);
    let (gbk, gbv) = rest.split_at_mut(d);
    let xin = &lw.xin[..n * d];
    lin_bwd(&w[..d * d], xin, dqs, d, d, Some(&mut *dxin), gwq, gbq);
    lin_bwd(
        &w[d * d..2 * d * d],
        xin,
        dk,
        d,
        d,
        Some(&mut *dxin),
        gwk,
        gbk,
    );
    lin_bwd(&w[2 * d * d..], xin, dv, d, d, Some(&mut *dxin), gwv, gbv);
}

/// The folded feed-forward gradients (reduced over threads) into linear1 / linear2.
pub(super) fn finish(sh: &Shared, acc: &mut Acc) {
    let d = sh.d;
    let gr = &mut acc.grads;
    let ff = sh.cfg.dim_feedforward;
    let ffpad = sh.ffpad;
    for (l, fg) in acc.ffn.iter().enumerate() {
        let gl = &mut gr.layers[l];
        for j in 0..ff {
            for c in 0..d {
                gl.linear1.weight[j * d + c] += fg.w1t[c * ffpad + j] * R2;
                gl.linear2.weight[c * ff + j] += fg.w2[c * ffpad + j] * R2;
            }
            gl.linear1.bias[j] += fg.b1[j] * R2;
        }
    }
}
