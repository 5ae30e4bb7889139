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
        }
    }

    /// The final config: parsed, checked, defaults for what is unset.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let listen = match self.listen {
            Some(s) => s.parse().map_err(|e| ConfigError::Invalid {
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
        let max_payload = size("max_payload", self.max_payload, d.max_payload as u64)? as usize;
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

pub use crate::units::{parse_duration, parse_size};

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
}
