//! `/v1/auth`: forward auth for gateways (nginx `auth_request`, Envoy `ext_authz`, Traefik `forwardAuth`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::domain::Outcome;

use super::answers::{
    bad_request, forbidden, limit_headers, limiter_unavailable, spool_full, too_many, unauthorized, unavailable,
    HeaderValues,
};
use super::params::{cost_header, requirement};
use super::{AppState, Attempt, Verdict};
use crate::request::{self, X_FORWARDED_URI};

const X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
const X_TOLLGATE_ORG_ID: HeaderName = HeaderName::from_static("x-tollgate-org-id");
const X_TOLLGATE_ROLE: HeaderName = HeaderName::from_static("x-tollgate-role");
const X_TOLLGATE_EVENT_ID: HeaderName = HeaderName::from_static("x-tollgate-event-id");
const X_TOLLGATE_KEY_NAME: HeaderName = HeaderName::from_static("x-tollgate-key-name");

/// Forward auth for gateways: 200 with the key's identity in headers, or 401 with one uniform body.
pub async fn auth(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    // Taken apart rather than extracted piece by piece: the `HeaderMap` extractor would copy every header.
    let (Parts { method, uri, headers, .. }, _) = request.into_parts();
    let query = if is_envoy_check(&uri, &headers) { None } else { uri.query() };
    let (cost, requirement) = match (cost_header(&headers), requirement(query, &headers)) {
        (Ok(cost), Ok(requirement)) => (cost, requirement),
        (Err((field, message)), _) | (_, Err((field, message))) => return state.refused(bad_request(field, &message)),
    };
    let attempt = Attempt {
        started,
        credential: request::credential(&headers),
        // A method sent straight here may be any token, of any length: cut like the one in X-Original-Method.
        method: request::original_method(&headers)
            .unwrap_or_else(|| request::truncate(method.as_str(), MAX_METHOD_LEN)),
        path: request::original_uri(&headers).unwrap_or_else(|| {
            // Under Envoy the original path follows the prefix: /v1/auth/orders/1 → /orders/1.
            let path = uri.path().strip_prefix("/v1/auth").filter(|rest| !rest.is_empty()).unwrap_or(uri.path());
            request::truncate(path, MAX_TEXT_LEN)
        }),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, None),
        user_agent: request::user_agent(&headers),
        request_id: request::request_id(&headers),
        cost,
        requirement,
    };
    match state.decide(attempt).await {
        Verdict::Decided { outcome: Outcome::Allowed, record, event_id, usage } => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            // Room for every header below at once, rather than growing the map as they come.
            out.reserve(12);
            let mut values = HeaderValues::new();
            if let Some(usage) = &usage {
                limit_headers(out, &mut values, usage);
            }
            values.insert(out, X_TOLLGATE_KEY_ID, format_args!("{}", record.id.hyphenated()));
            values.insert(out, X_TOLLGATE_ORG_ID, format_args!("{}", record.org_id.hyphenated()));
            out.insert(X_TOLLGATE_ROLE, HeaderValue::from_static(record.role.as_str()));
            values.insert(out, X_TOLLGATE_EVENT_ID, format_args!("{}", event_id.hyphenated()));
            // A name that cannot be a header value (control characters) is left out rather than failing the request.
            values.insert(out, X_TOLLGATE_KEY_NAME, format_args!("{}", record.name));
            response
        }
        Verdict::Decided { outcome: Outcome::InsufficientScope, .. } => forbidden(),
        Verdict::Decided { outcome: Outcome::RateLimited, usage: Some(usage), .. } => too_many("rate_limited", &usage),
        Verdict::Decided { outcome: Outcome::QuotaExceeded, usage: Some(usage), .. } => {
            too_many("quota_exceeded", &usage)
        }
        Verdict::IpLimited(usage) => too_many("rate_limited", &usage),
        Verdict::Decided { .. } | Verdict::Unidentified(_) => unauthorized(),
        Verdict::Unavailable => unavailable(),
        Verdict::SpoolFull => spool_full(),
        Verdict::LimiterUnavailable => limiter_unavailable(),
    }
}

/// Whether this is Envoy's check, sent to `/v1/auth` + the client's own path and query, which Envoy also sends as
/// X-Forwarded-Uri (as `gateways/envoy` configures it): its query is then the client's, and the route's requirements
/// come in headers. Any other query says what the route requires (nginx and Traefik put it in the auth URL), so
/// that a gateway's requirement is never taken for a client's query and ignored.
fn is_envoy_check(uri: &Uri, headers: &HeaderMap) -> bool {
    let rest = uri.path_and_query().map_or("", |p| p.as_str()).strip_prefix("/v1/auth").unwrap_or_default();
    rest.starts_with('/') && headers.get(X_FORWARDED_URI).is_some_and(|uri| uri.as_bytes() == rest.as_bytes())
}
