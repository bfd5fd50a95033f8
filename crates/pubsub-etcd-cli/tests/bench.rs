//! Runs `pubsub-etcd bench` end to end with tiny sizes against the etcd in
//! `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`), checks the JSON
//! summary's shape and that the benchmark left no key behind.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use etcd_client::GetOptions;
use serde_json::Value;
/// Only keeps a hung benchmark from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(120);

/// A namespace no other test uses; benchmarks run next to it, in
/// `<name>-bench-<random>`.
fn namespace() -> String {
    common::unique_name("bench-test")
}

fn command(namespace: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["--namespace", namespace, "--timeout", "10s", "bench"])
        .args(args)
        .env_remove("PUBSUB_ETCD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn wait(child: std::process::Child) -> Output {
    common::wait_output(child, DEADLINE, "the benchmark")
}

/// Runs a benchmark that must succeed with `--format json`; returns its summary.
fn bench_json(namespace: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--format", "json"]);
    let output = wait(
        command(namespace, &args)
            .spawn()
            .expect("the binary starts"),
    );
    assert!(
        output.status.success(),
        "bench {args:?} failed with {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).expect("stdout is one JSON document")
}

/// Keys whose name starts with `prefix`, in the whole etcd.
fn keys_under(prefix: &str) -> i64 {
    let endpoints = pubsub_etcd::endpoints_from_env();
    let prefix = prefix.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let mut etcd = etcd_client::Client::connect(endpoints, None).await.unwrap();
            etcd.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap()
            .count()
        })
}

fn assert_bench_namespace(summary: &Value, namespace: &str, bench: &str) {
    assert_eq!(summary["bench"], bench, "{summary}");
    let used = summary["namespace"]
        .as_str()
        .expect("namespace is a string");
    assert!(
        used.starts_with(&format!("{namespace}-bench-")),
        "{used} is not next to {namespace}"
    );
    // The prefix without '/' covers the benchmark's namespace too.
    assert_eq!(
        keys_under(namespace),
        0,
        "keys left behind under {namespace}"
    );
}

fn assert_number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

fn assert_latency(latency: &Value, samples: u64, what: &str) {
    assert_eq!(latency["samples"], samples, "{what}: {latency}");
    let mut previous = 0.0;
    for q in ["p50", "p95", "p99", "p99_9", "max"] {
        let ms = assert_number(&latency[q], &format!("{what}.{q}"));
        assert!(
            ms >= previous,
            "{what}: {q} below the previous percentile: {latency}"
        );
        previous = ms;
    }
}

#[test]
fn produce_with_raw_baseline_reports_json_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "produce",
            "--messages",
            "300",
            "--size",
            "64",
            "--partitions",
            "3",
            "--producers",
            "2",
            "--compare-raw",
        ],
    );
    assert_bench_namespace(&summary, &ns, "produce");
    let settings = &summary["settings"];
    assert_eq!(settings["messages"], 300);
    assert_eq!(settings["size"], 64);
    assert_eq!(settings["partitions"], 3);
    assert_eq!(settings["producers"], 2);
    assert_eq!(settings["rate"], Value::Null);
    for side in ["pubsub", "raw"] {
        let t = &summary[side];
        assert_eq!(t["messages"], 300, "{side}: {t}");
        assert_eq!(t["errors"], 0, "{side}: {t}");
        assert!(assert_number(&t["msgs_per_sec"], side) > 0.0);
        let mb = assert_number(&t["mb_per_sec"], side);
        let msgs = assert_number(&t["msgs_per_sec"], side);
        assert!((mb - msgs * 64.0 / 1e6).abs() < 1e-9, "{side}: {t}");
        assert_latency(&t["latency_ms"], 300, side);
    }
    let ratio = &summary["ratio"];
    let expected = assert_number(&summary["pubsub"]["msgs_per_sec"], "pubsub")
        / assert_number(&summary["raw"]["msgs_per_sec"], "raw");
    assert!((assert_number(&ratio["msgs_per_sec"], "ratio") - expected).abs() < 1e-9);
    assert_number(&ratio["latency_p50"], "ratio.latency_p50");
    assert_number(&ratio["latency_p99"], "ratio.latency_p99");
}

#[test]
fn produce_at_a_rate_without_baseline_prints_a_table() {
    let ns = namespace();
    let output = wait(
        command(&ns, &["produce", "--messages", "40", "--rate", "100"])
            .spawn()
            .unwrap(),
    );
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("40 messages of 100 B of random bytes, compression none, 8 partitions"),
        "{text}"
    );
    assert!(text.contains("100 msgs/s"), "{text}");
    assert!(text.contains("pubsub-etcd"), "{text}");
    assert!(
        !text.contains("raw"),
        "no baseline without --compare-raw: {text}"
    );
    // 40 messages at 100/s cannot take less than the pacing allows.
    let json = bench_json(&ns, &["produce", "--messages", "40", "--rate", "100"]);
    let seconds = assert_number(&json["pubsub"]["seconds"], "seconds");
    assert!(
        seconds >= 0.35,
        "40 messages at 100/s took only {seconds} s"
    );
    assert_eq!(json["raw"], Value::Null);
    assert_eq!(json["ratio"], Value::Null);
    assert_eq!(keys_under(&ns), 0);
}

#[test]
fn bad_options_are_refused_before_connecting() {
    let output = wait(
        command(&namespace(), &["produce", "--messages", "0"])
            .spawn()
            .unwrap(),
    );
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--messages"), "{stderr}");
}

fn assert_counts(side: &Value, sent: u64, what: &str) {
    assert_eq!(side["sent"], sent, "{what}: {side}");
    assert_eq!(side["received"], sent, "{what}: {side}");
    assert_eq!(side["lost"], 0, "{what}: {side}");
    assert_eq!(side["anomalies"], 0, "{what}: {side}");
    assert_eq!(side["write_errors"], 0, "{what}: {side}");
    assert!(assert_number(&side["achieved_rate"], what) > 0.0);
}

#[test]
fn latency_with_raw_baseline_reports_json_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "latency",
            "--rate",
            "40",
            "--seconds",
            "1",
            "--size",
            "16",
            "--compare-raw",
        ],
    );
    assert_bench_namespace(&summary, &ns, "latency");
    let settings = &summary["settings"];
    assert_eq!(settings["rate"], 40);
    assert_eq!(settings["seconds"], 1);
    assert_eq!(settings["warm_up_seconds"], 1);
    assert_eq!(settings["size"], 16);
    // 40 warm-up messages, then 40 measured ones.
    for side in ["pubsub", "raw"] {
        assert_counts(&summary[side], 80, side);
        assert_latency(&summary[side]["delivery_ms"], 40, side);
        assert_latency(&summary[side]["ack_ms"], 40, side);
    }
    assert_number(&summary["ratio"]["delivery_p50"], "ratio.delivery_p50");
    assert_number(&summary["ratio"]["delivery_p99"], "ratio.delivery_p99");
}

#[test]
fn latency_without_baseline_prints_a_table() {
    let ns = namespace();
    let output = wait(
        command(&ns, &["latency", "--rate", "20", "--seconds", "1"])
            .spawn()
            .unwrap(),
    );
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("20 msgs/s of 100 B for 1 s"), "{text}");
    assert!(text.contains("pubsub-etcd send→delivery"), "{text}");
    assert!(
        !text.contains("raw"),
        "no baseline without --compare-raw: {text}"
    );
    assert_eq!(keys_under(&ns), 0);
    let small = wait(command(&ns, &["latency", "--size", "15"]).spawn().unwrap());
    assert_eq!(small.status.code(), Some(2), "{small:?}");
    assert!(String::from_utf8_lossy(&small.stderr).contains("at least 16 bytes"));
}

fn assert_memory(memory: &Value, what: &str) {
    assert_eq!(memory["peak_reset"], true, "{what}: {memory}");
    assert!(assert_number(&memory["rss_start_bytes"], what) > 0.0);
    assert!(assert_number(&memory["peak_rss_bytes"], what) > 0.0);
}

#[test]
fn consume_with_raw_baseline_reports_json_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "consume",
            "--messages",
            "500",
            "--size",
            "40",
            "--partitions",
            "3",
            "--fetch-messages",
            "50",
            "--compare-raw",
        ],
    );
    assert_bench_namespace(&summary, &ns, "consume");
    let settings = &summary["settings"];
    assert_eq!(settings["messages"], 500);
    assert_eq!(settings["size"], 40);
    assert_eq!(settings["partitions"], 3);
    assert_eq!(settings["fetch_messages"], 50);
    assert!(assert_number(&summary["backlog"]["msgs_per_sec"], "backlog") > 0.0);
    let pubsub = &summary["pubsub"];
    assert_eq!(pubsub["messages"], 500, "{pubsub}");
    assert_eq!(pubsub["bytes"], 500 * 40, "{pubsub}");
    assert_eq!(pubsub["out_of_order"], 0, "{pubsub}");
    assert!(assert_number(&pubsub["first_message_ms"], "first_message_ms") > 0.0);
    assert!(assert_number(&pubsub["msgs_per_sec"], "pubsub") > 0.0);
    assert_memory(&pubsub["memory"], "pubsub");
    let raw = &summary["raw"];
    assert_eq!(raw["page"], 32, "{raw}");
    // At least one batch per partition, and the stored batches hold the values.
    assert!(raw["keys"].as_u64().unwrap() >= 3, "{raw}");
    assert!(raw["bytes"].as_u64().unwrap() >= 500 * 40, "{raw}");
    assert!(raw["requests"].as_u64().unwrap() >= 1, "{raw}");
    assert_memory(&raw["memory"], "raw");
    let expected = assert_number(&pubsub["msgs_per_sec"], "pubsub")
        / assert_number(&raw["msgs_per_sec"], "raw");
    assert!((assert_number(&summary["ratio"]["msgs_per_sec"], "ratio") - expected).abs() < 1e-9);
}

#[test]
fn consume_without_baseline_prints_a_table() {
    let ns = namespace();
    let output = wait(
        command(&ns, &["consume", "--messages", "100"])
            .spawn()
            .unwrap(),
    );
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(
            "backlog of 100 messages of 100 B of random bytes, compression none, in 1 partition(s)"
        ),
        "{text}"
    );
    assert!(text.contains("pubsub-etcd catch-up"), "{text}");
    assert!(!text.contains("raw") && !text.contains("Raw"), "{text}");
    assert_eq!(keys_under(&ns), 0);
}

#[test]
fn a_failing_benchmark_still_deletes_its_namespace() {
    let ns = namespace();
    // The topic is created, then the first message is refused as too large.
    let output = wait(
        command(&ns, &["produce", "--messages", "10", "--size", "2MiB"])
            .spawn()
            .unwrap(),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exceeds the limit"), "{stderr}");
    assert!(stderr.contains("stopped, its keys deleted"), "{stderr}");
    assert_eq!(keys_under(&ns), 0);
}

#[test]
fn an_interrupted_benchmark_deletes_its_namespace() {
    let ns = namespace();
    let child = command(
        &ns,
        &[
            "latency",
            "--rate",
            "50",
            "--seconds",
            "60",
            "--compare-raw",
        ],
    )
    .spawn()
    .unwrap();
    let started = Instant::now();
    while keys_under(&ns) == 0 {
        assert!(started.elapsed() < DEADLINE, "the benchmark wrote nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it send for a while, so that deliveries are in flight.
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = wait(child);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(keys_under(&ns), 0);
}

/// Application bytes against stored bytes, for a compressing run.
fn assert_compressed(side: &Value, messages: u64, min_ratio: f64, what: &str) {
    let stored = &side["stored"];
    let ratio = assert_number(&stored["ratio"], what);
    assert!(ratio > min_ratio, "{what}: {side}");
    let per_msg = assert_number(&stored["stored_bytes_per_msg"], what);
    let stored_bytes = stored["stored_bytes"].as_u64().unwrap();
    assert!(
        (per_msg - stored_bytes as f64 / messages as f64).abs() < 1e-6,
        "{what}: {side}"
    );
    let record_bytes = stored["record_bytes"].as_u64().unwrap();
    assert!(
        (ratio - record_bytes as f64 / stored_bytes as f64).abs() < 1e-9,
        "{what}: {side}"
    );
}

#[test]
fn produce_and_consume_compressed_payloads() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "produce",
            "--messages",
            "3000",
            "--payload",
            "json-logs",
            "--compression",
            "zstd",
            "--partitions",
            "1",
        ],
    );
    assert_eq!(summary["settings"]["payload"], "json-logs");
    assert_eq!(summary["settings"]["compression"], "zstd:3");
    let pubsub = &summary["pubsub"];
    assert_eq!(pubsub["messages"], 3000, "{pubsub}");
    assert_compressed(pubsub, 3000, 3.0, "json-logs zstd");
    // Values of 200-600 bytes.
    let per_msg = assert_number(&pubsub["mb_per_sec"], "mb") * 1e6
        / assert_number(&pubsub["msgs_per_sec"], "msgs");
    assert!((200.0..=600.0).contains(&per_msg), "{pubsub}");

    let summary = bench_json(
        &ns,
        &[
            "consume",
            "--messages",
            "2000",
            "--payload",
            "text",
            "--size",
            "300",
            "--compression",
            "lz4",
        ],
    );
    assert_eq!(summary["settings"]["payload"], "text");
    let pubsub = &summary["pubsub"];
    assert_eq!(pubsub["bytes"], 2000 * 300, "{pubsub}");
    assert_compressed(pubsub, 2000, 1.3, "text lz4");
    assert_compressed(&summary["backlog"], 2000, 1.3, "text lz4 backlog");

    // Random values do not compress (only the records' framing does a
    // little), and a batch is never stored larger than plain.
    let summary = bench_json(
        &ns,
        &[
            "produce",
            "--messages",
            "1000",
            // Large enough that batch framing, whose share depends on how
            // many batches timing makes, stays far below the 1% the ratio
            // allows (at 200 B it came to 1.2% once).
            "--size",
            "2000",
            "--compression",
            "zstd",
        ],
    );
    let stored = &summary["pubsub"]["stored"];
    let ratio = assert_number(&stored["ratio"], "random");
    assert!((0.99..1.2).contains(&ratio), "{stored}");
    assert!(assert_number(&stored["stored_bytes_per_msg"], "random") > 1800.0);
    assert_eq!(keys_under(&ns), 0);
}

#[test]
fn pipeline_reports_both_stages_and_their_ratio_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "pipeline",
            "--messages",
            "900",
            "--size",
            "40",
            "--partitions",
            "3",
            "--batch",
            "200",
        ],
    );
    assert_bench_namespace(&summary, &ns, "pipeline");
    assert_eq!(summary["settings"]["batch"], 200);
    for stage in ["exactly_once", "plain"] {
        let stage = &summary[stage];
        assert_eq!(stage["messages"], 900, "{stage}");
        // At least 5 batches of at most 200.
        assert!(stage["batches"].as_u64().unwrap() >= 5, "{stage}");
        assert!(assert_number(&stage["msgs_per_sec"], "msgs/s") > 0.0);
    }
    let expected = assert_number(&summary["exactly_once"]["msgs_per_sec"], "exactly-once")
        / assert_number(&summary["plain"]["msgs_per_sec"], "plain");
    assert!((assert_number(&summary["ratio"], "ratio") - expected).abs() < 1e-9);
}

#[test]
fn queue_settles_the_backlog_with_both_ack_kinds_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "queue",
            "--messages",
            "3000",
            "--partitions",
            "3",
            "--workers",
            "4",
        ],
    );
    assert_bench_namespace(&summary, &ns, "queue");
    assert_eq!(summary["group"]["messages"], 3000, "{summary}");
    let group = assert_number(&summary["group"]["msgs_per_sec"], "group msgs/s");
    for (drain, acks, name) in [
        ("queue", "confirmed", "work"),
        ("queue_nowait", "nowait", "work-nowait"),
    ] {
        let q = &summary[drain];
        assert_eq!(
            (&q["acks"], &q["name"]),
            (&acks.into(), &name.into()),
            "{q}"
        );
        assert_eq!(q["drain"]["messages"], 3000, "{q}");
        assert_eq!(q["detail"]["duplicates"], 0, "{q}");
        assert_eq!(q["detail"]["stats"]["pending"], 0, "{q}");
        let rate = assert_number(&q["drain"]["msgs_per_sec"], drain);
        assert!((assert_number(&q["ratio"], drain) - rate / group).abs() < 1e-9);
    }
    assert_eq!(keys_under(&ns), 0);
}

#[test]
fn console_times_the_overview_of_what_it_seeded_and_cleans_up() {
    let ns = namespace();
    let summary = bench_json(
        &ns,
        &[
            "console",
            "--topics",
            "3",
            "--partitions",
            "2",
            "--groups",
            "2",
            "--messages",
            "5",
            "--rounds",
            "4",
        ],
    );
    assert_bench_namespace(&summary, &ns, "console");
    assert_eq!(summary["settings"]["topics"], 3, "{summary}");
    let builds = summary["builds_ms"].as_array().expect("builds_ms");
    assert_eq!(builds.len(), 4, "{summary}");
    let median = assert_number(&summary["median_ms"], "median");
    let max = assert_number(&summary["max_ms"], "max");
    assert!(median > 0.0 && median <= max, "{summary}");
}

#[test]
fn every_bench_option_documents_its_default() {
    for bench in ["produce", "consume", "latency", "pipeline", "console"] {
        let output = Command::new(BIN)
            .args(["bench", bench, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let help = String::from_utf8(output.stdout).unwrap();
        // The benchmark's own options come before the global sections.
        let own = help
            .split_once("Options:")
            .and_then(|(_, rest)| rest.split_once("Connection:"))
            .map(|(own, _)| own)
            .unwrap_or_else(|| panic!("no option sections in: {help}"));
        let mut options = 0;
        for entry in own.split("\n      --").skip(1) {
            let name = entry.split_whitespace().next().unwrap();
            if name == "help" || name == "version" {
                continue;
            }
            options += 1;
            // -h and -V start their own entries; cut them off.
            let entry = entry.split("\n  -").next().unwrap();
            assert!(
                entry.contains("[default: "),
                "bench {bench} --{name} does not say its default:\n{entry}"
            );
        }
        assert!(
            options >= 4,
            "bench {bench}: only {options} options in: {own}"
        );
    }
}
