//! OpenAI's chat-completions wire format: the request checked field by field (so an error can
//! name the field, as OpenAI's do), the response objects and chunks, and the relevancy extension.

use base64::Engine as _;
use serde::de::{SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::chat;
use crate::engine::{Confidence, StopReason, TokenLogprobs, TokenMap};
use crate::explain::{Method, MethodName};
use crate::model::sampling::Sampling;
use crate::text::Turn;
use crate::vision::ImageLayout;
use crate::GenerateOptions;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(
        param: impl Into<Option<String>>,
        code: &'static str,
        msg: impl Into<String>,
    ) -> Self {
        ApiError {
            status: 400,
            message: msg.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: Some(code),
        }
    }

    pub fn too_large(
        param: impl Into<Option<String>>,
        code: &'static str,
        msg: impl Into<String>,
    ) -> Self {
        ApiError {
            status: 413,
            ..Self::invalid(param, code, msg)
        }
    }

    /// 503: the server cannot take the request now (memory, KV cache, shutting down).
    pub fn unavailable(code: &'static str, msg: impl Into<String>) -> Self {
        ApiError {
            status: 503,
            code: Some(code),
            ..Self::server(msg)
        }
    }

    pub fn server(msg: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: msg.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// A chat request the engine can run.
#[derive(Debug)]
pub struct ChatRequest {
    /// Choices: continuations of the one prompt, choice `i` sampled with the seed plus `i`.
    pub n: usize,
    /// The conversation, for the chat template (each image placed where it was sent).
    pub turns: Vec<Turn>,
    /// The images in order, each with the field it came from (`messages[i].content[j].image_url`).
    pub images: Vec<(ImageSource, String)>,
    /// `None`: as many as fit, up to the server's default.
    pub max_tokens: Option<usize>,
    /// The field that set `max_tokens`, for errors about it.
    pub max_tokens_param: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    pub relevancy: Option<Method>,
    /// `relevancy.ungrounded`: FastRM only, one choice; `Stop` only when streamed.
    pub ungrounded: Option<Ungrounded>,
    pub ignore_eos: bool,
    /// Temperature, top-p, seed, penalties, log-probabilities.
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// The model asked for, checked by the server against the one it serves.
    pub model: Option<String>,
}

/// What a request may carry at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_image_bytes: usize,
    /// Whether http(s) image URLs are taken (`--allow-image-urls`); refused by name otherwise.
    pub image_urls: bool,
    /// Largest accepted image in pixels (width × height, after decoding).
    pub max_image_pixels: usize,
    /// The model's context: no answer can be longer.
    pub context: usize,
}

/// Where a request's image comes from.
#[derive(Debug)]
pub enum ImageSource {
    /// A `data:` URL's bytes.
    Inline(Vec<u8>),
    /// An http(s) URL, fetched after every cheap check ([`super::fetch::ImageFetcher`]).
    Url(String),
}

/// Whether a URL asks for a fetch (any case, as schemes are case-insensitive).
fn is_remote(url: &str) -> bool {
    let start = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    start.starts_with("http://") || start.starts_with("https://")
}

fn param(p: &str) -> Option<String> {
    Some(p.to_string())
}

/// The request body as clients send it: every field optional here (what is required, and
/// each value's range, is checked after, with OpenAI's error codes); fields not listed are
/// ignored.
#[derive(Deserialize)]
struct RawChat {
    messages: Option<Vec<chat::Message>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<RawStreamOptions>,
    n: Option<u64>,
    ignore_eos: Option<bool>,
    relevancy: Option<RawRelevancy>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<RawStop>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    model: Option<String>,
    /// Every other field: accepted only when it cannot change the answer ([`INERT_FIELDS`]).
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// Fields a client may send that do not change the answer (bookkeeping on OpenAI's side).
const INERT_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "parallel_tool_calls",
];

/// Fields OpenAI defines that would change the answer and this server does not implement: a
/// 400 naming them, never a silent default.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
];

/// `stop`: a string or a list of strings.
struct RawStop(Vec<String>);

impl<'de> Deserialize<'de> for RawStop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawStop;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawStop, E> {
                Ok(RawStop(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawStop, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element()? {
                    all.push(s);
                }
                Ok(RawStop(all))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RawStreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelevancy {
    method: Option<String>,
    layer: Option<u64>,
    ungrounded: Option<String>,
}

/// What to do when an answer's running confidence (the mean map entropy of its tokens so far)
/// reaches the head's calibrated threshold: the maps say the answer is not grounded in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ungrounded {
    /// Say so (the token where it happened) in the final chunk or the response.
    Flag,
    /// End the answer there (`finish_reason` `content_filter`), saying so in its last chunk.
    Stop,
}

/// The body as [`RawChat`]; a value of the wrong type is an error naming its field's path.
fn parse_raw(body: &[u8]) -> Result<RawChat, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    // Checked here: serde would also read a struct from an array of its fields in order.
    if !v.is_object() {
        return Err(ApiError::invalid(
            None,
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(
            param(&path),
            "invalid_type",
            format!("`{path}`: {}", e.into_inner()),
        )
    })
}

/// Checks a request body. `n_layers` picks GradCAM's default layer.
pub fn parse_chat(body: &[u8], limits: Limits, n_layers: usize) -> Result<ChatRequest, ApiError> {
    let mut raw = parse_raw(body)?;
    check_other_fields(&raw.other)?;
    let (sampling, stop) = parse_sampling(&mut raw)?;
    let Some(messages) = raw.messages else {
        return Err(ApiError::invalid(
            param("messages"),
            "missing_required_parameter",
            "`messages` is required",
        ));
    };
    let conversation = chat::conversation(&messages).map_err(api_error)?;

    let mut max_tokens = None;
    let mut max_tokens_param = "max_tokens";
    // The newer name wins when a client sends both, as OpenAI's does.
    for (name, value) in [
        ("max_tokens", raw.max_tokens),
        ("max_completion_tokens", raw.max_completion_tokens),
    ] {
        match value {
            None => {}
            Some(0) => {
                return Err(ApiError::invalid(
                    param(name),
                    "invalid_value",
                    format!("`{name}` must be at least 1"),
                ))
            }
            Some(k) if k >= limits.context as u64 => {
                return Err(ApiError::invalid(
                    param(name),
                    "context_length_exceeded",
                    format!(
                        "`{name}` is {k} but the model's whole context is {} positions, the \
                         prompt included",
                        limits.context
                    ),
                ))
            }
            Some(k) => {
                max_tokens = Some(k as usize);
                max_tokens_param = name;
            }
        }
    }
    let max_n = crate::engine::Scheduler::<crate::backend::cpu::Cpu>::MAX_N as u64;
    let n = match raw.n {
        None => 1,
        Some(n) if (1..=max_n).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                param("n"),
                "invalid_value",
                format!("`n` must be 1 to {max_n}, not {n}"),
            ))
        }
    };
    let relevancy = raw
        .relevancy
        .as_ref()
        .map(|r| parse_method(r, n_layers))
        .transpose()?;
    let stream = raw.stream.unwrap_or(false);
    let ungrounded = match raw.relevancy.as_ref().and_then(|r| r.ungrounded.as_deref()) {
        None => None,
        Some(u) => {
            let at = param("relevancy.ungrounded");
            let mode = match u {
                "flag" => Ungrounded::Flag,
                "stop" => Ungrounded::Stop,
                other => {
                    return Err(ApiError::invalid(
                        at,
                        "unsupported_value",
                        format!("`relevancy.ungrounded` is \"flag\" or \"stop\", not {other:?}"),
                    ))
                }
            };
            let refuse = |why: &str| Err(ApiError::invalid(at.clone(), "unsupported_value", why));
            if relevancy != Some(Method::FastRm) {
                return refuse(
                    "`relevancy.ungrounded` needs the fastrm method: its threshold is the FastRM \
                     head's, calibrated on its maps",
                );
            }
            if n != 1 {
                return refuse("`relevancy.ungrounded` takes one choice (`n` of 1)");
            }
            if mode == Ungrounded::Stop && !stream {
                return refuse(
                    "`relevancy.ungrounded: \"stop\"` ends a streamed answer; without `stream` use \
                     \"flag\"",
                );
            }
            Some(mode)
        }
    };
    if relevancy.is_some() && conversation.images.is_empty() {
        return Err(ApiError::invalid(
            param("messages"),
            "missing_image",
            "a relevancy map needs an image and the conversation has none: send a {\"type\": \
             \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}} part in a user \
             message, or leave out `relevancy`",
        ));
    }
    // The images last: every cheap check first, so an error names the first thing wrong that
    // costs nothing to find.
    let images = image_sources(&conversation.images, limits)?;
    Ok(ChatRequest {
        n,
        turns: conversation.turns,
        images,
        max_tokens,
        max_tokens_param,
        stream,
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        relevancy,
        ungrounded,
        ignore_eos: raw.ignore_eos.unwrap_or(false),
        sampling,
        stop,
        model: raw.model.take(),
    })
}

/// Each image of a conversation as its bytes (a `data:` URL) or the URL the server fetches
/// (`--allow-image-urls`); anything else refused, naming the field.
fn image_sources(
    images: &[chat::ImageRef],
    limits: Limits,
) -> Result<Vec<(ImageSource, String)>, ApiError> {
    images
        .iter()
        .map(|r| {
            if is_remote(&r.url) {
                if !limits.image_urls {
                    return Err(ApiError::invalid(
                        Some(r.param.clone()),
                        "remote_image_unsupported",
                        "this server does not fetch image URLs (start it with --allow-image-urls \
                         to fetch from public addresses); send the image inline as a \
                         data:image/png;base64,... or data:image/jpeg;base64,... URL",
                    ));
                }
                return Ok((ImageSource::Url(r.url.clone()), r.param.clone()));
            }
            let bytes = chat::data_url_bytes(&r.url, &r.param, limits.max_image_bytes)
                .map_err(api_error)?
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some(r.param.clone()),
                        "invalid_image_url",
                        "the image URL must be a data:image/png;base64,... or \
                         data:image/jpeg;base64,... URL, or an http(s) URL where the server \
                         fetches them (--allow-image-urls)",
                    )
                })?;
            Ok((ImageSource::Inline(bytes), r.param.clone()))
        })
        .collect()
}

/// Fields outside the ones parsed: inert ones pass, the rest are refused by name.
fn check_other_fields(other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in other {
        if INERT_FIELDS.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        // The defaults of two of them ask for nothing different.
        let default = match k.as_str() {
            "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
            "modalities" => v == &json!(["text"]),
            _ => false,
        };
        if default {
            continue;
        }
        let msg = if UNSUPPORTED_FIELDS.contains(&k.as_str()) {
            format!("`{k}` is not supported by this server")
        } else {
            format!("unrecognized request argument `{k}`")
        };
        return Err(ApiError::invalid(param(k), "unsupported_parameter", msg));
    }
    Ok(())
}

/// The sampling fields in OpenAI's ranges, as the engine's options.
fn parse_sampling(raw: &mut RawChat) -> Result<(Sampling, Vec<String>), ApiError> {
    let range = |name: &str, v: Option<f32>, lo: f32, hi: f32| match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            param(name),
            "invalid_value",
            format!("`{name}` must be between {lo} and {hi}, not {x}"),
        )),
        _ => Ok(()),
    };
    range("temperature", raw.temperature, 0.0, 2.0)?;
    range("presence_penalty", raw.presence_penalty, -2.0, 2.0)?;
    range("frequency_penalty", raw.frequency_penalty, -2.0, 2.0)?;
    if raw.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::invalid(
            param("top_p"),
            "invalid_value",
            "`top_p` must be greater than 0 and at most 1",
        ));
    }
    let logprobs = match (raw.logprobs.unwrap_or(false), raw.top_logprobs) {
        (_, Some(n)) if n > Sampling::MAX_LOGPROBS as u64 => {
            return Err(ApiError::invalid(
                param("top_logprobs"),
                "invalid_value",
                format!("`top_logprobs` must be at most {}", Sampling::MAX_LOGPROBS),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                param("top_logprobs"),
                "invalid_value",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let stop = raw.stop.take().map_or(Vec::new(), |s| s.0);
    let too_long = |s: &String| s.is_empty() || s.len() > GenerateOptions::MAX_STOP_BYTES;
    if stop.len() > MAX_STOP || stop.iter().any(too_long) {
        return Err(ApiError::invalid(
            param("stop"),
            "invalid_value",
            format!(
                "`stop` takes 1 to {MAX_STOP} strings of 1 to {} bytes",
                GenerateOptions::MAX_STOP_BYTES
            ),
        ));
    }
    let sampling = Sampling {
        // OpenAI's default temperature is 1; a request that names none is answered greedily,
        // which the README states.
        temperature: raw.temperature.unwrap_or(0.0),
        top_p: raw.top_p.unwrap_or(1.0),
        presence_penalty: raw.presence_penalty.unwrap_or(0.0),
        frequency_penalty: raw.frequency_penalty.unwrap_or(0.0),
        seed: raw.seed.map_or(0, |s| s as u64),
        logprobs,
        ..Default::default()
    };
    // Anything else the engine would refuse is named here with its field.
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(None, "invalid_value", e.to_string()))?;
    Ok((sampling, stop))
}

/// OpenAI's limit on stop sequences.
const MAX_STOP: usize = 4;

/// A token's log-probabilities in OpenAI's shape (`choices[].logprobs.content[]`).
pub fn logprob_json(l: &TokenLogprobs) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let mut v = entry(&l.token, l.logprob);
    v["top_logprobs"] = l
        .top_logprobs
        .iter()
        .map(|t| entry(&t.token, t.logprob))
        .collect();
    v
}

pub const METHODS: &str = "fastrm, baseline, baseline-incremental, gradcam";

fn parse_method(r: &RawRelevancy, n_layers: usize) -> Result<Method, ApiError> {
    let name = r.method.as_deref().unwrap_or("fastrm");
    let layer = match r.layer {
        None => None,
        Some(k) if (k as usize) < n_layers => Some(k as usize),
        Some(_) => {
            return Err(ApiError::invalid(
                param("relevancy.layer"),
                "invalid_value",
                format!(
                    "`relevancy.layer` must be a decoder layer, 0 to {}",
                    n_layers - 1
                ),
            ))
        }
    };
    if layer.is_some() && name != "gradcam" {
        return Err(ApiError::invalid(
            param("relevancy.layer"),
            "unsupported_value",
            "`relevancy.layer` applies to the gradcam method only",
        ));
    }
    let kind: MethodName = name.parse().map_err(|_| {
        ApiError::invalid(
            param("relevancy.method"),
            "unsupported_value",
            format!("unknown relevancy method {name:?}: use one of {METHODS}"),
        )
    })?;
    kind.method(false, layer, n_layers)
        .map_err(|e| ApiError::invalid(param("relevancy"), "invalid_value", e.to_string()))
}

/// The HTTP form of a conversation's error: 413 for an image over the size limit, else 400.
fn api_error(e: chat::MessageError) -> ApiError {
    if e.code == "image_too_large" {
        ApiError::too_large(Some(e.param), e.code, e.message)
    } else {
        ApiError::invalid(Some(e.param), e.code, e.message)
    }
}

/// `finish_reason` of a stop: an EOS is a natural stop; a token or context limit is a length stop.
pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::Stop => "stop",
        StopReason::MaxNewTokens | StopReason::Context => "length",
    }
}

/// A token's map on the wire: each image's map placed on its picture
/// ([`ImageLayout::place`]: a square view's patch grid as it is, a tiled image's tokens on the
/// grid of its kept tiles), image after image, as little-endian IEEE half floats, base64
/// (standard alphabet, padded), each row-major over its grid; with [`layout_fields`].
pub fn token_map_json(m: &TokenMap) -> Value {
    let mut bytes = Vec::with_capacity(m.map.len() * 2);
    // The engine's maps always fit their layouts; one that did not would go as it is.
    let placed = m.placed().unwrap_or_else(|_| vec![((0, 0), m.map.clone())]);
    for v in placed.iter().flat_map(|(_, v)| v) {
        bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
    }
    let mut v = json!({
        "index": m.index,
        "id": m.id,
        "text": m.text,
        "images": m.images,
        "map_b64": base64::engine::general_purpose::STANDARD.encode(bytes),
        "entropy": m.entropy,
    });
    v.as_object_mut().unwrap().extend(layout_fields(&m.layouts));
    v
}

/// What a map's values cover, per image: `grids` (`[rows, cols]` of each image's placed map),
/// `covers` (`"center_square"`: the centre square a square view crops; `"whole_image"`: a tiled
/// image's whole picture), and `grid` when every image has the same grid (always for LLaVA-1.5).
pub fn layout_fields(layouts: &[ImageLayout]) -> serde_json::Map<String, Value> {
    let grids: Vec<(usize, usize)> = layouts.iter().map(ImageLayout::placed_grid).collect();
    let covers: Vec<&str> = layouts
        .iter()
        .map(|l| match l {
            ImageLayout::Square { .. } => "center_square",
            ImageLayout::AnyRes { .. } => "whole_image",
        })
        .collect();
    let mut out = serde_json::Map::new();
    if let Some(&first) = grids.first().filter(|&&g| grids.iter().all(|&x| x == g)) {
        out.insert("grid".into(), json!([first.0, first.1]));
    }
    out.insert(
        "grids".into(),
        json!(grids.iter().map(|g| [g.0, g.1]).collect::<Vec<_>>()),
    );
    out.insert("covers".into(), json!(covers));
    out
}

/// Inverse of [`token_map_json`]'s encoding.
pub fn decode_map_b64(s: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 2 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    )
}

pub fn confidence_json(c: &Confidence) -> Value {
    serde_json::to_value(c).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> ApiError {
        let limits = Limits {
            max_image_bytes: 1 << 20,
            image_urls: false,
            max_image_pixels: 1 << 20,
            context: 2048,
        };
        parse_chat(body.as_bytes(), limits, 4).unwrap_err()
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_path() {
        let msg =
            |content: &str| format!(r#"{{"messages":[{{"role":"user","content":{content}}}]}}"#);
        for (body, param, says) in [
            (
                msg(r#"[{"type":"image_url","image_url":{"url":5}}]"#),
                "messages[0].content[0].image_url.url",
                "invalid type: integer `5`, expected a string",
            ),
            (
                msg(r#"[{"type":"text","text":"hi"},{"type":"image_url","image_url":[1]}]"#),
                "messages[0].content[1].image_url",
                "expected an object {\"url\": ...} or a URL string",
            ),
            (
                msg("7"),
                "messages[0].content",
                "expected a string or an array of content parts",
            ),
            (
                r#"{"messages":[],"stream_options":{"include_usage":"yes"}}"#.into(),
                "stream_options.include_usage",
                "expected a boolean",
            ),
            (
                r#"{"relevancy":{"layer":-1}}"#.into(),
                "relevancy.layer",
                "invalid value: integer `-1`",
            ),
        ] {
            let e = error_of(&body);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.code, Some("invalid_type"), "{body}");
            assert!(
                e.message.starts_with(&format!("`{param}`: ")),
                "{}",
                e.message
            );
            assert!(e.message.contains(says), "{body}: {}", e.message);
            assert!(!e.message.contains(" at line "), "{}", e.message);
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_invalid_json() {
        for body in ["{not json", "[1, 2]", "\"text\""] {
            let e = error_of(body);
            assert_eq!((e.param, e.code), (None, Some("invalid_json")), "{body}");
        }
    }
}

/// Where an answer's running confidence first reaches `threshold`: the mean entropy of its first
/// `k + 1` answer tokens' maps is at or above it (the verdict `uncertain` of a prefix).
#[derive(Debug, Default, Clone)]
pub struct RunningConfidence {
    sum: f64,
    count: usize,
    /// `(token index, mean entropy)` at the first crossing.
    pub crossed: Option<(usize, f32)>,
}

impl RunningConfidence {
    /// Adds an answer token's map entropy; `true` when this token is the crossing.
    pub fn add(&mut self, index: usize, entropy: f32, threshold: f32) -> bool {
        self.sum += entropy as f64;
        self.count += 1;
        let mean = (self.sum / self.count as f64) as f32;
        if self.crossed.is_none() && mean >= threshold {
            self.crossed = Some((index, mean));
            return true;
        }
        false
    }

    pub fn json(&self, threshold: f32) -> Value {
        match self.crossed {
            None => Value::Null,
            Some((token, mean)) => json!({
                "token": token,
                "mean_entropy": mean,
                "threshold": threshold,
            }),
        }
    }
}
