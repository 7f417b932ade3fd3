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
    /// What a key may do; gateways can require a role per route.
    Role { Admin => "admin", User => "user", Guest => "guest" }
);

/// Declares the name of a row operators add (a rate-limit tier, a plan), with its table's CHECK rule
/// (`^[a-z0-9][a-z0-9_-]{0,62}$`), so that a bad name is refused with what it may be before any query.
macro_rules! row_name {
    ($(#[$meta:meta])* $name:ident, $what:literal, default: $default:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
        pub struct $name(String);

        impl $name {
            /// The one a row gets unless told otherwise.
            pub const DEFAULT: &'static str = $default;

            /// A name known to be valid, such as a seeded row's; panics otherwise.
            pub fn from_static(name: &'static str) -> $name {
                name.parse().expect("a valid name")
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                if is_row_name(s) {
                    Ok($name(s.to_owned()))
                } else {
                    Err(format!(
                        concat!("a ", $what, " name is 1 to 63 of a-z, 0-9, '_' and '-', not starting with '_' or '-': {:?}"),
                        s
                    ))
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
    };
}

fn is_row_name(s: &str) -> bool {
    let first_ok = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    first_ok && rest_ok && s.len() <= 63
}

row_name!(
    /// The name of a rate-limit tier: a row of `rate_limit_tiers`, seeded `unlimited`, `premium`, `standard` and
    /// `limited`, to which operators add their own (`tollgate tier set NAME …`).
    TierName, "tier", default: "standard"
);

row_name!(
    /// The name of an organization's commercial plan: a row of `plans`, seeded `free`, `pro` and `enterprise`, to
    /// which operators add their own (in SQL: name, included units, price, currency).
    PlanName, "plan", default: "free"
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
        assert!("gold".parse::<Role>().is_err());
    }

    /// The same rule as the CHECK of `rate_limit_tiers` and `plans` (`^[a-z0-9][a-z0-9_-]{0,62}$`).
    #[test]
    fn tier_and_plan_names_follow_the_tables_rule() {
        for good in ["standard", "gold", "tier-2", "eu_enterprise", "9", &"a".repeat(63)] {
            assert_eq!(good.parse::<TierName>().map(|t| t.to_string()), Ok(good.to_owned()));
            assert_eq!(good.parse::<PlanName>().map(|p| p.to_string()), Ok(good.to_owned()));
        }
        for bad in ["", "Gold", "-x", "_x", "a b", "é", "x;", &"a".repeat(64)] {
            assert!(bad.parse::<TierName>().is_err(), "{bad:?}");
            assert!(bad.parse::<PlanName>().expect_err("refused").starts_with("a plan name is"), "{bad:?}");
        }
    }
}
