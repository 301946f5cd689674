//! Block reduction of attention patterns (`attention_pattern_head` with averaging):
//! B=4, H=8, S=128, G row groups × G column groups, all heads, 2 threads — the case whose
//! easyroutine cost is measured in `cargo xtask bench ops`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hook_core::{HeadSelection, TokenGroups};
use hook_ops::pattern::attention_pattern;
use hook_ops::PatternAvg;
use tch::{Device, Kind, Tensor};

fn groups(g: i64, s: i64) -> TokenGroups {
    if g == 1 {
        return TokenGroups::new(vec![vec![s - 1]]).expect("one group");
    }
    TokenGroups::new((0..g).map(|i| (i * s / g..(i + 1) * s / g).collect()).collect()).expect("groups")
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let (b, h, s) = (4, 8, 128);
    let p = Tensor::randn([b, h, s, s], (Kind::Float, Device::Cpu)).softmax(-1, Kind::Float);
    let mut group = c.benchmark_group("attention_pattern_blocks");
    for g in [1, 4, 16, 32] {
        let tg = groups(g, s);
        for mode in [PatternAvg::Mean, PatternAvg::BaselineRatio] {
            group.bench_with_input(BenchmarkId::new(mode.to_string(), g), &tg, |bench, tg| {
                bench.iter(|| attention_pattern(&p, 0, tg, Some(tg), HeadSelection::All, mode).expect("valid case"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
