//! Aggregating N batches of a 32-layer residual cache (`resid_out_0..31`, each `[4, 1, 512]`
//! float32) with `cat`: criterion reports time per batch (Throughput::Elements(N)), which must
//! stay flat from 10 to 1,000 batches (amortised concatenation, not `cat(old, new)` per batch).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hook_cache::ActivationCache;
use tch::{Device, Kind, Tensor};

fn batch() -> ActivationCache {
    let mut c = ActivationCache::new();
    for l in 0..32 {
        c.insert(format!("resid_out_{l}"), Tensor::randn([4, 1, 512], (Kind::Float, Device::Cpu)));
    }
    c.insert("mapping_index", serde_json::json!({"last": [0]}));
    c
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(2);
    let one = batch();
    let mut group = c.benchmark_group("cat_batches");
    group.sample_size(10);
    for n in [10u64, 100, 1000] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let mut all = ActivationCache::new();
                for _ in 0..n {
                    all.cat(one.clone()).expect("same keys");
                }
                all
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
