//! The coordinator: the durable job queue and the gRPC services over it.
//!
//! - [`store`]: sled, records under key prefixes, behind [`wal`], the
//!   write-ahead log whose commit (one write, one `fdatasync`) makes each
//!   group of writes durable.
//! - [`state`]: the in-memory dispatch model and every decision.
//! - [`engine`]: the task that applies decisions and the group-commit thread;
//!   [`disk`] keeps it from filling the disk, [`recovery`] reopens a failed store.
//! - [`service`]: the gRPC services, thin adapters over the engine.
//!
//! [`Coordinator::open`] rebuilds the model from the store; [`Coordinator::serve`]
//! serves it on a bound listener until a shutdown future resolves; [`run`] does both.

pub mod auth;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod declared;
pub mod disk;
pub mod engine;
pub mod error;
pub mod ids;
pub mod ready;
pub mod record;
pub mod recovery;
pub mod retention;
pub mod schedule;
pub mod service;
pub mod state;
pub mod store;
pub mod validate;
pub mod wal;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::coordinator::clock::{Clock, SystemClock};
use crate::coordinator::engine::{Engine, Health, StoreSettings};
use crate::coordinator::state::{Settings, State};
use crate::coordinator::store::{Store, StoreError};
use crate::proto;

pub use config::Config;

/// How long open streams may take to close at shutdown before they are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened or read.
    #[error("cannot open the store in {dir}: {source}")]
    Open {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The gRPC server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Stopped while the store had failed and was not reopened yet (or it
    /// could not be reopened in this process); nothing unacknowledged was
    /// promised, and a restart reopens it.
    #[error("stopped while the store had failed and was not reopened (see the log); a restart reopens it")]
    StoreFailed,
    /// A schedule declared in the config file was refused.
    #[error("declared schedule: {0}")]
    Declared(error::Error),
    /// The TLS certificate or key cannot be used.
    #[error("tls_cert/tls_key: {0}")]
    Tls(tonic::transport::Error),
    /// A start-up task panicked.
    #[error("start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A coordinator with its store open and its model rebuilt, ready to serve.
pub struct Coordinator {
    config: Config,
    store: Arc<Store>,
    state: State,
    clock: Arc<dyn Clock>,
}

impl Coordinator {
    /// Opens the store and rebuilds the model from it.
    pub async fn open(config: Config) -> Result<Coordinator, RunError> {
        server_builder(&config)?;
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Coordinator::open`] with a given time source.
    pub async fn open_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Coordinator, RunError> {
        let dir = config.data_dir.clone();
        let cache = config.cache_bytes;
        let settings = Settings {
            lease_timeout: config.lease_timeout,
            heartbeat_interval: config.heartbeat_interval,
            default_shutdown_grace: config.default_shutdown_grace,
            retention: config.retention,
        };
        let now = clock.now();
        let opened =
            tokio::task::spawn_blocking(move || State::load(&dir, cache, settings, now)).await?;
        let (store, mut state) = opened.map_err(|source| RunError::Open {
            dir: config.data_dir.clone(),
            source,
        })?;
        let jobs = state.job_count();
        // Declared schedules: created or updated now, durably, before serving.
        for schedule in &config.schedules {
            let (schedule, spec) =
                schedule::check::new_schedule("schedules", schedule.clone(), config.max_payload)
                    .map_err(RunError::Declared)?;
            state
                .declare_schedule(schedule, spec, clock.now())
                .map_err(RunError::Declared)?;
        }
        let round = state.take_round();
        if !round.writes.is_empty() {
            store
                .apply(round.writes)
                .and_then(|()| store.sync())
                .map_err(|source| RunError::Open {
                    dir: config.data_dir.clone(),
                    source,
                })?;
        }
        for effect in round.effects {
            effect(Ok(()));
        }
        tracing::info!(jobs, awaiting_deletion = state.sweep_pending(), dir = %config.data_dir.display(), "store opened");
        Ok(Coordinator {
            config,
            store: Arc::new(store),
            state,
            clock,
        })
    }

    /// Serves on `listener` until `shutdown` resolves (or the store fails),
    /// then stops accepting, ends open streams, and makes the last writes durable.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let root = CancellationToken::new();
        let place = StoreSettings {
            data_dir: self.config.data_dir.clone(),
            cache_bytes: self.config.cache_bytes,
            min_free_disk: self.config.min_free_disk,
            commit_stall: engine::COMMIT_STALL,
        };
        let (engine, engine_task) = Engine::start(
            self.state,
            self.store,
            self.clock,
            place,
            root.child_token(),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<proto::job_service_server::JobServiceServer<service::jobs::Jobs>>()
            .await;
        health
            .set_serving::<proto::worker_service_server::WorkerServiceServer<service::session::Sessions>>()
            .await;
        health
            .set_serving::<proto::admin_service_server::AdminServiceServer<service::admin::Admin>>()
            .await;
        health
            .set_serving::<proto::schedule_service_server::ScheduleServiceServer<service::schedules::Schedules>>()
            .await;
        let reflection = || {
            // Each version's builder lists both reflection services, so `list`
            // shows the same names whichever version a tool speaks.
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("the embedded descriptor sets are valid");
        let limits = &self.config.limits;
        let max_message = limits.max_message_size;
        let jobs = proto::job_service_server::JobServiceServer::new(
            service::jobs::Jobs::new(engine.clone(), self.config.max_payload)
                .with_max_message_size(max_message),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let sessions = proto::worker_service_server::WorkerServiceServer::new(
            service::session::Sessions::new(engine.clone()).with_limits(
                limits,
                self.config.heartbeat_interval,
                self.config.max_payload,
            ),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let admin = proto::admin_service_server::AdminServiceServer::new(
            service::admin::Admin::new(engine.clone()),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let schedules = proto::schedule_service_server::ScheduleServiceServer::new(
            service::schedules::Schedules::new(engine.clone(), self.config.max_payload)
                .with_max_message_size(max_message),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let health_service = health_service
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let reflection_v1 = reflection_v1
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let reflection_v1alpha = reflection_v1alpha
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);

        let stop = root.clone();
        let watcher = engine.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => tracing::info!("shutting down"),
                _ = watcher.stuck() => tracing::error!("the store cannot be reopened in this process; shutting down"),
            }
            stop.cancel();
        });
        tokio::spawn(follow_health(engine.health(), health.clone()));
        // Small messages (Assign, Complete) must not wait for Nagle's algorithm.
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let server_stop = root.clone();
        let builder = server_builder(&self.config)?;
        let server = tokio::spawn(
            builder
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .layer(auth::AuthLayer::new(self.config.tokens.clone()))
                .max_concurrent_streams(limits.max_concurrent_streams)
                .layer(service::message_size::MessageSizeLayer)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(jobs)
                .add_service(sessions)
                .add_service(admin)
                .add_service(schedules)
                .serve_with_incoming_shutdown(
                    incoming,
                    async move { server_stop.cancelled().await },
                ),
        );
        root.cancelled().await;
        health
            .set_not_serving::<proto::job_service_server::JobServiceServer<service::jobs::Jobs>>()
            .await;
        engine_task.wait().await;
        let served = match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
            Ok(joined) => joined?,
            Err(_) => {
                tracing::warn!("open streams did not close within {DRAIN_TIMEOUT:?}; cutting them");
                Ok(())
            }
        };
        let failed = engine.recovering_now();
        served?;
        if failed {
            return Err(RunError::StoreFailed);
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Reports the services NOT_SERVING on the health service while the engine
/// recovers from a store failure, and SERVING again once it has reopened it.
async fn follow_health(
    mut engine_health: tokio::sync::watch::Receiver<Health>,
    reporter: tonic_health::server::HealthReporter,
) {
    use proto::admin_service_server::AdminServiceServer;
    use proto::job_service_server::JobServiceServer;
    use proto::schedule_service_server::ScheduleServiceServer;
    use proto::worker_service_server::WorkerServiceServer;
    use tonic::server::NamedService;
    let names = [
        <JobServiceServer<service::jobs::Jobs> as NamedService>::NAME,
        <WorkerServiceServer<service::session::Sessions> as NamedService>::NAME,
        <AdminServiceServer<service::admin::Admin> as NamedService>::NAME,
        <ScheduleServiceServer<service::schedules::Schedules> as NamedService>::NAME,
    ];
    while engine_health.changed().await.is_ok() {
        let status = match *engine_health.borrow_and_update() {
            Health::Serving => tonic_health::ServingStatus::Serving,
            Health::Recovering(_) | Health::Stuck(_) => tonic_health::ServingStatus::NotServing,
        };
        for name in names {
            reporter.set_service_status(name, status).await;
        }
    }
}

/// A server builder with the config's TLS, if any (bad certificates or keys
/// are refused here, before anything is served).
fn server_builder(config: &Config) -> Result<tonic::transport::Server, RunError> {
    let builder = tonic::transport::Server::builder();
    let Some(tls) = &config.tls else {
        return Ok(builder);
    };
    let mut server_tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key));
    if let Some(ca) = &tls.client_ca {
        server_tls = server_tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
    }
    builder.tls_config(server_tls).map_err(RunError::Tls)
}

/// Opens the store in `config.data_dir`, serves on `listener` until `shutdown`
/// resolves, then stops cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    Coordinator::open(config)
        .await?
        .serve(listener, shutdown)
        .await
}
