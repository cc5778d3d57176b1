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
//!
//! Files: `scene` (the scene graph, random scenes, rendering), `query` (structured
//! questions and their answers), `phrasing` (how questions, answers and captions are
//! worded), `questions` (which questions each data kind asks), `files` (writing the
//! benchmark).

mod files;
mod phrasing;
mod query;
mod questions;
mod scene;

pub use files::{MmeItem, PopeItem, ShapesConfig, ShapesSummary, generate, read_level};
pub use phrasing::{captions, detailed_description, question_text, sentence_answer, short_answer};
pub use query::{Qa, Query, Ref, all_queries, answer};
pub use questions::{basic_questions, reasoning_questions, short_questions, yes_no_questions};
pub use scene::{
    COLORS, Level, Object, SHAPES, SHORT, SIZES, Scene, YES_NO, cell_name, random_scene, render,
};

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
        crate::util::files::write_json(&d.path().join("shapes.json"), &cfg).unwrap();
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
