//! Reading a verify request from a gateway's headers: the credential, the original request and the client.
//! Nothing here fails: whatever a header holds becomes a missing or malformed credential, or is left out.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::key::{ApiKey, KeyFormatError};

// Header names, parsed at compile time rather than per request.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_SERVICE_KEY: HeaderName = HeaderName::from_static("x-service-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const ORIGINAL_METHOD: [HeaderName; 2] =
    [HeaderName::from_static("x-original-method"), HeaderName::from_static("x-forwarded-method")];
const ORIGINAL_URI: [HeaderName; 2] =
    [HeaderName::from_static("x-original-uri"), HeaderName::from_static("x-forwarded-uri")];
const REQUEST_ID: [HeaderName; 1] = [HeaderName::from_static("x-request-id")];

/// What the caller presented as a key.
#[derive(Debug, PartialEq)]
pub enum Credential {
    Missing,
    Malformed(KeyFormatError),
    Key(ApiKey),
}

impl Credential {
    pub fn from_text(text: &str) -> Credential {
        match ApiKey::parse(text) {
            Ok(key) => Credential::Key(key),
            Err(e) => Credential::Malformed(e),
        }
    }
}

/// The credential from `X-API-Key` or `X-Service-Key`, else from `Authorization: Bearer …`: a header that can only
/// hold an API key wins over `Authorization`, which often carries the caller's own token (a JWT) beside the key. A
/// blank one counts as absent, as nginx, which does not pass on empty headers, would have it: the same request gets
/// the same answer behind any gateway.
pub fn credential(headers: &HeaderMap) -> Credential {
    for name in [X_API_KEY, X_SERVICE_KEY] {
        let Some(value) = headers.get(&name) else { continue };
        match value.to_str().map(str::trim) {
            Ok("") => {}
            Ok(text) => return Credential::from_text(text),
            Err(_) => return Credential::Malformed(KeyFormatError::BadCharacters),
        }
    }
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else { return Credential::Missing };
    let Ok(text) = value.to_str() else { return Credential::Malformed(KeyFormatError::BadCharacters) };
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Credential::from_text(token.trim()),
        None if text.eq_ignore_ascii_case("bearer") => Credential::Malformed(KeyFormatError::Empty),
        _ => Credential::Missing,
    }
}

/// The first of `names` that is present, cut to `max` bytes; bytes that are not UTF-8 (a raw path as nginx passes
/// it on, say) read as U+FFFD rather than lose the whole value.
pub fn header_text(headers: &HeaderMap, names: &[HeaderName], max: usize) -> Option<String> {
    let value = names.iter().find_map(|name| headers.get(name))?;
    Some(truncate(&String::from_utf8_lossy(value.as_bytes()), max))
}

pub fn original_method(headers: &HeaderMap) -> Option<String> {
    header_text(headers, &ORIGINAL_METHOD, MAX_METHOD_LEN)
}

pub fn original_uri(headers: &HeaderMap) -> Option<String> {
    header_text(headers, &ORIGINAL_URI, MAX_TEXT_LEN)
}

pub fn request_id(headers: &HeaderMap) -> Option<String> {
    header_text(headers, &REQUEST_ID, MAX_TEXT_LEN)
}

pub fn user_agent(headers: &HeaderMap) -> Option<String> {
    header_text(headers, &[axum::http::header::USER_AGENT], MAX_TEXT_LEN)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Decides which proxies' forwarding headers are believed.
#[derive(Debug, Clone)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy, in which case the nearest untrusted
    /// address in `X-Forwarded-For` (or `X-Real-IP`, or an address the caller states).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap, stated: Option<IpAddr>) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        if let Some(stated) = stated {
            return stated.to_canonical();
        }
        if !headers.contains_key(X_FORWARDED_FOR) {
            return headers.get(X_REAL_IP).and_then(|v| forwarded_address(v.to_str().ok()?)).unwrap_or(peer);
        }
        // Walk from the nearest hop outwards; the first address we do not trust is the client. An entry that is not
        // an address ends the walk at the last hop we trust: whatever lies beyond it may be the client's own words,
        // and skipping it would let a client pick the address it is limited by.
        let mut nearest = peer;
        for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            // Entry by entry: a proxy joins what the client sent, readable or not, with the address it saw.
            for entry in value.as_bytes().rsplit(|b| *b == b',') {
                match std::str::from_utf8(entry).ok().and_then(forwarded_address) {
                    Some(ip) if self.trusts(ip) => nearest = ip,
                    Some(ip) => return ip,
                    None => return nearest,
                }
            }
        }
        nearest
    }
}

/// An address as proxies write it in `X-Forwarded-For`: `203.0.113.5`, `2001:db8::1`, either with a port
/// (`203.0.113.5:4711`, `[2001:db8::1]:443`), or an IPv6 one in brackets alone (`[2001:db8::1]`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip =
        entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip())).or_else(|| {
            entry.strip_prefix('[')?.strip_suffix(']')?.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use tollgate_shared::key::KeyEnv;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("valid header"));
        }
        map
    }

    #[test]
    fn credentials_come_from_any_of_the_three_headers() {
        let key = ApiKey::generate(KeyEnv::Live);
        let bearer = format!("Bearer {}", key.expose());
        assert_eq!(credential(&headers(&[("authorization", &bearer)])), Credential::Key(key.clone()));
        let lower = format!("bearer {}", key.expose());
        assert_eq!(credential(&headers(&[("authorization", &lower)])), Credential::Key(key.clone()));
        assert_eq!(credential(&headers(&[("x-api-key", key.expose())])), Credential::Key(key.clone()));
        assert_eq!(credential(&headers(&[("x-service-key", key.expose())])), Credential::Key(key.clone()));
        let basic_then_header = headers(&[("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", key.expose())]);
        assert_eq!(credential(&basic_then_header), Credential::Key(key.clone()));
        // The caller's own token in `Authorization` beside the key: the key's header wins.
        let jwt_and_key =
            headers(&[("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"), ("x-api-key", key.expose())]);
        assert_eq!(credential(&jwt_and_key), Credential::Key(key.clone()));
        assert_eq!(credential(&headers(&[("authorization", "Basic dXNlcjpwdw==")])), Credential::Missing);
        // A blank key header (an unset variable in a gateway's config, say) hides nothing.
        let blank_and_bearer = headers(&[("x-api-key", ""), ("x-service-key", " "), ("authorization", &bearer)]);
        assert_eq!(credential(&blank_and_bearer), Credential::Key(key));
        assert_eq!(credential(&headers(&[("x-api-key", "")])), Credential::Missing);
    }

    #[test]
    fn bad_credentials_are_missing_or_malformed() {
        assert_eq!(credential(&HeaderMap::new()), Credential::Missing);
        assert_eq!(credential(&headers(&[("authorization", "Bearer")])), Credential::Malformed(KeyFormatError::Empty));
        assert_eq!(credential(&headers(&[("authorization", "Bearer ")])), Credential::Malformed(KeyFormatError::Empty));
        let long = format!("Bearer {}", "a".repeat(10_000));
        assert_eq!(credential(&headers(&[("authorization", &long)])), Credential::Malformed(KeyFormatError::TooLong));
        let mut binary = HeaderMap::new();
        binary.insert("x-api-key", HeaderValue::from_bytes(b"tg_\xff\xfe").expect("obs-text is allowed"));
        assert_eq!(credential(&binary), Credential::Malformed(KeyFormatError::BadCharacters));
    }

    #[test]
    fn client_ip_believes_only_trusted_proxies() {
        let trusted =
            TrustedProxies::new(vec!["127.0.0.0/8".parse().expect("net"), "10.0.0.0/8".parse().expect("net")]);
        let forwarded = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.1.2.3")]);
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let stranger: IpAddr = "192.0.2.1".parse().expect("ip");
        assert_eq!(trusted.client_ip(proxy, &forwarded, None), "198.51.100.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(trusted.client_ip(stranger, &forwarded, None), stranger);
        let real = headers(&[("x-real-ip", "203.0.113.5")]);
        assert_eq!(trusted.client_ip(proxy, &real, None), "203.0.113.5".parse::<IpAddr>().expect("ip"));
        assert_eq!(trusted.client_ip(proxy, &HeaderMap::new(), None), proxy);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        assert!(trusted.trusts(mapped));
    }

    #[test]
    fn a_client_cannot_choose_its_address_past_an_entry_that_is_not_one() {
        let trusted =
            TrustedProxies::new(vec!["127.0.0.0/8".parse().expect("net"), "10.0.0.0/8".parse().expect("net")]);
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        let client_ip = |pairs: &[(&'static str, &str)]| trusted.client_ip(proxy, &headers(pairs), None);
        // Ports, as some proxies write them, are read.
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, 203.0.113.5:4711")]), ip("203.0.113.5"));
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, [2001:db8::1]:443")]), ip("2001:db8::1"));
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, [2001:db8::1]")]), ip("2001:db8::1"));
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, [203.0.113.5]")]), proxy, "IPv4 has no brackets");
        assert_eq!(client_ip(&[("x-forwarded-for", "::ffff:203.0.113.5")]), ip("203.0.113.5"));
        // Anything else ends the walk at the last trusted hop, never at an address the client wrote further out.
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, unknown")]), proxy);
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1, unknown, 10.0.0.2")]), ip("10.0.0.2"));
        assert_eq!(client_ip(&[("x-forwarded-for", "198.51.100.1,"), ("x-real-ip", "192.0.2.9")]), proxy);
        // Several header lines are one list, the last line nearest.
        let lines = [("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "203.0.113.5, 10.0.0.2")];
        assert_eq!(client_ip(&lines), ip("203.0.113.5"));
        let mut unreadable = headers(&[("x-forwarded-for", "198.51.100.1")]);
        unreadable.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff").expect("obs-text"));
        assert_eq!(trusted.client_ip(proxy, &unreadable, None), proxy);
        // The client's unreadable entry joined on one line with the address the proxy saw (nginx's
        // $proxy_add_x_forwarded_for): the proxy's entry is read.
        let mut joined = HeaderMap::new();
        joined.append("x-forwarded-for", HeaderValue::from_bytes(b"\x80, 203.0.113.9").expect("obs-text"));
        assert_eq!(trusted.client_ip(proxy, &joined, None), ip("203.0.113.9"));
    }

    #[test]
    fn text_that_is_not_utf8_is_kept_with_replacement_characters() {
        let mut map = HeaderMap::new();
        map.insert("x-original-uri", HeaderValue::from_bytes(b"/caf\xc3\xa9/\xff?q=1").expect("obs-text"));
        assert_eq!(original_uri(&map).as_deref(), Some("/café/\u{fffd}?q=1"));
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
