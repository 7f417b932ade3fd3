//! The `user_agents` dictionary: a usage row stores its user agent's id, and each distinct string once.

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;

use tollgate_shared::event::UsageEvent;

/// Bytes of remembered ids (see [`cost`]) before the memory is cleared and rebuilt from the table: a flood of made-up
/// user agents, each up to 2 KB, must not grow a worker without bound. A real API's clients send a few thousand.
const REMEMBERED_BYTES: usize = 8 * 1024 * 1024;
/// What the map spends on an entry besides the string's bytes, about.
const ENTRY_BYTES: usize = 64;
/// Attempts at resolving a batch: a string another worker is inserting at the same moment is only visible to a
/// second statement.
const ATTEMPTS: usize = 3;
/// About how many distinct user agents are stored (counted as ids handed out; one statement may go past it by the
/// new strings of its batch): the header is the client's to write, so without a bound anyone holding a key could grow
/// the table, and use up its 32-bit ids, with made-up strings. Past it, a new string is recorded as no user agent.
pub const STORED_MAX: i64 = 1_000_000;

/// The last id handed out (0 before the first), in SQL.
macro_rules! last_id {
    () => {
        "coalesce(pg_sequence_last_value(pg_get_serial_sequence('user_agents', 'id')), 0)"
    };
}

/// Inserts the strings that are missing, while fewer than `$2` ids have been handed out, and returns the id of each
/// one asked for that has one. `known` reads rows inserted by others before this statement started; rows inserted
/// concurrently show up on the next attempt. Only strings not known are inserted: an insert that meets a conflict
/// still uses up an id, and the ids are 32-bit, so inserting every string asked for (each worker asks again after a
/// restart) would run through them.
const RESOLVE: &str = concat!(
    "
WITH asked AS (SELECT DISTINCT unnest($1::text[]) AS user_agent),
known AS (SELECT a.id, a.user_agent FROM user_agents a JOIN asked USING (user_agent)),
added AS (
    INSERT INTO user_agents (user_agent)
    SELECT user_agent FROM asked
    WHERE user_agent NOT IN (SELECT user_agent FROM known) AND ",
    last_id!(),
    " < $2
    ORDER BY 1
    ON CONFLICT (user_agent) DO NOTHING
    RETURNING id, user_agent
)
SELECT id, user_agent FROM added
UNION ALL
SELECT id, user_agent FROM known"
);

const LAST_ID: &str = concat!("SELECT ", last_id!());

/// A worker's memory of user-agent ids (`None`: a string that came after the table was full, stored as none).
#[derive(Debug, Default)]
pub struct UserAgents {
    ids: HashMap<String, Option<i32>>,
    /// What `ids` costs, by [`cost`].
    bytes: usize,
}

/// What remembering one string's id costs.
fn cost(user_agent: &str) -> usize {
    user_agent.len() + ENTRY_BYTES
}

impl UserAgents {
    /// Makes sure every user agent of `events` has an id, adding the new ones to the table.
    pub async fn resolve(&mut self, pool: &PgPool, events: &[&UsageEvent]) -> Result<(), sqlx::Error> {
        let asked: HashSet<&str> = events.iter().filter_map(|e| e.user_agent.as_deref()).collect();
        let mut missing: Vec<String> =
            asked.iter().filter(|ua| !self.ids.contains_key(**ua)).map(|ua| (*ua).to_owned()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !self.has_room_for(&missing) {
            self.ids.clear();
            self.bytes = 0;
            missing = asked.iter().map(|ua| (*ua).to_owned()).collect();
        }
        for _ in 0..ATTEMPTS {
            let found: Vec<(i32, String)> =
                sqlx::query_as(RESOLVE).bind(&missing).bind(STORED_MAX).fetch_all(pool).await?;
            for (id, ua) in found {
                self.remember(ua, Some(id));
            }
            missing.retain(|ua| !self.ids.contains_key(ua));
            if missing.is_empty() {
                return Ok(());
            }
            let last_id: i64 = sqlx::query_scalar(LAST_ID).fetch_one(pool).await?;
            if last_id >= STORED_MAX {
                tracing::warn!(
                    new = missing.len(),
                    "user_agents holds its most distinct strings ({STORED_MAX}); new ones are recorded as none"
                );
                for ua in missing {
                    self.remember(ua, None);
                }
                return Ok(());
            }
        }
        Err(sqlx::Error::Protocol(format!("{} user agents have no id after {ATTEMPTS} attempts", missing.len())))
    }

    fn has_room_for(&self, missing: &[String]) -> bool {
        self.bytes + missing.iter().map(|ua| cost(ua)).sum::<usize>() <= REMEMBERED_BYTES
    }

    fn remember(&mut self, user_agent: String, id: Option<i32>) {
        let bytes = cost(&user_agent);
        if self.ids.insert(user_agent, id).is_none() {
            self.bytes += bytes;
        }
    }

    /// The id of `user_agent`, which [`UserAgents::resolve`] saw (`None` too for one the table had no room for).
    pub fn id(&self, user_agent: Option<&str>) -> Option<i32> {
        user_agent.and_then(|ua| self.ids.get(ua).copied().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_is_counted_in_bytes_so_long_made_up_strings_fill_it_sooner() {
        let mut agents = UserAgents::default();
        let long = |i: usize| format!("{i:0>2048}");
        let fitting = REMEMBERED_BYTES / cost(&long(0));
        for i in 0..fitting {
            agents.remember(long(i), Some(i as i32));
        }
        assert_eq!(agents.bytes, fitting * cost(&long(0)));
        // Remembered again (another batch, or another attempt): not counted twice.
        agents.remember(long(0), Some(0));
        assert_eq!(agents.bytes, fitting * cost(&long(0)));
        assert!(!agents.has_room_for(&[long(fitting)]), "{fitting} strings of 2 KB fill the memory, not 100 000");
        assert!(UserAgents::default().has_room_for(&["curl/8".to_owned()]));
    }
}
