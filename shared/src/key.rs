//! API key format, parsing and hashing.
//!
//! Tollgate keys look like `tg_live_<43 base62 chars><6 base62 chars>`: 32 bytes from the OS CSPRNG, then a
//! CRC32 of everything before it. The checksum lets the validator reject a mistyped or made-up key without any
//! lookup, and gives secret scanners a format they can recognise. Keys imported from other systems (say
//! `sk_prod_…`) are accepted in a looser format and stored hashed like any other.

use std::fmt;

use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::{Digest, Sha256};

const RANDOM_BYTES: usize = 32;
/// ⌈32 · 8 / log2(62)⌉: enough base62 digits for any 32-byte value.
const BODY_LEN: usize = 43;
/// ⌈32 / log2(62)⌉: enough base62 digits for any CRC32.
const CHECKSUM_LEN: usize = 6;
const TOLLGATE_PREFIX: &str = "tg_";
const ENV_PREFIX_LEN: usize = 8; // "tg_live_" / "tg_test_"
const TOLLGATE_KEY_LEN: usize = ENV_PREFIX_LEN + BODY_LEN + CHECKSUM_LEN;
/// Imported keys: long enough to carry real entropy, short enough to bound the work per request.
const IMPORTED_MIN_LEN: usize = 16;
/// Characters of an imported key that its prefix and hint never show: a short key shown in part would be left to a
/// search that anyone who can read its hash could run.
const IMPORTED_HIDDEN_MIN: usize = 20;
pub const MAX_KEY_LEN: usize = 256;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Which environment a generated key belongs to; shown in the key itself so a test key is never mistaken for a live one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyEnv {
    Live,
    Test,
}

impl KeyEnv {
    fn prefix(self) -> &'static str {
        match self {
            KeyEnv::Live => "tg_live_",
            KeyEnv::Test => "tg_test_",
        }
    }
}

/// Why a presented string is not a key. Never carries the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key is empty")]
    Empty,
    #[error("the key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    #[error("the key is shorter than {IMPORTED_MIN_LEN} characters")]
    TooShort,
    #[error("the key contains characters that no key can contain (only A-Z a-z 0-9 _ - . ~ + / =)")]
    BadCharacters,
    #[error("the key looks like a Tollgate key but its length or checksum is wrong (mistyped?)")]
    BadChecksum,
}

/// A well-formed API key in plaintext. `Debug` never shows it; only [`ApiKey::expose`] does, on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…{})", self.prefix(), self.hint())
    }
}

impl ApiKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate(env: KeyEnv) -> ApiKey {
        let mut random = [0u8; RANDOM_BYTES];
        OsRng.try_fill_bytes(&mut random).expect("the OS random number generator failed; no key can be made safely");
        let mut key = String::with_capacity(TOLLGATE_KEY_LEN);
        key.push_str(env.prefix());
        key.extend(base62_fixed::<BODY_LEN>(&random).map(char::from));
        let checksum = crc32fast::hash(key.as_bytes());
        key.extend(base62_fixed::<CHECKSUM_LEN>(&checksum.to_be_bytes()).map(char::from));
        ApiKey(key)
    }

    /// Parses a presented key. Tollgate-format keys must carry a valid checksum; other keys (imported from
    /// another system) must be 16–256 characters from a conservative token alphabet.
    pub fn parse(presented: &str) -> Result<ApiKey, KeyFormatError> {
        if presented.is_empty() {
            return Err(KeyFormatError::Empty);
        }
        if presented.len() > MAX_KEY_LEN {
            return Err(KeyFormatError::TooLong);
        }
        if !presented.bytes().all(is_token_byte) {
            return Err(KeyFormatError::BadCharacters);
        }
        if presented.starts_with(TOLLGATE_PREFIX) {
            return check_tollgate_format(presented).map(|()| ApiKey(presented.to_owned()));
        }
        if presented.len() < IMPORTED_MIN_LEN {
            return Err(KeyFormatError::TooShort);
        }
        Ok(ApiKey(presented.to_owned()))
    }

    /// SHA-256 of the whole key: what the database stores and the cache is indexed by.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The start of the key, safe to show in listings: `tg_live_` plus 4 characters, or a short head of an
    /// imported key (none at all of a short one).
    pub fn prefix(&self) -> &str {
        let len = if self.0.starts_with(TOLLGATE_PREFIX) {
            ENV_PREFIX_LEN + 4
        } else {
            (self.0.len() / 3).min(8).min(self.0.len().saturating_sub(IMPORTED_HIDDEN_MIN))
        };
        &self.0[..len]
    }

    /// The last 4 characters, so a user can tell their keys apart; none of an imported key too short to spare them.
    pub fn hint(&self) -> &str {
        let shown = self.prefix().len() + 4;
        if self.0.len() < shown + IMPORTED_HIDDEN_MIN {
            return "";
        }
        &self.0[self.0.len() - 4..]
    }

    /// The plaintext, for printing exactly once at creation. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

fn check_tollgate_format(key: &str) -> Result<(), KeyFormatError> {
    let env_ok = key.starts_with(KeyEnv::Live.prefix()) || key.starts_with(KeyEnv::Test.prefix());
    if !env_ok || key.len() != TOLLGATE_KEY_LEN {
        return Err(KeyFormatError::BadChecksum);
    }
    let (signed, checksum) = key.split_at(TOLLGATE_KEY_LEN - CHECKSUM_LEN);
    if !signed[ENV_PREFIX_LEN..].bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::BadChecksum);
    }
    let expected = base62_fixed::<CHECKSUM_LEN>(&crc32fast::hash(signed.as_bytes()).to_be_bytes());
    if checksum.as_bytes() != expected {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(())
}

/// Characters allowed in any key: what token formats in the wild use, and nothing that needs quoting in a header.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~' | b'+' | b'/' | b'=')
}

/// Big-endian bytes (at most 32) as a base62 number of `W` digits, left-padded with `0`; `W` must be enough digits
/// for any value of that many bytes. On the stack: every request's checksum check runs it.
fn base62_fixed<const W: usize>(bytes: &[u8]) -> [u8; W] {
    let mut buffer = [0u8; RANDOM_BYTES];
    let number = &mut buffer[..bytes.len()];
    number.copy_from_slice(bytes);
    let mut digits = [b'0'; W];
    for digit in digits.iter_mut().rev() {
        if number.iter().all(|&b| b == 0) {
            break;
        }
        // Long division of the whole number by 62, keeping the remainder as the next digit.
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *digit = BASE62[remainder as usize];
    }
    digits
}

/// SHA-256 of a key. The only form in which a key is stored or compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = ApiKey::generate(KeyEnv::Live);
        let b = ApiKey::generate(KeyEnv::Live);
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOLLGATE_KEY_LEN);
        assert!(a.expose().starts_with("tg_live_"));
        assert_eq!(ApiKey::parse(a.expose()), Ok(a.clone()));
        let t = ApiKey::generate(KeyEnv::Test);
        assert!(t.expose().starts_with("tg_test_"));
        assert!(ApiKey::parse(t.expose()).is_ok());
    }

    #[test]
    fn a_single_typo_is_caught_by_the_checksum() {
        let key = ApiKey::generate(KeyEnv::Live).expose().to_owned();
        for i in ENV_PREFIX_LEN..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).expect("ascii");
            assert_eq!(ApiKey::parse(&typo), Err(KeyFormatError::BadChecksum), "position {i}");
        }
    }

    #[test]
    fn malformed_inputs_are_rejected_with_a_reason() {
        assert_eq!(ApiKey::parse(""), Err(KeyFormatError::Empty));
        assert_eq!(ApiKey::parse(&"a".repeat(10_000)), Err(KeyFormatError::TooLong));
        assert_eq!(ApiKey::parse("short_key"), Err(KeyFormatError::TooShort));
        assert_eq!(ApiKey::parse("has space in the key"), Err(KeyFormatError::BadCharacters));
        assert_eq!(ApiKey::parse("tg_live_abc"), Err(KeyFormatError::BadChecksum));
        assert_eq!(
            ApiKey::parse("tg_prod_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            Err(KeyFormatError::BadChecksum)
        );
        assert_eq!(ApiKey::parse("ключ-ключ-ключ-ключ"), Err(KeyFormatError::BadCharacters));
    }

    #[test]
    fn imported_keys_are_accepted_and_hashed() {
        let key = ApiKey::parse("sk_prod_9f8e7d6c5b4a392817060a0b").expect("valid imported key");
        assert_eq!(key.prefix(), "sk_prod_");
        assert_eq!(key.hint(), "0a0b");
        assert_eq!(key.hash(), ApiKey::parse("sk_prod_9f8e7d6c5b4a392817060a0b").expect("valid").hash());
    }

    #[test]
    fn a_short_imported_key_shows_less_of_itself() {
        let shown = |key: &str| {
            let key = ApiKey::parse(key).expect("valid imported key");
            (key.prefix().to_owned(), key.hint().to_owned())
        };
        // Always at least 20 characters hidden.
        assert_eq!(shown("sk_prod_0123456789abcdef"), ("sk_p".into(), String::new()));
        assert_eq!(shown("0123456789abcdef"), (String::new(), String::new()));
        assert_eq!(shown("sk_prod_9f8e7d6c5b4a39281706"), ("sk_prod_".into(), String::new()));
        assert_eq!(shown("sk_prod_9f8e7d6c5b4a39281706abcd"), ("sk_prod_".into(), "abcd".into()));
        let tollgate = ApiKey::generate(KeyEnv::Live);
        assert_eq!((tollgate.prefix().len(), tollgate.hint().len()), (12, 4));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        let key = ApiKey::parse("sk_prod_0123456789abcdef").expect("valid");
        // echo -n sk_prod_0123456789abcdef | sha256sum
        let hex: String = key.hash().0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "8cffc736cd44673ff42a2a70e3892c216617f139290453106aae87bde299a553");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::generate(KeyEnv::Live);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.expose()[12..40]));
    }

    #[test]
    fn base62_is_fixed_width_and_matches_known_values() {
        assert_eq!(&base62_fixed::<6>(&[0, 0, 0, 0]), b"000000");
        assert_eq!(&base62_fixed::<6>(&[0, 0, 0, 61]), b"00000z");
        assert_eq!(&base62_fixed::<6>(&[0, 0, 0, 62]), b"000010");
        assert_eq!(&base62_fixed::<CHECKSUM_LEN>(&u32::MAX.to_be_bytes()), b"4gfFC3");
        // The widths are just enough: the largest value uses every digit.
        assert_ne!(base62_fixed::<BODY_LEN>(&[0xff; RANDOM_BYTES])[0], b'0');
    }
}
