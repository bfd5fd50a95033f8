//! Runs the real `pubsub-etcd` binary against the etcd in
//! `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`), each test in a
//! namespace of its own that is emptied again when the test ends.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{lines, stderr, wait_status, Namespace, BIN};
use serde_json::Value;

/// No command of these tests should come near this; it only keeps a hung
/// process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(30);

fn namespace() -> Namespace {
    Namespace::new("cli-test", DEADLINE)
}

/// A partition's (or a list of partitions') offsets alone, without the
/// byte counts, which depend on the encoding.
fn offsets(partitions: &Value) -> Value {
    match partitions {
        Value::Array(list) => list.iter().map(offsets).collect(),
        Value::Object(p) => ["partition", "earliest", "next"]
            .iter()
            .map(|f| (f.to_string(), p[*f].clone()))
            .collect(),
        other => other.clone(),
    }
}

#[test]
fn produce_and_consume_round_trip() {
    let ns = namespace();
    assert_eq!(
        ns.ok(&["topic", "create", "orders", "--partitions", "2"]),
        "created topic \"orders\" with 2 partitions\n"
    );
    let produced = ns.ok_with(
        &[
            "produce",
            "orders",
            "--key-separator",
            "::",
            "--header",
            "source=test",
            "--header",
            "kind=a=b",
            "--format",
            "json",
        ],
        b"k1::v1\nk2::v2\nk1::v3::x\n",
    );
    let results = lines(&produced);
    assert_eq!(results.len(), 3);
    for result in &results {
        let object = result.as_object().unwrap();
        assert_eq!(object.len(), 2, "{result}");
        assert!(result["partition"].as_u64().unwrap() < 2);
        assert!(result["offset"].is_u64());
    }
    // One key, one partition, offsets in input order.
    assert_eq!(results[0]["partition"], results[2]["partition"]);
    assert_eq!(
        results[2]["offset"].as_u64(),
        Some(results[0]["offset"].as_u64().unwrap() + 1)
    );

    let consumed = ns.ok(&[
        "consume",
        "orders",
        "--from-beginning",
        "--exit-at-end",
        "--format",
        "json",
    ]);
    let mut messages = lines(&consumed);
    assert_eq!(messages.len(), 3);
    messages.sort_by_key(|m| m["value"].as_str().unwrap().to_string());
    for (message, (key, value, result)) in messages.iter().zip([
        ("k1", "v1", &results[0]),
        ("k2", "v2", &results[1]),
        ("k1", "v3::x", &results[2]),
    ]) {
        let object = message.as_object().unwrap();
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "headers",
                "key",
                "offset",
                "partition",
                "timestamp",
                "topic",
                "value"
            ]
        );
        assert_eq!(message["topic"], "orders");
        assert_eq!(message["key"], key);
        assert_eq!(message["value"], value);
        assert_eq!(message["partition"], result["partition"]);
        assert_eq!(message["offset"], result["offset"]);
        assert!(message["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
        assert_eq!(
            message["headers"],
            serde_json::json!({"source": "test", "kind": "a=b"})
        );
    }

    // Raw output is the values, one per line; here of one partition.
    let partition = results[0]["partition"].to_string();
    let raw = ns.ok(&[
        "consume",
        "orders",
        "--partition",
        &partition,
        "--offset",
        "0",
        "--exit-at-end",
    ]);
    assert_eq!(raw, "v1\nv3::x\n");

    // Without a start option only new messages are read: none here.
    assert_eq!(ns.ok(&["consume", "orders", "--exit-at-end"]), "");
    // And --max-messages stops early.
    let two = ns.ok(&[
        "consume",
        "orders",
        "--from-beginning",
        "--max-messages",
        "2",
    ]);
    assert_eq!(two.lines().count(), 2);
}

#[test]
fn topic_admin_json_shapes() {
    let ns = namespace();
    ns.ok(&[
        "topic",
        "create",
        "events",
        "--partitions",
        "2",
        "--max-message-bytes",
        "1000",
    ]);
    ns.ok_with(&["produce", "events", "--partition", "1"], b"a\nb\nc\n");

    let list = ns.json(&["topic", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "events");
    assert_eq!(list[0]["partitions"], 2);
    assert_eq!(
        list[0]["config"],
        serde_json::json!({"max_message_bytes": 1000})
    );
    assert!(list[0]["created_ms"].is_i64());

    let mut described = ns.json(&["topic", "describe", "events"]);
    assert!(described["created_ms"].is_i64(), "{described}");
    assert_eq!(described["stored_messages"], 3, "{described}");
    assert!(described["last_timestamp_ms"].is_i64(), "{described}");
    for field in ["created_ms", "stored_messages", "last_timestamp_ms"] {
        described.as_object_mut().unwrap().remove(field);
    }
    described["partitions"] = offsets(&described["partitions"]);
    assert_eq!(
        described,
        serde_json::json!({
            "name": "events",
            "partitions": [
                {"partition": 0, "earliest": 0, "next": 0},
                {"partition": 1, "earliest": 0, "next": 3},
            ],
            "config": {"max_message_bytes": 1000},
        })
    );
    let table = ns.ok(&["topic", "describe", "events"]);
    assert!(table.contains("PARTITION"), "{table}");
    assert!(table.contains("max_message_bytes=1000"), "{table}");

    ns.ok(&["topic", "alter", "events", "--partitions", "3"]);
    ns.ok(&["topic", "alter", "events", "--max-message-bytes", "2000"]);
    let described = ns.json(&["topic", "describe", "events"]);
    assert_eq!(described["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(described["config"]["max_message_bytes"], 2000);

    let shrink = ns.run(&["topic", "alter", "events", "--partitions", "1"]);
    assert_eq!(shrink.status.code(), Some(1));
    assert!(
        stderr(&shrink).starts_with("error: cannot decrease"),
        "{}",
        stderr(&shrink)
    );

    let again = ns.run(&["topic", "create", "events", "--partitions", "1"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(stderr(&again), "error: topic \"events\" already exists\n");

    // A message over the topic's limit fails alone; the run exits 1.
    let big = format!("small\n{}\n", "x".repeat(3000));
    let output = ns.run_with(
        &["produce", "events", "--partition", "0", "--format", "json"],
        big.as_bytes(),
    );
    assert_eq!(output.status.code(), Some(1));
    let results = lines(&String::from_utf8(output.stdout.clone()).unwrap());
    assert_eq!(results.len(), 2);
    assert!(results[0]["offset"].is_u64());
    let error = results[1]["error"].as_str().unwrap();
    assert!(error.contains("exceeds the limit"), "{error}");
    assert!(
        stderr(&output).contains("sent 1, failed 1"),
        "{}",
        stderr(&output)
    );

    let truncated = ns.ok(&[
        "topic",
        "truncate",
        "events",
        "--partition",
        "1",
        "--before",
        "2",
    ]);
    assert_eq!(
        truncated,
        "truncated partition 1 of topic \"events\": earliest 2, next 3\n"
    );
    let described = ns.json(&["topic", "describe", "events"]);
    assert_eq!(
        offsets(&described["partitions"][1]),
        serde_json::json!({"partition": 1, "earliest": 2, "next": 3})
    );
    let rest = ns.ok(&[
        "consume",
        "events",
        "--partition",
        "1",
        "--from-beginning",
        "--exit-at-end",
    ]);
    assert_eq!(rest, "c\n");

    ns.ok(&["topic", "delete", "events"]);
    assert_eq!(ns.json(&["topic", "list"]), serde_json::json!([]));
}

#[test]
fn group_describe_after_partial_consumption_and_reset() {
    let ns = namespace();
    ns.ok(&["topic", "create", "jobs", "--partitions", "1"]);
    let input: String = (1..=10).map(|i| format!("job-{i}\n")).collect();
    ns.ok_with(&["produce", "jobs"], input.as_bytes());

    let first = ns.ok(&[
        "consume",
        "jobs",
        "--group",
        "workers",
        "--max-messages",
        "4",
    ]);
    assert_eq!(first, "job-1\njob-2\njob-3\njob-4\n");

    let described = ns.json(&["group", "describe", "workers"]);
    assert_eq!(
        described,
        serde_json::json!([{
            "topic": "jobs", "partition": 0, "owner": null,
            "committed": 4, "next": 10, "lag": 6,
        }])
    );
    assert_eq!(
        ns.json(&["group", "describe", "workers", "--topic", "jobs"]),
        described
    );
    let table = ns.ok(&["group", "describe", "workers"]);
    assert!(table.starts_with("TOPIC"), "{table}");
    assert_eq!(
        ns.json(&["group", "list"]),
        serde_json::json!([{
            "group": "workers", "topics": ["jobs"], "state": "empty", "members": 0, "lag": 6,
        }])
    );

    // The group resumes where it committed.
    let rest = ns.ok(&["consume", "jobs", "--group", "workers", "--exit-at-end"]);
    assert_eq!(rest.lines().next(), Some("job-5"));
    assert_eq!(rest.lines().count(), 6);

    // Without --execute, a reset is a plan only.
    let plan = ns.json(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-offset",
        "7",
    ]);
    assert_eq!(
        plan,
        serde_json::json!({"executed": false, "offsets": [
            {"topic": "jobs", "partition": 0, "current": 10, "offset": 7},
        ]})
    );
    assert_eq!(
        ns.json(&["group", "describe", "workers"])[0]["committed"],
        10
    );
    let table = ns.ok(&[
        "group",
        "reset-offsets",
        "workers",
        "--topic",
        "jobs",
        "--to-offset",
        "7",
    ]);
    assert!(table.contains("dry run"), "{table}");
    let reset = |args: &[&str]| {
        let mut all = vec!["group", "reset-offsets", "workers", "--execute"];
        all.extend(args);
        let done = ns.json(&all);
        assert_eq!(done["executed"], true, "{done}");
        done["offsets"][0]["offset"].clone()
    };
    assert_eq!(reset(&["--topic", "jobs", "--to-offset", "7"]), 7);
    let lag = ns.json(&["group", "describe", "workers"]);
    assert_eq!(lag[0]["committed"], 7);
    assert_eq!(lag[0]["lag"], 3);
    let rest = ns.ok(&["consume", "jobs", "--group", "workers", "--exit-at-end"]);
    assert_eq!(rest, "job-8\njob-9\njob-10\n");

    assert_eq!(reset(&["--topic", "jobs", "--to-earliest"]), 0);
    assert_eq!(reset(&["--all-topics", "--to-latest"]), 10);
    assert_eq!(reset(&["--topic", "jobs:0", "--shift-by", "-4"]), 6);
    assert_eq!(reset(&["--topic", "jobs", "--shift-by", "100"]), 10);
    assert_eq!(reset(&["--topic", "jobs", "--by-duration", "1h"]), 0);
    let future = (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    assert_eq!(reset(&["--topic", "jobs", "--to-datetime", &future]), 10);
    assert_eq!(
        reset(&["--topic", "jobs", "--to-time", "2000-01-01T00:00:00Z"]),
        0
    );

    // A misspelt group is not created silently.
    let typo = ns.run(&[
        "group",
        "reset-offsets",
        "worker",
        "--topic",
        "jobs",
        "--to-earliest",
        "--execute",
    ]);
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        stderr(&typo).contains("did you mean \"workers\"?"),
        "{}",
        stderr(&typo)
    );
    let fresh = ns.json(&[
        "group",
        "reset-offsets",
        "fresh",
        "--topic",
        "jobs",
        "--to-latest",
        "--execute",
        "--new-group",
    ]);
    assert_eq!(fresh["offsets"][0]["offset"], 10);
    ns.ok(&["group", "delete", "fresh"]);

    assert_eq!(
        ns.ok(&["group", "delete", "workers"]),
        "deleted group \"workers\"\n"
    );
    assert_eq!(ns.json(&["group", "list"]), serde_json::json!([]));
    let missing = ns.run(&["group", "describe", "workers"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        stderr(&missing),
        "error: consumer group \"workers\" does not exist\n"
    );
}

#[test]
fn non_utf8_bytes_are_base64() {
    let ns = namespace();
    ns.ok(&["topic", "create", "bin", "--partitions", "1"]);
    ns.ok_with(
        &["produce", "bin", "--key-separator", "|"],
        b"\xff\xfe|\x80value\nkey|\xc3\x28\n",
    );
    let consumed = ns.ok(&[
        "consume",
        "bin",
        "--from-beginning",
        "--exit-at-end",
        "--format",
        "json",
    ]);
    let messages = lines(&consumed);
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["key_base64"], "//4=");
    assert!(messages[0].get("key").is_none());
    assert_eq!(messages[0]["value_base64"], "gHZhbHVl");
    assert!(messages[0].get("value").is_none());
    assert_eq!(messages[1]["key"], "key");
    assert_eq!(messages[1]["value_base64"], "wyg=");

    // Raw output hands the bytes on unchanged.
    let output = ns.run(&["consume", "bin", "--offset", "1", "--exit-at-end"]);
    assert!(output.status.success());
    assert_eq!(output.stdout, b"\xc3\x28\n");
}

#[test]
fn unknown_topic_is_a_clear_error() {
    let ns = namespace();
    let expected = format!(
        "error: topic \"nope\" does not exist in namespace {:?} \
         (--namespace or PUBSUB_ETCD_NAMESPACE selects another)\n",
        ns.name
    );
    for args in [
        &["topic", "describe", "nope"][..],
        &["topic", "delete", "nope"],
        &["consume", "nope", "--exit-at-end"],
        &["consume", "nope", "--group", "g"],
        &["group", "describe", "g", "--topic", "nope"],
        &["topic", "alter", "nope", "--retention", "1d"],
        &["topic", "compact", "nope"],
        &["topic", "enforce-retention", "nope"],
        &[
            "message",
            "delete",
            "nope",
            "--partition",
            "0",
            "--offset",
            "1",
        ],
    ] {
        let output = ns.run(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&output), expected, "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    let output = ns.run_with(&["produce", "nope"], b"x\n");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), expected);
}

#[test]
fn bad_usage_exits_2() {
    let ns = namespace();
    for args in [
        &["--no-such-flag", "topic", "list"][..],
        &["topic", "create", "t"],
        &["topic", "alter", "t"],
        &["topic", "list", "--format", "xml"],
        &["consume", "t", "--group", "g", "--partition", "0"],
        &["consume", "t", "--from-beginning", "--offset", "3"],
        &["consume", "t", "--from-time", "yesterday"],
        &["produce", "t", "--header", "novalue"],
        &["group", "reset-offsets", "g", "--topic", "t"],
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--to-latest",
        ],
        &["--timeout", "soon", "topic", "list"],
        &["completions", "powershell"],
        &["message", "delete", "t", "--partition", "0"],
        &["message", "delete", "t", "--offset", "1"],
        &["topic", "alter", "t", "--retention-bytes", "lots"],
        &["admin", "compact", "--format", "xml"],
    ] {
        let output = ns.run(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).starts_with("error:"), "{args:?}");
    }
    let output = Command::new(BIN)
        .args(["--user", "alice", "topic", "list"])
        .env_remove("PUBSUB_ETCD_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains("pubsub-etcd"), "{shell}");
        assert!(script.contains("reset-offsets"), "{shell}");
    }
}

#[test]
fn group_member_leaves_on_sigterm() {
    let ns = namespace();
    ns.ok(&["topic", "create", "live", "--partitions", "2"]);
    let mut child = ns
        .command(&["consume", "live", "--group", "tail"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    ns.ok_with(&["produce", "live", "--partition", "1"], b"hello\n");
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    // The commit follows the write; give it a moment.
    let started = Instant::now();
    let owned = loop {
        let owned = ns.json(&["group", "describe", "tail"]);
        if owned[1]["committed"] == 1 || started.elapsed() > Duration::from_secs(5) {
            break owned;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(owned[1]["owner"].is_string(), "{owned}");
    assert_eq!(owned[1]["committed"], 1, "{owned}");

    // The shell's builtin, so that no procps package is needed.
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_status(&mut child, DEADLINE, "the command");
    assert_eq!(status.code(), Some(0));
    // Left the group: no owners remain, commits do.
    let after = ns.json(&["group", "describe", "tail"]);
    assert_eq!(after[0]["owner"], Value::Null);
    assert_eq!(after[1]["owner"], Value::Null);
    assert_eq!(after[1]["committed"], 1);
}

#[test]
fn closed_stdout_ends_quietly() {
    let ns = namespace();
    ns.ok(&["topic", "create", "big", "--partitions", "1"]);
    // Well over a pipe's buffer, so the consumer must block on its output.
    let value = "v".repeat(1000);
    let input: String = (0..300).map(|_| format!("{value}\n")).collect();
    ns.ok_with(&["produce", "big"], input.as_bytes());
    let mut child = ns
        .command(&["consume", "big", "--from-beginning", "--group", "reader"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.len(), 1001);
    drop(stdout);
    let mut stderr_pipe = child.stderr.take().unwrap();
    let status = wait_status(&mut child, DEADLINE, "the command");
    let mut diagnostics = String::new();
    stderr_pipe.read_to_string(&mut diagnostics).unwrap();
    assert_eq!(status.code(), Some(0), "{diagnostics}");
    assert_eq!(diagnostics, "");
    // Only what was surely handed on may be committed: not all 300, and
    // possibly nothing (then the group has no state at all).
    let lag = ns.json(&["group", "describe", "reader", "--topic", "big"]);
    let committed = lag[0]["committed"].as_u64().unwrap_or(0);
    assert!(committed < 300, "{lag}");
}

#[test]
fn exit_at_end_with_empty_partitions_and_from_time() {
    let ns = namespace();
    ns.ok(&["topic", "create", "sparse", "--partitions", "4"]);
    // Nothing at all: exits at once, with or without a group.
    assert_eq!(
        ns.ok(&["consume", "sparse", "--from-beginning", "--exit-at-end"]),
        ""
    );
    assert_eq!(
        ns.ok(&["consume", "sparse", "--group", "g", "--exit-at-end"]),
        ""
    );
    ns.ok_with(&["produce", "sparse", "--partition", "2"], b"old\n");
    std::thread::sleep(Duration::from_millis(20));
    let cut = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    std::thread::sleep(Duration::from_millis(20));
    ns.ok_with(&["produce", "sparse", "--partition", "2"], b"new\n");
    assert_eq!(
        ns.ok(&["consume", "sparse", "--from-time", &cut, "--exit-at-end"]),
        "new\n"
    );
    assert_eq!(
        ns.ok(&[
            "consume",
            "sparse",
            "--group",
            "g2",
            "--from-time",
            &cut,
            "--exit-at-end"
        ]),
        "new\n"
    );
    let out_of_range = ns.run(&["consume", "sparse", "--partition", "9", "--exit-at-end"]);
    assert_eq!(out_of_range.status.code(), Some(1));
    assert_eq!(
        stderr(&out_of_range),
        "error: partition 9 does not exist: topic \"sparse\" has 4 partitions\n"
    );
}

#[test]
fn topic_retention_options() {
    let ns = namespace();
    ns.ok(&[
        "topic",
        "create",
        "logs",
        "--partitions",
        "1",
        "--retention",
        "7d",
        "--retention-messages",
        "1000",
        "--retention-bytes",
        "1048576",
        "--cleanup-policy",
        "compact",
    ]);
    let config = |ns: &Namespace| ns.json(&["topic", "describe", "logs"])["config"].clone();
    assert_eq!(
        config(&ns),
        serde_json::json!({
            "retention_ms": 604_800_000u64,
            "retention_messages": 1000,
            "retention_bytes": 1_048_576,
            "cleanup_policy": "compact",
        })
    );
    let table = ns.ok(&["topic", "describe", "logs"]);
    assert!(
        table.contains("retention_bytes=1MiB retention_messages=1000 retention=7days"),
        "{table}"
    );

    // Alter changes only what it is given.
    ns.ok(&["topic", "alter", "logs", "--retention-messages", "500"]);
    assert_eq!(
        config(&ns),
        serde_json::json!({
            "retention_ms": 604_800_000u64,
            "retention_messages": 500,
            "retention_bytes": 1_048_576,
            "cleanup_policy": "compact",
        })
    );
    ns.ok(&[
        "topic",
        "alter",
        "logs",
        "--retention",
        "none",
        "--cleanup-policy",
        "delete",
        "--max-message-bytes",
        "2000",
    ]);
    assert_eq!(
        config(&ns),
        serde_json::json!({
            "max_message_bytes": 2000,
            "retention_messages": 500,
            "retention_bytes": 1_048_576,
        })
    );
    ns.ok(&["topic", "alter", "logs", "--partitions", "2"]);
    let described = ns.json(&["topic", "describe", "logs"]);
    assert_eq!(described["partitions"].as_array().unwrap().len(), 2);
    assert_eq!(described["config"]["retention_messages"], 500);

    // A limit of 0 is the library's to refuse: exit 1, nothing changed.
    let zero = ns.run(&[
        "topic",
        "create",
        "bad",
        "--partitions",
        "1",
        "--retention-messages",
        "0",
    ]);
    assert_eq!(zero.status.code(), Some(1));
    assert!(
        stderr(&zero).starts_with("error: invalid configuration: retention_messages is 0"),
        "{}",
        stderr(&zero)
    );
    assert_eq!(ns.json(&["topic", "list"]).as_array().unwrap().len(), 1);
    let zero = ns.run(&["topic", "alter", "logs", "--retention", "0s"]);
    assert_eq!(zero.status.code(), Some(1));
    assert!(
        stderr(&zero).contains("retention_ms is 0"),
        "{}",
        stderr(&zero)
    );
    assert_eq!(config(&ns)["retention_messages"], 500);

    // Values that do not parse are usage errors naming the value.
    for (option, value) in [
        ("--cleanup-policy", "foo"),
        ("--retention", "soon"),
        ("--retention-messages", "many"),
        ("--retention-bytes", "1.5"),
    ] {
        let output = ns.run(&["topic", "alter", "logs", option, value]);
        assert_eq!(output.status.code(), Some(2), "{option} {value}");
        let message = stderr(&output);
        assert!(
            message.starts_with(&format!("error: invalid value '{value}' for '{option}")),
            "{message}"
        );
    }
}

#[test]
fn message_delete_and_truncate() {
    let ns = namespace();
    ns.ok(&["topic", "create", "items", "--partitions", "2"]);
    ns.ok_with(
        &["produce", "items", "--partition", "0"],
        b"m0\nm1\nm2\nm3\nm4\nm5\nm6\n",
    );
    assert_eq!(
        ns.json(&[
            "message",
            "delete",
            "items",
            "--partition",
            "0",
            "--offset",
            "1",
            "--offset",
            "3,4",
            "--offset",
            "1",
        ]),
        serde_json::json!({"deleted": 3, "requested": 3, "not_found": []})
    );
    // Already gone or never there: named, and the run fails.
    let gone = ns.run(&[
        "message",
        "delete",
        "items",
        "--partition",
        "0",
        "--offset",
        "3",
        "--offset",
        "99",
        "--format",
        "json",
    ]);
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&gone.stdout).unwrap(),
        serde_json::json!({"deleted": 0, "requested": 2, "not_found": [3, 99]})
    );
    assert!(
        stderr(&gone).contains("offset 3, 99 of partition 0"),
        "{}",
        stderr(&gone)
    );
    // The last offset too, so --exit-at-end cannot wait to see it.
    assert_eq!(
        ns.ok(&[
            "message",
            "delete",
            "items",
            "--partition",
            "0",
            "--offset",
            "6"
        ]),
        "deleted 1 of 1 messages from partition 0 of topic \"items\"\n"
    );
    let rest = ns.ok(&["consume", "items", "--from-beginning", "--exit-at-end"]);
    assert_eq!(rest, "m0\nm2\nm5\n");
    let described = ns.json(&["topic", "describe", "items"]);
    assert_eq!(
        offsets(&described["partitions"][0]),
        serde_json::json!({"partition": 0, "earliest": 0, "next": 7})
    );

    let truncated = ns.ok(&[
        "topic",
        "truncate",
        "items",
        "--partition",
        "0",
        "--before",
        "3",
    ]);
    assert_eq!(
        truncated,
        "truncated partition 0 of topic \"items\": earliest 5, next 7\n"
    );
    assert_eq!(
        ns.ok(&[
            "consume",
            "items",
            "--group",
            "g",
            "--from-beginning",
            "--exit-at-end"
        ]),
        "m5\n"
    );

    let bad = ns.run(&[
        "message",
        "delete",
        "items",
        "--partition",
        "2",
        "--offset",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        stderr(&bad),
        "error: partition 2 does not exist: topic \"items\" has 2 partitions\n"
    );
    assert!(bad.stdout.is_empty());
}

#[test]
fn retention_sweep_and_key_compaction() {
    let ns = namespace();
    ns.ok(&[
        "topic",
        "create",
        "capped",
        "--partitions",
        "1",
        "--retention-messages",
        "3",
    ]);
    let input: String = (0..10).map(|i| format!("v{i}\n")).collect();
    ns.ok_with(&["produce", "capped"], input.as_bytes());
    // Producers may have trimmed already; the sweep leaves the same result.
    let report = ns.json(&["topic", "enforce-retention", "capped"]);
    assert_eq!(report["topic"], "capped");
    assert_eq!(
        offsets(&report["partitions"]),
        serde_json::json!([{"partition": 0, "earliest": 7, "next": 10}])
    );
    for field in ["batches_deleted", "batches_rewritten", "records_removed"] {
        assert!(report[field].is_u64(), "{report}");
    }
    assert_eq!(
        ns.ok(&["consume", "capped", "--from-beginning", "--exit-at-end"]),
        "v7\nv8\nv9\n"
    );
    let table = ns.ok(&["topic", "enforce-retention", "capped"]);
    assert!(
        table.starts_with("enforced retention on topic \"capped\": 0 batches deleted"),
        "{table}"
    );

    ns.ok(&["topic", "create", "table", "--partitions", "1"]);
    ns.ok_with(
        &["produce", "table", "--key-separator", "="],
        b"a=1\nb=1\na=2\nc=1\nc=\n",
    );
    let table = ns.ok(&["topic", "compact", "table"]);
    assert!(table.starts_with("compacted topic \"table\":"), "{table}");
    assert!(table.contains("PARTITION"), "{table}");
    let kept = lines(&ns.ok(&[
        "consume",
        "table",
        "--from-beginning",
        "--exit-at-end",
        "--format",
        "json",
    ]));
    let kept: Vec<(&str, &str)> = kept
        .iter()
        .map(|m| (m["key"].as_str().unwrap(), m["value"].as_str().unwrap()))
        .collect();
    assert_eq!(kept, [("b", "1"), ("a", "2")]);
    let again = ns.json(&["topic", "compact", "table"]);
    assert_eq!(again["records_removed"], 0);
    assert_eq!(
        offsets(&again["partitions"]),
        serde_json::json!([{"partition": 0, "earliest": 1, "next": 5}])
    );
}

#[test]
fn admin_compact_alarms_and_disarm() {
    let ns = namespace();
    // Something deleted, so the compaction has history to drop.
    ns.ok(&["topic", "create", "scratch", "--partitions", "1"]);
    ns.ok_with(&["produce", "scratch"], b"x\ny\n");
    ns.ok(&["topic", "delete", "scratch"]);

    let report = ns.json(&["admin", "compact"]);
    assert!(report["revision"].as_i64().unwrap() > 0, "{report}");
    assert!(report["already_compacted"].is_boolean(), "{report}");
    let members = report["members"].as_array().unwrap();
    assert!(!members.is_empty(), "{report}");
    for member in members {
        let id = member["member_id"].as_str().unwrap();
        assert!(u64::from_str_radix(id, 16).is_ok(), "{member}");
        assert!(member["endpoint"].is_string(), "{member}");
        assert!(member["db_size_before"].is_i64(), "{member}");
        assert!(member["db_size_after"].is_i64(), "{member}");
        assert_eq!(member["defragmented"], false, "{member}");
        assert_eq!(member["error"], Value::Null, "{member}");
    }

    let table = ns.ok(&["admin", "compact", "--defrag"]);
    let mut rows = table.lines();
    let first = rows.next().unwrap();
    assert!(
        first.starts_with("compacted etcd history to revision")
            || first.starts_with("etcd history was already compacted at revision"),
        "{table}"
    );
    assert_eq!(rows.next(), Some(""), "{table}");
    assert!(rows.next().unwrap().starts_with("MEMBER"), "{table}");
    let rows: Vec<&str> = rows.collect();
    assert_eq!(rows.len(), members.len(), "{table}");
    for (row, member) in rows.iter().zip(members) {
        assert!(
            row.starts_with(member["member_id"].as_str().unwrap()),
            "{table}"
        );
        assert!(row.contains(" yes "), "{table}");
    }

    assert!(ns.json(&["admin", "alarms"]).is_array());
    assert!(ns.ok(&["admin", "alarms"]).starts_with("MEMBER"));
    assert!(ns.json(&["admin", "disarm"])["disarmed"].is_array());
}

/// The options users of kcat and the Kafka tools reach for first: per-line
/// headers, other delimiters, a whole input as one message, TTL, timestamps
/// in any common form, byte units, idempotent create and delete, JSON from
/// mutating commands, and errors that name what was wrong.
#[test]
fn kcat_and_kafka_tool_parity() {
    let ns = namespace();
    let created = ns.json(&[
        "topic",
        "create",
        "p",
        "--partitions",
        "1",
        "--max-message-bytes",
        "64KiB",
        "--retention-bytes",
        "10MB",
    ]);
    assert_eq!(created["created"], true);
    assert_eq!(created["topic"]["config"]["max_message_bytes"], 65_536);
    assert_eq!(created["topic"]["config"]["retention_bytes"], 10_000_000);
    assert!(created["topic"]["created_ms"].is_i64());
    let again = ns.json(&[
        "topic",
        "create",
        "p",
        "--partitions",
        "1",
        "--if-not-exists",
    ]);
    assert_eq!(again["created"], false);
    let listed = ns.ok(&["topic", "list"]);
    assert!(
        listed.contains("max_message_bytes=64KiB retention_bytes=10MB"),
        "{listed}"
    );

    ns.ok_with(
        &[
            "produce",
            "p",
            "--parse-headers",
            "--key-separator",
            "=",
            "--timestamp",
            "2026-01-02T03:04:05Z",
        ],
        b"trace:abc,n:1\tk1=v1\n\tk2=v2\n",
    );
    ns.ok_with(&["produce", "p", "-D", "|", "--ttl", "1h"], b"x|y|");
    ns.ok_with(&["produce", "p", "--whole-file"], b"line one\nline two\n");
    let bad = ns.run_with(
        &["produce", "p", "--parse-headers", "--format", "json"],
        b"novalue\n",
    );
    assert_eq!(bad.status.code(), Some(1));
    let results = lines(&String::from_utf8(bad.stdout.clone()).unwrap());
    assert_eq!(results[0]["line"], 1, "{results:?}");
    assert!(
        results[0]["error"].as_str().unwrap().contains("no tab"),
        "{results:?}"
    );

    let out = ns.ok(&[
        "consume",
        "p",
        "--from-beginning",
        "--exit-at-end",
        "--format",
        "json",
    ]);
    let messages = lines(&out);
    let values: Vec<&str> = messages
        .iter()
        .map(|m| m["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["v1", "v2", "x", "y", "line one\nline two\n"]);
    assert_eq!(messages[0]["key"], "k1");
    assert_eq!(messages[0]["headers"]["trace"], "abc");
    assert_eq!(messages[0]["headers"]["n"], "1");
    assert_eq!(messages[0]["timestamp"], 1_767_323_045_000i64);
    assert_eq!(messages[1]["headers"], serde_json::json!({}));

    let formatted = ns.ok(&[
        "consume",
        "p",
        "--from-beginning",
        "--exit-at-end",
        "--max-messages",
        "2",
        "-f",
        "%t/%p/%o %k=%s [%h]\\n",
    ]);
    assert_eq!(formatted, "p/0/0 k1=v1 [n=1,trace=abc]\np/0/1 k2=v2 []\n");

    // The last N of each partition, and a time to stop at.
    let last = ns.ok(&[
        "consume",
        "p",
        "--offset",
        "-2",
        "--exit-at-end",
        "-f",
        "%s|",
    ]);
    assert_eq!(last, "y|line one\nline two\n|");
    let bounded = ns.run(&[
        "consume",
        "p",
        "--from-beginning",
        "--until",
        "2026-06-01",
        "-f",
        "%s\\n",
    ]);
    assert!(bounded.status.success(), "{}", stderr(&bounded));
    assert_eq!(String::from_utf8_lossy(&bounded.stdout), "v1\nv2\n");
    assert!(
        stderr(&bounded).contains("consumed 2 messages"),
        "{}",
        stderr(&bounded)
    );
    let grouped = ns.run(&["consume", "p", "--group", "g", "--offset", "-1"]);
    assert_eq!(grouped.status.code(), Some(1));

    // A duration ago, and a date, as start times.
    let since = |time: &str| {
        let out = ns.ok(&[
            "consume",
            "p",
            "--from-time",
            time,
            "--exit-at-end",
            "--format",
            "json",
        ]);
        lines(&out).len()
    };
    assert_eq!(since("1h"), 3);
    assert_eq!(since("2026-01-01"), 5);

    let missing = ns.run(&[
        "message",
        "delete",
        "p",
        "--partition",
        "0",
        "--offset",
        "1,99",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("no message stored at offset 99"),
        "{}",
        stderr(&missing)
    );

    let typo = ns.run(&["topic", "describe", "pp"]);
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        stderr(&typo).contains("did you mean \"p\"?"),
        "{}",
        stderr(&typo)
    );

    let deleted = ns.json(&["topic", "delete", "p"]);
    assert_eq!(deleted["deleted"], true);
    let absent = ns.json(&["topic", "delete", "p", "--if-exists"]);
    assert_eq!(absent["deleted"], false);
    assert_eq!(ns.run(&["topic", "delete", "p"]).status.code(), Some(1));
}

/// A loopback port nothing listens on now, and its address.
fn free_port() -> (u16, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (port, format!("127.0.0.1:{port}"))
}

/// One HTTP GET of `/metrics` on `port`; the body.
fn scrape(port: u16) -> String {
    use std::net::TcpStream;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string())
}

/// The value of the series of `name` whose labels include `labels`.
fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn produce_serves_prometheus_metrics() {
    let ns = namespace();
    ns.ok(&["topic", "create", "m", "--partitions", "2"]);
    let (port, addr) = free_port();
    let mut child = ns
        .command(&["produce", "m", "--format", "json", "--metrics-addr", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"a\nb\nc\n").unwrap();
    let mut results = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        results.next().unwrap().unwrap();
    }
    let body = scrape(port);
    drop(stdin);
    assert!(wait_status(&mut child, DEADLINE, "the command").success());
    let topic = "topic=\"m\"";
    assert_eq!(
        metric(&body, "pubsub_etcd_produced_messages_total", topic),
        Some(3.0),
        "{body}"
    );
    assert!(
        metric(&body, "pubsub_etcd_produced_bytes_total", topic) > Some(0.0),
        "{body}"
    );
    assert!(body.contains("pubsub_etcd_append_seconds"), "{body}");
    assert_eq!(
        metric(&body, "pubsub_etcd_etcd_unreachable", ""),
        Some(0.0),
        "{body}"
    );
    assert!(
        body.contains("# HELP pubsub_etcd_produced_messages_total"),
        "{body}"
    );
}

/// Named contexts in a config file stand in for --endpoints, --namespace
/// and friends; options and environment variables still win.
#[test]
fn contexts_from_the_config_file() {
    let ns = namespace();
    let endpoints = std::env::var("PUBSUB_ETCD_ENDPOINTS").unwrap_or("127.0.0.1:2379".into());
    let dir = std::env::temp_dir().join(format!("{}-config", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "context = \"here\"\n\
             [contexts.here]\nendpoints = [{endpoints:?}]\nnamespace = {:?}\ntimeout = \"5s\"\n\
             [contexts.nowhere]\nendpoints = [\"127.0.0.1:1\"]\n",
            ns.name
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("PUBSUB_ETCD_CONFIG", &config)
            .env_remove("PUBSUB_ETCD_ENDPOINTS")
            .env_remove("PUBSUB_ETCD_NAMESPACE")
            .env_remove("PUBSUB_ETCD_CONTEXT")
            .output()
            .unwrap()
    };
    // The file's default context.
    let created = run(&["topic", "create", "ctx", "--partitions", "1"]);
    assert!(created.status.success(), "{}", stderr(&created));
    assert!(ns.ok(&["topic", "list"]).contains("ctx"));
    // Another context, overridden by options.
    let failed = run(&["--context", "nowhere", "--timeout", "1s", "topic", "list"]);
    assert_eq!(failed.status.code(), Some(1));
    let listed = run(&[
        "--context",
        "nowhere",
        "--endpoints",
        &endpoints,
        "--namespace",
        &ns.name,
        "topic",
        "list",
    ]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("ctx"),
        "{}",
        stderr(&listed)
    );
    let unknown = run(&["--context", "elsewhere", "topic", "list"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("no context \"elsewhere\""),
        "{}",
        stderr(&unknown)
    );
    let shown: Value =
        serde_json::from_slice(&run(&["context", "show", "--format", "json"]).stdout).unwrap();
    assert_eq!(shown["context"], "here");
    assert_eq!(shown["namespace"], ns.name.as_str());
    assert_eq!(shown["timeout"], "5s");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn admin_status_shows_history_and_space_and_the_opt_out() {
    let ns = namespace();
    let status = ns.json(&["admin", "status"]);
    let (revision, oldest) = (
        status["revision"].as_i64().unwrap(),
        status["oldest_revision"].as_i64().unwrap(),
    );
    assert!(revision >= oldest && oldest >= 1, "{status}");
    assert_eq!(status["history_span"].as_i64(), Some(revision - oldest));
    assert_eq!(status["auto_compacting"], true, "{status}");
    assert!(status["last_cycle"].is_object() || status["last_cycle"].is_null());
    let members = status["members"].as_array().unwrap();
    assert!(!members.is_empty(), "{status}");
    for member in members {
        assert!(member["db_size"].as_i64().unwrap() >= member["db_size_in_use"].as_i64().unwrap());
    }
    let off = ns.json(&["--no-auto-compaction", "admin", "status"]);
    assert_eq!(off["auto_compacting"], false, "{off}");

    let table = ns.ok(&["admin", "status", "--no-auto-compaction"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("revision:"), "{table}");
    assert!(
        lines.next().unwrap().starts_with("oldest revision:"),
        "{table}"
    );
    assert!(
        lines.next().unwrap().starts_with("last compaction:"),
        "{table}"
    );
    assert_eq!(
        lines.next(),
        Some("auto compaction:   off (this client)"),
        "{table}"
    );
    assert_eq!(lines.next(), Some(""), "{table}");
    assert!(lines.next().unwrap().starts_with("MEMBER"), "{table}");
    assert_eq!(lines.count(), members.len(), "{table}");

    let refused = ns.run(&["--no-auto-compaction", "admin", "auto-compact"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--no-auto-compaction"),
        "{refused:?}"
    );
}

#[test]
fn consume_serves_group_metrics() {
    let ns = namespace();
    ns.ok(&["topic", "create", "m", "--partitions", "2"]);
    ns.ok_with(&["produce", "m"], b"a\nb\nc\n");
    let (port, addr) = free_port();
    let mut child = ns
        .command(&["consume", "m", "--group", "g", "--metrics-addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        out.next().unwrap().unwrap();
    }
    // The commit follows the write.
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        let body = scrape(port);
        let complete = body.contains("pubsub_etcd_commit_seconds_count")
            && body.contains("pubsub_etcd_lag_messages");
        if complete || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let labels = "group=\"g\"";
    assert_eq!(
        metric(&body, "pubsub_etcd_delivered_messages_total", labels),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "pubsub_etcd_owned_partitions", labels),
        Some(2.0),
        "{body}"
    );
    assert!(
        metric(&body, "pubsub_etcd_rebalances_total", labels) >= Some(1.0),
        "{body}"
    );
    assert!(
        metric(&body, "pubsub_etcd_commit_seconds_count", labels) >= Some(1.0),
        "{body}"
    );
    for partition in ["partition=\"0\"", "partition=\"1\""] {
        assert_eq!(
            metric(&body, "pubsub_etcd_lag_messages", partition),
            Some(0.0),
            "{body}"
        );
    }
}

/// At -vv the library's spans show, with their fields and durations.
#[test]
fn verbose_logs_show_the_library_spans() {
    let ns = namespace();
    ns.ok(&["topic", "create", "s", "--partitions", "1"]);
    let produced = ns.run_with(&["-vv", "produce", "s"], b"a\n");
    assert!(produced.status.success());
    let log = stderr(&produced);
    assert!(
        log.contains("append{topic=s partition=0 records=1}") && log.contains("close"),
        "{log}"
    );
    let consumed = ns.run(&["-vv", "consume", "s", "--group", "g", "--exit-at-end"]);
    assert!(consumed.status.success());
    let log = stderr(&consumed);
    for span in ["rebalance{topic=s group=g", "commit{", "fetch{"] {
        assert!(log.contains(span), "{span}: {log}");
    }
    let quiet = ns.run(&["produce", "s"]);
    assert!(!stderr(&quiet).contains("append{"));
}

/// Several topics at once, named or by a regular expression, alone or as
/// one group member per topic (as `kcat -G g t1 t2`).
#[test]
fn several_topics_at_once() {
    let ns = namespace();
    for topic in ["m-one", "m-two", "other"] {
        ns.ok(&["topic", "create", topic, "--partitions", "2"]);
        let lines: String = (0..5).map(|i| format!("{topic}-{i}\n")).collect();
        ns.ok_with(&["produce", topic], lines.as_bytes());
    }
    let topics_of = |out: &str| {
        let mut seen: Vec<String> = lines(out)
            .iter()
            .map(|m| m["topic"].as_str().unwrap().to_string())
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let named = ns.ok(&[
        "consume",
        "m-one",
        "other",
        "--from-beginning",
        "--exit-at-end",
        "--format",
        "json",
    ]);
    assert_eq!(lines(&named).len(), 10, "{named}");
    assert_eq!(topics_of(&named), ["m-one", "other"]);
    let grouped = ns.ok(&[
        "consume",
        "--include",
        "m-.*",
        "--group",
        "g",
        "--exit-at-end",
        "--format",
        "json",
    ]);
    assert_eq!(lines(&grouped).len(), 10, "{grouped}");
    assert_eq!(topics_of(&grouped), ["m-one", "m-two"]);
    let lag = ns.json(&["group", "describe", "g"]);
    assert!(
        lag.as_array().unwrap().iter().all(|p| p["lag"] == 0),
        "{lag}"
    );
    let capped = ns.ok(&[
        "consume",
        "--include",
        ".*",
        "--from-beginning",
        "--max-messages",
        "3",
    ]);
    assert_eq!(capped.lines().count(), 3, "{capped}");
    let one = ns.run(&["consume", "m-one", "m-two", "--partition", "0"]);
    assert_eq!(one.status.code(), Some(1));
    let none = ns.run(&["consume", "--include", "nothing.*"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        stderr(&none).contains("no topic in namespace"),
        "{}",
        stderr(&none)
    );
}

/// Structured log lines, as compressible as real ones.
fn log_lines(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| {
            format!(
                "{{\"ts\":\"2026-12-02T13:00:{:02}Z\",\"level\":\"info\",\"service\":\"api\",\"msg\":\"request {i} done\",\"status\":200}}\n",
                i % 60
            )
        })
        .collect()
}

#[test]
fn compression_of_topics_and_producers() {
    let ns = namespace();
    ns.ok(&[
        "topic",
        "create",
        "logs",
        "--partitions",
        "1",
        "--compression",
        "zstd:5",
    ]);
    let described = ns.json(&["topic", "describe", "logs"]);
    assert_eq!(described["config"]["compression"], "zstd:5");
    assert!(ns
        .ok(&["topic", "describe", "logs"])
        .contains("compression=zstd:5"));

    // The topic's default codec, then explicit ones on the same partition.
    let mut sent = log_lines(0, 2000);
    ns.ok_with(&["produce", "logs"], sent.as_bytes());
    let part = &ns.json(&["topic", "describe", "logs"])["partitions"][0];
    let (bytes, stored) = (
        part["bytes"].as_u64().unwrap(),
        part["stored_bytes"].as_u64().unwrap(),
    );
    assert!(stored > 0 && stored * 3 < bytes, "{part}");
    let ratio = part["ratio"].as_f64().unwrap();
    assert!(
        (ratio - bytes as f64 / stored as f64).abs() < 1e-9,
        "{part}"
    );
    let table = ns.ok(&["topic", "describe", "logs"]);
    assert!(
        table.contains("STORED") && table.contains("RATIO"),
        "{table}"
    );
    assert!(table.contains(&format!("{ratio:.2}")), "{table}");

    ns.ok(&["topic", "alter", "logs", "--compression", "lz4"]);
    assert_eq!(
        ns.json(&["topic", "describe", "logs"])["config"]["compression"],
        "lz4"
    );
    for (i, codec) in ["none", "lz4", "zstd"].into_iter().enumerate() {
        let more = log_lines(2000 + i * 500, 500);
        ns.ok_with(
            &["produce", "logs", "--compression", codec],
            more.as_bytes(),
        );
        sent.push_str(&more);
    }
    let consumed = ns.ok(&["consume", "logs", "--from-beginning", "--exit-at-end"]);
    assert_eq!(consumed, sent);

    // `none` is the default, so it leaves the config.
    ns.ok(&["topic", "alter", "logs", "--compression", "none"]);
    let config = &ns.json(&["topic", "describe", "logs"])["config"];
    assert_eq!(*config, serde_json::json!({}));

    for bad in [
        &["topic", "alter", "logs", "--compression", "gzip"][..],
        &["produce", "logs", "--compression", "zstd:30"],
    ] {
        let output = ns.run(bad);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(
            stderr(&output).contains("compression"),
            "{}",
            stderr(&output)
        );
    }
}
