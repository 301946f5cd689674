//! Where prompts come from (`text`, a `prompts` file, `input_ids`), the tokenizer beside the
//! model, and the stream of tokenized examples a reader thread produces ahead of the model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

use crate::ExtractError;

/// The tokenizer files looked for beside `model`, in order.
pub fn tokenizer_candidates(model: &Path) -> Vec<PathBuf> {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = model.parent().unwrap_or(Path::new("."));
    vec![dir.join(format!("{stem}.tokenizer.json")), dir.join("tokenizer.json")]
}

/// The tokenizer beside `model`, if there is one.
pub fn tokenizer_for(model: &Path) -> Result<Option<Tokenizer>> {
    for p in tokenizer_candidates(model) {
        if p.is_file() {
            return Tokenizer::from_file(&p).map(Some).map_err(|e| anyhow::anyhow!("cannot read the tokenizer {}: {e}", p.display()));
        }
    }
    Ok(None)
}

fn require_tokenizer(model: &Path, flag: &str) -> Result<Tokenizer> {
    tokenizer_for(model)?.ok_or_else(|| {
        let looked: Vec<String> = tokenizer_candidates(model).iter().map(|p| p.display().to_string()).collect();
        anyhow::anyhow!("{flag} needs a tokenizer, and {} has none (looked for {}): pass token ids with --input-ids '[[1,5,9]]' instead", model.display(), looked.join(", "))
    })
}

/// One example: its token ids and, when a tokenizer made them, its string tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<i64>,
    pub tokens: Option<Vec<String>>,
}

/// Tokenizes one text. `special`: add the special tokens the tokenizer's post-processor adds
/// (a BOS for Llama, Gemma, …), as `tokenizer(text)` does by default in `transformers`.
pub fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Example> {
    let enc = tok.encode(text, special).map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?;
    if enc.get_ids().is_empty() {
        bail!("the prompt {text:?} has no tokens");
    }
    Ok(Example { ids: enc.get_ids().iter().map(|&i| i as i64).collect(), tokens: Some(enc.get_tokens().to_vec()) })
}

/// Where prompts come from: exactly one of `--text`, `--prompts`, `--input-ids`.
#[derive(Debug)]
pub enum Source {
    /// `--input-ids`: token ids, one list per example.
    Ids(Vec<Vec<i64>>),
    /// `--text`: prompts given on the command line.
    Texts(Vec<String>),
    /// `--prompts FILE`: a text file (one prompt per line), JSONL, or Parquet, read as a stream.
    File { path: PathBuf, column: String, on_bad_line: BadLine },
}

/// What to do with a line of a prompt file that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BadLine {
    /// Stop with an error naming the file and line (the default).
    #[default]
    Stop,
    /// Skip it with a warning.
    Skip,
}

impl Source {
    /// The source named by the flags; exactly one must be given.
    ///
    /// ```
    /// use hook_extract::{BadLine, Source};
    /// let s = Source::from_flags(&[], None, Some(&[vec![1, 5, 9]]), "text", BadLine::Stop).unwrap();
    /// assert_eq!(s.count().unwrap(), 1);
    /// let e = Source::from_flags(&["a".into()], None, Some(&[vec![1]]), "text", BadLine::Stop).unwrap_err();
    /// assert!(e.is_invalid() && e.to_string().contains("exactly one"));
    /// ```
    pub fn from_flags(text: &[String], prompts: Option<&Path>, input_ids: Option<&[Vec<i64>]>, column: &str, on_bad_line: BadLine) -> Result<Source, ExtractError> {
        let given = usize::from(!text.is_empty()) + usize::from(prompts.is_some()) + usize::from(input_ids.is_some());
        if given != 1 {
            return Err(ExtractError::invalid(format!("give exactly one of --text, --prompts or --input-ids (got {given})")));
        }
        if let Some(ids) = input_ids {
            if ids.is_empty() || ids.iter().any(Vec::is_empty) {
                return Err(ExtractError::invalid("--input-ids needs at least one example, each with at least one token"));
            }
            return Ok(Source::Ids(ids.to_vec()));
        }
        if !text.is_empty() {
            return Ok(Source::Texts(text.to_vec()));
        }
        let path = prompts.expect("counted").to_path_buf();
        if !path.is_file() {
            return Err(anyhow::anyhow!("--prompts {}: no such file", path.display()).into());
        }
        Ok(Source::File { path, column: column.to_string(), on_bad_line })
    }

    /// SHA-256 of what the examples are made from (the file's bytes, streamed; the ids; the
    /// texts): a resumed extraction must read the same input.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        match self {
            Source::Ids(ids) => h.update(serde_json::to_vec(ids)?),
            Source::Texts(t) => h.update(serde_json::to_vec(t)?),
            Source::File { path, column, .. } => {
                let mut f = std::fs::File::open(path).with_context(|| format!("reading --prompts {}", path.display()))?;
                std::io::copy(&mut f, &mut h).with_context(|| format!("reading --prompts {}", path.display()))?;
                h.update(column.as_bytes());
            }
        }
        let what = match self {
            Source::Ids(ids) => format!("{} examples of --input-ids", ids.len()),
            Source::Texts(t) => format!("{} --text prompts", t.len()),
            Source::File { path, column, .. } => format!("{}, column {column}", path.display()),
        };
        Ok(format!("sha256:{:x} ({what})", h.finalize()))
    }

    /// How many examples the input holds, when that is known without reading a file.
    pub fn known_len(&self) -> Option<u64> {
        match self {
            Source::Ids(ids) => Some(ids.len() as u64),
            Source::Texts(t) => Some(t.len() as u64),
            Source::File { .. } => None,
        }
    }

    /// How many examples the input holds (a pass that parses but does not tokenize; a bad line
    /// is counted as `--on-bad-line` says: an error, or skipped).
    pub fn count(&self) -> Result<u64> {
        match self {
            Source::Ids(ids) => Ok(ids.len() as u64),
            Source::Texts(t) => Ok(t.len() as u64),
            Source::File { path, .. } if is_parquet(path) => {
                use parquet::file::reader::FileReader;
                let r = parquet::file::serialized_reader::SerializedFileReader::try_from(path.as_path())
                    .map_err(|e| anyhow::anyhow!("--prompts {}: not a readable Parquet file: {e}", path.display()))?;
                Ok(r.metadata().file_metadata().num_rows().max(0) as u64)
            }
            Source::File { path, column, on_bad_line } => {
                use std::io::BufRead;
                let f = std::fs::File::open(path).with_context(|| format!("reading --prompts {}", path.display()))?;
                let mut n = 0u64;
                for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                    let at = format!("{}:{}", path.display(), i + 1);
                    let line = line.map_err(|e| anyhow::anyhow!("{at}: cannot read the line: {e}"))?;
                    match parse_line(line.trim(), column) {
                        Ok(Some(_)) => n += 1,
                        Ok(None) => {}
                        Err(_) if *on_bad_line == BadLine::Skip => {}
                        Err(e) => return Err(anyhow::anyhow!("{at}: {e:#}").context("use --on-bad-line skip to skip such lines")),
                    }
                }
                Ok(n)
            }
        }
    }

    /// The examples in dataset order, after the first `skip`, produced by a reader thread that
    /// reads and tokenizes ahead of the caller (a bounded queue: memory does not grow with the
    /// file). Errors arrive in the stream, in order.
    pub fn stream(self, model: &Path, skip: u64, special: bool) -> Result<std::sync::mpsc::Receiver<Result<Example>>> {
        let needs_tokenizer = !matches!(self, Source::Ids(_));
        let tok = if needs_tokenizer {
            Some(require_tokenizer(model, if matches!(self, Source::Texts(_)) { "--text" } else { "--prompts" })?)
        } else {
            None
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Example>>(4096);
        std::thread::spawn(move || {
            let send = |e: Result<Example>| tx.send(e).is_ok();
            match self {
                Source::Ids(ids) => {
                    for ids in ids.into_iter().skip(skip as usize) {
                        if !send(Ok(Example { ids, tokens: None })) {
                            return;
                        }
                    }
                }
                Source::Texts(texts) => {
                    for t in texts.iter().skip(skip as usize) {
                        if !send(encode(tok.as_ref().expect("tokenizer"), t, special)) {
                            return;
                        }
                    }
                }
                Source::File { path, column, on_bad_line } if is_parquet(&path) => {
                    let mut seen = 0u64;
                    let result = each_parquet_row(&path, &column, &mut |row, line| {
                        let at = format!("{}: row {row}", path.display());
                        let example = match line {
                            Ok(x) => x,
                            Err(e) if on_bad_line == BadLine::Skip => {
                                eprintln!("hookrs: warning: skipping {at}: {e:#}");
                                return true;
                            }
                            Err(e) => {
                                send(Err(anyhow::anyhow!("{at}: {e:#}").context("use --on-bad-line skip to skip such rows")));
                                return false;
                            }
                        };
                        seen += 1;
                        if seen <= skip {
                            return true;
                        }
                        let made = match example {
                            Line::Ids(ids) => Ok(Example { ids, tokens: None }),
                            Line::Text(t) => encode(tok.as_ref().expect("tokenizer"), &t, special).map_err(|e| anyhow::anyhow!("{at}: {e:#}")),
                        };
                        send(made)
                    });
                    if let Err(e) = result {
                        send(Err(e));
                    }
                }
                Source::File { path, column, on_bad_line } => {
                    use std::io::BufRead;
                    let file = match std::fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) => {
                            send(Err(anyhow::anyhow!("reading --prompts {}: {e}", path.display())));
                            return;
                        }
                    };
                    let mut seen = 0u64;
                    let mut any = false;
                    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                        let at = format!("{}:{}", path.display(), n + 1);
                        let example = line
                            .map_err(|e| anyhow::anyhow!("{at}: cannot read the line: {e}"))
                            .and_then(|l| parse_line(l.trim(), &column).map_err(|e| anyhow::anyhow!("{at}: {e}")));
                        let example = match example {
                            Ok(None) => continue, // blank line
                            Ok(Some(x)) => x,
                            Err(e) if on_bad_line == BadLine::Skip => {
                                tracing::warn!("skipping {e:#}");
                                eprintln!("hookrs: warning: skipping {e:#}");
                                continue;
                            }
                            Err(e) => {
                                send(Err(e.context("use --on-bad-line skip to skip such lines")));
                                return;
                            }
                        };
                        any = true;
                        seen += 1;
                        if seen <= skip {
                            continue;
                        }
                        let made = match example {
                            Line::Ids(ids) => Ok(Example { ids, tokens: None }),
                            Line::Text(t) => encode(tok.as_ref().expect("tokenizer"), &t, special).map_err(|e| anyhow::anyhow!("{at}: {e:#}")),
                        };
                        if !send(made) {
                            return;
                        }
                    }
                    if !any {
                        send(Err(anyhow::anyhow!("{} holds no prompts", path.display())));
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Calls `f(row number (1-based), the row's prompt)` for every row of a Parquet file, a row
/// group at a time (the file is never loaded whole), until `f` returns false. The prompt is
/// the `column` field: a string, or a list of integer token ids.
fn each_parquet_row(path: &Path, column: &str, f: &mut dyn FnMut(usize, Result<Line>) -> bool) -> Result<()> {
    use parquet::file::reader::FileReader;
    use parquet::record::Field;
    let r = parquet::file::serialized_reader::SerializedFileReader::try_from(path)
        .map_err(|e| anyhow::anyhow!("--prompts {}: not a readable Parquet file: {e}", path.display()))?;
    let columns: Vec<String> = r.metadata().file_metadata().schema_descr().root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    if !columns.iter().any(|c| c == column) {
        bail!("--prompts {}: no column {column:?} (it has {}): choose one with --column", path.display(), columns.join(", "));
    }
    let rows = r.get_row_iter(None).map_err(|e| anyhow::anyhow!("--prompts {}: {e}", path.display()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow::anyhow!("{}: row {}: unreadable: {e}", path.display(), i + 1))?;
        let field = row.get_column_iter().find(|(name, _)| name.as_str() == column).map(|(_, v)| v.clone());
        let as_id = |x: &Field| -> Option<i64> {
            match x {
                Field::Long(v) => Some(*v),
                Field::Int(v) => Some(*v as i64),
                Field::Short(v) => Some(*v as i64),
                Field::Byte(v) => Some(*v as i64),
                Field::UInt(v) => Some(*v as i64),
                Field::UShort(v) => Some(*v as i64),
                Field::UByte(v) => Some(*v as i64),
                Field::ULong(v) => i64::try_from(*v).ok(),
                _ => None,
            }
        };
        let line = match field {
            Some(Field::Str(t)) if !t.trim().is_empty() => Ok(Line::Text(t)),
            Some(Field::Str(_)) => Err(anyhow::anyhow!("column {column:?} is empty")),
            Some(Field::ListInternal(l)) => match l.elements().iter().map(as_id).collect::<Option<Vec<i64>>>() {
                Some(ids) if !ids.is_empty() => Ok(Line::Ids(ids)),
                _ => Err(anyhow::anyhow!("column {column:?} is a list but not a non-empty list of integer token ids")),
            },
            Some(other) => Err(anyhow::anyhow!("column {column:?} holds {other}, expected a string or a list of token ids")),
            None => Err(anyhow::anyhow!("column {column:?} is missing")),
        };
        if !f(i + 1, line) {
            return Ok(());
        }
    }
    Ok(())
}

/// One line of a prompt file: a text, or pre-tokenized ids.
enum Line {
    Text(String),
    Ids(Vec<i64>),
}

/// A JSONL line (an object whose `column` is a string, or a list of token ids) or a plain
/// text line. `None` for a blank line.
fn parse_line(line: &str, column: &str) -> Result<Option<Line>> {
    if line.is_empty() {
        return Ok(None);
    }
    if !line.starts_with('{') {
        return Ok(Some(Line::Text(line.to_string())));
    }
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON: {e}"))?;
    match v.get(column) {
        Some(serde_json::Value::String(t)) => Ok(Some(Line::Text(t.clone()))),
        Some(serde_json::Value::Array(a)) => {
            let ids: Option<Vec<i64>> = a.iter().map(|x| x.as_i64()).collect();
            match ids {
                Some(ids) if !ids.is_empty() => Ok(Some(Line::Ids(ids))),
                _ => bail!("field {column:?} is a list but not a non-empty list of token ids"),
            }
        }
        _ => bail!("a JSONL line needs a field {column:?} holding a string or a list of token ids (set the field with --column)"),
    }
}


