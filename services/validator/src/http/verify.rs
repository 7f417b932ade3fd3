//! `/v1/verify`: the same decision as JSON, for services that call Tollgate directly.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::domain::Role;

use super::answers::{
    bad_request, limit_headers, limiter_unavailable, never_fits, refused_request, reset_at, retry_after, spool_full,
    unavailable, HeaderValues,
};
use super::params::{requirement_from, MAX_COST};
use super::{AppState, Attempt, Verdict};
use crate::limiter::Usage;
use crate::request::{self, Credential};

/// Unknown fields are refused: a misspelt requirement (`"scopes": "admin"` for `"scope"`) would otherwise be dropped,
/// and the key let through without the check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    key: String,
    #[serde(default = "one")]
    cost: u32,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ip: Option<IpAddr>,
    #[serde(default)]
    request_id: Option<String>,
    /// The end client's User-Agent, which the calling service knows (its own request's would say only what the
    /// service is written with); without it, this request's.
    #[serde(default)]
    user_agent: Option<String>,
    /// Scopes the key must have (comma- or space-separated).
    #[serde(default)]
    scope: Option<String>,
    /// Least role the key must have.
    #[serde(default)]
    role: Option<Role>,
}

fn one() -> u32 {
    1
}

#[derive(Serialize)]
struct VerifyAnswer {
    valid: bool,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<Uuid>,
    /// The most restrictive limit, or the one that denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_at: Option<String>,
    /// Seconds to wait before retrying (denied requests only, unless no wait helps).
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<i64>,
    /// Why no wait helps a denied request.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl VerifyAnswer {
    fn invalid(code: &'static str) -> VerifyAnswer {
        VerifyAnswer {
            valid: false,
            code,
            key_id: None,
            org_id: None,
            name: None,
            role: None,
            scopes: None,
            expires_at: None,
            event_id: None,
            limit: None,
            remaining: None,
            used: None,
            reset_at: None,
            retry_after: None,
            message: None,
        }
    }

    /// The limit's numbers; for a request it denied, when to retry or why no wait helps.
    fn with_usage(mut self, usage: &Usage, denied: bool) -> VerifyAnswer {
        self.limit = Some(usage.limit);
        self.remaining = Some(usage.remaining());
        self.used = Some(usage.used);
        self.reset_at = Some(reset_at(usage));
        if denied {
            self.retry_after = retry_after(usage);
            self.message = self.retry_after.is_none().then(|| never_fits(usage));
        }
        self
    }
}

/// JSON verification for services that call Tollgate directly.
pub async fn verify(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let started = Instant::now();
    // Headers have a deadline (hyper's); a body sent slowly would hold its connection for ever without one.
    let body = match tokio::time::timeout(state.read_timeout, Bytes::from_request(request, &())).await {
        Ok(Ok(body)) => body,
        // Larger than a request can be (413), or cut off: the same JSON as any refused request, not axum's plain text.
        Ok(Err(rejection)) => return state.refused(refused_request(rejection.status(), ".", &rejection.body_text())),
        Err(_) => {
            let message = "the body did not arrive within TOLLGATE_READ_TIMEOUT";
            return state.refused(refused_request(StatusCode::REQUEST_TIMEOUT, ".", message));
        }
    };
    // Checked first: serde would also read a struct from an array, by position (`["tg_live_…", 2]`), and its words for
    // any other value ("expected struct VerifyBody") would name our type, not the mistake.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return state.refused(bad_request(".", "the body must be a JSON object, such as {\"key\": \"tg_live_…\"}"));
    }
    let mut json = serde_json::Deserializer::from_slice(&body);
    let body: VerifyBody = match serde_path_to_error::deserialize(&mut json) {
        Ok(body) => body,
        Err(e) => return state.refused(bad_request(&e.path().to_string(), &e.inner().to_string())),
    };
    if json.end().is_err() {
        return state.refused(bad_request(".", "the body must be one JSON object, with nothing after it"));
    }
    if body.cost == 0 || body.cost > MAX_COST {
        return state.refused(bad_request("cost", &format!("must be between 1 and {MAX_COST}")));
    }
    // PostgreSQL text cannot hold a NUL: the event could never be written, and its message would go to the
    // dead-letter stream.
    let texts = [
        ("method", &body.method),
        ("path", &body.path),
        ("request_id", &body.request_id),
        ("user_agent", &body.user_agent),
    ];
    if let Some((field, _)) = texts.into_iter().find(|(_, text)| text.as_deref().is_some_and(|t| t.contains('\0'))) {
        return state.refused(bad_request(field, "must not contain a NUL character"));
    }
    let roles: Vec<String> = body.role.iter().map(|r| r.as_str().to_owned()).collect();
    let requirement = match requirement_from(body.scope.as_slice(), &roles) {
        Ok(requirement) => requirement,
        Err((field, message)) => return state.refused(bad_request(field, &message)),
    };
    let attempt = Attempt {
        started,
        // As in a header: a key read from a file often ends with a newline.
        credential: Credential::from_text(body.key.trim()),
        method: request::truncate(&body.method.unwrap_or_default(), MAX_METHOD_LEN),
        path: request::truncate(&body.path.unwrap_or_default(), MAX_TEXT_LEN),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, body.ip),
        user_agent: match body.user_agent {
            Some(agent) => Some(request::truncate(&agent, MAX_TEXT_LEN)),
            None => request::user_agent(&headers),
        },
        request_id: body.request_id.map(|id| request::truncate(&id, MAX_TEXT_LEN)),
        cost: body.cost,
        requirement,
    };
    let (answer, usage) = match state.decide(attempt).await {
        Verdict::Decided { outcome, record, event_id, usage } => {
            let answer = VerifyAnswer {
                valid: outcome.is_allowed(),
                code: outcome.code(),
                key_id: Some(record.id),
                org_id: Some(record.org_id),
                name: Some(record.name.clone()),
                role: Some(record.role),
                scopes: Some(record.scopes.clone()),
                expires_at: record.expires_at,
                event_id: Some(event_id),
                ..VerifyAnswer::invalid("")
            };
            match usage {
                Some(usage) => (answer.with_usage(&usage, !outcome.is_allowed()), Some(usage)),
                None => (answer, None),
            }
        }
        Verdict::IpLimited(usage) => (VerifyAnswer::invalid("RATE_LIMITED").with_usage(&usage, true), Some(usage)),
        Verdict::Unidentified(_) => (VerifyAnswer::invalid("INVALID"), None),
        Verdict::Unavailable => return unavailable(),
        Verdict::SpoolFull => return spool_full(),
        Verdict::LimiterUnavailable => return limiter_unavailable(),
    };
    let mut response = Json(answer).into_response();
    if let Some(usage) = &usage {
        limit_headers(response.headers_mut(), &mut HeaderValues::new(), usage);
    }
    response
}
