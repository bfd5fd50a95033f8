//! The `pubsub-etcd` binary against etcd processes of its own that the tests
//! pause, kill and restart, and against a topic deleted under a producer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::etcd_proc::{ClusterOptions, EtcdCluster};
use common::BIN;
/// Only keeps a hung process from hanging the suite.
const DEADLINE: Duration = Duration::from_secs(40);

fn command(endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["--endpoints", endpoint, "--namespace", "cli-faults"])
        .args(args)
        .env_remove("PUBSUB_ETCD_NAMESPACE")
        .env_remove("RUST_LOG");
    command
}

fn ok(endpoint: &str, args: &[&str]) {
    let output = command(endpoint, args).output().expect("the binary runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Lines of a child's stderr, read on a thread, so a test can wait for one.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Waits for a stderr line containing `needle`; returns every line seen.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return;
            }
        }
    }
    panic!("no stderr line with {needle:?} within {DEADLINE:?}; saw {seen:?}");
}

/// A frozen etcd once made `produce --timeout 2s` wait out the producer's
/// default delivery timeout of 60 s.
#[test]
fn produce_gives_up_after_its_timeout() {
    let etcd = EtcdCluster::start(1);
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut child = command(&endpoint, &["--timeout", "2s", "produce", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // Connected and the topic read: now etcd stops answering.
    std::thread::sleep(Duration::from_secs(1));
    etcd.pause(0);
    let started = Instant::now();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    let status = wait(&mut child);
    let took = started.elapsed();
    etcd.resume(0);
    assert_eq!(status.code(), Some(1));
    assert!(took < Duration::from_secs(20), "gave up after {took:?}");
}

/// With etcd down, a tail once printed nothing for minutes. It says so, and
/// says so again when etcd is back.
#[test]
fn consume_reports_an_outage_and_the_recovery() {
    let mut etcd = EtcdCluster::start(1);
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut child = command(&endpoint, &["consume", "t"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let lines = stderr_lines(&mut child);
    std::thread::sleep(Duration::from_secs(1));
    etcd.kill(0);
    let mut seen = Vec::new();
    wait_for_line(&lines, "etcd unreachable for", &mut seen);
    etcd.restart(0);
    wait_for_line(&lines, "etcd reachable again", &mut seen);
    let _ = child.kill();
    let _ = child.wait();
}

/// After its topic was deleted, `produce` once went on reading its input
/// and printed one error per line.
#[test]
fn produce_stops_once_its_topic_is_deleted() {
    let etcd = EtcdCluster::start(1);
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut child = command(&endpoint, &["produce", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..100_000 {
            if writeln!(stdin, "line {i}").is_err() {
                return;
            }
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    ok(&endpoint, &["topic", "delete", "t"]);
    let lines = stderr_lines(&mut child);
    let status = wait(&mut child);
    writer.join().unwrap();
    // Ends when the reading thread sees stderr close.
    let stderr: Vec<String> = lines.iter().collect();
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    let errors: Vec<&String> = stderr.iter().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr:?}");
    assert!(errors[0].contains("was deleted"), "{stderr:?}");
}

/// The library's warnings once never reached the user: an unreadable
/// committed offset was ignored with stderr empty.
#[test]
fn library_warnings_are_shown_by_default() {
    let etcd = EtcdCluster::start(1);
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut produce = command(&endpoint, &["produce", "t"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    produce.stdin.take().unwrap().write_all(b"a\nb\n").unwrap();
    assert!(wait(&mut produce).success());
    let garbage = || {
        let put = Command::new("etcdctl")
            .args([
                "--endpoints",
                &endpoint,
                "put",
                "cli-faults/groups/t/g/offsets/00000",
                "garbage",
            ])
            .output()
            .expect("etcdctl runs");
        assert!(
            put.status.success(),
            "{}",
            String::from_utf8_lossy(&put.stderr)
        );
    };
    let consume = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(["consume", "t", "--group", "g", "--exit-at-end"]);
        let output = command(&endpoint, &args).output().expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "a\nb\n");
        stderr
    };

    garbage();
    let stderr = consume(&[]);
    assert!(
        stderr.contains("WARN") && stderr.contains("committed offset"),
        "{stderr}"
    );
    // -q keeps only errors.
    garbage();
    assert_eq!(consume(&["-q"]), "");
}

/// A 300 MB input line was once read whole before the size check.
#[test]
fn an_oversized_line_is_skipped_without_being_held() {
    const HUGE: usize = 64 * 1024 * 1024;
    let etcd = EtcdCluster::start(1);
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut child = command(&endpoint, &["produce", "t", "--format", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(b"before\n").unwrap();
        let block = vec![b'x'; 1024 * 1024];
        for _ in 0..HUGE / block.len() {
            stdin.write_all(&block).unwrap();
        }
        stdin.write_all(b"\nafter\n").unwrap();
        // Held open until the results are in, so the process is still
        // there to be measured.
        stdin
    });
    let mut results = BufReader::new(child.stdout.take().unwrap()).lines();
    let results: Vec<String> = (0..3).map(|_| results.next().unwrap().unwrap()).collect();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    drop(writer.join().unwrap());
    assert_eq!(wait(&mut child).code(), Some(1));
    assert!(results[0].contains("\"offset\":0"), "{results:?}");
    assert!(results[1].contains("exceeds the limit"), "{results:?}");
    assert!(results[2].contains("\"offset\":1"), "{results:?}");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    assert!(
        peak_kib < 48 * 1024,
        "peak RSS {peak_kib} KiB for a {HUGE}-byte line"
    );
}

/// `status` as a monitoring probe: its JSON shape, exit 0 when all is
/// well, and exit 1 naming the NOSPACE alarm once etcd's quota is exceeded.
#[test]
fn status_reports_health_and_fails_on_an_alarm() {
    let etcd = EtcdCluster::start_with(ClusterOptions {
        quota_backend_bytes: Some(2 * 1024 * 1024),
        ..ClusterOptions::default()
    });
    let endpoint = etcd.endpoint(0);
    ok(&endpoint, &["topic", "create", "t", "--partitions", "1"]);
    let mut produce = command(&endpoint, &["produce", "t", "--key-separator", ":"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first: String = (0..10).map(|i| format!("k:m{i}\n")).collect();
    produce
        .stdin
        .take()
        .unwrap()
        .write_all(first.as_bytes())
        .unwrap();
    assert!(wait(&mut produce).success());

    let healthy = command(&endpoint, &["status", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&healthy.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let member = &report["etcd"]["members"][0];
    assert_eq!(member["leader"], true, "{report}");
    assert!(member["db_size"].as_u64() > Some(0), "{report}");
    assert!(member["raft_index"].as_u64() > Some(0), "{report}");
    assert_eq!(report["topics"][0]["name"], "t", "{report}");
    assert_eq!(report["topics"][0]["stored_messages"], 10, "{report}");
    assert!(
        report["topics"][0]["newest_age_ms"].as_i64() >= Some(0),
        "{report}"
    );
    // Less headroom than asked for.
    let tight = command(&endpoint, &["status", "--min-headroom", "100"])
        .output()
        .unwrap();
    assert_eq!(tight.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&tight.stderr).contains("quota left"));

    // Fill etcd until it refuses writes.
    let line = vec![b'x'; 200 * 1024];
    let mut filled = false;
    for _ in 0..40 {
        let mut produce = command(&endpoint, &["produce", "t"])
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = produce.stdin.take().unwrap();
        stdin.write_all(&line).unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        if !wait(&mut produce).success() {
            filled = true;
            break;
        }
    }
    assert!(filled, "a 2 MiB quota took 8 MB");
    let alarmed = command(&endpoint, &["status", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(alarmed.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&alarmed.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["etcd"]["alarms"][0]["alarm"], "NOSPACE", "{report}");
    assert!(String::from_utf8_lossy(&alarmed.stderr).contains("alarm NOSPACE"));

    // A truncation that must rewrite a batch cannot finish under NOSPACE,
    // and says exactly how far it got. Where the first ten records' batches
    // begin depends on timing, and a cut at a batch boundary only deletes
    // (which etcd allows under NOSPACE), so cut further until one falls
    // inside a batch.
    let mut refused = None;
    for before in 1..10 {
        let before = before.to_string();
        let truncated = command(
            &endpoint,
            &[
                "topic",
                "truncate",
                "t",
                "--partition",
                "0",
                "--before",
                &before,
            ],
        )
        .output()
        .unwrap();
        if !truncated.status.success() {
            assert_eq!(truncated.status.code(), Some(1));
            refused = Some(String::from_utf8_lossy(&truncated.stderr).into_owned());
            break;
        }
    }
    let said = refused.expect("ten records in ten batches of one: no cut needed a rewrite");
    assert!(
        said.contains("stopped half-way") && said.contains("could not be rewritten"),
        "{said}"
    );
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    common::wait_status(child, DEADLINE, "the command")
}
