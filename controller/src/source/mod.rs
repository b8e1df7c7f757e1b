//! Sources of Kubernetes objects for the model.
//!
//! Each source turns its input into [`crate::model::SourceEvent`]s and sends them through
//! the [`crate::model::SourceSink`] it was given; the model does not know where objects
//! come from. [`Sources`] is the seam where `main` collects the sources it runs, so adding
//! one (the Kubernetes watchers) does not touch the model or the discovery service.

pub mod kube;
pub mod limits;
pub mod local;

use std::future::Future;
use std::pin::Pin;

use crate::model::{ModelBuilder, SourceSink};

/// A source failed for good.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The local folder source failed.
    #[error("local source")]
    Local(#[from] local::LocalError),
    /// The Kubernetes source failed.
    #[error("kubernetes source")]
    Kube(#[from] kube::KubeSourceError),
}

/// A running source's task.
pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// Something that feeds the model.
pub trait Source: Send {
    /// Short name for logs and readiness (e.g. `local`).
    fn name(&self) -> &str;
    /// Runs until the model stops or the source fails.
    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture;
}

impl Source for local::LocalSource {
    fn name(&self) -> &str {
        "local"
    }
    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
        Box::pin(async move {
            local::LocalSource::run(*self, sink)
                .await
                .map_err(SourceError::from)
        })
    }
}

/// The sources `main` runs.
#[derive(Default)]
pub struct Sources {
    list: Vec<Box<dyn Source>>,
}

impl Sources {
    /// No sources yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a source.
    pub fn add(&mut self, source: impl Source + 'static) -> &mut Self {
        self.list.push(Box::new(source));
        self
    }

    /// Registers every source with the model (so it waits for all of them) and spawns
    /// them. Each task ends with its source's result.
    pub fn spawn(self, model: &mut ModelBuilder) -> tokio::task::JoinSet<Result<(), SourceError>> {
        let mut set = tokio::task::JoinSet::new();
        for source in self.list {
            let sink = model.sink(source.name());
            set.spawn(source.run(sink));
        }
        set
    }
}
