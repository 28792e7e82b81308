//! Bad input on every inbound topic is dropped and counted, and the agent keeps serving and
//! keeps taking good directives (issue 4, acceptance 6).
//!
//! A real agent process and broker. A hostile or broken publisher sends, one at a time:
//! malformed, oversized and wrongly signed directives; malformed, oversized, wrong-version and
//! impossible acks; malformed chunk replies; and a packet above the agent's MQTT packet limit.
//! Each must show up once in `driftgate_dropped_messages_total{topic, reason}` on `/metrics`,
//! inference must keep working throughout, and a good directive afterwards must still install.

mod common;

use std::time::{Duration, Instant};

use common::agent::{infer_matches_self_test, log_tail, write_config, Agent};
use common::{directive, sample_manifest, sign_manifest, Control, Faults, Responder};
use fleet_protocol::outbox::Ack;
use fleet_protocol::{
    encode, DeviceId, Envelope, SigningKey, TopicKind, Topics, DIRECTIVE_TYPE, V1,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};

/// The value of `driftgate_dropped_messages_total{topic, reason}`, 0 when absent.
fn dropped(api_port: u16, topic: &str, reason: &str) -> u64 {
    let (status, text) = common::http(api_port, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    let prefix =
        format!("driftgate_dropped_messages_total{{topic=\"{topic}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.parse().expect("a counter value"))
}

/// Every dropped-message counter, as `topic/reason value` lines (for failure messages).
fn all_dropped(api_port: u16) -> String {
    let (_, text) = common::http(api_port, "GET", "/metrics", b"");
    text.lines()
        .filter(|l| l.starts_with("driftgate_dropped_messages_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An agent serving cancer-logreg v1 over a real broker, with digits-mlp v1 ready to install,
/// and an MQTT client that is not the server, to publish what it likes.
struct Target {
    dir: tempfile::TempDir,
    api_port: u16,
    /// cancer-logreg v1, served.
    manifest: fleet_protocol::Manifest,
    /// digits-mlp v1, for a good directive after the bad input.
    manifest2: fleet_protocol::Manifest,
    control: Control,
    agent: Agent,
    client: AsyncClient,
    _responder: Responder,
}

impl Target {
    async fn serving_v1(broker_port: u16, device: &str, publisher: &str) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(dir.path(), device, broker_port, api_port, "");
        let (onnx, manifest) = sample_manifest("cancer-logreg", "v1", 1);
        let (onnx2, manifest2) = sample_manifest("digits-mlp", "v1", 1);
        let responder = Responder::start(broker_port, Faults::default()).await;
        responder.add(onnx);
        responder.add(onnx2);
        let mut control = Control::start(broker_port, device).await;
        let agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &manifest, false).await;

        let mut options = MqttOptions::new(publisher, "127.0.0.1", broker_port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        Target {
            dir,
            api_port,
            manifest,
            manifest2,
            control,
            agent,
            client,
            _responder: responder,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dropped_and_counted_and_serving_goes_on() {
    for broker in common::brokers("bad_messages_are_dropped_and_counted_and_serving_goes_on") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-bad-input";
        let Target {
            dir,
            api_port,
            manifest,
            manifest2,
            mut control,
            agent,
            client,
            _responder,
        } = Target::serving_v1(broker.port, device, "test-hostile-publisher").await;
        let topics = Topics::default();
        let device_id = DeviceId::new(device).unwrap();
        let topic = |kind| topics.topic(&device_id, kind);

        let signed_for_other_device =
            directive("someone-else", 5, vec![(sign_manifest(&manifest2), false)]);
        let unknown_key = SigningKey::from_bytes(&[9; 32]);
        let signed_by_stranger = encode(&Envelope::sign(
            DIRECTIVE_TYPE,
            b"{\"v\":1}".to_vec(),
            &unknown_key,
        ));
        let cases: Vec<(TopicKind, Vec<u8>, &str, &str)> = vec![
            (
                TopicKind::Directive,
                b"not json at all".to_vec(),
                "directive",
                "malformed",
            ),
            (
                TopicKind::Directive,
                vec![b' '; fleet_protocol::limits::MAX_CONTROL_MESSAGE_BYTES + 1],
                "directive",
                "malformed",
            ),
            (
                TopicKind::Directive,
                signed_by_stranger,
                "directive",
                "unknown_key",
            ),
            (
                TopicKind::Directive,
                signed_for_other_device,
                "directive",
                "wrong_device",
            ),
            (TopicKind::Ack, b"{".to_vec(), "ack", "no_version"),
            (
                TopicKind::Ack,
                br#"{"v": 7, "up_to": 1}"#.to_vec(),
                "ack",
                "unsupported_version",
            ),
            (TopicKind::Ack, vec![b' '; 300], "ack", "too_large"),
            (
                TopicKind::Ack,
                br#"{"v": 1, "up_to": "many"}"#.to_vec(),
                "ack",
                "malformed",
            ),
            (
                TopicKind::Ack,
                encode(&Ack {
                    v: V1,
                    up_to: u64::MAX,
                }),
                "ack",
                "unknown_ids",
            ),
            (TopicKind::Chunk, b"DGCK".to_vec(), "chunk", "malformed"),
            (TopicKind::Chunk, vec![0xff; 4096], "chunk", "malformed"),
            // Above the agent's 4 MiB packet limit: the client cannot even read it, so the
            // connection breaks. The broker would hand it over again at every resumed session;
            // the agent counts it once, starts one clean session, and is back.
            (
                TopicKind::Ack,
                vec![b'x'; 4 * 1024 * 1024 + 512],
                "link",
                "packet_too_large",
            ),
        ];
        for (kind, payload, counter_topic, reason) in cases {
            let before = dropped(api_port, counter_topic, reason);
            let len = payload.len();
            client
                .publish(topic(kind), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while dropped(api_port, counter_topic, reason) == before {
                assert!(
                    Instant::now() < deadline,
                    "{len} bytes on {kind}: expected {counter_topic}/{reason} to be counted\n{}\n{}",
                    all_dropped(api_port),
                    log_tail(dir.path())
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                dropped(api_port, counter_topic, reason),
                before + 1,
                "{len} bytes on {kind}: {counter_topic}/{reason} counted exactly once\n{}",
                log_tail(dir.path())
            );
            // Serving is not disturbed.
            infer_matches_self_test(api_port, &manifest);
        }
        eprintln!("{}", all_dropped(api_port));

        // The link is back (the oversized packet broke the session) and good directives still
        // work: a new model installs.
        control.install(device, 2, &manifest2, false).await;
        infer_matches_self_test(api_port, &manifest2);
        agent.kill();
    }
}

/// The sum of every `driftgate_dropped_messages_total` counter.
fn dropped_in_all(api_port: u16) -> u64 {
    let (status, text) = common::http(api_port, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with("driftgate_dropped_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Issue 9: the fuzz corpus (`fuzz/seeds/`, `fuzz/regressions/`, each file whole and cut in
/// half) replayed on every topic the agent reads, one payload at a time, by a publisher that
/// is not the server. Each is dropped and counted, except the few that are valid messages of
/// that very topic and need nothing done (an ack for items already acknowledged, a chunk reply
/// no download asked for, which waits for one); the agent serves throughout and installs a
/// good directive afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fuzz_corpus_on_every_topic_the_agent_reads_is_dropped_and_counted() {
    for broker in
        common::brokers("the_fuzz_corpus_on_every_topic_the_agent_reads_is_dropped_and_counted")
    {
        eprintln!("broker: {}", broker.name);
        let device = "dev-corpus";
        let Target {
            dir: _dir,
            api_port,
            manifest,
            manifest2,
            mut control,
            agent,
            client,
            _responder,
        } = Target::serving_v1(broker.port, device, "test-corpus-publisher").await;
        let topics = Topics::default();
        let device_id = DeviceId::new(device).unwrap();
        let corpus = driftgate_tests::fuzz_corpus();

        for kind in [TopicKind::Directive, TopicKind::Ack, TopicKind::Chunk] {
            let topic = topics.topic(&device_id, kind);
            let mut uncounted = Vec::new();
            for (name, payload) in &corpus {
                let before = dropped_in_all(api_port);
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .unwrap();
                // One at a time: directives go through a latest-wins slot, so a burst would
                // have most of them superseded unread.
                let deadline = Instant::now() + Duration::from_secs(2);
                let counted = loop {
                    let now = dropped_in_all(api_port);
                    if now > before {
                        break now - before;
                    }
                    if Instant::now() >= deadline {
                        break 0;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                assert!(
                    counted <= 1,
                    "{name} on {kind} counted {counted} times\n{}",
                    all_dropped(api_port)
                );
                if counted == 0 {
                    uncounted.push(name.clone());
                }
            }
            eprintln!(
                "{kind}: {} of {} payloads dropped and counted; not counted: {uncounted:?}",
                corpus.len() - uncounted.len(),
                corpus.len()
            );
            // Only whole, valid messages of this topic's own kind may pass uncounted; every
            // directive is verified, so on that topic nothing may.
            let own_kind = match kind {
                TopicKind::Directive => None,
                TopicKind::Ack => Some("decode_messages/ack.json"),
                _ => Some("chunk_reply/"),
            };
            for name in &uncounted {
                assert!(
                    own_kind.is_some_and(|own| name.starts_with(own))
                        && !name.ends_with("(cut in half)"),
                    "{name} on {kind} was neither dropped nor counted\n{}",
                    all_dropped(api_port)
                );
            }
            infer_matches_self_test(api_port, &manifest);
        }
        eprintln!("{}", all_dropped(api_port));

        // A good directive still installs.
        control.install(device, 2, &manifest2, false).await;
        infer_matches_self_test(api_port, &manifest2);
        agent.kill();
    }
}
