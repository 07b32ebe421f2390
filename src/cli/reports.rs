//! How the jobs' reports look on the terminal: tables for people, or the report's own JSON
//! (`--json`, one object on stdout).

use serde::Serialize;

use crate::distill::{DistillSummary, MergeSummary};
use crate::eval::EvalReport;
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
    let row5 = |a: &str, b: &str, c: &str, d: &str, e: &str| {
        out(&format!("{a:>9} {b:>9} {c:>9} {d:>9} {e:>9}"))
    };
    row5("threshold", "accuracy", "precision", "recall", "F1")?;
    for c in &r.classification {
        row5(
            f(c.threshold as f64).trim_end_matches('0'),
            &f(c.accuracy),
            &f(c.precision),
            &f(c.recall),
            &f(c.f1),
        )?;
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
        out(&format!(
            "{:<22} {:>9} {:>9} {:>7}",
            "method", "hit rate", "mass", "tokens"
        ))?;
        for (name, m) in &p.methods {
            out(&format!(
                "{name:<22} {:>9} {:>9} {:>7}",
                f(m.hit_rate),
                f(m.mask_mass),
                m.tokens
            ))?;
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
