//! Consumer groups under faults: a member killed with SIGKILL, a member
//! frozen with SIGSTOP past its lease, and etcd compaction during catch-up.
//! The member that dies or freezes is this test binary re-executed as a
//! child process (`child_member`), so its death is real.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use common::etcd_proc::EtcdCluster;
use common::group::{member, send_all, within, TTL};
use common::ns::Namespace;
use pubsub_etcd::{AutoCommit, Client, Consumer, Event, NewTopic, Producer, Record, StartOffset};
use tokio::time::{timeout, Instant};

const CHILD_ENV: &str = "PUBSUB_TEST_CHILD_MEMBER";

/// Not a test on its own: the body of a child member process. It prints
/// one line per event (`owned 0,1`, `msg P O`, `lost 0,1`, `commit-refused P`)
/// and, every 100 ms, re-commits the last message it got, so a commit made
/// after a freeze is observable. In `stale` mode it instead keeps the first
/// message it got, and once it owns partitions again after losing them,
/// commits that message's offset with `commit_offsets` (as the CLI does)
/// and prints `stale-commit ok` or `stale-commit refused <error>`. In `all`
/// mode it commits each message once as it comes and keeps the last one of
/// every partition; when it wakes from a pause longer than the TTL (a
/// SIGSTOP) it commits each of them again and prints `commit-ok P` or
/// `commit-refused P` per partition.
#[test]
fn child_member() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    // libtest has printed "test child_member ... " without a newline.
    println!();
    let mut parts = spec.split(',');
    let (ns, topic, group) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mode = parts.next();
    let (stale, all) = (mode == Some("stale"), mode == Some("all"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = pubsub_etcd::Client::builder(common::ns::endpoints())
            .namespace(ns)
            .connect()
            .await
            .unwrap();
        let mut consumer = client
            .consumer(topic, group)
            .session_ttl(TTL)
            .auto_commit(AutoCommit::Disabled)
            .join()
            .await
            .unwrap();
        let mut last: Option<pubsub_etcd::Message> = None;
        let mut owned = Vec::new();
        let mut lost = false;
        let mut held = std::collections::BTreeMap::new();
        let mut awake = Instant::now();
        loop {
            let paused = awake.elapsed() > TTL;
            awake = Instant::now();
            if let Ok(Some(event)) =
                timeout(Duration::from_millis(100), consumer.next_event()).await
            {
                match event {
                    Ok(Event::Message(m)) => {
                        println!("msg {} {}", m.partition, m.offset);
                        if all {
                            if let Err(e) = consumer.commit(&m).await {
                                println!("error {e}");
                            }
                            held.insert(m.partition, m);
                        } else if !stale || last.is_none() {
                            last = Some(m);
                        }
                    }
                    Ok(Event::Lost(ps)) => {
                        println!("lost {}", join(&ps));
                        lost = true;
                    }
                    Ok(_) => {}
                    Err(e) => println!("error {e}"),
                }
            }
            if stale {
                if let Some(m) = last
                    .as_ref()
                    .filter(|_| lost && !consumer.assignment().is_empty())
                {
                    let offsets = std::collections::BTreeMap::from([(m.partition, m.offset + 1)]);
                    match consumer.commit_offsets(&offsets).await {
                        Ok(()) => println!("stale-commit ok"),
                        Err(e) => println!("stale-commit refused {e}"),
                    }
                    last = None;
                }
            } else if all {
                if paused {
                    for (partition, m) in std::mem::take(&mut held) {
                        match consumer.commit(&m).await {
                            Ok(()) => println!("commit-ok {partition}"),
                            Err(pubsub_etcd::Error::NotOwner { .. }) => {
                                println!("commit-refused {partition}")
                            }
                            Err(e) => println!("error {e}"),
                        }
                    }
                }
            } else if let Some(m) = &last {
                match consumer.commit(m).await {
                    Ok(()) => {}
                    Err(pubsub_etcd::Error::NotOwner { partition, .. }) => {
                        println!("commit-refused {partition}");
                        last = None;
                    }
                    Err(e) => println!("error {e}"),
                }
            }
            if consumer.assignment() != owned {
                owned = consumer.assignment();
                println!("owned {}", join(&owned));
            }
        }
    });
}

fn join(ps: &[u32]) -> String {
    ps.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// A child member and the lines it prints, read on a thread.
struct ChildMember {
    child: Child,
    lines: std_mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildMember {
    fn spawn(ns: &str, topic: &str, group: &str) -> ChildMember {
        Self::spawn_with(ns, topic, group, "")
    }

    /// A child member in a `mode` (see `child_member`).
    fn spawn_with(ns: &str, topic: &str, group: &str, mode: &str) -> ChildMember {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_member", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{ns},{topic},{group},{mode}"))
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
        ChildMember {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Takes the lines printed so far.
    fn drain(&mut self) -> Vec<String> {
        let fresh: Vec<String> = self.lines.try_iter().collect();
        self.seen.extend(fresh.iter().cloned());
        fresh
    }

    fn owned(&self) -> Vec<u32> {
        self.seen
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("owned "))
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for ChildMember {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the local member for a while, committing what it receives.
async fn poll(consumer: &mut Consumer, seen: &mut Vec<(u32, u64)>, for_: Duration) {
    let until = Instant::now() + for_;
    while Instant::now() < until {
        if let Ok(Some(Ok(Event::Message(m)))) =
            timeout(Duration::from_millis(20), consumer.next_event()).await
        {
            seen.push((m.partition, m.offset));
            consumer.commit(&m).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_partitions_are_taken_over_within_ttl() {
    // Many partitions, so claims and releases go in batches.
    const PARTITIONS: u32 = 64;
    const PER_PARTITION: u64 = 10;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", PARTITIONS))
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..PARTITIONS).flat_map(|p| {
            (0..PER_PARTITION).map(move |i| Record::new(format!("{p}-{i}")).partition(p))
        }),
    )
    .await;
    let half = PARTITIONS as usize / 2;
    let mut local = member(&client, "t", "g").await;
    let mut child = ChildMember::spawn(ns.name(), "t", "g");
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while !(child.owned().len() == half && local.assignment().len() == half) {
        assert!(
            Instant::now() < until,
            "never balanced {half}/{half}: child {:?} local {:?}",
            child.owned(),
            local.assignment()
        );
        poll(&mut local, &mut seen, Duration::from_millis(100)).await;
        child.drain();
    }
    // Let the child consume some of its partitions, then kill it hard.
    poll(&mut local, &mut seen, Duration::from_millis(500)).await;
    child.drain();
    child.child.kill().unwrap();
    child.child.wait().unwrap();
    let killed = Instant::now();
    while local.assignment().len() < PARTITIONS as usize {
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        assert!(
            killed.elapsed() < TTL + Duration::from_secs(2),
            "takeover took over TTL + 2 s"
        );
    }
    let takeover = killed.elapsed();
    // Until the local member has read (and committed) every partition to
    // its end; committing each message takes a while on a loaded machine.
    let until = Instant::now() + Duration::from_secs(30);
    while client
        .committed_offsets("t", "g")
        .await
        .unwrap()
        .values()
        .filter(|&&o| o == PER_PARTITION)
        .count()
        < PARTITIONS as usize
    {
        assert!(
            Instant::now() < until,
            "the local member never read everything"
        );
        poll(&mut local, &mut seen, Duration::from_millis(200)).await;
    }
    // What the child printed just before it died is still in the pipe.
    child.drain();
    // Nothing lost: every message went to one of the two (the child's
    // uncommitted tail may come twice: at-least-once).
    let mut delivered: HashSet<(u32, u64)> = seen.iter().copied().collect();
    for line in &child.seen {
        // A line cut short by the kill is simply not counted.
        let mut fields = line
            .strip_prefix("msg ")
            .into_iter()
            .flat_map(|r| r.split(' '));
        if let (Some(Ok(p)), Some(Ok(o))) =
            (fields.next().map(str::parse), fields.next().map(str::parse))
        {
            delivered.insert((p, o));
        }
    }
    let description = client.describe_topic("t").await.unwrap();
    let expected: HashSet<(u32, u64)> = description
        .partitions
        .iter()
        .flat_map(|p| (0..p.next).map(move |o| (p.partition, o)))
        .collect();
    assert_eq!(expected.len() as u64, u64::from(PARTITIONS) * PER_PARTITION);
    assert!(
        expected.is_subset(&delivered),
        "lost: {:?}",
        expected.difference(&delivered).take(5).collect::<Vec<_>>()
    );
    eprintln!("takeover after SIGKILL: {takeover:?} (TTL {TTL:?})");
    local.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_member_loses_partitions_and_its_commits_are_refused() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut local = member(&client, "t", "g").await;
    let mut child = ChildMember::spawn(ns.name(), "t", "g");
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while !(child.owned().len() == 1 && local.assignment().len() == 1) {
        assert!(
            Instant::now() < until,
            "never balanced 1/1: child {:?} local {:?} lines {:?}",
            child.owned(),
            local.assignment(),
            child.seen
        );
        poll(&mut local, &mut seen, Duration::from_millis(100)).await;
        child.drain();
    }
    let theirs = child.owned()[0];
    // Give the child a message to hold and keep re-committing.
    producer
        .send(Record::new("x").partition(theirs))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !child.seen.iter().any(|l| l.starts_with("msg ")) {
        assert!(Instant::now() < until, "child got no message");
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        child.drain();
    }
    child.signal("-STOP");
    // Past the TTL, the local member takes the frozen member's partition.
    let frozen = Instant::now();
    while local.assignment().len() < 2 {
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        assert!(
            frozen.elapsed() < TTL + Duration::from_secs(3),
            "no takeover from frozen member"
        );
    }
    // Produced while the child is frozen: only the local member may get them.
    send_all(
        &producer,
        (0..20).map(|i| Record::new(format!("{i}")).partition(theirs)),
    )
    .await;
    poll(&mut local, &mut seen, Duration::from_millis(500)).await;
    // The takeover can come before a whole TTL has passed (the lease was
    // last renewed before the freeze), and the child only re-commits after
    // a pause longer than the TTL.
    while frozen.elapsed() < TTL + Duration::from_millis(500) {
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
    }
    child.drain();
    let before_resume = child.seen.len();
    child.signal("-CONT");
    let resumed = Instant::now();
    while !child.seen[before_resume..]
        .iter()
        .any(|l| l.starts_with("commit-refused"))
    {
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "child's commit was not refused: {:?}",
            &child.seen[before_resume..]
        );
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        child.drain();
    }
    poll(&mut local, &mut seen, Duration::from_millis(500)).await;
    child.drain();
    let after: Vec<&String> = child.seen[before_resume..].iter().collect();
    // The child delivered nothing of the partition it lost while frozen
    // (until it might own it again under a new claim, after "lost").
    let lost_at = after
        .iter()
        .position(|l| l.starts_with("lost"))
        .unwrap_or(after.len());
    let delivered_while_stale: Vec<_> = after[..lost_at]
        .iter()
        .filter(|l| l.starts_with(&format!("msg {theirs} ")))
        .collect();
    assert!(
        delivered_while_stale.is_empty(),
        "delivered after losing the partition: {delivered_while_stale:?}"
    );
    let got: BTreeSet<u64> = seen
        .iter()
        .filter(|(p, _)| *p == theirs)
        .map(|(_, o)| *o)
        .collect();
    assert!(
        (1..21).all(|o| got.contains(&o)),
        "local member missed messages: {got:?}"
    );
    local.close().await.unwrap();
}

/// Issue 17: a member owns many partitions, claimed in batches; it hands
/// half of them to a second member (a batched release), then freezes past
/// its lease. The second member claims the rest (again in batches) and
/// commits everything; the frozen one wakes up and tries to commit every
/// partition it ever held. Every one of those commits is refused, released
/// and expired partitions alike, and no committed offset moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_of_many_partitions_commits_none_of_them() {
    const PARTITIONS: u32 = 96;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", PARTITIONS))
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut child = ChildMember::spawn_with(ns.name(), "t", "g", "all");
    let until = Instant::now() + Duration::from_secs(20);
    while child.owned().len() != PARTITIONS as usize {
        assert!(
            Instant::now() < until,
            "child never owned everything: {:?}",
            child.owned()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        child.drain();
    }
    let one_each = || (0..PARTITIONS).map(|p| Record::new(format!("{p}")).partition(p));
    send_all(&producer, one_each()).await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let got: BTreeSet<&str> = child
            .seen
            .iter()
            .filter_map(|l| l.strip_prefix("msg "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        if got.len() == PARTITIONS as usize {
            break;
        }
        assert!(Instant::now() < until, "child got {} partitions", got.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
        child.drain();
    }
    let mut local = member(&client, "t", "g").await;
    let mut seen = Vec::new();
    let half = PARTITIONS as usize / 2;
    let until = Instant::now() + Duration::from_secs(20);
    while !(local.assignment().len() == half && child.owned().len() == half) {
        assert!(
            Instant::now() < until,
            "never balanced: child {:?} local {:?}",
            child.owned(),
            local.assignment()
        );
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        child.drain();
    }
    assert!(seen.is_empty(), "the child's commits were lost: {seen:?}");
    child.signal("-STOP");
    let frozen = Instant::now();
    while local.assignment().len() < PARTITIONS as usize {
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
        assert!(
            frozen.elapsed() < TTL + Duration::from_secs(10),
            "no takeover from the frozen member: {} partitions",
            local.assignment().len()
        );
    }
    send_all(&producer, one_each()).await;
    let until = Instant::now() + Duration::from_secs(20);
    while seen.iter().filter(|(_, o)| *o == 1).count() < PARTITIONS as usize {
        assert!(Instant::now() < until, "local member missed messages");
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
    }
    let committed = client.committed_offsets("t", "g").await.unwrap();
    assert_eq!(
        committed,
        (0..PARTITIONS).map(|p| (p, 2)).collect(),
        "the local member committed everything"
    );
    // The takeover can come before a whole TTL has passed (the lease was
    // last renewed before the freeze), and the child only re-commits after
    // a pause longer than the TTL.
    while frozen.elapsed() < TTL + Duration::from_millis(500) {
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
    }
    child.drain();
    let before_resume = child.seen.len();
    child.signal("-CONT");
    let resumed = Instant::now();
    loop {
        child.drain();
        let after = &child.seen[before_resume..];
        let accepted: Vec<&String> = after
            .iter()
            .filter(|l| l.starts_with("commit-ok"))
            .collect();
        assert!(accepted.is_empty(), "stale commits accepted: {accepted:?}");
        let refused: BTreeSet<&str> = after
            .iter()
            .filter_map(|l| l.strip_prefix("commit-refused "))
            .collect();
        if refused.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(15),
            "only {} of {PARTITIONS} stale commits were refused: {after:?}",
            refused.len()
        );
        poll(&mut local, &mut seen, Duration::from_millis(50)).await;
    }
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        committed,
        "a stale commit moved an offset"
    );
    local.close().await.unwrap();
}

/// Issue 8, item 1: a member frozen past its lease loses its partition to
/// another member, which reads on and commits, then leaves; the frozen one
/// wakes up, claims the partition again and commits the offset of a message
/// it read under its old claim. That commit must be refused: the group's
/// offset stays where the other member left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_commit_after_claiming_again_never_moves_the_offset_back() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..100).map(|i| Record::new(format!("{i}")))).await;
    let mut child = ChildMember::spawn_with(ns.name(), "t", "g", "stale");
    let until = Instant::now() + Duration::from_secs(20);
    while !child.seen.iter().any(|l| l.starts_with("msg ")) {
        assert!(
            Instant::now() < until,
            "child got no message: {:?}",
            child.seen
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        child.drain();
    }
    child.signal("-STOP");
    let mut local = member(&client, "t", "g").await;
    let mut last = None;
    let until = Instant::now() + TTL + Duration::from_secs(10);
    while last
        .as_ref()
        .is_none_or(|m: &pubsub_etcd::Message| m.offset < 99)
    {
        assert!(Instant::now() < until, "no takeover from the frozen member");
        if let Ok(Some(Ok(Event::Message(m)))) =
            timeout(Duration::from_millis(50), local.next_event()).await
        {
            last = Some(m);
        }
    }
    local.commit(last.as_ref().unwrap()).await.unwrap();
    local.close().await.unwrap();
    child.signal("-CONT");
    // Generous: on a loaded machine the rejoin can wait out request timeouts.
    let until = Instant::now() + Duration::from_secs(40);
    let outcome = loop {
        child.drain();
        if let Some(line) = child.seen.iter().find(|l| l.starts_with("stale-commit")) {
            break line.clone();
        }
        assert!(
            Instant::now() < until,
            "the child never claimed again: {:?}",
            child.seen
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(outcome.starts_with("stale-commit refused"), "{outcome}");
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        std::collections::BTreeMap::from([(0, 100)]),
        "the committed offset moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_during_catch_up_loses_nothing() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    // Many small batches: many keys and revisions.
    let producer = client
        .producer("t")
        .max_batch_records(10)
        .build()
        .await
        .unwrap();
    send_all(&producer, (0..3000).map(|i| Record::new(format!("{i}")))).await;
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(TTL)
        .fetch_messages(50)
        .buffer(16)
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let mut offsets = Vec::new();
    while offsets.len() < 1000 {
        let m = within(Duration::from_secs(10), consumer.recv()).await;
        offsets.push(m.offset);
    }
    let mut etcd = client.etcd().clone();
    let revision = etcd
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // Another test (or an operator) may have compacted further already.
    if let Err(e) = etcd.compact(revision, None).await {
        assert!(
            e.to_string().contains("compacted"),
            "compaction failed: {e}"
        );
    }
    send_all(&producer, (3000..4000).map(|i| Record::new(format!("{i}")))).await;
    while offsets.len() < 4000 {
        let m = within(Duration::from_secs(10), consumer.recv()).await;
        offsets.push(m.offset);
    }
    assert_eq!(offsets, (0..4000).collect::<Vec<u64>>());
    consumer.close().await.unwrap();
}

/// Issue 8, item 3: a lone member whose application does not take messages
/// while many arrive. Its readers stop reading their watches, and the
/// unread watch data (over 5 MiB here) fills the HTTP/2 connection's
/// flow-control window. Nothing on that connection gets an answer any
/// more, so a lease kept alive on it expires and the member loses its
/// partitions. The member must keep its lease however much is unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_messages_never_starve_the_lease() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 4)).await.unwrap();
    let mut consumer = member(&client, "t", "g").await;
    let event = within(Duration::from_secs(10), consumer.next_event()).await;
    assert_eq!(event, Event::Assigned(vec![0, 1, 2, 3]));
    // Produced on a connection of its own, after the readers are watching.
    let producing = ns.connect().await;
    let producer = producing.producer("t").build().await.unwrap();
    let value = "v".repeat(190);
    for chunk in 0..6 {
        send_all(
            &producer,
            (0..10_000u32).map(|i| Record::new(value.clone()).partition((chunk * 10_000 + i) % 4)),
        )
        .await;
    }
    // The application takes nothing for three lease lifetimes.
    let members = format!("{}/groups/t/g/members/", ns.name());
    let mut watcher = producing.etcd().clone();
    let lease = |response: &etcd_client::GetResponse| response.kvs().first().map(|kv| kv.lease());
    let options = || Some(etcd_client::GetOptions::new().with_prefix());
    let first = lease(&watcher.get(members.clone(), options()).await.unwrap());
    assert!(first.is_some());
    let until = Instant::now() + 3 * TTL;
    while Instant::now() < until {
        let now = lease(&watcher.get(members.clone(), options()).await.unwrap());
        assert_eq!(
            now, first,
            "the member's lease was lost while messages sat unread"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then everything arrives, once, with no loss of ownership.
    let mut seen = [0u64; 4];
    while seen.iter().sum::<u64>() < 60_000 {
        match within(Duration::from_secs(20), consumer.next_event()).await {
            Event::Message(m) => {
                assert_eq!(
                    m.offset, seen[m.partition as usize],
                    "partition {}",
                    m.partition
                );
                seen[m.partition as usize] += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    consumer.close().await.unwrap();
}

/// The next event within `guard`, if any; panics on an error.
async fn next(consumer: &mut Consumer, guard: Duration) -> Option<Event> {
    timeout(guard, consumer.next_event())
        .await
        .ok()
        .flatten()
        .map(Result::unwrap)
}

/// Issue 11, item 5: a member tells the application when etcd stops
/// answering, within the request timeout (plus the watchdog's tick), and
/// again when it answers. With a 10 s TTL the lease renewals come every
/// 3.3 s, further apart than the 2 s timeout: a healthy etcd must not look
/// gone between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_reported_and_so_is_its_return() {
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    let cluster = common::etcd_proc::EtcdCluster::start(1);
    let client = pubsub_etcd::Client::builder(cluster.endpoints())
        .namespace("outage")
        .request_timeout(REQUEST_TIMEOUT)
        .connect()
        .await
        .unwrap();
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(Duration::from_secs(10))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let healthy = Instant::now() + Duration::from_secs(8);
    while Instant::now() < healthy {
        if let Some(event) = next(&mut consumer, Duration::from_millis(200)).await {
            assert!(
                !matches!(event, Event::Disconnected { .. }),
                "a healthy etcd was reported gone"
            );
        }
    }
    cluster.pause(0);
    let paused = Instant::now();
    let paused_at = std::time::SystemTime::now();
    let since = loop {
        let left = (REQUEST_TIMEOUT + Duration::from_secs(2)).saturating_sub(paused.elapsed());
        match next(&mut consumer, left).await {
            Some(Event::Disconnected { since }) => break since,
            Some(_) => {}
            None => panic!("no Disconnected within {:?}", paused.elapsed()),
        }
    };
    let reported = paused.elapsed();
    eprintln!("etcd paused: Disconnected after {reported:?}");
    assert!(
        since <= paused_at + Duration::from_millis(100),
        "Disconnected since {since:?}, after the pause at {paused_at:?}"
    );
    cluster.resume(0);
    let resumed = Instant::now();
    loop {
        match next(
            &mut consumer,
            Duration::from_secs(20).saturating_sub(resumed.elapsed()),
        )
        .await
        {
            Some(Event::Reconnected) => break,
            Some(Event::Disconnected { .. }) => panic!("Disconnected twice"),
            Some(_) => {}
            None => panic!("no Reconnected within 20 s of the resume"),
        }
    }
    eprintln!("etcd resumed: Reconnected after {:?}", resumed.elapsed());
    consumer.close().await.unwrap();
}

/// A one-member etcd for this test alone, with topic `t` of `partitions`
/// and a producer for it.
async fn etcd_of_its_own(partitions: u32) -> (EtcdCluster, Client, Producer) {
    let cluster = EtcdCluster::start(1);
    let client = Client::builder(cluster.endpoints())
        .namespace("own-etcd")
        .connect()
        .await
        .unwrap();
    client
        .create_topic(NewTopic::new("t", partitions))
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    (cluster, client, producer)
}

/// A gauge from etcd's `/metrics` (plain HTTP on the client port).
fn etcd_gauge(endpoint: &str, name: &str) -> i64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("etcd reports no {name}")) as i64
}

/// Issue 17: a member's readers share one watch stream however many
/// partitions it follows, and a partition handed to another member has its
/// watch cancelled in etcd, not left behind. On an etcd of its own, so the
/// gauges count this test's watches only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_one_watch_stream_and_cancel_the_watches_they_give_up() {
    const PARTITIONS: u32 = 64;
    let (cluster, client, producer) = etcd_of_its_own(PARTITIONS).await;
    let endpoint = cluster.endpoint(0);
    send_all(
        &producer,
        (0..PARTITIONS).map(|p| Record::new("x").partition(p)),
    )
    .await;
    let watchers = || etcd_gauge(&endpoint, "etcd_debugging_mvcc_watcher_total");
    let mut first = member(&client, "t", "g").await;
    for _ in 0..PARTITIONS {
        within(Duration::from_secs(10), first.recv()).await;
    }
    // Each reader watches once it has caught up; wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while watchers() < i64::from(PARTITIONS) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alone = watchers();
    assert!(
        alone >= i64::from(PARTITIONS),
        "{alone} watchers for {PARTITIONS} partitions"
    );
    let streams = etcd_gauge(&endpoint, "etcd_debugging_mvcc_watch_stream_total");
    assert!(streams <= 4, "{streams} watch streams for one member");

    // A second member takes half the partitions: the watches on them move
    // with them, and only its own group and topic watches are added.
    let mut second = member(&client, "t", "g").await;
    // The second member has its half once it has read the message of each
    // (nothing is committed); events are answered by polling both.
    let mut taken = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while taken < PARTITIONS / 2 && Instant::now() < deadline {
        let _ = timeout(Duration::from_millis(20), first.next_event()).await;
        if let Ok(Some(Ok(Event::Message(_)))) =
            timeout(Duration::from_millis(20), second.next_event()).await
        {
            taken += 1;
        }
    }
    assert_eq!(taken, PARTITIONS / 2, "messages the second member read");
    let expected = alone + (alone - i64::from(PARTITIONS));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = watchers();
    while now != expected && Instant::now() < deadline {
        let _ = timeout(Duration::from_millis(20), first.next_event()).await;
        let _ = timeout(Duration::from_millis(20), second.next_event()).await;
        now = watchers();
    }
    assert_eq!(
        now, expected,
        "watchers after the rebalance (one member: {alone})"
    );
    second.close().await.unwrap();
    first.close().await.unwrap();
}

/// Issue 17: when the shared watch stream breaks (etcd restarted), every
/// partition's reader reads again and watches on a new stream, so messages
/// written after the restart reach the member on every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_resumes_after_the_shared_watch_stream_breaks() {
    const PARTITIONS: u32 = 16;
    let (mut cluster, client, producer) = etcd_of_its_own(PARTITIONS).await;
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(Duration::from_secs(30))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    send_all(
        &producer,
        (0..PARTITIONS).map(|p| Record::new("before").partition(p)),
    )
    .await;
    let mut seen = HashSet::new();
    while seen.len() < PARTITIONS as usize {
        let m = within(Duration::from_secs(10), consumer.recv()).await;
        seen.insert(m.partition);
    }
    cluster.restart(0);
    send_all(
        &producer,
        (0..PARTITIONS).map(|p| Record::new("after").partition(p)),
    )
    .await;
    let mut after = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while after.len() < PARTITIONS as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = within(left, consumer.recv()).await;
        if m.offset == 1 {
            after.insert(m.partition);
        }
    }
    assert_eq!(after, (0..PARTITIONS).collect::<BTreeSet<u32>>());
    consumer.close().await.unwrap();
}

/// Issue 17: the catch-up reads of many partitions go to etcd as one
/// transaction, and so do the bounds `assign` resolves start offsets from
/// (each reads a partition's first batch). A client that cannot take such
/// an answer (here each partition holds 450 KB and the client accepts
/// 600 KB per response: one read fits, two do not) still gets every read,
/// one by one, and no reader reports an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_too_large_as_one_transaction_are_made_one_by_one() {
    const PARTITIONS: u32 = 32;
    let (cluster, _, producer) = etcd_of_its_own(PARTITIONS).await;
    let value = vec![b'x'; 150_000];
    send_all(
        &producer,
        (0..3).flat_map(|_| (0..PARTITIONS).map(|p| Record::new(value.clone()).partition(p))),
    )
    .await;
    let client = Client::builder(cluster.endpoints())
        .namespace("own-etcd")
        .max_response_bytes(600_000)
        .connect()
        .await
        .unwrap();
    let mut reader = client
        .assign("t", (0..PARTITIONS).map(|p| (p, StartOffset::Earliest)))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < 3 * PARTITIONS as usize {
        let m = within(Duration::from_secs(10), reader.recv()).await;
        seen.insert((m.partition, m.offset));
    }
    let all: BTreeSet<(u32, u64)> = (0..PARTITIONS)
        .flat_map(|p| (0..3).map(move |o| (p, o)))
        .collect();
    assert_eq!(seen, all);
    reader.close().await;
}
