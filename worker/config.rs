//! The `rota-worker` config file: identity, queues, slots, labels and one
//! command per job kind.
//!
//! ```toml
//! worker_id = "host-a-1"        # default: hostname-pid
//! queues = ["default"]          # default: ["default"]
//! slots = 4                     # default: number of CPUs
//! max_output = "1MiB"           # cap on a command's stdout result
//! max_shutdown_grace = "30s"    # longest job grace honoured; default: no limit
//! token = "..."                 # bearer token (role worker); ROTA_TOKEN wins
//! [tls]                         # when the coordinator serves TLS (https:// URL)
//! ca = "/etc/rota/ca.pem"       # CA that signed the coordinator's certificate
//! cert = "/etc/rota/worker.pem" # this worker's certificate and key, for mTLS
//! key = "/etc/rota/worker.key"
//! domain = "rota.internal"      # name to check in the certificate; default: the URL's host
//! [labels]
//! zone = "a"
//! [kinds.resize]
//! command = ["python3", "resize.py"]
//! env = { K = "V" }             # optional
//! cwd = "/srv/resize"           # optional
//! stop_signal = "SIGINT"        # the notice; default SIGTERM
//! ```
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::command::{CommandHandler, StopSignal, DEFAULT_MAX_OUTPUT};
use super::WorkerBuilder;

/// Errors loading or checking a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key (named in the message), or a
    /// value of the wrong type.
    #[error("invalid config: {0}")]
    Parse(toml::de::Error),
    /// A kind has an empty `command`.
    #[error("kinds.{kind}.command is empty: give at least the program to run")]
    EmptyCommand { kind: String },
    /// No `[kinds.*]` at all: the worker would have nothing to run.
    #[error("no kinds configured: add at least one [kinds.NAME] with a command")]
    NoKinds,
    /// `slots = 0`.
    #[error("slots must be at least 1")]
    ZeroSlots,
    /// `queues = []`.
    #[error("queues must name at least one queue")]
    NoQueues,
    /// A `[tls]` setting cannot be used.
    #[error("{key}: {message}")]
    Tls { key: &'static str, message: String },
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Stable name of this worker; default `hostname-pid`.
    pub worker_id: Option<String>,
    /// Queues to take jobs from; default `["default"]`.
    pub queues: Option<Vec<String>>,
    /// Jobs run at once; default the number of CPUs.
    pub slots: Option<u32>,
    /// Cap on a command's stdout result; default 1 MiB.
    pub max_output: Option<ByteSize>,
    /// The longest shutdown grace this worker can honour, written like
    /// `"30s"`; the coordinator leases it no job with a longer one. Default:
    /// no limit.
    #[serde(default, deserialize_with = "duration_setting")]
    pub max_shutdown_grace: Option<Duration>,
    /// Free-form labels shown in `ListWorkers`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Bearer token for the coordinator (`ROTA_TOKEN` in the environment wins).
    pub token: Option<String>,
    /// TLS to the coordinator.
    pub tls: Option<TlsConfig>,
    /// One command per job kind.
    #[serde(default)]
    pub kinds: BTreeMap<String, KindConfig>,
}

/// TLS to the coordinator: the CA to trust, and this worker's own
/// certificate and key when the coordinator requires client certificates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA certificate(s) that signed the coordinator's certificate.
    pub ca: Option<PathBuf>,
    /// PEM certificate of this worker (mTLS); needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry; default: the URL's host.
    pub domain: Option<String>,
}

impl TlsConfig {
    /// tonic's client TLS configuration, with the files read.
    pub fn load(&self) -> Result<tonic::transport::ClientTlsConfig, ConfigError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|error| ConfigError::Tls {
                key,
                message: format!("cannot read {}: {error}", path.display()),
            })
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read("tls.ca", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read("tls.cert", cert)?,
                    read("tls.key", key)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::Tls {
                    key: "tls.key",
                    message: "tls.cert is set but tls.key is not".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Tls {
                    key: "tls.cert",
                    message: "tls.key is set but tls.cert is not".into(),
                })
            }
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(tls)
    }
}

/// How to run one job kind.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory for the command.
    pub cwd: Option<PathBuf>,
    /// The signal the command's process group gets as its notice (cancel,
    /// shutdown, timeout); default SIGTERM. SIGKILL follows at the stop-by time.
    pub stop_signal: Option<StopSignal>,
}

/// A duration written like `"500ms"`, `"30s"` or `"1m 30s"`.
fn duration_setting<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    crate::units::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A size in bytes, written as an integer or a string like `"512KiB"`, `"1MiB"`,
/// `"2MB"` (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ByteSizeRepr")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeRepr {
    Int(u64),
    Text(String),
}

impl TryFrom<ByteSizeRepr> for ByteSize {
    type Error = String;

    fn try_from(repr: ByteSizeRepr) -> Result<Self, String> {
        match repr {
            ByteSizeRepr::Int(n) => Ok(Self(n)),
            ByteSizeRepr::Text(s) => s.parse(),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        crate::units::parse_size(s).map(Self)
    }
}

impl WorkerConfig {
    /// Parses and checks a config from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.kinds.is_empty() {
            return Err(ConfigError::NoKinds);
        }
        if self.slots == Some(0) {
            return Err(ConfigError::ZeroSlots);
        }
        if self.queues.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::NoQueues);
        }
        for (kind, k) in &self.kinds {
            if k.command.first().is_none_or(String::is_empty) {
                return Err(ConfigError::EmptyCommand { kind: kind.clone() });
            }
        }
        Ok(())
    }

    /// The cap on a command's stdout result.
    pub fn max_output(&self) -> usize {
        self.max_output.map_or(DEFAULT_MAX_OUTPUT, |b| {
            usize::try_from(b.0).unwrap_or(usize::MAX)
        })
    }

    /// A worker builder for `coordinator_url` with every kind as a command.
    pub fn worker_builder(&self, coordinator_url: &str) -> Result<WorkerBuilder, ConfigError> {
        self.validate()?;
        let mut builder = super::Worker::builder(coordinator_url);
        if let Some(id) = &self.worker_id {
            builder = builder.worker_id(id.clone());
        }
        if let Some(queues) = &self.queues {
            builder = builder.queues(queues.clone());
        }
        if let Some(slots) = self.slots {
            builder = builder.slots(slots);
        }
        if let Some(grace) = self.max_shutdown_grace {
            builder = builder.max_shutdown_grace(grace);
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.load()?);
        }
        for (k, v) in &self.labels {
            builder = builder.label(k.clone(), v.clone());
        }
        for (kind, spec) in &self.kinds {
            // `new` only fails on an empty command.
            let mut handler = CommandHandler::new(spec.command.iter().cloned())
                .map_err(|_| ConfigError::EmptyCommand { kind: kind.clone() })?
                .max_output(self.max_output())
                .stop_signal(spec.stop_signal.unwrap_or_default());
            for (k, v) in &spec.env {
                handler = handler.env(k.clone(), v.clone());
            }
            if let Some(dir) = &spec.cwd {
                handler = handler.current_dir(dir.clone());
            }
            builder = builder.handler(kind.clone(), handler);
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let config = WorkerConfig::from_toml(
            r#"
            worker_id = "host-a-1"
            queues = ["default", "media"]
            slots = 4
            max_output = "2MiB"
            [labels]
            zone = "a"
            [kinds.resize]
            command = ["python3", "resize.py"]
            env = { K = "V" }
            cwd = "/tmp"
            "#,
        )
        .expect("valid");
        assert_eq!(config.worker_id.as_deref(), Some("host-a-1"));
        assert_eq!(config.slots, Some(4));
        assert_eq!(config.max_output(), 2 * 1024 * 1024);
        assert_eq!(config.labels["zone"], "a");
        let resize = &config.kinds["resize"];
        assert_eq!(resize.command, ["python3", "resize.py"]);
        assert_eq!(resize.env["K"], "V");
        assert_eq!(resize.cwd.as_deref(), Some(Path::new("/tmp")));
        config
            .worker_builder("http://127.0.0.1:50051")
            .expect("builder")
            .build()
            .expect("worker");
    }

    #[test]
    fn defaults_apply() {
        let config = WorkerConfig::from_toml("[kinds.echo]\ncommand = [\"cat\"]\n").expect("valid");
        assert_eq!(config.worker_id, None);
        assert_eq!(config.queues, None);
        assert_eq!(config.max_output(), DEFAULT_MAX_OUTPUT);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = WorkerConfig::from_toml("slotz = 3\n[kinds.a]\ncommand = [\"x\"]\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("slotz"), "{err}");

        let err = WorkerConfig::from_toml("[kinds.a]\ncommand = [\"x\"]\ncwdd = \"/\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("cwdd"), "{err}");
    }

    #[test]
    fn empty_command_is_an_error() {
        let err = WorkerConfig::from_toml("[kinds.resize]\ncommand = []\n").expect_err("empty");
        assert!(matches!(err, ConfigError::EmptyCommand { ref kind } if kind == "resize"));
        assert_eq!(
            err.to_string(),
            "kinds.resize.command is empty: give at least the program to run"
        );
    }

    #[test]
    fn other_checks() {
        assert!(matches!(
            WorkerConfig::from_toml("slots = 2\n"),
            Err(ConfigError::NoKinds)
        ));
        assert!(matches!(
            WorkerConfig::from_toml("slots = 0\n[kinds.a]\ncommand = [\"x\"]\n"),
            Err(ConfigError::ZeroSlots)
        ));
        assert!(matches!(
            WorkerConfig::from_toml("queues = []\n[kinds.a]\ncommand = [\"x\"]\n"),
            Err(ConfigError::NoQueues)
        ));
        let err =
            WorkerConfig::from_toml("max_output = \"1 parsec\"\n[kinds.a]\ncommand = [\"x\"]\n")
                .expect_err("bad size");
        assert!(err.to_string().contains("unknown size unit"), "{err}");
    }

    #[test]
    fn stop_signal_and_max_shutdown_grace() {
        let config = WorkerConfig::from_toml(
            r#"
            max_shutdown_grace = "1m 30s"
            [kinds.a]
            command = ["x"]
            stop_signal = "INT"
            [kinds.b]
            command = ["x"]
            stop_signal = 10
            [kinds.c]
            command = ["x"]
            "#,
        )
        .expect("valid");
        assert_eq!(config.max_shutdown_grace, Some(Duration::from_secs(90)));
        assert_eq!(
            config.kinds["a"].stop_signal.map(StopSignal::as_raw),
            Some(libc::SIGINT)
        );
        assert_eq!(
            config.kinds["b"].stop_signal.map(StopSignal::as_raw),
            Some(10)
        );
        assert_eq!(config.kinds["c"].stop_signal, None);
        config
            .worker_builder("http://127.0.0.1:50051")
            .expect("builder")
            .build()
            .expect("worker");

        let err =
            WorkerConfig::from_toml("[kinds.a]\ncommand = [\"x\"]\nstop_signal = \"SIGKILL\"\n")
                .expect_err("kill refused");
        assert!(
            err.to_string().contains("SIGKILL cannot be caught"),
            "{err}"
        );
        let err = WorkerConfig::from_toml(
            "[kinds.a]\ncommand = [\"x\"]\nstop_signal = \"SIGTERMINATE\"\n",
        )
        .expect_err("unknown name");
        assert!(err.to_string().contains("SIGTERMINATE"), "{err}");
        let err = WorkerConfig::from_toml(
            "max_shutdown_grace = \"soon\"\n[kinds.a]\ncommand = [\"x\"]\n",
        )
        .expect_err("bad duration");
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("65536".parse(), Ok(ByteSize(65536)));
        assert_eq!("512KiB".parse(), Ok(ByteSize(512 * 1024)));
        assert_eq!("1 MiB".parse(), Ok(ByteSize(1 << 20)));
        assert_eq!("2MB".parse(), Ok(ByteSize(2_000_000)));
        assert_eq!("1gib".parse(), Ok(ByteSize(1 << 30)));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../examples/worker.toml");
        let config = WorkerConfig::from_toml(text).expect("examples/worker.toml is valid");
        assert_eq!(config.slots, Some(4));
        for kind in ["echo", "fail", "sleep", "patient"] {
            assert!(config.kinds.contains_key(kind), "missing kind {kind}");
        }
        assert_eq!(
            config.kinds["patient"].stop_signal,
            Some(StopSignal::from_raw(libc::SIGINT).expect("valid"))
        );
    }
}
