//! The `keyholder` command: `serve` runs the server; the other subcommands are the owner's
//! controls, working on the data folder (also while a server runs on it).

use clap::{Parser, Subcommand};
use keyholder::cli::{self, BindArgs, HealthcheckArgs};
use keyholder::config::{Config, ServeArgs};

/// Keyholder: the self-hosted key-custody webhook for Token Vault.
#[derive(Debug, Parser)]
#[command(name = "keyholder", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the keyholder server (creates the data folder and keys on first start).
    Serve(Box<ServeArgs>),
    /// Issue a one-time bind code and the registration link to connect the platform.
    Bind(BindArgs),
    /// Exit 0 if the local server answers healthy (for container health checks).
    Healthcheck(HealthcheckArgs),
}

fn init_logging(filter: &str, format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid setting --log / KEYHOLDER_LOG: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("keyholder: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_logging(&args.log, &args.log_format)?;
            let config = Config::from_args(&args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let server = keyholder::start(config).await?;
                server.wait().await?;
                tracing::info!("keyholder stopped");
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Bind(args) => {
            let issued = cli::bind(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&issued)?);
            } else {
                println!("Bind code:        {}", issued.code);
                println!("Valid for:        {} seconds, once", issued.expires_in);
                println!("Registration URL: {}", issued.registration_url);
                println!("Bind page:        {}", issued.bind_page_url);
                println!();
                println!("Open the registration URL while logged in to the platform to connect this keyholder.");
                if issued.rebind {
                    println!("This is a re-bind: when the platform exchanges it, the current HMAC secret stops working.");
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Healthcheck(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let healthy = runtime.block_on(cli::healthcheck(&args));
            match healthy {
                Ok(true) => Ok(std::process::ExitCode::SUCCESS),
                Ok(false) => {
                    eprintln!("keyholder: the server answered, but not healthy");
                    Ok(std::process::ExitCode::from(1))
                }
                Err(err) => {
                    eprintln!("keyholder: health check failed: {err:#}");
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
    }
}
