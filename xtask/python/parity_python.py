"""The Python API against the Rust API (run by `cargo xtask parity models`, after the Rust
runner): every parity case run again through `import hookrs` (HookedModule.load,
run_with_cache with the case's config, token groups, interventions and vocabulary index)
must return exactly the tensors the Rust runner returned (the same bytes; keys in order), which it
saved in CASE_DIR/hookrs.safetensors (key order in hookrs.keys.json).

Usage: parity_python.py CASE_DIR"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import hookrs
from harness import flat_cache


def bitwise_equal(a, b):
    """Same dtype, shape and bytes (NaN entries included, which torch.equal calls different)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def main():
    d = Path(sys.argv[1])
    spec = json.loads((d / "cases.json").read_text())
    rust = load_file(str(d / "hookrs.safetensors"))
    order = json.loads((d / "hookrs.keys.json").read_text())  # safetensors sorts its keys
    expected = load_file(str(d / "expected.safetensors"))
    models = {}
    same = differ = 0
    for case in spec["cases"]:
        family, name = case["family"], case["name"]
        prefix = f"{family}/{name}/"
        if f"{family}/{name}" not in order:
            continue  # the Rust runner failed this case: its table says so
        want = {k: rust[prefix + k] for k in order[f"{family}/{name}"]}
        if family not in models:
            models[family] = hookrs.HookedModule.load(str(d / spec["families"][family]["model"]))
        ids = expected[f"{family}/input_ids"]
        _, cache = models[family].run_with_cache(ids, torch.ones_like(ids), spec["tokens"], case["config"],
                                                 interventions=case["interventions"] or None, vocabulary_index=case["vocabulary_index"])
        got = flat_cache(cache)
        problems = []
        if list(got) != list(want):
            problems.append(f"keys: python {list(got)}, rust {list(want)}")
        else:
            problems += [k for k in want if not bitwise_equal(got[k], want[k])]
        if problems:
            differ += 1
            print(f"DIFFER {family}/{name}: {problems[:5]}")
        else:
            same += 1
    print(f"parity python: {same} cases return the Rust API's tensors bitwise through `import hookrs`, {differ} differ")
    sys.exit(1 if differ or same == 0 else 0)


if __name__ == "__main__":
    main()
