//! Removing a namespace after a bench or a test: its Redis keys go, and no one else's.

use tollgate_shared::connect;
use tollgate_shared::topology::Topology;
use uuid::Uuid;

use crate::harness::REDIS_URL;

#[tokio::test]
async fn deleting_a_namespaces_redis_keys_spares_every_other_key() {
    let id = Uuid::new_v4().simple().to_string();
    // Glob characters in a prefix match only themselves.
    let prefix = format!("it:{id}:[ab]*:");
    let topology = Topology { stream: String::new(), subject_prefix: String::new(), redis_prefix: prefix.clone() };
    let mut redis = connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
    // More than one SCAN batch's worth.
    let ours: Vec<String> = (0..2500).map(|n| format!("{prefix}{n}")).collect();
    let others = [format!("it:{id}:a-what-the-prefix-as-a-glob-matches:1"), format!("it:{id}:[ab]*-not-under-it")];
    let mut set = redis::pipe();
    for key in ours.iter().chain(&others) {
        set.set(key, 1).ignore();
    }
    let () = set.query_async(&mut redis).await.expect("SET");

    topology.delete_redis_keys(&REDIS_URL.parse().expect("url")).await.expect("delete the namespace's keys");

    let left: i64 = redis::cmd("EXISTS").arg(&ours).query_async(&mut redis).await.expect("EXISTS");
    let kept: i64 = redis::cmd("EXISTS").arg(&others).query_async(&mut redis).await.expect("EXISTS");
    let _: i64 = redis::cmd("DEL").arg(&others).query_async(&mut redis).await.expect("DEL");
    assert_eq!(left, 0, "keys under the prefix are left");
    assert_eq!(kept, 2, "keys outside the prefix were deleted");
}
