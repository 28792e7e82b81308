//! Attacks on devices, end to end (issue 9): a real `fleet-server` with its embedded broker,
//! real `edge-agent` processes. Each attack is refused, the reason reaches the server in the
//! device's reported state, and the device goes on serving what it served.
//! `tests/README.md` lists the scenarios and where each is tested.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{model_state, Fleet};
use driftgate_tests::wait_for;
use fleet_protocol::tensor::Dim;
use fleet_protocol::{
    ElementType, Envelope, Manifest, SelfTest, Sha256Digest, Tensor, TensorData, TensorSpec,
    MANIFEST_TYPE, V1,
};

/// Signs `onnx` as `digits-mlp` `version` (release `release`) with the fleet's release key,
/// without loading it (`fleetctl model sign` builds the plan, and a bomb would take the
/// signing machine's memory too): the case of a release pipeline that signs what it is given.
/// The model maps `x [N, 4]` to `y [N, 4]`; its self-test is one row of ones, `y = expected`.
fn sign_unloaded(
    fleet: &Fleet,
    onnx: &[u8],
    version: &str,
    release: u64,
    expected: f32,
) -> (PathBuf, PathBuf) {
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        datatype: ElementType::F32,
        shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(4)],
    };
    let tensor = |name: &str, value: f32| {
        Tensor::new(name, vec![1, 4], TensorData::F32(vec![value; 4])).expect("a 1×4 tensor")
    };
    let manifest = Manifest {
        v: V1,
        name: "digits-mlp".parse().unwrap(),
        release,
        version: version.parse().unwrap(),
        sha256: Sha256Digest::of(onnx),
        size: onnx.len() as u64,
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
        self_test: SelfTest {
            inputs: vec![tensor("x", 1.0)],
            outputs: vec![tensor("y", expected)],
            tolerance: Default::default(),
        },
        profile_sha256: None,
        profile_size: None,
        min_agent_version: None,
        created_at_ms: 0,
    };
    let pem = std::fs::read_to_string(&fleet.release_key).expect("the release key");
    let key = fleet_protocol::keys::signing_key_from_pem(&pem).expect("a release key");
    let envelope = Envelope::sign(MANIFEST_TYPE, fleet_protocol::encode(&manifest), &key);
    let model = fleet.work.join(format!("bomb-{version}.onnx"));
    let manifest = fleet.work.join(format!("bomb-{version}.manifest.json"));
    std::fs::write(&model, onnx).unwrap();
    std::fs::write(&manifest, fleet_protocol::encode_pretty(&envelope)).unwrap();
    (model, manifest)
}

fn push(fleet: &Fleet, (model, manifest): &(PathBuf, PathBuf)) {
    fleet.push(Path::new(model), Path::new(manifest));
}

/// Where a running sum of ones in `f32` stops growing (what both bombs answer, if they run).
const RUNNING_SUM_CEILING: f32 = 16_777_216.0;

/// Model bombs signed by the release key: a few hundred bytes whose self-test needs 16 GiB,
/// and one that needs 2 GiB (which this machine would grant, and a device must not: the
/// agent checks new versions in a child process, `[check] isolate`, on by default, and its
/// `max_memory_mib` is 256 here). Each is refused at its self-test with a
/// reason that names the limit and the allocation, the agent process lives on, and the
/// device serves v1 throughout.
#[test]
fn model_bombs_are_refused_and_the_device_keeps_serving() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    fleet.push_sample("digits-mlp", "v1");
    let absurd = sign_unloaded(
        &fleet,
        &driftgate_tests::onnx::expand_bomb(1 << 30),
        "v2",
        2,
        RUNNING_SUM_CEILING + 1.0,
    );
    let large = sign_unloaded(
        &fleet,
        &driftgate_tests::onnx::expand_bomb(1 << 27),
        "v3",
        3,
        RUNNING_SUM_CEILING + 1.0,
    );
    push(&fleet, &absurd);
    push(&fleet, &large);

    let mut device = fleet.enroll("target-1", &[]);
    device.configure("[check]\nmax_memory_mib = 256\n");
    device.start();
    fleet.fleetctl(&["device", "assign", "target-1", "digits-mlp@v1"]);
    wait_for("v1 served", Duration::from_secs(60), || {
        device.assert_running();
        (device.serving("digits-mlp").as_deref() == Some("v1")).then_some(())
    });

    for (version, needs, bytes) in [("v2", "16 GiB", 1u64 << 34), ("v3", "2 GiB", 1 << 31)] {
        fleet.fleetctl(&[
            "device",
            "assign",
            "target-1",
            &format!("digits-mlp@{version}"),
        ]);
        let phase = wait_for(
            &format!("the {needs} bomb ({version}) to fail"),
            Duration::from_secs(120),
            || {
                device.assert_running();
                let reported = fleet.device("target-1");
                let model = model_state(&reported["device"]["state"], "digits-mlp")?.clone();
                (model["target"]["version"] == version && model["phase"]["phase"] == "failed")
                    .then(|| model["phase"].clone())
            },
        );
        let reason = phase["reason"].as_str().unwrap_or_default();
        // The reason names the limit and the allocation that went past it: the running sums.
        assert!(
            reason.contains("[check] max_memory_mib") && reason.contains(&bytes.to_string()),
            "{version}: {reason}"
        );
        device.assert_running();
        assert_eq!(device.serving("digits-mlp").as_deref(), Some("v1"));
        assert_eq!(
            fleet.reported_active("target-1", "digits-mlp").as_deref(),
            Some("v1")
        );
        // The application never noticed: v1 answers as before.
        let request = common::sample_request("digits-mlp", "v1");
        device
            .local()
            .post_json("/v2/models/digits-mlp/infer", &request)
            .expect("v1 still answers");
    }
}

/// The topics a server reads from devices.
const SERVER_READS: [fleet_protocol::TopicKind; 4] = [
    fleet_protocol::TopicKind::State,
    fleet_protocol::TopicKind::Status,
    fleet_protocol::TopicKind::Up,
    fleet_protocol::TopicKind::Fetch,
];

/// Every file under `fuzz/seeds/` and `fuzz/regressions/` (valid messages of every kind and
/// the inputs that once crashed a decoder), each also cut in half; and payloads built to hurt:
/// empty, binary noise, nesting 100,000 deep, a wrong version, 2 MiB (over every message
/// limit, under the MQTT packet limit).
fn hostile_payloads() -> Vec<(String, Vec<u8>)> {
    let mut payloads = driftgate_tests::fuzz_corpus();
    let mut noise = vec![0u8; 4096];
    let mut rng = fastrand::Rng::with_seed(9);
    rng.fill(&mut noise);
    payloads.extend([
        ("empty".to_string(), Vec::new()),
        ("binary noise".to_string(), noise),
        (
            "nested 100,000 deep".to_string(),
            "[".repeat(100_000).into_bytes(),
        ),
        (
            "version 2".to_string(),
            br#"{"v":2,"device":"noisy"}"#.to_vec(),
        ),
        ("only a version".to_string(), br#"{"v":1}"#.to_vec()),
        (
            "2 MiB".to_string(),
            format!(r#"{{"v":1,"pad":"{}"}}"#, "A".repeat(2 << 20)).into_bytes(),
        ),
    ]);
    payloads
}

/// Publishes every payload on every topic in `SERVER_READS` as the enrolled `device` (its own
/// certificate, through its own broker URL) at QoS 1, and waits for the broker's ack of each.
fn publish_as(device: &common::Device, payloads: Vec<(String, Vec<u8>)>) -> usize {
    let config = edge_agent::config::AgentConfig::load(&device.bundle.join("agent.toml"))
        .expect("the bundle's agent.toml");
    edge_agent::link::install_crypto_provider();
    let options = edge_agent::link::mqtt_options(&config).expect("MQTT options");
    let topics = fleet_protocol::Topics::new(config.broker.topic_root.clone()).expect("a root");
    let total = payloads.len() * SERVER_READS.len();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
        let device_id = config.device_id.clone();
        let publisher = tokio::spawn(async move {
            for kind in SERVER_READS {
                let topic = topics.topic(&device_id, kind);
                for (_, payload) in &payloads {
                    client
                        .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .expect("queued");
                }
            }
            client
        });
        let mut acked = 0;
        while acked < total {
            match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("the broker dropped the publisher after {acked} acks: {e}"),
                Err(_) => panic!("no ack for 30 s after {acked} of {total}"),
            }
        }
        let client = publisher.await.expect("the publisher");
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    });
    total
}

/// The server's `driftgate_server_dropped_messages_total` for one topic, all reasons.
fn dropped_on(metrics: &str, topic: &str) -> u64 {
    let prefix = format!("driftgate_server_dropped_messages_total{{topic=\"{topic}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The fuzz corpus and hostile payloads, published by an enrolled device on every topic the
/// server reads: the server drops them and counts them by topic (all but the corpus's few
/// valid messages that name no device), stays up, and then serves
/// that very device as if nothing had happened (it installs v1 and reports it, and every
/// item the server acknowledged of it is stored).
#[test]
fn hostile_payloads_on_every_topic_the_server_reads_are_dropped_and_counted() {
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(work.path());
    fleet.push_sample("digits-mlp", "v1");
    let mut device = fleet.enroll("noisy", &[]);
    let payloads = hostile_payloads();
    let count = payloads.len();
    let published = publish_as(&device, payloads);
    eprintln!(
        "{published} hostile publications ({count} payloads × {} topics)",
        SERVER_READS.len()
    );

    let port: u16 = fleet
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API's port");
    // Every payload on every topic is dropped and counted, but for the few valid messages in
    // the corpus that name no device and so are this device's own when it sends them (a
    // status, a chunk request): those the server handles as it should. The server works
    // through its queue after the broker acked the last publication, so the counts are
    // waited for.
    let all_counted = |metrics: &str| {
        SERVER_READS
            .iter()
            .all(|kind| dropped_on(metrics, kind.as_str()) + 4 >= count as u64)
    };
    let mut last = String::new();
    let counted = (0..300).any(|_| {
        fleet.assert_server_running();
        let (status, metrics) = driftgate_tests::http_request(port, "GET", "/metrics", &[], b"");
        assert_eq!(status, 200, "{metrics}");
        last = metrics;
        all_counted(&last) || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    for kind in SERVER_READS {
        eprintln!(
            "dropped on {}: {} of {count}",
            kind.as_str(),
            dropped_on(&last, kind.as_str())
        );
    }
    assert!(
        counted,
        "not every topic's drops were counted within 30 s:\n{last}"
    );

    device.start();
    fleet.fleetctl(&["device", "assign", "noisy", "digits-mlp@v1"]);
    wait_for("v1 served and reported", Duration::from_secs(60), || {
        device.assert_running();
        fleet.assert_server_running();
        (device.serving("digits-mlp").as_deref() == Some("v1")
            && fleet.reported_active("noisy", "digits-mlp").as_deref() == Some("v1"))
        .then_some(())
    });
    wait_for(
        "its telemetry acknowledged",
        Duration::from_secs(30),
        || (fleet.device("noisy")["device"]["acked_up_to"].as_i64()? >= 3).then_some(()),
    );
    fleet.assert_acked_items_stored("noisy");
}

/// A compromised broker (here: anyone holding the server's broker password, connected to
/// Mosquitto's internal listener) injects directives to a real agent of a real fleet: one
/// signed by a key that is not the fleet's, another device's real directive, the device's own
/// earlier directive replayed, and one signed with the fleet key itself (stolen from the
/// server's data dir) that expired a day ago. Each is refused with its code; the refusal
/// reaches the server in the device's reported state; the device serves v2 throughout; and
/// the server's next directive (v3) still installs, so nothing the attacker sent moved the
/// device's sequence. Last, with the stolen fleet key, directives that are accepted but carry
/// a manifest signed by an unknown key, or a downgrade to v1 without the rollback flag: the
/// first is refused as `unknown_key` (the manifest), the second fails its install as not a
/// signed rollback, and v3 serves on.
#[test]
fn directives_injected_through_a_compromised_broker_are_refused_and_reported() {
    use fleet_protocol::{encode, SigningKey, Topics, DIRECTIVE_TYPE};

    if !driftgate_tests::require_env(
        "directives_injected_through_a_compromised_broker_are_refused_and_reported",
        "DRIFTGATE_TEST_MOSQUITTO",
        "Mosquitto, the broker whose internal listener the attacker uses",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with_mosquitto(work.path());
    for version in ["v1", "v2", "v3"] {
        fleet.push_sample("digits-mlp", version);
    }
    let mut victim = fleet.enroll("victim", &[]);
    let mut other = fleet.enroll("other", &[]);
    victim.start();
    other.start();
    let serves = |device: &mut common::Device, version: &str| {
        wait_for(
            &format!("{} serving {version}", device.id),
            Duration::from_secs(60),
            || {
                device.assert_running();
                (device.serving("digits-mlp").as_deref() == Some(version)).then_some(())
            },
        )
    };
    fleet.fleetctl(&["device", "assign", "victim", "digits-mlp@v1"]);
    serves(&mut victim, "v1");

    // The attacker listens first: it records the directives the server publishes (retained).
    let internal_port = fleet.mosquitto().internal_port;
    let password = std::fs::read_to_string(work.path().join("server-broker.pass")).unwrap();
    let attacker = Attacker::connect(internal_port, password.trim());
    let topics = Topics::default();
    let topic = |device: &str| {
        topics.topic(
            &fleet_protocol::DeviceId::new(device).unwrap(),
            fleet_protocol::TopicKind::Directive,
        )
    };
    let victims_first = attacker.recorded(&topic("victim"), |d| d.seq >= 1);
    fleet.fleetctl(&["device", "assign", "other", "digits-mlp@v1"]);
    serves(&mut other, "v1");
    let others = attacker.recorded(&topic("other"), |d| d.seq >= 1);
    fleet.fleetctl(&["device", "assign", "victim", "digits-mlp@v2"]);
    serves(&mut victim, "v2");
    let victims_latest = attacker.recorded(&topic("victim"), |d| d.seq > victims_first.1.seq);

    let stolen_fleet_key = fleet_protocol::keys::signing_key_from_pem(
        &std::fs::read_to_string(fleet.data_dir.join("keys/fleet.pem")).unwrap(),
    )
    .unwrap();
    let attackers_key = SigningKey::from_bytes(&[7u8; 32]);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Each forgery asks for v1 again (a rollback the attacker would like), with a sequence
    // above everything the device accepted, unless the attack is the sequence itself.
    let forged = |key: &SigningKey, expires_at_ms: i64| {
        let mut directive = victims_first.1.clone();
        directive.seq = victims_latest.1.seq + 100;
        directive.expires_at_ms = expires_at_ms;
        if expires_at_ms < now_ms {
            directive.issued_at_ms = expires_at_ms - 3_600_000;
        }
        for model in &mut directive.models {
            model.rollback = true;
        }
        encode(&Envelope::sign(DIRECTIVE_TYPE, encode(&directive), key))
    };
    let attacks: [(&str, Vec<u8>, &str); 4] = [
        (
            "signed by a key that is not the fleet's",
            forged(&attackers_key, now_ms + 3_600_000),
            "unknown_key",
        ),
        (
            "another device's directive",
            others.0.clone(),
            "wrong_device",
        ),
        (
            "the device's own earlier directive, replayed",
            victims_first.0.clone(),
            "replayed_sequence",
        ),
        (
            "signed with the stolen fleet key, expired a day ago",
            forged(&stolen_fleet_key, now_ms - 86_400_000),
            "expired",
        ),
    ];
    for (what, payload, code) in attacks {
        let before = fleet.device("victim")["device"]["state_at_ms"]
            .as_i64()
            .unwrap_or(0);
        attacker.publish(&topic("victim"), payload);
        let refused = wait_for(
            &format!("the refusal of {what} reported to the server"),
            Duration::from_secs(30),
            || {
                let device = fleet.device("victim")["device"].clone();
                let fresh = device["state_at_ms"].as_i64()? > before;
                let refused = device["state"]["refused"].clone();
                (fresh && refused["code"] == code).then_some(refused)
            },
        );
        eprintln!("{what}: refused as {code}: {}", refused["reason"]);
        victim.assert_running();
        assert_eq!(
            victim.serving("digits-mlp").as_deref(),
            Some("v2"),
            "{what}"
        );
        assert_eq!(
            fleet.reported_active("victim", "digits-mlp").as_deref(),
            Some("v2"),
            "{what}"
        );
        let request = common::sample_request("digits-mlp", "v2");
        victim
            .local()
            .post_json("/v2/models/digits-mlp/infer", &request)
            .unwrap_or_else(|e| panic!("v2 stops answering after {what}: {e}"));
    }
    // The agent counts them too, by reason.
    let (status, metrics) =
        driftgate_tests::http_request(victim.api_port, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "{metrics}");
    for code in [
        "unknown_key",
        "wrong_device",
        "replayed_sequence",
        "expired",
    ] {
        let line =
            format!("driftgate_dropped_messages_total{{topic=\"directive\",reason=\"{code}\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    // The server's own next directive is still the next in sequence.
    fleet.fleetctl(&["device", "assign", "victim", "digits-mlp@v3"]);
    serves(&mut victim, "v3");

    // With the fleet key itself stolen, a directive is accepted, and what it carries is still
    // checked: a manifest signed by a key that is not a release key is refused, and so is a
    // downgrade without the rollback flag. (Such a directive spends sequence numbers: the
    // server's next ones are refused as replays until its own sequence passes them, which is
    // why these come last; a stolen fleet key is rotated.)
    let accepted_seq = || {
        fleet.device("victim")["device"]["state"]["directive_seq"]
            .as_u64()
            .expect("the victim reports its accepted sequence")
    };
    let with_stolen_key = |seq: u64, rollback: bool, manifest: Envelope| {
        let mut directive = victims_first.1.clone();
        directive.seq = seq;
        directive.issued_at_ms = now_ms;
        directive.expires_at_ms = now_ms + 3_600_000;
        directive.models.truncate(1);
        directive.models[0].manifest = manifest;
        directive.models[0].rollback = rollback;
        encode(&Envelope::sign(
            DIRECTIVE_TYPE,
            encode(&directive),
            &stolen_fleet_key,
        ))
    };
    let v1_manifest = victims_first.1.models[0].manifest.clone();
    let resigned = Envelope::sign(MANIFEST_TYPE, v1_manifest.payload.clone(), &attackers_key);
    let before = fleet.device("victim")["device"]["state_at_ms"]
        .as_i64()
        .unwrap_or(0);
    attacker.publish(
        &topic("victim"),
        with_stolen_key(accepted_seq() + 1, true, resigned),
    );
    let refused = wait_for(
        "the refusal of a manifest signed by an unknown key",
        Duration::from_secs(30),
        || {
            let device = fleet.device("victim")["device"].clone();
            let refused = device["state"]["refused"].clone();
            (device["state_at_ms"].as_i64()? > before
                && refused["code"] == "unknown_key"
                && refused["reason"].as_str()?.starts_with("manifest:"))
            .then_some(refused)
        },
    );
    eprintln!("a manifest signed by an unknown key: {}", refused["reason"]);
    assert_eq!(victim.serving("digits-mlp").as_deref(), Some("v3"));

    attacker.publish(
        &topic("victim"),
        with_stolen_key(accepted_seq() + 1, false, v1_manifest),
    );
    let phase = wait_for(
        "the downgrade without a signed rollback to fail",
        Duration::from_secs(30),
        || {
            let reported = fleet.device("victim");
            let model = model_state(&reported["device"]["state"], "digits-mlp")?.clone();
            (model["target"]["version"] == "v1" && model["phase"]["phase"] == "failed")
                .then(|| model["phase"].clone())
        },
    );
    eprintln!("a downgrade without a signed rollback: {}", phase["reason"]);
    assert!(
        phase["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not a signed rollback"),
        "{phase}"
    );
    victim.assert_running();
    assert_eq!(victim.serving("digits-mlp").as_deref(), Some("v3"));
    assert_eq!(
        fleet.reported_active("victim", "digits-mlp").as_deref(),
        Some("v3")
    );
}

/// An MQTT client on the broker's internal listener with the server's credentials: what a
/// compromised broker (or a stolen broker password) can do.
struct Attacker {
    runtime: tokio::runtime::Runtime,
    client: rumqttc::AsyncClient,
    /// Every directive seen, as published.
    seen: Recording,
}

/// (topic, payload) of every publication the attacker saw.
type Recording = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

impl Attacker {
    fn connect(port: u16, password: &str) -> Attacker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let mut options = rumqttc::MqttOptions::new("attacker", "127.0.0.1", port);
        options.set_credentials("driftgate-server", password);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
        let seen: Recording = Default::default();
        let recorder = seen.clone();
        let filter =
            fleet_protocol::Topics::default().all_devices(fleet_protocol::TopicKind::Directive);
        let subscriber = client.clone();
        runtime.spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = subscriber.try_subscribe(&filter, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        recorder
                            .lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("attacker: connection lost: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Attacker {
            runtime,
            client,
            seen,
        }
    }

    /// Waits for a directive on `topic` that `wanted` accepts; returns its payload and its
    /// decoded contents.
    fn recorded(
        &self,
        topic: &str,
        wanted: impl Fn(&fleet_protocol::Directive) -> bool,
    ) -> (Vec<u8>, fleet_protocol::Directive) {
        wait_for(
            &format!("a directive on {topic}"),
            Duration::from_secs(30),
            || {
                let seen = self.seen.lock().unwrap();
                seen.iter().rev().find_map(|(t, payload)| {
                    if t != topic {
                        return None;
                    }
                    let envelope: Envelope = fleet_protocol::decode(payload).ok()?;
                    let directive: fleet_protocol::Directive =
                        fleet_protocol::decode(&envelope.payload).ok()?;
                    wanted(&directive).then(|| (payload.clone(), directive))
                })
            },
        )
    }

    /// Publishes `payload` on `topic`, not retained (the device is online), and waits for
    /// the broker's ack.
    fn publish(&self, topic: &str, payload: Vec<u8>) {
        let client = self.client.clone();
        let topic = topic.to_string();
        self.runtime
            .block_on(async move {
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
            })
            .expect("the attacker's publication is queued");
    }
}
