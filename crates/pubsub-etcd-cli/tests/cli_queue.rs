//! `pubsub-etcd queue` against the etcd in `PUBSUB_ETCD_ENDPOINTS` (default
//! `127.0.0.1:2379`): consume with acks, exec mode, describe, list, reset
//! and delete. Each test works in a namespace of its own, emptied again
//! when the test ends.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");
/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(120);

struct Namespace {
    name: String,
    topics: Vec<String>,
}

impl Namespace {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Namespace {
            name: format!(
                "cli-queue-test-{}-{nanos:08x}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            topics: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--namespace", &self.name, "--timeout", "5s"])
            .args(args)
            .env_remove("PUBSUB_ETCD_NAMESPACE");
        command
    }

    /// Runs a command that must succeed with `stdin` as input; returns its
    /// stdout.
    fn ok_with(&self, args: &[&str], stdin: &[u8]) -> String {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let output = wait_with_deadline(child);
        assert!(
            output.status.success(),
            "{args:?} failed with {:?}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("stdout is UTF-8")
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, b"")
    }

    fn topic(&mut self, name: &str, partitions: u32, lines: &str) {
        self.ok(&[
            "topic",
            "create",
            name,
            "--partitions",
            &partitions.to_string(),
        ]);
        self.ok_with(&["produce", name], lines.as_bytes());
        self.topics.push(name.to_string());
    }

    fn describe(&self, topic: &str) -> Value {
        let out = self.ok(&[
            "queue", "describe", topic, "--name", "q", "--format", "json",
        ]);
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for topic in &self.topics {
            let _ = self
                .command(&["queue", "delete", topic, "--name", "q"])
                .output();
            let _ = self.command(&["topic", "delete", topic]).output();
        }
    }
}

fn wait_with_deadline(mut child: Child) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the command did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn consume_acks_what_it_prints_and_describe_counts_it() {
    let mut ns = Namespace::new();
    let lines: String = (0..10).map(|i| format!("m{i}\n")).collect();
    ns.topic("t", 2, &lines);
    let out = ns.ok(&[
        "queue", "consume", "t", "--name", "q", "--max", "10", "--format", "json",
    ]);
    let mut values = BTreeSet::new();
    for line in out.lines() {
        let job: Value = serde_json::from_str(line).unwrap();
        assert_eq!(job["delivery_count"], 1, "{line}");
        values.insert(job["value"].as_str().unwrap().to_string());
    }
    assert_eq!(values.len(), 10, "{out}");
    let stats = ns.describe("t");
    assert_eq!(
        (&stats["pending"], &stats["in_flight"]),
        (&0.into(), &0.into()),
        "{stats}"
    );
    assert_eq!(
        ns.ok(&["queue", "list", "t", "--format", "json"]).trim(),
        r#"["q"]"#
    );

    ns.ok_with(&["produce", "t"], b"late\n");
    let text = ns.ok(&["queue", "consume", "t", "--name", "q", "--max", "1"]);
    assert_eq!(text, "late\n");
}

#[test]
fn exec_acks_on_success_and_nacks_on_failure() {
    let mut ns = Namespace::new();
    ns.topic("t", 1, "a\nb\n");
    let dir = std::env::temp_dir().join(format!("{}-exec", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("out");
    let command = format!(
        "cat >> {}; echo \" $PUBSUB_OFFSET\" >> {}",
        file.display(),
        file.display()
    );
    ns.ok(&[
        "queue", "consume", "t", "--name", "q", "--max", "1", "--exec", &command,
    ]);
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, "a 0\n");
    // The second message fails: nacked, so it waits for redelivery.
    ns.ok(&[
        "queue",
        "consume",
        "t",
        "--name",
        "q",
        "--max",
        "1",
        "--exec",
        "exit 3",
        "--nack-delay",
        "1h",
    ]);
    let stats = ns.describe("t");
    assert_eq!(
        (&stats["pending"], &stats["in_flight"]),
        (&1.into(), &0.into()),
        "{stats}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    ns.ok(&["queue", "reset", "t", "--name", "q", "--to-latest"]);
    assert_eq!(ns.describe("t")["pending"], 0);
    ns.ok(&["queue", "reset", "t", "--name", "q"]);
    assert_eq!(ns.describe("t")["pending"], 2);
    ns.ok(&["queue", "delete", "t", "--name", "q"]);
    assert_eq!(
        ns.ok(&["queue", "list", "t", "--format", "json"]).trim(),
        "[]"
    );
}
