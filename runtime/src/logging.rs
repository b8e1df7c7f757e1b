//! Logging set-up for every binary: `tracing` with an env-filter, text or JSON output
//! ([`LogArgs`]: `--log-format`, `--log-level`), and a [`LogHandle`] that changes the filter
//! at runtime (ztunnel's admin `/logging` endpoint) without restarting the proxy and dropping
//! every connection on the node.
//!
//! The filter starts from `RUST_LOG` when set, else from the configured directives.
//! ztunnel's access logs are ordinary events under target `access`, so `access=off` silences
//! them and JSON output turns each into one machine-readable line.

use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt};
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Filter used when neither `RUST_LOG` nor a configured directive says otherwise.
pub const DEFAULT_DIRECTIVES: &str = "info";

/// Why logging could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directives do not parse (`level`, or `target=level,...`).
    #[error("invalid log filter {directives:?}")]
    Filter {
        /// The directives as given.
        directives: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The log format is neither `text` nor `json`.
    #[error("unknown log format {0:?} (expected \"text\" or \"json\")")]
    Format(String),
    /// A global subscriber was already installed (logging initialised twice).
    #[error("logging is already initialised")]
    AlreadyInitialised(#[source] tracing::dispatcher::SetGlobalDefaultError),
    /// The subscriber whose filter this handle changes no longer exists.
    #[error("cannot change the log filter: the subscriber is gone")]
    Reload(#[source] reload::Error),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields at top level.
    Json,
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::Format(other.to_string())),
        }
    }
}

/// The logging flags every binary shares; `#[command(flatten)]` them into its CLI.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// How log lines are written.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text, env = "AMBIT_LOG_FORMAT")]
    pub format: LogFormat,
    /// Log filter in env-filter syntax (`info`, `ambit_ztunnel=debug,info`); `RUST_LOG`
    /// wins when set. Changeable at runtime through the admin `/logging` endpoint.
    #[arg(long = "log-level", default_value = DEFAULT_DIRECTIVES, env = "AMBIT_LOG_LEVEL")]
    pub level: String,
}

impl LogArgs {
    /// Installs the process-wide subscriber these flags describe, writing to stdout (see
    /// [`init`]).
    pub fn init(&self) -> Result<LogHandle, TelemetryError> {
        init(self.format, &self.level)
    }

    /// [`init`](Self::init) writing to stderr instead, for a binary whose stdout is not a
    /// log (the controller's, as it always was).
    pub fn init_stderr(&self) -> Result<LogHandle, TelemetryError> {
        init_with(self.format, &self.level, std::io::stderr)
    }
}

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Changes the log filter of a running subscriber. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    // EnvFilter's Display does not round-trip every directive faithfully, so keep what
    // the operator asked for, to show it back to them.
    current: Arc<Mutex<String>>,
}

impl LogHandle {
    /// The directives in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter with `directives` (`debug`, or `ambit_ztunnel=debug,info`).
    /// On error the old filter stays in force.
    pub fn set(&self, directives: &str) -> Result<(), TelemetryError> {
        let filter = parse(directives)?;
        self.reload.reload(filter).map_err(TelemetryError::Reload)?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = directives.to_string();
        tracing::info!(filter = directives, "log filter changed");
        Ok(())
    }
}

fn parse(directives: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|source| TelemetryError::Filter {
            directives: directives.to_string(),
            source,
        })
}

/// Builds a subscriber writing to `writer`, without installing it: tests install it
/// for one thread with `tracing::dispatcher::set_default`.
pub fn build<W>(
    format: LogFormat,
    directives: &str,
    writer: W,
) -> Result<(tracing::Dispatch, LogHandle), TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, reload) = reload::Layer::new(parse(directives)?);
    let fmt: Box<dyn Layer<Filtered> + Send + Sync> = match format {
        LogFormat::Text => Box::new(tracing_subscriber::fmt::layer().with_writer(writer)),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(writer),
        ),
    };
    let subscriber = Registry::default().with(filter).with(fmt);
    let handle = LogHandle {
        reload,
        current: Arc::new(Mutex::new(directives.to_string())),
    };
    Ok((tracing::Dispatch::new(subscriber), handle))
}

/// Installs the process-wide subscriber, writing to stdout (where container runtimes
/// collect logs). `RUST_LOG`, when set, wins over `directives`.
pub fn init(format: LogFormat, directives: &str) -> Result<LogHandle, TelemetryError> {
    init_with(format, directives, std::io::stdout)
}

/// [`init`] writing to `writer`.
pub fn init_with<W>(
    format: LogFormat,
    directives: &str,
    writer: W,
) -> Result<LogHandle, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let directives = from_env.as_deref().unwrap_or(directives);
    let (dispatch, handle) = build(format, directives, writer)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(TelemetryError::AlreadyInitialised)?;
    Ok(handle)
}

/// An error and its causes, `: `-separated, for one log field or response line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A writer that keeps everything in memory, for tests that assert on log output.
#[derive(Debug, Clone, Default)]
pub struct CaptureWriter {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl CaptureWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }
}

impl std::io::Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for CaptureWriter {
    type Writer = CaptureWriter;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_changes_what_is_logged() {
        let out = CaptureWriter::new();
        let (dispatch, handle) = build(LogFormat::Text, "info", out.clone()).expect("build");
        let _guard = tracing::dispatcher::set_default(&dispatch);
        tracing::debug!("hidden-before");
        handle.set("debug").expect("set");
        tracing::debug!("shown-after");
        let logs = out.contents();
        assert!(!logs.contains("hidden-before"), "{logs}");
        assert!(logs.contains("shown-after"), "{logs}");
        assert_eq!(handle.current(), "debug");

        let err = handle.set("=nonsense=").expect_err("bad filter");
        assert!(err.to_string().contains("invalid log filter"), "{err}");
        assert_eq!(handle.current(), "debug");
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        let cli = Cli::try_parse_from(["ztunnel", "--log-format", "json", "--log-level", "debug"])
            .expect("parse");
        assert_eq!(cli.log.format, LogFormat::Json);
        assert_eq!(cli.log.level, "debug");
        assert!(Cli::try_parse_from(["ztunnel", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<LogFormat>().expect("json"), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().expect("text"), LogFormat::Text);
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
