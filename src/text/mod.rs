//! Text side: `tokenizer.json` through the `tokenizers` crate, the model folder's chat template
//! ([`template`]), and `<image>` expansion.
//!
//! The prompt of a conversation is its rendered template, tokenized with the tokenizer's special
//! tokens (BOS) unless the text already starts with BOS (templates that print `{{ bos_token }}`),
//! as transformers' processors do. transformers' processor expands `<image>` to each image's
//! token count in the text before tokenizing; since `<image>` is an added token, the text on
//! either side tokenizes the same whether one copy or many stand between, so we tokenize once and
//! expand the ids.

pub mod template;

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use template::{ChatTemplate, SpecialTokens};

pub const IMAGE_TOKEN: &str = "<image>";

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message as the chat template sees it: its images (placed before its text) and its text
/// parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub images: usize,
    pub texts: Vec<String>,
}

impl Turn {
    pub fn new(role: Role, images: usize, text: impl Into<String>) -> Self {
        Turn {
            role,
            images,
            texts: vec![text.into()],
        }
    }
}

/// What the template needs of a conversation: at least one message, the last one the user's,
/// images in user messages only, no `<image>` in any text, no message without text or image.
/// Errors are `(message index, why)`.
pub fn check_conversation(turns: &[Turn]) -> std::result::Result<(), (usize, String)> {
    let Some(last) = turns.last() else {
        return Err((0, "the conversation is empty".into()));
    };
    for (i, t) in turns.iter().enumerate() {
        if t.images > 0 && t.role != Role::User {
            return Err((
                i,
                format!(
                    "a {} message holds an image; only user messages can",
                    t.role.as_str()
                ),
            ));
        }
        if t.texts.iter().any(|x| x.contains(IMAGE_TOKEN)) {
            return Err((
                i,
                format!("the text must not contain {IMAGE_TOKEN}: the engine places images itself"),
            ));
        }
        if t.images == 0 && t.texts.iter().all(|x| x.trim().is_empty()) {
            return Err((i, format!("the {} message is empty", t.role.as_str())));
        }
    }
    if last.role != Role::User {
        return Err((
            turns.len() - 1,
            format!(
                "the conversation must end with a user message, not a {} one",
                last.role.as_str()
            ),
        ));
    }
    Ok(())
}

#[derive(Clone)]
pub struct TextProcessor {
    tok: Tokenizer,
    path: PathBuf,
    template: ChatTemplate,
    specials: SpecialTokens,
}

impl TextProcessor {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "file not found (the model folder needs a tokenizer.json)".into(),
            });
        }
        let tok = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("cannot load: {e}"),
        })?;
        Ok(TextProcessor {
            tok,
            path: path.to_path_buf(),
            template: ChatTemplate::llava15(),
            specials: SpecialTokens::default(),
        })
    }

    /// The tokenizer of a model folder with its chat template ([`ChatTemplate::from_dir`]) and
    /// the special tokens its `tokenizer_config.json` names.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut t = Self::from_file(&dir.join("tokenizer.json"))?;
        t.template = ChatTemplate::from_dir(dir)?;
        t.specials = SpecialTokens::from_dir(dir)?;
        Ok(t)
    }

    /// The chat template conversations are rendered with.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The prompt text of a conversation: its turns checked ([`check_conversation`]), then
    /// rendered with the generation prompt.
    pub fn render_chat(&self, turns: &[Turn]) -> Result<String> {
        check_conversation(turns)
            .map_err(|(i, msg)| Error::input(format!("message {i}: {msg}")))?;
        self.template.render(turns, &self.specials)
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// Expanded prompt ids for a user question: BOS, template, and `n_patches` image-token ids.
    pub fn prompt_ids(
        &self,
        question: &str,
        image_token_id: u32,
        n_patches: usize,
    ) -> Result<Vec<u32>> {
        if question.trim().is_empty() {
            return Err(Error::input("the question is empty"));
        }
        self.chat_ids(
            &[Turn::new(Role::User, 1, question)],
            image_token_id,
            &[n_patches],
        )
    }

    /// Expanded prompt ids of a conversation ([`Self::render_chat`]): image `i`'s `<image>` becomes
    /// `tokens[i]` image-token ids.
    pub fn chat_ids(
        &self,
        turns: &[Turn],
        image_token_id: u32,
        tokens: &[usize],
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(turns)?;
        match self.tok.token_to_id(IMAGE_TOKEN) {
            Some(id) if id == image_token_id => {}
            Some(id) => {
                return Err(self.err(format!(
                    "{IMAGE_TOKEN} has id {id} here but the model's config says {image_token_id}"
                )))
            }
            None => return Err(self.err(format!("no {IMAGE_TOKEN} token in the vocabulary"))),
        }
        let bos_printed = (self.specials.bos_token.as_deref())
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let ids = self.encode_with(&text, !bos_printed)?;
        let want: usize = turns.iter().map(|t| t.images).sum();
        if tokens.len() != want {
            return Err(Error::input(format!(
                "the messages place {want} images but {} token counts were given",
                tokens.len()
            )));
        }
        let n_img = ids.iter().filter(|&&i| i == image_token_id).count();
        if n_img != want {
            return Err(self.err(format!(
                "the template should yield {want} {IMAGE_TOKEN} tokens, got {n_img}"
            )));
        }
        let mut out = Vec::with_capacity(ids.len() + tokens.iter().sum::<usize>());
        let mut next = tokens.iter();
        for id in ids {
            if id == image_token_id {
                let n = *next.next().expect("one count per image, checked above");
                out.extend(std::iter::repeat_n(image_token_id, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Ids of a text with the tokenizer's special tokens (BOS) added, no template, no expansion.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Ids of a text, with or without the tokenizer's special tokens.
    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.tok
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.err(format!("cannot encode text: {e}")))
    }

    /// Text of generated ids, special tokens (EOS) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| self.err(format!("cannot decode ids: {e}")))
    }

    /// Whether the text of `ids` may still change with later ids: their last token with a text
    /// is a byte-fallback token (`<0xAB>`). The decoder turns a run of those into text only as a
    /// whole (an invalid run becomes one U+FFFD per byte), and ids without a token (a padded
    /// vocabulary's tail) decode to nothing, so they do not end a run.
    pub fn ends_in_byte_run(&self, ids: &[u32]) -> bool {
        let last = ids.iter().rev().find_map(|&id| self.tok.id_to_token(id));
        last.is_some_and(|t| {
            let b = t.as_bytes();
            b.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && b[3..5].iter().all(u8::is_ascii_hexdigit)
        })
    }

    /// Text of a single token, as shown next to its map.
    pub fn token_text(&self, id: u32) -> String {
        self.tok.decode(&[id], false).unwrap_or_default()
    }

    /// A token as it stands inside a text: its vocabulary piece with SentencePiece's `▁` as the
    /// space it is (a lone decode strips a leading one), and its bytes — for a byte-fallback
    /// token (`<0xE2>`) the one raw byte, which alone is not UTF-8 (its text is then U+FFFD).
    /// What log-probabilities report per token, so that the pieces add up to the answer.
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        let Some(piece) = self.tok.id_to_token(id) else {
            return (String::new(), Vec::new());
        };
        let byte = piece
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match byte {
            Some(b) => (String::from_utf8_lossy(&[b]).into_owned(), vec![b]),
            None => {
                let text = piece.replace('\u{2581}', " ");
                let bytes = text.as_bytes().to_vec();
                (text, bytes)
            }
        }
    }
}
