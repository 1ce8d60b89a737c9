//! Issue 20's two charts, hand-written SVG like [`crate::plot`]: the mean
//! KLD against context length, one line per method (`--context-plot`), and
//! the passkey accuracies as a heat map, one panel per method with the
//! baseline first (`--passkey-plot`). Labels go through [`crate::labels`].

use crate::labels;
use crate::long_context::LongContextReport;
use crate::passkey::PasskeyReport;
use crate::plot::escape;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Room right of the plot for the methods' names at their lines' ends.
const RIGHT: f64 = 230.0;
/// Line colours, cycled.
const COLORS: [&str; 8] = [
    "#3366cc", "#d1495b", "#2a9d4b", "#e08a00", "#8e44ad", "#16a085", "#7f8c8d", "#c0392b",
];
/// Smallest KLD drawn: a method with none lower sits on the axis floor.
const KLD_FLOOR: f64 = 1e-6;

/// Mean KLD (tokens on a compressed cache) against context length, one line
/// per method; x is log2 of the length, y log10 of the KLD.
pub fn render_context_svg(report: &LongContextReport) -> String {
    let labels = report.labels();
    let lengths: Vec<f64> = report
        .lengths
        .iter()
        .map(|l| l.context_length as f64)
        .collect();
    let series: Vec<Vec<(f64, f64)>> = labels
        .iter()
        .map(|label| {
            report
                .lengths
                .iter()
                .filter_map(|length| {
                    let row = length.rows.iter().find(|r| r.label == *label)?;
                    Some((length.context_length as f64, row.kld_mean?.max(KLD_FLOOR)))
                })
                .collect()
        })
        .collect();
    let all = series.iter().flatten();
    let y_lo = all
        .clone()
        .map(|p| p.1.log10())
        .fold(f64::INFINITY, f64::min)
        .floor();
    let y_hi = all
        .map(|p| p.1.log10())
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil();
    let (y_lo, y_hi) = if y_lo.is_finite() && y_hi > y_lo {
        (y_lo, y_hi)
    } else {
        (-6.0, 0.0)
    };
    let x_lo = lengths.iter().copied().fold(f64::INFINITY, f64::min).log2();
    let x_hi = lengths.iter().copied().fold(0.0, f64::max).log2();
    let (x_lo, x_hi) = if x_hi > x_lo {
        (x_lo - 0.25, x_hi + 0.25)
    } else {
        (x_lo - 1.0, x_lo + 1.0)
    };
    let plot_x = (LEFT, WIDTH - RIGHT);
    let plot_y = (HEIGHT - BOTTOM, TOP);
    let px = |length: f64| map(length.log2(), (x_lo, x_hi), plot_x);
    let py = |kld: f64| map(kld.log10(), (y_lo, y_hi), plot_y);

    let mut svg = header(
        WIDTH,
        HEIGHT,
        &format!(
            "Mean KL divergence against context length ({} scored tokens per window)",
            report.targets
        ),
    );
    for &length in &lengths {
        let x = px(length);
        svg.push(format!(
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="12">{length}</text>"##,
            plot_y.0, plot_y.1, plot_y.0 + 20.0
        ));
    }
    let mut power = y_lo as i32;
    while power <= y_hi as i32 {
        let y = py(10f64.powi(power));
        svg.push(format!(
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="12">1e{power}</text>"##,
            plot_x.0, plot_x.1, plot_x.0 - 8.0, y + 4.0
        ));
        power += 1;
    }
    svg.push(frame(plot_x, plot_y));
    svg.push(axis_titles(
        plot_x,
        plot_y,
        "context length, tokens (log scale)",
        "mean KLD, nats (log scale)",
    ));
    let mut ends = Vec::new();
    for (index, (label, points)) in labels.iter().zip(&series).enumerate() {
        let color = COLORS[index % COLORS.len()];
        let line: Vec<String> = points
            .iter()
            .map(|&(l, k)| format!("{:.1},{:.1}", px(l), py(k)))
            .collect();
        svg.push(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.8"/>"#,
            line.join(" ")
        ));
        for &(length, kld) in points {
            svg.push(format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {length} tokens, KLD {kld:.3e}</title></circle>"#,
                px(length),
                py(kld),
                escape(label)
            ));
        }
        if let Some(&(length, kld)) = points.last() {
            // The line runs on, dotted, to the plot's edge, where its name is.
            let (x, y) = (px(length), py(kld));
            svg.push(format!(
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-dasharray="2 3"/>"#,
                plot_x.1
            ));
            ends.push(((plot_x.1, y), label.to_string(), color));
        }
    }
    // Each method's name right of the plot, level with its line's end, or
    // joined to it by a leader where names crowd.
    let anchors: Vec<(f64, f64)> = ends.iter().map(|e| e.0).collect();
    let names: Vec<String> = ends.iter().map(|e| e.1.clone()).collect();
    let colors: Vec<&str> = ends.iter().map(|e| e.2).collect();
    let area = (plot_x.1, TOP - 20.0, WIDTH - 4.0, HEIGHT - BOTTOM + 20.0);
    let placed = labels::place(&anchors, &names, &[], area);
    svg.extend(labels::render(
        &anchors,
        &names,
        &placed,
        &colors,
        (plot_x.1 + 12.0, HEIGHT - BOTTOM + 40.0),
        escape,
    ));
    finish(svg)
}

/// Heat-map colour of an accuracy in [0, 1]: red, amber, green.
fn heat(accuracy: f64) -> String {
    let (r, g, b) = if accuracy < 0.5 {
        let t = accuracy / 0.5;
        (
            209.0 + t * (240.0 - 209.0),
            73.0 + t * (180.0 - 73.0),
            91.0 - t * 60.0,
        )
    } else {
        let t = (accuracy - 0.5) / 0.5;
        (
            240.0 - t * (240.0 - 42.0),
            180.0 - t * (180.0 - 157.0),
            31.0 + t * (75.0 - 31.0),
        )
    };
    format!("rgb({:.0},{:.0},{:.0})", r, g, b)
}

/// The passkey accuracies: one panel per method (baseline first), rows the
/// haystack lengths, columns the depths, each cell "correct/trials".
pub fn render_passkey_svg(report: &PasskeyReport) -> String {
    const CELL_W: f64 = 54.0;
    const CELL_H: f64 = 26.0;
    const PANEL_LEFT: f64 = 60.0;
    const PANEL_TOP: f64 = 40.0;
    const PANELS_PER_ROW: usize = 3;
    let (rows, cols) = (report.lengths.len(), report.depths.len());
    let title_of = |method: &crate::passkey::MethodResult| match method.bits_per_value {
        Some(bits) => format!("{} ({bits:.2} bits/value)", method.label),
        None => method.label.clone(),
    };
    // Wide enough for the grid and for the longest title (bold 12 px).
    let longest_title = report
        .methods
        .iter()
        .map(|m| title_of(m).chars().count())
        .max()
        .unwrap_or(0);
    let panel_w = (PANEL_LEFT + cols as f64 * CELL_W + 24.0)
        .max(PANEL_LEFT + longest_title as f64 * 7.6 + 16.0);
    let panel_h = PANEL_TOP + rows as f64 * CELL_H + 40.0;
    let panels = report.methods.len();
    let across = panels.min(PANELS_PER_ROW);
    let down = panels.div_ceil(PANELS_PER_ROW);
    let width = (across as f64 * panel_w + 20.0).max(560.0);
    let height = 60.0 + down as f64 * panel_h + 30.0;
    let mut svg = header(
        width,
        height,
        &format!(
            "Passkey retrieval: correct of {} trials per cell (seed {})",
            report.trials, report.seed
        ),
    );
    for (index, method) in report.methods.iter().enumerate() {
        let x0 = 10.0 + (index % PANELS_PER_ROW) as f64 * panel_w;
        let y0 = 50.0 + (index / PANELS_PER_ROW) as f64 * panel_h;
        let title = title_of(method);
        svg.push(format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="12" font-weight="bold">{}</text>"#,
            x0 + PANEL_LEFT,
            y0 + 16.0,
            escape(&title)
        ));
        for (c, depth) in report.depths.iter().enumerate() {
            svg.push(format!(
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{depth}%</text>"#,
                x0 + PANEL_LEFT + (c as f64 + 0.5) * CELL_W,
                y0 + PANEL_TOP - 6.0
            ));
        }
        for (r, length) in report.lengths.iter().enumerate() {
            let y = y0 + PANEL_TOP + r as f64 * CELL_H;
            svg.push(format!(
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{length}</text>"#,
                x0 + PANEL_LEFT - 6.0,
                y + CELL_H / 2.0 + 4.0
            ));
            for (c, depth) in report.depths.iter().enumerate() {
                let Some(cell) = method
                    .cells
                    .iter()
                    .find(|cell| cell.length == *length && cell.depth == *depth)
                else {
                    continue;
                };
                let x = x0 + PANEL_LEFT + c as f64 * CELL_W;
                // Where the uncompressed model itself missed, a method's
                // cell is outlined: its misses there are not compression's.
                let baseline_missed = report.baseline_misses.contains(&(*length, *depth));
                svg.push(format!(
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{CELL_W}" height="{CELL_H}" fill="{}" stroke="white"><title>{}: length {length}, depth {depth}%: {}/{}</title></rect><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}/{}</text>"#,
                    heat(cell.correct as f64 / cell.trials.max(1) as f64),
                    escape(&method.label),
                    cell.correct,
                    cell.trials,
                    x + CELL_W / 2.0,
                    y + CELL_H / 2.0 + 4.0,
                    cell.correct,
                    cell.trials
                ));
                if baseline_missed && index > 0 {
                    svg.push(format!(
                        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#333" stroke-width="1.5" stroke-dasharray="4 3"/>"##,
                        x + 2.0,
                        y + 2.0,
                        CELL_W - 4.0,
                        CELL_H - 4.0
                    ));
                }
            }
        }
        svg.push(format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">key depth (rows: haystack tokens)</text>"#,
            x0 + PANEL_LEFT + cols as f64 * CELL_W / 2.0,
            y0 + PANEL_TOP + rows as f64 * CELL_H + 16.0
        ));
    }
    if !report.baseline_misses.is_empty() {
        svg.push(format!(
            r#"<text x="10" y="{:.1}" font-size="11">Dashed outline: the uncompressed model itself missed a key there, so a method's misses there are not compression's.</text>"#,
            height - 12.0
        ));
    }
    finish(svg)
}

fn map(value: f64, (from_lo, from_hi): (f64, f64), (to_lo, to_hi): (f64, f64)) -> f64 {
    to_lo + (value - from_lo) / (from_hi - from_lo) * (to_hi - to_lo)
}

fn header(width: f64, height: f64, title: &str) -> Vec<String> {
    vec![
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
        ),
        format!(r#"<rect width="{width}" height="{height}" fill="white"/>"#),
        format!(
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            width / 2.0,
            escape(title)
        ),
    ]
}

fn frame(plot_x: (f64, f64), plot_y: (f64, f64)) -> String {
    format!(
        r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        plot_x.0,
        plot_y.1,
        plot_x.1 - plot_x.0,
        plot_y.0 - plot_y.1
    )
}

fn axis_titles(plot_x: (f64, f64), plot_y: (f64, f64), x_title: &str, y_title: &str) -> String {
    format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{x_title}</text><text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle" font-size="13">{y_title}</text>"#,
        (plot_x.0 + plot_x.1) / 2.0,
        HEIGHT - 18.0,
        (plot_y.0 + plot_y.1) / 2.0,
    )
}

fn finish(mut svg: Vec<String>) -> String {
    svg.push("</svg>".to_string());
    svg.join("\n") + "\n"
}
