//! Runs `pubsub-etcd console` against the etcd in `PUBSUB_ETCD_ENDPOINTS`
//! (default `127.0.0.1:2379`), each test in a namespace of its own, and
//! talks to its JSON API over plain HTTP/1.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use serde_json::Value;

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

    /// Opens a live tail; the status line, and the stream positioned after
    /// the response headers.
    fn tail(&self, query: &str) -> (u16, BufReader<TcpStream>) {
        let stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        write!(
            writer,
            "GET /api/topics/t/tail{query} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line[9..12].parse().unwrap();
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        (status, reader)
    }

    /// Runs the CLI with `input` on its standard input.
    fn cli_with_input(&self, args: &[&str], input: &[u8]) {
        let mut child = Command::new(BIN)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        assert!(child.wait().unwrap().success(), "{args:?} failed");
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
        let _ = Command::new(BIN)
            .args(["--namespace", &self.namespace, "group", "delete", "g"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn namespace() -> String {
    common::unique_name("console-test")
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

/// The next server-sent event of a tail, skipping keep-alive comments: its
/// name and its data parsed as JSON.
fn next_event(tail: &mut BufReader<TcpStream>) -> (String, Value) {
    let (mut name, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        assert!(tail.read_line(&mut line).unwrap() > 0, "tail ended");
        let line = line.trim_end();
        // Chunked transfer encoding puts each chunk's size on a line of its own.
        if let Some(value) = line.strip_prefix("event: ") {
            name = value.to_string();
        } else if let Some(value) = line.strip_prefix("data: ") {
            data = value.to_string();
        } else if line.is_empty() && !data.is_empty() {
            return (name, serde_json::from_str(&data).unwrap());
        }
    }
}

#[test]
fn message_view_pages_a_partition_from_an_offset() {
    let console = Console::start(&namespace(), &[]);
    console.cli(&["topic", "create", "t", "--partitions", "2"]);
    let lines = b"k0:v0\nk1:v1\nk2:<script>alert(1)</script>\nk3:v3\n";
    let to_zero = ["produce", "t", "--partition", "0"];
    console.cli_with_input(&[&to_zero[..], &["--key-separator", ":"]].concat(), lines);
    console.cli_with_input(&[&to_zero[..], &["--whole-file"]].concat(), &[0xff, 0x00]);
    let (status, page) = console.request(
        "GET",
        "/api/topics/t/partitions/0/messages?from=1&limit=2",
        &[],
        "",
    );
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{page}");
    assert_eq!(messages[0]["offset"], 1);
    assert_eq!(messages[0]["key"], "k1");
    assert_eq!(messages[1]["value"], "<script>alert(1)</script>");
    assert_eq!(messages[1]["topic"], "t");
    assert_eq!(page["next_offset"], 3);
    // Binary data comes as base64, as `consume --format json` prints it.
    let (_, page) = console.request("GET", "/api/topics/t/partitions/0/messages?from=4", &[], "");
    assert_eq!(page["messages"][0]["value_base64"], "/wA=", "{page}");
    assert_eq!(page["next_offset"], 5);
    // A page is never empty by request nor larger than its bound.
    let (_, page) = console.request(
        "GET",
        "/api/topics/t/partitions/0/messages?limit=0",
        &[],
        "",
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    let (_, page) = console.request(
        "GET",
        "/api/topics/t/partitions/0/messages?limit=1000000",
        &[],
        "",
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 5, "{page}");
    let (status, _) = console.request("GET", "/api/topics/t/partitions/1/messages", &[], "");
    assert_eq!(status, 200);
    let (status, body) = console.request("GET", "/api/topics/t/partitions/2/messages", &[], "");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn live_tail_sends_new_messages_that_match_its_filter() {
    let console = Console::start(&namespace(), &[]);
    console.cli(&["topic", "create", "t", "--partitions", "2"]);
    console.cli_with_input(
        &["produce", "t", "--key-separator", ":"],
        b"wanted-old:before\n",
    );
    let (status, mut tail) = console.tail("?key=wanted");
    assert_eq!(status, 200);
    let (status, mut on_one) = console.tail("?partition=1");
    assert_eq!(status, 200);
    console.cli_with_input(
        &["produce", "t", "--key-separator", ":", "--partition", "0"],
        b"other:skipped\nthe-wanted-one:hello\n",
    );
    console.cli_with_input(&["produce", "t", "--partition", "1"], b"on one\n");
    let (name, message) = next_event(&mut tail);
    assert_eq!(name, "message");
    assert_eq!(message["key"], "the-wanted-one", "{message}");
    assert_eq!(message["value"], "hello");
    assert_eq!(message["partition"], 0);
    assert!(message["timestamp"].is_i64(), "{message}");
    let (_, message) = next_event(&mut on_one);
    assert_eq!(message["value"], "on one", "{message}");
    assert_eq!(message["partition"], 1);
    let (status, _) = console.tail("?partition=7");
    assert_eq!(status, 404);
}

#[test]
fn live_tails_are_bounded_and_freed_when_closed() {
    const MAX_TAILS: usize = 16;
    let console = Console::start(&namespace(), &[]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    let open: Vec<_> = (0..MAX_TAILS)
        .map(|_| {
            let (status, tail) = console.tail("");
            assert_eq!(status, 200);
            tail
        })
        .collect();
    let (status, body) = console.request("GET", "/api/topics/t/tail", &[], "");
    assert_eq!(status, 503, "{body}");
    drop(open);
    // The server notices a closed tail at its next keep-alive, 3 s at most.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = console.tail("");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "closed tails were never freed");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn group_view_shows_owners_lag_and_its_history() {
    let console = Console::start(&namespace(), &[]);
    console.cli(&["topic", "create", "t", "--partitions", "2"]);
    console.cli_with_input(&["produce", "t", "--partition", "0"], b"a\nb\nc\n");
    console.cli(&[
        "group",
        "reset-offsets",
        "g",
        "--topic",
        "t",
        "--to-earliest",
        "--execute",
        "--new-group",
    ]);
    let (status, group) = console.request("GET", "/api/groups/g", &[], "");
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["lag"], 3);
    assert_eq!(group["partitions"].as_array().unwrap().len(), 2);
    assert_eq!(group["members"], serde_json::json!([]));
    assert_eq!(group["history"].as_array().unwrap().len(), 1);
    let (_, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(topic["partitions"][0]["write_rate"], Value::Null, "{topic}");
    console.cli_with_input(&["produce", "t", "--partition", "0"], b"d\ne\n");
    std::thread::sleep(Duration::from_millis(1100));
    let (_, group) = console.request("GET", "/api/groups/g", &[], "");
    let history = group["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{group}");
    assert_eq!(history[1]["lag"], 5);
    assert!(history[0]["at_ms"].as_i64() < history[1]["at_ms"].as_i64());
    let (_, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert!(
        topic["partitions"][0]["write_rate"].as_f64().unwrap() > 0.0,
        "{topic}"
    );
    assert_eq!(topic["partitions"][1]["write_rate"], 0.0, "{topic}");
    let (status, _) = console.request("GET", "/api/groups/missing", &[], "");
    assert_eq!(status, 404);
}

const AUTH: &str = "Authorization: Bearer s3cret";

/// Every write endpoint: method, path and a valid body.
const WRITES: [(&str, &str, &str); 5] = [
    ("POST", "/api/topics/t/messages", r#"{"value":"x"}"#),
    ("DELETE", "/api/topics/t/partitions/0/messages/0", ""),
    (
        "POST",
        "/api/groups/g/reset-offsets",
        r#"{"topic":"t","to":"earliest","execute":true,"new_group":true}"#,
    ),
    ("POST", "/api/topics", r#"{"name":"t2","partitions":1}"#),
    ("DELETE", "/api/topics/t", ""),
];

#[test]
fn read_only_console_refuses_every_write() {
    let console = Console::start(&namespace(), &["--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    console.cli_with_input(&["produce", "t"], b"kept\n");
    let (_, about) = console.request("GET", "/api/console", &[], "");
    assert_eq!(about["allow_writes"], false);
    for (method, path, body) in WRITES {
        let (status, answer) = console.request(method, path, &[JSON, AUTH], body);
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }
    let (status, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(status, 200);
    assert_eq!(topic["stored_messages"], 1);
    assert_eq!(console.request("GET", "/api/topics/t2", &[], "").0, 404);
    assert_eq!(console.request("GET", "/api/groups/g", &[], "").0, 404);
}

#[test]
fn every_write_refuses_a_wrong_token_and_a_foreign_origin() {
    let console = Console::start(&namespace(), &["--allow-writes", "--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    console.cli_with_input(&["produce", "t"], b"kept\n");
    let (_, about) = console.request("GET", "/api/console", &[], "");
    assert_eq!(about["allow_writes"], true);
    let foreign = "Origin: http://evil.example";
    for (method, path, body) in WRITES {
        let none = console.request(method, path, &[JSON], body);
        assert_eq!(none.0, 401, "{method} {path} without a token: {}", none.1);
        let wrong = console.request(method, path, &[JSON, "Authorization: Bearer s3cre"], body);
        assert_eq!(wrong.0, 401, "{method} {path} with a wrong token");
        let cross = console.request(method, path, &[JSON, AUTH, foreign], body);
        assert_eq!(cross.0, 403, "{method} {path} from another origin");
        if method == "POST" {
            let form = "Content-Type: application/x-www-form-urlencoded";
            let (status, _) = console.request(method, path, &[form, AUTH], body);
            assert_eq!(status, 415, "{method} {path} without JSON");
        }
    }
    let (_, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(topic["stored_messages"], 1, "{topic}");
    assert_eq!(console.request("GET", "/api/topics/t2", &[], "").0, 404);
    assert_eq!(console.request("GET", "/api/groups/g", &[], "").0, 404);
}

#[test]
fn topics_are_created_and_deleted_with_the_token() {
    let console = Console::start(&namespace(), &["--allow-writes", "--auth-token", "s3cret"]);
    let body = r#"{"name":"t","partitions":2,"retention_messages":10,"cleanup_policy":"compact"}"#;
    let same_origin = format!("Origin: http://{}", console.addr);
    let (status, created) =
        console.request("POST", "/api/topics", &[JSON, AUTH, &same_origin], body);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["partitions"], 2);
    let (_, topic) = console.request("GET", "/api/topics/t", &[], "");
    assert_eq!(topic["config"]["retention_messages"], 10, "{topic}");
    assert_eq!(topic["config"]["cleanup_policy"], "compact", "{topic}");
    assert_eq!(
        console
            .request("POST", "/api/topics", &[JSON, AUTH], body)
            .0,
        409
    );
    let bad = [
        r#"{"name":"t3"}"#,
        r#"{"name":"t3","partitions":0}"#,
        r#"{"name":"bad name/","partitions":1}"#,
        r#"{"name":"t3","partitions":1,"colour":"red"}"#,
    ];
    for body in bad {
        let (status, answer) = console.request("POST", "/api/topics", &[JSON, AUTH], body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, deleted) = console.request("DELETE", "/api/topics/t", &[AUTH], "");
    assert_eq!(status, 200, "{deleted}");
    // The console's own view of a topic is at most a second old.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(console.request("GET", "/api/topics/t", &[], "").0, 404);
    assert_eq!(
        console.request("DELETE", "/api/topics/t", &[AUTH], "").0,
        404
    );
}

#[test]
fn a_message_is_deleted_with_the_token() {
    let console = Console::start(&namespace(), &["--allow-writes", "--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    console.cli_with_input(&["produce", "t"], b"a\nb\nc\n");
    let path = "/api/topics/t/partitions/0/messages/1";
    let (status, deleted) = console.request("DELETE", path, &[AUTH], "");
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted"], 1);
    let (_, page) = console.request("GET", "/api/topics/t/partitions/0/messages", &[], "");
    let offsets: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offsets, [0, 2], "{page}");
    assert_eq!(console.request("DELETE", path, &[AUTH], "").0, 404);
    let beyond = "/api/topics/t/partitions/1/messages/0";
    assert_eq!(console.request("DELETE", beyond, &[AUTH], "").0, 404);
}

#[test]
fn offsets_are_reset_only_when_asked_to_execute() {
    let console = Console::start(&namespace(), &["--allow-writes", "--auth-token", "s3cret"]);
    console.cli(&["topic", "create", "t", "--partitions", "1"]);
    console.cli_with_input(&["produce", "t"], b"a\nb\nc\n");
    let path = "/api/groups/g/reset-offsets";
    let (status, plan) = console.request(
        "POST",
        path,
        &[JSON, AUTH],
        r#"{"topic":"t","to":"latest"}"#,
    );
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["executed"], false);
    assert_eq!(plan["offsets"][0]["offset"], 3);
    assert_eq!(plan["offsets"][0]["current"], Value::Null);
    assert_eq!(console.request("GET", "/api/groups/g", &[], "").0, 404);
    // As the CLI: executing on a group with no state needs new_group.
    let execute = r#"{"topic":"t","to":"latest","execute":true}"#;
    let (status, refused) = console.request("POST", path, &[JSON, AUTH], execute);
    assert_eq!(status, 404, "{refused}");
    let create = r#"{"topic":"t","to":"latest","execute":true,"new_group":true}"#;
    let (status, done) = console.request("POST", path, &[JSON, AUTH], create);
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["executed"], true);
    let back = r#"{"topic":"t","to":{"shift_by":-2},"execute":true}"#;
    let (status, done) = console.request("POST", path, &[JSON, AUTH], back);
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["offsets"][0]["current"], 3);
    assert_eq!(done["offsets"][0]["offset"], 1);
    let (_, group) = console.request("GET", "/api/groups/g", &[], "");
    assert_eq!(group["lag"], 2, "{group}");
    let bad = r#"{"topic":"t","to":"sideways"}"#;
    assert_eq!(console.request("POST", path, &[JSON, AUTH], bad).0, 400);
}

/// A chromedriver of this test's own and one headless Chromium session in
/// it, spoken to in plain WebDriver JSON over HTTP/1.1.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/install-deps.sh --browser installs it)");
        let mut browser = Browser {
            driver,
            addr: format!("127.0.0.1:{port}"),
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&browser.addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1100,800",
        ];
        let capabilities = serde_json::json!({
            "capabilities": { "alwaysMatch": { "goog:chromeOptions": { "args": args } } }
        });
        let created = browser.command("POST", "/session", Some(capabilities));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        // chromedriver keeps the connection open: read just Content-Length.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut length = 0;
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let answer: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {e} in {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        answer["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.command(method, &path, body)
    }

    fn open(&self, url: &str) {
        self.session_command("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    fn script(&self, script: &str) -> Value {
        let body = serde_json::json!({ "script": script, "args": [] });
        self.session_command("POST", "/execute/sync", Some(body))
    }

    /// Waits until the page's text contains `text`; how long that took.
    fn wait_for_text(&self, text: &str, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let shown = self.script("return document.body.innerText");
            if shown.as_str().is_some_and(|shown| shown.contains(text)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{text:?} not shown within {within:?}; the page shows {shown}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn click_link(&self, text: &str) {
        let query = serde_json::json!({ "using": "link text", "value": text });
        let found = self.session_command("POST", "/element", Some(query));
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no link {text:?}: {found}"))
            .to_string();
        self.session_command(
            "POST",
            &format!("/element/{id}/click"),
            Some(serde_json::json!({})),
        );
    }

    /// Saves the page as `name`.png in $CONSOLE_SCREENSHOTS (default: a
    /// temporary folder).
    fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let dir = std::env::var_os("CONSOLE_SCREENSHOTS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("pubsub-etcd-console-screenshots"));
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.session_command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.command("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The issue's browser test; run by scripts/test-browser.sh, which installs
/// Chromium and chromedriver.
#[test]
#[ignore = "needs chromium and chromedriver: scripts/test-browser.sh"]
fn console_in_a_browser() {
    let console = Console::start(&namespace(), &[]);
    console.cli(&[
        "topic",
        "create",
        "t",
        "--partitions",
        "3",
        "--retention",
        "7d",
    ]);
    console.cli_with_input(
        &[
            "produce",
            "t",
            "--partition",
            "0",
            "--key-separator",
            ":",
            "--header",
            "source=web",
        ],
        b"order-1:{\"total\":12}\norder-2:<script>window.hacked=1</script>\n",
    );
    console.cli_with_input(&["produce", "t", "--partition", "1"], b"a\nb\nc\n");
    console.cli(&[
        "group",
        "reset-offsets",
        "g",
        "--topic",
        "t",
        "--to-earliest",
        "--execute",
        "--new-group",
    ]);
    let browser = Browser::start();
    let home = format!("http://{}/", console.addr);
    browser.open(&home);
    let load = Duration::from_secs(10);
    browser.wait_for_text("topics (1)", load);
    browser.wait_for_text("groups (1)", load);
    browser.screenshot("console-overview");

    browser.click_link("t");
    browser.wait_for_text("topic t", load);
    let partitions = browser.script("return document.querySelectorAll('main table tr').length");
    assert_eq!(partitions, 4, "a header and three partition rows");
    browser.wait_for_text("retention_ms", load);
    browser.screenshot("console-topic");

    browser.open(&format!("{home}#group/g"));
    browser.wait_for_text("total lag: 5", load);
    // The page rereads the group every 2 s; the chart draws each read.
    console.cli_with_input(&["produce", "t", "--partition", "2"], b"d\ne\nf\n");
    browser.wait_for_text("total lag: 8", load);
    let chart = browser.script("return document.querySelectorAll('#lag-chart polyline').length");
    assert_eq!(chart, 1);
    browser.screenshot("console-group");

    browser.open(&format!("{home}#messages/t/0/0"));
    browser.wait_for_text("<script>window.hacked=1</script>", load);
    let injected = browser.script(
        "return [document.querySelectorAll('main script').length, window.hacked === undefined]",
    );
    assert_eq!(
        injected,
        serde_json::json!([0, true]),
        "a value ran as HTML"
    );
    browser.screenshot("console-messages");

    browser.open(&format!("{home}#tail/t"));
    browser.wait_for_text("following new messages", load);
    console.cli_with_input(
        &["produce", "t", "--key-separator", ":"],
        b"live-key:just produced\n",
    );
    let shown = browser.wait_for_text("just produced", Duration::from_secs(2));
    eprintln!("the live tail showed the message {shown:?} after produce returned");
    browser.screenshot("console-tail");
}

/// The issue's overview target: 100 topics of 10 partitions, each partition
/// holding messages, and 20 groups of 5 topics each. Prints how long the
/// overview takes, uncached, from the API and rendered in Chromium; run by
/// hand (see DESIGN.md), as speed targets live in benchmarks, not tests.
#[test]
#[ignore = "a benchmark: see DESIGN.md's console entry"]
fn overview_of_100_topics_and_20_groups() {
    let console = Console::start(&namespace(), &[]);
    let setup = Instant::now();
    let lines: String = (0..100).map(|i| format!("key-{i}:value {i}\n")).collect();
    for topic in 0..100 {
        let name = format!("bench-{topic:03}");
        console.cli(&["topic", "create", &name, "--partitions", "10"]);
        console.cli_with_input(
            &["produce", &name, "--key-separator", ":"],
            lines.as_bytes(),
        );
    }
    for group in 0..20 {
        let name = format!("group-{group:02}");
        let mut args = vec![
            "group",
            "reset-offsets",
            &name,
            "--to-earliest",
            "--execute",
        ];
        args.push("--new-group");
        let topics: Vec<String> = (0..5)
            .map(|i| format!("bench-{:03}", group * 5 + i))
            .collect();
        for topic in &topics {
            args.extend(["--topic", topic]);
        }
        console.cli(&args);
    }
    eprintln!("setup took {:?}", setup.elapsed());
    let mut api = Vec::new();
    for _ in 0..5 {
        // Past the console's one-second cache, so each read goes to etcd.
        std::thread::sleep(Duration::from_millis(1100));
        let start = Instant::now();
        let (status, overview) = console.request("GET", "/api/overview", &[], "");
        api.push(start.elapsed());
        assert_eq!(status, 200, "{overview}");
        assert_eq!(overview["topics"].as_array().unwrap().len(), 100);
        assert_eq!(overview["groups"].as_array().unwrap().len(), 20);
    }
    let browser = Browser::start();
    let mut rendered = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1100));
        let start = Instant::now();
        browser.open(&format!("http://{}/", console.addr));
        browser.wait_for_text("groups (20)", Duration::from_secs(30));
        rendered.push(start.elapsed());
    }
    api.sort();
    rendered.sort();
    eprintln!("GET /api/overview, uncached: {api:?}; median {:?}", api[2]);
    eprintln!(
        "overview page rendered in Chromium: {rendered:?}; median {:?}",
        rendered[2]
    );
    drop(browser);
    for topic in 0..100 {
        console.cli(&["topic", "delete", &format!("bench-{topic:03}")]);
    }
    // Deleting a topic deletes the groups' state on it, so no group is left.
}
