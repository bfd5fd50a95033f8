//! The `pubsub-etcd` binary as a consumer-group member, against the etcd in
//! `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`) or a throwaway one:
//! draining with `--exit-at-end`, and going on under a NOSPACE alarm. Each
//! test works in a namespace of its own, emptied again when the test ends.

// The library's std-only etcd process harness.
#[path = "../../pubsub-etcd/tests/common/etcd_proc.rs"]
#[allow(dead_code)]
mod etcd_proc;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");
/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(120);

struct Namespace {
    name: String,
    /// Another etcd than the one in `PUBSUB_ETCD_ENDPOINTS`.
    endpoints: Option<String>,
}

impl Namespace {
    fn on(endpoints: String) -> Self {
        let mut ns = Namespace::new();
        ns.endpoints = Some(endpoints);
        ns
    }

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
            endpoints: None,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--namespace", &self.name, "--timeout", "5s"])
            .args(args)
            .env_remove("PUBSUB_ETCD_NAMESPACE");
        if let Some(endpoints) = &self.endpoints {
            command.env("PUBSUB_ETCD_ENDPOINTS", endpoints);
        }
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
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take().unwrap();
    // A caller may have taken stdout to read it as it comes.
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut buf);
        }
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

/// Issue 8, item 5: when etcd's quota is exhausted (NOSPACE alarm), a group
/// member keeps delivering, as a reader without a group does, retries its
/// commits, says so once, and does not exit for it.
#[test]
fn group_consumer_keeps_delivering_under_nospace() {
    let cluster = etcd_proc::EtcdCluster::start_with(etcd_proc::ClusterOptions {
        members: 1,
        quota_backend_bytes: Some(1024 * 1024),
        ..etcd_proc::ClusterOptions::default()
    });
    let ns = Namespace::on(cluster.endpoints().join(","));
    ns.ok(&["topic", "create", "t", "--partitions", "1"]);
    let input: String = (0..3000).map(|i| format!("{i:0>100}\n")).collect();
    ns.ok_with(&["produce", "t"], input.as_bytes());
    let args = ["consume", "t", "--group", "g"];
    let mut consumer = ns.spawn(&args, b"");
    // Its output is not read yet, so it stops after a pipe's worth, before
    // committing that batch.
    std::thread::sleep(Duration::from_secs(2));
    ns.ok(&["topic", "create", "filler", "--partitions", "1"]);
    let big: String = (0..64).map(|_| "x".repeat(60_000) + "\n").collect();
    let filled = wait_with_deadline(ns.spawn(&["produce", "filler"], big.as_bytes()));
    assert!(
        !filled.status.success() && String::from_utf8_lossy(&filled.stderr).contains("quota"),
        "the quota was not exhausted: {filled:?}"
    );
    let stdout = consumer.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut delivered = 0;
    while delivered < 3000 {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(_) => delivered += 1,
            Err(_) => break,
        }
    }
    let exited = consumer.try_wait().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &consumer.id().to_string()])
        .status();
    let output = wait_with_deadline(consumer);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        (delivered, exited),
        (3000, None),
        "stopped delivering under NOSPACE: {stderr}"
    );
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert_eq!(stderr.matches("quota exceeded").count(), 2, "{stderr}");
}
