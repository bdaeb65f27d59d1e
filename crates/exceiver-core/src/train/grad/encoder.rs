//! The encoder's forward and backward: a cell's entries as keys and values, the
//! latent queries attending to them and, in the reference attention mode, to every
//! other vocabulary gene at its zero-fill value (the batch-level terms, see the
//! module doc of [`super`]).

#![allow(clippy::needless_range_loop)]

use super::blocks::{add_value_term, mlp_bwd, mlp_fwd, value_term_bwd};
use super::state::{Acc, Shared, ThreadState, Ws};
use super::{add_into, threads_or_all};
use crate::error::{Error, Result};
use crate::model::forward::add_profile;
use crate::model::kernels::LANES;
use crate::train::kernels::TrainKernels;
use crate::train::ops::{
    add_from_soa, buf, lin_bwd, lin_fwd, ln_bwd, ln_fwd, round_up, to_soa, zeroed,
};
use crate::train::TrainCell;

/// Keys and values of every gene at its zero-fill value, and per (head, latent) the
/// shift M0 and the sums Zall, Aall over all of them (reference mode, once per batch).
pub(super) fn zero_fill_terms(sh: &mut Shared<'_>, threads: usize) -> Result<()> {
    let tk = TrainKernels::get();
    let cfg = sh.cfg;
    let (p, zf) = (sh.p, sh.zf);
    let (d, n, ch, chd, g, gpad) = (sh.d, sh.n, sh.ch, sh.chd, sh.g, sh.gpad);
    let enc = &p.encoder;
    let w = &enc.attn.in_proj_weight;
    let b = &enc.attn.in_proj_bias;

    let mut x0 = vec![0.0f32; g * d];
    for gi in 0..g {
        for c in 0..d {
            x0[gi * d + c] = zf[gi] * p.gene_emb[gi * d + c];
        }
    }
    let mut k0_xhat = vec![0.0; g * d];
    let mut k0_rstd = vec![0.0; g];
    let mut k0_kn = vec![0.0; g * d];
    ln_fwd(
        &enc.layernorm_kv,
        &x0,
        d,
        &mut k0_kn,
        &mut k0_xhat,
        &mut k0_rstd,
    );
    if cfg.value_embedding {
        add_value_term(&mut k0_kn, zf, &p.value_emb, d, |e| e);
    }
    let mut tmp = vec![0.0f32; g * d];
    let mut k0t = vec![0.0f32; d * gpad];
    let mut v0t = vec![0.0f32; d * gpad];
    lin_fwd(&w[d * d..2 * d * d], &b[d..2 * d], &k0_kn, d, d, &mut tmp);
    to_soa(&tmp, d, gpad, &mut k0t);
    lin_fwd(&w[2 * d * d..], &b[2 * d..], &k0_kn, d, d, &mut tmp);
    to_soa(&tmp, d, gpad, &mut v0t);

    // Per (head, latent): M0, Zall, Aall, split over threads.
    let pairs = ch * n;
    let stride = 2 + chd;
    let mut res = vec![0.0f64; pairs * stride];
    let threads = threads_or_all(threads).min(pairs).max(1);
    let per = pairs.div_ceil(threads);
    {
        let (enc_qs, k0t, v0t) = (&sh.enc_qs, &k0t, &v0t);
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = res
                .chunks_mut(per * stride)
                .enumerate()
                .map(|(t, chunk)| {
                    s.spawn(move || {
                        let mut out = vec![0.0f64; 1 + chd];
                        for (k, r) in chunk.chunks_mut(stride).enumerate() {
                            let pi = t * per + k;
                            let (h, i) = (pi / n, pi % n);
                            let qh = &enc_qs[i * d + h * chd..i * d + (h + 1) * chd];
                            let kh = &k0t[h * chd * gpad..(h + 1) * chd * gpad];
                            let vh = &v0t[h * chd * gpad..(h + 1) * chd * gpad];
                            let m0 = tk.max_dot(qh, kh, gpad, g) + 1.0;
                            tk.sums(qh, m0 - 1.0, kh, vh, gpad, g, &mut out);
                            r[0] = m0 as f64;
                            r[1..].copy_from_slice(&out);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| Error::internal("training thread panicked"))?;
            }
            Ok(())
        })?;
    }
    let mut m0 = vec![0.0f32; pairs];
    let mut s1 = vec![0.0f32; pairs];
    let mut zall = vec![0.0f64; pairs];
    let mut aall = vec![0.0f64; d * n];
    for pi in 0..pairs {
        let (h, i) = (pi / n, pi % n);
        let r = &res[pi * stride..(pi + 1) * stride];
        m0[pi] = r[0] as f32;
        s1[pi] = m0[pi] - 1.0;
        zall[pi] = r[1];
        for j in 0..chd {
            aall[(h * chd + j) * n + i] = r[2 + j];
        }
    }
    sh.k0_xhat = k0_xhat;
    sh.k0_rstd = k0_rstd;
    sh.k0_kn = k0_kn;
    sh.k0t = k0t;
    sh.v0t = v0t;
    sh.m0 = m0;
    sh.s1 = s1;
    sh.zall = zall;
    sh.aall = aall;
    Ok(())
}

/// Forward of one cell's encoder; its output (the input of layer 0) goes to `ws.xl`.
pub(super) fn forward(sh: &Shared, cell: &TrainCell, ws: &mut Ws) {
    let p = sh.p;
    let tk = TrainKernels::get();
    let (d, n, ch, chd) = (sh.d, sh.n, sh.ch, sh.chd);
    let g_mask = sh.cfg.seq_len as u32;
    let nnz = cell.genes.len();
    let epad = round_up(nnz, LANES);
    let enc = &p.encoder;
    let ew = &enc.attn.in_proj_weight;
    let eb = &enc.attn.in_proj_bias;

    let tok = buf(&mut ws.tok, nnz);
    let val = buf(&mut ws.val, nnz);
    tok.copy_from_slice(&cell.genes);
    val.copy_from_slice(&cell.values);
    for &mp in &cell.mask {
        tok[mp] = g_mask;
        val[mp] = 1.0;
    }
    let x = buf(&mut ws.g1, nnz * d);
    for e in 0..nnz {
        let r = tok[e] as usize;
        for c in 0..d {
            x[e * d + c] = val[e] * p.gene_emb[r * d + c];
        }
    }
    let kn = buf(&mut ws.e_kn, nnz * d);
    ln_fwd(
        &enc.layernorm_kv,
        x,
        d,
        kn,
        buf(&mut ws.e_xhat, nnz * d),
        buf(&mut ws.e_rstd, nnz),
    );
    if sh.cfg.value_embedding {
        add_value_term(kn, val, &p.value_emb, d, |e| tok[e] as usize);
    }
    let tmp = buf(&mut ws.g2, nnz * d);
    let kt = zeroed(&mut ws.e_kt, d * epad);
    let vt = zeroed(&mut ws.e_vt, d * epad);
    lin_fwd(&ew[d * d..2 * d * d], &eb[d..2 * d], kn, d, d, tmp);
    to_soa(tmp, d, epad, kt);
    lin_fwd(&ew[2 * d * d..], &eb[2 * d..], kn, d, d, tmp);
    to_soa(tmp, d, epad, vt);
    let (k0, v0) = if sh.reference {
        let k0 = zeroed(&mut ws.e_k0, d * epad);
        let v0 = zeroed(&mut ws.e_v0, d * epad);
        for (e, &gi) in cell.genes.iter().enumerate() {
            let gi = gi as usize;
            for c in 0..d {
                k0[c * epad + e] = sh.k0t[c * sh.gpad + gi];
                v0[c * epad + e] = sh.v0t[c * sh.gpad + gi];
            }
        }
        (&*k0, &*v0)
    } else {
        (&[][..], &[][..])
    };
    let em = buf(&mut ws.e_m, ch * n);
    let ez = buf(&mut ws.e_z, ch * n);
    let eo = buf(&mut ws.e_o, n * d);
    {
        let s = buf(&mut ws.sums, 2 * (1 + chd));
        let (sc, s0) = s.split_at_mut(1 + chd);
        for h in 0..ch {
            let r = h * chd * epad..(h + 1) * chd * epad;
            let (kh, vh) = (&kt[r.clone()], &vt[r.clone()]);
            for i in 0..n {
                let pi = h * n + i;
                let qh = &sh.enc_qs[i * d + h * chd..i * d + (h + 1) * chd];
                let mc = tk.max_dot(qh, kh, epad, nnz);
                let m = if sh.reference { mc.max(sh.m0[pi]) } else { mc };
                tk.sums(qh, m, kh, vh, epad, nnz, sc);
                let mut z = sc[0];
                if sh.reference {
                    let s2 = m - 1.0;
                    tk.sums(qh, s2, &k0[r.clone()], &v0[r.clone()], epad, nnz, s0);
                    let f = ((sh.s1[pi] as f64) - (s2 as f64)).exp();
                    z = f * sh.zall[pi] - s0[0] + sc[0];
                    for j in 0..chd {
                        let c = h * chd + j;
                        let av = f * sh.aall[c * n + i] - s0[1 + j] + sc[1 + j];
                        eo[i * d + c] = (av / z) as f32;
                    }
                } else {
                    for j in 0..chd {
                        eo[i * d + h * chd + j] = (sc[1 + j] / z) as f32;
                    }
                }
                em[pi] = m;
                ez[pi] = z;
            }
        }
    }
    let lat = buf(&mut ws.e_lat, n * d);
    let op = &enc.attn.out_proj;
    lin_fwd(&op.weight, &op.bias, eo, d, d, lat);
    add_into(lat, &p.query_emb);
    let xl = buf(&mut ws.xl, n * d);
    mlp_fwd(enc, lat, d, &mut ws.e_mlp, xl);
    if sh.cfg.profile {
        let tok = &ws.tok[..nnz];
        add_profile(&p.profile, sh.zf, &cell.genes, Some(tok), &cell.values, xl);
    }
}

/// Backward of [`forward`] from `∂ encoder output` in `ws.gt2`; the per-cell part of
/// the zero-fill terms goes to `acc` (α, β, ∂k0, ∂v0), finished by
/// [`shared_backward`] and [`finish`].
pub(super) fn backward(sh: &Shared, cell: &TrainCell, ws: &mut Ws, acc: &mut Acc) {
    let p = sh.p;
    let (d, n) = (sh.d, sh.n);
    let g_mask = sh.cfg.seq_len as u32;
    let nnz = cell.genes.len();
    let epad = round_up(nnz, LANES);
    let enc = &p.encoder;
    let ew = &enc.attn.in_proj_weight;
    let gr = &mut acc.grads;
    let dxo = &ws.gt2[..n * d];
    if sh.cfg.profile {
        // ∂ profile_proj[g] += (v_g − zero_fill_g) · ∂ encoder output, unmasked genes
        let nd = n * d;
        for (e, &g) in cell.genes.iter().enumerate() {
            if ws.tok[e] != g {
                continue;
            }
            let x = cell.values[e] - sh.zf[g as usize];
            let row = &mut gr.profile[g as usize * nd..(g as usize + 1) * nd];
            row.iter_mut().zip(dxo).for_each(|(r, &dy)| *r += x * dy);
        }
    }
    let dlat = zeroed(&mut ws.gt1, n * d);
    mlp_bwd(
        enc,
        &mut gr.encoder,
        &ws.e_mlp,
        d,
        dxo,
        dlat,
        &mut ws.g1,
        &mut ws.g2,
    );
    add_into(&mut gr.query_emb, dlat);
    let d_o = zeroed(&mut ws.gt3, n * d);
    let gop = &mut gr.encoder.attn.out_proj;
    lin_bwd(
        &enc.attn.out_proj.weight,
        &ws.e_o[..n * d],
        dlat,
        d,
        d,
        Some(d_o),
        &mut gop.weight,
        &mut gop.bias,
    );
    attention_backward(sh, cell, ws, acc);
    let (dkt, dvt) = (&ws.g3[..d * epad], &ws.g4[..d * epad]);
    let gr = &mut acc.grads;
    // entries: keys/values → LN_kv → E[tok]
    let dk = zeroed(&mut ws.g1, nnz * d);
    add_from_soa(dkt, d, epad, nnz, dk);
    let dv = zeroed(&mut ws.g2, nnz * d);
    add_from_soa(dvt, d, epad, nnz, dv);
    let dkn = zeroed(&mut ws.gt1, nnz * d);
    {
        let ga = &mut gr.encoder.attn;
        let (_, rest) = ga.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let (_, rest) = ga.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        let kn = &ws.e_kn[..nnz * d];
        lin_bwd(
            &ew[d * d..2 * d * d],
            kn,
            dk,
            d,
            d,
            Some(&mut *dkn),
            gwk,
            gbk,
        );
        lin_bwd(&ew[2 * d * d..], kn, dv, d, d, Some(&mut *dkn), gwv, gbv);
    }
    if sh.cfg.value_embedding {
        let tok = &ws.tok[..nnz];
        value_term_bwd(dkn, &ws.val[..nnz], d, &mut gr.value_emb, |e| {
            tok[e] as usize
        });
    }
    let dx = zeroed(&mut ws.gt2, nnz * d);
    ln_bwd(
        &enc.layernorm_kv.weight,
        &ws.e_xhat,
        &ws.e_rstd,
        dkn,
        d,
        dx,
        &mut gr.encoder.layernorm_kv.weight,
        &mut gr.encoder.layernorm_kv.bias,
    );
    for e in 0..nnz {
        let t = ws.tok[e];
        if t == g_mask {
            continue;
        }
        let t = t as usize;
        let v = ws.val[e];
        for c in 0..d {
            gr.gene_emb[t * d + c] += v * dx[e * d + c];
        }
    }
}

/// The zero-fill terms' batch-level backward: α, β summed over all threads, then one
/// pass over all genes, split over the threads.
pub(super) fn shared_backward(
    sh: &Shared,
    states: &mut [ThreadState],
    threads: usize,
) -> Result<()> {
    let shr = sh;
    let (first, rest) = states.split_at_mut(1);
    for st in rest.iter() {
        add_into(&mut first[0].acc.alpha, &st.acc.alpha);
        add_into(&mut first[0].acc.beta, &st.acc.beta);
    }
    let alpha: Vec<f32> = first[0].acc.alpha.iter().map(|&v| v as f32).collect();
    let beta: Vec<f32> = first[0].acc.beta.iter().map(|&v| v as f32).collect();
    let (d, n, ch, chd, g, gpad) = (sh.d, sh.n, sh.ch, sh.chd, sh.g, sh.gpad);
    let pairs = ch * n;
    let per = pairs.div_ceil(threads);
    let (alpha, beta) = (&alpha, &beta);
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = states
            .iter_mut()
            .take(threads)
            .enumerate()
            .map(|(t, st)| {
                s.spawn(move || {
                    let tk = TrainKernels::get();
                    let mut dq = vec![0.0f32; chd];
                    let acc = &mut st.acc;
                    for pi in (t * per)..((t + 1) * per).min(pairs) {
                        let (h, i) = (pi / n, pi % n);
                        let c0 = i * d + h * chd;
                        let r = h * chd * gpad..(h + 1) * chd * gpad;
                        tk.bwd(
                            &shr.enc_qs[c0..c0 + chd],
                            shr.s1[pi],
                            1.0,
                            &alpha[c0..c0 + chd],
                            beta[pi],
                            &shr.k0t[r.clone()],
                            &shr.v0t[r.clone()],
                            gpad,
                            g,
                            &mut acc.dk0t[r.clone()],
                            &mut acc.dv0t[r.clone()],
                            &mut dq,
                        );
                        add_into(&mut acc.dqs[c0..c0 + chd], &dq);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| Error::internal("training thread panicked"))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The encoder's batch-level gradients on the reduced accumulators: the zero-fill
/// keys/values of every gene back into E, the encoder queries back into query_emb.
pub(super) fn finish(sh: &Shared, acc: &mut Acc) {
    let (d, n, g) = (sh.d, sh.n, sh.g);
    let p = sh.p;
    let enc = &p.encoder;
    let ew = &enc.attn.in_proj_weight;
    let gr = &mut acc.grads;
    if sh.reference {
        let gpad = sh.gpad;
        let mut dk = vec![0.0f32; g * d];
        let mut dv = vec![0.0f32; g * d];
        add_from_soa(&acc.dk0t, d, gpad, g, &mut dk);
        add_from_soa(&acc.dv0t, d, gpad, g, &mut dv);
        let mut dkn = vec![0.0f32; g * d];
        let ga = &mut gr.encoder.attn;
        let (_, rest) = ga.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let (_, rest) = ga.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        lin_bwd(
            &ew[d * d..2 * d * d],
            &sh.k0_kn,
            &dk,
            d,
            d,
            Some(&mut dkn),
            gwk,
            gbk,
        );
        lin_bwd(
            &ew[2 * d * d..],
            &sh.k0_kn,
            &dv,
            d,
            d,
            Some(&mut dkn),
            gwv,
            gbv,
        );
        if sh.cfg.value_embedding {
            value_term_bwd(&dkn, &sh.zf[..g], d, &mut gr.value_emb, |e| e);
        }
        let mut dx = vec![0.0f32; g * d];
        ln_bwd(
            &enc.layernorm_kv.weight,
            &sh.k0_xhat,
            &sh.k0_rstd,
            &dkn,
            d,
            &mut dx,
            &mut gr.encoder.layernorm_kv.weight,
            &mut gr.encoder.layernorm_kv.bias,
        );
        for gi in 0..g {
            let z = sh.zf[gi];
            for c in 0..d {
                gr.gene_emb[gi * d + c] += z * dx[gi * d + c];
            }
        }
    }
    // encoder queries: qs = sc·(Wq LN_q(Q0) + bq)
    let mut dq = acc.dqs.clone();
    dq.iter_mut().for_each(|v| *v *= sh.sc_c);
    let mut dqn = vec![0.0f32; n * d];
    let ga = &mut gr.encoder.attn;
    lin_bwd(
        &ew[..d * d],
        &sh.q_qn,
        &dq,
        d,
        d,
        Some(&mut dqn),
        &mut ga.in_proj_weight[..d * d],
        &mut ga.in_proj_bias[..d],
    );
    ln_bwd(
        &enc.layernorm_q.weight,
        &sh.q_xhat,
        &sh.q_rstd,
        &dqn,
        d,
        &mut gr.query_emb,
        &mut gr.encoder.layernorm_q.weight,
        &mut gr.encoder.layernorm_q.bias,
    );
}

/// The latents' attention over the cell's entries (and, in reference mode, the
/// per-cell part of the all-gene terms), from ∂ of its output in `ws.gt3`: ∂ of the
/// entries' keys and values (SoA) in `ws.g3`, `ws.g4`; ∂ of the queries, α, β and
/// ∂k0, ∂v0 into `acc`.
fn attention_backward(sh: &Shared, cell: &TrainCell, ws: &mut Ws, acc: &mut Acc) {
    let tk = TrainKernels::get();
    let (d, n, ch, chd) = (sh.d, sh.n, sh.ch, sh.chd);
    let nnz = cell.genes.len();
    let epad = round_up(nnz, LANES);
    let d_o = &ws.gt3[..n * d];
    let dkt = zeroed(&mut ws.g3, d * epad);
    let dvt = zeroed(&mut ws.g4, d * epad);
    let (dk0, dv0) = if sh.reference {
        (
            zeroed(&mut ws.g5, d * epad),
            zeroed(&mut ws.scratch, d * epad),
        )
    } else {
        (&mut [][..], &mut [][..])
    };
    let dq = buf(&mut ws.dq, chd);
    for h in 0..ch {
        let r = h * chd * epad..(h + 1) * chd * epad;
        for i in 0..n {
            let pi = h * n + i;
            let c0 = i * d + h * chd;
            let qh = &sh.enc_qs[c0..c0 + chd];
            let delta = &d_o[c0..c0 + chd];
            let o = &ws.e_o[c0..c0 + chd];
            let dvo: f32 = delta.iter().zip(o).map(|(a, b)| a * b).sum();
            let z = ws.e_z[pi];
            let m = ws.e_m[pi];
            let w = (1.0 / z) as f32;
            tk.bwd(
                qh,
                m,
                w,
                delta,
                dvo,
                &ws.e_kt[r.clone()],
                &ws.e_vt[r.clone()],
                epad,
                nnz,
                &mut dkt[r.clone()],
                &mut dvt[r.clone()],
                dq,
            );
            add_into(&mut acc.dqs[c0..c0 + chd], dq);
            if sh.reference {
                let s2 = m - 1.0;
                tk.bwd(
                    qh,
                    s2,
                    -w,
                    delta,
                    dvo,
                    &ws.e_k0[r.clone()],
                    &ws.e_v0[r.clone()],
                    epad,
                    nnz,
                    &mut dk0[r.clone()],
                    &mut dv0[r.clone()],
                    dq,
                );
                add_into(&mut acc.dqs[c0..c0 + chd], dq);
                let f = ((sh.s1[pi] as f64) - (s2 as f64)).exp() / z;
                for j in 0..chd {
                    acc.alpha[c0 + j] += f * delta[j] as f64;
                }
                acc.beta[pi] += f * dvo as f64;
            }
        }
    }
    if sh.reference {
        let gp = sh.gpad;
        for (e, &gi) in cell.genes.iter().enumerate() {
            let gi = gi as usize;
            for c in 0..d {
                acc.dk0t[c * gp + gi] += dk0[c * epad + e];
                acc.dv0t[c * gp + gi] += dv0[c * epad + e];
            }
        }
    }
}
