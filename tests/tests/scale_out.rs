//! Issue 10, acceptance 1: two `fleet-server` replicas on one PostgreSQL and one Mosquitto.
//! The leader is SIGKILLed in the middle of a staged rollout; the other replica takes over
//! within 10 s and completes the rollout, and no device ever receives two directives with the
//! same or a lower sequence number (a client on the broker records every directive as the
//! devices get it, retained ones included). Also: overlapping rollouts created through both
//! replicas at the same instant, of which exactly one starts.
//!
//! Needs `DRIFTGATE_TEST_MOSQUITTO` and `DRIFTGATE_TEST_POSTGRES` (`.ci/run` sets both).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Fleet, Load};
use driftgate_tests::{require_env, wait_for};
use fleet_protocol::directive::Directive;
use fleet_protocol::{decode, Envelope};
use serde_json::json;

/// The default lease: the takeover bound is asserted for what operators get.
const LEASE_SECS: u64 = 6;
const TAKEOVER_BOUND: Duration = Duration::from_secs(10);
const DEVICES: usize = 8;

/// Every directive the broker hands out, (device, seq) in arrival order: a client with the
/// server's credentials subscribed to every device's directive topic.
struct DirectiveLog {
    _runtime: tokio::runtime::Runtime,
    seen: Arc<Mutex<Vec<(String, u64)>>>,
}

impl DirectiveLog {
    fn start(port: u16, password: &str) -> DirectiveLog {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let mut options = rumqttc::MqttOptions::new("directive-log", "127.0.0.1", port);
        options.set_credentials("driftgate-server", password);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
        let seen: Arc<Mutex<Vec<(String, u64)>>> = Default::default();
        let recorder = seen.clone();
        let topics = fleet_protocol::Topics::default();
        let filter = topics.all_devices(fleet_protocol::TopicKind::Directive);
        runtime.spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(&filter, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let (device, _) = topics.parse(&p.topic).expect("a device topic");
                        let envelope: Envelope = decode(&p.payload).expect("an envelope");
                        let directive: Directive = decode(&envelope.payload).expect("a directive");
                        recorder
                            .lock()
                            .unwrap()
                            .push((device.as_str().to_string(), directive.seq));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("directive log: connection lost: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        DirectiveLog {
            _runtime: runtime,
            seen,
        }
    }

    /// Panics unless each device's directives arrived with strictly rising sequences.
    fn assert_rising(&self) -> BTreeMap<String, Vec<u64>> {
        let mut by_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (device, seq) in self.seen.lock().unwrap().iter() {
            by_device.entry(device.clone()).or_default().push(*seq);
        }
        for (device, seqs) in &by_device {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{device} received directives out of order or twice: {seqs:?}"
            );
        }
        by_device
    }
}

/// The replica the lease names as leading, by asking `urls` in turn.
fn leader(fleet: &Fleet, urls: &[(&str, &str)]) -> Option<String> {
    urls.iter().find_map(|(name, url)| {
        let cluster = fleet.cluster(url)?;
        (cluster["leading"] == true).then(|| name.to_string())
    })
}

#[test]
fn the_leader_killed_mid_rollout_another_replica_completes_it() {
    let test = "the_leader_killed_mid_rollout_another_replica_completes_it";
    if !require_env(test, "DRIFTGATE_TEST_MOSQUITTO", "Mosquitto")
        || !require_env(test, "DRIFTGATE_TEST_POSTGRES", "a PostgreSQL server")
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_replicated(work.path(), "r1", LEASE_SECS);
    let r1 = fleet.url.clone();
    let r2 = fleet.start_replica("r2");
    let replicas = [("r1", r1.as_str()), ("r2", r2.as_str())];
    let password = std::fs::read_to_string(work.path().join("server-broker.pass")).unwrap();
    let log = DirectiveLog::start(fleet.mosquitto().internal_port, password.trim());
    wait_for("one replica to lead", Duration::from_secs(30), || {
        leader(&fleet, &replicas)
    });

    // Models pushed through one replica, devices enrolled through the other: the blobs and
    // the registry are shared.
    fleet.push_sample("digits-mlp", "v1");
    fleet.push_sample("digits-mlp", "v2");
    fleet.url = r2.clone();
    let mut devices: Vec<_> = (0..DEVICES)
        .map(|i| fleet.enroll(&format!("dev-{i}"), &["site=lab"]))
        .collect();
    for device in &mut devices {
        device.start();
        // Assigned through whichever replica: one that does not lead asks the leader.
        fleet.fleetctl(&["device", "assign", &device.id, "digits-mlp@v1"]);
    }
    for device in &mut devices {
        wait_for("v1 served", Duration::from_secs(90), || {
            device.assert_running();
            (device.serving("digits-mlp").as_deref() == Some("v1")).then_some(())
        });
    }
    let _loads: Vec<Load> = devices
        .iter()
        .map(|d| {
            Load::start(
                d,
                "digits-mlp",
                common::sample_request("digits-mlp", "v1"),
                Duration::from_millis(100),
            )
        })
        .collect();

    let created = fleet
        .api()
        .post_json(
            "/api/v1/rollouts",
            &json!({
                "model": "digits-mlp", "version": "v2",
                "selector": {"site": "lab"},
                "stages": [
                    {"size": {"count": 1}, "soak_secs": 2},
                    {"size": {"percent": 50.0}, "soak_secs": 8},
                    {"size": {"percent": 100.0}, "soak_secs": 0}
                ],
                // Latency on a loaded 2-core test machine is not what this test is about.
                "gates": {"max_p95_ratio": null},
                "install_timeout_secs": 90
            }),
        )
        .expect("the rollout is created");
    let id = created["rollout"]["id"].as_str().unwrap().to_string();

    // Mid-rollout: the second stage reached, not the last.
    wait_for(
        "the rollout's second stage",
        Duration::from_secs(120),
        || {
            let shown = fleet.rollout(&id);
            (shown["rollout"]["stage"] == 2 && shown["devices"].as_object()?.len() > 1)
                .then_some(())
        },
    );
    let old = leader(&fleet, &replicas).expect("a replica leads");
    let (survivor, survivor_url) = if old == "r1" {
        ("r2", &r2)
    } else {
        ("r1", &r1)
    };
    eprintln!("killing the leader {old} in the rollout's second stage");
    let killed = Instant::now();
    if old == "r1" {
        fleet.kill_server();
    } else {
        fleet.kill_replica("r2");
    }
    fleet.url = survivor_url.clone();
    wait_for(
        &format!("{survivor} to take over"),
        TAKEOVER_BOUND + Duration::from_secs(5),
        || (fleet.cluster(survivor_url)?["leading"] == true).then_some(()),
    );
    let takeover = killed.elapsed();
    eprintln!("{survivor} leads {takeover:?} after {old} was killed (lease {LEASE_SECS} s)");
    assert!(
        takeover <= TAKEOVER_BOUND,
        "the takeover took {takeover:?}, over {TAKEOVER_BOUND:?}"
    );

    let done = wait_for(
        "the rollout to complete under the new leader",
        Duration::from_secs(180),
        || {
            let shown = fleet.rollout(&id);
            let phase = shown["rollout"]["phase"].as_str()?.to_string();
            assert!(
                phase == "running" || phase == "completed",
                "the rollout left its course after the takeover: {shown}"
            );
            (phase == "completed").then_some(shown)
        },
    );
    assert_eq!(
        done["devices"].as_object().unwrap().len(),
        DEVICES,
        "{done}"
    );
    for device in &mut devices {
        wait_for("v2 served and reported", Duration::from_secs(60), || {
            device.assert_running();
            (device.serving("digits-mlp").as_deref() == Some("v2")
                && fleet.reported_active(&device.id, "digits-mlp").as_deref() == Some("v2"))
            .then_some(())
        });
    }
    let received = log.assert_rising();
    assert_eq!(received.len(), DEVICES, "{received:?}");
    eprintln!("directives received, by device: {received:?}");
}

/// Two operators create overlapping rollouts through two replicas at the same instant: the
/// check that a device has one active rollout per model holds across the replicas, so one
/// is created and the other refused, every time.
#[test]
fn overlapping_rollouts_created_through_two_replicas_at_once_only_one_starts() {
    let test = "overlapping_rollouts_created_through_two_replicas_at_once_only_one_starts";
    if !require_env(test, "DRIFTGATE_TEST_MOSQUITTO", "Mosquitto")
        || !require_env(test, "DRIFTGATE_TEST_POSTGRES", "a PostgreSQL server")
    {
        return;
    }
    const ROUNDS: usize = 6;
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_replicated(work.path(), "r1", LEASE_SECS);
    let r1 = fleet.url.clone();
    let r2 = fleet.start_replica("r2");
    fleet.push_sample("digits-mlp", "v1");
    // Enrolled only: a rollout is created for the devices the store knows.
    for i in 0..20 {
        fleet.enroll(&format!("dev-{i}"), &["site=lab"]);
    }
    let body = json!({
        "model": "digits-mlp", "version": "v1",
        "selector": {"site": "lab"},
        "stages": [{"size": {"percent": 100.0}, "soak_secs": 600}]
    });
    for round in 0..ROUNDS {
        let start = Arc::new(std::sync::Barrier::new(2));
        let attempts: Vec<_> = [&r1, &r2]
            .into_iter()
            .map(|url| {
                let api = fleet_server::client::ApiClient::new(url, Some(fleet.token.clone()));
                let (start, body) = (start.clone(), body.clone());
                std::thread::spawn(move || {
                    start.wait();
                    api.post_json("/api/v1/rollouts", &body)
                })
            })
            .collect();
        let outcomes: Vec<_> = attempts.into_iter().map(|t| t.join().unwrap()).collect();
        let created: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|v| v["rollout"]["id"].as_str().unwrap().to_string())
            .collect();
        let refused: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            created.len(),
            1,
            "round {round}: both replicas created a rollout ({created:?}) or neither did ({refused:?})"
        );
        assert!(
            refused[0].starts_with("409"),
            "round {round}: the other was refused for the wrong reason: {refused:?}"
        );
        // Out of the way for the next round.
        fleet.url = r1.clone();
        fleet.fleetctl(&["rollout", "abort", &created[0]]);
    }
    eprintln!("{ROUNDS} rounds: one rollout created and one refused (409) each time");
}
