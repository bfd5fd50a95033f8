//! The `pubsub-etcd` binary as a consumer-group member, against the etcd in
//! `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`): draining with
//! `--exit-at-end`. Each test works in a namespace of its own, emptied again
//! when the test ends.

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
                "cli-group-test-{}-{nanos:08x}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
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

    fn spawn(&self, args: &[&str], stdin: &[u8]) -> Child {
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
        child
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok_with(&self, args: &[&str], stdin: &[u8]) -> String {
        succeeded(args, wait_with_deadline(self.spawn(args, stdin)))
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, b"")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting a topic also deletes every group's state on it.
        let output = self
            .command(&["topic", "list", "--format", "json"])
            .output();
        let Ok(output) = output else { return };
        let Ok(Value::Array(topics)) = serde_json::from_slice::<Value>(&output.stdout) else {
            return;
        };
        for topic in topics {
            if let Some(name) = topic["name"].as_str() {
                let _ = self.command(&["topic", "delete", name]).output();
            }
        }
    }
}

fn succeeded(args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "{args:?} failed with {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
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

fn lag(ns: &Namespace, group: &str, topic: &str) -> u64 {
    let describe: Value = serde_json::from_str(&ns.ok(&[
        "group", "describe", group, "--topic", topic, "--format", "json",
    ]))
    .unwrap();
    describe
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_u64().unwrap())
        .sum()
}

/// Issue 8, item 4: with many partitions a member claims them one by one;
/// `--exit-at-end` must not take a partly claimed set that has caught up
/// for the end of the topic.
#[test]
fn group_exit_at_end_drains_every_partition_of_a_wide_topic() {
    let ns = Namespace::new();
    ns.ok(&["topic", "create", "t", "--partitions", "256"]);
    let input: String = (0..2560).map(|i| format!("{}:a{i}\n", i % 256)).collect();
    ns.ok_with(&["produce", "t", "--key-separator", ":"], input.as_bytes());
    let first = ns.ok(&["consume", "t", "--group", "dg", "--exit-at-end"]);
    assert_eq!(first.lines().count(), 2560);
    for p in 232..256 {
        ns.ok_with(&["produce", "t", "--partition", &p.to_string()], b"new\n");
    }
    let second = ns.ok(&["consume", "t", "--group", "dg", "--exit-at-end"]);
    assert_eq!(second.lines().count(), 24, "{second}");
    assert_eq!(lag(&ns, "dg", "t"), 0);
}
