//! What a route asks of a request besides its key: its cost, and the scopes and role it requires.

use axum::http::{HeaderMap, HeaderName};

use tollgate_shared::codec::MAX_UNITS;
use tollgate_shared::domain::Role;

use crate::decision::Requirement;

/// Largest cost of one request: bounded so one request cannot drain a limit an operator sized for many. The cost is
/// the event's units, which the workers refuse past this.
pub const MAX_COST: u32 = MAX_UNITS;

const X_TOLLGATE_COST: HeaderName = HeaderName::from_static("x-tollgate-cost");
const X_TOLLGATE_REQUIRE_SCOPE: HeaderName = HeaderName::from_static("x-tollgate-require-scope");
const X_TOLLGATE_REQUIRE_ROLE: HeaderName = HeaderName::from_static("x-tollgate-require-role");

/// Why a request's parameters were refused: the field and the message for the 400 body.
pub type BadParameter = (&'static str, String);

/// The cost in `X-Tollgate-Cost` (default 1). Of several values (the header repeated, or values joined with commas
/// by a proxy) the largest counts: a gateway that appends its route's cost to a client's own header, as Envoy's
/// `request_headers_to_add` does by default, must not be undercut by the client.
pub fn cost_header(headers: &HeaderMap) -> Result<u32, BadParameter> {
    let mut cost = None;
    for value in headers.get_all(X_TOLLGATE_COST) {
        for text in value.to_str().unwrap_or("").split(',') {
            let one = text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|c| (1..=MAX_COST).contains(c))
                .ok_or_else(|| ("X-Tollgate-Cost", format!("must be a number between 1 and {MAX_COST}")))?;
            cost = cost.max(Some(one));
        }
    }
    Ok(cost.unwrap_or(1))
}

/// Where a query's names other than `scope` and `role` come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherNames {
    /// The query is the route's own, a gateway's setting: any other name is a mistake (`scopes=admin` for
    /// `scope=admin`) that would drop a check, so it is refused.
    Refused,
    /// The query may be the client's (after an original path, as some gateways send it): other names are its own.
    Ignored,
}

/// Scopes and role a route requires, from the query (`scope=a,b&role=admin`) and from
/// `X-Tollgate-Require-Scope` / `X-Tollgate-Require-Role`; all of them apply.
pub fn requirement(query: Option<&str>, others: OtherNames, headers: &HeaderMap) -> Result<Requirement, BadParameter> {
    let mut scopes: Vec<String> = Vec::new();
    let mut roles: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "scope" => scopes.push(value.into_owned()),
            "role" => roles.push(value.into_owned()),
            _ if others == OtherNames::Ignored => {}
            other => return Err(("query", format!("{other:?} is not a parameter: use scope and role"))),
        }
    }
    for value in headers.get_all(X_TOLLGATE_REQUIRE_SCOPE) {
        scopes.push(value.to_str().map_err(|_| ("X-Tollgate-Require-Scope", "not text".to_owned()))?.to_owned());
    }
    for value in headers.get_all(X_TOLLGATE_REQUIRE_ROLE) {
        roles.push(value.to_str().map_err(|_| ("X-Tollgate-Require-Role", "not text".to_owned()))?.to_owned());
    }
    requirement_from(&scopes, &roles)
}

pub fn requirement_from(scopes: &[String], roles: &[String]) -> Result<Requirement, BadParameter> {
    let scopes = scopes
        .iter()
        .flat_map(|s| s.split([',', ' ']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let roles = roles
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        // The value is named, since it may come from the query or from X-Tollgate-Require-Role.
        .map(|r| r.parse::<Role>().map_err(|_| ("role", format!("{r:?} is not a role: use admin, user or guest"))))
        .collect::<Result<Vec<Role>, _>>()?;
    // Several required roles: the highest applies.
    let role = roles.into_iter().max_by_key(|r| Requirement::rank(*r));
    Ok(Requirement { scopes, role })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn requirements_come_from_query_and_headers_and_the_highest_role_applies() {
        let mut headers = HeaderMap::new();
        headers.append("x-tollgate-require-scope", HeaderValue::from_static("orders"));
        headers.append("x-tollgate-require-role", HeaderValue::from_static("guest"));
        let query = Some("scope=read,write&scope=a%20b&role=admin&other=1");
        let need = requirement(query, OtherNames::Ignored, &headers).expect("valid");
        assert_eq!(need.scopes, ["read", "write", "a", "b", "orders"]);
        assert_eq!(need.role, Some(Role::Admin));
        assert_eq!(requirement(None, OtherNames::Refused, &HeaderMap::new()).expect("valid"), Requirement::default());
        assert!(requirement(Some("role=root"), OtherNames::Ignored, &HeaderMap::new()).is_err());
        // A misspelt requirement in a route's own query is refused, not dropped with its check.
        let (field, message) = requirement(query, OtherNames::Refused, &headers).expect_err("other=1");
        assert_eq!(field, "query");
        assert!(message.contains("\"other\""), "{message}");
        assert!(requirement(Some("scopes=admin"), OtherNames::Refused, &HeaderMap::new()).is_err());
    }

    #[test]
    fn costs_are_bounded() {
        let cost = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-tollgate-cost", HeaderValue::from_static(v));
            cost_header(&headers)
        };
        assert_eq!(cost_header(&HeaderMap::new()), Ok(1));
        assert_eq!(cost(" 7 "), Ok(7));
        assert!(cost("0").is_err() && cost("1001").is_err() && cost("-1").is_err() && cost("x").is_err());
        assert!(cost("").is_err() && cost("2,").is_err());
    }

    #[test]
    fn of_several_costs_the_largest_counts_so_a_client_cannot_undercut_its_gateway() {
        let costs = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("x-tollgate-cost", HeaderValue::from_static(v));
            }
            cost_header(&headers)
        };
        assert_eq!(costs(&["1", "10"]), Ok(10));
        assert_eq!(costs(&["10", "1"]), Ok(10));
        assert_eq!(costs(&["1, 10"]), Ok(10));
        assert!(costs(&["10", "0"]).is_err() && costs(&["1", "x"]).is_err());
    }
}
