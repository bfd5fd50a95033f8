//! `pubsub-etcd queue` against the etcd in `PUBSUB_ETCD_ENDPOINTS` (default
//! `127.0.0.1:2379`): consume with acks, exec mode, describe, list, reset
//! and delete. Each test works in a namespace of its own, emptied again
//! when the test ends.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Namespace;
use serde_json::Value;

/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(120);

fn namespace() -> Namespace {
    Namespace::new("cli-queue-test", DEADLINE)
}

/// Creates topic `name` with `partitions` and produces `lines` to it.
fn topic(ns: &Namespace, name: &str, partitions: u32, lines: &str) {
    ns.ok(&[
        "topic",
        "create",
        name,
        "--partitions",
        &partitions.to_string(),
    ]);
    ns.ok_with(&["produce", name], lines.as_bytes());
}

/// `queue describe` of queue `q` on `topic`.
fn describe(ns: &Namespace, topic: &str) -> Value {
    ns.json(&["queue", "describe", topic, "--name", "q"])
}

#[test]
fn consume_acks_what_it_prints_and_describe_counts_it() {
    let ns = namespace();
    let lines: String = (0..10).map(|i| format!("m{i}\n")).collect();
    topic(&ns, "t", 2, &lines);
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
    let stats = describe(&ns, "t");
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
    let ns = namespace();
    topic(&ns, "t", 1, "a\nb\n");
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
    let stats = describe(&ns, "t");
    assert_eq!(
        (&stats["pending"], &stats["in_flight"]),
        (&1.into(), &0.into()),
        "{stats}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    ns.ok(&["queue", "reset", "t", "--name", "q", "--to-latest"]);
    assert_eq!(describe(&ns, "t")["pending"], 0);
    ns.ok(&["queue", "reset", "t", "--name", "q"]);
    assert_eq!(describe(&ns, "t")["pending"], 2);
    ns.ok(&["queue", "delete", "t", "--name", "q"]);
    assert_eq!(
        ns.ok(&["queue", "list", "t", "--format", "json"]).trim(),
        "[]"
    );
}

#[test]
fn exec_extends_the_lease_of_a_running_command_and_kills_one_past_its_timeout() {
    let ns = namespace();
    topic(&ns, "t", 1, "slow\nhung\n");
    // 3 s of work under a 1 s lease: extended while it runs, never expired.
    ns.ok(&[
        "queue",
        "consume",
        "t",
        "--name",
        "q",
        "--max",
        "1",
        "--ack-wait",
        "1s",
        "--exec",
        "sleep 3",
    ]);
    let stats = describe(&ns, "t");
    assert_eq!(
        (&stats["pending"], &stats["expired"], &stats["redelivered"]),
        (&1.into(), &0.into(), &0.into()),
        "{stats}"
    );
    // A command that would run 30 s is killed after 1 s, with what it
    // started, and its message nacked.
    let started = std::time::Instant::now();
    ns.ok(&[
        "queue",
        "consume",
        "t",
        "--name",
        "q",
        "--max",
        "1",
        "--exec",
        "sleep 30; true",
        "--exec-timeout",
        "1s",
        "--nack-delay",
        "1h",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let stats = describe(&ns, "t");
    assert_eq!(
        (&stats["pending"], &stats["in_flight"], &stats["expired"]),
        (&1.into(), &0.into(), &0.into()),
        "{stats}"
    );
}
