//! The loss curve as a line plot ([`crate::render::plot`]): the training loss in blue and the
//! validation loss in orange with a legend, x from step 0 to the last step, y from the smallest to
//! the largest loss shown (5% padding). The exact numbers are in the CSV next to the plot.

use super::CurvePoint;
use crate::error::Result;
use crate::render::plot::{line_plot, Axis, LinePlot, Series, PALETTE};
use crate::vision::RgbImage;

pub const TRAIN_COLOR: [u8; 3] = PALETTE[0];
pub const VAL_COLOR: [u8; 3] = PALETTE[1];

/// Draws the curve (points with a non-finite loss are skipped).
pub fn loss_plot(curve: &[CurvePoint]) -> Result<RgbImage> {
    let max_step = curve.iter().map(|c| c.step).max().unwrap_or(1).max(1) as f64;
    let mut x = Axis::linear("step");
    x.range = Some((0.0, max_step));
    let mut plot = LinePlot::new("training loss", x, Axis::linear("BCE loss"));
    let series = |name: &str, color, pick: &dyn Fn(&CurvePoint) -> Option<f64>| Series {
        name: name.into(),
        color,
        points: curve
            .iter()
            .filter_map(|c| pick(c).map(|v| (c.step as f64, v)))
            .collect(),
        markers: false,
    };
    plot.series
        .push(series("train", TRAIN_COLOR, &|c| Some(c.train_loss)));
    if curve.iter().any(|c| c.val_loss.is_some()) {
        plot.series
            .push(series("validation", VAL_COLOR, &|c| c.val_loss));
    }
    line_plot(&plot)
}
