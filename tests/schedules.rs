//! Schedules end to end, through the real binaries: END-anchored intervals,
//! fires missed while the coordinator was down, declared schedules, and the
//! ScheduleService contract.

mod common;

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use common::*;
use rota::proto::schedule_service_client::ScheduleServiceClient;
use rota::proto::{
    preview_schedule_request, schedule_spec, CronSpec, DeleteScheduleRequest, GetScheduleRequest,
    IntervalAnchor, IntervalSpec, Job, JobState, ListJobsRequest, ListSchedulesRequest,
    MisfirePolicy, OverlapPolicy, PauseScheduleRequest, PreviewScheduleRequest, PutScheduleRequest,
    ResumeScheduleRequest, Schedule, ScheduleSpec, TriggerScheduleRequest,
};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Code;

type ScheduleClient = ScheduleServiceClient<Channel>;

async fn schedule_client(url: &str) -> ScheduleClient {
    ScheduleServiceClient::new(channel(url).await)
}

fn interval(
    every: Duration,
    anchor: IntervalAnchor,
    offset: Option<Duration>,
) -> Option<ScheduleSpec> {
    Some(ScheduleSpec {
        kind: Some(schedule_spec::Kind::Interval(IntervalSpec {
            every: Some(duration(every)),
            anchor: anchor as i32,
            offset: offset.map(duration),
        })),
    })
}

fn cron(expression: &str, timezone: &str) -> Option<ScheduleSpec> {
    Some(ScheduleSpec {
        kind: Some(schedule_spec::Kind::Cron(CronSpec {
            expression: expression.into(),
            timezone: timezone.into(),
        })),
    })
}

async fn put(client: &ScheduleClient, schedule: Schedule) -> Schedule {
    client
        .clone()
        .put_schedule(PutScheduleRequest {
            schedule: Some(schedule),
        })
        .await
        .unwrap_or_else(|e| panic!("PutSchedule: {e}"))
        .into_inner()
}

async fn runs(jobs: &JobClient, name: &str) -> Vec<Job> {
    list_jobs(
        jobs,
        ListJobsRequest {
            schedule: name.into(),
            ..Default::default()
        },
    )
    .await
}

fn fire_time(job: &Job) -> SystemTime {
    let label = job
        .labels
        .get("rota.fire_time")
        .expect("a run carries its fire time");
    humantime::parse_rfc3339(label).unwrap()
}

/// Waits for wall-clock time to pass (the thing under test is what happens meanwhile).
async fn until(t: SystemTime) {
    while SystemTime::now() < t {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_anchored_schedule_starts_each_run_every_after_the_previous_end() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let _worker = Worker::start(
        &url,
        &worker_config("w1", &["default"], 2, &[("tick", "sleep 1; echo done")]),
        dir.path(),
    );
    wait_worker_connected(&url, "w1").await;
    let every = Duration::from_secs(2);
    let schedules = schedule_client(&url).await;
    put(
        &schedules,
        Schedule {
            name: "after-end".into(),
            job: Some(job("tick", b"")),
            spec: interval(every, IntervalAnchor::End, Some(Duration::ZERO)),
            ..Default::default()
        },
    )
    .await;
    let jobs = job_client(&url).await;
    let done = wait_until(Duration::from_secs(60), "three finished runs", || {
        let jobs = jobs.clone();
        async move {
            let r = runs(&jobs, "after-end").await;
            let finished: Vec<Job> = r
                .into_iter()
                .filter(|j| j.state() == JobState::Succeeded)
                .collect();
            (finished.len() >= 3).then_some(finished)
        }
    })
    .await;
    for pair in done.windows(2) {
        let ended = system_time(&pair[0].end_time, "end_time");
        let created = system_time(&pair[1].create_time, "create_time");
        let gap = created
            .duration_since(ended)
            .expect("the next run is created after the previous ended");
        assert!(
            gap >= every,
            "run created {gap:?} after the previous end; expected at least {every:?}"
        );
        assert!(
            gap < every + Duration::from_secs(3),
            "run created {gap:?} after the previous end"
        );
        let ran = system_time(&pair[0].end_time, "end_time")
            .duration_since(system_time(&pair[0].start_time, "start_time"))
            .unwrap();
        assert!(
            ran >= Duration::from_secs(1),
            "each run takes about a second ({ran:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_missed_while_the_coordinator_was_down_runs_once_late() {
    let dir = TempDir::new().unwrap();
    let mut coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let schedules = schedule_client(&url).await;
    let every = Duration::from_secs(2);
    for (name, window) in [("once", None), ("windowed", Some(Duration::from_secs(1)))] {
        put(
            &schedules,
            Schedule {
                name: name.into(),
                job: Some(job("nobody-runs-this", b"")),
                spec: interval(every, IntervalAnchor::Start, None),
                overlap: OverlapPolicy::Allow as i32,
                misfire: MisfirePolicy::RunOnce as i32,
                catchup_window: window.map(duration),
                ..Default::default()
            },
        )
        .await;
    }
    let jobs = job_client(&url).await;
    wait_for(BOUND, "a first on-time fire", || {
        let jobs = jobs.clone();
        async move { !runs(&jobs, "once").await.is_empty() }
    })
    .await;
    coord.kill9();
    let killed = SystemTime::now();
    // Down across at least three fire times.
    until(killed + Duration::from_secs(7)).await;
    let restarting = SystemTime::now();
    coord.restart();
    let jobs = job_client(&coord.url()).await;
    let late = wait_until(BOUND, "the late run", || {
        let jobs = jobs.clone();
        async move {
            runs(&jobs, "once")
                .await
                .into_iter()
                .find(|j| system_time(&j.create_time, "create_time") > restarting)
        }
    })
    .await;
    let late_created = system_time(&late.create_time, "create_time");
    let once = runs(&jobs, "once").await;
    let missed: Vec<&Job> = once
        .iter()
        .filter(|j| fire_time(j) > killed && fire_time(j) <= late_created)
        .collect();
    assert_eq!(
        missed.len(),
        1,
        "one late run for all the fires missed while down: {missed:?}"
    );
    assert!(
        fire_time(missed[0]) >= killed + Duration::from_secs(4),
        "it is for the newest missed fire"
    );
    let mut times: Vec<SystemTime> = once.iter().map(fire_time).collect();
    times.dedup();
    assert_eq!(times.len(), once.len(), "no fire time ran twice");

    // The windowed schedule dropped every fire missed by more than its window.
    let windowed = runs(&jobs, "windowed").await;
    let dropped: Vec<&Job> = windowed
        .iter()
        .filter(|j| fire_time(j) > killed && fire_time(j) + Duration::from_secs(1) < restarting)
        .collect();
    assert!(
        dropped.is_empty(),
        "fires older than the catch-up window ran: {dropped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_schedule_shows_its_next_run_through_reflection() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("rota.toml");
    let declare = |hour: u32| {
        format!(
            "[[schedules]]\nname = \"nightly\"\njob = {{ kind = \"report\" }}\n\
             spec.cron = {{ expression = \"0 {hour} * * *\", timezone = \"Europe/Berlin\" }}\n"
        )
    };
    std::fs::write(&config, declare(3)).unwrap();
    let mut coord = Coordinator::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let addr = coord.addr().to_string();
    let listed = grpcurl(&[&addr, "list"]);
    assert!(listed.contains("rota.v1.ScheduleService"), "{listed}");
    let got = grpcurl_json(&[
        "-d",
        r#"{"name": "nightly"}"#,
        &addr,
        "rota.v1.ScheduleService/GetSchedule",
    ]);
    let next: DateTime<Utc> = got["nextRunTime"]
        .as_str()
        .expect("nextRunTime")
        .parse()
        .unwrap();
    let berlin = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(
        (berlin.hour(), berlin.minute(), berlin.second()),
        (3, 0, 0),
        "{next}"
    );
    let until_next = next.signed_duration_since(Utc::now());
    assert!(until_next > chrono::Duration::zero() && until_next <= chrono::Duration::hours(25));

    // An API-made schedule is left alone; a changed declaration is applied at start-up.
    let schedules = schedule_client(&coord.url()).await;
    let api = put(
        &schedules,
        Schedule {
            name: "api-made".into(),
            job: Some(job("k", b"")),
            spec: cron("@hourly", ""),
            ..Default::default()
        },
    )
    .await;
    coord.terminate();
    std::fs::write(&config, declare(4)).unwrap();
    coord.restart();
    let got = grpcurl_json(&[
        "-d",
        r#"{}"#,
        &addr,
        "rota.v1.ScheduleService/ListSchedules",
    ]);
    let listed = got["schedules"].as_array().expect("schedules");
    assert_eq!(listed.len(), 2);
    let nightly = listed.iter().find(|s| s["name"] == "nightly").unwrap();
    let next: DateTime<Utc> = nightly["nextRunTime"].as_str().unwrap().parse().unwrap();
    assert_eq!(next.with_timezone(&chrono_tz::Europe::Berlin).hour(), 4);
    let kept = listed.iter().find(|s| s["name"] == "api-made").unwrap();
    assert_eq!(
        kept["updateTime"].as_str().unwrap(),
        humantime::format_rfc3339_nanos(system_time(&api.update_time, "update_time")).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_service_contract() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let client = schedule_client(&coord.url()).await;
    let jobs = job_client(&coord.url()).await;
    let put_err = |schedule: Schedule| {
        let mut c = client.clone();
        async move {
            c.put_schedule(PutScheduleRequest {
                schedule: Some(schedule),
            })
            .await
            .unwrap_err()
        }
    };
    let base = Schedule {
        name: "s".into(),
        job: Some(job("k", b"")),
        spec: cron("*/5 * * * *", "UTC"),
        ..Default::default()
    };
    for (schedule, needle) in [
        (
            Schedule {
                spec: cron("61 * * * *", ""),
                ..base.clone()
            },
            "schedule.spec.cron.expression: \"61 * * * *\": minute 61 is out of range",
        ),
        (
            Schedule {
                spec: cron("* * *", ""),
                ..base.clone()
            },
            "has 3 fields",
        ),
        (
            Schedule {
                spec: cron("0 0 * * *", "Atlantis/Capital"),
                ..base.clone()
            },
            "schedule.spec.cron.timezone: unknown time zone \"Atlantis/Capital\"",
        ),
        (
            Schedule {
                spec: interval(Duration::ZERO, IntervalAnchor::Start, None),
                ..base.clone()
            },
            "schedule.spec.interval.every",
        ),
        (
            Schedule {
                spec: None,
                ..base.clone()
            },
            "schedule.spec: is required",
        ),
        (
            Schedule {
                name: String::new(),
                ..base.clone()
            },
            "schedule.name",
        ),
        (
            Schedule {
                job: None,
                ..base.clone()
            },
            "schedule.job",
        ),
    ] {
        let e = put_err(schedule).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{needle}: {e:?}");
        assert!(
            e.message().contains(needle),
            "expected {needle:?} in {:?}",
            e.message()
        );
    }
    let listed = client
        .clone()
        .list_schedules(ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.schedules.is_empty(), "bad input changed nothing");

    let created = put(&client, base.clone()).await;
    let next = system_time(&created.next_run_time, "next_run_time");
    let secs = next
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(secs % 300, 0, "*/5 fires on the five-minute mark");

    // Preview: straight from the spec, capped.
    let preview = client
        .clone()
        .preview_schedule(PreviewScheduleRequest {
            source: Some(preview_schedule_request::Source::Name("s".into())),
            after: Some(timestamp(
                humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap(),
            )),
            count: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.times.len(), 1000);
    assert_eq!(
        system_time(&preview.times.last().cloned(), "last"),
        humantime::parse_rfc3339("2026-01-04T11:20:00Z").unwrap()
    );
    let too_many = client
        .clone()
        .preview_schedule(PreviewScheduleRequest {
            source: Some(preview_schedule_request::Source::Name("s".into())),
            after: None,
            count: 1001,
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(
        too_many.message().contains("count") && too_many.message().contains("1000"),
        "{}",
        too_many.message()
    );

    // Trigger, pause, resume, delete.
    let job = client
        .clone()
        .trigger_schedule(TriggerScheduleRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.schedule, "s");
    let listed = runs(&jobs, "s").await;
    assert_eq!(
        listed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![job.id.clone()]
    );
    let got = client
        .clone()
        .get_schedule(GetScheduleRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.last_job_id, job.id);
    let paused = client
        .clone()
        .pause_schedule(PauseScheduleRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    let resumed = client
        .clone()
        .resume_schedule(ResumeScheduleRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!resumed.paused);
    client
        .clone()
        .delete_schedule(DeleteScheduleRequest { name: "s".into() })
        .await
        .unwrap();
    for e in [
        client
            .clone()
            .get_schedule(GetScheduleRequest { name: "s".into() })
            .await
            .unwrap_err(),
        client
            .clone()
            .delete_schedule(DeleteScheduleRequest { name: "s".into() })
            .await
            .unwrap_err(),
        client
            .clone()
            .trigger_schedule(TriggerScheduleRequest { name: "s".into() })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    assert_eq!(get_job(&jobs, &job.id).await.schedule, "s", "its jobs stay");
}
