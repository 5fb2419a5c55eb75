//! Line charts as standalone SVG: quality-vs-compression plots any browser opens.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 340.0;
const MARGIN: (f64, f64, f64, f64) = (60.0, 20.0, 40.0, 50.0); // left, right, top, bottom
const COLORS: &[&str] =
    &["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Panels side by side, sharing one legend (series are matched by name and colour).
pub fn svg(panels: &[Panel]) -> String {
    let names: Vec<&str> = {
        let mut n: Vec<&str> = Vec::new();
        for s in panels.iter().flat_map(|p| &p.series) {
            if !n.contains(&s.name.as_str()) {
                n.push(&s.name);
            }
        }
        n
    };
    let legend_h = 22.0 * names.len().div_ceil(4) as f64 + 10.0;
    let width = PANEL_W * panels.len().max(1) as f64;
    let height = PANEL_H + legend_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut out, panel, i as f64 * PANEL_W, &names);
    }
    for (i, name) in names.iter().enumerate() {
        let (x, y) = (MARGIN.0 + (i % 4) as f64 * 200.0, PANEL_H + 16.0 + (i / 4) as f64 * 22.0);
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2.5"/><text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            COLORS[i % COLORS.len()],
            x + 30.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn draw_panel(out: &mut String, panel: &Panel, x0: f64, names: &[&str]) {
    let points: Vec<(f64, f64)> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut xmin, mut xmax) =
        points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut ymin, mut ymax) =
        points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if points.is_empty() {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if xmax - xmin < 1e-12 {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-12 {
        ymax = ymin + 1.0;
    }
    let pad = (ymax - ymin) * 0.05;
    (ymin, ymax) = (ymin - pad, ymax + pad);
    let (left, right, top, bottom) = (x0 + MARGIN.0, x0 + PANEL_W - MARGIN.1, MARGIN.2, PANEL_H - MARGIN.3);
    let sx = |x: f64| left + (x - xmin) / (xmax - xmin) * (right - left);
    let sy = |y: f64| bottom - (y - ymin) / (ymax - ymin) * (bottom - top);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        (left + right) / 2.0,
        escape(&panel.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        right - left,
        bottom - top
    );
    for t in 0..=4 {
        let f = t as f64 / 4.0;
        let (xv, yv) = (xmin + f * (xmax - xmin), ymin + f * (ymax - ymin));
        let _ = writeln!(
            out,
            r##"<line x1="{0}" y1="{top}" x2="{0}" y2="{bottom}" stroke="#eee"/><text x="{0}" y="{1}" text-anchor="middle">{2}</text><line x1="{left}" y1="{3}" x2="{right}" y2="{3}" stroke="#eee"/><text x="{4}" y="{5}" text-anchor="end">{6}</text>"##,
            sx(xv),
            bottom + 16.0,
            tick(xv),
            sy(yv),
            left - 4.0,
            sy(yv) + 4.0,
            tick(yv)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        PANEL_H - 14.0,
        escape(&panel.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="{0}" y="{1}" text-anchor="middle" transform="rotate(-90 {0} {1})">{2}</text>"#,
        x0 + 16.0,
        (top + bottom) / 2.0,
        escape(&panel.y_label)
    );
    for s in &panel.series {
        let color = COLORS[names.iter().position(|n| *n == s.name).unwrap_or(0) % COLORS.len()];
        let mut pts: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ =
            writeln!(out, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for &(x, y) in &pts {
            let _ = writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, sx(x), sy(y));
        }
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_polyline_per_series_and_a_legend() {
        let panel = |title: &str| Panel {
            title: title.into(),
            x_label: "ratio".into(),
            y_label: "ppl".into(),
            series: vec![
                Series { name: "knorm".into(), points: vec![(0.0, 10.0), (0.5, 12.0)] },
                Series { name: "snap<kv>".into(), points: vec![(0.0, 10.0), (0.5, 11.0)] },
            ],
        };
        let s = svg(&[panel("a"), panel("b")]);
        assert_eq!(s.matches("<polyline").count(), 4);
        assert!(s.contains("snap&lt;kv&gt;"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
