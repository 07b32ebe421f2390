//! The question files `distill` reads: the VQA v2 questions JSON and a simple JSONL, told apart by
//! their content; image paths resolved against the images folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Which input format a question file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"questions": [{"image_id": int, "question": str, "question_id": int}, ...]}` with COCO
    /// image file names.
    Vqa,
    /// One `{"image": path, "question": str, "answers"?: [str]}` object per line; the id is the
    /// line number (1-based).
    Jsonl,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Vqa => "vqa",
            Format::Jsonl => "jsonl",
        }
    }
}

/// Where a sample's image comes from, before it is looked up on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    /// A COCO image id: `COCO_val2014_{id:012}.jpg`, `COCO_train2014_{id:012}.jpg` or
    /// `{id:012}.jpg` in the images folder, the first that exists.
    Coco(u64),
    /// A path as written in the JSONL (relative ones are taken inside the images folder).
    Path(String),
}

/// One question of the input, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `question_id` (VQA) or the line number (JSONL).
    pub id: u64,
    pub question: String,
    pub image: ImageRef,
    pub answers: Option<Vec<String>>,
    /// JSONL only, optional: the question's category (`"type"`, e.g. `color`), for per-type
    /// accuracy in `fastrm eval`.
    pub qtype: Option<String>,
    /// JSONL only, optional: objects in the scene (`"n_objects"`).
    pub n_objects: Option<u64>,
    /// JSONL only, optional: the target object's mask (`"target_mask"`), an 8-bit greyscale PNG at
    /// the image's resolution, nonzero on the object, as written (relative paths are taken from
    /// the JSONL file's folder); `null` or absent: no target. `fastrm eval`'s pointing game.
    pub target_mask: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub entries: Vec<Entry>,
    /// FNV-1a 64 of the file's bytes, hex: identifies the input in the manifest.
    pub fingerprint: String,
}

impl Dataset {
    /// Reads and validates a question file; the format is detected from the content.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let fingerprint = format!("{:016x}", crate::util::fnv1a64(&bytes));
        let text = String::from_utf8(bytes)
            .map_err(|e| Error::input(format!("{}: not UTF-8 text: {e}", path.display())))?;
        if text.trim().is_empty() {
            return Err(Error::input(format!(
                "{}: the question file is empty",
                path.display()
            )));
        }
        let (format, entries) = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut o)) if o.contains_key("questions") => {
                let questions = o.remove("questions").unwrap_or_default();
                (Format::Vqa, parse_vqa(path, questions)?)
            }
            Ok(Value::Object(_)) => (Format::Jsonl, parse_jsonl(path, &text)?),
            Ok(_) => {
                return Err(Error::input(format!(
                    "{}: expected the VQA questions JSON ({{\"questions\": [...]}}) or JSONL \
                     (one {{\"image\", \"question\"}} object per line)",
                    path.display()
                )))
            }
            Err(whole) => {
                // Not one JSON document: JSONL if its first line is an object, otherwise report
                // both readings.
                let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                if serde_json::from_str::<serde_json::Map<String, Value>>(first).is_ok() {
                    (Format::Jsonl, parse_jsonl(path, &text)?)
                } else {
                    return Err(Error::input(format!(
                        "{}: neither VQA questions JSON ({whole}) nor JSONL (line 1 is not a JSON object)",
                        path.display()
                    )));
                }
            }
        };
        if entries.is_empty() {
            return Err(Error::input(format!(
                "{}: the question file has no questions",
                path.display()
            )));
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            format,
            entries,
            fingerprint,
        })
    }
}

/// A VQA v2 question as the file has it (other fields ignored).
#[derive(Deserialize)]
struct VqaQuestion {
    image_id: u64,
    question: String,
    question_id: u64,
}

/// A JSONL line as written.
#[derive(Deserialize)]
struct JsonlLine {
    image: String,
    question: String,
    answers: Option<Vec<String>>,
    #[serde(rename = "type")]
    qtype: Option<String>,
    n_objects: Option<u64>,
    target_mask: Option<String>,
}

/// `value` as `T`; a field that is missing or of the wrong type is an error naming its path.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => e.into_inner().to_string(),
            _ => format!("`{path}`: {}", e.into_inner()),
        }
    })
}

fn parse_vqa(path: &Path, questions: Value) -> Result<Vec<Entry>> {
    #[derive(Deserialize)]
    struct File {
        questions: Vec<VqaQuestion>,
    }
    let file: File = typed(serde_json::json!({ "questions": questions }))
        .map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
    file.questions
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            if q.question.trim().is_empty() {
                return Err(Error::input(format!(
                    "{}: `questions[{i}].question` is empty",
                    path.display()
                )));
            }
            Ok(Entry {
                id: q.question_id,
                image: ImageRef::Coco(q.image_id),
                question: q.question,
                answers: None,
                qtype: None,
                n_objects: None,
                target_mask: None,
            })
        })
        .collect()
}

fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| Error::input(format!("{}: line {line_no}: {msg}", path.display()));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad("not a JSON object"));
        }
        let l: JsonlLine = typed(v).map_err(|e| bad(&e))?;
        for (k, s) in [("image", &l.image), ("question", &l.question)] {
            if s.trim().is_empty() {
                return Err(bad(&format!("`{k}` is empty")));
            }
        }
        for (k, s) in [("type", &l.qtype), ("target_mask", &l.target_mask)] {
            if s.as_ref().is_some_and(|s| s.trim().is_empty()) {
                return Err(bad(&format!("`{k}` must be a non-empty string or null")));
            }
        }
        out.push(Entry {
            id: line_no as u64,
            question: l.question,
            image: ImageRef::Path(l.image),
            answers: l.answers,
            qtype: l.qtype,
            n_objects: l.n_objects,
            target_mask: l.target_mask,
        });
    }
    Ok(out)
}

/// The image file of an entry: a JSONL path (relative to `images`), or the first existing COCO
/// name for a VQA image id. The error names every name tried.
pub fn resolve_image(images: &Path, entry: &Entry) -> Result<PathBuf> {
    match &entry.image {
        ImageRef::Path(p) => {
            let p = Path::new(p);
            let full = if p.is_absolute() {
                p.to_path_buf()
            } else {
                images.join(p)
            };
            if full.is_file() {
                Ok(full)
            } else {
                Err(Error::input(format!(
                    "question {}: image {} not found",
                    entry.id,
                    full.display()
                )))
            }
        }
        ImageRef::Coco(id) => {
            let names = [
                format!("COCO_val2014_{id:012}.jpg"),
                format!("COCO_train2014_{id:012}.jpg"),
                format!("{id:012}.jpg"),
            ];
            names
                .iter()
                .map(|n| images.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::input(format!(
                        "question {}: no image for image_id {id} in {} (tried {})",
                        entry.id,
                        images.display(),
                        names.join(", ")
                    ))
                })
        }
    }
}
