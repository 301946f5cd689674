//! A cache holding only plain data (no tensor) saves and loads, in every container.

use hook_cache::{ActivationCache, CacheValue};

#[test]
fn data_only_caches_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ActivationCache::new();
    c.insert("t", CacheValue::Tuple(vec![CacheValue::Data(1.into()), CacheValue::Data(2.into())]));
    c.insert("l", CacheValue::List(vec![CacheValue::Tuple(vec![CacheValue::Data(1.into())]), CacheValue::Data("x".into())]));
    c.insert("d", serde_json::json!({"a": [1, 2]}));
    let path = dir.path().join("c.safetensors");
    c.save(&path).unwrap();
    let back = ActivationCache::load(&path).unwrap();
    assert!(back.same_as(&c));
    assert!(matches!(back.get("t"), Some(CacheValue::Tuple(items)) if items.len() == 2));
    let empty = ActivationCache::new();
    empty.save(dir.path().join("e.safetensors")).unwrap();
    assert_eq!(ActivationCache::load(dir.path().join("e.safetensors")).unwrap().len(), 0);
}
