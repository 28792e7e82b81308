//! `fleetctl`: the operator's command line. Parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fleet_protocol::{KeyId, ModelName, ModelVersion};
use fleet_server::{keyfile, profile, release};

#[path = "fleetctl/online.rs"]
mod online;
#[path = "fleetctl/rollout.rs"]
mod rollout;

#[derive(Parser)]
#[command(name = "fleetctl", version, about = "Operate a Driftgate fleet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    server: online::ServerArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Model artifacts and their signed manifests.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Reference profiles for drift monitoring.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Devices: enroll, list, show, assign, revoke (online).
    #[command(subcommand)]
    Device(online::DeviceCommand),
    /// Staged rollouts: create, list, show, pause, resume, abort, rollback, watch (online).
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// The audit log: operators' actions and the engine's decisions, oldest first (online).
    Audit {
        /// Only this rollout's entries.
        #[arg(long)]
        rollout: Option<String>,
        /// How many of the newest entries to show.
        #[arg(long, default_value_t = 200)]
        limit: u32,
    },
    /// A model version's telemetry across the fleet (online).
    Telemetry {
        /// MODEL@VERSION
        model: String,
    },
    /// A model version's drift: per device, and per cohort with --label (online).
    Drift {
        /// MODEL@VERSION
        model: String,
        /// Merge devices into cohorts by this label, for example site.
        #[arg(long)]
        label: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Run the model over training data and write its reference profile, with drift
    /// thresholds calibrated by bootstrap over held-out data so that windows without a shift
    /// are flagged rarely (about 0.6 % of windows at the defaults).
    ///
    /// The sample models' profiles are regenerated with, for example:
    ///
    ///   fleetctl profile build --model models/digits-mlp/v2.onnx
    ///     --data models/data/digits/train.X.npy --holdout models/data/digits/holdout.X.npy
    ///     --out models/digits-mlp/v2.profile.json
    ///
    /// (digits-cnn: add --scale 0.0625). Output is deterministic for the same inputs and seed.
    Build {
        /// The ONNX model file (one FP32 or FP64 input).
        #[arg(long)]
        model: PathBuf,
        /// Training data: .npy (float32/float64, [rows, values per row]) or .csv (header row,
        /// then numbers; empty or `nan` is missing). The reference comes from these rows.
        #[arg(long)]
        data: PathBuf,
        /// Held-out data in the same form: the thresholds are calibrated on windows
        /// resampled from these rows.
        #[arg(long)]
        holdout: PathBuf,
        /// Where to write the profile JSON.
        #[arg(long)]
        out: PathBuf,
        /// Multiply every data value by this before the model sees it.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Seed of the bootstrap.
        #[arg(long, default_value_t = profile::DEFAULT_SEED)]
        seed: u64,
        /// Bootstrap windows per calibrated window length (also the CUSUM's blocks).
        #[arg(long, default_value_t = profile::DEFAULT_BOOTSTRAP)]
        bootstrap: u32,
        /// Replace an existing profile file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate an Ed25519 key pair: DIR/NAME.pem (private, mode 0600) and DIR/NAME.pub.
    Gen {
        /// Directory to write the keys into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Which key: `release` signs manifests (keep it offline), `fleet` signs directives
        /// (the server holds it).
        #[arg(long, value_enum, default_value_t = KeyRole::Release)]
        name: KeyRole,
    },
    /// Print the key id of a public or private key file.
    Id {
        /// A `.pub` (SPKI PEM) or `.pem` (PKCS#8 PEM) file.
        path: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyRole {
    Release,
    Fleet,
}

impl KeyRole {
    fn file_stem(self) -> &'static str {
        match self {
            KeyRole::Release => "release",
            KeyRole::Fleet => "fleet",
        }
    }
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write MODEL.manifest.json: the model's signed manifest.
    Sign {
        /// The ONNX model file.
        model: PathBuf,
        /// Model name, for example `digits-mlp`.
        #[arg(long)]
        name: ModelName,
        /// Display version, for example `v2`.
        #[arg(long)]
        version: ModelVersion,
        /// The release private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
        /// Release counter, strictly increasing per model [default: the number in --version].
        #[arg(long)]
        release: Option<u64>,
        /// Self-test case JSON: inputs, and optionally expected outputs and a tolerance.
        /// Expected outputs are checked against tract; missing ones are computed with tract.
        #[arg(long)]
        self_test: Option<PathBuf>,
        /// Reference profile (`fleetctl profile build`) to bind into the manifest by its
        /// SHA-256; it must have been built from this model. Ship the file with the model.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Oldest agent version allowed to install this model (MAJOR.MINOR.PATCH).
        #[arg(long)]
        min_agent_version: Option<String>,
        /// Where to write the manifest [default: beside the model, MODEL.manifest.json].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing manifest file.
        #[arg(long)]
        force: bool,
    },
    /// Check a model against its signed manifest: signature, size, SHA-256; print the manifest.
    Verify {
        /// The ONNX model file.
        model: PathBuf,
        /// Trusted release public key(s) (SPKI PEM); repeat during a key rotation.
        #[arg(long = "pubkey", required = true)]
        pubkeys: Vec<PathBuf>,
        /// The signed manifest [default: MODEL.manifest.json beside the model].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Also load the model with tract and run the manifest's self-test.
        #[arg(long)]
        self_test: bool,
        /// Print the manifest as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Print the inputs and outputs tract reads from an ONNX file.
    Inspect {
        /// The ONNX model file.
        model: PathBuf,
    },
    /// The server's registry (online): push, list, show, delete.
    #[command(flatten)]
    Registry(online::RegistryCommand),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model(ModelCommand::Registry(command)) => online::registry(command, &cli.server)?,
        Command::Device(command) => online::device(command, &cli.server)?,
        Command::Rollout(command) => rollout::rollout(command, &cli.server)?,
        Command::Audit { rollout, limit } => {
            rollout::audit(rollout.as_deref(), limit, &cli.server)?
        }
        Command::Telemetry { model } => online::telemetry(&model, &cli.server)?,
        Command::Drift { model, label } => online::drift(&model, label.as_deref(), &cli.server)?,
        Command::Keys(KeysCommand::Gen { out, name }) => {
            let key = keyfile::generate(&out, name.file_stem())?;
            println!("key id   {}", key.key_id);
            println!(
                "private  {} (mode 0600: keep it offline)",
                key.private_path.display()
            );
            println!("public   {}", key.public_path.display());
        }
        Command::Keys(KeysCommand::Id { path }) => {
            let public = match keyfile::read_verifying_key(&path) {
                Ok(public) => public,
                Err(_) => keyfile::read_signing_key(&path)
                    .with_context(|| {
                        format!("{} is neither a public nor a private key", path.display())
                    })?
                    .verifying_key(),
            };
            println!("{}", KeyId::of(&public));
        }
        Command::Model(ModelCommand::Sign {
            model,
            name,
            version,
            key,
            release: release_counter,
            self_test,
            profile: profile_path,
            min_agent_version,
            out,
            force,
        }) => {
            let signing_key = keyfile::read_signing_key(&key)?;
            let out = out.unwrap_or_else(|| release::default_manifest_path(&model));
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; pass --force to replace it",
                    out.display()
                );
            }
            let created_at_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_millis() as i64;
            eprintln!("reading {} with tract…", model.display());
            let signed = release::sign_model(
                &release::SignRequest {
                    model,
                    name,
                    version,
                    release: release_counter,
                    self_test,
                    profile: profile_path,
                    min_agent_version,
                    created_at_ms,
                },
                &signing_key,
            )?;
            if signed.synthetic_self_test {
                eprintln!(
                    "warning: no --self-test case given; the self-test uses synthetic inputs \
                     (real inputs make a stronger check)"
                );
            }
            release::write_envelope(&out, &signed.envelope, force)?;
            print_summary(&signed.manifest, &signed.envelope.key_id);
            println!("wrote {}", out.display());
        }
        Command::Model(ModelCommand::Verify {
            model,
            pubkeys,
            manifest,
            self_test,
            json,
        }) => {
            let trusted = pubkeys
                .iter()
                .map(|p| keyfile::read_verifying_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let manifest_path = manifest.unwrap_or_else(|| release::default_manifest_path(&model));
            let verified = release::verify_model(&model, &manifest_path, &trusted, self_test)
                .with_context(|| format!("{} did not verify", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verified.manifest)?);
            } else {
                print_summary(&verified.manifest, &verified.envelope.key_id);
                println!(
                    "ok: signature, size and sha256 verified{}",
                    if self_test { ", self-test passed" } else { "" }
                );
            }
        }
        Command::Profile(ProfileCommand::Build {
            model,
            data,
            holdout,
            out,
            scale,
            seed,
            bootstrap,
            force,
        }) => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; pass --force to replace it",
                    out.display()
                );
            }
            let mut request = profile::BuildRequest::new(model, data, holdout);
            request.scale = scale;
            request.seed = seed;
            request.bootstrap = bootstrap;
            let built = profile::build_profile(&request, &mut |line| eprintln!("{line}"))?;
            let bytes = profile::profile_bytes(&built);
            edge_agent::fsutil::atomic_write(&out, &bytes)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{} features{}, windows {:?}, CUSUM h {:.3}",
                built.features.len(),
                if built.prediction.is_some() {
                    " + prediction"
                } else {
                    ""
                },
                built.windows,
                built.cusum.h
            );
            println!(
                "wrote {} (sha256 {})",
                out.display(),
                fleet_protocol::Sha256Digest::of(&bytes)
            );
        }
        Command::Model(ModelCommand::Inspect { model }) => {
            let onnx = std::fs::read(&model).with_context(|| model.display().to_string())?;
            let signature =
                edge_agent::runtime::inspect(&onnx).with_context(|| model.display().to_string())?;
            for (kind, specs) in [("input", &signature.inputs), ("output", &signature.outputs)] {
                for spec in specs {
                    println!(
                        "{kind:<7} {:<20} {:<6} {}",
                        spec.name,
                        spec.datatype,
                        spec.shape_display()
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_summary(manifest: &fleet_protocol::Manifest, key_id: &KeyId) {
    println!(
        "model    {} {} (release {})",
        manifest.name, manifest.version, manifest.release
    );
    println!(
        "artifact {} bytes, sha256 {}",
        manifest.size, manifest.sha256
    );
    for spec in &manifest.inputs {
        println!(
            "input    {} {} {}",
            spec.name,
            spec.datatype,
            spec.shape_display()
        );
    }
    for spec in &manifest.outputs {
        println!(
            "output   {} {} {}",
            spec.name,
            spec.datatype,
            spec.shape_display()
        );
    }
    if let Some(digest) = &manifest.profile_sha256 {
        println!("profile  sha256 {digest}");
    }
    println!("signed   by key {key_id}");
}
