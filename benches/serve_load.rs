//! A bounded load generator for `adapterkit serve` (and the Python baseline server, which has
//! the same predict routes), on loopback only: a fixed number of requests and a time cap.
//!
//! ```text
//! cargo bench -p adapterkit-cli --bench serve_load -- --url http://127.0.0.1:8080 \
//!     --adapters a,b,c --mode mix --concurrency 8 --requests 2000 --seconds 60
//! ```
//!
//! Modes: `one` (every request to the first adapter), `mix` (a random adapter per request),
//! `parallel` (`/v1/predict` with the setup `parallel(all adapters)`). `--rate R` sends open
//! loop at R requests/s in all (the overload run); otherwise each client sends its next request
//! when the last is answered. Texts are 16 tokens with BERT's special tokens (14 common words).
//! Prints one JSON line: requests/s, sequences/s, latency percentiles, status counts, and the
//! server's peak resident memory when `--server-pid` is given.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WORDS: [&str; 32] = [
    "the", "film", "was", "good", "bad", "and", "very", "long", "what", "is", "a", "city", "in",
    "who", "wrote", "book", "time", "of", "day", "great", "story", "about", "people", "new", "old",
    "house", "music", "played", "well", "team", "won", "game",
];

struct Options {
    url: String,
    adapters: Vec<String>,
    mode: String,
    concurrency: usize,
    requests: usize,
    seconds: f64,
    inputs: usize,
    rate: Option<f64>,
    server_pid: Option<u32>,
    /// Names the run in the output (which server, which experiment).
    label: String,
}

fn options() -> Options {
    let mut o = Options {
        url: "http://127.0.0.1:8080".into(),
        adapters: Vec::new(),
        mode: "one".into(),
        concurrency: 8,
        requests: 1000,
        seconds: 60.0,
        inputs: 1,
        rate: None,
        server_pid: None,
        label: String::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().expect("a value after the flag");
        match args[i].as_str() {
            "--url" => o.url = value(),
            "--adapters" => o.adapters = value().split(',').map(String::from).collect(),
            "--mode" => o.mode = value(),
            "--concurrency" => o.concurrency = value().parse().expect("a count"),
            "--requests" => o.requests = value().parse().expect("a count"),
            "--seconds" => o.seconds = value().parse().expect("seconds"),
            "--inputs" => o.inputs = value().parse().expect("a count"),
            "--rate" => o.rate = Some(value().parse().expect("requests/s")),
            "--server-pid" => o.server_pid = Some(value().parse().expect("a pid")),
            "--label" => o.label = value(),
            // `cargo bench` passes this to every bench target.
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    let url = &o.url;
    assert!(
        url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"),
        "loopback only: {url}"
    );
    assert!(!o.adapters.is_empty(), "--adapters a,b,...");
    assert!(["one", "mix", "parallel"].contains(&o.mode.as_str()));
    o
}

/// A small seeded generator (xorshift), so that runs send the same requests.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn text(state: &mut u64) -> String {
    let words: Vec<&str> = (0..14)
        .map(|_| WORDS[next(state) as usize % WORDS.len()])
        .collect();
    words.join(" ")
}

struct Outcome {
    latency: Duration,
    status: u16,
}

fn main() {
    let o = Arc::new(options());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.seconds);
    let issued = Arc::new(Mutex::new(0usize));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(o.requests)));
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .max_idle_connections_per_host(o.concurrency)
        .build();
    let clients: Vec<_> = (0..o.concurrency)
        .map(|client| {
            let (o, issued, outcomes, agent) =
                (o.clone(), issued.clone(), outcomes.clone(), agent.clone());
            std::thread::spawn(move || {
                let mut state = 0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1);
                loop {
                    let n = {
                        let mut issued = issued.lock().unwrap();
                        if *issued >= o.requests || Instant::now() >= deadline {
                            return;
                        }
                        *issued += 1;
                        *issued - 1
                    };
                    if let Some(rate) = o.rate {
                        // Open loop: request n leaves at n / rate, late or not.
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let inputs: Vec<String> = (0..o.inputs).map(|_| text(&mut state)).collect();
                    let (path, body) = match o.mode.as_str() {
                        "parallel" => (
                            "/v1/predict".to_string(),
                            serde_json::json!({
                                "setup": format!("parallel({})", o.adapters.join(",")),
                                "inputs": inputs,
                            }),
                        ),
                        mode => {
                            let pick = match mode {
                                "mix" => next(&mut state) as usize % o.adapters.len(),
                                _ => 0,
                            };
                            let path = format!("/v1/adapters/{}/predict", o.adapters[pick]);
                            (path, serde_json::json!({ "inputs": inputs }))
                        }
                    };
                    let sent = Instant::now();
                    let status = match agent
                        .post(&format!("{}{path}", o.url))
                        .set("Content-Type", "application/json")
                        .send_string(&body.to_string())
                    {
                        Ok(r) => {
                            let _ = r.into_string();
                            200
                        }
                        Err(ureq::Error::Status(code, _)) => code,
                        Err(_) => 0,
                    };
                    let latency = sent.elapsed();
                    outcomes.lock().unwrap().push(Outcome { latency, status });
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let outcomes = outcomes.lock().unwrap();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in outcomes.iter() {
        let key = match outcome.status {
            200 => "200",
            429 => "429",
            _ => "other",
        };
        *statuses.entry(key.into()).or_default() += 1;
    }
    let mut ok: Vec<f64> = (outcomes.iter())
        .filter(|o| o.status == 200)
        .map(|o| o.latency.as_secs_f64() * 1e3)
        .collect();
    ok.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        ok.get(((ok.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let answered = ok.len() as f64;
    let peak_rss_mib = o.server_pid.and_then(peak_rss_mib);
    let line = serde_json::json!({
        "label": o.label,
        "mode": o.mode,
        "adapters": o.adapters.len(),
        "concurrency": o.concurrency,
        "inputs_per_request": o.inputs,
        "rate": o.rate,
        "requests": outcomes.len(),
        "seconds": elapsed,
        "requests_per_s": answered / elapsed,
        "sequences_per_s": answered * o.inputs as f64 / elapsed,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "status": statuses,
        "server_peak_rss_mib": peak_rss_mib,
    });
    println!("{line}");
}

/// The server's peak resident memory so far (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
