//! The waypoint a workload, service or external service sends its traffic through: where
//! the tunnel goes and whom to expect there. Below the kinds that name one, so each imports
//! it without importing the others.

use std::net::{IpAddr, SocketAddr};

use ambit_hbone::identity::Identity;
use ambit_proto::discovery as pb;
use serde::{Deserialize, Serialize};

use super::{ip_from_bytes, port_from_u32, ConvertError};

/// Port on which ztunnels and waypoints accept HBONE (the root ARCHITECTURE.md, "Ports").
pub const HBONE_PORT: u16 = ambit_proto::ports::HBONE;

/// A waypoint that traffic must traverse: where to send the tunnel and whom to expect there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GatewayAddress {
    /// The waypoint's address (its Service VIP or its pod IP).
    pub address: IpAddr,
    /// Port accepting HBONE (15008 unless the controller says otherwise).
    pub hbone_port: u16,
    /// Identity the waypoint must present in its certificate.
    pub identity: Identity,
}

impl GatewayAddress {
    /// Where the HBONE connection to this waypoint goes.
    pub fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.hbone_port)
    }

    /// Converts the protobuf form; `resource` and `field` name the owner for errors.
    pub(crate) fn from_proto(
        resource: &dyn Fn() -> String,
        field: &str,
        gw: pb::GatewayAddress,
    ) -> Result<Self, ConvertError> {
        let address = ip_from_bytes(resource, &|| format!("{field}.address"), &gw.address)?;
        let hbone_port = match port_from_u32(
            resource,
            &|| format!("{field}.hbone_port"),
            gw.hbone_port,
            true,
        )? {
            // Unset means the well-known port.
            0 => HBONE_PORT,
            p => p,
        };
        if gw.identity.is_empty() {
            return Err(ConvertError::Invalid {
                resource: resource(),
                field: format!("{field}.identity"),
                value: String::new(),
                why: "a waypoint must have an identity to verify".into(),
            });
        }
        let identity = gw
            .identity
            .parse::<Identity>()
            .map_err(|e| ConvertError::Invalid {
                resource: resource(),
                field: format!("{field}.identity"),
                value: gw.identity.clone(),
                why: e.to_string(),
            })?;
        Ok(GatewayAddress {
            address,
            hbone_port,
            identity,
        })
    }
}
