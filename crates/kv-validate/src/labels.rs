//! Where a chart's point labels go, so each one can be read as its
//! point's: beside the point when a free spot is there, else a little
//! further away joined to the point by a leader line, else (a crowd) the
//! point gets a number and its label goes to a numbered list beside the
//! plot. Nothing placed overlaps a point, another label or the plot's edge.
//!
//! Hand-written, like the charts: plotting crates (plotters included) draw
//! text where they are told and place no labels, so this logic would be
//! needed on top of one anyway.

/// A box as (left, top, right, bottom), pixels.
pub type Rect = (f64, f64, f64, f64);
/// A line segment from one point to another, pixels.
type Segment = ((f64, f64), (f64, f64));

/// Height of one label line, pixels (11 px text).
pub const LINE_PX: f64 = 11.0;
/// Rough width of one label character at 11 px.
pub const CHAR_PX: f64 = 6.2;
/// Radius of the box a point occupies.
const POINT_PX: f64 = 5.0;
/// Steps tried beside a point before a leader line is needed.
const NEAR_STEPS: usize = 3;
/// Steps tried in all before a point is numbered.
const FAR_STEPS: usize = 16;

/// Where one label went.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// Text at (left, baseline), next to its point.
    Beside { left: f64, baseline: f64 },
    /// Text at (left, baseline), with a line from its point to `end`.
    Leader {
        left: f64,
        baseline: f64,
        end: (f64, f64),
    },
    /// No room: the point carries `number` (1-based) at (left, baseline),
    /// the label is listed.
    Numbered {
        number: usize,
        left: f64,
        baseline: f64,
        /// Where a line from the point meets the number, when it is not beside it.
        leader: Option<(f64, f64)>,
    },
    /// An empty label: nothing to place.
    None,
}

fn overlaps(a: Rect, b: Rect) -> bool {
    !(a.2 <= b.0 || b.2 <= a.0 || a.3 <= b.1 || b.3 <= a.1)
}

/// Whether the segment from `a` to `b` passes through `rect` (Liang–Barsky).
fn segment_hits(a: (f64, f64), b: (f64, f64), rect: Rect) -> bool {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - rect.0),
        (dx, rect.2 - a.0),
        (-dy, a.1 - rect.1),
        (dy, rect.3 - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return false;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
            if t0 > t1 {
                return false;
            }
        }
    }
    true
}

fn text_box(left: f64, baseline: f64, text: &str) -> Rect {
    (
        left,
        baseline - LINE_PX + 2.0,
        left + text.chars().count() as f64 * CHAR_PX,
        baseline + 2.0,
    )
}

/// Places `labels[i]` for the point at `points[i]` within `area`, avoiding
/// every point, `obstacles` (legends, lines' ends) and the labels placed
/// before it (in order).
pub fn place(
    points: &[(f64, f64)],
    labels: &[String],
    obstacles: &[Rect],
    area: Rect,
) -> Vec<Placement> {
    let mut occupied: Vec<Rect> = points
        .iter()
        .map(|&(x, y)| (x - POINT_PX, y - POINT_PX, x + POINT_PX, y + POINT_PX))
        .chain(obstacles.iter().copied())
        .collect();
    let mut numbered = 0;
    // Leader lines drawn so far: no later label may sit on one.
    let mut leaders: Vec<Segment> = Vec::new();
    points
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(index, (&(x, y), label))| {
            if label.is_empty() {
                return Placement::None;
            }
            let width = label.chars().count() as f64 * CHAR_PX;
            let free = |left: f64, baseline: f64, occupied: &[Rect], leaders: &[Segment]| {
                let rect = text_box(left, baseline, label);
                rect.0 >= area.0
                    && rect.2 <= area.2
                    && rect.1 >= area.1
                    && rect.3 <= area.3
                    && occupied.iter().all(|&o| !overlaps(rect, o))
                    && leaders.iter().all(|&(a, b)| !segment_hits(a, b, rect))
            };
            // A leader from the point to the label's nearer side, crossing
            // no label and no other point.
            let leader_end = |left: f64, baseline: f64| {
                let rect = text_box(left, baseline, label);
                let end_x = if left > x { rect.0 - 1.0 } else { rect.2 + 1.0 };
                (end_x, (rect.1 + rect.3) / 2.0)
            };
            let leader_clear = |end: (f64, f64), occupied: &[Rect]| {
                occupied
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != index)
                    .all(|(_, &o)| !segment_hits((x, y), end, o))
            };
            // Step s: s half-lines up or down (alternating), right then left;
            // beyond NEAR_STEPS also further out sideways.
            let candidates = (0..FAR_STEPS).flat_map(|step| {
                let lines = step.div_ceil(2) as f64;
                let dy = if step % 2 == 1 { -lines } else { lines } * LINE_PX;
                let dx = if step < NEAR_STEPS {
                    7.0
                } else {
                    7.0 + 4.0 * step as f64
                };
                [
                    (step, x + dx, y + 4.0 + dy),
                    (step, x - dx - width, y + 4.0 + dy),
                ]
            });
            let found = candidates.clone().find(|&(step, left, baseline)| {
                free(left, baseline, &occupied, &leaders)
                    && (step < NEAR_STEPS || leader_clear(leader_end(left, baseline), &occupied))
            });
            match found {
                Some((step, left, baseline)) => {
                    occupied.push(text_box(left, baseline, label));
                    if step < NEAR_STEPS {
                        Placement::Beside { left, baseline }
                    } else {
                        let end = leader_end(left, baseline);
                        leaders.push(((x, y), end));
                        Placement::Leader {
                            left,
                            baseline,
                            end,
                        }
                    }
                }
                None => {
                    numbered += 1;
                    // The number itself beside the point, where it fits.
                    let number = numbered.to_string();
                    let width = number.len() as f64 * CHAR_PX;
                    let spot = (0..FAR_STEPS)
                        .flat_map(|step| {
                            let lines = step.div_ceil(2) as f64;
                            let dy = if step % 2 == 1 { -lines } else { lines } * LINE_PX;
                            [
                                (step, x + 6.0, y + 4.0 + dy),
                                (step, x - 6.0 - width, y + 4.0 + dy),
                            ]
                        })
                        .find(|&(_, left, baseline)| {
                            let rect = text_box(left, baseline, &number);
                            occupied.iter().all(|&o| !overlaps(rect, o))
                                && leaders.iter().all(|&(a, b)| !segment_hits(a, b, rect))
                        })
                        .unwrap_or((0, x + 6.0, y - 6.0));
                    let rect = text_box(spot.1, spot.2, &number);
                    occupied.push(rect);
                    let leader = (spot.0 >= NEAR_STEPS).then(|| {
                        let end = (
                            if spot.1 > x {
                                rect.0 - 1.0
                            } else {
                                rect.2 + 1.0
                            },
                            (rect.1 + rect.3) / 2.0,
                        );
                        leaders.push(((x, y), end));
                        end
                    });
                    Placement::Numbered {
                        number: numbered,
                        left: spot.1,
                        baseline: spot.2,
                        leader,
                    }
                }
            }
        })
        .collect()
}

/// The SVG of `placements` (for points at `points`, labels `labels`): text,
/// leader lines, the numbers on crowded points, and the list of numbered
/// labels at `list_at` (left, first baseline). `colors[i]` colours label i
/// (black where `colors` is shorter); `escape` makes text XML-safe.
pub fn render(
    points: &[(f64, f64)],
    labels: &[String],
    placements: &[Placement],
    colors: &[&str],
    list_at: (f64, f64),
    escape: fn(&str) -> String,
) -> Vec<String> {
    let mut svg = Vec::new();
    let mut listed = Vec::new();
    for (index, ((&(x, y), label), placement)) in
        points.iter().zip(labels).zip(placements).enumerate()
    {
        let fill = colors.get(index).copied().unwrap_or("black");
        match *placement {
            Placement::Beside { left, baseline } => svg.push(format!(
                r#"<text x="{left:.1}" y="{baseline:.1}" font-size="{LINE_PX}" fill="{fill}">{}</text>"#,
                escape(label)
            )),
            Placement::Leader {
                left,
                baseline,
                end,
            } => {
                svg.push(format!(
                    r##"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{:.1}" stroke="#888" stroke-width="0.8"/>"##,
                    end.0, end.1
                ));
                svg.push(format!(
                    r#"<text x="{left:.1}" y="{baseline:.1}" font-size="{LINE_PX}" fill="{fill}">{}</text>"#,
                    escape(label)
                ));
            }
            Placement::Numbered {
                number,
                left,
                baseline,
                leader,
            } => {
                if let Some(end) = leader {
                    svg.push(format!(
                        r##"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{:.1}" stroke="#888" stroke-width="0.8"/>"##,
                        end.0, end.1
                    ));
                }
                svg.push(format!(
                    r#"<text x="{left:.1}" y="{baseline:.1}" font-size="{LINE_PX}" font-weight="bold">{number}</text>"#
                ));
                listed.push(format!("{number}  {label}"));
            }
            Placement::None => {}
        }
    }
    for (i, line) in listed.iter().enumerate() {
        svg.push(format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="{LINE_PX}">{}</text>"#,
            list_at.0,
            list_at.1 + i as f64 * (LINE_PX + 3.0),
            escape(line)
        ));
    }
    svg
}

/// Width the list of numbered labels needs (0 when nothing is numbered).
pub fn list_width(labels: &[String], placements: &[Placement]) -> f64 {
    labels
        .iter()
        .zip(placements)
        .filter(|(_, p)| matches!(p, Placement::Numbered { .. }))
        .map(|(label, _)| (label.chars().count() + 4) as f64 * CHAR_PX + 20.0)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AREA: Rect = (0.0, 0.0, 400.0, 300.0);

    #[test]
    fn a_lone_label_sits_right_of_its_point() {
        let placed = place(&[(100.0, 100.0)], &["int8".into()], &[], AREA);
        assert_eq!(
            placed,
            [Placement::Beside {
                left: 107.0,
                baseline: 104.0
            }]
        );
    }

    #[test]
    fn a_label_with_no_room_beside_its_point_gets_a_leader_that_crosses_nothing() {
        // Boxes right and left of the point block the three near lines on
        // both sides; two lines up on the right is free, and so is the line there.
        let obstacles = [(215.0, 135.0, 260.0, 175.0), (140.0, 135.0, 185.0, 175.0)];
        let placed = place(&[(200.0, 150.0)], &["method".into()], &obstacles, AREA);
        assert_eq!(
            placed,
            [Placement::Leader {
                left: 219.0,
                baseline: 132.0,
                end: (218.0, 128.5)
            }]
        );
        for obstacle in obstacles {
            assert!(!segment_hits((200.0, 150.0), (218.0, 128.5), obstacle));
        }
        assert!(segment_hits((0.0, 0.0), (10.0, 10.0), (4.0, 4.0, 6.0, 6.0)));
    }

    #[test]
    fn crowded_labels_get_leaders_then_numbers_and_never_overlap() {
        // 40 points in two tight rows: a few beside, the rest numbered.
        let points: Vec<(f64, f64)> = (0..40)
            .map(|i| (150.0 + 6.0 * (i / 2) as f64, 150.0 + 9.0 * (i % 2) as f64))
            .collect();
        let labels: Vec<String> = (0..40).map(|i| format!("method-{i:02}")).collect();
        let placed = place(&points, &labels, &[], AREA);
        let kinds = |f: fn(&Placement) -> bool| placed.iter().filter(|p| f(p)).count();
        assert!(kinds(|p| matches!(p, Placement::Beside { .. })) >= 2);
        assert!(kinds(|p| matches!(p, Placement::Numbered { .. })) >= 20);
        let numbered: Vec<usize> = placed
            .iter()
            .filter_map(|p| match p {
                Placement::Numbered { number, .. } => Some(*number),
                _ => None,
            })
            .collect();
        assert_eq!(numbered, (1..=numbered.len()).collect::<Vec<_>>());
        let boxes: Vec<Rect> = placed
            .iter()
            .zip(&labels)
            .filter_map(|(p, label)| match *p {
                Placement::Beside { left, baseline } | Placement::Leader { left, baseline, .. } => {
                    Some(text_box(left, baseline, label))
                }
                _ => None,
            })
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            assert!(a.0 >= 0.0 && a.2 <= 400.0 && a.1 >= 0.0 && a.3 <= 300.0);
            for b in &boxes[i + 1..] {
                assert!(!overlaps(*a, *b), "{a:?} overlaps {b:?}");
            }
        }
        let svg = render(&points, &labels, &placed, &[], (410.0, 20.0), |s| {
            s.to_string()
        })
        .join("\n");
        if let Some(first) = numbered.first() {
            assert!(
                svg.contains(&format!(">{first}  method-")),
                "the list names it"
            );
        }
    }
}
