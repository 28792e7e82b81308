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
/// agent's `[check] max_memory_mib` is 256 here). Each is refused at its self-test with a
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
