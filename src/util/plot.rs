//! Small PNG charts (loss curves, method comparisons) without a plotting dependency: lines
//! or points on axes with numeric ticks, a title and a legend, text in a built-in 3×5 font.

use std::path::Path;

use anyhow::{Context, Result};

/// One series of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// draw markers instead of a line
    pub scatter: bool,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// logarithmic x axis (for parameter counts)
    pub log_x: bool,
}

const W: usize = 800;
const H: usize = 500;
const LEFT: usize = 80;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 60;
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

/// 3×5 glyphs, rows top to bottom, 3 bits each (MSB = left column).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        ':' => [0, 2, 0, 2, 0],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        '=' => [0, 7, 0, 7, 0],
        '[' => [3, 2, 2, 2, 3],
        ']' => [6, 2, 2, 2, 6],
        '<' => [1, 2, 4, 2, 1],
        '>' => [4, 2, 1, 2, 4],
        '*' => [0, 5, 2, 5, 0],
        _ => [0, 0, 0, 0, 0],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x as i64 + dx, y as i64 + dy, c);
                }
            }
        }
    }

    /// Text at (x, y) top-left, `scale` pixels per font dot.
    /// The chart's title, large and centered at the top.
    fn title(&mut self, s: &str) {
        self.text(W.saturating_sub(text_width(s, 3)) / 2, 8, s, 3, [0, 0, 0]);
    }

    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dx in 0..scale {
                            for dy in 0..scale {
                                self.set(
                                    (x + i * 4 * scale + col * scale + dx) as i64,
                                    (y + row * scale + dy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, scale: usize) -> usize {
    s.chars().count() * 4 * scale
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
        let mut cv = Canvas {
            px: vec![255; W * H * 3],
        };
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
            .collect();
        let tx = |x: f64| if self.log_x { x.log10() } else { x };
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in &pts {
            x0 = x0.min(tx(*x));
            x1 = x1.max(tx(*x));
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        let pad = (y1 - y0).max(1e-9) * 0.05;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
        let sx = |x: f64| LEFT as f64 + (tx(x) - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP as f64 + (y1 - y) / (y1 - y0) * ph;
        let grey = [200, 200, 200];
        let black = [0, 0, 0];
        // grid and ticks
        for i in 0..=5 {
            let fy = y0 + (y1 - y0) * i as f64 / 5.0;
            let py = sy(fy);
            cv.line((LEFT as f64, py), ((W - RIGHT) as f64, py), grey, 1);
            let lbl = fmt_tick(fy, (y1 - y0) / 5.0);
            cv.text(
                LEFT - 8 - text_width(&lbl, 2),
                py as usize - 5,
                &lbl,
                2,
                black,
            );
            let fx = x0 + (x1 - x0) * i as f64 / 5.0;
            let vx = if self.log_x { 10f64.powf(fx) } else { fx };
            let px = LEFT as f64 + (fx - x0) / (x1 - x0) * pw;
            cv.line((px, TOP as f64), (px, (H - BOTTOM) as f64), grey, 1);
            let step_x = if self.log_x {
                vx * (1.0 - 10f64.powf(-(x1 - x0) / 5.0))
            } else {
                (x1 - x0) / 5.0
            };
            let lbl = fmt_tick(vx, step_x);
            cv.text(
                (px as usize).saturating_sub(text_width(&lbl, 2) / 2),
                H - BOTTOM + 8,
                &lbl,
                2,
                black,
            );
        }
        cv.line(
            (LEFT as f64, TOP as f64),
            (LEFT as f64, (H - BOTTOM) as f64),
            black,
            2,
        );
        cv.line(
            (LEFT as f64, (H - BOTTOM) as f64),
            ((W - RIGHT) as f64, (H - BOTTOM) as f64),
            black,
            2,
        );
        cv.title(&self.title);
        cv.text(
            (W - text_width(&self.x_label, 2)) / 2,
            H - 22,
            &self.x_label,
            2,
            black,
        );
        cv.text(6, TOP - 16, &self.y_label, 2, black);
        for (k, s) in self.series.iter().enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let p: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
                .map(|&(x, y)| (sx(x), sy(y)))
                .collect();
            if s.scatter {
                for &(x, y) in &p {
                    for dx in -3..=3 {
                        for dy in -3..=3 {
                            cv.set(x as i64 + dx, y as i64 + dy, c);
                        }
                    }
                }
            } else {
                for w in p.windows(2) {
                    cv.line(w[0], w[1], c, 2);
                }
            }
            // legend
            let ly = TOP + 10 + k * 16;
            let lx = W - RIGHT - 10 - text_width(&s.label, 2) - 24;
            cv.line(
                (lx as f64, ly as f64 + 4.0),
                (lx as f64 + 16.0, ly as f64 + 4.0),
                c,
                3,
            );
            cv.text(lx + 22, ly, &s.label, 2, black);
        }
        write_png(&cv, path)
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
        let mut cv = Canvas {
            px: vec![255; W * H * 3],
        };
        let black = [0, 0, 0];
        let n = self.values.len().max(1);
        let side = (H - TOP - BOTTOM).min(W - LEFT - 200);
        let cell = (side / n).max(1);
        let side = cell * n;
        let span = (self.hi - self.lo).max(1e-12);
        for (i, row) in self.values.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let c = ramp((v - self.lo) / span);
                for dy in 0..cell {
                    for dx in 0..cell {
                        cv.set(
                            (LEFT + j * cell + dx) as i64,
                            (TOP + i * cell + dy) as i64,
                            c,
                        );
                    }
                }
            }
        }
        // indices every few cells
        let every = n.div_ceil(12).max(1);
        for k in (0..n).step_by(every) {
            let lbl = k.to_string();
            cv.text(
                LEFT - 8 - text_width(&lbl, 2),
                TOP + k * cell + cell / 2 - 5,
                &lbl,
                2,
                black,
            );
            cv.text(
                LEFT + k * cell + cell / 2 - text_width(&lbl, 2) / 2,
                TOP + side + 6,
                &lbl,
                2,
                black,
            );
        }
        cv.title(&self.title);
        cv.text(
            LEFT + side / 2 - text_width(&self.axis_label, 2) / 2,
            TOP + side + 24,
            &self.axis_label,
            2,
            black,
        );
        // color bar
        let bx = LEFT + side + 40;
        for y in 0..side {
            let c = ramp(1.0 - y as f64 / side as f64);
            for dx in 0..20 {
                cv.set((bx + dx) as i64, (TOP + y) as i64, c);
            }
        }
        cv.text(
            bx + 28,
            TOP,
            &fmt_tick(self.hi, self.hi - self.lo),
            2,
            black,
        );
        cv.text(
            bx + 28,
            TOP + side - 10,
            &fmt_tick(self.lo, self.hi - self.lo),
            2,
            black,
        );
        write_png(&cv, path)
    }
}

fn write_png(cv: &Canvas, path: &Path) -> Result<()> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&cv.px, W as u32, H as u32, image::ExtendedColorType::Rgb8)
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
            }],
            log_x: false,
        };
        chart.save_png(&path).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (800, 500));
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
