"""Generation with a KV cache, `hookrs generate` side by side with transformers' `generate` (its
own KV cache) on the same model, CPU, the same threads, greedy, in one run:

- tokens/s at batch 1 and batch 8 (32 new tokens after a 23-token prompt), and whether the
  tokens are the same;
- the cost of one new token after 16 and after 1,024 prompt tokens (batch 1): the time of 33
  new tokens less the time of 1, over 32;
- peak RSS of `hookrs generate` (1,024 prompt tokens + 32 new, batch 8), less the peak RSS of
  the same command on a model of almost no size (a 2-layer, 64-wide random llama: libtorch,
  its thread pools and the program itself), against the model file plus the KV cache the run
  needs;
- a steering vector at every forward (`--steer-at all`) against no hooks, batch 8.

`hookrs generate` prints the seconds of its generation (after the model is loaded); the HF side
times its `generate` call the same way. Each time is the best of 3 runs (7 for the steering
pair, whose target is a 5 % difference), the two sides alternating (the machine is shared: the
best run is the one least disturbed).

Usage: bench_generate.py HOOKRS MODEL.pt (--hf DIR | --random-config FILE.json) NAME  ->  a markdown table
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import export  # noqa: E402

THREADS = 2


def hf_model(a):
    if a.hf:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(a.hf, torch_dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)  # what export.py --random llama --seed 0 builds
    overrides = json.loads(Path(a.random_config).read_text())
    for k in ("architectures", "model_type", "transformers_version", "torch_dtype"):
        overrides.pop(k, None)
    cfg = export.config_for("llama", overrides)
    cfg._attn_implementation = "eager"
    return export.model_for_config(cfg).eval()


def prompts(vocab, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def hf_generate(model, rows, new):
    ids = torch.tensor(rows)
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        s = time.perf_counter() - t
    return s, out[:, ids.shape[1]:].tolist()


REPS = 3
STEER_REPS = 7


def best(f):
    """The best of REPS runs of f() -> (seconds, tokens)."""
    runs = [f() for _ in range(REPS)]
    return min(r[0] for r in runs), runs[0][1]


def hookrs(a, work, rows, new, extra=(), peak=False):
    p, o = work / "prompts.jsonl", work / "out.jsonl"
    p.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    argv = [a.hookrs, "generate", "--model", a.model, "--prompts", str(p), "--out", str(o), "--batch-size", str(len(rows)),
            "--max-new-tokens", str(new), *extra]
    r = subprocess.run(argv, capture_output=True, text=True, env={"OMP_NUM_THREADS": str(THREADS), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise SystemExit(f"bench generate: {' '.join(argv)} failed:\n{r.stderr}")
    s = float(re.search(r"new tokens in ([0-9.]+) s", r.stdout).group(1))
    tokens = [json.loads(line)["new_ids"] for line in o.read_text().splitlines()]
    return s, tokens


def peak_mb(argv):
    code = "import resource, subprocess, sys\nsubprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\nprint(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env={"OMP_NUM_THREADS": str(THREADS), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise SystemExit(f"bench generate: {' '.join(argv)} failed:\n{r.stderr}")
    return int(r.stdout.strip()) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hookrs")
    ap.add_argument("model")
    ap.add_argument("name")
    ap.add_argument("--hf")
    ap.add_argument("--random-config")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    model = hf_model(a)
    c = model.config
    vocab, layers = c.vocab_size, c.num_hidden_layers
    kvh, hd = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    work = Path(tempfile.mkdtemp())
    print(f"### {a.name} ({layers} layers, d_model {c.hidden_size}), CPU, {THREADS} threads, greedy\n")
    print("| measure | transformers generate | hookrs generate | hookrs / HF |")
    print("|---|---|---|---|")
    same = True
    for batch in (1, 8):
        rows = prompts(vocab, batch, 23, batch)
        hookrs(a, work, rows, 2)  # warm the page cache
        hs, ht, rs, rt = 1e9, None, 1e9, None
        for _ in range(REPS):
            h = hf_generate(model, rows, 32)
            r = hookrs(a, work, rows, 32)
            hs, ht, rs, rt = min(hs, h[0]), h[1], min(rs, r[0]), r[1]
        same &= ht == rt
        print(f"| tokens/s, batch {batch}, 32 new after 23 | {batch * 32 / hs:.1f} | {batch * 32 / rs:.1f} | {hs / rs:.2f}x |")
    for length in (16, 1024):
        rows = prompts(vocab, 1, length, length)
        costs = []
        for side in ("hf", "hookrs"):
            if side == "hf":
                t1, t33 = best(lambda: hf_generate(model, rows, 1))[0], best(lambda: hf_generate(model, rows, 33))[0]
            else:
                t1, t33 = best(lambda: hookrs(a, work, rows, 1))[0], best(lambda: hookrs(a, work, rows, 33))[0]
            costs.append((t33 - t1) / 32 * 1000)
        print(f"| ms per new token after {length} | {costs[0]:.1f} | {costs[1]:.1f} | {costs[0] / costs[1]:.2f}x faster |")
        if length == 16:
            short = costs[1]
        else:
            print(f"| hookrs: cost after 1024 / after 16 | | {costs[1] / short:.2f}x | |")
    rows = prompts(vocab, 8, 1024, 7)
    p = work / "long.jsonl"
    p.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tiny = work / "tiny.pt"
    subprocess.run([sys.executable, str(HERE / "export.py"), "--random", "llama", "--out", str(tiny)], check=True, capture_output=True)
    (work / "short.jsonl").write_text(json.dumps({"text": [5, 6]}) + "\n")
    base = peak_mb([a.hookrs, "generate", "--model", str(tiny), "--prompts", str(work / "short.jsonl"), "--out", str(work / "short.out.jsonl"),
                    "--batch-size", "8", "--max-new-tokens", "1"])
    run = peak_mb([a.hookrs, "generate", "--model", a.model, "--prompts", str(p), "--out", str(work / "long.out.jsonl"), "--batch-size", "8", "--max-new-tokens", "32"])
    model_mb = Path(a.model).stat().st_size / 1e6 / 1.048576
    kv_mb = 2 * layers * 8 * kvh * (1024 + 32) * hd * 4 / 2**20
    print(f"| peak RSS, batch 8, 1024 + 32 tokens (less {base:.0f} MB of the same on a tiny model) | | {run - base:.0f} MB | {(run - base) / (model_mb + kv_mb):.2f}x of model {model_mb:.0f} MB + KV {kv_mb:.0f} MB |")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file({"v": torch.randn(c.hidden_size)}, str(work / "v.safetensors"))
    rows = prompts(vocab, 8, 23, 8)
    steer = ["--steer", str(work / "v.safetensors"), "--layer", str(layers // 2), "--steer-at", "all"]
    times = {False: [], True: []}  # by whether the run steers
    for i in range(STEER_REPS):  # a 5 % difference wants more runs than the others; who goes first alternates
        for steering in (False, True) if i % 2 == 0 else (True, False):
            times[steering].append(hookrs(a, work, rows, 32, steer if steering else ())[0])
    plain, steered = min(times[False]), min(times[True])
    print(f"| steering vector at every forward / no hooks, batch 8 | | {steered:.3f} s / {plain:.3f} s | {steered / plain:.3f}x |")
    print(f"\ngreedy tokens equal to transformers' generate at batch 1 and 8: {'yes' if same else 'NO'}\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
