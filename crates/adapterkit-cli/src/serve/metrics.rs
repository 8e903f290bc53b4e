//! What `GET /metrics` reports, in Prometheus' text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    /// Empty unless the request named a loaded adapter (so that clients cannot make a label
    /// per made-up name).
    pub adapter: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub batch_sequences: Histogram,
    pub batch_tokens: Histogram,
    pub batch_seconds: Histogram,
    pub queue_depth: Gauge,
    pub loaded_adapters: Gauge,
    resident_memory: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("adapterkit");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let batch_sequences = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let batch_tokens = Histogram::new(exponential_buckets(16.0, 2.0, 12));
        let batch_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let queue_depth = Gauge::default();
        let loaded_adapters = Gauge::default();
        let resident_memory = Gauge::default();
        registry.register(
            "requests",
            "Requests by route, adapter and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer",
            latency.clone(),
        );
        registry.register(
            "batch_sequences",
            "Texts per forward pass",
            batch_sequences.clone(),
        );
        registry.register(
            "batch_tokens",
            "Padded tokens per forward pass",
            batch_tokens.clone(),
        );
        registry.register(
            "batch_duration_seconds",
            "Time per forward pass",
            batch_seconds.clone(),
        );
        registry.register("queue_depth", "Requests waiting", queue_depth.clone());
        registry.register(
            "loaded_adapters",
            "Adapters loaded in memory",
            loaded_adapters.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the process",
            resident_memory.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            batch_sequences,
            batch_tokens,
            batch_seconds,
            queue_depth,
            loaded_adapters,
            resident_memory,
        }
    }

    pub fn render(&self) -> String {
        self.resident_memory.set(resident_bytes().unwrap_or(0));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The resident set size, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
