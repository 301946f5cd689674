"""Logit-lens parity: easyroutine 1.1.5's own LogitLens.compute against hook-analysis.

For each family, builds the tiny random model, exports it (the very same weights) to
OUT/<family>.pt, extracts a cache with hookrs (resid_out of every layer, head_out, the final
norm's statistics) at two sets of token positions, and hands that very cache to easyroutine's
LogitLens (built from the eager model's LM head and final norm, as LogitLens.from_model does)
for each case. The Rust runner (hook-parity, bin parity_lens) computes the same cases on
the same cache and compares. Where easyroutine fails or differs by construction, the case
records why (a deviation), with hookrs's intended value computed here for the check.

Usage: python parity_lens.py OUT
"""
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import save_file

import export
import hookrs
from easyroutine.interpretability.activation_cache import ActivationCache
from easyroutine.interpretability.tools import logit_lens as er_lens


class _Progress:
    """easyroutine's logit_lens.py uses `progress_bar` without importing it (NameError in
    1.1.5): the harness supplies a plain one."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def track(self, it, **kw):
        return it


er_lens.progress_bar = _Progress()

FAMILIES = ["llama", "gpt2", "gemma3"]
GROUPS = {"last": [[-1]], "three": [[1, 2], [-1]]}
PAIRS = [(5, 9), (7, 3)]
CASES = [
    # name, target_key, directions, apply_norm, apply_softmax, metric, groups
    ("logits", "resid_out_{i}", None, True, False, "logit_diff", "three"),
    ("probs", "resid_out_{i}", None, True, True, "logit_diff", "three"),
    ("logits_no_norm", "resid_out_{i}", None, False, False, "logit_diff", "three"),
    ("logit_diff_pairs", "resid_out_{i}", PAIRS, True, False, "logit_diff", "three"),
    ("logit_diff_tokens", "resid_out_{i}", [5, 7], True, False, "logit_diff", "three"),
    ("accuracy", "resid_out_{i}", PAIRS, True, False, "accuracy", "last"),
    ("accuracy_positions", "resid_out_{i}", PAIRS, True, False, "accuracy", "three"),
    ("heads_logit_diff", "head_out_L{i}H{j}", PAIRS, True, False, "logit_diff", "last"),
]


def intended(family, lens, cache, case):
    """hookrs's definition where easyroutine's differs: the final norm with its real weight
    (Gemma: 1 + w), LayerNorm bias added once per unit (a head's share for head keys), and
    accuracy over every (example, position)."""
    _, key_pattern, dirs, apply_norm, softmax, metric, _ = case
    norm = lens.norm
    out = {}
    for key in lens.get_keys(cache, key_pattern):
        act = cache[key].float()
        if apply_norm:
            st = cache["last_layernorm"]
            if isinstance(norm, torch.nn.LayerNorm) or hasattr(norm, "bias") and norm.bias is not None:
                x = (act - st["mean"].unsqueeze(-1)) / torch.sqrt(st["variance"].unsqueeze(-1) + norm.eps)
                bias = norm.bias / lens.num_attn_heads if "head" in key else norm.bias
                act = norm.weight * x + bias
            else:
                w = norm.weight + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
                act = w * (act * torch.rsqrt(st["second_moment"].unsqueeze(-1) + getattr(norm, "eps", getattr(norm, "variance_epsilon", None))))
        if dirs is None:
            v = act @ lens.unembed.T
            out[f"logit_lens_{key}"] = torch.softmax(v, -1) if softmax else v
        elif metric == "logit_diff":
            rows = [act[i] @ (lens.unembed[d[0]] - lens.unembed[d[1]] if isinstance(d, tuple) else lens.unembed[d]) for i, d in enumerate(dirs)]
            out[f"logit_lens_{key}"] = torch.stack(rows).float()
        else:
            wins = sum(int((act[i] @ lens.unembed[a] > act[i] @ lens.unembed[b]).sum()) for i, (a, b) in enumerate(dirs))
            out[f"logit_lens_{key}"] = torch.tensor(wins / (act.shape[0] * act.shape[1]))
    return out


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tensors, cases = {}, []
    for family in FAMILIES:
        torch.manual_seed(0)
        cfg = export.config_for(family, {})
        cfg.torchscript, cfg.use_cache = True, False
        cfg._attn_implementation = "eager"
        model = export.with_mask_positions(export.model_for_config(cfg).eval())
        desc = export.description(model, family, f"random:{family}:seed=0", type(model).__name__)
        torch.jit.save(export.trace(model, cfg.vocab_size), str(out / f"{family}.pt"), _extra_files={"hookrs.json": json.dumps(desc)})
        m = hookrs.HookedModule.load(str(out / f"{family}.pt"))
        ids = torch.randint(3, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        config = hookrs.ExtractionConfig(extract_resid_out=True, extract_head_out=True, extract_last_layernorm=True)
        caches = {}
        for gname, groups in GROUPS.items():
            _, c = m.run_with_cache(ids, torch.ones_like(ids), groups, config)
            c.save(str(out / f"{family}-{gname}.safetensors"))
            ec = ActivationCache()
            for k in c.keys():
                v = c[k]
                ec[k] = v.value() if isinstance(v, hookrs.ValueWithInfo) else v
            caches[gname] = ec
        lay = export.LAYOUTS[family]
        lens = er_lens.LogitLens(model.get_submodule(lay["unembed"]).weight, model.get_submodule(lay["final_norm"]), family,
                                 SimpleNamespace(layernorm_type=desc["layernorm_type"], num_attention_heads=desc["num_attention_heads"]))
        for case in CASES:
            name, key, dirs, apply_norm, softmax, metric, gname = case
            record = {"family": family, "name": name, "target_key": key, "directions": dirs, "apply_norm": apply_norm, "apply_softmax": softmax,
                      "metric": metric, "cache": f"{family}-{gname}.safetensors", "deviation": None}
            try:
                with torch.no_grad():
                    theirs = lens.compute(caches[gname], key, token_directions=dirs, apply_norm=apply_norm, apply_softmax=softmax, metric=metric)
                theirs = {k: v.detach().float() for k, v in theirs.items()}
            except Exception as e:  # noqa: BLE001 - the failure is the finding
                theirs, why = None, f"easyroutine raises {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            with torch.no_grad():
                ours = {k: v.detach().float() for k, v in intended(family, lens, caches[gname], case).items()}
            if theirs is None:
                record["deviation"] = why
            elif list(theirs) != list(ours) or any(theirs[k].shape != ours[k].shape or not torch.allclose(theirs[k], ours[k], atol=1e-5, rtol=1e-5)
                                                   for k in ours):
                record["deviation"] = ("easyroutine applies the final norm differently: " +
                                       ("Gemma's RMSNorm scales by (1 + weight), easyroutine by weight" if family.startswith("gemma") else
                                        "LayerNorm bias broadcast as bias.unsqueeze(-1) (a [d, d] matrix)" if desc["layernorm_type"] == "LayerNorm" else
                                        "values differ"))
            record["keys"] = list(ours)
            for k, v in (theirs or {}).items():
                tensors[f"{family}/{name}/easyroutine/{k}"] = v.contiguous()
            for k, v in ours.items():
                tensors[f"{family}/{name}/intended/{k}"] = v.contiguous()
            cases.append(record)
    save_file(tensors, str(out / "expected.safetensors"))
    (out / "cases.json").write_text(json.dumps({"cases": cases}, indent=1))
    print(f"parity lens: {len(cases)} cases, {sum(c['deviation'] is not None for c in cases)} where easyroutine fails or differs by construction")


if __name__ == "__main__":
    main()
