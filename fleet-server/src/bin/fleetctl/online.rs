//! fleetctl's online commands: the REST API from the command line. Human tables by default,
//! the API's JSON with `--json`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fleet_server::client::ApiClient;
use serde_json::{json, Value};

/// Where the server is and who is asking.
#[derive(Args, Clone)]
pub struct ServerArgs {
    /// The server's URL [env DRIFTGATE_SERVER; default http://127.0.0.1:8480].
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// A bearer token [env DRIFTGATE_TOKEN].
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// fleetctl's config file [default ~/.config/driftgate/fleetctl.toml].
    #[arg(long, global = true)]
    pub client_config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ServerArgs {
    pub fn client(&self) -> Result<ApiClient> {
        Ok(ApiClient::resolve(
            self.server.clone(),
            self.token.clone(),
            self.client_config.as_deref(),
        )?)
    }
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Enroll a device and write its bundle (agent.toml, CA, certificate, key, trusted keys)
    /// into --out; then `edge-agent run --config OUT/agent.toml` on the device.
    Enroll {
        id: String,
        /// A label, KEY=VALUE (repeatable), for example --label site=berlin.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Directory to write the bundle into [default: ./ID].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The device's local inference API address, written into agent.toml.
        #[arg(long)]
        api_listen: Option<String>,
    },
    /// List devices.
    List,
    /// One device: labels, status, models, health, stored items.
    Show { id: String },
    /// Assign MODEL@VERSION to a device (publishes its signed directive).
    Assign { id: String, model: String },
    /// Remove a model from a device.
    Unassign { id: String, model: String },
    /// Revoke a device: dropped now and refused from then on.
    Revoke { id: String },
    /// A device's stored outbox items, oldest first.
    Items {
        id: String,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Upload a model with its signed manifest (and its reference profile when the manifest
    /// names one).
    Push {
        /// The ONNX file.
        model: PathBuf,
        /// The signed manifest [default: MODEL.manifest.json].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The reference profile the manifest names.
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// List model versions in the registry.
    List,
    /// One model version and its manifest (MODEL@VERSION).
    Show { model: String },
    /// Delete a model version (refused while a device is assigned it).
    Delete { model: String },
}

pub fn split_model(spec: &str) -> Result<(&str, &str)> {
    spec.split_once('@')
        .filter(|(m, v)| !m.is_empty() && !v.is_empty())
        .with_context(|| format!("{spec:?}: expected MODEL@VERSION, for example digits-mlp@v2"))
}

/// Path segments are validated by the server too; refusing here gives a clearer message.
pub fn segment(s: &str) -> Result<&str> {
    if s.is_empty() || s.contains(['/', '?', '#', '%']) || s == "." || s == ".." {
        bail!("{s:?} cannot be a name: no '/', '?', '#', '%', '.' or '..'");
    }
    Ok(s)
}

/// The array at `v`, or nothing when the server sent no array there.
pub fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

pub fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_ascii_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn ago(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(ms);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

pub fn device(command: DeviceCommand, args: &ServerArgs) -> Result<()> {
    let client = args.client()?;
    match command {
        DeviceCommand::Enroll {
            id,
            labels,
            out,
            api_listen,
        } => {
            let mut map = BTreeMap::new();
            for label in &labels {
                let (k, v) = label
                    .split_once('=')
                    .with_context(|| format!("--label {label:?}: expected KEY=VALUE"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let out = out.unwrap_or_else(|| PathBuf::from(&id));
            if out.join("agent.toml").exists() {
                bail!(
                    "{} already holds a bundle; choose another --out",
                    out.display()
                );
            }
            let body = json!({"id": id, "labels": map, "api_listen": api_listen});
            let response = client.post_json("/api/v1/devices", &body)?;
            write_bundle(&out, &response["bundle"])?;
            if args.json {
                print_json(&json!({"device": id, "bundle_dir": out}))?;
            } else {
                println!("enrolled {id}; bundle in {}", out.display());
                println!(
                    "on the device: edge-agent run --config {}",
                    out.join("agent.toml").display()
                );
            }
        }
        DeviceCommand::List => {
            let response = client.get("/api/v1/devices")?;
            if args.json {
                return print_json(&response);
            }
            let rows: Vec<Vec<String>> = list(&response["devices"])
                .iter()
                .map(|d| {
                    let labels = d["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", s(v)))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let models = d["state"]["models"]
                        .as_array()
                        .map(|ms| {
                            ms.iter()
                                .map(|m| {
                                    format!(
                                        "{}@{} ({})",
                                        s(&m["name"]),
                                        s(&m["active"]["version"]),
                                        s(&m["phase"]["phase"])
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_else(|| "-".into());
                    let status = if d["revoked_at_ms"].is_null() {
                        s(&d["presence"])
                    } else {
                        "revoked".into()
                    };
                    vec![
                        s(&d["id"]),
                        status,
                        ago(&d["presence_at_ms"]),
                        labels,
                        models,
                    ]
                })
                .collect();
            table(&["device", "status", "since", "labels", "models"], &rows);
        }
        DeviceCommand::Show { id } => {
            let response = client.get(&format!("/api/v1/devices/{}", segment(&id)?))?;
            if args.json {
                return print_json(&response);
            }
            let d = &response["device"];
            println!("device   {}", s(&d["id"]));
            println!("labels   {}", d["labels"]);
            println!(
                "status   {} ({}), agent {}",
                if d["revoked_at_ms"].is_null() {
                    s(&d["presence"])
                } else {
                    "revoked".into()
                },
                ago(&d["presence_at_ms"]),
                s(&d["agent_version"])
            );
            println!("directive seq {}", s(&d["directive_seq"]));
            for a in list(&response["assignments"]) {
                println!("assigned {}@{}", s(&a["model"]), s(&a["version"]));
            }
            for m in list(&d["state"]["models"]) {
                println!(
                    "model    {} active {} phase {}",
                    s(&m["name"]),
                    s(&m["active"]["version"]),
                    s(&m["phase"]["phase"])
                );
            }
            let h = &d["health"];
            if !h.is_null() {
                println!(
                    "health   cpu {:.0} %, mem {} / {} MiB, disk free {} MiB, agent RSS {} MiB ({})",
                    h["cpu_percent"].as_f64().unwrap_or(0.0),
                    h["mem_used_bytes"].as_u64().unwrap_or(0) >> 20,
                    h["mem_total_bytes"].as_u64().unwrap_or(0) >> 20,
                    h["disk_free_bytes"].as_u64().unwrap_or(0) >> 20,
                    h["agent_rss_bytes"].as_u64().unwrap_or(0) >> 20,
                    ago(&d["health_at_ms"])
                );
            }
            println!("items    {}", response["items"]);
        }
        DeviceCommand::Assign { id, model } => {
            let (name, version) = split_model(&model)?;
            let response = client.post_json(
                &format!("/api/v1/devices/{}/assign", segment(&id)?),
                &json!({"model": name, "version": version}),
            )?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "assigned {model} to {id} (directive {})",
                s(&response["directive_seq"])
            );
        }
        DeviceCommand::Unassign { id, model } => {
            let response = client.delete(&format!(
                "/api/v1/devices/{}/models/{}",
                segment(&id)?,
                segment(&model)?
            ))?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "removed {model} from {id} (directive {})",
                s(&response["directive_seq"])
            );
        }
        DeviceCommand::Revoke { id } => {
            let response = client.post_json(
                &format!("/api/v1/devices/{}/revoke", segment(&id)?),
                &json!({}),
            )?;
            if args.json {
                return print_json(&response);
            }
            println!("revoked {id}");
        }
        DeviceCommand::Items { id, kind, limit } => {
            let mut path = format!("/api/v1/devices/{}/items?limit={limit}", segment(&id)?);
            if let Some(kind) = &kind {
                path.push_str(&format!("&kind={}", segment(kind)?));
            }
            let response = client.get(&path)?;
            if args.json {
                return print_json(&response);
            }
            let rows: Vec<Vec<String>> = list(&response["items"])
                .iter()
                .map(|i| {
                    vec![
                        s(&i["id"]),
                        s(&i["kind"]),
                        ago(&i["at_ms"]),
                        s(&i["model"]),
                        s(&i["release"]),
                    ]
                })
                .collect();
            table(&["id", "kind", "at", "model", "release"], &rows);
        }
    }
    Ok(())
}

fn write_bundle(out: &Path, bundle: &Value) -> Result<()> {
    let bundle: fleet_server::fleet::Bundle = serde_json::from_value(bundle.clone())
        .context("the server's bundle is not what fleetctl expects")?;
    bundle
        .write_to(out)
        .with_context(|| format!("writing the bundle into {}", out.display()))
}

pub fn registry(command: RegistryCommand, args: &ServerArgs) -> Result<()> {
    let client = args.client()?;
    match command {
        RegistryCommand::Push {
            model,
            manifest,
            profile,
        } => {
            let manifest =
                manifest.unwrap_or_else(|| fleet_server::release::default_manifest_path(&model));
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
            let mut last_line = 0u64;
            let response =
                client.push_model(&manifest, &model, profile.as_deref(), &mut |sent, total| {
                    match &bar {
                        Some(bar) => {
                            bar.set_length(total);
                            bar.set_position(sent);
                        }
                        None => {
                            // Not a terminal: a line per 10 %.
                            let tenth = sent * 10 / total.max(1);
                            if tenth > last_line {
                                last_line = tenth;
                                eprintln!("uploaded {sent} of {total} bytes");
                            }
                        }
                    }
                });
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let response = response?;
            if args.json {
                return print_json(&response);
            }
            let m = &response["model"];
            println!(
                "{} {}@{} (release {}, {} bytes, sha256 {})",
                if response["stored"].as_bool() == Some(true) {
                    "pushed"
                } else {
                    "already present:"
                },
                s(&m["name"]),
                s(&m["version"]),
                s(&m["release"]),
                s(&m["size"]),
                s(&m["sha256"])
            );
        }
        RegistryCommand::List => {
            let response = client.get("/api/v1/models")?;
            if args.json {
                return print_json(&response);
            }
            let rows: Vec<Vec<String>> = list(&response["models"])
                .iter()
                .map(|m| {
                    vec![
                        s(&m["name"]),
                        s(&m["version"]),
                        s(&m["release"]),
                        s(&m["size"]),
                        s(&m["sha256"]).chars().take(12).collect(),
                        if m["profile_sha256"].is_null() {
                            "no".into()
                        } else {
                            "yes".into()
                        },
                        ago(&m["pushed_at_ms"]),
                    ]
                })
                .collect();
            table(
                &[
                    "model", "version", "release", "bytes", "sha256", "profile", "pushed",
                ],
                &rows,
            );
        }
        RegistryCommand::Show { model } => {
            let (name, version) = split_model(&model)?;
            let response = client.get(&format!(
                "/api/v1/models/{}/{}",
                segment(name)?,
                segment(version)?
            ))?;
            print_json(&response)?;
        }
        RegistryCommand::Delete { model } => {
            let (name, version) = split_model(&model)?;
            client.delete(&format!(
                "/api/v1/models/{}/{}",
                segment(name)?,
                segment(version)?
            ))?;
            if !args.json {
                println!("deleted {model}");
            }
        }
    }
    Ok(())
}

/// `fleetctl telemetry MODEL@VERSION`.
pub fn telemetry(model: &str, args: &ServerArgs) -> Result<()> {
    let (name, version) = split_model(model)?;
    let response = args.client()?.get(&format!(
        "/api/v1/models/{}/{}/telemetry",
        segment(name)?,
        segment(version)?
    ))?;
    if args.json {
        return print_json(&response);
    }
    let t = &response["totals"];
    println!(
        "{model}: {} inferences on {} devices, errors {}, latency p50 {} µs p95 {} µs p99 {} µs",
        s(&t["inferences"]),
        s(&t["devices"]),
        t["errors"],
        fmt_us(&t["p50_us"]),
        fmt_us(&t["p95_us"]),
        fmt_us(&t["p99_us"])
    );
    let rows: Vec<Vec<String>> = list(&response["series"])
        .iter()
        .map(|r| {
            vec![
                s(&r["device"]),
                ago(&r["at_ms"]),
                s(&r["inferences"]),
                r["errors"].to_string(),
                fmt_us(&r["p50_us"]),
                fmt_us(&r["p95_us"]),
            ]
        })
        .collect();
    table(
        &["device", "at", "inferences", "errors", "p50 µs", "p95 µs"],
        &rows,
    );
    Ok(())
}

fn fmt_us(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.0}"))
        .unwrap_or_else(|| "-".into())
}

/// `fleetctl drift MODEL@VERSION [--label KEY]`.
pub fn drift(model: &str, label: Option<&str>, args: &ServerArgs) -> Result<()> {
    let (name, version) = split_model(model)?;
    let mut path = format!(
        "/api/v1/models/{}/{}/drift",
        segment(name)?,
        segment(version)?
    );
    if let Some(label) = label {
        path.push_str(&format!("?label={}", segment(label)?));
    }
    let response = args.client()?.get(&path)?;
    if args.json {
        return print_json(&response);
    }
    let row = |d: &Value, who: String| {
        vec![
            who,
            s(&d["window_len"]),
            s(&d["windows"]),
            s(&d["flagged_windows"]),
            s(&d["samples"]),
            if d["drifted"].as_bool() == Some(true) {
                "DRIFT".into()
            } else {
                "ok".into()
            },
            format!("{:.2}", d["drifted_share"].as_f64().unwrap_or(0.0)),
            format!("{:.2}", d["max_score"].as_f64().unwrap_or(0.0)),
        ]
    };
    let header = [
        "device",
        "window",
        "windows",
        "flagged",
        "samples",
        "merged",
        "share",
        "max score",
    ];
    let rows: Vec<Vec<String>> = list(&response["devices"])
        .iter()
        .map(|d| row(d, s(&d["device"])))
        .collect();
    table(&header, &rows);
    if let Some(cohorts) = response["cohorts"].as_array().filter(|c| !c.is_empty()) {
        println!();
        let rows: Vec<Vec<String>> = cohorts
            .iter()
            .map(|c| row(c, format!("{}={}", s(&c["label"]), s(&c["value"]))))
            .collect();
        let mut header = header;
        header[0] = "cohort";
        table(&header, &rows);
    }
    Ok(())
}
