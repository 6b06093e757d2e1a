//! Who may build, or pull at all: HTTP Basic credentials checked against an
//! htpasswd file with bcrypt hashes (the format of distribution's
//! `htpasswd` auth, made by `htpasswd -B`).
//!
//! | scope | anonymous | wrong credentials | right credentials |
//! |---|---|---|---|
//! | `build` | pulls images already built; `GET /v2/` gets the 401 challenge | 401 | pulls and builds |
//! | `all` | 401 for everything | 401 | pulls and builds |
//!
//! Clients decide whether to send credentials by the answer to `GET /v2/`
//! (skopeo and podman send them only to a registry that challenged there),
//! so even the `build` scope challenges it; an anonymous client goes on
//! without credentials and pulls whatever is built.
//!
//! A 401 carries `WWW-Authenticate: Basic realm="nixery"` and the spec's
//! `UNAUTHORIZED` error, which is what makes `docker login`, `podman login`,
//! `skopeo --creds` and containerd's `--user` send credentials.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), and clients
//! send credentials with every request, so credentials that passed are
//! remembered, as a SHA-256 of the pair, for a while.
//!
//! ```
//! use nixery::registry::auth::{Auth, Scope};
//! let hash = bcrypt::hash("s3cret", 4).unwrap();
//! let auth = Auth::parse(&format!("alice:{hash}\n"), Scope::Build).unwrap();
//! assert!(auth.verify("alice", "s3cret"));
//! assert!(!auth.verify("alice", "guess"));
//! assert!(!auth.verify("bob", "s3cret"));
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::{AppState, RegistryError};

/// The realm clients show when they ask for credentials.
pub const REALM: &str = "nixery";
/// How long credentials that passed are trusted without bcrypt.
const REMEMBER: Duration = Duration::from_secs(300);
/// The most remembered credentials (the oldest are dropped first).
const REMEMBER_MAX: usize = 1024;

/// What credentials are needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Building: anyone may pull what is already built.
    Build,
    /// Everything.
    All,
}

/// An htpasswd file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("line {line}: expected user:hash")]
    Malformed { line: usize },
    #[error("line {line}: the hash of {user:?} is not bcrypt ($2a$, $2b$ or $2y$); make it with htpasswd -B")]
    NotBcrypt { line: usize, user: String },
    #[error("the file lists no users")]
    Empty,
}

/// Whether a request carries good credentials; put in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    User(String),
}

pub struct Auth {
    users: HashMap<String, String>,
    scope: Scope,
    passed: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .field("scope", &self.scope)
            .finish()
    }
}

impl Auth {
    /// Reads an htpasswd file: `user:hash` lines, `#` comments.
    pub fn parse(text: &str, scope: Scope) -> Result<Auth, AuthError> {
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .filter(|(user, hash)| !user.is_empty() && !hash.is_empty())
                .ok_or(AuthError::Malformed { line: index + 1 })?;
            if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
                return Err(AuthError::NotBcrypt {
                    line: index + 1,
                    user: user.to_string(),
                });
            }
            users.insert(user.to_string(), hash.to_string());
        }
        if users.is_empty() {
            return Err(AuthError::Empty);
        }
        Ok(Auth {
            users,
            scope,
            passed: Mutex::default(),
        })
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Checks a user's password.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            // The same work as for a known user, so timing tells nothing.
            if let Some(any) = self.users.values().next() {
                let _ = bcrypt::verify(password, any);
            }
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .finalize()
            .into();
        {
            let passed = self.passed.lock().expect("never poisoned");
            if passed.get(&key).is_some_and(|at| at.elapsed() < REMEMBER) {
                return true;
            }
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        let mut passed = self.passed.lock().expect("never poisoned");
        if passed.len() >= REMEMBER_MAX {
            passed.retain(|_, at| at.elapsed() < REMEMBER);
            if passed.len() >= REMEMBER_MAX {
                passed.clear();
            }
        }
        passed.insert(key, Instant::now());
        true
    }

    /// Who is calling: `Err` for credentials that are present but wrong
    /// (or unreadable), which is always refused.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, RegistryError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        let wrong = || RegistryError::Unauthorized {
            reason: "the credentials are not valid",
        };
        let encoded = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Basic ").or(v.strip_prefix("basic ")))
            .ok_or_else(wrong)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| wrong())?;
        let decoded = String::from_utf8(decoded).map_err(|_| wrong())?;
        let (user, password) = decoded.split_once(':').ok_or_else(wrong)?;
        if user.is_empty() && password.is_empty() {
            // What a client without credentials answers a challenge with.
            return Ok(Caller::Anonymous);
        }
        if self.verify(user, password) {
            Ok(Caller::User(user.to_string()))
        } else {
            tracing::info!(user, "credentials refused");
            Err(wrong())
        }
    }
}

/// The middleware: puts the [`Caller`] in the request's extensions, and
/// refuses what the scope does not allow anonymously.
pub(super) async fn check(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = match &state.auth {
        None => Caller::Anonymous,
        Some(auth) => match checked(auth.clone(), req.headers().clone()).await {
            Err(refused) => return refused.into_response(),
            Ok(Caller::Anonymous) if auth.scope() == Scope::All || is_base(req.uri().path()) => {
                return RegistryError::Unauthorized {
                    reason: "this registry needs credentials",
                }
                .into_response()
            }
            Ok(caller) => caller,
        },
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// [`Auth::caller`] off the async threads: bcrypt takes its time on
/// purpose, and a flood of wrong passwords must not stall other requests.
async fn checked(auth: std::sync::Arc<Auth>, headers: HeaderMap) -> Result<Caller, RegistryError> {
    tokio::task::spawn_blocking(move || auth.caller(&headers))
        .await
        .unwrap_or(Err(RegistryError::Unauthorized {
            reason: "the credentials could not be checked",
        }))
}

/// `GET /v2/`, where clients learn that a registry takes credentials.
fn is_base(path: &str) -> bool {
    path == "/v2/" || path == "/v2"
}

/// Whether this request may start a build.
pub(super) fn may_build(state: &AppState, caller: Option<&Caller>) -> bool {
    match (&state.auth, caller) {
        (None, _) => true,
        (Some(_), Some(Caller::User(_))) => true,
        (Some(_), Some(Caller::Anonymous) | None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        headers
    }

    #[test]
    fn the_file_format() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let auth = Auth::parse(&format!("# team\n\nalice:{hash}\n"), Scope::All).unwrap();
        assert_eq!(auth.users.len(), 1);
        assert!(matches!(
            Auth::parse("alice\n", Scope::All),
            Err(AuthError::Malformed { line: 1 })
        ));
        assert!(matches!(
            Auth::parse("alice:{SHA}abc\n", Scope::All),
            Err(AuthError::NotBcrypt { line: 1, .. })
        ));
        assert!(matches!(
            Auth::parse("# nobody\n", Scope::All),
            Err(AuthError::Empty)
        ));
    }

    #[test]
    fn callers() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let auth = Auth::parse(&format!("alice:{hash}"), Scope::Build).unwrap();
        assert_eq!(auth.caller(&HeaderMap::new()).unwrap(), Caller::Anonymous);
        assert_eq!(auth.caller(&basic("", "")).unwrap(), Caller::Anonymous);
        assert_eq!(
            auth.caller(&basic("alice", "pw")).unwrap(),
            Caller::User("alice".into())
        );
        // Remembered, and still right.
        assert_eq!(
            auth.caller(&basic("alice", "pw")).unwrap(),
            Caller::User("alice".into())
        );
        for headers in [basic("alice", "nope"), basic("mallory", "pw")] {
            assert!(auth.caller(&headers).is_err());
        }
        let mut garbage = HeaderMap::new();
        garbage.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!!notbase64"),
        );
        assert!(auth.caller(&garbage).is_err());
        garbage.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(auth.caller(&garbage).is_err());
    }
}
