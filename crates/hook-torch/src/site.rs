//! [`SiteInfo`]: one hookable place of an instrumented module.

use hook_core::{ComponentPath, Segment, Site};
use serde::Serialize;

/// What a site observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// A module's first tensor input (`….input`).
    Input,
    /// A module's output, or element 0 of its tuple output (`….output`).
    Output,
    /// The attention pattern, the softmax output inside an attention module
    /// (`….attention_matrix_hook.output`).
    AttentionMatrix,
    /// The scores the softmax reads (`….attention_matrix_pre_softmax_hook.output`).
    AttentionMatrixPreSoftmax,
}

/// A hookable site: its id in the rewritten graphs, its component name, its module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteInfo {
    /// Id passed to `hookrs::point`.
    pub id: usize,
    /// easyroutine-style name, e.g. `model.layers[0].self_attn.output`.
    pub component: String,
    /// torch module path, e.g. `model.layers.0.self_attn`.
    pub module: String,
    /// What it observes.
    pub kind: SiteKind,
    /// The layer, when the module is inside one.
    pub layer: Option<usize>,
    #[serde(skip)]
    pub(crate) path: ComponentPath,
}

impl SiteInfo {
    pub(crate) fn new(id: usize, module: &str, kind_text: &str) -> Option<Self> {
        let (kind, extra, site) = match kind_text {
            "input" => (SiteKind::Input, None, Site::Input),
            "output" => (SiteKind::Output, None, Site::Output),
            "attention_matrix" => (SiteKind::AttentionMatrix, Some("attention_matrix_hook"), Site::Output),
            "attention_matrix_pre_softmax" => (SiteKind::AttentionMatrixPreSoftmax, Some("attention_matrix_pre_softmax_hook"), Site::Output),
            _ => return None, // a second softmax in one module: not exposed under easyroutine's names
        };
        let mut p = ComponentPath::from_module_path(module, None).ok()?;
        if let Some(extra) = extra {
            let mut segs = p.segments().to_vec();
            segs.push(Segment::Name(extra.into()));
            p = ComponentPath::new(segs, None);
        }
        let path = p.with_site(Some(site));
        Some(SiteInfo { id, component: path.to_string(), module: module.to_string(), kind, layer: path.layer(), path })
    }

    /// The parsed component path.
    pub fn path(&self) -> &ComponentPath {
        &self.path
    }
}
