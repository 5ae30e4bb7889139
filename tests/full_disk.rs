//! A full disk: the coordinator's data directory on a small tmpfs that the test fills with a
//! filler file. New work is refused with a clear error while the disk is (nearly) full, nothing
//! acknowledged is lost, work already accepted still completes, and service resumes once the
//! filler is deleted, with no job lost, duplicated or run twice.
//!
//! Needs root (`mount -t tmpfs`): without it the tests fail and say why. The tmpfs is
//! unmounted on drop, also when a test panics.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rota::coordinator::disk::available;
use rota::proto::{Job, JobState, SubmitJobRequest, SubmitJobsRequest};
use tempfile::TempDir;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted for the test, unmounted on drop (lazily if something still holds it).
struct Tmpfs {
    /// The mount point.
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `64M`) at `path`; fails, saying why, if it cannot.
    fn mount(path: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "tests/full_disk.rs needs root: it mounts a small tmpfs for the data directory \
             (run `cargo test --test full_disk` as root, or in a privileged container)"
        );
        std::fs::create_dir_all(path).expect("create the mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs at {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn free(&self) -> u64 {
        available(&self.path).expect("statvfs of the tmpfs")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes zeroes to `path` until the disk has at most `leave` bytes free (`0`: until the disk
/// is full). Returns the bytes written.
fn fill(path: &Path, disk: &Tmpfs, leave: u64) -> u64 {
    let mut file = File::create(path).expect("create the filler file");
    let chunk = vec![0u8; 256 << 10];
    let mut written = 0u64;
    loop {
        let free = disk.free();
        if free <= leave && leave > 0 {
            return written;
        }
        let n = if leave == 0 {
            chunk.len()
        } else {
            chunk.len().min((free - leave) as usize)
        };
        match file.write(&chunk[..n]) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return written,
            Err(e) => panic!("writing the filler: {e}"),
        }
    }
}

/// A job of kind `disk` with a payload of `size` bytes and an idempotency key.
/// A coordinator with its data directory on `disk` and `--min-free-disk min_free`.
fn start_on(disk: &Tmpfs, dir: &Path, min_free: &str) -> Coordinator {
    let placement = Placement {
        data_dir: Some(disk.path.join("data")),
        ..Placement::default()
    };
    Coordinator::start_with(dir, placement, &["--min-free-disk", min_free], &[])
}

fn keyed_job(key: &str, size: usize) -> Job {
    Job {
        kind: "disk".into(),
        payload: vec![b'p'; size],
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Submits one job; returns its id, or the error status.
async fn try_submit(client: &JobClient, job: Job) -> Result<String, tonic::Status> {
    let response = client
        .clone()
        .submit_job(SubmitJobRequest { job: Some(job) })
        .await?
        .into_inner();
    Ok(response.job.expect("a job in the response").id)
}

/// A worker that runs `disk` jobs: it appends the job id to `runs` and prints `ok`.
fn disk_worker(url: &str, dir: &Path, runs: &Path) -> Worker {
    let script = format!("echo \"$ROTA_JOB_ID\" >> '{}'; printf ok", runs.display());
    Worker::start(
        url,
        &worker_config("disk-worker", &["default"], 4, &[("disk", &script)]),
        dir,
    )
}

/// Checks every acknowledged job (key → id): it exists, SUCCEEDED with result `ok`, ran exactly
/// once (per the run log), and no other job exists.
async fn assert_each_ran_once(client: &JobClient, acked: &BTreeMap<String, String>, runs: &Path) {
    let ids: BTreeSet<&String> = acked.values().collect();
    assert_eq!(ids.len(), acked.len(), "two keys acknowledged one job");
    for (key, id) in acked {
        let job = wait_job_state(client, id, JobState::Succeeded, BOUND).await;
        assert_eq!(job.idempotency_key, *key);
        assert_eq!(job.result, b"ok");
    }
    let all = list_all_jobs(client).await;
    let listed: BTreeSet<&String> = all.iter().map(|j| &j.id).collect();
    assert_eq!(
        listed, ids,
        "the jobs stored are exactly the acknowledged ones"
    );
    let text = std::fs::read_to_string(runs).unwrap_or_default();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.trim()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "job {id} ran {:?} times",
            counts.get(id.as_str())
        );
    }
    assert_eq!(counts.len(), ids.len(), "runs of unknown jobs: {counts:?}");
}

async fn health_of(url: &str, service: &str) -> ServingStatus {
    let status = HealthClient::new(channel(url).await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service}: {e}"))
        .into_inner()
        .status();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_is_refused_while_the_disk_is_nearly_full_and_accepted_once_space_is_freed() {
    let dir = TempDir::new().unwrap();
    // Declared before the coordinator, so it is unmounted after the coordinator is killed.
    let disk = Tmpfs::mount(&dir.path().join("disk"), "64M");
    let coord = start_on(&disk, dir.path(), "16MiB");
    let url = coord.url();
    let client = job_client(&url).await;
    let runs = dir.path().join("runs.log");
    let mut acked = BTreeMap::new();
    for i in 0..50 {
        let key = format!("before-{i}");
        let id = try_submit(&client, keyed_job(&key, 1024)).await.unwrap();
        acked.insert(key, id);
    }

    // Fill the disk to 8 MiB free: below min_free_disk, far from sled running out.
    let filler = disk.path.join("filler");
    fill(&filler, &disk, 8 * MIB);
    assert!(disk.free() < 16 * MIB);
    // The guard reads the free space at most every 250 ms: new work is refused soon. What is
    // accepted until then is acknowledged, and counts.
    let deadline = Instant::now() + BOUND;
    let refused = loop {
        let key = format!("during-{}", acked.len());
        match try_submit(&client, keyed_job(&key, 1024)).await {
            Ok(id) => acked.insert(key, id),
            Err(status) => break status,
        };
        assert!(
            Instant::now() < deadline,
            "no submit refused within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let msg = refused.message();
    assert!(msg.starts_with("disk full: "), "{msg}");
    assert!(msg.contains("min_free_disk (16.0 MiB)"), "{msg}");
    assert!(msg.contains(&disk.path.display().to_string()), "{msg}");
    let batch = client
        .clone()
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![keyed_job("batch-1", 10), keyed_job("batch-2", 10)],
        })
        .await
        .expect_err("a batch is refused too");
    assert_eq!(batch.code(), Code::ResourceExhausted, "{batch:?}");
    assert_eq!(
        list_all_jobs(&client).await.len(),
        acked.len(),
        "a refused submit stored nothing"
    );

    // Work already accepted still completes: leases and completions are written.
    let worker = disk_worker(&url, dir.path(), &runs);
    for id in acked.values() {
        wait_job_state(&client, id, JobState::Succeeded, BOUND).await;
    }
    assert!(
        disk.free() < 16 * MIB,
        "the jobs completed while the disk was below min_free_disk"
    );
    let still = try_submit(&client, keyed_job("still-full", 10))
        .await
        .expect_err("still refused");
    assert_eq!(still.code(), Code::ResourceExhausted, "{still:?}");

    // Space freed: new work is accepted again, and runs.
    std::fs::remove_file(&filler).unwrap();
    let id = wait_until(BOUND, "a submit accepted after the filler is gone", || {
        let client = client.clone();
        async move { try_submit(&client, keyed_job("after-0", 1024)).await.ok() }
    })
    .await;
    acked.insert("after-0".into(), id);
    // The refused key was never stored: it makes a new job now.
    let response = submit(&client, keyed_job("still-full", 10)).await;
    assert!(!response.deduplicated);
    acked.insert("still-full".into(), response.job.unwrap().id);
    for i in 1..20 {
        let key = format!("after-{i}");
        acked.insert(key.clone(), submit_id(&client, keyed_job(&key, 1024)).await);
    }
    assert_each_ran_once(&client, &acked, &runs).await;
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_finds_the_disk_full_is_not_acknowledged_and_the_store_is_reopened_once_space_is_freed(
) {
    let dir = TempDir::new().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "32M");
    let mut coord = start_on(&disk, dir.path(), "4MiB");
    let url = coord.url();
    let client = job_client(&url).await;
    let runs = dir.path().join("runs.log");
    let mut acked = BTreeMap::new();
    // Leasing each of these rewrites its 8 KiB record: far more than the disk will have.
    for i in 0..40 {
        let key = format!("before-{i}");
        acked.insert(
            key.clone(),
            try_submit(&client, keyed_job(&key, 8 << 10)).await.unwrap(),
        );
    }

    // Fill the disk completely; nothing is written until a worker comes.
    let filler = disk.path.join("filler");
    fill(&filler, &disk, 0);
    assert_eq!(disk.free(), 0);

    // A worker connects: leasing and finishing the queued jobs writes more than the disk can
    // take. A commit the write-ahead log cannot grow for is not acknowledged (no Assign goes
    // out); a commit that fits the log's room is durable, and then sled's own write of it hits
    // the full disk. Either way the store fails and the coordinator starts reopening it.
    let worker = disk_worker(&url, dir.path(), &runs);
    wait_for(
        BOUND,
        "the job service NOT_SERVING after the failed write",
        || {
            let url = url.clone();
            async move { health_of(&url, "rota.v1.JobService").await == ServingStatus::NotServing }
        },
    )
    .await;
    // Every call is refused, first with the failure, then also with what recovery waits for.
    let refused = wait_until(BOUND, "a refusal that says what recovery waits for", || {
        let client = client.clone();
        async move {
            let status = try_submit(&client, keyed_job("never", 10))
                .await
                .expect_err("no submit is accepted while the store is being reopened");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            status
                .message()
                .contains("(min_free_disk) is free")
                .then_some(status)
        }
    })
    .await;
    let msg = refused.message();
    assert!(
        msg.starts_with("the store failed and is being reopened: disk full: "),
        "{msg}"
    );
    assert!(msg.contains("No space left on device"), "{msg}");
    let get = client
        .clone()
        .get_job(rota::proto::GetJobRequest {
            id: acked["before-0"].clone(),
        })
        .await
        .expect_err("reads wait for the store too");
    assert_eq!(get.code(), Code::Unavailable, "{get:?}");
    let log = log_tail(coord.log_path());
    assert!(
        log.contains("store sync failed") || log.contains("store write failed"),
        "{log}"
    );

    // Space freed: the store is reopened in the same process and everything resumes.
    std::fs::remove_file(&filler).unwrap();
    wait_for(BOUND, "the job service SERVING again", || {
        let url = url.clone();
        async move { health_of(&url, "rota.v1.JobService").await == ServingStatus::Serving }
    })
    .await;
    for i in 0..10 {
        let key = format!("after-{i}");
        acked.insert(key.clone(), submit_id(&client, keyed_job(&key, 1024)).await);
    }
    assert_each_ran_once(&client, &acked, &runs).await;
    assert!(
        log_tail(coord.log_path()).contains("serving again after the store failure"),
        "recovered in the same process"
    );

    // And it is all on disk: a restart finds every job as it was.
    drop(worker);
    coord.restart();
    let client = job_client(&coord.url()).await;
    assert_each_ran_once(&client, &acked, &runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_fill_the_disk_are_refused_in_time_and_every_accepted_one_completes() {
    let dir = TempDir::new().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "48M");
    let coord = start_on(&disk, dir.path(), "16MiB");
    let url = coord.url();
    let client = job_client(&url).await;
    let runs = dir.path().join("runs.log");

    // Batches of 16 jobs of 64 KiB until the coordinator says the disk is full. No worker yet:
    // every accepted job waits, and its lease and completion will rewrite its record.
    let mut acked = BTreeMap::new();
    let refused = loop {
        let jobs: Vec<Job> = (0..16)
            .map(|i| keyed_job(&format!("fill-{}-{i}", acked.len()), 64 << 10))
            .collect();
        let keys: Vec<String> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
        match client.clone().submit_jobs(SubmitJobsRequest { jobs }).await {
            Ok(response) => {
                for (key, result) in keys.into_iter().zip(response.into_inner().results) {
                    acked.insert(key, result.job.expect("a job").id);
                }
            }
            Err(status) => break status,
        }
        assert!(acked.len() < 10_000, "48 MiB never filled up");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let msg = refused.message();
    assert!(msg.starts_with("disk full: "), "{msg}");
    assert!(
        msg.contains("finishing the work already accepted needs about"),
        "{msg}"
    );
    assert!(acked.len() >= 32, "only {} jobs fitted", acked.len());
    let free_when_refused = disk.free();

    // The room kept for them is enough: every accepted job runs and completes.
    let worker = disk_worker(&url, dir.path(), &runs);
    assert_each_ran_once(&client, &acked, &runs).await;
    let free = disk.free();
    assert!(
        free >= 16 * MIB,
        "finishing the jobs ate into min_free_disk: {free} bytes free ({free_when_refused} when refused)"
    );
    assert_eq!(
        health_of(&url, "rota.v1.JobService").await,
        ServingStatus::Serving
    );
    let log = log_tail(coord.log_path());
    assert!(
        !log.contains("store write failed") && !log.contains("store sync failed"),
        "{log}"
    );

    // With nothing left to finish, the same room takes new work again.
    let id = submit_id(&client, keyed_job("after", 64 << 10)).await;
    acked.insert("after".into(), id);
    assert_each_ran_once(&client, &acked, &runs).await;
    drop(worker);
}

/// sled 0.34 writes a record over 128 KiB to a file of its own (a "blob"); when that write fails,
/// the log buffer it had claimed is never released and sled cannot flush or close any more.
/// The coordinator cannot reopen such a store in-process: it stops, and a restart (its
/// supervisor's) finds every acknowledged job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_sled_cannot_close_after_a_full_disk_stops_the_coordinator_and_a_restart_loses_nothing(
) {
    let dir = TempDir::new().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "32M");
    let mut coord = start_on(&disk, dir.path(), "4MiB");
    let url = coord.url();
    let client = job_client(&url).await;
    let runs = dir.path().join("runs.log");
    let mut acked = BTreeMap::new();
    for i in 0..8 {
        let key = format!("big-{i}");
        acked.insert(
            key.clone(),
            submit_id(&client, keyed_job(&key, 200 << 10)).await,
        );
    }
    let filler = disk.path.join("filler");
    fill(&filler, &disk, 0);

    // Leasing the jobs rewrites their 200 KiB records: blob writes that find the disk full.
    let worker = disk_worker(&url, dir.path(), &runs);
    wait_for(
        BOUND,
        "the job service NOT_SERVING after the failed write",
        || {
            let url = url.clone();
            async move { health_of(&url, "rota.v1.JobService").await == ServingStatus::NotServing }
        },
    )
    .await;
    let refused = try_submit(&client, keyed_job("never", 10))
        .await
        .expect_err("no submit while the store has failed");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("disk full: "), "{refused:?}");

    // sled does not close the store within the bound: the coordinator stops.
    let status = coord.wait_exit(BOUND);
    assert!(
        !status.success(),
        "a stuck store is a failed exit: {status:?}"
    );
    let log = log_tail(coord.log_path());
    assert!(log.contains("sled is stuck"), "{log}");

    // Its supervisor restarts it once space is freed: every acknowledged job is there and
    // runs once, and new work is taken.
    std::fs::remove_file(&filler).unwrap();
    coord.restart();
    let client = job_client(&coord.url()).await;
    acked.insert(
        "after".into(),
        submit_id(&client, keyed_job("after", 1024)).await,
    );
    assert_each_ran_once(&client, &acked, &runs).await;
    drop(worker);
}
