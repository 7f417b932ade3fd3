//! The wire format of usage events on NATS: the only place that knows it.
//!
//! A message is one version byte followed by a bincode 2 (standard config) encoding of a batch of events. Several
//! events per message keep NATS overhead per event small. Decoding validates what it reads, so a garbage message or
//! an impossible event is rejected here (and dead-lettered by the worker) instead of reaching the database.
//!
//! Versions: 1 is the original event; 2 adds `shadow_outcome`. Every older version still decodes (version 1 with no
//! shadow outcome), but a worker cannot read a version newer than its own: it dead-letters such a message
//! (`unknown_version`). So upgrade workers before validators, or replay the dead letters (`tollgate dlq replay --all`)
//! once the workers are upgraded.

use bincode::{Decode, Encode};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Outcome;
use crate::event::UsageEvent;

/// The version written by this build. Readers accept every version listed in [`decode_batch`].
pub const CURRENT_VERSION: u8 = 2;
/// Upper bound on one message, so a corrupt length prefix cannot make the decoder allocate without bound.
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Events in one message, at most: large enough to amortise per-message costs (a typical event is ~100–300 bytes),
/// and a bound the decoder holds every message to, so that a worker's batch of messages stays near the events it
/// asked for (a megabyte of the smallest events would be some 28 000).
pub const MAX_EVENTS_PER_MESSAGE: usize = 1000;
/// Field bounds; the validator truncates to these before it publishes.
pub const MAX_METHOD_LEN: usize = 16;
pub const MAX_TEXT_LEN: usize = 2048;
/// Largest `units` of one event: a request's cost, which the validator bounds by this.
pub const MAX_UNITS: u32 = 1000;

/// Why a message could not be decoded. The worker puts this reason on the dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty message")]
    Empty,
    #[error("unknown codec version {0}")]
    UnknownVersion(u8),
    #[error("undecodable body: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the batch")]
    TrailingBytes(usize),
    #[error("impossible value: {0}")]
    Impossible(&'static str),
}

impl CodecError {
    /// Every value of [`CodecError::kind`].
    pub const KINDS: [&'static str; 5] =
        ["empty", "unknown_version", "malformed", "trailing_bytes", "impossible_value"];

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::Empty => "empty",
            CodecError::UnknownVersion(_) => "unknown_version",
            CodecError::Malformed(_) => "malformed",
            CodecError::TrailingBytes(_) => "trailing_bytes",
            CodecError::Impossible(_) => "impossible_value",
        }
    }
}

#[derive(Encode, Decode)]
struct WireEventV1 {
    event_id: u128,
    ts_micros: i64,
    org_id: u128,
    key_id: u128,
    outcome: u8,
    method: String,
    path: String,
    client_ip: Option<std::net::IpAddr>,
    user_agent: Option<String>,
    request_id: Option<String>,
    units: u32,
    latency_us: u32,
}

/// Version 2: version 1 plus the shadow outcome's tag.
#[derive(Encode, Decode)]
struct WireEventV2 {
    v1: WireEventV1,
    shadow_outcome: Option<u8>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes a batch of at most [`MAX_EVENTS_PER_MESSAGE`] events in the current version, as one message.
pub fn encode_batch(events: Vec<UsageEvent>) -> Vec<u8> {
    let wire: Vec<WireEventV2> = events.into_iter().map(to_wire).collect();
    encode_wire(&wire)
}

/// Encodes a batch in the current version as messages of at most `max_bytes` and [`MAX_EVENTS_PER_MESSAGE`] events
/// each, in order, each with its number of events: one message when the batch fits, else its halves, each split again
/// as needed (an event alone that is larger still gets a message of its own).
pub fn encode_batches(events: Vec<UsageEvent>, max_bytes: usize) -> Vec<(Vec<u8>, usize)> {
    let wire: Vec<WireEventV2> = events.into_iter().map(to_wire).collect();
    let mut messages = Vec::with_capacity(1);
    encode_within(&wire, max_bytes, &mut messages);
    messages
}

fn encode_within(wire: &[WireEventV2], max_bytes: usize, messages: &mut Vec<(Vec<u8>, usize)>) {
    if wire.len() <= MAX_EVENTS_PER_MESSAGE {
        let message = encode_wire(wire);
        if message.len() <= max_bytes || wire.len() <= 1 {
            messages.push((message, wire.len()));
            return;
        }
    }
    let (first, second) = wire.split_at(wire.len() / 2);
    encode_within(first, max_bytes, messages);
    encode_within(second, max_bytes, messages);
}

/// A slice encodes as a `Vec` does: the length, then the events.
fn encode_wire(wire: &[WireEventV2]) -> Vec<u8> {
    let mut out = vec![CURRENT_VERSION];
    bincode::encode_into_std_write(wire, &mut out, config())
        .expect("encoding into a Vec cannot fail and the events are within the size limit");
    out
}

/// Decodes a message of any supported version, all of it or nothing.
pub fn decode_batch(message: &[u8]) -> Result<Vec<UsageEvent>, CodecError> {
    decode_each(message)?.into_iter().collect()
}

/// Decodes a message of any supported version event by event: the message as a whole may be unreadable (the outer
/// error), or hold some events whose values are impossible (an inner error each), which need not take the others
/// with them.
pub fn decode_each(message: &[u8]) -> Result<Vec<Result<UsageEvent, CodecError>>, CodecError> {
    let (&version, body) = message.split_first().ok_or(CodecError::Empty)?;
    Ok(match version {
        1 => decode_body::<WireEventV1>(body)?.into_iter().map(|w| from_wire(w, None)).collect(),
        2 => decode_body::<WireEventV2>(body)?.into_iter().map(|w| from_wire(w.v1, w.shadow_outcome)).collect(),
        other => return Err(CodecError::UnknownVersion(other)),
    })
}

fn decode_body<W: Decode<()>>(body: &[u8]) -> Result<Vec<W>, CodecError> {
    let (wire, read): (Vec<W>, usize) =
        bincode::decode_from_slice(body, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - read));
    }
    if wire.is_empty() {
        return Err(CodecError::Impossible("a batch with no events"));
    }
    if wire.len() > MAX_EVENTS_PER_MESSAGE {
        return Err(CodecError::Impossible("more events than a message holds"));
    }
    Ok(wire)
}

fn to_wire(e: UsageEvent) -> WireEventV2 {
    let shadow_outcome = e.shadow_outcome.map(outcome_tag);
    let v1 = WireEventV1 {
        event_id: e.event_id.as_u128(),
        ts_micros: e.ts.timestamp_micros(),
        org_id: e.org_id.as_u128(),
        key_id: e.key_id.as_u128(),
        outcome: outcome_tag(e.outcome),
        method: e.method,
        path: e.path,
        client_ip: e.client_ip,
        user_agent: e.user_agent,
        request_id: e.request_id,
        units: e.units,
        latency_us: e.latency_us,
    };
    WireEventV2 { v1, shadow_outcome }
}

fn from_wire(w: WireEventV1, shadow_outcome: Option<u8>) -> Result<UsageEvent, CodecError> {
    let event_id = Uuid::from_u128(w.event_id);
    if event_id.get_version_num() != 7 {
        return Err(CodecError::Impossible("event_id is not a UUIDv7"));
    }
    let ts = DateTime::<Utc>::from_timestamp_micros(w.ts_micros)
        .filter(|ts| (2020..2200).contains(&chrono::Datelike::year(ts)))
        .ok_or(CodecError::Impossible("timestamp out of range"))?;
    let outcome = outcome_from_tag(w.outcome)?;
    let shadow_outcome = shadow_outcome.map(outcome_from_tag).transpose()?;
    if w.units == 0 || w.units > MAX_UNITS {
        return Err(CodecError::Impossible("units out of range"));
    }
    let too_long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_TEXT_LEN);
    if w.method.len() > MAX_METHOD_LEN
        || w.path.len() > MAX_TEXT_LEN
        || too_long(&w.user_agent)
        || too_long(&w.request_id)
    {
        return Err(CodecError::Impossible("text field over its bound"));
    }
    // PostgreSQL text cannot hold a NUL: such an event could never be written, so it must not reach a batch.
    let texts = [Some(&w.method), Some(&w.path), w.user_agent.as_ref(), w.request_id.as_ref()];
    if texts.into_iter().flatten().any(|s| s.contains('\0')) {
        return Err(CodecError::Impossible("NUL character in a text field"));
    }
    Ok(UsageEvent {
        event_id,
        ts,
        org_id: Uuid::from_u128(w.org_id),
        key_id: Uuid::from_u128(w.key_id),
        outcome,
        method: w.method,
        path: w.path,
        client_ip: w.client_ip,
        user_agent: w.user_agent,
        request_id: w.request_id,
        units: w.units,
        latency_us: w.latency_us,
        shadow_outcome,
    })
}

fn outcome_from_tag(tag: u8) -> Result<Outcome, CodecError> {
    Outcome::ALL.get(usize::from(tag)).copied().ok_or(CodecError::Impossible("unknown outcome"))
}

/// The outcome's wire tag is its position in [`Outcome::ALL`], which is append-only.
fn outcome_tag(outcome: Outcome) -> u8 {
    let index = Outcome::ALL.iter().position(|o| *o == outcome).expect("ALL lists every outcome");
    u8::try_from(index).expect("fewer than 256 outcomes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_listed() {
        let errors = [
            CodecError::Empty,
            CodecError::UnknownVersion(9),
            CodecError::Malformed(String::new()),
            CodecError::TrailingBytes(1),
            CodecError::Impossible(""),
        ];
        assert_eq!(errors.map(|e| e.kind()), CodecError::KINDS);
    }

    fn sample(outcome: Outcome) -> UsageEvent {
        UsageEvent {
            event_id: Uuid::now_v7(),
            ts: DateTime::from_timestamp_micros(1_795_000_000_123_456).expect("valid"),
            org_id: Uuid::new_v4(),
            key_id: Uuid::new_v4(),
            outcome,
            method: "GET".into(),
            path: "/v1/things?x=1".into(),
            client_ip: Some("2001:db8::1".parse().expect("ip")),
            user_agent: Some("curl/8".into()),
            request_id: None,
            units: 3,
            latency_us: 42,
            shadow_outcome: None,
        }
    }

    #[test]
    fn batches_round_trip_for_every_outcome() {
        let events: Vec<_> = Outcome::ALL.iter().map(|o| sample(*o)).collect();
        let bytes = encode_batch(events.clone());
        assert_eq!(bytes[0], CURRENT_VERSION);
        assert_eq!(decode_batch(&bytes), Ok(events));
    }

    #[test]
    fn a_batch_too_large_for_one_message_becomes_several_within_the_bound_in_order() {
        // Events as large as the validator lets them be: three texts of MAX_TEXT_LEN each.
        let long = "x".repeat(MAX_TEXT_LEN);
        let large = |_| UsageEvent {
            path: long.clone(),
            user_agent: Some(long.clone()),
            request_id: Some(long.clone()),
            ..sample(Outcome::Allowed)
        };
        let events: Vec<UsageEvent> = (0..1000).map(large).collect();
        let messages = encode_batches(events.clone(), 64 * 1024);
        assert!(messages.len() >= 1000 * 3 * MAX_TEXT_LEN / (64 * 1024), "{} messages", messages.len());
        assert!(messages.iter().all(|(m, _)| m.len() <= 64 * 1024));
        let mut decoded = Vec::new();
        for (message, count) in &messages {
            let batch = decode_batch(message).expect("decodes");
            assert_eq!(batch.len(), *count);
            decoded.extend(batch);
        }
        assert_eq!(decoded, events);

        // A batch that fits is one message, the same as encode_batch's.
        let small: Vec<UsageEvent> = (0..3).map(|_| sample(Outcome::Allowed)).collect();
        assert_eq!(encode_batches(small.clone(), 64 * 1024), vec![(encode_batch(small), 3)]);
        // An event larger than the bound alone still goes, in a message of its own.
        assert_eq!(encode_batches(vec![large(0), large(1)], 1000).len(), 2);
    }

    #[test]
    fn a_message_holds_at_most_its_number_of_events_and_the_decoder_refuses_more() {
        let events: Vec<UsageEvent> = (0..MAX_EVENTS_PER_MESSAGE + 1).map(|_| sample(Outcome::Allowed)).collect();
        let messages = encode_batches(events.clone(), usize::MAX);
        assert_eq!(messages.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [500, 501]);
        let decoded: Vec<UsageEvent> =
            messages.iter().flat_map(|(m, _)| decode_batch(m).expect("within the bound")).collect();
        assert_eq!(decoded, events);

        // One message of them all, as a sender that ignored the bound would make it.
        let wire: Vec<WireEventV2> = events.into_iter().map(to_wire).collect();
        assert_eq!(decode_batch(&encode_wire(&wire)), Err(CodecError::Impossible("more events than a message holds")));
    }

    #[test]
    fn shadow_outcomes_round_trip_and_version_1_still_decodes() {
        let shadowed = UsageEvent { shadow_outcome: Some(Outcome::RateLimited), ..sample(Outcome::Allowed) };
        assert_eq!(decode_batch(&encode_batch(vec![shadowed.clone()])), Ok(vec![shadowed.clone()]));
        let v1 = vec![to_wire(shadowed.clone()).v1];
        let mut bytes = vec![1];
        bincode::encode_into_std_write(&v1, &mut bytes, config()).expect("encode v1");
        let decoded = decode_batch(&bytes).expect("v1 decodes");
        assert_eq!(decoded, vec![UsageEvent { shadow_outcome: None, ..shadowed }]);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = encode_batch(vec![sample(Outcome::Allowed), sample(Outcome::Revoked)]);
        for len in 0..bytes.len() {
            assert!(decode_batch(&bytes[..len]).is_err(), "truncated to {len} bytes decoded");
        }
    }

    #[test]
    fn any_byte_changed_anywhere_is_rejected_or_decodes_to_valid_events_without_a_panic() {
        let bytes = encode_batch(vec![sample(Outcome::Allowed), sample(Outcome::Revoked)]);
        for at in 0..bytes.len() {
            // Besides small and large values, bincode's markers of a wider integer (0xfb..=0xfe).
            for value in [0x00, 0x01, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xfe, 0xff, bytes[at] ^ 0x01] {
                let mut mutated = bytes.clone();
                mutated[at] = value;
                if let Ok(events) = decode_batch(&mutated) {
                    assert_eq!(decode_batch(&encode_batch(events.clone())), Ok(events), "byte {at} set to {value}");
                }
            }
        }
    }

    #[test]
    fn garbage_unknown_versions_and_trailing_bytes_are_rejected() {
        assert_eq!(decode_batch(b""), Err(CodecError::Empty));
        assert_eq!(decode_batch(b"\x09abc"), Err(CodecError::UnknownVersion(9)));
        assert!(decode_batch(b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
        assert!(decode_batch(b"\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
        assert!(decode_batch(b"{\"json\":true}").is_err());
        let mut bytes = encode_batch(vec![sample(Outcome::Allowed)]);
        bytes.push(0);
        assert_eq!(decode_batch(&bytes), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn an_impossible_event_is_rejected_alone_by_decode_each_and_with_its_message_by_decode_batch() {
        let (first, last) = (sample(Outcome::Allowed), sample(Outcome::Revoked));
        let impossible = UsageEvent { units: 0, ..sample(Outcome::Allowed) };
        let bytes = encode_batch(vec![first.clone(), impossible, last.clone()]);
        let units = CodecError::Impossible("units out of range");
        assert_eq!(decode_each(&bytes), Ok(vec![Ok(first), Err(units.clone()), Ok(last)]));
        assert_eq!(decode_batch(&bytes), Err(units));
        assert_eq!(
            decode_each(b"\x01this is not bincode").map(|_| ()),
            decode_batch(b"\x01this is not bincode").map(|_| ())
        );
    }

    #[test]
    fn impossible_values_are_rejected() {
        let mut e = sample(Outcome::Allowed);
        e.units = 0;
        assert_eq!(decode_batch(&encode_batch(vec![e])), Err(CodecError::Impossible("units out of range")));
        // More than a request can cost: it would be billed for more than its usage row can record.
        let mut e = sample(Outcome::Allowed);
        e.units = 3_000_000_000;
        assert_eq!(decode_batch(&encode_batch(vec![e])), Err(CodecError::Impossible("units out of range")));
        let mut e = sample(Outcome::Allowed);
        e.units = MAX_UNITS;
        assert!(decode_batch(&encode_batch(vec![e])).is_ok());
        let mut e = sample(Outcome::Allowed);
        e.event_id = Uuid::new_v4();
        assert!(matches!(decode_batch(&encode_batch(vec![e])), Err(CodecError::Impossible(_))));
        assert!(matches!(decode_batch(&encode_batch(vec![])), Err(CodecError::Impossible(_))));
        let mut e = sample(Outcome::Allowed);
        e.user_agent = Some("bad\0agent".into());
        let nul = Err(CodecError::Impossible("NUL character in a text field"));
        assert_eq!(decode_batch(&encode_batch(vec![e])), nul);
        let mut e = sample(Outcome::Allowed);
        e.path = "/a\0b".into();
        assert_eq!(decode_batch(&encode_batch(vec![e])), nul);
    }
}
