"""Export a Hugging Face causal LM as TorchScript for hookrs.

    export.py --random FAMILY [--seed N] [--config FILE] --out FILE.pt
    export.py SOURCE --out FILE.pt          (SOURCE: a save_pretrained directory or a hub name)
    ... [--device cpu|cuda|cuda:N]          (the device to trace on; default cpu)

An archive runs on any device whatever device it was traced on: hookrs points the graphs'
device constants at the device it loads the model on.

The model is traced with torchscript=True, use_cache=False, attn_implementation="eager" on
inputs (input_ids, attention_mask), so the module tree survives (each submodule keeps its own
forward graph) and padded batches work. A JSON description is stored inside the archive as the
extra file `hookrs.json`: architecture, sizes, easyroutine's component templates. Random models
get a small word-level tokenizer.json trained on xtask/python/corpus.txt; real models get their
own tokenizer files copied beside the .pt.
"""
import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch

HERE = Path(__file__).parent

# Tiny random models: GQA in llama, mistral and qwen2; q/k/v bias in qwen2.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64),
    "qwen2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2),
    "gemma3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                   sliding_window=64, query_pre_attn_scalar=16),
}
VOCAB = 256


def config_for(family, overrides):
    from transformers import AutoConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}[family]
    kw = dict(vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(TINY[family])
    kw.update(overrides)
    return cls(**kw)


def model_for_config(cfg):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM
    if cfg.model_type in ("gemma3_text", "gemma3"):
        return Gemma3ForCausalLM(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def templates(prefix=""):
    p = prefix
    return {
        "residual_stream_input_hook_name": f"{p}model.layers[{{}}].input",
        "residual_stream_hook_name": f"{p}model.layers[{{}}].output",
        "intermediate_stream_hook_name": f"{p}model.layers[{{}}].post_attention_layernorm.output",
        "residual_stream_input_post_layernorm_hook_name": f"{p}model.layers[{{}}].self_attn.input",
        "head_query_hook_name": f"{p}model.layers[{{}}].self_attn.q_proj.output",
        "head_key_hook_name": f"{p}model.layers[{{}}].self_attn.k_proj.output",
        "head_value_hook_name": f"{p}model.layers[{{}}].self_attn.v_proj.output",
        "attn_in_hook_name": f"{p}model.layers[{{}}].self_attn.input",
        "attn_out_hook_name": f"{p}model.layers[{{}}].self_attn.o_proj.output",
        "attn_o_proj_input_hook_name": f"{p}model.layers[{{}}].self_attn.o_proj.input",
        "attn_matrix_hook_name": f"{p}model.layers[{{}}].self_attn.attention_matrix_hook.output",
        "attn_matrix_pre_softmax_hook_name": f"{p}model.layers[{{}}].self_attn.attention_matrix_pre_softmax_hook.output",
        "mlp_out_hook_name": f"{p}model.layers[{{}}].mlp.down_proj.output",
        "last_layernorm_hook_name": f"{p}model.norm.input",
        "embed_tokens": f"{p}model.embed_tokens.output",
        "attn_out_proj_weight": f"{p}model.layers.{{}}.self_attn.o_proj.weight",
        "attn_out_proj_bias": f"{p}model.layers.{{}}.self_attn.o_proj.bias",
        "unembed_matrix": f"{p}lm_head.weight",
        "last_layernorm": f"{p}model.norm",
    }


def description(model, family, source):
    c = model.config
    heads = c.num_attention_heads
    return {
        "hookrs_description_version": 1,
        "architecture": type(model).__name__,
        "family": family,
        "source": source,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", heads) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "has_qkv_bias": bool(getattr(c, "attention_bias", False) or family == "qwen2"),
        "has_o_proj_bias": bool(getattr(c, "attention_bias", False)),
        "layernorm_type": "RMS",
        "inputs": ["input_ids", "attention_mask"],
        "templates": templates(),
    }


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, normalizers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    tok.train([str(HERE / "corpus.txt")], trainer)
    tok.save(str(path))


def trace(model, vocab, device="cpu"):
    model.eval()
    ids = torch.randint(3, vocab, (2, 7)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so the mask path is traced
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, mask), check_trace=False, strict=False)
        eager = model(ids, attention_mask=mask)[0]
        got = traced(ids, mask)[0]
        diff = (eager - got).abs().max().item()
        if diff > (1e-5 if str(device) == "cpu" else 1e-3):
            raise SystemExit(f"export: the traced model differs from the eager one by {diff}")
    return traced


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a save_pretrained directory or a hub name")
    ap.add_argument("--random", choices=sorted(TINY), help="build a tiny random model of this family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="a HF config.json setting the random model's sizes")
    ap.add_argument("--device", default="cpu", help="trace on this device: cpu, cuda or cuda:N (default cpu)")
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
        model = model_for_config(cfg).float()
        family, source = a.random, f"random:{a.random}:seed={a.seed}"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.from_pretrained(a.source)
        model = AutoModelForCausalLM.from_pretrained(a.source, torchscript=True, use_cache=False, attn_implementation="eager",
                                                     torch_dtype=torch.float32)
        family, source = cfg.model_type, a.source
    model = model.to(device)
    traced = trace(model, model.config.vocab_size, device)
    desc = description(model, family, source)
    tmp = out.with_suffix(".pt.tmp")
    torch.jit.save(traced, str(tmp), _extra_files={"hookrs.json": json.dumps(desc)})
    tmp.replace(out)
    tok_out = out.with_name(out.stem + ".tokenizer.json")
    if a.random:
        word_tokenizer(tok_out)
    else:
        src = Path(a.source)
        if (src / "tokenizer.json").exists():
            shutil.copy(src / "tokenizer.json", tok_out)
        else:
            try:
                from transformers import AutoTokenizer
                t = AutoTokenizer.from_pretrained(a.source)
                if getattr(t, "backend_tokenizer", None) is not None:
                    t.backend_tokenizer.save(str(tok_out))
            except Exception as e:
                print(f"export: no tokenizer.json for {a.source} ({e}); use --input-ids", file=sys.stderr)
    print(f"export: {desc['architecture']} ({desc['num_hidden_layers']} layers, {desc['num_attention_heads']} heads / "
          f"{desc['num_key_value_heads']} kv, head_dim {desc['head_dim']}) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
