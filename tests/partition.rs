//! A partitioned worker: two `rota-worker`s on separate "hosts" (network namespaces, each
//! joined to this one by a veth pair with addresses made for the test), one cut off mid-job.
//! Its lease expires, the other host's worker finishes the job, and when the link comes back
//! the cut-off worker's late result is rejected as stale and changes nothing.
//!
//! Needs root and `ip` (iproute2): without them it fails and says why. Namespaces and veths
//! get names unique to the test run and are deleted on drop, also when the test panics.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use rota::proto::{Job, JobState, RetryPolicy};
use tempfile::TempDir;

/// Short leases, so the cut-off worker is declared lost quickly; `--insecure` because the
/// coordinator listens on every address (the hosts reach it on theirs) without tokens.
const COORDINATOR_ARGS: &[&str] = &[
    "--lease-timeout",
    "2s",
    "--heartbeat-interval",
    "300ms",
    "--insecure",
];

/// Numbers the hosts of this run.
static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// Fails the test, saying why, unless it can make namespaces: root and `ip`.
fn require_root_and_ip() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/partition.rs needs root: it creates network namespaces and veth pairs \
         (run `cargo test --test partition` as root, or in a privileged container)"
    );
    assert!(
        find_on_path("ip").is_some(),
        "tests/partition.rs needs `ip` from iproute2 on PATH"
    );
}

/// Runs `ip ARGS...`; panics with its stderr if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip ARGS...`, ignoring failure (for cleanup).
fn ip_quietly(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Deletes the namespaces and veths of earlier runs that were killed before their `Drop` ran
/// (their process is gone).
fn sweep_stale_hosts() {
    for line in ip(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some((pid, n)) = name
            .strip_prefix("rota-part-")
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if pid as u32 != std::process::id() && !alive(pid) {
            ip_quietly(&["netns", "delete", name]);
            ip_quietly(&["link", "delete", &format!("rp{pid}h{n}")]);
        }
    }
}

/// A /24 under 10.213.0.0/16 that no address or route on this machine uses yet.
fn free_subnet() -> u8 {
    let taken = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"]),
        ip(&["-4", "route", "show", "table", "all"])
    );
    let start = std::process::id() % 256;
    (0..256)
        .map(|k| ((start + k) % 256) as u8)
        .find(|third| !taken.contains(&format!("10.213.{third}.")))
        .expect("a free 10.213.x.0/24 for the test hosts")
}

/// A "host": a network namespace joined to this one by a veth pair, `outer_addr` on this
/// side and `inner_addr` inside, a /30 between them. Deleted on drop.
struct Host {
    /// The namespace's name.
    ns: String,
    /// The veth end in this namespace; setting it down cuts the host off.
    outer: String,
    /// The address of this side, which the host's worker connects to.
    outer_addr: Ipv4Addr,
}

impl Host {
    /// Creates host number `index` (0..63) of the run in `10.213.subnet.0/24`.
    fn create(subnet: u8, index: u8) -> Host {
        let n = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let host = Host {
            ns: format!("rota-part-{pid}-{n}"),
            outer: format!("rp{pid}h{n}"),
            outer_addr: Ipv4Addr::new(10, 213, subnet, index * 4 + 1),
        };
        let inner = format!("rp{pid}i{n}");
        let inner_addr = Ipv4Addr::new(10, 213, subnet, index * 4 + 2);
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &host.ns]);
        ip(&[
            "link",
            "add",
            &host.outer,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &host.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.outer_addr),
            "dev",
            &host.outer,
        ]);
        ip(&["link", "set", &host.outer, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &host.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{inner_addr}/30"), "dev", &inner]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["link", "set", "lo", "up"]);
        host
    }

    /// `ip netns exec NS`: runs a program on this host.
    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns]
    }

    /// The coordinator's URL as seen from this host.
    fn coordinator_url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.outer_addr)
    }

    /// Cuts the host off: its link goes down (packets are dropped, nothing is reset).
    fn cut(&self) {
        ip(&["link", "set", &self.outer, "down"]);
    }

    /// Brings the link back.
    fn mend(&self) {
        ip(&["link", "set", &self.outer, "up"]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth end inside it, and with it the pair; the
        // outer end is deleted too in case a process still holds the namespace open.
        ip_quietly(&["netns", "delete", &self.ns]);
        ip_quietly(&["link", "delete", &self.outer]);
    }
}

/// Creates the gate file on drop, so that a task waiting on it ends even if the test fails.
struct Gate<'a>(&'a Path);

impl Gate<'_> {
    fn open(&self) {
        std::fs::write(self.0, b"open").expect("write the gate file");
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, b"open");
    }
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of `key=` in the first line of `text` that contains every one of `needles`.
fn field_of_line(text: &str, needles: &[&str], key: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))?;
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_string())
}

/// Waits until the log at `path` has a line containing all of `needles`; returns that line.
async fn wait_log_line(path: &Path, needles: &[&str], what: &str) -> String {
    wait_until(BOUND, what, || async {
        log_text(path)
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_workers_lease_expires_and_its_late_result_is_rejected() {
    require_root_and_ip();
    sweep_stale_hosts();
    let dir = TempDir::new().unwrap();
    let subnet = free_subnet();
    // Declared first, so they are dropped last: after the processes that use them.
    let host_a = Host::create(subnet, 0);
    let host_b = Host::create(subnet, 1);
    let gate_path = dir.path().join("gate-a");
    let gate = Gate(&gate_path);

    let coord = Coordinator::start_with(
        dir.path(),
        Placement {
            listen: "0.0.0.0:0",
            data_dir: None,
        },
        COORDINATOR_ARGS,
        &[],
    );
    let port = coord.addr().port();
    let client = job_client(&coord.url()).await;
    let debug_log = [("RUST_LOG", "info,rota::worker=debug")];

    // Worker A's task runs until the gate opens (or its worker dies; at most 60 s).
    let wait_for_gate = format!(
        "i=0; while [ ! -e '{gate}' ] && kill -0 $PPID 2>/dev/null && [ $i -lt 1200 ]; \
         do sleep 0.05; i=$((i+1)); done; printf from-a",
        gate = gate_path.display()
    );
    let mut worker_a = Worker::start_wrapped(
        &host_a.wrapper(),
        &host_a.coordinator_url(port),
        &worker_config("worker-a", &["default"], 1, &[("part", &wait_for_gate)]),
        dir.path(),
        &debug_log,
    );
    wait_worker_connected(&coord.url(), "worker-a").await;

    let id = submit_id(
        &client,
        Job {
            kind: "part".into(),
            max_attempts: 3,
            retry: Some(RetryPolicy {
                initial_backoff: Some(duration(std::time::Duration::from_millis(100))),
                max_backoff: Some(duration(std::time::Duration::from_millis(200))),
                multiplier: 2.0,
            }),
            ..Default::default()
        },
    )
    .await;
    let running = wait_job_state(&client, &id, JobState::Running, BOUND).await;
    assert_eq!(running.attempts.len(), 1, "{running:#?}");
    assert_eq!(running.attempts[0].worker_id, "worker-a");
    let started = wait_log_line(
        worker_a.log_path(),
        &["task started", &id],
        "worker A's task started",
    )
    .await;
    let lease_a = field_of_line(&started, &["task started"], "lease")
        .unwrap_or_else(|| panic!("no lease in worker A's line: {started}"));

    // Worker B, on the other host, connects while A holds the job: it stays idle.
    let worker_b = Worker::start_wrapped(
        &host_b.wrapper(),
        &host_b.coordinator_url(port),
        &worker_config("worker-b", &["default"], 1, &[("part", "printf from-b")]),
        dir.path(),
        &debug_log,
    );
    wait_worker_connected(&coord.url(), "worker-b").await;
    assert_eq!(get_job(&client, &id).await.state(), JobState::Running);

    // Cut A off mid-job. Its lease expires and B finishes the job.
    host_a.cut();
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"from-b", "{done:#?}");
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    assert_eq!(done.attempts[0].worker_id, "worker-a");
    assert_eq!(done.attempts[0].outcome, "lease_expired", "{done:#?}");
    assert_eq!(done.attempts[1].worker_id, "worker-b");
    assert_eq!(done.attempts[1].outcome, "succeeded");

    // A's task finishes while A is still cut off: its result waits in A's ledger.
    gate.open();
    wait_log_line(
        worker_a.log_path(),
        &["task succeeded", &id, &lease_a],
        "worker A's task ended (with its result pending)",
    )
    .await;
    assert!(
        !log_text(worker_a.log_path()).contains("lease rejected"),
        "nothing can have reached worker A while it is cut off"
    );

    // The link comes back: A reports its result late, and the coordinator rejects it.
    host_a.mend();
    let rejection = wait_log_line(
        worker_a.log_path(),
        &["rejected", &id, &lease_a],
        "worker A's late result rejected",
    )
    .await;
    assert!(
        rejection.contains("lease rejected, dropping its result")
            || rejection.contains("result not accepted by coordinator"),
        "unexpected rejection line: {rejection}"
    );
    let coordinator_says = wait_log_line(
        coord.log_path(),
        &["rejected", &id, &lease_a],
        "the coordinator's log of the rejection",
    )
    .await;
    eprintln!("worker A: {rejection}\ncoordinator: {coordinator_says}");
    wait_worker_connected(&coord.url(), "worker-a").await;

    // Nothing changed: the job's final state and result are B's.
    let after = get_job(&client, &id).await;
    assert_eq!(after.state(), JobState::Succeeded);
    assert_eq!(after.result, b"from-b");
    assert_eq!(after.attempts, done.attempts);
    assert_eq!(after.end_time, done.end_time);
    assert_eq!(list_all_jobs(&client).await.len(), 1, "no job was added");

    worker_a.kill9();
    drop(worker_b);
}
