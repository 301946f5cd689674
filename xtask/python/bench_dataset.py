"""`cargo xtask bench dataset`: hookrs extract end to end against easyroutine's extraction loop.

    bench_dataset.py HOOKRS_BIN MODEL.pt CONFIG.json WORKDIR [--prompts N] [--scale K] [--rss-only]
                     [--hf DIR]     (a real model: easyroutine loads DIR, CONFIG.json is DIR/config.json,
                                     and the prompts are real text: see real_prompts)

On the bench llama (exported from CONFIG.json with seed 0, which this script rebuilds
identically for easyroutine), N prompts of mixed length (10-256 words of corpus.txt, seeded),
resid_out of every layer at the last token plus layer-0 attention patterns at the last token,
CPU, 2 threads. Each side runs in its own process; peak RSS is the process's ru_maxrss.
Prints a markdown report.
"""
import argparse, json, random, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).parent


def prompts_file(path, n, seed=0):
    words = (HERE / "corpus.txt").read_text().split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(10, 256))) + "\n")


def real_prompts(path, n, seed=0):
    """N prompts of 10-256 words of real English and code: consecutive lines of the Python
    standard library's own sources (docstrings, comments and code; PSF licence), taken in file
    order from a seeded shuffle of the files, so every run reads the same text."""
    import sysconfig
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(seed).shuffle(files)
    rng = random.Random(seed)
    out = []
    for f in files:
        words = f.read_text(errors="replace").split()
        i = 0
        while i < len(words) and len(out) < n:
            k = rng.randint(10, 256)
            out.append(" ".join(words[i:i + k]))
            i += k
        if len(out) >= n:
            break
    Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in out))


def child_rss(cmd):
    """Runs cmd in a fresh python that reports its child's peak RSS (MB)."""
    code = ("import resource, subprocess, sys, time, json; t=time.perf_counter(); "
            "r=subprocess.run(sys.argv[1:], capture_output=True, text=True); s=time.perf_counter()-t; "
            "sys.stderr.write(r.stderr); "
            "print(json.dumps({'rc': r.returncode, 'secs': s, 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'out': r.stdout}))")
    r = subprocess.run([sys.executable, "-c", code] + [str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if d["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr}")
    return d


def easyroutine_worker(config_path, tokenizer, prompts, batch):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    sys.path.insert(0, str(HERE))
    import export
    from tokenizers import Tokenizer
    from easyroutine.interpretability.hooks import save_resid_hook, attention_pattern_head
    from easyroutine.interpretability.activation_cache import ActivationCache
    from easyroutine.interpretability.module_wrappers.manager import ModuleWrapperManager
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if Path(config_path).is_dir():
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(config_path, torchscript=True, use_cache=False, attn_implementation="eager",
                                                 torch_dtype=torch.float32).eval()
    else:
        cfg = export.config_for("llama", json.loads(Path(config_path).read_text()))
        cfg.torchscript, cfg.use_cache = True, False
        cfg._attn_implementation = "eager"
        m = export.model_for_config(cfg).float().eval()
    ModuleWrapperManager(model=m).substitute_attention_module(m)
    tok = Tokenizer.from_file(tokenizer)
    holder = {"c": ActivationCache()}
    last = [(-1,)]
    for i, lay in enumerate(m.model.layers):
        lay.register_forward_hook(lambda mod, a, k, o, i=i: save_resid_hook(mod, a, k, o, cache=holder["c"], cache_key=f"resid_out_{i}", token_indexes=last), with_kwargs=True)
    m.model.layers[0].self_attn.attention_matrix_hook.register_forward_hook(
        lambda mod, a, k, o: attention_pattern_head(mod, a, k, o, token_indexes=last, layer=0, cache=holder["c"]), with_kwargs=True)
    lines = [l.strip() for l in open(prompts) if l.strip()]
    if prompts.endswith(".jsonl"):
        lines = [json.loads(l)["text"] for l in lines]
    all_cache = ActivationCache()
    t = time.perf_counter()
    n_tokens = computed = 0
    with torch.no_grad():
        for s in range(0, len(lines), batch):
            enc = [tok.encode(x).ids for x in lines[s:s + batch]]
            L = max(map(len, enc))
            ids = torch.tensor([[0] * (L - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
            n_tokens += sum(map(len, enc))
            computed += L * len(enc)
            holder["c"] = ActivationCache()
            m(ids, attention_mask=mask)
            all_cache.cat(holder["c"])
    secs = time.perf_counter() - t
    print(json.dumps({"secs": secs, "tokens": n_tokens, "computed": computed, "keys": len(all_cache.keys())}))


def linear_flops(config):
    """Matmul FLOPs per computed token of the decoder layers' linear maps (q, k, v, o, gate, up,
    down), which is what dominates the forward of the bench llama; the LM head is listed apart."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * n * (2 * h * h + 2 * h * kv + 3 * h * i), 2 * h * config["vocab_size"]


def sgemm_rate(config, rows=1024, reps=20):
    """GFLOPS of this machine's torch.mm (2 threads) at the model's linear shapes: the ceiling
    of any forward of this model here, eager or TorchScript."""
    import torch
    torch.set_num_threads(2)
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    mats = [(torch.randn(rows, k), torch.randn(k, n)) for k, n in shapes]
    for a, b in mats:
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        for a, b in mats:
            a @ b
    secs = time.perf_counter() - t
    return reps * sum(2 * rows * k * n for k, n in shapes) / secs / 1e9


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--easyroutine-worker":
        return easyroutine_worker(*sys.argv[2:5], int(sys.argv[5]))
    ap = argparse.ArgumentParser()
    ap.add_argument("hookrs")
    ap.add_argument("model")
    ap.add_argument("config")
    ap.add_argument("workdir")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--scale", type=int, default=10, help="the RSS check runs PROMPTS x SCALE prompts too (1 skips it)")
    ap.add_argument("--rss-only", action="store_true", help="only the RSS check: hookrs over PROMPTS and PROMPTS x SCALE prompts")
    ap.add_argument("--hf", help="a real model's save_pretrained directory (easyroutine's side); prompts of real text")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    model = Path(a.model)
    tokenizer = model.with_name(model.stem + ".tokenizer.json")
    heads = json.loads(Path(a.config).read_text())["num_attention_heads"]
    cfg = wd / "extract.json"
    cfg.write_text(json.dumps({"extract_resid_out": True, "extract_attn_pattern": True, "attn_heads": [{"layer": 0, "head": h} for h in range(heads)]}))
    early = wd / "early.json"
    early.write_text(json.dumps({"extract_attn_pattern": True, "attn_heads": [{"layer": 1, "head": h} for h in range(heads)]}))
    make_prompts = real_prompts if a.hf else prompts_file
    ext = "jsonl" if a.hf else "txt"
    p1 = wd / f"prompts{a.prompts}.{ext}"
    make_prompts(p1, a.prompts)

    def hookrs(prompts, out, config, *extra):
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        d = child_rss([a.hookrs, "extract", "--model", model, "--prompts", prompts, "--config", config, "--batch-size", "8",
                       "--chunk-size", "16MiB", "--out", out, *extra])
        line = d["out"].strip().splitlines()[-1]
        d["padding"] = float(line.split("padding ")[1].split(" ")[0])
        d["tokens"] = int(line.split(" tokens in")[0].split(", ")[-1])
        return d

    if a.rss_only:
        ours = hookrs(p1, wd / "out", cfg)
        n2 = a.prompts * max(a.scale, 1)
        p2 = wd / f"prompts{n2}.{ext}"
        make_prompts(p2, n2)
        print(f"bench dataset: hookrs extract over {n2} prompts (RSS check)...", file=sys.stderr)
        big = hookrs(p2, wd / "out-big", cfg)
        print(f"| peak RSS, same chunk size (16 MiB) | tokens | s | MB |\n|---|---|---|---|\n"
              f"| {a.prompts} prompts | {ours['tokens']} | {ours['secs']:.0f} | {ours['rss_mb']:.0f} |\n"
              f"| {n2} prompts | {big['tokens']} | {big['secs']:.0f} | {big['rss_mb']:.0f} ({(big['rss_mb'] / ours['rss_mb'] - 1) * 100:+.1f} %) |")
        return
    print(f"bench dataset: easyroutine loop over {a.prompts} prompts...", file=sys.stderr)
    er = child_rss([sys.executable, __file__, "--easyroutine-worker", a.hf or a.config, tokenizer, p1, "8"])
    er_run = json.loads(er["out"].strip().splitlines()[-1])
    print("bench dataset: hookrs extract (buckets, file order, early stop)...", file=sys.stderr)
    ours = hookrs(p1, wd / "out", cfg)
    unsorted = hookrs(p1, wd / "out-unsorted", cfg, "--no-sort")
    stop = hookrs(p1, wd / "out-early", early)
    full = hookrs(p1, wd / "out-full", early, "--full-forward")
    what = f"{model.stem} ({a.hf}), {a.prompts} prompts of 10-256 words of the Python standard library's sources (English and code)" if a.hf \
        else f"bench llama ({a.config}), {a.prompts} prompts of 10-256 words"
    print(f"{what}, resid_out of every layer + layer-0 patterns at the last token, CPU, 2 threads, batch 8\n")
    print("| run | tokens | s | tokens/s | peak RSS MB | ratio |")
    print("|---|---|---|---|---|---|")
    er_tps = er_run["tokens"] / er_run["secs"]
    print(f"| easyroutine loop (eager, hooks, ActivationCache.cat per batch; forward loop only) | {er_run['tokens']} | {er_run['secs']:.1f} | {er_tps:.0f} | {er['rss_mb']:.0f} | 1.00 |")
    tps = ours["tokens"] / ours["secs"]
    print(f"| hookrs extract, end to end (process start, read, tokenize, forward, write) | {ours['tokens']} | {ours['secs']:.1f} | {tps:.0f} | {ours['rss_mb']:.0f} | {tps / er_tps:.2f}x tokens/s, {ours['rss_mb'] / er['rss_mb']:.2f}x RSS |")
    per_token, head = linear_flops(json.loads(Path(a.config).read_text()))
    peak = sgemm_rate(json.loads(Path(a.config).read_text()))
    er_rate = er_run["computed"] * (per_token + head) / er_run["secs"] / 1e9
    our_rate = ours["tokens"] * ours["padding"] * per_token / ours["secs"] / 1e9
    print(f"\n| compute (linear-layer matmuls) | computed tokens | GFLOP | GFLOPS | of this machine's sgemm |\n|---|---|---|---|---|\n"
          f"| torch.mm at the model's shapes, 2 threads, same run | | | {peak:.1f} | 1.00 |\n"
          f"| easyroutine loop (file order, LM head included) | {er_run['computed']} | {er_run['computed'] * (per_token + head) / 1e9:.0f} | {er_rate:.1f} | {er_rate / peak:.2f} |\n"
          f"| hookrs extract (buckets, stops before the LM head), end to end | {ours['tokens'] * ours['padding']:.0f} | {ours['tokens'] * ours['padding'] * per_token / 1e9:.0f} | {our_rate:.1f} | {our_rate / peak:.2f} |")
    print(f"\n| padding (computed / real tokens) | value |\n|---|---|\n| length buckets (default) | {ours['padding']:.3f} |\n| file order (--no-sort) | {unsorted['padding']:.3f} |")
    print(f"\n| early stop: layer-1 patterns only | s | ratio |\n|---|---|---|\n| full forward (--full-forward) | {full['secs']:.1f} | 1.00 |\n| stops after layer 1 (default) | {stop['secs']:.1f} | {stop['secs'] / full['secs']:.2f}x |")
    if a.scale > 1:
        n2 = a.prompts * a.scale
        p2 = wd / f"prompts{n2}.{ext}"
        make_prompts(p2, n2)
        print(f"bench dataset: hookrs extract over {n2} prompts (RSS check)...", file=sys.stderr)
        big = hookrs(p2, wd / "out-big", cfg)
        print(f"\n| peak RSS, same chunk size (16 MiB) | MB |\n|---|---|\n| {a.prompts} prompts | {ours['rss_mb']:.0f} |\n| {n2} prompts | {big['rss_mb']:.0f} ({(big['rss_mb'] / ours['rss_mb'] - 1) * 100:+.1f} %) |")


if __name__ == "__main__":
    main()
