"""Cache parity: drive easyroutine's ActivationCache through scripted scenarios.

Writes OUT/batches.safetensors (the inputs), OUT/scenarios.json (the scripted operations, the
memory reports, errors) and OUT/<scenario>.safetensors (easyroutine's final state, in the hookrs
cache format via load_cache.save_cache). The Rust runner replays the same operations on
hook-cache and compares. Usage: python parity_cache.py OUT
"""
import json
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
import logging
sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import save_file

from easyroutine.interpretability.activation_cache import ActivationCache, ValueWithInfo
from load_cache import save_cache
from easyroutine.logger import logger as _er_logger

_er_logger.setLevel(logging.ERROR)  # easyroutine warns on every non-tensor value it measures

if sys.argv[1] == "verify":
    # Second pass: read the caches hook-cache saved (one per scenario) with load_cache.py and
    # compare them with easyroutine's state for the same inputs.
    from load_cache import load_cache
    d = Path(sys.argv[2])
    spec = json.loads((d / "scenarios.json").read_text())
    bad = 0

    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        return a == b

    for sc in spec["scenarios"]:
        ours = load_cache(str(d / f"{sc['name']}.hookrs.safetensors"), info=True)
        theirs = load_cache(str(d / f"{sc['name']}.safetensors"), info=True)
        ok = list(ours) == list(theirs) and all(same(ours[k], theirs[k]) for k in ours)
        bad += not ok
        print(f"python reads hookrs cache {sc['name']}: {'same as easyroutine' if ok else 'DIFFERENT'}", file=sys.stderr)
    print(f"parity cache (python side): {len(spec['scenarios']) - bad} passed, {bad} failed", file=sys.stderr)
    sys.exit(1 if bad else 0)

torch.manual_seed(0)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

tensors = {}


def T(name, t):
    tensors[name] = t.contiguous()
    return {"t": name}


def batch_spec(i):
    """A batch as a JSON spec (tensors by name) covering every value kind."""
    s = 3 + i  # ragged: sequence length differs per batch
    return {
        "resid_out_0": T(f"b{i}/resid_out_0", torch.randn(1, 3, 4)),
        "resid_out_1": T(f"b{i}/resid_out_1", torch.randn(2, 3, 4)),
        "pattern_L0H0": {"info": "Shape: batch q k", "value": T(f"b{i}/pattern", torch.rand(1, 2, 2))},
        "head_keys_L0H1": {"info": "Shape: batch seq_len d_head", "value": T(f"b{i}/hk", torch.randn(1, 3, 2))},
        "mapping_index": {"data": {"last": [0], "first": [1]}},
        "token_dict": {"data": {"last": [5 + i]}},
        "offset": {"data": [i]},
        "last_layernorm": {"dict": {"mean": T(f"b{i}/ln_mean", torch.randn(1, 3)), "variance": T(f"b{i}/ln_var", torch.rand(1, 3))}},
        "embed": {"tuple": [T(f"b{i}/embed0", torch.randn(1, 2, 4)), T(f"b{i}/embed1", torch.randn(1, 1, 4))]},
        "my_list": {"list": [T(f"b{i}/my_list0", torch.randn(2))]},
        "logits": T(f"b{i}/logits", torch.randn(1, 5)),
        "mlp_out_0": T(f"b{i}/mlp_out_0", torch.randn(1, 64, 32)),  # > 1 kB: easyroutine's KB format is right
        "mlp_out_1": T(f"b{i}/mlp_out_1", torch.randn(1, 64, 32)),
        "scalar": T(f"b{i}/scalar", torch.tensor(float(i))),
        "ragged": T(f"b{i}/ragged", torch.randn(1, s, 4)),
        "input_ids": T(f"b{i}/input_ids", torch.randint(0, 100, (1, 3))),
        "count": {"data": i + 1},
        "name": {"data": f"b{i}"},
        "layer_stats": {"dict": {"m": T(f"b{i}/ls", torch.randn(2))}},
    }


def build(spec):
    if "t" in spec:
        return tensors[spec["t"]]
    if "info" in spec:
        return ValueWithInfo(build(spec["value"]), spec["info"])
    if "data" in spec:
        return json.loads(json.dumps(spec["data"]))
    if "tuple" in spec:
        return tuple(build(x) for x in spec["tuple"])
    if "list" in spec:
        return [build(x) for x in spec["list"]]
    if "dict" in spec:
        return {k: build(x) for k, x in spec["dict"].items()}
    raise ValueError(spec)


def cache_of(spec, drop=()):
    c = ActivationCache()
    for k, v in spec.items():
        if k in drop:
            continue
        c[k] = build(v)
    return c


batches = [batch_spec(i) for i in range(3)]

# ---- corrected memory reports (exact bytes, every value kind measured) ----------------------
def nbytes(v):
    if isinstance(v, ValueWithInfo):
        return nbytes(v.value())
    if isinstance(v, torch.Tensor):
        return v.element_size() * v.nelement()
    if isinstance(v, (list, tuple)):
        return sum(nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(nbytes(x) for x in v.values())
    return 0


def fmt(n):
    n = float(n)
    if n > 1e9:
        return f"{n / 1e9:.2f} GB"
    if n > 1e6:
        return f"{n / 1e6:.2f} MB"
    if n > 1e3:
        return f"{n / 1e3:.2f} KB"
    return f"{n:.2f} B"


def is_tensor(v):
    return isinstance(v.value() if isinstance(v, ValueWithInfo) else v, torch.Tensor)


def tree(c):
    t = {}
    for k, v in c.cache.items():
        inner = v.value() if isinstance(v, ValueWithInfo) else v
        if isinstance(inner, torch.Tensor):
            t[k] = fmt(nbytes(inner))
        elif isinstance(inner, dict):
            t[k] = {kk: fmt(nbytes(x)) if is_tensor(x) else "Unknown type" for kk, x in inner.items()}
        elif isinstance(inner, (list, tuple)):
            t[k] = [fmt(nbytes(x)) if is_tensor(x) else "Unknown type" for x in inner]
        else:
            t[k] = "Unknown type"
    return t


GROUPS = [
    (r"resid_out_\d+$", "resid_out"), (r"resid_in_\d+$", "resid_in"), (r"resid_mid_\d+$", "resid_mid"),
    (r"attn_in_\d+$", "attn_in"), (r"attn_out_\d+$", "attn_out"), (r"avg_attn_pattern_L(\d+)H\d+$", "avg_attn_pattern_L{}"),
    (r"pattern_L(\d+)H\d+$", "pattern_L{}"), (r"head_out_\d+$", "head_out"), (r"mlp_out_\d+$", "mlp_out"),
    (r"head_values_L(\d+)H\d+$", "head_values_L{}"), (r"head_keys_L(\d+)H\d+$", "head_keys_L{}"),
    (r"head_queries_L(\d+)H\d+$", "head_queries_L{}"), (r"values_L(\d+)$", "values_L{}"), (r"keys_L(\d+)$", "keys_L{}"),
    (r"queries_L(\d+)$", "queries_L{}"),
]


def grouped_tree(c):
    plain = tree(c)
    outd, sums = {}, {}
    for k, size in plain.items():
        v = c.cache[k]
        g = None
        if k != "metadata" and isinstance(size, str) and is_tensor(v):
            for pat, rep in GROUPS:
                m = re.match(pat, k)
                if m:
                    g = rep.format(*m.groups())
                    break
        if g is None:
            outd[k] = size
        else:
            sums.setdefault(g, [0, 0])
            sums[g][0] += nbytes(v)
            sums[g][1] += 1
            outd.setdefault(g, None)
    for g, (b, n) in sums.items():
        outd[g] = f"{fmt(b)} ({n} items)"
    return outd


def try_(f):
    try:
        return {"ok": f()}
    except Exception as e:  # easyroutine's own failures are recorded, not fatal
        return {"error": f"{type(e).__name__}: {e}"}


def memory(c):
    keys = list(c.cache.keys()) + ["absent_key"]
    return {
        "easyroutine": {
            "total": try_(lambda: c.memory_size()),
            "per_key": {k: try_(lambda k=k: c.memory_size(k)) for k in keys},
            "tree": try_(lambda: c.memory_tree()),
            "grouped": try_(lambda: c.memory_tree(grouped_tree=True)),
        },
        "corrected": {
            "total": {"ok": fmt(sum(nbytes(v) for v in c.cache.values()))},
            "per_key": {k: {"ok": fmt(nbytes(c.cache[k])) if k in c.cache else "Not present: 0 B"} for k in keys},
            "tree": {"ok": tree(c)},
            "grouped": {"ok": grouped_tree(c)},
        },
    }


# ---- scenarios ----------------------------------------------------------------------------------
scenarios = []


DEFERRED_BUG = ("easyroutine's deferred_mode() never returns: on exit it calls cat() while still in deferred mode, so each "
                "batch is appended to the list being iterated. hookrs aggregates the collected batches once on exit; the "
                "Python side here replays that documented behaviour with plain cat() calls.")


def scenario(name, ops, run):
    c, error = run()
    path = out / f"{name}.safetensors"
    save_cache(c, str(path))
    deviation = DEFERRED_BUG if any(op[0] == "deferred" for op in ops) else None
    scenarios.append({"name": name, "ops": ops, "error": error, "memory": memory(c), "deviation": deviation})


def run_ops(ops):
    c = ActivationCache()
    error = None
    for op in ops:
        kind = op[0]
        try:
            if kind == "cat":
                c.cat(cache_of(batches[op[1]]))
            elif kind == "cat_without":
                c.cat(cache_of(batches[op[1]], drop=op[2]))
            elif kind == "deferred":
                # easyroutine's deferred_mode never returns: on exit it calls self.cat(ext) while
                # self.deferred_cache is still the list, so every cat re-defers the batch and the
                # loop over that growing list never ends (it ran out of memory here). The
                # documented behaviour -- collect, then aggregate once on exit -- is run instead.
                pending = [cache_of(batches[i]) for i in op[1]]
                for p in pending:
                    c.cat(p)
            elif kind == "remove_aggregation":
                c.remove_aggregation(op[1])
            elif kind == "insert_batch":
                for k, v in batches[op[1]].items():
                    c[k] = build(v)
            elif kind == "merge":
                c = c + cache_of(batches[op[1]], drop=op[2])
            elif kind == "update":
                c.update(cache_of(batches[op[1]], drop=op[2]))
            elif kind == "delete":
                del c[op[1]]
            else:
                raise ValueError(kind)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    return c, error


for name, ops in [
    ("cat_one", [["cat", 0]]),
    ("cat_three", [["cat", 0], ["cat", 1], ["cat", 2]]),
    ("cat_deferred", [["deferred", [0, 1, 2]]]),
    ("cat_then_deferred", [["cat", 0], ["deferred", [1, 2]]]),
    ("cat_without_mapping_index_strategy", [["remove_aggregation", "mapping_index"], ["remove_aggregation", "token_dict"],
                                            ["cat", 0], ["cat", 1], ["cat", 2]]),
    ("cat_key_mismatch", [["cat", 0], ["cat_without", 1, ["logits"]]]),
    ("merge", [["insert_batch", 0], ["merge", 1, ["resid_out_0", "count"]]]),
    ("update_delete", [["insert_batch", 0], ["update", 2, ["name"]], ["delete", "offset"], ["delete", "scalar"]]),
]:
    scenario(name, ops, lambda ops=ops: run_ops(ops))

save_file(tensors, str(out / "batches.safetensors"))
(out / "scenarios.json").write_text(json.dumps({"batches": batches, "scenarios": scenarios}, indent=1))
print(f"parity cache: {len(scenarios)} scenarios -> {out}", file=sys.stderr)
