"""hookrs from Python: easyroutine's interface over the hookrs engine.

    import torch, hookrs
    model = hookrs.HookedModule.load("llama.pt")                 # exported by `cargo xtask export`
    ids = torch.tensor([[5, 9, 12, 40]])
    config = hookrs.ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True)
    logits, cache = model.run_with_cache(ids, torch.ones_like(ids), [[0, 1], [-1]], config)
    cache["resid_out_0"].shape                                   # torch tensors, no copies

Errors from the engine are ValueError (bad input) or RuntimeError, with the Rust message.
"""
from ._native import ActivationCache, HookedModule, ValueWithInfo

__all__ = ["ActivationCache", "ExtractionConfig", "HookedModule", "ValueWithInfo"]

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
