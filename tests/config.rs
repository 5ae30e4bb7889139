//! Coordinator settings from flags, `ROTA_*` environment and the TOML file, in that order.

mod common;

use std::process::Command;

use common::*;
use tempfile::TempDir;
use tonic::Code;

async fn payload_limit(url: &str) -> String {
    let client = job_client(url).await;
    let err = client
        .clone()
        .submit_job(rota::proto::SubmitJobRequest {
            job: Some(job("k", &[0u8; 100])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    err.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_win_over_env_which_wins_over_the_file() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("rota.toml");
    std::fs::write(&file, "max_payload = \"16\"\nlease_timeout = \"10s\"\n").unwrap();
    let config = file.to_str().unwrap();

    let from_file = Coordinator::start(dir.path().join("a"), &["--config", config]);
    assert!(payload_limit(&from_file.url())
        .await
        .contains("the limit is 16 bytes"));

    let env = [("ROTA_MAX_PAYLOAD", "32")];
    let from_env = Coordinator::start_with_env(dir.path().join("b"), &["--config", config], &env);
    let from_flag = Coordinator::start_with_env(
        dir.path().join("c"),
        &["--config", config, "--max-payload", "64"],
        &env,
    );
    assert!(payload_limit(&from_env.url())
        .await
        .contains("the limit is 32 bytes"));
    assert!(payload_limit(&from_flag.url())
        .await
        .contains("the limit is 64 bytes"));
}

#[test]
fn bad_settings_stop_the_coordinator_with_a_message_naming_them() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("rota.toml");
    std::fs::write(&file, "lease_timout = \"10s\"\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rota-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unknown_key = run(&["--config", file.to_str().unwrap()]);
    assert!(unknown_key.contains("lease_timout"), "{unknown_key}");
    let bad_duration = run(&["--lease-timeout", "soon"]);
    assert!(
        bad_duration.contains("lease_timeout") && bad_duration.contains("soon"),
        "{bad_duration}"
    );
    let bad_size = run(&["--max-payload", "1XB"]);
    assert!(bad_size.contains("max_payload"), "{bad_size}");
}
