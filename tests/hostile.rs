//! Hostile bytes: every RPC of every service the coordinator serves (its own four, health and
//! both reflection versions, found in their descriptor sets so none is missed) gets random
//! bytes, truncated frames, bad compressed flags, oversized length prefixes and bytes that are not
//! protobuf, over raw HTTP/2. Each call must end with a gRPC status, and afterwards the process
//! is alive, has not panicked, and serves correctly: health SERVING, a submit and a get, and a
//! real worker running a job.

mod common;

use common::raw_grpc::{frame, frame_with, RawConn, RawResponse};
use common::*;
use prost::Message;
use rand::{Rng, SeedableRng};
use rota::proto::worker_message::Msg as WorkerMsg;
use rota::proto::{JobState, WorkerMessage};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// One RPC.
#[derive(Clone, Debug)]
struct Method {
    /// `/package.Service/Method`.
    path: String,
}

/// Every method of every service in the descriptor sets the coordinator serves.
fn methods() -> Vec<Method> {
    let sets: [&[u8]; 4] = [
        rota::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut out = Vec::new();
    for set in sets {
        let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
        for file in set.file {
            let package = file.package().to_string();
            for service in &file.service {
                for method in &service.method {
                    out.push(Method {
                        path: format!("/{package}.{}/{}", service.name(), method.name()),
                    });
                }
            }
        }
    }
    out
}

/// A hostile request body, and whether a well-formed answer must be an error.
struct Body {
    what: &'static str,
    bytes: Vec<u8>,
    must_fail: bool,
}

fn bodies(rng: &mut rand::rngs::StdRng) -> Vec<Body> {
    let mut random = |n: usize| (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>();
    let not_protobuf = vec![0xff; 32];
    vec![
        Body {
            what: "random bytes",
            bytes: random(97),
            must_fail: false,
        },
        Body {
            what: "a random byte",
            bytes: random(1),
            must_fail: true,
        },
        Body {
            what: "a length prefix larger than the data, then end of stream",
            bytes: frame_with(0, 1000, &random(10)),
            must_fail: true,
        },
        Body {
            what: "a frame header cut short",
            bytes: frame(&[1, 2, 3])[..3].to_vec(),
            must_fail: true,
        },
        Body {
            what: "the compressed flag with no grpc-encoding",
            bytes: frame_with(1, 4, &[8, 1, 16, 2]),
            must_fail: true,
        },
        Body {
            what: "a compressed flag that does not exist",
            bytes: frame_with(0x7f, 4, &[8, 1, 16, 2]),
            must_fail: true,
        },
        Body {
            what: "a 4GiB length prefix",
            bytes: frame_with(0, u32::MAX, &random(64)),
            must_fail: true,
        },
        Body {
            what: "bytes that are not protobuf",
            bytes: frame(&not_protobuf),
            must_fail: true,
        },
        Body {
            what: "random bytes in a well-formed frame",
            bytes: frame(&random(200)),
            must_fail: false,
        },
        Body {
            what: "a good frame, then bytes that are not protobuf",
            bytes: [frame(&[]), frame(&not_protobuf)].concat(),
            must_fail: false,
        },
    ]
}

/// Checks one answer: it ended, with a status; an error when it must be one.
fn check(method: &Method, body: &Body, r: &RawResponse) {
    let case = format!("{} with {}", method.path, body.what);
    assert_eq!(r.http, http::StatusCode::OK, "{case}: {r:?}");
    let code = r
        .code
        .unwrap_or_else(|| panic!("{case}: no grpc-status: {r:?}"));
    // tonic-reflection ends its stream quietly (OK, nothing sent) on a request it cannot
    // decode: the call still ends, and answers nothing.
    let quiet = method.path.starts_with("/grpc.reflection.") && r.data.is_empty();
    if body.must_fail && !quiet {
        assert_ne!(code, Code::Ok, "{case}: accepted: {r:?}");
    }
    assert_ne!(code, Code::Unknown, "{case}: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_to_every_rpc_leave_the_coordinator_serving() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start(dir.path(), &[]);
    let url = coord.url();
    let client = job_client(&url).await;
    // A job to aim the id-taking calls at when random bytes happen to parse.
    let before = submit_id(&client, job("nobody", b"x")).await;

    let methods = methods();
    let mut services: Vec<&str> = methods
        .iter()
        .filter_map(|m| m.path.rsplit_once('/').map(|(s, _)| s))
        .collect();
    services.dedup();
    assert_eq!(
        services.len(),
        7,
        "rota's four services, health, reflection v1 and v1alpha: {services:?}"
    );
    assert!(methods
        .iter()
        .any(|m| m.path == "/rota.v1.WorkerService/Session"));

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x686f7374);
    let mut calls = 0;
    for method in &methods {
        // A fresh connection per method: a protocol error on one cannot hide another's answer.
        let mut conn = RawConn::connect(coord.addr()).await;
        for body in bodies(&mut rng) {
            let r = conn.call(&method.path, body.bytes.clone(), BOUND).await;
            check(method, &body, &r);
            calls += 1;
        }
    }
    assert_eq!(methods.len(), 7 + 8 + 1 + 3 + 2 + 1 + 1, "{methods:?}");
    assert_eq!(calls, methods.len() * 10);

    // Garbage right after a good Hello: the session (registered, its Welcome perhaps not yet
    // sent) ends with the decode error's status.
    let mut conn = RawConn::connect(coord.addr()).await;
    let hello_frame = frame(
        &WorkerMessage {
            msg: Some(WorkerMsg::Hello(hello("mid-session", &["no-such-kind"]))),
        }
        .encode_to_vec(),
    );
    for (what, tail) in [
        ("bytes that are not protobuf", frame(&[0xff; 32])),
        ("a truncated frame", frame_with(0, 64, &[1, 2, 3])),
        ("a bad compressed flag", frame_with(9, 1, &[0])),
        ("a 4GiB length prefix", frame_with(0, u32::MAX, &[0])),
    ] {
        let r = conn
            .call(
                "/rota.v1.WorkerService/Session",
                [hello_frame.clone(), tail].concat(),
                BOUND,
            )
            .await;
        let code = r.code.unwrap_or_else(|| panic!("{what}: no status: {r:?}"));
        assert!(
            matches!(code, Code::Internal | Code::ResourceExhausted),
            "{what}: {r:?}"
        );
    }

    // Streams left open mid-frame, then the connection dropped: a Session with a good Hello
    // and half a frame, and a WatchJob cut inside its request.
    let mut conn = RawConn::connect(coord.addr()).await;
    let hello = WorkerMessage {
        msg: Some(WorkerMsg::Hello(hello("half-frame", &["no-such-kind"]))),
    };
    let half = [frame(&hello.encode_to_vec()), frame_with(0, 500, &[1; 7])].concat();
    let (_s, _session) = conn
        .start("/rota.v1.WorkerService/Session", half, false)
        .await;
    let (_w, _watch) = conn
        .start(
            "/rota.v1.JobService/WatchJob",
            frame_with(0, 40, b"\x0a\x24"),
            false,
        )
        .await;
    drop(conn);

    // Bytes that are not HTTP/2 at all: the server closes the connection.
    let mut tcp = tokio::net::TcpStream::connect(coord.addr()).await.unwrap();
    let noise: Vec<u8> = (0..4096).map(|_| rng.gen::<u8>()).collect();
    let _ = tcp.write_all(&noise).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(BOUND, tcp.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the server kept a garbage connection open");

    // Still alive, never panicked, and serving.
    assert!(alive(coord.pid() as i32), "the coordinator died");
    let mut health = HealthClient::new(channel(&url).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(get_job(&client, &before).await.state(), JobState::Queued);
    let id = submit_id(&client, job("echo", b"still here")).await;
    let config = worker_config("after-hostile", &["default"], 1, &[("echo", "cat")]);
    let _worker = Worker::start(&url, &config, dir.path());
    let done = wait_job_state(&client, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"still here");
    let log = std::fs::read_to_string(coord.log_path()).unwrap_or_default();
    assert!(
        !log.contains("panicked"),
        "the coordinator panicked:\n{}",
        log_tail(coord.log_path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_hostile_bytes_are_refused_unread_or_answered_and_it_still_serves() {
    const ADMIN: &str = "hostile-admin-token";
    let dir = TempDir::new().unwrap();
    let tokens = format!("admin:{}", rota::coordinator::auth::hash_hex(ADMIN));
    let coord = Coordinator::start_with_env(dir.path(), &[], &[("ROTA_TOKENS", &tokens)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x746f6b6e);
    let methods = methods();
    for method in &methods {
        let open = method.path.starts_with("/grpc.");
        // Without a token: every Rota method is refused before its body is read;
        // health and reflection stay open and are checked as above.
        let mut anonymous = RawConn::connect(coord.addr()).await;
        // With the admin token: the bodies reach the handlers.
        let mut admin = RawConn::connect(coord.addr()).await;
        admin.token = Some(ADMIN.to_string());
        for body in bodies(&mut rng) {
            let r = anonymous
                .call(&method.path, body.bytes.clone(), BOUND)
                .await;
            if open {
                check(method, &body, &r);
            } else {
                assert_eq!(
                    r.code,
                    Some(Code::Unauthenticated),
                    "{} with {} and no token: {r:?}",
                    method.path,
                    body.what
                );
            }
            let r = admin.call(&method.path, body.bytes.clone(), BOUND).await;
            check(method, &body, &r);
        }
    }
    assert!(alive(coord.pid() as i32), "the coordinator died");
    // Still serving, to a client with the token.
    let client = job_client(&coord.url()).await;
    let mut req = tonic::Request::new(rota::proto::SubmitJobRequest {
        job: Some(job("echo", b"x")),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    client
        .clone()
        .submit_job(req)
        .await
        .expect("submit with the token");
    let log = std::fs::read_to_string(coord.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "{}", log_tail(coord.log_path()));
}
