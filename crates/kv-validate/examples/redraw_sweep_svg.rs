//! Redraws a sweep SVG that kv-validate wrote (docs/fidelity*.svg) from the
//! figures it carries, each point's tooltip `label: B bits/value, V`, its
//! colour (passed/failed), its stroke (on the front), the title and the
//! bound, with today's `plot::render_points`: new label placement without
//! re-running the sweep. `cargo run --release --example redraw_sweep_svg -- IN.svg OUT.svg`
use kv_validate::plot::{render_points, Chart, Point};

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(&text[from..to])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let svg = std::fs::read_to_string(&args[1]).expect("input svg");
    let title = between(&svg, r#"font-size="15">"#, "</text>")
        .expect("title")
        .replace("&amp;", "&");
    let kld = title.starts_with("Mean KL");
    let mut points = Vec::new();
    let mut front = Vec::new();
    for line in svg
        .lines()
        .filter(|l| l.starts_with("<circle cx") && l.contains("<title>"))
    {
        let tip = between(line, "<title>", "</title>").unwrap();
        let (label, rest) = tip.rsplit_once(": ").unwrap();
        let (bits, value) = rest.split_once(" bits/value, ").unwrap();
        if line.contains(r##"stroke="#3366cc""##) {
            front.push(points.len());
        }
        points.push(Point {
            label: label
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
            name: label.to_string(),
            bits_per_value: bits.parse().unwrap(),
            value: value.parse().unwrap(),
            passed: line.contains(r##"fill="#2a9d4b""##),
        });
    }
    let bound_name = if kld { "max-kld" } else { "threshold" };
    let bound = between(
        &svg,
        &format!(r##"fill="#e08a00">{bound_name} "##),
        "</text>",
    )
    .map(|v| (v.parse::<f64>().unwrap(), bound_name));
    let chart = Chart {
        title,
        y_label: if kld {
            "mean KLD, nats (log scale)".into()
        } else {
            "perplexity delta (symmetric log scale)".into()
        },
        linear: if kld { 1e-5 } else { 0.01 },
        bound,
        line_name: "Pareto front",
    };
    std::fs::write(&args[2], render_points(&points, &[front], &chart)).expect("output svg");
}
