//! Limits on what the local source reads, checked before the YAML parser sees the text.
//!
//! The folder is an input like any other: a file dropped into it by mistake or by someone
//! hostile must not stall the controller. Two properties of the parser make that possible
//! without limits: serde_yaml (libyaml underneath) spends time quadratic in the nesting
//! depth of flow collections (200 KB of `[[[[` took it minutes), and a file is read whole
//! (a 50 MB file, or a symlink to `/dev/zero`, is memory the controller never gets back).
//! So before a file is parsed:
//!
//! - It must be a regular file (checked on the opened descriptor, so a swap between the
//!   check and the read changes nothing; a FIFO is opened non-blocking so it cannot hang
//!   the scan) and is read through a cap: at most `max_file_bytes + 1` bytes are ever read.
//! - Its nesting depth is measured by a YAML tokenizer (yaml-rust2's scanner, a separate
//!   implementation of the same token grammar) that stops at the first token past
//!   `max_depth`. Its cost per token is bounded by the depth it has reached, so the
//!   pre-scan is linear in the file's size whatever the file holds.
//!
//! A file that fails either check is refused with its path and the reason, and its last
//! good objects stay in force, like any other bad file.

use std::io::Read as _;
use std::path::Path;

use yaml_rust2::scanner::{Scanner, TokenType};

/// Default cap on one file's size: 1 MiB. Kubernetes refuses objects over 1.5 MiB (etcd's
/// request limit) and real manifests are a few KB; the largest file the controller's
/// scale benchmark writes (1,000 Services in one file) is about 210 KB. A 1 MiB file parses
/// in tens of milliseconds, so the cap also bounds how long one file can hold up a scan.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Default limit on nesting (collections inside collections, flow and block together).
/// The deepest Kubernetes objects Ambit reads (a Pod's
/// `spec.containers[].env[].valueFrom.secretKeyRef`, an HTTPRoute's filters, managed
/// fields) stay under 20 levels; 64 leaves room for anything real while keeping the
/// parser's per-token cost small. serde_yaml's own recursion guard (128) sits above this,
/// so a file that passes the pre-scan never meets it.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// The deepest limit the pre-scan can check: its tokenizer stops at 255 flow levels.
pub const MAX_DEPTH_LIMIT: usize = 255;

/// How the tokenizer (yaml-rust2 0.10) says it stopped at its own flow-level limit.
const TOKENIZER_DEPTH_ERROR: &str = "recursion limit exceeded";

/// The limits applied to every file of the folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLimits {
    /// Largest file read, in bytes.
    pub max_file_bytes: u64,
    /// Deepest nesting parsed.
    pub max_depth: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Why a file was refused before parsing.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The file is larger than the cap. `size` is known when the file said so up front;
    /// a file that grew while being read (or a device) only shows it passed the cap.
    #[error("{} over the limit of {limit} bytes per file (--local-max-file-bytes)", size_is(.size))]
    TooLarge { size: Option<u64>, limit: u64 },
    /// The path is not a regular file (a FIFO, a device, a socket), which could block or
    /// never end.
    #[error("not a regular file ({kind})")]
    NotAFile { kind: &'static str },
    /// Collections nest deeper than the limit.
    #[error("nesting deeper than {limit} levels at line {line}, column {column} (--local-max-yaml-depth)")]
    TooDeep {
        limit: usize,
        line: usize,
        column: usize,
    },
}

fn size_is(size: &Option<u64>) -> String {
    match size {
        Some(s) => format!("{s} bytes is"),
        None => "reading went".to_string(),
    }
}

/// The outcome of reading one file within the limits.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file cannot be opened or read.
    #[error("cannot read file")]
    Io(#[source] std::io::Error),
    /// The file breaks a limit.
    #[error(transparent)]
    Limit(LimitError),
}

/// Reads `path` as UTF-8 text, refusing anything but a regular file of at most `limit`
/// bytes. At most `limit + 1` bytes are read.
pub fn read_capped(path: &Path, limit: u64) -> Result<String, ReadError> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    // Non-blocking: opening a FIFO for reading would otherwise wait for a writer forever.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(ReadError::Limit(LimitError::NotAFile { kind }));
    }
    if meta.len() > limit {
        return Err(ReadError::Limit(LimitError::TooLarge {
            size: Some(meta.len()),
            limit,
        }));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::Limit(LimitError::TooLarge { size: None, limit }));
    }
    String::from_utf8(bytes)
        .map_err(|e| ReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Where the pre-scan stopped, when it did not reach the end.
#[derive(Debug, PartialEq, Eq)]
pub enum Nesting {
    /// The text nests deeper than the limit, in this document (1-based).
    TooDeep {
        document: usize,
        error: LimitErrorAt,
    },
    /// The tokenizer found a syntax error (reported instead of the parser's, see
    /// [`check_nesting`]).
    Syntax {
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Line and column (1-based) of the first token past the limit.
#[derive(Debug, PartialEq, Eq)]
pub struct LimitErrorAt {
    pub limit: usize,
    pub line: usize,
    pub column: usize,
}

impl LimitErrorAt {
    /// As the error reported for the file.
    pub fn into_error(self) -> LimitError {
        LimitError::TooDeep {
            limit: self.limit,
            line: self.line,
            column: self.column,
        }
    }
}

/// One open collection, as the pre-scan tracks them.
#[derive(Clone, Copy)]
enum Frame {
    /// A flow sequence; `true` while one of its entries is a single-pair mapping written
    /// without braces (`[a: b]`), which has no start token of its own either.
    FlowSequence(bool),
    FlowMapping,
    BlockSequence,
    /// A block mapping; `true` while one of its values is a sequence written at the
    /// mapping's own indentation (`key:\n- a`), which has no start token of its own.
    BlockMapping(bool),
}

/// Measures the nesting of `text` against `limit` in linear time, before any parse.
///
/// Flow collections (`[`, `{`) and block collections (indentation, `- `, `key:`) count
/// alike; the depth at any token is the number of collections open around it. Returns
/// `Ok(deepest)` when the whole text stays within `limit`.
///
/// A syntax error stops the tokenizer before the end, so what follows was not measured:
/// the tokenizer's error is reported and the parser never sees the text.
///
/// The text is read twice: once whole, and once cut before each line that starts with a
/// document marker (`---` or `...`). The two tokenizers disagree on where such a line
/// ends a scalar: libyaml always ends the document there, while yaml-rust2 keeps a block
/// scalar at the root (`|` with content at column 0) going over it, which hid the
/// collections after it (found by the fuzz target `yaml_prescan`). Each reading can only
/// miss nesting the other sees, so the deeper one counts and an error in either refuses
/// the text. The cost stays linear: every byte is tokenized at most twice.
pub fn check_nesting(text: &str, limit: usize) -> Result<usize, Nesting> {
    let whole = scan(text, limit, 0, &mut Documents::default())?;
    let mut deepest = whole;
    let mut documents = Documents::default();
    let mut line = 0;
    for part in split_at_document_markers(text) {
        deepest = deepest.max(scan(part, limit, line, &mut documents)?);
        line += part.matches('\n').count();
    }
    Ok(deepest)
}

/// The pieces of `text`, each starting at a line that begins with a document marker
/// (except the first). Concatenated, they are `text`.
fn split_at_document_markers(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        // The next marker line after the first line of `rest`.
        let mut at = 0;
        let cut = loop {
            match rest[at..].find('\n') {
                Some(nl) => {
                    at += nl + 1;
                    if is_document_marker_line(&rest[at..]) {
                        break Some(at);
                    }
                }
                None => break None,
            }
        };
        match cut {
            Some(cut) => {
                let (part, tail) = rest.split_at(cut);
                rest = tail;
                Some(part)
            }
            None => {
                done = true;
                Some(rest)
            }
        }
    })
}

/// Whether `line` (the text from a line start) opens with `---` or `...` followed by a
/// blank or the end of the line, which YAML reads as a document marker.
fn is_document_marker_line(line: &str) -> bool {
    (line.starts_with("---") || line.starts_with("..."))
        && matches!(
            line.as_bytes().get(3),
            None | Some(b' ' | b'\t' | b'\n' | b'\r')
        )
}

/// How far the numbering of documents has gone, carried from one piece of a text to the
/// next.
#[derive(Default)]
struct Documents {
    /// The current document, numbered from 1 as serde_yaml numbers them.
    current: usize,
    /// Whether the current document has content yet.
    content: bool,
    /// Whether the current document was opened by a `---`.
    explicit: bool,
}

/// A key or a value straight inside a flow sequence (`[a: b]`) opens a one-pair mapping,
/// which libyaml builds as a collection of its own though the tokenizer gives it no start
/// token (found by the fuzz target `yaml_prescan`). It ends with the entry.
fn open_flow_pair(frames: &mut [Frame], depth: &mut usize) {
    if let Some(Frame::FlowSequence(pair @ false)) = frames.last_mut() {
        *pair = true;
        *depth += 1;
    }
}

/// One tokenizer pass over `text`, whose first line is line `line_offset + 1` of the file.
fn scan(
    text: &str,
    limit: usize,
    line_offset: usize,
    documents: &mut Documents,
) -> Result<usize, Nesting> {
    let mut scanner = Scanner::new(text.chars());
    let mut frames: Vec<Frame> = Vec::new();
    let mut depth = 0usize;
    let mut deepest = 0usize;
    documents.current = documents.current.max(1);
    for token in &mut scanner {
        let mark = token.0;
        match token.1 {
            TokenType::DocumentStart => {
                // serde_yaml numbers documents as they come: a `---` opens a new one
                // unless nothing came before it.
                if documents.content || documents.explicit {
                    documents.current += 1;
                }
                documents.explicit = true;
                documents.content = false;
                // The open collections are not forgotten: a real `---` comes after the
                // tokenizer closed them all, and one it finds inside a quoted scalar at the
                // start of a line (which libyaml reads as text) must not hide the nesting
                // around it (found by the fuzz target `yaml_prescan`).
                continue;
            }
            TokenType::FlowSequenceStart => {
                frames.push(Frame::FlowSequence(false));
                depth += 1;
            }
            TokenType::FlowMappingStart => {
                frames.push(Frame::FlowMapping);
                depth += 1;
            }
            TokenType::BlockSequenceStart => {
                frames.push(Frame::BlockSequence);
                depth += 1;
            }
            TokenType::BlockMappingStart => {
                frames.push(Frame::BlockMapping(false));
                depth += 1;
            }
            TokenType::FlowSequenceEnd | TokenType::FlowMappingEnd | TokenType::BlockEnd => {
                match frames.pop() {
                    Some(Frame::BlockMapping(true) | Frame::FlowSequence(true)) => {
                        depth = depth.saturating_sub(2)
                    }
                    Some(_) => depth = depth.saturating_sub(1),
                    None => {}
                }
            }
            TokenType::BlockEntry => {
                if let Some(Frame::BlockMapping(indentless @ false)) = frames.last_mut() {
                    *indentless = true;
                    depth += 1;
                }
            }
            TokenType::Key => {
                if let Some(Frame::BlockMapping(indentless @ true)) = frames.last_mut() {
                    *indentless = false;
                    depth = depth.saturating_sub(1);
                } else {
                    open_flow_pair(&mut frames, &mut depth);
                }
            }
            TokenType::Value => open_flow_pair(&mut frames, &mut depth),
            TokenType::FlowEntry => {
                if let Some(Frame::FlowSequence(pair @ true)) = frames.last_mut() {
                    *pair = false;
                    depth = depth.saturating_sub(1);
                }
            }
            TokenType::StreamStart(_) | TokenType::StreamEnd => continue,
            _ => {}
        }
        documents.content = true;
        deepest = deepest.max(depth);
        if depth > limit {
            return Err(Nesting::TooDeep {
                document: documents.current,
                error: LimitErrorAt {
                    limit,
                    line: line_offset + mark.line(),
                    column: mark.col() + 1,
                },
            });
        }
    }
    if let Some(e) = scanner.get_error() {
        let mark = e.marker();
        // The tokenizer counts flow levels in a byte and gives up past 255 (before handing
        // out the tokens it holds back while a key may still follow): that is nesting past
        // any limit we allow.
        if e.info() == TOKENIZER_DEPTH_ERROR {
            return Err(Nesting::TooDeep {
                document: documents.current,
                error: LimitErrorAt {
                    limit,
                    line: line_offset + mark.line(),
                    column: mark.col() + 1,
                },
            });
        }
        // What follows the error was not measured, and libyaml is more lenient than this
        // tokenizer in places (found by the fuzz target `yaml_prescan`: a quoted scalar
        // continued at column 0), so the text is not handed to the parser at all.
        return Err(Nesting::Syntax {
            document: documents.current,
            line: line_offset + mark.line(),
            column: mark.col() + 1,
            message: e.info().to_string(),
        });
    }
    Ok(deepest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str) -> usize {
        check_nesting(text, 1000).unwrap_or_else(|e| panic!("{text:?}: {e:?}"))
    }

    #[test]
    fn measures_flow_and_block_nesting() {
        assert_eq!(depth(""), 0);
        assert_eq!(depth("a"), 0);
        assert_eq!(depth("[a, b]"), 1);
        assert_eq!(depth("[[a], {b: [c]}]"), 3);
        assert_eq!(depth("a: b\nc: d\n"), 1);
        assert_eq!(depth("a:\n  b:\n    c: [1]\n"), 4);
        assert_eq!(depth("- - - a\n"), 3);
        // A sequence at its key's indentation has no start token; it still counts.
        assert_eq!(depth("a:\n- b:\n  - c:\n    - d\n"), 6);
        // ... and ends with its mapping entry.
        assert_eq!(depth("a:\n- x\nb: y\nc:\n- z\n"), 2);
        assert_eq!(depth("? [a]\n: b\n"), 2);
        // A pair inside a flow sequence is a mapping of its own, up to the next entry.
        assert_eq!(depth("[a: b]"), 2);
        assert_eq!(depth("[x, \"a\": [c: d], y, [z]]"), 4);
        assert_eq!(depth("[: b]"), 2);
        assert_eq!(depth("[a: b, [c]]"), 2);
    }

    #[test]
    fn brackets_in_strings_comments_and_block_scalars_do_not_count() {
        let text = "a: \"[[[[\"\nb: '{{{{'\nc: |\n  [[[[[[\n  {{{{\nd: x[[[[ # [[[[\n# [[[[[[\n";
        assert_eq!(depth(text), 1);
        // Nor do closing brackets hide opening ones: the depth is that of real tokens.
        let text = "a: \"]]]]]]\"\nb: [[[[\"]]]]\"]]]]\n";
        assert_eq!(depth(text), 5);
    }

    #[test]
    fn stops_at_the_first_token_past_the_limit() {
        let deep = format!("x: {}{}", "[".repeat(100), "]".repeat(100));
        let Err(Nesting::TooDeep { document, error }) = check_nesting(&deep, 64) else {
            panic!("not refused");
        };
        assert_eq!(document, 1);
        // The mapping is the first level, so the 64th bracket is one too many.
        assert_eq!(
            error,
            LimitErrorAt {
                limit: 64,
                line: 1,
                column: 3 + 64
            }
        );
        let text = format!("a: 1\n---\nb: 2\n---\n{}", "- ".repeat(70));
        let Err(Nesting::TooDeep { document, error }) = check_nesting(&text, 64) else {
            panic!("block nesting not refused");
        };
        assert_eq!((document, error.line), (3, 5));
        let text = format!("{}x", "{a: ".repeat(65));
        assert!(matches!(
            check_nesting(&text, 64),
            Err(Nesting::TooDeep { .. })
        ));
        let mut indented = String::new();
        for i in 0..70 {
            indented.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(matches!(
            check_nesting(&indented, 64),
            Err(Nesting::TooDeep { .. })
        ));
        // At the limit exactly is fine.
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(check_nesting(&ok, 64), Ok(64));
    }

    #[test]
    fn a_200kb_attack_is_refused_quickly_in_work_not_time() {
        // The shapes that stall libyaml: the pre-scan gives up after `limit` levels, so
        // the work is a few hundred tokens whatever the size. (No timing here: the
        // controller test checks that serving never waits on a parse.)
        for text in [
            "[".repeat(200_000),
            format!("a: {}", "{a: ".repeat(50_000)),
            "- ".repeat(100_000),
        ] {
            let r = check_nesting(&text, 64);
            assert!(
                matches!(r, Err(Nesting::TooDeep { .. })),
                "{}: {r:?}",
                &text[..20]
            );
        }
    }

    #[test]
    fn syntax_errors_are_reported_by_the_pre_scan() {
        // (An unclosed `[` is the parser's to report: the tokenizer does not mind it.)
        let Err(Nesting::Syntax { document, .. }) = check_nesting("a: 1\n---\nb: \"c\n", 64) else {
            panic!("accepted");
        };
        assert_eq!(document, 2);
        // A quoted scalar continued at column 0, which libyaml accepts: what follows is not
        // measured, so it never reaches the parser.
        let text = "a:\n  b: [\"x\n*/x\", \"y\"]\n---\nd: {}\n";
        assert!(matches!(
            check_nesting(&text.replace("{}", &"[".repeat(70)), 64),
            Err(Nesting::Syntax { .. })
        ));
    }

    #[test]
    fn a_document_marker_inside_a_string_does_not_reset_the_depth() {
        let text = format!("a: [\"x\n---\ny\", {}{}]\n", "[".repeat(70), "]".repeat(70));
        // Refused either way: too deep, or (this tokenizer reads the marker as one) a
        // syntax error with too many brackets to hand to the parser.
        assert!(
            matches!(
                check_nesting(&text, 64),
                Err(Nesting::TooDeep { .. } | Nesting::Syntax { .. })
            ),
            "{:?}",
            check_nesting(&text, 64)
        );
    }

    #[test]
    fn a_root_block_scalar_does_not_hide_the_next_document() {
        // libyaml ends the scalar at `---` and reads a mapping holding a sequence; read
        // whole, yaml-rust2 would keep the scalar going and measure nothing.
        assert_eq!(depth("|\n---\n:\": \n- "), 2);
        let deep = format!("|\n---\n{}", "- ".repeat(70));
        let Err(Nesting::TooDeep { document, error }) = check_nesting(&deep, 64) else {
            panic!("accepted: {:?}", check_nesting(&deep, 64));
        };
        assert_eq!((document, error.line), (2, 3));
        // The pieces put back together are the text.
        let text = "a\n---\nb\n--- c\n...\n---x\n";
        let parts: Vec<&str> = split_at_document_markers(text).collect();
        assert_eq!(parts, ["a\n", "---\nb\n", "--- c\n", "...\n---x\n"]);
    }

    #[test]
    fn documents_are_numbered_as_serde_yaml_does() {
        let deep = "[".repeat(70);
        for (text, want) in [
            (deep.clone(), 1),
            (format!("---\n{deep}"), 1),
            (format!("a: 1\n---\n{deep}"), 2),
            (format!("---\na: 1\n---\n{deep}"), 2),
            (format!("---\n---\n{deep}"), 2),
        ] {
            match check_nesting(&text, 64) {
                Err(Nesting::TooDeep { document, .. }) => assert_eq!(document, want, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn read_capped_refuses_large_files_and_non_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = dir.path().join("small.yaml");
        std::fs::write(&small, "a: 1\n").expect("write");
        assert_eq!(read_capped(&small, 5).expect("read"), "a: 1\n");
        let err = read_capped(&small, 4).expect_err("over the cap");
        assert_eq!(
            err.to_string(),
            "5 bytes is over the limit of 4 bytes per file (--local-max-file-bytes)"
        );
        // A device that never ends: refused by type, never read.
        let zero = dir.path().join("zero.yaml");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        let err = read_capped(&zero, 1024).expect_err("device");
        assert_eq!(err.to_string(), "not a regular file (a character device)");
        // A FIFO with no writer: refused at once rather than waiting for one.
        let fifo = dir.path().join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let err = read_capped(&fifo, 1024).expect_err("fifo");
        assert_eq!(err.to_string(), "not a regular file (a FIFO)");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, b"a: \xff\n").expect("write");
        assert!(matches!(read_capped(&bad, 1024), Err(ReadError::Io(_))));
    }
}
