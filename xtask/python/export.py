"""Export a Hugging Face causal LM as TorchScript for hookrs.

    export.py --random FAMILY [--seed N] [--config FILE] --out FILE.pt
    export.py SOURCE --out FILE.pt          (SOURCE: a save_pretrained directory, a .gguf file, a
                                             directory holding one .gguf, or a hub name)
    ... [--device cpu|cuda|cuda:N]          (the device to trace on; default cpu)
    ... [--dtype float32|bfloat16|float16]  (the weights' and activations' dtype; default float32)

An archive runs on any device whatever device it was traced on: hookrs points the graphs'
device constants at the device it loads the model on.

The model is traced with torchscript=True, use_cache=False, attn_implementation="eager" on
inputs (input_ids, attention_mask), so the module tree survives (each submodule keeps its own
forward graph) and padded batches work. A JSON description is stored inside the archive as the
extra file `hookrs.json`: architecture, sizes, easyroutine's component templates. Random models
get a small word-level tokenizer.json trained on xtask/python/corpus.txt; real models get their
own tokenizer as FILE.tokenizer.json beside the .pt (a GGUF file's tokenizer is converted by
transformers' GGUF loader, which also dequantizes the weights to the export dtype).

The self-check compares the traced graph with the eager model on padded batches of two shapes.
Its tolerance is relative to the largest logit it compares (real logits are in the tens, so an
absolute float32 bound would reject ordinary rounding of matmuls of different shapes).
"""
import argparse
import inspect
import json
import shutil
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch

HERE = Path(__file__).parent

# Tiny random models, one per family: GQA in llama, mistral, qwen2, gemma3, phi3, qwen3, gemma2 and
# olmo2; q/k/v bias in qwen2; attention bias in gpt2 and gpt_neox; partial rotary in gpt_neox and
# phi3; q/k norms in qwen3 and olmo2; soft-capping in gemma2. Each is deep enough to hold every kind
# of layer its family has, with a layer after each kind: Gemma 2 alternates sliding and global
# layers; Gemma 3 has a global layer every `sliding_window_pattern` layers (6 in real models, 2
# here: sliding, global, sliding); Qwen2 uses sliding windows from `max_window_layers` on; Mistral
# slides everywhere. The windows are short (4 tokens) so that tests on short prompts reach them.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True,
                  sliding_window=4, max_window_layers=1),
    "gemma3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                   sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25, attention_bias=True),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                 sliding_window=None),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
    "olmo2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
}
CONFIG_CLASS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma3": "Gemma3TextConfig", "gpt2": "GPT2Config",
    "gpt_neox": "GPTNeoXConfig", "phi3": "Phi3Config", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "olmo2": "Olmo2Config",
}
VOCAB = 256

# Each family's layout, as data: where its modules are and the facts the ops need. Every
# easyroutine component name is built from these by `templates`, so resid_in/mid/out, attn_in/out,
# mlp_out, head_*, patterns and last_layernorm mean the same thing on every family:
#   resid_mid   the MLP's input (Llama's post_attention_layernorm output, easyroutine's template;
#               GPT-2's ln_2 output; Gemma 2's pre_feedforward_layernorm output; OLMo 2's
#               un-normed residual, as OLMo 2 norms after the MLP). Gemma 3 keeps easyroutine's
#               template (its post_attention_layernorm, which norms the attention output).
#   qkv         separate: q_proj/k_proj/v_proj; concat: one projection, [q | k | v] on the last
#               dim (GPT-2 c_attn, Phi-3 qkv_proj); per_head: [q_h | k_h | v_h] per head (NeoX).
#   o_weight    out_in: nn.Linear's [out, in]; in_out: GPT-2's Conv1D, transposed.
#   parallel    attention and MLP read the same residual (NeoX's use_parallel_residual): no
#               resid_mid exists.
#   attn_add    the module whose output the residual stream adds for attention and for the MLP
#   mlp_add     (default: the output projections; Gemma 2/3 and OLMo 2 norm them first:
#               their post-norms). Residual decomposition and direct logit attribution read them.
LLAMA = dict(layers="model.layers", attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", mlp_in="post_attention_layernorm.output",
             mlp_out="mlp.down_proj", final_norm="model.norm", embed="model.embed_tokens", unembed="lm_head", qkv="separate", o_weight="out_in",
             norm="RMS", parallel=False)
LAYOUTS = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gemma3": dict(LLAMA, attn_add="post_attention_layernorm", mlp_add="post_feedforward_layernorm"), "qwen3": LLAMA,
    "gemma2": dict(LLAMA, mlp_in="pre_feedforward_layernorm.output", attn_add="post_attention_layernorm", mlp_add="post_feedforward_layernorm"),
    "olmo2": dict(LLAMA, mlp_in="mlp.input", attn_add="post_attention_layernorm", mlp_add="post_feedforward_layernorm"),
    "phi3": dict(LLAMA, q="qkv_proj", k="qkv_proj", v="qkv_proj", qkv="concat"),
    "gpt2": dict(layers="transformer.h", attn="attn", q="c_attn", k="c_attn", v="c_attn", o="c_proj", mlp_in="ln_2.output", mlp_out="mlp.c_proj",
                 final_norm="transformer.ln_f", embed="transformer.wte", unembed="lm_head", qkv="concat", o_weight="in_out", norm="LayerNorm",
                 parallel=False),
    "gpt_neox": dict(layers="gpt_neox.layers", attn="attention", q="query_key_value", k="query_key_value", v="query_key_value", o="dense",
                     mlp_in="mlp.input", mlp_out="mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in",
                     unembed="embed_out", qkv="per_head", o_weight="out_in", norm="LayerNorm", parallel=True),
}
# model_type (config.json) -> family
MODEL_TYPES = {"gemma3_text": "gemma3", **{f: f for f in LAYOUTS}}


def config_for(family, overrides):
    import transformers
    cls = getattr(transformers, CONFIG_CLASS[family])
    kw = dict(vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "gpt2":
        kw.pop("max_position_embeddings")
    kw.update(TINY[family])
    kw.update(overrides)
    return cls(**kw)


def model_for_config(cfg):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM
    if cfg.model_type in ("gemma3_text", "gemma3"):
        return Gemma3ForCausalLM(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def templates(lay, parallel_reason=None):
    L = lay["layers"] + "[{}]"
    P = lay["layers"] + ".{}"  # parameter names are dotted
    a = f"{L}.{lay['attn']}"
    t = {
        "residual_stream_input_hook_name": f"{L}.input",
        "residual_stream_hook_name": f"{L}.output",
        "intermediate_stream_hook_name": f"{L}.{lay['mlp_in']}",
        "residual_stream_input_post_layernorm_hook_name": f"{a}.input",
        "head_query_hook_name": f"{a}.{lay['q']}.output",
        "head_key_hook_name": f"{a}.{lay['k']}.output",
        "head_value_hook_name": f"{a}.{lay['v']}.output",
        "attn_in_hook_name": f"{a}.input",
        "attn_out_hook_name": f"{a}.{lay['o']}.output",
        "attn_o_proj_input_hook_name": f"{a}.{lay['o']}.input",
        "attn_matrix_hook_name": f"{a}.attention_matrix_hook.output",
        "attn_matrix_pre_softmax_hook_name": f"{a}.attention_matrix_pre_softmax_hook.output",
        "mlp_out_hook_name": f"{L}.{lay['mlp_out']}.output",
        # what the residual stream adds (decomposition, attribution): post-norms where a family has them
        "attn_resid_add_hook_name": f"{L}.{lay.get('attn_add') or lay['attn'] + '.' + lay['o']}.output",
        "mlp_resid_add_hook_name": f"{L}.{lay.get('mlp_add') or lay['mlp_out']}.output",
        "last_layernorm_hook_name": f"{lay['final_norm']}.input",
        "embed_tokens": f"{lay['embed']}.output",
        "attn_out_proj_weight": f"{P}.{lay['attn']}.{lay['o']}.weight",
        "attn_out_proj_bias": f"{P}.{lay['attn']}.{lay['o']}.bias",
        "unembed_matrix": f"{lay['unembed']}.weight",
        "last_layernorm": lay["final_norm"],
    }
    if lay["parallel"]:
        del t["intermediate_stream_hook_name"]
    return t


def description(model, family, source, architecture):
    c = model.config
    lay = LAYOUTS[family]
    heads = c.num_attention_heads
    unavailable = {}
    if lay["parallel"]:
        unavailable["intermediate_stream_hook_name"] = (
            f"{architecture} runs attention and MLP in parallel on the same residual (use_parallel_residual), so there is no residual "
            "stream between them (TransformerLens leaves hook_resid_mid out too); use resid_in, attn_out, mlp_out or resid_out")
    final_norm = model.get_submodule(lay["final_norm"])
    return {
        "hookrs_description_version": 5,
        "architecture": architecture,
        "family": family,
        "source": source,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", heads) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "has_qkv_bias": bool(getattr(c, "attention_bias", False) or family in ("qwen2", "gpt2")),
        "has_o_proj_bias": bool(getattr(c, "attention_bias", False) or family == "gpt2"),
        "layernorm_type": lay["norm"],
        "layernorm_eps": float(getattr(final_norm, "eps", None) or getattr(final_norm, "variance_epsilon", None) or 1e-5),
        # Gemma's RMSNorm scales by (1 + weight); the others by weight
        "norm_weight_offset": 1.0 if type(final_norm).__name__.startswith("Gemma") else 0.0,
        # Gemma 2 caps the logits with tanh after the LM head (a logit lens does not)
        "final_logit_softcapping": getattr(c, "final_logit_softcapping", None),
        "qkv_layout": lay["qkv"],
        "o_proj_weight_layout": lay["o_weight"],
        "parallel_attn_mlp": lay["parallel"],
        "position_ids": "from_attention_mask",
        "unavailable": unavailable,
        "inputs": ["input_ids", "attention_mask"],
        "templates": templates(lay),
    }


def past_cache_class():
    """A transformers `Cache` over plain tensors, which crosses `torch.jit.trace` where
    `DynamicCache` cannot (the tracer sees tensors in and tensors out). Each layer's keys and
    values come in as one buffer `[batch, kv_heads, capacity, head_dim]` whose first `past`
    tokens are filled: `update` writes the step's own after them, in place, and returns a view of
    the filled part (no copy of the past: generation's cache is the only one there is)."""
    from transformers.cache_utils import Cache

    class PastCache(Cache):
        def __init__(self, keys, values, past):
            super().__init__()
            self.keys, self.values, self.past = list(keys), list(values), past
            self.new_k, self.new_v = [None] * len(keys), [None] * len(keys)

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            s = key_states.shape[-2]
            k, v = self.keys[layer_idx], self.values[layer_idx]
            k.narrow(2, self.past, s).copy_(key_states)
            v.narrow(2, self.past, s).copy_(value_states)
            self.new_k[layer_idx], self.new_v[layer_idx] = k.narrow(2, self.past, s), v.narrow(2, self.past, s)
            return k.narrow(2, 0, self.past + s), v.narrow(2, 0, self.past + s)

        def get_seq_length(self, layer_idx=0):
            return self.past

        def get_max_cache_shape(self):
            return None

    return PastCache


class WindowByMask:
    """While the step is traced, a decoder layer that slides its attention window itself
    (Gemma 2 and 3: `is_sliding`, `sliding_window`) gets the window put into its attention mask
    instead, from absolute positions (a key more than `sliding_window - 1` tokens before the
    query is masked). transformers' own code for it slices the mask for its HybridCache's
    rolling buffer with Python arithmetic the tracer would freeze at the traced length; with
    every layer's past kept whole, the mask alone is the window, at any length."""

    def __init__(self, model, layers):
        self.layers = [m for m in model.get_submodule(layers).children()
                       if getattr(m, "is_sliding", False) and getattr(m, "sliding_window", None)]
        self.handles = []

    @staticmethod
    def slide(window):
        def hook(module, args, kwargs):
            mask, position = kwargs.get("attention_mask"), kwargs.get("cache_position")
            if mask is not None and position is not None:
                far = torch.arange(mask.shape[-1], device=mask.device)[None, :] <= (position[:, None] - window)
                kwargs["attention_mask"] = mask.masked_fill(far, torch.finfo(mask.dtype).min)
            return args, kwargs
        return hook

    def __enter__(self):
        for m in self.layers:
            m.is_sliding = False
            self.handles.append(m.register_forward_pre_hook(self.slide(m.sliding_window), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.is_sliding = True
        for h in self.handles:
            h.remove()
        self.handles = []


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention (scores, soft cap, mask, float32 softmax, dropout), with
    each key/value head attending for its group of query heads directly instead of after
    `repeat_kv`: the queries `[batch, heads, S, head_dim]` are viewed as `[batch, kv_heads,
    groups * S, head_dim]`, so no copy of the keys and values per query head is made (at 1,024
    past tokens and 4 groups that copy is 4x the layer's whole cache). The pattern comes out
    `[batch, heads, S, past + S]` as eager's, with the same softmax and cast, so its sites are
    the same. Used by the cached step only (`check_step` holds it to the forward)."""
    if scaling is None:
        scaling = module.head_dim ** -0.5
    b, heads, s = query.shape[0], query.shape[1], query.shape[2]
    kv_heads, t = key.shape[1], key.shape[2]
    scores = torch.matmul(query.reshape(b, kv_heads, -1, query.shape[3]), key.transpose(2, 3)).reshape(b, heads, s, t) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :t]
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.reshape(b, kv_heads, -1, t), value).reshape(b, heads, s, -1)
    return out.transpose(1, 2).contiguous(), weights


class GroupedHeads:
    """While the step is traced, the attention of every module that repeats its key/value heads
    (`num_key_value_groups`, the modeling file's `eager_attention_forward` with `repeat_kv`)
    runs `grouped_attention` instead. Modules without the attribute (GPT-2, NeoX: one key/value
    head per query head) keep their own."""

    def __init__(self, model):
        import sys
        self.files = {sys.modules[type(m).__module__] for m in model.modules()
                      if hasattr(m, "num_key_value_groups") and hasattr(sys.modules[type(m).__module__], "eager_attention_forward")}
        self.saved = {}

    def __enter__(self):
        for f in self.files:
            self.saved[f] = f.eager_attention_forward
            f.eager_attention_forward = grouped_attention
        return self

    def __exit__(self, *exc):
        for f, fn in self.saved.items():
            f.eager_attention_forward = fn
        self.saved = {}


def last_position(module, args):
    """A forward pre-hook: the module (the unembedding) gets the last position of its input only."""
    return (args[0][:, -1:], *args[1:])


def with_mask_positions(model):
    """The model, whose forward takes (input_ids, attention_mask) by position and derives the
    position ids from the mask: each example's first real token is position 0 whatever its left
    padding (HF's default positions count the padding, which shifts every absolute-position model
    such as GPT-2 under left padding). The module tree, and so every component name, is unchanged.

    It also gets `step(input_ids, attention_mask, k_0..k_{L-1}, v_0..v_{L-1})`: the forward of
    `S` new tokens after `P` cached ones. `attention_mask` covers all `P + S` tokens; `k_l`, `v_l`
    are layer `l`'s key and value buffers `[batch, kv_heads, capacity, head_dim]`, capacity at
    least `P + S`, the first `P` tokens filled (as the attention stores them: after rotary,
    after q/k norms). The step writes the new tokens' keys and values into positions `P..P+S`
    in place and returns `(logits [batch, 1, vocab] of the last token, new k_0.., new v_0..)`,
    each new one a view `[batch, kv_heads, S, head_dim]` of its buffer. With
    `P = 0` it is the prefill; a long prompt can also be fed in pieces (`S > 1` after `P > 0`).
    Only the last position reaches the unembedding (a pre-hook on it, as transformers'
    `logits_to_keep=1`, here for every family): a prefill of 8 x 1,024 tokens would otherwise
    make 8 x 1,024 x vocab logits that generation never reads (1.6 GB on SmolLM2). The same
    submodules run, so its sites have the forward's names."""
    base = type(model)
    layout = LAYOUTS[MODEL_TYPES.get(model.config.model_type, model.config.model_type)]
    layers = layout["layers"]
    n_layers = model.config.num_hidden_layers
    takes_cache_position = "cache_position" in inspect.signature(base.forward).parameters
    cache_objects = bool(getattr(model, "_supports_cache_class", False))
    PastCache = past_cache_class()

    class WithMaskPositions(base):
        def forward(self, input_ids, attention_mask):
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

        def step(self, input_ids, attention_mask, *past):
            s = input_ids.shape[1]
            p = attention_mask.shape[1] - s
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).narrow(1, p, s)
            keys, values = past[:n_layers], past[n_layers:]
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
            if cache_objects:
                cache = kw["past_key_values"] = PastCache(keys, values, p)
                if takes_cache_position:
                    kw["cache_position"] = torch.arange(s, device=input_ids.device) + p
            else:  # GPT-2: a tuple of (keys, values) per layer in, the whole ones out
                kw["past_key_values"] = tuple((k.narrow(2, 0, p), v.narrow(2, 0, p)) for k, v in zip(keys, values))
            last = self.get_submodule(layout["unembed"]).register_forward_pre_hook(last_position)
            try:
                with WindowByMask(self, layers), GroupedHeads(self):
                    out = base.forward(self, **kw)
            finally:
                last.remove()
            if cache_objects:
                return (out[0], *cache.new_k, *cache.new_v)
            new = []
            for buffers, which in ((keys, 0), (values, 1)):
                for buf, present in zip(buffers, out[1]):
                    buf.narrow(2, p, s).copy_(present[which].narrow(2, p, s))
                    new.append(buf.narrow(2, p, s))
            return (out[0], *new)

    WithMaskPositions.__name__ = WithMaskPositions.__qualname__ = base.__name__
    model.__class__ = WithMaskPositions
    return model


def cache_shapes(model, device):
    """Each layer's [kv_heads, head_dim] in the step's cache, read off the cache transformers'
    own forward fills on two tokens (its `DynamicCache`, or GPT-2's tuples)."""
    ids = torch.full((1, 2), 3, device=device)
    with torch.no_grad():
        past = type(model).__mro__[1].forward(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)[1]
    keys = list(past.key_cache) if hasattr(past, "key_cache") else [k for k, _ in past]
    return [[int(k.shape[1]), int(k.shape[3])] for k in keys]


def cache_buffers(shapes, batch, capacity, dtype, device, filled=0):
    """The step's key and value buffers (every layer's keys, then every layer's values) with
    room for `capacity` tokens, the first `filled` random (the graph must not care what they
    hold), the rest NaN: a step that reads past what is filled shows in its logits."""
    out = [torch.full((batch, kvh, capacity, hd), float("nan"), dtype=dtype, device=device) for kvh, hd in shapes * 2]
    for t in out:
        t[:, :, :filled] = torch.randn(batch, t.shape[1], filled, t.shape[3], dtype=dtype, device=device)
    return out


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, normalizers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    tok.train([str(HERE / "corpus.txt")], trainer)
    tok.save(str(path))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tolerance(device, dtype):
    """How far the traced model may be from the eager one, and a padded row from the same row
    alone, relative to the largest logit magnitude compared (at least 1): in float32 1e-5 on the
    cpu (about 80 units in the last place: sums over thousands of products, reordered by other
    matmul shapes) and 1e-3 on a GPU (TF32 kernels); in half precision a few units in the last
    place of bf16 / fp16 (2^-7 / 2^-10, times 4)."""
    if dtype == torch.float32:
        return 1e-5 if str(device) == "cpu" else 1e-3
    return 4 * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)


def relative_diff(want, got, mask=None):
    """max |want - got| over `mask` (boolean, default everything), divided by the largest
    |want| there (at least 1)."""
    want, got = want.float(), got.float()
    if mask is not None:
        want, got = want[mask], got[mask]
    worst = (want - got).abs().max().item() / max(want.abs().max().item(), 1.0)
    return worst if worst == worst else float("inf")  # NaN (a value read from nowhere) fails every bound


def where(model, filename, lineno):
    """The module classes of `model` whose forward holds `filename:lineno`, with a path of each."""
    import inspect
    found = {}
    for path, m in model.named_modules():
        cls = type(m)
        for klass in cls.__mro__:
            fwd = klass.__dict__.get("forward")
            if fwd is None:
                continue
            try:
                lines, start = inspect.getsourcelines(fwd)
                if inspect.getsourcefile(fwd) == filename and start <= lineno < start + len(lines):
                    found.setdefault(klass.__name__, path or "(the top module)")
            except (OSError, TypeError):
                pass
            break
    return ", ".join(f"{k} (e.g. {v})" for k, v in found.items()) or "a function outside any module's forward"


def untraceable(model, recorded, what):
    """The error for a trace that is not right for every input: the tracer's warnings name the
    places where the graph was specialised to the example input (data-dependent control flow,
    Python values taken from tensors)."""
    places = []
    for w in recorded:
        line = f"  {where(model, w.filename, w.lineno)} at {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}"
        if line not in places:
            places.append(line)
    detail = "\n".join(places) if places else "  (the tracer gave no warning: the graph was specialised silently)"
    return (f"export: {what}: the traced graph is not right for every input, so hookrs cannot run this model. "
            f"Where the trace depends on the example input:\n{detail}")


class KeepInputsOutside:
    """While tracing, each module's tensor inputs keep the graph value they had before the call.

    An op that returns its input itself (`x.float()` on a float32 tensor, a slice over a whole
    dimension) makes the tracer bind that tensor to the op's output *inside* the module. Every
    later use outside the module then reads it from there, so the tracer adds it to the module's
    outputs: Gemma 3's global-attention layers returned (attention mask, hidden states), its
    norms (normed, input). Such extra outputs break `.output` (easyroutine's first tensor) and
    the module's meaning. Rebinding each input to its value from before the call (unless the
    module changed it in place: its version counter moved, or returns it: dropout in eval) keeps
    every module's outputs the ones its forward returns. The values are the same tensors, so the graph computes the same.
    """

    def __init__(self, model):
        self.model, self.handles, self.saved = model, [], {}

    @staticmethod
    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from KeepInputsOutside.tensors(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from KeepInputsOutside.tensors(y)

    def before(self, module, args, kwargs):
        if torch._C._get_tracing_state() is None:
            return
        saved = []
        for t in self.tensors((args, kwargs)):
            try:
                saved.append((t, torch._C._get_value_trace(t), t._version))
            except RuntimeError:
                pass  # not traced yet (a constant): nothing to keep
        self.saved.setdefault(id(module), []).append(saved)

    def after(self, module, args, kwargs, output):
        stack = self.saved.get(id(module))
        if not stack:
            return
        returned = {id(t) for t in self.tensors(output)}
        for t, value, version in stack.pop():
            # an input the module returns itself (dropout in eval) is its output: keep that
            if t._version == version and id(t) not in returned:
                torch._C._set_value_trace(t, value)

    def __enter__(self):
        for m in self.model.modules():
            if m is self.model:
                continue
            self.handles.append(m.register_forward_pre_hook(self.before, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self.after, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def check_step(model, traced, vocab, device, tol):
    """The step graph, run as generation runs it, gives the last logits of the full forward over
    the text so far at every step: a left-padded batch is prefilled in two pieces (4 tokens with
    no past, then 5 more after them: a row that is all padding in the first piece, and a piece
    of several tokens after a past), and then generates one token at a time with the keys and
    values it returned. 12 steps after 9 tokens pass every sliding window of the tiny models."""
    dtype = next(model.parameters()).dtype
    ids = torch.randint(3, vocab, (3, 9)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    # room for 9 + 12 tokens and 3 more, never filled: NaN there shows in the logits if read
    cache = cache_buffers(cache_shapes(model, device), 3, 24, dtype, device)
    worst = 0.0
    try:
        for lo, hi in ((0, 4), (4, 9)):
            out = traced.step(ids[:, lo:hi], mask[:, :hi], *cache)
            real = mask[:, hi - 1].bool()  # the first piece's last column is padding in row 0
            worst = max(worst, relative_diff(model(ids[:, :hi], attention_mask=mask[:, :hi])[0][real, -1:], out[0][real]))
        for _ in range(12):
            nxt = out[0][:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = traced.step(nxt, mask, *cache)
            worst = max(worst, relative_diff(model(ids, attention_mask=mask)[0][:, -1:], out[0]))
    except Exception as e:  # noqa: BLE001 - any failure of the graph on a new input
        raise SystemExit(f"export: the cached step graph fails on a prefill or a later step ({str(e).splitlines()[0]})")
    if worst > tol:
        raise SystemExit(f"export: the cached step graph differs from the full forward by {worst:.3g} of the largest logit (allowed: {tol:.3g})")


def trace(model, vocab, device="cpu"):
    """Traces `forward(input_ids, attention_mask)` and the cached `step` (see
    `with_mask_positions`) into one module: the weights are stored once, and each submodule
    holds a graph for each (TorchScript names them forward and forward1)."""
    model.eval()
    dtype = next(model.parameters()).dtype
    ids = torch.randint(3, vocab, (2, 7)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so the mask path is traced
    step_ids = torch.randint(3, vocab, (2, 1)).to(device)
    step_mask = torch.ones(2, 6, dtype=torch.long, device=device)
    step_mask[1, :2] = 0
    with torch.no_grad():
        step_past = cache_buffers(cache_shapes(model, device), 2, 8, dtype, device, filled=5)
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            with KeepInputsOutside(model):
                traced = torch.jit.trace_module(model, {"forward": (ids, mask), "step": (step_ids, step_mask, *step_past)},
                                                check_trace=False, strict=False)
        recorded = [w for w in recorded if issubclass(w.category, torch.jit.TracerWarning)]
        eager = model(ids, attention_mask=mask)[0]
        got = traced(ids, mask)[0]
        tol = tolerance(device, dtype)
        diff = relative_diff(eager, got)
        if diff > tol:
            raise SystemExit(f"export: the traced model differs from the eager one by {diff:.3g} of the largest logit (allowed: {tol:.3g})")
        # another batch size, length and padding: a graph specialised to the example input
        # (control flow on tensor values, sizes frozen as constants) fails here
        ids2 = torch.randint(3, vocab, (3, 11)).to(device)
        mask2 = torch.ones_like(ids2)
        mask2[0, :4] = 0
        mask2[2, :1] = 0
        eager2 = model(ids2, attention_mask=mask2)[0]
        try:
            got2 = traced(ids2, mask2)[0]
        except Exception as e:  # noqa: BLE001 - any failure of the graph on a new input
            raise SystemExit(untraceable(model, recorded, f"the traced model fails on a batch of another shape ({str(e).splitlines()[0]})"))
        diff = relative_diff(eager2, got2, mask2.bool())
        if diff > tol:
            raise SystemExit(untraceable(model, recorded, f"on a batch of another shape the traced model differs from the eager one by {diff:.3g} "
                                                          f"of the largest logit (allowed: {tol:.3g})"))
        # the left-padded row gives what its tokens give alone
        alone = traced(ids[1:, 2:], mask[1:, 2:])[0]
        diff = relative_diff(alone, got[1:, 2:])
        if diff > tol:
            raise SystemExit(f"export: a left-padded example differs from the same example alone by {diff:.3g} of the largest logit "
                             f"(allowed: {tol:.3g})")
        check_step(model, traced, vocab, device, tol)
    return traced


def gguf_source(source):
    """(directory, file name) when `source` is a .gguf file or a directory holding one .gguf
    and no config.json; None for a save_pretrained directory or a hub name. A GGUF whose
    architecture transformers' GGUF loader cannot read is refused here, by name."""
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        d, name = p.parent, p.name
    elif p.is_dir() and not (p / "config.json").exists():
        found = sorted(x.name for x in p.glob("*.gguf"))
        if not found:
            return None
        if len(found) > 1:
            raise SystemExit(f"export: {source} holds {len(found)} .gguf files ({', '.join(found)}): name one of them")
        d, name = p, found[0]
    elif p.suffix == ".gguf":
        raise SystemExit(f"export: {source}: no such file")
    else:
        return None
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(d / name))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - a file that is not GGUF
        raise SystemExit(f"export: {d / name} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in readable:
        ours = sorted(a for a in readable if MODEL_TYPES.get(a) in LAYOUTS)
        raise SystemExit(f"export: {d / name} holds a {arch!r} model, which transformers' GGUF loader cannot read (it reads "
                         f"{', '.join(readable)}; hookrs supports {', '.join(ours)} of them). Convert it to a save_pretrained "
                         f"directory another way and export that")
    return d, name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a save_pretrained directory or a hub name")
    ap.add_argument("--random", choices=sorted(TINY), help="build a tiny random model of this family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="a HF config.json setting the random model's sizes")
    ap.add_argument("--device", default="cpu", help="trace on this device: cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the weights' dtype (default float32)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        ap.error(f"--device {a.device!r}: {e}; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device is available here; trace on the cpu (the archive runs on any device)")
    if (a.random is None) == (a.source is None):
        ap.error("give exactly one of --random FAMILY or SOURCE")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    if a.random:
        overrides = {}
        if a.config:
            overrides = json.loads(Path(a.config).read_text())
            for k in ("architectures", "model_type", "transformers_version", "torch_dtype"):
                overrides.pop(k, None)
        cfg = config_for(a.random, overrides)
        cfg.torchscript, cfg.use_cache = True, False
        cfg._attn_implementation = "eager"
        model = model_for_config(cfg).to(DTYPES[a.dtype])
        family, source = a.random, f"random:{a.random}:seed={a.seed}"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        gguf = gguf_source(a.source)
        load_from = dict(pretrained_model_name_or_path=str(gguf[0]), gguf_file=gguf[1]) if gguf else dict(pretrained_model_name_or_path=a.source)
        if gguf:
            print(f"export: dequantizing {gguf[0] / gguf[1]} to {a.dtype} with transformers' GGUF loader (a minute for 100M parameters)",
                  file=sys.stderr)
        cfg = AutoConfig.from_pretrained(**load_from)
        family = MODEL_TYPES.get(cfg.model_type, cfg.model_type)
        if family not in LAYOUTS:
            raise SystemExit(f"export: no layout for model_type {cfg.model_type!r}; hookrs knows: {', '.join(sorted(MODEL_TYPES))}")
        model = AutoModelForCausalLM.from_pretrained(**load_from, torchscript=True, use_cache=False, attn_implementation="eager",
                                                     torch_dtype=DTYPES[a.dtype])
        source = str(gguf[0] / gguf[1]) if gguf else a.source
    architecture = type(model).__name__
    if family not in LAYOUTS:
        raise SystemExit(f"export: no layout for model_type {family!r}; hookrs knows: {', '.join(sorted(MODEL_TYPES))}")
    model = with_mask_positions(model.to(device))
    traced = trace(model, model.config.vocab_size, device)
    desc = description(model, family, source, architecture)
    desc["dtype"] = a.dtype
    desc["step"] = {"method": "step", "cache": cache_shapes(model, device), "logits": "last", "writes_cache": True}
    tmp = out.with_suffix(".pt.tmp")
    torch.jit.save(traced, str(tmp), _extra_files={"hookrs.json": json.dumps(desc)})
    tmp.replace(out)
    tok_out = out.with_name(out.stem + ".tokenizer.json")
    if a.random:
        word_tokenizer(tok_out)
    else:
        src = Path(a.source)
        if not gguf and (src / "tokenizer.json").exists():
            shutil.copy(src / "tokenizer.json", tok_out)
        else:
            try:
                from transformers import AutoTokenizer
                t = AutoTokenizer.from_pretrained(**load_from)
                if getattr(t, "backend_tokenizer", None) is None:
                    raise ValueError("it has no fast (tokenizers) form")
                t.backend_tokenizer.save(str(tok_out))
            except Exception as e:
                print(f"export: no tokenizer.json for {a.source} ({e}); use --input-ids", file=sys.stderr)
    print(f"export: {desc['architecture']} ({desc['num_hidden_layers']} layers, {desc['num_attention_heads']} heads / "
          f"{desc['num_key_value_heads']} kv, head_dim {desc['head_dim']}) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
