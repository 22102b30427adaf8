//! grpc.health.v1 status, kept in step with the token sources: SERVING only
//! while every enabled environment holds a valid token (service "" and
//! `flute.tokenbroker.v1.TokenBroker`), and per environment under
//! `flute.tokenbroker.v1.TokenBroker/<environment>`.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::token::TokenSources;

pub const SERVICE_NAME: &str = "flute.tokenbroker.v1.TokenBroker";

/// The health service name of one environment.
pub fn environment_service(env: crate::Environment) -> String {
    format!("{SERVICE_NAME}/{env}")
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Updates `reporter` on every change of any source until shutdown, then
/// reports NOT_SERVING everywhere.
pub async fn report(reporter: HealthReporter, sources: Arc<TokenSources>, draining: CancellationToken) {
    let changed = Arc::new(Notify::new());
    let forwarders: Vec<_> = sources
        .iter()
        .map(|source| {
            let (mut rx, changed) = (source.subscribe(), changed.clone());
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    changed.notify_one();
                }
            })
        })
        .collect();
    loop {
        if draining.is_cancelled() {
            break;
        }
        for source in sources.iter() {
            reporter
                .set_service_status(
                    environment_service(source.environment()),
                    serving(source.current().is_some()),
                )
                .await;
        }
        let all = serving(sources.all_ready());
        reporter.set_service_status("", all).await;
        reporter.set_service_status(SERVICE_NAME, all).await;
        tokio::select! {
            _ = changed.notified() => {}
            _ = draining.cancelled() => {}
        }
    }
    for f in forwarders {
        f.abort();
    }
    set_not_serving(&reporter, &sources).await;
}

pub async fn set_not_serving(reporter: &HealthReporter, sources: &TokenSources) {
    for source in sources.iter() {
        reporter
            .set_service_status(environment_service(source.environment()), ServingStatus::NotServing)
            .await;
    }
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
}
