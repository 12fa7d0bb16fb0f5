//! Keystone v3 authentication: password or application credential, a
//! cached token refreshed before it expires, and endpoint discovery from
//! the service catalog.

use std::time::{Duration, SystemTime};

use hulk_ipam::IpamError;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::http::{HttpClient, transport_error};

/// How to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user's password, scoped to a project.
    Password {
        /// User name.
        username: String,
        /// The user's domain name (usually `Default`).
        user_domain: String,
        /// The password.
        password: String,
        /// Project name.
        project: String,
        /// The project's domain name.
        project_domain: String,
    },
    /// An application credential (it carries its own project scope).
    ApplicationCredential {
        /// The credential's id.
        id: String,
        /// Its secret.
        secret: String,
    },
}

/// Where and how to authenticate.
#[derive(Debug, Clone)]
pub struct KeystoneConfig {
    /// The identity endpoint, e.g. `https://keystone.example:5000/v3`.
    pub auth_url: String,
    /// The credentials.
    pub credentials: Credentials,
    /// The catalog interface to use (`public`, `internal` or `admin`).
    pub interface: String,
    /// The region, when the catalog has several.
    pub region: Option<String>,
    /// Refresh a token this long before it expires.
    pub refresh_margin: Duration,
}

impl KeystoneConfig {
    /// A configuration with the `public` interface, any region and a
    /// five-minute refresh margin.
    pub fn new(auth_url: impl Into<String>, credentials: Credentials) -> Self {
        KeystoneConfig {
            auth_url: auth_url.into(),
            credentials,
            interface: "public".into(),
            region: None,
            refresh_margin: Duration::from_secs(300),
        }
    }
}

/// A token and what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The `X-Subject-Token` value.
    pub value: String,
    /// When Keystone says it expires.
    pub expires_at: SystemTime,
    /// Endpoints by service type, for the configured interface and region.
    pub endpoints: Vec<(String, String)>,
}

impl Token {
    /// The endpoint of a service type (`network`, ...).
    pub fn endpoint(&self, service_type: &str) -> Option<&str> {
        self.endpoints
            .iter()
            .find(|(kind, _)| kind == service_type)
            .map(|(_, url)| url.as_str())
    }
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenContent,
}

#[derive(Deserialize)]
struct TokenContent {
    expires_at: String,
    #[serde(default)]
    catalog: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
struct CatalogEntry {
    #[serde(rename = "type")]
    service_type: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Deserialize)]
struct CatalogEndpoint {
    interface: String,
    #[serde(default)]
    region_id: Option<String>,
    url: String,
}

/// A Keystone session: one cached token, refreshed by one caller at a time.
#[derive(Debug)]
pub struct Keystone {
    config: KeystoneConfig,
    http: HttpClient,
    cached: Mutex<Option<Token>>,
}

impl Keystone {
    /// A session; nothing is sent until the first [`Keystone::token`].
    pub fn new(config: KeystoneConfig, http: HttpClient) -> Self {
        let secret = match &config.credentials {
            Credentials::Password { password, .. } => password,
            Credentials::ApplicationCredential { secret, .. } => secret,
        };
        http.redactor().add(secret);
        Keystone {
            config,
            http,
            cached: Mutex::new(None),
        }
    }

    /// The client it authenticates with (its errors' redactions).
    pub(crate) fn http(&self) -> &HttpClient {
        &self.http
    }

    /// A valid token: the cached one unless it is within the refresh
    /// margin of expiry; concurrent callers share one refresh.
    pub async fn token(&self) -> Result<Token, IpamError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            let fresh_until = token.expires_at.checked_sub(self.config.refresh_margin);
            if fresh_until.is_some_and(|until| SystemTime::now() < until) {
                return Ok(token.clone());
            }
        }
        let token = self.authenticate().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Forgets `token` after a 401, so the next call authenticates again.
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|held| held.value == token) {
            *cached = None;
        }
    }

    async fn authenticate(&self) -> Result<Token, IpamError> {
        let body = match &self.config.credentials {
            Credentials::Password {
                username,
                user_domain,
                password,
                project,
                project_domain,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": username, "domain": {"name": user_domain}, "password": password}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}
            }}),
            Credentials::ApplicationCredential { id, secret } => json!({"auth": {
                "identity": {"methods": ["application_credential"],
                             "application_credential": {"id": id, "secret": secret}}
            }}),
        };
        let url = format!("{}/auth/tokens", self.config.auth_url.trim_end_matches('/'));
        let response = self
            .http
            .client()
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(IpamError::Auth(format!(
                "keystone refused the credentials ({status})"
            )));
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let detail = self.http.redactor().detail_of(&text);
            return Err(crate::http::status_error(status, None, &detail));
        }
        let value = response
            .headers()
            .get("x-subject-token")
            .and_then(|header| header.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                IpamError::Protocol("keystone answered without X-Subject-Token".into())
            })?;
        // The token is a credential too: Neutron may echo it back.
        self.http.redactor().add(&value);
        let body: TokenBody = response
            .json()
            .await
            .map_err(|error| IpamError::Protocol(format!("keystone token body: {error}")))?;
        let expires_at = humantime::parse_rfc3339_weak(body.token.expires_at.trim_end_matches('Z'))
            .map_err(|error| {
                IpamError::Protocol(format!("token expiry {:?}: {error}", body.token.expires_at))
            })?;
        let endpoints =
            body.token
                .catalog
                .into_iter()
                .filter_map(|entry| {
                    let endpoint =
                        entry.endpoints.into_iter().find(|endpoint| {
                            endpoint.interface == self.config.interface
                                && self.config.region.as_ref().is_none_or(|region| {
                                    endpoint.region_id.as_ref() == Some(region)
                                })
                        })?;
                    Some((entry.service_type, endpoint.url))
                })
                .collect();
        tracing::debug!(auth_url = %self.config.auth_url, "keystone token issued");
        Ok(Token {
            value,
            expires_at,
            endpoints,
        })
    }
}
