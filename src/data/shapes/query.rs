//! Questions in structured form: a `Query` names what is asked about a scene, `answer`
//! evaluates it on the scene graph alone (every generated answer is checked against it), and
//! a `Qa` is a query with its question text and answer.

use serde::{Deserialize, Serialize};

use super::scene::{COLORS, Object, SHAPES, Scene, at_cell, cell_name};

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
pub(super) fn ref_phrase(r: &Ref) -> String {
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
pub(super) fn ref_to(s: &Scene, i: usize) -> Ref {
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

/// A question with its answer (checked against `answer`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qa {
    pub query: Query,
    pub question: String,
    pub answer: String,
}
