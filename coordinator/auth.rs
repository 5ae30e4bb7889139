//! Authentication: bearer tokens with roles, checked before any handler runs.
//!
//! A request carries `authorization: Bearer <token>`. The coordinator keeps
//! only each token's SHA-256 (from its config file or `ROTA_TOKENS`), hashes
//! what it is shown and compares it with every configured hash in constant
//! time, so neither the stored secrets nor the comparison leak a token.
//!
//! Roles:
//! - `client`: JobService, ScheduleService, and AdminService's reads
//!   (`ListWorkers`, `GetQueueStats`);
//! - `worker`: WorkerService (the `Session` stream);
//! - `admin`: everything, including `DrainWorker`.
//!
//! Health and reflection stay open: load balancers probe health without a
//! credential, and reflection describes the API (no data). A missing or unknown
//! token is `UNAUTHENTICATED`; a known token of the wrong role is
//! `PERMISSION_DENIED`. With no token configured, nothing is checked (the
//! binary refuses to listen beyond loopback in that case unless `--insecure`).
//!
//! [`required`] and [`Tokens::check`] are the pure decisions; [`AuthLayer`] is
//! the tower layer that applies them to every HTTP/2 request.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Submit and read jobs, manage schedules, read worker and queue state.
    Client,
    /// Open worker sessions.
    Worker,
    /// Everything.
    Admin,
}

impl Role {
    /// The role named `text` (`client`, `worker` or `admin`).
    pub fn parse(text: &str) -> Result<Role, AuthError> {
        match text {
            "client" => Ok(Role::Client),
            "worker" => Ok(Role::Worker),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::UnknownRole(other.to_string())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        })
    }
}

/// Why a token definition or a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A role other than client, worker or admin.
    #[error("unknown role {0:?}: expected client, worker or admin")]
    UnknownRole(String),
    /// A configured hash that is not 64 hex digits.
    #[error("sha256 must be 64 hex digits (the SHA-256 of the token, e.g. from `printf %s TOKEN | sha256sum`), got {0:?}")]
    BadHash(String),
    /// A `ROTA_TOKENS` entry that is not `role:sha256`.
    #[error("token entry {0:?} is not role:sha256 (e.g. client:5e88…)")]
    BadEntry(String),
    /// No `authorization` metadata.
    #[error("missing credentials: send `authorization: Bearer <token>`")]
    Missing,
    /// `authorization` present but not `Bearer <token>`.
    #[error("malformed authorization metadata: expected `Bearer <token>`")]
    Malformed,
    /// The token matches none configured.
    #[error("invalid token")]
    Unknown,
    /// A valid token whose role may not call this method.
    #[error("role {role} may not call {method}")]
    Forbidden {
        /// The token's role.
        role: Role,
        /// The gRPC method path.
        method: String,
    },
}

/// One configured token: its role and the SHA-256 of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash {
    /// For logs: who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    sha256: [u8; 32],
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHash")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl TokenHash {
    /// A token from its role and the hex SHA-256 of its secret.
    pub fn new(name: impl Into<String>, role: Role, sha256_hex: &str) -> Result<Self, AuthError> {
        let sha256 =
            parse_hex32(sha256_hex).ok_or_else(|| AuthError::BadHash(sha256_hex.to_string()))?;
        Ok(TokenHash {
            name: name.into(),
            role,
            sha256,
        })
    }

    /// Parses `ROTA_TOKENS`: entries `role:sha256hex`, separated by commas or
    /// whitespace.
    pub fn parse_list(text: &str) -> Result<Vec<TokenHash>, AuthError> {
        text.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, entry)| {
                let (role, hash) = entry
                    .split_once(':')
                    .ok_or_else(|| AuthError::BadEntry(entry.to_string()))?;
                TokenHash::new(format!("ROTA_TOKENS[{i}]"), Role::parse(role)?, hash)
            })
            .collect()
    }
}

/// The hex SHA-256 of a token (what the config stores).
pub fn hash_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens(Vec<TokenHash>);

impl Tokens {
    /// These tokens.
    pub fn new(tokens: Vec<TokenHash>) -> Self {
        Tokens(tokens)
    }

    /// No token configured: authentication is off.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The role of the token in `authorization` (the metadata's value), or
    /// why there is none. Every configured hash is compared, in constant time.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<&TokenHash, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = bearer(value).ok_or(AuthError::Malformed)?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for t in &self.0 {
            if bool::from(t.sha256.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        found.ok_or(AuthError::Unknown)
    }
}

fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, reflection).
    Open,
    /// These roles (admin may always).
    Roles(&'static [Role]),
}

/// Who may call the gRPC method at `path` (`/package.Service/Method`).
pub fn required(path: &str) -> Access {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        "rota.v1.JobService" | "rota.v1.ScheduleService" => Access::Roles(&[Role::Client]),
        "rota.v1.AdminService" if method == "DrainWorker" => Access::Roles(&[]),
        "rota.v1.AdminService" => Access::Roles(&[Role::Client]),
        "rota.v1.WorkerService" => Access::Roles(&[Role::Worker]),
        // Anything else is answered UNIMPLEMENTED, but only to a known token.
        _ => Access::Roles(&[Role::Client, Role::Worker]),
    }
}

/// The decision for one request: `Ok` to pass it on.
pub fn authorize(
    tokens: &Tokens,
    path: &str,
    authorization: Option<&[u8]>,
) -> Result<(), AuthError> {
    if tokens.is_empty() {
        return Ok(());
    }
    let Access::Roles(roles) = required(path) else {
        return Ok(());
    };
    let token = tokens.check(authorization)?;
    if token.role == Role::Admin || roles.contains(&token.role) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            role: token.role,
            method: path.to_string(),
        })
    }
}

/// The tower layer that authorizes every request (see the module docs).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
}

impl AuthLayer {
    /// Checks requests against `tokens` (none: every request passes).
    pub fn new(tokens: Tokens) -> Self {
        AuthLayer {
            tokens: Arc::new(tokens),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, BoxFuture<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let decision = authorize(
            &self.tokens,
            req.uri().path(),
            req.headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match decision {
            Ok(()) => futures::future::Either::Left(self.inner.call(req)),
            Err(e) => {
                tracing::debug!(method = req.uri().path(), error = %e, "refused");
                let status = match e {
                    AuthError::Forbidden { .. } => tonic::Status::permission_denied(e.to_string()),
                    _ => tonic::Status::unauthenticated(e.to_string()),
                };
                futures::future::Either::Right(Box::pin(async move { Ok(status.into_http()) }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(vec![
            TokenHash::new("c", Role::Client, &hash_hex("client-secret")).unwrap(),
            TokenHash::new("w", Role::Worker, &hash_hex("worker-secret")).unwrap(),
            TokenHash::new("a", Role::Admin, &hash_hex("admin-secret")).unwrap(),
        ])
    }

    fn call(path: &str, auth: Option<&str>) -> Result<(), AuthError> {
        authorize(&tokens(), path, auth.map(str::as_bytes))
    }

    #[test]
    fn hashes_are_sha256_in_lower_hex() {
        // printf %s password | sha256sum
        assert_eq!(
            hash_hex("password"),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }

    #[test]
    fn each_role_reaches_its_services_only() {
        let submit = "/rota.v1.JobService/SubmitJob";
        let session = "/rota.v1.WorkerService/Session";
        let drain = "/rota.v1.AdminService/DrainWorker";
        let list = "/rota.v1.AdminService/ListWorkers";
        let put = "/rota.v1.ScheduleService/PutSchedule";
        let client = Some("Bearer client-secret");
        let worker = Some("Bearer worker-secret");
        let admin = Some("bearer admin-secret");
        for ok in [
            (submit, client),
            (put, client),
            (list, client),
            (session, worker),
        ] {
            assert_eq!(call(ok.0, ok.1), Ok(()), "{ok:?}");
        }
        for path in [submit, session, drain, list, put] {
            assert_eq!(call(path, admin), Ok(()), "admin on {path}");
        }
        for denied in [
            (session, client),
            (drain, client),
            (submit, worker),
            (drain, worker),
        ] {
            assert!(
                matches!(call(denied.0, denied.1), Err(AuthError::Forbidden { .. })),
                "{denied:?}"
            );
        }
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let submit = "/rota.v1.JobService/SubmitJob";
        assert_eq!(call(submit, None), Err(AuthError::Missing));
        assert_eq!(
            call(submit, Some("client-secret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            call(submit, Some("Basic client-secret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(call(submit, Some("Bearer ")), Err(AuthError::Malformed));
        assert_eq!(
            call(submit, Some("Bearer client-secreT")),
            Err(AuthError::Unknown)
        );
        assert_eq!(call("/rota.v1.Nope/X", None), Err(AuthError::Missing));
    }

    #[test]
    fn health_and_reflection_are_open_and_no_tokens_means_no_checks() {
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(call(path, None), Ok(()));
        }
        let none = Tokens::default();
        assert_eq!(
            authorize(&none, "/rota.v1.JobService/SubmitJob", None),
            Ok(())
        );
    }

    #[test]
    fn token_lists_parse_and_bad_entries_are_named() {
        let h = hash_hex("x");
        let list = TokenHash::parse_list(&format!(
            "client:{h}, admin:{h}\nworker:{}",
            h.to_uppercase()
        ))
        .unwrap();
        assert_eq!(
            list.iter().map(|t| t.role).collect::<Vec<_>>(),
            vec![Role::Client, Role::Admin, Role::Worker]
        );
        assert_eq!(
            TokenHash::parse_list("client").unwrap_err(),
            AuthError::BadEntry("client".into())
        );
        assert_eq!(
            TokenHash::parse_list(&format!("root:{h}")).unwrap_err(),
            AuthError::UnknownRole("root".into())
        );
        assert!(matches!(
            TokenHash::parse_list("client:abc").unwrap_err(),
            AuthError::BadHash(_)
        ));
    }

    #[test]
    fn debug_output_never_shows_the_hash() {
        let t = TokenHash::new("ci", Role::Client, &hash_hex("s")).unwrap();
        assert!(!format!("{t:?}").contains(&hash_hex("s")[..16]));
    }
}
