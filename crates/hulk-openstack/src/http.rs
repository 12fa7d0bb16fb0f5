//! The HTTP client every backend shares: timeouts on every call, TLS with
//! the system roots or a configured CA, and one mapping of HTTP failures
//! to [`IpamError`].

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hulk_ipam::IpamError;
use reqwest::StatusCode;

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Limit for a whole request, body included.
    pub timeout: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// A PEM CA bundle to trust in addition to the system roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// A configured HTTP client (cheap to clone).
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    redactor: Redactor,
}

/// The secrets a backend sends (bearer tokens, Keystone credentials and
/// the tokens it issues), so that no error message, log line or operator
/// reply built from an upstream answer ever repeats one: services echo
/// requests in their error bodies. Shared by the clones of one client.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redactor {
    secrets: Arc<RwLock<Vec<String>>>,
}

/// What replaces a secret in a message.
const REDACTED: &str = "[redacted]";

/// The longest excerpt of an upstream message kept in an error.
const MAX_DETAIL_CHARS: usize = 200;

impl Redactor {
    /// Remembers `secret`; too short a value (under 4 characters) would
    /// blank out ordinary words and is ignored.
    pub(crate) fn add(&self, secret: &str) {
        let secret = secret.trim();
        if secret.len() < 4 {
            return;
        }
        let mut secrets = self
            .secrets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !secrets.iter().any(|known| known == secret) {
            secrets.push(secret.to_owned());
        }
    }

    /// `text` with every known secret replaced by `[redacted]`.
    pub(crate) fn clean(&self, text: &str) -> String {
        let secrets = self
            .secrets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        secrets.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), REDACTED)
        })
    }

    /// What an error may say of an upstream body: the service's own
    /// message field when the body is JSON (`message`, `error.message`,
    /// `NeutronError.message`, `detail`, `title`), cut to 200 characters
    /// and redacted; never the body itself, which may echo the request.
    pub(crate) fn detail_of(&self, body: &str) -> String {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|value| message_of(&value));
        match message {
            // Redacted before it is cut: a cut could leave half a secret
            // that no longer matches.
            Some(message) => self
                .clean(&message)
                .chars()
                .take(MAX_DETAIL_CHARS)
                .collect(),
            None if body.trim().is_empty() => "no body".to_owned(),
            None => format!("a body of {} bytes, not shown", body.len()),
        }
    }
}

/// The human message of a JSON error document, in the shapes services use.
fn message_of(value: &serde_json::Value) -> Option<String> {
    let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
    ["message", "detail", "title", "error_description"]
        .iter()
        .find_map(|key| value.get(key).and_then(text))
        .or_else(|| {
            ["error", "NeutronError"]
                .iter()
                .filter_map(|key| value.get(key))
                .find_map(|inner| text(inner).or_else(|| message_of(inner)))
        })
}

impl HttpClient {
    /// Builds the client; a CA file that cannot be read or parsed is an
    /// invalid request.
    pub fn new(settings: &HttpSettings) -> Result<HttpClient, IpamError> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("hulk-vpc/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|error| {
                IpamError::InvalidRequest(format!("CA file {}: {error}", path.display()))
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|error| {
                IpamError::InvalidRequest(format!("CA file {}: {error}", path.display()))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        // reqwest's "builder error" alone hides the cause (such as a host
        // without CA certificates): name the whole chain.
        let client = builder.build().map_err(|error| {
            let mut message = format!("HTTP client: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            IpamError::InvalidRequest(message)
        })?;
        Ok(HttpClient {
            client,
            redactor: Redactor::default(),
        })
    }

    /// The underlying reqwest client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The secrets this client's errors never repeat.
    pub(crate) fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// This client, redacting `other`'s secrets (present and future) as
    /// well as its own.
    pub(crate) fn sharing_secrets_with(mut self, other: &HttpClient) -> HttpClient {
        let own = self
            .redactor
            .secrets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for secret in own {
            other.redactor.add(&secret);
        }
        self.redactor = other.redactor.clone();
        self
    }
}

/// A request that did not get an answer: timeouts and connection failures
/// may pass. reqwest's own message ("error sending request for url") hides
/// the cause, so the whole chain is named, and a timeout says so.
pub(crate) fn transport_error(error: reqwest::Error) -> IpamError {
    let mut message = if error.is_timeout() {
        format!("timed out: {error}")
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and the OS often repeat the same words one level down.
        if !message.ends_with(&cause_text) {
            message.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    IpamError::Transient(message)
}

/// Seconds from a `Retry-After` header (the HTTP-date form is rare from
/// OpenStack and treated as absent).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The error for a non-success status that no service-specific rule
/// claimed first; `detail` is already redacted ([`Redactor::detail_of`]).
pub(crate) fn status_error(status: StatusCode, retry: Option<Duration>, detail: &str) -> IpamError {
    let detail = format!("{status}: {detail}");
    match status.as_u16() {
        400 | 422 => IpamError::InvalidRequest(detail),
        401 | 403 => IpamError::Auth(detail),
        404 => IpamError::NotFound(detail),
        409 | 412 => IpamError::Conflict(detail),
        429 | 503 => IpamError::Throttled { retry_after: retry },
        _ => IpamError::Transient(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_what_callers_can_act_on() {
        let error = |code| status_error(StatusCode::from_u16(code).unwrap(), None, "x");
        assert!(matches!(error(400), IpamError::InvalidRequest(_)));
        assert!(matches!(error(401), IpamError::Auth(_)));
        assert!(matches!(error(404), IpamError::NotFound(_)));
        assert!(matches!(error(412), IpamError::Conflict(_)));
        assert!(matches!(error(429), IpamError::Throttled { .. }));
        assert!(matches!(error(500), IpamError::Transient(_)));
    }

    #[test]
    fn upstream_bodies_are_never_copied_and_secrets_never_repeated() {
        let redactor = Redactor::default();
        redactor.add("app-cred-s3cret-value");
        redactor.add("tok");
        let echoed = r#"{"auth": {"identity": {"application_credential": {"secret": "app-cred-s3cret-value"}}}}"#;
        assert_eq!(redactor.detail_of(echoed), "a body of 87 bytes, not shown");
        let html = "<html>500 app-cred-s3cret-value</html>";
        assert!(!redactor.detail_of(html).contains("s3cret"));
        let message =
            r#"{"NeutronError": {"type": "X", "message": "bad secret app-cred-s3cret-value"}}"#;
        assert_eq!(redactor.detail_of(message), "bad secret [redacted]");
        let nested = r#"{"error": {"code": "internal", "message": "echo app-cred-s3cret-value"}}"#;
        assert_eq!(redactor.detail_of(nested), "echo [redacted]");
        assert_eq!(
            redactor.clean("a tok b"),
            "a tok b",
            "too short to be a secret"
        );
        assert_eq!(redactor.detail_of(""), "no body");
        let long = format!(r#"{{"message": "{}"}}"#, "x".repeat(1000));
        assert_eq!(redactor.detail_of(&long).len(), MAX_DETAIL_CHARS);
    }

    #[test]
    fn retry_after_reads_seconds_and_ignores_dates() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn an_unreadable_ca_file_is_an_invalid_request() {
        let settings = HttpSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..HttpSettings::default()
        };
        assert!(matches!(
            HttpClient::new(&settings),
            Err(IpamError::InvalidRequest(_))
        ));
    }
}
