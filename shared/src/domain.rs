//! Domain vocabulary shared by the validator, the workers and the CLI. Each enum's text form is what the database
//! stores and what the CLI accepts.

use serde::{Deserialize, Serialize};

/// Declares an enum whose variants map one-to-one onto lowercase database text.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;
            fn try_from(s: String) -> Result<Self, UnknownValue> {
                s.parse()
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue { kind: stringify!($name), value: s.to_owned() }),
                }
            }
        }
    };
}

/// A text value that is not one of an enum's variants (e.g. a row written by a newer version).
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {kind} value {value:?}")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

text_enum!(
    /// An organization's commercial plan.
    Plan { Free => "free", Pro => "pro", Enterprise => "enterprise" }
);

text_enum!(
    /// What a key may do; gateways can require a role per route.
    Role { Admin => "admin", User => "user", Guest => "guest" }
);

text_enum!(
    /// A key's rate-limit tier, defined in the `rate_limit_tiers` table.
    RateLimitTier { Unlimited => "unlimited", Premium => "premium", Standard => "standard", Limited => "limited" }
);

text_enum!(
    /// The decision on an identified key: one `api_usage` row each. Order is part of the event codec: append only.
    Outcome {
        Allowed => "allowed",
        Revoked => "revoked",
        Expired => "expired",
        Disabled => "disabled",
        RateLimited => "rate_limited",
        QuotaExceeded => "quota_exceeded",
        InsufficientScope => "insufficient_scope",
    }
);

impl Outcome {
    /// The `code` field of `/v1/verify`.
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Allowed => "VALID",
            Outcome::Revoked => "REVOKED",
            Outcome::Expired => "EXPIRED",
            Outcome::Disabled => "DISABLED",
            Outcome::RateLimited => "RATE_LIMITED",
            Outcome::QuotaExceeded => "USAGE_EXCEEDED",
            Outcome::InsufficientScope => "INSUFFICIENT_SCOPE",
        }
    }

    pub fn is_allowed(self) -> bool {
        self == Outcome::Allowed
    }
}

/// A limit an operator sets: a number, or `none` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSetting {
    Unlimited,
    Max(i64),
}

impl LimitSetting {
    pub fn as_option(self) -> Option<i64> {
        match self {
            LimitSetting::Unlimited => None,
            LimitSetting::Max(n) => Some(n),
        }
    }
}

impl std::str::FromStr for LimitSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "unlimited" => Ok(LimitSetting::Unlimited),
            n => match n.parse::<i64>() {
                Ok(n) if n > 0 => Ok(LimitSetting::Max(n)),
                _ => Err(format!("expected a positive number or `none`, got {n:?}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().ok(), Some(*o));
        }
        for t in RateLimitTier::ALL {
            assert_eq!(t.to_string().parse::<RateLimitTier>().ok(), Some(*t));
        }
        assert!("gold".parse::<Plan>().is_err());
    }
}
