//! Chunked delivery through a real broker: the agent's link and downloader against a
//! test-side responder that speaks the protocol crate's chunk codec.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use edge_agent::config::AgentConfig;
use edge_agent::fetch::{download, FetchError};
use edge_agent::link;

fn config(port: u16, dir: &Path, device: &str) -> AgentConfig {
    let text = format!(
        r#"
device_id = "{device}"
data_dir = "data"
[broker]
url = "mqtt://127.0.0.1:{port}"
reconnect_min_ms = 50
reconnect_max_ms = 500
[trust]
release_keys = ["release.pub"]
fleet_keys = ["fleet.pub"]
[fetch]
chunk_bytes = 65536
window = 8
request_timeout_ms = 300
"#
    );
    AgentConfig::parse(&text, &dir.join("agent.toml"), dir).unwrap()
}

async fn connect(config: &AgentConfig) -> (link::LinkHandle, link::Inbound) {
    let (handle, mut inbound, driver) = link::start(config).unwrap();
    tokio::spawn(driver);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        inbound.connected.wait_for(|c| *c),
    )
    .await
    .expect("connects within 10 s")
    .unwrap();
    // Give the subscription a moment to reach the broker before the first request.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    (handle, inbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_megabyte_artifact_arrives_whole_and_resumes_from_a_partial_file() {
    for broker in
        common::brokers("a_multi_megabyte_artifact_arrives_whole_and_resumes_from_a_partial_file")
    {
        eprintln!("broker: {}", broker.name);
        let port = broker.port;
        let blob = common::pseudo_random_bytes(3 * 1024 * 1024 + 123);
        let served = common::start_responder(port, blob.clone(), common::Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(port, dir.path(), "dev-fetch");
        let (handle, mut inbound) = connect(&config).await;
        let manifest = common::blob_manifest(&blob);

        // A previous run got 1 MiB before it was killed.
        let staging = dir.path().join("staging/blob.part");
        std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
        std::fs::write(&staging, &blob[..1024 * 1024]).unwrap();

        let mut last = (0, 0);
        let report = download(
            manifest.artifact(),
            &staging,
            &config.fetch,
            &handle,
            &mut inbound.chunks,
            |done, total| {
                assert!(
                    done >= last.0 && done <= total,
                    "progress goes forward and stays within the size"
                );
                last = (done, total);
            },
        )
        .await
        .unwrap();

        assert_eq!(report.resumed_from, 1024 * 1024);
        assert_eq!(
            report.fetched,
            blob.len() as u64 - 1024 * 1024,
            "only the missing part travelled"
        );
        assert_eq!(served.load(Ordering::Relaxed), report.fetched);
        assert_eq!(last, (blob.len() as u64, blob.len() as u64));
        assert_eq!(std::fs::read(&staging).unwrap(), *blob);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_requests_are_retried() {
    for broker in common::brokers("lost_requests_are_retried") {
        let port = broker.port;
        let blob = common::pseudo_random_bytes(700 * 1024);
        let faults = common::Faults {
            drop_every: 3,
            ..Default::default()
        };
        common::start_responder(port, blob.clone(), faults).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(port, dir.path(), "dev-lossy");
        let (handle, mut inbound) = connect(&config).await;
        let staging = dir.path().join("blob.part");
        let report = download(
            common::blob_manifest(&blob).artifact(),
            &staging,
            &config.fetch,
            &handle,
            &mut inbound.chunks,
            |_, _| {},
        )
        .await
        .unwrap();
        assert!(report.retries > 0, "{report:?}");
        assert_eq!(std::fs::read(&staging).unwrap(), *blob);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_data_is_refused_as_soon_as_it_passes_the_manifest_size() {
    for broker in common::brokers("endless_data_is_refused_as_soon_as_it_passes_the_manifest_size")
    {
        let port = broker.port;
        let blob = common::pseudo_random_bytes(200 * 1024 + 7);
        let faults = common::Faults {
            overlong_by: 4096,
            ..Default::default()
        };
        common::start_responder(port, blob.clone(), faults).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(port, dir.path(), "dev-endless");
        let (handle, mut inbound) = connect(&config).await;
        let staging = dir.path().join("blob.part");
        let err = download(
            common::blob_manifest(&blob).artifact(),
            &staging,
            &config.fetch,
            &handle,
            &mut inbound.chunks,
            |_, _| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, FetchError::TooLong { .. }), "{err}");
        assert!(std::fs::metadata(&staging).unwrap().len() <= blob.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_is_refused_and_an_unknown_artifact_is_named() {
    for broker in common::brokers("a_wrong_digest_is_refused_and_an_unknown_artifact_is_named") {
        let port = broker.port;
        let blob = common::pseudo_random_bytes(100 * 1024);
        common::start_responder(port, blob.clone(), common::Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(port, dir.path(), "dev-digest");
        let (handle, mut inbound) = connect(&config).await;

        // The server holds different bytes than the manifest promises.
        let mut other = blob.to_vec();
        other[5] ^= 1;
        let err = download(
            common::blob_manifest(&other).artifact(),
            &dir.path().join("a.part"),
            &config.fetch,
            &handle,
            &mut inbound.chunks,
            |_, _| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, FetchError::NotFound(_)), "{err}");

        // A staging file whose first bytes were corrupted on disk resumes, and the digest catches it.
        let staging = dir.path().join("b.part");
        let mut corrupt = blob[..50 * 1024].to_vec();
        corrupt[10] ^= 1;
        std::fs::write(&staging, &corrupt).unwrap();
        let err = download(
            common::blob_manifest(&blob).artifact(),
            &staging,
            &config.fetch,
            &handle,
            &mut inbound.chunks,
            |_, _| {},
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
    }
}
