//! The scene graph of a `shapes` image (objects with shape, color, size and a cell of a 3×3
//! grid), how scenes are drawn at random for a level, and how they are rendered.

use serde::{Deserialize, Serialize};

use crate::util::rng::Rng;

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

pub const COLORS: [&str; 5] = ["red", "green", "blue", "yellow", "purple"];

const RGB: [[u8; 3]; 5] = [
    [220, 40, 40],
    [40, 170, 60],
    [40, 80, 220],
    [235, 205, 30],
    [150, 60, 190],
];

pub const SIZES: [&str; 2] = ["small", "large"];

pub(super) const ROWS: [&str; 3] = ["top", "middle", "bottom"];

pub(super) const COLS: [&str; 3] = ["left", "center", "right"];

pub(super) const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];

/// How rich the scenes and questions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// 1–3 objects of distinct shapes (circle, square, triangle), all large; questions: the
    /// color of a named shape, the number of shapes, whether a colored shape is there
    Basic,
    /// 1–5 objects of 4 shapes (repeats allowed) in 2 sizes; 7 short-answer question kinds,
    /// yes/no questions about count, color and position, reasoning about pairs
    #[default]
    Full,
}

impl Level {
    /// The shapes scenes of this level draw from.
    pub fn shapes(self) -> &'static [&'static str] {
        match self {
            Level::Basic => &SHAPES[..3],
            Level::Full => &SHAPES,
        }
    }

    /// What follows a short-answer question: LLaVA-1.5's instruction at `Level::Full`, where
    /// sentence answers are asked too; nothing at `Level::Basic`, where every answer is one
    /// word (11 tokens fewer per question).
    pub fn question_suffix(self) -> String {
        match self {
            Level::Basic => String::new(),
            Level::Full => format!("\n{SHORT}"),
        }
    }

    fn max_objects(self) -> usize {
        match self {
            Level::Basic => 3,
            Level::Full => 5,
        }
    }
}

/// LLaVA-1.5's short-answer instruction.
pub const SHORT: &str = crate::data::template::SHORT_ANSWER;

/// MME's yes/no instruction.
pub const YES_NO: &str = "Please answer yes or no.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: String,
    pub color: String,
    pub size: String,
    /// grid cell (row, col), 0..3 each
    pub cell: (usize, usize),
    /// center in pixels
    pub center: (f64, f64),
    pub half: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub image: String,
    pub objects: Vec<Object>,
}

/// The position phrase of a cell: "top left", "center", "middle right", ...
pub fn cell_name(cell: (usize, usize)) -> String {
    match cell {
        (1, 1) => "center".into(),
        (r, c) => format!("{} {}", ROWS[r], COLS[c]),
    }
}

/// "at the top left" / "in the center".
pub(super) fn at_cell(cell: (usize, usize)) -> String {
    if cell == (1, 1) {
        "in the center".into()
    } else {
        format!("at the {}", cell_name(cell))
    }
}

/// A scene of 1 to the level's maximum of objects, in distinct cells; at `Level::Basic` of
/// distinct shapes and all large.
pub fn random_scene(rng: &mut Rng, image: String, size: usize, level: Level) -> Scene {
    let n = 1 + rng.below(level.max_objects());
    let mut cells: Vec<(usize, usize)> = (0..9).map(|i| (i / 3, i % 3)).collect();
    rng.shuffle(&mut cells);
    let mut distinct: Vec<&str> = level.shapes().to_vec();
    if level == Level::Basic {
        rng.shuffle(&mut distinct);
    }
    let cell_px = size as f64 / 3.0;
    let mut objects: Vec<Object> = cells[..n]
        .iter()
        .enumerate()
        .map(|(k, &cell)| {
            let large = level == Level::Basic || rng.below(2) == 1;
            let half =
                if large { cell_px * 0.34 } else { cell_px * 0.2 } + rng.uniform() * cell_px * 0.04;
            let jitter = cell_px * 0.08;
            let shape = match level {
                Level::Basic => distinct[k],
                Level::Full => SHAPES[rng.below(SHAPES.len())],
            };
            Object {
                shape: shape.into(),
                color: COLORS[rng.below(COLORS.len())].into(),
                size: if large { "large" } else { "small" }.into(),
                cell,
                center: (
                    (cell.1 as f64 + 0.5) * cell_px + (rng.uniform() * 2.0 - 1.0) * jitter,
                    (cell.0 as f64 + 0.5) * cell_px + (rng.uniform() * 2.0 - 1.0) * jitter,
                ),
                half,
            }
        })
        .collect();
    objects.sort_by_key(|o| o.cell);
    Scene { image, objects }
}

fn inside(o: &Object, x: f64, y: f64) -> bool {
    let (dx, dy) = (x - o.center.0, y - o.center.1);
    let h = o.half;
    match o.shape.as_str() {
        "circle" => dx * dx + dy * dy <= h * h,
        "square" => dx.abs() <= h * 0.85 && dy.abs() <= h * 0.85,
        "diamond" => dx.abs() + dy.abs() <= h,
        // upward triangle: apex at the top, base at the bottom
        _ => dy <= h * 0.8 && dy >= -h && dx.abs() <= (dy + h) * 0.6,
    }
}

/// Renders a scene: light grey background with per-pixel noise, filled shapes with a
/// per-object color jitter. Returns RGB HWC.
pub fn render(s: &Scene, size: usize, rng: &mut Rng) -> Vec<u8> {
    let mut px = vec![0u8; size * size * 3];
    for v in px.iter_mut() {
        *v = (225.0 + rng.normal() * 8.0).round().clamp(0.0, 255.0) as u8;
    }
    for o in &s.objects {
        let base = RGB[COLORS
            .iter()
            .position(|c| *c == o.color)
            .expect("known color")];
        let col: Vec<u8> = base
            .iter()
            .map(|&c| {
                (c as f64 + (rng.uniform() * 30.0 - 15.0))
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
            .collect();
        let (x0, x1) = (
            (o.center.0 - o.half).floor().max(0.0) as usize,
            ((o.center.0 + o.half).ceil() as usize).min(size - 1),
        );
        let (y0, y1) = (
            (o.center.1 - o.half).floor().max(0.0) as usize,
            ((o.center.1 + o.half).ceil() as usize).min(size - 1),
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                if inside(o, x as f64 + 0.5, y as f64 + 0.5) {
                    px[(y * size + x) * 3..(y * size + x) * 3 + 3].copy_from_slice(&col);
                }
            }
        }
    }
    px
}
