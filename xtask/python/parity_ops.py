"""Function-level parity cases: every function of easyroutine's hooks.py, called directly.

Writes OUT/cases.safetensors and OUT/cases.json. For each case:
  inputs    name -> tensor name          (the tensors the function was given)
  opts      the other arguments (JSON)
  expected  flat output key -> tensor name (what the Rust function must give)
  easyroutine  flat output key -> tensor name, only for explained deviations: what
            easyroutine gives, when it differs from `expected` (computed here, independently,
            with plain torch code that does the documented thing).
Flat output keys: a cache key, `key/i` for the i-th element of a tuple/list, `key/i/name` or
`key/name` for dicts (layernorm statistics).

Usage: python parity_ops.py OUT
"""
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import pandas as pd
import torch
from safetensors.torch import save_file

from easyroutine.interpretability import hooks as H
from easyroutine.interpretability.activation_cache import ActivationCache, ValueWithInfo
from easyroutine.interpretability.utils import repeat_kv

from harness import flat_cache as _flat_cache


def flat_cache(d):
    return _flat_cache(d, skip=())

torch.manual_seed(0)
tensors = {}
cases = []

DEVIATIONS = {
    "qkv_kv_head": "query_key_value_hook picks kv head h // (H // groups) of the already-repeated tensor: wrong kv head under GQA (6 heads / 2 kv: heads 3-5 get kv head 0) and head 0 for every head without GQA. hookrs takes kv head h // (H / kv_heads).",
    "head_out_bias": "head_out_hook adds o_proj_bias // num_heads (floor division). hookrs adds bias / num_heads, so the heads sum to o_proj's output.",
    "layernorm_avg": "layernom_hook(avg=True) computes per-group statistics, then overwrites them with the flattened ones. hookrs returns the per-group statistics.",
    "embed_axis": "embed_hook slices b[..., list(group)], the hidden axis. hookrs slices the token axis (its docstring: 'the embeddings of the specified tokens').",
    "pattern_avg_no_rows": "attention_pattern_head ignores attn_pattern_avg when attn_pattern_row_partition is None and returns the flattened T x T slice; its docstring says rows default to token_indexes. hookrs reduces the blocks token_indexes x token_indexes.",
    "value_norm_transposed": "avg_attention_pattern_head(extract_avg_value=True) transposes the value-norm matrix, weighting a_ij by ||v_i|| (the query's value). hookrs weights by ||v_j||, the value that is read.",
    "batch0_only": "intervention_heads_hook / ablate_pos_keep_self_attn_hook edit batch element 0 only. hookrs edits every example of the batch.",
}


def name(case, kind, key):
    return f"{case}/{kind}/{key}"


def add(case, fn, inputs, opts, got, corrected=None, deviation=None):
    """got: flat dict from easyroutine; corrected: flat dict of the right answer (None = got)."""
    entry = {"name": case, "fn": fn, "opts": opts, "inputs": {}, "expected": {}, "easyroutine": {}, "deviation": None}
    for k, t in inputs.items():
        n = name(case, "in", k)
        tensors[n] = t.detach().clone().contiguous()
        entry["inputs"][k] = n
    expected = corrected if corrected is not None else got
    for k, t in expected.items():
        n = name(case, "expected", k)
        tensors[n] = t.detach().clone().contiguous()
        entry["expected"][k] = n
    if corrected is not None:
        differs = set(got) != set(corrected) or any(
            got[k].shape != corrected[k].shape or not torch.equal(got[k], corrected[k]) for k in corrected
        )
        if differs:
            entry["deviation"] = DEVIATIONS[deviation]
            for k, t in got.items():
                n = name(case, "easyroutine", k)
                tensors[n] = t.detach().clone().contiguous()
                entry["easyroutine"][k] = n
    cases.append(entry)


def groups_json(g):
    return [list(x) for x in g]


def run_cache(fn, *args, **kw):
    c = ActivationCache()
    fn(*args, cache=c, **kw)
    return flat_cache(c.cache)


def rnd(*shape):
    return torch.randn(*shape)


GROUPS = {
    "one": [(-1,)],
    "two": [(0, 2), (4,)],
    "dup": [(1, 1, 3), (0,)],
    "all5": [(0, 1, 2, 3, 4)],
}

# ---- statistics -------------------------------------------------------------------------
for keepdim in (True, False):
    x = rnd(2, 3, 7)
    m, v, s = H.compute_statistics(x, dim=-1, keepdim=keepdim)
    add(f"stats_keepdim{keepdim}", "compute_statistics", {"x": x}, {"dim": -1, "keepdim": keepdim},
        {"mean": m, "variance": v, "second_moment": s})

for gname, g in GROUPS.items():
    for bsz in (1, 3):
        for avg in (False, True):
            b = rnd(bsz, 6, 8)
            got = run_cache(H.layernom_hook, None, (), {}, b, token_indexes=g, cache_key="ln", avg=avg)
            corrected = None
            if avg:
                corrected = {}
                for i, grp in enumerate(g):
                    m, v, s = H.compute_statistics(b[..., list(grp), :])
                    corrected.update({f"ln/{i}/mean": m, f"ln/{i}/variance": v, f"ln/{i}/second_moment": s})
            add(f"layernorm_{gname}_b{bsz}_avg{avg}", "layernorm", {"b": b}, {"token_indexes": groups_json(g), "avg": avg}, got, corrected, "layernorm_avg")

# ---- residual stream ---------------------------------------------------------------------
for gname, g in GROUPS.items():
    for bsz in (1, 3):
        for avg in (False, True):
            b = rnd(bsz, 6, 8)
            got = run_cache(H.save_resid_hook, None, (), {}, b, cache_key="resid_out_0", token_indexes=g, avg=avg)
            add(f"resid_{gname}_b{bsz}_avg{avg}", "resid", {"b": b}, {"token_indexes": groups_json(g), "avg": avg, "key": "resid_out_0"}, got)
            # the same through the pre-hook path (output None, args[0])
            got = run_cache(H.save_resid_hook, None, (b,), {}, None, cache_key="resid_in_0", token_indexes=g, avg=avg)
            add(f"resid_in_{gname}_b{bsz}_avg{avg}", "resid", {"b": b}, {"token_indexes": groups_json(g), "avg": avg, "key": "resid_in_0"}, got)
            got = run_cache(H.input_embedding_hook, None, (), {}, b, cache_key="input_embeddings", token_indexes=g, avg=avg)
            add(f"input_embedding_{gname}_b{bsz}_avg{avg}", "resid", {"b": b}, {"token_indexes": groups_json(g), "avg": avg, "key": "input_embeddings"}, got)

for gname, g in (("two", GROUPS["two"]), ("one", [(3,)])):
    b = rnd(2, 6, 8)
    got = run_cache(H.embed_hook, None, (), {}, b, token_indexes=g, cache_key="embed")
    corrected = {f"embed/{i}": b[:, list(grp), :] for i, grp in enumerate(g)}
    add(f"embed_{gname}", "embed", {"b": b}, {"token_indexes": groups_json(g)}, got, corrected, "embed_axis")

for last_img, end_img in ((3, 5), (1, 0), (5, 6)):
    b = rnd(2, 8, 4)
    got = run_cache(H.avg_hook, None, (), {}, b, cache_key="x", last_image_idx=last_img, end_image_idx=end_img)
    add(f"avg_hook_{last_img}_{end_img}", "avg_hook", {"b": b}, {"last_image_idx": last_img, "end_image_idx": end_img}, got)

# ---- heads ---------------------------------------------------------------------------------
for nrep in (1, 3):
    x = rnd(2, 2, 5, 4)
    add(f"repeat_kv_{nrep}", "repeat_kv", {"x": x}, {"n_rep": nrep}, {"out": repeat_kv(x, nrep)})

LAYOUTS = {"gqa": (6, 2, 4), "mha": (4, 4, 3)}
for lname, (nh, nkv, d) in LAYOUTS.items():
    groups = nh // nkv
    for prefix, width in (("head_queries_", nh * d), ("head_keys_", nkv * d), ("head_values_", nkv * d)):
        for avg in (False, True):
            for head in ("all", 1):
                for gname in ("two", "one"):
                    g = GROUPS[gname]
                    b = rnd(2, 6, width)
                    got = run_cache(H.query_key_value_hook, None, (), {}, b, cache_key=prefix, token_indexes=g, layer=3,
                                    head_dim=d, num_key_value_groups=groups, num_attention_heads=nh, head=head, avg=avg)
                    # the documented rule: repeat kv heads, then head h
                    heads4 = b.view(2, 6, -1, d).transpose(1, 2)
                    if heads4.size(1) != nh:
                        heads4 = repeat_kv(heads4, nh // heads4.size(1))
                    corrected = {}
                    for h in (range(nh) if head == "all" else [head]):
                        t = heads4[:, h]
                        if avg:
                            t = torch.cat([t[:, list(grp)].mean(1, keepdim=True) for grp in g], 1)
                        else:
                            t = t[:, [i for grp in g for i in grp]]
                        corrected[f"{prefix}L3H{h}"] = t
                    add(f"qkv_{lname}_{prefix}avg{avg}_h{head}_{gname}", "query_key_value", {"b": b},
                        {"prefix": prefix, "layer": 3, "num_heads": nh, "num_kv_heads": nkv, "head_dim": d, "head": head,
                         "avg": avg, "token_indexes": groups_json(g)}, got, corrected, "qkv_kv_head")

for bias in (False, True):
    for avg in (False, True):
        for head in ("all", 2):
            nh, d, dm = 4, 3, 10
            b = rnd(2, 6, nh * d)
            w = rnd(dm, nh * d)
            bb = rnd(dm) if bias else None
            g = GROUPS["two"]
            got = run_cache(H.head_out_hook, None, (), {}, b, cache_key="head_out_", token_indexes=g, layer=1, num_heads=nh,
                            head_dim=d, o_proj_weight=w, o_proj_bias=bb, head=head, avg=avg)
            corrected = None
            if bias:
                proj = torch.einsum("bshd,hdm->bshm", b.view(2, 6, nh, d), w.t().reshape(nh, d, dm)) + bb / nh
                corrected = {}
                for h in (range(nh) if head == "all" else [head]):
                    t = proj[:, :, h]
                    t = torch.cat([t[:, list(grp)].mean(1, keepdim=True) for grp in g], 1) if avg else t[:, [i for grp in g for i in grp]]
                    corrected[f"head_out_L1H{h}"] = t
            inputs = {"b": b, "w": w} | ({"bias": bb} if bias else {})
            add(f"head_out_bias{bias}_avg{avg}_h{head}", "head_out", inputs,
                {"layer": 1, "num_heads": nh, "head_dim": d, "head": head, "avg": avg, "token_indexes": groups_json(g)}, got, corrected, "head_out_bias")

PROJ = {"value": H.projected_value_vectors_head, "key": H.projected_key_vectors_head, "query": H.projected_query_vectors_head}
for lname, (nh, nkv, d) in LAYOUTS.items():
    dm = 9
    for which, fn in PROJ.items():
        for bias in (False, True):
            for avg in (False, True):
                for head in ("all", nh - 1):
                    width = nh * d if which == "query" else nkv * d
                    b = rnd(2, 6, width)
                    w = rnd(dm, nh * d)
                    bb = rnd(dm) if bias else None
                    g = GROUPS["dup"]
                    got = run_cache(fn, None, (), {}, b, layer=2, token_indexes=g, num_attention_heads=nh, num_key_value_heads=nkv,
                                    hidden_size=dm, d_head=d, out_proj_weight=w, out_proj_bias=bb, head=head, avg=avg)
                    inputs = {"b": b, "w": w} | ({"bias": bb} if bias else {})
                    add(f"projected_{which}_{lname}_bias{bias}_avg{avg}_h{head}", "projected", inputs,
                        {"which": which, "layer": 2, "num_heads": nh, "num_kv_heads": nkv, "head_dim": d, "head": head, "avg": avg,
                         "token_indexes": groups_json(g)}, got)

# ---- attention patterns ----------------------------------------------------------------------
def pattern(bsz, nh, s):
    p = torch.randn(bsz, nh, s, s)
    p = p.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(p, -1)


def blocks_reference(p, rows, cols, h, mode):
    vals = []
    for g1 in rows:
        for g2 in cols:
            blk = p[:, h, list(g1), :][:, :, list(g2)]
            if mode == "mean":
                v = blk.mean((-2, -1))
            elif mode == "sum":
                v = blk.sum((-2, -1))
            else:
                base = sum(sum(1 for j in g2 if j <= i) / (i + 1) for i in g1) / len(g1)
                v = blk.mean((-2, -1)) / torch.tensor(base)
            vals.append(v.unsqueeze(1))
    return torch.cat(vals, 1).view(p.size(0), len(rows), len(cols))


PAT_GROUPS = {
    "cols3": [(0, 1), (2, 3), (5, 6)],
    "single": [(4,)],
    "uneven": [(0,), (1, 2, 3), (6,)],
}
ROWS = {"none": None, "rows2": [(6,), (3, 4)], "rowsall": [(0, 1, 2, 3, 4, 5, 6)]}
for gname, g in PAT_GROUPS.items():
    for rname, rows in ROWS.items():
        for mode in ("none", "mean", "sum", "baseline_ratio"):
            for head in ("all", 1):
                for bsz in (1, 2):
                    if mode == "none" and rows is not None and len({len(x) for x in g}) > 1:
                        continue  # easyroutine raises: blocks of different widths cannot be stacked (tested in Rust)
                    p = pattern(bsz, 3, 7)
                    got = run_cache(H.attention_pattern_head, None, (), {}, p, token_indexes=g, layer=0, head=head,
                                    attn_pattern_avg=mode, attn_pattern_row_partition=rows)
                    corrected = None
                    if rows is None and mode != "none":
                        corrected = {f"pattern_L0H{h}": blocks_reference(p, g, g, h, mode) for h in (range(3) if head == "all" else [head])}
                    add(f"pattern_{gname}_{rname}_{mode}_h{head}_b{bsz}", "attention_pattern", {"p": p},
                        {"layer": 0, "head": head, "attn_pattern_avg": mode, "token_indexes": groups_json(g),
                         "rows": groups_json(rows) if rows is not None else None}, got, corrected, "pattern_avg_no_rows")

for extract_value in (False, True):
    g = [(1, 2), (4,)]
    state = {}
    inputs = {}
    vals_all = []
    for batch_idx in range(3):
        p = pattern(2, 2, 5)
        inputs[f"p{batch_idx}"] = p
        c = ActivationCache()
        vals = [rnd(2, 5, 6) for _ in range(2)]
        if extract_value:
            for h in range(2):
                c[f"projected_value_L1H{h}"] = vals[h]
                inputs[f"v{batch_idx}_{h}"] = vals[h]
        vals_all.append(vals)
        H.avg_attention_pattern_head(None, (), {}, p, token_indexes=g, layer=1, attn_pattern_current_avg=state,
                                     batch_idx=batch_idx, cache=c, extract_avg_value=extract_value)
    got = flat_cache(state)
    corrected = None
    if extract_value:
        corrected = {}
        flat = [i for grp in g for i in grp]
        for h in range(2):
            corrected[f"avg_pattern_L1H{h}"] = got[f"avg_pattern_L1H{h}"]
            avg = None
            for bi in range(3):
                p = inputs[f"p{bi}"]
                norms = torch.norm(vals_all[bi][h], dim=-1)  # [B, Sk]
                m = (p[:, h] * norms.unsqueeze(1))[:, flat, :]
                avg = m if avg is None else avg + (m - avg) / (bi + 1)
            corrected[f"projected_value_L1H{h}"] = avg
    add(f"avg_pattern_value{extract_value}", "avg_attention_pattern", inputs,
        {"layer": 1, "token_indexes": groups_json(g), "batches": 3, "heads": 2, "extract_avg_value": extract_value},
        got, corrected, "value_norm_transposed")

# ---- interventions ---------------------------------------------------------------------------
for patch in (False, True):
    for pos in ([1, 3], [-1], [0]):
        b = rnd(2, 5, 4)
        vals = rnd(2, len(pos), 4) if patch else None
        out = H.intervention_resid_hook(None, (), {}, b.clone(), token_indexes=pos, patching_values=vals if patch else "ablation")
        inputs = {"b": b} | ({"values": vals} if patch else {})
        add(f"intervene_resid_patch{patch}_{'_'.join(map(str, pos))}", "intervene_resid", inputs, {"token_indexes": pos}, {"out": out})

for lname, (nh, nkv, d) in LAYOUTS.items():
    for which, width in (("q", nh * d), ("k", nkv * d)):
        for patch in (False, True):
            for head in (0, 1):
                pos = [1, 4]
                b = rnd(2, 6, width)
                vals = rnd(2, len(pos), d) if patch else None
                out = H.intervention_query_key_value_hook(None, (), {}, b.clone(), token_indexes=pos, head=head, head_dim=d,
                                                          num_key_value_groups=nh // nkv, num_attention_heads=nh,
                                                          patching_values=vals if patch else "ablation")
                inputs = {"b": b} | ({"values": vals} if patch else {})
                add(f"intervene_qkv_{lname}_{which}_patch{patch}_h{head}", "intervene_qkv", inputs,
                    {"token_indexes": pos, "head": head, "num_heads": nh, "num_kv_heads": nkv, "head_dim": d}, {"out": out})

for patch in (False, True):
    for softmax in (False, True):
        for mult in (0.0, 2.5):
            for qpos, kpos in (([3, 4], [0, 1]), ([2], [2])):
                p = pattern(2, 3, 5)
                vals = torch.rand(5, 5) if patch else None
                out = H.intervention_attn_mat_hook(None, (), {}, p.clone(), q_positions=qpos, k_positions=kpos, head=1,
                                                   multiplication_value=mult, patching_values=vals if patch else None, apply_softmax=softmax)
                inputs = {"p": p} | ({"values": vals} if patch else {})
                add(f"intervene_attn_patch{patch}_sm{softmax}_m{mult}_q{'_'.join(map(str, qpos))}", "intervene_attn", inputs,
                    {"q_positions": qpos, "k_positions": kpos, "head": 1, "multiplication_value": mult, "apply_softmax": softmax}, {"out": out})
# generation rule: fewer query rows than q_positions
p = torch.rand(1, 2, 1, 6)
out = H.intervention_attn_mat_hook(None, (), {}, p.clone(), q_positions=[3, 4], k_positions=[1, 2], head=0, multiplication_value=0.0)
add("intervene_attn_generation", "intervene_attn", {"p": p},
    {"q_positions": [3, 4], "k_positions": [1, 2], "head": 0, "multiplication_value": 0.0, "apply_softmax": False}, {"out": out})

for bsz in (1, 2):
    p = pattern(bsz, 4, 5)
    heads = [0, 2]
    out = H.intervention_heads_hook(None, (), {}, p.clone(), ablation_queries=pd.DataFrame({"head": heads}))
    corrected = p.clone()
    corrected[:, heads] = 0
    add(f"intervene_heads_b{bsz}", "intervene_heads", {"p": p}, {"heads": heads}, {"out": out}, {"out": corrected}, "batch0_only")

    pairs = [(1, 3), (3, 2)]
    out = H.ablate_pos_keep_self_attn_hook(None, (), {}, p.clone(),
                                           ablation_queries=pd.DataFrame({"head": [h for h, _ in pairs], "pos_token_to_ablate": [q for _, q in pairs]}))
    corrected = p.clone()
    for h, q in pairs:
        corrected[:, h, q, :-1] = 0
    add(f"ablate_keep_self_b{bsz}", "ablate_rows_keep_last", {"p": p}, {"pairs": pairs}, {"out": out}, {"out": corrected}, "batch0_only")

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(out / "cases.safetensors"))
(out / "cases.json").write_text(json.dumps({"cases": cases}, indent=1))
print(f"parity ops: {len(cases)} cases, {len(tensors)} tensors -> {out}", file=sys.stderr)
