//! `/v1/auth`: forward auth for gateways (nginx `auth_request`, Envoy `ext_authz`, Traefik `forwardAuth`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::domain::Outcome;

use super::answers::{
    bad_request, forbidden, limit_headers, limiter_unavailable, spool_full, too_many, unauthorized, unavailable,
    HeaderValues,
};
use super::params::{cost_header, requirement, OtherNames};
use super::{AppState, Attempt, Verdict};
use crate::request;

const X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
const X_TOLLGATE_ORG_ID: HeaderName = HeaderName::from_static("x-tollgate-org-id");
const X_TOLLGATE_ROLE: HeaderName = HeaderName::from_static("x-tollgate-role");
const X_TOLLGATE_EVENT_ID: HeaderName = HeaderName::from_static("x-tollgate-event-id");
const X_TOLLGATE_KEY_NAME: HeaderName = HeaderName::from_static("x-tollgate-key-name");
/// What a key's name has encoded in its header besides every byte past ASCII: control characters (names cannot hold
/// them but a tab) and `%`.
const KEY_NAME_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Forward auth for gateways: 200 with the key's identity in headers, or 401 with one uniform body.
pub async fn auth(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    // Taken apart rather than extracted piece by piece: the `HeaderMap` extractor would copy every header.
    let (Parts { method, uri, headers, .. }, _) = request.into_parts();
    let envoy = envoy_original(&uri);
    let query = if envoy.is_some() { None } else { uri.query() };
    // On `/v1/auth` itself the query is the route's; after an original path it may be the client's.
    let others = if uri.path() == "/v1/auth" { OtherNames::Refused } else { OtherNames::Ignored };
    let (cost, requirement) = match (cost_header(&headers), requirement(query, others, &headers)) {
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
            // Otherwise an original path may follow the prefix (as Envoy's did before ENVOY_PREFIX): /v1/auth/orders/1.
            let path = envoy.unwrap_or_else(|| {
                uri.path().strip_prefix("/v1/auth").filter(|rest| !rest.is_empty()).unwrap_or(uri.path())
            });
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
            // Percent-encoded past printable ASCII, which is all a header value is sure to carry intact (raw UTF-8
            // reads as Latin-1 or not at all in many HTTP libraries), and `%` itself, so that it decodes back.
            let name = percent_encoding::utf8_percent_encode(&record.name, KEY_NAME_ENCODED);
            values.insert(out, X_TOLLGATE_KEY_NAME, format_args!("{name}"));
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

/// Where `gateways/envoy` sends its checks: this prefix + the client's own path and query. That query is then the
/// client's, and the route's requirements come in headers; a query anywhere else on `/v1/auth` says what the route
/// requires (nginx and Traefik put it in their auth URL). A prefix, not a header, marks Envoy's checks: no client can
/// choose it, where a header it sent could reach Tollgate through another gateway.
const ENVOY_PREFIX: &str = "/v1/auth/envoy";

/// The client's path and query of an Envoy check.
fn envoy_original(uri: &Uri) -> Option<&str> {
    uri.path_and_query()?.as_str().strip_prefix(ENVOY_PREFIX).filter(|rest| rest.starts_with('/'))
}
