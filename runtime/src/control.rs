//! The connection to the controller (discovery and CA, gRPC on 15012).
//!
//! `https://` goes through [`ambit_hbone::control`]: TLS 1.3 that trusts only the mesh root
//! given with `--ca-root-file` and accepts only the controller's SPIFFE identity (by default
//! `spiffe://<trust-domain>/ns/ambit-system/sa/ambit-controller`). `http://` connects in
//! plaintext, for a controller on loopback in tests. Both proxies use it for discovery and
//! for their CA client.
//!
//! The URL may list several controller replicas separated by commas (all `https://` or all
//! `http://`): each new connection goes to the replica that answered last, else the next
//! that answers, so a proxy whose replica went away reconnects to another one
//! ([`ambit_hbone::control::Dialer`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_hbone::control::ControlError as ChannelError;
use ambit_hbone::Identity;
use tonic::transport::{Channel, Endpoint};

/// Why a controller channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The URL is not a valid endpoint.
    #[error("{url:?} is not a valid controller URL")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The root file could not be read.
    #[error("cannot read the mesh root from {path}")]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An https URL without a root to verify it by.
    #[error("{url} uses https but no --ca-root-file was given")]
    NoRoot { url: String },
    /// The TLS channel could not be built (bad root, bad address).
    #[error("cannot build the TLS channel to {url}")]
    Channel {
        url: String,
        // Boxed: the hbone error is large and this path runs once at start.
        #[source]
        source: Box<ChannelError>,
    },
}

/// A lazily connecting channel to `url` (one URL, or several replicas' separated by
/// commas); for https, verified against the PEM roots in `root` and required to prove
/// `expected`.
pub fn channel(
    url: &str,
    root: Option<&Path>,
    expected: &Identity,
) -> Result<Channel, ControlError> {
    if url.starts_with("https://") {
        let path = root.ok_or_else(|| ControlError::NoRoot {
            url: url.to_string(),
        })?;
        let pem = std::fs::read_to_string(path).map_err(|source| ControlError::ReadRoot {
            path: path.to_path_buf(),
            source,
        })?;
        return ambit_hbone::control::channel(url, &pem, expected).map_err(|source| {
            ControlError::Channel {
                url: url.to_string(),
                source: Box::new(source),
            }
        });
    }
    if ambit_hbone::control::split_addresses(url).nth(1).is_some() {
        return ambit_hbone::control::plaintext_channel(url).map_err(|source| {
            ControlError::Channel {
                url: url.to_string(),
                source: Box::new(source),
            }
        });
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| ControlError::Url {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// `spiffe://<trust_domain>/ns/ambit-system/sa/ambit-controller`, the identity the controller
/// proves unless `--controller-identity` says otherwise, as the install deploys it.
pub fn default_controller_identity(trust_domain: &str) -> Identity {
    Identity::new(trust_domain, "ambit-system", "ambit-controller").unwrap_or_else(|_| {
        // Only reachable with an invalid trust domain, which the CA and every certificate
        // check reject anyway; fall back to the default domain.
        Identity::new(
            ambit_proto::DEFAULT_TRUST_DOMAIN,
            "ambit-system",
            "ambit-controller",
        )
        .unwrap_or_else(|_| unreachable!("the default controller identity is valid"))
    })
}
