//! Per-token relevancy maps over the image patches.
//!
//! `baseline`: the Chefer gradient relevancy, by our own activation backward. FastRM's head and the
//! other methods land beside it.

pub mod baseline;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::KvCache;
use crate::model::Llava;

pub use baseline::{chefer_row, Relevance, RowMode};

/// Exact baseline maps for every generated token: one teacher-forced forward over the prompt and
/// the generated ids (saving activations), then one backward per token from its logit. Returns one
/// map per token, each over the image positions in prompt order (`n_patches` values, raw).
pub fn baseline_maps<B: Backend>(
    b: &B,
    model: &Llava<B>,
    prompt_ids: &[u32],
    pixels: &[f32],
    generated: &[u32],
    mode: RowMode,
) -> Result<Vec<Vec<f32>>> {
    if generated.is_empty() {
        return Err(Error::input("no generated tokens to explain"));
    }
    let n = prompt_ids.len();
    let (_, image) = model.encode_image(b, pixels)?;
    let prompt = model.embed_prompt(b, prompt_ids, &image)?;
    // The last token is explained from position n-1+T-1 and never fed back.
    let fed = &generated[..generated.len() - 1];
    let total = n + fed.len();
    let d = model.cfg.text.hidden_size;
    let mut x = b.zeros(total, d)?;
    b.copy_rows_into(&mut x, 0, &prompt)?;
    if !fed.is_empty() {
        b.copy_rows_into(&mut x, n, &b.embedding(&model.llm.embed, fed)?)?;
    }
    let mut cache = KvCache::new(b, &model.cfg.text, total)?;
    let (_, saved) = model.llm.forward_saving(b, x, &mut cache)?;
    let image_pos: Vec<usize> = prompt_ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id == model.cfg.image_token_id)
        .map(|(i, _)| i)
        .collect();
    generated
        .iter()
        .enumerate()
        .map(|(t, &y)| {
            let r = chefer_row(b, &model.llm, &saved, &cache, n - 1 + t, y, mode, false)?;
            Ok(image_pos.iter().map(|&j| r.row[j]).collect())
        })
        .collect()
}
