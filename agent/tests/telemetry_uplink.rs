//! A real agent process reports what it did through its outbox: install events, health, and one
//! telemetry item per model version per interval, whose inference counts add up to exactly the
//! requests it served.

mod common;

use std::time::Duration;

use common::agent::{infer_matches_self_test, write_config, Agent};
use common::receiver::Receiver;
use common::{sample_manifest, Control, Faults, Responder};
use fleet_protocol::outbox::{EventKind, ItemBody};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_events_reach_the_server_and_the_counts_match() {
    for broker in common::brokers("telemetry_and_events_reach_the_server_and_the_counts_match") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-telemetry";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[telemetry]\ninterval_secs = 1",
        );
        let (onnx, manifest) = sample_manifest("cancer-logreg", "v1", 1);
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(onnx);
        let receiver = Receiver::start(broker.port, device, Vec::new()).await;
        let mut control = Control::start(broker.port, device).await;
        let _agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &manifest, false).await;

        let served = 300u64;
        for _ in 0..served {
            infer_matches_self_test(api_port, &manifest);
        }

        // Telemetry arrives once a second; wait until the counts add up (or time runs out).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (counted, events) = loop {
            let (counted, events, health_after) = {
                let items = receiver.items.lock().unwrap();
                let counted: u64 = items
                    .values()
                    .filter_map(|item| match &item.body {
                        ItemBody::Telemetry(t) if t.model.as_str() == "cancer-logreg" => {
                            assert_eq!(t.version.as_str(), "v1");
                            assert_eq!(t.release, 1);
                            Some(t.inferences)
                        }
                        _ => None,
                    })
                    .sum();
                let events: Vec<EventKind> = items
                    .values()
                    .filter_map(|item| match &item.body {
                        ItemBody::Event(e) => Some(e.event),
                        _ => None,
                    })
                    .collect();
                // Each flush queues the telemetry first, then a health reading.
                let last_telemetry = items
                    .iter()
                    .filter(|(_, item)| matches!(item.body, ItemBody::Telemetry(_)))
                    .map(|(id, _)| *id)
                    .max();
                let health_after = items
                    .range(last_telemetry.unwrap_or(0)..)
                    .any(|(_, item)| matches!(item.body, ItemBody::Health(_)));
                (counted, events, health_after)
            };
            if (counted >= served && health_after) || tokio::time::Instant::now() > deadline {
                break (counted, events);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(counted, served, "telemetry counts every request once");
        assert!(
            events.contains(&EventKind::DirectiveAccepted)
                && events.contains(&EventKind::Activated),
            "{events:?}"
        );
        // Ids arrive without gaps: nothing was lost on the way.
        let items = receiver.items.lock().unwrap();
        // A health reading rides along every interval.
        let health = items
            .values()
            .rev()
            .find_map(|item| match &item.body {
                ItemBody::Health(h) => Some(h.clone()),
                _ => None,
            })
            .expect("health readings arrive with the telemetry");
        assert!(health.link.connects >= 1, "{health:?}");
        assert!(
            health.link.bytes_in > 0 && health.link.bytes_out > 0,
            "{health:?}"
        );
        assert!(health.agent_rss_bytes > 1 << 20, "{health:?}");
        assert!(
            health.mem_total_bytes > 0 && health.disk_total_bytes > 0,
            "{health:?}"
        );
        let ids: Vec<u64> = items.keys().copied().collect();
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
        eprintln!(
            "{} items received ({} deliveries), {served} inferences counted, events {events:?}",
            items.len(),
            receiver.deliveries.lock().unwrap()
        );
    }
}
