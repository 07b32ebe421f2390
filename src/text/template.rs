//! Chat templates: the Jinja template a checkpoint ships (`chat_template.jinja`, or the
//! `chat_template` field of `chat_template.json` or `tokenizer_config.json`), rendered as
//! transformers renders it, so every family's prompt format comes from its own folder instead of
//! code. A folder without one gets llava-hf's LLaVA-1.5 template.
//!
//! transformers renders with jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, Python's
//! string and dict methods, a `raise_exception` function) and passes the messages as parts
//! (`{"type": "image"}`, `{"type": "text", "text": …}`), `add_generation_prompt` and the
//! tokenizer's special tokens. minijinja with its Python-compatibility methods renders the same
//! templates; its `{% generation %}` tag (which only marks the assistant's text for training
//! masks) is dropped before parsing. A message's images come before its texts: the LLaVA
//! templates place them so whatever the order of the parts.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;

use super::Turn;
use crate::error::{Error, Result};

/// llava-hf's LLaVA-1.5 chat template (the `chat_template.json` of its checkpoints), as data:
/// `ROLE: ` (none for a system message), one `<image>\n` per image, each text part followed by a
/// space, and the generation prompt `ASSISTANT:`.
pub const LLAVA_15: &str = "{% for message in messages %}{% if message['role'] != 'system' %}\
{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in \
message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}\
{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in \
message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}\
{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', \
'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}\
{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// The special tokens a template may print (`{{ bos_token }}`), from `tokenizer_config.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// The tokens named in a `tokenizer_config.json` (each a string or an added-token object
    /// with a `content`); none when the file is absent.
    pub fn from_dir(dir: &Path) -> Result<SpecialTokens> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(SpecialTokens::default());
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let token = |name: &str| match v.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        Ok(SpecialTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            unk_token: token("unk_token"),
            pad_token: token("pad_token"),
        })
    }
}

/// A parsed chat template and where it came from.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file it was read from; none for the built-in LLaVA-1.5 template.
    origin: Option<PathBuf>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

/// One message as the template sees it.
#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Vec<Part<'a>>,
}

#[derive(Serialize)]
struct Part<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

impl ChatTemplate {
    /// llava-hf's LLaVA-1.5 template ([`LLAVA_15`]).
    pub fn llava15() -> ChatTemplate {
        Self::parse(LLAVA_15.to_string(), None).expect("the built-in template parses")
    }

    /// The template of a model folder: `chat_template.jinja`, else the `chat_template` field of
    /// `chat_template.json`, else of `tokenizer_config.json` (transformers' order); the built-in
    /// LLaVA-1.5 one when none holds a template. A template that does not parse is an error
    /// naming its file.
    pub fn from_dir(dir: &Path) -> Result<ChatTemplate> {
        for name in [
            "chat_template.jinja",
            "chat_template.json",
            "tokenizer_config.json",
        ] {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let source = if name.ends_with(".json") {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                        path: path.clone(),
                        msg: format!("not valid JSON: {e}"),
                    })?;
                match v.get("chat_template") {
                    None | Some(serde_json::Value::Null) => continue,
                    Some(serde_json::Value::String(s)) => s.clone(),
                    // A list of named templates: transformers' default is the one named "default".
                    Some(serde_json::Value::Array(list)) => {
                        let default = list.iter().find(|t| t["name"] == "default");
                        match default.and_then(|t| t["template"].as_str()) {
                            Some(s) => s.to_string(),
                            None => {
                                return Err(Error::Tokenizer {
                                    path,
                                    msg: "`chat_template` is a list without a template named \
                                          \"default\""
                                        .into(),
                                })
                            }
                        }
                    }
                    Some(_) => {
                        return Err(Error::Tokenizer {
                            path,
                            msg: "`chat_template` is neither a string nor a list of named \
                                  templates"
                                .into(),
                        })
                    }
                }
            } else {
                text
            };
            return Self::parse(source, Some(path));
        }
        Ok(Self::llava15())
    }

    /// A template from its source text (`origin` names its file in errors).
    pub fn parse(source: String, origin: Option<PathBuf>) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", without_generation_tags(&source))
            .map_err(|e| template_error(origin.as_deref(), "does not parse", &e))?;
        Ok(ChatTemplate { env, origin })
    }

    /// Where the template came from, for messages: its file, or "the built-in LLaVA-1.5
    /// template".
    pub fn origin(&self) -> String {
        match &self.origin {
            Some(p) => p.display().to_string(),
            None => "the built-in LLaVA-1.5 template".into(),
        }
    }

    /// The prompt text of a conversation with the generation prompt: each turn's images as
    /// `{"type": "image"}` parts, then its texts. An error raised by the template itself
    /// (`raise_exception`, say for a role it does not take) is an input error carrying its
    /// message.
    pub fn render(&self, turns: &[Turn], specials: &SpecialTokens) -> Result<String> {
        let messages: Vec<Message<'_>> = turns
            .iter()
            .map(|t| Message {
                role: t.role.as_str(),
                content: std::iter::repeat_with(|| Part {
                    kind: "image",
                    text: None,
                })
                .take(t.images)
                .chain(t.texts.iter().map(|x| Part {
                    kind: "text",
                    text: Some(x),
                }))
                .collect(),
            })
            .collect();
        let tmpl = self.env.get_template("chat").expect("added at parse");
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            ..Value::from_serialize(specials)
        };
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(msg) = e.detail() {
                    return Error::input(format!(
                        "the chat template ({}) refuses the conversation: {msg}",
                        self.origin()
                    ));
                }
            }
            template_error(self.origin.as_deref(), "cannot render the conversation", &e)
        })
    }
}

fn template_error(origin: Option<&Path>, what: &str, e: &JinjaError) -> Error {
    let path = origin
        .map(Path::to_path_buf)
        .unwrap_or_else(|| "<built-in>".into());
    Error::Tokenizer {
        path,
        msg: format!("chat template {what}: {e:#}"),
    }
}

/// `source` without transformers' `{% generation %}` / `{% endgeneration %}` tags (with any
/// whitespace-control marks), which render their body unchanged outside of training.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        let Some(end) = rest[at..].find("%}") else {
            break;
        };
        let inner = rest[at + 2..at + end]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..at]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[at..at + end + 2]);
        }
        rest = &rest[at + end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_dropped_and_nothing_else() {
        assert_eq!(
            without_generation_tags(
                "a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}"
            ),
            "abc{% if x %}d{% endif %}"
        );
        assert_eq!(without_generation_tags("{{ '%}' }}{%"), "{{ '%}' }}{%");
    }
}
