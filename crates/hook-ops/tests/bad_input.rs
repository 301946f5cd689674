//! Every kind of bad input the ops refuse, with the message a user sees.

use hook_core::{HeadSelection, TokenGroups};
use hook_ops::{heads, intervene, pattern, resid, HeadLayout, Patch, PatternAvg};
use tch::{Device, Kind, Tensor};

fn t(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn g(s: &str) -> TokenGroups {
    s.parse().unwrap()
}

fn msg<T: std::fmt::Debug>(r: hook_ops::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn token_position_out_of_range() {
    let e = msg(resid::resid(&t(&[1, 4, 8]), &g("[(1, 9)]"), false));
    assert_eq!(e, "token position 9 (group 0) is out of range for a sequence of length 4: valid positions are 0..4 or -4..-1");
    let e = msg(resid::resid(&t(&[1, 4, 8]), &g("[(-5,)]"), true));
    assert!(e.contains("token position -5"), "{e}");
}

#[test]
fn empty_groups() {
    assert_eq!("[]".parse::<TokenGroups>().unwrap_err().to_string(), "invalid token groups: no groups: expected at least one group such as [(-1,)]");
    assert!("[(0,), ()]".parse::<TokenGroups>().unwrap_err().to_string().contains("group 1 is empty"));
    let e = msg(intervene::resid(&t(&[1, 4, 8]), &[], Patch::Ablation));
    assert!(e.contains("token_indexes = [] is out of range: valid is at least one position"), "{e}");
}

#[test]
fn head_index_too_large() {
    let layout = HeadLayout::new(4, 2, 2).unwrap();
    let e = msg(heads::query_key_value(&t(&[1, 3, 8]), "head_queries_", 0, &layout, &g("[(0,)]"), HeadSelection::One(4), false));
    assert_eq!(e, "head 4 is out of range: the layer has 4 heads (valid: 0..4 or \"all\")");
    let e = msg(intervene::zero_heads(&t(&[1, 4, 3, 3]), &[1, 7]));
    assert_eq!(e, "head = 7 is out of range: valid is 0..4");
    let e = msg(intervene::query_key_value(&t(&[1, 3, 4]), &layout, &[0], HeadSelection::One(2), Patch::Ablation));
    assert!(e.contains("head 2 is out of range: the layer has 2 heads"), "{e}");
}

#[test]
fn partition_that_does_not_fit_the_pattern() {
    let p = t(&[1, 2, 5, 5]).softmax(-1, Kind::Float);
    let e = msg(pattern::attention_pattern(&p, 0, &g("[(0,), (1,)]"), Some(&g("[(2,), (5,)]")), HeadSelection::All, PatternAvg::Mean));
    assert!(e.contains("token position 5 (group 1) is out of range for a sequence of length 5"), "{e}");
    let e = msg(pattern::attention_pattern(&p, 0, &g("[(0, 1), (2,)]"), Some(&g("[(3,)]")), HeadSelection::All, PatternAvg::None));
    assert!(e.contains("column groups of one size"), "{e}");
}

#[test]
fn patching_values_of_the_wrong_shape() {
    let b = t(&[2, 5, 4]);
    let e = msg(intervene::resid(&b, &[0, 1], Patch::Values(&t(&[2, 3, 4]))));
    assert!(e.contains("patching_values has shape [2, 3, 4], expected [2, 2, 4]"), "{e}");
    let layout = HeadLayout::new(2, 2, 2).unwrap();
    let e = msg(intervene::query_key_value(&b, &layout, &[0], HeadSelection::One(0), Patch::Values(&t(&[2, 1, 3]))));
    assert!(e.contains("patching_values has shape [2, 1, 3], expected [2, 1, 2]"), "{e}");
    let e = msg(intervene::attention_matrix(&t(&[1, 2, 3, 3]), &[0], &[0], 0, 0.0, Patch::Values(&t(&[3, 4])), false));
    assert!(e.contains("patching_values has shape [3, 4], expected [3, 3]"), "{e}");
}

#[test]
fn heads_that_do_not_divide() {
    let e = msg(heads::split_heads(&t(&[1, 3, 10]), 4));
    assert_eq!(e, "head_dim = 4 does not divide the activation width = 10: the last axis must be heads * head_dim");
    let e = HeadLayout::new(6, 4, 8).unwrap_err().to_string();
    assert_eq!(e, "num_kv_heads = 4 does not divide num_heads = 6: grouped-query attention needs num_heads to be a multiple of num_kv_heads");
    let e = HeadLayout::from_groups(6, 4, 8).unwrap_err().to_string();
    assert!(e.contains("num_key_value_groups = 4 does not divide num_heads = 6"), "{e}");
}

#[test]
fn tensors_of_the_wrong_rank() {
    let e = msg(pattern::attention_pattern(&t(&[2, 5, 5]), 0, &g("[(0,)]"), None, HeadSelection::All, PatternAvg::None));
    assert_eq!(e, "attention pattern has shape [2, 5, 5], expected [batch, heads, query_len, key_len]");
    let e = msg(heads::repeat_kv(&t(&[2, 5, 5]), 2));
    assert!(e.contains("hidden_states has shape [2, 5, 5]"), "{e}");
    assert!("avg".parse::<PatternAvg>().unwrap_err().to_string().contains("one of \"none\", \"mean\", \"sum\", \"baseline_ratio\""));
}
