//! `fastrm serve` as clients see it: the built binary on 127.0.0.1 with a port of its choosing,
//! spoken to over plain HTTP/1.1. Answers equal `fastrm explain --json`; every malformed request
//! or limit gets its 4xx in OpenAI's error shape; a full queue answers 429; a client that hangs up
//! stops its run; SIGTERM finishes what is in flight and exits 0.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use common::repo_root;

const QUESTION: &str = "What color is the star?";
/// The demo model's end-of-sequence id (`</s>`).
const DEMO_EOS: u64 = 2;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let (child, addr) = common::spawn_server(extra);
        Server { child, addr }
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, _, body) = request(self.addr, "GET", "/metrics", None);
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A server that refuses early may close before the whole body is written.
        let _ = s.write_all(b);
    }
    s
}

/// A response read to its end: status, headers (lower-case names), body (chunked decoded).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    read_response(send_request(addr, method, path, body))
}

/// Status, headers (lower-case names) and body (chunked decoded) of the response on `s`.
fn read_response(s: TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    (status, headers, body)
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_lowercase(), v.trim().to_string()));
    }
    (status, headers)
}

/// One chunk of a chunked body; `None` at its end.
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size = String::new();
    if r.read_line(&mut size).ok()? == 0 {
        return None;
    }
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    (n > 0).then_some(buf)
}

fn image_url() -> String {
    let png = std::fs::read(repo_root().join("assets/demo/image.png")).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn chat_body(question: &str, extra: Value) -> Value {
    let mut v = json!({
        "model": "fastrm-demo",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url()}},
            {"type": "text", "text": question},
        ]}],
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn post(addr: SocketAddr, body: &Value) -> (u16, Vec<(String, String)>, Vec<u8>) {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(body.to_string().as_bytes()),
    )
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// The command line's `--json` answer to QUESTION (one thread, as the server runs).
fn cli_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(args)
        .args(["--json", "-t", "1", "--prompt", QUESTION])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn explain_json(max_new: usize) -> Value {
    cli_json(&["explain", "--method", "fastrm", "-n", &max_new.to_string()])
}

fn decode_map(s: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// A wire map against the CLI's f32 map: within half-precision rounding.
fn assert_map_close(what: &str, got: &Value, want: &Value) {
    let got = decode_map(got["map_b64"].as_str().unwrap());
    let want: Vec<f32> = want["map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len(), "{what}: map length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = w.abs() * 1e-3 + 1e-7;
        assert!((g - w).abs() <= tol, "{what}: value {i}: {g} vs {w}");
    }
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn answers_equal_explain_json_streamed_and_not() {
    let want = explain_json(16);
    // The server leaves end-of-sequence tokens out of the answer (no chunk, no map, not in
    // usage), as OpenAI counts them; the command line lists every generated id.
    let want_ids: Vec<u64> = ids(&want["generated_ids"])
        .into_iter()
        .filter(|&id| id != DEMO_EOS)
        .collect();
    assert!(!want_ids.is_empty());
    let want_tokens = want["tokens"].as_array().unwrap();
    let server = Server::start(&[]);
    let relevancy = json!({"method": "fastrm"});

    // Streamed, with maps.
    let (status, headers, body) = post(
        server.addr,
        &chat_body(
            QUESTION,
            json!({"stream": true, "max_tokens": 16, "relevancy": relevancy}),
        ),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut got_ids = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(m) = c.get("relevancy") {
            let i = m["index"].as_u64().unwrap() as usize;
            assert_eq!(m["grid"], want["grid"]);
            assert_map_close(&format!("streamed token {i}"), m, &want_tokens[i]);
            assert_eq!(
                m["entropy"].as_f64().unwrap() as f32,
                want_tokens[i]["entropy"].as_f64().unwrap() as f32
            );
            got_ids.push(m["id"].as_u64().unwrap());
        }
    }
    assert_eq!(text, want["text"].as_str().unwrap());
    assert!(text.contains("yellow"), "{text:?}");
    assert_eq!(got_ids, want_ids);
    let last = chunks.last().unwrap();
    let finish = if want["stop_reason"] == "eos" {
        "stop"
    } else {
        "length"
    };
    assert_eq!(last["choices"][0]["finish_reason"], finish);
    assert_eq!(last["confidence"]["verdict"], want["confidence"]["verdict"]);
    assert_eq!(
        last["confidence"]["mean_entropy"],
        want["confidence"]["mean_entropy"]
    );

    // Not streamed, with maps.
    let (status, _, body) = post(
        server.addr,
        &chat_body(
            QUESTION,
            json!({"max_completion_tokens": 16, "relevancy": relevancy}),
        ),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    let n_in = want["input_ids"].as_array().unwrap().len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], n_in);
    assert_eq!(v["usage"]["completion_tokens"], want_ids.len() as u64);
    let maps = v["relevancy"]["tokens"].as_array().unwrap();
    assert_eq!(
        maps.iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        want_ids
    );
    for (i, m) in maps.iter().enumerate() {
        assert_map_close(&format!("token {i}"), m, &want_tokens[i]);
    }
    assert_eq!(
        v["relevancy"]["confidence"]["verdict"],
        want["confidence"]["verdict"]
    );

    // Without the extension: a plain OpenAI stream, no extra keys.
    let (status, _, body) = post(
        server.addr,
        &chat_body(
            QUESTION,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(
            c.get("relevancy").is_none() && c.get("confidence").is_none(),
            "{c}"
        );
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, want["text"].as_str().unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], want_ids.len() as u64);

    // The gradient methods stream their maps after the text, before the final chunk.
    let (status, _, body) = post(
        server.addr,
        &chat_body(
            QUESTION,
            json!({"stream": true, "max_tokens": 4, "relevancy": {"method": "baseline"}}),
        ),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let events = sse_events(&body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let n_text = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    let n_maps = chunks
        .iter()
        .filter(|c| c.get("relevancy").is_some())
        .count();
    assert_eq!(
        n_maps + 1,
        n_text,
        "one map per token (the role chunk has no map)"
    );
    assert!(chunks.last().unwrap().get("confidence").is_some());

    // Room in the context is checked against the prompt.
    let r = post(
        server.addr,
        &chat_body(QUESTION, json!({"max_tokens": 500})),
    );
    assert_error(
        &r,
        400,
        Some("max_tokens"),
        "prompt + max_tokens over the context",
    );

    // The counters saw it all.
    assert!(server.metric("fastrm_tokens_generated_total") >= (2 * want_ids.len()) as f64);
    let (status, _, body) = request(server.addr, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "fastrm-demo");
    let (status, _, _) = request(server.addr, "GET", "/health", None);
    assert_eq!(status, 200);
}

fn assert_error(
    resp: &(u16, Vec<(String, String)>, Vec<u8>),
    status: u16,
    param: Option<&str>,
    what: &str,
) {
    let body = String::from_utf8_lossy(&resp.2);
    assert_eq!(resp.0, status, "{what}: {body}");
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].is_string(), "{what}: {v}");
    assert_eq!(e["param"].as_str(), param, "{what}: {v}");
}

#[test]
fn malformed_requests_and_limits_get_openai_errors() {
    let server = Server::start(&["--max-image-bytes", "20000", "--max-body-bytes", "40000"]);
    let a = server.addr;
    let url = |s: &str| json!({"type": "image_url", "image_url": {"url": s}});
    let text = json!({"type": "text", "text": QUESTION});
    let with = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    let png = std::fs::read(repo_root().join("assets/demo/image.png")).unwrap();
    let small = "data:image/png;base64,".to_string()
        + &base64::engine::general_purpose::STANDARD.encode(&png[..png.len().min(15000)]);
    // A valid image under this server's byte limit.
    let dir = tempfile::tempdir().unwrap();
    let small_png = dir.path().join("small.png");
    let pixels = fastrm::vision::RgbImage::new(16, 16, vec![200; 16 * 16 * 3]).unwrap();
    fastrm::render::write_png(&small_png, &pixels).unwrap();
    let png_url = "data:image/png;base64,".to_string()
        + &base64::engine::general_purpose::STANDARD.encode(std::fs::read(&small_png).unwrap());
    let maps = |v: Value| {
        let mut v = v;
        v["relevancy"] = json!({"method": "baseline"});
        v
    };
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (json!({}), 400, Some("messages"), "no messages"),
        (
            json!({"messages": "hi"}),
            400,
            Some("messages"),
            "messages not an array",
        ),
        (json!({"messages": []}), 400, Some("messages"), "no message"),
        (
            json!({"messages": [{"role": "system", "content": "x"}]}),
            400,
            Some("messages[0]"),
            "a system message alone",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            400,
            Some("messages[0].role"),
            "tool role",
        ),
        (
            json!({"messages": [
                {"role": "user", "content": [url("data:image/png;base64,aGk="), text]},
                {"role": "assistant", "content": "yellow"},
            ]}),
            400,
            Some("messages[1]"),
            "ends with the assistant",
        ),
        (
            json!({"messages": [
                {"role": "user", "content": [text]},
                {"role": "assistant", "content": [url("data:image/png;base64,aGk=")]},
                {"role": "user", "content": "and?"},
            ]}),
            400,
            Some("messages[1].content[0]"),
            "an image in an assistant message",
        ),
        (
            json!({"messages": [
                {"role": "user", "content": [url(&png_url), text]},
                {"role": "assistant", "content": "yellow"},
                {"role": "user", "content": [url("data:image/png;base64,aGk="), text]},
            ]}),
            400,
            Some("messages[2].content[0].image_url.url"),
            "a bad image in a later message",
        ),
        (
            json!({"messages": [{"role": "user", "content": [url("data:image/png;base64,aGk="), {"type": "text", "text": "<image> hi"}]}]}),
            400,
            Some("messages[0].content"),
            "<image> in the text",
        ),
        (
            maps(with(json!(QUESTION))),
            400,
            Some("messages"),
            "maps of a text-only conversation",
        ),
        (
            maps(with(json!([text]))),
            400,
            Some("messages"),
            "maps without an image part",
        ),
        (
            with(json!([url("https://example.com/a.png"), text])),
            400,
            Some("messages[0].content[0].image_url.url"),
            "remote URL without --allow-image-urls",
        ),
        (
            with(json!([url("data:image/png;base64,@@@@"), text])),
            400,
            Some("messages[0].content[0].image_url.url"),
            "bad base64",
        ),
        (
            with(json!([url("data:image/gif;base64,R0lGODlh"), text])),
            400,
            Some("messages[0].content[0].image_url.url"),
            "gif",
        ),
        (
            with(json!([url("data:image/png;base64,aGVsbG8gd29ybGQ="), text])),
            400,
            Some("messages[0].content[0].image_url.url"),
            "not an image",
        ),
        (
            with(json!([url(&small), text])),
            400,
            Some("messages[0].content[0].image_url.url"),
            "truncated PNG",
        ),
        (
            with(json!([
                url(&png_url),
                url("data:image/png;base64,aGk="),
                text
            ])),
            400,
            Some("messages[0].content[1].image_url.url"),
            "a bad second image",
        ),
        (
            with(json!([{"type": "image_url", "image_url": 5}, text])),
            400,
            Some("messages[0].content[0].image_url"),
            "image_url wrong type",
        ),
        (
            with(json!([{"type": "audio"}, text])),
            400,
            Some("messages[0].content[0].type"),
            "unknown part",
        ),
        (
            with(json!(7)),
            400,
            Some("messages[0].content"),
            "content wrong type",
        ),
    ];
    for (body, status, param, what) in cases {
        assert_error(&post(a, &body), status, param, what);
    }
    // Fields beside the message, on an otherwise good request.
    let scene_url = image_url();
    let good = |extra: Value| {
        let mut v = with(json!([url(&scene_url), text]));
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            good(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
            "max_tokens 0",
        ),
        (
            good(json!({"max_tokens": "8"})),
            400,
            Some("max_tokens"),
            "max_tokens string",
        ),
        (
            good(json!({"max_completion_tokens": -3})),
            400,
            Some("max_completion_tokens"),
            "negative",
        ),
        (
            good(json!({"max_tokens": 100000})),
            400,
            Some("max_tokens"),
            "beyond the context",
        ),
        (
            good(json!({"stream": "yes"})),
            400,
            Some("stream"),
            "stream wrong type",
        ),
        (good(json!({"n": 17})), 400, Some("n"), "n over 16"),
        (good(json!({"n": 0})), 400, Some("n"), "n of 0"),
        (
            good(json!({"relevancy": {"method": "magic"}})),
            400,
            Some("relevancy.method"),
            "unknown method",
        ),
        (
            good(json!({"relevancy": "fastrm"})),
            400,
            Some("relevancy"),
            "relevancy wrong type",
        ),
        (
            good(json!({"relevancy": {"method": "gradcam", "layer": 99}})),
            400,
            Some("relevancy.layer"),
            "bad layer",
        ),
    ];
    for (body, status, param, what) in cases {
        assert_error(&post(a, &body), status, param, what);
    }
    // Not JSON at all.
    let r = request(a, "POST", "/v1/chat/completions", Some(b"{not json"));
    assert_error(&r, 400, None, "bad JSON");
    // Over the image limit (the demo scene is 23 kB, the limit 20 kB) and the body limit.
    assert_error(
        &post(a, &good(json!({}))),
        413,
        Some("messages[0].content[0].image_url.url"),
        "image too large",
    );
    let huge = json!({"messages": [], "pad": "x".repeat(50_000)});
    assert_error(&post(a, &huge), 413, None, "body too large");
    let r = request(a, "GET", "/nope", None);
    assert_error(&r, 404, None, "unknown route");
    // Still serving after all that.
    let (status, _, _) = request(a, "GET", "/health", None);
    assert_eq!(status, 200);
    assert!(
        server.metric("fastrm_http_requests_total{route=\"/v1/chat/completions\",status=\"400\"}")
            >= 20.0
    );
}

/// Opens a streamed, deliberately long request and reads up to its first text chunk.
fn open_long_stream(addr: SocketAddr, max_tokens: usize) -> BufReader<TcpStream> {
    let body = chat_body(
        QUESTION,
        json!({"stream": true, "max_tokens": max_tokens, "ignore_eos": true, "relevancy": {"method": "fastrm"}}),
    );
    let s = send_request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(body.to_string().as_bytes()),
    );
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 2 {
        let c = read_chunk(&mut r).expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    r
}

/// Sends the server SIGTERM and reads what is left of the open stream `r`.
fn sigterm_and_read_rest(server: &Server, mut r: BufReader<TcpStream>) -> String {
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(c) = read_chunk(&mut r) {
        rest.extend(c);
    }
    String::from_utf8(rest).unwrap()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_hangs_up_cancels_its_run() {
    let server = Server::start(&["--test-token-delay-ms", "20"]);
    let r = open_long_stream(server.addr, 300);
    drop(r);
    wait_for("the cancellation", || {
        server.metric("fastrm_cancelled_total") >= 1.0
    });
    let n = server.metric("fastrm_tokens_generated_total");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.metric("fastrm_tokens_generated_total"),
        n,
        "the run went on"
    );
    assert!(n < 100.0, "{n} tokens of 300 before the run stopped");
    assert_eq!(server.metric("fastrm_busy"), 0.0);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // One run at a time, so the second request waits in the queue.
    let server = Server::start(&[
        "--max-queue",
        "1",
        "--max-batch",
        "1",
        "--test-token-delay-ms",
        "20",
    ]);
    let running = open_long_stream(server.addr, 300);
    // The second waits in the queue (its handler holds the connection until the worker starts it).
    let body = chat_body(QUESTION, json!({"max_tokens": 2}));
    let waiting = send_request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        Some(body.to_string().as_bytes()),
    );
    wait_for("the queued request", || {
        server.metric("fastrm_queue_depth") == 1.0
    });
    let r = post(server.addr, &body);
    assert_error(&r, 429, None, "third request");
    assert!(
        r.1.iter().any(|(k, v)| k == "retry-after" && v == "1"),
        "{:?}",
        r.1
    );
    assert_eq!(server.metric("fastrm_rejected_queue_full_total"), 1.0);
    // The running one leaves; the queued one is answered.
    drop(running);
    let mut r = BufReader::new(waiting);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
}

/// A conversation — a system prompt, an earlier exchange, a follow-up without an image — is
/// answered as the command line answers the same `messages` file (`--messages`).
#[test]
fn conversations_with_a_system_prompt_and_history_answer_as_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("assets/demo/image.png"),
        dir.path().join("image.png"),
    )
    .unwrap();
    let messages = |url: &str| {
        json!([
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": QUESTION},
            ]},
            {"role": "assistant", "content": "yellow"},
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "What color is the cross?"},
        ])
    };
    let file = dir.path().join("chat.json");
    std::fs::write(&file, messages("image.png").to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args(["generate", "--json", "-t", "1", "-n", "8", "--messages"])
        .arg(&file)
        .output()
        .unwrap();
    let want: Value = serde_json::from_str(&common::cli_ok(&out)).unwrap();
    let want_ids: Vec<u64> = ids(&want["generated_ids"])
        .into_iter()
        .filter(|&id| id != DEMO_EOS)
        .collect();
    assert!(want["prompt"]
        .as_str()
        .unwrap()
        .starts_with("Answer with one word. USER: <image>\n"));

    let server = Server::start(&[]);
    let request = json!({"messages": messages(&image_url()), "max_tokens": 8});
    let (status, _, body) = post(server.addr, &request);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim(),
        want["text"].as_str().unwrap().trim()
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        json!(ids(&want["input_ids"]).len())
    );
    assert_eq!(
        v["usage"]["completion_tokens"],
        json!(want_ids.len()),
        "{v}"
    );
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Sent again (a client retrying, or the next turn's shared beginning): the prompt's pages
    // come from the prefix cache and the answer is the same.
    let (status, _, again) = post(server.addr, &request);
    assert_eq!(status, 200);
    let again: Value = serde_json::from_slice(&again).unwrap();
    assert_eq!(again["choices"], v["choices"]);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached < prompt, "{cached} of {prompt}");
    // And in the metrics: both prompts counted, the second's cached part, the cache's pages.
    assert_eq!(
        server.metric("fastrm_prompt_tokens_total"),
        2.0 * prompt as f64
    );
    assert_eq!(
        server.metric("fastrm_prompt_tokens_cached_total"),
        cached as f64
    );
    let pages = server.metric("fastrm_prefix_cache_pages");
    assert!(pages > 0.0 && server.metric("fastrm_kv_pages_used") >= pages);
    assert!(server.metric("fastrm_kv_pages_limit") >= server.metric("fastrm_kv_pages_used"));
    assert_eq!(server.metric("fastrm_queue_wait_seconds_count"), 2.0);
    // Streamed, the usage chunk says the same.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, b) = post(server.addr, &streamed);
    assert_eq!(status, 200);
    let events = sse_events(&b);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(cached),
        "{usage}"
    );
}

/// `n` choices: one prompt, choice `i` sampled with the seed plus `i`, each exactly the one-choice
/// answer of that seed (text and maps), in one response and in one stream.
#[test]
fn n_choices_are_the_answers_of_consecutive_seeds() {
    // Bit-exact against the command line, which keeps no prefix cache (a cached prefix equals
    // a cold one only to rounding).
    let server = Server::start(&["--prefix-cache", "0"]);
    // A question the demo model answers in more than one way when sampled hot.
    const Q: &str = "What is in the picture?";
    let extra = |n: usize, seed: u64, stream: bool| {
        json!({"n": n, "seed": seed, "temperature": 2.0, "max_tokens": 5, "ignore_eos": true,
               "stream": stream, "relevancy": {"method": "fastrm"}})
    };
    let one = |seed: u64| -> Value {
        let (status, _, body) = post(server.addr, &chat_body(Q, extra(1, seed, false)));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let singles: Vec<Value> = (0..3).map(|i| one(40 + i)).collect();
    let (status, _, body) = post(server.addr, &chat_body(Q, extra(3, 40, false)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    for (i, (c, single)) in choices.iter().zip(&singles).enumerate() {
        assert_eq!(c["index"], json!(i));
        assert_eq!(c["message"], single["choices"][0]["message"], "choice {i}");
        let maps = |r: &Value| json!([r["tokens"], r["confidence"]]);
        assert_eq!(
            maps(&c["relevancy"]),
            maps(&single["relevancy"]),
            "choice {i}: maps"
        );
        total += single["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert!(
        v.get("relevancy").is_none(),
        "several choices carry their maps each"
    );
    assert_eq!(v["usage"]["completion_tokens"], json!(total));
    let texts: std::collections::BTreeSet<_> = choices
        .iter()
        .map(|c| c["message"]["content"].to_string())
        .collect();
    assert!(texts.len() > 1, "three seeds gave one text: {texts:?}");

    // Streamed: each choice's deltas, by index, join to its text; one [DONE] after all.
    let (status, _, body) = post(server.addr, &chat_body(Q, extra(3, 40, true)));
    assert_eq!(status, 200);
    let mut text = vec![String::new(); 3];
    let mut finished = [0; 3];
    let events = sse_events(&body);
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if let Some(t) = ch["delta"]["content"].as_str() {
            text[i].push_str(t);
        }
        if !ch["finish_reason"].is_null() {
            finished[i] += 1;
        }
    }
    assert_eq!(finished, [1, 1, 1]);
    for (i, single) in singles.iter().enumerate() {
        assert_eq!(
            json!(text[i]),
            single["choices"][0]["message"]["content"],
            "streamed choice {i}"
        );
    }
}

/// Requests that arrive together are decoded together (continuous batching), and each answer —
/// text, maps, usage — is the one it gets alone.
#[test]
fn concurrent_requests_share_decode_steps_and_answer_as_alone() {
    // Exact equality of a run alone and in a batch: without the prefix cache, whose hits
    // compute fewer rows per forward (equal only to rounding).
    let server = Server::start(&["--test-token-delay-ms", "5", "--prefix-cache", "0"]);
    let questions = [
        QUESTION,
        "What shape is in the picture?",
        "Is there a circle?",
        "Describe the image.",
        "What color is the background?",
    ];
    let body = |q: &str, i: usize| {
        chat_body(
            q,
            json!({"max_tokens": 6 + i, "ignore_eos": true, "relevancy": {"method": "fastrm"}}),
        )
    };
    let answer = |r: (u16, Vec<(String, String)>, Vec<u8>)| -> Value {
        assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
        let v: Value = serde_json::from_slice(&r.2).unwrap();
        json!({"choices": v["choices"], "usage": v["usage"]})
    };
    let alone: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| answer(post(server.addr, &body(q, i))))
        .collect();
    assert_eq!(
        server.metric("fastrm_decode_rows_total"),
        server.metric("fastrm_decode_steps_total"),
        "one request at a time decodes one row per step"
    );
    let (steps, rows) = (
        server.metric("fastrm_decode_steps_total"),
        server.metric("fastrm_decode_rows_total"),
    );
    let addr = server.addr;
    let together: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let b = body(q, i);
                sc.spawn(move || post(addr, &b))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| answer(h.join().unwrap()))
            .collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, t,
            "request {i}: its answer in a batch differs from alone"
        );
    }
    let (steps, rows) = (
        server.metric("fastrm_decode_steps_total") - steps,
        server.metric("fastrm_decode_rows_total") - rows,
    );
    assert!(
        rows > 1.5 * steps,
        "{rows} rows in {steps} steps: the concurrent requests were not batched"
    );
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let mut server = Server::start(&["--test-token-delay-ms", "20"]);
    let r = open_long_stream(server.addr, 20);
    let rest = sigterm_and_read_rest(&server, r);
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The Python that has the `openai` package: `FASTRM_PYTHON`, else the venv `.ci/run` makes under
/// `target/`, else `python3`.
fn python_with_openai() -> Option<std::path::PathBuf> {
    let venv = repo_root().join("target/pyenv/bin/python");
    let candidates = std::env::var_os("FASTRM_PYTHON")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([venv, "python3".into()]);
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[test]
#[ignore = "needs Python with the `openai` package (.ci/run installs it into target/pyenv and runs it; or set FASTRM_PYTHON): cargo test --test serve -- --ignored"]
fn the_official_openai_python_client_reads_the_answers() {
    let Some(py) = python_with_openai() else {
        panic!(
            "no Python with the `openai` package (.ci/run installs it into target/pyenv; or set \
             FASTRM_PYTHON)"
        );
    };
    let server = Server::start(&[]);
    // A second server fetches image URLs, from loopback too: the script serves one itself.
    let fetching = Server::start(&["--allow-image-urls", "--allow-private-image-urls"]);
    let out = Command::new(py)
        .arg(repo_root().join("tools/serve_client_test.py"))
        .arg(format!("http://{}", server.addr))
        .arg(repo_root().join("assets/demo/image.png"))
        .args([QUESTION, "yellow"])
        .arg(format!("http://{}", fetching.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok by URL"), "{stdout}");
}

/// An image over `--max-image-pixels` is a 413 naming the image field, checked before it takes a
/// place in the queue.
#[test]
fn an_image_over_the_pixel_limit_is_413() {
    let server = Server::start(&["--max-image-pixels", "1000"]);
    let resp = post(
        server.addr,
        &chat_body("What color is the star?", json!({})),
    );
    assert_error(
        &resp,
        413,
        Some("messages[0].content[0].image_url.url"),
        "too many pixels",
    );
    assert!(String::from_utf8_lossy(&resp.2).contains("pixels"));
}

/// The sampling fields do what the command line's flags do (the same answers, the same
/// log-probabilities), in both response shapes; fields that would change the answer and are not
/// implemented, unknown fields and out-of-range values are 400s naming the field.
#[test]
fn sampling_fields_match_the_command_line_and_the_rest_is_refused() {
    // Bit-exact against the command line, which keeps no prefix cache (a cached prefix equals
    // a cold one only to rounding).
    let server = Server::start(&["--prefix-cache", "0"]);
    let a = server.addr;
    let cli = |args: &[&str]| cli_json(&[&["generate"][..], args].concat());
    let answer = |extra: Value| -> Value {
        let r = post(a, &chat_body(QUESTION, extra));
        assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
        serde_json::from_slice(&r.2).unwrap()
    };
    // Sampled with a seed: the server's answer is the command line's, every time.
    let want = cli(&["--temperature", "1.8", "--seed", "5", "-n", "8"]);
    for _ in 0..2 {
        let v = answer(json!({"temperature": 1.8, "seed": 5, "max_tokens": 8}));
        assert_eq!(v["choices"][0]["message"]["content"], want["text"]);
    }
    // A stop string cuts the answer and is left out.
    let v = answer(json!({"stop": ["llo", "zz"]}));
    assert_eq!(v["choices"][0]["message"]["content"], "ye");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Log-probabilities, non-streamed and streamed, equal the command line's.
    let want = cli(&["--logprobs", "2"]);
    let v = answer(json!({"logprobs": true, "top_logprobs": 2}));
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let want_lp: Vec<&Value> = want["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ids(&want["generated_ids"]))
        .filter(|(_, id)| *id != DEMO_EOS)
        .map(|(l, _)| l)
        .collect();
    assert_eq!(content.len(), want_lp.len());
    for (c, w) in content.iter().zip(want_lp) {
        assert_eq!(c["logprob"], w["logprob"]);
        assert_eq!(c["token"], w["token"]);
        assert_eq!(c["bytes"], w["bytes"]);
        let tops: Vec<&Value> = c["top_logprobs"].as_array().unwrap().iter().collect();
        assert_eq!(tops.len(), 2);
        assert_eq!(tops[0]["token"], w["top_logprobs"][0]["token"]);
    }
    let r = post(
        a,
        &chat_body(
            QUESTION,
            json!({"logprobs": true, "top_logprobs": 2, "stream": true}),
        ),
    );
    let streamed: Vec<Value> = sse_events(&r.2)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            let l = &c["choices"][0]["logprobs"]["content"];
            l.as_array().map(|a| a[0].clone())
        })
        .collect();
    assert_eq!(streamed, content);
    // Refused, each naming its field.
    let cases: Vec<(Value, Option<&str>, &str)> = vec![
        (
            json!({"temperature": "hot"}),
            Some("temperature"),
            "ill-typed temperature",
        ),
        (
            json!({"temperature": 2.5}),
            Some("temperature"),
            "temperature out of range",
        ),
        (json!({"top_p": 0}), Some("top_p"), "top_p 0"),
        (json!({"stop": 42}), Some("stop"), "ill-typed stop"),
        (
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            Some("stop"),
            "five stops",
        ),
        (
            json!({"top_logprobs": 3}),
            Some("top_logprobs"),
            "top_logprobs without logprobs",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            Some("top_logprobs"),
            "21",
        ),
        (
            json!({"presence_penalty": -3}),
            Some("presence_penalty"),
            "presence",
        ),
        (
            json!({"logit_bias": {"383": -100}}),
            Some("logit_bias"),
            "logit_bias",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            Some("response_format"),
            "json",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            Some("tools"),
            "tools",
        ),
        (
            json!({"frobnicate": 1}),
            Some("frobnicate"),
            "unknown field",
        ),
    ];
    for (extra, param, what) in cases {
        assert_error(&post(a, &chat_body(QUESTION, extra)), 400, param, what);
    }
    // With ignore_eos an end-of-sequence id is an answer token like any other.
    let v = answer(json!({"ignore_eos": true, "max_tokens": 4}));
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Inert fields and the defaults of the refused ones pass.
    let v = answer(json!({"user": "u1", "response_format": {"type": "text"}, "store": false}));
    assert_eq!(v["choices"][0]["message"]["content"], "yellow");
}

/// The server's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Image bombs: a 8192x8192 PNG of a few kilobytes (192 MiB as RGB) and a JPEG header claiming
/// 20000x20000 are refused from their headers, four at once, before a pixel is decoded: the
/// server's peak memory grows by less than 32 MiB.
#[test]
fn image_bombs_are_refused_from_their_headers() {
    let side = 8192u32;
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&vec![0u8; (side * side) as usize])
            .unwrap();
    }
    assert!(png_bytes.len() < 1 << 20, "{} bytes", png_bytes.len());
    // SOI, then a baseline frame header: precision 8, height, width, 3 components.
    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
    jpeg.extend_from_slice(&20000u16.to_be_bytes());
    jpeg.extend_from_slice(&20000u16.to_be_bytes());
    jpeg.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = |url: String| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION},
        ]}]})
    };
    let server = Server::start(&["--max-image-pixels", "4000000"]);
    let a = server.addr;
    // Warm up (the first request sets up what every request uses), then measure.
    assert_eq!(
        post(a, &chat_body(QUESTION, json!({"max_tokens": 1}))).0,
        200
    );
    let before = peak_rss(server.child.id());
    let bombs = [
        format!("data:image/png;base64,{}", b64(&png_bytes)),
        format!("data:image/jpeg;base64,{}", b64(&jpeg)),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let b = body(bombs[i % 2].clone());
                s.spawn(move || post(a, &b))
            })
            .collect();
        for h in handles {
            let r = h.join().unwrap();
            assert_error(
                &r,
                413,
                Some("messages[0].content[0].image_url.url"),
                "image bomb",
            );
            let text = String::from_utf8_lossy(&r.2);
            assert!(
                text.contains("8192x8192") || text.contains("20000x20000"),
                "{text}"
            );
        }
    });
    let grew = peak_rss(server.child.id()).saturating_sub(before);
    assert!(grew < 32 << 20, "peak RSS grew by {} MiB", grew >> 20);
}

/// A request written by hand: `head_lines` after the request line (each ending in CRLF), then
/// `body` as it is (the declared length may lie). The response read to its end.
fn raw_request(
    addr: SocketAddr,
    request_line: &str,
    head_lines: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Our Host unless the caller gives its own.
    let host = if head_lines.starts_with("Host:") {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    let head = format!("{request_line}\r\n{host}Connection: close\r\n{head_lines}\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    read_response(s)
}

/// What a web page could send from a visitor's browser (a `text/plain` POST, a request from
/// another origin) is refused unless the origin was allowed; a body declared over the limit is
/// refused at once, without waiting for it; a wrong method gets an error body too.
#[test]
fn forged_browser_requests_and_lying_lengths_are_refused() {
    let server = Server::start(&["--cors-origin", "http://app.example"]);
    let a = server.addr;
    let body = chat_body(QUESTION, json!({"max_tokens": 2})).to_string();
    let post_with = |head: &str| {
        raw_request(
            a,
            "POST /v1/chat/completions HTTP/1.1",
            &format!("{head}Content-Length: {}\r\n", body.len()),
            body.as_bytes(),
        )
    };
    let r = post_with("Content-Type: text/plain\r\n");
    assert_error(&r, 415, None, "text/plain");
    // DNS rebinding: another site's name pointed at the loopback server, in Host and Origin.
    let port = a.port();
    let r = post_with(&format!(
        "Host: evil.example:{port}\r\nContent-Type: application/json\r\nOrigin: http://evil.example:{port}\r\n"
    ));
    assert_error(&r, 421, None, "a rebound name");
    let r = post_with("Content-Type: text/plain\r\nOrigin: http://app.example\r\n");
    assert_eq!(r.0, 415);
    assert!(
        r.1.iter()
            .any(|(k, v)| k == "access-control-allow-origin" && v == "http://app.example"),
        "an allowed page can read the error: {:?}",
        r.1
    );
    let r = post_with("Content-Type: application/json\r\nOrigin: http://evil.example\r\n");
    assert_error(&r, 403, None, "another origin");
    assert!(String::from_utf8_lossy(&r.2).contains("--cors-origin http://evil.example"));
    let same = format!("Content-Type: application/json; charset=utf-8\r\nOrigin: http://{a}\r\n");
    assert_eq!(post_with(&same).0, 200, "same origin");
    let r = post_with("Content-Type: application/json\r\nOrigin: http://app.example\r\n");
    assert_eq!(r.0, 200, "an allowed origin");
    let acao = |h: &[(String, String)]| {
        h.iter()
            .find(|(k, _)| k == "access-control-allow-origin")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(acao(&r.1).as_deref(), Some("http://app.example"));
    let pre = raw_request(
        a,
        "OPTIONS /v1/chat/completions HTTP/1.1",
        "Origin: http://app.example\r\nAccess-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: content-type, x-stainless-os\r\n",
        b"",
    );
    assert_eq!(pre.0, 204);
    assert_eq!(acao(&pre.1).as_deref(), Some("http://app.example"));
    assert!(
        pre.1.iter().any(
            |(k, v)| k == "access-control-allow-headers" && v == "content-type, x-stainless-os"
        ),
        "{:?}",
        pre.1
    );
    // A declared 100 MB body with a few bytes sent: refused at once.
    let t0 = Instant::now();
    let r = raw_request(
        a,
        "POST /v1/chat/completions HTTP/1.1",
        "Content-Type: application/json\r\nContent-Length: 100000000\r\n",
        b"{\"messages\"",
    );
    assert_error(&r, 413, None, "lying length");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let r = request(a, "GET", "/v1/chat/completions", None);
    assert_error(&r, 405, None, "GET on the chat endpoint");
}

/// A question longer than the context can hold is refused from its size before it is
/// tokenised (a 20 MB one) or by the prompt's length after (a few kilobytes), both with the
/// context-length code and `messages` as the field; neither holds up a valid request beside it.
#[test]
fn oversized_questions_are_refused_off_the_engine_thread() {
    let server = Server::start(&[]);
    let a = server.addr;
    let valid = || {
        let t0 = Instant::now();
        let r = post(a, &chat_body(QUESTION, json!({"max_tokens": 2})));
        assert_eq!(r.0, 200);
        t0.elapsed()
    };
    valid();
    let alone = (0..3).map(|_| valid()).min().unwrap();
    let huge = "why ".repeat(5 << 20);
    let long = "why ".repeat(3000);
    for (q, what) in [(&huge, "20 MB"), (&long, "12 KB")] {
        let body = chat_body(q, json!({}));
        // The best of three: a machine busy with other tests slows a run, not every run, while
        // a refusal that held the engine would slow each.
        let beside = (0..3)
            .map(|_| {
                std::thread::scope(|s| {
                    let refused = s.spawn(|| {
                        let t0 = Instant::now();
                        (post(a, &body), t0.elapsed())
                    });
                    std::thread::sleep(Duration::from_millis(20));
                    let t = valid();
                    let (r, took) = refused.join().unwrap();
                    // Tokenising 20 MB takes seconds; its size alone refuses it at once.
                    assert!(
                        took < Duration::from_secs(3),
                        "{what}: refused after {took:?}"
                    );
                    assert_error(&r, 400, Some("messages"), what);
                    let v: Value = serde_json::from_slice(&r.2).unwrap();
                    assert_eq!(v["error"]["code"], "context_length_exceeded", "{what}: {v}");
                    t
                })
            })
            .min()
            .unwrap();
        assert!(
            beside < alone + Duration::from_millis(100),
            "{what}: a valid request took {beside:?} beside it, {alone:?} alone"
        );
    }
}

/// `model` names the served model or the request is a 404 naming it; `GET /v1/models/{id}`
/// answers for the served one only.
#[test]
fn the_model_is_checked_and_retrievable() {
    let server = Server::start(&[]);
    let a = server.addr;
    let (status, _, body) = request(a, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    let (status, _, body) = request(a, "GET", &format!("/v1/models/{id}"), None);
    assert_eq!(status, 200);
    let one: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(one, list["data"][0]);
    let r = request(a, "GET", "/v1/models/gpt-4o", None);
    assert_error(&r, 404, Some("model"), "another model's page");
    let mut body = chat_body(QUESTION, json!({"max_tokens": 2}));
    body["model"] = json!("gpt-4o");
    let r = post(a, &body);
    assert_error(&r, 404, Some("model"), "another model");
    assert!(String::from_utf8_lossy(&r.2).contains("model_not_found"));
    body["model"] = json!(id);
    assert_eq!(post(a, &body).0, 200);
    body.as_object_mut().unwrap().remove("model");
    assert_eq!(post(a, &body).0, 200, "no model: the served one");
}

/// Several images in a conversation, each with its own map, and a conversation without images
/// (answered, without maps): what the command line answers for the same conversations.
#[test]
fn several_images_and_none_answer_as_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let scene = repo_root().join("assets/demo/image.png");
    std::fs::copy(&scene, dir.path().join("a.png")).unwrap();
    let mut img = fastrm::vision::load_image(&scene).unwrap();
    img.data.iter_mut().step_by(2).for_each(|v| *v = 255 - *v);
    fastrm::render::write_png(&dir.path().join("b.png"), &img).unwrap();
    let data_url = |name: &str| {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    let two = |a: &str, b: &str| {
        json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": a}},
            {"type": "text", "text": "Which star is yellow?"},
            {"type": "image_url", "image_url": {"url": b}},
        ]}])
    };
    let text_only = json!([{"role": "user", "content": "Say hello."}]);
    let cli = |messages: &Value, cmd: &str| {
        let file = dir.path().join("chat.json");
        std::fs::write(&file, messages.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .args([cmd, "--json", "-t", "1", "-n", "4", "--messages"])
            .arg(&file)
            .output()
            .unwrap();
        serde_json::from_str::<Value>(&common::cli_ok(&out)).unwrap()
    };
    let server = Server::start(&[]);
    let grid = 8;

    let want = cli(&two("a.png", "b.png"), "explain");
    let body = json!({
        "messages": two(&data_url("a.png"), &data_url("b.png")),
        "max_tokens": 4,
        "relevancy": {"method": "fastrm"},
    });
    let (status, _, got) = post(server.addr, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(
        got["usage"]["prompt_tokens"],
        json!(ids(&want["input_ids"]).len())
    );
    let tokens = got["relevancy"]["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty());
    // Every answer token's map in the entropy histogram, the answer under its verdict.
    assert_eq!(
        server.metric("fastrm_map_entropy_count"),
        tokens.len() as f64
    );
    let verdict = got["relevancy"]["confidence"]["verdict"].as_str().unwrap();
    assert_eq!(
        server.metric(&format!("fastrm_answers_total{{verdict=\"{verdict}\"}}")),
        1.0
    );
    for (t, w) in tokens.iter().zip(want["tokens"].as_array().unwrap()) {
        assert_eq!(t["images"], 2);
        assert_eq!(
            decode_map(t["map_b64"].as_str().unwrap()).len(),
            2 * grid * grid
        );
        assert_map_close("two images", t, w);
    }

    let want = cli(&text_only, "generate");
    let (status, _, got) = post(
        server.addr,
        &json!({"messages": text_only, "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(
        got["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim(),
        want["text"].as_str().unwrap().trim()
    );
}

/// Under a 256-descriptor limit, 300 connections that never finish a request head (silent, or
/// half a head) neither keep a fresh `/health` from an answer nor SIGTERM from ending the server:
/// the header timeout closes them, and shutdown has a deadline.
#[test]
fn stalled_connections_stop_neither_health_nor_sigterm() {
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_fastrm"))
        .args(["serve", "--port", "0", "-t", "1"])
        .args(["--header-timeout", "1", "--shutdown-timeout", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line {line:?}"))
        .parse()
        .unwrap();
    let stall = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 2 == 0 {
                    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                        .unwrap();
                }
                s
            })
            .collect()
    };
    let stalled = stall(300);
    let t0 = Instant::now();
    let (status, _, _) = request(addr, "GET", "/health", None);
    assert_eq!(status, 200);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "/health answered after {waited:?}"
    );
    // The server closed the stalled connections it took (reads see the end).
    drop(stalled);
    let _more = stall(100);
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    wait_for("the server to end after SIGTERM", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// A body declared and not sent is answered 408 once the body timeout passes, not waited for.
#[test]
fn a_body_that_never_arrives_is_408() {
    let server = Server::start(&["--body-timeout", "1"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"messages\":",
    )
    .unwrap();
    let t0 = Instant::now();
    let (status, _, body) = read_response(s);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// Shutdown with a deadline: a stream still running when it passes ends with an error chunk
/// (never a truncated stream that looks complete) and the server exits.
#[test]
fn a_stream_cut_by_the_shutdown_deadline_says_so() {
    let mut server = Server::start(&["--test-token-delay-ms", "100", "--shutdown-timeout", "1"]);
    let r = open_long_stream(server.addr, 400);
    let rest = sigterm_and_read_rest(&server, r);
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    assert!(rest.contains("\"code\":\"shutting_down\""), "{rest}");
    assert!(!rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
}

/// `relevancy.ungrounded`: the answer's running confidence (mean map entropy of its tokens so far)
/// against the head's calibrated threshold — flagged at the token where it is first reached, or
/// the streamed answer ended there. Tokens forced past the end of the answer (`ignore_eos`) have
/// unfocused maps, so the running mean climbs to the threshold.
#[test]
fn an_ungrounded_answer_is_flagged_or_stopped() {
    let server = Server::start(&["--prefix-cache", "0"]);
    let body = |mode: &str, stream: bool| {
        chat_body(
            QUESTION,
            json!({"stream": stream, "max_tokens": 12, "ignore_eos": true,
                   "relevancy": {"method": "fastrm", "ungrounded": mode}}),
        )
    };
    let chunks = |v: &Value| -> Vec<Value> {
        let (status, _, b) = post(server.addr, v);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        let events = sse_events(&b);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    };
    // Flagged: every token comes; the last chunk names the first token where the running mean
    // reached the threshold, recomputed here from the tokens' own entropies.
    let flagged = chunks(&body("flag", true));
    let last = flagged.last().unwrap();
    let threshold = last["confidence"]["threshold"].as_f64().unwrap() as f32;
    let entropies: Vec<f32> = flagged
        .iter()
        .filter_map(|c| c["relevancy"]["entropy"].as_f64())
        .map(|h| h as f32)
        .collect();
    assert_eq!(entropies.len(), 12);
    let mut sum = 0.0f64;
    let want = (0..entropies.len()).find(|&k| {
        sum += entropies[k] as f64;
        (sum / (k + 1) as f64) as f32 >= threshold
    });
    let k = want.expect("the running mean never reached the threshold: the test needs it to");
    assert!(k > 0, "the answer's own first token is grounded");
    assert_eq!(last["ungrounded"]["token"], json!(k), "{last}");
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Stopped: tokens up to that one, then the end.
    let stopped = chunks(&body("stop", true));
    let n_tokens = stopped
        .iter()
        .filter(|c| c.get("relevancy").is_some())
        .count();
    assert_eq!(n_tokens, k + 1);
    let end = stopped.last().unwrap();
    assert_eq!(end["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(end["ungrounded"]["token"], json!(k));

    // Not streamed: the response's relevancy says the same.
    let (status, _, b) = post(server.addr, &body("flag", false));
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["relevancy"]["ungrounded"]["token"], json!(k), "{v}");
    // A grounded answer (the model's own, ending at its end) is not flagged.
    let plain = chat_body(
        QUESTION,
        json!({"relevancy": {"method": "fastrm", "ungrounded": "flag"}}),
    );
    let (_, _, b) = post(server.addr, &plain);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["relevancy"]["ungrounded"], Value::Null, "{v}");

    for (extra, what) in [
        (
            json!({"relevancy": {"method": "gradcam", "ungrounded": "flag"}}),
            "not fastrm",
        ),
        (
            json!({"relevancy": {"method": "fastrm", "ungrounded": "stop"}}),
            "stop unstreamed",
        ),
        (
            json!({"n": 2, "relevancy": {"method": "fastrm", "ungrounded": "flag"}}),
            "n of 2",
        ),
        (
            json!({"relevancy": {"method": "fastrm", "ungrounded": "maybe"}}),
            "unknown mode",
        ),
    ] {
        assert_error(
            &post(server.addr, &chat_body(QUESTION, extra)),
            400,
            Some("relevancy.ungrounded"),
            what,
        );
    }
    let unknown = chat_body(
        QUESTION,
        json!({"relevancy": {"method": "fastrm", "colour": 1}}),
    );
    let r = post(server.addr, &unknown);
    assert_eq!(r.0, 400, "{}", String::from_utf8_lossy(&r.2));
    assert!(String::from_utf8_lossy(&r.2).contains("colour"));
}

/// A loopback HTTP/1.1 server for image URLs, one thread per connection: `/image.png` (the demo
/// image), `/hop/N` (a 302 to `/hop/N-1`, `/hop/0` to the image), `/big` (a `Content-Length`
/// over any limit), `/endless` (no length, bytes until the client stops), `/slow` (a head, then
/// nothing for 30 s); anything else 404.
fn image_host() -> u16 {
    let png = std::fs::read(repo_root().join("assets/demo/image.png")).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let png = png.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap_or(0);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = first.split(' ').nth(1).unwrap_or("/").to_string();
                let mut w = &s;
                let head = |status: &str, extra: &str| {
                    format!("HTTP/1.1 {status}\r\n{extra}Connection: close\r\n\r\n")
                };
                let _ = match path.as_str() {
                    "/image.png" => w
                        .write_all(
                            head("200 OK", &format!("Content-Length: {}\r\n", png.len()))
                                .as_bytes(),
                        )
                        .and_then(|()| w.write_all(&png)),
                    "/big" => {
                        w.write_all(head("200 OK", "Content-Length: 999999999\r\n").as_bytes())
                    }
                    "/endless" => w
                        .write_all(head("200 OK", "").as_bytes())
                        .and_then(|()| loop {
                            w.write_all(&[0u8; 65536])?;
                        }),
                    "/slow" => {
                        let r = w.write_all(head("200 OK", "Content-Length: 10\r\n").as_bytes());
                        std::thread::sleep(Duration::from_secs(30));
                        r
                    }
                    p => match p.strip_prefix("/hop/").and_then(|n| n.parse::<u32>().ok()) {
                        Some(0) => w.write_all(
                            head("302 Found", "Location: /image.png\r\nContent-Length: 0\r\n")
                                .as_bytes(),
                        ),
                        Some(n) => w.write_all(
                            head(
                                "302 Found",
                                &format!("Location: /hop/{}\r\nContent-Length: 0\r\n", n - 1),
                            )
                            .as_bytes(),
                        ),
                        None => {
                            w.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes())
                        }
                    },
                };
            });
        }
    });
    port
}

/// Image URLs: refused by name unless the server is started with `--allow-image-urls`; then only
/// from public addresses unless `--allow-private-image-urls`; then fetched (redirects followed
/// up to a bound) under the byte limit and the time limit, and answered as the same image sent
/// inline.
#[test]
fn image_urls_are_fetched_only_when_allowed_and_within_limits() {
    let port = image_host();
    let at = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let with_url = |url: String| {
        let mut body = chat_body(QUESTION, json!({"max_tokens": 6}));
        body["messages"][0]["content"][0]["image_url"]["url"] = json!(url);
        body
    };
    let param = Some("messages[0].content[0].image_url.url");
    let code_of = |r: &(u16, Vec<(String, String)>, Vec<u8>)| -> String {
        let v: Value = serde_json::from_slice(&r.2).unwrap();
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    };

    let plain = Server::start(&[]);
    let r = post(plain.addr, &with_url(at("/image.png")));
    assert_error(&r, 400, param, "a URL by default");
    assert_eq!(code_of(&r), "remote_image_unsupported");
    assert!(String::from_utf8_lossy(&r.2).contains("--allow-image-urls"));
    drop(plain);

    let public_only = Server::start(&["--allow-image-urls"]);
    for url in [
        at("/image.png"),
        format!("http://localhost:{port}/image.png"),
    ] {
        let r = post(public_only.addr, &with_url(url.clone()));
        assert_error(&r, 400, param, &url);
        assert_eq!(code_of(&r), "image_url_refused", "{url}");
        assert!(String::from_utf8_lossy(&r.2).contains("--allow-private-image-urls"));
    }
    drop(public_only);

    let server = Server::start(&[
        "--allow-image-urls",
        "--allow-private-image-urls",
        "--image-url-timeout",
        "1",
        "--max-image-bytes",
        "200000",
        "--prefix-cache",
        "0",
    ]);
    let inline = post(server.addr, &chat_body(QUESTION, json!({"max_tokens": 6})));
    assert_eq!(inline.0, 200, "{}", String::from_utf8_lossy(&inline.2));
    let inline: Value = serde_json::from_slice(&inline.2).unwrap();
    for path in ["/image.png", "/hop/3"] {
        let r = post(server.addr, &with_url(at(path)));
        assert_eq!(r.0, 200, "{path}: {}", String::from_utf8_lossy(&r.2));
        let v: Value = serde_json::from_slice(&r.2).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"], inline["choices"][0]["message"]["content"],
            "{path}"
        );
        assert_eq!(v["usage"], inline["usage"], "{path}");
    }
    let refused = [
        ("/hop/9", 400, "image_url_failed", "more than 5 redirects"),
        ("/missing", 400, "image_url_failed", "HTTP 404"),
        ("/big", 413, "image_too_large", "200000 bytes"),
        ("/endless", 413, "image_too_large", "200000 bytes"),
        ("/slow", 400, "image_url_failed", "longer than 1 s"),
    ];
    for (path, status, code, says) in refused {
        let t0 = Instant::now();
        let r = post(server.addr, &with_url(at(path)));
        assert_error(&r, status, param, path);
        assert_eq!(code_of(&r), code, "{path}");
        let body = String::from_utf8_lossy(&r.2);
        assert!(body.contains(says), "{path}: {body}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{path} took {:?}",
            t0.elapsed()
        );
    }
    // The server still answers after every failed fetch.
    assert_eq!(post(server.addr, &with_url(at("/image.png"))).0, 200);
}

/// The companions of `--allow-image-urls` are refused without it rather than ignored.
#[test]
fn image_url_flags_need_allow_image_urls() {
    for flag in [
        &["--allow-private-image-urls"][..],
        &["--image-url-timeout", "5"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
            .arg("serve")
            .args(flag)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag:?} was accepted alone");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--allow-image-urls"), "{flag:?}: {err}");
    }
}

/// `--prefill-chunk` reaches the engine: a prompt runs through the decoder in that many chunks
/// (the metric counts them; a whole prompt is one) and the answer is the whole prefill's.
#[test]
fn a_chunked_prefill_answers_as_a_whole_one() {
    let body = chat_body(
        QUESTION,
        json!({"max_tokens": 6, "relevancy": {"method": "fastrm"}}),
    );
    let mut answers = Vec::new();
    for chunk in [None, Some(64)] {
        let mut flags = vec!["--prefix-cache", "0"];
        let chunk_flag = chunk.map(|c: usize| c.to_string());
        if let Some(c) = &chunk_flag {
            flags.extend(["--prefill-chunk", c.as_str()]);
        }
        let server = Server::start(&flags);
        let r = post(server.addr, &body);
        assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
        let v: Value = serde_json::from_slice(&r.2).unwrap();
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        let want = chunk.map_or(1, |c| prompt.div_ceil(c));
        assert_eq!(
            server.metric("fastrm_prefill_chunks_total") as usize,
            want,
            "a prompt of {prompt} positions with --prefill-chunk {chunk:?}"
        );
        answers.push(v);
    }
    let (whole, chunked) = (&answers[0], &answers[1]);
    assert_eq!(
        chunked["choices"][0]["message"]["content"],
        whole["choices"][0]["message"]["content"]
    );
    let maps = |v: &Value| -> Vec<Vec<f32>> {
        v["relevancy"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| decode_map(m["map_b64"].as_str().unwrap()))
            .collect()
    };
    let (a, b) = (maps(chunked), maps(whole));
    assert!(!b.is_empty() && a.len() == b.len());
    for (t, (x, y)) in a.iter().zip(&b).enumerate() {
        for (g, w) in x.iter().zip(y) {
            assert!(
                (g - w).abs() <= w.abs() * 1e-3 + 1e-7,
                "token {t}: {g} vs {w}"
            );
        }
    }
}

/// A tiled model (LLaVA-NeXT) answers with maps per token like a square one: each image's map is
/// placed on its picture — exactly `ImageLayout::place` of the command line's raw map — with the
/// grid of each image (`grids`, different for a wide and a tall picture, so no shared `grid`) and
/// what it covers (`whole_image`); the request's relevancy says the same.
#[test]
fn tiled_images_get_maps_placed_on_each_picture() {
    let next = common::fixture_dir("next");
    let dir = tempfile::tempdir().unwrap();
    let messages = |a: &str, b: &str| {
        json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": a}},
            {"type": "image_url", "image_url": {"url": b}},
            {"type": "text", "text": "Which is taller?"},
        ]}])
    };
    let wide = next.join("wide.png");
    let tall = next.join("tall.png");
    let file = dir.path().join("chat.json");
    std::fs::write(
        &file,
        messages(wide.to_str().unwrap(), tall.to_str().unwrap()).to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fastrm"))
        .args([
            "explain", "--json", "-t", "1", "-n", "3", "--method", "baseline",
        ])
        .args(["--model", next.to_str().unwrap(), "--messages"])
        .arg(&file)
        .output()
        .unwrap();
    let want: Value = serde_json::from_str(&common::cli_ok(&out)).unwrap();
    // The layouts the engine gives these two pictures.
    let engine = fastrm::Engine::load(fastrm::backend::cpu::Cpu, &next).unwrap();
    let conv = fastrm::engine::chat::parse_messages(&messages("a", "b").to_string()).unwrap();
    let req = fastrm::Request::Chat {
        turns: conv.turns,
        images: vec![
            fastrm::ImageInput::Path(wide.clone()),
            fastrm::ImageInput::Path(tall.clone()),
        ],
    };
    let (prompt, _) = engine.resolve(&req).unwrap();
    let layouts = prompt.layouts().to_vec();
    let grids: Vec<(usize, usize)> = layouts.iter().map(|l| l.placed_grid()).collect();
    assert_ne!(grids[0], grids[1], "a wide and a tall picture");

    let server = Server::start(&["--model", next.to_str().unwrap()]);
    let url = |p: &std::path::Path| {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
        )
    };
    let body = json!({
        "messages": messages(&url(&wide), &url(&tall)),
        "max_tokens": 3,
        "relevancy": {"method": "baseline"},
    });
    let (status, _, got) = post(server.addr, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    let got: Value = serde_json::from_slice(&got).unwrap();
    let rel = &got["relevancy"];
    let wire_grids = json!(grids.iter().map(|g| [g.0, g.1]).collect::<Vec<_>>());
    assert_eq!(rel["grids"], wire_grids);
    assert_eq!(rel["covers"], json!(["whole_image", "whole_image"]));
    assert!(rel.get("grid").is_none(), "no shared grid: {rel}");
    let tokens = rel["tokens"].as_array().unwrap();
    let cli_tokens = want["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), cli_tokens.len());
    assert!(!tokens.is_empty());
    for (t, w) in tokens.iter().zip(cli_tokens) {
        assert_eq!(t["id"], w["id"]);
        assert_eq!(t["grids"], wire_grids);
        let raw: Vec<f32> = common::json_f32s(w, "map");
        let mut placed = Vec::new();
        let mut rest = &raw[..];
        for l in &layouts {
            let (part, tail) = rest.split_at(l.tokens());
            rest = tail;
            placed.extend(l.place(part).unwrap().1);
        }
        assert!(rest.is_empty());
        let wire = decode_map(t["map_b64"].as_str().unwrap());
        assert_eq!(wire.len(), placed.len());
        for (i, (g, w)) in wire.iter().zip(&placed).enumerate() {
            assert!(
                (g - w).abs() <= w.abs() * 1e-3 + 1e-7,
                "value {i}: {g} vs {w}"
            );
        }
    }
}
