"""hookrs on a real checkpoint against transformers, through the `hookrs` command as a user runs it.

    real_checks.py HOOKRS_BINARY HF_DIR EXPORT.pt WORK_DIR

Checks (each printed with its numbers; the last line counts them):
  tokenizer   `hookrs tokenize --prompts` equals `AutoTokenizer(text).input_ids` on 200+ varied
              strings: prose, code, unicode, runs of whitespace, the chat template with its special
              tokens, the empty string and very long strings
  generate    greedy `hookrs generate --text` equals HF `generate(do_sample=False)` token for token
  lens        `hookrs lens` at the last layer: top token = HF's argmax and its probability within
              1e-5 of HF's softmax, at every position
  attribute   `hookrs attribute`: the model's logit difference equals HF's within 1e-5 of the
              largest logit, and the parts sum to it within 1e-4 of it
  patch       `hookrs patch` (cells batched, each layer's forked from one corrupted run) of
              resid_out (layers x positions) and heads (layers x heads) on an IOI pair: every
              cell's logit difference equals plain PyTorch hooks on the eager model within 1e-5
              of the largest logit
"""
import json
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hookrs, hf_dir, pt, work = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
work.mkdir(parents=True, exist_ok=True)
tok = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
passed, failed = 0, 0


def check(name, ok, detail):
    global passed, failed
    passed, failed = passed + bool(ok), failed + (not ok)
    print(f"real {name}: {'ok' if ok else 'FAIL'}: {detail}", flush=True)


def cli(*args):
    r = subprocess.run([hookrs, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"hookrs {' '.join(args[:3])} ... failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def strings():
    """Varied text: prose and docs (the docstrings of Python's own standard library, PSF
    licence), code, unicode, whitespace, the chat template, edge cases."""
    import argparse, collections, contextlib, csv, email, io, json as j, logging, pathlib, re, string, textwrap, unittest
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # the Zen of Python, printed on import
    out = []
    for mod in (argparse, collections, csv, email, j, logging, pathlib, re, string, textwrap, subprocess, unittest, warnings):
        doc = mod.__doc__ or ""
        out += [line for line in doc.splitlines() if line.strip()][:25]
    zen = "".join(this.d.get(c, c) for c in this.s)
    out += zen.splitlines()
    out += [
        "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "fn main() { println!(\"{}\", 1 + 1); }",
        "SELECT name, COUNT(*) FROM users GROUP BY name;", "<div class=\"a\">&amp;</div>", "x = {'a': [1, 2.5e-3, None]}",
        "naïve café résumé", "日本語のテキストです。", "中文分词测试", "한국어 문장", "Ελληνικά και русский текст", "العربية نص",
        "emoji 🤖🚀👩‍👩‍👧 and flags 🇫🇷", "e\u0301 combining, zero\u200bwidth", "ℕ ⊆ ℤ ⊂ ℚ, ∀x ∃y", "tab\tseparated\tvalues",
        "a  b   c    d", "   leading spaces", "trailing spaces   ", "\n\nnewlines\n\n\n", "\t\t\t", " ", "  ", "\n", "",
        "line one\r\nline two", "ALL CAPS SHOUTING", "MiXeD cAsE", "12345678901234567890", "3.14159 2.71828 -0.5 +1e10",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\System32", "/usr/local/bin/python3",
        "The quick brown fox jumps over the lazy dog. " * 200,
        "".join(chr(0x4e00 + i) for i in range(500)),
        "word " * 1500,
    ]
    for msgs in ([{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}],
                 [{"role": "user", "content": "Write code:\n```python\nprint('hi')\n```"}]):
        out.append(tok.apply_chat_template(msgs, tokenize=False))
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    out += ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "text <|im_end|> more", "<|im_start|><|im_start|>"]
    return out


# --- tokenizer --------------------------------------------------------------------------------
texts = strings()
prompts = work / "strings.jsonl"
prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
got = [json.loads(line)["ids"] for line in cli("tokenize", "--model", pt, "--prompts", str(prompts), "--json").splitlines()]
want = [tok(t).input_ids for t in texts]
bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
check("tokenizer", len(got) == len(want) and not bad,
      f"{len(texts) - len(bad)} of {len(texts)} strings tokenize as transformers does"
      + (f"; first difference: {texts[bad[0]][:60]!r}: hookrs {got[bad[0]][:12]}, transformers {want[bad[0]][:12]}" if bad else "")
      + ("" if len(got) == len(want) else f"; hookrs returned {len(got)} results"))

# --- greedy generation ------------------------------------------------------------------------
eos = model.generation_config.eos_token_id
eos = eos[0] if isinstance(eos, list) else eos
for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    hf_new = hf[0, ids.shape[1]:].tolist()
    args = ["generate", "--model", pt, "--text", prompt, "--max-new-tokens", "24", "--json"] + (["--eos", str(eos)] if eos is not None else [])
    ours = json.loads(cli(*args).strip().splitlines()[-1])["new_ids"]
    check("generate", ours == hf_new, f"{prompt!r}: {len(ours)} tokens {'equal HF generate' if ours == hf_new else f'differ: hookrs {ours}, HF {hf_new}'}"
          f" ({tok.decode(ours)!r})")

# --- lens at the last layer vs the logits -----------------------------------------------------
text = "The Eiffel Tower is in the city of"
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
probs = logits.softmax(-1)
cli("lens", "--model", pt, "--text", text, "--out", str(work / "lens"))
lens = json.loads((work / "lens.json").read_text())
top_last = lens["top_token_ids"][-1]
p_last = lens["values"][-1]
same_top = top_last == logits.argmax(-1).tolist()
p_err = max(abs(p - probs[i, t].item()) for i, (p, t) in enumerate(zip(p_last, top_last)))
check("lens", same_top and p_err < 1e-5, f"last layer: top tokens {'equal' if same_top else 'differ from'} HF's argmax at all {len(top_last)} positions; "
      f"probabilities within {p_err:.1e} of HF's softmax")

# --- direct logit attribution -----------------------------------------------------------------
text, answer, wrong = "The capital of France is", " Paris", " London"
ids = tok(text, return_tensors="pt").input_ids
a, w = tok(answer, add_special_tokens=False).input_ids, tok(wrong, add_special_tokens=False).input_ids
with torch.no_grad():
    last = model(ids).logits[0, -1]
cli("attribute", "--model", pt, "--text", text, "--answer", answer, "--wrong", wrong, "--heads", "--out", str(work / "attribution"))
attr = json.loads((work / "attribution.json").read_text())
hf_diff = (last[a[0]] - last[w[0]]).item()
scale = max(last.abs().max().item(), 1.0)
model_err = abs(attr["model_logit_diff"] - hf_diff) / scale
sum_err = abs(attr["sum"] - attr["model_logit_diff"]) / scale
check("attribute", model_err < 1e-5 and sum_err < 1e-4,
      f"logit({answer}) - logit({wrong}) = {attr['model_logit_diff']:.4f} (HF {hf_diff:.4f}; {model_err:.1e} of the largest logit); "
      f"{len(attr['parts'])} parts sum to {attr['sum']:.4f} ({sum_err:.1e})")

# --- activation patching against plain PyTorch hooks -------------------------------------------
import bench_patch  # beside this script: the PyTorch side of `cargo xtask bench patch`

clean, corrupted = "When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to"
c_ids, x_ids = tok(clean).input_ids, tok(corrupted).input_ids
a, w = tok(" Mary", add_special_tokens=False).input_ids[0], tok(" John", add_special_tokens=False).input_ids[0]
with torch.no_grad():
    scale = max(model(torch.tensor([x_ids])).logits[0, -1].abs().max().item(), 1.0)
for component in ["resid_out", "heads"]:
    cli("patch", "--model", pt, "--clean-ids", json.dumps(c_ids), "--corrupted-ids", json.dumps(x_ids), "--answer", " Mary", "--wrong", " John",
        "--component", component, "--positions", "all", "--out", str(work / f"patch-{component}"))
    ours = torch.tensor(json.loads((work / f"patch-{component}.json").read_text())["metric_means"], dtype=torch.float64)
    theirs = bench_patch.sweep_batched_by_layer(model, c_ids, x_ids, a, w, component == "heads")
    err = (ours - theirs).abs().max().item() / scale if ours.shape == theirs.shape else float("inf")
    check("patch", err < 1e-5, f"{component}: {tuple(ours.shape)} cells (hookrs {tuple(ours.shape)}, PyTorch {tuple(theirs.shape)}) within {err:.1e} "
          f"of the largest logit ({scale:.1f}) of plain PyTorch hooks batched by layer")

print(f"real checks: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
