//! Role and database provisioning against the real loopback Postgres (scripts/services.sh).

use std::process::Command;

use semantis_operator::postgres::{Admin, PostgresError, drop_all, ensure, exists};

fn admin() -> Admin {
    let url = std::env::var("SEMANTIS_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        let out = Command::new("bash")
            .arg(format!(
                "{}/../scripts/services.sh",
                std::env::var("CARGO_MANIFEST_DIR")
                    .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
            ))
            .arg("start")
            .output()
            .expect("services.sh runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("SEMANTIS_TEST_POSTGRES_URL="))
            .expect("services.sh prints the URL")
            .to_owned()
    });
    // postgres://user@host:port/db
    let rest = url.strip_prefix("postgres://").expect("postgres URL");
    let (user, rest) = rest.split_once('@').expect("user@");
    let hostport = rest.split('/').next().expect("host:port");
    let (host, port) = hostport.split_once(':').expect("host:port");
    Admin {
        host: host.to_owned(),
        port: port.parse().expect("port"),
        username: user.to_owned(),
        password: "unused-with-trust-auth".to_owned(),
    }
}

const OWNER: &str = "ns/cache";

#[tokio::test]
async fn provisioning_is_idempotent_and_cleanup_drops_both() -> anyhow::Result<()> {
    let admin = admin();
    let name = format!("semantis_optest_{}", std::process::id());
    drop_all(&admin, &name, &name, OWNER).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (false, false));
    ensure(&admin, &name, "first-password", &name, OWNER).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (true, true));
    // Again, with the password a recreated Secret would carry: no error, still one of each.
    ensure(&admin, &name, "second-password", &name, OWNER).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (true, true));
    // The role owns its database.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://{}@{}:{}/postgres",
            admin.username, admin.host, admin.port
        ))
        .await?;
    let owner: (String,) =
        sqlx::query_as("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&pool)
            .await?;
    assert_eq!(owner.0, name);
    pool.close().await;
    drop_all(&admin, &name, &name, OWNER).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (false, false));
    // Dropping what is gone is fine (a retried finalizer).
    drop_all(&admin, &name, &name, OWNER).await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let mut bad = admin();
    bad.port = 1;
    let err = ensure(&bad, "r", "p", "d", OWNER)
        .await
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(
        text.starts_with("failed to connect to Postgres at"),
        "{text}"
    );
}

async fn admin_pool(admin: &Admin) -> anyhow::Result<sqlx::PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://{}@{}:{}/postgres",
            admin.username, admin.host, admin.port
        ))
        .await?)
}

/// Names derived from namespace and name collide (`team-a`/`x` and `team`/`a-x` both give
/// `semantis_team_a_x`), and a spec may name any role: another cache's role, an admin's role
/// or an unmarked role is refused, never altered or dropped. Before, the second cache reset
/// the first one's password and its deletion dropped the first one's database.
#[tokio::test]
async fn a_role_the_operator_did_not_create_for_this_cache_is_refused() -> anyhow::Result<()> {
    let admin = admin();
    let name = format!("semantis_optest_collide_{}", std::process::id());
    drop_all(&admin, &name, &name, "team-a/x").await?;
    ensure(&admin, &name, "first", &name, "team-a/x").await?;
    let other = ensure(&admin, &name, "second", &name, "team/a-x").await;
    assert!(
        matches!(&other, Err(PostgresError::NotOurs { .. })),
        "another cache's role: {other:?}"
    );
    let dropped = drop_all(&admin, &name, &name, "team/a-x").await;
    assert!(
        matches!(&dropped, Err(PostgresError::NotOurs { .. })),
        "{dropped:?}"
    );
    assert_eq!(
        exists(&admin, &name, &name).await?,
        (true, true),
        "the first cache keeps both"
    );

    // The admin's own role, and a role someone made by hand.
    let admin_role = ensure(&admin, &admin.username, "p", "postgres", OWNER).await;
    assert!(
        matches!(&admin_role, Err(PostgresError::NotOurs { .. })),
        "{admin_role:?}"
    );
    let pool = admin_pool(&admin).await?;
    let manual = format!("semantis_optest_manual_{}", std::process::id());
    sqlx::raw_sql(&format!(
        "DROP ROLE IF EXISTS \"{manual}\"; CREATE ROLE \"{manual}\" LOGIN"
    ))
    .execute(&pool)
    .await?;
    let by_hand = ensure(&admin, &manual, "p", &manual, OWNER).await;
    assert!(
        matches!(&by_hand, Err(PostgresError::NotOurs { .. })),
        "{by_hand:?}"
    );
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS \"{manual}\""))
        .execute(&pool)
        .await?;
    pool.close().await;
    drop_all(&admin, &name, &name, "team-a/x").await?;
    assert_eq!(exists(&admin, &name, &name).await?, (false, false));
    Ok(())
}

/// The statement that sets a role's password carries Postgres's SCRAM verifier, never the
/// password: a server logging DDL records nothing a login could use. Postgres keeps the
/// verifier as sent (the unit test `the_scram_verifier_matches_rfc_7677` checks its maths).
#[tokio::test]
async fn the_password_is_sent_as_a_scram_verifier_postgres_accepts() -> anyhow::Result<()> {
    let admin = admin();
    let name = format!("semantis_optest_scram_{}", std::process::id());
    drop_all(&admin, &name, &name, OWNER).await?;
    ensure(&admin, &name, "s3cret-pass", &name, OWNER).await?;
    let pool = admin_pool(&admin).await?;
    let (stored,): (Option<String>,) =
        sqlx::query_as("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
            .bind(&name)
            .fetch_one(&pool)
            .await?;
    let stored = stored.unwrap_or_default();
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    assert!(!stored.contains("s3cret-pass"));
    pool.close().await;
    drop_all(&admin, &name, &name, OWNER).await?;
    Ok(())
}
