//! `lntune serve` on the tiny model over real sockets: answers equal `lntune generate`'s
//! (base and adapters, streamed or not, alone or batched together), OpenAI error bodies with
//! the right statuses, back-pressure, cancellation of a client that goes away.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::*;

/// A running server; killed when dropped. Its stderr (one line per request) is collected.
pub struct Server {
    child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(args: &[String]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["--threads", "1", "serve", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}; log: {}", log.lock().unwrap()));
        Server { child, port, log }
    }

    /// (status, body) of one request (HTTP/1.1, connection closed after it; a chunked body
    /// is joined).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        // a refused body may close the connection before all of it is written
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    pub fn chat(&self, body: &Value, key: Option<&str>) -> (u16, Value) {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, body) = self.request(
            "POST",
            "/v1/chat/completions",
            &headers,
            body.to_string().as_bytes(),
        );
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// The text of a streamed answer (its `data:` chunks' deltas) and its finish reason.
    pub fn chat_stream(&self, body: &Value) -> (String, String) {
        let mut b = body.clone();
        b["stream"] = true.into();
        let (status, text) = self.request(
            "POST",
            "/v1/chat/completions",
            &[],
            b.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
        let mut answer = String::new();
        let mut finish = String::new();
        let datas: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
        for d in &datas[..datas.len() - 1] {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            let c = &v["choices"][0];
            answer.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        (answer, finish)
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

fn question(model: &str, image: &[u8], text: &str, max_tokens: usize) -> Value {
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image)
    );
    json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn generate(t: &TinyRun, adapter: Option<&str>, prompt: &str, n: usize) -> String {
    generate_with(t, adapter, prompt, n, &[])
}

fn generate_with(
    t: &TinyRun,
    adapter: Option<&str>,
    prompt: &str,
    n: usize,
    extra: &[&str],
) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lntune"));
    c.args(["--threads", "1", "generate", "--model"])
        .arg(t.path("model"))
        .arg("--image")
        .arg(t.path("data/images/test_00000.png"))
        .args([
            "--template",
            "chatml",
            "--prompt",
            prompt,
            "--max-new-tokens",
            &n.to_string(),
        ]);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(t.path(a));
    }
    c.args(extra);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn tiny_with_two_adapters() -> TinyRun {
    let t = TinyRun::new();
    pattern_adapter(&t.path("model"), lntune::methods::Method::Ln, &t.path("ln"));
    pattern_adapter(
        &t.path("model"),
        lntune::methods::Method::Lora,
        &t.path("lora"),
    );
    t
}

fn server_args(t: &TinyRun, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--model".to_string(),
        t.path("model").display().to_string(),
        "--template".into(),
        "chatml".into(),
        "--adapter".into(),
        format!("ln={}", t.path("ln").display()),
        "--adapter".into(),
        format!("lora={}", t.path("lora").display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn serve_answers_as_generate_does_for_the_base_and_each_adapter() {
    let t = tiny_with_two_adapters();
    let server = Server::start(&server_args(&t, &[]));
    let (status, models) = server.request("GET", "/v1/models", &[], b"");
    assert_eq!(status, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["model", "ln", "lora"]);
    let image = std::fs::read(t.path("data/images/test_00000.png")).unwrap();
    let prompt = "What color is the shape?";
    let mut want = Vec::new();
    for (model, adapter) in [("model", None), ("ln", Some("ln")), ("lora", Some("lora"))] {
        let reference = generate(&t, adapter, prompt, 12);
        let q = question(model, &image, prompt, 12);
        let (status, r) = server.chat(&q, None);
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"],
            reference.as_str(),
            "{model}"
        );
        let used = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert!(used <= 12 && used >= reference.is_empty() as usize, "{r}");
        let (streamed, finish) = server.chat_stream(&q);
        assert_eq!(streamed, reference, "{model}, streamed");
        assert!(finish == "stop" || finish == "length");
        want.push((q, reference));
    }
    // a system message goes through the template as `generate --system` puts it
    let system = "You answer in one word.";
    let mut q = want[1].0.clone();
    q["messages"] = json!([{"role": "system", "content": system}, q["messages"][0].clone()]);
    let reference = generate_with(&t, Some("ln"), prompt, 12, &[]);
    let with_system = generate_with(&t, Some("ln"), prompt, 12, &["--system", system]);
    assert_ne!(with_system, reference, "the system message changes nothing");
    let (status, r) = server.chat(&q, None);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], with_system.as_str());
    // the adapters change the answers of this model (else the test would prove nothing)
    assert!(want[0].1 != want[1].1 || want[0].1 != want[2].1, "{want:?}");
    // all at once, mixed: batched by adapter, every answer as alone
    let server = Arc::new(server);
    let threads: Vec<_> = (0..9)
        .map(|i| {
            let (q, w) = want[i % 3].clone();
            let s = server.clone();
            std::thread::spawn(move || {
                let (status, r) = s.chat(&q, None);
                assert_eq!(status, 200, "{r}");
                assert_eq!(r["choices"][0]["message"]["content"], w.as_str());
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // one log line per request (read from the server's stderr as it comes)
    let t0 = Instant::now();
    loop {
        let log = server.log.lock().unwrap().clone();
        let n = log.matches(" completion ").count();
        if n == 7 + 9 {
            break;
        }
        assert!(n < 16 && t0.elapsed() < Duration::from_secs(30), "{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_refuses_bad_requests_with_openai_errors_and_keeps_serving() {
    let t = tiny_with_two_adapters();
    let server = Server::start(&server_args(
        &t,
        &["--api-key", "sesame", "--max-body-bytes", "200000"],
    ));
    let image = std::fs::read(t.path("data/images/test_00000.png")).unwrap();
    let good = question("ln", &image, "Hi", 4);
    let key = Some("sesame");
    let cases: Vec<(Value, Option<&str>, u16, &str)> = vec![
        (good.clone(), None, 401, "invalid_request_error"),
        (good.clone(), Some("wrong"), 401, "invalid_request_error"),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            key,
            404,
            "invalid_request_error",
        ),
        (json!({"model": "ln"}), key, 400, "invalid_request_error"),
        (
            json!({"model": "ln", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
            key,
            400,
            "invalid_request_error",
        ),
        (
            question("ln", b"not an image", "x", 4),
            key,
            400,
            "invalid_request_error",
        ),
    ];
    for (body, k, status, kind) in cases {
        let (s, r) = server.chat(&body, k);
        assert_eq!(s, status, "{body}: {r}");
        assert_eq!(r["error"]["type"], kind, "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (s, r) = server.chat(
        &json!({"model": "ln", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
        key,
    );
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    // malformed JSON and an oversized body
    let auth = [("Authorization", "Bearer sesame")];
    let (s, body) = server.request("POST", "/v1/chat/completions", &auth, b"{\"model\": ");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let big = vec![b'x'; 300_000];
    let (s, body) = server.request("POST", "/v1/chat/completions", &auth, &big);
    assert_eq!(s, 413, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (s, _) = server.request("GET", "/nowhere", &[], b"");
    assert_eq!(s, 404);
    // still serving
    let (s, r) = server.chat(&good, key);
    assert_eq!(s, 200, "{r}");
    let (s, h) = server.request("GET", "/health", &[], b"");
    assert_eq!((s, h.contains("ok")), (200, true));
    // an image over the pixel limit is refused from its header, naming the limit
    let strict = Server::start_with_env(
        &server_args(&t, &[]),
        &[("LNTUNE_MAX_IMAGE_PIXELS", "1000")],
    );
    let (s, r) = strict.chat(&question("ln", &image, "Hi", 4), None);
    assert_eq!(s, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit of 1000 pixels"),
        "{r}"
    );
    // a request past its timeout: 504 (a server whose timeout has passed before decoding)
    let hasty = Server::start(&server_args(&t, &["--timeout", "0.000001"]));
    let (s, r) = hasty.chat(&good, None);
    assert_eq!(
        (s, r["error"]["type"].as_str()),
        (504, Some("timeout")),
        "{r}"
    );
    // the page is served
    let (s, page) = server.request("GET", "/", &[], b"");
    assert_eq!(s, 200);
    assert!(page.contains("/v1/chat/completions"));
}

#[test]
fn serve_answers_429_when_its_queue_is_full_and_cancels_a_departed_client() {
    let t = tiny_with_two_adapters();
    let server = Arc::new(Server::start(&server_args(
        &t,
        &["--queue", "1", "--max-batch", "1"],
    )));
    let image = std::fs::read(t.path("data/images/test_00000.png")).unwrap();
    // long answers: no EOS for the pattern adapter's greedy path is not guaranteed, so
    // ask for many tokens and count on the queue of one
    let q = question("lora", &image, "Describe.", 200);
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (s, q) = (server.clone(), q.clone());
            std::thread::spawn(move || s.chat(&q, None))
        })
        .collect();
    let results: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<&Value> = results
        .iter()
        .filter(|r| r.0 == 429)
        .map(|r| &r.1)
        .collect();
    assert_eq!(ok + busy.len(), 12, "{results:?}");
    assert!(
        ok >= 1 && !busy.is_empty(),
        "{ok} answered, {} refused",
        busy.len()
    );
    assert_eq!(busy[0]["error"]["type"], "rate_limit_error");

    // a streaming client that reads one chunk and leaves: its generation stops early
    let mut long = q.clone();
    // the tiny model's context is 256 tokens, this prompt 47
    long["max_tokens"] = 200.into();
    long["stream"] = true.into();
    long["messages"][0]["content"][0]["text"] = "Leave early.".into();
    let body = long.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let _ = s.read(&mut first).unwrap();
    drop(s);
    let t0 = Instant::now();
    loop {
        let log = server.log.lock().unwrap().clone();
        if let Some(line) = log.lines().find(|l| l.contains("finish Cancelled")) {
            let n: usize = line
                .split(" completion ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert!(n < 200, "{line}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no cancellation logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The official `openai` Python client (interop venv) gets `lntune generate`'s greedy text
/// from the base and from each adapter, whole and streamed.
#[test]
fn openai_client_gets_what_generate_gives() {
    let Some(py) = crate::interop::python() else {
        return;
    };
    let t = tiny_with_two_adapters();
    let server = Server::start(&server_args(&t, &["--api-key", "k-123"]));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/interop/openai_chat.py");
    let prompt = "Which shapes are there?";
    for (model, adapter) in [("model", None), ("ln", Some("ln")), ("lora", Some("lora"))] {
        let reference = generate(&t, adapter, prompt, 10);
        let o = Command::new(&py)
            .arg(&script)
            .args([
                "--port",
                &server.port.to_string(),
                "--api-key",
                "k-123",
                "--model",
                model,
            ])
            .arg("--image")
            .arg(t.path("data/images/test_00000.png"))
            .args(["--prompt", prompt, "--max-tokens", "10"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["models"], json!(["model", "ln", "lora"]));
        assert_eq!(r["text"], reference.as_str(), "{model}");
        assert_eq!(r["streamed"], reference.as_str(), "{model}, streamed");
        assert_eq!(r["finish"], r["stream_finish"]);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 8 clients for 6 seconds on loopback, streamed and whole, all three models: no error, and
/// the server's memory after the first second stays flat.
#[test]
fn serve_load_on_loopback_ends_without_errors_and_with_flat_memory() {
    let t = tiny_with_two_adapters();
    let server = Arc::new(Server::start(&server_args(
        &t,
        &["--queue", "64", "--max-batch", "8"],
    )));
    let pid = server.child.id();
    let image = std::fs::read(t.path("data/images/test_00000.png")).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (s, stop) = (server.clone(), stop.clone());
            let q = question(
                ["model", "ln", "lora"][c % 3],
                &image,
                "Count the shapes.",
                16,
            );
            std::thread::spawn(move || {
                let (mut done, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if c % 2 == 0 {
                        let (status, r) = s.chat(&q, None);
                        if status != 200 {
                            failed.push(r.to_string());
                        }
                    } else {
                        s.chat_stream(&q);
                    }
                    done += 1;
                }
                (done, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut rss = vec![rss_kib(pid)];
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_kib(pid));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (done, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(done > 0);
        total += done;
    }
    let growth = rss.iter().max().unwrap() - rss[0];
    eprintln!("{total} requests; server RSS (KiB) each second after the first: {rss:?}");
    assert!(
        growth < 16 * 1024,
        "server memory grew by {growth} KiB: {rss:?}"
    );
}

/// The chat page in headless Chromium (Selenium, interop venv; Debian's chromium and
/// chromium-driver): model picker, image upload, the streamed answer equal to `lntune
/// generate`'s.
#[test]
fn chat_page_in_a_real_browser_streams_the_answer() {
    let Some(py) = crate::interop::python() else {
        return;
    };
    let have_browser = ["chromium", "chromedriver"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !have_browser {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium and chromedriver are missing (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: no chromium/chromedriver (apt-get install chromium chromium-driver)");
        return;
    }
    let t = tiny_with_two_adapters();
    let server = Server::start(&server_args(&t, &["--max-tokens", "12"]));
    let prompt = "What is in the image?";
    // the page asks greedily, with the server's default length
    let reference = generate(&t, Some("ln"), prompt, 12);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/interop/browser_chat.py");
    let o = Command::new(&py)
        .arg(&script)
        .args([
            "--port",
            &server.port.to_string(),
            "--model",
            "ln",
            "--prompt",
            prompt,
        ])
        .arg("--image")
        .arg(t.path("data/images/test_00000.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["models"], json!(["model", "ln", "lora"]));
    assert_eq!(r["errors"], json!([]));
    assert_eq!(r["images_shown"], 1);
    // the page shows text as the browser renders it (trailing spaces dropped)
    assert!(!reference.trim().is_empty());
    assert_eq!(r["answer"].as_str().unwrap(), reference.trim(), "{r}");
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("model ln prompt"), "{log}");
}
