//! Which questions are asked about a scene: per level and data kind (conversation, yes/no,
//! reasoning, the basic level's set and test question), existence questions with random or
//! hard absent pairs, and POPE's negative samplings.

use std::collections::BTreeMap;

use super::phrasing::question_text;
use super::query::{Qa, Query, Ref, answer, ref_to};
use super::scene::{COLORS, Level, Scene};
use crate::util::rng::Rng;

/// The query with its question text and its answer on `s`; None when it does not apply.
pub(super) fn qa(s: &Scene, query: Query) -> Option<Qa> {
    let a = answer(s, &query)?;
    Some(Qa {
        question: question_text(&query),
        answer: a,
        query,
    })
}

/// A (color, shape) pair not in the scene, uniformly over the level's shapes.
pub(super) fn absent_pair(s: &Scene, level: Level, rng: &mut Rng) -> (String, String) {
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
pub(super) fn basic_test_question(s: &Scene, i: usize, rng: &mut Rng) -> Option<Qa> {
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

/// How often each (color, shape) pair occurs in the training scenes.
pub(super) fn pair_frequencies(scenes: &[Scene]) -> BTreeMap<(String, String), usize> {
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
pub(super) fn negatives(
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
