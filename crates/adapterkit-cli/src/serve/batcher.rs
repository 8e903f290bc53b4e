//! One queue of requests and the thread that runs them: it takes requests from the queue, up
//! to `--max-batch-tokens` padded tokens, and runs them in one forward pass: predictions
//! whatever their adapters ([`AdapterSet::predict`](adapterkit::adapter_set::AdapterSet::predict)), requests of one setup, embeddings of one
//! kind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapterkit::adapter_set::ServedAdapter;
use adapterkit::batch::{Batch, Encoded};
use adapterkit::methods::composition::Setup;
use adapterkit::pooling::Pooling;
use adapterkit::predictor::Prediction;
use tokio::sync::oneshot;

use super::errors::ApiError;
use super::metrics::Metrics;
use super::registry::{Missing, Registry};

pub enum Work {
    /// Through one adapter: mixed with other requests into one pass.
    Predict { adapter: String },
    /// Under a composition setup over served adapters.
    Setup { setup: Setup },
    /// Pooled states, of the model or of an adapter.
    Embed {
        adapter: Option<String>,
        pooling: Pooling,
        normalize: bool,
    },
}

pub enum Answer {
    Predictions(Vec<Prediction>),
    Tasks(Vec<BTreeMap<String, Prediction>>),
    Embeddings(Vec<Vec<f32>>),
}

pub struct Job {
    pub work: Work,
    pub rows: Vec<Encoded>,
    pub reply: oneshot::Sender<Result<Answer, ApiError>>,
}

impl Job {
    fn longest(&self) -> usize {
        self.rows.iter().map(|r| r.ids.len()).max().unwrap_or(0)
    }

    /// Whether `other` can run in one pass with this job: predictions through single adapters
    /// always; the same setup (unless it splits the batch by absolute sizes); embeddings of
    /// the same kind.
    fn joins(&self, other: &Job) -> bool {
        match (&self.work, &other.work) {
            (Work::Predict { .. }, Work::Predict { .. }) => true,
            (Work::Setup { setup: a }, Work::Setup { setup: b }) => a == b && !splits(a),
            (
                Work::Embed {
                    adapter: a,
                    pooling: p,
                    normalize: n,
                },
                Work::Embed {
                    adapter: b,
                    pooling: q,
                    normalize: m,
                },
            ) => a == b && p == q && n == m,
            _ => false,
        }
    }
}

/// Whether a setup holds a BatchSplit, whose sizes fit one request's texts only.
fn splits(setup: &Setup) -> bool {
    let mut found = false;
    setup.visit(&mut |s| found |= matches!(s, Setup::BatchSplit { .. }));
    found
}

/// The sending end: full means 429.
#[derive(Clone)]
pub struct Queue {
    sender: SyncSender<Job>,
    depth: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
}

pub enum Refused {
    Full,
    Closed,
}

impl Queue {
    pub fn push(&self, job: Job) -> Result<(), Refused> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        let sent = self.sender.try_send(job);
        if sent.is_err() {
            self.depth.fetch_sub(1, Ordering::SeqCst);
        }
        self.metrics
            .queue_depth
            .set(self.depth.load(Ordering::SeqCst));
        sent.map_err(|e| match e {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Disconnected(_) => Refused::Closed,
        })
    }
}

/// A queue of `capacity` requests and its receiving end, for [`run`].
pub fn queue(capacity: usize, metrics: Arc<Metrics>) -> (Queue, Taker) {
    let (sender, receiver) = mpsc::sync_channel(capacity);
    let depth = Arc::new(AtomicI64::new(0));
    let taker = Taker {
        receiver,
        depth: depth.clone(),
        metrics: metrics.clone(),
        held: None,
        last_jobs: 0,
    };
    let queue = Queue {
        sender,
        depth,
        metrics,
    };
    (queue, taker)
}

pub struct Taker {
    receiver: Receiver<Job>,
    depth: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
    /// A job taken that did not fit the last batch: the first of the next.
    held: Option<Job>,
    /// Requests in the last batch: more than one means clients are waiting side by side.
    last_jobs: usize,
}

/// With clients side by side, the answers to one batch go out together and their next
/// requests arrive over the next millisecond or two; a batch started on the first of them
/// would run half-empty, and the one after it too. So while more keep coming, within this gap
/// of each other, the batch waits for them, up to [`MOST_WAIT`] in all. A lone client (one
/// request a batch) never waits.
const ARRIVAL_GAP: Duration = Duration::from_micros(1000);
const MOST_WAIT: Duration = Duration::from_millis(5);

impl Taker {
    fn took(&self, job: Job) -> Job {
        let depth = self.depth.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.queue_depth.set(depth);
        job
    }

    /// The next batch: jobs that run in one pass ([`Job::joins`]), in queue order, up to
    /// `max_tokens` padded tokens. `None` once every sender is gone and the queue is empty.
    fn next_batch(&mut self, max_tokens: usize) -> Option<Vec<Job>> {
        let first = match self.held.take() {
            Some(job) => job,
            None => self.took(self.receiver.recv().ok()?),
        };
        let (mut rows, mut longest) = (first.rows.len(), first.longest());
        let mut batch = vec![first];
        let wait_until = Instant::now() + MOST_WAIT;
        loop {
            let next = match self.receiver.try_recv() {
                Ok(job) => Ok(job),
                Err(_) if self.last_jobs > 1 => {
                    let gap = ARRIVAL_GAP.min(wait_until.saturating_duration_since(Instant::now()));
                    self.receiver.recv_timeout(gap).map_err(|_| ())
                }
                Err(_) => Err(()),
            };
            let Ok(job) = next else { break };
            let job = self.took(job);
            let longest_with = longest.max(job.longest());
            let fits = (rows + job.rows.len()) * longest_with <= max_tokens;
            if !batch[0].joins(&job) || !fits {
                self.held = Some(job);
                break;
            }
            rows += job.rows.len();
            longest = longest_with;
            batch.push(job);
        }
        self.last_jobs = batch.len();
        Some(batch)
    }
}

/// Runs batches until the queue is closed and empty (the server has shut down).
pub fn run(mut taker: Taker, registry: Arc<Registry>, max_tokens: usize) {
    while let Some(jobs) = taker.next_batch(max_tokens) {
        let metrics = taker.metrics.clone();
        let rows: usize = jobs.iter().map(|j| j.rows.len()).sum();
        let longest = jobs.iter().map(Job::longest).max().unwrap_or(0);
        metrics.batch_sequences.observe(rows as f64);
        metrics.batch_tokens.observe((rows * longest) as f64);
        let started = Instant::now();
        if matches!(jobs[0].work, Work::Predict { .. }) {
            predict_mixed(jobs, &registry);
        } else {
            run_together(jobs, &registry);
        }
        metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

fn adapter(registry: &Registry, name: &str) -> Result<Arc<ServedAdapter>, ApiError> {
    registry.get(name).map_err(|m| match m {
        Missing::Unknown => ApiError::not_found(format!("no adapter named '{name}' is loaded")),
        Missing::Failed(e) => ApiError::internal(format!("reloading adapter '{name}': {e}")),
    })
}

fn padded(registry: &Registry, rows: &[Encoded]) -> Result<Batch, ApiError> {
    let set = &registry.set;
    Batch::pad(rows, set.tokenizer.pad_id(), set.device()).map_err(ApiError::internal)
}

/// Requests for single adapters in one pass: their rows grouped by adapter.
fn predict_mixed(jobs: Vec<Job>, registry: &Registry) {
    let mut by_adapter: BTreeMap<String, Vec<Job>> = BTreeMap::new();
    for job in jobs {
        let Work::Predict { adapter } = &job.work else {
            unreachable!("a mixed batch holds predictions only")
        };
        by_adapter.entry(adapter.clone()).or_default().push(job);
    }
    let mut groups = Vec::new();
    for (name, jobs) in by_adapter {
        match adapter(registry, &name) {
            Ok(served) => groups.push((served, jobs)),
            Err(e) => jobs.into_iter().for_each(|j| {
                let _ = j.reply.send(Err(e.clone()));
            }),
        }
    }
    if groups.is_empty() {
        return;
    }
    let rows: Vec<Encoded> = (groups.iter())
        .flat_map(|(_, jobs)| jobs.iter().flat_map(|j| j.rows.iter().cloned()))
        .collect();
    let sizes: Vec<(&ServedAdapter, usize)> = (groups.iter())
        .map(|(a, jobs)| (a.as_ref(), jobs.iter().map(|j| j.rows.len()).sum()))
        .collect();
    let result = padded(registry, &rows)
        .and_then(|batch| (registry.set.predict(&batch, &sizes)).map_err(ApiError::internal));
    match result {
        Ok(predictions) => {
            let mut predictions = predictions.into_iter();
            for job in groups.into_iter().flat_map(|(_, jobs)| jobs) {
                let mine = predictions.by_ref().take(job.rows.len()).collect();
                let _ = job.reply.send(Ok(Answer::Predictions(mine)));
            }
        }
        Err(e) => {
            for job in groups.into_iter().flat_map(|(_, jobs)| jobs) {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Jobs of one setup, or embeddings of one kind, in one pass: each gets its rows' answers.
fn run_together(jobs: Vec<Job>, registry: &Registry) {
    let rows: Vec<Encoded> = jobs.iter().flat_map(|j| j.rows.iter().cloned()).collect();
    match run_rows(&jobs[0].work, &rows, registry) {
        Ok(mut answer) => {
            for job in jobs {
                let n = job.rows.len();
                let _ = job.reply.send(Ok(answer.take_first(n)));
            }
        }
        Err(e) => jobs.into_iter().for_each(|j| {
            let _ = j.reply.send(Err(e.clone()));
        }),
    }
}

impl Answer {
    /// The answers for the first `n` rows, taken out.
    fn take_first(&mut self, n: usize) -> Answer {
        match self {
            Answer::Predictions(p) => Answer::Predictions(p.drain(..n).collect()),
            Answer::Tasks(t) => Answer::Tasks(t.drain(..n).collect()),
            Answer::Embeddings(e) => Answer::Embeddings(e.drain(..n).collect()),
        }
    }
}

/// `work` on `rows` in one pass.
fn run_rows(work: &Work, rows: &[Encoded], registry: &Registry) -> Result<Answer, ApiError> {
    let batch = padded(registry, rows)?;
    let set = &registry.set;
    match work {
        Work::Predict { adapter: name } => {
            let served = adapter(registry, name)?;
            let predictions = set.predict(&batch, &[(&served, rows.len())]);
            Ok(Answer::Predictions(
                predictions.map_err(ApiError::internal)?,
            ))
        }
        Work::Setup { setup } => {
            let adapters = (setup.names().into_iter())
                .map(|n| adapter(registry, n))
                .collect::<Result<Vec<_>, _>>()?;
            let adapters: Vec<&ServedAdapter> = adapters.iter().map(AsRef::as_ref).collect();
            let tasks = set.predict_setup(setup, &adapters, &batch);
            // What is wrong with a setup shows only now (batch_split sizes, LayerNorms).
            Ok(Answer::Tasks(tasks.map_err(ApiError::unprocessable)?))
        }
        Work::Embed {
            adapter: name,
            pooling,
            normalize,
        } => {
            let served = name.as_deref().map(|n| adapter(registry, n)).transpose()?;
            let embeddings = set.embed(served.as_deref(), &batch, *pooling, *normalize);
            Ok(Answer::Embeddings(embeddings.map_err(ApiError::internal)?))
        }
    }
}
