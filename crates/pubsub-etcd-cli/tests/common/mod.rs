//! Shared support for the CLI's integration tests, pulled into each test
//! binary with `mod common;`: the binary's path, unique namespaces that
//! clean up after themselves, and run/wait helpers that never let a hung
//! process hang the suite.
// Not every test binary uses every helper.
#![allow(dead_code)]

// The library's std-only etcd process harness, for tests that need an etcd
// of their own to pause, kill or fill.
#[path = "../../../pubsub-etcd/tests/common/etcd_proc.rs"]
pub mod etcd_proc;

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");

/// The `--timeout` every [`Namespace`] command gets: far below any test's
/// deadline, so a stuck etcd call fails with the CLI's own error first.
pub const CLI_TIMEOUT: &str = "5s";

/// A name no other test (of this or a concurrent run) uses: `prefix`, the
/// process id, the clock's nanoseconds and a per-process counter.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos:08x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh namespace of the etcd in `PUBSUB_ETCD_ENDPOINTS` (or of another
/// etcd, [`Namespace::on`]); dropping it deletes the queues and topics in
/// it through the CLI itself, also when the test panicked.
pub struct Namespace {
    pub name: String,
    /// Another etcd than the one in `PUBSUB_ETCD_ENDPOINTS`.
    endpoints: Option<String>,
    /// How long any one command may run before the test fails.
    deadline: Duration,
}

impl Namespace {
    pub fn new(prefix: &str, deadline: Duration) -> Self {
        Namespace {
            name: unique_name(prefix),
            endpoints: None,
            deadline,
        }
    }

    /// The same namespace name on the etcd at `endpoints`.
    pub fn on(mut self, endpoints: String) -> Self {
        self.endpoints = Some(endpoints);
        self
    }

    /// The binary with this namespace, [`CLI_TIMEOUT`] and `args`; the
    /// environment's namespace is removed so it cannot interfere.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--namespace", &self.name, "--timeout", CLI_TIMEOUT])
            .args(args)
            .env_remove("PUBSUB_ETCD_NAMESPACE");
        if let Some(endpoints) = &self.endpoints {
            command.env("PUBSUB_ETCD_ENDPOINTS", endpoints);
        }
        command
    }

    /// Starts a command with every stream piped; `stdin` is written (then
    /// closed) by a thread, so a child that does not read cannot block the
    /// test.
    pub fn spawn(&self, args: &[&str], stdin: &[u8]) -> Child {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut input = child.stdin.take().expect("stdin is piped");
        let stdin = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        child
    }

    /// Waits for a child of this namespace within its deadline.
    pub fn wait(&self, child: Child, args: &[&str]) -> Output {
        wait_output(child, self.deadline, &format!("{args:?}"))
    }

    /// Runs a command to its end with `stdin` as its input.
    pub fn run_with(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.wait(self.spawn(args, stdin), args)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, b"")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok_with(&self, args: &[&str], stdin: &[u8]) -> String {
        succeeded(args, self.run_with(args, stdin))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, b"")
    }

    /// Runs a command that must succeed with `--format json`; returns its
    /// stdout parsed as one JSON document.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--format", "json"]);
        serde_json::from_str(&self.ok(&args)).expect("stdout is one JSON document")
    }

    /// The names in a `list --format json` answer; none when the command
    /// failed, so a cleanup goes on with what it has.
    fn names(&self, args: &[&str]) -> Vec<String> {
        let Ok(output) = self.command(args).stderr(Stdio::null()).output() else {
            return Vec::new();
        };
        let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&output.stdout) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| item.get("name").unwrap_or(item).as_str())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting a topic also deletes every group's state on it, but not
        // its queues'.
        for topic in self.names(&["topic", "list", "--format", "json"]) {
            for queue in self.names(&["queue", "list", &topic, "--format", "json"]) {
                let _ = self
                    .command(&["queue", "delete", &topic, "--name", &queue])
                    .output();
            }
            let _ = self.command(&["topic", "delete", &topic]).output();
        }
    }
}

/// Requires a command to have succeeded; returns its stdout.
pub fn succeeded(args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "{args:?} failed with {:?}: {}",
        output.status,
        stderr(&output)
    );
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
}

/// Collects a child's output, reading its pipes on threads so a full pipe
/// cannot block it; kills it and fails the test (naming `what`) if it runs
/// past `deadline`. A caller may have taken stdout or stderr to read them as
/// they come: they are then empty here.
pub fn wait_output(mut child: Child, deadline: Duration, what: &str) -> Output {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_status(&mut child, deadline, what);
    Output {
        status,
        stdout: out.join().expect("the stdout reader"),
        stderr: err.join().expect("the stderr reader"),
    }
}

/// Waits for a child to end; kills it and fails the test (naming `what`)
/// if it runs past `deadline`.
pub fn wait_status(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each line of `text` parsed as JSON.
pub fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
