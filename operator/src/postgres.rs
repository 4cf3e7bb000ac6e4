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
    #[error(
        "refused to manage role {role}: it was not created by the operator for this cache ({found}); set spec.postgres.database to a name of its own"
    )]
    NotOurs { role: String, found: String },
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

/// The comment that marks a role as the one the operator created for cache `owner`
/// (`namespace/name`).
pub fn owner_mark(owner: &str) -> String {
    format!("managed by semantis-operator for SemanticCache {owner}")
}

/// Whose a role is: absent, ours, or someone else's (with what was found).
enum RoleOwner {
    Absent,
    Ours,
    Other(String),
}

/// A role is ours when its comment is our mark. A role without any comment, created by an
/// operator before the marks, is adopted only when it is an unprivileged login that owns the
/// database of the same name and is not the admin itself: never an administrator's role.
async fn role_owner(
    conn: &PgPool,
    role: &str,
    database: &str,
    owner: &str,
) -> Result<RoleOwner, PostgresError> {
    let row = sqlx::query(
        "SELECT shobj_description(r.oid, 'pg_authid') AS mark, \
                (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication \
                 OR r.rolbypassrls OR r.rolname = current_user) AS privileged, \
                EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = $2 AND d.datdba = r.oid) AS owns \
         FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .bind(database)
    .fetch_optional(conn)
    .await
    .map_err(statement("look up the role"))?;
    let Some(row) = row else {
        return Ok(RoleOwner::Absent);
    };
    let read = |e| PostgresError::Statement {
        action: "read the role".into(),
        source: e,
    };
    let mark: Option<String> = row.try_get("mark").map_err(read)?;
    let privileged: bool = row.try_get("privileged").map_err(read)?;
    let owns: bool = row.try_get("owns").map_err(read)?;
    Ok(match mark {
        Some(m) if m == owner_mark(owner) => RoleOwner::Ours,
        None if !privileged && owns => RoleOwner::Ours,
        Some(m) => RoleOwner::Other(format!("its comment says {m:?}")),
        None if privileged => RoleOwner::Other("it is a privileged role or the admin".into()),
        None => RoleOwner::Other("it exists without the operator's mark".into()),
    })
}

/// Postgres's SCRAM-SHA-256 verifier of `password` (RFC 5802/7677, as `CREATE ROLE … PASSWORD`
/// accepts it): the plaintext never appears in a statement a server log could record.
/// `None` only if HMAC refused a key, which it does for no length.
pub fn scram_verifier(password: &str, salt: &[u8; 16]) -> Option<String> {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    const ITERATIONS: u32 = 4096;
    let mac = |key: &[u8], data: &[&[u8]]| -> Option<[u8; 32]> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
        for d in data {
            m.update(d);
        }
        Some(m.finalize().into_bytes().into())
    };
    // Hi(password, salt, i): PBKDF2-HMAC-SHA-256, one block.
    let mut u = mac(password.as_bytes(), &[salt, &1u32.to_be_bytes()])?;
    let mut salted = u;
    for _ in 1..ITERATIONS {
        u = mac(password.as_bytes(), &[&u])?;
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    let client_key = mac(&salted, &[b"Client Key"])?;
    let stored_key = Sha256::digest(client_key);
    let server_key = mac(&salted, &[b"Server Key"])?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    ))
}

/// Creates the role (or sets its password to `password`) and the database it owns, for
/// cache `owner` (`namespace/name`). A role of the same name that is not this cache's is
/// refused, never altered: it may be another cache's (names derived from namespace and name
/// can collide) or an administrator's.
pub async fn ensure(
    admin: &Admin,
    role: &str,
    password: &str,
    database: &str,
    owner: &str,
) -> Result<(), PostgresError> {
    let conn = connect(admin).await?;
    let role_exists = match role_owner(&conn, role, database, owner).await? {
        RoleOwner::Absent => false,
        RoleOwner::Ours => true,
        RoleOwner::Other(found) => {
            conn.close().await;
            return Err(PostgresError::NotOurs {
                role: role.to_owned(),
                found,
            });
        }
    };
    // CREATE/ALTER ROLE take no bind parameters: the verifier is quoted as a literal.
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    let verifier = scram_verifier(password, &rand::random())
        .ok_or_else(|| PostgresError::Task("failed to hash the role's password".into()))?;
    sqlx::raw_sql(&format!(
        "{verb} ROLE {} LOGIN PASSWORD {}",
        ident(role),
        literal(&verifier)
    ))
    .execute(&conn)
    .await
    .map_err(statement("create or update the role"))?;
    sqlx::raw_sql(&format!(
        "COMMENT ON ROLE {} IS {}",
        ident(role),
        literal(&owner_mark(owner))
    ))
    .execute(&conn)
    .await
    .map_err(statement("mark the role"))?;
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

/// Drops the database and the role of cache `owner`; absent ones are fine, another's are
/// refused.
pub async fn drop_all(
    admin: &Admin,
    role: &str,
    database: &str,
    owner: &str,
) -> Result<(), PostgresError> {
    let conn = connect(admin).await?;
    if let RoleOwner::Other(found) = role_owner(&conn, role, database, owner).await? {
        conn.close().await;
        return Err(PostgresError::NotOurs {
            role: role.to_owned(),
            found,
        });
    }
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
    owner: String,
) -> Result<(), PostgresError> {
    tokio::spawn(async move { ensure(&admin, &role, &password, &database, &owner).await })
        .await
        .map_err(|e| PostgresError::Task(e.to_string()))?
}

/// [`drop_all`] on its own task.
pub async fn drop_spawned(
    admin: Admin,
    role: String,
    database: String,
    owner: String,
) -> Result<(), PostgresError> {
    tokio::spawn(async move { drop_all(&admin, &role, &database, &owner).await })
        .await
        .map_err(|e| PostgresError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    use super::scram_verifier;

    /// RFC 7677's SCRAM-SHA-256 example: the verifier's ServerKey signs the example's auth
    /// message into the server signature the RFC gives.
    #[test]
    fn the_scram_verifier_matches_rfc_7677() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt: [u8; 16] = b64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("salt")
            .try_into()
            .expect("16 bytes");
        let verifier = scram_verifier("pencil", &salt).expect("a verifier");
        let server_key = verifier.rsplit(':').next().expect("server key");
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&b64.decode(server_key).expect("b64")).expect("key");
        mac.update(
            b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        );
        assert_eq!(
            b64.encode(mac.finalize().into_bytes()),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
    }
}
