#!/usr/bin/env python3
"""Throughput of two PyTorch forms of the Exceiver on a GPU (or the CPU), to compare
with examples/gpu_bench.rs on the same machine (README, section GPU).

* dense: the reference's module structure (keiserlab/exceiver `models.py`, as
  fixtures/README.md describes it): nn.Embedding, CrossAttn (LayerNorms, packed
  nn.MultiheadAttention, residual on the un-normalised query, LN-Linear-GELU-LN-Linear
  MLP), a post-norm nn.TransformerEncoder, the value head and, for a classifier, the
  class head, run as the authors run it: every cell is fed all G genes, zero-count
  genes with their zero-fill value and the float key-padding mask (an additive +1 on
  their attention logits).
* sparse: the same modules and weights, the encoder's exact maths in O(expressed
  genes) per cell (`SparseEncoder`: the unexpressed genes' softmax terms summed once,
  a cell swaps in its expressed genes), as exceiver's CPU model computes it.

Both load the same safetensors weights (reference key names, strict). Matrix products
in full f32 (TF32 off). For each form:

  1. parity: embeddings, value predictions (and class logits) of the 16 fixture cells
     against fixtures/*_outputs.safetensors (normwise relative errors);
  2. embedding: cells/s at each batch size (synthetic cells of about 1,500 expressed
     genes; building the input on the device is included);
  3. training: cells/s of steps of 64 cells with 225 masked genes each (the reference's
     masking: mask token, value 1; decoder queried with the masked genes), MSE (+ CE
     for a classifier), backward, torch.optim.Adam(lr 3e-4, weight_decay 1e-5). Both
     forms start from the same weights and batches, so equal first and last losses
     show that the sparse form's gradients are the reference's.

Needs only torch (no numpy, no safetensors package). Example:

  python3 scripts/torch_reference_bench.py --weights fixtures/pretrained_TS_exceiver.safetensors
"""

import argparse
import json
import math
import struct
import sys
import time

import torch
from torch import nn

DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


def read_safetensors(path):
    """All tensors of a safetensors file (on the CPU) and its metadata."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        dt = DTYPES.get(info["dtype"])
        if dt is None:
            continue
        s, e = info["data_offsets"]
        buf = bytearray(data[base + s : base + e])
        t = torch.frombuffer(buf, dtype=dt) if e > s else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out, meta


# ---------------------------------------------------------------- reference modules


class CrossAttn(nn.Module):
    def __init__(self, query_dim, key_val_dim, num_heads=4):
        super().__init__()
        self.layernorm_kv = nn.LayerNorm(key_val_dim)
        self.layernorm_q = nn.LayerNorm(query_dim)
        kw = {} if key_val_dim == query_dim else {"kdim": key_val_dim, "vdim": key_val_dim}
        self.cross_attn = nn.MultiheadAttention(query_dim, num_heads, batch_first=True, **kw)
        self.mlp = nn.Sequential(
            nn.LayerNorm(query_dim),
            nn.Linear(query_dim, query_dim),
            nn.GELU(),
            nn.LayerNorm(query_dim),
            nn.Linear(query_dim, query_dim),
        )

    def forward(self, q, kv, key_padding_mask=None):
        kvn = self.layernorm_kv(kv)
        out, _ = self.cross_attn(
            self.layernorm_q(q), kvn, kvn, key_padding_mask=key_padding_mask, need_weights=False
        )
        out = out + q
        return out + self.mlp(out)


class ProcessSelfAttn(nn.Module):
    def __init__(self, d, nhead, ff, num_layers):
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(
            d, nhead, ff, dropout=0.0, activation="gelu", batch_first=True
        )
        self.transformer = nn.TransformerEncoder(
            self.encoder_layer, num_layers, enable_nested_tensor=False
        )

    def forward(self, x):
        return self.transformer(x)


class Exceiver(nn.Module):
    def __init__(self, hp):
        super().__init__()
        g, d, c = hp["seq_len"], hp["seq_dim"], hp.get("classify_dim")
        self.hp = hp
        self.gene_emb = nn.Embedding(g + (2 if c else 1), d, padding_idx=g)
        self.query_emb = nn.Parameter(torch.zeros(hp["query_len"], hp["query_dim"]))
        self.encoder_cross_attn = CrossAttn(hp["query_dim"], d)
        self.process_self_attn = ProcessSelfAttn(
            hp["query_dim"], hp["nhead"], hp["dim_feedforward"], hp["num_layers"]
        )
        self.decoder_cross_attn = CrossAttn(d, hp["query_dim"])
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1), nn.GELU(), nn.Linear(1, 1))
        if c:
            self.mlp_classify = nn.Sequential(
                nn.LayerNorm(d), nn.Linear(d, c), nn.GELU(), nn.Linear(c, c)
            )

    def embed(self, gene_ids, gene_vals, key_padding_mask):
        """Processed latent [B, N, d] of dense inputs [B, G]."""
        kv = self.gene_emb(gene_ids) * gene_vals.unsqueeze(-1)
        q = self.query_emb.unsqueeze(0).expand(gene_ids.shape[0], -1, -1)
        lat = self.encoder_cross_attn(q, kv, key_padding_mask)
        return self.process_self_attn(lat)

    def heads(self, lat, query_ids, with_class):
        """Value predictions [B, Q] and (with_class) class logits [B, C]."""
        b = lat.shape[0]
        rows = query_ids
        if with_class:
            cls = torch.full((b, 1), self.hp["seq_len"] + 1, dtype=torch.long, device=lat.device)
            rows = torch.cat([query_ids, cls], 1)
        out = self.decoder_cross_attn(self.gene_emb(rows), lat)
        q = query_ids.shape[1]
        pred = self.mlp(out[:, :q]).squeeze(-1)
        logits = self.mlp_classify(out[:, q]) if with_class else None
        return pred, logits


# ---------------------------------------------------------------- O(expressed genes)


def mha_weights(mha):
    """(Wq, Wk, Wv, bq, bk, bv) of an nn.MultiheadAttention, packed or not."""
    d = mha.embed_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.split(d, 0)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.split(d, 0)
    return wq, wk, wv, bq, bk, bv


class SparseEncoder:
    """The reference encoder's exact maths in O(expressed genes) per cell, in plain
    PyTorch (the form of the CPU model, src/model/forward.rs). Every vocabulary gene is
    a key: an unexpressed gene g has the token E[g]·zero_fill[g] and logit bias +1, the
    same for every cell. So per (head, latent) the sums over all G genes of their
    softmax terms, Z = Σ exp(s0 − M0) and A = Σ exp(s0 − M0)·v0, are computed once
    (per weights), and a cell swaps in its expressed genes:
    Zc = (Z − Σ_S exp(s0 − M0))·e^{M0−m} + Σ_S exp(s − m), the same for A, with the
    shift m = max(M0, max_S s). Batches are padded to their longest cell."""

    def __init__(self, model, zero_fill):
        self.model = model
        self.zero_fill = zero_fill
        self.cache = None

    def terms(self):
        """Per-gene zero-fill terms: Q [H, N, hd] (scaled), M0 [H, N], P0 [H, N, G],
        V0 [H, G, hd], Z [H, N], A [H, N, hd]. Recomputed (with autograd) while the
        model trains, cached while it does not."""
        if self.cache is not None and not torch.is_grad_enabled():
            return self.cache
        m = self.model
        ca = m.encoder_cross_attn
        mha = ca.cross_attn
        h = mha.num_heads
        wq, wk, wv, bq, bk, bv = mha_weights(mha)
        g = self.zero_fill.shape[0]
        q = nn.functional.linear(ca.layernorm_q(m.query_emb), wq, bq)  # [N, d]
        n, d = q.shape
        hd = d // h
        q = q.reshape(n, h, hd).transpose(0, 1) / math.sqrt(hd)  # [H, N, hd]
        tok = ca.layernorm_kv(m.gene_emb.weight[:g] * self.zero_fill.unsqueeze(1))
        k0 = nn.functional.linear(tok, wk, bk).reshape(g, h, hd).transpose(0, 1)  # [H, G, hd]
        v0 = nn.functional.linear(tok, wv, bv).reshape(g, h, hd).transpose(0, 1)
        s0 = q @ k0.transpose(1, 2) + 1.0  # [H, N, G]; +1: the float key padding mask
        m0 = s0.amax(2).detach()
        p0 = torch.exp(s0 - m0.unsqueeze(2))
        # f64 sums: a cell subtracts its expressed genes' terms from them, and in f32
        # that cancellation costs the classifier's logits 6e-5 (tolerance 5e-5)
        p64 = p0.double()
        out = (q, m0, p0, v0, p64.sum(2), p64 @ v0.double())
        if not torch.is_grad_enabled():
            self.cache = out
        return out

    def encode(self, genes, tokens, vals, valid):
        """Encoder output [B, N, d] of padded cells: genes [B, L] (long), their tokens
        (the gene or the mask token), vals [B, L], valid [B, L] (False at padding)."""
        m = self.model
        ca = m.encoder_cross_attn
        mha = ca.cross_attn
        h = mha.num_heads
        _, wk, wv, _, bk, bv = mha_weights(mha)
        q, m0, p0, v0, z, a = self.terms()
        b, l = genes.shape
        n, hd = q.shape[1], q.shape[2]
        kvn = ca.layernorm_kv(m.gene_emb(tokens) * vals.unsqueeze(2))  # [B, L, d]
        k = nn.functional.linear(kvn, wk, bk).reshape(b, l, h, hd).transpose(1, 2)
        v = nn.functional.linear(kvn, wv, bv).reshape(b, l, h, hd).transpose(1, 2)
        s = q.unsqueeze(0) @ k.transpose(2, 3)  # [B, H, N, L]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        mx = torch.maximum(s.amax(3).detach(), m0.unsqueeze(0))  # [B, H, N]
        e = torch.exp(s - mx.unsqueeze(3))
        scale = torch.exp(m0.unsqueeze(0) - mx)  # [B, H, N]
        pe = p0[:, :, genes].permute(2, 0, 1, 3) * valid[:, None, None, :]  # [B, H, N, L]
        v0e = v0[:, genes].permute(1, 0, 2, 3)  # [B, H, L, hd]
        pe = pe.double()
        zc = (z.unsqueeze(0) - pe.sum(3)).float() * scale + e.sum(3)
        ac = (a.unsqueeze(0) - pe @ v0e.double()).float() * scale.unsqueeze(3) + e @ v
        o = (ac / zc.unsqueeze(3)).transpose(1, 2).reshape(b, n, h * hd)
        lat = mha.out_proj(o) + m.query_emb
        return lat + ca.mlp(lat)

    def embed(self, genes, tokens, vals, valid):
        return self.model.process_self_attn(self.encode(genes, tokens, vals, valid))


def sparse_inputs(cells, device, masks=None, mask_token=None):
    """Padded expressed-gene input for cells [(gene ids, values)]: genes [B, L], tokens
    [B, L] (the gene, or the mask token at masked genes), vals [B, L] (1 at masked
    genes) and valid [B, L]. A masked gene stays a key at its place, as in the dense
    reference: its token is the mask token, its value 1 and its logit has no +1."""
    genes = nn.utils.rnn.pad_sequence([c[0] for c in cells], batch_first=True)
    vals = nn.utils.rnn.pad_sequence([c[1].float() for c in cells], batch_first=True)
    lens = torch.tensor([len(c[0]) for c in cells])
    valid = torch.arange(genes.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    tokens = genes
    if masks is not None:
        hit = torch.zeros(genes.shape, dtype=torch.bool)
        for i, mk in enumerate(masks):
            hit[i, : lens[i]] = torch.isin(cells[i][0], mk)
        tokens = genes.masked_fill(hit, mask_token)
        vals = vals.masked_fill(hit, 1.0)
    return tuple(t.to(device, non_blocking=True) for t in (genes, tokens, vals, valid))


def hyper_parameters(tensors, meta):
    if "hyper_parameters" in meta:
        hp = json.loads(meta["hyper_parameters"])
    else:
        emb = tensors["gene_emb.weight"].shape
        c = tensors["mlp_classify.1.weight"].shape[0] if "mlp_classify.1.weight" in tensors else None
        layers = {
            int(k.split(".")[3])
            for k in tensors
            if k.startswith("process_self_attn.transformer.layers.")
        }
        hp = {
            "seq_len": emb[0] - (2 if c else 1),
            "seq_dim": emb[1],
            "query_len": tensors["query_emb"].shape[0],
            "query_dim": tensors["query_emb"].shape[1],
            "num_layers": len(layers),
            "nhead": 4,
            "dim_feedforward": tensors["process_self_attn.transformer.layers.0.linear1.weight"].shape[0],
            "classify_dim": c,
        }
    if not hp.get("classify_dim"):
        hp["classify_dim"] = None
    return hp


# ---------------------------------------------------------------- inputs


def dense_inputs(cells, zero_fill, device, masks=None):
    """Dense reference input for cells [(gene ids, values)]: gene_ids [B, G] (0..G-1,
    the mask token G at masked genes), gene_vals (zero-fill, the cell's values, 1 at
    masked genes) and the float key_padding_mask (1 = zero count, 0 = expressed)."""
    g = zero_fill.shape[0]
    b = len(cells)
    genes = torch.cat([c[0] for c in cells]).to(device, non_blocking=True)
    vals = torch.cat([c[1] for c in cells]).to(device, non_blocking=True)
    row = torch.repeat_interleave(
        torch.arange(b, device=device), torch.tensor([len(c[0]) for c in cells], device=device)
    )
    gene_vals = zero_fill.unsqueeze(0).repeat(b, 1)
    gene_vals[row, genes] = vals
    kpm = torch.ones(b, g, device=device)
    kpm[row, genes] = 0.0
    gene_ids = torch.arange(g, device=device).unsqueeze(0).repeat(b, 1)
    if masks is not None:
        mrow = torch.repeat_interleave(
            torch.arange(b, device=device), torch.tensor([len(m) for m in masks], device=device)
        )
        mg = torch.cat(masks).to(device)
        gene_ids[mrow, mg] = g
        gene_vals[mrow, mg] = 1.0
    return gene_ids, gene_vals, kpm


def synthetic_cells(g, n, nnz, gen):
    weight = torch.exp(1.5 * torch.randn(g, generator=gen, dtype=torch.float64))
    cells = []
    for _ in range(n):
        k = max(1, min(g, int(nnz * (0.8 + 0.4 * torch.rand(1, generator=gen).item()))))
        genes = torch.multinomial(weight, k, replacement=False, generator=gen)
        vals = -0.5 + 11.5 * torch.rand(k, generator=gen)
        cells.append((genes, vals))
    return cells


def rel(a, b):
    a = a.detach().double().cpu().reshape(-1)
    b = b.double().reshape(-1)
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="fixtures/pretrained_TS_exceiver.safetensors")
    ap.add_argument("--fixtures", default="fixtures")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--forms", default="dense,sparse", help="dense (the reference modules), sparse (O(expressed genes)) or both")
    ap.add_argument("--batches", default="16,64,256,1024")
    ap.add_argument("--cells", type=int, default=1024, help="cells per embedding measurement")
    ap.add_argument("--nnz", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--mask", type=int, default=225)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {device}: {name}; TF32 off")

    tensors, meta = read_safetensors(a.weights)
    hp = hyper_parameters(tensors, meta)
    model = Exceiver(hp)
    model.load_state_dict(tensors, strict=True)
    model = model.to(device).eval()
    g = hp["seq_len"]
    classifier = hp["classify_dim"] is not None
    shape = {k: hp[k] for k in ("seq_len", "seq_dim", "query_len", "num_layers", "nhead", "dim_feedforward", "classify_dim")}
    print(f"model {a.weights}: {json.dumps(shape)}")

    try:
        inp, _ = read_safetensors(f"{a.fixtures}/inputs.safetensors")
        zero_fill = inp["zero_fill_vals"].float()
        if zero_fill.shape[0] != g:
            raise ValueError("fixtures are for another vocabulary size")
    except (OSError, KeyError, ValueError) as e:
        print(f"fixtures not used ({e}); zero-fill values 1.0")
        inp, zero_fill = None, torch.ones(g)
    zf = zero_fill.to(device)

    sparse = SparseEncoder(model, zf)
    forms = {
        "dense": (lambda cells, masks=None: dense_inputs(cells, zf, device, masks), lambda x: model.embed(*x)),
        "sparse": (lambda cells, masks=None: sparse_inputs(cells, device, masks, g), lambda x: sparse.embed(*x)),
    }
    chosen = [f.strip() for f in a.forms.split(",") if f.strip()]
    for f in chosen:
        if f not in forms:
            sys.exit(f"unknown form {f!r}: dense or sparse")
    failed = 0
    if inp is not None and not a.skip_parity:
        failed += parity(a, model, forms, chosen, inp, classifier, device)
    batch_sizes = [int(x) for x in a.batches.split(",") if x.strip() and int(x) > 0]
    training = not a.skip_train and a.train_steps > 0
    if not batch_sizes and not training:
        finish(failed)
    gen = torch.Generator().manual_seed(20240611)
    pool = synthetic_cells(g, max(a.cells, a.train_batch), a.nnz, gen)
    for f in chosen:
        if batch_sizes:
            embedding_rates(a, forms[f], f, pool, batch_sizes, device)
    if training:
        for f in chosen:
            training_rate(a, model, forms[f], f, pool, hp, classifier, device)
    finish(failed)


FORM_NAMES = {"dense": "dense reference", "sparse": "O(expressed genes)"}


def parity(a, model, forms, chosen, inp, classifier, device):
    """Parity of each form with the fixture outputs; the number of failed checks."""
    out_name = "classifier_outputs" if classifier else "exceiver_outputs"
    out, _ = read_safetensors(f"{a.fixtures}/{out_name}.safetensors")
    ptr = inp["cell_indptr"].tolist()
    cells = [
        (inp["cell_gene_ids"][ptr[c] : ptr[c + 1]], inp["cell_model_vals"][ptr[c] : ptr[c + 1]])
        for c in range(len(ptr) - 1)
    ]
    failed = 0
    for f in chosen:
        make, embed = forms[f]
        with torch.inference_mode():
            lat = embed(make(cells))
            pred, logits = model.heads(lat, inp["query_ids"].to(device), classifier)
        checks = [
            ("embedding", rel(lat.reshape(len(cells), -1), out["embedding"]), 1e-5),
            ("pred", rel(pred, out["pred"]), 5e-5),
        ]
        if classifier:
            checks.append(("class_logits", rel(logits, out["class_logits"]), 5e-5))
        print(f"\nparity ({FORM_NAMES[f]}) with {a.fixtures}/{out_name}.safetensors (normwise relative errors):")
        for what, err, tol in checks:
            ok = err <= tol
            failed += not ok
            print(f"  {what:<14} {err:10.3e}  (tolerance {tol:.0e})  {'ok' if ok else 'FAILED'}")
    return failed


def embedding_rates(a, form, f, pool, batch_sizes, device):
    make, embed = form
    mean_nnz = sum(len(c[0]) for c in pool) / len(pool)
    print(f"\nembedding ({FORM_NAMES[f]}): {a.cells} synthetic cells, mean {mean_nnz:.0f} expressed genes, median of {a.repeat} runs")
    for bs in batch_sizes:
        n = max(a.cells, bs)
        cells = [pool[i % len(pool)] for i in range(n)]
        try:
            with torch.inference_mode():
                embed(make(cells[:bs]))
                sync(device)
                runs = []
                for _ in range(max(1, a.repeat)):
                    t = time.perf_counter()
                    for s in range(0, n, bs):
                        embed(make(cells[s : s + bs])).cpu()
                    sync(device)
                    runs.append(time.perf_counter() - t)
            runs.sort()
            sec = runs[len(runs) // 2]
            print(f"  batch {bs:>5}: {n / sec:10.0f} cells/s ({1e3 * sec / math.ceil(n / bs):.2f} ms per batch)")
        except torch.OutOfMemoryError:
            print(f"  batch {bs:>5}: out of memory")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def training_rate(a, model, form, f, pool, hp, classifier, device):
    """Steps of the reference's masked-value training (each form from the same start)."""
    make, embed = form
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-5)
    mse = nn.MSELoss()
    ce = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(20240612)
    print(
        f"\ntraining ({FORM_NAMES[f]}): batch {a.train_batch} cells, {a.mask} masked genes each, "
        f"{a.train_steps} steps after 1 warm-up step"
    )

    def batch():
        idx = torch.randint(len(pool), (a.train_batch,), generator=gen).tolist()
        cells = [pool[i] for i in idx]
        masks, targets = [], []
        for genes, vals in cells:
            m = min(a.mask, len(genes))
            pos = torch.randperm(len(genes), generator=gen)[:m]
            masks.append(genes[pos])
            targets.append(vals[pos])
        labels = torch.randint(hp["classify_dim"] or 1, (a.train_batch,), generator=gen)
        return cells, masks, targets, labels

    def step(cells, masks, targets, labels):
        q = torch.stack(masks).to(device)
        lat = embed(make(cells, masks))
        pred, logits = model.heads(lat, q, classifier)
        loss = mse(pred, torch.stack(targets).to(device))
        if classifier:
            loss = loss + ce(logits, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    try:
        batches = [batch() for _ in range(a.train_steps + 1)]
        first = step(*batches[0])
        sync(device)
        t = time.perf_counter()
        for b in batches[1:]:
            loss = step(*b)
        sync(device)
        sec = time.perf_counter() - t
        print(
            f"  {a.train_steps * a.train_batch / sec:.0f} cells/s "
            f"({1e3 * sec / a.train_steps:.1f} ms per step; first loss {first.item():.6f}, last {loss.item():.4f})"
        )
    except torch.OutOfMemoryError:
        print("  out of memory")
    model.load_state_dict(start)
    model.eval()


def finish(failed):
    if failed:
        print(f"\n{failed} parity check(s) FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
