//! `shapes`: a generated multimodal benchmark with known answers.
//!
//! Each scene holds 1–5 objects (shape, color, size, a cell of a 3×3 grid) on a noisy light
//! background (`Level::Full`), or 1–3 objects of distinct shapes asked about their color,
//! their number and the existence of a colored shape (`Level::Basic`). From the scene graph come: captions (stage 1) with several references per
//! test image, instruction data of three kinds (conversation, detailed description,
//! reasoning) in separate LLaVA JSON files, and test sets: short-answer VQA with 10 answers
//! per question (VQAv2 format), POPE-style existence questions with random / popular /
//! adversarial negatives, and MME-style yes/no pairs for existence, count, color, position.
//!
//! Every question carries a structured `Query`; `answer` computes its answer from the scene
//! alone, and a test checks every generated answer against it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::llava::{Images, Sample, Turn};
use crate::rng::Rng;

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
const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COLS: [&str; 3] = ["left", "center", "right"];
const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];
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
pub const SHORT: &str = "Answer the question using a single word or phrase.";
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
fn at_cell(cell: (usize, usize)) -> String {
    if cell == (1, 1) {
        "in the center".into()
    } else {
        format!("at the {}", cell_name(cell))
    }
}

/// How a question refers to one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ref {
    /// "the circle" (its shape is unique in the scene)
    Shape(String),
    /// "the shape at the top left"
    Cell((usize, usize)),
}

/// A question in structured form; `answer` evaluates it on a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    Count,
    CountColor(String),
    ColorOf(Ref),
    ShapeOf(Ref),
    SizeOf(Ref),
    WhereIs(String, String),
    Exists(String, String),
    CountIs(usize),
    ColorIs(Ref, String),
    AtCell(String, String, (usize, usize)),
    LeftOf(Ref, Ref),
    Above(Ref, Ref),
    Larger(Ref, Ref),
    SameColor(Ref, Ref),
}

fn find<'a>(s: &'a Scene, r: &Ref) -> Option<&'a Object> {
    match r {
        Ref::Shape(sh) => {
            let m: Vec<&Object> = s.objects.iter().filter(|o| &o.shape == sh).collect();
            (m.len() == 1).then(|| m[0])
        }
        Ref::Cell(c) => s.objects.iter().find(|o| o.cell == *c),
    }
}

fn yes(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

/// The answer of `q` on `s` (lowercase short form), from the scene graph alone. None when the
/// question does not apply (e.g. an ambiguous reference).
pub fn answer(s: &Scene, q: &Query) -> Option<String> {
    Some(match q {
        Query::Count => s.objects.len().to_string(),
        Query::CountColor(c) => s
            .objects
            .iter()
            .filter(|o| &o.color == c)
            .count()
            .to_string(),
        Query::ColorOf(r) => find(s, r)?.color.clone(),
        Query::ShapeOf(r) => find(s, r)?.shape.clone(),
        Query::SizeOf(r) => find(s, r)?.size.clone(),
        Query::WhereIs(c, sh) => {
            let m: Vec<&Object> = s
                .objects
                .iter()
                .filter(|o| &o.color == c && &o.shape == sh)
                .collect();
            if m.len() != 1 {
                return None;
            }
            cell_name(m[0].cell)
        }
        Query::Exists(c, sh) => yes(s.objects.iter().any(|o| &o.color == c && &o.shape == sh)),
        Query::CountIs(n) => yes(s.objects.len() == *n),
        Query::ColorIs(r, c) => yes(&find(s, r)?.color == c),
        Query::AtCell(c, sh, cell) => yes(s
            .objects
            .iter()
            .any(|o| &o.color == c && &o.shape == sh && o.cell == *cell)),
        Query::LeftOf(a, b) => yes(find(s, a)?.cell.1 < find(s, b)?.cell.1),
        Query::Above(a, b) => yes(find(s, a)?.cell.0 < find(s, b)?.cell.0),
        Query::Larger(a, b) => {
            let (x, y) = (find(s, a)?, find(s, b)?);
            if x.size == y.size {
                return None;
            }
            if x.size == "large" {
                describe_ref(s, a)
            } else {
                describe_ref(s, b)
            }
        }
        Query::SameColor(a, b) => yes(find(s, a)?.color == find(s, b)?.color),
    })
}

/// "the circle" / "the shape at the top left".
fn ref_phrase(r: &Ref) -> String {
    match r {
        Ref::Shape(s) => format!("the {s}"),
        Ref::Cell(c) => format!("the shape {}", at_cell(*c)),
    }
}

/// A short name of the referenced object for answers: "the red circle".
fn describe_ref(s: &Scene, r: &Ref) -> String {
    match find(s, r) {
        Some(o) => format!("the {} {}", o.color, o.shape),
        None => ref_phrase(r),
    }
}

/// A reference to object `i` that is unambiguous in `s`.
fn ref_to(s: &Scene, i: usize) -> Ref {
    let o = &s.objects[i];
    if s.objects.iter().filter(|x| x.shape == o.shape).count() == 1 {
        Ref::Shape(o.shape.clone())
    } else {
        Ref::Cell(o.cell)
    }
}

/// Every query the generator can ask about a scene (for checking generated files: a question
/// text maps back to its query).
pub fn all_queries(s: &Scene) -> Vec<Query> {
    let mut refs: Vec<Ref> = SHAPES.iter().map(|sh| Ref::Shape(sh.to_string())).collect();
    refs.extend((0..9).map(|i| Ref::Cell((i / 3, i % 3))));
    let mut q = vec![Query::Count];
    for n in 0..=6 {
        q.push(Query::CountIs(n));
    }
    for c in COLORS {
        q.push(Query::CountColor(c.into()));
        for sh in SHAPES {
            q.push(Query::WhereIs(c.into(), sh.into()));
            q.push(Query::Exists(c.into(), sh.into()));
            for i in 0..9 {
                q.push(Query::AtCell(c.into(), sh.into(), (i / 3, i % 3)));
            }
        }
    }
    for r in &refs {
        q.push(Query::ColorOf(r.clone()));
        q.push(Query::ShapeOf(r.clone()));
        q.push(Query::SizeOf(r.clone()));
        for c in COLORS {
            q.push(Query::ColorIs(r.clone(), c.into()));
        }
        for r2 in &refs {
            q.push(Query::LeftOf(r.clone(), r2.clone()));
            q.push(Query::Above(r.clone(), r2.clone()));
            q.push(Query::Larger(r.clone(), r2.clone()));
            q.push(Query::SameColor(r.clone(), r2.clone()));
        }
    }
    q.retain(|x| answer(s, x).is_some());
    q
}

/// The sentence-form answer the conversation data uses for a query.
pub fn sentence_answer(s: &Scene, q: &Query) -> Option<String> {
    let a = answer(s, q)?;
    Some(sentence(&Qa {
        query: q.clone(),
        question: question_text(q),
        answer: a,
    }))
}

/// The short answer as the data writes it ("Yes"/"No" capitalized).
pub fn short_answer(s: &Scene, q: &Query) -> Option<String> {
    answer(s, q).map(|a| short_form(&a))
}

/// The question text of a query (without instruction suffixes).
pub fn question_text(q: &Query) -> String {
    match q {
        Query::Count => "How many shapes are there in the image?".into(),
        Query::CountColor(c) => format!("How many {c} shapes are there?"),
        Query::ColorOf(r) => format!("What color is {}?", ref_phrase(r)),
        Query::ShapeOf(r) => format!(
            "What shape is {}?",
            ref_phrase(r).replace("the shape ", "the object ")
        ),
        Query::SizeOf(r) => format!("Is {} small or large?", ref_phrase(r)),
        Query::WhereIs(c, sh) => format!("Where is the {c} {sh}?"),
        Query::Exists(c, sh) => format!("Is there a {c} {sh} in the image?"),
        Query::CountIs(n) => format!(
            "Are there {} shapes in the image?",
            NUMBERS.get(*n).copied().unwrap_or("many")
        ),
        Query::ColorIs(r, c) => format!("Is {} {c}?", ref_phrase(r)),
        Query::AtCell(c, sh, cell) => format!("Is the {c} {sh} {}?", at_cell(*cell)),
        Query::LeftOf(a, b) => format!("Is {} to the left of {}?", ref_phrase(a), ref_phrase(b)),
        Query::Above(a, b) => format!("Is {} above {}?", ref_phrase(a), ref_phrase(b)),
        Query::Larger(a, b) => format!("Which is larger, {} or {}?", ref_phrase(a), ref_phrase(b)),
        Query::SameColor(a, b) => format!(
            "Do {} and {} have the same color?",
            ref_phrase(a),
            ref_phrase(b)
        ),
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

fn object_phrase(o: &Object, with_size: bool) -> String {
    if with_size {
        format!("a {} {} {} {}", o.size, o.color, o.shape, at_cell(o.cell))
    } else {
        format!("a {} {} {}", o.color, o.shape, at_cell(o.cell))
    }
}

fn join_and(parts: &[String]) -> String {
    match parts.len() {
        0 => String::new(),
        1 => parts[0].clone(),
        n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
    }
}

/// Reference captions: the canonical one first. Sizes are named only at `Level::Full`
/// (at `Level::Basic` every object is large).
pub fn captions(s: &Scene, level: Level) -> Vec<String> {
    let sized = level == Level::Full;
    let with: Vec<String> = s.objects.iter().map(|o| object_phrase(o, sized)).collect();
    let without: Vec<String> = s.objects.iter().map(|o| object_phrase(o, false)).collect();
    let n = s.objects.len();
    let count = if n == 1 {
        "one shape".to_string()
    } else {
        format!("{} shapes", NUMBERS[n])
    };
    let mut out = vec![
        join_and(&with),
        join_and(&without),
        format!("{count}: {}", join_and(&without)),
        format!("there is {}", join_and(&with)),
        format!("an image with {}", join_and(&without)),
    ];
    if !sized {
        out.remove(1);
    }
    out
}

/// A detailed description (the `detail` instruction kind); sizes only at `Level::Full`.
pub fn detailed_description(s: &Scene, level: Level) -> String {
    let n = s.objects.len();
    let mut out = if n == 1 {
        "The image shows a single shape on a light grey background.".to_string()
    } else {
        format!(
            "The image shows {} shapes on a light grey background.",
            NUMBERS[n]
        )
    };
    for o in &s.objects {
        out += &format!(" There is {}.", object_phrase(o, level == Level::Full));
    }
    let mut colors: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &s.objects {
        *colors.entry(o.color.as_str()).or_default() += 1;
    }
    if let Some((c, k)) = colors.iter().find(|(_, k)| **k > 1) {
        out += &format!(" {} of the shapes are {c}.", capitalize(NUMBERS[*k]));
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// A question with its answer (checked against `answer`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qa {
    pub query: Query,
    pub question: String,
    pub answer: String,
}

fn qa(s: &Scene, query: Query) -> Option<Qa> {
    let a = answer(s, &query)?;
    Some(Qa {
        question: question_text(&query),
        answer: a,
        query,
    })
}

/// A (color, shape) pair not in the scene, uniformly over the level's shapes.
fn absent_pair(s: &Scene, level: Level, rng: &mut Rng) -> (String, String) {
    let shapes = level.shapes();
    loop {
        let (c, sh) = (COLORS[rng.below(5)], shapes[rng.below(shapes.len())]);
        if !s.objects.iter().any(|o| o.color == c && o.shape == sh) {
            return (c.into(), sh.into());
        }
    }
}

/// Every (color, shape) pair of the level that is not in the scene, colors first.
fn absent_pairs(s: &Scene, level: Level) -> Vec<(String, String)> {
    COLORS
        .iter()
        .flat_map(|c| {
            level
                .shapes()
                .iter()
                .map(move |sh| (c.to_string(), sh.to_string()))
        })
        .filter(|(c, sh)| !s.objects.iter().any(|o| &o.color == c && &o.shape == sh))
        .collect()
}

/// An absent (color, shape) pair that shares its shape or its color with a present object
/// ("hard": only the binding of color to shape tells it apart), when there is one.
fn hard_absent_pair(s: &Scene, level: Level, rng: &mut Rng) -> Option<(String, String)> {
    let mut hard: Vec<(String, String)> = absent_pairs(s, level)
        .into_iter()
        .filter(|(c, sh)| s.objects.iter().any(|o| &o.color == c || &o.shape == sh))
        .collect();
    rng.shuffle(&mut hard);
    hard.into_iter().next()
}

/// An existence question: a present pair when `present`, else an absent pair, hard (see
/// `hard_absent_pair`) when `hard`.
fn existence(s: &Scene, level: Level, present: bool, hard: bool, rng: &mut Rng) -> Query {
    let (c, sh) = if present {
        let o = &s.objects[rng.below(s.objects.len())];
        (o.color.clone(), o.shape.clone())
    } else if hard {
        hard_absent_pair(s, level, rng).unwrap_or_else(|| absent_pair(s, level, rng))
    } else {
        absent_pair(s, level, rng)
    };
    Query::Exists(c, sh)
}

/// `Level::Basic` questions about one scene, in random order: the color of every object by
/// its shape, the number of shapes, and two existence questions (one yes; one no, hard or
/// random with equal chance).
pub fn basic_questions(s: &Scene, rng: &mut Rng) -> Vec<Qa> {
    let mut q: Vec<Query> = s
        .objects
        .iter()
        .map(|o| Query::ColorOf(Ref::Shape(o.shape.clone())))
        .collect();
    q.push(Query::Count);
    q.push(existence(s, Level::Basic, true, false, rng));
    let hard = rng.below(2) == 0;
    q.push(existence(s, Level::Basic, false, hard, rng));
    let mut out: Vec<Qa> = q.into_iter().filter_map(|x| qa(s, x)).collect();
    rng.shuffle(&mut out);
    out
}

/// The `Level::Basic` test question of test image `i`: kinds in turn color, count,
/// existence; existence yes and no alternate, and the no's alternate hard and random.
fn basic_test_question(s: &Scene, i: usize, rng: &mut Rng) -> Option<Qa> {
    let q = match i % 3 {
        0 => {
            let o = &s.objects[rng.below(s.objects.len())];
            Query::ColorOf(Ref::Shape(o.shape.clone()))
        }
        1 => Query::Count,
        _ => existence(
            s,
            Level::Basic,
            (i / 3).is_multiple_of(2),
            (i / 6).is_multiple_of(2),
            rng,
        ),
    };
    qa(s, q)
}

/// Short-answer questions about one scene, in random order (conversation data, VQA).
pub fn short_questions(s: &Scene, rng: &mut Rng) -> Vec<Qa> {
    let mut out = Vec::new();
    let i = rng.below(s.objects.len());
    let o = &s.objects[i];
    let r = ref_to(s, i);
    out.extend(qa(s, Query::Count));
    out.extend(qa(s, Query::ColorOf(r.clone())));
    out.extend(qa(s, Query::ShapeOf(Ref::Cell(o.cell))));
    out.extend(qa(s, Query::SizeOf(r)));
    out.extend(qa(s, Query::WhereIs(o.color.clone(), o.shape.clone())));
    out.extend(qa(s, Query::CountColor(COLORS[rng.below(5)].into())));
    let (c, sh) = if rng.below(2) == 0 {
        (o.color.clone(), o.shape.clone())
    } else {
        absent_pair(s, Level::Full, rng)
    };
    out.extend(qa(s, Query::Exists(c, sh)));
    rng.shuffle(&mut out);
    out
}

/// Yes/no questions about count, color and position, each yes or no with equal chance
/// (conversation data; the MME-style test asks the same kinds).
pub fn yes_no_questions(s: &Scene, rng: &mut Rng) -> Vec<Qa> {
    let i = rng.below(s.objects.len());
    let o = &s.objects[i];
    let r = ref_to(s, i);
    let n = s.objects.len();
    let yes = |rng: &mut Rng| rng.below(2) == 0;
    let count = if yes(rng) {
        n
    } else if n == 5 || (n > 1 && yes(rng)) {
        n - 1
    } else {
        n + 1
    };
    let color = if yes(rng) {
        o.color.clone()
    } else {
        COLORS
            .iter()
            .filter(|c| **c != o.color)
            .nth(rng.below(4))
            .expect("4 other colors")
            .to_string()
    };
    let cell = if yes(rng) {
        o.cell
    } else {
        ((o.cell.0 + 1 + rng.below(2)) % 3, o.cell.1)
    };
    let mut out: Vec<Qa> = [
        Query::CountIs(count),
        Query::ColorIs(r, color),
        Query::AtCell(o.color.clone(), o.shape.clone(), cell),
    ]
    .into_iter()
    .filter_map(|q| qa(s, q))
    .collect();
    rng.shuffle(&mut out);
    out
}

/// Reasoning questions (relations and comparisons between two objects).
pub fn reasoning_questions(s: &Scene, rng: &mut Rng) -> Vec<Qa> {
    if s.objects.len() < 2 {
        return vec![];
    }
    let i = rng.below(s.objects.len());
    let mut j = rng.below(s.objects.len() - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (ref_to(s, i), ref_to(s, j));
    let mut out: Vec<Qa> = [
        Query::LeftOf(a.clone(), b.clone()),
        Query::Above(a.clone(), b.clone()),
        Query::Larger(a.clone(), b.clone()),
        Query::SameColor(a, b),
    ]
    .into_iter()
    .filter_map(|q| qa(s, q))
    .collect();
    rng.shuffle(&mut out);
    out
}

fn turn(from: &str, value: String) -> Turn {
    Turn {
        from: from.into(),
        value,
    }
}

/// Sentence form of an answer for conversation data.
fn sentence(q: &Qa) -> String {
    match &q.query {
        Query::Count => {
            let n: usize = q.answer.parse().unwrap_or(0);
            if n == 1 {
                "There is one shape.".into()
            } else {
                format!("There are {} shapes.", NUMBERS[n])
            }
        }
        Query::CountColor(c) => match q.answer.parse::<usize>().unwrap_or(0) {
            0 => format!("There are no {c} shapes."),
            1 => format!("There is one {c} shape."),
            n => format!("There are {} {c} shapes.", NUMBERS[n]),
        },
        Query::Exists(c, sh) => {
            if q.answer == "yes" {
                format!("Yes, there is a {c} {sh}.")
            } else {
                format!("No, there is no {c} {sh}.")
            }
        }
        Query::WhereIs(c, sh) => format!("The {c} {sh} is {}.", at_cell(parse_cell(&q.answer))),
        _ => format!("{}.", capitalize(&q.answer)),
    }
}

fn parse_cell(name: &str) -> (usize, usize) {
    if name == "center" {
        return (1, 1);
    }
    let mut it = name.split(' ');
    let r = ROWS.iter().position(|x| Some(*x) == it.next()).unwrap_or(1);
    let c = COLS.iter().position(|x| Some(*x) == it.next()).unwrap_or(1);
    (r, c)
}

/// Capitalized yes/no as LLaVA's VQA data writes them.
fn short_form(a: &str) -> String {
    match a {
        "yes" => "Yes".into(),
        "no" => "No".into(),
        other => other.into(),
    }
}

/// The dataset sizes and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapesConfig {
    pub seed: u64,
    pub train: usize,
    pub test: usize,
    pub size: usize,
    #[serde(default)]
    pub level: Level,
}

/// Counts of what was written, for the README and the caller.
#[derive(Debug, Default, Serialize)]
pub struct ShapesSummary {
    pub files: BTreeMap<String, usize>,
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.part");
    std::fs::write(&tmp, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename", path.display()))?;
    Ok(())
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s += &serde_json::to_string(r)?;
        s.push('\n');
    }
    let tmp = path.with_extension("jsonl.part");
    std::fs::write(&tmp, s).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename", path.display()))?;
    Ok(())
}

/// One POPE question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PopeItem {
    pub question_id: usize,
    pub image: String,
    pub text: String,
    pub label: String,
}

/// One MME-style question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmeItem {
    pub question_id: String,
    pub image: String,
    pub text: String,
    pub category: String,
    pub answer: String,
}

/// The level of the shapes data in `dir`, from its `shapes.json` (`full` when the file or
/// its `level` field is absent: data written before levels existed).
pub fn read_level(dir: &Path) -> Result<Level> {
    let path = dir.join("shapes.json");
    if !path.exists() {
        return Ok(Level::Full);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let cfg: ShapesConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a shapes config", path.display()))?;
    Ok(cfg.level)
}

/// Writes the whole benchmark under `out`. Same config, same bytes.
pub fn generate(cfg: &ShapesConfig, out: &Path) -> Result<ShapesSummary> {
    let img_dir = out.join("images");
    std::fs::create_dir_all(&img_dir)
        .with_context(|| format!("{}: cannot create", img_dir.display()))?;
    let mut rng = Rng::new(cfg.seed);
    let mut summary = ShapesSummary::default();
    let mut scenes: BTreeMap<&str, Vec<Scene>> = BTreeMap::new();
    for (split, n) in [("train", cfg.train), ("test", cfg.test)] {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{split}_{i:05}.png");
            let s = random_scene(&mut rng, name.clone(), cfg.size, cfg.level);
            let px = render(&s, cfg.size, &mut rng);
            let path = img_dir.join(&name);
            image::save_buffer_with_format(
                &path,
                &px,
                cfg.size as u32,
                cfg.size as u32,
                image::ExtendedColorType::Rgb8,
                image::ImageFormat::Png,
            )
            .with_context(|| format!("{}: cannot write", path.display()))?;
            v.push(s);
        }
        scenes.insert(split, v);
    }
    let train = &scenes["train"];
    let test = &scenes["test"];
    write_json(&out.join("scenes_train.json"), train)?;
    write_json(&out.join("scenes_test.json"), test)?;

    // stage 1: captions
    let sample = |id: String, image: &str, turns: Vec<Turn>| Sample {
        id: serde_json::Value::String(id),
        image: Some(Images::One(image.into())),
        conversations: turns,
    };
    let caption_prompts = [
        "Describe the image briefly.",
        "What is in this picture?",
        "Give a short caption for the image.",
    ];
    let caps: Vec<Sample> = train
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = caption_prompts[i % caption_prompts.len()];
            sample(
                format!("cap-{i}"),
                &s.image,
                vec![
                    turn("human", format!("<image>\n{p}")),
                    turn("gpt", captions(s, cfg.level)[0].clone()),
                ],
            )
        })
        .collect();
    write_json(&out.join("captions_train.json"), &caps)?;
    summary
        .files
        .insert("captions_train.json".into(), caps.len());
    // caption references for the test images (COCO caption format)
    let images: Vec<serde_json::Value> = test
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "file_name": s.image}))
        .collect();
    let mut anns = Vec::new();
    for (i, s) in test.iter().enumerate() {
        for c in captions(s, cfg.level) {
            anns.push(serde_json::json!({"id": anns.len(), "image_id": i, "caption": c}));
        }
    }
    write_json(
        &out.join("captions_test.json"),
        &serde_json::json!({"images": images, "annotations": anns}),
    )?;
    summary
        .files
        .insert("captions_test.json".into(), test.len());

    // stage 2: three instruction kinds
    let mut conv = Vec::new();
    let mut detail = Vec::new();
    let mut reason = Vec::new();
    for (i, s) in train.iter().enumerate() {
        let qs = match cfg.level {
            // every basic question, all in the short-answer format
            Level::Basic => basic_questions(s, &mut rng),
            Level::Full => {
                let mut qs = short_questions(s, &mut rng);
                qs.extend(yes_no_questions(s, &mut rng));
                rng.shuffle(&mut qs);
                qs.truncate(5 + rng.below(3));
                qs
            }
        };
        let mut turns = Vec::new();
        for (k, q) in qs.iter().enumerate() {
            // at `Level::Full` three turns in four in LLaVA-1.5's short-answer format, the
            // rest as sentences
            let (text, ans) = if cfg.level == Level::Basic || rng.below(4) != 0 {
                (
                    format!("{}{}", q.question, cfg.level.question_suffix()),
                    short_form(&q.answer),
                )
            } else {
                (q.question.clone(), sentence(q))
            };
            let text = if k == 0 {
                format!("<image>\n{text}")
            } else {
                text
            };
            turns.push(turn("human", text));
            turns.push(turn("gpt", ans));
        }
        conv.push(sample(format!("conv-{i}"), &s.image, turns));
        detail.push(sample(
            format!("detail-{i}"),
            &s.image,
            vec![
                turn("human", "<image>\nDescribe the image in detail.".into()),
                turn("gpt", detailed_description(s, cfg.level)),
            ],
        ));
        let rq = reasoning_questions(s, &mut rng);
        if !rq.is_empty() {
            let mut turns = Vec::new();
            for (k, q) in rq.iter().take(2).enumerate() {
                let text = if k == 0 {
                    format!("<image>\n{}", q.question)
                } else {
                    q.question.clone()
                };
                turns.push(turn("human", text));
                turns.push(turn("gpt", sentence(q)));
            }
            reason.push(sample(format!("reason-{i}"), &s.image, turns));
        }
    }
    for (name, v) in [
        ("conversation_train.json", &conv),
        ("detail_train.json", &detail),
        ("reasoning_train.json", &reason),
    ] {
        write_json(&out.join(name), v)?;
        summary.files.insert(name.into(), v.len());
    }

    // VQA: questions + annotations in the VQAv2 layout, 10 answers each
    let mut vqa_q = Vec::new();
    let mut vqa_a = Vec::new();
    for (i, s) in test.iter().enumerate() {
        let qs = match cfg.level {
            Level::Basic => basic_test_question(s, i, &mut rng).into_iter().collect(),
            Level::Full => short_questions(s, &mut rng),
        };
        for (k, q) in qs.into_iter().take(2).enumerate() {
            let qid = i * 10 + k;
            vqa_q.push(serde_json::json!({"question_id": qid, "image_id": i, "image": s.image, "question": q.question}));
            let answers: Vec<serde_json::Value> = (0..10)
                .map(|j| {
                    let a = synonym(&q.answer, j);
                    serde_json::json!({"answer_id": j + 1, "answer": a, "answer_confidence": "yes"})
                })
                .collect();
            let atype = match q.query {
                Query::Count | Query::CountColor(_) => "number",
                Query::Exists(..) => "yes/no",
                _ => "other",
            };
            vqa_a.push(serde_json::json!({
                "question_id": qid, "image_id": i, "question_type": "what", "answer_type": atype,
                "multiple_choice_answer": q.answer, "answers": answers,
                "query": q.query,
            }));
        }
    }
    write_json(
        &out.join("vqa_test_questions.json"),
        &serde_json::json!({"questions": vqa_q}),
    )?;
    write_json(
        &out.join("vqa_test_annotations.json"),
        &serde_json::json!({"annotations": vqa_a}),
    )?;
    summary
        .files
        .insert("vqa_test_questions.json".into(), vqa_q.len());

    // POPE: per image, present pairs (yes) and as many absent pairs (no) per negative kind
    let freq = pair_frequencies(train);
    for kind in ["random", "popular", "adversarial"] {
        let mut items = Vec::new();
        let mut krng = Rng::new(cfg.seed ^ 0x9090 ^ kind.len() as u64);
        for s in test {
            let present: Vec<(String, String)> = s
                .objects
                .iter()
                .map(|o| (o.color.clone(), o.shape.clone()))
                .collect();
            let mut pos: Vec<(String, String)> = present.clone();
            pos.dedup();
            for (c, sh) in pos.iter().take(2) {
                items.push((s.image.clone(), c.clone(), sh.clone(), "yes"));
            }
            let n_neg = pos.len().min(2);
            for (c, sh) in negatives(s, cfg.level, kind, n_neg, &freq, &mut krng) {
                items.push((s.image.clone(), c, sh, "no"));
            }
        }
        let rows: Vec<PopeItem> = items
            .into_iter()
            .enumerate()
            .map(|(k, (image, c, sh, label))| PopeItem {
                question_id: k,
                image,
                text: format!("Is there a {c} {sh} in the image?"),
                label: label.into(),
            })
            .collect();
        let name = format!("pope_test_{kind}.jsonl");
        write_jsonl(&out.join(&name), &rows)?;
        summary.files.insert(name, rows.len());
    }

    // MME-style pairs: one yes and one no question per image and category
    let mut mme = Vec::new();
    for s in test {
        let mut mrng = Rng::new(cfg.seed ^ 0x3e3e ^ s.image.len() as u64 ^ mme.len() as u64);
        let i = mrng.below(s.objects.len());
        let o = &s.objects[i];
        let (ac, ash) = absent_pair(s, cfg.level, &mut mrng);
        let n = s.objects.len();
        let wrong_n = if n == 5 { 4 } else { n + 1 };
        let other_color = COLORS
            .iter()
            .find(|c| **c != o.color)
            .expect("5 colors")
            .to_string();
        let mut other_cell = (o.cell.0, (o.cell.1 + 1) % 3);
        while s
            .objects
            .iter()
            .any(|x| x.cell == other_cell && x.color == o.color && x.shape == o.shape)
        {
            other_cell = ((other_cell.0 + 1) % 3, other_cell.1);
        }
        let r = ref_to(s, i);
        let pairs = [
            (
                "existence",
                Query::Exists(o.color.clone(), o.shape.clone()),
                Query::Exists(ac, ash),
            ),
            ("count", Query::CountIs(n), Query::CountIs(wrong_n)),
            (
                "color",
                Query::ColorIs(r.clone(), o.color.clone()),
                Query::ColorIs(r, other_color),
            ),
            (
                "position",
                Query::AtCell(o.color.clone(), o.shape.clone(), o.cell),
                Query::AtCell(o.color.clone(), o.shape.clone(), other_cell),
            ),
        ];
        for (cat, qy, qn) in pairs {
            for (k, q) in [qy, qn].into_iter().enumerate() {
                let a = answer(s, &q).expect("MME questions apply");
                mme.push(MmeItem {
                    question_id: format!("{}/{cat}/{k}", s.image),
                    image: s.image.clone(),
                    text: format!("{} {YES_NO}", question_text(&q)),
                    category: cat.into(),
                    answer: short_form(&a),
                });
            }
        }
    }
    write_jsonl(&out.join("mme_test.jsonl"), &mme)?;
    summary.files.insert("mme_test.jsonl".into(), mme.len());
    write_json(&out.join("shapes.json"), cfg)?;
    Ok(summary)
}

/// VQA answer j of 10: the short answer, with spelled-out numbers and "upper/lower" for some.
fn synonym(a: &str, j: usize) -> String {
    if let Ok(n) = a.parse::<usize>()
        && j % 3 == 2
    {
        return NUMBERS.get(n).map(|s| s.to_string()).unwrap_or(a.into());
    }
    if j % 4 == 3 {
        if let Some(rest) = a.strip_prefix("top ") {
            return format!("upper {rest}");
        }
        if let Some(rest) = a.strip_prefix("bottom ") {
            return format!("lower {rest}");
        }
    }
    a.into()
}

/// How often each (color, shape) pair occurs in the training scenes.
fn pair_frequencies(scenes: &[Scene]) -> BTreeMap<(String, String), usize> {
    let mut f = BTreeMap::new();
    for s in scenes {
        for o in &s.objects {
            *f.entry((o.color.clone(), o.shape.clone())).or_insert(0) += 1;
        }
    }
    f
}

/// POPE negatives: `random` absent pairs uniformly, `popular` the most frequent absent pairs
/// of the training set, `adversarial` absent pairs that share a color or a shape with a
/// present object (the closest co-occurring confusions).
fn negatives(
    s: &Scene,
    level: Level,
    kind: &str,
    n: usize,
    freq: &BTreeMap<(String, String), usize>,
    rng: &mut Rng,
) -> Vec<(String, String)> {
    let mut all = absent_pairs(s, level);
    match kind {
        "random" => rng.shuffle(&mut all),
        "popular" => {
            rng.shuffle(&mut all);
            all.sort_by_key(|p| std::cmp::Reverse(freq.get(p).copied().unwrap_or(0)));
        }
        _ => {
            rng.shuffle(&mut all);
            all.sort_by_key(|(c, sh)| {
                let shares = s.objects.iter().any(|o| &o.color == c || &o.shape == sh);
                !shares
            });
        }
    }
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_is_read_from_the_data() {
        let d = tempfile::tempdir().unwrap();
        // data written before levels existed, or without a config: full
        assert_eq!(read_level(d.path()).unwrap(), Level::Full);
        let cfg = ShapesConfig {
            seed: 0,
            train: 1,
            test: 1,
            size: 56,
            level: Level::Basic,
        };
        write_json(&d.path().join("shapes.json"), &cfg).unwrap();
        assert_eq!(read_level(d.path()).unwrap(), Level::Basic);
        assert_eq!(Level::Basic.question_suffix(), "");
        assert_eq!(Level::Full.question_suffix(), format!("\n{SHORT}"));
        std::fs::write(
            d.path().join("shapes.json"),
            r#"{"seed": 0, "level": "hard"}"#,
        )
        .unwrap();
        let e = format!("{:#}", read_level(d.path()).unwrap_err());
        assert!(e.contains("shapes.json"), "{e}");
    }

    #[test]
    fn answers_by_hand() {
        let o = |shape: &str, color: &str, size: &str, cell| Object {
            shape: shape.into(),
            color: color.into(),
            size: size.into(),
            cell,
            center: (0.0, 0.0),
            half: 1.0,
        };
        let s = Scene {
            image: "x".into(),
            objects: vec![
                o("circle", "red", "large", (0, 0)),
                o("square", "blue", "small", (2, 2)),
            ],
        };
        assert_eq!(answer(&s, &Query::Count).unwrap(), "2");
        assert_eq!(
            answer(&s, &Query::ColorOf(Ref::Shape("circle".into()))).unwrap(),
            "red"
        );
        assert_eq!(
            answer(&s, &Query::WhereIs("blue".into(), "square".into())).unwrap(),
            "bottom right"
        );
        assert_eq!(
            answer(&s, &Query::Exists("red".into(), "square".into())).unwrap(),
            "no"
        );
        let (c, sq) = (Ref::Shape("circle".into()), Ref::Shape("square".into()));
        assert_eq!(
            answer(&s, &Query::LeftOf(c.clone(), sq.clone())).unwrap(),
            "yes"
        );
        assert_eq!(
            answer(&s, &Query::Above(sq.clone(), c.clone())).unwrap(),
            "no"
        );
        assert_eq!(answer(&s, &Query::Larger(c, sq)).unwrap(), "the red circle");
        assert_eq!(
            captions(&s, Level::Full)[0],
            "a large red circle at the top left and a small blue square at the bottom right"
        );
    }
}
