//! Faults, end to end (issue 9): a real `fleet-server` with its embedded broker and SQLite, real
//! `edge-agent` processes, links through a proxy the test shapes or cuts, and processes killed
//! with SIGKILL. Each scenario ends with every device serving a valid model and nothing lost
//! that was acknowledged. `tests/README.md` lists the scenarios and where each is tested.

mod common;

use std::time::{Duration, Instant};

use common::{model_state, sample_request, Fleet, Load};
use driftgate_tests::proxy::{Proxy, Shaping};
use driftgate_tests::{require_env, wait_for};
use serde_json::{json, Value};

/// SIGKILL of the server while a staged rollout is under way: after the restart the rollout
/// goes on from the stage it was in (the canary is not reached a second time, nor sent a new
/// directive) and completes; every device ends on the new version.
#[test]
fn server_killed_mid_rollout_continues_where_it_was() {
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(work.path());
    fleet.push_sample("digits-mlp", "v1");
    fleet.push_sample("digits-mlp", "v2");
    let mut devices: Vec<_> = (0..3)
        .map(|i| fleet.enroll(&format!("dev-{i}"), &["site=lab"]))
        .collect();
    for device in &mut devices {
        device.start();
        fleet.fleetctl(&["device", "assign", &device.id, "digits-mlp@v1"]);
    }
    for device in &mut devices {
        wait_for("v1 served", Duration::from_secs(60), || {
            device.assert_running();
            (device.serving("digits-mlp").as_deref() == Some("v1")).then_some(())
        });
    }
    // The application keeps asking: the gates are judged on these figures.
    let _loads: Vec<Load> = devices
        .iter()
        .map(|d| {
            Load::start(
                d,
                "digits-mlp",
                sample_request("digits-mlp", "v1"),
                Duration::from_millis(50),
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
                    {"size": {"count": 1}, "soak_secs": 10},
                    {"size": {"percent": 100.0}, "soak_secs": 2}
                ],
                // Latency on a loaded 2-core test machine is not what this test is about.
                "gates": {"max_p95_ratio": null},
                "install_timeout_secs": 60
            }),
        )
        .expect("the rollout is created");
    let id = created["rollout"]["id"].as_str().unwrap().to_string();

    // The canary installs; the rollout soaks in stage 0. Then the power goes.
    let before = wait_for("the canary to run v2", Duration::from_secs(90), || {
        let shown = fleet.rollout(&id);
        let reached = shown["devices"].as_object()?;
        let (device, entry) = reached.iter().next()?;
        let (device, entry) = (device.clone(), entry.clone());
        (reached.len() == 1
            && fleet.reported_active(&device, "digits-mlp").as_deref() == Some("v2"))
        .then_some((device, entry, shown.clone()))
    });
    let (canary, canary_entry, shown) = before;
    assert_eq!(shown["rollout"]["phase"], "running", "{shown}");
    // The API counts stages from 1.
    assert_eq!(shown["rollout"]["stage"], 1, "{shown}");
    let canary_seq = fleet.device(&canary)["device"]["directive_seq"].clone();
    fleet.kill_server();
    std::thread::sleep(Duration::from_secs(2));
    fleet.start_server();

    let done = wait_for(
        "the rollout to complete after the restart",
        Duration::from_secs(180),
        || {
            fleet.assert_server_running();
            let shown = fleet.rollout(&id);
            let phase = shown["rollout"]["phase"].as_str()?.to_string();
            assert!(
                phase == "running" || phase == "completed",
                "the rollout left its course after the restart: {shown}"
            );
            (phase == "completed").then_some(shown)
        },
    );
    // Where it was: the canary is the same entry (reached once, in stage 0, by the same
    // directive), and the server signed no other directive for it.
    for field in ["reached_at_ms", "stage", "directive_seq"] {
        assert_eq!(
            done["devices"][&canary][field], canary_entry[field],
            "{field} of the canary changed: {done}"
        );
    }
    assert_eq!(
        fleet.device(&canary)["device"]["directive_seq"],
        canary_seq,
        "the canary was sent another directive"
    );
    let reached = done["devices"].as_object().unwrap();
    assert_eq!(reached.len(), 3, "{done}");
    for (device, entry) in reached {
        assert_eq!(entry["outcome"], "installed", "{device}: {entry}");
        let expected_stage = if *device == canary { 0 } else { 1 };
        assert_eq!(entry["stage"], expected_stage, "{device}: {entry}");
    }
    // Nothing the server acknowledged is missing: what it stored of each device is every id
    // up to the last one it acked, without a gap (telemetry kept flowing through the outage).
    for device in &devices {
        let acked = fleet.assert_acked_items_stored(&device.id);
        assert!(acked > 10, "{}: acked up to {acked}", device.id);
    }
    for device in &mut devices {
        device.assert_running();
        wait_for("v2 served everywhere", Duration::from_secs(30), || {
            (device.serving("digits-mlp").as_deref() == Some("v2")
                && fleet.reported_active(&device.id, "digits-mlp").as_deref() == Some("v2"))
            .then_some(())
        });
    }
}

/// The artifact of a 5 MB model: a two-layer perceptron whose first weight matrix is
/// 1280 × 1024 floats.
fn five_megabyte_model(work: &std::path::Path) -> std::path::PathBuf {
    let onnx = driftgate_tests::onnx::dense_mlp(1280, 1024, 5);
    assert!(onnx.len() > 5_000_000, "{} bytes", onnx.len());
    let path = work.join("dense-v1.onnx");
    std::fs::write(&path, onnx).unwrap();
    path
}

/// A device behind a shaped link installs a 5 MB model assigned to it. Returns how long the
/// install took from the assignment, and the proxy.
fn install_through(shaping: Shaping) -> (Duration, u64, Proxy) {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    let model = five_megabyte_model(work.path());
    let size = std::fs::metadata(&model).unwrap().len();
    let manifest = fleet.sign(&model, "dense", "v1", None);
    fleet.push(&model, &manifest);

    let proxy = Proxy::start(fleet.mqtt_port);
    proxy.shape(shaping);
    let mut device = fleet.enroll("slow-1", &[]);
    device.route_through(proxy.port);
    device.start();
    wait_for("the device online", Duration::from_secs(60), || {
        device.assert_running();
        (fleet.device("slow-1")["device"]["presence"] == "online").then_some(())
    });

    let started = Instant::now();
    fleet.fleetctl(&["device", "assign", "slow-1", "dense@v1"]);
    wait_for(
        "the 5 MB model to install over the shaped link",
        Duration::from_secs(400),
        || {
            device.assert_running();
            (device.serving("dense").as_deref() == Some("v1")).then_some(())
        },
    );
    let took = started.elapsed();
    // The server hears of it too, and nothing failed on the way.
    let state = wait_for("the reported state", Duration::from_secs(30), || {
        let device = fleet.device("slow-1");
        let model = model_state(&device["device"]["state"], "dense")?.clone();
        (model["active"]["version"] == "v1").then_some(model)
    });
    assert_eq!(state["phase"]["phase"], "active", "{state}");
    (took, size, proxy)
}

/// 64 KiB/s each way: the download takes as long as the link needs, and no chunk request
/// times out into a storm of duplicates (what crosses the link stays close to the model's size).
#[test]
fn a_5_mb_model_installs_over_a_64_kib_per_second_link() {
    let rate = 64 * 1024;
    let (took, size, proxy) = install_through(Shaping {
        bytes_per_sec: Some(rate),
        loss: 0.0,
    });
    let floor = Duration::from_secs_f64(size as f64 / rate as f64);
    eprintln!(
        "5 MB at 64 KiB/s: installed in {took:?} (the link's floor {floor:?}), {} bytes down",
        proxy.bytes_down()
    );
    assert!(
        took >= floor.mul_f64(0.95),
        "faster than the link: {took:?}"
    );
    assert!(
        proxy.bytes_down() < size + size / 4,
        "{} bytes crossed the link for a {size}-byte model",
        proxy.bytes_down()
    );
}

/// 10 % of segments lost each way (each holds its stream for a retransmission timeout).
#[test]
fn a_5_mb_model_installs_over_a_link_losing_10_percent() {
    let (took, size, proxy) = install_through(Shaping {
        bytes_per_sec: None,
        loss: 0.10,
    });
    eprintln!(
        "5 MB with 10 % loss: installed in {took:?}, {} segments lost, {} bytes down",
        proxy.segments_lost(),
        proxy.bytes_down()
    );
    assert!(proxy.segments_lost() > 100, "{}", proxy.segments_lost());
    assert!(
        proxy.bytes_down() < size + size / 4,
        "{} bytes crossed the link for a {size}-byte model",
        proxy.bytes_down()
    );
}

/// Device clocks 10 minutes ahead and 10 minutes behind, inside the documented tolerance of 15
/// minutes (`fleet_protocol::limits::CLOCK_SKEW_TOLERANCE_MS`): those devices connect (their
/// TLS certificates are backdated), install, switch and report like any other, and the server
/// stores everything it acknowledged of them. A clock 20 minutes behind is past the tolerance:
/// that device refuses the directive as `not_yet_valid`, tells the server so in its reported
/// state, and serves nothing.
#[test]
fn device_clocks_ten_minutes_off_install_switch_and_report() {
    if !require_env(
        "device_clocks_ten_minutes_off_install_switch_and_report",
        "DRIFTGATE_TEST_FAKETIME",
        "Debian's faketime (libfaketime)",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(work.path());
    fleet.push_sample("digits-mlp", "v1");
    fleet.push_sample("digits-mlp", "v2");
    let mut within: Vec<_> = [("ahead", "+10m"), ("behind", "-10m")]
        .into_iter()
        .map(|(id, offset)| {
            let mut device = fleet.enroll(id, &[]);
            device.start_with_clock(offset);
            device
        })
        .collect();
    let mut beyond = fleet.enroll("far-behind", &[]);
    beyond.start_with_clock("-20m");
    for id in ["ahead", "behind", "far-behind"] {
        wait_for(&format!("{id} online"), Duration::from_secs(60), || {
            (fleet.device(id)["device"]["presence"] == "online").then_some(())
        });
        fleet.fleetctl(&["device", "assign", id, "digits-mlp@v1"]);
    }
    for version in ["v1", "v2"] {
        for device in &mut within {
            if version == "v2" {
                fleet.fleetctl(&["device", "assign", &device.id, "digits-mlp@v2"]);
            }
            wait_for(
                &format!("{} to serve and report {version}", device.id),
                Duration::from_secs(60),
                || {
                    device.assert_running();
                    (device.serving("digits-mlp").as_deref() == Some(version)
                        && fleet.reported_active(&device.id, "digits-mlp").as_deref()
                            == Some(version))
                    .then_some(())
                },
            );
        }
    }
    let refused = wait_for(
        "far-behind to report its refusal",
        Duration::from_secs(60),
        || {
            beyond.assert_running();
            let state = fleet.device("far-behind")["device"]["state"].clone();
            state["refused"]
                .is_object()
                .then_some(state["refused"].clone())
        },
    );
    assert_eq!(refused["code"], "not_yet_valid", "{refused}");
    assert_eq!(beyond.serving("digits-mlp"), None, "{}", beyond.log());
    assert_eq!(fleet.reported_active("far-behind", "digits-mlp"), None);
    // Their figures arrive like anyone's: every item the server acked is stored, without a gap.
    for device in &within {
        let acked = wait_for(
            &format!("telemetry from {}", device.id),
            Duration::from_secs(30),
            || {
                let acked = fleet.device(&device.id)["device"]["acked_up_to"].as_i64()?;
                (acked >= 5).then_some(acked)
            },
        );
        assert!(fleet.assert_acked_items_stored(&device.id) >= acked);
    }
}

/// Mosquitto, the fleet's broker, stopped and started again (SIGTERM, as a service manager
/// restarts it) three times: while a 5 MB model downloads over a slow link, while a staged
/// rollout soaks, and all along while every device uploads its outbox. The download resumes
/// where it was (under 1.25 × the model crosses the link), the rollout completes, every
/// device serves the new version, and every item the server acknowledged is stored.
#[test]
fn broker_restarts_during_a_download_a_rollout_and_uploads_lose_nothing() {
    if !require_env(
        "broker_restarts_during_a_download_a_rollout_and_uploads_lose_nothing",
        "DRIFTGATE_TEST_MOSQUITTO",
        "Mosquitto",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with_mosquitto(work.path());
    fleet.push_sample("digits-mlp", "v1");
    fleet.push_sample("digits-mlp", "v2");
    let model = five_megabyte_model(work.path());
    let size = std::fs::metadata(&model).unwrap().len();
    let manifest = fleet.sign(&model, "dense", "v1", None);
    fleet.push(&model, &manifest);

    let proxy = Proxy::start(fleet.mqtt_port);
    let mut devices: Vec<_> = (0..3)
        .map(|i| fleet.enroll(&format!("dev-{i}"), &["site=lab"]))
        .collect();
    devices[0].route_through(proxy.port);
    for device in &mut devices {
        device.start();
        fleet.fleetctl(&["device", "assign", &device.id, "digits-mlp@v1"]);
    }
    for device in &mut devices {
        wait_for("v1 served", Duration::from_secs(60), || {
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
                sample_request("digits-mlp", "v1"),
                Duration::from_millis(50),
            )
        })
        .collect();

    // 1. A download under way: 5 MB at 256 KiB/s takes about 20 s.
    let down_before = proxy.bytes_down();
    proxy.shape(Shaping {
        bytes_per_sec: Some(256 * 1024),
        loss: 0.0,
    });
    fleet.fleetctl(&["device", "assign", "dev-0", "dense@v1"]);
    wait_for("a fifth of the download", Duration::from_secs(60), || {
        let reported = fleet.device("dev-0");
        let phase = model_state(&reported["device"]["state"], "dense")?["phase"].clone();
        (phase["phase"] == "downloading" && phase["received"].as_u64()? > size / 5).then_some(())
    });
    fleet.mosquitto().stop();
    std::thread::sleep(Duration::from_secs(3));
    fleet.mosquitto().start();
    wait_for(
        "the download to resume and the model to install",
        Duration::from_secs(180),
        || {
            devices[0].assert_running();
            (devices[0].serving("dense").as_deref() == Some("v1")).then_some(())
        },
    );
    let crossed = proxy.bytes_down() - down_before;
    // The outage hit the download: the agent lost its link while it was under way. Then
    // either the persistent session carried the requests and replies in flight over the
    // restart (Mosquitto saves sessions when it stops), or they were asked again, or the next
    // download resumed from the staging file: what crossed the link says none started over.
    let log = plain(&devices[0].log());
    let download = log
        .rsplit("directive accepted seq=2")
        .next()
        .unwrap_or_default();
    assert!(
        download.contains("broker connection failed")
            && download.contains("downloaded model=dense"),
        "the broker restart did not interrupt the download:\n{log}"
    );
    let retries = logged_field(&log, "downloaded model=dense", "retries");
    let resumed_from = logged_field(&log, "downloaded model=dense", "resumed_from");
    eprintln!(
        "5 MB download across a broker restart: {crossed} bytes crossed the link; \
         {retries} chunk requests asked again, resumed from byte {resumed_from}"
    );
    assert!(
        crossed < size + size / 4,
        "{crossed} bytes crossed the link for a {size}-byte model: the download started over"
    );
    proxy.shape(Shaping {
        bytes_per_sec: None,
        loss: 0.0,
    });

    // 2. A rollout in its canary's soak.
    let created = fleet
        .api()
        .post_json(
            "/api/v1/rollouts",
            &json!({
                "model": "digits-mlp", "version": "v2",
                "selector": {"site": "lab"},
                "stages": [
                    {"size": {"count": 1}, "soak_secs": 10},
                    {"size": {"percent": 100.0}, "soak_secs": 2}
                ],
                "gates": {"max_p95_ratio": null},
                "install_timeout_secs": 90
            }),
        )
        .expect("the rollout is created");
    let id = created["rollout"]["id"].as_str().unwrap().to_string();
    wait_for("the canary to run v2", Duration::from_secs(90), || {
        let shown = fleet.rollout(&id);
        let (device, _) = shown["devices"].as_object()?.iter().next()?;
        (fleet.reported_active(device, "digits-mlp").as_deref() == Some("v2")).then_some(())
    });
    fleet.mosquitto().stop();
    std::thread::sleep(Duration::from_secs(3));
    fleet.mosquitto().start();
    let done = wait_for(
        "the rollout to complete after the broker restart",
        Duration::from_secs(180),
        || {
            fleet.assert_server_running();
            let shown = fleet.rollout(&id);
            let phase = shown["rollout"]["phase"].as_str()?.to_string();
            assert!(
                phase == "running" || phase == "completed",
                "the rollout left its course: {shown}"
            );
            (phase == "completed").then_some(shown)
        },
    );
    assert_eq!(done["devices"].as_object().unwrap().len(), 3, "{done}");
    for device in &mut devices {
        wait_for("v2 served and reported", Duration::from_secs(60), || {
            device.assert_running();
            (device.serving("digits-mlp").as_deref() == Some("v2")
                && fleet.reported_active(&device.id, "digits-mlp").as_deref() == Some("v2"))
            .then_some(())
        });
    }

    // 3. The uploads went on through both restarts: the server acknowledges items produced
    // after the second one, and stores every item it acknowledged, without a gap.
    for device in &devices {
        let before = fleet.device(&device.id)["device"]["acked_up_to"]
            .as_i64()
            .unwrap_or(0);
        wait_for(
            &format!("{} uploading again", device.id),
            Duration::from_secs(60),
            || {
                let acked = fleet.device(&device.id)["device"]["acked_up_to"].as_i64()?;
                (acked > before + 3).then_some(())
            },
        );
        fleet.assert_acked_items_stored(&device.id);
    }
}

/// A log without its colours (tracing writes ANSI escapes: ESC [ … letter).
fn plain(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The numeric `field` of the last line of a plain log that contains `marker` (tracing's
/// `key=value` fields).
fn logged_field(log: &str, marker: &str, field: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("no log line with {marker}"));
    let prefix = format!("{field}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

/// How many agents the reconnect test runs.
const CROWD: usize = 500;
/// How long the crowd may take to be back after the broker is (the target; measured in the
/// test's output and `tests/README.md`).
const CROWD_BACK_WITHIN: Duration = Duration::from_secs(60);

/// 500 agents on one Mosquitto, which restarts (SIGTERM, then started again, as a service
/// manager does): every agent is back within a bounded time, as the server sees it (online,
/// with a presence from after the restart). The agents are the real pipeline
/// (`edge_agent::daemon::run_until`, each with its own data dir, outbox, API and TLS session
/// with its own certificate from `fleetctl device enroll`), run in this one process: 500
/// processes would measure the machine's memory, not the reconnect.
#[test]
fn five_hundred_agents_reconnect_after_a_broker_restart() {
    if !require_env(
        "five_hundred_agents_reconnect_after_a_broker_restart",
        "DRIFTGATE_TEST_MOSQUITTO",
        "Mosquitto",
    ) {
        return;
    }
    // The agents' warnings and errors (a reconnect that fails, a status not sent), tagged
    // with nothing but their text: 500 agents share this process.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .try_init();
    let work = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with_mosquitto(work.path());

    let enrolling = Instant::now();
    let configs: Vec<edge_agent::config::AgentConfig> = (0..CROWD)
        .map(|i| {
            let device = fleet.enroll(&format!("crowd-{i:03}"), &["crowd=yes"]);
            let mut config =
                edge_agent::config::AgentConfig::load(&device.bundle.join("agent.toml"))
                    .expect("the bundle's agent.toml");
            // Any free port: the test never calls their APIs.
            config.api.listen = "127.0.0.1:0".parse().unwrap();
            // Telemetry at the default pace, not the suite's 1 s.
            config.telemetry.interval_secs = 10;
            if (i + 1) % 100 == 0 {
                eprintln!("enrolled {} of {CROWD}", i + 1);
            }
            config
        })
        .collect();
    eprintln!("enrolled {CROWD} devices in {:?}", enrolling.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = configs
        .into_iter()
        .map(|config| {
            let mut stopped = stopped.clone();
            runtime.spawn(edge_agent::daemon::run_until(config, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }))
        })
        .collect();

    // The crowd's devices not online since `since_ms`, as the server has them: (id,
    // presence, presence_at_ms).
    let api = fleet.api();
    let not_back = |since_ms: i64| -> Vec<(String, Value, Value)> {
        let list = api
            .get("/api/v1/devices?label=crowd%3Dyes")
            .expect("the device list");
        list["devices"]
            .as_array()
            .expect("a list of devices")
            .iter()
            .filter(|d| {
                d["presence"] != "online"
                    || d["presence_at_ms"].as_i64().is_none_or(|at| at < since_ms)
            })
            .map(|d| {
                (
                    d["id"].as_str().unwrap_or_default().to_string(),
                    d["presence"].clone(),
                    d["presence_at_ms"].clone(),
                )
            })
            .collect()
    };
    let online_since = |since_ms: i64| CROWD - not_back(since_ms).len();
    let connecting = Instant::now();
    wait_for(
        &format!("all {CROWD} agents online"),
        Duration::from_secs(180),
        || (online_since(0) == CROWD).then_some(()),
    );
    eprintln!(
        "all {CROWD} online {:?} after their start",
        connecting.elapsed()
    );

    fleet.mosquitto().stop();
    let restarted_ms = now_ms();
    std::thread::sleep(Duration::from_secs(2));
    fleet.mosquitto().start();
    let back_from = Instant::now();
    let mut progress = Instant::now();
    let took = wait_for(
        &format!("all {CROWD} agents back after the broker restart"),
        CROWD_BACK_WITHIN,
        || {
            fleet.assert_server_running();
            let back = online_since(restarted_ms);
            if progress.elapsed() >= Duration::from_secs(5) {
                eprintln!("{back} of {CROWD} back after {:?}", back_from.elapsed());
                progress = Instant::now();
            }
            if back_from.elapsed() + Duration::from_secs(1) >= CROWD_BACK_WITHIN {
                eprintln!("not back: {:?}", not_back(restarted_ms));
            }
            (back == CROWD).then(|| back_from.elapsed())
        },
    );
    eprintln!(
        "the broker was down 2 s; all {CROWD} agents were back {took:?} after it started again"
    );

    stop.send_replace(true);
    runtime.block_on(async {
        for agent in agents {
            match tokio::time::timeout(Duration::from_secs(30), agent).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("an agent failed: {e:#}"),
                Ok(Err(e)) => panic!("an agent panicked: {e}"),
                Err(_) => panic!("an agent did not stop within 30 s"),
            }
        }
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
