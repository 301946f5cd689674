//! # hook-parity
//!
//! The Rust side of the parity harness (`cargo xtask parity`): Python scripts in
//! `xtask/python/` run the real easyroutine 1.1.5 and write cases; one runner per suite
//! (`src/bin/parity_{ops,cache,models,lens}.rs`) runs hookrs on the same inputs, prints a
//! table and writes its section of `docs/parity.md`. What the runners share lives here, once:
//!
//! | module | what it holds |
//! |---|---|
//! | [`args`] | [`Args`]: `CASE_DIR [--write FILE] [--section NAME]` |
//! | [`tolerance`] | [`Tol`]: a bound relative to each entry's magnitude; [`compare`] of two key-ordered entry maps |
//! | [`flatten`] | [`flat_cache`]: an `ActivationCache` as `key/sub/…` → tensor, in order |
//! | [`tally`] | [`Verdict`] of one row, [`Tally`] of a suite |
//! | [`report`] | [`publish`] a table (printed, and into [`write_section`] of a markdown file), [`exit_code`] of a runner |

pub mod args;
pub mod flatten;
pub mod report;
pub mod tally;
pub mod tolerance;

pub use args::Args;
pub use flatten::{flat_cache, flatten};
pub use report::{exit_code, publish, write_section};
pub use tally::{Tally, Verdict};
pub use tolerance::{compare, relative_diff, Tol};
