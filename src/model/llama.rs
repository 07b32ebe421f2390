//! The Llama decoder over a paged KV cache ([`super::kv`]). [`Llama::run`] serves one sequence's
//! rows (a prefill, or a decode step that is masked or saves for a backward): rows are positions
//! `pos0 .. pos0 + n`, their keys and values go to the sequence's pages, and attention runs over
//! its first `pos0 + n` positions with a causal offset. [`Llama::decode`] advances a batch of
//! sequences by one position each.

use super::kv::{SeqKv, PAGE};
use super::WeightSource;
use crate::backend::{with_memory_tag, AttnShape, Backend, KvStore, MemTag, PagedRow};
use crate::config::{LlavaConfig, TextConfig};
use crate::error::{Error, Result};

pub struct LlamaLayer<B: Backend> {
    pub attn_norm: B::Tensor,
    pub q: B::Tensor,
    pub k: B::Tensor,
    pub v: B::Tensor,
    pub o: B::Tensor,
    pub mlp_norm: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
    pub down: B::Tensor,
}

pub struct Llama<B: Backend> {
    pub cfg: TextConfig,
    pub embed: B::Tensor,
    pub layers: Vec<LlamaLayer<B>>,
    pub norm: B::Tensor,
    pub lm_head: B::Tensor,
}

/// Activations of one decoder layer kept for the backward, all `[rows, ·]` over the positions the
/// saving forwards ran (see [`Saved`]).
pub struct SavedLayer<B: Backend> {
    /// Residual stream entering the layer (input of the attention RMSNorm).
    pub x_in: B::Tensor,
    /// Queries after RoPE.
    pub q: B::Tensor,
    /// Residual stream after attention (input of the MLP RMSNorm).
    pub x_mid: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
}

/// What saving forwards kept for positions `pos0 .. pos0 + len`: per layer, plus the final
/// residual stream (input of the final norm). One `Saved` can span several forwards (a prefill and
/// the decode steps after it): each appends its rows. Storage is made on the first forward — the
/// forward's own tensors when they fill the whole `capacity` (a prefill saved alone, a decode step),
/// else a buffer of `capacity` rows that later forwards write into.
pub struct Saved<B: Backend> {
    pub pos0: usize,
    pub len: usize,
    pub capacity: usize,
    pub layers: Vec<SavedLayer<B>>,
    /// `[capacity, D]`; `None` until a forward has run.
    pub x_out: Option<B::Tensor>,
}

impl<B: Backend> Saved<B> {
    /// Room for `capacity` rows starting at position `pos0` (nothing is allocated yet).
    pub fn new(pos0: usize, capacity: usize) -> Self {
        Saved {
            pos0,
            len: 0,
            capacity,
            layers: Vec::new(),
            x_out: None,
        }
    }

    /// Bytes the saved activations occupy at f32 (what the backward holds beyond the forward).
    pub fn f32_bytes(&self, b: &B) -> usize {
        let size = |t: &B::Tensor| {
            let (r, c) = b.dims(t);
            r * c * 4
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| size(&l.x_in) + size(&l.q) + size(&l.x_mid) + size(&l.gate) + size(&l.up))
            .sum();
        layers + self.x_out.as_ref().map_or(0, size)
    }

    /// `t`, rows at `row` of this `Saved`, as the storage of a slot that has none yet: the tensor
    /// itself when it is the whole storage, else a buffer of `capacity` rows with `t` copied in.
    fn fresh(&self, b: &B, row: usize, t: B::Tensor) -> Result<B::Tensor> {
        if row == 0 && b.dims(&t).0 == self.capacity {
            return Ok(t);
        }
        let (_, c) = b.dims(&t);
        let mut dst = with_memory_tag(b, MemTag::Saved, || b.zeros(self.capacity, c))?;
        b.copy_rows_into(&mut dst, row, &t)?;
        Ok(dst)
    }

    fn store_layer(&mut self, b: &B, li: usize, row: usize, l: SavedLayer<B>) -> Result<()> {
        if let Some(dst) = self.layers.get_mut(li) {
            for (d, t) in [
                (&mut dst.x_in, l.x_in),
                (&mut dst.q, l.q),
                (&mut dst.x_mid, l.x_mid),
                (&mut dst.gate, l.gate),
                (&mut dst.up, l.up),
            ] {
                b.copy_rows_into(d, row, &t)?;
            }
            return Ok(());
        }
        let l = SavedLayer {
            x_in: self.fresh(b, row, l.x_in)?,
            q: self.fresh(b, row, l.q)?,
            x_mid: self.fresh(b, row, l.x_mid)?,
            gate: self.fresh(b, row, l.gate)?,
            up: self.fresh(b, row, l.up)?,
        };
        self.layers.push(l);
        Ok(())
    }
}

/// How a decoder forward runs.
#[derive(Clone, Copy)]
pub enum Pass<'a> {
    Plain,
    /// Cache positions `j` with `key_keep[j] == false` are hidden from every query of every layer
    /// ([`Backend::attention_masked`]); `key_keep` covers positions `0 .. kv.len + n`.
    Masked(&'a [bool]),
}

const PREFIX: &str = "language_model.model";

impl<B: Backend> Llama<B> {
    pub fn load(b: &B, src: &dyn WeightSource<B>, cfg: &LlavaConfig) -> Result<Self> {
        let t = cfg.text.clone();
        let (d, hd) = (t.hidden_size, t.head_dim);
        let (qd, kvd, ff) = (
            t.num_attention_heads * hd,
            t.num_key_value_heads * hd,
            t.intermediate_size,
        );
        let mat = |name: &str, r: usize, c: usize| src.get(b, name, &[r, c], r, c);
        let vec = |name: &str, n: usize| src.get(b, name, &[n], 1, n);
        let mut layers = Vec::new();
        for l in 0..t.num_hidden_layers {
            let n = |s: &str| format!("{PREFIX}.layers.{l}.{s}");
            layers.push(LlamaLayer {
                attn_norm: vec(&n("input_layernorm.weight"), d)?,
                q: mat(&n("self_attn.q_proj.weight"), qd, d)?,
                k: mat(&n("self_attn.k_proj.weight"), kvd, d)?,
                v: mat(&n("self_attn.v_proj.weight"), kvd, d)?,
                o: mat(&n("self_attn.o_proj.weight"), d, qd)?,
                mlp_norm: vec(&n("post_attention_layernorm.weight"), d)?,
                gate: mat(&n("mlp.gate_proj.weight"), ff, d)?,
                up: mat(&n("mlp.up_proj.weight"), ff, d)?,
                down: mat(&n("mlp.down_proj.weight"), d, ff)?,
            });
        }
        Ok(Llama {
            embed: mat(&format!("{PREFIX}.embed_tokens.weight"), t.vocab_size, d)?,
            norm: vec(&format!("{PREFIX}.norm.weight"), d)?,
            lm_head: mat("language_model.lm_head.weight", t.vocab_size, d)?,
            layers,
            cfg: t,
        })
    }

    /// Runs the decoder on input embeddings `x` `[n, D]` at positions `kv.len ..`, appending to
    /// the sequence's cache. Returns the last hidden states after the final RMSNorm, `[n, D]`.
    pub fn forward(&self, b: &B, x: B::Tensor, kv: &mut SeqKv<'_, B>) -> Result<B::Tensor> {
        self.run(b, x, kv, Pass::Plain, None)
    }

    /// [`Self::forward`] that also keeps, in a fresh [`Saved`] of exactly these rows, what the
    /// activation backward needs.
    pub fn forward_saving(
        &self,
        b: &B,
        x: B::Tensor,
        kv: &mut SeqKv<'_, B>,
    ) -> Result<(B::Tensor, Saved<B>)> {
        let mut saved = Saved::new(kv.len, b.dims(&x).0);
        let h = self.run(b, x, kv, Pass::Plain, Some(&mut saved))?;
        Ok((h, saved))
    }

    /// The decoder forward of one sequence's rows in every form (a prefill, or a decode step that
    /// is masked or saves): `pass` chooses the attention, and `save`, when given, receives
    /// (appended at its next row, which must be this call's first position) what the activation
    /// backward needs: per layer the residual stream before attention and before the MLP, the
    /// rotated queries, and the MLP's gate and up projections; keys and values stay in the cache.
    /// Hidden positions of a masked pass still run through the layers (their own rows are computed
    /// and cached as usual); nothing reads them. Attention reads the sequence's keys gathered from
    /// its pages (a fresh prompt's own keys directly).
    pub fn run(
        &self,
        b: &B,
        x: B::Tensor,
        kv: &mut SeqKv<'_, B>,
        pass: Pass<'_>,
        mut save: Option<&mut Saved<B>>,
    ) -> Result<B::Tensor> {
        let (n, _) = b.dims(&x);
        let pos0 = kv.len;
        if pos0 + n > kv.capacity {
            return Err(Error::input(format!(
                "sequence of {} positions exceeds its KV cache room of {}",
                pos0 + n,
                kv.capacity
            )));
        }
        if let Some(s) = save.as_deref() {
            if s.pos0 + s.len != pos0 || s.len + n > s.capacity {
                return Err(Error::input(format!(
                    "saving {n} rows at position {pos0} into storage for positions {}..{} holding {}",
                    s.pos0,
                    s.pos0 + s.capacity,
                    s.len
                )));
            }
        }
        if let Pass::Masked(keep) = pass {
            if keep.len() < pos0 + n {
                return Err(Error::input(format!(
                    "key mask covers {} positions; the forward reaches {}",
                    keep.len(),
                    pos0 + n
                )));
            }
        }
        let shape = AttnShape {
            causal_q_pos0: Some(pos0),
            kv_len: pos0 + n,
            ..self.heads()
        };
        let positions = (pos0 as u32..(pos0 + n) as u32).collect::<Vec<_>>();
        let new_slots = kv.slots(pos0..pos0 + n);
        // A fresh prompt attends to its own keys; later rows read the whole sequence back.
        let all_slots = if pos0 > 0 {
            kv.slots(0..pos0 + n)
        } else {
            Vec::new()
        };
        let pool = kv.pool();
        let (head_dim, theta) = (self.cfg.head_dim, self.cfg.rope_theta as f32);
        let attend = |li: usize, q: &B::Tensor, k: &B::Tensor, v: B::Tensor| {
            let (q, k) = b.rope_qk(q, k, head_dim, &positions, theta)?;
            let (k, v) = pool.with_layers(|pk, pv| -> Result<_> {
                b.scatter_rows(&mut pk[li], &new_slots, &k)?;
                b.scatter_rows(&mut pv[li], &new_slots, &v)?;
                if pos0 == 0 {
                    return Ok((k, v));
                }
                Ok((
                    b.embedding(&pk[li], &all_slots)?,
                    b.embedding(&pv[li], &all_slots)?,
                ))
            })?;
            let a = match pass {
                Pass::Plain => b.attention(&q, &k, &v, shape),
                Pass::Masked(keep) => b.attention_masked(&q, &k, &v, shape, keep),
            }?;
            Ok((a, q))
        };
        let keep_layer = |li: usize, layer: SavedLayer<B>| -> Result<()> {
            match save.as_deref_mut() {
                Some(s) => s.store_layer(b, li, pos0 - s.pos0, layer),
                None => Ok(()),
            }
        };
        let (out, x) = self.layers_forward(b, x, attend, keep_layer)?;
        kv.len = pos0 + n;
        if let Some(s) = save {
            let row = pos0 - s.pos0;
            match s.x_out.as_mut() {
                Some(dst) => b.copy_rows_into(dst, row, &x)?,
                None => s.x_out = Some(s.fresh(b, row, x)?),
            }
            s.len += n;
        }
        Ok(out)
    }

    /// One decode step of a batch: row `i` of `x` `[B, D]` is the next position of sequence
    /// `seqs[i]` (each at its own length, all in one pool). The linears run once over all rows;
    /// RoPE and attention per row at its own position over its own pages. Every row's arithmetic
    /// is the same as in a batch of one. Returns the final-norm hidden states `[B, D]`.
    pub fn decode(&self, b: &B, x: B::Tensor, seqs: &mut [&mut SeqKv<'_, B>]) -> Result<B::Tensor> {
        let (rows, _) = b.dims(&x);
        if rows != seqs.len() || rows == 0 {
            return Err(Error::input(format!(
                "a decode step of {rows} rows for {} sequences",
                seqs.len()
            )));
        }
        let pool = seqs[0].pool();
        if seqs.iter().any(|s| !std::ptr::eq(s.pool(), pool)) {
            return Err(Error::input(
                "a decode step's sequences must share one KV pool",
            ));
        }
        if let Some(s) = seqs.iter().find(|s| s.len >= s.capacity) {
            return Err(Error::input(format!(
                "a sequence at position {} has no KV cache room left ({} positions)",
                s.len, s.capacity
            )));
        }
        let positions: Vec<u32> = seqs.iter().map(|s| s.len as u32).collect();
        let slots: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.slots(s.len..s.len + 1))
            .collect();
        let paged: Vec<PagedRow<'_>> = seqs
            .iter()
            .map(|s| PagedRow {
                pages: s.pages(),
                len: s.len + 1,
            })
            .collect();
        let shape = self.heads();
        let (head_dim, theta) = (self.cfg.head_dim, self.cfg.rope_theta as f32);
        let attend = |li: usize, q: &B::Tensor, k: &B::Tensor, v: B::Tensor| {
            pool.with_layers(|pk, pv| {
                let (keys, values) = (&mut pk[li], &mut pv[li]);
                let dst = KvStore {
                    keys,
                    values,
                    slots: &slots,
                };
                let q = b.rope_qk_store(q, k, &v, head_dim, &positions, theta, dst)?;
                let a = b.paged_attention(&q, &pk[li], &pv[li], &paged, PAGE, shape)?;
                Ok((a, q))
            })
        };
        let (out, _) = self.layers_forward(b, x, attend, |_, _| Ok(()))?;
        for s in seqs.iter_mut() {
            s.len += 1;
        }
        Ok(out)
    }

    /// The attention geometry (no mask, no length: each forward sets its own).
    fn heads(&self) -> AttnShape {
        let t = &self.cfg;
        AttnShape {
            n_heads: t.num_attention_heads,
            n_kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            causal_q_pos0: None,
            kv_len: 0,
        }
    }

    /// The layers over the rows of `x`: `attend(layer, q, k, v)` rotates q and k at the rows'
    /// positions, stores the keys and values, attends, and returns the attention's output with
    /// the rotated queries; `keep(layer, saved)` receives what a backward needs. Returns the
    /// final-norm hidden states and the residual stream entering the final norm.
    fn layers_forward(
        &self,
        b: &B,
        x: B::Tensor,
        mut attend: impl FnMut(
            usize,
            &B::Tensor,
            &B::Tensor,
            B::Tensor,
        ) -> Result<(B::Tensor, B::Tensor)>,
        mut keep: impl FnMut(usize, SavedLayer<B>) -> Result<()>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let t = &self.cfg;
        let eps = t.rms_norm_eps as f32;
        // Each residual add is fused with the norm that reads its sum: the MLP's norm, then the
        // next layer's attention norm (the final norm after the last layer).
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.attn_norm);
        let mut h = b.rms_norm(&x, first_norm, eps)?;
        let mut x = x;
        for (li, l) in self.layers.iter().enumerate() {
            let [q, k, v] = array(b.linear_group(&h, &[&l.q, &l.k, &l.v])?)?;
            let (a, q) = attend(li, &q, &k, v)?;
            let (x_mid, h_mlp) =
                b.add_rms_norm(&x, &b.linear(&a, &l.o, None)?, &l.mlp_norm, eps)?;
            let [gate, up] = array(b.linear_group(&h_mlp, &[&l.gate, &l.up])?)?;
            let g = b.silu_mul(&gate, &up)?;
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |n| &n.attn_norm);
            let (x_out, h_next) =
                b.add_rms_norm(&x_mid, &b.linear(&g, &l.down, None)?, next_norm, eps)?;
            h = h_next;
            let x_in = std::mem::replace(&mut x, x_out);
            keep(
                li,
                SavedLayer {
                    x_in,
                    q,
                    x_mid,
                    gate,
                    up,
                },
            )?;
        }
        Ok((h, x))
    }

    pub fn logits(&self, b: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        b.linear(hidden, &self.lm_head, None)
    }
}

/// The `N` results of a [`Backend::linear_group`] of `N` weights, as an array.
fn array<T, const N: usize>(ys: Vec<T>) -> Result<[T; N]> {
    let got = ys.len();
    ys.try_into().map_err(|_| {
        crate::Error::Backend(format!("linear_group gave {got} results for {N} weights"))
    })
}
