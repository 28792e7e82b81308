//! MQTT topics: the server parses the topic of every message it receives on `{root}/d/+/…`.
//!
//! The input, as UTF-8 (other inputs are skipped: MQTT topics are UTF-8 by the spec and the
//! client library hands over `&str`), is
//! * parsed as a topic under the default root: on success, building the topic back from the
//!   parsed device and kind must give the input exactly (so a device id cannot smuggle a `/`,
//!   `+` or `#`, and two topics never parse the same);
//! * tried as a topic root with `Topics::new`: on success, every topic built under that root
//!   must parse back to its device and kind;
//! * split at the first `\n` into root and topic: parsing under a fuzzer-chosen root, with the
//!   same round-trip check.
#![no_main]

use fleet_protocol::ids::DeviceId;
use fleet_protocol::{TopicKind, Topics};
use libfuzzer_sys::fuzz_target;

fn check_parse(topics: &Topics, topic: &str) {
    if let Ok((device, kind)) = topics.parse(topic) {
        assert_eq!(
            topics.topic(&device, kind),
            topic,
            "root {:?}: parse gave ({device}, {kind})",
            topics.root()
        );
        assert!(!device.as_str().contains(['/', '+', '#']));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    check_parse(&Topics::default(), s);

    if let Ok(topics) = Topics::new(s) {
        assert_eq!(topics.root(), s);
        let device = DeviceId::new("dev-1").expect("valid device id");
        for kind in TopicKind::ALL {
            let topic = topics.topic(&device, kind);
            let parsed = topics
                .parse(&topic)
                .unwrap_or_else(|e| panic!("root {s:?}: own topic {topic:?} refused: {e}"));
            assert_eq!(parsed, (device.clone(), kind), "root {s:?}");
            assert!(!topics.all_devices(kind).is_empty());
        }
        let _ = topics.device_subtree(&device);
    }

    if let Some((root, topic)) = s.split_once('\n') {
        if let Ok(topics) = Topics::new(root) {
            check_parse(&topics, topic);
        }
    }
});
