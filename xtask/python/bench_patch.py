"""Activation patching of resid_out, layers x positions, in plain PyTorch on the eager HF
model: the side `cargo xtask bench patch` puts next to `hookrs patch`.

- hook loop: one forward per cell, a forward hook on `model.model.layers[l]` writing the
  clean residual at one position (what a TransformerLens / nnsight user writes);
- batched by layer: the positions of a layer as the rows of one batch, each row patched at
  its own position (the fastest plain PyTorch a user writes by hand).

The metric is the logit difference answer - wrong at the last position; the script prints the
seconds of each and the largest difference between the two grids.

With `heads` after the arguments it patches layers x heads instead: each cell writes the clean
input of a layer's o_proj for one head (its slice of head_dim columns) at every position (a
forward pre-hook on `self_attn.o_proj`); batched by layer, the heads of a layer are the rows.

Usage: bench_patch.py HF_DIR CLEAN_IDS CORRUPTED_IDS ANSWER WRONG [heads]  ->  JSON"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    hf, clean, corrupted, answer, wrong = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if sys.argv[6:] == ["heads"]:
        return heads(hf, clean, corrupted, answer, wrong)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    layers = model.model.layers
    clean_t, corrupt_t = torch.tensor([clean]), torch.tensor([corrupted])
    n_layers, n_pos = len(layers), len(clean)

    with torch.no_grad():
        saved = {}
        handles = [layer.register_forward_hook(lambda mod, args, out, l=l: saved.__setitem__(l, (out[0] if isinstance(out, tuple) else out).clone()))
                   for l, layer in enumerate(layers)]
        model(clean_t)
        for h in handles:
            h.remove()

        def patch_hook(l, rows_pos):
            def hook(mod, args, out):
                x = out[0] if isinstance(out, tuple) else out
                x = x.clone()
                for row, p in rows_pos:
                    x[row, p] = saved[l][0, p]
                return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
            return hook

        def metric(logits):
            return (logits[:, -1, answer] - logits[:, -1, wrong]).double()

        t = time.perf_counter()
        loop = torch.zeros(n_layers, n_pos, dtype=torch.float64)
        for l in range(n_layers):
            for p in range(n_pos):
                h = layers[l].register_forward_hook(patch_hook(l, [(0, p)]))
                loop[l, p] = metric(model(corrupt_t).logits)[0]
                h.remove()
        loop_s = time.perf_counter() - t

        t = time.perf_counter()
        batched = torch.zeros(n_layers, n_pos, dtype=torch.float64)
        batch = corrupt_t.repeat(n_pos, 1)
        for l in range(n_layers):
            h = layers[l].register_forward_hook(patch_hook(l, [(p, p) for p in range(n_pos)]))
            batched[l] = metric(model(batch).logits)
            h.remove()
        batched_s = time.perf_counter() - t
    print(json.dumps({"hook_loop_s": loop_s, "batched_by_layer_s": batched_s, "cells": n_layers * n_pos,
                      "max_diff": float((loop - batched).abs().max()), "metric_range": float(loop.max() - loop.min()),
                      "grid": loop.tolist()}))


def heads(hf, clean, corrupted, answer, wrong):
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    layers = model.model.layers
    n_heads, hd = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    clean_t, corrupt_t = torch.tensor([clean]), torch.tensor([corrupted])
    n_layers = len(layers)

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).double()

    with torch.no_grad():
        saved = {}
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, l=l: saved.__setitem__(l, args[0].clone()))
                   for l, layer in enumerate(layers)]
        model(clean_t)
        for h in handles:
            h.remove()

        def patch_hook(l, rows_heads):
            def hook(mod, args):
                x = args[0].clone()
                for row, h in rows_heads:
                    x[row, :, h * hd:(h + 1) * hd] = saved[l][0, :, h * hd:(h + 1) * hd]
                return (x,)
            return hook

        t = time.perf_counter()
        loop = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        for l in range(n_layers):
            for h in range(n_heads):
                handle = layers[l].self_attn.o_proj.register_forward_pre_hook(patch_hook(l, [(0, h)]))
                loop[l, h] = metric(model(corrupt_t).logits)[0]
                handle.remove()
        loop_s = time.perf_counter() - t

        t = time.perf_counter()
        batched = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        batch = corrupt_t.repeat(n_heads, 1)
        for l in range(n_layers):
            handle = layers[l].self_attn.o_proj.register_forward_pre_hook(patch_hook(l, [(h, h) for h in range(n_heads)]))
            batched[l] = metric(model(batch).logits)
            handle.remove()
        batched_s = time.perf_counter() - t
    print(json.dumps({"hook_loop_s": loop_s, "batched_by_layer_s": batched_s, "cells": n_layers * n_heads,
                      "max_diff": float((loop - batched).abs().max()), "metric_range": float(loop.max() - loop.min()),
                      "grid": loop.tolist()}))


if __name__ == "__main__":
    main()
