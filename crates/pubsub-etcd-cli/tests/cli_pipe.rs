//! `pubsub-etcd pipe` against the etcd in `PUBSUB_ETCD_ENDPOINTS` (default
//! `127.0.0.1:2379`): the contract with CMD, one output line per input
//! line, and what happens when CMD breaks it. Each test works in a
//! namespace of its own, deleted when the test ends.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");
/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(60);

struct Namespace(String);

impl Namespace {
    fn new() -> Self {
        Namespace(format!("cli-pipe-test-{:016x}", rand::random::<u64>()))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--namespace", &self.0, "--timeout", "5s"])
            .args(args)
            .env_remove("PUBSUB_ETCD_NAMESPACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self.command(args).spawn().expect("the binary starts");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("{args:?} took over {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: &[u8]) -> String {
        let output = self.run(args, stdin);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Two topics of 2 partitions, `in` holding `lines`.
    fn with_input(&self, lines: &[u8], delimiter: &str) {
        for topic in ["in", "out"] {
            self.ok(&["topic", "create", topic, "--partitions", "2"], b"");
        }
        self.ok(
            &["produce", "in", "--key-separator", ":", "-D", delimiter],
            lines,
        );
    }

    fn consumed(&self, topic: &str) -> Vec<String> {
        let out = self.ok(
            &["consume", topic, "--from-beginning", "--exit-at-end"],
            b"",
        );
        let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    /// Group g's committed offset per partition of `in`, or the error
    /// that it has none at all.
    fn committed(&self) -> Result<Vec<serde_json::Value>, String> {
        Ok(self
            .described()?
            .into_iter()
            .map(|p| p["committed"].clone())
            .collect())
    }

    /// A stage that failed left nothing: no output, no committed offset.
    fn assert_nothing_done(&self) {
        assert!(self.consumed("out").is_empty(), "nothing published");
        let committed = self.committed();
        assert!(
            committed.as_ref().map_or_else(
                |e| e.contains("does not exist"),
                |c| c.iter().all(|c| c.is_null())
            ),
            "nothing committed: {committed:?}"
        );
    }

    /// `group describe g` as JSON, one object per partition.
    fn described(&self) -> Result<Vec<serde_json::Value>, String> {
        let output = self.run(&["group", "describe", "g", "--format", "json"], b"");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&output.stdout).unwrap())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let prefix = format!("{}/", self.0);
        let endpoints = pubsub_etcd::endpoints_from_env();
        let _ = tokio::runtime::Runtime::new().map(|runtime| {
            runtime.block_on(async move {
                if let Ok(mut etcd) = etcd_client::Client::connect(endpoints, None).await {
                    let options = etcd_client::DeleteOptions::new().with_prefix();
                    let _ = etcd.delete(prefix, Some(options)).await;
                }
            })
        });
    }
}

#[test]
fn each_input_line_becomes_one_output_line_with_its_key() {
    let ns = Namespace::new();
    let input: String = (0..50).map(|i| format!("k{}:v{i}\n", i % 5)).collect();
    ns.with_input(input.as_bytes(), "\\n");
    ns.ok(
        &[
            "pipe",
            "in",
            "out",
            "--group",
            "g",
            "--exec",
            "sed -u 's/^/T:/'",
            "--batch",
            "7",
            "--max",
            "50",
        ],
        b"",
    );
    let mut expected: Vec<String> = (0..50).map(|i| format!("T:v{i}")).collect();
    expected.sort();
    assert_eq!(ns.consumed("out"), expected);
    let keyed = ns.ok(
        &[
            "consume",
            "out",
            "--from-beginning",
            "--exit-at-end",
            "-f",
            "%k %s\n",
        ],
        b"",
    );
    for line in keyed.lines() {
        let (key, value) = line.split_once(' ').unwrap();
        let i: usize = value.trim_start_matches("T:v").parse().unwrap();
        assert_eq!(key, format!("k{}", i % 5), "{line}");
    }
    let committed: u64 = ns
        .committed()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(committed, 50, "every input committed");
}

#[test]
fn a_command_that_ends_early_fails_and_commits_nothing() {
    let ns = Namespace::new();
    let input: String = (0..5).map(|i| format!("k{i}:v{i}\n")).collect();
    ns.with_input(input.as_bytes(), "\\n");
    let output = ns.run(
        &[
            "pipe",
            "in",
            "out",
            "--group",
            "g",
            "--exec",
            "head -n 2",
            "--linger",
            "1s",
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CMD ended its output after 2 of 5 lines"),
        "{stderr}"
    );
    ns.assert_nothing_done();
}

#[test]
fn a_value_holding_a_newline_is_refused_by_name() {
    let ns = Namespace::new();
    ns.with_input(b"k:two\nlines\0", "\\0");
    let output = ns.run(&["pipe", "in", "out", "--group", "g", "--exec", "cat"], b"");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("contains a newline") && stderr.contains("offset 0"),
        "{stderr}"
    );
    assert!(ns.consumed("out").is_empty());
}

#[test]
fn a_command_that_hangs_is_stopped_by_the_exec_timeout() {
    let ns = Namespace::new();
    ns.with_input(b"k0:v0\nk1:v1\n", "\\n");
    let started = Instant::now();
    let output = ns.run(
        &[
            "pipe",
            "in",
            "out",
            "--group",
            "g",
            "--exec",
            "sleep 30",
            "--linger",
            "200ms",
            "--exec-timeout",
            "1s",
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CMD gave 0 of ") && stderr.contains("within --exec-timeout 1s"),
        "{stderr}"
    );
    // The timeout, CMD's 2 s to end on a closed input, and leaving the group;
    // not CMD's 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    ns.assert_nothing_done();
}

#[test]
fn sigterm_stops_the_stage_which_leaves_its_group() {
    let ns = Namespace::new();
    let input: String = (0..6).map(|i| format!("k{i}:v{i}\n")).collect();
    ns.with_input(input.as_bytes(), "\\n");
    let mut child = ns
        .command(&["pipe", "in", "out", "--group", "g", "--exec", "cat"])
        .spawn()
        .expect("the binary starts");
    let started = Instant::now();
    while ns.consumed("out").len() < 6 {
        assert!(started.elapsed() < DEADLINE, "the stage copied nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("SIGTERM did not stop the stage");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let described = ns.described().unwrap();
    let committed: u64 = described
        .iter()
        .map(|p| p["committed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(committed, 6, "every input committed: {described:?}");
    assert!(
        described.iter().all(|p| p["owner"].is_null()),
        "the member left its group: {described:?}"
    );
}
