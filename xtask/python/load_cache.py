"""Read (and write) hookrs caches from Python with only torch and safetensors.

A hookrs cache is one safetensors file; its header metadata key "hookrs_cache" holds a JSON
manifest of the structure (see crates/hook-cache/src/io.rs):

    from load_cache import load_cache
    cache = load_cache("cache.safetensors")            # plain dict: key -> tensor / list / tuple / dict / data
    cache = load_cache("cache.safetensors", info=True) # values with info come back as (value, info) pairs
    er = load_cache("cache.safetensors", easyroutine=True)  # an easyroutine ActivationCache (needs easyroutine)

save_cache(dict, path) writes the same format (infos: pass InfoValue(value, info)).
"""
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST_KEY = "hookrs_cache"
FORMAT_VERSION = 1


class InfoValue:
    """A value with an info string (easyroutine's ValueWithInfo without importing it)."""

    def __init__(self, value, info):
        self.value, self.info = value, info


def _build(node, tensors, info, er_wrap):
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body["name"]]
    if kind == "list":
        return [_build(x, tensors, info, er_wrap) for x in body]
    if kind == "tuple":
        return tuple(_build(x, tensors, info, er_wrap) for x in body)
    if kind == "map":
        return {k: _build(x, tensors, info, er_wrap) for k, x in body}
    if kind == "info":
        v = _build(body["value"], tensors, info, er_wrap)
        if er_wrap is not None:
            return er_wrap(v, body["info"])
        return (v, body["info"]) if info else v
    if kind == "data":
        return body
    raise ValueError(f"unknown manifest node {kind!r}")


def load_cache(path, info=False, easyroutine=False):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if MANIFEST_KEY not in meta:
            raise ValueError(f"{path} is not a hookrs cache (no {MANIFEST_KEY!r} manifest)")
        manifest = json.loads(meta[MANIFEST_KEY])
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has cache format version {manifest['version']}; this reader knows {FORMAT_VERSION}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    er_wrap = None
    if easyroutine:
        from easyroutine.interpretability.activation_cache import ActivationCache, ValueWithInfo
        er_wrap = ValueWithInfo
    out = {k: _build(n, tensors, info, er_wrap) for k, n in manifest["entries"]}
    if easyroutine:
        c = ActivationCache()
        for k, v in out.items():
            c.cache[k] = v
        return c
    return out


def _node(key, path, v, tensors):
    if isinstance(v, InfoValue) or type(v).__name__ == "ValueWithInfo":
        value, info = (v.value, v.info) if isinstance(v, InfoValue) else (v.value(), v.info())
        return {"info": {"info": info, "value": _node(key, path, value, tensors)}}
    if isinstance(v, torch.Tensor):
        name, n = path, 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        t = v.detach().cpu().contiguous()
        tensors[name] = t
        dtype = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                 torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}[t.dtype]
        return {"tensor": {"name": name, "dtype": dtype, "shape": list(t.shape)}}
    if isinstance(v, list):
        return {"list": [_node(key, f"{path}/{i}", x, tensors) for i, x in enumerate(v)]}
    if isinstance(v, tuple):
        return {"tuple": [_node(key, f"{path}/{i}", x, tensors) for i, x in enumerate(v)]}
    if isinstance(v, dict) and any(isinstance(x, (torch.Tensor, list, tuple, dict, InfoValue)) for x in v.values()) and not _is_data(v):
        return {"map": [[k, _node(key, f"{path}/{k}", x, tensors)] for k, x in v.items()]}
    return {"data": v}


def _is_data(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def save_cache(cache, path):
    """Writes a dict (or an easyroutine ActivationCache) in the hookrs format, atomically."""
    items = cache.cache.items() if hasattr(cache, "cache") else cache.items()
    tensors = {}
    entries = [[k, _node(k, k, v, tensors)] for k, v in items]
    manifest = {"format": "hookrs-cache", "version": FORMAT_VERSION, "entries": entries, "aggregations": []}
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".cache.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={MANIFEST_KEY: json.dumps(manifest)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
