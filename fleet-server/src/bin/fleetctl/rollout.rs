//! `fleetctl rollout …` and `fleetctl audit`: staged rollouts from the command line.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::online::{ago, list, print_json, s, segment, split_model, table, ServerArgs};

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of MODEL@VERSION. Stages come from --stages or --ramp (or the
    /// whole request from --spec, a JSON file in the API's format); gates apply to every
    /// stage after its soak.
    ///
    /// Example: fleetctl rollout create digits-mlp@v2 --select site=berlin
    ///   --stages 10%,50%,100% --soak 300 --max-p95-ratio 1.3 --max-drift-score 1
    Create {
        /// MODEL@VERSION
        model: String,
        /// Only devices with this label, KEY=VALUE (repeatable: all must match).
        #[arg(long = "select")]
        selector: Vec<String>,
        /// Stages, comma-separated: a share ("10%") or a device count ("3"); the last must
        /// be 100%.
        #[arg(long, conflicts_with = "ramp", default_value = "10%,50%,100%")]
        stages: String,
        /// An exponential ramp instead: START×FACTOR, for example 1x3 (1, 3, 9, … devices, then
        /// everyone).
        #[arg(long)]
        ramp: Option<String>,
        /// Soak time of each stage, in seconds, counted once all its devices settled.
        #[arg(long, default_value_t = 300)]
        soak: u64,
        /// Spread each stage across this label's values (for example one canary per site).
        #[arg(long)]
        spread_label: Option<String>,
        /// What a failed gate does.
        #[arg(long, value_enum, default_value_t = OnFailure::Rollback)]
        on_failure: OnFailure,
        /// Gate: share of the stage's devices that installed, in percent.
        #[arg(long, default_value_t = 100.0)]
        min_install_success: f64,
        /// Gate: failed inferences on the new version, in percent (negative: no gate).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        max_error_rate: f64,
        /// Gate: p95 latency over the previous version's on the same devices (negative: no gate).
        #[arg(long, default_value_t = 1.5, allow_negative_numbers = true)]
        max_p95_ratio: f64,
        /// Gate: drift score of the merged drift windows (above 1: drifted); none by default.
        #[arg(long)]
        max_drift_score: Option<f64>,
        /// Gate: devices that must have sent telemetry for the version.
        #[arg(long, default_value_t = 1)]
        min_reporting: u64,
        /// A device not installed this many seconds after its directive counts as failed.
        #[arg(long, default_value_t = 600)]
        install_timeout: u64,
        /// Fail the rollout at once when more devices than this fail to install.
        #[arg(long, default_value_t = 0)]
        max_failed: u64,
        /// The whole request as a JSON file (the API's format); the other options are ignored.
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Rollouts, newest first.
    List {
        #[arg(long)]
        model: Option<String>,
        /// Only running, paused or rolling back ones.
        #[arg(long)]
        active: bool,
    },
    /// One rollout: stages, devices by outcome, gate evaluations with their figures.
    Show { id: String },
    /// Pause: nothing advances until resumed.
    Pause {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused rollout; its current stage soaks again before its gates.
    Resume {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout; devices keep the version they run.
    Abort {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put every device the rollout reached back on its previous version.
    Rollback {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Follow a rollout live: stage progress and every decision as it is made, until it
    /// finishes. Exits 0 when it completed, 1 when it was rolled back or aborted.
    Watch {
        id: String,
        /// Seconds between looks.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnFailure {
    Rollback,
    Pause,
}

/// Parses `10%,50%,100%` (shares) and `1,5,100%` (counts) into the API's stages.
fn parse_stages(text: &str, soak: u64) -> Result<Vec<Value>> {
    text.split(',')
        .map(str::trim)
        .map(|part| {
            let size = if let Some(p) = part.strip_suffix('%') {
                let p: f64 = p
                    .trim()
                    .parse()
                    .with_context(|| format!("stage {part:?}: not a percentage"))?;
                json!({"percent": p})
            } else {
                let n: u64 = part
                    .parse()
                    .with_context(|| format!("stage {part:?}: neither N% nor a device count"))?;
                json!({"count": n})
            };
            Ok(json!({"size": size, "soak_secs": soak}))
        })
        .collect()
}

fn parse_ramp(text: &str, soak: u64) -> Result<Value> {
    let (start, factor) = text
        .split_once(['x', 'X', '*'])
        .with_context(|| format!("--ramp {text:?}: expected STARTxFACTOR, for example 1x3"))?;
    let start: u64 = start
        .trim()
        .parse()
        .with_context(|| format!("--ramp {text:?}: start is not a count"))?;
    let factor: f64 = factor
        .trim()
        .parse()
        .with_context(|| format!("--ramp {text:?}: factor is not a number"))?;
    Ok(json!({"start": start, "factor": factor, "soak_secs": soak}))
}

fn optional(limit: f64) -> Value {
    if limit < 0.0 {
        Value::Null
    } else {
        json!(limit)
    }
}

pub fn rollout(command: RolloutCommand, args: &ServerArgs) -> Result<()> {
    let client = args.client()?;
    match command {
        RolloutCommand::Create {
            model,
            selector,
            stages,
            ramp,
            soak,
            spread_label,
            on_failure,
            min_install_success,
            max_error_rate,
            max_p95_ratio,
            max_drift_score,
            min_reporting,
            install_timeout,
            max_failed,
            spec,
        } => {
            let body = match spec {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("--spec {}", path.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("--spec {}: not JSON", path.display()))?
                }
                None => {
                    let (name, version) = split_model(&model)?;
                    let mut select = BTreeMap::new();
                    for s in &selector {
                        let (k, v) = s
                            .split_once('=')
                            .with_context(|| format!("--select {s:?}: expected KEY=VALUE"))?;
                        select.insert(k.to_string(), v.to_string());
                    }
                    let mut body = json!({
                        "model": name,
                        "version": version,
                        "selector": select,
                        "spread_label": spread_label,
                        "gates": {
                            "min_install_success_pct": min_install_success,
                            "max_error_rate_pct": optional(max_error_rate),
                            "max_p95_ratio": optional(max_p95_ratio),
                            "max_drift_score": max_drift_score,
                            "min_devices_reporting": min_reporting,
                        },
                        "on_failure": match on_failure {
                            OnFailure::Rollback => "rollback",
                            OnFailure::Pause => "pause",
                        },
                        "install_timeout_secs": install_timeout,
                        "max_failed_devices": max_failed,
                    });
                    match ramp {
                        Some(r) => body["ramp"] = parse_ramp(&r, soak)?,
                        None => body["stages"] = json!(parse_stages(&stages, soak)?),
                    }
                    body
                }
            };
            let response = client.post_json("/api/v1/rollouts", &body)?;
            if args.json {
                return print_json(&response);
            }
            let r = &response["rollout"];
            let sizes: Vec<String> = list(&response["spec"]["stages"])
                .iter()
                .map(|st| stage_size(&st["size"]))
                .collect();
            println!(
                "rollout {} started: {}@{} in {} stages ({})",
                s(&r["id"]),
                s(&r["model"]),
                s(&r["version"]),
                sizes.len(),
                sizes.join(", ")
            );
            println!("follow it with: fleetctl rollout watch {}", s(&r["id"]));
        }
        RolloutCommand::List { model, active } => {
            let mut path = format!("/api/v1/rollouts?active={active}");
            if let Some(m) = &model {
                path.push_str(&format!("&model={}", segment(m)?));
            }
            let response = client.get(&path)?;
            if args.json {
                return print_json(&response);
            }
            let rows: Vec<Vec<String>> = list(&response["rollouts"])
                .iter()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        format!("{}@{}", s(&r["model"]), s(&r["version"])),
                        s(&r["phase"]),
                        format!("{}/{}", s(&r["stage"]), s(&r["stages"])),
                        outcomes(&r["outcomes"]),
                        ago(&r["updated_at_ms"]),
                        s(&r["reason"]),
                    ]
                })
                .collect();
            table(
                &[
                    "id", "model", "phase", "stage", "devices", "updated", "reason",
                ],
                &rows,
            );
        }
        RolloutCommand::Show { id } => {
            let response = client.get(&format!("/api/v1/rollouts/{}", segment(&id)?))?;
            if args.json {
                return print_json(&response);
            }
            show(&response);
        }
        RolloutCommand::Pause { id, reason } => {
            command_rollout(&client, args, &id, "pause", reason)?
        }
        RolloutCommand::Resume { id, reason } => {
            command_rollout(&client, args, &id, "resume", reason)?
        }
        RolloutCommand::Abort { id, reason } => {
            command_rollout(&client, args, &id, "abort", reason)?
        }
        RolloutCommand::Rollback { id, reason } => {
            command_rollout(&client, args, &id, "rollback", reason)?
        }
        RolloutCommand::Watch { id, interval } => return watch(&client, &id, interval),
    }
    Ok(())
}

fn command_rollout(
    client: &fleet_server::client::ApiClient,
    args: &ServerArgs,
    id: &str,
    command: &str,
    reason: Option<String>,
) -> Result<()> {
    let body = match reason {
        Some(r) => json!({"reason": r}),
        None => json!({}),
    };
    let response = client.post_json(
        &format!("/api/v1/rollouts/{}/{command}", segment(id)?),
        &body,
    )?;
    if args.json {
        return print_json(&response);
    }
    let r = &response["rollout"];
    println!(
        "rollout {}: {} (stage {}/{})",
        s(&r["id"]),
        s(&r["phase"]),
        s(&r["stage"]),
        s(&r["stages"])
    );
    Ok(())
}

fn stage_size(size: &Value) -> String {
    if let Some(p) = size.get("percent") {
        format!("{}%", s(p))
    } else if let Some(n) = size.get("count") {
        format!("{} devices", s(n))
    } else {
        s(size)
    }
}

fn outcomes(o: &Value) -> String {
    let Some(map) = o.as_object() else {
        return "-".into();
    };
    if map.is_empty() {
        return "0".into();
    }
    map.iter()
        .map(|(k, v)| format!("{} {k}", s(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(response: &Value) {
    let r = &response["rollout"];
    println!(
        "rollout {}: {}@{} — {} at stage {}/{}{}",
        s(&r["id"]),
        s(&r["model"]),
        s(&r["version"]),
        s(&r["phase"]),
        s(&r["stage"]),
        s(&r["stages"]),
        r["reason"]
            .as_str()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default()
    );
    println!(
        "started by {} {}; devices: {}",
        s(&r["created_by"]),
        ago(&r["created_at_ms"]),
        outcomes(&r["outcomes"])
    );
    let spec = &response["spec"];
    let stages: Vec<String> = list(&spec["stages"])
        .iter()
        .map(|st| format!("{} soak {} s", stage_size(&st["size"]), s(&st["soak_secs"])))
        .collect();
    println!("stages: {}", stages.join(" → "));
    println!(
        "gates: {}; on failure: {}",
        gates_text(&spec["gates"]),
        s(&spec["on_failure"])
    );
    println!();
    let mut rows: Vec<Vec<String>> = response["devices"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(id, d)| {
                    vec![
                        id.clone(),
                        (d["stage"].as_u64().unwrap_or(0) + 1).to_string(),
                        s(&d["previous"]),
                        s(&d["outcome"]),
                        s(&d["directive_seq"]),
                        s(&d["reason"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort_by(|a, b| a[1].cmp(&b[1]).then(a[0].cmp(&b[0])));
    table(
        &[
            "device",
            "stage",
            "previous",
            "outcome",
            "directive",
            "reason",
        ],
        &rows,
    );
    for e in list(&response["evaluations"]) {
        println!();
        println!(
            "stage {} gates {} {}",
            e["stage"].as_u64().unwrap_or(0) + 1,
            if e["passed"].as_bool() == Some(true) {
                "PASSED"
            } else {
                "FAILED"
            },
            ago(&e["at_ms"])
        );
        let rows: Vec<Vec<String>> = list(&e["checks"])
            .iter()
            .map(|c| {
                vec![
                    s(&c["gate"]),
                    c["value"]
                        .as_f64()
                        .map(|v| format!("{v:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    s(&c["limit"]),
                    if c["passed"].as_bool() == Some(true) {
                        "ok".into()
                    } else {
                        "FAIL".into()
                    },
                    s(&c["note"]),
                ]
            })
            .collect();
        table(&["gate", "value", "limit", "verdict", "how"], &rows);
    }
}

fn gates_text(g: &Value) -> String {
    let mut parts = vec![format!("install ≥ {}%", s(&g["min_install_success_pct"]))];
    if !g["max_error_rate_pct"].is_null() {
        parts.push(format!("errors ≤ {}%", s(&g["max_error_rate_pct"])));
    }
    if !g["max_p95_ratio"].is_null() {
        parts.push(format!("p95 ≤ {}× previous", s(&g["max_p95_ratio"])));
    }
    if !g["max_drift_score"].is_null() {
        parts.push(format!("drift ≤ {}", s(&g["max_drift_score"])));
    }
    parts.push(format!("≥ {} reporting", s(&g["min_devices_reporting"])));
    parts.join(", ")
}

/// Polls the rollout and its audit entries; prints each new decision and, on a terminal, a
/// live progress line.
fn watch(client: &fleet_server::client::ApiClient, id: &str, interval: f64) -> Result<()> {
    if !(interval.is_finite() && interval > 0.0) {
        bail!("--interval must be above 0");
    }
    let tty = std::io::stdout().is_terminal();
    let mut after_id = 0i64;
    let mut last_progress = String::new();
    loop {
        let entries = client.get(&format!(
            "/api/v1/audit?rollout={}&after_id={after_id}",
            segment(id)?
        ))?;
        let response = client.get(&format!("/api/v1/rollouts/{}", segment(id)?))?;
        let new = list(&entries["entries"]);
        if tty && !new.is_empty() && !last_progress.is_empty() {
            print!("\r\x1b[2K");
        }
        for e in new {
            after_id = after_id.max(e["id"].as_i64().unwrap_or(after_id));
            println!(
                "{}  {:<20} {}",
                clock(&e["at_ms"]),
                s(&e["action"]),
                s(&e["message"])
            );
        }
        let r = &response["rollout"];
        let progress = progress_line(r);
        if tty {
            print!("\r\x1b[2K{progress}");
            std::io::stdout().flush().ok();
        } else if progress != last_progress {
            println!("{progress}");
        }
        last_progress = progress;
        match r["phase"].as_str() {
            Some("completed") => {
                if tty {
                    println!();
                }
                return Ok(());
            }
            Some("rolled_back") | Some("aborted") => {
                if tty {
                    println!();
                }
                std::process::exit(1);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

fn progress_line(r: &Value) -> String {
    let soak = match (r["soak_started_ms"].as_i64(), r["soak_secs"].as_u64()) {
        (Some(start), Some(total)) if r["phase"] == "running" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(start);
            let done = ((now - start).max(0) / 1000).min(total as i64);
            format!(" · soaking {done}/{total} s")
        }
        _ => String::new(),
    };
    format!(
        "[{}] stage {}/{} · {} devices: {}{soak}",
        s(&r["phase"]),
        s(&r["stage"]),
        s(&r["stages"]),
        s(&r["devices"]),
        outcomes(&r["outcomes"])
    )
}

fn clock(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "--:--:--".into();
    };
    let secs = ms.div_euclid(1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `fleetctl audit`: the newest `limit` entries of the audit log, oldest first.
pub fn audit(rollout: Option<&str>, limit: u32, args: &ServerArgs) -> Result<()> {
    let mut path = format!("/api/v1/audit?limit={limit}&newest=true");
    if let Some(r) = rollout {
        path.push_str(&format!("&rollout={}", segment(r)?));
    }
    let response = args.client()?.get(&path)?;
    if args.json {
        return print_json(&response);
    }
    let rows: Vec<Vec<String>> = list(&response["entries"])
        .iter()
        .map(|e| {
            vec![
                s(&e["id"]),
                ago(&e["at_ms"]),
                s(&e["actor"]),
                s(&e["action"]),
                s(&e["rollout"]),
                s(&e["message"]),
            ]
        })
        .collect();
    table(
        &["id", "when", "actor", "action", "rollout", "message"],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_ramps_parse() {
        let stages = parse_stages("1, 10%,100%", 30).unwrap();
        assert_eq!(stages[0]["size"], json!({"count": 1}));
        assert_eq!(stages[1]["size"], json!({"percent": 10.0}));
        assert_eq!(stages[2]["soak_secs"], 30);
        assert!(parse_stages("10%,half", 0).is_err());
        assert_eq!(
            parse_ramp("1x3", 5).unwrap(),
            json!({"start": 1, "factor": 3.0, "soak_secs": 5})
        );
        assert!(parse_ramp("13", 5).is_err());
    }
}
