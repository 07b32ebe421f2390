//! How the jobs' reports look on the terminal: tables for people, or the report's own JSON
//! (`--json`, one object on stdout).

use serde::Serialize;

use crate::distill::{DistillSummary, MergeSummary};
use crate::eval::{EvalReport, PointingScore};
use crate::profile::Profiled;
use crate::status::out;
use crate::train::TrainSummary;
use crate::Result;

/// `value` as one line of JSON on stdout.
fn json(value: &impl Serialize) -> Result<()> {
    let text = crate::util::json_text(value, false)?;
    out(&text)
}

/// Four decimals, or `n/a`.
fn f(x: impl Into<Option<f64>>) -> String {
    x.into().map_or("n/a".to_string(), |x| format!("{x:.4}"))
}

/// A 95 % interval as `[lo, hi]`, or nothing.
fn ci(x: Option<[f64; 2]>) -> String {
    x.map_or(String::new(), |[lo, hi]| format!("  [{lo:.3}, {hi:.3}]"))
}

/// `fastrm eval`'s report.
pub fn eval(r: &EvalReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(r);
    }
    out(&format!(
        "{} samples, {} tokens, {} patches; label threshold {}",
        r.samples,
        r.tokens,
        r.n_patches,
        f(r.label_threshold as f64)
    ))?;
    out(&format!("\nFastRM vs binarised {} map", r.baseline_method))?;
    out(&format!(
        "{:>9} {:>9} {:>9} {:>9} {:>9}  {}",
        "threshold", "accuracy", "precision", "recall", "F1", "F1 95% interval"
    ))?;
    for c in &r.classification {
        out(&format!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            f(c.threshold as f64).trim_end_matches('0'),
            f(c.accuracy),
            f(c.precision),
            f(c.recall),
            f(c.f1),
            ci(Some(c.f1_ci95))
        ))?;
    }
    if !r.classification_by_type.is_empty() {
        out("Best F1 per question type (threshold, 95% interval over its questions)")?;
        for (t, c) in &r.classification_by_type {
            out(&format!(
                "  {t}: {} at {} {} ({} samples)",
                f(c.best.f1),
                f(c.best.threshold as f64).trim_end_matches('0'),
                ci(Some(c.best.f1_ci95)),
                c.samples
            ))?;
        }
    }
    if let Some(p) = &r.perturbation {
        out("\nPerturbation AUC (positive: lower is better; negative: higher is better)")?;
        out(&format!(
            "{:<22} {:>9} {:>9}",
            "method", "positive", "negative"
        ))?;
        for (name, m) in &p.methods {
            out(&format!(
                "{name:<22} {:>9} {:>9}",
                f(m.positive.auc),
                f(m.negative.auc)
            ))?;
        }
    }
    let c = &r.confidence;
    out("\nEntropy confidence (Gaussian KDE, Scott's bandwidth)")?;
    out(&format!(
        "correct: {} answers, mean {}; incorrect: {} answers, mean {}",
        c.correct.count,
        f(c.correct.mean_entropy),
        c.incorrect.count,
        f(c.incorrect.mean_entropy)
    ))?;
    match c.threshold {
        Some(t) => out(&format!(
            "threshold {t:.4}: below TP {} FP {}, above FN {} TN {}{}",
            c.below.tp,
            c.below.fp,
            c.above.fn_,
            c.above.tn,
            if c.written_to_head {
                " (written to the head)"
            } else {
                ""
            }
        ))?,
        None => out(c.note.unwrap_or("no threshold"))?,
    }
    if let Some(p) = &r.pointing {
        out(&format!(
            "\nPointing game ({} samples with a target)",
            p.samples
        ))?;
        let table = |methods: &std::collections::BTreeMap<String, PointingScore>| -> Result<()> {
            out(&format!(
                "{:<22} {:>9} {:<17} {:>9} {:<17} {:>7}",
                "method", "hit rate", "  95% interval", "mass", "  95% interval", "tokens"
            ))?;
            for (name, m) in methods {
                out(&format!(
                    "{name:<22} {:>9} {:<17} {:>9} {:<17} {:>7}",
                    f(m.hit_rate),
                    ci(m.hit_rate_ci95),
                    f(m.mask_mass),
                    ci(m.mask_mass_ci95),
                    m.tokens
                ))?;
            }
            Ok(())
        };
        table(&p.methods)?;
        for (t, methods) in &p.by_type {
            let n = methods.values().map(|m| m.samples).max().unwrap_or(0);
            out(&format!("question type {t} ({n} samples)"))?;
            table(methods)?;
        }
    }
    if let Some(a) = &r.accuracy {
        out(&format!("\nModel accuracy: {}", f(a.overall.accuracy)))?;
        for (k, v) in &a.by_type {
            out(&format!("  {k}: {} ({} samples)", f(v.accuracy), v.samples))?;
        }
        out(&format!(
            "  multi-object scenes: {} ({} samples)",
            f(a.multi_object.accuracy),
            a.multi_object.samples
        ))?;
    }
    Ok(())
}

/// `fastrm profile`'s report: the table and the files written, or the JSON.
pub fn profile(p: &Profiled, as_json: bool) -> Result<()> {
    if as_json {
        return json(p);
    }
    out(p.report.table().trim_end())?;
    if !p.files.is_empty() {
        out("")?;
        for f in &p.files {
            out(&format!("wrote {}", f.display()))?;
        }
    }
    Ok(())
}

/// `fastrm distill`'s one line.
pub fn distilled(d: &DistillSummary) -> Result<()> {
    out(&format!(
        "distilled {} samples ({} tokens) in {:.1}s on {}; {}{}: {} samples, {} tokens, {} shards",
        d.new_samples,
        d.new_tokens,
        d.seconds,
        d.backend,
        d.out.display(),
        d.shard.map_or(String::new(), |s| format!(" (shard {s})")),
        d.samples,
        d.tokens,
        d.shards
    ))
}

/// `fastrm merge`'s one line.
pub fn merged(m: &MergeSummary) -> Result<()> {
    out(&format!(
        "merged {} shards in {:.1}s; {}: {} samples, {} tokens, {} shards",
        m.inputs,
        m.seconds,
        m.out.display(),
        m.samples,
        m.tokens,
        m.shards
    ))
}

/// `fastrm train`'s one line.
pub fn trained(t: &TrainSummary) -> Result<()> {
    out(&format!(
        "trained {} steps ({} train / {} val samples, {} / {} tokens) in {} on {}: train loss \
         {:.4}, val loss {} (initial {}, label-mean predictor {}) → {}",
        t.steps,
        t.train_samples,
        t.val_samples,
        t.train_tokens,
        t.val_tokens,
        crate::status::clock(t.seconds),
        t.backend,
        t.train_loss,
        f(t.val_loss),
        f(t.initial_val_loss),
        f(t.label_mean_val_loss),
        t.head_file.display()
    ))
}
