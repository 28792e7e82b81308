//! Shared by the server's integration tests: databases of both kinds.

#![allow(dead_code)]

use std::io::Write;

use fleet_server::store::Store;

/// Whether the outside dependency behind `var` is available; when not, says so in one line.
pub fn require_env(test: &str, var: &str, needs: &str) -> bool {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() && value != "0" => true,
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: needs {needs}; set {var}=1 once it is installed (.ci/run does)"
            );
            false
        }
    }
}

/// The PostgreSQL server for tests: `$DRIFTGATE_TEST_POSTGRES_URL`, or the local one `.ci/run`
/// starts.
pub fn postgres_admin_url() -> String {
    std::env::var("DRIFTGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://driftgate:driftgate@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty PostgreSQL database for one test; returns its URL.
pub async fn fresh_postgres() -> String {
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).unwrap();
    let name = format!("driftgate_test_{}", hex::encode(suffix));
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// A store of each kind this run can test: SQLite always, PostgreSQL when
/// `DRIFTGATE_TEST_POSTGRES` is set.
pub async fn stores(test: &str, dir: &std::path::Path) -> Vec<(&'static str, Store)> {
    let mut out = vec![(
        "sqlite",
        Store::open(&format!("sqlite://{}", dir.join("fleet.db").display()))
            .await
            .unwrap(),
    )];
    if require_env(test, "DRIFTGATE_TEST_POSTGRES", "a PostgreSQL server") {
        out.push((
            "postgres",
            Store::open(&fresh_postgres().await).await.unwrap(),
        ));
    }
    out
}

/// A device record as enrollment stores it (label `site=berlin`), nothing reported yet.
pub fn device(id: &str) -> fleet_server::store::DeviceRecord {
    fleet_server::store::DeviceRecord {
        id: id.into(),
        labels: std::collections::BTreeMap::from([("site".to_string(), "berlin".to_string())]),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 0,
        enrolled_at_ms: 1,
        revoked_at_ms: None,
        directive_seq: 0,
        presence: None,
        presence_at_ms: None,
        agent_version: None,
        state: None,
        state_at_ms: None,
        health: None,
        health_at_ms: None,
        acked_up_to: 0,
    }
}
