//! Seeded mutation fuzzing of the parsers users feed by hand: token groups (Python tuple and
//! JSON forms), component paths, head selections. Every input must give `Ok` or `Err`, never a
//! panic. `HOOKRS_FUZZ_SECS` sets the time budget (`cargo xtask fuzz core --secs N`); the
//! default is a short fixed number of inputs, as CI runs it. A failing input is printed with
//! its seed: add it to `REGRESSIONS`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hook_core::{ComponentPath, HeadSelection, TokenGroups};

/// Inputs that once failed (none yet) and edge cases worth keeping.
const REGRESSIONS: &[&str] = &[
    "", "[", "]", "()", "[()]", "[(,)]", "[(-0,)]", "[(9223372036854775807,)]", "[(-9223372036854775808,)]", "[[]]", "[[1,2],[", "((((((((",
    "model.layers[", "model.layers[99999999999999999999].output", "a..b", "[0]", "L0H", "all", "L-1H0", "\u{0}", "é[ü]",
];

const SEEDS: &[&str] = &["[(0, 1), (-1,)]", "[[0,1],[-1]]", "[(5,), (-3, -2)]", "model.layers[3].self_attn.q_proj.output", "model.norm.input", "all", "[0, 2]", "L1H0,L2H3"];
const ALPHABET: &[u8] = b"[](),.-0123456789 aeLHlmorstyx_\"'{}:";

type Rng = hook_core::rng::SplitMix64;

/// A mutation of a seed: insert, delete, replace or duplicate bytes, or splice two seeds.
fn mutate(rng: &mut Rng) -> String {
    let mut b: Vec<u8> = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(b.len() + 1);
        match rng.below(5) {
            0 => b.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
            1 if !b.is_empty() => {
                b.remove(at.min(b.len() - 1));
            }
            2 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = ALPHABET[rng.below(ALPHABET.len())];
            }
            3 => {
                let piece = b[at..].to_vec();
                b.extend(piece);
            }
            _ => b.extend_from_slice(SEEDS[rng.below(SEEDS.len())].as_bytes()),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn check(input: &str) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _ = TokenGroups::from_str(input);
        let _ = serde_json::from_str::<TokenGroups>(input);
        let _ = ComponentPath::from_str(input);
        let _ = HeadSelection::from_str(input);
        if let Ok(g) = TokenGroups::from_str(input) {
            // what parses prints and parses back to the same groups
            assert_eq!(TokenGroups::from_str(&g.to_string()).ok(), Some(g), "round trip of {input:?}");
        }
    }));
    assert!(r.is_ok(), "a parser panicked on {input:?}");
}

#[test]
fn parsers_never_panic_on_mutated_input() {
    for r in REGRESSIONS {
        check(r);
    }
    let budget = std::env::var("HOOKRS_FUZZ_SECS").ok().and_then(|s| s.parse::<u64>().ok());
    let started = Instant::now();
    let mut rng = Rng::new(0x5EED);
    let mut n = 0u64;
    while match budget {
        Some(secs) => started.elapsed() < Duration::from_secs(secs),
        None => n < 20_000,
    } {
        let input = mutate(&mut rng);
        check(&input);
        n += 1;
    }
    eprintln!("fuzz core: {n} inputs, no panic");
}
