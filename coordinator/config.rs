//! Coordinator settings: defaults, the TOML config file, and the parsers for
//! durations (`500ms`, `2s`, `1m`) and sizes (`1MiB`, `512KiB`, `1048576`).
//!
//! Precedence is flag, then `ROTA_*` environment variable (both handled by the
//! binary's CLI), then config file, then default: [`Settings::merge`] fills
//! whatever the CLI left unset from the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::coordinator::auth::{AuthError, Role, TokenHash, Tokens};
use crate::coordinator::retention::{Keep, Retention, DEFAULT_RETENTION};

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this program.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key.
        message: String,
    },
    /// A value is malformed or out of range.
    #[error("{setting}: {message}")]
    Invalid {
        /// The flag or key.
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The coordinator's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// A worker silent this long is lost, and its leases end.
    pub lease_timeout: Duration,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// Largest job payload, in bytes.
    pub max_payload: usize,
    /// `shutdown_grace` of jobs that do not set one.
    pub default_shutdown_grace: Duration,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Free space kept on the data directory's disk beyond the room for
    /// finishing accepted work; new work that would cut into it is refused
    /// (0: no check).
    pub min_free_disk: u64,
    /// Schedules declared in the config file, checked.
    pub schedules: Vec<crate::proto::Schedule>,
    /// How long finished jobs are kept, per terminal state.
    pub retention: Retention,
    /// Bearer tokens (their hashes); none: no authentication.
    pub tokens: Tokens,
    /// Serve without tokens on a non-loopback address.
    pub insecure: bool,
    /// TLS certificate and key (and client CA for mTLS), read from their files.
    pub tls: Option<Tls>,
    /// What clients and workers may send (message size, streams, workers, floods).
    pub limits: Limits,
}

/// The coordinator's TLS material, PEM.
#[derive(Clone)]
pub struct Tls {
    /// The server's certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// A `[[tokens]]` entry of the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSetting {
    /// Who holds it (for logs).
    #[serde(default)]
    pub name: Option<String>,
    /// `client`, `worker` or `admin`.
    pub role: String,
    /// The SHA-256 of the token, 64 hex digits.
    pub sha256: String,
}

/// Limits on what clients and workers may send. Each one refused gets a
/// gRPC error naming the limit and its setting; nothing changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest gRPC message either way, in bytes. At least
    /// [`min_message_size`] of the payload limit, so that any job fits.
    pub max_message_size: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub max_concurrent_streams: u32,
    /// Most worker sessions open at once.
    pub max_workers: usize,
    /// Heartbeats and drain messages a session may send per heartbeat
    /// interval, on average (the worker SDK sends one).
    pub worker_flood_rate: u32,
    /// How many of those a session may send at once before the rate applies.
    pub worker_flood_burst: u32,
    /// Messages the protocol does not allow (completions of leases the worker
    /// does not hold, a second Hello, empty messages) a session may send in a
    /// burst, on top of its slots; one more is allowed each second after that.
    pub worker_bad_messages: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_concurrent_streams: 1024,
            max_workers: 10_000,
            worker_flood_rate: 10,
            worker_flood_burst: 100,
            worker_bad_messages: 100,
        }
    }
}

/// `max_message_size` unless the payload limit needs more.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Room in a message for everything of a job but its payload and result:
/// labels (64 of up to 2 KiB), up to 1,000 attempts with their errors, ids
/// and times.
pub const JOB_OVERHEAD: usize = 10 << 20;

/// The smallest `max_message_size` that holds any job: a payload and a
/// result (each at most `max_payload`) and the rest.
pub fn min_message_size(max_payload: usize) -> usize {
    2 * max_payload + JOB_OVERHEAD
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".parse().expect("a valid address"),
            data_dir: PathBuf::from("./rota-data"),
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            max_payload: 1 << 20,
            default_shutdown_grace: Duration::from_secs(30),
            cache_bytes: 256 << 20,
            min_free_disk: 256 << 20,
            schedules: Vec::new(),
            retention: Retention::default(),
            tokens: Tokens::default(),
            insecure: false,
            tls: None,
            limits: Limits::default(),
        }
    }
}

/// Settings as text, from the CLI or the config file; unset ones fall through.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// `--listen` / `ROTA_LISTEN` / `listen`.
    pub listen: Option<String>,
    /// `--data-dir` / `ROTA_DATA_DIR` / `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// `--lease-timeout` / `ROTA_LEASE_TIMEOUT` / `lease_timeout`.
    pub lease_timeout: Option<String>,
    /// `--heartbeat-interval` / `ROTA_HEARTBEAT_INTERVAL` / `heartbeat_interval`.
    pub heartbeat_interval: Option<String>,
    /// `--max-payload` / `ROTA_MAX_PAYLOAD` / `max_payload`.
    pub max_payload: Option<String>,
    /// `--default-shutdown-grace` / `ROTA_DEFAULT_SHUTDOWN_GRACE` / `default_shutdown_grace`.
    pub default_shutdown_grace: Option<String>,
    /// `--cache-size` / `ROTA_CACHE_SIZE` / `cache_size`.
    pub cache_size: Option<String>,
    /// `--min-free-disk` / `ROTA_MIN_FREE_DISK` / `min_free_disk`.
    pub min_free_disk: Option<String>,
    /// `[[schedules]]`, config file only.
    pub schedules: Option<Vec<crate::coordinator::declared::DeclaredSchedule>>,
    /// `--retention` / `ROTA_RETENTION` / `retention`: every terminal state.
    pub retention: Option<String>,
    /// `--retention-succeeded` / `ROTA_RETENTION_SUCCEEDED` / `retention_succeeded`.
    pub retention_succeeded: Option<String>,
    /// `--retention-failed` / `ROTA_RETENTION_FAILED` / `retention_failed`.
    pub retention_failed: Option<String>,
    /// `--retention-cancelled` / `ROTA_RETENTION_CANCELLED` / `retention_cancelled`.
    pub retention_cancelled: Option<String>,
    /// `--retention-expired` / `ROTA_RETENTION_EXPIRED` / `retention_expired`.
    pub retention_expired: Option<String>,
    /// `[[tokens]]` in the config file.
    pub tokens: Option<Vec<TokenSetting>>,
    /// `--tokens` / `ROTA_TOKENS`: `role:sha256` entries; replaces the file's list.
    #[serde(skip)]
    pub token_list: Option<String>,
    /// `--insecure` / `ROTA_INSECURE` / `insecure`.
    pub insecure: Option<bool>,
    /// `--tls-cert` / `ROTA_TLS_CERT` / `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` / `ROTA_TLS_KEY` / `tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca` / `ROTA_TLS_CLIENT_CA` / `tls_client_ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--max-message-size` / `ROTA_MAX_MESSAGE_SIZE` / `max_message_size`.
    pub max_message_size: Option<String>,
    /// `--max-concurrent-streams` / `ROTA_MAX_CONCURRENT_STREAMS` / `max_concurrent_streams`.
    pub max_concurrent_streams: Option<u32>,
    /// `--max-workers` / `ROTA_MAX_WORKERS` / `max_workers`.
    pub max_workers: Option<usize>,
    /// `--worker-flood-rate` / `ROTA_WORKER_FLOOD_RATE` / `worker_flood_rate`.
    pub worker_flood_rate: Option<u32>,
    /// `--worker-flood-burst` / `ROTA_WORKER_FLOOD_BURST` / `worker_flood_burst`.
    pub worker_flood_burst: Option<u32>,
    /// `--worker-bad-messages` / `ROTA_WORKER_BAD_MESSAGES` / `worker_bad_messages`.
    pub worker_bad_messages: Option<u32>,
}

impl Settings {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }

    /// These settings, with unset ones taken from `fallback`.
    pub fn merge(self, fallback: Settings) -> Settings {
        Settings {
            listen: self.listen.or(fallback.listen),
            data_dir: self.data_dir.or(fallback.data_dir),
            lease_timeout: self.lease_timeout.or(fallback.lease_timeout),
            heartbeat_interval: self.heartbeat_interval.or(fallback.heartbeat_interval),
            max_payload: self.max_payload.or(fallback.max_payload),
            default_shutdown_grace: self
                .default_shutdown_grace
                .or(fallback.default_shutdown_grace),
            cache_size: self.cache_size.or(fallback.cache_size),
            min_free_disk: self.min_free_disk.or(fallback.min_free_disk),
            schedules: self.schedules.or(fallback.schedules),
            retention: self.retention.or(fallback.retention),
            retention_succeeded: self.retention_succeeded.or(fallback.retention_succeeded),
            retention_failed: self.retention_failed.or(fallback.retention_failed),
            retention_cancelled: self.retention_cancelled.or(fallback.retention_cancelled),
            retention_expired: self.retention_expired.or(fallback.retention_expired),
            tokens: self.tokens.or(fallback.tokens),
            token_list: self.token_list.or(fallback.token_list),
            insecure: self.insecure.or(fallback.insecure),
            tls_cert: self.tls_cert.or(fallback.tls_cert),
            tls_key: self.tls_key.or(fallback.tls_key),
            tls_client_ca: self.tls_client_ca.or(fallback.tls_client_ca),
            max_message_size: self.max_message_size.or(fallback.max_message_size),
            max_concurrent_streams: self
                .max_concurrent_streams
                .or(fallback.max_concurrent_streams),
            max_workers: self.max_workers.or(fallback.max_workers),
            worker_flood_rate: self.worker_flood_rate.or(fallback.worker_flood_rate),
            worker_flood_burst: self.worker_flood_burst.or(fallback.worker_flood_burst),
            worker_bad_messages: self.worker_bad_messages.or(fallback.worker_bad_messages),
        }
    }

    /// The final config: parsed, checked, defaults for what is unset.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let retention = self.resolve_retention()?;
        let listen = match self.listen {
            Some(ref s) => s.parse().map_err(|e| ConfigError::Invalid {
                setting: "listen",
                message: format!("{s:?} is not an address like 127.0.0.1:50051 ({e})"),
            })?,
            None => d.listen,
        };
        let duration = |setting, v: Option<String>, default| match v {
            Some(s) => {
                parse_duration(&s).map_err(|message| ConfigError::Invalid { setting, message })
            }
            None => Ok(default),
        };
        let size = |setting, v: Option<String>, default| match v {
            Some(s) => parse_size(&s).map_err(|message| ConfigError::Invalid { setting, message }),
            None => Ok(default),
        };
        let max_payload = size(
            "max_payload",
            self.max_payload.clone(),
            d.max_payload as u64,
        )? as usize;
        let limits = resolve_limits(
            max_payload,
            size("max_message_size", self.max_message_size.clone(), 0)?,
            &self,
        )?;
        let mut schedules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, declared) in self.schedules.unwrap_or_default().iter().enumerate() {
            let field = format!("schedules[{i}]");
            let invalid = |message: String| ConfigError::Invalid {
                setting: "schedules",
                message,
            };
            let schedule = declared.to_proto(&field).map_err(invalid)?;
            crate::coordinator::schedule::check::new_schedule(
                &field,
                schedule.clone(),
                max_payload,
            )
            .map_err(|e| invalid(e.to_string()))?;
            if !names.insert(schedule.name.clone()) {
                return Err(invalid(format!(
                    "{field}.name: {:?} is declared twice",
                    schedule.name
                )));
            }
            schedules.push(schedule);
        }
        let tokens = resolve_tokens(self.token_list, self.tokens)?;
        let insecure = self.insecure.unwrap_or(false);
        if tokens.is_empty() && !insecure && !listen.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                setting: "listen",
                message: format!(
                    "refusing to listen on {listen} without authentication: anyone who can reach it \
                     could submit, run or drain jobs. Configure tokens ([[tokens]] in the config \
                     file, or ROTA_TOKENS), listen on a loopback address, or pass --insecure"
                ),
            });
        }
        let tls = resolve_tls(self.tls_cert, self.tls_key, self.tls_client_ca)?;
        let config = Config {
            listen,
            data_dir: self.data_dir.unwrap_or(d.data_dir),
            lease_timeout: duration("lease_timeout", self.lease_timeout, d.lease_timeout)?,
            heartbeat_interval: duration(
                "heartbeat_interval",
                self.heartbeat_interval,
                d.heartbeat_interval,
            )?,
            max_payload,
            default_shutdown_grace: duration(
                "default_shutdown_grace",
                self.default_shutdown_grace,
                d.default_shutdown_grace,
            )?,
            cache_bytes: size("cache_size", self.cache_size, d.cache_bytes)?,
            min_free_disk: size("min_free_disk", self.min_free_disk, d.min_free_disk)?,
            schedules,
            retention,
            tokens,
            insecure,
            tls,
            limits,
        };
        if config.lease_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "lease_timeout",
                message: "must be positive".into(),
            });
        }
        if config.heartbeat_interval.is_zero() || config.heartbeat_interval >= config.lease_timeout
        {
            return Err(ConfigError::Invalid {
                setting: "heartbeat_interval",
                message: format!(
                    "must be positive and shorter than lease_timeout ({:?})",
                    config.lease_timeout
                ),
            });
        }
        if config.max_payload > 64 << 20 {
            return Err(ConfigError::Invalid {
                setting: "max_payload",
                message: "must be at most 64MiB".into(),
            });
        }
        Ok(config)
    }
}

/// The limits: set ones checked, defaults for the rest. `message_size` is 0
/// when unset (the default then depends on `max_payload`).
fn resolve_limits(
    max_payload: usize,
    message_size: u64,
    s: &Settings,
) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let min = min_message_size(max_payload);
    let max_message_size = if message_size == 0 && s.max_message_size.is_none() {
        d.max_message_size.max(min)
    } else {
        let size = usize::try_from(message_size).unwrap_or(usize::MAX);
        if size < min {
            return Err(ConfigError::Invalid {
                setting: "max_message_size",
                message: format!(
                    "is {size} bytes; it must be at least {min} bytes: twice max_payload \
                     ({max_payload}, a payload and a result) plus {JOB_OVERHEAD} for the rest of a job"
                ),
            });
        }
        if size > u32::MAX as usize {
            return Err(ConfigError::Invalid {
                setting: "max_message_size",
                message: format!("is {size} bytes; gRPC frames hold at most 4GiB"),
            });
        }
        size
    };
    let positive =
        |setting: &'static str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v {
                Some(0) => Err(ConfigError::Invalid {
                    setting,
                    message: "must be at least 1".into(),
                }),
                Some(n) => Ok(n),
                None => Ok(default),
            }
        };
    Ok(Limits {
        max_message_size,
        max_concurrent_streams: positive(
            "max_concurrent_streams",
            s.max_concurrent_streams.map(u64::from),
            d.max_concurrent_streams.into(),
        )? as u32,
        max_workers: positive(
            "max_workers",
            s.max_workers.map(|n| n as u64),
            d.max_workers as u64,
        )? as usize,
        worker_flood_rate: positive(
            "worker_flood_rate",
            s.worker_flood_rate.map(u64::from),
            d.worker_flood_rate.into(),
        )? as u32,
        worker_flood_burst: positive(
            "worker_flood_burst",
            s.worker_flood_burst.map(u64::from),
            d.worker_flood_burst.into(),
        )? as u32,
        worker_bad_messages: positive(
            "worker_bad_messages",
            s.worker_bad_messages.map(u64::from),
            d.worker_bad_messages.into(),
        )? as u32,
    })
}

impl Settings {
    /// `retention` for every terminal state, each `retention_<state>` over it.
    fn resolve_retention(&self) -> Result<Retention, ConfigError> {
        let keep = |setting: &'static str, v: &Option<String>, default: Keep| match v {
            Some(s) => Keep::parse(s).map_err(|e| ConfigError::Invalid {
                setting,
                message: e.to_string(),
            }),
            None => Ok(default),
        };
        let all = keep("retention", &self.retention, Keep::For(DEFAULT_RETENTION))?;
        Ok(Retention {
            succeeded: keep("retention_succeeded", &self.retention_succeeded, all)?,
            failed: keep("retention_failed", &self.retention_failed, all)?,
            cancelled: keep("retention_cancelled", &self.retention_cancelled, all)?,
            expired: keep("retention_expired", &self.retention_expired, all)?,
        })
    }
}

pub use crate::units::{parse_duration, parse_size};

/// The tokens: `ROTA_TOKENS` (or `--tokens`) if set, else the file's `[[tokens]]`.
fn resolve_tokens(
    list: Option<String>,
    file: Option<Vec<TokenSetting>>,
) -> Result<Tokens, ConfigError> {
    if let Some(list) = list {
        let tokens = TokenHash::parse_list(&list).map_err(|e| ConfigError::Invalid {
            setting: "tokens",
            message: e.to_string(),
        })?;
        return Ok(Tokens::new(tokens));
    }
    let mut tokens = Vec::new();
    for (i, t) in file.unwrap_or_default().into_iter().enumerate() {
        let invalid = |e: AuthError| ConfigError::Invalid {
            setting: "tokens",
            message: format!("tokens[{i}]: {e}"),
        };
        let role = Role::parse(&t.role).map_err(invalid)?;
        let name = t.name.unwrap_or_else(|| format!("tokens[{i}]"));
        tokens.push(TokenHash::new(name, role, &t.sha256).map_err(invalid)?);
    }
    Ok(Tokens::new(tokens))
}

/// Reads the TLS files; a key without a certificate (or the reverse) and a
/// client CA without a certificate are refused.
fn resolve_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<Tls>, ConfigError> {
    let read = |setting: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| ConfigError::Invalid {
            setting,
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    match (cert, key) {
        (None, None) => match client_ca {
            Some(_) => Err(ConfigError::Invalid {
                setting: "tls_client_ca",
                message: "needs tls_cert and tls_key (client certificates are checked over TLS)"
                    .into(),
            }),
            None => Ok(None),
        },
        (Some(_), None) => Err(ConfigError::Invalid {
            setting: "tls_key",
            message: "tls_cert is set but tls_key is not".into(),
        }),
        (None, Some(_)) => Err(ConfigError::Invalid {
            setting: "tls_cert",
            message: "tls_key is set but tls_cert is not".into(),
        }),
        (Some(cert), Some(key)) => Ok(Some(Tls {
            cert: read("tls_cert", &cert)?,
            key: read("tls_key", &key)?,
            client_ca: client_ca.map(|p| read("tls_client_ca", &p)).transpose()?,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2 MB").unwrap(), 2_000_000);
        assert!(parse_size("1XB").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let file: Settings =
            toml::from_str("lease_timeout = \"10s\"\nmax_payload = \"2KiB\"").unwrap();
        let cli = Settings {
            lease_timeout: Some("6s".into()),
            ..Default::default()
        };
        let c = cli.merge(file).resolve().unwrap();
        assert_eq!(c.lease_timeout, Duration::from_secs(6));
        assert_eq!(c.max_payload, 2048);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.min_free_disk, 256 << 20);
        let file: Settings = toml::from_str("min_free_disk = \"64MiB\"").unwrap();
        let c = Settings::default().merge(file).resolve().unwrap();
        assert_eq!(c.min_free_disk, 64 << 20);
        let bad = Settings {
            min_free_disk: Some("lots".into()),
            ..Default::default()
        };
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("min_free_disk"));
    }

    #[test]
    fn limits_have_defaults_and_are_checked() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_message_size, 16 << 20);
        // A payload limit that needs more raises the default message size.
        let big = Settings {
            max_payload: Some("8MiB".into()),
            ..Default::default()
        };
        assert_eq!(
            big.resolve().unwrap().limits.max_message_size,
            min_message_size(8 << 20)
        );
        // Set explicitly below the minimum: refused, naming both settings.
        let small = Settings {
            max_message_size: Some("1MiB".into()),
            ..Default::default()
        };
        let e = small.resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("max_message_size: is 1048576 bytes; it must be at least 12582912")
                && e.contains("max_payload"),
            "{e}"
        );
        let file: Settings = toml::from_str(
            "max_message_size = \"32MiB\"\nmax_workers = 5\nworker_flood_rate = 3\n\
             worker_flood_burst = 4\nworker_bad_messages = 6\nmax_concurrent_streams = 7",
        )
        .unwrap();
        let l = Settings::default().merge(file).resolve().unwrap().limits;
        assert_eq!(
            l,
            Limits {
                max_message_size: 32 << 20,
                max_concurrent_streams: 7,
                max_workers: 5,
                worker_flood_rate: 3,
                worker_flood_burst: 4,
                worker_bad_messages: 6,
            }
        );
        let zero = Settings {
            max_workers: Some(0),
            ..Default::default()
        };
        assert_eq!(
            zero.resolve().unwrap_err().to_string(),
            "max_workers: must be at least 1"
        );
    }

    #[test]
    fn retention_per_state_overrides_the_general_one_and_flags_win() {
        let d = Settings::default().resolve().unwrap().retention;
        assert_eq!(d, Retention::uniform(Keep::For(DEFAULT_RETENTION)));
        let file: Settings = toml::from_str(
            "retention = \"30d\"\nretention_failed = \"forever\"\nretention_succeeded = \"1h\"",
        )
        .unwrap();
        let cli = Settings {
            retention_succeeded: Some("10m".into()),
            retention_expired: Some("2s".into()),
            ..Default::default()
        };
        let r = cli.merge(file).resolve().unwrap().retention;
        assert_eq!(
            r.succeeded,
            Keep::For(Duration::from_secs(600)),
            "flag over file"
        );
        assert_eq!(r.failed, Keep::Forever, "file's per-state key");
        assert_eq!(
            r.cancelled,
            Keep::For(Duration::from_secs(30 * 86400)),
            "file's general key"
        );
        assert_eq!(r.expired, Keep::For(Duration::from_secs(2)));
        for (field, value) in [("retention", "0s"), ("retention_cancelled", "soon")] {
            let mut bad = Settings::default();
            match field {
                "retention" => bad.retention = Some(value.into()),
                _ => bad.retention_cancelled = Some(value.into()),
            }
            let e = bad.resolve().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{field}: ")), "{e}");
            assert!(e.contains(value), "{e}");
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = toml::from_str::<Settings>("lease_timout = \"1s\"").unwrap_err();
        assert!(e.to_string().contains("lease_timout"));
        let bad = Settings {
            heartbeat_interval: Some("1m".into()),
            ..Default::default()
        };
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("heartbeat_interval"));
    }

    #[test]
    fn tokens_come_from_the_file_or_replace_it_from_the_environment() {
        let h = crate::coordinator::auth::hash_hex("secret");
        let file: Settings = toml::from_str(&format!(
            "listen = \"0.0.0.0:50051\"\n[[tokens]]\nname = \"ci\"\nrole = \"client\"\nsha256 = \"{h}\"\n"
        ))
        .unwrap();
        let c = Settings::default().merge(file.clone()).resolve().unwrap();
        assert!(!c.tokens.is_empty());
        let auth = "Bearer secret";
        assert_eq!(c.tokens.check(Some(auth.as_bytes())).unwrap().name, "ci");
        let env = Settings {
            token_list: Some(format!(
                "admin:{}",
                crate::coordinator::auth::hash_hex("other")
            )),
            ..Default::default()
        };
        let c = env.merge(file).resolve().unwrap();
        assert!(c.tokens.check(Some(auth.as_bytes())).is_err());
        assert!(c.tokens.check(Some(b"Bearer other")).is_ok());
    }

    #[test]
    fn bad_tokens_and_tls_pairs_are_named() {
        let file: Settings =
            toml::from_str("[[tokens]]\nrole = \"root\"\nsha256 = \"00\"\n").unwrap();
        let e = file.resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("tokens: tokens[0]: unknown role \"root\""),
            "{e}"
        );
        let no_key = Settings {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(no_key
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("tls_key:"));
        let ca_only = Settings {
            tls_client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(ca_only
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("tls_client_ca:"));
        let missing = Settings {
            tls_cert: Some("/nonexistent/c.pem".into()),
            tls_key: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        let e = missing.resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("tls_cert: cannot read /nonexistent/c.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_network_address_needs_tokens_or_insecure() {
        let open = Settings {
            listen: Some("0.0.0.0:50051".into()),
            ..Default::default()
        };
        let e = open.clone().resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("listen: refusing to listen on 0.0.0.0:50051"),
            "{e}"
        );
        let insecure = Settings {
            insecure: Some(true),
            ..open
        };
        assert!(insecure.resolve().unwrap().insecure);
        let loopback = Settings {
            listen: Some("[::1]:50051".into()),
            ..Default::default()
        };
        assert!(loopback.resolve().is_ok());
    }
}
