//! How the data words things: question texts, sentence and short answers, captions, detailed
//! descriptions, and the synonyms among VQA's ten answers.

use std::collections::BTreeMap;

use super::query::{Qa, Query, answer, ref_phrase};
use super::scene::{COLS, Level, NUMBERS, Object, ROWS, Scene, at_cell};

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

/// Sentence form of an answer for conversation data.
pub(super) fn sentence(q: &Qa) -> String {
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
pub(super) fn short_form(a: &str) -> String {
    match a {
        "yes" => "Yes".into(),
        "no" => "No".into(),
        other => other.into(),
    }
}

/// VQA answer j of 10: the short answer, with spelled-out numbers and "upper/lower" for some.
pub(super) fn synonym(a: &str, j: usize) -> String {
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
