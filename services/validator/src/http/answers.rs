//! The answers both endpoints give: the rate-limit headers, and the bodies of 400, 401, 403, 429 and 503.

use std::fmt::Write as _;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::limiter::Usage;

const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_USED: HeaderName = HeaderName::from_static("x-ratelimit-used");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Rounds microseconds since the epoch up to whole seconds.
fn epoch_seconds(us: i64) -> i64 {
    us.div_euclid(1_000_000) + i64::from(us.rem_euclid(1_000_000) > 0)
}

/// Whole seconds from the decision until `usage` resets, rounded up.
pub fn seconds_until(usage: &Usage) -> i64 {
    epoch_seconds(usage.reset_at_us - usage.now_us).max(0)
}

/// Header values formatted into one buffer and handed out as slices of it: one allocation for an answer's values,
/// where `HeaderValue::from` makes one per value (the hot path's answer carries ten).
pub struct HeaderValues(BytesMut);

impl HeaderValues {
    pub fn new() -> HeaderValues {
        // Enough for the limit headers, three ids and a key name; a longer name only makes the buffer grow.
        HeaderValues(BytesMut::with_capacity(320))
    }

    /// Inserts `name: value`, or leaves it out if the text cannot be a header value.
    pub fn insert(&mut self, out: &mut HeaderMap, name: HeaderName, value: std::fmt::Arguments) {
        // Writing into a `BytesMut` cannot fail: it grows.
        let _ = self.0.write_fmt(value);
        if let Ok(value) = HeaderValue::from_maybe_shared(self.0.split().freeze()) {
            out.insert(name, value);
        }
    }
}

/// `X-RateLimit-*` and the IETF `RateLimit-Policy` / `RateLimit` fields for the most restrictive limit.
pub fn limit_headers(out: &mut HeaderMap, values: &mut HeaderValues, usage: &Usage) {
    let kind = usage.kind.as_str();
    values.insert(out, X_RATELIMIT_LIMIT, format_args!("{}", usage.limit));
    values.insert(out, X_RATELIMIT_REMAINING, format_args!("{}", usage.remaining()));
    values.insert(out, X_RATELIMIT_USED, format_args!("{}", usage.used));
    values.insert(out, X_RATELIMIT_RESET, format_args!("{}", epoch_seconds(usage.reset_at_us)));
    values.insert(out, RATELIMIT_POLICY, format_args!("\"{kind}\";q={};w={}", usage.limit, usage.window_seconds));
    values.insert(out, RATELIMIT, format_args!("\"{kind}\";r={};t={}", usage.remaining(), seconds_until(usage)));
}

/// Seconds until a request of this cost fits `usage`'s limit, which denied it; None when no wait helps.
pub fn retry_after(usage: &Usage) -> Option<i64> {
    (!usage.never_fits).then(|| seconds_until(usage).max(1))
}

/// Why no wait helps a request that [`Usage::never_fits`].
pub fn never_fits(usage: &Usage) -> String {
    format!(
        "this request weighs more than the {} limit of {} allows in a whole window: no wait lets it through; lower \
         the request's cost or raise the limit",
        usage.kind.as_str(),
        usage.limit
    )
}

/// 429 for a denied request: the limit headers and `{"error", "limit", "reset_at", "retry_after"}`, with
/// `Retry-After` when waiting helps, and otherwise `"retry_after": null` and a `message` saying why not.
pub fn too_many(error: &'static str, usage: &Usage) -> Response {
    let retry_after = retry_after(usage);
    let mut body = json!({
        "error": error,
        "limit": usage.limit,
        "used": usage.used,
        "window_seconds": usage.window_seconds,
        "reset_at": reset_at(usage),
        "retry_after": retry_after,
    });
    if retry_after.is_none() {
        body["message"] = never_fits(usage).into();
    }
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    limit_headers(response.headers_mut(), &mut HeaderValues::new(), usage);
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

pub fn reset_at(usage: &Usage) -> String {
    DateTime::<Utc>::from_timestamp(epoch_seconds(usage.reset_at_us), 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn forbidden() -> Response {
    let body =
        Json(json!({ "error": "insufficient_scope", "message": "the key lacks a scope or role this route requires" }));
    (StatusCode::FORBIDDEN, body).into_response()
}

pub fn spool_full() -> Response {
    let message = "usage cannot be recorded (NATS away and the spool full); retry shortly";
    let body = Json(json!({ "error": "unavailable", "message": message }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

pub fn limiter_unavailable() -> Response {
    let body = Json(json!({ "error": "unavailable", "message": "rate limiter unavailable; retry shortly" }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

/// What the API has, for a caller at the wrong path or with the wrong method: most often a gateway misconfigured.
const ENDPOINTS: &str = "Tollgate answers /v1/auth (any method, for gateways), POST /v1/verify (JSON), GET /healthz \
                         and GET /readyz";

/// 404 for any other path.
pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not_found", "message": ENDPOINTS }))).into_response()
}

/// 405 for a path with a method it does not take (`GET /v1/verify`).
pub async fn method_not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, Json(json!({ "error": "method_not_allowed", "message": ENDPOINTS })))
        .into_response()
}

/// The same answer for every kind of bad key: the reason goes to the event and to metrics, not to the caller.
pub fn unauthorized() -> Response {
    let body = Json(json!({ "error": "unauthorized", "message": "a valid API key is required" }));
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer realm=\"tollgate\"")], body).into_response()
}

pub fn unavailable() -> Response {
    let body = Json(json!({ "error": "unavailable", "message": "key store unavailable; retry shortly" }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

/// 400 naming the field at fault (`.`: the body as a whole).
pub fn bad_request(field: &str, message: &str) -> Response {
    refused_request(StatusCode::BAD_REQUEST, field, message)
}

/// `{"error": "invalid_request", "field", "message"}` with `status`: every refused request's answer.
pub fn refused_request(status: StatusCode, field: &str, message: &str) -> Response {
    let field = (field != ".").then_some(field);
    let body = json!({ "error": "invalid_request", "field": field, "message": message });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::LimitKind;

    #[test]
    fn reset_times_round_up_to_whole_seconds() {
        let usage = |reset_at_us, now_us| Usage {
            kind: LimitKind::Key,
            limit: 5,
            used: 5,
            window_seconds: 60,
            reset_at_us,
            now_us,
            never_fits: false,
        };
        assert_eq!(seconds_until(&usage(10_000_001, 9_000_000)), 2);
        assert_eq!(seconds_until(&usage(10_000_000, 9_000_000)), 1);
        assert_eq!(seconds_until(&usage(9_000_000, 10_000_000)), 0);
        assert_eq!(reset_at(&usage(1_795_000_000_000_001, 0)), "2026-11-18T11:06:41Z");
    }

    #[test]
    fn a_request_heavier_than_its_whole_limit_is_told_no_wait_helps() {
        let usage = Usage {
            kind: LimitKind::Tier,
            limit: 5,
            used: 2,
            window_seconds: 60,
            reset_at_us: 41_500_000,
            now_us: 0,
            never_fits: false,
        };
        assert_eq!(retry_after(&usage), Some(42));
        assert_eq!(too_many("rate_limited", &usage).headers()[header::RETRY_AFTER], "42");
        // A reset already past still says to wait a second, never 0.
        assert_eq!(retry_after(&Usage { reset_at_us: 0, ..usage }), Some(1));

        let never = Usage { never_fits: true, ..usage };
        assert_eq!(retry_after(&never), None);
        let answer = too_many("rate_limited", &never);
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(!answer.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(answer.headers()["ratelimit-policy"], "\"tier\";q=5;w=60");
        assert!(never_fits(&never).starts_with("this request weighs more than the tier limit of 5 allows"));
    }
}
