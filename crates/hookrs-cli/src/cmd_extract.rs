//! `hookrs extract`: the flags are [`hook_extract::ExtractOptions`]; the run is
//! [`hook_extract::run`], with a progress bar on the terminal.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

pub use hook_extract::ExtractOptions as Args;

/// A terminal bar: examples of the total when known (a spinner otherwise), chunks written.
struct Bar(ProgressBar, std::path::PathBuf);

impl hook_extract::Progress for Bar {
    fn start(&mut self, resumed: u64, total: Option<u64>) {
        if resumed > 0 {
            eprintln!("hookrs: resuming {} after {resumed} examples", self.1.display());
        }
        self.0 = match total {
            Some(n) if n > 1 => ProgressBar::new(n),
            Some(_) => ProgressBar::hidden(),
            None => ProgressBar::new_spinner(),
        };
        let template = if total.is_some() { "{bar:30} {pos}/{len} examples, {per_sec}, ETA {eta} {msg}" } else { "{spinner} {pos} examples, {per_sec} {msg}" };
        self.0.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        self.0.set_position(resumed);
        self.0.reset_eta();
    }

    fn advance(&mut self, done: u64, _: Option<u64>) {
        self.0.set_position(done);
    }

    fn chunk_written(&mut self, chunks: usize) {
        self.0.set_message(format!("{chunks} chunks"));
    }
}

pub fn run(a: Args) -> Result<()> {
    let job = a.validate(|k| std::env::var(k).ok()).map_err(crate::from_extract)?;
    let out = job.out.clone();
    let mut bar = Bar(ProgressBar::hidden(), out.clone());
    let r = hook_extract::run(job, &mut bar).map_err(crate::from_extract)?;
    bar.0.finish_and_clear();
    if r.already_complete {
        println!("{} is already complete: {} examples in {} chunks (--overwrite starts over)", out.display(), r.examples, r.chunks.unwrap_or(0));
        return Ok(());
    }
    let rate = r.tokens as f64 / r.seconds.max(1e-9);
    let padding = r.computed_tokens as f64 / r.tokens.max(1) as f64;
    match r.chunks {
        None => {
            print!("{}", r.table.unwrap_or_default());
            println!("{} prompts, {} tokens in {:.2} s: {rate:.0} tokens/s, padding {padding:.3} computed/real tokens -> {}", r.examples_run, r.tokens, r.seconds, out.display());
        }
        Some(chunks) => println!(
            "{} examples ({} this run), {} tokens in {:.2} s: {rate:.0} tokens/s, padding {padding:.3} computed/real tokens -> {} ({chunks} chunks)",
            r.examples, r.examples_run, r.tokens, r.seconds, out.display()
        ),
    }
    Ok(())
}
