//! Bearer tokens, as the distribution spec's token authentication
//! (distribution's `docs/spec/auth/token.md`, "Docker Registry v2
//! authentication via central service") and Docker Hub use them. docker
//! needs this flow: once `GET /v2/` answers a Basic challenge, it sends
//! credentials with every request or fails, so an anonymous pull of a built
//! image only works with tokens.
//!
//! 1. `GET /v2/` without credentials: `401` with
//!    `WWW-Authenticate: Bearer realm="https://reg.example/token",service="reg.example"`.
//! 2. `GET /token?service=reg.example&scope=repository:shell/hello:pull`,
//!    with Basic credentials or none (containerd first tries the OAuth2
//!    `POST /token` password grant, which is answered the same way):
//!    `{"token": T, "access_token": T, "expires_in": 300, "issued_at": "..."}`.
//! 3. Every further request carries `Authorization: Bearer T`. A request
//!    the token does not cover gets `401` with the challenge naming the
//!    scope it needs and `error="insufficient_scope"`.
//!
//! | who asks | `NIXERY_AUTH_SCOPE=build` | `all` |
//! |---|---|---|
//! | anonymous | `pull` | refused: `401` |
//! | an htpasswd user | `pull`, `build` | `pull`, `build` |
//!
//! `build` is this registry's own action: a manifest request by tag whose
//! image is not built yet starts a build only with it.
//!
//! This module is the tokens themselves: claims, keys, issuing and
//! checking. The `/token` endpoint that hands them out is
//! `token_endpoint.rs`; the middleware that reads them is [`super::auth`].
//!
//! A token is a JWT signed with HS256 (only this registry issues and checks
//! them, so a shared secret is enough), with the claims `iss` (`nixery`),
//! `aud` (the service), `sub` (the user, empty when anonymous), `iat`,
//! `nbf`, `exp` and `access` in the spec's form
//! (`[{"type":"repository","name":"shell/hello","actions":["pull"]}]`).
//! Checking a token checks its algorithm (HS256 only: `alg=none` and
//! every other algorithm are refused), its key (`kid`), signature, expiry,
//! start, issuer and audience.
//!
//! The keys are a [`KeySet`]: one base64 secret of at least 32 bytes a
//! line, `#` comments; the first line signs, every line verifies. Every
//! instance of the registry reads the same set from storage
//! (`auth/token-key` by default, `NIXERY_TOKEN_KEY`), re-reading it every
//! [`KEY_REFRESH`]; the first instance to find none creates it with a
//! create-only write, so all instances agree on it. docs/security.md
//! says how to rotate it.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use nixery::registry::token::{Access, KeySet, Tokens, PULL};
//! let keys = KeySet::parse(&KeySet::generate().unwrap()).unwrap();
//! let tokens = Tokens::new(keys, "reg.example", Duration::from_secs(300));
//! let issued = tokens
//!     .issue("", vec![Access::repository("shell/hello", &[PULL])])
//!     .await;
//! let claims = tokens.verify(&issued.token).await.unwrap();
//! assert!(claims.allows("shell/hello", PULL));
//! assert!(!claims.allows("shell/hello", "build"));
//! assert!(tokens.verify(&format!("{}x", issued.token)).await.is_err());
//! # });
//! ```

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::{Storage, StorageError};

/// The action that pulls: manifests, blobs, tags and referrers.
pub const PULL: &str = "pull";
/// The action that starts a build of an image not built yet.
pub const BUILD: &str = "build";
/// Every token's `iss`.
pub const ISSUER: &str = "nixery";
/// Where the key set is kept in storage unless `NIXERY_TOKEN_KEY` says.
pub const DEFAULT_KEY_OBJECT: &str = "auth/token-key";
/// How long a token lasts unless `NIXERY_TOKEN_TTL` says.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// How often each instance reads the key set again (for rotation).
pub const KEY_REFRESH: Duration = Duration::from_secs(60);
/// Shortest secret accepted: HS256's own strength.
pub const MIN_SECRET_BYTES: usize = 32;
/// The most repositories one token request may name.
pub const MAX_SCOPES: usize = 16;
/// Clock difference between instances tolerated in `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 10;
/// A longer token is not one of ours; refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8192;

/// One entry of a token's `access` claim: what may be done to what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    pub fn repository(name: &str, actions: &[&str]) -> Access {
        Access {
            kind: "repository".to_string(),
            name: name.to_string(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The htpasswd user, or empty for an anonymous token.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    #[serde(default)]
    pub access: Vec<Access>,
}

impl Claims {
    /// Whether the token lets `action` be done to `repository`.
    pub fn allows(&self, repository: &str, action: &str) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository" && a.name == repository && a.actions.iter().any(|x| x == action)
        })
    }

    /// Whether a user (not an anonymous client) asked for it.
    pub fn is_user(&self) -> bool {
        !self.sub.is_empty()
    }
}

/// A key set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("line {line}: not a base64 secret")]
    NotBase64 { line: usize },
    #[error("line {line}: a secret needs at least {MIN_SECRET_BYTES} bytes, this one has {len}")]
    TooShort { line: usize, len: usize },
    #[error("the key set lists no key")]
    Empty,
    #[error("the system's random source failed: {0}")]
    Random(String),
    #[error("the key set {object} vanished right after another instance created it")]
    Vanished { object: String },
    #[error("{object}: {source}")]
    Stored {
        object: String,
        source: Box<KeyError>,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is too large")]
    TooLarge,
    #[error("the token is not a signed token of this registry")]
    Malformed,
    #[error("the token is signed with an algorithm this registry does not use")]
    Algorithm,
    #[error("the token is signed with a key this registry does not know")]
    UnknownKey,
    #[error("the token's signature is not valid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued for another registry")]
    Audience,
}

impl TokenError {
    /// What the client is told (the `Unauthorized` reason).
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::TooLarge => "the token is too large",
            TokenError::Malformed => "the token is not a signed token of this registry",
            TokenError::Algorithm => "the token's algorithm is not HS256",
            TokenError::UnknownKey => "the token is signed with a key this registry does not know",
            TokenError::Signature => "the token's signature is not valid",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::Audience => "the token was issued for another registry",
        }
    }
}

struct Key {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The secrets tokens are signed with: the first signs, all verify.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeySet").field("ids", &ids).finish()
    }
}

impl KeySet {
    /// Reads a key set: one base64 secret a line, `#` comments.
    pub fn parse(text: &str) -> Result<KeySet, KeyError> {
        let mut keys = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let secret = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| KeyError::NotBase64 { line: index + 1 })?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(KeyError::TooShort {
                    line: index + 1,
                    len: secret.len(),
                });
            }
            let hash = Sha256::digest(&secret);
            let key = || KeyError::NotBase64 { line: index + 1 };
            keys.push(Key {
                // Names the key without telling anything about it.
                id: hex::encode(&hash[..8]),
                encoding: EncodingKey::from_secret(&secret).map_err(|_| key())?,
                decoding: DecodingKey::from_secret(&secret).map_err(|_| key())?,
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// The text of a new key set with one random 32-byte secret.
    pub fn generate() -> Result<String, KeyError> {
        let mut secret = [0u8; MIN_SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(format!(
            "# nixery token signing keys: the first line signs, every line verifies\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(secret)
        ))
    }

    /// The ids (`kid`) of the keys, signing key first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    fn find(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// A token just issued, as the token endpoint answers it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: u64,
}

/// Where the keys come from.
enum Source {
    /// Given once: this process alone.
    Fixed,
    /// Read from storage, and read again every [`KEY_REFRESH`].
    Stored {
        storage: Arc<dyn Storage>,
        object: String,
    },
}

struct Loaded {
    keys: Arc<KeySet>,
    at: Instant,
}

/// Issues and checks this registry's tokens.
pub struct Tokens {
    service: String,
    ttl: Duration,
    source: Source,
    loaded: RwLock<Loaded>,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("service", &self.service)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Tokens {
    /// Tokens signed with `keys`, in this process alone.
    pub fn new(keys: KeySet, service: &str, ttl: Duration) -> Tokens {
        Tokens {
            service: service.to_string(),
            ttl,
            source: Source::Fixed,
            loaded: RwLock::new(Loaded {
                keys: Arc::new(keys),
                at: Instant::now(),
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Tokens signed with the key set under `object` in `storage`, created
    /// there if there is none yet: every instance on the same storage
    /// accepts every other's tokens.
    pub async fn shared(
        storage: Arc<dyn Storage>,
        object: &str,
        service: &str,
        ttl: Duration,
    ) -> Result<Tokens, KeyError> {
        let keys = load_or_create(&*storage, object).await?;
        let mut tokens = Tokens::new(keys, service, ttl);
        tokens.source = Source::Stored {
            storage,
            object: object.to_string(),
        };
        Ok(tokens)
    }

    /// The `service` of challenges, and every token's audience.
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A signed token for `subject` (empty: anonymous) with `access`.
    pub async fn issue(&self, subject: &str, access: Vec<Access>) -> Issued {
        let keys = self.keys().await;
        let key = &keys.keys[0];
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: subject.to_string(),
            aud: self.service.clone(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs(),
            access,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .expect("HS256 over plain claims always signs");
        Issued {
            token,
            expires_in: self.ttl.as_secs(),
            issued_at: now,
        }
    }

    /// The claims of a token this registry issued and that is valid now.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        // `alg` is read before anything else: "none" is no algorithm this
        // crate knows, so such a header does not even parse.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm);
        }
        let id = header.kid.ok_or(TokenError::UnknownKey)?;
        let keys = self.keys().await;
        let key = keys.find(&id).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.service]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => TokenError::Audience,
                ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                _ => TokenError::Malformed,
            },
        )?;
        Ok(data.claims)
    }

    /// The current key set: read again from storage once it is older
    /// than [`KEY_REFRESH`] (by one request at a time; the others go on
    /// with the keys they have).
    async fn keys(&self) -> Arc<KeySet> {
        let (keys, fresh) = {
            let loaded = self.loaded.read().expect("never poisoned");
            (loaded.keys.clone(), loaded.at.elapsed() < KEY_REFRESH)
        };
        let Source::Stored { storage, object } = &self.source else {
            return keys;
        };
        if fresh {
            return keys;
        }
        let Ok(_turn) = self.refreshing.try_lock() else {
            return keys;
        };
        let reloaded = load_or_create(&**storage, object).await;
        let mut loaded = self.loaded.write().expect("never poisoned");
        loaded.at = Instant::now();
        match reloaded {
            Ok(keys) => {
                if keys.ids() != loaded.keys.ids() {
                    tracing::info!(object, ids = ?keys.ids(), "token keys changed");
                }
                loaded.keys = Arc::new(keys);
            }
            // The keys read last go on working; the next refresh tries again.
            Err(error) => tracing::error!(%error, object, "token keys not read again"),
        }
        loaded.keys.clone()
    }
}

/// Reads the key set under `object`, creating it (with a create-only
/// write, so that concurrent first starts agree) when there is none.
async fn load_or_create(storage: &dyn Storage, object: &str) -> Result<KeySet, KeyError> {
    let stored = |source: KeyError| KeyError::Stored {
        object: object.to_string(),
        source: Box::new(source),
    };
    if let Some(bytes) = storage.get(object).await? {
        return KeySet::parse(&String::from_utf8_lossy(&bytes)).map_err(stored);
    }
    let text = KeySet::generate()?;
    if storage
        .put_if_absent(object, bytes::Bytes::from(text.clone()))
        .await?
    {
        tracing::info!(object, "token signing key created");
        return KeySet::parse(&text).map_err(stored);
    }
    // Another instance created it first: use theirs.
    let bytes = storage
        .get(object)
        .await?
        .ok_or_else(|| KeyError::Vanished {
            object: object.to_string(),
        })?;
    KeySet::parse(&String::from_utf8_lossy(&bytes)).map_err(stored)
}

/// Where clients ask for tokens (the realm of every challenge).
pub const PATH: &str = "/token";
#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn keys() -> KeySet {
        KeySet::parse(&KeySet::generate().unwrap()).unwrap()
    }

    fn tokens() -> Tokens {
        Tokens::new(keys(), "reg.example", DEFAULT_TTL)
    }

    /// A token signed with `secret` over hand-made parts.
    fn forge(header: &serde_json::Value, claims: &serde_json::Value, key: &EncodingKey) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), key, Algorithm::HS256).unwrap();
        format!("{message}.{signature}")
    }

    fn claims_json(tokens: &Tokens, exp_from_now: i64) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        serde_json::json!({
            "iss": ISSUER, "sub": "", "aud": tokens.service(), "iat": now, "nbf": now,
            "exp": now + exp_from_now,
            "access": [{"type": "repository", "name": "hello", "actions": ["pull"]}],
        })
    }

    #[test]
    fn key_sets() {
        let text = KeySet::generate().unwrap();
        assert_eq!(KeySet::parse(&text).unwrap().ids().len(), 1);
        let two = format!("{text}\n{}", KeySet::generate().unwrap());
        let set = KeySet::parse(&two).unwrap();
        assert_eq!(set.ids().len(), 2);
        assert_ne!(set.ids()[0], set.ids()[1]);
        assert!(matches!(KeySet::parse("# none\n"), Err(KeyError::Empty)));
        assert!(matches!(
            KeySet::parse("not base64!\n"),
            Err(KeyError::NotBase64 { line: 1 })
        ));
        assert!(matches!(
            KeySet::parse("c2hvcnQ=\n"),
            Err(KeyError::TooShort { line: 1, len: 5 })
        ));
    }

    #[tokio::test]
    async fn issued_tokens_verify_and_nothing_else_does() {
        let tokens = tokens();
        let issued = tokens
            .issue("alice", vec![Access::repository("hello", &[PULL, BUILD])])
            .await;
        let claims = tokens.verify(&issued.token).await.unwrap();
        assert_eq!(claims.sub, "alice");
        assert!(claims.allows("hello", BUILD));
        assert!(!claims.allows("hello/jq", PULL));
        assert_eq!(claims.exp - claims.iat, DEFAULT_TTL.as_secs());

        let key = &tokens.keys().await;
        let key = &key.keys[0];
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": key.id});
        // Well made: accepted (the forging helper is right).
        let good = forge(&header, &claims_json(&tokens, 60), &key.encoding);
        assert!(tokens.verify(&good).await.is_ok());
        // Expired, long ago and just beyond the leeway.
        for ago in [-3600, -(LEEWAY_SECONDS as i64) - 5] {
            let expired = forge(&header, &claims_json(&tokens, ago), &key.encoding);
            assert_eq!(tokens.verify(&expired).await, Err(TokenError::Expired));
        }
        // Not yet valid.
        let mut later = claims_json(&tokens, 600);
        later["nbf"] = serde_json::json!(jsonwebtoken::get_current_timestamp() + 300);
        let later = forge(&header, &later, &key.encoding);
        assert_eq!(tokens.verify(&later).await, Err(TokenError::NotYetValid));
        // Another registry's audience or issuer.
        let mut other = claims_json(&tokens, 60);
        other["aud"] = serde_json::json!("elsewhere.example");
        let other = forge(&header, &other, &key.encoding);
        assert_eq!(tokens.verify(&other).await, Err(TokenError::Audience));
        let mut other = claims_json(&tokens, 60);
        other["iss"] = serde_json::json!("someone");
        let other = forge(&header, &other, &key.encoding);
        assert_eq!(tokens.verify(&other).await, Err(TokenError::Audience));
        // A required claim missing.
        let mut bare = claims_json(&tokens, 60);
        bare.as_object_mut().unwrap().remove("nbf");
        let bare = forge(&header, &bare, &key.encoding);
        assert!(tokens.verify(&bare).await.is_err());
        // Another key: unknown by id, and with our id a bad signature.
        let foreign = keys();
        let foreign_key = &foreign.keys[0];
        let theirs = serde_json::json!({"alg": "HS256", "kid": foreign_key.id});
        let theirs = forge(&theirs, &claims_json(&tokens, 60), &foreign_key.encoding);
        assert_eq!(tokens.verify(&theirs).await, Err(TokenError::UnknownKey));
        let posing = forge(&header, &claims_json(&tokens, 60), &foreign_key.encoding);
        assert_eq!(tokens.verify(&posing).await, Err(TokenError::Signature));
        // No key id.
        let no_kid = serde_json::json!({"alg": "HS256"});
        let no_kid = forge(&no_kid, &claims_json(&tokens, 60), &key.encoding);
        assert_eq!(tokens.verify(&no_kid).await, Err(TokenError::UnknownKey));
    }

    #[tokio::test]
    async fn unsigned_tampered_and_widened_tokens_are_refused() {
        let tokens = tokens();
        let issued = tokens
            .issue("", vec![Access::repository("hello", &[PULL])])
            .await;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = issued.token.split('.').collect();
        assert_eq!(parts.len(), 3);

        // alg=none, with the signature dropped or kept.
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        let mut none = header.clone();
        none["alg"] = serde_json::json!("none");
        let none = b64.encode(none.to_string());
        for token in [
            format!("{none}.{}.", parts[1]),
            format!("{none}.{}.{}", parts[1], parts[2]),
        ] {
            assert_eq!(tokens.verify(&token).await, Err(TokenError::Malformed));
        }
        // Another algorithm this crate knows.
        let mut hs512 = header.clone();
        hs512["alg"] = serde_json::json!("HS512");
        let hs512 = format!(
            "{}.{}.{}",
            b64.encode(hs512.to_string()),
            parts[1],
            parts[2]
        );
        assert_eq!(tokens.verify(&hs512).await, Err(TokenError::Algorithm));
        // Unsigned: no signature, or no third part.
        assert!(tokens
            .verify(&format!("{}.{}.", parts[0], parts[1]))
            .await
            .is_err());
        assert_eq!(
            tokens.verify(&format!("{}.{}", parts[0], parts[1])).await,
            Err(TokenError::Malformed)
        );
        // The scope widened: pull and build, on another name too.
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["access"] = serde_json::json!([
            {"type": "repository", "name": "hello", "actions": ["pull", "build"]},
            {"type": "repository", "name": "big", "actions": ["pull", "build"]},
        ]);
        claims["sub"] = serde_json::json!("alice");
        let widened = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(tokens.verify(&widened).await, Err(TokenError::Signature));
        // A flipped signature byte.
        let mut sig = b64.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig));
        assert_eq!(tokens.verify(&flipped).await, Err(TokenError::Signature));
        // Oversized and garbage.
        assert_eq!(
            tokens.verify(&"a".repeat(MAX_TOKEN_LEN + 1)).await,
            Err(TokenError::TooLarge)
        );
        assert_eq!(tokens.verify("").await, Err(TokenError::Malformed));
        assert_eq!(tokens.verify("...").await, Err(TokenError::Malformed));
    }

    #[tokio::test]
    async fn instances_on_one_storage_share_the_key_and_pick_up_rotation() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let (a, b) = tokio::join!(
            Tokens::shared(storage.clone(), DEFAULT_KEY_OBJECT, "reg", DEFAULT_TTL),
            Tokens::shared(storage.clone(), DEFAULT_KEY_OBJECT, "reg", DEFAULT_TTL),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let from_a = a.issue("", vec![]).await;
        assert!(b.verify(&from_a.token).await.is_ok());
        let first = storage.get(DEFAULT_KEY_OBJECT).await.unwrap().unwrap();

        // Rotation, step 1: a new key after the old one (accepted by
        // everyone once they read it; the old one still signs).
        let next = KeySet::generate().unwrap();
        let both = format!("{}{next}", String::from_utf8_lossy(&first));
        storage
            .put(DEFAULT_KEY_OBJECT, bytes::Bytes::from(both))
            .await
            .unwrap();
        for tokens in [&a, &b] {
            tokens.loaded.write().unwrap().at -= KEY_REFRESH;
        }
        let still_old = a.issue("", vec![]).await;
        assert!(b.verify(&still_old.token).await.is_ok());
        assert_eq!(b.keys().await.ids().len(), 2);
        // Step 2: the new key first (signs), the old one after.
        let swapped = format!("{next}{}", String::from_utf8_lossy(&first));
        storage
            .put(DEFAULT_KEY_OBJECT, bytes::Bytes::from(swapped))
            .await
            .unwrap();
        a.loaded.write().unwrap().at -= KEY_REFRESH;
        let new = a.issue("", vec![]).await;
        assert!(b.verify(&new.token).await.is_ok());
        assert!(a.verify(&from_a.token).await.is_ok());
        // Step 3: the old key gone; its tokens stop working.
        storage
            .put(DEFAULT_KEY_OBJECT, bytes::Bytes::from(next))
            .await
            .unwrap();
        a.loaded.write().unwrap().at -= KEY_REFRESH;
        assert_eq!(a.verify(&from_a.token).await, Err(TokenError::UnknownKey));
        assert!(a.verify(&new.token).await.is_ok());
    }

    #[tokio::test]
    async fn a_damaged_key_set_stops_the_start_and_not_a_running_instance() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        storage
            .put(DEFAULT_KEY_OBJECT, bytes::Bytes::from_static(b"c2hvcnQ=\n"))
            .await
            .unwrap();
        let error = Tokens::shared(storage.clone(), DEFAULT_KEY_OBJECT, "reg", DEFAULT_TTL)
            .await
            .unwrap_err();
        assert!(error.to_string().contains(DEFAULT_KEY_OBJECT), "{error}");
        storage
            .put(
                DEFAULT_KEY_OBJECT,
                bytes::Bytes::from(KeySet::generate().unwrap()),
            )
            .await
            .unwrap();
        let tokens = Tokens::shared(storage.clone(), DEFAULT_KEY_OBJECT, "reg", DEFAULT_TTL)
            .await
            .unwrap();
        let issued = tokens.issue("", vec![]).await;
        storage
            .put(DEFAULT_KEY_OBJECT, bytes::Bytes::from_static(b"garbage!\n"))
            .await
            .unwrap();
        tokens.loaded.write().unwrap().at -= KEY_REFRESH;
        assert!(tokens.verify(&issued.token).await.is_ok());
    }
}
