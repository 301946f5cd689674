"""`hookrs.extract`: the CLI's long runs from Python, in-process (run by `cargo xtask py`)."""
import json

import pytest
import torch

import hookrs
from test_api import model_path


def test_extract_to_a_file_and_a_chunk_directory_with_progress(tmp_path):
    seen = []
    out = hookrs.extract(model_path(), tmp_path / "c.safetensors", input_ids=[[5, 9, 12], [7, 3, 8]], extract=["resid_out", "attn_pattern"],
                         token_groups=[[0], [-1]], progress=lambda done, total: seen.append((done, total)))
    cache = hookrs.ActivationCache.load(str(out))
    assert cache["resid_out_1"].shape == (2, 2, 64)
    assert seen and seen[-1] == (2, 2)
    # the same numbers as run_with_cache
    m = hookrs.HookedModule.load(str(model_path()))
    ids = torch.tensor([[5, 9, 12], [7, 3, 8]])
    _, direct = m.run_with_cache(ids, None, [[0], [-1]], hookrs.ExtractionConfig(extract_resid_out=True))
    assert torch.equal(direct["resid_out_1"], cache["resid_out_1"])
    # a chunk directory, streamed, two examples per chunk
    d = tmp_path / "chunks"
    hookrs.extract(model_path(), d, input_ids=[[5, 9], [7, 3], [8, 1], [2, 2], [4, 4]], extract="resid_out", chunk_size=2, batch_size=2,
                   progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 3
    assert hookrs.ActivationCache.load(str(d))["resid_out_0"].shape[0] == 5


def test_extract_errors_are_python_exceptions(tmp_path):
    with pytest.raises(ValueError, match="token_groups"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1]], token_groups="[[0,")
    with pytest.raises(ValueError, match="unknown extraction `resid`"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 2]], extract="resid")
    with pytest.raises(RuntimeError, match="out of the vocabulary"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 999]])
    with pytest.raises(ValueError, match="unknown option \"batchsize\" \\(did you mean \"batch_size\"\\?\\)"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 2]], batchsize=3)
    assert not (tmp_path / "x.safetensors").exists()


def test_two_extractions_at_once_each_report_to_their_own_progress(tmp_path):
    import threading
    seen = {"a": [], "b": [], "errors": []}

    def one(name, n):
        try:
            hookrs.extract(model_path(), tmp_path / f"{name}.safetensors", input_ids=[[5, 9, 3]] * n, extract="resid_out",
                           batch_size=1, progress=lambda done, total: seen[name].append((done, total)))
        except Exception as e:  # pragma: no cover - reported below
            seen["errors"].append(e)

    threads = [threading.Thread(target=one, args=("a", 6)), threading.Thread(target=one, args=("b", 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["errors"] == []
    assert seen["a"][-1] == (6, 6) and all(total == 6 and done <= 6 for done, total in seen["a"])
    assert seen["b"][-1] == (9, 9) and len(seen["b"]) == 9
    assert hookrs.ActivationCache.load(str(tmp_path / "a.safetensors"))["resid_out_0"].shape[0] == 6
