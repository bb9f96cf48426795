//! `dllm serve` over loopback: each test starts the binary on a free port
//! and stops it. The golden cases through the API (whole and streamed),
//! chat against the command line, every refused request, a client that goes
//! away, a full queue, a graceful stop, and a bounded load test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{golden_dir, ids};
use dllm::{CacheMode, DecodeOptions, Sampler};
use futures_util::{stream, StreamExt};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

/// A `dllm serve` process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dllm"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("DLLM_TEST_SERVER_LOGS") {
                Some(_) => Stdio::inherit(),
                None => Stdio::null(),
            })
            .spawn()
            .expect("start dllm serve");
        // The one line on stdout says where it listens.
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the server says where it listens within a minute");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits at most `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "the server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// One sample of `/metrics`, e.g. `dllm_cache_pages_in_use` or
    /// `dllm_generations_total{outcome="cancelled"}`.
    async fn metric(&self, client: &Client, name: &str) -> f64 {
        let text = client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Polls `/metrics` until `name` equals `want`, for at most `limit`.
    async fn await_metric(&self, client: &Client, name: &str, want: f64, limit: Duration) {
        let started = Instant::now();
        loop {
            let got = self.metric(client, name).await;
            if got == want {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "{name} is {got}, not {want}, after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tiny_arith() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-arith")
}

/// A request's decoding fields, as the API names them.
fn decoding_fields(o: &DecodeOptions) -> Value {
    let fields = json!({
        "max_tokens": o.gen_length,
        "block_length": o.block_length,
        "steps": o.steps,
        "cache": match o.cache {
            CacheMode::None => "none",
            CacheMode::Prefix => "prefix",
            CacheMode::Dual => "dual",
        },
        "threshold": o.threshold,
        "factor": o.factor,
        "suffix_window": o.suffix_window,
        "suffix_tail": o.suffix_tail,
        "confidence_alpha": o.confidence_alpha,
        "early_exit": o.early_exit,
        "alg": o.alg.map(|a| a.name()),
        "mask_id": o.mask_id,
        "eos_id": o.eos_id,
    });
    match o.sampler {
        Sampler::SemiAutoregressive => fields,
        Sampler::Llada20 { eos_early_stop } => with(
            fields,
            json!({ "sampler": "llada20", "eos_early_stop": eos_early_stop }),
        ),
        Sampler::Llada21(e) => with(
            fields,
            json!({
                "sampler": "llada21",
                "editing_threshold": e.editing_threshold,
                "max_post_steps": e.max_post_steps,
                "num_to_transfer": e.num_to_transfer,
                "eos_early_stop": e.eos_early_stop,
            }),
        ),
    }
}

fn with(mut body: Value, more: Value) -> Value {
    for (key, value) in more.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// The JSON answer to a request with `body`.
async fn answer_of(client: &Client, url: impl reqwest::IntoUrl, body: &Value) -> Value {
    let response = client.post(url).json(body).send().await.unwrap();
    response.json().await.unwrap()
}

/// The `data:` payloads of a server-sent event stream, read to its end.
async fn sse_events(response: Response) -> Vec<String> {
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .expect("a data event")
                .to_string()
        })
        .collect()
}

/// A streamed completion put back together: its text, token ids, and the
/// last chunk (finish_reason and usage).
struct Reassembled {
    text: String,
    token_ids: Vec<u32>,
    last: Value,
}

fn reassemble(events: &[String], chat: bool) -> Reassembled {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = String::new();
    let mut token_ids = Vec::new();
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        let piece = match chat {
            true => choice["delta"].get("content"),
            false => choice.get("text"),
        };
        text += piece.and_then(Value::as_str).unwrap_or("");
        if let Some(tokens) = choice.get("token_ids") {
            token_ids.extend(ids(tokens));
        }
    }
    let last = chunks.last().expect("a last chunk").clone();
    Reassembled {
        text,
        token_ids,
        last,
    }
}

/// Every robust golden case of `model` (there are `robust_cases`), 8 at a
/// time, with its prompt as token ids: whole, then streamed.
async fn check_golden_cases_over_http(model: &str, robust_cases: usize) {
    let server = Server::start(&golden_dir(model), &[]);
    let client = Client::new();
    let robust = common::robust_cases(model);
    let failures: Vec<String> = stream::iter(&robust)
        .map(|case| {
            let (client, server) = (&client, &server);
            async move {
                let body = with(
                    json!({ "prompt": case.prompt, "return_token_ids": true }),
                    decoding_fields(&case.options),
                );
                let (want_tokens, want_nfe) = (&case.tokens, case.nfe);
                // Without a tokenizer the text is the ids.
                let want_text: String = want_tokens.iter().map(|t| format!("{t} ")).collect();
                let url = server.url("/v1/completions");

                let whole: Value = answer_of(client, &url, &body).await;
                let choice = &whole["choices"][0];
                let streamed = client
                    .post(&url)
                    .json(&with(body.clone(), json!({ "stream": true })))
                    .send()
                    .await
                    .unwrap();
                let streamed = reassemble(&sse_events(streamed).await, false);
                let mut problems = Vec::new();
                if choice.get("token_ids").map(ids).as_ref() != Some(want_tokens) {
                    problems.push(format!("tokens differ: {whole}"));
                }
                if whole["usage"]["nfe"] != json!(want_nfe) {
                    problems.push(format!("nfe {} want {want_nfe}", whole["usage"]["nfe"]));
                }
                if choice["text"] != json!(want_text) {
                    problems.push("text differs".into());
                }
                if streamed.text != want_text || &streamed.token_ids != want_tokens {
                    problems.push(format!("the stream reassembles to {:?}", streamed.text));
                }
                if streamed.last["usage"]["nfe"] != json!(want_nfe) {
                    problems.push(format!("streamed usage {}", streamed.last["usage"]));
                }
                (!problems.is_empty()).then(|| format!("{}: {}", case.label, problems.join("; ")))
            }
        })
        .buffer_unordered(8)
        .filter_map(|failure| async { failure })
        .collect()
        .await;
    assert_eq!(robust.len(), robust_cases);
    let count = failures.len();
    assert!(
        failures.is_empty(),
        "{count} failures:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llada_golden_cases_over_http() {
    check_golden_cases_over_http("llada_tiny_s1", 153).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dream_golden_cases_over_http() {
    check_golden_cases_over_http("dream_tiny_s1", 72).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llada2_golden_cases_of_both_samplers_over_http() {
    check_golden_cases_over_http("llada2_tiny_s1", 139).await;
}

/// What `dllm generate --json` answers.
fn cli_text(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dllm"))
        .arg("generate")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_text_prompts_answer_as_the_command_line() {
    let server = Server::start(&tiny_arith(), &[]);
    let client = Client::new();
    let prompts = [
        "add 0000004821+0000000937=",
        "sort 4592808334214210=",
        "rev ovtagohtzwhzb1n3=",
    ];
    for prompt in prompts {
        let chat = json!({ "messages": [{ "role": "user", "content": prompt }] });
        let url = server.url("/v1/chat/completions");
        let answer: Value = answer_of(&client, &url, &chat).await;
        let want = cli_text(&["--prompt", prompt, "--chat"]);
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            json!(want),
            "{answer}"
        );
        assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
        assert_eq!(answer["object"], "chat.completion");
        let streamed = client
            .post(&url)
            .json(&with(chat, json!({ "stream": true })))
            .send()
            .await
            .unwrap();
        let streamed = reassemble(&sse_events(streamed).await, true);
        assert_eq!(streamed.text, want);

        let completion = json!({ "prompt": prompt, "echo": true });
        let url = server.url("/v1/completions");
        let answer: Value = answer_of(&client, &url, &completion).await;
        let want = cli_text(&["--prompt", prompt]);
        assert_eq!(
            answer["choices"][0]["text"],
            json!(format!("{prompt}{want}")),
            "{answer}"
        );
        let usage = &answer["usage"];
        assert_eq!(
            usage["total_tokens"],
            json!(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_whole_and_streamed() {
    let server = Server::start(&tiny_arith(), &[]);
    let client = Client::new();
    let url = server.url("/v1/completions");
    // 4821 + 937: the model writes 00000005758.
    let body = json!({ "prompt": "add 0000004821+0000000937=", "stop": ["57"] });
    let answer: Value = answer_of(&client, &url, &body).await;
    assert_eq!(answer["choices"][0]["text"], "0000000");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let streamed = client
        .post(&url)
        .json(&with(body, json!({ "stream": true })))
        .send()
        .await
        .unwrap();
    let streamed = reassemble(&sse_events(streamed).await, false);
    assert_eq!(streamed.text, "0000000");
    assert_eq!(streamed.last["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_steps_show_the_block_filling_in() {
    let server = Server::start(&tiny_arith(), &[]);
    let client = Client::new();
    let body = json!({
        "prompt": "add 0000004821+0000000937=", "stream": true, "stream_steps": true,
        "threshold": null, "max_tokens": 32,
    });
    let response = client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    let steps: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|chunk| chunk["choices"][0].get("step").cloned())
        .collect();
    // The fixed schedule commits one token a step: 31 steps leave masks.
    assert_eq!(steps.len(), 31);
    let masked: Vec<u64> = steps
        .iter()
        .map(|s| s["masked"].as_u64().unwrap())
        .collect();
    assert_eq!(masked, (1..=31).rev().collect::<Vec<u64>>());
    assert!(steps[0]["text"].as_str().unwrap().contains("<|mask|>"));
    let whole = with(body, json!({ "stream": false, "stream_steps": false }));
    let answer: Value = answer_of(&client, server.url("/v1/completions"), &whole).await;
    assert_eq!(
        json!(reassemble(&events, false).text),
        answer["choices"][0]["text"]
    );
}

/// Sends `body` (a raw string) and returns the status and error object.
async fn refused(
    client: &Client,
    url: &str,
    key: Option<&str>,
    body: String,
) -> (StatusCode, Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field() {
    let key = "sesame";
    let server = Server::start(
        &tiny_arith(),
        &["--api-key", key, "--max-body-bytes", "4096"],
    );
    let client = Client::new();
    let completions = server.url("/v1/completions");
    let chat = server.url("/v1/chat/completions");
    let prompt = "add 0000004821+0000000937=";
    // (what, url, body, param named, words in the message)
    #[rustfmt::skip]
    let bad_requests: Vec<(&str, &str, String, Option<&str>, &str)> = vec![
        ("malformed JSON", &completions, "{\"prompt\": \"add".into(), None, "not valid JSON"),
        ("not an object", &completions, "[1, 2]".into(), None, "JSON object"),
        ("wrong type", &completions, json!({ "prompt": prompt, "max_tokens": "ten" }).to_string(), Some("max_tokens"), "expected usize"),
        ("wrong type", &completions, json!({ "prompt": prompt, "stream": "yes" }).to_string(), Some("stream"), "expected a boolean"),
        ("wrong type", &completions, json!({ "prompt": prompt, "threshold": "high" }).to_string(), Some("threshold"), "expected f64"),
        ("unknown cache", &completions, json!({ "prompt": prompt, "cache": "quad" }).to_string(), Some("cache"), "unknown variant `quad`"),
        ("unknown alg", &completions, json!({ "prompt": prompt, "alg": "greedy" }).to_string(), Some("alg"), "unknown variant `greedy`"),
        ("alg on a LLaDA model", &completions, json!({ "prompt": prompt, "alg": "entropy" }).to_string(), Some("alg"), "LLaDA"),
        ("longer than the model", &completions, json!({ "prompt": prompt, "max_tokens": 1024 }).to_string(), Some("max_tokens"), "maximum sequence length 90"),
        ("not whole blocks", &completions, json!({ "prompt": prompt, "max_tokens": 48 }).to_string(), Some("max_tokens"), "not a multiple of block_length 32"),
        ("steps", &completions, json!({ "prompt": prompt, "max_tokens": 64, "steps": 3 }).to_string(), Some("steps"), "steps 3"),
        ("no length", &completions, json!({ "prompt": prompt, "max_tokens": 0 }).to_string(), Some("max_tokens"), "must be positive"),
        ("negative threshold", &completions, json!({ "prompt": prompt, "threshold": -1 }).to_string(), Some("threshold"), "positive number"),
        ("unknown field", &completions, json!({ "prompt": prompt, "temperature": 0.7 }).to_string(), Some("temperature"), "unknown field"),
        ("no prompt", &completions, json!({ "max_tokens": 64 }).to_string(), Some("prompt"), "required"),
        ("prompt of a wrong type", &completions, json!({ "prompt": 5 }).to_string(), Some("prompt"), "a string or a list of token ids"),
        ("negative token id", &completions, json!({ "prompt": [1, -1] }).to_string(), Some("prompt"), "a string or a list of token ids"),
        ("token id outside the vocabulary", &completions, json!({ "prompt": [1, 1000] }).to_string(), Some("prompt"), "outside the vocabulary"),
        ("empty prompt", &completions, json!({ "prompt": "" }).to_string(), Some("prompt"), "empty"),
        ("two choices", &completions, json!({ "prompt": prompt, "n": 2 }).to_string(), Some("n"), "one choice"),
        ("unknown sampler", &completions, json!({ "prompt": prompt, "sampler": "llada30" }).to_string(), Some("sampler"), "unknown variant `llada30`"),
        ("a LLaDA2 sampler on a LLaDA model", &completions, json!({ "prompt": prompt, "sampler": "llada20" }).to_string(), Some("sampler"), "llada2_moe models"),
        ("editing without LLaDA2.1", &completions, json!({ "prompt": prompt, "editing_threshold": 0.5 }).to_string(), Some("editing_threshold"), "LLaDA2.1 sampler"),
        ("steps without a stream", &completions, json!({ "prompt": prompt, "stream_steps": true }).to_string(), Some("stream_steps"), "stream"),
        ("no messages", &chat, json!({ "max_tokens": 64 }).to_string(), Some("messages"), "non-empty"),
        ("a message without content", &chat, json!({ "messages": [{ "role": "user" }] }).to_string(), Some("messages[0]"), "content"),
        ("echo in chat", &chat, json!({ "messages": [{ "role": "user", "content": prompt }], "echo": true }).to_string(), Some("echo"), "unknown field"),
    ];
    for (what, url, body, param, words) in bad_requests {
        let (status, error) = refused(&client, url, Some(key), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {error}");
        assert_eq!(error["type"], "invalid_request_error", "{what}: {error}");
        assert_eq!(error["param"], json!(param), "{what}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(words),
            "{what}: {message:?} does not say {words:?}"
        );
    }

    let too_large = json!({ "prompt": "x".repeat(5000) }).to_string();
    let (status, error) = refused(&client, &completions, Some(key), too_large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["code"], "body_too_large");
    assert!(error["message"].as_str().unwrap().contains("4096 bytes"));

    let fine = json!({ "prompt": prompt }).to_string();
    for wrong_key in [None, Some("open"), Some("sesame2")] {
        let (status, error) = refused(&client, &completions, wrong_key, fine.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong_key:?}");
        assert_eq!(error["code"], "invalid_api_key");
    }
    let models = client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);
    // None of the refused requests ran a forward.
    assert_eq!(
        server.metric(&client, "dllm_batch_forwards_total").await,
        0.0
    );
    assert_eq!(
        server
            .metric(
                &client,
                "dllm_requests_total{endpoint=\"/v1/completions\",code=\"401\"}"
            )
            .await,
        3.0
    );

    let (status, error) =
        refused(&client, &server.url("/v1/nothing"), Some(key), fine.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error["message"].as_str().unwrap().contains("/v1/nothing"));

    // With the key, the same request is answered.
    let answer = client
        .post(&completions)
        .bearer_auth(key)
        .body(fine)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let models: Value = client
        .get(server.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-arith");
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// A streamed request long enough to still be running when the test acts:
/// the golden LLaDA model, 1024 tokens one at a time, each step streamed.
fn long_request() -> Value {
    json!({
        "prompt": [1, 2, 3, 4, 5, 6, 7, 8],
        "max_tokens": 1024, "block_length": 32, "steps": 1024,
        "cache": "none", "threshold": null,
        "stream": true, "stream_steps": true,
    })
}

/// Reads the stream until its first step chunk.
async fn first_chunk(response: &mut Response) {
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"step\"") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no step chunk within a minute"
        );
        let bytes = response.chunk().await.unwrap().expect("the stream goes on");
        seen.extend_from_slice(&bytes);
    }
}

/// A client that goes away mid-request, streamed or waiting for the whole
/// answer, cancels it: its cache pages come back and it counts as cancelled.
async fn check_a_client_that_goes_away(stream: bool) {
    let server = Server::start(&golden_dir("llada_tiny_s1"), &[]);
    let client = Client::new();
    let request = client
        .post(server.url("/v1/completions"))
        .json(&with(
            long_request(),
            json!({ "stream": stream, "stream_steps": stream }),
        ))
        .send();
    if stream {
        let mut response = request.await.unwrap();
        first_chunk(&mut response).await;
        assert!(server.metric(&client, "dllm_cache_pages_in_use").await > 0.0);
        drop(response);
    } else {
        let waiting = tokio::spawn(request);
        let started = Instant::now();
        while server.metric(&client, "dllm_cache_pages_in_use").await == 0.0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the request took no pages within a minute"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Aborting the client's task closes its connection.
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
    }
    let limit = Duration::from_secs(30);
    server
        .await_metric(&client, "dllm_cache_pages_in_use", 0.0, limit)
        .await;
    server
        .await_metric(
            &client,
            "dllm_generations_total{outcome=\"cancelled\"}",
            1.0,
            limit,
        )
        .await;
    assert_eq!(
        server
            .metric(&client, "dllm_generations_total{outcome=\"done\"}")
            .await,
        0.0
    );
    // Its place is given back once the engine has reported the cancellation.
    server
        .await_metric(&client, "dllm_requests_in_flight", 0.0, limit)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_goes_away_frees_its_cache_pages() {
    check_a_client_that_goes_away(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_that_goes_away_frees_its_cache_pages() {
    check_a_client_that_goes_away(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(
        &golden_dir("llada_tiny_s1"),
        &["--max-batch", "1", "--max-queue", "0"],
    );
    let client = Client::new();
    let url = server.url("/v1/completions");
    let mut running = client
        .post(&url)
        .json(&long_request())
        .send()
        .await
        .unwrap();
    first_chunk(&mut running).await;
    let short = json!({ "prompt": [1, 2, 3], "max_tokens": 32 });
    let response = client.post(&url).json(&short).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_overloaded");
    assert_eq!(error["error"]["code"], "queue_full");
    // Once the place is free again, the same request is answered.
    drop(running);
    server
        .await_metric(
            &client,
            "dllm_requests_in_flight",
            0.0,
            Duration::from_secs(30),
        )
        .await;
    let response = client.post(&url).json(&short).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_finishes_requests_in_flight() {
    let mut server = Server::start(&golden_dir("llada_tiny_s1"), &[]);
    let client = Client::new();
    // 256 tokens one at a time: a second or so.
    let body = with(
        long_request(),
        json!({ "max_tokens": 256, "steps": 256, "stream_steps": false }),
    );
    let mut running = client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), StatusCode::OK);
    let first = running.chunk().await.unwrap().expect("a first block");
    server.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = Client::new().get(server.url("/health")).send().await;
    assert!(
        fresh.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    let mut rest = first.to_vec();
    while let Some(bytes) = running.chunk().await.unwrap() {
        rest.extend_from_slice(&bytes);
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        text.contains("\"finish_reason\":\"length\"")
            || text.contains("\"finish_reason\":\"stop\"")
    );
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

/// 64 clients each send 20 requests on the small model (additions, one
/// block of 32 tokens, the default strategy); every answer must be what the
/// request gives alone, none may be lost, and nothing may stay held after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_64_clients_of_20_requests() {
    const CLIENTS: usize = 64;
    const REQUESTS: usize = 20;
    let server = Server::start(&tiny_arith(), &[]);
    let client = Client::new();
    let url = server.url("/v1/completions");
    let eval = std::fs::read_to_string(tiny_arith().join("eval.jsonl")).unwrap();
    let bodies: Vec<Value> = eval
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|example| example["task"] == "add")
        .take(REQUESTS)
        .map(|example| json!({ "prompt": example["prompt"], "max_tokens": 32 }))
        .collect();
    // Each prompt alone, one at a time: the answers to expect.
    let mut alone = Vec::new();
    for body in &bodies {
        let answer: Value = answer_of(&client, &url, body).await;
        alone.push(answer["choices"][0]["text"].as_str().unwrap().to_string());
    }
    // Every client sends its requests one after another; `rounds` of them.
    let load = |rounds: usize| {
        let (client, url, bodies, alone) = (&client, &url, &bodies, &alone);
        stream::iter(0..CLIENTS)
            .map(move |c| async move {
                let mut done = Vec::new();
                for r in 0..rounds {
                    let i = (c + r) % bodies.len();
                    let sent = Instant::now();
                    let response = client.post(url).json(&bodies[i]).send().await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    let answer: Value = response.json().await.unwrap();
                    let text = answer["choices"][0]["text"].as_str();
                    assert_eq!(text, Some(alone[i].as_str()), "client {c} request {r}");
                    let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap();
                    done.push((sent.elapsed(), tokens));
                }
                done
            })
            .buffer_unordered(CLIENTS)
            .collect::<Vec<Vec<(Duration, u64)>>>()
    };
    // One request per client first, so that the idle level below is that of
    // a server that has already run a full batch.
    load(1).await;
    let idle_kib = server.rss_kib();

    let started = Instant::now();
    let results = load(REQUESTS).await;
    let wall = started.elapsed();

    let mut latencies: Vec<Duration> = results.iter().flatten().map(|(l, _)| *l).collect();
    let tokens: u64 = results.iter().flatten().map(|(_, t)| t).sum();
    assert_eq!(latencies.len(), CLIENTS * REQUESTS, "requests lost");
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let limit = Duration::from_secs(10);
    server
        .await_metric(&client, "dllm_requests_in_flight", 0.0, limit)
        .await;
    server
        .await_metric(&client, "dllm_cache_pages_in_use", 0.0, limit)
        .await;
    let after_kib = server.rss_kib();
    let mean_batch = server.metric(&client, "dllm_batch_sequences_total").await
        / server.metric(&client, "dllm_batch_forwards_total").await;
    println!(
        "load: {CLIENTS} clients x {REQUESTS} requests in {:.2} s: p50 {:.1} ms, p99 {:.1} ms, \
         {:.0} generated tokens/s, mean batch {mean_batch:.1}; RSS {idle_kib} KiB idle before, \
         {after_kib} KiB idle after",
        wall.as_secs_f64(),
        percentile(0.50).as_secs_f64() * 1e3,
        percentile(0.99).as_secs_f64() * 1e3,
        tokens as f64 / wall.as_secs_f64(),
    );
    let done = server
        .metric(&client, "dllm_generations_total{outcome=\"done\"}")
        .await;
    assert_eq!(done as usize, bodies.len() + CLIENTS + CLIENTS * REQUESTS);
    // Nothing kept per request: back to the idle level, give or take what
    // the allocator keeps.
    assert!(
        after_kib < idle_kib + 16 * 1024,
        "RSS {after_kib} KiB after the load, {idle_kib} KiB before"
    );
}
