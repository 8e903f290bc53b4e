//! `training_curves.svg`: the training loss at every step and the validation metric at every
//! epoch, the best epoch marked; drawn from what `training_log.jsonl` holds.

use std::fmt::Write;

use adapterkit::train::EpochReport;

const PANEL_WIDTH: f64 = 360.0;
const PANEL_HEIGHT: f64 = 220.0;
const MARGIN: f64 = 50.0;

/// A plot area: `values` over `0..len` mapped onto a panel whose left edge is at `left`.
struct Panel {
    left: f64,
    len: usize,
    low: f64,
    high: f64,
}

impl Panel {
    fn new(left: f64, values: &[f64]) -> Self {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (low, high) = finite.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
        let (low, high) = match (low <= high, high - low > 1e-12) {
            (true, true) => (low, high),
            (true, false) => (low - 0.5, high + 0.5),
            _ => (0.0, 1.0),
        };
        Self {
            left,
            len: values.len(),
            low,
            high,
        }
    }

    fn x(&self, i: usize) -> f64 {
        let span = (self.len.max(2) - 1) as f64;
        self.left + PANEL_WIDTH * i as f64 / span
    }

    fn y(&self, v: f64) -> f64 {
        MARGIN + PANEL_HEIGHT * (1.0 - (v - self.low) / (self.high - self.low))
    }

    /// The frame, the title and the value range at the left edge.
    fn frame(&self, svg: &mut String, title: &str) {
        let (l, t) = (self.left, MARGIN);
        let _ = write!(
            svg,
            "<rect x=\"{l}\" y=\"{t}\" width=\"{PANEL_WIDTH}\" height=\"{PANEL_HEIGHT}\" fill=\"none\" stroke=\"#999\"/>\n\
             <text x=\"{l}\" y=\"{}\" font-weight=\"bold\">{title}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.4}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.4}</text>\n",
            t - 10.0,
            l - 4.0,
            t + 10.0,
            self.high,
            l - 4.0,
            t + PANEL_HEIGHT,
            self.low
        );
    }

    fn polyline(&self, values: &[f64], colour: &str) -> String {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", self.x(i), self.y(*v)))
            .collect();
        format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>\n",
            points.join(" ")
        )
    }
}

/// The SVG for one run: `metric` is the validation metric that picked the best epoch.
pub fn training_curves_svg(epochs: &[EpochReport], metric: &str) -> String {
    let losses: Vec<f64> = epochs.iter().flat_map(|e| e.step_losses.clone()).collect();
    let values: Vec<f64> = epochs
        .iter()
        .map(|e| e.validation.get(metric).unwrap_or(f64::NAN))
        .collect();
    let width = 2.0 * PANEL_WIDTH + 3.0 * MARGIN + 20.0;
    let height = PANEL_HEIGHT + 2.0 * MARGIN + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );

    let loss = Panel::new(MARGIN + 20.0, &losses);
    loss.frame(&mut svg, "training loss per step");
    // Where each epoch ends.
    let mut end = 0;
    for e in epochs.iter().take(epochs.len().saturating_sub(1)) {
        end += e.step_losses.len();
        let x = loss.x(end.saturating_sub(1));
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{MARGIN}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/>",
            MARGIN + PANEL_HEIGHT
        );
    }
    svg.push_str(&loss.polyline(&losses, "#1f77b4"));
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\">step 1 to {}</text>",
        loss.left,
        MARGIN + PANEL_HEIGHT + 16.0,
        losses.len()
    );

    let validation = Panel::new(2.0 * MARGIN + PANEL_WIDTH + 40.0, &values);
    validation.frame(&mut svg, &format!("validation {metric} per epoch"));
    svg.push_str(&validation.polyline(&values, "#2ca02c"));
    for (i, (e, v)) in epochs.iter().zip(&values).enumerate() {
        if !v.is_finite() {
            continue;
        }
        let (x, y) = (validation.x(i), validation.y(*v));
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#2ca02c\"/>"
        );
        if e.best && epochs[i + 1..].iter().all(|later| !later.best) {
            let _ = writeln!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"7\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"#d62728\">best: epoch {} ({v:.4})</text>",
                validation.left,
                MARGIN + PANEL_HEIGHT + 16.0,
                e.epoch
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
