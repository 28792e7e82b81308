//! The store on SQLite, and on PostgreSQL when `DRIFTGATE_TEST_POSTGRES` is set: ingest is
//! idempotent by (device, item id) and acks both deliveries, acks wait for a missing batch and
//! then pass the batches stored after it,
//! drift windows merge by adding counts, registry and device rules hold.

mod common;

use std::collections::BTreeMap;

use fleet_protocol::drift::{DriftWindow, FeatureWindow};
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::outbox::{Batch, Health, Item, ItemBody, Telemetry};
use fleet_protocol::{DeviceId, ModelName, ModelVersion, V1};
use fleet_server::store::{Assignment, ModelRecord, Store};

fn drift(counts: Vec<u64>, samples: u64, drifted: bool) -> ItemBody {
    ItemBody::Drift(DriftWindow {
        model: ModelName::new("m").unwrap(),
        release: 2,
        window: 256,
        started_at_ms: 100,
        ended_at_ms: 200,
        samples,
        features: vec![FeatureWindow {
            index: 0,
            counts,
            missing: 1,
            sum: 10.0,
            sum_sq: 30.0,
            psi: 0.1,
            effect: 0.1,
            drifted,
            cusum_alarms: 0,
        }],
        prediction: None,
        drifted_share: 0.0,
        max_score: 0.5,
        drifted,
    })
}

fn telemetry(n: u64) -> ItemBody {
    let mut latency = LatencyHistogram::default();
    latency.record_us(120.0);
    ItemBody::Telemetry(Telemetry {
        model: ModelName::new("m").unwrap(),
        release: 2,
        version: ModelVersion::new("v2").unwrap(),
        interval_ms: 10_000,
        inferences: n,
        errors: BTreeMap::new(),
        latency,
    })
}

fn health(at_ms: i64) -> (i64, ItemBody) {
    (
        at_ms,
        ItemBody::Health(Health {
            cpu_percent: 12.5,
            mem_used_bytes: 1,
            mem_total_bytes: 2,
            disk_free_bytes: 3,
            disk_total_bytes: 4,
            temperatures_c: BTreeMap::new(),
            agent_rss_bytes: 5,
            uptime_s: 6,
            link: Default::default(),
        }),
    )
}

fn batch(device: &str, after: Option<u64>, items: Vec<(u64, i64, ItemBody)>) -> Batch {
    Batch {
        v: V1,
        device: DeviceId::new(device).unwrap(),
        after,
        items: items
            .into_iter()
            .map(|(id, at_ms, body)| Item { id, at_ms, body })
            .collect(),
    }
}

#[tokio::test]
async fn a_batch_delivered_twice_is_stored_once_and_acked_both_times() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in common::stores(
        "a_batch_delivered_twice_is_stored_once_and_acked_both_times",
        dir.path(),
    )
    .await
    {
        store.insert_device(&common::device("dev-1")).await.unwrap();
        let (at, h) = health(150);
        let b = batch(
            "dev-1",
            Some(0),
            vec![
                (1, 100, telemetry(7)),
                (2, at, h),
                (3, 200, drift(vec![1, 2, 3], 6, false)),
            ],
        );
        let first = store.ingest_batch(&b, 1).await.unwrap();
        assert_eq!(
            (first.stored, first.duplicates, first.ack_up_to),
            (3, 0, 3),
            "{kind}"
        );
        let again = store.ingest_batch(&b, 2).await.unwrap();
        assert_eq!(
            (again.stored, again.duplicates, again.ack_up_to),
            (0, 3, 3),
            "{kind}"
        );
        let items = store.items("dev-1", None, 0, 100).await.unwrap();
        assert_eq!(items.len(), 3, "{kind}");
        let counts = store.item_counts(Some("dev-1")).await.unwrap();
        assert_eq!(counts.get("telemetry"), Some(&1), "{kind}");
        // The drift window was merged once, not twice.
        let merged = store.drift("m", 2).await.unwrap();
        assert_eq!(merged.len(), 1, "{kind}");
        assert_eq!(merged[0].windows, 1, "{kind}");
        assert_eq!(merged[0].merged.features[0].counts, vec![1, 2, 3], "{kind}");
        // Health became the device's latest.
        let d = store.device("dev-1").await.unwrap().unwrap();
        assert_eq!(d.health_at_ms, Some(150), "{kind}");
        assert_eq!(d.health.unwrap()["cpu_percent"], 12.5, "{kind}");
        assert_eq!(d.acked_up_to, 3, "{kind}");
    }
}

#[tokio::test]
async fn an_ack_waits_for_a_missing_batch_and_drift_counts_add() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in common::stores(
        "an_ack_waits_for_a_missing_batch_and_drift_counts_add",
        dir.path(),
    )
    .await
    {
        store.insert_device(&common::device("dev-2")).await.unwrap();
        let first = batch(
            "dev-2",
            Some(0),
            vec![(1, 100, drift(vec![1, 0, 0], 1, false))],
        );
        assert_eq!(store.ingest_batch(&first, 1).await.unwrap().ack_up_to, 1);
        // Batch 3 arrives before batch 2 (which follows id 1): stored, but the ack stays.
        let third = batch(
            "dev-2",
            Some(5),
            vec![(6, 300, drift(vec![0, 0, 4], 4, true))],
        );
        let out = store.ingest_batch(&third, 2).await.unwrap();
        assert_eq!((out.stored, out.ack_up_to), (1, 1), "{kind}");
        // Ids 2..=5 (3 was evicted on the device: a gap the agent knows about) fill it.
        let second = batch(
            "dev-2",
            Some(1),
            vec![
                (2, 150, telemetry(1)),
                (4, 160, telemetry(2)),
                (5, 170, drift(vec![0, 2, 0], 2, false)),
            ],
        );
        // Batch 3 follows on from 5 and is stored already: the ack covers it at once (two
        // replicas storing a device's batches out of order do not stall its upload).
        assert_eq!(
            store.ingest_batch(&second, 3).await.unwrap().ack_up_to,
            6,
            "{kind}"
        );
        // The agent resends batch 3 anyway (its ack crossed): a duplicate, acked again.
        let out = store.ingest_batch(&third, 4).await.unwrap();
        assert_eq!(
            (out.stored, out.duplicates, out.ack_up_to),
            (0, 1, 6),
            "{kind}"
        );
        assert_eq!(
            store.device("dev-2").await.unwrap().unwrap().acked_up_to,
            6,
            "{kind}"
        );
        let merged = store.drift("m", 2).await.unwrap();
        assert_eq!(merged[0].windows, 3, "{kind}");
        assert_eq!(merged[0].flagged, 1, "{kind}");
        assert_eq!(merged[0].merged.samples, 7, "{kind}");
        assert_eq!(merged[0].merged.features[0].counts, vec![1, 2, 4], "{kind}");
        assert_eq!(merged[0].merged.features[0].missing, 3, "{kind}");
        // A batch from a device the server does not know is refused, not stored.
        let stranger = batch("dev-x", None, vec![(1, 1, telemetry(1))]);
        assert!(store.ingest_batch(&stranger, 5).await.is_err(), "{kind}");
    }
}

#[tokio::test]
async fn registry_and_device_rules() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in common::stores("registry_and_device_rules", dir.path()).await {
        store.insert_device(&common::device("dev-3")).await.unwrap();
        assert!(
            store.insert_device(&common::device("dev-3")).await.is_err(),
            "{kind}: enrolled twice"
        );
        let model = ModelRecord {
            name: "m".into(),
            version: "v2".into(),
            release: 2,
            sha256: "ab".repeat(32),
            size: 10,
            profile_sha256: Some("cd".repeat(32)),
            profile_size: Some(5),
            manifest: b"{}".to_vec(),
            pushed_at_ms: 1,
        };
        store.insert_model(&model).await.unwrap();
        assert_eq!(
            store.model("m", "v2").await.unwrap().unwrap(),
            model,
            "{kind}"
        );
        store
            .assign(&Assignment {
                device: "dev-3".into(),
                model: "m".into(),
                version: "v2".into(),
                assigned_at_ms: 1,
            })
            .await
            .unwrap();
        assert!(
            store
                .blob_assigned("dev-3", &"cd".repeat(32))
                .await
                .unwrap(),
            "{kind}"
        );
        assert!(
            !store
                .blob_assigned("dev-9", &"cd".repeat(32))
                .await
                .unwrap(),
            "{kind}"
        );
        let refused = store.delete_model("m", "v2").await.unwrap_err().to_string();
        assert!(refused.contains("dev-3"), "{kind}: {refused}");
        assert!(store.unassign("dev-3", "m").await.unwrap(), "{kind}");
        let orphans = store.delete_model("m", "v2").await.unwrap();
        assert_eq!(orphans.len(), 2, "{kind}");
        // Directive sequence numbers only grow.
        assert_eq!(
            store.next_directive_seq("dev-3", None).await.unwrap(),
            1,
            "{kind}"
        );
        assert_eq!(
            store.next_directive_seq("dev-3", None).await.unwrap(),
            2,
            "{kind}"
        );
        // Revocation: once, listed for the CRL, gone from the allowed set.
        assert!(store.revoke_device("dev-3", 10).await.unwrap(), "{kind}");
        assert!(!store.revoke_device("dev-3", 11).await.unwrap(), "{kind}");
        assert_eq!(
            store.revoked_certs().await.unwrap(),
            vec![("serial-dev-3".to_string(), 10)],
            "{kind}"
        );
        assert!(
            store.active_device_ids().await.unwrap().is_empty(),
            "{kind}"
        );
        assert_eq!(
            store.devices_with_label("site", "berlin").await.unwrap(),
            vec!["dev-3"],
            "{kind}"
        );
    }
    // Migrations run once: opening again keeps the data.
    let again = Store::open(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ))
    .await
    .unwrap();
    assert_eq!(again.devices().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_version_a_device_reports_running_cannot_be_deleted() {
    use fleet_server::registry::{BlobStore, Registry};
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in common::stores(
        "a_version_a_device_reports_running_cannot_be_deleted",
        dir.path(),
    )
    .await
    {
        store.insert_device(&common::device("dev-4")).await.unwrap();
        let model = ModelRecord {
            name: "m".into(),
            version: "v2".into(),
            release: 2,
            sha256: "ab".repeat(32),
            size: 10,
            profile_sha256: None,
            profile_size: None,
            manifest: b"{}".to_vec(),
            pushed_at_ms: 1,
        };
        store.insert_model(&model).await.unwrap();
        // Not assigned, but the device still reports it active (it has not retired it yet).
        let state = serde_json::json!({
            "v": 1, "device": "dev-4", "agent_version": "0.1.0", "at_ms": 5,
            "models": [{"name": "m", "phase": {"phase": "active"},
                        "active": {"release": 2, "version": "v2", "sha256": "ab".repeat(32)}}]
        });
        store
            .set_state("dev-4", &state.to_string(), "0.1.0", 5)
            .await
            .unwrap();
        let registry = Registry::new(
            store.clone(),
            BlobStore::new(dir.path().join(format!("blobs-{kind}"))),
            fleet_protocol::KeyRing::new(),
        );
        let refused = registry.delete("m", "v2").await.unwrap_err().to_string();
        assert!(
            refused.contains("running on 1 device(s): dev-4"),
            "{kind}: {refused}"
        );
        // Once the device reports it gone, the version can go.
        let state = serde_json::json!({
            "v": 1, "device": "dev-4", "agent_version": "0.1.0", "at_ms": 6, "models": []
        });
        store
            .set_state("dev-4", &state.to_string(), "0.1.0", 6)
            .await
            .unwrap();
        registry.delete("m", "v2").await.unwrap();
        assert!(store.model("m", "v2").await.unwrap().is_none(), "{kind}");
    }
}

#[tokio::test]
async fn reports_stored_together_keep_the_newest_and_skip_unknown_devices() {
    use fleet_server::store::DeviceReport;
    let dir = tempfile::tempdir().unwrap();
    let state = |device: &str, at_ms: i64, seq: u64| DeviceReport::State {
        device: device.to_string(),
        json: serde_json::json!({"v": 1, "device": device, "agent_version": "0.1.0",
                                 "at_ms": at_ms, "directive_seq": seq, "models": []})
        .to_string(),
        agent_version: "0.1.0".to_string(),
        at_ms,
    };
    let presence = |device: &str, presence: &'static str, at_ms: i64| DeviceReport::Presence {
        device: device.to_string(),
        presence,
        agent_version: "0.1.0".to_string(),
        at_ms,
    };
    for (kind, store) in common::stores(
        "reports_stored_together_keep_the_newest_and_skip_unknown_devices",
        dir.path(),
    )
    .await
    {
        for id in ["dev-1", "dev-2"] {
            store.insert_device(&common::device(id)).await.unwrap();
        }
        store
            .store_reports(&[
                state("dev-1", 10, 1),
                presence("dev-1", "online", 10),
                state("dev-2", 10, 4),
                // Newer, then a late retained copy of an older one: the newer stays.
                state("dev-1", 20, 2),
                state("dev-1", 15, 9),
                presence("dev-2", "offline", 12),
                // A device the store does not know changes nothing and fails nothing.
                state("dev-9", 10, 1),
            ])
            .await
            .unwrap();
        let one = store.device("dev-1").await.unwrap().unwrap();
        assert_eq!(one.state_at_ms, Some(20), "{kind}");
        assert_eq!(one.state.unwrap()["directive_seq"], 2, "{kind}");
        assert_eq!(one.presence.as_deref(), Some("online"), "{kind}");
        let two = store.device("dev-2").await.unwrap().unwrap();
        assert_eq!(two.state.unwrap()["directive_seq"], 4, "{kind}");
        assert_eq!(
            (two.presence.as_deref(), two.presence_at_ms),
            (Some("offline"), Some(12)),
            "{kind}"
        );
        assert!(store.device("dev-9").await.unwrap().is_none(), "{kind}");
    }
}

#[tokio::test]
async fn directive_sequences_rise_by_one_and_an_unknown_device_has_none() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, store) in common::stores(
        "directive_sequences_rise_by_one_and_an_unknown_device_has_none",
        dir.path(),
    )
    .await
    {
        store.insert_device(&common::device("dev-1")).await.unwrap();
        let first = store.next_directive_seq("dev-1", None).await.unwrap();
        let second = store.next_directive_seq("dev-1", None).await.unwrap();
        assert_eq!(second, first + 1, "{kind}");
        let unknown = store.next_directive_seq("dev-9", None).await;
        assert!(unknown.is_err(), "{kind}: {unknown:?}");
    }
}
