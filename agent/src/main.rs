//! `edge-agent`: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::config::AgentConfig;

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "Driftgate's device daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = "/etc/driftgate/agent.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and print the effective one, defaults included.
    CheckConfig {
        #[arg(long, default_value = "/etc/driftgate/agent.toml")]
        config: PathBuf,
    },
    /// Load and self-test an installed model version under a memory limit, and print what was
    /// found as one line of JSON. The agent runs this itself before a new version serves.
    #[command(name = "check-model", hide = true)]
    CheckModel {
        #[arg(long)]
        data_dir: PathBuf,
        /// A trusted release public key; repeat for several.
        #[arg(long = "release-key", required = true)]
        release_keys: Vec<PathBuf>,
        #[arg(long)]
        model: fleet_protocol::ModelName,
        #[arg(long)]
        version: fleet_protocol::ModelVersion,
        /// Address space the check may take, in MiB; 0 for no limit.
        #[arg(long, default_value_t = 1024)]
        max_memory_mib: u64,
        /// The agent that asked: the check dies with it.
        #[arg(long)]
        parent_pid: Option<u32>,
    },
}

/// Logs to stderr, filtered by `DRIFTGATE_LOG`: a default level and per-target levels, such
/// as `info` or `warn,edge_agent::fetch=debug` (default `info`). A plain target filter rather
/// than tracing's `EnvFilter`: its regular-expression engine, there for span-field matching,
/// was 317,504 bytes of the stripped x86_64 release binary.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let filter = match std::env::var("DRIFTGATE_LOG") {
        Err(_) => default(),
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("DRIFTGATE_LOG={spec:?} is not a log filter ({e}); logging at info");
            default()
        }),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    edge_agent::quiet_library_backtraces();
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::CheckModel {
            data_dir,
            release_keys,
            model,
            version,
            max_memory_mib,
            parent_pid,
        } => {
            let args = edge_agent::check::ChildArgs {
                data_dir,
                release_keys,
                model,
                version,
                max_memory_mib,
                parent_pid,
            };
            match edge_agent::check::run_child(&args) {
                Ok(report) => {
                    let failed = report.error.is_some();
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("a report serialises")
                    );
                    return if failed {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    };
                }
                Err(e) => Err(anyhow::Error::from(e).context("cannot set up the check's limits")),
            }
        }
        Command::CheckConfig { config } => AgentConfig::load(&config)
            .map(|c| print!("{}", c.to_toml()))
            .map_err(anyhow::Error::from),
        Command::Run { config } => match AgentConfig::load(&config) {
            Err(e) => Err(e.into()),
            Ok(config) => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(edge_agent::daemon::run(config))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
