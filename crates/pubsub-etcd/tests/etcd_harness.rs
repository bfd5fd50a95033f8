//! Checks the etcd process harness in `tests/common/etcd_proc.rs` itself, so
//! a fault test that fails points at the library, not at the harness.

mod common;

use common::etcd_proc::{self, ClusterOptions, EtcdCluster};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// etcdctl with a short command timeout: these checks ask paused and
/// stopped members too, and must give up quickly.
fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    let args: Vec<&str> = ["--command-timeout=2s"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    etcd_proc::etcdctl(endpoint, &args)
}

fn put(endpoint: &str, key: &str, value: &str) {
    let out = etcdctl(endpoint, &["put", key, value]);
    assert!(
        out.status.success(),
        "put {key} via {endpoint} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(endpoint: &str, key: &str) -> Result<String, String> {
    let out = etcdctl(endpoint, &["get", key, "--print-value-only"]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// After a fault the survivors may need an election first: retry for a while.
fn get_eventually(endpoint: &str, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(endpoint, key) {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("get {key} via {endpoint}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn three_member_cluster_survives_kill_pause_and_restart() {
    let mut cluster = EtcdCluster::start(3);
    let eps = cluster.endpoints();
    assert_eq!(eps.len(), 3);
    for (i, ep) in eps.iter().enumerate() {
        assert!(ep.starts_with("127.0.0.1:"), "endpoint {ep}");
        assert_eq!(*ep, cluster.endpoint(i));
    }

    // Replication: written through m0, read through m2.
    put(&cluster.endpoint(0), "harness/k1", "v1");
    assert_eq!(get(&cluster.endpoint(2), "harness/k1").unwrap(), "v1");

    // Kill m0: it must really be gone, and the other two keep a quorum.
    let pid0 = cluster.pid(0).expect("m0 running");
    cluster.kill(0);
    assert_eq!(cluster.pid(0), None);
    assert!(!process_exists(pid0), "m0 (PID {pid0}) not reaped");
    assert!(get(&cluster.endpoint(0), "harness/k1").is_err());
    assert_eq!(get_eventually(&cluster.endpoint(1), "harness/k1"), "v1");
    put(&cluster.endpoint(1), "harness/k2", "v2");

    // Restart m0 on its old ports and data: it rejoins and catches up.
    cluster.restart(0);
    cluster.wait_healthy(0);
    assert_ne!(cluster.pid(0), Some(pid0));
    assert_eq!(get(&cluster.endpoint(0), "harness/k2").unwrap(), "v2");

    // A paused member accepts connections but answers nothing.
    cluster.pause(2);
    assert!(get(&cluster.endpoint(2), "harness/k1").is_err());
    assert_eq!(get_eventually(&cluster.endpoint(1), "harness/k1"), "v1");
    cluster.resume(2);
    cluster.wait_healthy(2);
    assert_eq!(get(&cluster.endpoint(2), "harness/k2").unwrap(), "v2");

    // Drop must kill and reap every member, paused ones included.
    cluster.pause(2);
    let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).unwrap()).collect();
    drop(cluster);
    for pid in pids {
        assert!(!process_exists(pid), "PID {pid} survived drop");
    }
    assert!(get(&eps[1], "harness/k1").is_err());
}

#[test]
fn single_member_with_quota_reports_space_exceeded() {
    let cluster = EtcdCluster::start_with(ClusterOptions {
        members: 1,
        quota_backend_bytes: Some(256 * 1024),
        ..ClusterOptions::default()
    });
    let ep = cluster.endpoint(0);
    put(&ep, "harness/small", "x");
    assert_eq!(get(&ep, "harness/small").unwrap(), "x");

    // A 100 kB value fits in a request but, a few times over, not in the
    // quota: etcd must refuse with "database space exceeded".
    let big = "y".repeat(100 * 1024);
    let mut refused = None;
    for i in 0..20 {
        let out = etcdctl(&ep, &["put", &format!("harness/big{i}"), &big]);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let err = refused.expect("quota never hit: --quota-backend-bytes not applied?");
    assert!(
        err.contains("database space exceeded"),
        "unexpected error: {err}"
    );
}
