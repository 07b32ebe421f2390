//! `fastrm train`: fits the FastRM head to the baseline maps of a distilled data set
//! (`fastrm distill`), with per-patch binary cross-entropy and Adam.
//!
//! The head runs here in its unfolded training form, batched over tokens of many samples: for each
//! token t, `u_t = LN(h_t)`, `q_t = W_q u_t + b_q`; for its sample, `K = W_k LN(H_img) + b_k`
//! `[P, d]`; `z = q·Kᵀ/√d`, `p = sigmoid(z)`. Labels are `y_j = 1[r_j ≥ τ·max r]` on the raw map
//! (a map whose max is 0 has no relevant patch). The loss is the mean over tokens and patches of
//! `BCE(z, y) = max(z, 0) − z·y + ln(1 + e^−|z|)`, computed from the logits so it never overflows.
//!
//! Forward and backward go through the op set ([`crate::backend::Backend`]; the parameter
//! gradients are `layer_norm_bwd`, `linear_wgrad` and `sum_rows`), so a GPU backend runs the same
//! code. The logits come to the host for the loss and its gradient (`[batch, P]`, small), and Adam
//! updates the host copy of the weights.
//!
//! Determinism: the validation split, the sampling order and the initial weights all come from the
//! seed (SplitMix64), and the CPU backend's reductions do not depend on the thread count, so two
//! runs with one seed produce the same weights.

mod plot;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use crate::engine::{with_backend, AnyBackend, Device, Dtype, WithBackend};
use crate::error::{Error, Result};
use crate::explain::fastrm::{FastRmHead, HeadWeights};
use crate::status;
use crate::util::SplitMix64;

/// The distilled data set as training reads it: the one reader of the format, in
/// [`crate::distill::format`].
pub use crate::distill::TokenSet as Dataset;

/// A training batch in host memory: images (each `[P, D]`) and tokens pointing into them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub hidden_size: usize,
    pub n_patches: usize,
    pub images: Vec<Vec<f32>>,
    pub tokens: Vec<BatchToken>,
}

#[derive(Debug, Clone)]
pub struct BatchToken {
    /// Index into [`Batch::images`].
    pub image: usize,
    /// The token's hidden state `[D]`.
    pub hidden: Vec<f32>,
    /// Targets in {0, 1} per patch `[P]` (see [`labels`]).
    pub labels: Vec<f32>,
}

/// Gradients of the loss with respect to each head parameter, in [`HeadWeights`]' layouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    pub ln_w: Vec<f32>,
    pub ln_b: Vec<f32>,
    pub wq: Vec<f32>,
    pub bq: Vec<f32>,
    pub wk: Vec<f32>,
    pub bk: Vec<f32>,
}

impl Grads {
    fn parts(&self) -> [&Vec<f32>; 6] {
        [
            &self.ln_w, &self.ln_b, &self.wq, &self.bq, &self.wk, &self.bk,
        ]
    }
}

fn params_mut(w: &mut HeadWeights) -> [&mut Vec<f32>; 6] {
    [
        &mut w.ln_w,
        &mut w.ln_b,
        &mut w.wq,
        &mut w.bq,
        &mut w.wk,
        &mut w.bk,
    ]
}

/// Binary labels from a raw baseline map: `1[r_j ≥ threshold · max r]`; all zero when the map's
/// max is not positive.
pub fn labels(map: &[f32], threshold: f32) -> Vec<f32> {
    let max = map.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max.is_nan() || max <= 0.0 {
        return vec![0.0; map.len()];
    }
    let cut = threshold * max;
    map.iter()
        .map(|&r| if r >= cut { 1.0 } else { 0.0 })
        .collect()
}

/// Binary cross-entropy of target `y` under `sigmoid(z)`, stably from the logit.
pub fn bce_with_logits(z: f64, y: f64) -> f64 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// What one pass over a batch gives.
pub struct Pass {
    /// Mean BCE over tokens and patches.
    pub loss: f64,
    /// Logits `z` per token (batch order), `[P]` each.
    pub logits: Vec<Vec<f32>>,
    /// Present when asked for.
    pub grads: Option<Grads>,
}

fn accumulate<B: Backend>(b: &B, acc: &mut Option<B::Tensor>, t: B::Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        None => t,
        Some(a) => b.add(&a, &t)?,
    });
    Ok(())
}

/// The training forward (and, with `grads`, its backward) of the head over a batch.
pub fn head_pass<B: Backend>(b: &B, w: &HeadWeights, batch: &Batch, grads: bool) -> Result<Pass> {
    let (dm, d, p) = (w.cfg.hidden_size, w.cfg.head_dim, batch.n_patches);
    let eps = w.cfg.layer_norm_eps;
    let n = batch.tokens.len();
    if batch.hidden_size != dm {
        return Err(Error::input(format!(
            "the head has hidden size {dm}, the data {}",
            batch.hidden_size
        )));
    }
    if n == 0 || p == 0 || d == 0 {
        return Err(Error::input("an empty training batch"));
    }
    for t in &batch.tokens {
        if t.image >= batch.images.len()
            || t.hidden.len() != dm
            || t.labels.len() != p
            || batch.images[t.image].len() != p * dm
        {
            return Err(Error::input("a training batch with inconsistent shapes"));
        }
    }
    let dev = FastRmHead::new(b, w, dm)?;
    let scale = 1.0 / (d as f64).sqrt();
    // Tokens grouped by image (stable), so each image's queries are one contiguous row block.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| batch.tokens[i].image);
    let mut hq = Vec::with_capacity(n * dm);
    for &i in &order {
        hq.extend_from_slice(&batch.tokens[i].hidden);
    }
    let hq = b.upload(&hq, n, dm)?;
    let uq = b.layer_norm(&hq, &dev.ln_w, &dev.ln_b, eps)?;
    let q = b.linear(&uq, &dev.wq, Some(&dev.bq))?;
    let mut dq = if grads { Some(b.zeros(n, d)?) } else { None };
    let (mut g_lnw, mut g_lnb, mut g_wk, mut g_bk) = (None, None, None, None);
    let mut logits = vec![Vec::new(); n];
    let mut loss_sum = 0.0f64;
    let denom = (n * p) as f64;
    let mut start = 0;
    while start < n {
        let img = batch.tokens[order[start]].image;
        let mut end = start + 1;
        while end < n && batch.tokens[order[end]].image == img {
            end += 1;
        }
        let m = end - start;
        let himg = b.upload(&batch.images[img], p, dm)?;
        let uk = b.layer_norm(&himg, &dev.ln_w, &dev.ln_b, eps)?;
        let k = b.linear(&uk, &dev.wk, Some(&dev.bk))?;
        let qg = b.slice_rows(&q, start, m)?;
        let zg = b.download(&b.linear(&qg, &k, None)?)?;
        let mut dz = vec![0.0f32; m * p];
        for r in 0..m {
            let tok = &batch.tokens[order[start + r]];
            let row: Vec<f32> = zg[r * p..(r + 1) * p]
                .iter()
                .map(|&v| (v as f64 * scale) as f32)
                .collect();
            for j in 0..p {
                let (z, y) = (row[j] as f64, tok.labels[j] as f64);
                loss_sum += bce_with_logits(z, y);
                // ∂loss/∂(q·k) = (σ(z) − y) / (n·P) · scale
                dz[r * p + j] = ((sigmoid(z) - y) / denom * scale) as f32;
            }
            logits[order[start + r]] = row;
        }
        if let Some(dq) = dq.as_mut() {
            let dz = b.upload(&dz, m, p)?;
            b.copy_rows_into(dq, start, &b.linear_bwd(&dz, &k)?)?;
            let dk = b.linear_wgrad(&dz, &qg)?;
            accumulate(b, &mut g_wk, b.linear_wgrad(&dk, &uk)?)?;
            accumulate(b, &mut g_bk, b.sum_rows(&dk)?)?;
            let duk = b.linear_bwd(&dk, &dev.wk)?;
            let (_, dlw, dlb) = b.layer_norm_bwd(&himg, &dev.ln_w, &duk, eps)?;
            accumulate(b, &mut g_lnw, dlw)?;
            accumulate(b, &mut g_lnb, dlb)?;
        }
        start = end;
    }
    let grads = match dq {
        None => None,
        Some(dq) => {
            let g_wq = b.linear_wgrad(&dq, &uq)?;
            let g_bq = b.sum_rows(&dq)?;
            let duq = b.linear_bwd(&dq, &dev.wq)?;
            let (_, dlw, dlb) = b.layer_norm_bwd(&hq, &dev.ln_w, &duq, eps)?;
            accumulate(b, &mut g_lnw, dlw)?;
            accumulate(b, &mut g_lnb, dlb)?;
            let get = |t: Option<B::Tensor>| -> Result<Vec<f32>> {
                b.download(&t.expect("at least one image in a non-empty batch"))
            };
            Some(Grads {
                ln_w: get(g_lnw)?,
                ln_b: get(g_lnb)?,
                wq: b.download(&g_wq)?,
                bq: b.download(&g_bq)?,
                wk: get(g_wk)?,
                bk: get(g_bk)?,
            })
        }
    };
    Ok(Pass {
        loss: loss_sum / denom,
        logits,
        grads,
    })
}

/// The training forward's probabilities `sigmoid(z)` per token of a batch.
pub fn probabilities<B: Backend>(b: &B, w: &HeadWeights, batch: &Batch) -> Result<Vec<Vec<f32>>> {
    Ok(head_pass(b, w, batch, false)?
        .logits
        .into_iter()
        .map(|row| row.into_iter().map(|z| sigmoid(z as f64) as f32).collect())
        .collect())
}

/// Adam (Kingma & Ba) with bias correction; moments kept per parameter on the host.
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Adam {
    pub fn new(lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: vec![],
            v: vec![],
        }
    }

    /// One update: `m = β1 m + (1−β1) g`, `v = β2 v + (1−β2) g²`,
    /// `θ −= lr · m̂ / (√v̂ + eps)` with `m̂ = m / (1 − β1^t)`, `v̂ = v / (1 − β2^t)`.
    pub fn step(&mut self, w: &mut HeadWeights, g: &Grads) -> Result<()> {
        let gs = g.parts();
        let mut ps = params_mut(w);
        if self.m.is_empty() {
            self.m = ps.iter().map(|p| vec![0.0; p.len()]).collect();
            self.v = self.m.clone();
        }
        for (i, p) in ps.iter().enumerate() {
            if p.len() != gs[i].len() || self.m[i].len() != p.len() {
                return Err(Error::input(
                    "Adam: gradient shapes differ from the weights",
                ));
            }
        }
        self.t += 1;
        let c1 = 1.0 - self.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, p) in ps.iter_mut().enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            for j in 0..p.len() {
                let gj = gs[i][j] as f64;
                let mj = self.beta1 * m[j] as f64 + (1.0 - self.beta1) * gj;
                let vj = self.beta2 * v[j] as f64 + (1.0 - self.beta2) * gj * gj;
                m[j] = mj as f32;
                v[j] = vj as f32;
                let upd = self.lr * (mj / c1) / ((vj / c2).sqrt() + self.eps);
                p[j] = (p[j] as f64 - upd) as f32;
            }
        }
        Ok(())
    }
}

/// Settings of a training run (the CLI's flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// `None`: the manifest's.
    pub label_threshold: Option<f32>,
    /// `None`: the hidden size.
    pub head_dim: Option<usize>,
    pub seed: u64,
    /// Fraction of the samples (not tokens) held out for validation; 0 for none.
    pub val_fraction: f64,
    /// Validation every this many steps (and at the last); `None`: about 50 points per run.
    pub eval_every: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 3500,
            batch: 128,
            lr: 2e-5,
            label_threshold: None,
            head_dim: None,
            seed: 0,
            val_fraction: 0.1,
            eval_every: None,
        }
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::input("--steps must be at least 1"));
        }
        // Upper bounds far above any useful value, so a typo is an error rather than an
        // allocation that aborts the process.
        if !(1..=1 << 20).contains(&self.batch) {
            return Err(Error::input("--batch must be 1 to 1048576 tokens"));
        }
        if self.head_dim.is_some_and(|d| !(1..=1 << 16).contains(&d)) {
            return Err(Error::input("--head-dim must be 1 to 65536"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::input("--lr must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::input("--val-fraction must be in [0, 1)"));
        }
        if let Some(t) = self.label_threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(Error::input("--label-threshold must be in [0, 1]"));
            }
        }
        if self.eval_every == Some(0) {
            return Err(Error::input("--eval-every must be at least 1"));
        }
        Ok(())
    }
}

/// One row of the loss curve.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    pub step: usize,
    /// Mean batch loss over the steps since the previous row (at step 0: the first batch's loss
    /// before any update).
    pub train_loss: f64,
    /// Loss over the whole validation split; `None` without one.
    pub val_loss: Option<f64>,
}

pub struct TrainReport {
    pub head: HeadWeights,
    pub curve: Vec<CurvePoint>,
    pub train_samples: usize,
    pub val_samples: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Validation loss of the constant predictor `p = mean training label` (the best
    /// input-blind predictor), for comparison.
    pub label_mean_val_loss: Option<f64>,
    pub label_mean: f64,
    pub seconds: f64,
}

impl TrainReport {
    pub fn final_train_loss(&self) -> f64 {
        self.curve.last().map_or(f64::NAN, |c| c.train_loss)
    }
    pub fn final_val_loss(&self) -> Option<f64> {
        self.curve.last().and_then(|c| c.val_loss)
    }
    pub fn initial_val_loss(&self) -> Option<f64> {
        self.curve.first().and_then(|c| c.val_loss)
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// A batch from data-set token indices (images loaded once per distinct sample).
pub fn make_batch(data: &Dataset, token_ids: &[usize], threshold: f32) -> Result<Batch> {
    let mut images = Vec::new();
    let mut seen: std::collections::HashMap<usize, usize> = Default::default();
    let mut tokens = Vec::with_capacity(token_ids.len());
    for &ti in token_ids {
        let t = &data.tokens[ti];
        let image = match seen.get(&t.sample) {
            Some(&i) => i,
            None => {
                images.push(data.image_hidden(t.sample)?);
                seen.insert(t.sample, images.len() - 1);
                images.len() - 1
            }
        };
        tokens.push(BatchToken {
            image,
            hidden: data.token_hidden(t).to_vec(),
            labels: labels(data.token_map(t), threshold),
        });
    }
    Ok(Batch {
        hidden_size: data.hidden_size,
        n_patches: data.n_patches,
        images,
        tokens,
    })
}

/// Mean loss over a token set, in chunks of whole samples.
fn eval_loss<B: Backend>(
    b: &B,
    w: &HeadWeights,
    data: &Dataset,
    tokens: &[usize],
    threshold: f32,
) -> Result<f64> {
    const CHUNK: usize = 256;
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in tokens.chunks(CHUNK) {
        let batch = make_batch(data, chunk, threshold)?;
        sum += head_pass(b, w, &batch, false)?.loss * chunk.len() as f64;
        count += chunk.len();
    }
    Ok(sum / count as f64)
}

/// Trains a head on `data`. `progress(step, steps, last_loss)` is called after every step.
pub fn train<B: Backend>(
    b: &B,
    data: &Dataset,
    opts: &TrainOptions,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainReport> {
    opts.validate()?;
    let t0 = Instant::now();
    let threshold = opts.label_threshold.unwrap_or(data.label_threshold);
    let d = opts.head_dim.unwrap_or(data.hidden_size);
    // Split by sample: a seeded permutation, the first ones held out.
    let n_samples = data.samples.len();
    let mut perm: Vec<usize> = (0..n_samples).collect();
    let mut rng = SplitMix64::new(opts.seed ^ 0x7261_696e_7370_6c74);
    shuffle(&mut perm, &mut rng);
    let n_val = if opts.val_fraction > 0.0 {
        if n_samples < 2 {
            return Err(Error::input(format!(
                "a validation split needs at least 2 samples; {} has {n_samples} (use --val-fraction 0)",
                data.dir.display()
            )));
        }
        ((opts.val_fraction * n_samples as f64).round() as usize).clamp(1, n_samples - 1)
    } else {
        0
    };
    let mut is_val = vec![false; n_samples];
    for &s in &perm[..n_val] {
        is_val[s] = true;
    }
    let (val_tokens, mut train_tokens): (Vec<usize>, Vec<usize>) =
        (0..data.tokens.len()).partition(|&i| is_val[data.tokens[i].sample]);
    if train_tokens.is_empty() {
        return Err(Error::input(
            "the training split has no tokens (every token's sample went to validation)",
        ));
    }
    // The best constant predictor, for comparison.
    let mut pos = 0.0;
    for &i in &train_tokens {
        pos += labels(data.token_map(&data.tokens[i]), threshold)
            .iter()
            .sum::<f32>() as f64;
    }
    let label_mean = pos / (train_tokens.len() * data.n_patches) as f64;
    let label_mean_val_loss = if val_tokens.is_empty() {
        None
    } else {
        let pm = label_mean.clamp(1e-7, 1.0 - 1e-7);
        let z = (pm / (1.0 - pm)).ln();
        let mut s = 0.0;
        for &i in &val_tokens {
            for y in labels(data.token_map(&data.tokens[i]), threshold) {
                s += bce_with_logits(z, y as f64);
            }
        }
        Some(s / (val_tokens.len() * data.n_patches) as f64)
    };

    let mut w = HeadWeights::random(data.hidden_size, d, opts.seed);
    w.cfg.label_threshold = threshold;
    let mut adam = Adam::new(opts.lr);
    let eval_every = opts
        .eval_every
        .unwrap_or_else(|| opts.steps.div_ceil(50).max(1));
    let val = |w: &HeadWeights| -> Result<Option<f64>> {
        if val_tokens.is_empty() {
            Ok(None)
        } else {
            eval_loss(b, w, data, &val_tokens, threshold).map(Some)
        }
    };
    let mut curve = vec![CurvePoint {
        step: 0,
        train_loss: f64::NAN,
        val_loss: val(&w)?,
    }];
    shuffle(&mut train_tokens, &mut rng);
    let mut cursor = 0;
    let (mut since_sum, mut since_n) = (0.0, 0usize);
    for step in 1..=opts.steps {
        let mut ids = Vec::with_capacity(opts.batch);
        while ids.len() < opts.batch {
            if cursor == train_tokens.len() {
                shuffle(&mut train_tokens, &mut rng);
                cursor = 0;
            }
            ids.push(train_tokens[cursor]);
            cursor += 1;
        }
        let batch = make_batch(data, &ids, threshold)?;
        let pass = head_pass(b, &w, &batch, true)?;
        if !pass.loss.is_finite() {
            return Err(Error::input(format!(
                "the training loss became {} at step {step} (try a smaller --lr)",
                pass.loss
            )));
        }
        if step == 1 {
            curve[0].train_loss = pass.loss;
        }
        adam.step(&mut w, pass.grads.as_ref().expect("asked for gradients"))?;
        since_sum += pass.loss;
        since_n += 1;
        if step % eval_every == 0 || step == opts.steps {
            curve.push(CurvePoint {
                step,
                train_loss: since_sum / since_n as f64,
                val_loss: val(&w)?,
            });
            since_sum = 0.0;
            since_n = 0;
        }
        progress(step, opts.steps, pass.loss);
    }
    let last = curve.last().expect("at least one point").clone();
    w.cfg.provenance = format!(
        "fastrm train: data {} ({} samples, {} tokens; {} train / {} validation samples, split by sample), \
         steps {}, batch {}, lr {}, Adam(0.9, 0.999, 1e-8), seed {}, head_dim {}, label_threshold {}, \
         final train loss {:.6}, final val loss {}",
        data.dir.display(),
        n_samples,
        data.tokens.len(),
        n_samples - n_val,
        n_val,
        opts.steps,
        opts.batch,
        opts.lr,
        opts.seed,
        d,
        threshold,
        last.train_loss,
        last.val_loss.map_or("n/a".to_string(), |v| format!("{v:.6}")),
    );
    Ok(TrainReport {
        head: w,
        curve,
        train_samples: n_samples - n_val,
        val_samples: n_val,
        train_tokens: train_tokens.len(),
        val_tokens: val_tokens.len(),
        label_mean_val_loss,
        label_mean,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The loss curve as CSV: `step,train_loss,val_loss` (val empty without a validation split).
pub fn curve_csv(curve: &[CurvePoint]) -> String {
    let mut s = String::from("step,train_loss,val_loss\n");
    for c in curve {
        let v = c.val_loss.map_or(String::new(), |v| format!("{v:.8}"));
        s.push_str(&format!("{},{:.8},{}\n", c.step, c.train_loss, v));
    }
    s
}

pub use plot::loss_plot;

/// A `fastrm train` run: the data set, where the head goes, the optimiser's settings and the
/// device.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Data folder written by `distill` (manifest.json and shards).
    pub data: PathBuf,
    /// The head file; the loss curve goes next to it as `<out>.loss.csv` and `<out>.loss.png`.
    pub out: PathBuf,
    pub options: TrainOptions,
    pub device: Device,
    pub dtype: Option<Dtype>,
}

/// [`train`] as a body for [`with_backend`].
struct TrainOn<'a> {
    data: &'a Dataset,
    opts: &'a TrainOptions,
    progress: &'a mut dyn FnMut(usize, usize, f64),
}

impl WithBackend for TrainOn<'_> {
    type Output = (TrainReport, String);
    fn run<B: AnyBackend>(self, backend: B) -> Result<(TrainReport, String)> {
        let report = train(&backend, self.data, self.opts, self.progress)?;
        Ok((report, backend.name()))
    }
}

fn side_path(out: &Path, suffix: &str) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The `fastrm train` command: trains on the `--device` backend, writes the head, the CSV and the
/// plot, prints a one-line summary.
pub fn run(args: TrainJob) -> Result<TrainSummary> {
    let opts = args.options;
    opts.validate()?;
    let (device, dtype) = (args.device, args.dtype);
    let out = &args.out;
    if out.is_dir() {
        return Err(Error::input(format!(
            "--out {} is a folder; name the head file (e.g. head.safetensors)",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::input(format!(
            "--out {}: folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    let data = Dataset::open(&args.data)?;
    let start = Instant::now();
    let mut last_draw = 0.0f64;
    let mut progress = |step: usize, total: usize, loss: f64| {
        let t = start.elapsed().as_secs_f64();
        if t - last_draw < 0.1 && step != total {
            return;
        }
        last_draw = t;
        let detail = format!(
            "loss {loss:.4} elapsed {} {}",
            status::clock(t),
            status::eta(t, step, total - step)
        );
        status::progress("train", step, total, &detail);
    };
    let report = with_backend(
        device,
        dtype,
        TrainOn {
            data: &data,
            opts: &opts,
            progress: &mut progress,
        },
    );
    status::clear();
    let (report, backend) = report?;
    report.head.save(out)?;
    let csv_path = side_path(out, ".loss.csv");
    std::fs::write(&csv_path, curve_csv(&report.curve)).map_err(|e| Error::io(&csv_path, e))?;
    crate::render::write_png(&side_path(out, ".loss.png"), &loss_plot(&report.curve)?)?;
    Ok(TrainSummary {
        head_file: out.to_path_buf(),
        backend,
        steps: opts.steps,
        train_samples: report.train_samples,
        val_samples: report.val_samples,
        train_tokens: report.train_tokens,
        val_tokens: report.val_tokens,
        seconds: report.seconds,
        train_loss: report.final_train_loss(),
        val_loss: report.final_val_loss(),
        initial_val_loss: report.initial_val_loss(),
        label_mean_val_loss: report.label_mean_val_loss,
    })
}

/// What `fastrm train` returns: the run behind the head, loss CSV and plot it wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub head_file: PathBuf,
    pub backend: String,
    pub steps: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub seconds: f64,
    /// The last logged mean batch loss.
    pub train_loss: f64,
    /// Validation loss at the end and before training; `None` without a validation split.
    pub val_loss: Option<f64>,
    pub initial_val_loss: Option<f64>,
    /// The constant predictor's validation loss (mean training label), for comparison.
    pub label_mean_val_loss: Option<f64>,
}
