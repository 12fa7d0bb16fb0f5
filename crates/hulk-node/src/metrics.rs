//! The agent's HTTP endpoint: Prometheus' `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use hulk_pool::PoolManager;
use prometheus_client::registry::Registry;

/// Serves Prometheus' `/metrics` (pool gauges refreshed per scrape) and
/// `/healthz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pools: Arc<PoolManager>,
    registry: Registry,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let registry = Arc::new(registry);
    let scrape = move || {
        let (pools, registry) = (pools.clone(), registry.clone());
        async move {
            pools.refresh_metrics();
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                ),
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    error.to_string(),
                ),
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }));
    let stopped = async move {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::error!(%error, "metrics server failed");
    }
}
