//! `hookrs sites`: the hookable components of a model, grouped by layer.

use std::path::Path;

use anyhow::Result;
use hook_torch::HookedModule;
use tch::Device;

pub fn run(model: &Path, json: bool) -> Result<()> {
    let m = HookedModule::load(model, Device::Cpu)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"description": m.description(), "sites": m.sites()}))?);
        return Ok(());
    }
    match m.description() {
        Some(d) => println!(
            "{} ({}): {} layers, {} heads / {} kv heads, head_dim {}, hidden {}, vocab {}",
            d.architecture, d.source, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.hidden_size, d.vocab_size
        ),
        None => println!("{} (no hookrs description: component templates unknown)", model.display()),
    }
    let mut current: Option<Option<usize>> = None;
    for s in m.sites() {
        if current != Some(s.layer) {
            current = Some(s.layer);
            match s.layer {
                Some(l) => println!("layer {l}:"),
                None => println!("outside the layers:"),
            }
        }
        println!("  {}", s.component);
    }
    println!("{} sites", m.sites().len());
    Ok(())
}
