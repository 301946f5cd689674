"""A cache (easyroutine's, hookrs's, or plain dicts) as flat entries, the way
hook-parity's `flatten` reads hookrs's: tensors under `key`, lists and tuples by index
(`key/0`), dicts by key (`key/mean`), `ValueWithInfo` (easyroutine's or hookrs's) seen
through. Plain data (str, int, float, bool, None) is not a tensor and is left out; any other
type is an error that names it, so a new kind of value is never silently skipped."""
import torch

_PLAIN = (str, int, float, bool, type(None))


def _is_value_with_info(v):
    return type(v).__name__ == "ValueWithInfo" and callable(getattr(v, "value", None))


def flatten(prefix, v, out):
    """Adds the tensors of `v` to `out` under `prefix`."""
    join = (lambda k: f"{prefix}/{k}" if prefix else str(k))
    if _is_value_with_info(v):
        flatten(prefix, v.value(), out)
    elif isinstance(v, torch.Tensor):
        out[prefix] = v
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            flatten(join(i), x, out)
    elif isinstance(v, dict):
        for k, x in v.items():
            flatten(join(k), x, out)
    elif not isinstance(v, _PLAIN):
        raise TypeError(f"{prefix or '(root)'}: a {type(v).__module__}.{type(v).__name__} in a cache: expected tensors, lists, tuples, dicts, ValueWithInfo or plain data")


def flat_cache(cache, skip=("mapping_index",)):
    """Every tensor of `cache` (a mapping, or anything with keys() and [] such as an
    ActivationCache), flattened, in its order; the keys in `skip` left out."""
    out = {}
    for k in cache.keys():
        if k not in skip:
            flatten(k, cache[k], out)
    return out
