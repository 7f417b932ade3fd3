//! The private servers start, stop and start again, so fault tests can rely on them.

use std::time::Duration;

use crate::servers::{PrivateNats, PrivatePostgres, PrivateRedis};

#[tokio::test]
async fn private_servers_stop_and_restart() {
    let mut nats = PrivateNats::start();
    async_nats::connect(nats.url()).await.expect("private nats answers");
    nats.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats.port)).is_err(), "nats still answers");
    nats.restart();
    async_nats::connect(nats.url()).await.expect("private nats answers again");

    let mut redis = PrivateRedis::start();
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("private redis answers");
    let pong: String = redis::cmd("PING").query_async(&mut connection).await.expect("ping");
    assert_eq!(pong, "PONG");
    redis.stop();
    redis.restart();

    let postgres = PrivatePostgres::start();
    let url = postgres.url("postgres");
    let pool = sqlx::PgPool::connect(&url).await.expect("private postgres answers");
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.expect("query");
    assert_eq!(one, 1);
    postgres.pause();
    let hung = tokio::time::timeout(Duration::from_millis(500), sqlx::query("SELECT 1").execute(&pool)).await;
    assert!(hung.is_err(), "a paused postgres answered");
    postgres.resume();
    sqlx::query("SELECT 1").execute(&pool).await.expect("a resumed postgres answers");
    postgres.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", postgres.port)).is_err(), "postgres still answers");
    postgres.restart();
    sqlx::PgPool::connect(&url).await.expect("private postgres answers again");
}
