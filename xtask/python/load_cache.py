"""Read (and write) hookrs caches from Python with only torch and safetensors.

A hookrs cache is one safetensors file; its header metadata key "hookrs_cache" holds a JSON
manifest of the structure (see crates/hook-cache/src/io.rs):

    from load_cache import load_cache
    cache = load_cache("cache.safetensors")            # plain dict: key -> tensor / list / tuple / dict / data
    cache = load_cache("cache.safetensors", info=True) # values with info come back as (value, info) pairs
    er = load_cache("cache.safetensors", easyroutine=True)  # an easyroutine ActivationCache (needs easyroutine)

save_cache(dict, path) writes the same format (infos: pass InfoValue(value, info)).

A chunk directory (`hookrs extract --out DIR`) opens lazily, so a cache larger than memory
opens on a laptop: nothing is read until a key is asked for; then each chunk is checked
against the SHA-256 in manifest.json once, memory-mapped with safe_open, and the key's
tensors of all chunks are joined along the batch axis:

    cache = load_cache("out/")          # a ChunkedCache: cache["resid_out_3"], cache.keys(), len(cache)
    for chunk in cache.chunks():         # one chunk at a time, as plain dicts
        ...
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


CHUNKS_FORMAT = "hookrs-chunks"
CHUNKS_VERSION = 1


class ChunkedCache:
    """A chunk directory opened lazily (see the module docstring). Read-only mapping."""

    def __init__(self, path):
        import hashlib
        self._hashlib = hashlib
        self.path = path
        mpath = os.path.join(path, "manifest.json")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path} has no manifest.json: it is not a chunk directory written by hookrs extract --out DIR") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}): was it edited by hand?") from None
        if self.manifest.get("format") != CHUNKS_FORMAT:
            raise ValueError(f"{mpath} has format {self.manifest.get('format')!r}, expected {CHUNKS_FORMAT!r}")
        if self.manifest.get("version", 0) > CHUNKS_VERSION:
            raise ValueError(f"{path} has chunk format version {self.manifest['version']}; this reader knows {CHUNKS_VERSION}")
        self._verified = set()
        self._keys = None

    def _chunk_path(self, i):
        c = self.manifest["chunks"][i]
        p = os.path.join(self.path, c["file"])
        if i not in self._verified:
            h = self._hashlib.sha256()
            n = 0
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                    n += len(block)
            if n != c["bytes"]:
                raise ValueError(f"{p} has {n} bytes, the manifest says {c['bytes']}: it is truncated or was replaced")
            if h.hexdigest() != c["sha256"]:
                raise ValueError(f"{p} does not match its SHA-256 in the manifest: it is corrupted")
            self._verified.add(i)
        return p

    def __len__(self):
        return len(self.keys())

    def keys(self):
        if self._keys is None:
            if not self.manifest["chunks"]:
                self._keys = []
            else:
                with safe_open(self._chunk_path(0), "pt") as f:
                    m = json.loads(f.metadata()[MANIFEST_KEY])
                self._keys = [k for k, _ in m["entries"] if k != "hookrs_batches"]
        return list(self._keys)

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return ((k, self[k]) for k in self.keys())

    @property
    def examples(self):
        return sum(c["examples"] for c in self.manifest["chunks"])

    def chunks(self):
        """Each chunk as a plain dict (load_cache of its file), in dataset order."""
        for i in range(len(self.manifest["chunks"])):
            yield load_cache(self._chunk_path(i))

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(key)
        parts = []
        for i in range(len(self.manifest["chunks"])):
            with safe_open(self._chunk_path(i), "pt") as f:
                m = json.loads(f.metadata()[MANIFEST_KEY])
                node = dict(m["entries"])[key]
                names = []
                _tensor_names(node, names)
                tensors = {n: f.get_tensor(n) for n in names}
            parts.append(_build(node, tensors, False, None))
            if not _has_tensor(parts[0]):
                return parts[0]  # plain data (mapping_index, metadata): the first chunk's
        axes = self[TOKEN_AXES].get(key, []) if key != TOKEN_AXES and TOKEN_AXES in self.keys() else []
        return _join(parts, axes)


# `--tokens all` on prompts of mixed length: token axes are right-padded with zeros per chunk,
# `token_lengths` holds each example's real count, this data entry names the padded axes
TOKEN_AXES = "hookrs_token_axes"


def _has_tensor(v):
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def _join(parts, axes):
    """The chunks' values of one key joined on the batch axis (dicts and lists item by item),
    the token axes padded with zeros to the widest chunk first."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts], axes) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_join([p[i] for p in parts], axes) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        return first
    for ax in axes:
        width = max(p.shape[ax] for p in parts)
        padded = []
        for p in parts:
            if p.shape[ax] < width:
                shape = list(p.shape)
                shape[ax] = width - p.shape[ax]
                p = torch.cat([p, p.new_zeros(shape)], ax)
            padded.append(p)
        parts = padded
    return torch.cat(parts, 0)


def _tensor_names(node, out):
    (kind, body), = node.items()
    if kind == "tensor":
        out.append(body["name"])
    elif kind in ("list", "tuple"):
        for x in body:
            _tensor_names(x, out)
    elif kind == "map":
        for _, x in body:
            _tensor_names(x, out)
    elif kind == "info":
        _tensor_names(body["value"], out)


def load_cache(path, info=False, easyroutine=False):
    if os.path.isdir(path):
        return ChunkedCache(path)
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
