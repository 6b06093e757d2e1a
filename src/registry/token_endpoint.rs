//! The token endpoint, `GET` and `POST` [`PATH`]: who asks (anonymous, or
//! an htpasswd user by Basic credentials or an OAuth2 password form), and
//! a token ([`super::token`]) for as much of the requested scopes as they
//! may have.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Scope};
use super::login::Client;
use super::token::{Access, BUILD, MAX_SCOPES, PATH, PULL};
use super::{AppState, RegistryError};

/// The longest query string or form a token request may have.
const MAX_REQUEST: usize = 8192;

/// The token endpoint's answer, with the token under both names clients
/// read (`token`: docker's; `access_token`: OAuth2's).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// `GET /token` (docker, podman, skopeo, containerd without credentials)
/// and `POST /token` (containerd's OAuth2 password grant): a token for
/// the requested `scope`s, as much of them as the caller may have.
pub(super) async fn endpoint(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, RegistryError> {
    let Some(auth) = state.auth.clone() else {
        // A public registry never challenges, so nobody asks.
        return Err(RegistryError::NoRoute {
            path: PATH.to_string(),
        });
    };
    let client = Client::of(&req);
    let asked = TokenRequest::read(req, auth.tokens().service()).await?;
    // An empty Basic pair is anonymous, as elsewhere.
    let user = match asked.credentials {
        Some((user, password)) => match auth.login(client, &user, &password).await? {
            Caller::User(user) => Some(user),
            Caller::Anonymous | Caller::Token(_) => None,
        },
        None => None,
    };
    let (subject, actions): (&str, &[&str]) = match &user {
        Some(user) => (user, &[PULL, BUILD]),
        None if auth.scope() == Scope::All => {
            return Err(RegistryError::Unauthorized {
                reason: "this registry needs credentials",
            })
        }
        None => ("", &[PULL]),
    };
    let access = granted(&asked.scopes, actions);
    let issued = auth.tokens().issue(subject, access).await;
    let body = TokenResponse {
        token: issued.token.clone(),
        access_token: issued.token,
        expires_in: issued.expires_in,
        issued_at: crate::storage::records::rfc3339(issued.issued_at),
    };
    let mut response =
        super::json_response(serde_json::to_vec(&body).expect("a token answer serialises"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// What a token request asks for: as a query (docker's GET) or an OAuth2
/// password form (POST), with Basic credentials or the form's.
struct TokenRequest {
    credentials: Option<(String, String)>,
    /// Each `scope`, split where a form holds several, spaced.
    scopes: Vec<String>,
}

impl TokenRequest {
    /// Reads and bounds the request; refused if it names a service other
    /// than `service`.
    async fn read(req: Request, service: &str) -> Result<TokenRequest, RegistryError> {
        let (parts, body) = req.into_parts();
        let query = parts.uri.query().unwrap_or_default();
        if query.len() > MAX_REQUEST {
            return Err(RegistryError::TokenDenied {
                reason: "the token request is too large",
            });
        }
        let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let mut credentials = None;
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            if value.len() > super::auth::MAX_AUTHORIZATION {
                return Err(RegistryError::Unauthorized {
                    reason: "the Authorization header is too large",
                });
            }
            credentials = Some(value.to_str().ok().and_then(super::auth::basic).ok_or(
                RegistryError::Unauthorized {
                    reason: "the token endpoint takes Basic credentials",
                },
            )?);
        }
        if parts.method == Method::POST {
            let form = axum::body::to_bytes(body, MAX_REQUEST).await.map_err(|_| {
                RegistryError::TokenDenied {
                    reason: "the token request is too large",
                }
            })?;
            let form: Vec<(String, String)> = form_urlencoded::parse(&form).into_owned().collect();
            let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            if field("grant_type").as_deref() != Some("password") {
                return Err(RegistryError::TokenDenied {
                    reason: "this registry grants tokens for passwords only (grant_type=password)",
                });
            }
            credentials = Some((
                field("username").unwrap_or_default(),
                field("password").unwrap_or_default(),
            ));
            params.extend(
                form.into_iter()
                    .filter(|(k, _)| k == "scope" || k == "service"),
            );
        }
        if params.iter().any(|(k, v)| k == "service" && v != service) {
            return Err(RegistryError::TokenDenied {
                reason: "the token request names another service",
            });
        }
        // `scope` may repeat, and (in OAuth2 forms) hold several, spaced.
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' '))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if scopes.len() > MAX_SCOPES {
            return Err(RegistryError::TokenDenied {
                reason: "a token request names at most 16 scopes",
            });
        }
        Ok(TokenRequest {
            credentials,
            scopes,
        })
    }
}

/// What of `scopes` the caller gets, given the `actions` it may take:
/// one grant per repository, `build` coming with `pull`.
fn granted(scopes: &[String], actions: &[&str]) -> Vec<Access> {
    let mut access: Vec<Access> = Vec::new();
    for (name, requested) in scopes.iter().filter_map(|s| parse_scope(s)) {
        let wanted = |action: &&str| {
            requested.contains(action) || (*action == BUILD && requested.contains(&PULL))
        };
        let granted: Vec<&str> = actions.iter().copied().filter(wanted).collect();
        if granted.is_empty() || access.iter().any(|a| a.name == name) {
            continue;
        }
        access.push(Access::repository(name, &granted));
    }
    access
}

/// One `scope` of a token request: `repository:<name>:<actions>`.
/// Other resource types (`registry:catalog:*`) are ignored: this registry
/// has nothing else to grant.
pub fn parse_scope(scope: &str) -> Option<(&str, Vec<&str>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    crate::oci::name::validate_name(name).ok()?;
    Some((name, actions.split(',').filter(|a| !a.is_empty()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope("repository:shell/hello:pull"),
            Some(("shell/hello", vec!["pull"]))
        );
        assert_eq!(
            parse_scope("repository:hello:pull,push"),
            Some(("hello", vec!["pull", "push"]))
        );
        assert_eq!(parse_scope("registry:catalog:*"), None);
        assert_eq!(parse_scope("repository:Bad Name:pull"), None);
        assert_eq!(parse_scope("repository:hello"), None);
    }
}
