//! Throwaway etcd processes for fault tests (std only).
//!
//! Each [`EtcdCluster`] owns its etcd child processes and a temp dir holding
//! their data dirs and logs; dropping it SIGKILLs and reaps every member and
//! removes the temp dir, also when the test panics. If the test process dies
//! without unwinding (Ctrl-C, abort, SIGKILL), a small `sh` watchdog per
//! cluster kills the members (paused ones too) and removes the dir. Members
//! listen only on 127.0.0.1 ports chosen by the kernel. Needs `etcd` and
//! `etcdctl` on PATH (`scripts/install-deps.sh`).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a member may take to become healthy before we give up.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between health probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Fresh-port attempts when another process grabs a port we picked.
const START_ATTEMPTS: usize = 5;
/// Lines of etcd log included in panic messages.
const LOG_TAIL_LINES: usize = 40;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of members: 1 or 3.
    pub members: usize,
    /// `--quota-backend-bytes`, to provoke "database space exceeded".
    pub quota_backend_bytes: Option<u64>,
    /// Serve clients over TLS and require client certificates.
    pub tls: Option<TlsFiles>,
}

/// PEM files for a TLS cluster: the CA that signed `cert`, and a
/// certificate (for 127.0.0.1, server and client use) with its key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            members: 1,
            quota_backend_bytes: None,
            tls: None,
        }
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// `None` once killed (and reaped). A Mutex (not RefCell) so the cluster
    /// stays `Sync` and can be shared with async tasks.
    child: Mutex<Option<Child>>,
    paused: AtomicBool,
    /// Log size when the current process was spawned: only what it wrote
    /// counts when deciding why it exited.
    log_offset: AtomicU64,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }
}

/// A running single- or three-member etcd cluster on loopback.
pub struct EtcdCluster {
    root: PathBuf,
    watchdog: Option<Child>,
    token: String,
    opts: ClusterOptions,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Start `members` (1 or 3) members and wait until all are healthy.
    /// Panics with the etcd log tail if that takes more than 30 s.
    pub fn start(members: usize) -> EtcdCluster {
        Self::start_with(ClusterOptions {
            members,
            ..ClusterOptions::default()
        })
    }

    pub fn start_with(opts: ClusterOptions) -> EtcdCluster {
        assert!(
            opts.members == 1 || opts.members == 3,
            "EtcdCluster supports 1 or 3 members, not {}",
            opts.members
        );
        for attempt in 1..=START_ATTEMPTS {
            let cluster = Self::new_unstarted(opts.clone());
            // On a panic below, `cluster` is dropped while unwinding, which
            // kills whatever members were already spawned.
            for i in 0..cluster.members.len() {
                cluster.spawn(i, "new");
            }
            match cluster.await_all_healthy() {
                Ok(()) => return cluster,
                // Another process took one of our ports between picking it
                // and etcd binding it: drop (kill, clean up) and try afresh.
                Err(StartError::PortTaken) if attempt < START_ATTEMPTS => continue,
                Err(e) => panic!("{}", cluster.failure_message(&e)),
            }
        }
        unreachable!("loop returns or panics")
    }

    /// Client endpoints, `127.0.0.1:PORT`, one per member in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    /// SIGKILL member `i` and reap it. No-op if it is not running.
    pub fn kill(&mut self, i: usize) {
        let m = &self.members[i];
        if let Some(mut child) = m.child.lock().unwrap().take() {
            // SIGKILL works on a SIGSTOPped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        m.paused.store(false, Ordering::SeqCst);
    }

    /// SIGSTOP member `i`: it stays connected but stops answering.
    pub fn pause(&self, i: usize) {
        let pid = self.running_pid(i, "pause");
        signal(pid, "STOP");
        self.members[i].paused.store(true, Ordering::SeqCst);
    }

    /// SIGCONT member `i` after [`pause`](Self::pause).
    pub fn resume(&self, i: usize) {
        let pid = self.running_pid(i, "resume");
        signal(pid, "CONT");
        self.members[i].paused.store(false, Ordering::SeqCst);
    }

    /// Start member `i` again on its same ports and data dir and wait until
    /// it is healthy. A member that is still running is killed first.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        // The ports are fixed now, so on a bind conflict (e.g. the port was
        // handed out as an ephemeral port meanwhile) wait and retry.
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            self.spawn(i, "existing");
            match self.await_healthy(&[i]) {
                Ok(()) => return,
                Err(StartError::PortTaken) if Instant::now() < deadline => {
                    self.kill(i);
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{}", self.failure_message(&e)),
            }
        }
    }

    /// Wait (up to 30 s) until member `i` answers `etcdctl endpoint health`;
    /// panics with its log tail otherwise.
    pub fn wait_healthy(&self, i: usize) {
        if let Err(e) = self.await_healthy(&[i]) {
            panic!("{}", self.failure_message(&e));
        }
    }

    /// PID of member `i`, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].pid()
    }

    /// Last lines of member `i`'s etcd log, for assertion messages.
    pub fn log_tail(&self, i: usize) -> String {
        tail(&self.members[i].log_path, LOG_TAIL_LINES)
    }

    fn new_unstarted(opts: ClusterOptions) -> EtcdCluster {
        let root = unique_temp_dir();
        let token = format!(
            "pubsub-etcd-test-{}",
            root.file_name().unwrap().to_string_lossy()
        );
        let ports = free_ports(2 * opts.members);
        let members = (0..opts.members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: root.join(format!("m{i}.etcd")),
                log_path: root.join(format!("m{i}.log")),
                child: Mutex::new(None),
                paused: AtomicBool::new(false),
                log_offset: AtomicU64::new(0),
            })
            .collect();
        let watchdog = spawn_watchdog(&root);
        EtcdCluster {
            root,
            watchdog,
            token,
            opts,
            members,
        }
    }

    fn spawn(&self, i: usize, cluster_state: &str) {
        let m = &self.members[i];
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let scheme = if self.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{scheme}://{}", m.endpoint());
        let mut args = vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", m.data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={}", m.peer_url()),
            format!("--initial-advertise-peer-urls={}", m.peer_url()),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-state={cluster_state}"),
            format!("--initial-cluster-token={}", self.token),
        ];
        args.extend(common_flags());
        if let Some(q) = self.opts.quota_backend_bytes {
            args.push(format!("--quota-backend-bytes={q}"));
        }
        if let Some(tls) = &self.opts.tls {
            args.push(format!("--cert-file={}", tls.cert.display()));
            args.push(format!("--key-file={}", tls.key.display()));
            args.push(format!("--trusted-ca-file={}", tls.ca.display()));
            args.push("--client-cert-auth".into());
        }
        if self.members.len() > 1 {
            // Fast failure detection and elections, so fault tests settle
            // in about a second instead of several.
            args.push("--heartbeat-interval=50".into());
            args.push("--election-timeout=500".into());
        }
        // Append, so a restart keeps the earlier run's log for diagnosis.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", m.log_path.display()));
        let offset = log.metadata().map(|md| md.len()).unwrap_or(0);
        m.log_offset.store(offset, Ordering::SeqCst);
        let log2 = log.try_clone().expect("clone log file handle");
        let mut cmd = Command::new("etcd");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        clean_env(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run `etcd` ({e}); install it with scripts/install-deps.sh")
        });
        // For the watchdog: which PIDs to kill if this test process dies.
        let _ = fs::write(
            self.root.join(format!("{}.pid", m.name)),
            child.id().to_string(),
        );
        *m.child.lock().unwrap() = Some(child);
        m.paused.store(false, Ordering::SeqCst);
    }

    fn await_all_healthy(&self) -> Result<(), StartError> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.await_healthy(&all)
    }

    /// Poll `etcdctl endpoint health` for each of `which` until all pass,
    /// a member exits, or the timeout passes.
    fn await_healthy(&self, which: &[usize]) -> Result<(), StartError> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let mut pending: Vec<usize> = which.to_vec();
        loop {
            for &i in which {
                if let Some(status) = self.exit_status(i) {
                    let m = &self.members[i];
                    let log = read_from(&m.log_path, m.log_offset.load(Ordering::SeqCst));
                    return Err(if log.contains("address already in use") {
                        StartError::PortTaken
                    } else {
                        StartError::Exited(i, status)
                    });
                }
            }
            pending.retain(|&i| !endpoint_healthy(&self.members[i].endpoint(), &self.opts.tls));
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout(pending));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `Some(status)` if member `i` has exited (or was never started).
    fn exit_status(&self, i: usize) -> Option<String> {
        let mut guard = self.members[i].child.lock().unwrap();
        match guard.as_mut() {
            None => Some("not running".into()),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
        }
    }

    fn running_pid(&self, i: usize, what: &str) -> u32 {
        self.members[i]
            .pid()
            .unwrap_or_else(|| panic!("cannot {what} etcd member {i}: it is not running"))
    }

    fn failure_message(&self, e: &StartError) -> String {
        let what = match e {
            StartError::PortTaken => "could not bind its ports".to_string(),
            StartError::Exited(i, status) => format!("member {i} exited ({status})"),
            StartError::Timeout(pending) => format!(
                "member(s) {pending:?} not healthy within {}s",
                HEALTH_TIMEOUT.as_secs()
            ),
        };
        let mut msg = format!(
            "etcd test cluster at {:?}: {what}",
            self.endpoints().join(",")
        );
        for (i, m) in self.members.iter().enumerate() {
            msg.push_str(&format!(
                "\n--- member {i} log tail ({}) ---\n{}",
                m.log_path.display(),
                self.log_tail(i)
            ));
        }
        msg
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &self.members {
            let child = match m.child.lock() {
                Ok(mut g) => g.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            if let Some(mut child) = child {
                if m.paused.load(Ordering::SeqCst) {
                    signal(child.id(), "CONT");
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if std::env::var_os("PUBSUB_ETCD_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping etcd test dir {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

#[derive(Debug)]
enum StartError {
    PortTaken,
    Exited(usize, String),
    Timeout(Vec<usize>),
}

/// Watches the test process (`$1`) and, once it is gone without having
/// dropped the cluster, SIGKILLs every member listed in `$2/*.pid` whose
/// command line still names `$2` (so a recycled PID is never hit), then
/// removes `$2`. Ignores SIGINT/SIGTERM/SIGHUP so that a Ctrl-C, which
/// reaches the whole process group, does not take it down with the test.
const WATCHDOG_SCRIPT: &str = r#"
trap '' INT TERM HUP
parent=$1 root=$2
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
for f in "$root"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in
        *"$root"*) kill -KILL "$pid" 2>/dev/null ;;
    esac
done
rm -rf "$root"
"#;

fn spawn_watchdog(root: &Path) -> Option<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("etcd-test-watchdog")
        .arg(std::process::id().to_string())
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// The flags the scripts give every etcd too (scripts/lib/etcd-flags).
fn common_flags() -> impl Iterator<Item = String> {
    include_str!("../../../../scripts/lib/etcd-flags")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
}

/// Runs etcdctl against `endpoint` with `args` (later flags override the
/// defaults given here) and returns what it printed.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=1s", "--command-timeout=10s"])
        .args(args)
        .stdin(Stdio::null());
    clean_env(&mut cmd);
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `etcdctl` ({e}); install it with scripts/install-deps.sh")
    })
}

/// [`etcdctl`], failing the test with etcdctl's error output unless it
/// succeeded.
pub fn etcdctl_ok(endpoint: &str, args: &[&str]) -> Output {
    let output = etcdctl(endpoint, args);
    assert!(
        output.status.success(),
        "etcdctl {args:?} at {endpoint}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// etcd and etcdctl read `ETCD_*` / `ETCDCTL_*` variables as configuration;
/// the caller's (e.g. `ETCD_PORT` from scripts/test.sh) must not leak in.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ETCD_") || k.starts_with("ETCDCTL_") {
            cmd.env_remove(&key);
        }
    }
}

fn endpoint_healthy(endpoint: &str, tls: &Option<TlsFiles>) -> bool {
    let mut cmd = Command::new("etcdctl");
    if let Some(tls) = tls {
        cmd.arg(format!("--cacert={}", tls.ca.display()))
            .arg(format!("--cert={}", tls.cert.display()))
            .arg(format!("--key={}", tls.key.display()));
    }
    cmd.args([
        &format!("--endpoints={endpoint}"),
        "--dial-timeout=1s",
        "--command-timeout=1s",
        "endpoint",
        "health",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    clean_env(&mut cmd);
    match cmd.status() {
        Ok(status) => status.success(),
        Err(e) => panic!("cannot run `etcdctl` ({e}); install it with scripts/install-deps.sh"),
    }
}

/// Send a signal by name through the shell's `kill` builtin: no libc crate,
/// and unlike /bin/kill (procps) `sh` exists on every Debian install.
fn signal(pid: u32, sig: &str) {
    let status = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", sig, &pid.to_string()])
        .status()
        .expect("run sh to send a signal");
    assert!(status.success(), "kill -s {sig} {pid} failed");
}

/// `n` distinct free loopback ports: all listeners are held until every
/// port is chosen, so the kernel cannot hand out the same one twice.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn unique_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "pubsub-etcd-test-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The file's contents from byte `offset` on (empty if unreadable).
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of a (possibly large) log file; reads at most 64 KiB.
fn tail(path: &Path, n: usize) -> String {
    let len = fs::metadata(path).map(|md| md.len()).unwrap_or(0);
    let text = read_from(path, len.saturating_sub(64 * 1024));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
