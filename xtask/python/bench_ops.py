"""easyroutine's attention_pattern_head block reduction, timed (the anchor measurement of
../shared/anchors/easyroutine_block_avg.py, extended to G = 1, 4, 16, 32).

Writes OUT/pattern.safetensors (the pattern both sides use) and prints one JSON line per case:
{"G": .., "mode": .., "ms": median ms per layer}. Usage: python bench_ops.py OUT
"""
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import save_file
from easyroutine.interpretability.hooks import attention_pattern_head
from easyroutine.interpretability.activation_cache import ActivationCache

torch.set_num_threads(2)
torch.manual_seed(0)
B, H, S = 4, 8, 128
pat = torch.softmax(torch.randn(B, H, S, S), -1)
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
save_file({"pattern": pat.contiguous()}, str(out / "pattern.safetensors"))


def groups_for(G):
    if G == 1:
        return [(S - 1,)]  # the tiny case: one group of one token
    return [tuple(range(i * S // G, (i + 1) * S // G)) for i in range(G)]


for G in (1, 4, 16, 32):
    groups = groups_for(G)
    for mode in ("mean", "baseline_ratio"):
        reps = 3 if G >= 16 else 15
        ts = []
        for _ in range(reps):
            c = ActivationCache()
            t = time.perf_counter()
            attention_pattern_head(None, (), {}, pat, token_indexes=groups, layer=0, cache=c,
                                   attn_pattern_avg=mode, attn_pattern_row_partition=groups)
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(json.dumps({"G": G, "mode": mode, "ms": ts[len(ts) // 2] * 1000, "groups": [list(g) for g in groups]}), flush=True)
