//! Conversations as clients send them: OpenAI's `messages` (system, user and assistant turns; text
//! as a string or as parts; images as `image_url` parts) turned into the [`Turn`]s of LLaVA's chat
//! template and the images in the order the template places them. The server and the command
//! line's `--messages` read the same shape through this one parser; its errors name the field
//! (`messages[2].content[0].image_url.url`) and carry OpenAI's error code.

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::text::{Role, Turn, IMAGE_TOKEN};

/// One message of a `messages` array.
#[derive(Debug, Deserialize)]
pub struct Message {
    role: Option<String>,
    content: Option<Content>,
}

/// A message's content: plain text, or parts.
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part; which fields it needs depends on its `type`.
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    image_url: Option<ImageUrl>,
}

/// OpenAI's shape is `{"url": ...}`; a bare string is accepted too, as many clients send it.
#[derive(Debug)]
struct ImageUrl(String);

// Hand-written rather than `#[serde(untagged)]`, whose error ("did not match any variant")
// would hide which field inside the content was wrong.
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object {\"url\": ...} or a URL string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ImageUrl, E> {
                Ok(ImageUrl(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageUrl, A::Error> {
                let mut url = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "url" {
                        url = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                url.map(ImageUrl)
                    .ok_or_else(|| serde::de::Error::missing_field("url"))
            }
        }
        d.deserialize_any(V)
    }
}

/// What is wrong with a conversation: the field, OpenAI's error code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError {
    pub param: String,
    pub code: &'static str,
    pub message: String,
}

impl MessageError {
    fn new(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        MessageError {
            param: param.into(),
            code,
            message: message.into(),
        }
    }

    fn type_error(param: &str, want: &str) -> Self {
        MessageError::new(param, "invalid_type", format!("`{param}` must be {want}"))
    }
}

impl From<MessageError> for crate::Error {
    fn from(e: MessageError) -> Self {
        crate::Error::input(format!("{}: {}", e.param, e.message))
    }
}

/// An image of a conversation: its URL as sent and the field it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub url: String,
    pub param: String,
}

/// A conversation ready for the template: its turns, and its images in the template's order
/// (message by message; within a message, the images come before the text).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub turns: Vec<Turn>,
    pub images: Vec<ImageRef>,
}

/// The turns and images of `messages`, every message and part checked: roles `system` (or
/// `developer`, OpenAI's newer name), `user`, `assistant`; text as a string or `text` parts;
/// images (`image_url` parts) in user messages only. What the template itself requires (a last
/// user message, no `<image>` in the text) is checked by [`crate::text::check_conversation`].
pub fn conversation(messages: &[Message]) -> Result<Conversation, MessageError> {
    read(messages, false)
}

/// [`conversation`] where images come apart from the messages (transformers' convention, the
/// Python package's): a `{"type": "image"}` part marks where the next image stands; its
/// [`ImageRef::url`] is empty.
pub fn conversation_with_placeholders(messages: &[Message]) -> Result<Conversation, MessageError> {
    read(messages, true)
}

fn read(messages: &[Message], placeholders: bool) -> Result<Conversation, MessageError> {
    if messages.is_empty() {
        return Err(MessageError::new(
            "messages",
            "invalid_value",
            "`messages` is empty: send at least one user message",
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = match m.role.as_deref() {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(r) => {
                return Err(MessageError::new(
                    format!("{p}.role"),
                    "unsupported_value",
                    format!(
                        "`{p}.role` {r:?} is not supported (system, developer, user, assistant)"
                    ),
                ))
            }
            None => {
                return Err(MessageError::type_error(
                    &format!("{p}.role"),
                    "\"system\", \"user\" or \"assistant\"",
                ))
            }
        };
        let cp = format!("{p}.content");
        let mut turn = Turn {
            role,
            images: 0,
            texts: Vec::new(),
        };
        match &m.content {
            None => {
                return Err(MessageError::new(
                    &cp,
                    "missing_required_parameter",
                    format!("`{cp}` is required"),
                ))
            }
            Some(Content::Text(t)) => turn.texts.push(t.clone()),
            Some(Content::Parts(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("{cp}[{j}]");
                    match part.kind.as_deref() {
                        Some("text") => match &part.text {
                            Some(t) => turn.texts.push(t.clone()),
                            None => {
                                return Err(MessageError::type_error(
                                    &format!("{pp}.text"),
                                    "a string",
                                ))
                            }
                        },
                        Some(kind @ ("image_url" | "image")) => {
                            let url = match (kind, &part.image_url) {
                                ("image", _) if placeholders => String::new(),
                                ("image", _) => {
                                    return Err(MessageError::new(
                                        format!("{pp}.type"),
                                        "unsupported_value",
                                        "content part type \"image\" is not supported here: \
                                         send the image in an \"image_url\" part",
                                    ))
                                }
                                (_, Some(ImageUrl(url))) if !placeholders => url.clone(),
                                (_, Some(_)) => {
                                    return Err(MessageError::new(
                                        &pp,
                                        "unsupported_value",
                                        "pass the image apart from the messages and mark its \
                                         place with a {\"type\": \"image\"} part",
                                    ))
                                }
                                (_, None) => {
                                    return Err(MessageError::type_error(
                                        &format!("{pp}.image_url"),
                                        "an object {\"url\": ...}",
                                    ))
                                }
                            };
                            if role != Role::User {
                                return Err(MessageError::new(
                                    &pp,
                                    "unsupported_value",
                                    format!(
                                        "only user messages may hold images; {p} is a {} message",
                                        role.as_str()
                                    ),
                                ));
                            }
                            turn.images += 1;
                            images.push(ImageRef {
                                url,
                                param: format!("{pp}.image_url.url"),
                            });
                        }
                        Some(t) => {
                            return Err(MessageError::new(
                                format!("{pp}.type"),
                                "unsupported_value",
                                format!(
                                    "content part type {t:?} is not supported (use \"text\" and \
                                     \"image_url\")"
                                ),
                            ))
                        }
                        None => {
                            return Err(MessageError::type_error(
                                &format!("{pp}.type"),
                                "\"text\" or \"image_url\"",
                            ))
                        }
                    }
                }
            }
        }
        if turn.texts.iter().any(|t| t.contains(IMAGE_TOKEN)) {
            return Err(MessageError::new(
                &cp,
                "invalid_value",
                format!("the text must not contain {IMAGE_TOKEN}: images go in image_url parts"),
            ));
        }
        turns.push(turn);
    }
    crate::text::check_conversation(&turns)
        .map_err(|(i, msg)| MessageError::new(format!("messages[{i}]"), "invalid_value", msg))?;
    Ok(Conversation { turns, images })
}

/// Reads a `messages` JSON array (the command line's `--messages FILE`); type errors name their
/// field.
pub fn parse_messages(json: &str) -> Result<Conversation, MessageError> {
    conversation(&messages_of(json)?)
}

/// The messages of a JSON array, type errors naming their field.
pub fn messages_of(json: &str) -> Result<Vec<Message>, MessageError> {
    let de = &mut serde_json::Deserializer::from_str(json);
    let messages: Vec<Message> = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." {
            "messages".to_string()
        } else {
            format!("messages{}", path.trim_start_matches('.'))
        };
        MessageError::new(param, "invalid_type", e.inner().to_string())
    })?;
    Ok(messages)
}

/// The bytes of a `data:image/png;base64,...` or `data:image/jpeg;base64,...` URL; `Ok(None)`
/// when `url` is not a `data:` URL (a path, for the command line; refused by the server). At most
/// `max_bytes` are decoded.
pub fn data_url_bytes(
    url: &str,
    param: &str,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, MessageError> {
    let lower_start: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower_start.starts_with("http://") || lower_start.starts_with("https:/") {
        return Err(MessageError::new(
            param,
            "remote_image_unsupported",
            "remote image URLs are refused: nothing is fetched; send the image inline as a \
             data:image/png;base64,... or data:image/jpeg;base64,... URL",
        ));
    }
    // The scheme is case-insensitive (RFC 3986), and the media type may carry parameters
    // (`data:image/png;name=a.png;base64,...`, RFC 2397), which say nothing about the pixels.
    if !url
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
    {
        return Ok(None);
    }
    let rest = &url[5..];
    let invalid = |msg: &str| MessageError::new(param, "invalid_image_url", msg);
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(invalid("the data: URL has no ',' before its data"));
    };
    let meta = meta.to_ascii_lowercase();
    let mut parts = meta.split(';').map(str::trim);
    let mime = parts.next().unwrap_or_default();
    if parts.next_back() != Some("base64") {
        return Err(invalid(
            "the data: URL must be base64 (data:image/png;base64,...)",
        ));
    }
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
        return Err(MessageError::new(
            param,
            "invalid_image_format",
            format!("image type {mime:?} is not supported: send image/png or image/jpeg"),
        ));
    }
    // Refuse before decoding: base64 carries 3 bytes in 4 characters.
    let too_large = || {
        MessageError::new(
            param,
            "image_too_large",
            format!("the image is over the limit of {max_bytes} bytes"),
        )
    };
    if payload.len() / 4 * 3 > max_bytes.saturating_add(3) {
        return Err(too_large());
    }
    let payload: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(payload.as_bytes()).map_err(|e| {
        MessageError::new(
            param,
            "invalid_base64",
            format!("the image's base64 does not decode: {e}"),
        )
    })?;
    if bytes.len() > max_bytes {
        return Err(too_large());
    }
    if bytes.is_empty() {
        return Err(MessageError::new(
            param,
            "invalid_image",
            "the image is empty",
        ));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::data_url_bytes;

    #[test]
    fn data_urls_take_any_case_and_media_type_parameters() {
        let hi = Some(b"hi".to_vec());
        for url in [
            "data:image/png;base64,aGk=",
            "DATA:image/png;base64,aGk=",
            "Data:IMAGE/PNG;BASE64,aGk=",
            "data:image/png;name=a.png;base64,aGk=",
            "data:image/jpeg; charset=binary ;base64,aGk=",
        ] {
            assert_eq!(data_url_bytes(url, "p", 100).unwrap(), hi, "{url}");
        }
        assert_eq!(data_url_bytes("image.png", "p", 100).unwrap(), None);
        for (url, code) in [
            ("data:image/png,aGk=", "invalid_image_url"),
            ("data:image/png;base64;x=1,aGk=", "invalid_image_url"),
            ("data:image/gif;base64,aGk=", "invalid_image_format"),
            ("data:;base64,aGk=", "invalid_image_format"),
            ("HTTPS://example.com/a.png", "remote_image_unsupported"),
        ] {
            let e = data_url_bytes(url, "p", 100).unwrap_err();
            assert_eq!(e.code, code, "{url}: {e:?}");
        }
    }
}
