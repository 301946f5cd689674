//! Autograd through the instrumented module, two modules on two threads, a module without a
//! description, and the running average of attention patterns.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hook_core::{HookContext, HookIo, TokenGroups};
use hook_ops::pattern::RunningPatternAverage;
use hook_torch::{ExtractionConfig, HookedModule};
use tch::{Device, IValue, Tensor};

fn logits(out: IValue) -> Tensor {
    match out {
        IValue::Tuple(mut v) => match v.swap_remove(0) {
            IValue::Tensor(t) => t,
            _ => panic!("no logits"),
        },
        _ => panic!("no tuple"),
    }
}

#[test]
fn gradients_through_the_instrumented_module_equal_the_plain_ones() {
    let path = common::model("llama");
    let (ids, mask) = common::inputs();
    let plain = tch::CModule::load(&path).unwrap();
    let loss = logits(plain.forward_is(&[IValue::Tensor(ids.shallow_clone()), IValue::Tensor(mask.shallow_clone())]).unwrap()).sum(tch::Kind::Float);
    let params: std::collections::HashMap<String, Tensor> = plain.named_parameters().unwrap().into_iter().collect();
    let w = &params["model.layers.0.self_attn.q_proj.weight"];
    assert!(w.requires_grad());
    let g_plain = Tensor::run_backward(&[loss], &[w], false, false).remove(0);

    let mut m = HookedModule::load(&path, Device::Cpu).unwrap();
    let w2 = m.parameter("model.layers.0.self_attn.q_proj.weight").unwrap().shallow_clone();
    let loss = m.forward(&ids, &mask).unwrap().sum(tch::Kind::Float);
    let g_hooked = Tensor::run_backward(&[loss], &[&w2], false, false).remove(0);
    assert!(g_plain.allclose(&g_hooked, 1e-6, 1e-6, false), "idle sites are autograd-transparent");

    // a hook that multiplies layer 1's output by 0 cuts the gradient to layer 0's weights
    m.add_hook("model.layers[1].output", |_: &HookContext, io: &HookIo<Tensor>| Ok(Some(io.main_tensor()? * 0.0))).unwrap();
    let loss = m.forward(&ids, &mask).unwrap().sum(tch::Kind::Float);
    let g_cut = Tensor::run_backward(&[loss], &[&w2], false, false).remove(0);
    assert_eq!(g_cut.abs().max().double_value(&[]), 0.0);
}

#[test]
fn two_modules_on_two_threads_see_only_their_own_hooks() {
    let path = common::model("llama");
    let (ids, mask) = common::inputs();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            let (ids, mask) = (ids.shallow_clone(), mask.shallow_clone());
            std::thread::spawn(move || {
                let mut m = HookedModule::load(&path, Device::Cpu).unwrap();
                let n = Arc::new(AtomicUsize::new(0));
                let n2 = n.clone();
                let sites: Vec<String> = m.sites().iter().map(|s| s.component.clone()).collect();
                for s in &sites {
                    let n2 = n2.clone();
                    m.add_hook(s, move |_: &HookContext, _: &HookIo<Tensor>| {
                        n2.fetch_add(1, Ordering::SeqCst);
                        Ok(None)
                    })
                    .unwrap();
                }
                for _ in 0..5 {
                    let _ = m.forward(&ids, &mask).unwrap();
                }
                (n.load(Ordering::SeqCst), sites.len())
            })
        })
        .collect();
    for h in handles {
        let (calls, sites) = h.join().unwrap();
        assert_eq!(calls, 5 * sites, "every site fired once per forward, on this module only");
    }
}

#[test]
fn a_module_without_description_loads_with_sites_from_its_tree() {
    let path = common::model("llama");
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.pt");
    // re-save without the hookrs.json extra file
    let python = std::env::var("HOOKRS_PYTHON_VENV").unwrap_or_else(|_| {
        let home = std::env::var("HOOKRS_HOME").unwrap_or_else(|_| format!("{}/.cache/hookrs", std::env::var("HOME").unwrap()));
        format!("{home}/venv/bin/python")
    });
    let ok = std::process::Command::new(python)
        .args(["-c", &format!("import torch; torch.jit.save(torch.jit.load({:?}), {:?})", path.to_str().unwrap(), bare.to_str().unwrap())])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut m = HookedModule::load(&bare, Device::Cpu).unwrap();
    assert!(m.description().is_none());
    assert!(m.sites().len() > 30);
    let (ids, mask) = common::inputs();
    assert!(m.forward(&ids, &mask).is_ok());
    let e = m.run_with_cache(&ids, &mask, &TokenGroups::last(), &ExtractionConfig::default()).unwrap_err().to_string();
    assert!(e.contains("the model description is missing"), "{e}");
}

#[test]
fn running_average_of_patterns_over_batches() {
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let cfg = ExtractionConfig { avg_over_example: true, ..ExtractionConfig::default().with_flags(&["attn_pattern"]).unwrap() };
    let g: TokenGroups = "[(0, 1, 2)]".parse().unwrap();
    let a = Tensor::from_slice(&[5i64, 9, 12]).view([1, 3]);
    let b = Tensor::from_slice(&[7i64, 3, 30]).view([1, 3]);
    let mut avg = RunningPatternAverage::new();
    let mut singles = vec![];
    for (i, ids) in [&a, &b].into_iter().enumerate() {
        let extraction = hook_torch::Extraction { average: Some((&mut avg, i)), ..hook_torch::Extraction::new(&g, &cfg) };
        let cache = m.run(ids, &ids.ones_like(), hook_torch::RunSpec { extraction: Some(extraction), ..Default::default() }).unwrap().cache;
        assert!(!cache.contains("pattern_L0H0"), "patterns go to the running average");
        let plain = ExtractionConfig::default().with_flags(&["attn_pattern"]).unwrap();
        singles.push(m.run_with_cache(ids, &ids.ones_like(), &g, &plain).unwrap().1.tensor("pattern_L1H2").unwrap().shallow_clone());
    }
    let want = (&singles[0] + &singles[1]) / 2.0;
    assert!(avg.entries()["avg_pattern_L1H2"].allclose(&want, 1e-6, 1e-6, false));
}

#[test]
fn stop_early_runs_only_up_to_the_last_hooked_site_and_gives_the_same_values() {
    use hook_torch::module::site_calls_on_this_thread;
    let mut m = HookedModule::load(common::model("llama"), Device::Cpu).unwrap();
    let (ids, mask) = common::inputs();
    let g: hook_core::TokenGroups = "[(-1,)]".parse().unwrap();
    let cfg = hook_torch::ExtractionConfig { save_logits: false, ..Default::default() };
    let cfg = hook_torch::ExtractionConfig { attn_heads: hook_torch::AttnHeads::List(vec![hook_torch::LayerHead { layer: 0, head: 1 }]), ..cfg }
        .with_flags(&["resid_in", "attn_pattern"])
        .unwrap();
    let before = site_calls_on_this_thread();
    let (logits, full) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    let full_calls = site_calls_on_this_thread() - before;
    let before = site_calls_on_this_thread();
    let spec = hook_torch::RunSpec { extraction: Some(hook_torch::Extraction::new(&g, &cfg)), stop_early: true, ..Default::default() };
    let hook_torch::RunOutput { logits: none, cache: early } = m.run(&ids, &mask, spec).unwrap();
    let early_calls = site_calls_on_this_thread() - before;
    assert!(none.is_none(), "no logits when the forward stops early");
    assert!(early.same_as(&full), "stopping early changed the values");
    // resid_in of layer 1 is the last requested site: layer 1's inside, the final norm and the
    // LM head never ran
    assert!(early_calls < full_calls, "{early_calls} sites ran with stop_early, {full_calls} without");
    // the module is usable, with the same results
    assert!(m.forward(&ids, &mask).unwrap().equal(&logits));
    let (_, again) = m.run_with_cache(&ids, &mask, &g, &cfg).unwrap();
    assert!(again.same_as(&full));
    // logits need the end of the forward
    let with_logits = hook_torch::ExtractionConfig { save_logits: true, ..cfg.clone() };
    let spec = hook_torch::RunSpec { extraction: Some(hook_torch::Extraction::new(&g, &with_logits)), stop_early: true, ..Default::default() };
    assert!(m.run(&ids, &mask, spec).unwrap_err().to_string().contains("stop_early needs save_logits"));
}
