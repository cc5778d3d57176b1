//! PNG charts (loss curves, method comparisons with their intervals, heatmaps) drawn with
//! plotters into an RGB buffer, text in DejaVu Sans (embedded, `assets/fonts`), encoded
//! with `image` and written atomically.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use plotters::element::ErrorBar;
use plotters::prelude::*;

/// One series of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// draw markers instead of a line
    pub scatter: bool,
    /// a (low, high) interval per point, drawn as an error bar (empty: none)
    pub intervals: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// logarithmic x axis (for parameter counts)
    pub log_x: bool,
    /// names for the integer x positions (a categorical axis: methods, say)
    pub x_names: Vec<String>,
}

const W: usize = 900;
const H: usize = 560;
/// a heatmap's canvas: square cells beside a color bar
const HEATMAP_W: usize = 700;
const HEATMAP_CELLS_W: u32 = 545;
const FONT: &str = "sans-serif";
const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Registers DejaVu Sans as plotters' sans-serif font (once per process).
fn font() -> Result<()> {
    static DEJAVU: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    static READY: OnceLock<bool> = OnceLock::new();
    let ok = *READY
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU).is_ok());
    if !ok {
        bail!("the embedded DejaVu Sans font cannot be read");
    }
    Ok(())
}

fn drawing_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

fn color(i: usize) -> RGBColor {
    let [r, g, b] = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// The range of `v` padded by 5% on both sides, so that no mark sits on an axis.
fn padded(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// A tick label with as many decimals as the spacing between ticks needs; scientific
/// notation for axes whose values are all far below 1 (gradient variances, say).
fn fmt_tick(v: f64, step: f64) -> String {
    let a = v.abs();
    let step = step.abs().max(f64::MIN_POSITIVE);
    if v == 0.0 || a < step * 1e-6 {
        return "0".into();
    }
    if a >= 1e6 {
        return format!("{:.1}M", v / 1e6);
    }
    if a >= 1e3 {
        let d = (-(step / 1e3).log10().floor()).clamp(0.0, 2.0) as usize;
        return format!("{:.*}K", d, v / 1e3);
    }
    if a.max(step) < 1e-2 {
        return format!("{v:.1e}");
    }
    // one decimal more than the tick spacing's leading digit
    let d = (1.0 - step.log10().floor()).clamp(0.0, 4.0) as usize;
    format!("{v:.d$}")
}

/// Each point's y replaced by the mean of the last `window` points' y (fewer at the start).
pub fn trailing_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let from = (i + 1).saturating_sub(w);
            let ys = &points[from..=i];
            (x, ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64)
        })
        .collect()
}

impl Chart {
    /// Draws the chart and writes it as PNG (temporary file, then rename).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        font()?;
        // a log axis is drawn as log10 of x, labelled with x
        let tx = |x: f64| if self.log_x { x.log10() } else { x };
        let series: Vec<Vec<(f64, f64)>> = self
            .series
            .iter()
            .map(|s| {
                s.points
                    .iter()
                    .map(|&(x, y)| (tx(x), y))
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect()
            })
            .collect();
        let (x0, x1) = if self.x_names.is_empty() {
            padded(series.iter().flatten().map(|p| p.0))
        } else {
            (-0.5, self.x_names.len() as f64 - 0.5)
        };
        let ys = series.iter().flatten().map(|p| p.1);
        let bars = self
            .series
            .iter()
            .flat_map(|s| s.intervals.iter().flat_map(|&(a, b)| [a, b]));
        let (y0, mut y1) = padded(ys.chain(bars));
        // room above the data for the legend box
        y1 += 0.12 * (y1 - y0);
        let mut buf = vec![255u8; W * H * 3];
        {
            let root =
                BitMapBackend::with_buffer(&mut buf, (W as u32, H as u32)).into_drawing_area();
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, (FONT, 22))
                .margin(14)
                .x_label_area_size(48)
                .y_label_area_size(76)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(drawing_error)?;
            let (xs, ys) = ((x1 - x0) / 8.0, (y1 - y0) / 8.0);
            let x_fmt = |v: &f64| {
                if !self.x_names.is_empty() {
                    let i = v.round();
                    if (v - i).abs() < 1e-6 && i >= 0.0 {
                        return self.x_names.get(i as usize).cloned().unwrap_or_default();
                    }
                    return String::new();
                }
                if self.log_x {
                    fmt_tick(10f64.powf(*v), 10f64.powf(*v) / 2.0)
                } else {
                    fmt_tick(*v, xs)
                }
            };
            let y_fmt = |v: &f64| fmt_tick(*v, ys);
            let mut mesh = chart.configure_mesh();
            mesh.x_desc(self.x_label.as_str())
                .y_desc(self.y_label.as_str())
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .light_line_style(RGBColor(238, 238, 238))
                .bold_line_style(RGBColor(215, 215, 215));
            if !self.x_names.is_empty() {
                mesh.x_labels(self.x_names.len());
            }
            mesh.draw().map_err(drawing_error)?;
            for (i, (s, pts)) in self.series.iter().zip(&series).enumerate() {
                let c = color(i);
                for (&(x, y), &(lo, hi)) in s.points.iter().zip(&s.intervals) {
                    let x = tx(x);
                    if x.is_finite() && lo.is_finite() && hi.is_finite() {
                        chart
                            .draw_series([ErrorBar::new_vertical(
                                x,
                                lo,
                                y,
                                hi,
                                c.stroke_width(2),
                                10,
                            )])
                            .map_err(drawing_error)?;
                    }
                }
                if s.scatter {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))
                        .map_err(drawing_error)?
                        .label(s.label.as_str())
                        .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
                } else {
                    chart
                        .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                        .map_err(drawing_error)?
                        .label(s.label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                        });
                }
            }
            if self.series.iter().any(|s| !s.label.is_empty()) {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font((FONT, 14))
                    .draw()
                    .map_err(drawing_error)?;
            }
            root.present().map_err(drawing_error)?;
        }
        write_png(&buf, W, path)
    }
}

/// A matrix drawn as colored cells (white at `lo` to dark blue at `hi`), with row/column
/// indices and a color bar.
pub struct Heatmap {
    pub title: String,
    /// what rows and columns index (e.g. "layer")
    pub axis_label: String,
    pub values: Vec<Vec<f64>>,
    pub lo: f64,
    pub hi: f64,
}

fn ramp(t: f64) -> [u8; 3] {
    // white -> steel blue -> navy
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (a, b, u) = if t < 0.5 {
        ([255.0, 255.0, 255.0], [70.0, 130.0, 190.0], t * 2.0)
    } else {
        ([70.0, 130.0, 190.0], [10.0, 20.0, 80.0], t * 2.0 - 1.0)
    };
    [0, 1, 2].map(|k| (a[k] + (b[k] - a[k]) * u).round() as u8)
}

impl Heatmap {
    pub fn save_png(&self, path: &Path) -> Result<()> {
        font()?;
        let n = self.values.len().max(1) as f64;
        let span = (self.hi - self.lo).max(1e-12);
        let mut buf = vec![255u8; HEATMAP_W * H * 3];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (HEATMAP_W as u32, H as u32))
                .into_drawing_area();
            let root = root
                .titled(&self.title, (FONT, 22))
                .map_err(drawing_error)?;
            let (cells, bar) = root.split_horizontally(HEATMAP_CELLS_W);
            let mut chart = ChartBuilder::on(&cells)
                .margin(14)
                .x_label_area_size(48)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5..n - 0.5, n - 0.5..-0.5)
                .map_err(drawing_error)?;
            let idx = |v: &f64| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && i < n {
                    format!("{i:.0}")
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(self.axis_label.as_str())
                .y_desc(self.axis_label.as_str())
                .x_label_formatter(&idx)
                .y_label_formatter(&idx)
                .x_labels(self.values.len().clamp(2, 13))
                .y_labels(self.values.len().clamp(2, 13))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(drawing_error)?;
            for (i, row) in self.values.iter().enumerate() {
                chart
                    .draw_series(row.iter().enumerate().map(|(j, &v)| {
                        let [r, g, b] = ramp((v - self.lo) / span);
                        let (x, y) = (j as f64, i as f64);
                        Rectangle::new(
                            [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                            RGBColor(r, g, b).filled(),
                        )
                    }))
                    .map_err(drawing_error)?;
            }
            // the color bar, labelled with the values it maps
            let mut key = ChartBuilder::on(&bar)
                .margin(14)
                .margin_left(10)
                .x_label_area_size(48)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..1.0, self.lo..self.hi.max(self.lo + 1e-12))
                .map_err(drawing_error)?;
            let step = span / 6.0;
            let fmt = |v: &f64| fmt_tick(*v, step);
            key.configure_mesh()
                .disable_mesh()
                .disable_x_axis()
                .y_label_formatter(&fmt)
                .label_style((FONT, 14))
                .draw()
                .map_err(drawing_error)?;
            let k = 100;
            key.draw_series((0..k).map(|i| {
                let (a, b) = (i as f64 / k as f64, (i + 1) as f64 / k as f64);
                let [r, g, bl] = ramp(a);
                Rectangle::new(
                    [(0.0, self.lo + a * span), (1.0, self.lo + b * span)],
                    RGBColor(r, g, bl).filled(),
                )
            }))
            .map_err(drawing_error)?;
            root.present().map_err(drawing_error)?;
        }
        write_png(&buf, HEATMAP_W, path)
    }
}

fn write_png(px: &[u8], width: usize, path: &Path) -> Result<()> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(px, width as u32, H as u32, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("{}: cannot encode PNG", path.display()))?;
    super::files::write_atomically(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_resolve_their_spacing() {
        // gradient variances: all ticks distinct and non-zero, in scientific notation
        let ticks: Vec<String> = (0..=5)
            .map(|i| fmt_tick(2e-6 + 2e-6 * i as f64, 2e-6))
            .collect();
        assert_eq!(ticks[0], "2.0e-6");
        assert!(ticks.windows(2).all(|w| w[0] != w[1]), "{ticks:?}");
        // a score axis spanning a few points keeps one or two decimals
        assert_eq!(fmt_tick(39.75, 0.94), "39.75");
        assert_eq!(fmt_tick(2.3, 1.15), "2.3");
        assert_eq!(fmt_tick(17.0, 16.0), "17");
        assert_eq!(fmt_tick(1500.0, 400.0), "1.5K");
        assert_eq!(fmt_tick(0.0, 1e-6), "0");
    }

    #[test]
    fn trailing_mean_averages_the_last_points() {
        let p = [(1.0, 4.0), (2.0, 2.0), (3.0, 6.0), (4.0, 0.0)];
        assert_eq!(
            trailing_mean(&p, 2),
            vec![(1.0, 4.0), (2.0, 3.0), (3.0, 4.0), (4.0, 3.0)]
        );
        assert_eq!(trailing_mean(&p, 1), p.to_vec());
    }

    #[test]
    fn writes_a_decodable_png() {
        let dir = std::env::temp_dir().join(format!("lntune-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let chart = Chart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![Series {
                label: "ln".into(),
                points: (0..50)
                    .map(|i| (i as f64, 5.0 / (1.0 + i as f64)))
                    .collect(),
                scatter: false,
                intervals: vec![],
            }],
            log_x: false,
            x_names: vec![],
        };
        chart.save_png(&path).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (W as u32, H as u32));
        // the series color appears somewhere
        let rgb = img.to_rgb8();
        assert!(rgb.pixels().any(|p| p.0 == PALETTE[0]));
        // a heatmap: its extreme colors appear
        let hm = Heatmap {
            title: "similarity".into(),
            axis_label: "layer".into(),
            values: (0..6)
                .map(|i| (0..6).map(|j| if i == j { 1.0 } else { 0.2 }).collect())
                .collect(),
            lo: 0.0,
            hi: 1.0,
        };
        let p2 = dir.join("hm.png");
        hm.save_png(&p2).unwrap();
        let rgb = image::open(&p2).unwrap().to_rgb8();
        assert!(rgb.pixels().any(|p| p.0 == ramp(1.0)) && rgb.pixels().any(|p| p.0 == ramp(0.2)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
