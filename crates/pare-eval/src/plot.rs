//! Line charts drawn with `plotters`: panels side by side with one shared legend, as SVG (any
//! browser opens it) or PNG (for places that show images only), chosen by the file's extension.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

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

/// The image formats a plot is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

impl Format {
    /// The format `path`'s extension names (either case): checked before the work that makes the
    /// plot, so that a wrong name fails at once.
    pub fn from_path(path: &Path) -> Result<Format, PlotError> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(PlotError::Format(path.display().to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{0}: not a plot format (the name must end in .svg or .png)")]
    Format(String),
    #[error("cannot draw the plot: {0}")]
    Draw(String),
    /// Writing the file failed; the caller names the file (it writes to a staging name).
    #[error(transparent)]
    Write(#[from] std::io::Error),
}

/// One panel's size in pixels; panels stand in a row above the legend.
pub const PANEL_SIZE: (u32, u32) = (480, 360);
const LEGEND_ENTRY_W: u32 = 220;
const LEGEND_ROW_H: u32 = 22;
/// Labelled ticks per axis at most; plotters picks 1, 2 or 5 times a power of ten between them.
const TICKS: usize = 6;
const FONT: &str = "sans-serif";
// Matplotlib's default cycle (tab10): readers know it, and neighbours stay distinguishable.
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// The image's size in pixels: a panel's width per panel, its height plus the legend's.
pub fn size(panels: &[Panel]) -> (u32, u32) {
    let width = PANEL_SIZE.0 * panels.len().max(1) as u32;
    let rows = series_names(panels).len().div_ceil(legend_columns(width)) as u32;
    (width, PANEL_SIZE.1 + rows * LEGEND_ROW_H + 10)
}

/// Draw `panels` to `path` in `format` (the caller picks the format from the final name, since
/// it writes to a staging file that is renamed into place once the command has succeeded).
pub fn write(panels: &[Panel], format: Format, path: &Path) -> Result<(), PlotError> {
    register_font()?;
    let (width, height) = size(panels);
    match format {
        Format::Svg => {
            let mut svg = String::new();
            draw(SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area(), panels)?;
            Ok(std::fs::write(path, svg)?)
        }
        Format::Png => {
            let mut rgb = vec![0u8; width as usize * height as usize * 3];
            draw(BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area(), panels)?;
            // Encoded with `png` (already a dependency through `image`) rather than plotters'
            // encoder, which would bring a second, older `image`.
            let file = std::fs::File::create(path)?;
            let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let png_err = |e: png::EncodingError| match e {
                png::EncodingError::IoError(e) => PlotError::Write(e),
                e => PlotError::Draw(e.to_string()),
            };
            let mut writer = encoder.write_header().map_err(png_err)?;
            writer.write_image_data(&rgb).map_err(png_err)?;
            writer.finish().map_err(png_err)
        }
    }
}

/// PNG text is rasterized from a font, not left to a viewer: DejaVu Sans, embedded, so that a
/// plot looks the same on every machine and needs no installed fonts.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw("the embedded font cannot be read".into()))
    }
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, panels: &[Panel]) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let names = series_names(panels);
    let (charts, legend) = root.split_vertically(PANEL_SIZE.1);
    for (panel, area) in panels.iter().zip(charts.split_evenly((1, panels.len().max(1)))) {
        draw_panel(&area, panel, &names)?;
    }
    let columns = legend_columns(root.dim_in_pixel().0);
    for (i, name) in names.iter().enumerate() {
        let x = 60 + (i % columns) as i32 * LEGEND_ENTRY_W as i32;
        let y = 14 + (i / columns) as i32 * LEGEND_ROW_H as i32;
        // A filled swatch, not a line: each series is then the only path of its colour.
        legend.draw(&Rectangle::new([(x, y - 2), (x + 24, y + 2)], color(i).filled())).map_err(draw_err)?;
        legend.draw(&Text::new(name.to_string(), (x + 30, y - 8), (FONT, 15))).map_err(draw_err)?;
    }
    root.present().map_err(draw_err)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    names: &[&str],
) -> Result<(), PlotError> {
    let (x, y) = ranges(panel);
    let (x_decimals, y_decimals) = (decimals(&x), decimals(&y));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_labels(TICKS)
        .y_labels(TICKS)
        .x_label_formatter(&|v| format!("{v:.x_decimals$}"))
        .y_label_formatter(&|v| format!("{v:.y_decimals$}"))
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .label_style((FONT, 14))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
        .draw()
        .map_err(draw_err)?;
    for s in &panel.series {
        let color = color(names.iter().position(|n| *n == s.name).unwrap_or(0));
        let points = finite_sorted(&s.points);
        chart.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2))).map_err(draw_err)?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(draw_err)?;
    }
    Ok(())
}

/// Series names in first-seen order: a name keeps its colour in every panel.
fn series_names(panels: &[Panel]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for s in panels.iter().flat_map(|p| &p.series) {
        if !names.contains(&s.name.as_str()) {
            names.push(&s.name);
        }
    }
    names
}

fn legend_columns(width: u32) -> usize {
    ((width.saturating_sub(60) / LEGEND_ENTRY_W) as usize).max(1)
}

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn finite_sorted(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p
}

/// The axes' ranges: the data's, padded (x by 3%, y by 5%) so that no point sits on the frame;
/// a flat or empty range is widened, since plotters cannot place ticks on a zero-width axis.
fn ranges(panel: &Panel) -> (Range<f64>, Range<f64>) {
    let points: Vec<(f64, f64)> = panel.series.iter().flat_map(|s| finite_sorted(&s.points)).collect();
    if points.is_empty() {
        return (0.0..1.0, 0.0..1.0);
    }
    let span = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        if hi - lo < 1e-12 {
            let half = (lo.abs() * 0.05).max(0.5);
            (lo - half, hi + half)
        } else {
            (lo, hi)
        }
    };
    let (x0, x1) = span(&mut points.iter().map(|p| p.0));
    let (y0, y1) = span(&mut points.iter().map(|p| p.1));
    let (x_pad, y_pad) = ((x1 - x0) * 0.03, (y1 - y0) * 0.05);
    (x0 - x_pad..x1 + x_pad, y0 - y_pad..y1 + y_pad)
}

/// Decimals that show every tick plotters puts on `range` exactly (its ticks are 1, 2 or 5
/// times a power of ten apart): 0.2 → 1, 0.05 → 2, 20 → 0.
fn decimals(range: &Range<f64>) -> usize {
    let ticks = RangedCoordf64::from(range.clone()).key_points(TICKS);
    let step = ticks.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
    if !step.is_finite() || step <= 0.0 {
        return 0;
    }
    (0..12)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled
        })
        .unwrap_or(12)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panels() -> Vec<Panel> {
        let panel = |title: &str| Panel {
            title: title.into(),
            x_label: "ratio".into(),
            y_label: "ppl".into(),
            series: vec![
                Series { name: "knorm".into(), points: vec![(0.0, 10.0), (0.25, 10.7), (0.5, 12.0)] },
                Series { name: "snap<kv>".into(), points: vec![(0.0, 10.0), (0.5, 11.0), (0.25, 10.3)] },
            ],
        };
        vec![panel("first panel"), panel("second panel")]
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("pare-plot-{}-{name}", std::process::id()))
    }

    /// The text of every `<text ...>LABEL</text>` element.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once("</text>").map(|(s, _)| s.trim()))
            .collect()
    }

    /// 1, 2 or 5 times a power of ten.
    fn nice(step: f64) -> bool {
        let mantissa = step / 10f64.powf(step.log10().floor());
        [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6)
    }

    #[test]
    fn svg_has_one_line_per_series_a_legend_and_nice_ticks() {
        let path = scratch("plot.svg");
        write(&panels(), Format::from_path(&path).unwrap(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        let (w, h) = size(&panels());
        assert!(svg.contains(&format!(r#"width="{w}" height="{h}""#)), "{svg}");
        // Two panels of two series: one polyline each, in the series' colours (the axes' ticks
        // are black polylines too).
        assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 4, "{svg}");
        for colour in ["#1F77B4", "#FF7F0E"] {
            assert_eq!(svg.matches(&format!(r#"<polyline fill="none" opacity="1" stroke="{colour}""#)).count(), 2);
        }
        let texts = texts(&svg);
        for want in ["knorm", "snap&lt;kv&gt;", "first panel", "second panel", "ratio", "ppl"] {
            assert!(texts.contains(&want), "{want} not among {texts:?}");
        }
        // Each name once in the shared legend, whatever the number of panels.
        assert_eq!(texts.iter().filter(|t| **t == "knorm").count(), 1);
        // Tick labels: x over 0..0.5, y over 10..12 (padded); each axis evenly spaced by a nice step.
        let numbers: Vec<f64> = texts.iter().filter_map(|t| t.parse().ok()).collect();
        let axis = |lo: f64, hi: f64| -> Vec<f64> {
            let mut v: Vec<f64> = numbers.iter().copied().filter(|n| (lo..=hi).contains(n)).collect();
            v.sort_by(f64::total_cmp);
            v.dedup();
            v
        };
        for ticks in [axis(0.0, 0.5), axis(9.0, 13.0)] {
            assert!(ticks.len() >= 3, "{ticks:?} from {texts:?}");
            let step = ticks[1] - ticks[0];
            assert!(nice(step), "step {step} of {ticks:?}");
            for pair in ticks.windows(2) {
                assert!((pair[1] - pair[0] - step).abs() < 1e-9, "{ticks:?}");
            }
        }
        // Labels are printed to the step's precision: no "0.30000000000000004", no "10.0" for 10.
        for t in texts.iter().filter(|t| t.parse::<f64>().is_ok()) {
            assert!(t.len() <= 4, "tick label {t}");
        }
    }

    #[test]
    fn png_has_the_signature_and_the_size() {
        let path = scratch("plot.PNG");
        write(&panels(), Format::from_path(&path).unwrap(), &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR, the first chunk: width and height, big-endian.
        assert_eq!(&png[12..16], b"IHDR");
        let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((be(16), be(20)), size(&panels()));
        assert_eq!(size(&panels()), (2 * PANEL_SIZE.0, PANEL_SIZE.1 + LEGEND_ROW_H + 10));
    }

    #[test]
    fn other_extensions_are_refused_in_one_line() {
        for name in ["plot.jpg", "plot", "plot.svg.bak"] {
            let err = Format::from_path(Path::new(name)).unwrap_err().to_string();
            assert_eq!(err, format!("{name}: not a plot format (the name must end in .svg or .png)"));
        }
    }

    #[test]
    fn empty_and_flat_panels_still_draw() {
        let path = scratch("flat.svg");
        let flat = Panel {
            title: "flat".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                Series { name: "one point".into(), points: vec![(3.0, 1.0), (f64::NAN, 2.0)] },
                Series { name: "none".into(), points: vec![] },
            ],
        };
        write(&[flat], Format::Svg, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(texts(&svg).contains(&"one point"));
    }

    #[test]
    fn tick_decimals_follow_the_step() {
        assert_eq!(decimals(&(0.0..1.0)), 1);
        assert_eq!(decimals(&(0.0..0.1)), 2);
        assert_eq!(decimals(&(0.0..4096.0)), 0);
        assert_eq!(decimals(&(10.0..10.0)), 0);
    }
}
