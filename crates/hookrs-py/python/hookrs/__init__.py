"""hookrs from Python: easyroutine's interface over the hookrs engine.

    import torch, hookrs
    model = hookrs.HookedModule.load("llama.pt")                 # exported by `cargo xtask export`
    ids = torch.tensor([[5, 9, 12, 40]])
    config = hookrs.ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True)
    logits, cache = model.run_with_cache(ids, torch.ones_like(ids), [[0, 1], [-1]], config)
    cache["resid_out_0"].shape                                   # torch tensors, no copies

    # edit activations: a Python function on a site, or easyroutine's Intervention
    handle = model.add_hook("model.layers[0].mlp.output", lambda t: t * 0)
    model.remove_hook(handle)
    iv = hookrs.Intervention(type="full", activation="resid_out_0", token_positions=["last"])
    logits = model.run_with_interventions(ids, torch.ones_like(ids), [iv])

Errors from the engine are ValueError (bad input) or RuntimeError, with the Rust message;
an exception raised inside a hook propagates with its traceback.
"""
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

import json
import sys

import torch  # noqa: F401  loads libtorch (and its CUDA backend) that the native module links

from ._native import ActivationCache, DeferredMode, HookHandle, HookedModule, ValueWithInfo
from ._native import extract as _extract
from ._native import set_memory_limit

__all__ = ["ActivationCache", "DeferredMode", "ExtractionConfig", "HookHandle", "HookedModule", "Intervention", "ValueWithInfo", "cli", "set_memory_limit",
           "extract"]


def extract(model, out, *, progress=True, **options):
    """`hookrs extract` from Python, in this process: long runs over datasets, written as they go.

    ``model`` is an export, ``out`` a ``.safetensors`` file or a chunk directory (streamed,
    resumable). Every option of the command is a keyword, named as the flag without its dashes
    (``prompts="data.parquet"``, ``column="text"``, ``extract=["resid_out", "attn_pattern"]``,
    ``token_groups=[[0], [-1]]``, ``input_ids=[[1, 5, 9]]``, ``text=["a", "b"]``, ``tokens="all"``,
    ``batch_size=8``, ``max_batch_tokens=4096``, ``no_sort=True``, ``chunk_size="256MiB"`` (or a
    number of examples), ``shard="0/4"``, ``device="cuda"``, ``dtype="float16"``,
    ``cache_dtype="float32"``, ``overwrite=True``, ...; ``hookrs extract --help`` describes each).
    An unknown keyword is a ValueError naming the options there are. ``progress`` is True (a
    bar: tqdm's when installed, else a line on stderr), False, or a callable ``(done, total)``.

    The run is hook-extract's, the same as the command's; two runs at once (threads) each report
    to their own ``progress``. Returns ``out``; open it with ``hookrs.ActivationCache.load(out)``
    (or lazily, a key at a time, with ``xtask/python/load_cache.py``). A bad option raises
    ValueError, a failed run RuntimeError; a chunk directory keeps every chunk completed before
    the failure."""
    given = {"model": str(model), "out": str(out)}
    for key, value in options.items():
        if value is None:
            continue
        if key == "extract" and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif key == "text" and isinstance(value, str):
            value = [value]
        elif key == "token_groups" and not isinstance(value, str):
            value = [list(g) if isinstance(g, (list, tuple)) else [g] for g in value]
        elif key in ("prompts", "config"):
            value = str(value)
        given[key] = value
    bar = _progress(progress)
    try:
        _extract(json.dumps(given), bar)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return out


def cli(args):
    """Runs the ``hookrs`` command (found on PATH, or in ``$HOOKRS_BIN``) with ``args`` and
    returns its standard output; a failing command raises ValueError (usage, exit 2) or
    RuntimeError (exit 1) with its message."""
    import os
    import shutil
    import subprocess
    exe = os.environ.get("HOOKRS_BIN") or shutil.which("hookrs")
    if exe is None:
        raise RuntimeError("the hookrs command is not on PATH (build it with `cargo build -p hookrs-cli`, or set HOOKRS_BIN)")
    done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    if done.returncode == 2:
        raise ValueError(done.stderr.strip())
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return done.stdout


def _progress(progress):
    """A callable (done, total) drawing a progress bar, or None."""
    if progress is False or progress is None:
        return None
    if callable(progress) and progress is not True:
        return progress
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    class Bar:
        def __init__(self):
            self.bar = None

        def __call__(self, done, total):
            if tqdm is not None:
                if self.bar is None:
                    self.bar = tqdm(total=total, unit="example", desc="hookrs extract")
                self.bar.update(done - self.bar.n)
            else:
                of = f"/{total}" if total else ""
                print(f"\rhookrs extract: {done}{of} examples", end="", file=sys.stderr, flush=True)

        def close(self):
            if self.bar is not None:
                self.bar.close()
            elif tqdm is None:
                print(file=sys.stderr)

    return Bar()

_FIELDS = {
    **{f: False for f in [
        "extract_embed", "extract_resid_in", "extract_resid_mid", "extract_resid_out", "extract_resid_in_post_layernorm",
        "extract_attn_pattern", "extract_head_values_projected", "extract_head_keys_projected", "extract_head_queries_projected",
        "extract_head_keys", "extract_head_values", "extract_head_queries", "extract_values", "extract_keys", "extract_queries",
        "extract_head_out", "extract_attn_out", "extract_attn_in", "extract_mlp_out", "extract_last_layernorm", "save_input_ids",
        "avg", "avg_over_example", "keep_gradient"]},
    "attn_heads": "all",
    "attn_pattern_avg": "none",
    "attn_pattern_row_positions": None,
    "save_logits": True,
}


class ExtractionConfig:
    """easyroutine's ExtractionConfig: the same field names and defaults. An unknown field is a
    ValueError naming the closest ones."""

    def __init__(self, **fields):
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            import difflib
            hints = {u: difflib.get_close_matches(u, _FIELDS, n=3) for u in unknown}
            raise ValueError("unknown ExtractionConfig field(s): " + "; ".join(f"{u} (closest: {', '.join(h) or 'none'})" for u, h in hints.items()))
        for k, v in _FIELDS.items():
            setattr(self, k, fields.get(k, v))

    def to_dict(self):
        return {k: getattr(self, k) for k in _FIELDS}

    def __repr__(self):
        on = {k: v for k, v in self.to_dict().items() if v != _FIELDS[k]}
        return f"ExtractionConfig({', '.join(f'{k}={v!r}' for k, v in on.items())})"


_RESID_TEMPLATES = {
    "resid_out": "residual_stream_hook_name",
    "resid_in": "residual_stream_input_hook_name",
    "resid_mid": "intermediate_stream_hook_name",
    "attn_in": "attn_in_hook_name",
    "attn_out": "attn_out_hook_name",
    "mlp_out": "mlp_out_hook_name",
}


@dataclass
class Intervention:
    """easyroutine's Intervention, with the same fields and the same activation names:

    - ``resid_out_N``, ``resid_in_N``, ``resid_mid_N``, ``attn_in_N``, ``attn_out_N``,
      ``mlp_out_N`` with ``type="full"``: overwrite (or zero) the token positions;
    - ``head_queries_LxHy``, ``head_keys_LxHy``, ``head_values_LxHy`` with ``type="full"``: one
      head of layer x (fused q/k/v projections included);
    - ``pattern_LxHy`` with ``type="columns"`` (keys at the positions, every query), ``"rows"``
      (queries at the positions, every key) or ``"grid"`` (``token_positions=(queries, keys)``):
      the attention pattern of head y, multiplied by ``multiplication_value`` or patched.

    Token positions are ints (negative from the end), ``"last"`` or ``"all"``.
    ``patching_values`` is a tensor, or None / ``"ablation"`` for zeros."""

    type: str
    activation: str
    token_positions: Any
    patching_values: Optional[Any] = None
    multiplication_value: float = 0.0
    apply_softmax: bool = False

    def __getitem__(self, key):
        return getattr(self, key)

    def to_dict(self, description, seq_len):
        """The engine's form of this intervention for a model (its ``description``) and a
        batch of ``seq_len`` positions."""
        def positions(tokens):
            out = []
            for t in tokens:
                if isinstance(t, bool) or not isinstance(t, (int, str)):
                    raise ValueError(f"{self.activation}: token position {t!r}: expected an int, 'last' or 'all'")
                if t == "last":
                    out.append(-1)
                elif t == "all":
                    out.extend(range(-seq_len, 0))
                elif isinstance(t, str):
                    raise ValueError(f"{self.activation}: token position {t!r}: expected an int, 'last' or 'all'")
                else:
                    out.append(t)
            return out

        patch = self.patching_values
        if isinstance(patch, str) and patch != "ablation":
            raise ValueError(f"{self.activation}: patching_values {patch!r}: expected a tensor, None or 'ablation'")
        m = re.fullmatch(r"(resid_out|resid_in|resid_mid|attn_in|attn_out|mlp_out)_(\d+)", self.activation)
        if m:
            self._require_type("full")
            template = description["templates"][_RESID_TEMPLATES[m.group(1)]]
            return {"kind": "resid", "component": template.format(int(m.group(2))), "positions": positions(self.token_positions), "patch": patch}
        m = re.fullmatch(r"head_(queries|keys|values)_L(\d+)H(\d+)", self.activation)
        if m:
            self._require_type("full")
            return {"kind": "qkv", "which": m.group(1), "layer": int(m.group(2)), "head": int(m.group(3)),
                    "positions": positions(self.token_positions), "patch": patch}
        m = re.fullmatch(r"pattern_L(\d+)H(\d+)", self.activation)
        if m:
            every = list(range(-seq_len, 0))
            if self.type == "columns":
                q, k = every, positions(self.token_positions)
            elif self.type == "rows":
                q, k = positions(self.token_positions), every
            elif self.type == "grid":
                if not (isinstance(self.token_positions, tuple) and len(self.token_positions) == 2):
                    raise ValueError(f"{self.activation}: a grid intervention takes token_positions=(query positions, key positions)")
                q, k = positions(self.token_positions[0]), positions(self.token_positions[1])
            else:
                raise ValueError(f"{self.activation}: intervention type {self.type!r} on a pattern: hookrs supports columns, rows and grid")
            return {"kind": "attn", "layer": int(m.group(1)), "head": int(m.group(2)), "q_positions": q, "k_positions": k,
                    "multiplication_value": float(self.multiplication_value), "apply_softmax": bool(self.apply_softmax), "patch": patch}
        raise ValueError(f"intervention on {self.activation!r}: expected resid_out_N, resid_in_N, resid_mid_N, attn_in_N, attn_out_N, "
                         "mlp_out_N, head_queries_LxHy, head_keys_LxHy, head_values_LxHy or pattern_LxHy")

    def _require_type(self, want):
        if self.type != want:
            raise ValueError(f"intervention on {self.activation!r}: type {self.type!r} is not supported there; use type={want!r}")
