//! From where each limit stands to one decision: the same rules whether Redis or the local fallback counted.

use super::plan::{LimitKind, Plan, QuotaLimit, WindowLimit};
use super::window::Window;
use super::{Decision, Usage};

/// Where one window stands for a decision: its count before it, whether the cost fits, and when its oldest
/// counted unit leaves (none: nothing counted).
#[derive(Debug, Clone, Copy)]
pub struct WindowReply {
    pub used: u64,
    pub fits: bool,
    pub at_us: Option<i64>,
}

/// Turns the per-limit answers into one decision: any enforced limit that does not fit denies, and the one reported
/// is the one the cost exceeds outright (no wait helps then), else the one that frees up last (the quota on a tie), so
/// that a retry at its reset is not denied by another. Otherwise the limit with the least remaining is reported, and
/// of those the one that frees up last.
pub fn decide_from(plan: &Plan, cost: u64, now: i64, windows: &[WindowReply], quota: Option<(u64, bool)>) -> Decision {
    let window_usage = |w: &WindowLimit, r: &WindowReply, admitted: bool| {
        let geometry = Window::seconds(w.seconds);
        let reset_at_us = match (admitted, r.at_us) {
            (_, Some(at)) => at,
            // Nothing counted before: this request's own bucket is the oldest.
            (true, None) => (now.div_euclid(geometry.bucket_us) + 1) * geometry.bucket_us + geometry.length_us,
            // Its cost exceeds the limit: it never fits; report the window's end.
            (false, None) => now + geometry.length_us,
        };
        Usage {
            kind: w.kind(),
            limit: w.limit,
            used: if admitted { r.used + cost } else { r.used },
            window_seconds: u64::from(w.seconds),
            reset_at_us,
            now_us: now,
            never_fits: !admitted && cost > w.limit,
        }
    };
    let quota_usage = |q: &QuotaLimit, used: u64, admitted: bool| Usage {
        kind: LimitKind::Quota,
        limit: q.limit,
        used: if admitted { used + cost } else { used },
        window_seconds: q.window_seconds,
        reset_at_us: q.reset_at_us,
        now_us: now,
        never_fits: !admitted && cost > q.limit,
    };

    let quota_denial = match (&plan.quota, quota) {
        (Some(q), Some((used, false))) if !q.shadow => Some(quota_usage(q, used, false)),
        _ => None,
    };
    let window_denials =
        plan.windows.iter().zip(windows).filter(|(w, r)| !r.fits && !w.shadow).map(|(w, r)| window_usage(w, r, false));
    let denied = quota_denial
        .into_iter()
        .chain(window_denials)
        .max_by_key(|u| (u.never_fits, u.reset_at_us, u.kind == LimitKind::Quota));
    if let Some(usage) = denied {
        return Decision::Denied { usage, now_us: now };
    }

    let mut shadow = None;
    let mut candidates = Vec::new();
    for (w, r) in plan.windows.iter().zip(windows) {
        if !r.fits {
            shadow = shadow.or(Some(w.kind()));
        } else if !w.shadow {
            candidates.push(window_usage(w, r, true));
        }
    }
    if let (Some(q), Some((used, fits))) = (&plan.quota, quota) {
        if !fits {
            shadow = shadow.or(Some(LimitKind::Quota));
        } else if !q.shadow {
            candidates.push(quota_usage(q, used, true));
        }
    }
    let usage = candidates.into_iter().min_by_key(|u| (u.remaining(), std::cmp::Reverse(u.reset_at_us)));
    Decision::Allowed { usage, shadow, now_us: now }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::plan::Subject;
    use uuid::Uuid;

    const ID: Uuid = Uuid::from_u128(0x0190a0b0_0000_7000_8000_000000000001);

    fn window(subject: Subject, limit: u64, shadow: bool) -> WindowLimit {
        WindowLimit { subject, limit, seconds: 60, shadow }
    }

    fn reply(used: u64, fits: bool, at_us: Option<i64>) -> WindowReply {
        WindowReply { used, fits, at_us }
    }

    #[test]
    fn the_most_restrictive_limit_is_reported_and_denials_pick_the_latest_retry() {
        let plan = Plan {
            windows: vec![window(Subject::Key(ID), 10, false), window(Subject::Org(ID), 100, false)],
            quota: None,
        };
        let allowed = decide_from(&plan, 1, 0, &[reply(8, true, Some(5)), reply(10, true, Some(7))], None);
        let Decision::Allowed { usage: Some(usage), shadow: None, .. } = allowed else { panic!("{allowed:?}") };
        assert_eq!((usage.kind, usage.used, usage.remaining(), usage.reset_at_us), (LimitKind::Key, 9, 1, 5));
        let denied = decide_from(&plan, 1, 0, &[reply(10, false, Some(5)), reply(100, false, Some(9))], None);
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.used, usage.reset_at_us), (LimitKind::Org, 100, 9));
    }

    #[test]
    fn of_limits_equally_close_the_one_that_frees_up_last_is_reported() {
        let plan = Plan {
            windows: vec![
                window(Subject::Key(ID), 10, false),
                WindowLimit { subject: Subject::TierWindow(ID), limit: 100, seconds: 3600, shadow: false },
            ],
            quota: None,
        };
        // Both have one unit left: a client told the key's (earlier) reset would retry into the tier's denial.
        let replies = [reply(8, true, Some(5_000_000)), reply(98, true, Some(3_000_000_000))];
        let allowed = decide_from(&plan, 1, 0, &replies, None);
        let Decision::Allowed { usage: Some(usage), .. } = allowed else { panic!("{allowed:?}") };
        assert_eq!((usage.kind, usage.remaining(), usage.reset_at_us), (LimitKind::Tier, 1, 3_000_000_000));
    }

    #[test]
    fn a_denial_by_the_quota_and_a_window_that_frees_up_later_says_to_retry_after_the_window() {
        // The last seconds of a month: the quota resets in 10 s, the tier's window in 40 minutes.
        let quota = QuotaLimit {
            redis_key: "q".into(),
            limit: 1000,
            reset_at_us: 10_000_000,
            window_seconds: 2_592_000,
            shadow: false,
        };
        let plan = Plan {
            windows: vec![WindowLimit { subject: Subject::TierWindow(ID), limit: 100, seconds: 3600, shadow: false }],
            quota: Some(quota),
        };
        let denied = decide_from(&plan, 1, 0, &[reply(100, false, Some(2_400_000_000))], Some((1000, false)));
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.reset_at_us), (LimitKind::Tier, 2_400_000_000));
        // A window that frees up first leaves the quota reported.
        let denied = decide_from(&plan, 1, 0, &[reply(100, false, Some(5_000_000))], Some((1000, false)));
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.reset_at_us), (LimitKind::Quota, 10_000_000));
    }

    #[test]
    fn a_limit_the_cost_exceeds_outright_is_the_one_reported_since_no_wait_helps() {
        let quota = QuotaLimit {
            redis_key: "q".into(),
            limit: 1000,
            reset_at_us: 1_000_000_000,
            window_seconds: 2_592_000,
            shadow: false,
        };
        let plan = Plan {
            windows: vec![window(Subject::Key(ID), 5, false), window(Subject::Org(ID), 100, false)],
            quota: Some(quota),
        };
        // Over the quota and the organization's window (which frees up later), and heavier than the key's limit.
        let replies = [reply(0, false, None), reply(99, false, Some(9))];
        let denied = decide_from(&plan, 6, 0, &replies, Some((999, false)));
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.limit, usage.never_fits), (LimitKind::Key, 5, true));
        // Within every whole limit: the quota, and it says when to retry.
        let denied =
            decide_from(&plan, 2, 0, &[reply(4, false, Some(5)), reply(99, false, Some(9))], Some((999, false)));
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.never_fits), (LimitKind::Quota, false));
    }

    #[test]
    fn shadow_limits_are_reported_but_never_deny() {
        let quota = QuotaLimit {
            redis_key: "q".into(),
            limit: 5,
            reset_at_us: 1_000_000_000,
            window_seconds: 2_592_000,
            shadow: false,
        };
        let plan = Plan { windows: vec![window(Subject::TierWindow(ID), 10, true)], quota: Some(quota.clone()) };
        let allowed = decide_from(&plan, 1, 0, &[reply(10, false, Some(5))], Some((1, true)));
        let Decision::Allowed { usage: Some(usage), shadow, .. } = allowed else { panic!("{allowed:?}") };
        assert_eq!((usage.kind, usage.used, shadow), (LimitKind::Quota, 2, Some(LimitKind::Tier)));
        let over = decide_from(&plan, 1, 0, &[reply(1, true, None)], Some((5, false)));
        let Decision::Denied { usage, .. } = over else { panic!("{over:?}") };
        assert_eq!((usage.kind, usage.reset_at_us), (LimitKind::Quota, 1_000_000_000));
        let shadow_quota = Plan { quota: Some(QuotaLimit { shadow: true, ..quota }), ..plan };
        let allowed = decide_from(&shadow_quota, 1, 0, &[reply(1, true, None)], Some((5, false)));
        assert!(matches!(allowed, Decision::Allowed { shadow: Some(LimitKind::Quota), .. }), "{allowed:?}");
    }
}
