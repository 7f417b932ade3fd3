//! The `tollgate` binary itself: help everywhere, and the org/key commands against a real database.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use tollgate_shared::config::ServerUrl;

use crate::harness::{wait_until, TestEnv, DATABASE_SERVER, NATS_URL};
use crate::servers::{PrivateNats, PrivatePostgres, PrivateRedis};

fn tollgate(env: &TestEnv, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("DATABASE_URL", env.database_url.expose())
        .env("USER", "tester")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("tollgate output")
}

/// What a command that must fail says on stderr.
fn refusal(env: &TestEnv, args: &[&str]) -> String {
    let output = tollgate(env, args, None);
    assert!(!output.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

#[test]
fn every_command_has_help() {
    let commands: &[&[&str]] = &[
        &[],
        &["up"],
        &["migrate"],
        &["validator"],
        &["worker"],
        &["org"],
        &["org", "create"],
        &["org", "list"],
        &["org", "update"],
        &["key"],
        &["key", "create"],
        &["key", "import"],
        &["key", "list"],
        &["key", "show"],
        &["key", "revoke"],
        &["key", "update"],
        &["tier"],
        &["tier", "list"],
        &["tier", "set"],
        &["usage", "reconcile"],
        &["dlq", "list"],
        &["dlq", "replay"],
        &["bench", "pipeline"],
    ];
    for command in commands {
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate")).args(*command).arg("--help").output().expect("run");
        assert!(output.status.success(), "{command:?} --help failed");
        assert!(String::from_utf8_lossy(&output.stdout).contains("Usage:"), "{command:?}");
    }
}

#[test]
fn a_bad_setting_fails_at_start_naming_the_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["validator"])
        .env("TOLLGATE_LISTEN", "not-an-address")
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("TOLLGATE_LISTEN"));

    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["org", "list"])
        .env("DATABASE_URL", "postgres://alice:s3cret@127.0.0.1:1/tollgate")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("PostgreSQL") && stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");

    // A URL that cannot be used is a setting to mend, not a server away, and no command goes on without it.
    for (variable, url, args) in [
        ("DATABASE_URL", "postgres://alice:s3cret@127.0.0.1:5432/tollgate?sslmode=bogus", &["org", "list"][..]),
        ("DATABASE_URL", "postgres://alice:s3cret@127.0.0.1:5432/tollgate?sslmode=bogus", &["migrate"]),
        ("REDIS_URL", "rediss-ish://alice:s3cret@127.0.0.1", &["usage", "reconcile"]),
        // Redis answers, and has no database 99.
        ("REDIS_URL", "redis://127.0.0.1:6379/99", &["usage", "reconcile"]),
        ("NATS_URL", "http://alice:s3cret@127.0.0.1:4222", &["dlq", "list"]),
    ] {
        // A database every PostgreSQL has (not Tollgate's default, which a machine that never ran `up` lacks), so that
        // the commands that read it get as far as the other URLs.
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
            .env(variable, url)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{variable}: {stderr}");
        assert!(stderr.contains(&format!("{variable} (or --")) && stderr.contains("URL Tollgate can use"), "{stderr}");
        assert!(!stderr.contains("s3cret") && !stderr.contains("Is it running?"), "{stderr}");
    }
}

/// A secret in DATABASE_URL that the PostgreSQL client does not read is left out with a warning naming it, once: the
/// client would log it as an unknown parameter, value and all.
#[tokio::test]
async fn a_database_url_secret_the_client_does_not_read_is_not_logged() {
    let database = format!("tollgate_it_secret_{}", uuid::Uuid::new_v4().simple());
    // `migrate` connects twice: to make the database, then to migrate it.
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["migrate"])
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{database}?sslmode=disable&sslpassword=s3cret"),
        )
        .output()
        .expect("run");
    let server = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await.expect("postgres");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&server).await.expect("drop it");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the rest of the URL is used: {stderr}");
    assert_eq!(stderr.matches("does not read").count(), 1, "{stderr}");
    assert!(stderr.contains("[\"sslpassword\"]"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// The README's two commands: `up --demo` prints a key and a curl line that verifies, and Ctrl-C stops it cleanly.
#[tokio::test]
async fn up_demo_prints_a_key_that_verifies_for_a_day() {
    use std::io::BufRead;
    let env = TestEnv::new().await;
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    env.servers_and_namespace(command.args(["up", "--demo"]), NATS_URL)
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_SPOOL_DIR", env.spool_dir())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file, to write"));
    /// Killed if the test fails before it stops it.
    struct Up(Option<std::process::Child>);
    impl Drop for Up {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut up = Up(Some(command.spawn().expect("tollgate up --demo")));
    let child = up.0.as_mut().expect("running");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let pid = child.id().to_string();
    let (lines, printed) = std::sync::mpsc::channel();
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|line| lines.send(line)));
    let curl =
        std::iter::from_fn(|| printed.recv_timeout(Duration::from_secs(60)).ok()).find(|l| l.contains("curl -i"));
    let curl = curl.expect("up --demo printed a curl line within a minute");
    // curl -i -H 'Authorization: Bearer KEY' http://ADDRESS/v1/auth
    let key = curl.split("Bearer ").nth(1).and_then(|rest| rest.split('\'').next()).expect("the key");
    let url = curl.split_whitespace().last().expect("the URL");

    let answer = reqwest::Client::new().get(url).bearer_auth(key).send().await.expect("request");
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'", 1).await;
    let day = "SELECT count(*) FROM api_keys WHERE expires_at BETWEEN now() + interval '23 hours' AND now() + interval '25 hours'";
    assert_eq!(env.count(day).await, 1, "the demo key works for a day");

    let interrupted = Command::new("kill").args(["-INT", &pid]).status().expect("kill");
    assert!(interrupted.success());
    let mut child = up.0.take().expect("running");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(status.success(), "Ctrl-C stops it with exit 0: {status}");
    // Written to a file, as a log collector reads it: plain text, no terminal colours.
    let logged = std::fs::read_to_string(log.path()).expect("the log");
    assert!(logged.contains("validator listening"), "{logged}");
    assert!(!logged.contains('\u{1b}'), "escape codes in a log that is not a terminal: {logged:?}");
    env.cleanup().await;
}

/// A server that answers and refuses the login is told apart from one that does not answer.
#[tokio::test]
async fn a_refused_login_says_so_and_what_to_set() {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["org", "list"])
        .env("DATABASE_URL", format!("{}/postgres", DATABASE_SERVER.replace("postgres@", "tollgate_no_such_role@")))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("refused the login") && stderr.contains("Set DATABASE_URL"), "{stderr}");

    let redis = PrivateRedis::start_with(&["--requirepass", "s3cret"]);
    let with_password = |password: &str| -> ServerUrl {
        redis.url().replace("redis://", &format!("redis://:{password}@")).parse().expect("url")
    };
    let (wrong, missing): (ServerUrl, ServerUrl) = (with_password("wrong"), redis.url().parse().expect("url"));
    for url in [wrong, missing] {
        let refused = tollgate_shared::connect::redis(&url).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("refused the login") && refused.contains("REDIS_URL"), "{url}: {refused}");
        assert!(!refused.contains("wrong"), "the password was shown: {refused}");
    }
    tollgate_shared::connect::redis(&with_password("s3cret")).await.expect("the right password");

    // A validator alone starts while NATS is away, but not when NATS refuses its login: waiting will not mend that.
    let env = TestEnv::new().await;
    let nats = PrivateNats::start_with_config("authorization { user: app, password: pw }");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    env.servers_and_namespace(command.arg("validator"), &nats.url())
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_SPOOL_DIR", env.spool_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut validator = command.spawn().expect("tollgate validator");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = validator.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = validator.kill();
            panic!("the validator started without the login NATS wants");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut validator.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    assert!(!status.success() && stderr.contains("refused the login"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_missing_database_is_made_by_migrate_and_other_commands_say_so() {
    let missing = format!("tollgate_it_missing_{}", uuid::Uuid::new_v4().simple());
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["org", "list"])
        .env("DATABASE_URL", format!("postgres://postgres@127.0.0.1:5432/{missing}"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("does not exist") && stderr.contains("`tollgate migrate`"), "{stderr}");
    // As it says: migrate makes the database, and the command then works; with its name percent-encoded too (an
    // underscore here), as in any URL.
    let encoded = missing.replacen('_', "%5F", 1);
    let url = format!("postgres://postgres@127.0.0.1:5432/{encoded}");
    for command in [&["migrate"][..], &["org", "list"]] {
        let output =
            Command::new(env!("CARGO_BIN_EXE_tollgate")).args(command).env("DATABASE_URL", &url).output().expect("run");
        assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let server = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await.expect("postgres");
    sqlx::query(&format!("DROP DATABASE {missing} WITH (FORCE)")).execute(&server).await.expect("drop it again");

    // A role that may connect to its own database only (as on managed PostgreSQL): migrate needs nothing else.
    let postgres = PrivatePostgres::start();
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.expect("private postgres");
    for statement in [
        "CREATE ROLE app LOGIN",
        "CREATE DATABASE app OWNER app",
        "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC",
        "REVOKE CONNECT ON DATABASE template1 FROM PUBLIC",
    ] {
        sqlx::query(statement).execute(&admin).await.expect(statement);
    }
    let url = postgres.url("app").replace("postgres@", "app@");
    // Its missing database cannot be made by it: the error says so, and how to make it.
    let elsewhere = postgres.url("app_missing").replace("postgres@", "app@");
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("migrate")
        .env("DATABASE_URL", &elsewhere)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("\"app_missing\" does not exist") && stderr.contains("createdb app_missing"), "{stderr}");
    // A database there but never migrated: the commands that do not migrate say what to run.
    for command in [&["org", "list"][..], &["org", "create", "--name", "Acme"]] {
        let output =
            Command::new(env!("CARGO_BIN_EXE_tollgate")).args(command).env("DATABASE_URL", &url).output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success()
                && stderr.contains("no Tollgate tables")
                && stderr.contains("run `tollgate migrate`"),
            "{command:?}: {stderr}"
        );
    }
    let output =
        Command::new(env!("CARGO_BIN_EXE_tollgate")).arg("migrate").env("DATABASE_URL", &url).output().expect("run");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let tiers: i64 = sqlx::query_scalar("SELECT count(*) FROM rate_limit_tiers")
        .fetch_one(&sqlx::PgPool::connect(&url).await.expect("app's database"))
        .await
        .expect("migrated");
    assert_eq!(tiers, 4);
}

/// async-nats itself ignores credentials in the URL; Tollgate passes them on (percent-decoded).
#[tokio::test]
async fn nats_credentials_in_the_url_are_used() {
    for (config, credentials) in [
        ("authorization { user: app, password: \"s3cr/et\" }", "app:s3cr%2Fet@"),
        ("authorization { token: \"t0ken\" }", "t0ken@"),
    ] {
        let nats = PrivateNats::start_with_config(config);
        let refused: ServerUrl = nats.url().parse().expect("url");
        let refused = tollgate_shared::connect::nats(&refused).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("refused the login") && refused.contains("NATS_URL"), "{config}: {refused}");
        let url: ServerUrl = nats.url().replace("nats://", &format!("nats://{credentials}")).parse().expect("url");
        let client = tollgate_shared::connect::nats(&url).await.expect("connected with the URL's credentials");
        client.publish("check", "hello".into()).await.expect("publish");
        client.flush().await.expect("flush");
    }
}

#[tokio::test]
async fn orgs_and_keys_are_managed_from_the_command_line() {
    let env = TestEnv::new().await;
    let org = json_of(&tollgate(&env, &["org", "create", "--name", "Acme Corp", "--plan", "pro", "--json"], None));
    assert_eq!(org["slug"], "acme-corp");
    assert_eq!(org["rate_limit_per_minute"], 60);
    assert_eq!(org["monthly_request_limit"], Value::Null);
    // A value the database refuses is named, with what it may be.
    for (args, says) in [
        (&["org", "create", "--name", ""][..], "a name must be 1 to 200 characters"),
        (&["org", "create", "--name", "x", "--slug=-x"], "a slug must be 1 to 63 of a-z, 0-9 and '-'"),
        // Another organization's id, which `--org` would then find twice.
        (&["org", "create", "--name", "x", "--slug", org["id"].as_str().expect("id")], "a slug cannot be a UUID"),
    ] {
        let stderr = refusal(&env, args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // One made before such slugs were refused: found by that slug while no organization has it as its id, and the
    // organization whose id it is found by that id.
    let legacy = uuid::Uuid::new_v4().to_string();
    let make_legacy = "INSERT INTO organizations (id, name, slug) VALUES (gen_random_uuid(), 'legacy', $1)";
    sqlx::query(make_legacy).bind(&legacy).execute(&env.pool).await.expect("a legacy organization");
    let found = |id_or_slug: String| {
        let pool = env.pool.clone();
        async move { tollgate_shared::admin::find_org(&pool, &id_or_slug).await.expect("found").name }
    };
    assert_eq!(found(legacy.clone()).await, "legacy");
    let acme_id = org["id"].as_str().expect("id").to_owned();
    sqlx::query("UPDATE organizations SET slug = $1 WHERE slug = $2")
        .bind(&acme_id)
        .bind(&legacy)
        .execute(&env.pool)
        .await
        .expect("its slug");
    assert_eq!(found(acme_id).await, "Acme Corp");

    let created = json_of(&tollgate(
        &env,
        &[
            "key",
            "create",
            "--org",
            "acme-corp",
            "--name",
            "ci",
            "--scopes",
            "read,write",
            "--expires-in",
            "30d",
            "--json",
        ],
        None,
    ));
    // Expiries that would make a key that never works, or overflow, and a name that cannot go in a header, are
    // refused with what was wrong.
    for (given, says) in [
        (&["--name", "x", "--expires-at", "2020-01-01T00:00:00Z"][..], "has passed"),
        (&["--name", "x", "--expires-in", "500000000y"], "too far ahead"),
        (&["--name", "line\nbreak"], "a key's name cannot hold line breaks or other control characters"),
    ] {
        let args = [&["key", "create", "--org", "acme-corp"][..], given].concat();
        let stderr = refusal(&env, &args);
        assert!(stderr.contains(says), "{given:?}: {stderr}");
    }
    let key = created["key"].as_str().expect("plaintext key");
    assert!(key.starts_with("tg_live_"));
    let id = created["id"].as_str().expect("id");
    assert_eq!(created["scopes"], serde_json::json!(["read", "write"]));

    let imported = json_of(&tollgate(
        &env,
        &["key", "import", "--org", "acme-corp", "--name", "legacy", "--json"],
        Some("sk_prod_0123456789abcdef\n"),
    ));
    // Shown in part only as far as 20 characters stay hidden: 4 of these 24, and no last 4.
    assert_eq!((imported["prefix"].as_str(), imported["key_hint"].as_str()), (Some("sk_p"), Some("")));
    // Refused imports (the same key twice, a mistyped Tollgate key) say why without echoing the key.
    let mistyped = "tg_live_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGabcdef";
    for presented in ["sk_prod_0123456789abcdef", mistyped] {
        let refused = tollgate(&env, &["key", "import", "--org", "acme-corp", "--name", "legacy"], Some(presented));
        let said = format!("{}{}", String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
        assert!(!refused.status.success() && said.contains("error"), "{presented}: {said}");
        assert!(!said.contains(&presented[8..]), "the refused key was echoed: {said}");
    }
    // A key given as an argument rather than on standard input is refused, and not echoed either, even one that
    // looks like a flag.
    for pasted in ["sk_prod_pasted0123456789", "--pasted0123456789abcdef", "-pasted0123456789abcdef"] {
        let refused = tollgate(&env, &["key", "import", "--org", "acme-corp", "--name", "pasted", pasted], None);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains("standard input"), "{pasted}: {stderr}");
        assert!(!stderr.contains("pasted0123"), "the key was echoed: {stderr}");
    }

    let listing = tollgate(&env, &["key", "list", "--org", "acme-corp"], None);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success() && text.contains("ci") && text.contains("legacy"));
    assert!(!text.contains(key) && !text.contains("sk_prod_0123456789abcdef"), "a plaintext key was listed");
    // A key of a disabled organization is refused as a disabled key is, and shown so.
    for active in ["false", "true"] {
        let output = tollgate(&env, &["org", "update", "acme-corp", "--active", active], None);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let shown = String::from_utf8_lossy(&tollgate(&env, &["key", "show", id], None).stdout).into_owned();
        let listed =
            String::from_utf8_lossy(&tollgate(&env, &["key", "list", "--org", "acme-corp"], None).stdout).into_owned();
        let status = if active == "false" { "org disabled" } else { "active" };
        let shown_status = shown.lines().find_map(|line| Some(line.strip_prefix("status:")?.trim()));
        assert_eq!(shown_status, Some(status), "{shown}");
        assert_eq!(listed.matches(status).count(), 2, "{listed}");
    }

    let revoked = json_of(&tollgate(&env, &["key", "revoke", id, "--reason", "rotated", "--json"], None));
    assert!(revoked["revoked_at"].is_string());
    // A revocation's reason stays: neither disabling the revoked key nor revoking it again replaces it.
    let disabled = json_of(&tollgate(&env, &["key", "update", id, "--active", "false", "--json"], None));
    let again = json_of(&tollgate(&env, &["key", "revoke", id, "--reason", "other", "--json"], None));
    for shown in [&disabled, &again] {
        assert_eq!(shown["deactivated_reason"], "rotated");
        assert_eq!(shown["revoked_at"], revoked["revoked_at"]);
    }
    let reactivate = tollgate(&env, &["key", "update", id, "--active", "true"], None);
    assert!(!reactivate.status.success(), "reactivating a revoked key must fail");
    assert!(String::from_utf8_lossy(&reactivate.stderr).contains("revoked"));

    let audit = env.count("SELECT count(*) FROM key_audit WHERE actor = 'cli:tester'").await;
    assert_eq!(audit, 5, "created, imported, revoked, updated, revoked");
    let hashed: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_hash = sha256($1::text::bytea)")
        .bind(key)
        .fetch_one(&env.pool)
        .await
        .expect("query");
    assert_eq!(hashed, 1, "the key is stored as its SHA-256");
    env.cleanup().await;
}

#[tokio::test]
async fn operators_make_tiers_of_their_own_and_give_them_to_keys() {
    let env = TestEnv::new().await;
    json_of(&tollgate(&env, &["org", "create", "--name", "Acme", "--json"], None));

    let made = tollgate(&env, &["tier", "set", "gold", "--per-hour", "5000", "--json"], None);
    assert!(String::from_utf8_lossy(&made.stderr).contains("made a new tier gold,"));
    let gold = json_of(&made);
    assert_eq!((gold["window_limit"].clone(), gold["burst_limit"].clone()), (5000.into(), Value::Null));
    // Set again: changed, not made, and what was not given stays.
    let changed = tollgate(&env, &["tier", "set", "gold", "--per-minute", "100", "--json"], None);
    assert!(!String::from_utf8_lossy(&changed.stderr).contains("made"));
    let gold = json_of(&changed);
    assert_eq!((gold["window_limit"].clone(), gold["burst_limit"].clone()), (5000.into(), 100.into()));
    assert!(String::from_utf8_lossy(&tollgate(&env, &["tier", "list"], None).stdout).contains("gold"));
    assert!(refusal(&env, &["tier", "set", "Gold!", "--per-hour", "1"]).contains("a tier name is 1 to 63 of a-z"));

    let key =
        json_of(&tollgate(&env, &["key", "create", "--org", "acme", "--name", "k", "--tier", "gold", "--json"], None));
    assert_eq!(key["rate_limit_tier"], "gold");
    let id = key["id"].as_str().expect("id");
    for args in [
        &["key", "create", "--org", "acme", "--name", "k2", "--tier", "golden"][..],
        &["key", "update", id, "--tier", "golden"],
    ] {
        assert!(refusal(&env, args).contains("no such tier: `tollgate tier list` shows them"), "{args:?}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn organizations_take_a_plan_operators_added() {
    let env = TestEnv::new().await;
    assert!(refusal(&env, &["org", "create", "--name", "Early", "--plan", "startup"]).contains("no such plan"));
    assert!(refusal(&env, &["org", "create", "--name", "Early", "--plan", "Startup!"]).contains("a plan name is"));

    sqlx::query("INSERT INTO plans (name, included_units, price_per_thousand_minor, currency) VALUES ('startup', 500000, 30, 'EUR')")
        .execute(&env.pool)
        .await
        .expect("a plan of the operator's");
    let org = json_of(&tollgate(&env, &["org", "create", "--name", "Early", "--plan", "startup", "--json"], None));
    assert_eq!(org["plan"], "startup");
    let moved = json_of(&tollgate(&env, &["org", "update", "early", "--plan", "pro", "--json"], None));
    assert_eq!(moved["plan"], "pro");
    env.cleanup().await;
}

/// The soft and hard limits on open files in a `/proc/PID/limits`.
fn open_files_limits(limits: &str) -> Option<(String, String)> {
    let line = std::fs::read_to_string(limits).ok()?.lines().find(|l| l.starts_with("Max open files"))?.to_owned();
    let mut values = line.split_whitespace().skip(3);
    Some((values.next()?.to_owned(), values.next()?.to_owned()))
}

#[tokio::test]
async fn a_validator_started_with_a_low_soft_open_files_limit_takes_the_hard_one() {
    let (_, hard) = open_files_limits("/proc/self/limits").expect("this process's limits");
    assert_ne!(hard, "256", "the hard limit must be above the soft one this test sets");
    let env = TestEnv::new().await;
    // The soft limit only, as a systemd unit's default of 1024 would be.
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--nofile=256:", env!("CARGO_BIN_EXE_tollgate"), "validator"]);
    let mut validator = env
        .servers_and_namespace(&mut prlimit, NATS_URL)
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_SPOOL_DIR", env.spool_dir())
        .stdout(Stdio::null())
        .spawn()
        .expect("prlimit, which execs tollgate validator");
    let proc = format!("/proc/{}", validator.id());
    // Read once prlimit has set the soft limit and become tollgate (until then it holds this process's limits).
    let seen = wait_until(
        Duration::from_secs(10),
        || async {
            let command = std::fs::read_to_string(format!("{proc}/comm")).unwrap_or_default();
            (command.trim() == "tollgate").then(|| open_files_limits(&format!("{proc}/limits"))).flatten()
        },
        |seen| seen.as_ref().is_some_and(|(soft, _)| *soft == hard),
    )
    .await;
    let _ = validator.kill();
    let _ = validator.wait();
    assert_eq!(seen, Some((hard.clone(), hard)), "the validator's soft and hard open-files limits");
    env.cleanup().await;
}

/// A bench stopped with Ctrl-C midway removes its database and stream all the same, and says it gave no figures.
#[tokio::test]
async fn a_bench_stopped_midway_removes_what_it_made() {
    use std::io::{BufRead, BufReader};
    let mut bench = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["bench", "pipeline", "--rate", "1000", "--seconds", "60", "--orgs", "1"])
        .env("DATABASE_URL", format!("{DATABASE_SERVER}/postgres"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the bench");
    let mut stderr = BufReader::new(bench.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.starts_with("bench: database ") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("the bench's stderr") > 0,
            "the bench ended before saying its names"
        );
    }
    // "bench: database NAME, stream NAME"
    let names: Vec<&str> = line.trim().trim_start_matches("bench: database ").split(", stream ").collect();
    let (database, stream) = (names[0].to_owned(), names[1].to_owned());
    let admin = sqlx::PgPool::connect(&format!("{DATABASE_SERVER}/postgres")).await.expect("postgres");
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&admin)
            .await
            .expect("pg_database")
    };
    assert!(wait_until(Duration::from_secs(20), exists, |made| *made).await, "the bench made its database");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let status = Command::new("kill").args(["-INT", &bench.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut said).expect("the rest of stderr");
    let exit = bench.wait().expect("the bench's exit");
    assert!(!exit.success(), "a stopped bench gives no figures and fails: {said}");
    assert!(said.contains("stopped"), "{said}");
    assert!(!exists().await, "database {database} left behind: {said}");
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.expect("nats"));
    for stream in [stream.clone(), format!("{stream}_DLQ")] {
        assert!(js.get_stream(&stream).await.is_err(), "stream {stream} left behind: {said}");
    }
    let prefix = format!("bench:{}:*", database.trim_start_matches("tollgate_bench_"));
    let redis = redis::Client::open(crate::harness::REDIS_URL).expect("url");
    let mut redis = redis.get_multiplexed_async_connection().await.expect("redis");
    let (_, left): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(&prefix)
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut redis)
        .await
        .expect("SCAN");
    assert!(left.is_empty(), "Redis keys left behind: {left:?}");
}

/// A database that a newer release migrated (a migration this one does not have) is still served: a process of this
/// release restarted during a rolling update, or after one was rolled back, must start.
#[tokio::test]
async fn a_database_a_newer_release_migrated_still_starts_this_one() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
         VALUES (29991231000001, 'a newer release''s', now(), true, '\\x00', 0)",
    )
    .execute(&env.pool)
    .await
    .expect("a newer release's migration");
    let output = tollgate(&env, &["migrate"], None);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("1 of a newer release") && said.contains("29991231000001 a newer release's"), "{said}");
    assert!(!said.contains("up to date"), "{said}");
    let output = tollgate(&env, &["org", "list"], None);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    env.cleanup().await;
}
