//! The sweep as SVG charts, written by hand (no plotting dependency; the
//! labels' placement, [`crate::labels`], is what a chart here needs most
//! and no plotting crate does it): the
//! perplexity delta, or the mean KL divergence, against bits/value; one
//! labelled point per variant, that metric's Pareto front as a line and its
//! pass bound (threshold, max-kld) as a dashed line. `capacity` draws its
//! concurrency chart with the same code ([`render_points`]).
//!
//! Deltas span four orders of magnitude (INT8 +0.002, 2-bit +8), KLDs six, so
//! the y axis is symmetric-logarithmic: linear within ±[`Chart::linear`],
//! logarithmic beyond, and zero and small negative deltas still have a place.

use crate::labels;
use crate::sweep::{SweepRow, SweepTable};

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const PASSED_COLOR: &str = "#2a9d4b";
const FAILED_COLOR: &str = "#d1495b";
const FRONT_COLOR: &str = "#3366cc";

/// What one chart plots against bits/value.
pub struct Chart {
    pub title: String,
    pub y_label: String,
    /// Below this |value| the y axis is linear.
    pub linear: f64,
    /// The pass bound and its name.
    pub bound: Option<(f64, &'static str)>,
    /// What the lines are, for the legend ("Pareto front").
    pub line_name: &'static str,
}

/// One point of a chart: a labelled value at a bits/value.
pub struct Point {
    /// Drawn beside the point; an empty label is only the point's tooltip.
    pub label: String,
    /// The tooltip's name of the point.
    pub name: String,
    pub bits_per_value: f64,
    pub value: f64,
    pub passed: bool,
}

/// The symmetric-log transform of `value`, linear within ±`linear`.
fn symlog(value: f64, linear: f64) -> f64 {
    value.signum() * (1.0 + value.abs() / linear).log10()
}

/// Linear map of `value` in `[from_lo, from_hi]` onto `[to_lo, to_hi]`.
fn map(value: f64, (from_lo, from_hi): (f64, f64), (to_lo, to_hi): (f64, f64)) -> f64 {
    to_lo + (value - from_lo) / (from_hi - from_lo) * (to_hi - to_lo)
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick value as a short label: `0`, `0.01`, `10`, `-0.1`.
fn tick_label(value: f64) -> String {
    let text = format!("{value}");
    text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
}

/// The perplexity delta against bits/value, as a standalone SVG document.
pub fn render_svg(table: &SweepTable) -> String {
    render_rows(
        table,
        &Chart {
            title: format!(
                "Perplexity delta against bits/value (baseline {:.3}; {} variants)",
                table.baseline_perplexity,
                table.rows.len()
            ),
            y_label: "perplexity delta (symmetric log scale)".into(),
            linear: 0.01,
            bound: table.threshold.map(|t| (t, "threshold")),
            line_name: "Pareto front",
        },
        |row| Some(row.delta),
        |row| row.pareto,
    )
}

/// The mean KL divergence (tokens on a compressed cache) against
/// bits/value, as a standalone SVG document.
pub fn render_kld_svg(table: &SweepTable) -> String {
    render_rows(
        table,
        &Chart {
            title: format!(
                "Mean KL divergence against bits/value ({} variants)",
                table.rows.len()
            ),
            y_label: "mean KLD, nats (log scale)".into(),
            linear: 1e-5,
            bound: table.max_kld.map(|k| (k, "max-kld")),
            line_name: "Pareto front",
        },
        |row| row.kld_mean,
        |row| row.pareto_kld,
    )
}

/// The sweep's rows that have a `value`, with their front as the one line.
fn render_rows(
    table: &SweepTable,
    chart: &Chart,
    value: fn(&SweepRow) -> Option<f64>,
    on_front: fn(&SweepRow) -> bool,
) -> String {
    let rows: Vec<&SweepRow> = table
        .rows
        .iter()
        .filter(|row| value(row).is_some())
        .collect();
    let points: Vec<Point> = rows
        .iter()
        .map(|row| Point {
            label: row.label.clone(),
            name: row.label.clone(),
            bits_per_value: row.bits_per_value,
            value: value(row).expect("filtered"),
            passed: row.passed,
        })
        .collect();
    // Rows are sorted by bits, so the front is in order.
    let front = (0..rows.len()).filter(|&i| on_front(rows[i])).collect();
    render_points(&points, &[front], chart)
}

/// `points` against bits/value on a symmetric-log y axis, each of `lines`
/// (indices into `points`, in drawing order) as a polyline.
pub fn render_points(points: &[Point], lines: &[Vec<usize>], chart: &Chart) -> String {
    let on_line = |i: usize| lines.iter().any(|line| line.contains(&i));
    let rows: Vec<(&Point, f64)> = points.iter().map(|p| (p, p.value)).collect();
    let symlog = |value: f64| symlog(value, chart.linear);
    let bits = rows.iter().map(|(r, _)| r.bits_per_value);
    let x_lo = bits.clone().fold(f64::INFINITY, f64::min).floor();
    let x_hi = bits.fold(f64::NEG_INFINITY, f64::max).ceil();
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (0.0, 16.0)
    };
    let deltas = rows
        .iter()
        .map(|&(_, value)| value)
        .chain([0.0])
        .chain(chart.bound.map(|(bound, _)| bound));
    let y_lo = symlog(deltas.clone().fold(0.0, f64::min)) - 0.15;
    let y_hi = symlog(deltas.fold(0.0, f64::max)) + 0.15;

    let plot_x = (LEFT, WIDTH - RIGHT);
    let plot_y = (HEIGHT - BOTTOM, TOP);
    let px = |bits: f64| map(bits, (x_lo, x_hi), plot_x);
    let py = |delta: f64| map(symlog(delta), (y_lo, y_hi), plot_y);

    let at: Vec<(f64, f64)> = rows
        .iter()
        .map(|&(r, value)| (px(r.bits_per_value), py(value)))
        .collect();
    let legend_x = plot_x.1 - 110.0;
    let legend_box = (legend_x - 8.0, plot_y.1 + 6.0, plot_x.1, plot_y.1 + 54.0);
    let mut obstacles = vec![legend_box];
    if let Some((bound, name)) = chart.bound {
        let width = (name.len() + 1 + tick_label(bound).len()) as f64 * labels::CHAR_PX;
        let y = py(bound);
        obstacles.push((plot_x.1 - 4.0 - width, y - 15.0, plot_x.1, y - 1.0));
    }
    let placements = labels::place(
        &at,
        &rows
            .iter()
            .map(|(r, _)| r.label.clone())
            .collect::<Vec<_>>(),
        &obstacles,
        (plot_x.0, plot_y.1, plot_x.1, plot_y.0),
    );
    let list = labels::list_width(
        &rows
            .iter()
            .map(|(r, _)| r.label.clone())
            .collect::<Vec<_>>(),
        &placements,
    );
    let width = WIDTH + list;
    let mut svg = vec![
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif">"#
        ),
        format!(r#"<rect width="{width}" height="{HEIGHT}" fill="white"/>"#),
        format!(
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            WIDTH / 2.0,
            escape(&chart.title)
        ),
    ];

    // Axes, ticks and grid.
    let x_step = if x_hi - x_lo > 12.0 { 2.0 } else { 1.0 };
    let mut tick = x_lo;
    while tick <= x_hi + 1e-9 {
        let x = px(tick);
        svg.push(format!(
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"##,
            plot_y.0, plot_y.1, plot_y.0, plot_y.0 + 5.0, plot_y.0 + 20.0, tick_label(tick)
        ));
        tick += x_step;
    }
    let lowest_power = chart.linear.log10().round() as i32;
    let y_ticks = std::iter::once(0.0).chain((lowest_power..=7).flat_map(|power| {
        let magnitude = 10f64.powi(power);
        [magnitude, -magnitude]
    }));
    for value in y_ticks.filter(|&v| (y_lo..=y_hi).contains(&symlog(v))) {
        let y = py(value);
        svg.push(format!(
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="12">{}</text>"##,
            plot_x.0, plot_x.1, plot_x.0 - 5.0, plot_x.0, plot_x.0 - 8.0, y + 4.0, tick_label(value)
        ));
    }
    svg.push(format!(
        r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        plot_x.0,
        plot_y.1,
        plot_x.1 - plot_x.0,
        plot_y.0 - plot_y.1
    ));
    svg.push(format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">bits per value (every stored byte)</text>"#,
        (plot_x.0 + plot_x.1) / 2.0,
        HEIGHT - 18.0
    ));
    svg.push(format!(
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle" font-size="13">{}</text>"#,
        (plot_y.0 + plot_y.1) / 2.0,
        chart.y_label
    ));

    // The pass bound.
    if let Some((bound, name)) = chart.bound {
        let bound_y = py(bound);
        svg.push(format!(
            r##"<line x1="{:.1}" y1="{bound_y:.1}" x2="{:.1}" y2="{bound_y:.1}" stroke="#e08a00" stroke-width="1.5" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11" fill="#e08a00">{name} {bound}</text>"##,
            plot_x.0,
            plot_x.1,
            plot_x.1 - 4.0,
            bound_y - 4.0,
        ));
    }

    for line in lines {
        let line: Vec<String> = line
            .iter()
            .map(|&i| {
                format!(
                    "{:.1},{:.1}",
                    px(points[i].bits_per_value),
                    py(points[i].value)
                )
            })
            .collect();
        svg.push(format!(
            r#"<polyline points="{}" fill="none" stroke="{FRONT_COLOR}" stroke-width="1.5"/>"#,
            line.join(" ")
        ));
    }

    for (index, (&(row, value), &(x, y))) in rows.iter().zip(&at).enumerate() {
        let color = if row.passed {
            PASSED_COLOR
        } else {
            FAILED_COLOR
        };
        let stroke = if on_line(index) { FRONT_COLOR } else { color };
        svg.push(format!(
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="{color}" stroke="{stroke}" stroke-width="1.5"><title>{}: {:.3} bits/value, {value:+.6}</title></circle>"#,
            escape(&row.name),
            row.bits_per_value,
        ));
    }
    // Labels: beside their point, else joined by a leader, else numbered
    // and listed right of the plot (the SVG widened for the list).
    let labels: Vec<String> = rows.iter().map(|(r, _)| r.label.clone()).collect();
    svg.extend(labels::render(
        &at,
        &labels,
        &placements,
        &[],
        (WIDTH + 6.0, plot_y.1 + 12.0),
        escape,
    ));

    // Legend, top right: few variants have many bits and a large delta.
    svg.push(format!(
        r##"<g font-size="11"><circle cx="{legend_x}" cy="{y0}" r="4.5" fill="{PASSED_COLOR}"/><text x="{tx}" y="{t0}">passed</text><circle cx="{legend_x}" cy="{y1}" r="4.5" fill="{FAILED_COLOR}"/><text x="{tx}" y="{t1}">failed</text><line x1="{lx0}" y1="{y2}" x2="{lx1}" y2="{y2}" stroke="{FRONT_COLOR}" stroke-width="1.5"/><text x="{tx}" y="{t2}">{line_name}</text></g>"##,
        y0 = plot_y.1 + 14.0,
        t0 = plot_y.1 + 18.0,
        y1 = plot_y.1 + 30.0,
        t1 = plot_y.1 + 34.0,
        y2 = plot_y.1 + 46.0,
        t2 = plot_y.1 + 50.0,
        tx = legend_x + 10.0,
        lx0 = legend_x - 6.0,
        lx1 = legend_x + 6.0,
        line_name = chart.line_name,
    ));
    svg.push("</svg>".to_string());
    svg.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::table_of;

    #[test]
    fn symlog_is_linear_near_zero_and_logarithmic_beyond() {
        assert_eq!(symlog(0.0, 0.01), 0.0);
        assert!((symlog(0.01, 0.01) - 2f64.log10()).abs() < 1e-12);
        assert!((symlog(9.99, 0.01) - 3.0).abs() < 1e-12);
        assert_eq!(symlog(-0.5, 0.01), -symlog(0.5, 0.01));
    }

    #[test]
    fn svg_has_one_point_per_variant_the_front_and_the_threshold() {
        let table = table_of(&[
            ("int8", 8.25, 10.002),
            ("kivi4", 4.5, 10.2),
            ("worse<4>", 4.5, 10.9),
            ("kivi2", 2.5, 18.0),
        ]);
        let svg = render_svg(&table);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<circle cx").count(),
            4 + 2,
            "four points and two legend marks"
        );
        assert!(svg.contains(">worse&lt;4&gt;</text>"), "labels are escaped");
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.contains(">threshold 0.5</text>"));
        // The front is kivi2 -> kivi4 -> int8: three points, in order of bits.
        let polyline = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let points = polyline.split('"').nth(1).unwrap();
        let xs: Vec<f64> = points
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        // x axis 2..9 bits over 80..830 px.
        let expected = [2.5, 4.5, 8.25].map(|bits| 80.0 + (bits - 2.0) / 7.0 * 750.0);
        assert_eq!(xs.len(), 3);
        for (x, e) in xs.iter().zip(expected) {
            assert!((x - e).abs() < 0.06, "{x} vs {e}");
        }
        for tick in [
            ">0</text>",
            ">0.1</text>",
            ">1</text>",
            ">2</text>",
            ">9</text>",
        ] {
            assert!(svg.contains(tick), "missing tick {tick}");
        }
    }

    #[test]
    fn kld_svg_plots_the_rows_with_a_kld_against_max_kld_and_their_front() {
        use crate::fidelity::TokenFigures;
        use crate::run_types::PassCriteria;
        use crate::sweep::Measurement;
        let measured = |label: &str, bits: f64, kld: Option<f64>| Measurement {
            label: label.into(),
            flags: String::new(),
            bits_per_value: bits,
            compression_ratio: 32.0 / bits,
            perplexity: 10.5,
            delta_standard_error: None,
            fidelity: kld.and_then(|k| TokenFigures::of(&[k, k], &[true, true], &[0.0, 0.0])),
        };
        let table = SweepTable::new(
            10.0,
            PassCriteria {
                threshold: None,
                max_kld: Some(0.01),
            },
            vec![
                measured("int8", 8.25, Some(2e-5)),
                measured("kivi4", 4.5, Some(0.004)),
                measured("kivi2", 2.5, Some(0.09)),
                measured("no-cache", 3.0, None),
            ],
        );
        let svg = render_kld_svg(&table);
        assert!(svg.contains("Mean KL divergence against bits/value (4 variants)"));
        assert_eq!(
            svg.matches("<circle cx").count(),
            3 + 2,
            "the row without KLD is left out"
        );
        assert!(svg.contains(">max-kld 0.01</text>"));
        assert!(!svg.contains(">no-cache</text>"));
        let polyline = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert_eq!(polyline.split('"').nth(1).unwrap().split(' ').count(), 3);
        // Log ticks down to the linear region's 1e-5.
        assert!(
            svg.contains(">0.00001</text>") && svg.contains(">0.01</text>"),
            "{svg}"
        );
        // The delta chart has no threshold line when only --max-kld applies.
        assert!(!render_svg(&table).contains("stroke-dasharray"));
    }
}
