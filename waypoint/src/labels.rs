//! What one request is recorded with: the labels of its metrics (the names and labels Istio
//! dashboards know) and the fields of its access-log line. Both [`crate::metrics`] and span
//! export ([`crate::otlp`]) read them, so they live below both.

use prometheus_client::encoding::EncodeLabelSet;

/// The labels of every request metric.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Labels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: String,
    pub response_code: String,
    pub response_flags: String,
    pub grpc_response_status: String,
}

/// What the access log says besides the labels.
#[derive(Debug, Clone, Default)]
pub struct LogFields {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub upstream: String,
    pub route: String,
    pub reason: String,
    pub trace_id: String,
    /// `iss/sub` of the request's validated token; empty without one.
    pub request_principal: String,
}
