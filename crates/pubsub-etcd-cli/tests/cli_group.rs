//! The `pubsub-etcd` binary as a consumer-group member, against the etcd in
//! `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`) or a throwaway one:
//! draining with `--exit-at-end`, and going on under a NOSPACE alarm. Each
//! test works in a namespace of its own, emptied again when the test ends.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use common::{etcd_proc, Namespace};
use serde_json::Value;

/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(120);

fn namespace() -> Namespace {
    Namespace::new("cli-group-test", DEADLINE)
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
    let ns = namespace();
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
    let ns = namespace().on(cluster.endpoints().join(","));
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
    let filled = ns.run_with(&["produce", "filler"], big.as_bytes());
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
    let output = ns.wait(consumer, &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        (delivered, exited),
        (3000, None),
        "stopped delivering under NOSPACE: {stderr}"
    );
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert_eq!(stderr.matches("quota exceeded").count(), 2, "{stderr}");
}
