//! `fleet-server`: Driftgate's control plane. Parses arguments and calls the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fleet_server::auth::{self, Role};
use fleet_server::config::ServerConfig;
use fleet_server::server;

#[derive(Parser)]
#[command(name = "fleet-server", version, about = "Driftgate's fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: embedded broker (or an external one), store, ingest, REST API.
    Run(ConfigArgs),
    /// Create the data dir, fleet key, device CA, broker certificate and CRL (what `run` does
    /// on first start), print where, and exit: for configuring an external broker first.
    Init(ConfigArgs),
    /// Print the effective configuration (defaults filled in) and exit.
    CheckConfig(ConfigArgs),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The whole product on this machine: the server (embedded broker, SQLite), N local edge
    /// agents each with its own mTLS session, an app load of held-out digits, then digits-mlp
    /// v1 rolled out, v2 rolled out in gated stages, and the bad v3 stopped by its gates and
    /// rolled back; a summary per device. Keeps running until Ctrl-C, or exits with --once.
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// How many local agents (devices).
    #[arg(long, default_value_t = 5)]
    agents: usize,
    /// Exit after the summary: status 0 only if every step behaved as expected.
    #[arg(long)]
    once: bool,
    /// A new or empty directory for everything (default: one under the system's temp dir,
    /// removed at the end with --once).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The REST API's address (any free port when it is taken).
    #[arg(long, default_value = "127.0.0.1:8480")]
    api_listen: SocketAddr,
    /// The repository's models/ directory (sample models, profiles, held-out data).
    #[arg(long)]
    models: Option<PathBuf>,
    /// Soak time of each rollout stage, seconds.
    #[arg(long, default_value_t = 6)]
    soak: u64,
    /// The stages of v2's rollout, percent of the devices, comma-separated and ending with 100
    /// (v3's canary is the first of them).
    #[arg(long, value_delimiter = ',', default_value = "20,60,100")]
    stages: Vec<f64>,
    /// Application load per device, requests per second (16 held-out rows each).
    #[arg(long, default_value_t = 40)]
    rate: u32,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (shown once). Works before the first `run`, so the first
    /// admin token can be made on a fresh machine.
    Create {
        #[command(flatten)]
        config: ConfigArgs,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// A note on who or what uses it.
        #[arg(long, default_value = "")]
        name: String,
        /// Refuse the token after this long: 30m, 12h, 90d (at most 3650d). Default: never.
        #[arg(long, value_parser = auth::parse_lifetime)]
        expires_in: Option<std::time::Duration>,
    },
}

/// The configuration file and the flags that override it.
#[derive(Args, Clone)]
struct ConfigArgs {
    /// server.toml (every key optional; see `fleet_server::config` for the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the database, blobs, keys and CA live (default ./driftgate-server).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// sqlite://PATH or postgres://USER:PASS@HOST/DB (default SQLite in the data dir).
    #[arg(long)]
    database: Option<String>,
    /// Use this broker instead of the embedded one: mqtts://host:port or mqtt://host:port.
    #[arg(long)]
    broker: Option<String>,
    /// The server's password for an external broker, in a file (one line); its user name is
    /// broker.username (default driftgate-server).
    #[arg(long)]
    broker_password_file: Option<PathBuf>,
    /// The REST API's address (default 127.0.0.1:8480).
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// The embedded broker's device listener (default 0.0.0.0:8883).
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// What enrolled devices are told to connect to (default mqtts://localhost:PORT).
    #[arg(long)]
    public_broker_url: Option<String>,
    /// Trust manifests signed by this release public key (repeatable; adds to the file's).
    #[arg(long = "release-key")]
    release_keys: Vec<PathBuf>,
    /// Run as this replica of several (needs --database postgres://… and --broker; see
    /// docs/scale-out.md).
    #[arg(long)]
    replica: Option<String>,
    /// The leader lease of a replica, in seconds (default 6).
    #[arg(long)]
    lease_secs: Option<u64>,
}

impl ConfigArgs {
    fn load(&self) -> Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::load(path)?,
            None => {
                let mut c = ServerConfig::default();
                c.resolve_paths(Path::new("."));
                c
            }
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(db) = &self.database {
            config.database = Some(db.clone());
        }
        if let Some(url) = &self.broker {
            config.broker.external = Some(url.clone());
        }
        if let Some(path) = &self.broker_password_file {
            config.broker.password_file = Some(path.clone());
        }
        if let Some(listen) = self.api_listen {
            config.api.listen = listen;
        }
        if let Some(listen) = self.mqtt_listen {
            config.broker.listen = listen;
        }
        if let Some(url) = &self.public_broker_url {
            config.broker.public_url = Some(url.clone());
        }
        config
            .trust
            .release_keys
            .extend(self.release_keys.iter().cloned());
        if let Some(replica) = &self.replica {
            config.cluster.replica = Some(replica.clone());
        }
        if let Some(secs) = self.lease_secs {
            config.cluster.lease_secs = secs;
        }
        let source = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("command line"));
        config.validate(&source)?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the server's and the agents' logs would drown it.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn,rmqtt=error,rmqtt_net=error,sqlx=warn",
        _ => "info,rmqtt=warn,rmqtt_net=warn,sqlx=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Demo(args) = cli.command {
        let options = fleet_server::demo::DemoOptions {
            agents: args.agents,
            once: args.once,
            dir: args.dir,
            api_listen: args.api_listen,
            models: args.models.unwrap_or_else(default_models_dir),
            soak_secs: args.soak,
            stages: args.stages,
            requests_per_second: args.rate,
        };
        return match runtime.block_on(fleet_server::demo::run(options)) {
            Ok(report) if report.ok() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `models/` of the checkout this binary was built from, or of the working directory.
fn default_models_dir() -> PathBuf {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    if built_from.join("data/digits/holdout.X.npy").exists() {
        built_from
    } else {
        PathBuf::from("models")
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Demo(_) => unreachable!("handled in main"),
        Command::Run(args) => run(args.load()?).await,
        Command::Init(args) => {
            let config = args.load()?;
            let prepared = server::prepare(&config)?;
            let store = server::open_store(&config).await?;
            let crl = config.data_dir.join("ca").join("crl.pem");
            fleet_server::fleet::write_crl_file(&prepared.ca, &store, &crl).await?;
            for (what, path) in &prepared.created {
                eprintln!("created {what}: {}", path.display());
            }
            println!("data_dir     {}", config.data_dir.display());
            println!("device_ca    {}", prepared.ca.cert_path().display());
            println!("broker_cert  {}", prepared.broker_cert.display());
            println!("broker_key   {}", prepared.broker_key.display());
            println!("crl          {}", crl.display());
            println!(
                "fleet_pub    {}",
                config.data_dir.join("keys/fleet.pub").display()
            );
            Ok(())
        }
        Command::CheckConfig(args) => {
            let config = args.load()?;
            print!(
                "{}",
                toml::to_string(&config).context("rendering the configuration")?
            );
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            config,
            role,
            name,
            expires_in,
        }) => {
            let config = config.load()?;
            let store = server::open_store(&config).await?;
            let token = auth::create_token_expiring(&store, role, &name, expires_in).await?;
            let lifetime = match expires_in {
                Some(lifetime) => format!("expires in {} s", lifetime.as_secs()),
                None => "never expires".to_string(),
            };
            eprintln!(
                "created {} token {}, {lifetime} (store it now: it is not shown again)",
                token.role, token.id
            );
            println!("{}", token.token);
            Ok(())
        }
    }
}

async fn run(config: ServerConfig) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let database = server::redact(&config.database_url());
    let running = server::start(config).await?;
    eprintln!("fleet-server is running");
    eprintln!("  data dir     {}", data_dir.display());
    for (what, path) in server::layout(&data_dir) {
        eprintln!("  {what:<29} {}", path.display());
    }
    eprintln!("  database     {database}");
    match running.device_addr {
        Some(addr) => eprintln!(
            "  broker       embedded, devices on {addr} (mqtts, client certificates); told {}",
            running.fleet.public_broker_url
        ),
        None => eprintln!(
            "  broker       external, devices told {}",
            running.fleet.public_broker_url
        ),
    }
    eprintln!(
        "  REST API     http://{}/api/v1 (OpenAPI at /api/v1/openapi.json)",
        running.api_addr
    );
    eprintln!(
        "  first token  fleet-server token create --role admin --data-dir {}",
        data_dir.display()
    );
    wait_for_signal().await;
    eprintln!("stopping");
    running.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
