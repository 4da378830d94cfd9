//! Runs one simulated backend from command-line options, as `fulcrum backend` does:
//! `cargo run -p fulcrum-sim --example backend -- --listen 127.0.0.1:0 --latency 20ms`.
//! Prints the listening line on stdout and stops on Ctrl-C.

use clap::Parser;
use fulcrum_sim::{BackendArgs, start_backend};

/// Fulcrum backend simulator (example runner).
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    backend: BackendArgs,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let backend = start_backend(cli.backend).await?;
    println!("{}", backend.ready_line());
    tokio::signal::ctrl_c().await?;
    backend.shutdown().await;
    Ok(())
}
