//! Loading blueprints from JSON and TOML: parse, validate (every problem), deserialize.

use super::model::Blueprint;
use super::problem::{did_you_mean, Problem};
use super::validate::validate;
use crate::limits::{human_bytes, human_size, BYTES_PER_VALUE};
use serde_json::{Map, Number, Value};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A blueprint file's format, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
}

impl Format {
    /// `.json` or `.toml` (any case); anything else is an error naming the allowed ones.
    pub fn from_path(path: &Path) -> Result<Format, String> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("json") => Ok(Format::Json),
            Some("toml") => Ok(Format::Toml),
            Some(other) => Err(format!(
                "unsupported extension \".{other}\": a blueprint is a .json or .toml file"
            )),
            None => Err("no extension: a blueprint is a .json or .toml file".to_string()),
        }
    }
}

/// Parses JSON or TOML text into a JSON value. Syntax errors give line and column.
///
/// TOML datetimes become strings; TOML has no `null`, and its non-finite floats (`nan`,
/// `inf`), which JSON cannot hold, become strings so the validator reports them.
pub fn parse_document(text: &str, format: Format) -> Result<Value, Problem> {
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| {
            Problem::new(
                "",
                format!(
                    "invalid JSON at line {}, column {}: {}",
                    e.line(),
                    e.column(),
                    json_error_text(&e)
                ),
            )
        }),
        Format::Toml => match text.parse::<toml::Table>() {
            Ok(table) => Ok(toml_to_json(toml::Value::Table(table))),
            Err(e) => {
                let at = e
                    .span()
                    .map(|span| {
                        let (line, col) = line_col(text, span.start);
                        format!(" at line {line}, column {col}")
                    })
                    .unwrap_or_default();
                Err(Problem::new(
                    "",
                    format!("invalid TOML{at}: {}", e.message().trim()),
                ))
            }
        },
    }
}

/// serde_json's message without its own " at line L column C" suffix (we print ours).
fn json_error_text(e: &serde_json::Error) -> String {
    let full = e.to_string();
    match full.rfind(" at line ") {
        Some(pos) => full[..pos].to_string(),
        None => full,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::Number(i.into()),
        toml::Value::Float(f) => Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| (k, toml_to_json(v)))
                .collect::<Map<String, Value>>(),
        ),
    }
}

/// Why a blueprint document is refused before it is parsed: larger than `MAX_BLUEPRINT_BYTES`.
///
/// Parsing takes far more memory than the text (about 200 bytes per value: 15 MB of bare
/// numbers took 1.1 GB), so one process loading every user's blueprints must refuse a huge
/// document before parsing it, not after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversize {
    /// The document's bytes; with `more`, at least this many (a file that kept growing past
    /// its checked length, or a pipe, is read no further).
    pub bytes: u64,
    pub more: bool,
    /// Values counted in the text (0 when it was refused on its length alone).
    pub values: u64,
    /// `MAX_BLUEPRINT_BYTES`.
    pub limit: usize,
}

impl fmt::Display for Oversize {
    /// Reads after the document's name: `big.json is 61.2 MB, over MAX_BLUEPRINT_BYTES …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = human_size(self.bytes);
        if self.values > 0 {
            let charged = self
                .bytes
                .saturating_add(self.values.saturating_mul(BYTES_PER_VALUE as u64));
            write!(
                f,
                "is {size} holding {} values, {} counting {BYTES_PER_VALUE} bytes for each, ",
                self.values,
                human_size(charged)
            )?;
        } else if self.more {
            write!(f, "is more than {size}, ")?;
        } else {
            write!(f, "is {size}, ")?;
        }
        write!(
            f,
            "over MAX_BLUEPRINT_BYTES ({}): split its data out of the blueprint, or raise \
             MAX_BLUEPRINT_BYTES",
            human_bytes(self.limit)
        )
    }
}

/// Checks a document's size against `limit` (`MAX_BLUEPRINT_BYTES`) before it is parsed: its
/// bytes plus 16 for each value in it (each list item, map entry or TOML key), the values
/// counted by one pass over the bytes that allocates nothing. The count is exact for JSON;
/// for TOML it is close (a table header counts too).
pub fn check_size(text: &str, format: Format, limit: usize) -> Result<(), Oversize> {
    let bytes = text.len();
    let over = |values| Oversize {
        bytes: bytes as u64,
        more: false,
        values,
        limit,
    };
    if bytes > limit {
        return Err(over(0));
    }
    let values = count_values(text, format);
    if values > ((limit - bytes) / BYTES_PER_VALUE) as u64 {
        return Err(over(values));
    }
    Ok(())
}

/// The values [`check_size`] counts in a document's text (or in a JSON value's text, such as a
/// variable's), without parsing it.
pub fn count_values(text: &str, format: Format) -> u64 {
    match format {
        Format::Json => json_values(text.as_bytes()),
        Format::Toml => toml_values(text.as_bytes()),
    }
}

/// Items and entries of a JSON text: its commas, `[` and `{` outside strings (a list of n
/// items has n - 1 commas and one `[`).
fn json_values(text: &[u8]) -> u64 {
    json_outside_strings(text)
        .filter(|(_, c)| matches!(c, b',' | b'[' | b'{'))
        .count() as u64
}

/// The bytes of a JSON text outside its strings, with their offsets, for scans that must not
/// parse (sizes, element boundaries): each string's opening quote is yielded, so a caller sees
/// where a string starts; its contents and its closing quote are not.
pub(crate) fn json_outside_strings(text: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    text.iter().enumerate().filter_map(move |(i, &c)| {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            None
        } else {
            in_string = c == b'"';
            Some((i, c))
        }
    })
}

/// The same for TOML: commas, `[`, `{` and `=` outside strings (basic, literal, and their
/// multi-line forms) and comments.
fn toml_values(text: &[u8]) -> u64 {
    let (mut n, mut i) = (0u64, 0usize);
    while i < text.len() {
        match text[i] {
            b'#' => {
                while i < text.len() && text[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                let triple = text[i..].starts_with(&[q, q, q]);
                i += if triple { 3 } else { 1 };
                while i < text.len() {
                    if q == b'"' && text[i] == b'\\' {
                        i += 2;
                    } else if triple && text[i..].starts_with(&[q, q, q]) {
                        i += 3;
                        break;
                    } else if !triple && (text[i] == q || text[i] == b'\n') {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b',' | b'[' | b'{' | b'=' => n += 1,
            _ => {}
        }
        i += 1;
    }
    n
}

/// Parses, validates (reporting every problem) and deserializes a blueprint, after checking
/// its size against `max_bytes` (`MAX_BLUEPRINT_BYTES`).
pub fn load_str(text: &str, format: Format, max_bytes: usize) -> Result<Blueprint, Vec<Problem>> {
    check_size(text, format, max_bytes)
        .map_err(|o| vec![Problem::new("", format!("the blueprint {o}"))])?;
    let doc = parse_document(text, format).map_err(|p| vec![p])?;
    load_value(doc)
}

/// Validates and deserializes a parsed document (e.g. a Supabase `jsonb` row).
pub fn load_value(doc: Value) -> Result<Blueprint, Vec<Problem>> {
    let problems = validate(&doc);
    if !problems.is_empty() {
        return Err(problems);
    }
    // The validator accepts only what the model reads, so this failing is our bug; it is
    // still reported as a problem, never a panic.
    serde_json::from_value(doc).map_err(|e| {
        vec![Problem::new(
            "",
            format!("internal error: the validated blueprint does not fit the model: {e}"),
        )]
    })
}

/// Why a blueprint file could not be loaded or found.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file was read but is not a valid blueprint.
    #[error("{}", invalid_text(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    /// The file is larger than `MAX_BLUEPRINT_BYTES`; it was not parsed.
    #[error("{} {size}", path.display())]
    TooLarge { path: PathBuf, size: Oversize },
    /// No file or blueprint of that name.
    #[error("{}", not_found_text(name, dir, available))]
    NotFound {
        name: String,
        dir: PathBuf,
        available: Vec<String>,
    },
}

fn invalid_text(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn not_found_text(name: &str, dir: &Path, available: &[String]) -> String {
    let path = Path::new(name);
    let looks_like_a_path = name.contains('/')
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "toml")
        );
    if looks_like_a_path {
        // The same blueprint under the other extension is the usual slip.
        let mut s = format!("no blueprint file {name}");
        let sibling = ["json", "toml"]
            .iter()
            .map(|ext| path.with_extension(ext))
            .find(|p| p.as_path() != path && p.is_file());
        match sibling {
            Some(p) => s.push_str(&format!(" — did you mean {}?", p.display())),
            None => s.push_str(": check the path, or give a blueprint's name from --dir"),
        }
        return s;
    }
    let mut s = format!(
        "no blueprint \"{name}\": not a file, and no blueprint in {} has that file name or name",
        dir.display()
    );
    if let Some(close) = did_you_mean(name, available.iter().map(String::as_str)) {
        s.push_str(&format!(" — did you mean \"{close}\"?"));
    }
    if available.is_empty() && !dir.is_dir() {
        s.push_str(&format!(
            " (there is no directory {}; --dir names the folder of blueprints)",
            dir.display()
        ));
    } else if available.is_empty() {
        s.push_str(&format!(
            " ({} holds no .json or .toml blueprints)",
            dir.display()
        ));
    } else {
        s.push_str(&format!(" (available: {})", available.join(", ")));
    }
    s
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Json => "json",
            Format::Toml => "toml",
        })
    }
}

/// Reads a blueprint file's text, refusing one larger than `max_bytes` (`MAX_BLUEPRINT_BYTES`)
/// from its length before reading a byte; the read itself stops one byte past the limit, so
/// a file that grows after the check, or a named pipe, cannot get past it either.
pub fn read_text(path: &Path, max_bytes: usize) -> Result<String, LoadError> {
    let io_error = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_large = |bytes, more| LoadError::TooLarge {
        path: path.to_path_buf(),
        size: Oversize {
            bytes,
            more,
            values: 0,
            limit: max_bytes,
        },
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    if len > max_bytes as u64 {
        return Err(too_large(len, false));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take((max_bytes as u64).saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > max_bytes {
        return Err(too_large(bytes.len() as u64, true));
    }
    String::from_utf8(bytes).map_err(|_| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}

/// Reads, checks the size of (`max_bytes`, `MAX_BLUEPRINT_BYTES`), validates and deserializes
/// one blueprint file.
pub fn load_file(path: &Path, max_bytes: usize) -> Result<Blueprint, LoadError> {
    let invalid = |problems| LoadError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let format = Format::from_path(path).map_err(|m| invalid(vec![Problem::new("", m)]))?;
    let text = read_text(path, max_bytes)?;
    check_size(&text, format, max_bytes).map_err(|size| LoadError::TooLarge {
        path: path.to_path_buf(),
        size,
    })?;
    let doc = parse_document(&text, format).map_err(|p| invalid(vec![p]))?;
    drop(text);
    load_value(doc).map_err(invalid)
}

/// Finds a blueprint: an existing file path; else `DIR/NAME.json` or `DIR/NAME.toml`; else
/// a blueprint in `dir` whose `name` field is `name_or_path`.
///
/// A blueprint found by name is returned even when it is invalid, so the caller reports its
/// problems rather than "not found". A file larger than `max_bytes` (`MAX_BLUEPRINT_BYTES`) is
/// not parsed to read its name: it is known by its file name.
pub fn resolve(name_or_path: &str, dir: &Path, max_bytes: usize) -> Result<PathBuf, LoadError> {
    let direct = Path::new(name_or_path);
    if direct.is_file() {
        return Ok(direct.to_path_buf());
    }
    for ext in ["json", "toml"] {
        let candidate = dir.join(format!("{name_or_path}.{ext}"));
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut available = Vec::new();
    for path in blueprint_files(dir).unwrap_or_default() {
        let name = read_text(&path, max_bytes)
            .ok()
            .and_then(|text| {
                let format = Format::from_path(&path).ok()?;
                check_size(&text, format, max_bytes).ok()?;
                parse_document(&text, format).ok()
            })
            .and_then(|doc| doc.get("name").and_then(Value::as_str).map(str::to_string));
        match name {
            Some(n) if n == name_or_path => return Ok(path),
            Some(n) => available.push(n),
            None => {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    available.push(stem.to_string());
                }
            }
        }
    }
    available.sort();
    available.dedup();
    Err(LoadError::NotFound {
        name: name_or_path.to_string(),
        dir: dir.to_path_buf(),
        available,
    })
}

/// Every `.json` / `.toml` file directly in `dir`, sorted by file name.
fn blueprint_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && Format::from_path(p).is_ok())
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// One file of a directory and what loading it gave.
pub type LoadedFile = (PathBuf, Result<Blueprint, LoadError>);

/// Loads every `.json` / `.toml` blueprint in `dir`, sorted by file name; one bad file (or
/// one larger than `max_bytes`, `MAX_BLUEPRINT_BYTES`) does not stop the others.
pub fn load_dir(dir: &Path, max_bytes: usize) -> Result<Vec<LoadedFile>, io::Error> {
    Ok(blueprint_files(dir)?
        .into_iter()
        .map(|p| {
            let loaded = load_file(&p, max_bytes);
            (p, loaded)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = parse_document("{\n  \"name\": \"x\",\n  oops\n}", Format::Json).unwrap_err();
        assert!(e.message.contains("line 3, column 3"), "{e}");
        let e = parse_document("name = \"x\"\nnodes = [\n", Format::Toml).unwrap_err();
        assert!(e.message.contains("invalid TOML at line"), "{e}");
    }

    #[test]
    fn extensions_are_checked() {
        assert_eq!(Format::from_path(Path::new("a.JSON")), Ok(Format::Json));
        assert_eq!(Format::from_path(Path::new("a.toml")), Ok(Format::Toml));
        let e = Format::from_path(Path::new("a.yaml")).unwrap_err();
        assert!(e.contains(".json or .toml"), "{e}");
    }

    #[test]
    fn values_are_counted_outside_strings() {
        assert_eq!(json_values(br#"[1,2,3]"#), 3);
        assert_eq!(json_values(br#"{"a":[1,2],"b":{"c":"x,[{"}}"#), 5);
        assert_eq!(json_values(br#""a\",[,""#), 0);
        assert_eq!(toml_values(b"a = [1, 2, 3]\nb = 'x,[{='\n"), 5);
        assert_eq!(toml_values(b"# a, b, [c]\nt = \"\"\"\n,,\"\n,\"\"\"\n"), 1);
        assert_eq!(toml_values(b"u = '''\n,,'\n,'''\nv = \"\\\",\""), 2);
    }

    #[test]
    fn a_document_is_charged_its_bytes_and_16_per_value() {
        // 1,000 numbers: 2 kB of text, 18 kB counting 16 bytes for each.
        let text = format!("{{\"v\":[{}1]}}", "1,".repeat(999));
        assert!(check_size(&text, Format::Json, 20_000).is_ok());
        let e = check_size(&text, Format::Json, 16_384).unwrap_err();
        assert_eq!(e.values, 1001);
        let msg = format!("x.json {e}");
        assert!(
            msg.starts_with("x.json is 2.0 kB holding 1001 values, 18.0 kB counting 16 bytes")
                && msg.ends_with(
                    "over MAX_BLUEPRINT_BYTES (16 KiB): split its data out of the blueprint, \
                     or raise MAX_BLUEPRINT_BYTES"
                ),
            "{msg}"
        );
        let e = check_size(&text, Format::Json, 1024).unwrap_err();
        assert_eq!((e.bytes, e.values), (text.len() as u64, 0));
    }

    #[test]
    fn a_file_is_refused_by_its_length_and_a_pipe_by_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.json");
        std::fs::write(&file, "x".repeat(5000)).unwrap();
        let e = load_file(&file, 4096).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "big.json is 5.0 kB, over MAX_BLUEPRINT_BYTES (4 KiB): split its data out of \
                 the blueprint, or raise MAX_BLUEPRINT_BYTES"
            ),
            "{e}"
        );

        // A named pipe has no length: the read stops one byte past the limit, while the
        // writer would go on for ever.
        let fifo = dir.path().join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain libc call on a path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                let chunk = [b' '; 4096];
                // Ends when the reader closes its end (EPIPE; Rust ignores SIGPIPE).
                while w.write_all(&chunk).is_ok() {}
            })
        };
        let e = load_file(&fifo, 4096).unwrap_err().to_string();
        assert!(
            e.contains("is more than 4.1 kB, over MAX_BLUEPRINT_BYTES (4 KiB)"),
            "{e}"
        );
        writer.join().unwrap();
    }

    #[test]
    fn toml_datetimes_become_strings() {
        let v = parse_document("when = 1979-05-27T07:32:00Z\nx = nan", Format::Toml).unwrap();
        assert_eq!(v["when"], Value::String("1979-05-27T07:32:00Z".into()));
        assert!(v["x"].is_string());
    }
}
