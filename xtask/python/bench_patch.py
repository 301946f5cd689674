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


def resid_out(layers, saved):
    """Cells are positions: a forward hook on layer l writes the clean residual at one position."""
    def save(l):
        return layers[l].register_forward_hook(lambda mod, args, out: saved.__setitem__(l, (out[0] if isinstance(out, tuple) else out).clone()))

    def patch(l, rows_cells):
        def hook(mod, args, out):
            x = (out[0] if isinstance(out, tuple) else out).clone()
            for row, p in rows_cells:
                x[row, p] = saved[l][0, p]
            return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
        return layers[l].register_forward_hook(hook)
    return save, patch


def heads(layers, saved, hd):
    """Cells are heads: a pre-hook on layer l's o_proj writes one head's clean input (its
    head_dim columns) at every position."""
    def save(l):
        return layers[l].self_attn.o_proj.register_forward_pre_hook(lambda mod, args: saved.__setitem__(l, args[0].clone()))

    def patch(l, rows_cells):
        def hook(mod, args):
            x = args[0].clone()
            for row, h in rows_cells:
                x[row, :, h * hd:(h + 1) * hd] = saved[l][0, :, h * hd:(h + 1) * hd]
            return (x,)
        return layers[l].self_attn.o_proj.register_forward_pre_hook(hook)
    return save, patch


def sites(model, heads_mode):
    """(save, patch, cells per layer) of the sweep: heads of a layer, or positions."""
    layers, saved = model.model.layers, {}
    if heads_mode:
        n = model.config.num_attention_heads
        return (*heads(layers, saved, model.config.hidden_size // n), n)
    return (*resid_out(layers, saved), None)


def metric(logits, answer, wrong):
    return (logits[:, -1, answer] - logits[:, -1, wrong]).double()


def record_clean(model, save, clean_t):
    handles = [save(l) for l in range(len(model.model.layers))]
    model(clean_t)
    for h in handles:
        h.remove()


def sweep_batched_by_layer(model, clean, corrupted, answer, wrong, heads_mode=False):
    """The grid [layers, cells] with the cells of each layer as the rows of one batch (each row
    patched at its own position or head): the fastest plain PyTorch a user writes by hand."""
    save, patch, n_cells = sites(model, heads_mode)
    n_cells = n_cells or len(clean)
    n_layers = len(model.model.layers)
    with torch.no_grad():
        record_clean(model, save, torch.tensor([clean]))
        grid = torch.zeros(n_layers, n_cells, dtype=torch.float64)
        batch = torch.tensor([corrupted]).repeat(n_cells, 1)
        for l in range(n_layers):
            h = patch(l, [(c, c) for c in range(n_cells)])
            grid[l] = metric(model(batch).logits, answer, wrong)
            h.remove()
    return grid


def sweep_hook_loop(model, clean, corrupted, answer, wrong, heads_mode=False):
    """The grid [layers, cells], one forward per cell with a forward hook (what a
    TransformerLens / nnsight user writes)."""
    save, patch, n_cells = sites(model, heads_mode)
    n_cells = n_cells or len(clean)
    n_layers = len(model.model.layers)
    corrupt_t = torch.tensor([corrupted])
    with torch.no_grad():
        record_clean(model, save, torch.tensor([clean]))
        grid = torch.zeros(n_layers, n_cells, dtype=torch.float64)
        for l in range(n_layers):
            for c in range(n_cells):
                h = patch(l, [(0, c)])
                grid[l, c] = metric(model(corrupt_t).logits, answer, wrong)[0]
                h.remove()
    return grid


def main():
    hf, clean, corrupted, answer, wrong = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    heads_mode = sys.argv[6:] == ["heads"]
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    t = time.perf_counter()
    loop = sweep_hook_loop(model, clean, corrupted, answer, wrong, heads_mode)
    loop_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = sweep_batched_by_layer(model, clean, corrupted, answer, wrong, heads_mode)
    batched_s = time.perf_counter() - t
    print(json.dumps({"hook_loop_s": loop_s, "batched_by_layer_s": batched_s, "cells": loop.numel(),
                      "max_diff": float((loop - batched).abs().max()), "metric_range": float(loop.max() - loop.min()),
                      "grid": loop.tolist()}))


if __name__ == "__main__":
    main()
