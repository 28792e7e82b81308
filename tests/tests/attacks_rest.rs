//! Attacks on the REST API (issue 9), against a real `fleet-server` process, with raw HTTP so
//! that nothing between the test and the server tidies a path or a header: missing, malformed,
//! wrong and expired tokens on every route the OpenAPI document says needs one; role
//! escalation; path traversal; SQL metacharacters in every filter parameter.

mod common;

use std::time::Duration;

use common::Fleet;
use driftgate_tests::workspace_root;
use serde_json::{json, Value};

/// One HTTP/1.1 request, exactly as written: returns the status and the body.
fn raw(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer.as_str()));
    }
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let (status, reply) =
        driftgate_tests::http_request(port, method, path, &headers, body.unwrap_or("").as_bytes());
    assert!(
        status != 0,
        "no status line from {method} {path}: {reply:?}"
    );
    (status, reply)
}

fn api_port(fleet: &Fleet) -> u16 {
    fleet
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API URL ends with its port")
}

/// The error code of a JSON error body (`{"error": {"code": …}}`); the body itself otherwise.
fn code(body: &str) -> String {
    // A chunked body carries size lines around the JSON: take from the first brace.
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]));
    json.and_then(|j| serde_json::from_str::<Value>(j).ok())
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

/// Every (method, path) the OpenAPI document says needs a token, with `x` in each parameter.
fn protected_routes() -> Vec<(String, String)> {
    let document: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("fleet-server/src/openapi.json")).unwrap(),
    )
    .unwrap();
    let mut routes = Vec::new();
    for (path, methods) in document["paths"].as_object().unwrap() {
        for (method, operation) in methods.as_object().unwrap() {
            if operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
            {
                let concrete = path
                    .split('/')
                    .map(|part| if part.starts_with('{') { "x" } else { part })
                    .collect::<Vec<_>>()
                    .join("/");
                routes.push((method.to_uppercase(), concrete));
            }
        }
    }
    assert!(routes.len() >= 20, "{routes:?}");
    routes
}

/// Creates a token of `role` through the API (as the admin), optionally expiring.
fn token(fleet: &Fleet, role: &str, expires_in_secs: Option<u64>) -> String {
    let mut body = json!({"role": role, "name": format!("{role}-test")});
    if let Some(secs) = expires_in_secs {
        body["expires_in_secs"] = json!(secs);
    }
    let created = fleet.api().post_json("/api/v1/tokens", &body).unwrap();
    created["token"].as_str().unwrap().to_string()
}

#[test]
fn every_protected_route_refuses_a_missing_malformed_wrong_or_expired_token() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    let port = api_port(&fleet);
    let expiring = token(&fleet, "admin", Some(1));
    // Lifetimes out of bounds are refused, not shortened.
    for bad in [json!(0), json!(400_000_000u64), json!("1h"), json!(-5)] {
        let (status, body) = raw(
            port,
            "POST",
            "/api/v1/tokens",
            Some(&fleet.token),
            Some(&json!({"role": "viewer", "expires_in_secs": bad}).to_string()),
        );
        assert_eq!(status, 400, "expires_in_secs {bad}: {body}");
    }
    std::thread::sleep(Duration::from_millis(1200));
    // The admin's own token with its secret's last character changed.
    let mut wrong_secret = fleet.token.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    let unknown_id = format!("dgt_000000000000_{}", "ab".repeat(32));
    let cases: [(&str, Option<&str>, &str); 6] = [
        ("no token", None, "unauthorized"),
        ("a malformed token", Some("not-a-token"), "unauthorized"),
        (
            "a token of the wrong shape",
            Some("dgt_abc_def"),
            "unauthorized",
        ),
        ("a wrong secret", Some(&wrong_secret), "unauthorized"),
        ("an unknown token", Some(&unknown_id), "unauthorized"),
        ("an expired token", Some(&expiring), "token_expired"),
    ];
    for (method, path) in protected_routes() {
        for (what, presented, expected) in &cases {
            let (status, body) = raw(port, &method, &path, *presented, Some("{}"));
            assert_eq!(
                (status, code(&body).as_str()),
                (401, *expected),
                "{method} {path} with {what}: {body}"
            );
        }
    }
    // And the real token still works (the refusals changed nothing).
    let (status, body) = raw(port, "GET", "/api/v1/whoami", Some(&fleet.token), None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn no_role_reaches_above_itself() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    let port = api_port(&fleet);
    fleet.push_sample("cancer-logreg", "v1");
    fleet.enroll("dev-1", &[]);
    let viewer = token(&fleet, "viewer", None);
    let operator = token(&fleet, "operator", None);
    let forbidden = |token: &str, method: &str, path: &str, body: Value| {
        let (status, reply) = raw(port, method, path, Some(token), Some(&body.to_string()));
        assert_eq!(
            (status, code(&reply).as_str()),
            (403, "forbidden"),
            "{method} {path}: {reply}"
        );
    };
    // Minting tokens is the admin's alone: no viewer or operator makes itself (or anyone) one.
    for role in ["viewer", "operator", "admin"] {
        forbidden(&viewer, "POST", "/api/v1/tokens", json!({"role": role}));
        forbidden(&operator, "POST", "/api/v1/tokens", json!({"role": role}));
    }
    // A viewer changes nothing.
    forbidden(
        &viewer,
        "POST",
        "/api/v1/devices/dev-1/assign",
        json!({"model": "cancer-logreg", "version": "v1"}),
    );
    forbidden(&viewer, "POST", "/api/v1/devices/dev-1/revoke", json!({}));
    forbidden(&viewer, "POST", "/api/v1/devices", json!({"id": "dev-2"}));
    forbidden(
        &viewer,
        "DELETE",
        "/api/v1/models/cancer-logreg/v1",
        json!({}),
    );
    forbidden(
        &viewer,
        "POST",
        "/api/v1/rollouts",
        json!({"model": "cancer-logreg", "version": "v1", "stages": [{"size": {"percent": 100.0}}]}),
    );
    // A role field in a request body grants nothing.
    let (status, body) = raw(
        port,
        "GET",
        "/api/v1/whoami?role=admin",
        Some(&viewer),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"viewer\""), "{body}");
    // Nothing was done: the device is assigned nothing and not revoked, the model is there.
    let device = fleet.device("dev-1");
    assert!(device["device"]["revoked_at_ms"].is_null(), "{device}");
    assert_eq!(device["assignments"], json!([]), "{device}");
    let models = fleet.api().get("/api/v1/models").unwrap();
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    // The operator may do what operators do.
    let (status, body) = raw(
        port,
        "POST",
        "/api/v1/devices/dev-1/assign",
        Some(&operator),
        Some(&json!({"model": "cancer-logreg", "version": "v1"}).to_string()),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn path_traversal_reaches_no_file() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    let port = api_port(&fleet);
    fleet.push_sample("cancer-logreg", "v1");
    // Files that must never come back: the system's, and the server's own secrets.
    let paths = [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/app.js/../../keys/fleet.pem",
        "/%2e%2e%2fkeys%2ffleet.pem",
        "/api/v1/models/..%2F..%2F..%2Fetc%2Fpasswd/v1",
        "/api/v1/models/cancer-logreg/..%2F..%2Fkeys%2Ffleet.pem",
        "/api/v1/models/cancer-logreg/..%2f..%2fkeys/profile",
        "/api/v1/models/..%2f..%2fkeys/fleet.pem/profile",
        "/api/v1/devices/..%2F..%2Fkeys%2Ffleet.pem",
        "/api/v1/devices/..%2f..%2fca/items",
        "/api/v1/rollouts/..%2f..%2fserver.db",
        "/api/v1/../../keys/fleet.pem",
        "/console/../keys/fleet.pem",
    ];
    for path in paths {
        let (status, body) = raw(port, "GET", path, Some(&fleet.token), None);
        assert!(
            status == 400 || status == 404,
            "GET {path}: {status} {body}"
        );
        assert!(
            !body.contains("root:") && !body.contains("PRIVATE KEY") && !body.contains("SQLite"),
            "GET {path} leaked a file: {body}"
        );
    }
    // Names that climb out are refused where they would be written, too: enrolling a device
    // (its name becomes a bundle directory) and pushing a model under such a name.
    for id in ["../../etc", "..", "a/b", "dev%2f..", "dev\\x"] {
        let (status, body) = raw(
            port,
            "POST",
            "/api/v1/devices",
            Some(&fleet.token),
            Some(&json!({"id": id}).to_string()),
        );
        assert_eq!(status, 400, "enroll {id:?}: {body}");
    }
    let devices = fleet.api().get("/api/v1/devices").unwrap();
    assert_eq!(devices["total"], 0, "{devices}");
}

#[test]
fn sql_metacharacters_in_filters_match_nothing_and_break_nothing() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    let port = api_port(&fleet);
    fleet.push_sample("cancer-logreg", "v1");
    for id in ["dev-1", "dev-2"] {
        fleet.enroll(id, &["site=lab"]);
    }
    let audit_before = fleet.audit().len();
    let hostile = [
        "' OR '1'='1",
        "'; DROP TABLE devices; --",
        "\" OR \"\"=\"",
        "%",
        "_",
        "\\",
        "1 OR 1=1",
        "dev-1' --",
        "*",
        "%00",
        "日本",
    ];
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    for value in hostile {
        let v = encode(value);
        let queries = [
            format!("/api/v1/devices?label=site%3D{v}"),
            format!("/api/v1/devices?label={v}"),
            format!("/api/v1/devices?presence={v}"),
            format!("/api/v1/devices?model={v}"),
            format!("/api/v1/devices?model=cancer-logreg&version={v}"),
            format!("/api/v1/devices?q={v}"),
            format!("/api/v1/devices/dev-1/items?kind={v}"),
            format!("/api/v1/rollouts?model={v}"),
            format!("/api/v1/audit?rollout={v}"),
            format!("/api/v1/models/cancer-logreg/v1/drift?label={v}"),
            format!("/api/v1/models/cancer-logreg/v1/telemetry?since_ms={v}"),
            format!("/api/v1/devices/{v}"),
            format!("/api/v1/models/{v}/v1"),
        ];
        for query in &queries {
            let (status, body) = raw(port, "GET", query, Some(&fleet.token), None);
            assert!(status < 500, "GET {query} ({value:?}): {status} {body}");
            if status == 200 {
                // A filter that matched must not have matched everything: no hostile value
                // is a real label, presence, model, kind or rollout here.
                let reply: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("GET {query}: {e}: {body}"));
                for list in ["devices", "items", "rollouts", "entries"] {
                    if let Some(found) = reply[list].as_array() {
                        assert!(
                            found.is_empty(),
                            "GET {query} ({value:?}) matched {}: {body}",
                            found.len()
                        );
                    }
                }
            }
        }
    }
    // Everything is still there.
    let devices = fleet.api().get("/api/v1/devices").unwrap();
    assert_eq!(devices["total"], 2, "{devices}");
    assert_eq!(fleet.audit().len(), audit_before);
    let models = fleet.api().get("/api/v1/models").unwrap();
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
}
