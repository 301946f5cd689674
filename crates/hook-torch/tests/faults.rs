//! Faults at the FFI boundary and many threads at once: every fault is a clear error, the
//! module stays usable with identical results, and threads never see each other's hooks.
//! (Panicking hooks and wrong shapes: `tests/instrument.rs`.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hook_core::{HookContext, HookIo, TokenGroups};
use hook_torch::{ExtractionConfig, HookedModule, Intervention, PatchValue, TorchError};
use tch::{Device, Kind, Tensor};

const SITE: &str = "model.layers[0].mlp.output";

#[test]
fn a_hook_failing_on_its_1000th_call_is_an_error_for_that_forward_only() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let base = m.forward(&ids, &mask).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let sites: Vec<String> = m.sites().iter().map(|s| s.component.clone()).collect();
    for s in &sites {
        let c = c.clone();
        m.add_hook(s, move |_: &HookContext, _: &HookIo<Tensor>| {
            if c.fetch_add(1, Ordering::SeqCst) + 1 == 1000 {
                return Err(hook_core::CoreError::hook_message("", "call 1000 fails"));
            }
            Ok(None)
        })
        .unwrap();
    }
    let mut failures = 0;
    for _ in 0..(2000 / sites.len() + 1) {
        match m.forward(&ids, &mask) {
            Ok(out) => assert!(out.equal(&base), "every other forward gives the plain logits"),
            Err(e) => {
                failures += 1;
                assert!(matches!(e, TorchError::Hook { .. }), "{e:?}");
                assert!(e.to_string().contains("call 1000 fails"), "{e}");
            }
        }
    }
    assert_eq!(failures, 1);
    assert!(calls.load(Ordering::SeqCst) > 1000 + sites.len(), "forwards went on after the failing one");
}

#[test]
fn replacements_of_another_dtype_layout_or_alias_work_and_an_unusable_one_is_an_error() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let base = m.forward(&ids, &mask).unwrap();
    let doubled = {
        let h = m.add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()? * 2.0))).unwrap();
        let out = m.forward(&ids, &mask).unwrap();
        m.remove_hook(h);
        out
    };
    // another dtype: converted to the activation's
    let h = m.add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| Ok(Some((io.main_tensor()? * 2.0).to_kind(Kind::Double)))).unwrap();
    assert!(m.forward(&ids, &mask).unwrap().equal(&doubled));
    m.remove_hook(h);
    // a non-contiguous tensor with the same values
    let h = m
        .add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| Ok(Some((io.main_tensor()? * 2.0).transpose(1, 2).contiguous().transpose(1, 2))))
        .unwrap();
    assert!(m.forward(&ids, &mask).unwrap().equal(&doubled));
    m.remove_hook(h);
    // the activation itself (aliased)
    let h = m.add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()?.shallow_clone()))).unwrap();
    assert!(m.forward(&ids, &mask).unwrap().equal(&base));
    m.remove_hook(h);
    // a replacement that cannot take the activation's place: a clear error, then business as usual
    let h = m.add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()?.flatten(0, 1)))).unwrap();
    let e = m.forward(&ids, &mask).unwrap_err();
    assert!(e.to_string().contains("the hook returned a tensor of shape [14, 64]; the activation has shape [2, 7, 64]"), "{e}");
    m.remove_hook(h);
    assert!(m.forward(&ids, &mask).unwrap().equal(&base));
}

#[test]
fn an_intervention_naming_a_missing_site_is_an_error_with_suggestions() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let base = m.forward(&ids, &mask).unwrap();
    let iv = [Intervention::Resid { component: "model.layers[0].mlpp.output".into(), positions: vec![-1], patch: PatchValue::Ablation }];
    let e = m.run_with_interventions(&ids, &mask, &iv).unwrap_err();
    assert!(matches!(e, TorchError::UnknownComponent { .. }), "{e:?}");
    assert!(e.to_string().contains("model.layers[0].mlp.output"), "{e}");
    let iv = [Intervention::Heads { layer: 7, heads: vec![0] }];
    assert!(m.run_with_interventions(&ids, &mask, &iv).is_err());
    assert!(m.forward(&ids, &mask).unwrap().equal(&base));
}

/// Equal up to float rounding (libtorch may split a matmul differently when threads compete
/// for its pool); crosstalk (another thread's scale or hook) is orders of magnitude larger.
fn same(got: &[Vec<f32>; 3], want: &[Vec<f32>; 3]) -> bool {
    got.iter().zip(want).all(|(g, w)| g.len() == w.len() && g.iter().zip(w).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)))
}

/// One thread's work: its own scale on SITE, an extraction and an ablation; every result
/// must equal the single-threaded one.
fn work(m: &mut HookedModule, scale: f64) -> (Tensor, Tensor, Tensor) {
    let (ids, mask) = common::inputs();
    let h = m.add_hook(SITE, move |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()? * scale))).unwrap();
    let scaled = m.forward(&ids, &mask).unwrap();
    m.remove_hook(h);
    let cfg = ExtractionConfig::default().with_flags(&["resid_out", "attn_pattern"]).unwrap();
    let (_, cache) = m.run_with_cache(&ids, &mask, &TokenGroups::last(), &cfg).unwrap();
    let iv = [Intervention::Resid { component: "model.layers[1].output".into(), positions: vec![-1], patch: PatchValue::Ablation }];
    let ablated = m.run_with_interventions(&ids, &mask, &iv).unwrap();
    (scaled, cache.tensor("pattern_L1H0").unwrap().shallow_clone(), ablated)
}

#[test]
fn threads_with_their_own_modules_or_a_shared_one_get_the_single_threaded_results() {
    let path = common::model("llama");
    let mut reference = HookedModule::load(&path, Device::Cpu).unwrap();
    let want: Vec<_> = (0..32).map(|i| work(&mut reference, 1.0 + i as f64 / 8.0)).collect();
    let want = Arc::new(want.into_iter().map(|(a, b, c)| [a, b, c].map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap())).collect::<Vec<_>>());
    for n in [2usize, 8, 32] {
        // own modules
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (path, want) = (path.clone(), want.clone());
                std::thread::spawn(move || {
                    let mut m = HookedModule::load(&path, Device::Cpu).unwrap();
                    for _ in 0..3 {
                        let got = work(&mut m, 1.0 + i as f64 / 8.0);
                        let got = [got.0, got.1, got.2].map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap());
                        assert!(same(&got, &want[i]), "thread {i} of {n}: crosstalk");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("no thread panicked");
        }
        // one module shared behind a mutex, each thread with its own hooks
        let shared = Arc::new(Mutex::new(HookedModule::load(&path, Device::Cpu).unwrap()));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (shared, want) = (shared.clone(), want.clone());
                std::thread::spawn(move || {
                    for _ in 0..3 {
                        let got = work(&mut shared.lock().unwrap(), 1.0 + i as f64 / 8.0);
                        let got = [got.0, got.1, got.2].map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap());
                        assert!(same(&got, &want[i]), "thread {i} of {n} on the shared module");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("no thread panicked");
        }
    }
}

#[test]
fn an_error_inside_a_hook_names_the_site_and_keeps_its_cause() {
    use std::error::Error;
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    // an ops error, as the catalogue's hooks raise them: made inside the hook's body, without the site
    m.add_hook(SITE, |_: &HookContext, io: &HookIo<Tensor>| {
        let x = io.main_tensor()?;
        let e = x.f_matmul(&Tensor::zeros([3, 3], (Kind::Float, Device::Cpu))).unwrap_err();
        Err(hook_core::CoreError::hook("", e))
    })
    .unwrap();
    let e = m.forward(&ids, &mask).unwrap_err();
    let TorchError::Hook { component, .. } = &e else { panic!("{e:?}") };
    assert_eq!(component, SITE);
    assert!(e.to_string().starts_with(&format!("hook on `{SITE}` failed: ")), "{e}");
    let cause = e.source().expect("the libtorch error is the source");
    assert!(cause.to_string().contains("cannot be multiplied") || cause.to_string().contains("shape"), "{cause}");
}
