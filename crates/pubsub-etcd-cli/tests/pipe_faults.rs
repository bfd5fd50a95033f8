//! `pipe` exactly once under faults: two stage processes on a three-member
//! etcd cluster, SIGKILLed and restarted every few seconds, one SIGSTOPped
//! past its session TTL and resumed, and the etcd leader killed twice,
//! while 20,000 keyed inputs arrive. B must hold every input exactly once,
//! in input order per key, with no gap or duplicate in any partition.

#[path = "../../pubsub-etcd/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd_proc::EtcdCluster;
use pubsub_etcd::{Client, Message};

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-etcd");
const NAMESPACE: &str = "pipe-faults";
const INPUTS: usize = 20_000;
const KEYS: usize = 200;
const PARTITIONS: &str = "4";
/// Session TTL of the stages: the SIGSTOP lasts longer.
const TTL: Duration = Duration::from_secs(3);
/// How long the faults go on; the inputs arrive over most of it.
const CHAOS: Duration = Duration::from_secs(24);
/// How long the stages then have to finish.
const DRAIN: Duration = Duration::from_secs(25);

fn cli(endpoints: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["--endpoints", endpoints, "--namespace", NAMESPACE])
        .env_remove("PUBSUB_ETCD_NAMESPACE")
        .env_remove("RUST_LOG");
    command
}

/// One `pipe` process at a time in a slot, its stderr appended to a log.
struct Stage {
    child: Child,
    log: PathBuf,
    starts: usize,
}

impl Stage {
    fn start(endpoints: &str, log: PathBuf) -> Stage {
        let child = Self::spawn(endpoints, &log);
        Stage {
            child,
            log,
            starts: 1,
        }
    }

    fn spawn(endpoints: &str, log: &Path) -> Child {
        let stderr = File::options().create(true).append(true).open(log).unwrap();
        cli(endpoints)
            .args(["pipe", "a", "b", "--group", "g", "--batch", "300"])
            .args(["--exec", "sed -u 's/^/T:/'", "--session-ttl", "3s"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the binary starts")
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    }

    fn restart(&mut self, endpoints: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(endpoints, &self.log);
        self.starts += 1;
    }

    /// Starts the stage again if it ended by itself (an error it reported).
    fn revive(&mut self, endpoints: &str) {
        if let Ok(Some(_)) = self.child.try_wait() {
            self.restart(endpoints);
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message of `topic`, per partition in offset order.
async fn read_topic(client: &Client, topic: &str) -> BTreeMap<u32, Vec<Message>> {
    let info = client.topic(topic).await.unwrap();
    let mut out = BTreeMap::new();
    for p in 0..info.partitions {
        let mut messages: Vec<Message> = Vec::new();
        let mut from = 0;
        loop {
            let page = client.fetch(topic, p, from, 5_000).await.unwrap();
            if page.messages.is_empty() {
                break;
            }
            from = page.next_offset;
            messages.extend(page.messages);
        }
        out.insert(p, messages);
    }
    out
}

fn text(m: &Message) -> String {
    String::from_utf8(m.value.to_vec()).unwrap()
}

#[test]
fn pipe_is_exactly_once_through_kills_pauses_and_leader_loss() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints().join(",");
    for topic in ["a", "b"] {
        let status = cli(&endpoints)
            .args(["topic", "create", topic, "--partitions", PARTITIONS])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let logs = std::env::temp_dir().join(format!("pipe-faults-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&logs).unwrap();
    let mut stages = [
        Stage::start(&endpoints, logs.join("stage-0.log")),
        Stage::start(&endpoints, logs.join("stage-1.log")),
    ];
    // The inputs arrive over most of the chaos: one producer, so each
    // key's inputs are stored in the order written.
    let mut producer = cli(&endpoints)
        .args(["produce", "a", "--key-separator", ":"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for chunk in (0..INPUTS).collect::<Vec<_>>().chunks(125) {
            let lines: String = chunk
                .iter()
                .map(|i| format!("k{}:v{i}\n", i % KEYS))
                .collect();
            stdin.write_all(lines.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let started = Instant::now();
    let mut killed_leaders = Vec::new();
    let mut paused: Option<Instant> = None;
    let mut tick = 0u32;
    while started.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        match tick {
            // The etcd leader, killed twice, back 3 s later each time.
            6 | 16 => {
                let leader = runtime.block_on(common::leader(&cluster));
                cluster.kill(leader);
                killed_leaders.push((tick, leader));
            }
            9 | 19 => {
                let (_, leader) = killed_leaders.last().copied().unwrap();
                cluster.restart(leader);
            }
            // Stage 1 frozen past its TTL, then resumed: a zombie.
            8 => {
                stages[1].signal("-STOP");
                paused = Some(Instant::now());
            }
            _ => {}
        }
        if paused.is_some_and(|at| at.elapsed() > TTL + Duration::from_secs(2)) {
            stages[1].signal("-CONT");
            paused = None;
        }
        // SIGKILL and restart a stage every 3 s, alternately.
        if tick % 3 == 0 && paused.is_none() {
            let i = (tick / 3 % 2) as usize;
            stages[i].restart(&endpoints);
        }
        for stage in stages.iter_mut() {
            if paused.is_none() {
                stage.revive(&endpoints);
            }
        }
    }
    feeder.join().unwrap();
    let produced = producer.wait_with_output().unwrap();
    assert!(
        produced.status.success(),
        "produce: {}",
        String::from_utf8_lossy(&produced.stderr)
    );

    let client = runtime.block_on(async {
        Client::builder(cluster.endpoints())
            .namespace(NAMESPACE)
            .connect()
            .await
            .unwrap()
    });
    let inputs = runtime.block_on(read_topic(&client, "a"));
    let stored: usize = inputs.values().map(Vec::len).sum();
    assert_eq!(stored, INPUTS, "the producer stored every input once");
    let deadline = Instant::now() + DRAIN;
    let outputs = loop {
        for stage in stages.iter_mut() {
            stage.revive(&endpoints);
        }
        let outputs = runtime.block_on(read_topic(&client, "b"));
        let count: usize = outputs.values().map(Vec::len).sum();
        if count >= INPUTS || Instant::now() >= deadline {
            break outputs;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let report = || {
        format!(
            "starts {:?}; leaders killed {killed_leaders:?}\nstage 0:\n{}\nstage 1:\n{}",
            stages.iter().map(|s| s.starts).collect::<Vec<_>>(),
            stages[0].log_tail(),
            stages[1].log_tail()
        )
    };

    // No gap or duplicate offset in any partition of B.
    for (p, messages) in &outputs {
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(m.offset, i as u64, "partition {p} of b: {}", report());
        }
    }
    // Every input exactly once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in outputs.values().flatten() {
        *seen.entry(text(m)).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated outputs {dups:?}: {}", report());
    let missing: Vec<String> = inputs
        .values()
        .flatten()
        .map(|m| format!("T:{}", text(m)))
        .filter(|v| !seen.contains_key(v))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "missing outputs {missing:?}: {}",
        report()
    );
    assert_eq!(seen.len(), INPUTS, "{}", report());
    // Per key, outputs in input order.
    let by_key = |messages: &BTreeMap<u32, Vec<Message>>, prefix: &str| {
        let mut keys: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
        for m in messages.values().flatten() {
            let value = text(m);
            let value = value.strip_prefix(prefix).unwrap_or(&value).to_string();
            keys.entry(m.key.clone().unwrap().to_vec())
                .or_default()
                .push(value);
        }
        keys
    };
    let (input_order, output_order) = (by_key(&inputs, ""), by_key(&outputs, "T:"));
    assert_eq!(input_order.len(), KEYS);
    for (key, order) in &input_order {
        assert_eq!(
            output_order.get(key),
            Some(order),
            "key {:?}: {}",
            String::from_utf8_lossy(key),
            report()
        );
    }
    assert!(
        stages.iter().map(|s| s.starts).sum::<usize>() >= 8,
        "the stages were restarted: {}",
        report()
    );
    drop(stages);
    let _ = std::fs::remove_dir_all(&logs);
}
