"""End-to-end parity: easyroutine's hooks on the eager HF model vs hookrs on the exported one.

For each tiny family, builds the random model, exports it (the very same weights) to
OUT/<family>.pt, wraps the eager model's attention with easyroutine's ModuleWrapperManager,
and for each ExtractionConfig case calls easyroutine's own HookedModel.create_hooks and
set_hooks (on a stand-in `self` holding the model and its ModelConfig) exactly as
HookedModel.forward does, runs the forward (batch 1), and saves the cache (load_cache format)
plus logits. The Rust runner does the same with run_with_cache and compares.

Usage: python parity_models.py OUT
       python parity_models.py OUT --real HF_DIR EXPORT.pt [EXPORT.pt ...]
         the same cases on a real checkpoint (its save_pretrained directory and its hookrs
         exports made from it in any dtype, e.g. by `cargo xtask fetch smollm2 [--dtype D]`), on
         a sentence of real text (half-precision exports: the half-precision cases)
"""
import json
import logging
import sys
import warnings
from pathlib import Path
from functools import partial
from types import SimpleNamespace

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import torch

import export
from harness import flatten
from load_cache import save_cache
from easyroutine.logger import logger as er_logger
from easyroutine.interpretability.activation_cache import ActivationCache
from easyroutine.interpretability.hooked_model import ExtractionConfig, HookedModel
from easyroutine.interpretability.models import ModelConfig
from easyroutine.interpretability.module_wrappers.manager import ModuleWrapperManager

er_logger.setLevel(logging.ERROR)

# easyroutine 1.1.5's hooked_model.py uses projected_key_vectors_head and
# projected_query_vectors_head without importing them (extract_head_keys_projected /
# extract_head_queries_projected raise NameError). The harness supplies the missing imports;
# docs/parity.md lists it.
import easyroutine.interpretability.hooked_model as _hm
from easyroutine.interpretability import hooks as _hooks
for _name in ("projected_key_vectors_head", "projected_query_vectors_head"):
    if not hasattr(_hm, _name):
        setattr(_hm, _name, getattr(_hooks, _name))
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
REAL = sys.argv[3:] if len(sys.argv) >= 5 and sys.argv[2] == "--real" else None
REAL_TEXT = "The Eiffel Tower, completed in 1889 for the World's Fair, stands on the Champ de Mars in Paris."

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gpt_neox", "phi3", "qwen3", "gemma2", "olmo2"]
# easyroutine 1.1.5 wraps the attention of these (its ModuleWrapperManager); the others get the
# same two identity sites around their softmax from `adapt` below.
WRAPPED = {"llama", "mistral", "qwen2", "gemma3"}

# Each case: (name, config fields, token groups, row positions)
TOKENS = [[2, 3], [-1]]
CASES = [
    ("resid_out", {"extract_resid_out": True}),
    ("resid_in", {"extract_resid_in": True}),
    ("resid_mid", {"extract_resid_mid": True}),
    ("resid_in_post_layernorm", {"extract_resid_in_post_layernorm": True}),
    ("embed", {"extract_embed": True}),
    # each remaining extract_* flag alone
    *[(f.removeprefix("extract_"), {f: True}) for f in [
        "extract_attn_in", "extract_attn_out", "extract_mlp_out", "extract_head_queries", "extract_head_keys", "extract_head_values",
        "extract_queries", "extract_keys", "extract_values", "extract_head_out", "extract_head_values_projected",
        "extract_head_keys_projected", "extract_head_queries_projected"]],
    ("pattern", {"extract_attn_pattern": True}),
    ("pattern_heads", {"extract_attn_pattern": True, "attn_heads": [{"layer": 0, "head": 1}, {"layer": 1, "head": 0}]}),
    ("pattern_mean_rows", {"extract_attn_pattern": True, "attn_pattern_avg": "mean", "attn_pattern_row_positions": [[0, 1], [4]]}),
    ("pattern_sum_rows", {"extract_attn_pattern": True, "attn_pattern_avg": "sum", "attn_pattern_row_positions": [[5], [2, 3]]}),
    ("pattern_baseline_rows", {"extract_attn_pattern": True, "attn_pattern_avg": "baseline_ratio", "attn_pattern_row_positions": [[6], [1, 2]]}),
    ("last_layernorm", {"extract_last_layernorm": True}),
    ("everything", {k: True for k in ["extract_resid_out", "extract_resid_in", "extract_resid_mid", "extract_attn_pattern",
                                     "extract_head_queries", "extract_head_keys", "extract_head_values", "extract_attn_out",
                                     "extract_mlp_out", "extract_head_out", "extract_last_layernorm"]}),
]
# every case with avg=True too
CASES = CASES + [(f"{n}_avg", dict(c, avg=True)) for n, c in CASES]
# gradients of one logit w.r.t. the input embeddings (easyroutine's _compute_input_gradients)
CASES.append(("keep_gradient", {"extract_embed": True, "keep_gradient": True}))
CASES.append(("save_input_ids", {"save_input_ids": True, "extract_resid_out": True}))
VOCAB_INDEX = 7
# interventions (easyroutine's intervention hooks registered before the extraction hooks)
INTERVENTIONS = [
    ("ablate_resid", [{"kind": "resid", "template": "residual_stream_hook_name", "layer": 0, "positions": [2, 3]}]),
    ("ablate_heads", [{"kind": "heads", "layer": 1, "heads": [0, 2]}]),
    ("ablate_attn_block", [{"kind": "attn", "layer": 0, "q_positions": [5, 6], "k_positions": [1, 2], "head": 1, "multiplication_value": 0.0, "apply_softmax": False}]),
    ("scale_attn_block_softmax", [{"kind": "attn", "layer": 1, "q_positions": [7], "k_positions": [0], "head": 0, "multiplication_value": 3.0, "apply_softmax": True}]),
    ("ablate_key_head", [{"kind": "qkv", "which": "key", "layer": 1, "positions": [3, 4], "head": 0}]),
    ("ablate_mlp_and_query", [{"kind": "resid", "template": "mlp_out_hook_name", "layer": 1, "positions": [7]},
                              {"kind": "qkv", "which": "query", "layer": 0, "positions": [1], "head": 2}]),
]
QKV_TEMPLATE = {"query": "head_query_hook_name", "key": "head_key_hook_name", "value": "head_value_hook_name"}
CASES += [(f"intervene_{n}", {"extract_resid_out": True, "extract_attn_pattern": True}) for n, _ in INTERVENTIONS]


def resolve(ivs, templates):
    """The harness's interventions with their components named for this family (`templates`:
    the names easyroutine hooks)."""
    out = []
    for iv in ivs:
        iv = dict(iv)
        if iv["kind"] == "resid":
            iv["component"] = templates[iv.pop("template")].format(iv.pop("layer"))
        elif iv["kind"] == "qkv":
            iv["component"] = templates[QKV_TEMPLATE[iv["which"]]].format(iv["layer"])
        out.append(iv)
    return out


def engine_form(ivs):
    """The interventions as hookrs reads them (`Intervention`'s JSON form): a qkv
    intervention names its layer (the engine finds the site and the part of a fused
    projection), not the component easyroutine hooks."""
    return [{k: v for k, v in iv.items() if not (iv["kind"] == "qkv" and k == "component")} for iv in ivs]


def intervention_hooks(ivs, desc):
    import pandas as pd
    from easyroutine.interpretability import hooks as H
    out = []
    for iv in ivs:
        if iv["kind"] == "resid":
            out.append({"component": iv["component"], "intervention": partial(H.intervention_resid_hook, token_indexes=iv["positions"], patching_values="ablation")})
        elif iv["kind"] == "heads":
            out.append({"component": desc["templates"]["attn_matrix_hook_name"].format(iv["layer"]),
                        "intervention": partial(H.intervention_heads_hook, ablation_queries=pd.DataFrame({"head": iv["heads"]}))})
        elif iv["kind"] == "attn":
            out.append({"component": desc["templates"]["attn_matrix_hook_name"].format(iv["layer"]),
                        "intervention": partial(H.intervention_attn_mat_hook, q_positions=iv["q_positions"], k_positions=iv["k_positions"], head=iv["head"],
                                                multiplication_value=iv["multiplication_value"], apply_softmax=iv["apply_softmax"])})
        elif iv["kind"] == "qkv":
            nh, nkv = desc["num_attention_heads"], desc["num_key_value_heads"]
            out.append({"component": iv["component"], "intervention": partial(H.intervention_query_key_value_hook, token_indexes=iv["positions"], head=iv["head"],
                                                                                 head_dim=desc["head_dim"], num_key_value_groups=nh // nkv, num_attention_heads=nh,
                                                                                 patching_values="ablation")})
    return out


_current_attention = []


def _hooked_softmax(original):
    def softmax(x, *args, **kwargs):
        if not _current_attention or _current_attention[-1] is None:
            return original(x, *args, **kwargs)
        m = _current_attention[-1]
        _current_attention.append(None)  # a hook calling softmax itself (apply_softmax) gets the plain one
        try:
            return m.attention_matrix_hook(original(m.attention_matrix_pre_softmax_hook(x), *args, **kwargs))
        finally:
            _current_attention.pop()
    return softmax


def adapt(model, family, desc):
    """Gives the eager model of a family easyroutine does not know the sites easyroutine's hooks
    need, without changing what it computes, and returns the templates easyroutine hooks:
    - the attention pattern: identity modules `attention_matrix_pre_softmax_hook` and
      `attention_matrix_hook` around the attention's softmax (as easyroutine's wrappers add);
    - fused q/k/v projections: identity modules `hookrs_q`, `hookrs_k`, `hookrs_v` that the
      fused output passes through, split and joined again with HF's own layout, so
      easyroutine's per-head hooks (and interventions) see what `q_proj`/`k_proj`/`v_proj` give;
    - a Conv1D output projection (GPT-2): its weight transposed to nn.Linear's layout."""
    t = dict(desc["templates"])
    if family in WRAPPED:
        return t
    lay = export.LAYOUTS[family]
    nh, nkv, hd = desc["num_attention_heads"], desc["num_key_value_heads"], desc["head_dim"]
    if not hasattr(torch.nn.functional, "_hookrs_original_softmax"):
        torch.nn.functional._hookrs_original_softmax = torch.nn.functional.softmax
        torch.nn.functional.softmax = _hooked_softmax(torch.nn.functional._hookrs_original_softmax)
    for layer in model.get_submodule(lay["layers"]):
        attn = getattr(layer, lay["attn"])
        attn.attention_matrix_pre_softmax_hook = torch.nn.Identity()
        attn.attention_matrix_hook = torch.nn.Identity()
        attn.register_forward_pre_hook(lambda m, a: _current_attention.append(m))
        attn.register_forward_hook(lambda m, a, o: (_current_attention.pop(), None)[1])
        if lay["qkv"] != "separate":
            attn.hookrs_q, attn.hookrs_k, attn.hookrs_v = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()

            def through(m, a, out, attn=attn):
                if lay["qkv"] == "concat":
                    q, k, v = out.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                    return torch.cat([attn.hookrs_q(q), attn.hookrs_k(k), attn.hookrs_v(v)], -1)
                parts = out.view(*out.shape[:-1], nh, 3 * hd).chunk(3, -1)  # NeoX
                q, k, v = (p.reshape(*out.shape[:-1], nh * hd) for p in parts)
                q, k, v = attn.hookrs_q(q), attn.hookrs_k(k), attn.hookrs_v(v)
                return torch.cat([x.view(*out.shape[:-1], nh, hd) for x in (q, k, v)], -1).reshape(out.shape)
            getattr(attn, lay["q"]).register_forward_hook(through)
        if lay["o_weight"] == "in_out":
            attn.hookrs_o_weight = torch.nn.Parameter(getattr(attn, lay["o"]).weight.detach().t().contiguous(), requires_grad=False)
    a = lay["layers"] + "[{}]." + lay["attn"]
    if lay["qkv"] != "separate":
        t.update(head_query_hook_name=f"{a}.hookrs_q.output", head_key_hook_name=f"{a}.hookrs_k.output", head_value_hook_name=f"{a}.hookrs_v.output")
    if lay["o_weight"] == "in_out":
        t["attn_out_proj_weight"] = lay["layers"] + ".{}." + lay["attn"] + ".hookrs_o_weight"
    return t


# rows that easyroutine computes differently than documented (see parity ops)
DEVIATIONS = {
    "qkv_kv_head": "head_keys_/head_values_: easyroutine's query_key_value_hook picks the wrong kv head (see ops).",
    "head_out_bias": "head_out: easyroutine adds o_proj_bias // num_heads (see ops).",
    "layernorm_avg": "last_layernorm with avg: easyroutine overwrites the per-group statistics (see ops).",
    "layernorm_half": "last_layernorm in half precision: hookrs accumulates the statistics in float32 (E[x^2] - E[x]^2 cancels in bfloat16); easyroutine in the activations' dtype.",
    "input_ids": "save_input_ids: easyroutine stores embed_hook's tuple of embedding slices (of the hidden axis) under input_ids; hookrs stores the input ids [batch, seq].",
}


def model_config(desc, t):
    t = {"intermediate_stream_hook_name": "(none: the family has no resid_mid)", **t}
    fields = {k: v for k, v in t.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**fields, num_hidden_layers=desc["num_hidden_layers"], num_attention_heads=desc["num_attention_heads"],
                       hidden_size=desc["hidden_size"], num_key_value_heads=desc["num_key_value_heads"],
                       num_key_value_groups=desc["num_attention_heads"] // desc["num_key_value_heads"], head_dim=desc["head_dim"],
                       layernorm_type=desc["layernorm_type"])


def correct(cache, seen, desc, token_indexes, fields, ids):
    """The cache with easyroutine's known deviations replaced by the documented behaviour, and
    the reasons; None when nothing in this case is affected."""
    from easyroutine.interpretability.activation_cache import ValueWithInfo
    from easyroutine.interpretability.hooks import compute_statistics
    from easyroutine.interpretability.utils import repeat_kv
    avg = fields.get("avg", False)
    nh, nkv, d = desc["num_attention_heads"], desc["num_key_value_heads"], desc["head_dim"]
    why = set()
    fixed = dict(cache.cache)

    def select(t):  # t: [B, S, X]
        if avg:
            return torch.cat([t[:, list(g)].mean(1, keepdim=True) for g in token_indexes], 1)
        return t[:, [i for g in token_indexes for i in g]]

    for key in list(fixed):
        for prefix, src in (("head_keys_", "k_proj"), ("head_values_", "v_proj")):
            if key.startswith(prefix):
                l, h = (int(x) for x in key[len(prefix) + 1:].split("H"))
                x = seen[f"{src}{l}"]
                heads = repeat_kv(x.view(x.shape[0], x.shape[1], nkv, d).transpose(1, 2), nh // nkv)
                fixed[key] = ValueWithInfo(select(heads[:, h]), fixed[key].info())
                why.add("qkv_kv_head")
    if fields.get("save_input_ids") and "input_ids" in fixed:
        fixed["input_ids"] = ids
        why.add("input_ids")
    half = seen["norm_in"].dtype in (torch.bfloat16, torch.float16)

    def stats(x):  # hookrs: float32 accumulation in half precision, results in the input dtype
        m, v, s2 = compute_statistics(x.float() if half else x)
        return {"mean": m.to(x.dtype), "variance": v.to(x.dtype), "second_moment": s2.to(x.dtype)}
    if "last_layernorm" in fixed and avg:
        x = seen["norm_in"]
        fixed["last_layernorm"] = [stats(x[..., list(g), :]) for g in token_indexes]
        why.add("layernorm_avg")
    elif "last_layernorm" in fixed and half:
        x = seen["norm_in"]
        fixed["last_layernorm"] = stats(x[..., [i for g in token_indexes for i in g], :])
        why.add("layernorm_half")
    return (fixed, sorted(why)) if why else None


manifest = {"families": {}, "cases": [], "tokens": TOKENS}
tensors = {}
# Half precision: these families again in bfloat16 / float16, on the cases below; compared with a
# relative tolerance (the Rust runner states it).
HALF = [("llama", "bfloat16"), ("gpt2", "bfloat16"), ("gpt_neox", "bfloat16"), ("qwen3", "bfloat16"), ("gpt2", "float16"), ("phi3", "float16")]
HALF_CASES = {"resid_out", "resid_mid", "head_queries", "head_keys", "head_values", "head_out", "head_values_projected", "pattern", "attn_out",
              "mlp_out", "last_layernorm", "everything", "intervene_ablate_key_head", "intervene_ablate_heads", "intervene_ablate_mlp_and_query"}


def run_family(family, dtype):
    torch.manual_seed(0)
    cfg = export.config_for(family, {})
    cfg.torchscript, cfg.use_cache = True, False
    cfg._attn_implementation = "eager"
    model = export.model_for_config(cfg).to(export.DTYPES[dtype]).eval()
    name_of = family if dtype == "float32" else f"{family}@{dtype}"
    architecture = type(model).__name__
    model = export.with_mask_positions(model)
    traced = export.trace(model, cfg.vocab_size)
    desc = export.description(model, family, f"random:{family}:seed=0", architecture)
    torch.jit.save(traced, str(out / f"{name_of}.pt"), _extra_files={"hookrs.json": json.dumps(desc)})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, 8), generator=g)
    run_cases(model, desc, family, name_of, dtype, ids, f"{name_of}.pt")


def run_real(hf_dir, pt):
    """The cases on a real checkpoint: the eager model from its save_pretrained directory (as
    the export loads it), the export's own description, a tokenized sentence of real text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    extra = {"hookrs.json": ""}
    torch.jit.load(pt, _extra_files=extra)
    desc = json.loads(extra["hookrs.json"])
    dtype = desc.get("dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torchscript=True, use_cache=False, attn_implementation="eager",
                                                 torch_dtype=export.DTYPES[dtype]).eval()
    model = export.with_mask_positions(model)
    ids = AutoTokenizer.from_pretrained(hf_dir)(REAL_TEXT, return_tensors="pt").input_ids
    name_of = Path(pt).stem
    run_cases(model, desc, desc["family"], name_of, dtype, ids, str(Path(pt).resolve()))


def run_cases(model, desc, family, name_of, dtype, ids, model_file):
    ModuleWrapperManager(model=model).substitute_attention_module(model)
    er_templates = adapt(model, family, desc)
    lay = export.LAYOUTS[family]
    me = SimpleNamespace(model_config=model_config(desc, er_templates), hf_model=model, additional_interventions=None, additional_hooks=[],
                         intervention_manager=None, first_device="cpu", assert_module_exists=lambda c: None)
    mask = torch.ones_like(ids)
    tensors[f"{name_of}/input_ids"] = ids
    manifest["families"][name_of] = {"model": model_file, "seq": ids.shape[1], "dtype": dtype}
    seq = ids.shape[1]
    token_indexes = [tuple(p if p >= 0 else seq + p for p in grp) for grp in TOKENS]
    for name, fields in CASES:
        if dtype != "float32" and name not in HALF_CASES:
            continue
        if "intermediate_stream_hook_name" not in desc["templates"]:
            if fields.get("extract_resid_mid") and name.startswith("resid_mid"):
                continue  # no resid_mid in this family (tests/families.rs checks the error)
            fields = {k: v for k, v in fields.items() if k != "extract_resid_mid"}
        ec = ExtractionConfig(**fields)
        cache = ActivationCache()
        token_dict = {}
        if fields.get("attn_pattern_row_positions") is not None:
            token_dict["attn_pattern_row_positions"] = [tuple(p if p >= 0 else seq + p for p in grp) for grp in fields["attn_pattern_row_positions"]]
        hooks = HookedModel.create_hooks(me, inputs={"input_ids": ids, "attention_mask": mask}, cache=cache, token_indexes=token_indexes,
                                         token_dict=token_dict, extraction_config=ec, interventions=None, batch_idx=None, external_cache=None)
        ivs = dict(INTERVENTIONS).get(name.removeprefix("intervene_")) if name.startswith("intervene_") else None
        if ivs:
            hooks = intervention_hooks(resolve(ivs, er_templates), desc) + hooks
            ivs = resolve(ivs, desc["templates"])
        handles = HookedModel.set_hooks(me, hooks)
        # capture what the documented behaviour needs where easyroutine deviates
        seen = {}
        for l in range(desc["num_hidden_layers"]):
            for nm, template in (("k_proj", "head_key_hook_name"), ("v_proj", "head_value_hook_name")):
                site = model.get_submodule(er_templates[template].format(l).removesuffix(".output").replace("[", ".").replace("]", ""))
                handles.append(site.register_forward_hook(lambda mod, a, o, key=f"{nm}{l}": seen.__setitem__(key, o.detach())))
        handles.append(model.get_submodule(lay["final_norm"]).register_forward_pre_hook(lambda mod, a: seen.__setitem__("norm_in", a[0].detach())))
        flatpos = [i for grp in token_indexes for i in grp]
        if ec.keep_gradient:
            logits = model(ids, attention_mask=mask)[0]
            cache["token_dict"] = {"groups": flatpos}
            HookedModel._compute_input_gradients(me, cache, logits, VOCAB_INDEX)
            del cache.cache["token_dict"]
            logits = logits.detach()
        else:
            with torch.no_grad():
                logits = model(ids, attention_mask=mask)[0]
        for h in handles:
            h.remove()
        cache["logits"] = logits[:, flatpos, :]
        corrected = correct(cache, seen, desc, token_indexes, fields, ids)
        entries = {}
        flatten("", cache.cache, entries)
        entries = {k.lstrip("/"): v for k, v in entries.items()}
        case_id = f"{name_of}/{name}"
        for k, v in entries.items():
            tensors[f"{case_id}/{k}"] = v.detach().clone().contiguous()
        record = {"family": name_of, "dtype": dtype, "name": name, "config": fields, "keys": list(entries), "deviation": None,
                  "vocabulary_index": VOCAB_INDEX if fields.get("keep_gradient") else None, "interventions": engine_form(ivs or [])}
        if corrected is not None:
            fixed, why = corrected
            fixed_entries = {}
            flatten("", fixed, fixed_entries)
            fixed_entries = {k.lstrip("/"): v for k, v in fixed_entries.items()}
            differs = list(fixed_entries) != list(entries) or any(not torch.equal(fixed_entries[k], entries[k]) for k in entries)
            if differs:
                for k, v in fixed_entries.items():
                    tensors[f"{case_id}/fixed/{k}"] = v.detach().clone().contiguous()
                record["fixed_keys"] = list(fixed_entries)
                record["deviation"] = "\n".join(DEVIATIONS[w] for w in why)
        manifest["cases"].append(record)
    print(f"parity models: {name_of}: cases written", file=sys.stderr)


if REAL:
    for pt in REAL[1:]:
        run_real(REAL[0], pt)
else:
    for family in FAMILIES:
        run_family(family, "float32")
    for family, dtype in HALF:
        run_family(family, dtype)

from safetensors.torch import save_file
save_file(tensors, str(out / "expected.safetensors"))
(out / "cases.json").write_text(json.dumps(manifest, indent=1))
