"""`import hookrs`: the Python API against the Rust engine (through the CLI's saved cache) and
easyroutine's interface. Run by `cargo xtask py` (part of `cargo xtask ci`)."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hookrs

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "target" / "test-models"


def model_path(family="llama"):
    p = MODELS / f"{family}.pt"
    exporter = ROOT / "xtask/python/export.py"
    if not p.exists() or p.stat().st_mtime < exporter.stat().st_mtime:
        subprocess.run([sys.executable, str(ROOT / "xtask/python/export.py"), "--random", family, "--seed", "0", "--out", str(p)], check=True)
    return p


@pytest.fixture(scope="module")
def model():
    return hookrs.HookedModule.load(str(model_path()))


def test_sites_and_description(model):
    comps = [s["component"] for s in model.sites()]
    assert "model.layers[0].self_attn.attention_matrix_hook.output" in comps
    d = model.description
    assert d["num_hidden_layers"] == 2 and d["templates"]["residual_stream_hook_name"] == "model.layers[{}].output"


def test_run_with_cache_equals_the_rust_api(model, tmp_path):
    ids = torch.tensor([[5, 9, 12, 40, 7, 3]])
    cfg = hookrs.ExtractionConfig(extract_resid_out=True, extract_attn_pattern=True, extract_head_queries=True)
    logits, cache = model.run_with_cache(ids, torch.ones_like(ids), [[0, 1], [-1]], cfg)
    assert logits.shape == (1, 6, 256)
    assert torch.equal(logits, model.forward(ids))
    # the same call through the CLI (the Rust API), saved and read back
    out = tmp_path / "rust.safetensors"
    hookrs_bin = ROOT / "target" / "debug" / "hookrs"
    subprocess.run([str(hookrs_bin), "extract", "--model", str(model_path()), "--input-ids", "[[5,9,12,40,7,3]]", "--token-groups", "[[0,1],[-1]]",
                    "--extract", "resid_out,attn_pattern,head_queries,logits", "--out", str(out)], check=True, capture_output=True)
    rust = hookrs.ActivationCache.load(str(out))
    for k in cache.keys():
        if isinstance(cache[k], torch.Tensor):
            assert torch.equal(cache[k], rust[k]), k
    assert cache["pattern_L0H1"].shape == (1, 3, 3)


def test_tensors_cross_without_copies(model):
    c = hookrs.ActivationCache()
    t = torch.arange(6.0).view(2, 3)
    c["resid_out_0"] = t
    back = c["resid_out_0"]
    assert back.data_ptr() == t.data_ptr()
    t[0, 0] = 42.0
    assert c["resid_out_0"][0, 0].item() == 42.0


def test_activation_cache_is_easyroutines(tmp_path):
    c = hookrs.ActivationCache()
    c["resid_out_0"] = torch.ones(1, 2, 4)
    c["pair"] = (torch.zeros(1), torch.ones(1))
    c["stats"] = {"mean": torch.zeros(2), "n": [torch.ones(1)]}
    c["note"] = {"a": [1, 2], "b": "x"}
    c.add_with_info("head_out_L0H0", torch.ones(1, 1, 4), "Shape: batch d")
    assert "resid_out_0" in c and len(c) == 5
    assert list(c.keys()) == ["resid_out_0", "pair", "stats", "note", "head_out_L0H0"]
    assert isinstance(c["pair"], tuple) and c["note"] == {"a": [1, 2], "b": "x"}
    v = c["head_out_L0H0"]
    assert isinstance(v, hookrs.ValueWithInfo) and v.info() == "Shape: batch d"
    other = hookrs.ActivationCache()
    for k in c.keys():
        other[k] = c[k]
    c.cat(other)
    assert c["resid_out_0"].shape == (2, 2, 4)
    assert "B" in c.memory_size()
    c.save(str(tmp_path / "c.safetensors"))
    back = hookrs.ActivationCache.load(str(tmp_path / "c.safetensors"))
    assert torch.equal(back["resid_out_0"], c["resid_out_0"])
    again = pickle.loads(pickle.dumps(c))
    assert torch.equal(again["resid_out_0"], c["resid_out_0"])
    torch.save(c, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=False)["resid_out_0"], c["resid_out_0"])
    del c["note"]
    assert "note" not in c


def test_errors_are_python_exceptions_with_the_rust_message(model):
    ids = torch.tensor([[5, 9]])
    with pytest.raises(ValueError, match="out of range"):
        model.run_with_cache(ids, None, [[0, 7]], hookrs.ExtractionConfig(extract_resid_out=True))
    with pytest.raises(ValueError, match="closest: extract_resid_out"):
        hookrs.ExtractionConfig(extract_resid_outt=True)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        model.forward([[5, 9]])
    with pytest.raises(ValueError, match="cannot store a"):
        hookrs.ActivationCache()["x"] = object()
    with pytest.raises(KeyError):
        hookrs.ActivationCache()["missing"]
    with pytest.raises((ValueError, RuntimeError), match="TorchScript|No such file|cannot"):
        hookrs.HookedModule.load("/nonexistent.pt")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        hookrs.HookedModule.load(str(model_path()), device="gpu")
    # the module is still usable
    assert model.forward(ids).shape == (1, 2, 256)


def test_a_half_precision_export_loads_in_another_dtype():
    p = MODELS / "llama@bfloat16.pt"
    if not p.exists():
        subprocess.run([sys.executable, str(ROOT / "xtask/python/export.py"), "--random", "llama", "--seed", "0", "--dtype", "bfloat16",
                        "--out", str(p)], check=True)
    ids = torch.tensor([[5, 9, 12, 40]])
    m = hookrs.HookedModule.load(str(p), dtype=torch.float16)
    assert m.description["dtype"] == "float16"
    assert m.forward(ids).dtype == torch.float16
    m.to("float32")
    assert m.forward(ids).dtype == torch.float32
    m.to(torch.bfloat16)
    assert torch.equal(m.forward(ids), hookrs.HookedModule.load(str(p)).forward(ids))
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        hookrs.HookedModule.load(str(model_path()), dtype="bfloat16")
    with pytest.raises(ValueError, match="expected float32, bfloat16 or float16"):
        hookrs.HookedModule.load(str(p), dtype=torch.int8)


def test_cat_of_plain_tuples_and_lists_is_easyroutines(tmp_path):
    # easyroutine's default aggregation: two tuples make a list of both; lists concatenate
    a, b = hookrs.ActivationCache(), hookrs.ActivationCache()
    a["t"], b["t"] = (1, 2), (3, 4)
    a["l"], b["l"] = [1, 2], [3, 4]
    a["n"], b["n"] = [(1, "x")], [(2, "y")]
    assert a["t"] == (1, 2) and isinstance(a["t"], tuple)
    a.cat(b)
    assert a["t"] == [(1, 2), (3, 4)]
    assert a["l"] == [1, 2, 3, 4]
    assert a["n"] == [(1, "x"), (2, "y")]
    a.save(str(tmp_path / "t.safetensors"))
    back = hookrs.ActivationCache.load(str(tmp_path / "t.safetensors"))
    assert back["t"] == [(1, 2), (3, 4)] and back["l"] == [1, 2, 3, 4]


def test_the_memory_guard_is_off_until_asked_for_and_then_refuses_cleanly():
    import subprocess
    import sys
    # a fresh process: importing hookrs and loading a model leave torch's allocator alone
    code = f"""
import torch, hookrs
m = hookrs.HookedModule.load({str(model_path())!r})
assert hookrs.set_memory_limit(None) == 0, "a load installed the guard"
hookrs.set_memory_limit("1MB")
try:
    torch.zeros(1 << 20)
except RuntimeError as e:
    assert "hookrs.set_memory_limit" in str(e) and "1000000 bytes" in str(e), e
else:
    raise AssertionError("the guard let 4 MB through a 1 MB limit")
hookrs.set_memory_limit(None)
torch.zeros(1 << 20)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_generate_with_a_kv_cache_equals_greedy_full_forwards(model):
    prompts = [[5, 9, 12, 40, 7], [11, 4]]
    got = model.generate(prompts, max_new_tokens=6, batch_size=2)
    for p, new in zip(prompts, got):
        text = list(p)
        for _ in range(6):
            logits = model.forward(torch.tensor([text]))
            text.append(int(logits[0, -1].argmax()))
        assert new == text[len(p):]
    assert model.generate(prompts[0], max_new_tokens=6) == got[0], "one prompt: one list"
    # a steering vector at every forward changes the text; nothing stays attached
    steer = {"layer": 0, "vector": 20 * torch.randn(64, generator=torch.Generator().manual_seed(3)), "at": "all"}
    assert model.generate(prompts, max_new_tokens=6, steering=steer) != got
    assert model.generate(prompts, max_new_tokens=6) == got
    # the extraction: one cache per new token
    tokens, caches = model.generate(prompts[:1], max_new_tokens=3, extraction_config={"extract_resid_out": True})
    assert tokens == [got[0][:3]] and len(caches) == 1 and len(caches[0]) == 3
    with pytest.raises(ValueError, match="unknown key"):
        model.generate(prompts, steering={"layer": 0, "vector": torch.zeros(64), "scael": 2})
    with pytest.raises(ValueError, match="expected \"prompt\", \"new\" or \"all\""):
        model.generate(prompts, steering={"layer": 0, "vector": torch.zeros(64), "at": "everywhere"})
    with pytest.raises(ValueError, match="layers 0..2"):
        model.generate(prompts, steering={"layer": 7, "vector": torch.zeros(64)})
