//! Loading data into a node, whether it is stopped or serving.
//!
//! An [`IngestPlan`] is what `renkei-node ingest` was asked to load; [`IngestPlan::run`]
//! loads it into a store. A stopped node's store is opened directly. A serving node holds
//! its store (sled allows one process), so the command hands the plan to it over a Unix
//! socket in the node directory ([`SOCKET_FILE`], mode 0600: whoever can use it can already
//! read the node directory): the node runs the plan on its own store, one plan at a time,
//! then loads a fresh data image and swaps it in, so later queries see the new data without
//! a restart. Consent withdrawals go the same way, so they take effect for the next query.
//! Only processes of the node's own user may connect (checked by peer credentials), a
//! client has [`REQUEST_READ_TIMEOUT`] to send its request, and if the fresh image cannot be
//! loaded the node refuses queries rather than answer from data the store no longer holds.
//!
//! The exchange is one JSON line each way, at most [`MAX_CONTROL_BYTES`].

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::desk::QueryDesk;
use crate::error::NodeError;
use crate::ingest::import;
use crate::ingest::{self, IngestOptions, IngestReport};
use crate::store::NodeStore;
use crate::store::tables;
use renkei_engine::schema::Digits;

/// The control socket, in the node directory while the node serves.
pub const SOCKET_FILE: &str = "control.sock";

/// Largest control message either way.
pub const MAX_CONTROL_BYTES: u64 = 1 << 20;

/// What to load, in the order it is loaded: exports (which create patients), patients,
/// timepoints, consent, items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestPlan {
    pub patients: Option<PathBuf>,
    pub timepoints: Vec<PathBuf>,
    pub consent: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub synthea: Option<PathBuf>,
    pub fhir: Vec<PathBuf>,
    pub assume_consent: bool,
    pub dry_run: bool,
    /// Round decimals with more digits than their column keeps (half away from zero), and
    /// say how many; without it such a value is refused.
    #[serde(default)]
    pub round: bool,
}

/// A request to a serving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    Ingest(IngestPlan),
    WithdrawConsent {
        patient: String,
        scope: Option<String>,
    },
    /// Forget unfinished ingests (files that cannot be loaded again), accepting what is
    /// stored of them.
    AbandonUnfinished,
}

/// A serving node's reply: what was done, line by line, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    Done {
        lines: Vec<String>,
    },
    /// `lines` says what was done before the failure.
    Failed {
        lines: Vec<String>,
        error: String,
    },
}

type IngestFn = fn(&NodeStore, &Path, IngestOptions) -> Result<IngestReport, NodeError>;

impl IngestPlan {
    /// Makes every path absolute (a serving node has its own working directory).
    pub fn absolute(mut self) -> Result<Self, NodeError> {
        let absolute = |path: &mut PathBuf| -> Result<(), NodeError> {
            *path = std::path::absolute(&*path).map_err(|source| NodeError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(())
        };
        for path in self
            .patients
            .iter_mut()
            .chain(self.timepoints.iter_mut())
            .chain(self.consent.iter_mut())
            .chain(self.manifest.iter_mut())
            .chain(self.synthea.iter_mut())
            .chain(self.fhir.iter_mut())
        {
            absolute(path)?;
        }
        Ok(self)
    }

    /// Loads the plan into `store`, telling `done` one line per file (or export) loaded.
    pub fn run(&self, store: &NodeStore, done: &mut dyn FnMut(String)) -> Result<(), NodeError> {
        let prefix = if self.dry_run {
            "dry run, nothing written: "
        } else {
            ""
        };
        // Exports in other shapes first: they create patients.
        let mut exports = Vec::new();
        if let Some(dir) = &self.synthea {
            exports.push((
                format!("Synthea export {}", dir.display()),
                import::read_synthea(dir)?,
            ));
        }
        if !self.fhir.is_empty() {
            let paths: Vec<&Path> = self.fhir.iter().map(PathBuf::as_path).collect();
            exports.push((
                format!("{} FHIR bundle(s)", self.fhir.len()),
                import::read_fhir(&paths)?,
            ));
        }
        for (what, export) in &exports {
            let report = import::import(store, export, self.assume_consent, self.dry_run)
                .map_err(|e| e.within(format!("importing {what}")))?;
            done(format!(
                "{prefix}{what}: {} patients and timepoints, {} added, {} updated, {} consented{}{}",
                report.rows,
                report.added,
                report.updated,
                report.consented,
                if self.assume_consent {
                    ""
                } else {
                    " (load consent before they can be counted)"
                },
                rounded(report.rounded)
            ));
            for note in &report.notes {
                done(format!("  {note}"));
            }
        }
        // Patients first: timepoints, consent and items refer to them.
        let mut steps: Vec<(&str, &Path, IngestFn)> = Vec::new();
        if let Some(path) = &self.patients {
            steps.push(("patients", path, ingest::ingest_patients_with));
        }
        for path in &self.timepoints {
            steps.push(("timepoints", path, ingest::ingest_timepoints_with));
        }
        if let Some(path) = &self.consent {
            steps.push(("consent", path, |store, path, options| {
                ingest::ingest_consent(store, path, options.dry_run)
            }));
        }
        if let Some(path) = &self.manifest {
            steps.push(("items", path, |store, path, options| {
                ingest::ingest_manifest(store, path, options.dry_run)
            }));
        }
        let options = IngestOptions {
            dry_run: self.dry_run,
            digits: if self.round {
                Digits::Round
            } else {
                Digits::Exact
            },
        };
        let loads_timepoints =
            !exports.is_empty() || !self.timepoints.is_empty() || self.manifest.is_some();
        for (what, path, load) in steps {
            let report = load(store, path, options)
                .map_err(|e| e.within(format!("loading {}", path.display())))?;
            if !self.dry_run {
                crate::store::legacy::completed(store, path)?;
            }
            done(format!(
                "{prefix}{what} from {}: {} rows, {} added, {} updated{}{}",
                path.display(),
                report.rows,
                report.added,
                report.updated,
                if what == "patients" {
                    format!(", {} consented", report.consented)
                } else {
                    String::new()
                },
                rounded(report.rounded)
            ));
        }
        if loads_timepoints && !self.dry_run {
            let schema = store.schema()?;
            let bound = schema.max_timepoints_per_patient;
            let over = tables::patients_over(store, bound, schema.timepoints.len())?;
            if over > 0 {
                done(format!(
                    "{over} patient(s) have more than {bound} timepoints (the schema's max_timepoints_per_patient): each counts at most {bound} rows in a timepoint answer, spread evenly over its course"
                ));
            }
        }
        Ok(())
    }
}

/// How an ingest line reports rounded values (nothing when none were).
fn rounded(count: usize) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(", {count} value(s) rounded to the schema's digits")
    }
}

impl ControlRequest {
    /// Carries the request out on `store`, telling `done` what it did, line by line.
    pub fn run(&self, store: &NodeStore, done: &mut dyn FnMut(String)) -> Result<(), NodeError> {
        match self {
            ControlRequest::Ingest(plan) => plan.run(store, done),
            ControlRequest::WithdrawConsent { patient, scope } => {
                ingest::withdraw_consent(store, patient, scope.as_deref())?;
                done(format!(
                    "withdrawn: {} for patient {patient}",
                    scope.as_deref().unwrap_or("every scope")
                ));
                Ok(())
            }
            ControlRequest::AbandonUnfinished => {
                let files = crate::store::legacy::abandon_unfinished(store)?;
                done(if files.is_empty() {
                    "no unfinished ingest to abandon".into()
                } else {
                    format!(
                        "WARNING: abandoned unfinished ingest of {}; whatever part of it was written stays",
                        files.join(", ")
                    )
                });
                Ok(())
            }
        }
    }

    /// Whether carrying it out may change the data queries see.
    fn writes(&self) -> bool {
        match self {
            ControlRequest::Ingest(plan) => !plan.dry_run,
            ControlRequest::WithdrawConsent { .. } | ControlRequest::AbandonUnfinished => true,
        }
    }

    /// What kind of request it is, for logs (never its contents: a patient id is an
    /// identifier).
    fn kind(&self) -> &'static str {
        match self {
            ControlRequest::Ingest(plan) if plan.dry_run => "ingest (dry run)",
            ControlRequest::Ingest(_) => "ingest",
            ControlRequest::WithdrawConsent { .. } => "consent withdrawal",
            ControlRequest::AbandonUnfinished => "abandon unfinished ingest",
        }
    }
}

/// An error with every cause it carries, for a reply that is read far from the node.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Hands `request` to the node serving from `dir` and waits for its reply. Blocking.
pub fn send(dir: &Path, request: &ControlRequest) -> Result<ControlResponse, NodeError> {
    let path = dir.join(SOCKET_FILE);
    let io = |source: std::io::Error| NodeError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| NodeError::Control(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_CONTROL_BYTES))
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| {
        NodeError::Control(format!(
            "the serving node's reply does not decode ({e}); did it stop while loading?"
        ))
    })
}

/// Called after a load that changed the data (e.g. to rewrite the status file).
pub type AfterLoad = Box<dyn Fn(&QueryDesk) + Send + Sync>;

/// How long a client may take to send its request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves control requests on the socket in `dir` for `desk` until the returned guard is
/// dropped (which removes the socket file). Only processes of this node's user may connect;
/// requests are carried out one at a time.
pub fn listen(
    dir: &Path,
    desk: Arc<QueryDesk>,
    after_load: AfterLoad,
) -> Result<ControlListener, NodeError> {
    let path = dir.join(SOCKET_FILE);
    let staging = dir.join(format!("{SOCKET_FILE}.{}", std::process::id()));
    let io = |path: &Path, source: std::io::Error| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Only one process can hold the store, so a socket left here is from a node that died.
    for old in [&path, &staging] {
        if old.exists() {
            std::fs::remove_file(old).map_err(|e| io(old, e))?;
        }
    }
    // Bound under another name and restricted before it appears under its own, so nobody
    // can connect while it still has the umask's permissions.
    let listener = tokio::net::UnixListener::bind(&staging).map_err(|e| io(&staging, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(&staging, e))?;
    }
    std::fs::rename(&staging, &path).map_err(|e| io(&path, e))?;
    // The node's user: the owner of the socket file just made.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path).map_err(|e| io(&path, e))?.uid()
    };
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    let after_load = Arc::new(after_load);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (desk, lock, after) =
                            (Arc::clone(&desk), Arc::clone(&one_at_a_time), Arc::clone(&after_load));
                        connections.spawn(async move {
                            serve_one(stream, owner, &desk, &lock, &after).await
                        });
                    }
                    Err(e) => warn!("control socket: {e}"),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok(ControlListener { path, task })
}

/// The control socket of a serving node.
#[derive(Debug)]
pub struct ControlListener {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_one(
    stream: tokio::net::UnixStream,
    owner: u32,
    desk: &Arc<QueryDesk>,
    one_at_a_time: &tokio::sync::Mutex<()>,
    after_load: &Arc<AfterLoad>,
) {
    let failed = |error: String| ControlResponse::Failed {
        lines: Vec::new(),
        error,
    };
    let peer = stream.peer_cred().map(|c| c.uid());
    let (reader, mut writer) = stream.into_split();
    let response = if peer.as_ref().ok() != Some(&owner) {
        warn!(?peer, "control socket: refused a process of another user");
        failed("only the node's own user may load data into it".into())
    } else {
        let mut line = String::new();
        let read = tokio::time::timeout(
            REQUEST_READ_TIMEOUT,
            tokio::io::BufReader::new(reader.take(MAX_CONTROL_BYTES)).read_line(&mut line),
        )
        .await;
        match read {
            Err(_) => failed(format!(
                "no request within {}s",
                REQUEST_READ_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => failed(format!("reading the request: {e}")),
            Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(&line) {
                Err(e) => failed(format!("the request does not decode: {e}")),
                Ok(request) => {
                    let _turn = one_at_a_time.lock().await;
                    let (desk, after_load) = (Arc::clone(desk), Arc::clone(after_load));
                    // sled and the image load block: on a blocking thread.
                    let load = move || {
                        let response = carry_out(&desk, &request);
                        if request.writes() {
                            after_load(&desk);
                        }
                        response
                    };
                    match tokio::task::spawn_blocking(load).await {
                        Ok(response) => response,
                        Err(e) => failed(format!("the load failed on the node: {e}")),
                    }
                }
            },
        }
    };
    let mut reply = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    reply.push(b'\n');
    if let Err(e) = writer.write_all(&reply).await {
        warn!("control socket reply: {e}");
    }
}

/// Carries `request` out on the desk's store; then, if it may have written anything (even
/// if it failed partway), puts a fresh image in place. If that fails the node stops
/// answering rather than answer from data the store no longer holds (a withdrawn consent).
fn carry_out(desk: &QueryDesk, request: &ControlRequest) -> ControlResponse {
    let mut lines = Vec::new();
    let outcome = request.run(desk.ledger().store(), &mut |line| lines.push(line));
    if request.writes() {
        match desk.refresh_dataset() {
            Ok(()) => {
                let image = desk.dataset();
                let (now, what) = if outcome.is_ok() {
                    ("now answers", "")
                } else {
                    ("still answers", " (nothing of the refused load was stored)")
                };
                lines.push(format!(
                    "the serving node {now} from {} consenting patients ({} withheld, {} timepoints){what}",
                    image.consented(),
                    image.withheld(),
                    image.timepoints()
                ));
            }
            Err(e) => {
                warn!("reloading the data image failed: {e}; refusing queries until restarted");
                lines.push(format!(
                    "the node could not reload its data ({}) and refuses queries until it is restarted",
                    describe(&e)
                ));
            }
        }
    }
    info!(
        kind = request.kind(),
        ok = outcome.is_ok(),
        "load while serving"
    );
    match outcome {
        Ok(()) => ControlResponse::Done { lines },
        Err(e) => ControlResponse::Failed {
            lines,
            error: describe(&e),
        },
    }
}
