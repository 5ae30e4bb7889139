//! Request validation on arbitrary bytes: the input is decoded as each request
//! message the coordinator validates (a job, a schedule, a worker's hello),
//! and whatever decodes is validated. Validation must never panic, and every
//! refusal must be INVALID_ARGUMENT naming a field under the right prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rota::coordinator::error::Error;
use rota::proto::{Hello, Schedule, SubmitJobRequest, SubmitJobsRequest};

fn named(r: Result<(), Error>, prefix: &str) {
    match r {
        Ok(()) => {}
        Err(Error::InvalidArgument(m)) => {
            assert!(
                m.starts_with(prefix),
                "{m:?} does not start with {prefix:?}"
            );
            assert!(m.len() < 4096, "an error of {} bytes", m.len());
        }
        Err(other) => panic!("not INVALID_ARGUMENT: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = SubmitJobRequest::decode(data) {
        if let Some(job) = req.job {
            named(
                rota::coordinator::validate::new_job("job", job, 1 << 10).map(drop),
                "job.",
            );
        }
    }
    if let Ok(req) = SubmitJobsRequest::decode(data) {
        for (i, job) in req.jobs.into_iter().enumerate() {
            let field = format!("jobs[{i}]");
            named(
                rota::coordinator::validate::new_job(&field, job, 1 << 10).map(drop),
                &format!("{field}."),
            );
        }
    }
    if let Ok(schedule) = Schedule::decode(data) {
        let checked =
            rota::coordinator::schedule::check::new_schedule("schedule", schedule, 1 << 10);
        if let Ok((_, spec)) = &checked {
            // A checked spec computes fire times from any instant without panicking.
            let t =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(data.len() as u64 * 7919);
            if let Some(next) = spec.next_after(t) {
                assert!(next > t);
            }
            let _ = spec.last_at_or_before(t);
            let _ = spec.first_run(t);
        }
        named(checked.map(drop), "schedule.");
    }
    if let Ok(hello) = Hello::decode(data) {
        named(
            rota::coordinator::service::session::check_hello(&hello),
            "hello.",
        );
    }
});
