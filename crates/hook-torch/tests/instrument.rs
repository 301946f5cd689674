//! Loading and instrumenting the tiny exported models.

mod common;

use hook_core::{HookContext, HookIo};
use hook_torch::{HookedModule, TorchError};
use tch::{Device, Kind, Tensor};

#[test]
fn sites_and_forward_match_the_plain_module() {
    let path = common::model("llama");
    let mut m = HookedModule::load(&path, Device::Cpu).unwrap();
    let names: Vec<&str> = m.sites().iter().map(|s| s.component.as_str()).collect();
    assert!(names.contains(&"model.layers[0].self_attn.attention_matrix_hook.output"), "{names:?}");
    assert!(names.contains(&"model.layers[1].input"));
    let (ids, mask) = common::inputs();
    let plain = tch::CModule::load(&path).unwrap();
    let want = match plain.forward_is(&[tch::IValue::Tensor(ids.shallow_clone()), tch::IValue::Tensor(mask.shallow_clone())]).unwrap() {
        tch::IValue::Tuple(v) => match &v[0] {
            tch::IValue::Tensor(t) => t.shallow_clone(),
            _ => panic!(),
        },
        _ => panic!(),
    };
    let got = m.forward(&ids, &mask).unwrap();
    assert!(got.equal(&want));
    // a hook that zeroes the attention output changes the logits
    let h = m
        .add_hook("model.layers[0].self_attn.output", |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()?.zeros_like())))
        .unwrap();
    let zeroed = m.forward(&ids, &mask).unwrap();
    assert!(!zeroed.equal(&want));
    assert!(m.remove_hook(h));
    assert!(m.forward(&ids, &mask).unwrap().equal(&want));
}

#[test]
fn unknown_component_suggests_names() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let e = m.add_hook("model.layers[0].self_atn.output", |_: &HookContext, _: &HookIo<Tensor>| Ok(None)).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with("no hookable component `model.layers[0].self_atn.output`; closest: model.layers[0].self_attn.output"), "{s}");
    assert!(matches!(e, TorchError::UnknownComponent { .. }));
}

#[test]
fn hook_errors_panics_and_bad_shapes_are_errors_and_the_module_stays_usable() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let base = m.forward(&ids, &mask).unwrap();
    let h = m.add_hook("model.layers[1].mlp.output", |_: &HookContext, _: &HookIo<Tensor>| panic!("boom")).unwrap();
    let e = m.forward(&ids, &mask).unwrap_err().to_string();
    assert_eq!(e, "hook on `model.layers[1].mlp.output` panicked: boom");
    m.remove_hook(h);
    let h = m
        .add_hook("model.layers[0].mlp.output", |_: &HookContext, _: &HookIo<Tensor>| Ok(Some(Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)))))
        .unwrap();
    let e = m.forward(&ids, &mask).unwrap_err().to_string();
    assert!(e.contains("hook on `model.layers[0].mlp.output` failed: the hook returned a tensor of shape [1, 2]; the activation has shape [2, 7, 64]"), "{e}");
    m.remove_hook(h);
    assert!(m.forward(&ids, &mask).unwrap().equal(&base));
}

#[test]
fn bad_inputs() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let e = m.forward(&(ids.shallow_clone() + 1000), &mask).unwrap_err().to_string();
    assert!(e.contains("is out of the vocabulary: valid ids are 0..256"), "{e}");
    let e = m.forward(&ids, &mask.narrow(1, 0, 3)).unwrap_err().to_string();
    assert!(e.contains("attention_mask has shape [2, 3], expected the shape of input_ids [2, 7]"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, "not a model").unwrap();
    let e = HookedModule::load(&junk, Device::Cpu).unwrap_err().to_string();
    assert!(e.starts_with(&format!("cannot load {} as a TorchScript module", junk.display())), "{e}");
}
