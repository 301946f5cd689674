"""Editing activations from Python: hooks that are Python callables, easyroutine's
Intervention, and the cache's aggregation hooks (register_aggregation, deferred_mode,
add_metadata). Run by `cargo xtask py` (part of `cargo xtask ci`)."""
import traceback

import pytest
import torch

import hookrs
from test_api import model_path

IDS = torch.tensor([[5, 9, 12, 40, 7, 3], [0, 0, 17, 8, 30, 31]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
MLP0 = "model.layers[0].mlp.output"


@pytest.fixture()
def model():
    return hookrs.HookedModule.load(str(model_path()))


def test_a_python_hook_replaces_the_activation_and_equals_the_engines_ablation(model):
    plain = model.forward(IDS, MASK)
    seen = []

    def zero(t):
        seen.append(t.shape)
        return torch.zeros_like(t)

    h = model.add_hook(MLP0, zero)
    hooked = model.forward(IDS, MASK)
    assert seen == [torch.Size([2, 6, 64])]
    assert not torch.equal(hooked, plain)
    # easyroutine's Intervention on mlp_out_0 at every position: the same numbers
    iv = hookrs.Intervention(type="full", activation="mlp_out_0", token_positions=["all"])
    model.remove_hook(h)
    assert torch.equal(model.run_with_interventions(IDS, MASK, [iv]), hooked)
    # removed: the plain logits again
    assert torch.equal(model.forward(IDS, MASK), plain)
    assert model.remove_hook(h) is False


def test_a_hook_returning_none_keeps_in_place_edits(model):
    plain = model.forward(IDS, MASK)

    def halve(t):
        t.mul_(0.5)

    model.add_hook(MLP0, halve)
    edited = model.forward(IDS, MASK)
    model.clear_hooks()
    model.add_hook(MLP0, lambda t: t * 0.5)
    assert torch.equal(model.forward(IDS, MASK), edited)
    model.clear_hooks()
    assert not torch.equal(edited, plain)


def test_an_exception_in_a_hook_propagates_with_its_traceback_and_the_module_stays_usable(model):
    plain = model.forward(IDS, MASK)

    def broken_hook(t):
        raise KeyError("boom")

    model.add_hook(MLP0, broken_hook)
    with pytest.raises(KeyError, match="boom") as info:
        model.forward(IDS, MASK)
    assert "broken_hook" in "".join(traceback.format_tb(info.value.__traceback__))
    model.clear_hooks()
    assert torch.equal(model.forward(IDS, MASK), plain)
    # a wrong shape is refused, naming both shapes; again the module survives
    model.add_hook(MLP0, lambda t: t[:, :1])
    with pytest.raises(RuntimeError, match=r"shape \[2, 1, 64\].*\[2, 6, 64\]"):
        model.forward(IDS, MASK)
    model.clear_hooks()
    with pytest.raises(TypeError, match="torch.Tensor or None"):
        model.add_hook(MLP0, lambda t: "nope")
        model.forward(IDS, MASK)
    model.clear_hooks()
    with pytest.raises(TypeError, match="callable"):
        model.add_hook(MLP0, 3)
    with pytest.raises(ValueError, match="closest"):
        model.add_hook("model.layers[0].mlpp.output", lambda t: t)
    assert torch.equal(model.forward(IDS, MASK), plain)


def test_interventions_in_easyroutines_form(model):
    plain = model.forward(IDS, MASK)
    last = hookrs.Intervention(type="full", activation="resid_out_0", token_positions=["last"])
    by_hook = model.add_hook("model.layers[0].output", lambda t: torch.cat([t[:, :-1], torch.zeros_like(t[:, -1:])], 1))
    want = model.forward(IDS, MASK)
    model.remove_hook(by_hook)
    assert torch.equal(model.run_with_interventions(IDS, MASK, [last]), want)
    # patching values, a head of the keys, and attention columns: each changes the logits
    values = torch.full((2, 1, 64), 0.25)
    patched = model.run_with_interventions(IDS, MASK, [hookrs.Intervention("full", "resid_out_0", [-1], values)])
    assert not torch.equal(patched, plain) and not torch.equal(patched, want)
    for iv in [hookrs.Intervention("full", "head_keys_L1H0", [0, -1]), hookrs.Intervention("columns", "pattern_L1H1", [-2])]:
        assert not torch.equal(model.run_with_interventions(IDS, MASK, [iv]), plain), iv
    # interventions last one forward only
    assert torch.equal(model.forward(IDS, MASK), plain)
    with pytest.raises(ValueError, match="expected resid_out_N"):
        model.run_with_interventions(IDS, MASK, [hookrs.Intervention("full", "resid_outt_0", [0])])
    with pytest.raises(ValueError, match="columns, rows and grid"):
        model.run_with_interventions(IDS, MASK, [hookrs.Intervention("keep-self-attn", "pattern_L0H0", [0])])
    with pytest.raises(ValueError, match="'first'"):
        model.run_with_interventions(IDS, MASK, [hookrs.Intervention("full", "resid_out_0", ["first"])])


def test_engine_form_dicts_are_parsed_strictly(model):
    plain = model.forward(IDS, MASK)
    heads = {"kind": "heads", "layer": 1, "heads": [0]}
    assert not torch.equal(model.run_with_interventions(IDS, MASK, [heads]), plain)
    values = torch.full((2, 1, 64), 0.25)
    resid = {"kind": "resid", "component": "model.layers[0].output", "positions": [-1], "patch": values}
    via_dict = model.run_with_interventions(IDS, MASK, [resid])
    assert torch.equal(via_dict, model.run_with_interventions(IDS, MASK, [hookrs.Intervention("full", "resid_out_0", [-1], values)]))
    # a typo is an error naming the field, not layer 0
    with pytest.raises(ValueError, match="layr"):
        model.run_with_interventions(IDS, MASK, [{"kind": "heads", "layr": 1, "heads": [0]}])
    with pytest.raises(ValueError, match="missing field `positions`"):
        model.run_with_interventions(IDS, MASK, [{"kind": "resid", "component": "model.layers[0].output"}])
    with pytest.raises(ValueError, match="unknown variant `rezid`"):
        model.run_with_interventions(IDS, MASK, [{"kind": "rezid", "component": "x", "positions": [0]}])


def test_register_aggregation_deferred_mode_and_metadata():
    def batch(x):
        c = hookrs.ActivationCache()
        c["resid_out_0"] = torch.full((1, 2), float(x))
        c["count"] = torch.tensor([1.0])
        return c

    all_ = hookrs.ActivationCache()
    all_.register_aggregation("count", lambda old, new: new if old is None else old + new)
    with all_.deferred_mode() as c:
        assert c is all_
        for x in range(3):
            c.cat(batch(x))
        assert len(all_) == 0, "deferred: nothing aggregated yet"
    assert all_["resid_out_0"].shape == (3, 2)
    assert torch.equal(all_["count"], torch.tensor([3.0]))

    def broken(old, new):
        if old is not None:
            raise ValueError("no")
        return new

    bad = hookrs.ActivationCache()
    bad.register_aggregation("count", broken)
    bad.cat(batch(0))
    with pytest.raises(ValueError, match="aggregation function raised ValueError: no"):
        bad.cat(batch(1))
    assert bad["count"].shape == (1,), "a refused cat leaves the cache as it was"
    with pytest.raises(TypeError, match="callable"):
        bad.register_aggregation("count", 3)

    all_.add_metadata([[0], [-1]], "llama", hookrs.ExtractionConfig(extract_resid_out=True), [hookrs.Intervention("full", "resid_out_0", [0])])
    meta = all_["metadata"]
    assert meta["model_name"] == "llama" and meta["target_token_positions"] == [[0], [-1]]
    assert meta["extraction_config"]["extract_resid_out"] is True
    assert "resid_out_0" in str(meta["interventions"])
