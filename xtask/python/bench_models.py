"""easyroutine's side of `cargo xtask bench models` (the anchor measurement of
../shared/anchors/easyroutine_full_extraction.py on the same random llama the Rust side loads):
plain eager forward, and easyroutine's full extraction (resid in/mid/out of every layer,
all-head attention patterns, head q/k/v) on the eager model, B=4, S=128, 2 threads.
Prints one JSON line. Usage: python bench_models.py CONFIG.json SEED [BATCH SEQ DEVICE]
                             python bench_models.py HF_DIR - [BATCH SEQ DEVICE]   (a real checkpoint's
                             save_pretrained directory, e.g. the source of a `--model` export)
"""
import json, sys, time, warnings
from functools import partial
from pathlib import Path
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))
import torch
import export
from easyroutine.interpretability.hooks import save_resid_hook, attention_pattern_head, query_key_value_hook
from easyroutine.interpretability.activation_cache import ActivationCache
from easyroutine.interpretability.module_wrappers.manager import ModuleWrapperManager

torch.set_num_threads(2)
B = int(sys.argv[3]) if len(sys.argv) > 3 else 4
S = int(sys.argv[4]) if len(sys.argv) > 4 else 128
dev = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
if Path(sys.argv[1]).is_dir():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torchscript=True, use_cache=False, attn_implementation="eager",
                                             torch_dtype=torch.float32).eval().to(dev)
    cfg = m.config
else:
    torch.manual_seed(int(sys.argv[2]))
    cfg = export.config_for("llama", json.loads(Path(sys.argv[1]).read_text()))
    cfg.torchscript, cfg.use_cache = True, False
    cfg._attn_implementation = "eager"
    m = export.model_for_config(cfg).float().eval().to(dev)
L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
D = cfg.hidden_size // H
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(f, n=8):
    f(); sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def pre(fn):
    return lambda mod, args, kwargs: fn(mod, args, kwargs, None)


with torch.no_grad():
    base = timeit(lambda: m(ids))
    ModuleWrapperManager(model=m).substitute_attention_module(m)
    cache = ActivationCache()
    tok = [tuple(range(S))]
    for i in range(L):
        lay = m.model.layers[i]
        lay.register_forward_hook(partial(save_resid_hook, cache=cache, cache_key=f"resid_out_{i}", token_indexes=tok), with_kwargs=True)
        lay.register_forward_pre_hook(pre(partial(save_resid_hook, cache=cache, cache_key=f"resid_in_{i}", token_indexes=tok)), with_kwargs=True)
        lay.post_attention_layernorm.register_forward_pre_hook(pre(partial(save_resid_hook, cache=cache, cache_key=f"resid_mid_{i}", token_indexes=tok)), with_kwargs=True)
        lay.self_attn.attention_matrix_hook.register_forward_hook(partial(attention_pattern_head, token_indexes=tok, layer=i, cache=cache), with_kwargs=True)
        for nm, key in (("q_proj", "head_queries_"), ("k_proj", "head_keys_"), ("v_proj", "head_values_")):
            getattr(lay.self_attn, nm).register_forward_hook(partial(query_key_value_hook, cache=cache, cache_key=key, token_indexes=tok, layer=i,
                                                                     head_dim=D, num_key_value_groups=H // KV, num_attention_heads=H), with_kwargs=True)
    full = timeit(lambda: m(ids))
print(json.dumps({"eager_plain_ms": base * 1000, "easyroutine_full_ms": full * 1000, "easyroutine_keys": len(cache.keys())}))
