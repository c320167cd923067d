//! `keyholder serve`: runs the server (creating the data folder and keys on first start) until
//! SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::config::{Config, ServeArgs};

/// Runs `keyholder serve`: logging and tracing as the flags say, then the server.
pub fn execute(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let otlp = args
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty())
        .map(crate::telemetry::OtlpSettings::from_endpoint)
        .transpose()?;
    crate::telemetry::init(&args.log, &args.log_format, otlp.as_ref())?;
    let config = Config::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = crate::start(config).await?;
        server.wait().await?;
        tracing::info!("keyholder stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    drop(runtime);
    crate::telemetry::shutdown();
    Ok(ExitCode::SUCCESS)
}
