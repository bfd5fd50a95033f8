//! Queue mode against a real etcd: settlement, redelivery after ack_wait,
//! in_progress, nack delays, delivery limits and dead letters, term, many
//! workers on one partition, worker processes killed with SIGKILL (this test
//! binary re-executed as `child_worker`), a leader kill on a 3-member
//! cluster, and garbage in the queue's state keys.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use common::etcd_proc::EtcdCluster;
use common::leader;
use common::ns::{client, Namespace};
use pubsub_etcd::{Client, Error, Job, NewTopic, QueueConsumer, QueueReset, Record};
use tokio::time::{timeout, Instant};

const CHILD_ENV: &str = "PUBSUB_TEST_CHILD_QUEUE_WORKER";

/// The next job, failing the test on an error or after `within`.
async fn next(queue: &mut QueueConsumer, within: Duration) -> Job {
    timeout(within, queue.recv())
        .await
        .expect("a job in time")
        .expect("the queue is open")
        .expect("no queue error")
}

/// Jobs received within `for_`, each acked at once.
async fn ack_all(queue: &mut QueueConsumer, for_: Duration) -> Vec<(u32, u64)> {
    let mut got = Vec::new();
    let until = Instant::now() + for_;
    while let Ok(Some(job)) = tokio::time::timeout_at(until, queue.recv()).await {
        let job = job.unwrap();
        got.push((job.message.partition, job.message.offset));
        job.ack().await.unwrap();
    }
    got
}

async fn topic_with(client: &Client, name: &str, partitions: u32, messages: usize) {
    client
        .create_topic(NewTopic::new(name, partitions))
        .await
        .unwrap();
    let producer = client.producer(name).build().await.unwrap();
    let mut deliveries = Vec::new();
    for i in 0..messages {
        deliveries.push(
            producer
                .enqueue(Record::new(format!("m{i}")).key(format!("k{i}")))
                .await
                .unwrap(),
        );
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await.unwrap();
}

#[tokio::test]
async fn every_message_is_settled_and_an_unacked_one_comes_back_after_ack_wait() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 2, 20).await;
    let wait = Duration::from_millis(800);
    // Jobs are leased in batches, possibly before the first one is handed
    // out, so a lease is no older than the join, not than its delivery.
    let joining = Instant::now();
    let mut queue = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let mut acked = BTreeSet::new();
    let mut dropped = None;
    let mut redelivered_after = None;
    while acked.len() < 20 {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        let id = (job.message.partition, job.message.offset);
        if dropped.is_none() {
            dropped = Some((id, joining));
            continue;
        }
        if Some(id) == dropped.map(|d| d.0) {
            assert_eq!(job.delivery_count, 2);
            redelivered_after = dropped.map(|d| d.1.elapsed());
        }
        assert!(acked.insert(id), "{id:?} delivered again after its ack");
        job.ack().await.unwrap();
    }
    let after = redelivered_after.expect("the unacked job came back");
    assert!(
        after >= wait && after < wait + Duration::from_secs(1),
        "{after:?}"
    );
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(
        (
            stats.pending,
            stats.in_flight,
            stats.redelivered,
            stats.expired
        ),
        (0, 0, 1, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn in_progress_extends_the_lease() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 1, 1).await;
    // Long enough that an extension stored within a third of it lands
    // before the lease ends also when the whole suite loads the machine
    // (with 600 ms, one flush under load came too late).
    let wait = Duration::from_secs(2);
    let mut holder = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let mut other = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let mut job = next(&mut holder, Duration::from_secs(10)).await;
    // Three times ack_wait, extending every third of it.
    job.in_progress().await.unwrap();
    let until = Instant::now() + 3 * wait;
    while Instant::now() < until {
        assert!(
            timeout(wait / 3, other.recv()).await.is_err(),
            "the job was redelivered while in progress"
        );
        job.in_progress().await.unwrap();
    }
    job.ack().await.unwrap();
    assert!(timeout(2 * wait, other.recv()).await.is_err());
    holder.close().await;
    other.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!((stats.redelivered, stats.expired), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn a_nack_delay_is_honoured() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 1, 1).await;
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    let job = next(&mut queue, Duration::from_secs(10)).await;
    let delay = Duration::from_millis(800);
    let nacked = Instant::now();
    job.nack(delay).await.unwrap();
    let job = next(&mut queue, Duration::from_secs(10)).await;
    let after = nacked.elapsed();
    assert!(
        after >= delay && after < delay + Duration::from_secs(1),
        "{after:?}"
    );
    assert_eq!((job.message.offset, job.delivery_count), (0, 2));
    job.ack().await.unwrap();
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!((stats.redelivered, stats.expired), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn after_max_deliveries_the_message_is_in_the_dead_letter_topic() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 2, 3).await;
    client.create_topic(NewTopic::new("dlq", 1)).await.unwrap();
    let mut queue = client
        .queue("jobs", "q")
        .max_deliveries(2)
        .dead_letter("dlq")
        .join()
        .await
        .unwrap();
    let mut doomed = None;
    let mut acked = 0;
    let mut deliveries = 0;
    while acked < 2 || deliveries < 2 {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        let id = (job.message.partition, job.message.offset);
        if *doomed.get_or_insert(id) == id {
            deliveries += 1;
            assert_eq!(job.delivery_count, deliveries);
            job.nack_with_reason(Duration::ZERO, &format!("boom {deliveries}"))
                .await
                .unwrap();
        } else {
            acked += 1;
            job.ack().await.unwrap();
        }
    }
    let (partition, offset) = doomed.unwrap();
    let dead = timeout(Duration::from_secs(10), async {
        loop {
            let fetched = client.fetch("dlq", 0, 0, 10).await.unwrap();
            if let Some(m) = fetched.messages.into_iter().next() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the dead letter arrives");
    let header = |name: &str| String::from_utf8(dead.headers[name].to_vec()).unwrap();
    assert_eq!(header("pubsub-dlq-topic"), "jobs");
    assert_eq!(header("pubsub-dlq-partition"), partition.to_string());
    assert_eq!(header("pubsub-dlq-offset"), offset.to_string());
    assert_eq!(header("pubsub-dlq-deliveries"), "2");
    assert_eq!(header("pubsub-dlq-reason"), "boom 2");
    assert!(dead.value.starts_with(b"m"));
    assert!(timeout(Duration::from_millis(500), queue.recv())
        .await
        .is_err());
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(
        (
            stats.pending,
            stats.in_flight,
            stats.dead_lettered,
            stats.redelivered
        ),
        (0, 0, 1, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_terminated_job_is_settled_and_never_redelivered() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 1, 2).await;
    let wait = Duration::from_millis(500);
    let mut queue = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let first = next(&mut queue, Duration::from_secs(10)).await;
    first.term().await.unwrap();
    let second = next(&mut queue, Duration::from_secs(10)).await;
    assert_eq!(second.message.offset, 1);
    second.ack().await.unwrap();
    assert!(timeout(3 * wait, queue.recv()).await.is_err());
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(
        (
            stats.pending,
            stats.in_flight,
            stats.terminated,
            stats.redelivered
        ),
        (0, 0, 1, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_lease_over_more_batches_than_one_read_returns_delivers_them_all() {
    let (client, _ns) = client().await;
    client.create_topic(NewTopic::new("jobs", 1)).await.unwrap();
    let producer = client.producer("jobs").build().await.unwrap();
    // One batch per message: each send waits for the one before.
    for i in 0..300 {
        producer.send(Record::new(format!("m{i}"))).await.unwrap();
    }
    producer.close().await.unwrap();
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 300 {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        assert!(
            got.insert(job.message.offset),
            "{} twice",
            job.message.offset
        );
        assert_eq!(job.message.value, format!("m{}", job.message.offset));
        job.ack_nowait().await.unwrap();
    }
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, 0), "{stats:?}");
}

/// A lease whose first read is cut off in a run of corrupt batches reads on
/// past them: the good batches after them were once acked as gaps unread.
/// Malformed keys among them (a suffix, another width naming an offset far
/// ahead) are not trusted with where to read on.
#[tokio::test]
async fn messages_after_a_long_run_of_corrupt_batches_are_delivered() {
    const CORRUPT: u64 = 150;
    const GOOD: u64 = 200;
    let (client, ns) = client().await;
    client.create_topic(NewTopic::new("jobs", 1)).await.unwrap();
    let inc = client.topic("jobs").await.unwrap().incarnation;
    let producer = client.producer("jobs").build().await.unwrap();
    // One batch per message: each send waits for the one before.
    for i in 0..CORRUPT + GOOD {
        producer.send(Record::new(format!("m{i}"))).await.unwrap();
    }
    producer.close().await.unwrap();
    let mut etcd = client.etcd().kv_client();
    let batches = format!("{}data/jobs/{inc}/00000/b/", ns.prefix());
    for offset in 0..CORRUPT {
        for key in [
            format!("{batches}{offset:020}"),
            format!("{batches}{offset:020}/x"),
            format!("{batches}{:021}", offset * 10),
        ] {
            etcd.put(key, "garbage", None).await.unwrap();
        }
    }
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < GOOD as usize {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        assert!(job.message.offset >= CORRUPT, "{job:?}");
        assert!(
            got.insert(job.message.offset),
            "{} twice",
            job.message.offset
        );
        job.ack_nowait().await.unwrap();
    }
    queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_without_waiting_are_stored_by_a_flush_and_never_redelivered() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 1, 10).await;
    let wait = Duration::from_millis(600);
    // No periodic flush within the test: only `flush` stores the acks.
    let mut queue = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .flush_interval(Duration::from_secs(3600))
        .join()
        .await
        .unwrap();
    let mut acked = BTreeSet::new();
    while acked.len() < 10 {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        acked.insert(job.message.offset);
        job.ack_nowait().await.unwrap();
    }
    queue.flush().await.unwrap();
    // Leases unsettled in etcd would expire and come to this worker.
    let mut other = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    assert!(
        timeout(3 * wait, other.recv()).await.is_err(),
        "an acked job came back"
    );
    other.close().await;
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.expired),
        (0, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_workers_on_one_partition_all_get_work_and_settle_each_job() {
    const MESSAGES: usize = 2000;
    let (client, _ns) = client().await;
    client.create_topic(NewTopic::new("jobs", 1)).await.unwrap();
    // A pool of workers waiting for work, then the work.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut queue = client.queue("jobs", "q").join().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let idle = Duration::from_secs(if got.is_empty() { 60 } else { 5 });
                let Ok(Some(job)) = timeout(idle, queue.recv()).await else {
                    break;
                };
                let job = job.unwrap();
                got.push(job.message.offset);
                // A job that takes a moment, so leases overlap.
                tokio::time::sleep(Duration::from_millis(2)).await;
                job.ack().await.unwrap();
            }
            queue.close().await;
            got
        }));
    }
    eprintln!("50 workers joined after {:?}", started.elapsed());
    let producer = client.producer("jobs").build().await.unwrap();
    let mut deliveries = Vec::new();
    for i in 0..MESSAGES {
        deliveries.push(
            producer
                .enqueue(Record::new(format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await.unwrap();
    let mut all = Vec::new();
    let mut counts = Vec::new();
    for task in tasks {
        let got = task.await.unwrap();
        counts.push(got.len());
        all.extend(got);
    }
    let idle = counts.iter().filter(|&&n| n == 0).count();
    counts.sort_unstable();
    eprintln!(
        "jobs per worker {counts:?}, done after {:?}",
        started.elapsed()
    );
    let distinct: HashSet<u64> = all.iter().copied().collect();
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    eprintln!(
        "50 workers: {} deliveries of {} messages, {} duplicates, {stats:?}",
        all.len(),
        distinct.len(),
        all.len() - distinct.len()
    );
    assert_eq!(idle, 0, "every worker received work");
    assert_eq!(distinct.len(), MESSAGES, "every message delivered");
    assert!(
        (all.len() - distinct.len()) as u64 <= stats.expired,
        "duplicates only for expired leases"
    );
    assert_eq!((stats.pending, stats.in_flight), (0, 0), "{stats:?}");
}

/// Not a test on its own: the body of a child worker process. It prints
/// `got P O C` for each job (C: its delivery count) and, unless its mode is
/// `hold` (keep every job unsettled), acks it and prints `acked P O` once
/// the ack is confirmed.
#[test]
fn child_worker() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    // libtest has printed "test child_worker ... " without a newline.
    println!();
    let mut parts = spec.split(',');
    let (ns, topic, queue, mode, wait_ms) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse().unwrap(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = common::ns::connect(ns).await;
        let mut queue = client
            .queue(topic, queue)
            .ack_wait(Duration::from_millis(wait_ms))
            .join()
            .await
            .unwrap();
        let mut held = Vec::new();
        while let Some(job) = queue.recv().await {
            let job = job.unwrap();
            let (p, o) = (job.message.partition, job.message.offset);
            println!("got {p} {o} {}", job.delivery_count);
            if mode == "hold" {
                held.push(job);
            } else if job.ack().await.is_ok() {
                println!("acked {p} {o}");
            }
        }
    });
}

/// A child worker and the lines it prints, read on a thread.
struct ChildWorker {
    child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl ChildWorker {
    fn spawn(ns: &str, topic: &str, mode: &str, ack_wait: Duration) -> ChildWorker {
        let spec = format!("{ns},{topic},q,{mode},{}", ack_wait.as_millis());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildWorker { child, lines }
    }

    fn sigkill(&mut self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.child.wait();
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(partition, offset)` of a `got`/`acked` line.
fn parse(line: &str, prefix: &str) -> Option<(u32, u64)> {
    let mut parts = line.strip_prefix(prefix)?.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_killed_worker_process_is_redelivered_after_ack_wait() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    topic_with(&client, "jobs", 1, 1).await;
    let wait = Duration::from_millis(1500);
    let mut child = ChildWorker::spawn(ns.name(), "jobs", "hold", wait);
    let got = loop {
        let line = child
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the child got the job");
        if let Some(got) = parse(&line, "got ") {
            break got;
        }
    };
    let got_at = Instant::now();
    assert_eq!(got, (0, 0));
    child.sigkill();
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    let job = next(&mut queue, Duration::from_secs(10)).await;
    let after = got_at.elapsed();
    assert_eq!((job.message.offset, job.delivery_count), (0, 2));
    // The child leased before it printed, so its lease ends a little less
    // than ack_wait after `got_at`.
    assert!(
        after >= wait - Duration::from_millis(300) && after < wait + Duration::from_secs(1),
        "{after:?}"
    );
    job.ack().await.unwrap();
    queue.close().await;
}

/// The issue's fault test: eight worker processes, some SIGKILLed and
/// restarted again and again while 20,000 messages are produced. Every
/// message is settled, and duplicates (deliveries beyond the first) are
/// only as many as the offsets whose lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_worker_processes_killed_repeatedly_settle_every_message() {
    const MESSAGES: usize = 20_000;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("jobs", 4)).await.unwrap();
    let wait = Duration::from_millis(1000);
    let mut children: Vec<ChildWorker> = (0..8)
        .map(|_| ChildWorker::spawn(ns.name(), "jobs", "ack", wait))
        .collect();
    let producer = client.producer("jobs").build().await.unwrap();
    let produce = tokio::spawn(async move {
        let mut deliveries = std::collections::VecDeque::new();
        for i in 0..MESSAGES {
            deliveries.push_back(
                producer
                    .enqueue(Record::new(format!("m{i}")))
                    .await
                    .unwrap(),
            );
            if deliveries.len() > 1000 {
                deliveries.pop_front().unwrap().await.unwrap();
            }
            // About 5 s of producing, so that several kills land while
            // messages flow.
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        for d in deliveries {
            d.await.unwrap();
        }
        producer.close().await.unwrap();
    });
    let mut got: HashMap<(u32, u64), u32> = HashMap::new();
    let mut acked: HashSet<(u32, u64)> = HashSet::new();
    let mut kills = 0;
    let drain = |children: &mut Vec<ChildWorker>,
                 got: &mut HashMap<(u32, u64), u32>,
                 acked: &mut HashSet<(u32, u64)>| {
        for child in children.iter() {
            for line in child.lines.try_iter() {
                if let Some(id) = parse(&line, "got ") {
                    *got.entry(id).or_default() += 1;
                } else if let Some(id) = parse(&line, "acked ") {
                    acked.insert(id);
                }
            }
        }
    };
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {} of {MESSAGES} delivered",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        drain(&mut children, &mut got, &mut acked);
        if produce.is_finished() {
            let stats = client.queue_stats("jobs", "q").await.unwrap();
            if stats.pending + stats.in_flight == 0 {
                break;
            }
        } else if started.elapsed() > Duration::from_millis(1200 * (kills + 1)) {
            // Kill one of the first three workers about every 1.2 s while
            // messages are still coming, and start it again.
            let i = kills as usize % 3;
            children[i].sigkill();
            drain(&mut children, &mut got, &mut acked);
            children[i] = ChildWorker::spawn(ns.name(), "jobs", "ack", wait);
            kills += 1;
        }
    }
    produce.await.unwrap();
    drop(children);
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    let deliveries: u64 = got.values().map(|&n| u64::from(n)).sum();
    let duplicates = deliveries - got.len() as u64;
    eprintln!(
        "8 processes, {kills} SIGKILLs: {deliveries} deliveries of {} messages, \
         {duplicates} duplicates, {} acks reported, {stats:?}",
        got.len(),
        acked.len()
    );
    assert!(kills >= 3, "only {kills} kills happened while producing");
    // A killed worker may have acked without printing it, never without
    // printing `got` first: every message must have been delivered.
    assert_eq!(got.len(), MESSAGES, "every message delivered");
    assert!(
        duplicates <= stats.expired,
        "{duplicates} duplicates but only {} expired offsets",
        stats.expired
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_during_acks_loses_no_confirmed_ack() {
    const MESSAGES: usize = 3000;
    let mut cluster = EtcdCluster::start(3);
    let client = Client::builder(cluster.endpoints())
        .namespace("queue-leader-kill")
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_millis(1000))
        .connect()
        .await
        .unwrap();
    topic_with(&client, "jobs", 2, MESSAGES).await;
    let wait = Duration::from_secs(2);
    let mut queue = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let mut confirmed = HashSet::new();
    let mut failed = 0;
    let mut killed = false;
    while let Ok(Some(job)) = timeout(Duration::from_secs(5), queue.recv()).await {
        let Ok(job) = job else { continue };
        let id = (job.message.partition, job.message.offset);
        match job.ack().await {
            Ok(()) => {
                confirmed.insert(id);
            }
            Err(_) => failed += 1,
        }
        if !killed && confirmed.len() >= MESSAGES / 3 {
            let i = leader(&cluster).await;
            cluster.kill(i);
            killed = true;
        }
        if confirmed.len() >= 2 * MESSAGES / 3 {
            break;
        }
    }
    assert!(
        killed && confirmed.len() >= 2 * MESSAGES / 3,
        "{}",
        confirmed.len()
    );
    queue.close().await;
    // A fresh worker gets every message not confirmed (unsettled leases
    // come back after ack_wait), and none that was.
    let mut rest = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let again = ack_all(&mut rest, 2 * wait + Duration::from_secs(2)).await;
    rest.close().await;
    let again: HashSet<(u32, u64)> = again.into_iter().collect();
    eprintln!(
        "leader kill: {} acks confirmed, {failed} failed, {} delivered afterwards",
        confirmed.len(),
        again.len()
    );
    let lost: Vec<_> = confirmed.intersection(&again).collect();
    assert!(lost.is_empty(), "confirmed acks came back: {lost:?}");
    assert_eq!(confirmed.len() + again.len(), MESSAGES);
}

#[tokio::test]
async fn garbage_queue_state_gives_typed_errors_naming_the_key() {
    let (client, ns) = client().await;
    topic_with(&client, "jobs", 1, 5).await;
    let inc = client.topic("jobs").await.unwrap().incarnation;
    let key = format!("{}queues/jobs/q/00000", ns.prefix());
    let lease = |ranges: &str, deliveries: u32| {
        format!(
            r#"{{"worker":"w","id":1,"deadline_ms":1,"deliveries":{deliveries},"ranges":{ranges}}}"#
        )
    };
    let garbage = [
        ("not json".to_string(), "expected"),
        (
            format!(r#"{{"inc":{inc},"next":99}}"#),
            "beyond the partition head",
        ),
        (
            format!(
                r#"{{"inc":{inc},"next":4,"leases":[{}]}}"#,
                lease("[[3,1]]", 1)
            ),
            "empty",
        ),
        (
            format!(
                r#"{{"inc":{inc},"next":4,"leases":[{},{}]}}"#,
                lease("[[0,3]]", 1),
                lease("[[2,4]]", 1)
            ),
            "overlaps",
        ),
        (
            format!(
                r#"{{"inc":{inc},"next":4,"leases":[{}]}}"#,
                lease("[[0,1]]", u32::MAX)
            ),
            "delivery count",
        ),
        (
            format!(
                r#"{{"inc":{inc},"next":4,"pending":[{{"from":0,"to":9,"deliveries":1,"not_before_ms":0}}]}}"#
            ),
            "not below next",
        ),
    ];
    let mut etcd = client.etcd().kv_client();
    for (value, reason) in &garbage {
        etcd.put(key.clone(), value.clone(), None).await.unwrap();
        match client.queue_stats("jobs", "q").await {
            Err(Error::Corrupt { key: k, reason: r }) => {
                assert_eq!(k, key);
                assert!(r.contains(reason), "{r:?} for {value}");
            }
            other => panic!("{other:?} for {value}"),
        }
        let mut queue = client.queue("jobs", "q").join().await.unwrap();
        match timeout(Duration::from_secs(5), queue.recv()).await {
            Ok(Some(Err(Error::Corrupt { key: k, .. }))) => assert_eq!(k, key),
            other => panic!("{other:?} for {value}"),
        }
        queue.close().await;
        let stored = etcd.get(key.clone(), None).await.unwrap();
        assert_eq!(stored.kvs()[0].value(), value.as_bytes(), "left as it was");
    }
    etcd.delete(key.clone(), None).await.unwrap();
    let odd = format!("{}queues/jobs/q/zzz", ns.prefix());
    etcd.put(odd.clone(), "{}", None).await.unwrap();
    match client.queue_stats("jobs", "q").await {
        Err(Error::Corrupt { key: k, .. }) => assert_eq!(k, odd),
        other => panic!("{other:?}"),
    }
    etcd.delete(odd, None).await.unwrap();
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(stats.pending, 5, "{stats:?}");
}

#[tokio::test]
async fn reset_to_latest_settles_what_is_stored_and_list_names_the_queue() {
    let (client, _ns) = client().await;
    topic_with(&client, "jobs", 2, 6).await;
    client
        .reset_queue("jobs", "q", QueueReset::Latest)
        .await
        .unwrap();
    assert_eq!(client.list_queues("jobs").await.unwrap(), ["q"]);
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    assert!(timeout(Duration::from_millis(500), queue.recv())
        .await
        .is_err());
    queue.close().await;
    client
        .reset_queue("jobs", "q", QueueReset::Earliest)
        .await
        .unwrap();
    assert!(client.list_queues("jobs").await.unwrap().is_empty());
    assert_eq!(client.queue_stats("jobs", "q").await.unwrap().pending, 6);
}

#[tokio::test]
async fn retention_keeps_what_a_queue_has_not_settled() {
    let (client, _ns) = client().await;
    client
        .create_topic(NewTopic::new("jobs", 1).retention_messages(5))
        .await
        .unwrap();
    // The queue exists before the messages: it holds all of them.
    client
        .reset_queue("jobs", "q", QueueReset::Latest)
        .await
        .unwrap();
    let producer = client.producer("jobs").build().await.unwrap();
    for i in 0..20 {
        producer.send(Record::new(format!("m{i}"))).await.unwrap();
    }
    producer.close().await.unwrap();
    client.enforce_retention("jobs").await.unwrap();
    let first = |client: Client| async move {
        let fetched = client.fetch("jobs", 0, 0, 1).await.unwrap();
        fetched.messages.first().map(|m| m.offset)
    };
    assert_eq!(first(client.clone()).await, Some(0), "held by the queue");
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    loop {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        if job.message.offset >= 10 {
            break;
        }
        job.ack().await.unwrap();
    }
    queue.close().await;
    client.enforce_retention("jobs").await.unwrap();
    assert_eq!(
        first(client.clone()).await,
        Some(10),
        "trimmed up to the low watermark"
    );
    client.delete_queue("jobs", "q").await.unwrap();
    client.enforce_retention("jobs").await.unwrap();
    assert_eq!(
        first(client.clone()).await,
        Some(15),
        "the topic's own limit"
    );
}

/// A worker that joined before the topic grew gets the new partitions'
/// messages too: it re-reads the partition count every few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_work_from_partitions_added_after_it_joined() {
    let (client, _ns) = client().await;
    client.create_topic(NewTopic::new("jobs", 1)).await.unwrap();
    let mut queue = client.queue("jobs", "q").join().await.unwrap();
    client.alter_topic("jobs", Some(3), |_| {}).await.unwrap();
    let producer = client.producer("jobs").build().await.unwrap();
    for partition in 0..3 {
        producer
            .send(Record::new(format!("p{partition}")).partition(partition))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    let mut partitions = BTreeSet::new();
    while partitions.len() < 3 {
        let job = next(&mut queue, Duration::from_secs(20)).await;
        partitions.insert(job.message.partition);
        job.ack().await.unwrap();
    }
    assert_eq!(partitions, BTreeSet::from([0, 1, 2]));
    queue.close().await;
}

/// A worker keeps the batch its lease read for its next leases, but only
/// while etcd holds that batch unchanged: a message deleted after the first
/// lease read its batch is never delivered by a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_after_its_batch_was_read_is_not_delivered() {
    let (client, _ns) = client().await;
    topic_with(&client, "t", 1, 10).await;
    let mut queue = client.queue("t", "q").max_batch(2).join().await.unwrap();
    let first = next(&mut queue, Duration::from_secs(10)).await;
    assert_eq!(first.message.offset, 0);
    assert!(client.delete_message("t", 0, 7).await.unwrap());
    first.ack().await.unwrap();
    let mut got = BTreeSet::from([0]);
    while got.len() < 9 {
        let job = next(&mut queue, Duration::from_secs(10)).await;
        assert_ne!(job.message.offset, 7, "a deleted message was delivered");
        got.insert(job.message.offset);
        job.ack().await.unwrap();
    }
    assert_eq!(got, BTreeSet::from([0, 1, 2, 3, 4, 5, 6, 8, 9]));
    queue.close().await;
}
