//! The decoder (masked genes, then the class token, querying the cell embedding) and
//! the output heads with their losses, forward and backward.

#![allow(clippy::needless_range_loop)]

use super::blocks::{attn_bwd, attn_fwd, head_bwd, head_fwd, mlp_bwd, mlp_fwd};
use super::state::{Acc, Shared, Ws};
use super::{add_into, Norm};
use crate::train::kernels::TrainKernels;
use crate::train::ops::{add_from_soa, buf, lin_bwd, lin_fwd, ln_bwd, ln_fwd, to_soa, zeroed};
use crate::train::TrainCell;

/// Forward of the decoder and heads from the cell embedding in `ws.xl`; adds the
/// cell's squared error and cross-entropy to `acc`.
pub(super) fn forward(sh: &Shared, cell: &TrainCell, ws: &mut Ws, acc: &mut Acc) {
    let cfg = sh.cfg;
    let p = sh.p;
    let tk = TrainKernels::get();
    let (d, n, ch, chd, npad) = (sh.d, sh.n, sh.ch, sh.chd, sh.npad);
    let g_mask = cfg.seq_len as u32;

    let nmask = cell.mask.len();
    let class = cfg.class_token();
    let nq = nmask + usize::from(class);
    let dec_p = &p.decoder;
    let dw = &dec_p.attn.in_proj_weight;
    let dbias = &dec_p.attn.in_proj_bias;
    let rows = buf(&mut ws.rows, nq);
    let targets = buf(&mut ws.targets, nmask);
    for (j, &mp) in cell.mask.iter().enumerate() {
        rows[j] = cell.genes[mp];
        targets[j] = cell.values[mp];
    }
    if class {
        rows[nmask] = g_mask + 1;
    }
    let xl = &ws.xl[..n * d];
    let dkn = buf(&mut ws.d_kn, n * d);
    ln_fwd(
        &dec_p.layernorm_kv,
        xl,
        d,
        dkn,
        buf(&mut ws.d_xhat, n * d),
        buf(&mut ws.d_rstd, n),
    );
    let tmp = buf(&mut ws.g2, n * d);
    let dkt = zeroed(&mut ws.d_kt, d * npad);
    let dvt = zeroed(&mut ws.d_vt, d * npad);
    lin_fwd(&dw[d * d..2 * d * d], &dbias[d..2 * d], dkn, d, d, tmp);
    to_soa(tmp, d, npad, dkt);
    lin_fwd(&dw[2 * d * d..], &dbias[2 * d..], dkn, d, d, tmp);
    to_soa(tmp, d, npad, dvt);
    let qe = buf(&mut ws.d_qe, nq * d);
    for (j, &r) in rows.iter().enumerate() {
        let r = r as usize;
        qe[j * d..(j + 1) * d].copy_from_slice(&p.gene_emb[r * d..(r + 1) * d]);
    }
    let qn = buf(&mut ws.d_qn, nq * d);
    ln_fwd(
        &dec_p.layernorm_q,
        qe,
        d,
        qn,
        buf(&mut ws.d_qxhat, nq * d),
        buf(&mut ws.d_qrstd, nq),
    );
    let dqs = buf(&mut ws.d_qs, nq * d);
    lin_fwd(&dw[..d * d], &dbias[..d], qn, d, d, dqs);
    dqs.iter_mut().for_each(|v| *v *= sh.sc_c);
    let dm = buf(&mut ws.d_m, ch * nq);
    let dz = buf(&mut ws.d_z, ch * nq);
    let dout = buf(&mut ws.d_o, nq * d);
    attn_fwd(
        tk,
        ch,
        chd,
        dqs,
        dkt,
        dvt,
        npad,
        n,
        dm,
        dz,
        dout,
        &mut ws.sums,
    );
    let dlat = buf(&mut ws.d_lat, nq * d);
    let op = &dec_p.attn.out_proj;
    lin_fwd(&op.weight, &op.bias, dout, d, d, dlat);
    add_into(dlat, qe);
    let dec = buf(&mut ws.dec, nq * d);
    mlp_fwd(dec_p, dlat, d, &mut ws.d_mlp, dec);
    let pred = buf(&mut ws.pred, nmask);
    head_fwd(&p.value_head, &dec[..nmask * d], d, &mut ws.vhead, pred);
    let mut sse = 0.0f64;
    for j in 0..nmask {
        let e = (pred[j] - targets[j]) as f64;
        sse += e * e;
    }
    acc.sse += sse;
    if let (Some(nc), Some(hp), Some(label)) = (cfg.num_classes, &p.class_head, cell.label) {
        let lg = buf(&mut ws.logits, nc);
        if class {
            head_fwd(hp, &dec[nmask * d..nq * d], d, &mut ws.chead, lg);
        } else {
            head_fwd(hp, &ws.xl[..n * d], n * d, &mut ws.chead, lg);
        }
        let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let se: f64 = lg.iter().map(|&v| (v as f64 - mx).exp()).sum();
        let lse = mx + se.ln();
        acc.ce += lse - lg[label] as f64;
    }
}

/// Backward of [`forward`]: the losses through the heads and the decoder; leaves
/// ∂ of the cell embedding in `ws.gt2`.
pub(super) fn backward(sh: &Shared, cell: &TrainCell, norm: Norm, ws: &mut Ws, acc: &mut Acc) {
    let p = sh.p;
    let tk = TrainKernels::get();
    let (d, n, ch, chd, npad) = (sh.d, sh.n, sh.ch, sh.chd, sh.npad);
    let nmask = cell.mask.len();
    let nq = nmask + usize::from(sh.cfg.class_token());
    let dec_p = &p.decoder;
    let dw = &dec_p.attn.in_proj_weight;
    heads_backward(sh, cell, norm, ws, acc);
    let ddec = &ws.gt1[..nq * d];
    let gr = &mut acc.grads;
    // decoder MLP → ∂lat
    let dlat_g = zeroed(&mut ws.gt2, nq * d);
    mlp_bwd(
        dec_p,
        &mut gr.decoder,
        &ws.d_mlp,
        d,
        ddec,
        dlat_g,
        &mut ws.g1,
        &mut ws.g2,
    );
    // residual: ∂qe += ∂lat
    let dqe = buf(&mut ws.gt3, nq * d);
    dqe.copy_from_slice(dlat_g);
    // out_proj
    let d_o = zeroed(&mut ws.gt4, nq * d);
    let gop = &mut gr.decoder.attn.out_proj;
    lin_bwd(
        &dec_p.attn.out_proj.weight,
        &ws.d_o[..nq * d],
        dlat_g,
        d,
        d,
        Some(d_o),
        &mut gop.weight,
        &mut gop.bias,
    );
    // attention
    let dqs_g = zeroed(&mut ws.gt1, nq * d);
    let dkt_g = zeroed(&mut ws.g3, d * npad);
    let dvt_g = zeroed(&mut ws.g4, d * npad);
    attn_bwd(
        tk,
        ch,
        chd,
        &ws.d_qs[..nq * d],
        &ws.d_kt,
        &ws.d_vt,
        npad,
        n,
        &ws.d_m,
        &ws.d_z,
        &ws.d_o[..nq * d],
        d_o,
        dqs_g,
        dkt_g,
        dvt_g,
        &mut ws.dq,
    );
    dqs_g.iter_mut().for_each(|v| *v *= sh.sc_c);
    {
        let gia = &mut gr.decoder.attn;
        let dqn = zeroed(&mut ws.g1, nq * d);
        lin_bwd(
            &dw[..d * d],
            &ws.d_qn[..nq * d],
            dqs_g,
            d,
            d,
            Some(dqn),
            &mut gia.in_proj_weight[..d * d],
            &mut gia.in_proj_bias[..d],
        );
        ln_bwd(
            &dec_p.layernorm_q.weight,
            &ws.d_qxhat,
            &ws.d_qrstd,
            dqn,
            d,
            dqe,
            &mut gr.decoder.layernorm_q.weight,
            &mut gr.decoder.layernorm_q.bias,
        );
        for (j, &r) in ws.rows[..nq].iter().enumerate() {
            let r = r as usize;
            add_into(
                &mut gr.gene_emb[r * d..(r + 1) * d],
                &dqe[j * d..(j + 1) * d],
            );
        }
        // keys / values from the latent
        let dk = zeroed(&mut ws.g1, n * d);
        add_from_soa(dkt_g, d, npad, n, dk);
        let dv = zeroed(&mut ws.g2, n * d);
        add_from_soa(dvt_g, d, npad, n, dv);
        let dkn = zeroed(&mut ws.gt1, n * d);
        let gia = &mut gr.decoder.attn;
        let (gwq, rest) = gia.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let _ = gwq;
        let (gbq, rest) = gia.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        let _ = gbq;
        lin_bwd(
            &dw[d * d..2 * d * d],
            &ws.d_kn[..n * d],
            dk,
            d,
            d,
            Some(&mut *dkn),
            gwk,
            gbk,
        );
        lin_bwd(
            &dw[2 * d * d..],
            &ws.d_kn[..n * d],
            dv,
            d,
            d,
            Some(&mut *dkn),
            gwv,
            gbv,
        );
        let dx = zeroed(&mut ws.gt2, n * d);
        ln_bwd(
            &dec_p.layernorm_kv.weight,
            &ws.d_xhat,
            &ws.d_rstd,
            dkn,
            d,
            dx,
            &mut gr.decoder.layernorm_kv.weight,
            &mut gr.decoder.layernorm_kv.bias,
        );
        if sh.cfg.class_embedding && cell.label.is_some() {
            add_into(dx, &ws.d_cls[..n * d]);
        }
    }
}

/// The losses' gradients through the value head (masked genes) and the class head
/// (the class token): ∂ of the decoder output rows in `ws.gt1` (nq·d).
fn heads_backward(sh: &Shared, cell: &TrainCell, norm: Norm, ws: &mut Ws, acc: &mut Acc) {
    let cfg = sh.cfg;
    let p = sh.p;
    let d = sh.d;
    let nmask = cell.mask.len();
    let class = cfg.class_token();
    let nq = nmask + usize::from(class);
    let pred = &ws.pred[..nmask];
    let targets = &ws.targets[..nmask];
    let gr = &mut acc.grads;
    let ddec = zeroed(&mut ws.gt1, nq * d);
    let dpred = buf(&mut ws.gt2, nmask);
    for j in 0..nmask {
        dpred[j] = norm.mse_w * (pred[j] - targets[j]);
    }
    head_bwd(
        &p.value_head,
        &mut gr.value_head,
        &ws.vhead,
        d,
        dpred,
        &mut ddec[..nmask * d],
        &mut ws.g1,
        &mut ws.g2,
    );
    if let (Some(nc), Some(hp), Some(gh), Some(label)) = (
        cfg.num_classes,
        &p.class_head,
        gr.class_head.as_mut(),
        cell.label,
    ) {
        let lg = &ws.logits[..nc];
        let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let se: f64 = lg.iter().map(|&v| (v as f64 - mx).exp()).sum();
        let dl = buf(&mut ws.gt3, nc);
        for k in 0..nc {
            let pk = ((lg[k] as f64 - mx).exp() / se) as f32;
            dl[k] = norm.ce_w * (pk - if k == label { 1.0 } else { 0.0 });
        }
        // into the class token's decoder row, or into the cell embedding
        let (din, dx) = if class {
            (d, &mut ddec[nmask * d..nq * d])
        } else {
            let nd = sh.n * d;
            (nd, zeroed(&mut ws.d_cls, nd))
        };
        head_bwd(hp, gh, &ws.chead, din, dl, dx, &mut ws.g1, &mut ws.g2);
    }
}
