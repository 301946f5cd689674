"""`run_with_cache` called from Python (`import hookrs`), timed as the Rust bench times it
(crates/hook-torch/examples/bench_models.rs): the same full extraction (resid in/mid/out of
every layer, all-head patterns, head q/k/v; every token), the same batch, one warm-up, the
median of 8 runs, best of 3 rounds. Run by `cargo xtask bench models`.

With GUARD `on`, hookrs's memory guard is installed first (`hookrs.set_memory_limit("machine")`):
every CPU allocation of the process then goes through it, the cost a user opts into.

Usage: bench_python_api.py MODEL BATCH SEQ DEVICE [on|off]  ->  {"python_full_ms": ..., "keys": ...}"""
import json
import statistics
import sys
import time

import torch

import hookrs


def main():
    model, batch, seq, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    guard = (sys.argv[5] if len(sys.argv) > 5 else "off") == "on"
    torch.set_num_threads(2)
    if guard:
        hookrs.set_memory_limit("machine")
    m = hookrs.HookedModule.load(model, device=device)
    vocab = m.description["vocab_size"]
    torch.manual_seed(0)
    ids = torch.randint(vocab, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    cfg = hookrs.ExtractionConfig(extract_resid_in=True, extract_resid_mid=True, extract_resid_out=True, extract_attn_pattern=True,
                                  extract_head_queries=True, extract_head_keys=True, extract_head_values=True, save_logits=False)
    groups = [list(range(seq))]
    keys = 0

    def once():
        nonlocal keys
        t = time.perf_counter()
        _, cache = m.run_with_cache(ids, mask, groups, cfg)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        keys = len(cache) - 1  # without mapping_index
        return (time.perf_counter() - t) * 1000.0

    best = float("inf")
    for _ in range(3):
        once()
        best = min(best, statistics.median(once() for _ in range(8)))
    print(json.dumps({"python_full_ms": best, "keys": keys}))


if __name__ == "__main__":
    main()
