//! OpenAI's chat-completions wire format: the request checked field by field (so an error can
//! name the field, as OpenAI's do), the response objects and chunks, and the relevancy extension.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::engine::{Confidence, StopReason, TokenMap};
use crate::explain::{Method, MethodName};

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
    pub question: String,
    /// The encoded image, from the `data:` URL.
    pub image: Vec<u8>,
    /// Where the image came from, for errors about it.
    pub image_param: String,
    /// `None`: as many as fit, up to the server's default.
    pub max_tokens: Option<usize>,
    /// The field that set `max_tokens`, for errors about it.
    pub max_tokens_param: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    pub relevancy: Option<Method>,
    pub ignore_eos: bool,
}

/// What a request may carry at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_image_bytes: usize,
    /// Largest accepted image in pixels (width × height, after decoding).
    pub max_image_pixels: usize,
    /// The model's context: no answer can be longer.
    pub context: usize,
}

fn param(p: &str) -> Option<String> {
    Some(p.to_string())
}

fn type_error(p: &str, want: &str) -> ApiError {
    ApiError::invalid(param(p), "invalid_type", format!("`{p}` must be {want}"))
}

/// Checks a request body. `n_layers` picks GradCAM's default layer.
pub fn parse_chat(body: &[u8], limits: Limits, n_layers: usize) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Some(o) = v.as_object() else {
        return Err(ApiError::invalid(
            None,
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let messages = match o.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                param("messages"),
                "missing_required_parameter",
                "`messages` is required",
            ))
        }
        Some(Value::Array(m)) => m,
        Some(_) => return Err(type_error("messages", "an array of messages")),
    };
    if messages.len() != 1 {
        return Err(ApiError::invalid(
            param("messages"),
            "unsupported_value",
            format!(
                "`messages` must hold exactly one user message with the image and the question \
                 (got {}); the LLaVA-1.5 template has its own system prompt and no earlier turns",
                messages.len()
            ),
        ));
    }
    let msg = messages[0]
        .as_object()
        .ok_or_else(|| type_error("messages[0]", "an object"))?;
    match msg.get("role").and_then(Value::as_str) {
        Some("user") => {}
        Some(r) => {
            return Err(ApiError::invalid(
                param("messages[0].role"),
                "unsupported_value",
                format!("`messages[0].role` must be \"user\", not {r:?}"),
            ))
        }
        None => return Err(type_error("messages[0].role", "the string \"user\"")),
    }
    let (question, image_url, image_param) = parse_content(msg.get("content"))?;

    let mut max_tokens = None;
    let mut max_tokens_param = "max_tokens";
    // The newer name wins when a client sends both, as OpenAI's does.
    for name in ["max_tokens", "max_completion_tokens"] {
        match o.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => {
                    return Err(ApiError::invalid(
                        param(name),
                        "invalid_value",
                        format!("`{name}` must be at least 1"),
                    ))
                }
                Some(k) if k as usize >= limits.context => {
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
                None => return Err(type_error(name, "a positive integer")),
            },
            Some(_) => return Err(type_error(name, "a positive integer")),
        }
    }
    let stream = bool_field(o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => match so.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(type_error("stream_options.include_usage", "a boolean")),
        },
        Some(_) => return Err(type_error("stream_options", "an object")),
    };
    match o.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                param("n"),
                "unsupported_value",
                "`n` must be 1: generation is greedy, every choice would be the same",
            ))
        }
    }
    let ignore_eos = bool_field(o, "ignore_eos")?.unwrap_or(false);
    let relevancy = match o.get("relevancy") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => Some(parse_method(r, n_layers)?),
        Some(_) => {
            return Err(type_error(
                "relevancy",
                "an object like {\"method\": \"fastrm\"}",
            ))
        }
    };
    // The image last: every cheap check first, so an error names the first thing wrong that
    // costs nothing to find.
    let image = decode_data_url(&image_url, &image_param, limits.max_image_bytes)?;
    Ok(ChatRequest {
        question,
        image,
        image_param,
        max_tokens,
        max_tokens_param,
        stream,
        include_usage,
        relevancy,
        ignore_eos,
    })
}

fn bool_field(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(type_error(name, "a boolean")),
    }
}

pub const METHODS: &str = "fastrm, baseline, baseline-incremental, gradcam";

fn parse_method(r: &Map<String, Value>, n_layers: usize) -> Result<Method, ApiError> {
    let name = match r.get("method") {
        None | Some(Value::Null) => "fastrm",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(type_error("relevancy.method", &format!("one of {METHODS}"))),
    };
    let layer = match r.get("layer") {
        None | Some(Value::Null) => None,
        Some(l) => match l.as_u64() {
            Some(k) if (k as usize) < n_layers => Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    param("relevancy.layer"),
                    "invalid_value",
                    format!(
                        "`relevancy.layer` must be a decoder layer, 0 to {}",
                        n_layers - 1
                    ),
                ))
            }
        },
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

/// The question and the image URL of a user message's content, with the URL's field path.
fn parse_content(content: Option<&Value>) -> Result<(String, String, String), ApiError> {
    let p = "messages[0].content";
    let parts = match content {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                param(p),
                "missing_required_parameter",
                format!("`{p}` is required"),
            ))
        }
        Some(Value::String(_)) => {
            return Err(missing_image(p));
        }
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(type_error(p, "a string or an array of content parts")),
    };
    let mut texts = Vec::new();
    let mut image: Option<(String, String)> = None;
    for (i, part) in parts.iter().enumerate() {
        let pp = format!("{p}[{i}]");
        let part = part
            .as_object()
            .ok_or_else(|| type_error(&pp, "a content part object"))?;
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text") {
                Some(Value::String(t)) => texts.push(t.as_str()),
                _ => return Err(type_error(&format!("{pp}.text"), "a string")),
            },
            Some("image_url") => {
                let up = format!("{pp}.image_url.url");
                // OpenAI's shape is {"url": ...}; a bare string is accepted too, as many
                // clients send it.
                let url = match part.get("image_url") {
                    Some(Value::Object(iu)) => match iu.get("url") {
                        Some(Value::String(u)) => u.clone(),
                        _ => return Err(type_error(&up, "a string (a data: URL)")),
                    },
                    Some(Value::String(u)) => u.clone(),
                    _ => {
                        return Err(type_error(
                            &format!("{pp}.image_url"),
                            "an object {\"url\": ...}",
                        ))
                    }
                };
                if image.is_some() {
                    return Err(ApiError::invalid(
                        param(&pp),
                        "too_many_images",
                        "the message holds more than one image; this model answers about exactly one",
                    ));
                }
                image = Some((url, up));
            }
            Some(t) => {
                return Err(ApiError::invalid(
                    param(&format!("{pp}.type")),
                    "unsupported_value",
                    format!(
                        "content part type {t:?} is not supported (use \"text\" and \"image_url\")"
                    ),
                ))
            }
            None => {
                return Err(type_error(
                    &format!("{pp}.type"),
                    "\"text\" or \"image_url\"",
                ))
            }
        }
    }
    let Some((url, up)) = image else {
        return Err(missing_image(p));
    };
    let question = texts.join("\n").trim().to_string();
    if question.is_empty() {
        return Err(ApiError::invalid(
            param(p),
            "missing_question",
            "the message has no text: ask a question about the image",
        ));
    }
    Ok((question, url, up))
}

fn missing_image(p: &str) -> ApiError {
    ApiError::invalid(
        param(p),
        "missing_image",
        "the message has no image: send one {\"type\": \"image_url\", \"image_url\": {\"url\": \
         \"data:image/png;base64,...\"}} part with the question",
    )
}

/// The bytes of a `data:image/png;base64,...` or `data:image/jpeg;base64,...` URL.
fn decode_data_url(url: &str, p: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let lower_start: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower_start.starts_with("http://") || lower_start.starts_with("https:/") {
        return Err(ApiError::invalid(
            param(p),
            "remote_image_unsupported",
            "remote image URLs are refused: this server fetches nothing; send the image inline \
             as a data:image/png;base64,... or data:image/jpeg;base64,... URL",
        ));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            param(p),
            "invalid_image_url",
            "the image URL must be a data:image/png;base64,... or data:image/jpeg;base64,... URL",
        ));
    };
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            param(p),
            "invalid_image_url",
            "the data: URL has no ',' before its data",
        ));
    };
    let meta = meta.to_ascii_lowercase();
    let Some(mime) = meta.strip_suffix(";base64") else {
        return Err(ApiError::invalid(
            param(p),
            "invalid_image_url",
            "the data: URL must be base64 (data:image/png;base64,...)",
        ));
    };
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
        return Err(ApiError::invalid(
            param(p),
            "invalid_image_format",
            format!("image type {mime:?} is not supported: send image/png or image/jpeg"),
        ));
    }
    // Refuse before decoding: base64 carries 3 bytes in 4 characters.
    let approx = payload.len() / 4 * 3;
    let too_large = || {
        ApiError::too_large(
            param(p),
            "image_too_large",
            format!("the image is over the server's limit of {max_bytes} bytes"),
        )
    };
    if approx > max_bytes.saturating_add(3) {
        return Err(too_large());
    }
    let payload: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(payload.as_bytes()).map_err(|e| {
        ApiError::invalid(
            param(p),
            "invalid_base64",
            format!("the image's base64 does not decode: {e}"),
        )
    })?;
    if bytes.len() > max_bytes {
        return Err(too_large());
    }
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            param(p),
            "invalid_image",
            "the image is empty",
        ));
    }
    Ok(bytes)
}

/// `finish_reason` of a stop: an EOS is a natural stop; a token or context limit is a length stop.
pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "stop",
        StopReason::MaxNewTokens | StopReason::Context => "length",
    }
}

/// A token's map on the wire: the raw values as little-endian IEEE half floats, base64 (standard
/// alphabet, padded), row-major over `grid`.
pub fn token_map_json(m: &TokenMap, grid: (usize, usize)) -> Value {
    let mut bytes = Vec::with_capacity(m.map.len() * 2);
    for &v in &m.map {
        bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    json!({
        "index": m.index,
        "id": m.id,
        "text": m.text,
        "grid": [grid.0, grid.1],
        "map_b64": base64::engine::general_purpose::STANDARD.encode(bytes),
        "entropy": m.entropy,
    })
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
