//! The HTTP client every backend shares: timeouts on every call, TLS with
//! the system roots or a configured CA, and one mapping of HTTP failures
//! to [`IpamError`].

use std::path::PathBuf;
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
        Ok(HttpClient { client })
    }

    /// The underlying reqwest client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// A request that did not get an answer: timeouts and connection failures
/// may pass.
pub(crate) fn transport_error(error: reqwest::Error) -> IpamError {
    IpamError::Transient(format!("{error}"))
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
/// claimed first.
pub(crate) fn status_error(status: StatusCode, retry: Option<Duration>, body: &str) -> IpamError {
    let detail = format!("{status}: {}", body.chars().take(300).collect::<String>());
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
