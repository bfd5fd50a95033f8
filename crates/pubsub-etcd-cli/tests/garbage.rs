//! The real `pubsub-etcd` binary against garbage in etcd (a bad restore, a
//! hand edit, a bug elsewhere): topic metadata and batch keys written raw
//! under a test namespace of `PUBSUB_ETCD_ENDPOINTS` (default
//! `127.0.0.1:2379`). Every command must end with a clear error naming the
//! key, or skip the garbage with one warning per key; never panic, abort,
//! spin or allocate without bound. Also a topic deleted under a running
//! `consume`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::ops::Deref;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Namespace;

/// No command here should come near this; it only keeps a hung process
/// from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh namespace with a raw etcd connection for writing garbage;
/// dropping it deletes topic `t` (its metadata, data and group state)
/// through the library, which needs no readable metadata, before the
/// namespace's own cleanup runs.
struct Garbage {
    cli: Namespace,
    runtime: tokio::runtime::Runtime,
    client: pubsub_etcd::Client,
}

impl Deref for Garbage {
    type Target = Namespace;

    fn deref(&self) -> &Namespace {
        &self.cli
    }
}

impl Garbage {
    fn new() -> Self {
        let cli = Namespace::new("cli-garbage", DEADLINE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime
            .block_on(
                pubsub_etcd::Client::builder(pubsub_etcd::endpoints_from_env())
                    .namespace(&cli.name)
                    .connect(),
            )
            .expect("etcd is reachable");
        Garbage {
            cli,
            runtime,
            client,
        }
    }

    /// The full etcd key of `suffix` in this namespace.
    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.name)
    }

    fn put(&self, suffix: &str, value: impl Into<Vec<u8>>) {
        let mut kv = self.client.etcd().kv_client();
        self.runtime
            .block_on(kv.put(self.key(suffix), value.into(), None))
            .expect("raw put");
    }

    fn get(&self, suffix: &str) -> Vec<u8> {
        let mut kv = self.client.etcd().kv_client();
        let response = self
            .runtime
            .block_on(kv.get(self.key(suffix), None))
            .expect("raw get");
        response.kvs()[0].value().to_vec()
    }

    /// The key suffix of batch `name` of a partition of topic `t`.
    fn batch(&self, partition: u32, name: &str) -> String {
        let info = self.runtime.block_on(self.client.topic("t")).unwrap();
        format!("data/t/{}/{partition:05}/b/{name}", info.incarnation)
    }
}

impl Drop for Garbage {
    fn drop(&mut self) {
        let _ = self.runtime.block_on(self.client.delete_topic("t"));
    }
}

/// Requires a command to have failed cleanly (exit status 1, not a panic's
/// 101 or a signal such as an abort's) with an error naming `key`.
fn assert_clean_failure(what: &str, output: &Output, key: &str, reason: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{what}: status {:?}, stderr {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        stderr.contains("corrupt") && stderr.contains(key) && stderr.contains(reason),
        "{what}: the error does not name {key} and {reason:?}: {stderr}"
    );
}

#[test]
fn every_command_refuses_invalid_topic_metadata() {
    let ns = Garbage::new();
    ns.ok(&["topic", "create", "t", "--partitions", "2"]);
    ns.ok_with(&["produce", "t"], b"a\nb\n");
    // Group state, for `group describe`.
    ns.ok(&[
        "consume",
        "t",
        "--group",
        "g",
        "--from-beginning",
        "--exit-at-end",
    ]);
    let key = ns.key("topics/t");
    for (value, reason) in [
        (r#"{"partitions":0,"created_ms":1}"#, "partition count 0"),
        (
            r#"{"partitions":4294967295,"created_ms":1}"#,
            "partition count 4294967295",
        ),
        (
            r#"{"partitions":2,"created_ms":1,"config":{"retention_messages":0}}"#,
            "retention_messages is 0",
        ),
        ("not json", "expected"),
        (r#"{"partitions":[2],"created_ms":1}"#, "invalid type"),
    ] {
        ns.put("topics/t", value);
        for args in [
            &["topic", "list"][..],
            &["topic", "describe", "t"],
            &["produce", "t"],
            &["consume", "t", "--from-beginning", "--exit-at-end"],
            &["consume", "t", "--group", "g", "--exit-at-end"],
            &["group", "describe", "g"],
            &["topic", "enforce-retention", "t"],
        ] {
            let output = ns.run_with(args, b"c\n");
            assert_clean_failure(&format!("{args:?} on {value}"), &output, &key, reason);
        }
    }
    // Nothing was written or deleted meanwhile.
    ns.put("topics/t", r#"{"partitions":2,"created_ms":1}"#);
    let consumed = ns.ok(&["consume", "t", "--from-beginning", "--exit-at-end"]);
    let mut lines: Vec<&str> = consumed.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["a", "b"]);
}

/// Lines a running child writes to stdout and stderr, collected by threads.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(ns: &Namespace, args: &[&str]) -> Running {
        let mut child = ns.spawn(args, b"");
        let collect = |pipe: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits until stdout holds `lines` lines; fails after [`DEADLINE`].
    fn wait_for(&mut self, lines: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            let out = self.stdout.lock().unwrap().clone();
            if out.len() >= lines {
                return out;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ended with {status:?} after {out:?}: {:?}", self.stderr());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "only {out:?} within {DEADLINE:?}: {:?}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line, in clock ticks.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / clock_ticks_per_second())
    }

    /// Waits for the process to end by itself; fails after [`DEADLINE`].
    fn wait(mut self) -> (ExitStatus, Vec<String>) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pipes close with the process; give the threads a moment.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.stderr());
            }
            if started.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("still running after {DEADLINE:?}: {:?}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    /// Also when a test fails midway: no follower outlives its test.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> u64 {
    let output = Command::new("getconf").arg("CLK_TCK").output();
    output
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Garbage batch keys of every kind beside good ones: followers (with and
/// without a group) deliver every good message, warn once per garbage key,
/// and then sit idle without burning CPU; the other commands work.
#[test]
fn followers_skip_garbage_batches_once_and_stay_idle() {
    let ns = Garbage::new();
    ns.ok(&["topic", "create", "t", "--partitions", "2"]);
    for value in ["m0", "m1", "m2"] {
        ns.ok_with(
            &["produce", "t", "--partition", "0"],
            format!("{value}\n").as_bytes(),
        );
    }
    ns.ok_with(&["produce", "t", "--partition", "1"], b"p1\n");
    let good = ns.get(&ns.batch(0, "00000000000000000000"));
    let garbage: Vec<(u32, &str, Vec<u8>)> = vec![
        (0, "zzz", vec![1, 0xff, 0xff]),
        (0, "100000000000000000000", good.clone()),
        (0, "00000000000000000050", vec![2, 0]),
        (0, "00000000000000000051", Vec::new()),
        // Batch 0, whose extent contradicts this key.
        (0, "00000000000000000010", good.clone()),
        // Alone after the last good batch, so the reader's window is empty
        // and the open-ended read finds it.
        (1, "zzz", vec![1, 0xff, 0xff]),
    ];
    let mut keys = Vec::new();
    for (partition, name, value) in garbage {
        let suffix = ns.batch(partition, name);
        ns.put(&suffix, value);
        keys.push(ns.key(&suffix));
    }
    let mut followers = [
        Running::start(&ns, &["consume", "t", "--from-beginning"]),
        Running::start(&ns, &["consume", "t", "--group", "g", "--from-beginning"]),
    ];
    for follower in &mut followers {
        let mut delivered = follower.wait_for(4);
        delivered.sort_unstable();
        assert_eq!(delivered, ["m0", "m1", "m2", "p1"]);
    }
    // Settled: now an idle follower must cost (next to) nothing. A reader
    // that re-reads garbage spins at about 40% of a core.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<Duration> = followers.iter().map(Running::cpu).collect();
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    for (follower, before) in followers.iter().zip(before) {
        let used = follower.cpu() - before;
        assert!(
            used < window / 10,
            "an idle follower used {used:?} of CPU in {window:?}"
        );
    }
    for follower in &followers {
        let stderr = follower.stderr();
        for key in &keys {
            let reports = stderr.iter().filter(|l| l.contains(key.as_str())).count();
            assert_eq!(reports, 1, "{key} in {stderr:#?}");
        }
        assert!(
            !stderr.iter().any(|l| l.contains("panicked")),
            "{stderr:#?}"
        );
    }
    // Still following: a new message arrives.
    ns.ok_with(&["produce", "t", "--partition", "1"], b"m3\n");
    for follower in &mut followers {
        assert_eq!(follower.wait_for(5)[4], "m3");
    }
    for follower in followers {
        let status = follower.stop();
        assert!(status.code().is_none(), "ended by itself: {status:?}");
    }

    let description = ns.ok(&["topic", "describe", "t", "--format", "json"]);
    let description: serde_json::Value = serde_json::from_str(&description).unwrap();
    let partitions = &description["partitions"];
    assert_eq!(
        (&partitions[0]["earliest"], &partitions[0]["next"]),
        (&0.into(), &3.into())
    );
    assert_eq!(
        (&partitions[1]["earliest"], &partitions[1]["next"]),
        (&0.into(), &2.into())
    );
    ns.ok(&["topic", "list"]);
    ns.ok(&["group", "describe", "g"]);
    let consumed = ns.ok(&["consume", "t", "--from-beginning", "--exit-at-end"]);
    let mut consumed: Vec<&str> = consumed.lines().collect();
    consumed.sort_unstable();
    assert_eq!(consumed, ["m0", "m1", "m2", "m3", "p1"]);
}

/// `consume` without a group ends with the same clear error as a group
/// member when its topic is deleted, or deleted and created again.
#[test]
fn consume_ends_when_its_topic_is_deleted() {
    let ns = Garbage::new();
    for recreate in [false, true] {
        ns.ok(&["topic", "create", "t", "--partitions", "2"]);
        ns.ok_with(&["produce", "t", "--partition", "1"], b"before\n");
        let mut plain = Running::start(&ns, &["consume", "t", "--from-beginning"]);
        let mut member = Running::start(&ns, &["consume", "t", "--group", "g", "--from-beginning"]);
        assert_eq!(plain.wait_for(1), ["before"]);
        assert_eq!(member.wait_for(1), ["before"]);
        ns.ok(&["topic", "delete", "t"]);
        if recreate {
            ns.ok(&["topic", "create", "t", "--partitions", "2"]);
        }
        for (what, consumer) in [("plain", plain), ("member", member)] {
            let (status, stderr) = consumer.wait();
            assert_eq!(status.code(), Some(1), "{what}: {status:?} {stderr:?}");
            assert!(
                stderr.iter().any(|l| l.contains("topic \"t\" was deleted")),
                "{what}, recreate {recreate}: {stderr:?}"
            );
        }
        if recreate {
            ns.ok(&["topic", "delete", "t"]);
        }
    }
}
