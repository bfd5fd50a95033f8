//! Runs `pubsub-etcd console` against the etcd in `PUBSUB_ETCD_ENDPOINTS`
//! (default `127.0.0.1:2379`), each test in a namespace of its own, and
//! talks to its JSON API over plain HTTP/1.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");

struct Console {
    child: Child,
    addr: String,
    namespace: String,
}

impl Console {
    /// Starts a console on a free loopback port with these extra options.
    fn start(namespace: &str, extra: &[&str]) -> Console {
        let mut child = Command::new(BIN)
            .args([
                "--namespace",
                namespace,
                "console",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env_remove("PUBSUB_ETCD_CONSOLE_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start console");
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("console on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Console {
            child,
            addr,
            namespace: namespace.to_string(),
        }
    }

    /// One request; the status and the body parsed as JSON.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, Value) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status: u16 = response[9..12].parse().unwrap();
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn cli(&self, args: &[&str]) {
        let status = Command::new(BIN)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{args:?} failed");
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(BIN)
            .args([
                "--namespace",
                &self.namespace,
                "topic",
                "delete",
                "t",
                "--if-exists",
            ])
            .stdout(Stdio::null())
            .status();
    }
}

fn namespace() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("console-test-{}-{nanos:08x}-{n}", std::process::id())
}

const JSON: &str = "Content-Type: application/json";

#[test]
fn overview_and_topic_show_what_etcd_holds() {
    let console = Console::start(&namespace(), &[]);
    console.cli(&["topic", "create", "t", "--partitions", "3"]);
    let (status, overview) = console.request("GET", "/api/overview", &[], "");
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["topics"][0]["name"], "t");
    assert_eq!(overview["topics"][0]["partitions"], 3);
    assert!(!overview["etcd"]["members"].as_array().unwrap().is_empty());
    // The overview is status's report, problems and quota included.
    assert!(overview["problems"].is_array(), "{overview}");
    assert_eq!(overview["etcd"]["quota_bytes"], 2u64 << 30);
    let (status, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(status, 200, "{topic}");
    assert_eq!(topic["partitions"].as_array().unwrap().len(), 3);
    let (status, _) = console.request("GET", "/api/topics/missing", &[], "");
    assert_eq!(status, 404);
}

#[test]
fn read_only_console_refuses_writes_even_with_a_token() {
    let console = Console::start(&namespace(), &["--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    let (status, body) = console.request(
        "POST",
        "/api/topics/t/messages",
        &[JSON, "Authorization: Bearer s3cret"],
        r#"{"value":"x"}"#,
    );
    assert_eq!(status, 403, "{body}");
}

#[test]
fn writes_need_the_right_token_json_and_same_origin() {
    let console = Console::start(&namespace(), &["--allow-writes", "--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    let path = "/api/topics/t/messages";
    let body = r#"{"value":"<script>alert(1)</script>"}"#;
    assert_eq!(console.request("POST", path, &[JSON], body).0, 401);
    let wrong = console.request("POST", path, &[JSON, "Authorization: Bearer nope"], body);
    assert_eq!(wrong.0, 401);
    let auth = "Authorization: Bearer s3cret";
    assert_eq!(console.request("POST", path, &[auth], body).0, 415);
    let foreign = console.request(
        "POST",
        path,
        &[JSON, auth, "Origin: http://evil.example"],
        body,
    );
    assert_eq!(foreign.0, 403);
    let (status, sent) = console.request("POST", path, &[JSON, auth], body);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["offset"], 0);
    let (_, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(topic["stored_messages"], 1);
}

#[test]
fn allow_writes_without_a_token_is_refused_at_start() {
    let output = Command::new(BIN)
        .args([
            "--namespace",
            &namespace(),
            "console",
            "--listen",
            "127.0.0.1:0",
            "--allow-writes",
        ])
        .env_remove("PUBSUB_ETCD_CONSOLE_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--auth-token"));
}
