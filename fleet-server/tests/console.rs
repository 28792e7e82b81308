//! The console as the server serves it: the page and its two files from the binary, with
//! headers that keep a token-holding page safe; the sign-in call; and the API refusing a
//! viewer's forged control request whatever the page shows.

use std::path::{Path, PathBuf};

use fleet_server::auth::{create_token, Role};
use fleet_server::client::ApiClient;
use fleet_server::config::ServerConfig;
use fleet_server::{keyfile, release, server};
use serde_json::Value;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request with ureq, any status accepted.
async fn request(
    method: &'static str,
    url: String,
    token: Option<String>,
    if_none_match: Option<String>,
) -> Reply {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut builder = axum::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            builder = builder.header("authorization", format!("Bearer {t}"));
        }
        if let Some(tag) = if_none_match {
            builder = builder.header("if-none-match", tag);
        }
        let mut response = match method {
            "POST" => agent
                .run(
                    builder
                        .header("content-type", "application/json")
                        .body("{}")
                        .unwrap(),
                )
                .unwrap(),
            _ => agent.run(builder.body(()).unwrap()).unwrap(),
        };
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        Reply {
            status: response.status().as_u16(),
            headers,
            body: response.body_mut().read_to_string().unwrap_or_default(),
        }
    })
    .await
    .unwrap()
}

/// Signs cancer-logreg v1 as `version`, with its reference profile when `profile` is set;
/// returns (model, manifest, profile).
fn sign(dir: &Path, version: &str, profile: bool) -> (PathBuf, PathBuf, Option<PathBuf>) {
    let models = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/cancer-logreg"
    ));
    let model = dir.join(format!("cancer-logreg-{version}.onnx"));
    std::fs::copy(models.join("v1.onnx"), &model).unwrap();
    let profile = profile.then(|| models.join("v1.profile.json"));
    let signed = release::sign_model(
        &release::SignRequest {
            model: model.clone(),
            name: "cancer-logreg".parse().unwrap(),
            version: version.parse().unwrap(),
            release: None,
            self_test: Some(models.join("v1.selftest.json")),
            profile: profile.clone(),
            min_agent_version: None,
            created_at_ms: 1,
        },
        &keyfile::read_signing_key(&dir.join("keys/release.pem")).unwrap(),
    )
    .unwrap();
    let manifest = dir.join(format!("cancer-logreg-{version}.manifest.json"));
    release::write_envelope(&manifest, &signed.envelope, true).unwrap();
    (model, manifest, profile)
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_and_signs_in_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().join("server"),
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    keyfile::generate(&dir.path().join("keys"), "release").unwrap();
    config.trust.release_keys = vec![dir.path().join("keys/release.pub")];
    let running = server::start(config).await.unwrap();
    let base = format!("http://{}", running.api_addr);
    let store = &running.fleet.store;
    let viewer = create_token(store, Role::Viewer, "vera")
        .await
        .unwrap()
        .token;
    let operator = create_token(store, Role::Operator, "otto")
        .await
        .unwrap()
        .token;

    // The page, its script and its style sheet, each with its type and the page's policy.
    let page = request("GET", format!("{base}/"), None, None).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("/console/app.js"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    for (file, kind) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let reply = request("GET", format!("{base}/console/{file}"), None, None).await;
        assert_eq!(reply.status, 200, "{file}");
        assert!(reply.header("content-type").unwrap().starts_with(kind));
        assert!(!reply.body.trim().is_empty(), "{file} is empty");
        // Revalidation: the same ETag gets a 304 without the body.
        let etag = reply.header("etag").unwrap().to_string();
        let again = request("GET", format!("{base}/console/{file}"), None, Some(etag)).await;
        assert_eq!(again.status, 304, "{file}");
        assert!(again.body.is_empty());
    }
    // Only the console's own files: no other name, and no way out of the directory.
    for path in [
        "/console/Cargo.toml",
        "/console/..%2FCargo.toml",
        "/console/",
    ] {
        let reply = request("GET", format!("{base}{path}"), None, None).await;
        assert_eq!(reply.status, 404, "{path}");
    }

    // Sign-in: whoami names the token's holder and role; no token or a bad one is a 401.
    let me = request(
        "GET",
        format!("{base}/api/v1/whoami"),
        Some(viewer.clone()),
        None,
    )
    .await;
    assert_eq!(me.status, 200);
    let me: Value = serde_json::from_str(&me.body).unwrap();
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("vera"), Some("viewer"))
    );
    let me = request("GET", format!("{base}/api/v1/whoami"), Some(operator), None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&me.body).unwrap()["role"],
        "operator"
    );
    for token in [None, Some("dg_not-a-token".to_string())] {
        let reply = request("GET", format!("{base}/api/v1/whoami"), token, None).await;
        assert_eq!(reply.status, 401);
    }

    // The overview and the device list as the console asks for them: filtered and paged on
    // the server, with the count that matched.
    for (i, site) in ["oslo", "oslo", "rome"].iter().enumerate() {
        let labels = std::collections::BTreeMap::from([("site".to_string(), site.to_string())]);
        running
            .fleet
            .enroll(&format!("dev-{i}"), labels, None)
            .await
            .unwrap();
    }
    let get = |path: &str| request("GET", format!("{base}{path}"), Some(viewer.clone()), None);
    let overview: Value = serde_json::from_str(&get("/api/v1/fleet").await.body).unwrap();
    assert_eq!(overview["devices"]["total"], 3);
    assert_eq!(overview["devices"]["never_seen"], 3);
    assert_eq!(overview["active_rollouts"], 0);
    let ids = |body: &str| -> (Vec<String>, u64) {
        let v: Value = serde_json::from_str(body).unwrap();
        let ids = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        (ids, v["total"].as_u64().unwrap())
    };
    assert_eq!(ids(&get("/api/v1/devices").await.body).1, 3);
    assert_eq!(
        ids(&get("/api/v1/devices?label=site%3Doslo").await.body),
        (vec!["dev-0".to_string(), "dev-1".to_string()], 2)
    );
    assert_eq!(
        ids(&get("/api/v1/devices?offset=2&limit=2").await.body),
        (vec!["dev-2".to_string()], 3)
    );
    assert_eq!(ids(&get("/api/v1/devices?presence=online").await.body).1, 0);
    for bad in ["presence=asleep", "label=site"] {
        let reply = get(&format!("/api/v1/devices?{bad}")).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
    }

    // A version's reference profile, for the drift page's histograms; 404 without one.
    let admin = create_token(store, Role::Admin, "ada").await.unwrap().token;
    for (version, with_profile) in [("v1", true), ("v2", false)] {
        let (model, manifest, profile) = sign(dir.path(), version, with_profile);
        let client = ApiClient::new(&base, Some(admin.clone()));
        tokio::task::spawn_blocking(move || {
            client
                .push_model(&manifest, &model, profile.as_deref(), &mut |_, _| {})
                .unwrap()
        })
        .await
        .unwrap();
    }
    let reply = get("/api/v1/models/cancer-logreg/v1/profile").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let profile: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(profile["profile"]["features"].as_array().unwrap().len(), 30);
    let reply = get("/api/v1/models/cancer-logreg/v2/profile").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.body.contains("without a reference profile"),
        "{}",
        reply.body
    );

    // A viewer sees no control buttons, and forging the request does not help: the API
    // refuses every control call with a viewer's token before looking at the rollout.
    for path in [
        "/api/v1/rollouts/r1/pause",
        "/api/v1/rollouts/r1/resume",
        "/api/v1/rollouts/r1/abort",
        "/api/v1/rollouts/r1/rollback",
        "/api/v1/rollouts",
    ] {
        let reply = request("POST", format!("{base}{path}"), Some(viewer.clone()), None).await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.body);
        assert!(reply.body.contains("operator"), "{}", reply.body);
    }
    running.shutdown().await;
}
