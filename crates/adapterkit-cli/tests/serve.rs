//! `adapterkit serve` over real HTTP on 127.0.0.1: every route and error code, auth, scores
//! equal to `predict` and `encode`, hot load/replace/delete while requests flow, a full queue,
//! and SIGTERM. Every loop is bounded in count and time.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts `serve` on a free port and waits for it to say where it listens.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
            .args(["serve", "--model", s(&tiny_bert()), "--port", "0"])
            .args(args)
            .env_remove("ADAPTERKIT_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the server said {line:?}"))
            .to_string();
        Server { child, url }
    }

    /// `(status, JSON body)` of a request (`body` None: no body).
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut request =
            ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(60));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let sent = match body {
            Some(body) => request.send_string(&body.to_string()),
            None => request.call(),
        };
        let response = match sent {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body), None)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}

/// An adapter directory: houlsby, pfeiffer, lora, regression, prefix (prefix tuning) and mam
/// (Mix-and-Match: a prefix and a parallel adapter), Python-made fixtures, and
/// `trained` (trained here with the encoder's LayerNorms, the CLI's default).
fn adapter_dir(root: &Path) -> PathBuf {
    let dir = root.join("adapters");
    for (name, from) in [
        ("houlsby", "adapters/houlsby"),
        ("pfeiffer", "adapters/pfeiffer"),
        ("lora", "lora/lora_qv"),
        ("regression", "adapters/regression"),
        ("prefix", "prefix/prefix"),
        ("mam", "prefix/mam"),
    ] {
        copy_dir(&fixture(from), &dir.join(name));
    }
    let train = write_csv(root, "train.csv", 16);
    // No warm-up: the one step changes the LayerNorms. Its token limit is recorded, and
    // `predict` (and so `serve`) truncates its texts to it.
    let options = ["--warmup-ratio", "0", "--lr", "0.01", "--max-seq-len", "8"];
    train_quick(&tiny_bert(), &train, &dir.join("trained"), &options);
    assert!(dir.join("trained/base_weights.safetensors").exists());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

const TEXTS: [&str; 4] = [
    "the cat sat on the mat",
    "a dog",
    "who wrote this text",
    "a text longer than the eight tokens one adapter was trained with",
];

fn scores_close(a: &Value, b: &Value) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            x.iter().for_each(|(k, v)| scores_close(v, &y[k]));
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).for_each(|(a, b)| scores_close(a, b));
        }
        _ => assert_eq!(a, b),
    }
}

#[test]
fn predictions_and_embeddings_equal_the_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let server = Server::start(&["--adapter-dir", s(&dir)]);
    let model = tiny_bert();
    for name in [
        "houlsby",
        "pfeiffer",
        "lora",
        "regression",
        "prefix",
        "mam",
        "trained",
    ] {
        let mut args = vec!["predict", "--model", s(&model)];
        let adapter = dir.join(name);
        args.extend(["--adapter", s(&adapter)]);
        args.extend(TEXTS);
        let mut want = json_lines(&adapterkit(&args));
        want.iter_mut().for_each(|p| {
            p.as_object_mut().unwrap().remove("text");
        });
        let (status, got) = server.post("/v1/predict", json!({"adapter": name, "inputs": TEXTS}));
        assert_eq!(status, 200, "{got}");
        scores_close(&got["predictions"], &Value::Array(want.clone()));
        let path = format!("/v1/adapters/{name}/predict");
        let (status, in_path) = server.post(&path, json!({"inputs": TEXTS}));
        assert_eq!(status, 200);
        scores_close(&in_path, &got);
    }
    // A setup: each task as its adapter alone (on texts within every adapter's limit: a
    // setup's texts are truncated to its first adapter's, as `predict --setup` does).
    let short = ["a dog", "the cat"];
    let (status, tasks) = server.post(
        "/v1/predict",
        json!({"setup": "parallel(houlsby,trained)", "inputs": short}),
    );
    assert_eq!(status, 200, "{tasks}");
    for name in ["houlsby", "trained"] {
        let (_, alone) = server.post("/v1/predict", json!({"adapter": name, "inputs": short}));
        for (i, p) in alone["predictions"].as_array().unwrap().iter().enumerate() {
            scores_close(&tasks["predictions"][i]["tasks"][name], p);
        }
    }
    // Embeddings, of the model and of an adapter, as `encode` gives them.
    for adapter in [None, Some("trained")] {
        let mut args = vec!["encode", "--model", s(&model), "--json", "--normalize"];
        let path = adapter.map(|a| dir.join(a));
        if let Some(path) = &path {
            args.extend(["--adapter", s(path)]);
        }
        args.extend(TEXTS);
        let want: Vec<Value> = (json_lines(&adapterkit(&args)).into_iter())
            .map(|l| l["embedding"].clone())
            .collect();
        let mut body = json!({"inputs": TEXTS, "normalize": true});
        if let Some(a) = adapter {
            body["adapter"] = a.into();
        }
        let (status, got) = server.post("/v1/embed", body);
        assert_eq!(status, 200, "{got}");
        scores_close(&got["embeddings"], &Value::Array(want));
    }
}

#[test]
fn concurrent_requests_each_get_their_own_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let server = Server::start(&["--adapter-dir", s(&dir)]);
    // Requests of every kind, each with its own text, answered one at a time first.
    let mut requests = Vec::new();
    for (i, text) in TEXTS.iter().enumerate() {
        let adapter = ["houlsby", "lora", "trained", "prefix"][i % 4];
        requests.push(("/v1/predict", json!({"adapter": adapter, "inputs": [text]})));
        let setup = json!({"setup": "parallel(houlsby,lora)", "inputs": [text, "and another"]});
        requests.push(("/v1/predict", setup));
        requests.push(("/v1/embed", json!({"inputs": [text], "adapter": "lora"})));
    }
    let alone: Vec<Value> = (requests.iter())
        .map(|(path, body)| server.post(path, body.clone()).1)
        .collect();
    // Then all at once, several rounds: batched together, each must get its own.
    let url = server.url.clone();
    let threads: Vec<_> = (requests.into_iter().zip(alone))
        .map(|((path, body), want)| {
            let url = url.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let response = ureq::post(&format!("{url}{path}"))
                        .send_string(&body.to_string())
                        .unwrap();
                    let got: Value =
                        serde_json::from_str(&response.into_string().unwrap()).unwrap();
                    scores_close(&got, &want);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn every_error_has_its_code_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let server = Server::start(&[
        "--adapter-dir",
        s(&dir),
        "--max-client-batch",
        "4",
        "--payload-limit",
        "2000",
    ]);
    let long = "word ".repeat(500);
    let cases: Vec<(&str, &str, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            "/v1/predict",
            Some(json!("not an object")),
            400,
            "object",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "nope", "inputs": ["a"]})),
            404,
            "nope",
        ),
        (
            "POST",
            "/v1/adapters/nope/predict",
            Some(json!({"inputs": ["a"]})),
            404,
            "nope",
        ),
        ("GET", "/v1/nothing", None, 404, "route"),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "houlsby", "inputs": [long]})),
            413,
            "",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "houlsby", "inputs": []})),
            422,
            "empty",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "houlsby", "inputs": vec!["a"; 5]})),
            422,
            "--max-client-batch",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "houlsby", "inputs": ["a", 3]})),
            422,
            "inputs[1]",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"adapter": "houlsby", "input": ["a"]})),
            422,
            "'input'",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"setup": "parallel(houlsby", "inputs": ["a"]})),
            422,
            "setup",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"setup": "stack(houlsby,trained)", "inputs": ["a"]})),
            422,
            "LayerNorms",
        ),
        (
            "POST",
            "/v1/predict",
            Some(json!({"setup": "batch_split(houlsby,lora)[1,1]", "inputs": ["a"]})),
            422,
            "batch",
        ),
        (
            "POST",
            "/v1/embed",
            Some(json!({"inputs": ["a"], "pooling": "max"})),
            422,
            "pooling",
        ),
        (
            "PUT",
            "/v1/adapters/x",
            Some(json!({"path": "/etc"})),
            403,
            "--adapter-dir",
        ),
        (
            "PUT",
            "/v1/adapters/x",
            Some(json!({"path": "../adapters/houlsby"})),
            403,
            "--adapter-dir",
        ),
        (
            "PUT",
            "/v1/adapters/x",
            Some(json!({"path": "missing"})),
            422,
            "missing",
        ),
        (
            "PUT",
            "/v1/adapters/x%2Fy",
            Some(json!({"path": "houlsby"})),
            422,
            "name",
        ),
        ("DELETE", "/v1/adapters/nope", None, 404, "nope"),
    ];
    for (method, path, body, code, needle) in cases {
        let (status, answer) = server.call(method, path, body.clone(), None);
        assert_eq!(status, code, "{method} {path} {body:?}: {answer}");
        if code != 413 {
            assert_eq!(answer["code"], code, "{answer}");
            let message = answer["error"].as_str().unwrap();
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
        }
    }
    // Malformed JSON, as raw text.
    let raw = ureq::post(&format!("{}/v1/predict", server.url)).send_string("{\"inputs\": [");
    let Err(ureq::Error::Status(400, response)) = raw else {
        panic!("{raw:?}")
    };
    let answer: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
    assert!(answer["error"].as_str().unwrap().contains("JSON"));
    // A symbolic link inside the directory to a folder outside it.
    let outside = tmp.path().join("outside");
    copy_dir(&fixture("adapters/houlsby"), &outside);
    std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
    let (status, _) = server.call("PUT", "/v1/adapters/x", Some(json!({"path": "link"})), None);
    assert_eq!(status, 403);
    // Health, metrics and the OpenAPI document.
    assert_eq!(server.call("GET", "/health", None, None).0, 200);
    let (status, spec) = server.call("GET", "/openapi.json", None, None);
    assert_eq!((status, spec["openapi"].as_str()), (200, Some("3.0.3")));
    let (status, metrics) = server.call("GET", "/metrics", None, None);
    let metrics = metrics.as_str().unwrap().to_string();
    assert_eq!(status, 200);
    for needle in [
        "adapterkit_requests_total{route=\"/v1/predict\",adapter=\"\",status=\"404\"} 1",
        "adapterkit_batch_tokens",
        "adapterkit_queue_depth",
        "adapterkit_loaded_adapters 7",
        "adapterkit_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "{needle} not in {metrics}");
    }
}

#[test]
fn a_key_guards_the_api_but_not_health_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let server = Server::start(&["--adapter-dir", s(&dir), "--api-key", "sesame"]);
    let body = json!({"adapter": "houlsby", "inputs": ["a"]});
    for key in [None, Some("wrong")] {
        let (status, answer) = server.call("POST", "/v1/predict", Some(body.clone()), key);
        assert_eq!((status, answer["code"].as_u64()), (401, Some(401)));
        assert_eq!(server.call("GET", "/v1/adapters", None, key).0, 401);
    }
    let (status, _) = server.call("POST", "/v1/predict", Some(body), Some("sesame"));
    assert_eq!(status, 200);
    assert_eq!(server.call("GET", "/health", None, None).0, 200);
    assert_eq!(server.call("GET", "/metrics", None, None).0, 200);
}

#[test]
fn adapters_load_replace_and_go_while_requests_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let server = Server::start(&["--adapter-dir", s(&dir), "--max-adapters", "2"]);
    let expected = |name: &str| {
        server
            .post("/v1/predict", json!({"adapter": name, "inputs": TEXTS}))
            .1
    };
    let (houlsby, lora) = (expected("houlsby"), expected("lora"));
    let url = server.url.clone();
    // Clients of two adapters, bounded in count and time, beside the changes below.
    let clients: Vec<_> = [("houlsby", houlsby.clone()), ("lora", lora.clone())]
        .into_iter()
        .map(|(name, want)| {
            let url = url.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut done = 0;
                while done < 150 && Instant::now() < deadline {
                    let body = json!({"inputs": TEXTS}).to_string();
                    let response = ureq::post(&format!("{url}/v1/adapters/{name}/predict"))
                        .send_string(&body)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    let got: Value =
                        serde_json::from_str(&response.into_string().unwrap()).unwrap();
                    scores_close(&got, &want);
                    done += 1;
                }
                done
            })
        })
        .collect();
    for round in 0..10 {
        // Load a new one, replace it with another adapter, use it, delete it.
        let (status, info) = server.call(
            "PUT",
            "/v1/adapters/extra",
            Some(json!({"path": "pfeiffer"})),
            None,
        );
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["kind"], "bottleneck");
        let (status, _) = server.call(
            "PUT",
            "/v1/adapters/extra",
            Some(json!({"path": s(&dir.join("regression"))})),
            None,
        );
        assert_eq!(status, 200);
        let (status, answer) = server.post("/v1/adapters/extra/predict", json!({"inputs": ["a"]}));
        assert_eq!(status, 200);
        assert!(
            answer["predictions"][0]["value"].is_number(),
            "round {round}: {answer}"
        );
        assert_eq!(
            server.call("DELETE", "/v1/adapters/extra", None, None).0,
            200
        );
        let (status, _) = server.post("/v1/adapters/extra/predict", json!({"inputs": ["a"]}));
        assert_eq!(status, 404);
    }
    for client in clients {
        assert!(client.join().unwrap() > 0);
    }
    // Two adapters at most stay loaded (the LRU); the others load again when asked for.
    let (_, listing) = server.call("GET", "/v1/adapters", None, None);
    let listing = listing["adapters"].as_array().unwrap().clone();
    assert_eq!(listing.len(), 7);
    let loaded = listing.iter().filter(|a| a["loaded"] == true).count();
    assert!(loaded <= 2, "{listing:?}");
    let (status, again) = server.post(
        "/v1/predict",
        json!({"adapter": "houlsby", "inputs": TEXTS}),
    );
    assert_eq!(status, 200);
    scores_close(&again, &houlsby);
}

#[test]
fn a_full_queue_answers_429_and_sigterm_finishes_what_is_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_dir(tmp.path());
    let mut server = Server::start(&[
        "--adapter-dir",
        s(&dir),
        "--max-queue",
        "1",
        "--max-batch-tokens",
        "64",
    ]);
    let long = "the cat sat on the mat and looked at the dog ".repeat(8);
    let body = json!({"adapter": "houlsby", "inputs": vec![long.as_str(); 32]}).to_string();
    let url = server.url.clone();
    // 16 clients at once, a bounded number of requests each.
    let counts: Vec<(usize, usize, usize)> = (0..16)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || {
                let (mut ok, mut busy, mut other) = (0, 0, 0);
                let deadline = Instant::now() + Duration::from_secs(20);
                for _ in 0..30 {
                    if Instant::now() > deadline {
                        break;
                    }
                    match ureq::post(&format!("{url}/v1/predict")).send_string(&body) {
                        Ok(_) => ok += 1,
                        Err(ureq::Error::Status(429, _)) => busy += 1,
                        Err(_) => other += 1,
                    }
                }
                (ok, busy, other)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let total = counts
        .iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    assert!(total.0 > 0 && total.1 > 0, "200s and 429s: {total:?}");
    assert_eq!(total.2, 0, "{total:?}");
    // Requests in flight when SIGTERM comes are answered; the server exits 0.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || {
                match ureq::post(&format!("{url}/v1/predict")).send_string(&body) {
                    Ok(r) => Ok(r.status()),
                    Err(ureq::Error::Status(code, _)) => Ok(code),
                    Err(ureq::Error::Transport(t)) => Err((t.kind(), t.to_string())),
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    for request in in_flight {
        match request.join().unwrap() {
            // Answered, or refused as shutting down or busy: never cut off half-way.
            Ok(code) => assert!([200, 429, 503].contains(&code), "{code}"),
            // Not accepted: the listener had closed.
            Err((kind, message)) => {
                assert_eq!(kind, ureq::ErrorKind::ConnectionFailed, "{message}")
            }
        }
    }
}
