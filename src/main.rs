//! `arl`: one binary for the node daemon, the in-sandbox agent and the command-line client.

use arl::{agent, cli, crd, node, operator, runtime};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "arl",
    version,
    about = "Warm sandboxes with near-zero latency for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The per-node daemon: warm pools, HTTP API, metrics.
    Node(Box<node::NodeArgs>),
    /// The in-sandbox agent (started by runtimes, not by hand).
    Agent(agent::AgentArgs),
    /// Run a command in a sandbox you hold.
    Exec {
        /// Sandbox id.
        sandbox: String,
        #[command(flatten)]
        opts: cli::ExecOpts,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Acquire a sandbox, run one command in it, release it.
    Run {
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        opts: cli::ExecOpts,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Acquire a sandbox and print its id.
    Acquire {
        #[arg(long, default_value = "default")]
        pool: String,
        /// Environment applied to every exec, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = cli_kv)]
        env: Vec<(String, String)>,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Release a sandbox.
    Release {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// List the node's pools.
    Pools {
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// List your sandboxes.
    Sandboxes {
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Persistent shell and Python sessions in a sandbox you hold.
    Session {
        #[command(subcommand)]
        action: cli::SessionAction,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// An interactive terminal in a sandbox you hold (exits with the shell's status).
    Shell {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Print what was done in a sandbox (JSON lines).
    Trajectory {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Freeze a sandbox you hold (any later exec or file call thaws it).
    Pause {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Thaw a paused sandbox.
    Resume {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Snapshot a sandbox's files; prints the snapshot's id.
    Snapshot {
        sandbox: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// List your snapshots.
    Snapshots {
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        snapshot: String,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Fork new sandboxes from a snapshot (`snap-…`) or a live sandbox (`sb-…`); prints their ids.
    Fork {
        from: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// The cluster operator: per-node warm-pool quotas, Sandbox binding, status roll-up.
    Operator(operator::OperatorArgs),
    /// Print the CRD YAML (or write one file per CRD into a directory).
    Crds {
        /// Write `<name>.yaml` files here instead of printing one stream.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Internal: copies this binary to DEST (the init container of a sandbox pod runs it).
    #[command(hide = true)]
    InstallAgent { dest: std::path::PathBuf },
    /// Internal: builds one process-runtime sandbox (run by the daemon).
    #[command(hide = true)]
    SandboxInit { config: String },
}

fn cli_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn crds(out_dir: Option<&std::path::Path>) -> i32 {
    let result = match out_dir {
        None => crd::all_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| e.to_string()),
        Some(dir) => crd::all().iter().try_for_each(|c| {
            let yaml = crd::to_yaml(c).map_err(|e| e.to_string())?;
            let path = dir.join(crd::file_name(c));
            std::fs::write(&path, yaml).map_err(|e| format!("{}: {e}", path.display()))
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("arl crds: {e}");
            1
        }
    }
}

fn main() {
    let code = match Cli::parse().command {
        Command::Node(args) => node::main(*args),
        Command::Agent(args) => agent::main(args),
        Command::Operator(args) => operator::main(args),
        Command::Crds { out_dir } => crds(out_dir.as_deref()),
        Command::InstallAgent { dest } => runtime::kubernetes::install::main(&dest),
        Command::SandboxInit { config } => runtime::process::init::main(&config),
        Command::Exec {
            sandbox,
            opts,
            client,
        } => cli::main(cli::exec(&client, &sandbox, &opts)),
        Command::Run { pool, opts, client } => cli::main(cli::run(&client, &pool, &opts)),
        Command::Acquire { pool, env, client } => cli::main(cli::acquire(&client, &pool, env)),
        Command::Release { sandbox, client } => cli::main(cli::release(&client, &sandbox)),
        Command::Pools { client } => cli::main(cli::pools(&client)),
        Command::Session { action, client } => cli::main(cli::session(&client, action)),
        Command::Shell { sandbox, client } => cli::main(cli::shell::shell(&client, &sandbox)),
        Command::Trajectory { sandbox, client } => cli::main(cli::trajectory(&client, &sandbox)),
        Command::Pause { sandbox, client } => cli::main(cli::pause(&client, &sandbox, true)),
        Command::Resume { sandbox, client } => cli::main(cli::pause(&client, &sandbox, false)),
        Command::Snapshot { sandbox, client } => cli::main(cli::snapshot(&client, &sandbox)),
        Command::Snapshots { client } => cli::main(cli::snapshots(&client)),
        Command::DeleteSnapshot { snapshot, client } => {
            cli::main(cli::delete_snapshot(&client, &snapshot))
        }
        Command::Fork {
            from,
            count,
            client,
        } => cli::main(cli::fork(&client, &from, count)),
        Command::Sandboxes { client } => cli::main(cli::sandboxes(&client)),
    };
    std::process::exit(code);
}
