//! The local source: a folder of Kubernetes-format YAML (or JSON) files, watched.
//!
//! Local mode has no API server, so this source plays its part: it parses every
//! `.yaml`/`.yml`/`.json` file (many `---` documents each), checks each document against
//! the typed objects, and sends the model the difference from what it sent before.
//! Files change under us (editors write, rename and truncate): after a short debounce the
//! source reads again just the files the watcher's events name (a change to a directory
//! rereads the tree), so a write reaches the model in milliseconds however large the
//! folder; a periodic full rescan catches anything the file-system watcher missed.
//!
//! A file that fails (bad YAML, unknown kind, missing or mistyped field, an object in a
//! namespace that does not exist) is reported with its path, the document's 1-based index
//! and the reason (serde_yaml's line and column kept), and *its* last good objects stay in
//! force while other files keep updating: a typo must never take workloads away.
//! Because there is no kubelet, pods carry `spec.nodeName` and `status.podIP(s)` in YAML.
//!
//! Every file is read and measured within [`InputLimits`] before it is parsed (see
//! [`super::limits`]), and scans run on a thread of their own ([`LocalSource::run`]), so a
//! huge or pathological file costs this source some time but never the runtime that serves
//! discovery, the CA and metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize as _;
use tokio::sync::{watch, Notify};

use super::limits::{self, InputLimits, LimitError, Nesting, ReadError};
use crate::model::{
    Kind, ModelError, Object, ObjectKey, SourceEvent, SourceSink, DEFAULT_NAMESPACE,
};

/// Problems with the folder or one of its files.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The folder cannot be listed.
    #[error("cannot read directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML, or does not fit the type its kind requires (a
    /// missing required field or a wrong type).
    #[error("{}: document {document}{}", path.display(), at(*line, *column))]
    Parse {
        path: PathBuf,
        document: usize,
        line: Option<usize>,
        column: Option<usize>,
        #[source]
        source: serde_yaml::Error,
    },
    /// A file breaks an input limit (too large, not a regular file, nested too deep); it
    /// is not parsed, and its last good objects stay in force.
    #[error("{}{}: refused before parsing", path.display(), in_document(*document))]
    Limit {
        path: PathBuf,
        /// The document where the limit was hit, when it is about one document.
        document: Option<usize>,
        #[source]
        reason: LimitError,
    },
    /// A document is not valid YAML, as found by the pre-scan (see
    /// [`super::limits::check_nesting`] for when its error is reported instead of the
    /// parser's).
    #[error("{}: document {document} (line {line}, column {column}): {message}", path.display())]
    Syntax {
        path: PathBuf,
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// A document lacks `apiVersion`, `kind` or `metadata.name`.
    #[error("{}: document {document}: missing required field {field}", path.display())]
    MissingField {
        path: PathBuf,
        document: usize,
        field: &'static str,
    },
    /// A document's `apiVersion`/`kind` is not one the controller understands.
    #[error("{}: document {document}: unknown kind {api_version}/{kind} (known: {known})", path.display())]
    UnknownKind {
        path: PathBuf,
        document: usize,
        api_version: String,
        kind: String,
        known: String,
    },
    /// A policy document has a field its schema does not know (a typo such as
    /// `principal:` would otherwise silently widen the policy).
    #[error("{}: document {document}: unknown field {field}", path.display())]
    UnknownField {
        path: PathBuf,
        document: usize,
        field: String,
    },
    /// A document's field breaks a rule its type cannot express (a port out of range, a
    /// field that needs another one).
    #[error("{}: document {document}: {field}: {why}", path.display())]
    InvalidField {
        path: PathBuf,
        document: usize,
        field: String,
        why: String,
    },
    /// A document puts an object in a namespace that no file defines.
    #[error("{}: document {document}: {key} is in namespace {namespace:?}, which does not exist", path.display())]
    UnknownNamespace {
        path: PathBuf,
        document: usize,
        key: ObjectKey,
        namespace: String,
    },
    /// An object is defined again (in this file or another); the first definition, in
    /// path order, is the one served.
    #[error("{}: document {document}: {key} is already defined in {}; this copy is ignored", path.display(), first.display())]
    Duplicate {
        path: PathBuf,
        document: usize,
        key: ObjectKey,
        first: PathBuf,
    },
    /// The file-system watcher could not be set up.
    #[error("cannot watch {}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The model has stopped taking events.
    #[error("cannot deliver events")]
    Model(#[source] ModelError),
    /// The scanning thread could not be started, or died.
    #[error("local source scanning thread")]
    ScanThread(#[source] std::io::Error),
}

fn in_document(document: Option<usize>) -> String {
    document
        .map(|d| format!(": document {d}"))
        .unwrap_or_default()
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        _ => String::new(),
    }
}

/// One object read from a file, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    /// Shared with the model once sent (see [`SourceEvent::Apply`]).
    pub object: Arc<Object>,
    /// 1-based index of the document in its file.
    pub document: usize,
}

/// Parses one file's text into objects within the default [`InputLimits`]. Every problem
/// is returned, not just the first.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Located>, Vec<LocalError>> {
    parse_file_limited(path, text, &InputLimits::default())
}

/// Parses one file's text into objects, first checking its nesting against `limits` (the
/// size was checked when it was read, see [`read_file`]).
pub fn parse_file_limited(
    path: &Path,
    text: &str,
    limits: &InputLimits,
) -> Result<Vec<Located>, Vec<LocalError>> {
    match limits::check_nesting(text, limits.max_depth) {
        Ok(_) => {}
        Err(Nesting::TooDeep { document, error }) => {
            return Err(vec![LocalError::Limit {
                path: path.into(),
                document: Some(document),
                reason: error.into_error(),
            }])
        }
        Err(Nesting::Syntax {
            document,
            line,
            column,
            message,
        }) => {
            return Err(vec![LocalError::Syntax {
                path: path.into(),
                document,
                line,
                column,
                message,
            }])
        }
    }
    let mut values = Vec::new();
    let mut errors = Vec::new();
    // First pass: generic values, to learn each document's kind (and catch bad YAML).
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match serde_yaml::Value::deserialize(doc) {
            Ok(v) => values.push(Some(v)),
            Err(source) => {
                errors.push(parse_error(path, i + 1, source));
                // After a syntax error the document boundaries are unreliable.
                return Err(errors);
            }
        }
    }
    let mut out = Vec::new();
    // Second pass: typed, straight from the text so errors keep their line and column.
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let Some(Some(value)) = values.get(i) else {
            break;
        };
        if value.is_null() {
            continue; // an empty document (comments only, or a trailing `---`)
        }
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
        let Some(api_version) = field("apiVersion") else {
            errors.push(LocalError::MissingField {
                path: path.into(),
                document,
                field: "apiVersion",
            });
            continue;
        };
        let Some(kind_name) = field("kind") else {
            errors.push(LocalError::MissingField {
                path: path.into(),
                document,
                field: "kind",
            });
            continue;
        };
        let Some(kind) = Kind::from_type(api_version, kind_name) else {
            errors.push(LocalError::UnknownKind {
                path: path.into(),
                document,
                api_version: api_version.into(),
                kind: kind_name.into(),
                known: Kind::ALL
                    .iter()
                    .map(|k| format!("{}/{}", k.api_version(), k.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
            continue;
        };
        match kind.deserialize(doc) {
            Ok(mut object) => {
                let meta = object.metadata_mut();
                if meta.name.as_deref().is_none_or(str::is_empty) {
                    errors.push(LocalError::MissingField {
                        path: path.into(),
                        document,
                        field: "metadata.name",
                    });
                    continue;
                }
                if kind.namespaced() && meta.namespace.is_none() {
                    meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
                }
                if let Some(field) = unknown_policy_field(value, &object) {
                    errors.push(LocalError::UnknownField {
                        path: path.into(),
                        document,
                        field,
                    });
                    continue;
                }
                // After the spelling check: a misspelt field is the cause to name, not the
                // rule it then seems to break.
                if let Err(e) = check_object(&object) {
                    errors.push(LocalError::InvalidField {
                        path: path.into(),
                        document,
                        field: e.field,
                        why: e.why,
                    });
                    continue;
                }
                out.push(Located {
                    object: Arc::new(object),
                    document,
                });
            }
            Err(source) => errors.push(parse_error(path, document, source)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The rules of a kind that its type cannot express, checked where the document is read so
/// the error names the file, the document and the field (the model checks them again for
/// sources without files).
fn check_object(object: &Object) -> Result<(), crate::crd::peer_auth::InvalidField> {
    match object {
        Object::PeerAuthentication(p) => p.spec.check().map(|_| ()),
        Object::ExternalService(x) => x.spec.check().map(|_| ()),
        Object::Namespace(n) => {
            crate::model::outbound_policy(n.metadata.labels.as_ref()).map(|_| ())
        }
        Object::RequestAuthentication(ra) => crate::model::check_request_authentication(&ra.spec)
            .map_err(|(field, reason)| crate::crd::peer_auth::InvalidField {
                field,
                why: reason.to_string(),
            }),
        _ => Ok(()),
    }
}

/// For Ambit's own policy kinds, the first field of `spec` the typed form does not know.
/// Like `kubectl apply`'s strict validation: for security policy a dropped field changes
/// the meaning (a misspelt `principals` makes a rule match every source). Gateway API and
/// core kinds stay tolerant, as their schemas evolve outside Ambit.
fn unknown_policy_field(input: &serde_yaml::Value, object: &Object) -> Option<String> {
    let typed = match object {
        Object::AuthorizationPolicy(p) => serde_json::to_value(&p.spec),
        Object::TrafficPolicy(p) => serde_json::to_value(&p.spec),
        Object::PeerAuthentication(p) => serde_json::to_value(&p.spec),
        Object::RequestAuthentication(p) => serde_json::to_value(&p.spec),
        Object::ExternalService(p) => serde_json::to_value(&p.spec),
        _ => return None,
    }
    .ok()?;
    let input = serde_json::to_value(input.get("spec")?).ok()?;
    first_unknown(&input, &typed, "spec")
}

/// Accepted spellings that serialise under another name.
const ALIASES: &[(&str, &str)] = &[("circuitBreaker", "connectionPool")];

fn first_unknown(input: &serde_json::Value, typed: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => i.iter().find_map(|(k, v)| {
            let name = ALIASES
                .iter()
                .find(|(a, _)| a == k)
                .map_or(k.as_str(), |(_, n)| n);
            match t.get(name) {
                Some(tv) => first_unknown(v, tv, &format!("{at}.{k}")),
                // Omitted on output because empty: known but unset.
                None if empty(v) => None,
                None => Some(format!("{at}.{k}")),
            }
        }),
        (Value::Object(i), _) => i
            .iter()
            .find(|(_, v)| !empty(v))
            .map(|(k, _)| format!("{at}.{k}")),
        (Value::Array(i), Value::Array(t)) => i
            .iter()
            .zip(t)
            .enumerate()
            .find_map(|(n, (iv, tv))| first_unknown(iv, tv, &format!("{at}[{n}]"))),
        _ => None,
    }
}

fn parse_error(path: &Path, document: usize, source: serde_yaml::Error) -> LocalError {
    let loc = source.location();
    LocalError::Parse {
        path: path.into(),
        document,
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        source,
    }
}

/// Reads one file of the folder within `limits` (a regular file, at most
/// `max_file_bytes`), as text for [`parse_file_limited`].
pub fn read_file(path: &Path, limits: &InputLimits) -> Result<String, LocalError> {
    limits::read_capped(path, limits.max_file_bytes).map_err(|e| match e {
        ReadError::Io(source) => LocalError::ReadFile {
            path: path.into(),
            source,
        },
        ReadError::Limit(reason) => LocalError::Limit {
            path: path.into(),
            document: None,
            reason,
        },
    })
}

/// The files the source reads, sorted so later files deterministically win on duplicates.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, LocalError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| LocalError::ReadDir {
            path: d.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.file_name().is_none_or(hidden) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if is_object_file(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What a scan decided, before it is sent.
#[derive(Debug, Default)]
pub struct ScanResult {
    pub events: Vec<SourceEvent>,
    pub errors: Vec<LocalError>,
}

/// One file's objects as parsed, with what every scan needs of them computed once: a scan
/// after one file changed then costs a lookup per object of the other files, not a fresh
/// key (three strings) per object.
#[derive(Debug)]
struct ParsedFile {
    located: Vec<Located>,
    /// Each object's key, by the same index.
    keys: Vec<Option<ObjectKey>>,
    /// The namespaces the file defines.
    namespaces: Vec<String>,
    /// The namespaces its namespaced objects are in, each once: checking a file against
    /// the namespaces in force is then a few lookups, not one per object.
    uses: BTreeSet<String>,
    /// Each document's object (none for an empty one) by a hash of the document's text,
    /// when the file could be split into documents (see [`split_documents`]): the next
    /// parse of the file parses only the documents whose text is new.
    documents: Documents,
}

/// Objects by the hash of their document's text.
type Documents = HashMap<u64, Option<Arc<Object>>>;

impl ParsedFile {
    fn new(located: Vec<Located>) -> Self {
        Self::with_documents(located, Documents::new())
    }

    fn with_documents(located: Vec<Located>, documents: Documents) -> Self {
        let keys: Vec<Option<ObjectKey>> = located.iter().map(|l| l.object.key()).collect();
        let namespaces = located
            .iter()
            .filter_map(|l| match &*l.object {
                Object::Namespace(ns) => ns.metadata.name.clone(),
                _ => None,
            })
            .collect();
        let mut uses = BTreeSet::new();
        for key in keys.iter().flatten() {
            if key.kind.namespaced() && !uses.contains(&key.namespace) {
                uses.insert(key.namespace.clone());
            }
        }
        ParsedFile {
            located,
            keys,
            namespaces,
            uses,
            documents,
        }
    }
}

/// A file's documents, split where the YAML stream splits them, when its text is plain
/// enough to split without a parser: no byte-order mark, no directives (`%`), no end
/// markers (`...`), and every line that starts with `---` is that marker alone. A line
/// `---` at the start of a line always separates documents (no scalar may contain one);
/// what comes before the first one is a document only if it holds more than comments.
/// Anything else is `None`, and the file is parsed whole.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    fn has_content(chunk: &str) -> bool {
        chunk.lines().any(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
    }
    if text.starts_with('\u{feff}') {
        return None;
    }
    let mut documents = Vec::new();
    let (mut start, mut offset, mut marked) = (0, 0, false);
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') || line.starts_with("...") {
            return None;
        }
        if line.starts_with("---") {
            if line.trim_end() != "---" {
                return None;
            }
            let chunk = &text[start..offset];
            if marked || has_content(chunk) {
                documents.push(chunk);
            }
            marked = true;
            start = offset + line.len();
        }
        offset += line.len();
    }
    let chunk = &text[start..];
    if marked || has_content(chunk) {
        documents.push(chunk);
    }
    Some(documents)
}

/// [`parse_file_limited`], parsing only the documents whose text `previous` (the file's
/// last parse) has not seen: a tool that rewrites a file of 200 Pods to change one has
/// one document parsed, not 200 (parsing was most of the controller's CPU under the
/// scale bench's churn). A file without a previous parse, a document that does not parse
/// alone, or a file that cannot be split, is parsed whole, so errors name documents, lines
/// and columns as a whole parse does. Document hashes are keyed by `state`, so no file can
/// be written to collide with another's.
fn parse_with_documents(
    path: &Path,
    text: &str,
    limits: &InputLimits,
    previous: Option<&ParsedFile>,
    state: &std::collections::hash_map::RandomState,
) -> Result<ParsedFile, Vec<LocalError>> {
    let whole = || parse_file_limited(path, text, limits).map(ParsedFile::new);
    let Some(split) = split_documents(text) else {
        return whole();
    };
    let Some(previous) = previous else {
        // Nothing to reuse (a new file, or one that failed last time): one parse of the
        // whole text, its objects remembered by their documents' texts. Parsing each
        // document alone first would parse a broken file twice on every scan.
        let located = parse_file_limited(path, text, limits)?;
        let mut by_document: HashMap<usize, Arc<Object>> = located
            .iter()
            .map(|l| (l.document, l.object.clone()))
            .collect();
        let documents = split
            .iter()
            .enumerate()
            .map(|(i, d)| (state.hash_one(d), by_document.remove(&(i + 1))))
            .collect();
        return Ok(ParsedFile::with_documents(located, documents));
    };
    let mut located = Vec::new();
    let mut documents = Documents::with_capacity(split.len());
    for (i, document) in split.into_iter().enumerate() {
        let hash = state.hash_one(document);
        let object = match previous.documents.get(&hash) {
            Some(object) => object.clone(),
            None => match parse_file_limited(path, document, limits) {
                Ok(mut alone) if alone.len() <= 1 => alone.pop().map(|l| l.object),
                _ => return whole(),
            },
        };
        if let Some(object) = &object {
            located.push(Located {
                object: object.clone(),
                document: i + 1,
            });
        }
        documents.insert(hash, object);
    }
    Ok(ParsedFile::with_documents(located, documents))
}

/// A file's parse, shared between scans while its text is unchanged.
type Parsed = Arc<ParsedFile>;

/// An object the model has from us: the parse it came from and its place there. Objects
/// of a file whose text did not change are the same parse, so comparing them with what
/// was sent is a pointer test rather than a deep comparison of every object.
#[derive(Clone, Debug)]
struct Served {
    file: Parsed,
    index: usize,
}

impl Served {
    fn object(&self) -> &Arc<Object> {
        &self.file.located[self.index].object
    }

    fn same_as(&self, other: &Served) -> bool {
        (Arc::ptr_eq(&self.file, &other.file) && self.index == other.index)
            || self.object() == other.object()
    }

    /// The 1-based index of its document in its file.
    fn document(&self) -> usize {
        self.file.located[self.index].document
    }
}

/// One definition of an object: the path of its file, and the object as it is served when
/// this definition is the first.
#[derive(Clone, Debug)]
struct Definition {
    path: Arc<Path>,
    served: Served,
}

impl Definition {
    /// Where it stands among a key's definitions: path order, then file order.
    fn place(&self) -> (&Path, usize) {
        (&self.path, self.served.index)
    }
}

/// The folder's state across scans: each file's last good objects, the parse of each
/// file's current text, and what the model has from us.
#[derive(Debug, Default)]
pub struct Scanner {
    dir: PathBuf,
    limits: InputLimits,
    /// The files as of the latest scan, in path order.
    files: BTreeSet<PathBuf>,
    last_good: BTreeMap<PathBuf, Parsed>,
    /// By file: a hash of the text and its successful parse. A large folder where one file
    /// changes is then parsed one file at a time, not whole on every rescan. A file that
    /// failed to read or parse has no entry, so a partial scan reads it again.
    parsed: HashMap<PathBuf, (u64, Parsed)>,
    /// Every definition of each key in the last good files, in path order then file order:
    /// the first is served, the others are duplicates. Kept across scans and updated for
    /// the files whose last good parse changed, so that a scan after one file changed
    /// touches that file's keys only, not every object of the folder (rebuilding it for
    /// all 11,000 objects of the scale bench was a quarter of the controller's CPU).
    definitions: HashMap<ObjectKey, Vec<Definition>>,
    /// The keys with more than one definition.
    duplicated: BTreeSet<ObjectKey>,
    /// The hasher of files' and documents' texts, keyed at random for each process, so no
    /// file can be written to collide with another's (see [`parse_with_documents`]).
    hashes: std::collections::hash_map::RandomState,
    sent: BTreeMap<ObjectKey, Served>,
}

/// Hidden names (editors' swap, lock and temporary files; `.git`), at any depth, are not
/// part of the folder; nor are names that are not UTF-8.
fn hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_none_or(|n| n.starts_with('.'))
}

/// The extensions the source reads.
fn is_object_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl Scanner {
    /// A scanner for a folder with the default [`InputLimits`]; nothing is read until
    /// [`Scanner::scan`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_limits(dir, InputLimits::default())
    }

    /// A scanner for a folder whose files must stay within `limits`.
    pub fn with_limits(dir: impl Into<PathBuf>, limits: InputLimits) -> Self {
        Scanner {
            dir: dir.into(),
            limits,
            ..Scanner::default()
        }
    }

    /// Lists and reads the whole folder and returns the events that bring the model up to
    /// date (a file whose text is unchanged is not parsed again).
    pub fn scan(&mut self) -> ScanResult {
        let files = match list_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                // Keep serving what we have: a folder that vanishes for a moment (a
                // checkout being swapped) must not empty the mesh.
                return ScanResult {
                    events: Vec::new(),
                    errors: vec![e],
                };
            }
        };
        self.files = files.into_iter().collect();
        let read: Vec<PathBuf> = self.files.iter().cloned().collect();
        self.update(&read)
    }

    /// Like [`Scanner::scan`], but reads only `changed` (paths the file-system watcher
    /// reported) and the files that failed last time; every other file keeps its parse.
    /// A change it cannot place on one file (a directory created, removed or renamed, a
    /// path outside the folder) makes it a full [`Scanner::scan`]; so does a first scan.
    pub fn scan_paths(&mut self, changed: &BTreeSet<PathBuf>) -> ScanResult {
        if self.files.is_empty() && self.parsed.is_empty() && self.sent.is_empty() {
            return self.scan();
        }
        let mut read = Vec::new();
        for path in changed {
            let Ok(relative) = path.strip_prefix(&self.dir) else {
                return self.scan();
            };
            if relative.as_os_str().is_empty() {
                return self.scan();
            }
            if relative.components().any(|c| hidden(c.as_os_str())) {
                continue;
            }
            // A directory, or one that was (files we know lie under it): rescan the tree.
            let was_dir = self
                .files
                .range(path.clone()..)
                .find(|f| *f != path)
                .is_some_and(|f| f.starts_with(path));
            if was_dir || path.is_dir() {
                return self.scan();
            }
            if !is_object_file(path) {
                continue;
            }
            // As a listing would: any entry that is not a directory, so a dangling link or
            // a FIFO is reported by the read rather than skipped.
            if std::fs::symlink_metadata(path).is_ok() {
                self.files.insert(path.clone());
                read.push(path.clone());
            } else {
                self.files.remove(path);
            }
        }
        // Files that failed last time are read again: their errors are reported by every
        // scan until they are fixed, as a full scan would.
        read.extend(
            self.files
                .iter()
                .filter(|p| !self.parsed.contains_key(*p))
                .cloned(),
        );
        read.sort();
        read.dedup();
        self.update(&read)
    }

    /// Reads `read` (files of `self.files`), takes every other file's parse from the
    /// cache, and computes the events and errors of the whole folder.
    fn update(&mut self, read: &[PathBuf]) -> ScanResult {
        let mut errors = Vec::new();
        let files = &self.files;
        self.parsed.retain(|p, _| files.contains(p));
        for path in read {
            let text = match read_file(path, &self.limits) {
                Ok(t) => t,
                Err(e) => {
                    self.parsed.remove(path);
                    errors.push(e);
                    continue;
                }
            };
            let hash = self.hashes.hash_one(&text);
            if self.parsed.get(path).is_some_and(|(h, _)| *h == hash) {
                continue;
            }
            let previous = self.parsed.get(path).map(|(_, p)| &**p);
            match parse_with_documents(path, &text, &self.limits, previous, &self.hashes) {
                Ok(parsed) => {
                    self.parsed.insert(path.clone(), (hash, Arc::new(parsed)));
                }
                Err(e) => {
                    self.parsed.remove(path);
                    errors.extend(e);
                }
            }
        }
        // The parse of every file whose current text parsed, read now or before.
        let mut fresh: BTreeMap<&PathBuf, &Parsed> = BTreeMap::new();
        for path in files {
            if let Some((_, objects)) = self.parsed.get(path) {
                fresh.insert(path, objects);
            }
        }
        // Namespace references are checked against the namespaces in force: those of the
        // fresh files plus the last good state of failing files. A file failing the check
        // falls back to its last good state, which may remove namespaces, so repeat until
        // nothing changes (each round fails at least one more file, so it terminates).
        loop {
            let in_force = |p: &PathBuf| fresh.get(p).copied().or_else(|| self.last_good.get(p));
            let mut namespaces: BTreeSet<&str> = BTreeSet::from([DEFAULT_NAMESPACE]);
            for path in files {
                if let Some(f) = in_force(path) {
                    namespaces.extend(f.namespaces.iter().map(String::as_str));
                }
            }
            let mut failed = Vec::new();
            for (path, objects) in &fresh {
                if objects
                    .uses
                    .iter()
                    .all(|ns| namespaces.contains(ns.as_str()))
                {
                    continue;
                }
                for (l, key) in objects.located.iter().zip(&objects.keys) {
                    let Some(key) = key else { continue };
                    if key.kind.namespaced() && !namespaces.contains(key.namespace.as_str()) {
                        errors.push(LocalError::UnknownNamespace {
                            path: (*path).clone(),
                            document: l.document,
                            namespace: key.namespace.clone(),
                            key: key.clone(),
                        });
                    }
                }
                failed.push(*path);
            }
            if failed.is_empty() {
                break;
            }
            for p in failed {
                fresh.remove(p);
            }
        }
        let mut replaced: Vec<(PathBuf, Option<Parsed>)> = Vec::new();
        for (path, objects) in fresh {
            if !self
                .last_good
                .get(path)
                .is_some_and(|g| Arc::ptr_eq(g, objects))
            {
                let old = self.last_good.insert(path.clone(), objects.clone());
                replaced.push((path.clone(), old));
            }
        }
        // Files that are gone take their objects with them.
        let gone: Vec<PathBuf> = self
            .last_good
            .keys()
            .filter(|p| !files.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            let old = self.last_good.remove(&path);
            replaced.push((path, old));
        }
        let events = self.redefine(replaced);
        errors.extend(self.duplicates());
        ScanResult { events, errors }
    }

    /// Updates the definitions for files whose last good parse was replaced (`old` is what
    /// they had; their new parse, if any, is in `last_good`), and returns the events that
    /// bring what the model has from us up to date for the keys they define or defined.
    /// The first definition of a key, in path order, is served, so which copy wins does
    /// not depend on the order of edits.
    fn redefine(&mut self, replaced: Vec<(PathBuf, Option<Parsed>)>) -> Vec<SourceEvent> {
        let mut touched: BTreeSet<ObjectKey> = BTreeSet::new();
        for (path, old) in replaced {
            if let Some(old) = old {
                for key in old.keys.iter().flatten() {
                    if let Some(defs) = self.definitions.get_mut(key) {
                        defs.retain(|d| *d.path != *path);
                        if defs.is_empty() {
                            self.definitions.remove(key);
                        }
                    }
                    if !touched.contains(key) {
                        touched.insert(key.clone());
                    }
                }
            }
            let Some(new) = self.last_good.get(&path) else {
                continue;
            };
            let at: Arc<Path> = Arc::from(path.as_path());
            for (index, key) in new.keys.iter().enumerate() {
                let Some(key) = key else { continue };
                let definition = Definition {
                    path: at.clone(),
                    served: Served {
                        file: new.clone(),
                        index,
                    },
                };
                let defs = self.definitions.entry(key.clone()).or_default();
                let place = defs.partition_point(|d| d.place() < definition.place());
                defs.insert(place, definition);
                if !touched.contains(key) {
                    touched.insert(key.clone());
                }
            }
        }
        let (mut deletes, mut applies) = (Vec::new(), Vec::new());
        for key in touched {
            let defs = self.definitions.get(&key);
            if defs.is_some_and(|d| d.len() > 1) {
                self.duplicated.insert(key.clone());
            } else {
                self.duplicated.remove(&key);
            }
            match defs.and_then(|d| d.first()) {
                None => {
                    if self.sent.remove(&key).is_some() {
                        deletes.push(SourceEvent::Delete(key));
                    }
                }
                Some(first) => {
                    let served = first.served.clone();
                    if !self.sent.get(&key).is_some_and(|s| s.same_as(&served)) {
                        applies.push(SourceEvent::Apply(served.object().clone()));
                    }
                    self.sent.insert(key, served);
                }
            }
        }
        deletes.extend(applies);
        deletes
    }

    /// Every copy of a key after its first, in path order then file order.
    fn duplicates(&self) -> Vec<LocalError> {
        let mut copies: Vec<(&Definition, &Path, &ObjectKey)> = Vec::new();
        for key in &self.duplicated {
            let Some((first, rest)) = self.definitions.get(key).and_then(|d| d.split_first())
            else {
                continue;
            };
            copies.extend(rest.iter().map(|d| (d, &*first.path, key)));
        }
        copies.sort_by(|(a, _, _), (b, _, _)| a.place().cmp(&b.place()));
        copies
            .into_iter()
            .map(|(copy, first, key)| LocalError::Duplicate {
                path: copy.path.to_path_buf(),
                document: copy.served.document(),
                first: first.to_path_buf(),
                key: key.clone(),
            })
            .collect()
    }
}

/// Longest a burst of changes may delay a rescan: changes reach proxies at least this
/// often while files keep changing.
const MAX_SETTLE: Duration = Duration::from_secs(1);

/// Timing of the watch loop.
#[derive(Clone, Copy, Debug)]
pub struct LocalOptions {
    /// Quiet time after a change before reading it, so the writes of one save (or of a
    /// tool writing several files) are one scan.
    pub debounce: Duration,
    /// Rescan the whole folder this often even without notifications.
    pub rescan: Duration,
    /// What a file may be before it is parsed.
    pub limits: InputLimits,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            // Short: a change waits this long before it is read, and every proxy waits
            // for it. Enough for a write-then-rename or a `cp` of several files to settle.
            debounce: Duration::from_millis(10),
            rescan: Duration::from_secs(10),
            limits: InputLimits::default(),
        }
    }
}

/// What the file-system watcher reported since the last scan.
#[derive(Debug, Default)]
struct Pending {
    /// The paths named by its events.
    paths: BTreeSet<PathBuf>,
    /// It failed or lost events (its queue overflowed): only a full scan is sure.
    full: bool,
}

/// What one scan reads.
#[derive(Debug)]
enum ScanRequest {
    /// List and read the whole folder.
    Full,
    /// Read these paths (and the files that failed before).
    Paths(BTreeSet<PathBuf>),
}

/// The [`Scanner`] on a thread of its own. Reading and parsing are blocking, CPU-bound
/// work whose cost depends on what someone put in the folder; on the runtime they would
/// stall every task that shares its worker threads (discovery streams, the CA, metrics).
/// A dedicated thread rather than `spawn_blocking`: the scanner's state (the parse cache)
/// lives there between scans, and the runtime never waits for a scan at shutdown.
struct ScanThread {
    requests: std::sync::mpsc::Sender<(ScanRequest, tokio::sync::oneshot::Sender<ScanResult>)>,
}

impl ScanThread {
    fn spawn(mut scanner: Scanner) -> Result<Self, LocalError> {
        let (requests, incoming) =
            std::sync::mpsc::channel::<(ScanRequest, tokio::sync::oneshot::Sender<ScanResult>)>();
        std::thread::Builder::new()
            .name("local-source-scan".into())
            .spawn(move || {
                // Ends when the source (the only sender) is dropped.
                while let Ok((request, reply)) = incoming.recv() {
                    let result = match request {
                        ScanRequest::Full => scanner.scan(),
                        ScanRequest::Paths(paths) => scanner.scan_paths(&paths),
                    };
                    let _ = reply.send(result);
                }
            })
            .map_err(LocalError::ScanThread)?;
        Ok(ScanThread { requests })
    }

    /// One scan, awaited without holding a runtime thread.
    async fn scan(&self, request: ScanRequest) -> Result<ScanResult, LocalError> {
        let gone = || LocalError::ScanThread(std::io::Error::other("the scanning thread stopped"));
        let (reply, result) = tokio::sync::oneshot::channel();
        self.requests.send((request, reply)).map_err(|_| gone())?;
        result.await.map_err(|_| gone())
    }
}

/// The watched folder as a model source.
pub struct LocalSource {
    dir: PathBuf,
    options: LocalOptions,
    errors: watch::Sender<Arc<Vec<LocalError>>>,
    scans: Arc<watch::Sender<u64>>,
}

impl LocalSource {
    /// A source for this folder.
    pub fn new(dir: impl Into<PathBuf>, options: LocalOptions) -> Self {
        LocalSource {
            dir: dir.into(),
            options,
            errors: watch::Sender::new(Arc::new(Vec::new())),
            scans: Arc::new(watch::Sender::new(0)),
        }
    }

    /// How many scans (full or of changed files) the source has done: a quiet folder
    /// costs none beyond the periodic rescan.
    pub fn scans(&self) -> watch::Receiver<u64> {
        self.scans.subscribe()
    }

    /// The problems found by the latest scan (empty when every file is good).
    pub fn errors(&self) -> watch::Receiver<Arc<Vec<LocalError>>> {
        self.errors.subscribe()
    }

    /// Scans, sends, and keeps watching until the model stops. Fails only when the
    /// folder cannot be watched at all.
    ///
    /// After the first (full) scan, each burst of notifications is one scan of the files
    /// they name, once the folder has been quiet for the debounce (at most
    /// [`MAX_SETTLE`] after the burst began); every `rescan` the whole folder is read
    /// again, in case the watcher missed something.
    pub async fn run(self, sink: SourceSink) -> Result<(), LocalError> {
        let changed = Arc::new(Notify::new());
        let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
        let (notify_changed, notify_pending) = (changed.clone(), pending.clone());
        let scans = self.scans.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Opening and reading a file changes nothing, and the scans themselves open
            // every file they read: taken as changes, each scan would start the next.
            if let Ok(notify::Event {
                kind: notify::EventKind::Access(access),
                ..
            }) = &res
            {
                if !matches!(
                    access,
                    notify::event::AccessKind::Close(notify::event::AccessMode::Write)
                ) {
                    return;
                }
            }
            if let Ok(mut p) = notify_pending.lock() {
                match res {
                    Ok(event) if !event.need_rescan() && !event.paths.is_empty() => {
                        p.paths.extend(event.paths);
                    }
                    Ok(_) => p.full = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "file watcher; rescanning the folder");
                        p.full = true;
                    }
                }
            }
            notify_changed.notify_one();
        })
        .map_err(|source| LocalError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        use notify::Watcher as _;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| LocalError::Watch {
                path: self.dir.clone(),
                source,
            })?;

        let scanner = ScanThread::spawn(Scanner::with_limits(&self.dir, self.options.limits))?;
        let mut first = true;
        let mut last_report = String::new();
        let mut request = ScanRequest::Full;
        let mut next_full = tokio::time::Instant::now() + self.options.rescan;
        loop {
            let ScanResult { mut events, errors } = scanner.scan(request).await?;
            scans.send_modify(|n| *n += 1);
            let report: String = errors
                .iter()
                .map(|e| crate::model::error_chain(e) + "\n")
                .collect();
            if report != last_report {
                for e in &errors {
                    tracing::error!(error = %crate::model::error_chain(e), "local source: file rejected, its last good objects stay in force");
                }
                if errors.is_empty() {
                    tracing::info!(dir = %self.dir.display(), "local source: every file is accepted again");
                }
                last_report = report;
            }
            self.errors.send_replace(Arc::new(errors));
            if first {
                events.push(SourceEvent::Synced);
                first = false;
            }
            if !events.is_empty() {
                tracing::debug!(events = events.len(), dir = %self.dir.display(), "local source changed");
                sink.send(events).await.map_err(LocalError::Model)?;
            }
            tokio::select! {
                () = changed.notified() => {
                    // Debounce: wait until the burst is over, but no longer than
                    // MAX_SETTLE after its first change. Without the cap, a folder that
                    // keeps changing faster than the debounce was never rescanned (the
                    // scale bench saw 10 s of churn reach proxies only after it stopped).
                    let deadline =
                        tokio::time::Instant::now() + MAX_SETTLE.max(self.options.debounce);
                    loop {
                        tokio::select! {
                            () = changed.notified() => {}
                            () = tokio::time::sleep(self.options.debounce) => break,
                            () = tokio::time::sleep_until(deadline) => break,
                        }
                    }
                }
                () = tokio::time::sleep_until(next_full) => {}
            }
            // Taken after the wait: a notification that comes while the scan below runs
            // leaves its permit in `changed`, so its paths are read by the next scan.
            let taken = pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_else(|_| Pending {
                    full: true,
                    ..Pending::default()
                });
            let now = tokio::time::Instant::now();
            request = if taken.full || now >= next_full {
                next_full = now + self.options.rescan;
                ScanRequest::Full
            } else {
                ScanRequest::Paths(taken.paths)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Documents, and things between them, that a folder may hold.
    const PIECES: &[&str] = &[
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec: {containers: []}\n",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  labels: {app: b}\nspec:\n  containers: []\n",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 80}]}\n",
        "# only a comment\n",
        "\n",
        "",
        "kind: Pod\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
        "apiVersion: v9\nkind: Nope\nmetadata: {name: x}\n",
        "apiVersion: v1\nkind: ConfigMap\ndata:\n  text: |\n    ---\n    not a marker, indented\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n...\n",
        "%YAML 1.2\n",
    ];
    const SEPARATORS: &[&str] = &["---\n", "--- \n", "---\r\n", "--- # c\n", "----\n"];

    /// A piece: mostly good documents, now and then one the parser refuses.
    fn piece(rng: &mut rand::rngs::StdRng) -> (&'static str, &'static str) {
        // Mostly plain markers, sometimes one the splitter must leave to the parser.
        let sep = if rng.random_range(0..12) == 0 {
            SEPARATORS[rng.random_range(0..SEPARATORS.len())]
        } else {
            "---\n"
        };
        let good = PIECES.len() - 5;
        let piece = if rng.random_range(0..12) == 0 {
            PIECES[rng.random_range(good..PIECES.len())]
        } else {
            PIECES[rng.random_range(0..good)]
        };
        (sep, piece)
    }

    fn text(pieces: &[(&str, &str)], leading_marker: bool) -> String {
        let mut text = String::new();
        for (i, (sep, piece)) in pieces.iter().enumerate() {
            if i > 0 || leading_marker {
                text.push_str(sep);
            }
            text.push_str(piece);
        }
        text
    }

    fn outcome(r: &Result<Vec<Located>, Vec<LocalError>>) -> Result<Vec<String>, Vec<String>> {
        match r {
            Ok(l) => Ok(l
                .iter()
                .map(|l| format!("{} {:?}", l.document, l.object))
                .collect()),
            Err(e) => Err(e.iter().map(|e| crate::model::error_chain(e)).collect()),
        }
    }

    /// A file edited at random, a document at a time, parsed with what its last good
    /// parse remembers: the same objects, document numbers and errors as a whole parse.
    #[test]
    fn documents_parsed_alone_or_remembered_give_what_a_whole_parse_gives() {
        let path = Path::new("f.yaml");
        let limits = InputLimits::default();
        let state = std::collections::hash_map::RandomState::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut pieces: Vec<(&str, &str)> = Vec::new();
        let mut previous: Option<ParsedFile> = None;
        let (mut split, mut remembered, mut failed) = (0, 0, 0);
        for round in 0..2_000 {
            match rng.random_range(0..4) {
                0 if !pieces.is_empty() => {
                    pieces.remove(rng.random_range(0..pieces.len()));
                }
                1 | 2 if !pieces.is_empty() => {
                    let at = rng.random_range(0..pieces.len());
                    pieces[at] = piece(&mut rng);
                }
                _ => {
                    let at = rng.random_range(0..=pieces.len());
                    pieces.insert(at, piece(&mut rng));
                }
            }
            if pieces.len() > 8 {
                pieces.truncate(4);
            }
            let text = text(&pieces, rng.random_range(0..3) == 0);
            let cached = parse_with_documents(path, &text, &limits, previous.as_ref(), &state);
            let whole = parse_file_limited(path, &text, &limits);
            split += usize::from(split_documents(&text).is_some());
            let cached = match cached {
                Ok(c) => {
                    if let Some(p) = &previous {
                        remembered += c
                            .documents
                            .keys()
                            .filter(|h| p.documents.contains_key(*h))
                            .count();
                    }
                    let located = c.located.clone();
                    previous = Some(c);
                    Ok(located)
                }
                Err(e) => {
                    failed += 1;
                    Err(e)
                }
            };
            assert_eq!(outcome(&cached), outcome(&whole), "round {round}: {text:?}");
        }
        // Every way was taken: split or not, documents remembered, files refused.
        assert!(
            split > 1_000 && split < 2_000 && remembered > 1_000 && failed > 100,
            "split {split}, remembered {remembered}, failed {failed}"
        );
    }

    #[test]
    fn a_marker_line_splits_documents_and_anything_unusual_is_left_to_the_parser() {
        assert_eq!(split_documents(""), Some(vec![]));
        assert_eq!(split_documents("# c\n"), Some(vec![]));
        assert_eq!(split_documents("a: 1\n"), Some(vec!["a: 1\n"]));
        assert_eq!(split_documents("# c\n---\na: 1\n"), Some(vec!["a: 1\n"]));
        assert_eq!(
            split_documents("a: 1\n---\nb: 2\n---\n"),
            Some(vec!["a: 1\n", "b: 2\n", ""])
        );
        assert_eq!(
            split_documents("---\n# c\n---  \nb: 2"),
            Some(vec!["# c\n", "b: 2"])
        );
        for unusual in [
            "%YAML 1.2\n---\na: 1\n",
            "a: 1\n...\n",
            "--- a\n",
            "----\n",
            "\u{feff}a: 1\n",
        ] {
            assert_eq!(split_documents(unusual), None, "{unusual:?}");
        }
    }
}
