//! Every metric against the official scorers' outputs (tests/fixtures/metrics, copied from
//! ../shared/metrics with its README).

use std::collections::BTreeMap;

use lntune::eval::metrics::*;

use crate::common::fixture;

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("metrics/{name}"))).unwrap())
        .unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn vqa_accuracy_equals_vqaeval() {
    let d = json("vqa.json");
    let mut sum = 0.0;
    let mut sum_evalai = 0.0;
    let cases = d["cases"].as_array().unwrap();
    for c in cases {
        let gts: Vec<String> = c["gt_answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        let pred = c["pred"].as_str().unwrap();
        let acc = vqa_accuracy(pred, &gts);
        assert!(
            close(acc, c["accuracy"].as_f64().unwrap(), 1e-12),
            "{c}: got {acc}"
        );
        let processed = evalai_process(pred);
        assert_eq!(processed, c["evalai_processed"].as_str().unwrap(), "{c}");
        let acc2 = vqa_accuracy(&processed, &gts);
        assert!(
            close(acc2, c["accuracy_after_evalai"].as_f64().unwrap(), 1e-12),
            "{c}: evalai {acc2}"
        );
        sum += acc;
        sum_evalai += acc2;
    }
    let n = cases.len() as f64;
    assert_eq!(
        ((100.0 * sum / n) * 100.0).round() / 100.0,
        d["overall_accuracy"].as_f64().unwrap()
    );
    assert_eq!(
        ((100.0 * sum_evalai / n) * 100.0).round() / 100.0,
        d["overall_accuracy_after_evalai"].as_f64().unwrap()
    );
    for e in d["evalai_processor_extra"].as_array().unwrap() {
        assert_eq!(
            evalai_process(e["raw"].as_str().unwrap()),
            e["evalai_processed"].as_str().unwrap(),
            "{e}"
        );
    }
}

#[test]
fn pope_equals_eval_pope() {
    let d = json("pope.json");
    for s in d["splits"].as_array().unwrap() {
        let qs = s["questions"].as_array().unwrap();
        let labels: Vec<&str> = qs.iter().map(|q| q["label"].as_str().unwrap()).collect();
        let preds: Vec<bool> = qs
            .iter()
            .map(|q| pope_parse(q["answer"].as_str().unwrap()))
            .collect();
        for (q, p) in qs.iter().zip(&preds) {
            assert_eq!(
                if *p { "yes" } else { "no" },
                q["parsed"].as_str().unwrap(),
                "{q}"
            );
        }
        let m = pope_metrics(&labels, &preds);
        let e = &s["expected"];
        assert_eq!(
            (m.tp, m.fp, m.tn, m.fn_),
            (
                e["TP"].as_u64().unwrap() as usize,
                e["FP"].as_u64().unwrap() as usize,
                e["TN"].as_u64().unwrap() as usize,
                e["FN"].as_u64().unwrap() as usize
            )
        );
        for (got, key) in [
            (m.accuracy, "accuracy"),
            (m.precision, "precision"),
            (m.recall, "recall"),
            (m.f1, "f1"),
            (m.yes_ratio, "yes_ratio"),
        ] {
            assert!(
                close(got, e[key].as_f64().unwrap(), 1e-12),
                "{key}: {got} vs {}",
                e[key]
            );
        }
    }
}

#[test]
fn mme_equals_calculation_py() {
    let d = json("mme.json");
    let mut scores = BTreeMap::new();
    for t in d["subtasks"].as_array().unwrap() {
        let qs = t["questions"].as_array().unwrap();
        for q in qs {
            assert_eq!(
                mme_parse(q["pred"].as_str().unwrap()),
                q["parsed"].as_str().unwrap(),
                "{q}"
            );
        }
        let items: Vec<(&str, &str)> = qs
            .iter()
            .map(|q| (q["gt"].as_str().unwrap(), q["pred"].as_str().unwrap()))
            .collect();
        let s = mme_subtask(&items);
        let e = &t["expected"];
        assert!(close(s.acc, e["acc"].as_f64().unwrap(), 1e-12));
        assert!(close(s.acc_plus, e["acc_plus"].as_f64().unwrap(), 1e-12));
        assert!(
            close(s.score, e["score"].as_f64().unwrap(), 1e-12),
            "{} {}",
            s.score,
            e["score"]
        );
        assert_eq!(s.other, e["other_num"].as_u64().unwrap() as usize);
        assert_eq!(
            mme_eval_type(t["task"].as_str().unwrap()),
            Some(t["eval_type"].as_str().unwrap())
        );
        scores.insert(t["task"].as_str().unwrap().to_string(), s);
    }
    let totals = mme_totals(&scores, false);
    for (k, v) in d["totals"].as_object().unwrap() {
        assert!(close(totals[k], v.as_f64().unwrap(), 1e-12), "{k}");
    }
}

#[test]
fn captions_equal_pycocoevalcap() {
    let d = json("cider_bleu.json");
    let images = d["images"].as_array().unwrap();
    let mut refs = Vec::new();
    let mut hyps = Vec::new();
    for im in images {
        let raw_refs = im["references"].as_array().unwrap();
        let tok_refs = im["references_tokenized"].as_array().unwrap();
        for (r, t) in raw_refs.iter().zip(tok_refs) {
            assert_eq!(ptb_tokenize(r.as_str().unwrap()), t.as_str().unwrap());
        }
        assert_eq!(
            ptb_tokenize(im["candidate"].as_str().unwrap()),
            im["candidate_tokenized"].as_str().unwrap()
        );
        refs.push(
            tok_refs
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        );
        hyps.push(im["candidate_tokenized"].as_str().unwrap().to_string());
    }
    let (c, per) = cider_d(&refs, &hyps);
    let (b, per_b) = bleu(&refs, &hyps);
    for (i, im) in images.iter().enumerate() {
        assert!(
            close(per[i], im["cider"].as_f64().unwrap(), 1e-6),
            "image {i} cider {} vs {}",
            per[i],
            im["cider"]
        );
        for k in 0..4 {
            assert!(
                close(per_b[i][k], im["bleu"][k].as_f64().unwrap(), 1e-6),
                "image {i} bleu-{}",
                k + 1
            );
        }
    }
    assert!(close(c, d["corpus"]["cider"].as_f64().unwrap(), 1e-6));
    for k in 0..4 {
        assert!(
            close(b[k], d["corpus"]["bleu"][k].as_f64().unwrap(), 1e-6),
            "corpus bleu-{}",
            k + 1
        );
    }
}

#[test]
fn ptb_rules_from_the_scorer_notes() {
    // cases documented in tests/fixtures/metrics/README.md (PTBTokenizer behaviour)
    for (raw, tok) in [
        ("The dog's toy", "the dog 's toy"),
        ("It isn't", "it is n't"),
        ("I can't", "i ca n't"),
        ("They won't go", "they wo n't go"),
        ("they're here", "they 're here"),
        ("I cannot", "i can not"),
        ("gonna win", "gon na win"),
        ("a 12-inch double-decker", "a 12-inch double-decker"),
        ("costs $3.50", "costs $ 3.50"),
        ("about 50% off", "about 50 % off"),
        ("1,000 people", "1,000 people"),
        ("black/white cat", "black/white cat"),
        ("salt & pepper", "salt & pepper"),
        ("St. Louis", "st. louis"),
        ("in the U.S.", "in the u.s."),
        ("A.", "a."),
        ("wait -- what", "wait what"),
    ] {
        assert_eq!(ptb_tokenize(raw), tok, "{raw}");
    }
}
