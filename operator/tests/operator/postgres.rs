//! Role and database provisioning against the real loopback Postgres (scripts/services.sh).

use std::process::Command;

use semantis_operator::postgres::{Admin, drop_all, ensure, exists};

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

#[tokio::test]
async fn provisioning_is_idempotent_and_cleanup_drops_both() -> anyhow::Result<()> {
    let admin = admin();
    let name = format!("semantis_optest_{}", std::process::id());
    drop_all(&admin, &name, &name).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (false, false));
    ensure(&admin, &name, "first-password", &name).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (true, true));
    // Again, with the password a recreated Secret would carry: no error, still one of each.
    ensure(&admin, &name, "second-password", &name).await?;
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
    drop_all(&admin, &name, &name).await?;
    assert_eq!(exists(&admin, &name, &name).await?, (false, false));
    // Dropping what is gone is fine (a retried finalizer).
    drop_all(&admin, &name, &name).await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let mut bad = admin();
    bad.port = 1;
    let err = ensure(&bad, "r", "p", "d")
        .await
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(
        text.starts_with("failed to connect to Postgres at"),
        "{text}"
    );
}
