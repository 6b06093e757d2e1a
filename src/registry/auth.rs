//! Who may build, or pull at all: users of an htpasswd file with bcrypt
//! hashes (the format of distribution's `htpasswd` auth, made by
//! `htpasswd -B`), and the bearer tokens of [`super::token`].
//!
//! | scope | anonymous | wrong credentials | right credentials |
//! |---|---|---|---|
//! | `build` | pulls images already built | 401 | pulls and builds |
//! | `all` | 401 for everything | 401 | pulls and builds |
//!
//! Clients decide how to authenticate by the answer to `GET /v2/`, so it
//! always challenges, in both scopes, with the distribution spec's Bearer
//! challenge (`Bearer realm="<url>/token",service="<service>"`). docker,
//! containerd, podman and skopeo then ask `/token` for a token (anonymously,
//! or with the user's credentials as Basic) and send it as
//! `Authorization: Bearer`. A request a token does not cover gets `401`
//! and a challenge naming the scope it needs, with
//! `error="insufficient_scope"`: an anonymous token pulls what is built,
//! and a pull that would build asks for `pull,build`, which only users get.
//!
//! Clients that send Basic credentials with every request (`curl -u`,
//! scripts) keep working: Basic is accepted wherever a token is. So is no
//! `Authorization` at all, in the `build` scope, for what is built. Pages
//! outside `/v2/` (the landing page, build status, metrics) challenge with
//! `Basic realm="nixery"` in the `all` scope, which browsers understand.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), so credentials
//! that passed are remembered, as a SHA-256 of the pair, for a while, and
//! checks that are not remembered are bounded by [`super::login`] (wrong
//! passwords from one address cannot slow down another's login). An
//! `Authorization` header over [`MAX_AUTHORIZATION`] bytes is refused before
//! it is read.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::login::{Client, Logins, Outcome};
use super::token::{Claims, KeyError, KeySet, Tokens, BUILD, PULL};
use super::{AppState, RegistryError};

/// The realm clients show when they ask for credentials.
pub const REALM: &str = "nixery";
/// The `service` of a registry that was given no public URL.
pub const DEFAULT_SERVICE: &str = "nixery";
/// The longest `Authorization` header read: a Basic pair or one of our
/// tokens fits with room to spare.
pub const MAX_AUTHORIZATION: usize = 8192;
/// What a pull that would build is told when its token cannot build.
const NEEDS_LOGIN: &str =
    "this image is not built yet, and building it needs credentials: log in first";
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
    #[error("no token key: {0}")]
    Keys(#[from] KeyError),
}

/// Who a request comes from; put in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No credentials, or an empty Basic pair.
    Anonymous,
    /// Basic credentials that passed: may do everything.
    User(String),
    /// A valid token: may do what it says.
    Token(Claims),
}

impl Caller {
    /// Whether this caller may do `action` to `repository`.
    fn may(&self, repository: &str, action: &str) -> bool {
        match self {
            Caller::Anonymous => false,
            Caller::User(_) => true,
            Caller::Token(claims) => claims.allows(repository, action),
        }
    }

    /// Whether a user (not an anonymous client) is behind this.
    fn is_user(&self) -> bool {
        match self {
            Caller::Anonymous => false,
            Caller::User(_) => true,
            Caller::Token(claims) => claims.is_user(),
        }
    }
}

pub struct Auth {
    users: HashMap<String, String>,
    scope: Scope,
    passed: Mutex<HashMap<[u8; 32], Instant>>,
    tokens: Tokens,
    logins: Logins,
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
        // Tokens of this process alone until `with_tokens` shares them.
        let keys = KeySet::parse(&KeySet::generate()?)?;
        Ok(Auth {
            users,
            scope,
            passed: Mutex::default(),
            tokens: Tokens::new(keys, DEFAULT_SERVICE, super::token::DEFAULT_TTL),
            logins: Logins::new(super::login::DEFAULT_FAILURES),
        })
    }

    /// Issues and checks tokens with `tokens` (shared by every instance).
    pub fn with_tokens(mut self, tokens: Tokens) -> Auth {
        self.tokens = tokens;
        self
    }

    /// Refuses an address's logins after `failures` wrong passwords in a
    /// minute.
    pub fn with_login_failures(mut self, failures: u32) -> Auth {
        self.logins = Logins::new(failures);
        self
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Checks a user's password: remembered, or with bcrypt.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.remembered(user, password) || self.check_password(user, password)
    }

    /// The remembered key of a user's credentials (`None`: no such user).
    fn passed_key(&self, user: &str, password: &str) -> Option<[u8; 32]> {
        let hash = self.users.get(user)?;
        Some(
            Sha256::new()
                .chain_update(user.as_bytes())
                .chain_update([0])
                .chain_update(password.as_bytes())
                .chain_update([0])
                .chain_update(hash.as_bytes())
                .finalize()
                .into(),
        )
    }

    /// Whether these credentials passed bcrypt a short while ago: no
    /// bcrypt, no limits.
    pub fn remembered(&self, user: &str, password: &str) -> bool {
        let Some(key) = self.passed_key(user, password) else {
            return false;
        };
        let passed = self.passed.lock().expect("never poisoned");
        passed.get(&key).is_some_and(|at| at.elapsed() < REMEMBER)
    }

    /// bcrypt (slow), remembering credentials that pass.
    fn check_password(&self, user: &str, password: &str) -> bool {
        let (Some(hash), Some(key)) = (self.users.get(user), self.passed_key(user, password))
        else {
            // The same work as for a known user, so timing tells nothing.
            if let Some(any) = self.users.values().next() {
                let _ = bcrypt::verify(password, any);
            }
            return false;
        };
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

    /// Checks Basic credentials from `client`, within the bounds of
    /// [`super::login`]: `401` when wrong, `429` when this address has
    /// failed too often.
    pub async fn login(
        self: &Arc<Self>,
        client: Client,
        user: &str,
        password: &str,
    ) -> Result<Caller, RegistryError> {
        if user.is_empty() && password.is_empty() {
            // What a client without credentials answers a challenge with.
            return Ok(Caller::Anonymous);
        }
        if self.remembered(user, password) {
            return Ok(Caller::User(user.to_string()));
        }
        let auth = self.clone();
        let (u, p) = (user.to_string(), password.to_string());
        match self
            .logins
            .check(client, move || auth.check_password(&u, &p))
            .await
        {
            Outcome::Passed => Ok(Caller::User(user.to_string())),
            Outcome::Failed => {
                tracing::info!(user, ?client, "credentials refused");
                Err(RegistryError::Unauthorized {
                    reason: "the credentials are not valid",
                })
            }
            Outcome::Throttled { retry_after } => {
                tracing::info!(user, ?client, "login throttled");
                Err(RegistryError::TooManyRequests {
                    retry_after: retry_after.as_secs().max(1),
                })
            }
        }
    }

    /// Who is calling, by the `Authorization` header: `Err` for
    /// credentials that are present but wrong, unreadable or too large,
    /// which are always refused.
    pub async fn caller(
        self: &Arc<Self>,
        headers: &HeaderMap,
        client: Client,
    ) -> Result<Caller, RegistryError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        if value.len() > MAX_AUTHORIZATION {
            return Err(RegistryError::Unauthorized {
                reason: "the Authorization header is too large",
            });
        }
        let wrong = || RegistryError::Unauthorized {
            reason: "the credentials are not valid",
        };
        let value = value.to_str().map_err(|_| wrong())?;
        if let Some(token) = bearer(value) {
            return match self.tokens.verify(token).await {
                Ok(claims) => Ok(Caller::Token(claims)),
                Err(e) => Err(RegistryError::Unauthorized { reason: e.reason() }),
            };
        }
        let (user, password) = basic(value).ok_or_else(wrong)?;
        self.login(client, &user, &password).await
    }
}

/// The token of a `Bearer` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The user and password of a `Basic` header value.
pub(super) fn basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The middleware: puts the [`Caller`] in the request's extensions, and
/// refuses what the caller may not do, with the challenge that tells the
/// client how to get it.
pub(super) async fn check(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(auth) = state.auth.clone() else {
        req.extensions_mut().insert(Caller::Anonymous);
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    if path == super::token::PATH {
        // The token endpoint checks credentials itself.
        return next.run(req).await;
    }
    let client = Client::of(&req);
    let v2 = path == "/v2" || path.starts_with("/v2/");
    let repository = repository_of(&path).map(str::to_string);
    let repository = repository.as_deref();
    let presented_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| bearer(v).is_some());
    // The challenge names the error (RFC 6750, section 3) with its
    // description: docker shows the description, not the body.
    let refuse = |error: RegistryError, code: Option<&str>, headers: &HeaderMap| {
        let description = error.to_string();
        let mut response = error.into_response();
        if response.status() == StatusCode::UNAUTHORIZED {
            let error = code.map(|code| (code, description.as_str()));
            let value = challenge(&state, &auth, headers, v2, repository, &[PULL], error);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    };
    let caller = match auth.caller(req.headers(), client).await {
        Ok(caller) => caller,
        Err(error) => {
            let code = presented_token.then_some("invalid_token");
            return refuse(error, code, req.headers());
        }
    };
    let needs_user = auth.scope() == Scope::All;
    let allowed = match (v2, repository) {
        // `GET /v2/` (and anything else there): where clients learn that
        // credentials, or at least a token, are wanted.
        (true, None) => !matches!(caller, Caller::Anonymous) && (!needs_user || caller.is_user()),
        (true, Some(repository)) => match &caller {
            Caller::Anonymous => !needs_user,
            caller => caller.may(repository, PULL) && (!needs_user || caller.is_user()),
        },
        (false, _) => !needs_user || caller.is_user(),
    };
    if !allowed {
        let (reason, code) = match (&caller, repository) {
            (Caller::Anonymous, _) | (_, None) => ("this registry needs credentials", None),
            (_, Some(_)) => (
                "the token does not allow pulling this repository",
                Some("insufficient_scope"),
            ),
        };
        return refuse(RegistryError::Unauthorized { reason }, code, req.headers());
    }
    let headers = req.headers().clone();
    req.extensions_mut().insert(caller);
    let mut response = next.run(req).await;
    // A 401 from a handler: the image needs building, which needs more
    // than this caller has.
    if v2 && response.status() == StatusCode::UNAUTHORIZED {
        let error = presented_token.then_some(("insufficient_scope", NEEDS_LOGIN));
        let value = challenge(
            &state,
            &auth,
            &headers,
            v2,
            repository,
            &[PULL, BUILD],
            error,
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The `WWW-Authenticate` value of a 401: the distribution spec's Bearer
/// challenge under `/v2/`, Basic (which browsers answer) elsewhere.
fn challenge(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    v2: bool,
    repository: Option<&str>,
    actions: &[&str],
    error: Option<(&str, &str)>,
) -> HeaderValue {
    let basic = HeaderValue::from_static(concat!("Basic realm=\"", "nixery", "\""));
    if !v2 {
        return basic;
    }
    let mut value = format!(
        "Bearer realm=\"{}{}\",service=\"{}\"",
        state.base_url(headers),
        super::token::PATH,
        auth.tokens.service()
    );
    if let Some(repository) = repository {
        value.push_str(&format!(
            ",scope=\"repository:{repository}:{}\"",
            actions.join(",")
        ));
    }
    if let Some((code, description)) = error {
        let description: String = description
            .chars()
            .filter(|c| (c.is_ascii_graphic() && *c != '"' && *c != '\\') || *c == ' ')
            .collect();
        value.push_str(&format!(
            ",error=\"{code}\",error_description=\"{description}\""
        ));
    }
    HeaderValue::from_str(&value).unwrap_or(basic)
}

/// The repository a `/v2/` path is about, if it is one the registry
/// serves: `/v2/<name>/{manifests,blobs,referrers}/<reference>` or
/// `/v2/<name>/tags/list`.
pub(super) fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(name).filter(|n| !n.is_empty());
    }
    let (front, _reference) = rest.rsplit_once('/')?;
    let (name, kind) = front.rsplit_once('/')?;
    matches!(kind, "manifests" | "blobs" | "referrers")
        .then_some(name)
        .filter(|n| !n.is_empty())
}

/// Whether this request may start a build of `repository`.
pub(super) fn may_build(state: &AppState, caller: Option<&Caller>, repository: &str) -> bool {
    match (&state.auth, caller) {
        (None, _) => true,
        (Some(_), Some(caller)) => caller.may(repository, BUILD),
        (Some(_), None) => false,
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

    #[tokio::test]
    async fn callers() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let auth = Arc::new(Auth::parse(&format!("alice:{hash}"), Scope::Build).unwrap());
        let client = Client::Unknown;
        let caller = |headers: HeaderMap| {
            let auth = auth.clone();
            async move { auth.caller(&headers, client).await }
        };
        assert_eq!(caller(HeaderMap::new()).await.unwrap(), Caller::Anonymous);
        assert_eq!(caller(basic("", "")).await.unwrap(), Caller::Anonymous);
        assert_eq!(
            caller(basic("alice", "pw")).await.unwrap(),
            Caller::User("alice".into())
        );
        // Remembered, and still right.
        assert!(auth.remembered("alice", "pw"));
        assert_eq!(
            caller(basic("alice", "pw")).await.unwrap(),
            Caller::User("alice".into())
        );
        for headers in [basic("alice", "nope"), basic("mallory", "pw")] {
            assert!(caller(headers).await.is_err());
        }
        let mut garbage = HeaderMap::new();
        garbage.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!!notbase64"),
        );
        assert!(caller(garbage.clone()).await.is_err());
        garbage.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(caller(garbage.clone()).await.is_err());
        garbage.insert(header::AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert!(caller(garbage.clone()).await.is_err());
        let huge = format!("Basic {}", "A".repeat(MAX_AUTHORIZATION));
        garbage.insert(header::AUTHORIZATION, HeaderValue::from_str(&huge).unwrap());
        assert!(matches!(
            caller(garbage).await,
            Err(RegistryError::Unauthorized { reason }) if reason.contains("too large")
        ));
        // A token of this registry.
        let issued = auth.tokens().issue("", vec![]).await;
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", issued.token)).unwrap(),
        );
        assert!(matches!(caller(bearer).await, Ok(Caller::Token(c)) if c.sub.is_empty()));
    }

    #[test]
    fn repositories_of_paths() {
        assert_eq!(repository_of("/v2/"), None);
        assert_eq!(
            repository_of("/v2/shell/hello/manifests/latest"),
            Some("shell/hello")
        );
        assert_eq!(repository_of("/v2/hello/blobs/sha256:00"), Some("hello"));
        assert_eq!(repository_of("/v2/a/b/tags/list"), Some("a/b"));
        assert_eq!(
            repository_of("/v2/hello/referrers/sha256:00"),
            Some("hello")
        );
        assert_eq!(repository_of("/v2/_catalog"), None);
        assert_eq!(repository_of("/v2//manifests/x"), None);
        assert_eq!(repository_of("/builds"), None);
    }
}
