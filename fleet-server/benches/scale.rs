//! Scale-out benchmark (issue 10): thousands of simulated devices on one Mosquitto, the fleet
//! server as real processes on PostgreSQL.
//!
//! ```text
//! cargo bench -p fleet-server --bench scale                       # 10,000 devices
//! cargo bench -p fleet-server --bench scale -- --devices 1000 --ingest-secs 10
//! ```
//!
//! Needs `mosquitto` on the PATH (or `$MOSQUITTO`) and a PostgreSQL role that may create
//! databases (`--postgres URL`, else `$DRIFTGATE_TEST_POSTGRES_URL`, else the one `.ci/run`
//! creates).
//!
//! 1. A fresh database; `fleet-server init`; Mosquitto from the repository's template
//!    (mutual TLS for devices, a password listener for the servers); replica `r1` as a
//!    process (`fleet-server run --replica r1`, engine tick `--tick-ms`).
//! 2. digits-mlp v1–v3 signed and pushed with `fleetctl`; the devices enrolled through the
//!    REST API (a certificate from the device CA each).
//! 3. One simulated device per enrollment (`fleet_server::sim`), all in this process: a real
//!    MQTT session over mutual TLS with its own certificate, real signature checks of every
//!    directive and manifest, state reports, telemetry batches acked by the server; 1 % of
//!    them run digits-mlp v1 with tract each interval and report measured latencies. Printed:
//!    the time until every device is connected and subscribed.
//! 4. v1 to every device (one stage), then the timed rollout of v2 in three stages
//!    (10 % → 50 % → 100 %, zero soak, gates on installs only): the time from its creation
//!    until it is completed and every device reports v2 (target ≤ 60 s), and the server's CPU
//!    and RSS meanwhile.
//! 5. Ingest: every device uploads a batch of `--batch-items` telemetry items each second,
//!    waiting for the ack of one before the next, as the agent's uplink does (so the offered
//!    load follows what the server stores). Items stored per second over `--ingest-secs`,
//!    first with `r1` alone, then with replica `r2` started beside it (shared subscriptions
//!    spread the devices' batches); the ratio of the two is printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use driftgate_tests::{free_port, Process};
use fleet_protocol::Topics;
use fleet_server::client::ApiClient;
use fleet_server::fleet::Bundle;
use fleet_server::sim::{sign_versions, start_devices, Launch, SimConfig, SimInference, SimStats};
use serde_json::{json, Value};

const MODEL: &str = "digits-mlp";
const CONVERGE_TARGET: Duration = Duration::from_secs(60);

struct Args {
    devices: usize,
    connect_concurrency: usize,
    tick_ms: u64,
    batch_items: usize,
    ingest_secs: u64,
    postgres: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        devices: 10_000,
        connect_concurrency: 64,
        tick_ms: 200,
        batch_items: 20,
        ingest_secs: 20,
        postgres: std::env::var("DRIFTGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://driftgate:driftgate@127.0.0.1:5432/postgres".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |default: u64| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        };
        match arg.as_str() {
            "--devices" => args.devices = number(args.devices as u64) as usize,
            "--connect-concurrency" => {
                args.connect_concurrency = number(args.connect_concurrency as u64) as usize
            }
            "--tick-ms" => args.tick_ms = number(args.tick_ms),
            "--batch-items" => args.batch_items = number(args.batch_items as u64) as usize,
            "--ingest-secs" => args.ingest_secs = number(args.ingest_secs),
            "--postgres" => {
                if let Some(url) = it.next() {
                    args.postgres = url;
                }
            }
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    args
}

/// CPU seconds (user + system) and resident KiB of a process, from /proc.
fn cpu_and_rss(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks / hz, rss))
}

/// What a process used over a phase.
struct Usage {
    cpu_start: f64,
    wall_start: Instant,
}

impl Usage {
    fn start(pid: u32) -> Usage {
        Usage {
            cpu_start: cpu_and_rss(pid).map_or(0.0, |(cpu, _)| cpu),
            wall_start: Instant::now(),
        }
    }

    /// "N % of a core, RSS M MiB".
    fn report(&self, pid: u32) -> String {
        match cpu_and_rss(pid) {
            Some((cpu, rss)) => format!(
                "{:.0} % of a core, RSS {:.0} MiB",
                100.0 * (cpu - self.cpu_start) / self.wall_start.elapsed().as_secs_f64(),
                rss as f64 / 1024.0
            ),
            None => "gone".into(),
        }
    }
}

fn bin(name: &str) -> PathBuf {
    match name {
        "fleet-server" => PathBuf::from(env!("CARGO_BIN_EXE_fleet-server")),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fleetctl")),
    }
}

fn run_ok(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh database on the PostgreSQL server `admin` names.
async fn fresh_database(admin: &str) -> Result<String> {
    sqlx::any::install_default_drivers();
    let name = format!("driftgate_scale_{}", std::process::id());
    let pool = sqlx::AnyPool::connect(admin)
        .await
        .with_context(|| format!("connecting to {admin} (--postgres URL)"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    Ok(format!("{base}/{name}"))
}

/// Mosquitto from the repository's template, for the server whose data dir `init` prepared.
struct Mosquitto {
    process: Process,
    port: u16,
    internal_port: u16,
    password_file: PathBuf,
}

fn start_mosquitto(work: &Path, data_dir: &Path) -> Result<Mosquitto> {
    use fleet_server::broker::{
        mosquitto_acl, mosquitto_password_line, render_mosquitto_config, MosquittoVars,
        MIN_PACKET_BYTES,
    };
    use std::os::unix::fs::PermissionsExt;
    // Mosquitto drops root for its own user before it reads certificates.
    let dir = work.join("mosquitto");
    std::fs::create_dir_all(&dir)?;
    for path in [work, data_dir, &data_dir.join("ca"), &dir] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    for file in ["server.pem", "server.key"] {
        std::fs::copy(data_dir.join("broker").join(file), dir.join(file))?;
    }
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let topics = Topics::default();
    std::fs::write(dir.join("acl"), mosquitto_acl(&topics))?;
    let password = format!("pw-{}", free_port());
    std::fs::write(
        dir.join("passwd"),
        mosquitto_password_line("driftgate-server", &password)? + "\n",
    )?;
    let password_file = work.join("server-broker.pass");
    std::fs::write(&password_file, &password)?;
    let (port, internal_port) = (free_port(), free_port());
    let vars = MosquittoVars {
        bind_address: "127.0.0.1".into(),
        port,
        internal_port,
        cafile: data_dir.join("ca/ca.pem"),
        certfile: dir.join("server.pem"),
        keyfile: dir.join("server.key"),
        crlfile: data_dir.join("ca/crl.pem"),
        aclfile: dir.join("acl"),
        server_password_file: dir.join("passwd"),
        topics,
        max_packet_bytes: MIN_PACKET_BYTES,
        persistence_dir: None,
    };
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, render_mosquitto_config(&vars))?;
    let mut process = Process::start(
        "mosquitto",
        Command::new(std::env::var("MOSQUITTO").unwrap_or_else(|_| "mosquitto".into()))
            .arg("-c")
            .arg(&conf),
        dir.join("mosquitto.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ![port, internal_port]
        .iter()
        .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
    {
        process.assert_running();
        if Instant::now() > deadline {
            bail!("Mosquitto did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Mosquitto {
        process,
        port,
        internal_port,
        password_file,
    })
}

/// A `fleet-server run --replica NAME` process.
struct Replica {
    process: Process,
    api: ApiClient,
    url: String,
    api_port: u16,
}

impl Replica {
    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// One sample of its `/metrics` (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = driftgate_tests::http_request(self.api_port, "GET", "/metrics", &[], &[]);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn items_stored(&self) -> u64 {
        self.metric("driftgate_server_items_stored_total") as u64
    }

    /// Rollout engine steps so far and the seconds they took.
    fn engine_steps(&self) -> (f64, f64) {
        (
            self.metric("driftgate_server_rollout_step_seconds_count"),
            self.metric("driftgate_server_rollout_step_seconds_sum"),
        )
    }
}

/// Where the machine's CPU went over a phase: the server, PostgreSQL (all its processes),
/// Mosquitto and the simulated devices (this process), in CPU seconds from /proc.
struct MachineUsage {
    servers: Vec<u32>,
    mosquitto: u32,
    wall_start: Instant,
    start: [f64; 4],
}

impl MachineUsage {
    fn start(servers: &[&Replica], mosquitto: u32) -> MachineUsage {
        let servers: Vec<u32> = servers.iter().map(|r| r.pid()).collect();
        MachineUsage {
            start: Self::sample(&servers, mosquitto),
            servers,
            mosquitto,
            wall_start: Instant::now(),
        }
    }

    fn sample(servers: &[u32], mosquitto: u32) -> [f64; 4] {
        let cpu = |pid: u32| cpu_and_rss(pid).map_or(0.0, |(cpu, _)| cpu);
        let postgres: f64 = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "postgres")
            })
            .map(cpu)
            .sum();
        let servers = servers.iter().map(|&pid| cpu(pid)).sum();
        [servers, postgres, cpu(mosquitto), cpu(std::process::id())]
    }

    /// "servers N %, PostgreSQL N %, Mosquitto N %, devices N % (of a core each)". A PostgreSQL
    /// backend that exits during the phase takes its CPU time with it; the servers' pools keep
    /// their connections open, so the figure is close.
    fn report(&self) -> String {
        let now = Self::sample(&self.servers, self.mosquitto);
        let wall = self.wall_start.elapsed().as_secs_f64();
        let share = |i: usize| 100.0 * (now[i] - self.start[i]).max(0.0) / wall;
        format!(
            "CPU: server{} {:.0} %, PostgreSQL {:.0} %, Mosquitto {:.0} %, devices {:.0} % (100 % = one core)",
            if self.servers.len() > 1 { "s" } else { "" },
            share(0),
            share(1),
            share(2),
            share(3)
        )
    }
}

struct Cluster {
    work: PathBuf,
    data_dir: PathBuf,
    database: String,
    mosquitto: Mosquitto,
    release_pub: PathBuf,
    tick_ms: u64,
    token: String,
}

impl Cluster {
    fn start_replica(&self, name: &str) -> Result<Replica> {
        let api_port = free_port();
        let config = self.work.join(format!("server-{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\ndatabase = {:?}\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\
                 [broker]\nexternal = \"mqtt://127.0.0.1:{}\"\npassword_file = {:?}\n\
                 public_url = \"mqtts://localhost:{}\"\n[trust]\nrelease_keys = [{:?}]\n\
                 [rollouts]\ntick_ms = {}\n[cluster]\nreplica = \"{name}\"\n",
                self.data_dir,
                self.database,
                self.mosquitto.internal_port,
                self.mosquitto.password_file,
                self.mosquitto.port,
                self.release_pub,
                self.tick_ms,
            ),
        )?;
        let mut process = Process::start(
            "fleet-server",
            Command::new(bin("fleet-server"))
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
            self.work.join(format!("server-{name}.log")),
        );
        let endpoints = self.data_dir.join(format!("endpoints-{name}.json"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            process.assert_running();
            let pid = std::fs::read(&endpoints)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["pid"].as_u64());
            if pid == Some(u64::from(process.child.id())) {
                break;
            }
            if Instant::now() > deadline {
                bail!("replica {name} did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let url = format!("http://127.0.0.1:{api_port}");
        Ok(Replica {
            process,
            api: ApiClient::new(&url, Some(self.token.clone())),
            url,
            api_port,
        })
    }
}

/// Enrolls `count` devices through the API on a few threads; returns their bundles.
fn enroll(api: &ApiClient, count: usize) -> Result<Vec<Bundle>> {
    let started = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let threads = 4;
    let bundles: Vec<Result<Vec<Bundle>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let done = &done;
                scope.spawn(move || -> Result<Vec<Bundle>> {
                    let mut out = Vec::new();
                    for i in (t..count).step_by(threads) {
                        let reply = api
                            .post_json(
                                "/api/v1/devices",
                                &json!({"id": format!("sim-{i:05}"), "labels": {"fleet": "sim"}}),
                            )
                            .with_context(|| format!("enrolling sim-{i:05}"))?;
                        out.push(serde_json::from_value(reply["bundle"].clone())?);
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_multiple_of(1000) {
                            eprintln!(
                                "  enrolled {n}/{count} ({:.0} s)",
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("an enrolling thread panicked"))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(count);
    for part in bundles {
        all.extend(part?);
    }
    Ok(all)
}

/// Polls `probe` every 500 ms until it gives a value, printing `describe()` every 2 s.
fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> Result<T> {
    let started = Instant::now();
    let mut printed = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?} ({})", describe());
        }
        if printed.elapsed() >= Duration::from_secs(2) {
            printed = Instant::now();
            eprintln!("  {what}: {}", describe());
        }
        // Twice a second: the figures are seconds, and every look costs the server.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Devices the fleet overview counts running `version` of the model.
fn running(api: &ApiClient, version: &str) -> u64 {
    let Ok(fleet) = api.get("/api/v1/fleet") else {
        return 0;
    };
    fleet["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["model"] == MODEL))
        .and_then(|m| m["running"][version].as_u64())
        .unwrap_or(0)
}

/// Creates a rollout of `version` to every simulated device in `stages` (percent, zero soak,
/// installs-only gates) and waits until it completed and every device reports `version`.
fn rollout(server: &Replica, version: &str, stages: &[f64], devices: usize) -> Result<Duration> {
    let api = &server.api;
    let stages: Vec<Value> = stages
        .iter()
        .map(|p| json!({"size": {"percent": p}, "soak_secs": 0}))
        .collect();
    let started = Instant::now();
    let created = api.post_json(
        "/api/v1/rollouts",
        &json!({
            "model": MODEL, "version": version,
            "selector": {"fleet": "sim"},
            "stages": stages,
            "gates": {"min_install_success_pct": 100.0, "max_error_rate_pct": null,
                      "max_p95_ratio": null, "max_drift_score": null, "min_devices_reporting": 0},
            "install_timeout_secs": 600
        }),
    )?;
    let id = created["rollout"]["id"]
        .as_str()
        .context("the rollout has no id")?
        .to_string();
    // The list's one-line summaries: the rollout itself lists every device, and fetching
    // that twice a second would load the server as much as what is measured.
    let phase = || {
        api.get(&format!("/api/v1/rollouts?model={MODEL}"))
            .ok()
            .and_then(|list| {
                list["rollouts"]
                    .as_array()?
                    .iter()
                    .find(|r| r["id"] == id.as_str())?["phase"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    wait_until(
        &format!("rollout of {version}"),
        Duration::from_secs(900),
        || {
            let phase = phase();
            if phase != "running" && phase != "completed" && !phase.is_empty() {
                return Some(Err(anyhow::anyhow!(
                    "the rollout of {version} ended {phase}"
                )));
            }
            (phase == "completed" && running(api, version) == devices as u64).then_some(Ok(()))
        },
        || {
            format!(
                "{}, {}/{devices} devices report {version} (directives published {:.0}, states stored {:.0})",
                phase(),
                running(api, version),
                server.metric("driftgate_server_directives_published_total"),
                server.metric("driftgate_server_states_stored_total"),
            )
        },
    )??;
    Ok(started.elapsed())
}

/// Items stored per second by `replicas` over `secs`, after a warm-up.
/// Also returns where the machine's CPU went meanwhile.
fn ingest_rate(replicas: &[&Replica], secs: u64, mosquitto: u32) -> (f64, Vec<String>, String) {
    // The warm-up lets the backlog queued for the replicas before this phase drain (a replica
    // that just joined gets only new messages).
    std::thread::sleep(Duration::from_secs(15));
    let stored = || replicas.iter().map(|r| r.items_stored()).sum::<u64>();
    let duplicates = || {
        replicas
            .iter()
            .map(|r| r.metric("driftgate_server_items_duplicate_total"))
            .sum::<f64>()
    };
    let duplicates_before = duplicates();
    let usage: Vec<Usage> = replicas.iter().map(|r| Usage::start(r.pid())).collect();
    let machine = MachineUsage::start(replicas, mosquitto);
    let (before, started) = (stored(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let rate = (stored() - before) as f64 / started.elapsed().as_secs_f64();
    let reports = replicas
        .iter()
        .zip(&usage)
        .map(|(r, u)| u.report(r.pid()))
        .collect();
    let machine = format!(
        "{}; {:.0} items received again (resent) meanwhile",
        machine.report(),
        duplicates() - duplicates_before
    );
    (rate, reports, machine)
}

fn main() -> Result<()> {
    let args = parse_args();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let fd_limit = fleet_server::sim::raise_fd_limit(args.devices as u64 + 1024)?;
    if fd_limit < args.devices as u64 + 256 {
        bail!(
            "{} devices need about {} open files and the limit is {fd_limit}: raise it (ulimit -Hn)",
            args.devices,
            args.devices + 256
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "scale benchmark: {} simulated devices on one Mosquitto, fleet-server replicas on PostgreSQL; {cores} cores, engine tick {} ms",
        args.devices, args.tick_ms
    );

    let work = tempfile::tempdir()?;
    let work = work.path();
    let signed = sign_versions(
        &driftgate_tests::workspace_root().join("models"),
        MODEL,
        work,
        2,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let database = rt.block_on(fresh_database(&args.postgres))?;
    let data_dir = work.join("server");
    run_ok(
        Command::new(bin("fleet-server"))
            .args(["init", "--data-dir"])
            .arg(&data_dir)
            .args(["--database", &database]),
    )?;
    let mosquitto = start_mosquitto(work, &data_dir)?;
    let token = run_ok(
        Command::new(bin("fleet-server"))
            .args(["token", "create", "--role", "admin", "--data-dir"])
            .arg(&data_dir)
            .args(["--database", &database]),
    )?
    .trim()
    .to_string();
    let cluster = Cluster {
        work: work.to_path_buf(),
        data_dir: data_dir.clone(),
        database,
        mosquitto,
        release_pub: work.join("keys/release.pub"),
        tick_ms: args.tick_ms,
        token,
    };
    let r1 = cluster.start_replica("r1")?;
    let url = r1.url.clone();
    for s in &signed {
        let manifest = work.join(format!("{MODEL}-{}.manifest.json", s.version));
        std::fs::write(&manifest, &s.manifest_bytes)?;
        run_ok(
            Command::new(bin("fleetctl"))
                .args(["--server", &url, "--token", &cluster.token, "model", "push"])
                .arg(&s.model)
                .arg("--manifest")
                .arg(&manifest),
        )?;
    }

    let started = Instant::now();
    let bundles = enroll(&r1.api, args.devices)?;
    println!(
        "  enrolled {} devices through the API in {:.1} s",
        args.devices,
        started.elapsed().as_secs_f64()
    );

    // The simulated devices, all in this process.
    let stats = Arc::new(SimStats::default());
    // 1 % of the devices run digits-mlp v1 with tract each interval (10 runs) and report the
    // latencies they measured.
    let models = driftgate_tests::workspace_root().join("models").join(MODEL);
    let inference = Arc::new(SimInference::load(
        &models.join("v1.onnx"),
        &models.join("v1.selftest.json"),
        10,
    )?);
    let started = Instant::now();
    start_devices(
        rt.handle(),
        &bundles,
        Launch {
            host: "localhost",
            port: cluster.mosquitto.port,
            topics: Topics::default(),
            config: SimConfig {
                telemetry_every: Some(Duration::from_secs(1)),
                items_per_batch: args.batch_items,
                // Longer than a batch waits at saturation (one batch of each of 10,000
                // devices queued at a few hundred batches a second is 20-odd seconds): a
                // device that resent sooner would have the servers store duplicates, and the
                // figure would be of resends, not of storing.
                ack_timeout: Duration::from_secs(60),
            },
            connect_concurrency: args.connect_concurrency,
            inference: Some((inference, args.devices / 100)),
        },
        &stats,
    )?;
    let connected = || stats.connected.load(Ordering::Relaxed) as usize;
    wait_until(
        "connecting",
        Duration::from_secs(900),
        || (connected() == args.devices).then_some(()),
        || {
            format!(
                "{}/{} connected and subscribed ({} connection errors)",
                connected(),
                args.devices,
                stats.link_errors.load(Ordering::Relaxed)
            )
        },
    )?;
    let connect_time = started.elapsed();
    println!(
        "  connected all {} devices (mutual TLS, subscribed) in {:.1} s, {} at a time; {} connection errors",
        args.devices,
        connect_time.as_secs_f64(),
        args.connect_concurrency,
        stats.link_errors.load(Ordering::Relaxed)
    );

    let mosquitto_pid = cluster.mosquitto.process.child.id();
    // Where the time of a rollout goes: the engine's steps, and the machine's CPU by process.
    let phase_details = |steps_before: (f64, f64), machine: &MachineUsage| {
        let steps = r1.engine_steps();
        let count = steps.0 - steps_before.0;
        format!(
            "    {count:.0} engine steps, {:.0} ms each on average; {}",
            1000.0 * (steps.1 - steps_before.1) / count.max(1.0),
            machine.report()
        )
    };
    let (usage, machine, steps) = (
        Usage::start(r1.pid()),
        MachineUsage::start(&[&r1], mosquitto_pid),
        r1.engine_steps(),
    );
    let first = rollout(&r1, "v1", &[100.0], args.devices)?;
    println!(
        "  v1 to every device (one stage): {:.1} s; server {}\n{}",
        first.as_secs_f64(),
        usage.report(r1.pid()),
        phase_details(steps, &machine)
    );
    let (usage, machine, steps) = (
        Usage::start(r1.pid()),
        MachineUsage::start(&[&r1], mosquitto_pid),
        r1.engine_steps(),
    );
    let applied_before = stats.applied.load(Ordering::Relaxed);
    let converged = rollout(&r1, "v2", &[10.0, 50.0, 100.0], args.devices)?;
    println!(
        "  v2 in stages 10 % → 50 % → 100 %, zero soak: converged in {:.1} s (target ≤ {} s) {}; {} directives applied; server {}\n{}",
        converged.as_secs_f64(),
        CONVERGE_TARGET.as_secs(),
        if converged <= CONVERGE_TARGET { "ok" } else { "OVER" },
        stats.applied.load(Ordering::Relaxed) - applied_before,
        usage.report(r1.pid()),
        phase_details(steps, &machine)
    );
    let refused = stats.refused.load(Ordering::Relaxed);
    if refused > 0 {
        bail!("the simulated devices refused {refused} directives");
    }

    // Ingest: one replica, then two, twice over (r2 stopped in between), so that a drift of
    // the machine over the run does not pass for the replicas' doing.
    stats.uplink_on.store(true, Ordering::Relaxed);
    let (mut ones, mut twos) = (Vec::new(), Vec::new());
    for round in 1..=2 {
        let (one, usage_one, machine) = ingest_rate(&[&r1], args.ingest_secs, mosquitto_pid);
        println!(
            "  ingest {round}, replica r1 alone: {one:.0} items/s ({} items per batch, one batch in flight per device); r1 {}\n    {machine}",
            args.batch_items, usage_one[0]
        );
        let r2 = cluster.start_replica("r2")?;
        let (two, usage_two, machine) = ingest_rate(&[&r1, &r2], args.ingest_secs, mosquitto_pid);
        println!(
            "  ingest {round}, replicas r1 + r2: {two:.0} items/s; r1 {}, r2 {}\n    {machine}",
            usage_two[0], usage_two[1]
        );
        let stopping = Instant::now();
        r2.process.stop(Duration::from_secs(10));
        println!(
            "    r2 stopped (SIGTERM) in {:.1} s",
            stopping.elapsed().as_secs_f64()
        );
        ones.push(one);
        twos.push(two);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (one, two) = (mean(&ones), mean(&twos));
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{lo:.0}–{hi:.0}")
    };
    let (spread_one, spread_two) = (spread(&ones), spread(&twos));
    stats.uplink_on.store(false, Ordering::Relaxed);
    let mosquitto_usage = cpu_and_rss(mosquitto_pid)
        .map(|(cpu, rss)| format!("{cpu:.0} CPU s in all, RSS {:.0} MiB", rss as f64 / 1024.0))
        .unwrap_or_default();
    println!(
        "\nsummary ({} devices, {cores} cores, one machine for everything):\n  connect {:.1} s; converge {:.1} s (target ≤ 60 s); ingest {one:.0} items/s with one replica ({spread_one}), {two:.0} with two ({spread_two}): ratio {:.2}\n  Mosquitto: {mosquitto_usage}; items acked to the devices: {}; batches sent: {}",
        args.devices,
        connect_time.as_secs_f64(),
        converged.as_secs_f64(),
        two / one.max(1.0),
        stats.items_acked.load(Ordering::Relaxed),
        stats.batches_sent.load(Ordering::Relaxed),
    );
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
