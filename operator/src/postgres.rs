//! The Postgres role and database the operator manages in admin mode, idempotently.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("the Postgres task ended abnormally: {0}")]
    Task(String),
    #[error("failed to connect to Postgres at {host}:{port} as {user}: {source}")]
    Connect {
        host: String,
        port: u16,
        user: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to {action}: {source}")]
    Statement {
        action: String,
        #[source]
        source: sqlx::Error,
    },
}

/// A login allowed to create roles and databases. Owned, so calls can run on their own task
/// (sqlx's connection futures trip the compiler's Send inference inside kube's controller).
#[derive(Clone, PartialEq)]
pub struct Admin {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
}

// Never the password, in logs or test output.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

async fn connect(admin: &Admin) -> Result<PgPool, PostgresError> {
    let options = PgConnectOptions::new()
        .host(&admin.host)
        .port(admin.port)
        .username(&admin.username)
        .password(&admin.password)
        .database("postgres")
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|source| PostgresError::Connect {
            host: admin.host.clone(),
            port: admin.port,
            user: admin.username.clone(),
            source,
        })
}

/// Double-quoted SQL identifier. Names come from validated specs (lowercase, digits, `_`), but
/// quoting keeps any other input from ever becoming SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn statement(action: &str) -> impl FnOnce(sqlx::Error) -> PostgresError + '_ {
    move |source| PostgresError::Statement {
        action: action.to_owned(),
        source,
    }
}

/// Creates the role (or resets its password to `password`) and the database it owns.
pub async fn ensure(
    admin: &Admin,
    role: &str,
    password: &str,
    database: &str,
) -> Result<(), PostgresError> {
    let conn = connect(admin).await?;
    let role_exists = sqlx::query("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_optional(&conn)
        .await
        .map_err(statement("look up the role"))?
        .is_some();
    // CREATE/ALTER ROLE take no bind parameters; the password is quoted as a literal.
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    sqlx::raw_sql(&format!(
        "{verb} ROLE {} LOGIN PASSWORD {}",
        ident(role),
        literal(password)
    ))
    .execute(&conn)
    .await
    .map_err(statement("create or update the role"))?;
    let db_exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_optional(&conn)
        .await
        .map_err(statement("look up the database"))?
        .is_some();
    if !db_exists {
        // The admin may not be a superuser: it needs membership in the role to give it away.
        sqlx::raw_sql(&format!("GRANT {} TO CURRENT_USER", ident(role)))
            .execute(&conn)
            .await
            .map_err(statement("grant the role to the admin"))?;
        sqlx::raw_sql(&format!(
            "CREATE DATABASE {} OWNER {}",
            ident(database),
            ident(role)
        ))
        .execute(&conn)
        .await
        .map_err(statement("create the database"))?;
    }
    conn.close().await;
    Ok(())
}

/// Drops the database and the role; absent ones are fine.
pub async fn drop_all(admin: &Admin, role: &str, database: &str) -> Result<(), PostgresError> {
    let conn = connect(admin).await?;
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        ident(database)
    ))
    .execute(&conn)
    .await
    .map_err(statement("drop the database"))?;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", ident(role)))
        .execute(&conn)
        .await
        .map_err(statement("drop the role"))?;
    conn.close().await;
    Ok(())
}

/// Whether a role and database exist (used by tests and status).
pub async fn exists(
    admin: &Admin,
    role: &str,
    database: &str,
) -> Result<(bool, bool), PostgresError> {
    let conn = connect(admin).await?;
    let role_exists = sqlx::query("SELECT count(*) FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_one(&conn)
        .await
        .map_err(statement("look up the role"))?
        .try_get::<i64, _>(0)
        .map_err(statement("read the role count"))?
        > 0;
    let db_exists = sqlx::query("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_one(&conn)
        .await
        .map_err(statement("look up the database"))?
        .try_get::<i64, _>(0)
        .map_err(statement("read the database count"))?
        > 0;
    conn.close().await;
    Ok((role_exists, db_exists))
}

/// [`ensure`] on its own task.
pub async fn ensure_spawned(
    admin: Admin,
    role: String,
    password: String,
    database: String,
) -> Result<(), PostgresError> {
    tokio::spawn(async move { ensure(&admin, &role, &password, &database).await })
        .await
        .map_err(|e| PostgresError::Task(e.to_string()))?
}

/// [`drop_all`] on its own task.
pub async fn drop_spawned(
    admin: Admin,
    role: String,
    database: String,
) -> Result<(), PostgresError> {
    tokio::spawn(async move { drop_all(&admin, &role, &database).await })
        .await
        .map_err(|e| PostgresError::Task(e.to_string()))?
}
