//! Shards: one of N contiguous ranges of a dataset's examples, so that N processes (a Slurm
//! array, a Kubernetes Indexed Job) split one extraction; `hookrs merge` joins their outputs.

use crate::{ExtractError, Result};

/// One of `count` contiguous ranges of examples.
///
/// ```
/// let s = hook_extract::Shard { index: 1, count: 4 };
/// assert_eq!(s.range(10), (2, 5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which range, from 0.
    pub index: usize,
    /// How many ranges the dataset is cut into.
    pub count: usize,
}

impl Shard {
    /// The examples `[lo, hi)` of this shard among `total`.
    pub fn range(&self, total: u64) -> (u64, u64) {
        let (k, n) = (self.index as u128, self.count as u128);
        ((total as u128 * k / n) as u64, (total as u128 * (k + 1) / n) as u64)
    }

    /// `K/N`, or `auto` from the scheduler's environment (`env` looks a variable up: Slurm's
    /// `SLURM_ARRAY_TASK_ID`/`_MIN`/`_COUNT`, or Kubernetes' `JOB_COMPLETION_INDEX` with
    /// `shard_count`).
    ///
    /// ```
    /// use hook_extract::Shard;
    /// assert_eq!(Shard::parse("2/4", None, |_| None).unwrap(), Shard { index: 2, count: 4 });
    /// let slurm = |k: &str| match k { "SLURM_ARRAY_TASK_ID" => Some("3".into()), "SLURM_ARRAY_TASK_COUNT" => Some("8".into()), _ => None };
    /// assert_eq!(Shard::parse("auto", None, slurm).unwrap(), Shard { index: 3, count: 8 });
    /// assert!(Shard::parse("4/4", None, |_| None).unwrap_err().is_invalid());
    /// ```
    pub fn parse(s: &str, shard_count: Option<usize>, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let bad = |m: String| ExtractError::Invalid(m);
        let num = |name: &str, v: String| -> Result<usize> { v.trim().parse().map_err(|_| bad(format!("--shard auto: {name}={v:?} is not a number"))) };
        let (k, n) = if s.trim() == "auto" {
            if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
                let id = num("SLURM_ARRAY_TASK_ID", id)?;
                let min = env("SLURM_ARRAY_TASK_MIN").map(|v| num("SLURM_ARRAY_TASK_MIN", v)).transpose()?.unwrap_or(0);
                let count = env("SLURM_ARRAY_TASK_COUNT")
                    .map(|v| num("SLURM_ARRAY_TASK_COUNT", v))
                    .transpose()?
                    .or(shard_count)
                    .ok_or_else(|| bad("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --shard-count N".into()))?;
                (id.checked_sub(min).ok_or_else(|| bad(format!("--shard auto: SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")))?, count)
            } else if let Some(id) = env("JOB_COMPLETION_INDEX") {
                let count = shard_count.ok_or_else(|| bad("--shard auto under a Kubernetes Indexed Job needs --shard-count N (the job's completions)".into()))?;
                (num("JOB_COMPLETION_INDEX", id)?, count)
            } else {
                return Err(bad("--shard auto: neither SLURM_ARRAY_TASK_ID (a Slurm array) nor JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set: pass --shard K/N".into()));
            }
        } else {
            let (k, n) = s.split_once('/').ok_or_else(|| bad(format!("--shard {s:?}: expected K/N, e.g. 0/4, or auto")))?;
            (k.trim().parse().map_err(|_| bad(format!("--shard {s:?}: K is not a number")))?, n.trim().parse().map_err(|_| bad(format!("--shard {s:?}: N is not a number")))?)
        };
        if n == 0 || k >= n {
            return Err(bad(format!("--shard {s}: expected 0 <= K < N (got K={k}, N={n})")));
        }
        Ok(Shard { index: k, count: n })
    }
}
