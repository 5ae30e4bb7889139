//! Security through the real binaries: bearer tokens with roles, the refusal to
//! serve a network address without them, TLS, and client certificates (mTLS).
//! Certificates are made at run time (rcgen).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use rota::coordinator::auth::hash_hex;
use rota::proto::admin_service_client::AdminServiceClient;
use rota::proto::job_service_client::JobServiceClient;
use rota::proto::schedule_service_client::ScheduleServiceClient;
use rota::proto::{
    DrainWorkerRequest, GetJobRequest, JobState, ListSchedulesRequest, ListWorkersRequest,
    SubmitJobRequest,
};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

const CLIENT: &str = "client-token-1f3a";
const WORKER: &str = "worker-token-77c2";
const ADMIN: &str = "admin-token-0d9e";

/// `ROTA_TOKENS` for the three tokens above: only their hashes.
fn token_env() -> String {
    format!(
        "client:{},worker:{},admin:{}",
        hash_hex(CLIENT),
        hash_hex(WORKER),
        hash_hex(ADMIN)
    )
}

fn authed<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

async fn submit_code(jobs: &JobServiceClient<Channel>, token: Option<&str>) -> Code {
    let req = SubmitJobRequest {
        job: Some(job("auth", b"")),
    };
    match jobs.clone().submit_job(authed(req, token)).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_each_service_by_role_and_health_stays_open() {
    let dir = TempDir::new().unwrap();
    let env = token_env();
    let coord = Coordinator::start_with_env(dir.path(), &[], &[("ROTA_TOKENS", &env)]);
    let url = coord.url();
    let jobs = job_client(&url).await;

    // Missing, malformed and wrong tokens: UNAUTHENTICATED, and nothing stored.
    assert_eq!(submit_code(&jobs, None).await, Code::Unauthenticated);
    assert_eq!(
        submit_code(&jobs, Some("not-a-token")).await,
        Code::Unauthenticated
    );
    let mut raw = Request::new(SubmitJobRequest {
        job: Some(job("auth", b"")),
    });
    raw.metadata_mut()
        .insert("authorization", CLIENT.parse().unwrap());
    let status = jobs.clone().submit_job(raw).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{status:?}");

    // The worker's token may not submit: PERMISSION_DENIED naming the method.
    let status = jobs
        .clone()
        .submit_job(authed(
            SubmitJobRequest {
                job: Some(job("auth", b"")),
            },
            Some(WORKER),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("SubmitJob"), "{status:?}");

    // Client and admin tokens submit; the job is readable with the client token only.
    assert_eq!(submit_code(&jobs, Some(CLIENT)).await, Code::Ok);
    assert_eq!(submit_code(&jobs, Some(ADMIN)).await, Code::Ok);
    let listed = jobs
        .clone()
        .list_jobs(authed(Default::default(), Some(CLIENT)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 2, "exactly the two accepted submits");
    let id = listed.jobs[0].id.clone();
    let get = |token| {
        let jobs = jobs.clone();
        let id = id.clone();
        async move {
            jobs.clone()
                .get_job(authed(GetJobRequest { id }, token))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(get(Some(CLIENT)).await, Ok(()));
    assert_eq!(get(None).await, Err(Code::Unauthenticated));

    // Schedules: client yes, worker no.
    let schedules = ScheduleServiceClient::new(channel(&url).await);
    assert!(schedules
        .clone()
        .list_schedules(authed(ListSchedulesRequest::default(), Some(CLIENT)))
        .await
        .is_ok());
    assert_eq!(
        schedules
            .clone()
            .list_schedules(authed(ListSchedulesRequest::default(), Some(WORKER)))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Admin reads are the client's; DrainWorker is the admin's alone.
    let admin = AdminServiceClient::new(channel(&url).await);
    assert!(admin
        .clone()
        .list_workers(authed(ListWorkersRequest {}, Some(CLIENT)))
        .await
        .is_ok());
    let drain = |token| {
        let admin = admin.clone();
        async move {
            admin
                .clone()
                .drain_worker(authed(
                    DrainWorkerRequest {
                        worker_id: "nobody".into(),
                        reason: "test".into(),
                    },
                    token,
                ))
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(drain(Some(CLIENT)).await, Code::PermissionDenied);
    assert_eq!(drain(Some(WORKER)).await, Code::PermissionDenied);
    // Past authentication: the worker simply does not exist.
    assert_eq!(drain(Some(ADMIN)).await, Code::NotFound);

    // Health and reflection need no token (grpcurl, like a load balancer, sends none).
    let health = grpcurl_json(&[&coord.addr().to_string(), "grpc.health.v1.Health/Check"]);
    assert_eq!(health["status"], "SERVING", "{health}");
    let services = grpcurl(&[&coord.addr().to_string(), "list"]);
    assert!(services.contains("rota.v1.JobService"), "{services}");
    // ...but a data call through grpcurl does, and works with one.
    let out = Command::new(grpcurl_path())
        .args(["-plaintext", "-max-time", "30"])
        .arg(coord.addr().to_string())
        .arg("rota.v1.AdminService/ListWorkers")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = format!("authorization: Bearer {CLIENT}");
    grpcurl(&[
        "-H",
        &header,
        &coord.addr().to_string(),
        "rota.v1.AdminService/ListWorkers",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_needs_a_worker_token_from_its_config_or_rota_token() {
    let dir = TempDir::new().unwrap();
    let coord = Coordinator::start_with_env(dir.path(), &[], &[("ROTA_TOKENS", &token_env())]);
    let url = coord.url();

    // No token: refused, never listed, and it says why in its log.
    let config = worker_config("no-token", &["default"], 1, &[("auth", "true")]);
    let anonymous = Worker::start(&url, &config, dir.path());
    wait_for(BOUND, "the anonymous worker's refusal in its log", || {
        let log = std::fs::read_to_string(anonymous.log_path()).unwrap_or_default();
        async move { log.contains("missing credentials") }
    })
    .await;
    // A client token is the wrong role for a session.
    let config = worker_config("client-token", &["default"], 1, &[("auth", "true")]);
    let wrong = Worker::start_with_env(&url, &config, dir.path(), &[("ROTA_TOKEN", CLIENT)]);
    wait_for(BOUND, "the wrong-role worker's refusal in its log", || {
        let log = std::fs::read_to_string(wrong.log_path()).unwrap_or_default();
        async move { log.contains("role client may not call") }
    })
    .await;

    // ROTA_TOKEN, and `token` in the config file: both connect and run jobs.
    let config = worker_config("env-token", &["default"], 1, &[("auth", "true")]);
    let _by_env = Worker::start_with_env(&url, &config, dir.path(), &[("ROTA_TOKEN", WORKER)]);
    let config = format!(
        "token = \"{ADMIN}\"\n{}",
        worker_config("file-token", &["other"], 1, &[("auth", "true")])
    );
    let _by_file = Worker::start(&url, &config, dir.path());

    let jobs = job_client(&url).await;
    let mut ids = Vec::new();
    for queue in ["default", "other"] {
        let mut j = job("auth", b"");
        j.queue = queue.into();
        let resp = jobs
            .clone()
            .submit_job(authed(SubmitJobRequest { job: Some(j) }, Some(CLIENT)))
            .await
            .unwrap()
            .into_inner();
        ids.push(resp.job.unwrap().id);
    }
    for id in &ids {
        wait_for(BOUND, "the job to succeed", || {
            let jobs = jobs.clone();
            let id = id.clone();
            async move {
                let job = jobs
                    .clone()
                    .get_job(authed(GetJobRequest { id }, Some(CLIENT)))
                    .await
                    .unwrap()
                    .into_inner();
                job.state() == JobState::Succeeded
            }
        })
        .await;
    }
    let admin = AdminServiceClient::new(channel(&url).await);
    let workers = admin
        .clone()
        .list_workers(authed(ListWorkersRequest {}, Some(CLIENT)))
        .await
        .unwrap()
        .into_inner()
        .workers;
    let mut names: Vec<_> = workers.iter().map(|w| w.worker_id.as_str()).collect();
    names.sort();
    assert_eq!(names, ["env-token", "file-token"]);
}

/// Runs the coordinator binary to its exit; returns (success, stderr).
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rota-coordinator"))
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run rota-coordinator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_it_refuses_a_network_address_unless_insecure() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (ok, stderr) = run_to_exit(&["--listen", "0.0.0.0:0", "--data-dir", data], &[]);
    assert!(!ok, "it must not serve 0.0.0.0 without tokens");
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without authentication")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    // Nothing was opened: the data dir was never created.
    assert!(!Path::new(data).exists());

    // With --insecure it serves (and says so); with tokens it needs no flag.
    let tokens = token_env();
    for (run, args, env) in [
        ("insecure", vec!["--insecure"], vec![]),
        ("tokens", vec![], vec![("ROTA_TOKENS", tokens.as_str())]),
    ] {
        let placement = Placement {
            listen: "0.0.0.0:0",
            data_dir: None,
        };
        let coord = Coordinator::start_with(dir.path().join(run), placement, &args, &env);
        let health = grpcurl_json(&[
            &format!("127.0.0.1:{}", coord.addr().port()),
            "grpc.health.v1.Health/Check",
        ]);
        assert_eq!(health["status"], "SERVING");
    }

    // A bad token list is named and refused.
    let (ok, stderr) = run_to_exit(&["--data-dir", data], &[("ROTA_TOKENS", "client:1234")]);
    assert!(!ok);
    assert!(
        stderr.contains("tokens: sha256 must be 64 hex digits"),
        "{stderr}"
    );
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("rota test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<String>, usage| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["worker.test".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |file: &str, text: &str| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

async fn tls_channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(BOUND)
        .connect()
        .await
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_encrypted_clients_and_a_worker_runs_jobs_over_it() {
    let dir = TempDir::new().unwrap();
    let pki = make_pki(dir.path(), "a");
    let coord = Coordinator::start(
        dir.path(),
        &[
            "--tls-cert",
            p(&pki.server_cert),
            "--tls-key",
            p(&pki.server_key),
        ],
    );
    let url = format!("https://127.0.0.1:{}", coord.addr().port());
    let ca = Certificate::from_pem(std::fs::read(&pki.ca).unwrap());

    // Plaintext gRPC to a TLS port fails.
    let plain = JobServiceClient::new(channel(&coord.url()).await);
    let err = plain
        .clone()
        .submit_job(SubmitJobRequest {
            job: Some(job("tls", b"")),
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);

    // A client that does not trust the CA cannot connect.
    let other = make_pki(dir.path(), "b");
    let wrong_ca = Certificate::from_pem(std::fs::read(&other.ca).unwrap());
    let refused = match tls_channel(&url, ClientTlsConfig::new().ca_certificate(wrong_ca)).await {
        Err(_) => true,
        Ok(ch) => JobServiceClient::new(ch)
            .get_job(GetJobRequest { id: "x".into() })
            .await
            .is_err_and(|s| s.code() == Code::Unavailable || s.code() == Code::Unknown),
    };
    assert!(refused, "a client with another CA must not get through");

    // Trusting the CA: submit, and a rota-worker with `[tls] ca` runs it.
    let ch = tls_channel(&url, ClientTlsConfig::new().ca_certificate(ca))
        .await
        .unwrap();
    let jobs = JobServiceClient::new(ch);
    let id = submit_id(&jobs, job("tls", b"over tls")).await;
    let config = format!(
        "{}\n[tls]\nca = {:?}\n",
        worker_config("tls-w", &["default"], 1, &[("tls", "cat")]),
        p(&pki.ca)
    );
    let _worker = Worker::start(&url, &config, dir.path());
    let done = wait_job_state(&jobs, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_certified_workers_connect() {
    let dir = TempDir::new().unwrap();
    let pki = make_pki(dir.path(), "m");
    let coord = Coordinator::start(
        dir.path(),
        &[
            "--tls-cert",
            p(&pki.server_cert),
            "--tls-key",
            p(&pki.server_key),
            "--tls-client-ca",
            p(&pki.ca),
        ],
    );
    let url = format!("https://127.0.0.1:{}", coord.addr().port());
    let ca = || Certificate::from_pem(std::fs::read(&pki.ca).unwrap());
    let identity = Identity::from_pem(
        std::fs::read(&pki.client_cert).unwrap(),
        std::fs::read(&pki.client_key).unwrap(),
    );

    // No client certificate: the handshake fails, whatever the call.
    let anonymous = match tls_channel(&url, ClientTlsConfig::new().ca_certificate(ca())).await {
        Err(_) => None,
        Ok(ch) => Some(
            JobServiceClient::new(ch)
                .get_job(GetJobRequest { id: "x".into() })
                .await,
        ),
    };
    assert!(
        anonymous.as_ref().is_none_or(|r| r.is_err()),
        "a client without a certificate got an answer: {anonymous:?}"
    );

    // A worker without its certificate never connects; with it, it runs a job.
    let bare = format!(
        "{}\n[tls]\nca = {:?}\n",
        worker_config("bare", &["default"], 1, &[("mtls", "cat")]),
        p(&pki.ca)
    );
    let bare = Worker::start(&url, &bare, dir.path());
    let certified = format!(
        "{}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        worker_config("certified", &["default"], 1, &[("mtls", "cat")]),
        p(&pki.ca),
        p(&pki.client_cert),
        p(&pki.client_key)
    );
    let _certified = Worker::start(&url, &certified, dir.path());

    let ch = tls_channel(
        &url,
        ClientTlsConfig::new()
            .ca_certificate(ca())
            .identity(identity),
    )
    .await
    .unwrap();
    let jobs = JobServiceClient::new(ch.clone());
    let id = submit_id(&jobs, job("mtls", b"mutual")).await;
    let done = wait_job_state(&jobs, &id, JobState::Succeeded, BOUND).await;
    assert_eq!(done.result, b"mutual");
    let workers = AdminServiceClient::new(ch)
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        workers
            .iter()
            .map(|w| w.worker_id.as_str())
            .collect::<Vec<_>>(),
        ["certified"]
    );
    wait_for(
        BOUND,
        "the uncertified worker to log the refused handshake",
        || {
            let log = std::fs::read_to_string(bare.log_path()).unwrap_or_default();
            async move { log.contains("CertificateRequired") }
        },
    )
    .await;
}
