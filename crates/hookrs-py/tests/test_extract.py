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
    with pytest.raises(ValueError, match="--token-groups is not a JSON list"):
        hookrs.cli(["extract", "--model", str(model_path()), "--input-ids", "[[1]]", "--token-groups", "[[0,", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(ValueError, match="unknown extraction `resid`"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 2]], extract="resid")
    with pytest.raises(RuntimeError, match="out of the vocabulary"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 999]])
    with pytest.raises(ValueError, match="unexpected argument"):
        hookrs.extract(model_path(), tmp_path / "x.safetensors", input_ids=[[1, 2]], no_such_option=3)
    assert "--chunk-size" in hookrs.cli(["extract", "--help"])
    assert not (tmp_path / "x.safetensors").exists()
