//! The node library's error type: every way opening, ingesting or serving can fail, each
//! naming what was wrong and where.

use std::fmt;
use std::path::PathBuf;

/// Errors of the node library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} is not an initialised node directory (run `renkei-node init --dir {dir}` first)"
    )]
    NotInitialised { dir: PathBuf },
    #[error("{dir} is already an initialised node directory; refusing to overwrite its identity")]
    AlreadyInitialised { dir: PathBuf },
    #[error(
        "{dir} has the node's identity key but no store: the store was lost or moved. Put it back (or restore it from a backup), or, to start a new node with a new identity, move node.key away and run init again"
    )]
    StoreMissing { dir: PathBuf },
    #[error(
        "the node store {path} is damaged and cannot be opened ({detail}). Nothing was changed. Stop the node, put back the store directory from a backup of the node directory, and check with `renkei-node audit verify` and `renkei-node ledger` that the spend recorded since that backup is there"
    )]
    StoreDamaged { path: PathBuf, detail: String },
    #[error("node store {path} is in use by another process (is `renkei-node serve` running?)")]
    StoreLocked { path: PathBuf },
    #[error("node store: {0}")]
    Store(#[from] sled::Error),
    #[error("stored {what} does not decode ({reason}); the store may be corrupt")]
    CorruptStore { what: String, reason: String },
    #[error(transparent)]
    Key(#[from] renkei_protocol::KeyError),
    #[error("policy {path}: {source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: renkei_policies::PolicyError,
    },
    #[error("policy {path} was refused: {reason}")]
    PolicyRefused { path: PathBuf, reason: String },
    #[error("{dir} has no active policy; start it once with --policy FILE")]
    NoPolicy { dir: PathBuf },
    #[error("starting the node failed: {0}")]
    Startup(String),
    /// The problems are listed in the message itself (not as a source, so they print once).
    #[error("ingest refused, nothing was written:\n{0}")]
    Ingest(IngestErrors),
    #[error(
        "the ingest of {file} did not finish (the store holds part of it); run the same `renkei-node ingest` again to complete it (loading a file twice changes nothing)"
    )]
    UnfinishedIngest { file: String },
    #[error(
        "this node ({peer_id}) is not a member in policy v{version}; ask the consortium admins to add it"
    )]
    NotAMember { peer_id: String, version: u64 },
    #[error("dataset schema: {0}")]
    Schema(#[from] renkei_engine::schema::SchemaFileError),
    #[error("libp2p: {0}")]
    Network(String),
    #[error("differential privacy: {0}")]
    Dp(#[from] crate::privacy::dp::DpError),
    #[error("encoding: {0}")]
    Codec(#[from] renkei_protocol::CodecError),
    #[error("control socket: {0}")]
    Control(String),
    #[error("making the answer failed: {0}")]
    Answer(String),
    /// An error with what was being done when it happened (the cause prints as its source).
    #[error("{what}")]
    Within {
        what: String,
        #[source]
        source: Box<NodeError>,
    },
}

impl NodeError {
    /// This error, as it happened while doing `what`.
    pub fn within(self, what: impl Into<String>) -> Self {
        NodeError::Within {
            what: what.into(),
            source: Box::new(self),
        }
    }
}

impl From<IngestErrors> for NodeError {
    fn from(errors: IngestErrors) -> Self {
        NodeError::Ingest(errors)
    }
}

/// One problem in an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestError {
    pub file: String,
    /// 1-based line number, when the problem is on a line.
    pub line: Option<u64>,
    pub column: Option<String>,
    pub reason: String,
}

impl fmt::Display for IngestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(column) = &self.column {
            write!(f, " column `{column}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every problem found in a file (the first [`MAX_REPORTED_ERRORS`], and how many more).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct IngestErrors {
    pub errors: Vec<IngestError>,
    pub more: usize,
}

impl fmt::Display for IngestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "  {error}")?;
        }
        if self.more > 0 {
            writeln!(f, "  … and {} more", self.more)?;
        }
        Ok(())
    }
}
