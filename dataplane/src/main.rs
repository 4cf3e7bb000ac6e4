//! `semantis-dataplane`: the semantic-cache service and its tools.

mod backup;
#[cfg(feature = "tools")]
mod bench;
#[cfg(feature = "tools")]
mod eval;
mod reindex;
mod serve;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

// Many small, short-lived allocations per request (JSON, strings, headers): mimalloc serves
// them from thread-local pages where glibc's malloc kept consolidating its free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "semantis-dataplane",
    version,
    about = "Semantis semantic-cache dataplane"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SEMANTIS_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve {
        /// TOML configuration file (the operator renders it into a ConfigMap). Every setting
        /// can also be set as SEMANTIS_<SECTION>__<FIELD>.
        #[arg(long, short, env = "SEMANTIS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Fill the migration target (`target_embedder`) from the active index version, then
    /// mark it ready; serving replicas switch to it when their embedder is set to it.
    Reindex(reindex::ReindexArgs),
    /// Upload a consistent snapshot of every tenant's tables and the metadata to S3.
    Backup(backup::BackupArgs),
    /// Rebuild a cache from a backup into empty stores, verifying every checksum first.
    Restore(backup::RestoreArgs),
    /// Load-test a running server and report latency percentiles and throughput.
    #[cfg(feature = "tools")]
    Bench(bench::BenchArgs),
    /// Measure hit quality on a dataset of question pairs (store `a`, look up `b`).
    #[cfg(feature = "tools")]
    Eval(eval::EvalArgs),
    /// Serve a fake OpenAI-compatible LLM API (chat completions, streaming, models,
    /// embeddings) for trying the gateway without an account.
    #[cfg(feature = "tools")]
    FakeOpenai {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
    },
    /// Print the SHA-256 of an API key (read from stdin), for `api_key_sha256` in the config.
    HashKey,
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lance=warn,lancedb=warn,lance_index=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let threads = semantis_dataplane::embed::model_threads();
    // SAFETY: no other thread exists yet (the runtime is built below), so nothing reads the
    // environment while it changes. candle reads the variable on each matrix product.
    unsafe {
        std::env::set_var(
            semantis_dataplane::embed::MODEL_THREADS_VAR,
            threads.to_string(),
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(run());
    // Dropping the runtime would wait for every blocking task, and the resident index's
    // startup load is one that can take many minutes: a replica stopped during it would
    // linger after "stopped". By now requests are drained and the tail is flushed.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Serve { config } => {
            let cfg = semantis_dataplane::config::load(config.as_deref())?;
            serve::run(cfg).await
        }
        Command::Reindex(args) => reindex::run(args).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::Restore(args) => backup::restore(args).await,
        #[cfg(feature = "tools")]
        Command::Bench(args) => bench::run(args).await,
        #[cfg(feature = "tools")]
        Command::Eval(args) => eval::run(args).await,
        #[cfg(feature = "tools")]
        Command::FakeOpenai { listen } => {
            let fake = semantis_dataplane::fake_openai::FakeOpenAi::start(&listen)
                .await
                .with_context(|| format!("failed to listen on {listen}"))?;
            tracing::info!(base_url = %fake.url, "fake OpenAI API serving");
            tokio::signal::ctrl_c()
                .await
                .context("failed to wait for Ctrl-C")?;
            Ok(())
        }
        Command::HashKey => {
            let mut key = String::new();
            std::io::stdin()
                .read_line(&mut key)
                .context("failed to read the key from stdin")?;
            println!("{}", semantis_cache::tenants::hash_key(&key));
            Ok(())
        }
    }
}
