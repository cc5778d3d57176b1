//! The benchmark metrics, scored the way the official tools score them:
//! - VQAv2 accuracy (GT-Vision-Lab `vqaEval.py` @ a013f00) and LLaVA's EvalAI answer
//!   processor (`m4c_evaluator.py`);
//! - POPE (LLaVA `eval_pope.py`): answer parsing, accuracy, precision, recall, F1, yes-ratio;
//! - MME (`eval_tool/calculation.py`): answer parsing, acc, acc+, score per subtask, totals;
//! - captions (pycocoevalcap 1.2): a PTB-style tokenizer, BLEU-1..4 and CIDEr-D.
//!
//! Every function is checked against the official scorers' outputs in tests/metrics.rs.

use std::collections::{BTreeMap, HashMap, HashSet};

// ---------------------------------------------------------------------------------------
// VQAv2

const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

const NUMBER_MAP: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const PUNCT: &[char] = &[
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `(\d)(,)(\d)` somewhere in the text.
fn has_digit_comma_digit(s: &str) -> bool {
    let c: Vec<char> = s.chars().collect();
    c.windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit())
}

/// `re.sub("(?!<=\d)(\.)(?!\d)", "", s, count=32)`: removes up to 32 periods that are not
/// followed by a digit (the "lookbehind" is a lookahead typo in the official code).
fn period_strip(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut removed = 0;
    for (i, &ch) in c.iter().enumerate() {
        let next_digit = c.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if ch == '.' && !next_digit && removed < 32 {
            removed += 1;
            continue;
        }
        out.push(ch);
    }
    out
}

/// vqaEval `processPunctuation`.
pub fn process_punctuation(text: &str) -> String {
    let mut out = text.to_string();
    let comma = has_digit_comma_digit(text);
    for &p in PUNCT {
        let (ps, sp) = (format!("{p} "), format!(" {p}"));
        if text.contains(&ps) || text.contains(&sp) || comma {
            out = out.replace(p, "");
        } else {
            out = out.replace(p, " ");
        }
    }
    period_strip(&out)
}

/// vqaEval `processDigitArticle`.
pub fn process_digit_article(text: &str) -> String {
    let numbers: HashMap<&str, &str> = NUMBER_MAP.iter().copied().collect();
    let contractions: HashMap<&str, &str> = CONTRACTIONS.iter().copied().collect();
    let lower = text.to_lowercase();
    let words: Vec<String> = lower
        .split_whitespace()
        .map(|w| numbers.get(w).copied().unwrap_or(w).to_string())
        .filter(|w| !matches!(w.as_str(), "a" | "an" | "the"))
        .map(|w| {
            contractions
                .get(w.as_str())
                .map(|s| s.to_string())
                .unwrap_or(w)
        })
        .collect();
    words.join(" ")
}

fn clean_ws(s: &str) -> String {
    s.replace(['\n', '\t'], " ").trim().to_string()
}

/// Per-question VQA accuracy: mean over the 10 leave-one-out subsets of
/// min(1, matches / 3). Normalization applies to prediction and answers only when the
/// answers are not all identical (the official branch).
pub fn vqa_accuracy(pred: &str, gt_answers: &[String]) -> f64 {
    let mut gts: Vec<String> = gt_answers.iter().map(|a| clean_ws(a)).collect();
    let mut res = clean_ws(pred);
    let distinct: HashSet<&String> = gts.iter().collect();
    if distinct.len() > 1 {
        gts = gts
            .iter()
            .map(|a| process_digit_article(&process_punctuation(a)))
            .collect();
        res = process_digit_article(&process_punctuation(&res));
    }
    let n = gts.len();
    if n == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for i in 0..n {
        let matches = (0..n).filter(|&j| j != i && gts[j] == res).count();
        total += (matches as f64 / 3.0).min(1.0);
    }
    total / n as f64
}

/// LLaVA's `EvalAIAnswerProcessor` (what LLaVA submits for VQAv2).
pub fn evalai_process(answer: &str) -> String {
    let s = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let s = s.trim().replace(['\n', '\t'], " ");
    let s = s.trim();
    // commas are already gone, so the digit-comma rule never fires here
    let mut out = s.to_string();
    for &p in PUNCT {
        let (ps, sp) = (format!("{p} "), format!(" {p}"));
        if s.contains(&ps) || s.contains(&sp) {
            out = out.replace(p, "");
        } else {
            out = out.replace(p, " ");
        }
    }
    process_digit_article(&period_strip(&out))
}

// ---------------------------------------------------------------------------------------
// POPE

/// LLaVA `eval_pope.py`: the first sentence, commas removed, split on single spaces; "no" iff
/// a word is exactly `No`, `not` or `no`. Returns true for yes.
pub fn pope_parse(text: &str) -> bool {
    let first = match text.find('.') {
        Some(i) => &text[..i],
        None => text,
    };
    let t = first.replace(',', "");
    !t.split(' ').any(|w| w == "No" || w == "not" || w == "no")
}

/// Undefined ratios are NaN, which JSON writes as null: read back as NaN, so that the
/// scores of a run answering "no" to everything load again.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PopeMetrics {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub accuracy: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub precision: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub recall: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub f1: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub yes_ratio: f64,
}

/// An f64 that may be null (a NaN written by serde_json).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Metrics of predictions against labels (`label == "no"` is negative, anything else
/// positive). Undefined ratios (0/0) are NaN.
pub fn pope_metrics(labels: &[&str], pred_yes: &[bool]) -> PopeMetrics {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (l, &p) in labels.iter().zip(pred_yes) {
        let pos = *l != "no";
        match (p, pos) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let div = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let precision = div(tp, tp + fp);
    let recall = div(tp, tp + fn_);
    let n = labels.len();
    PopeMetrics {
        tp,
        fp,
        tn,
        fn_,
        accuracy: div(tp + tn, n),
        precision,
        recall,
        f1: 2.0 * precision * recall / (precision + recall),
        yes_ratio: div(tp + fp, n),
    }
}

// ---------------------------------------------------------------------------------------
// MME

/// MME `parse_pred_ans`: exact yes/no, else "yes"/"no" within the first 4 characters, else
/// other (counted wrong). Returns "yes", "no" or "other".
pub fn mme_parse(pred: &str) -> &'static str {
    let p = pred.to_lowercase();
    let p = p.trim_end_matches('\n');
    if p == "yes" {
        return "yes";
    }
    if p == "no" {
        return "no";
    }
    let prefix: String = p.chars().take(4).collect();
    if prefix.contains("yes") {
        "yes"
    } else if prefix.contains("no") {
        "no"
    } else {
        "other"
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MmeScore {
    pub acc: f64,
    pub acc_plus: f64,
    pub score: f64,
    pub other: usize,
}

/// One subtask: (gt, pred) in consecutive pairs per image.
pub fn mme_subtask(items: &[(&str, &str)]) -> MmeScore {
    let n = items.len();
    let correct: Vec<bool> = items
        .iter()
        .map(|(gt, p)| gt.to_lowercase() == mme_parse(p))
        .collect();
    let acc = correct.iter().filter(|&&c| c).count() as f64 / n.max(1) as f64;
    let pairs: Vec<&[bool]> = correct.chunks(2).collect();
    let acc_plus = pairs
        .iter()
        .filter(|p| p.iter().all(|&c| c) && p.len() == 2)
        .count() as f64
        / pairs.len().max(1) as f64;
    MmeScore {
        acc,
        acc_plus,
        score: acc * 100.0 + acc_plus * 100.0,
        other: items
            .iter()
            .filter(|(_, p)| mme_parse(p) == "other")
            .count(),
    }
}

/// MME's split of subtasks into perception and cognition (`calculation.py` eval_type_dict).
pub fn mme_eval_type(task: &str) -> Option<&'static str> {
    const PERCEPTION: [&str; 10] = [
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ];
    const COGNITION: [&str; 4] = [
        "commonsense_reasoning",
        "numerical_calculation",
        "text_translation",
        "code_reasoning",
    ];
    if PERCEPTION.contains(&task) {
        Some("Perception")
    } else if COGNITION.contains(&task) {
        Some("Cognition")
    } else {
        None
    }
}

/// Perception and cognition totals over the subtasks present; `without_landmark_artwork`
/// drops those two (the paper authors' harness).
pub fn mme_totals(
    scores: &BTreeMap<String, MmeScore>,
    without_landmark_artwork: bool,
) -> BTreeMap<String, f64> {
    let mut t = BTreeMap::new();
    for (task, s) in scores {
        if without_landmark_artwork && (task == "landmark" || task == "artwork") {
            continue;
        }
        if let Some(kind) = mme_eval_type(task) {
            *t.entry(kind.to_string()).or_insert(0.0) += s.score;
        }
    }
    t
}

// ---------------------------------------------------------------------------------------
// Captions: PTB tokenization, BLEU, CIDEr-D

/// Tokens the pycocoevalcap wrapper drops after PTB tokenization.
const PTB_DROP: &[&str] = &[
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Abbreviations whose final period PTBTokenizer keeps.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "mt", "vs", "etc", "inc", "co", "corp", "ltd",
    "prof", "gen", "ave", "blvd", "rd", "no", "fig", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec",
];

/// "U.S" / "e.g": single letters joined by periods.
fn is_initials(s: &str) -> bool {
    s.contains('.')
        && s.split('.')
            .all(|p| p.chars().count() == 1 && p.chars().all(|c| c.is_alphabetic()))
}

fn split_clitics(w: &str, out: &mut Vec<String>) {
    let lower = w.to_lowercase();
    // cannot -> can not, gonna -> gon na, gotta -> got ta, wanna -> wan na
    if ["cannot", "gonna", "gotta", "wanna"].contains(&lower.as_str()) {
        out.push(w[..3].to_string());
        out.push(w[3..].to_string());
        return;
    }
    if lower.ends_with("n't") && w.len() > 3 {
        let cut = w.len() - 3;
        out.push(w[..cut].to_string());
        out.push(w[cut..].to_string());
        return;
    }
    for suf in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
        if lower.ends_with(suf) && w.len() > suf.len() {
            let cut = w.len() - suf.len();
            out.push(w[..cut].to_string());
            out.push(w[cut..].to_string());
            return;
        }
    }
    out.push(w.to_string());
}

/// PTBTokenizer (`-preserveLines -lowerCase`) as pycocoevalcap runs it, followed by the
/// wrapper's punctuation filter: returns the space-joined tokens. Covers the rules captions
/// exercise (clitics, brackets, quotes, abbreviations, numbers, currency, percent, dashes,
/// ellipses); see tests/metrics.rs for the cases checked against the Java tokenizer.
pub fn ptb_tokenize(text: &str) -> String {
    let mut tokens: Vec<String> = Vec::new();
    let spaced = text.replace("...", " ... ").replace("--", " -- ");
    for raw in spaced.split_whitespace() {
        let mut w: &str = raw;
        let mut lead = Vec::new();
        let mut trail = Vec::new();
        // leading punctuation
        while let Some(c) = w.chars().next() {
            if matches!(c, '"' | '(' | '[' | '{' | '`' | '$' | '#')
                || (c == '\'' && w.len() > 1 && !w[1..].starts_with('s'))
            {
                lead.push(c.to_string());
                w = &w[c.len_utf8()..];
            } else {
                break;
            }
        }
        // trailing punctuation (a period stays on abbreviations and initials)
        while let Some(c) = w.chars().last() {
            let body = &w[..w.len() - c.len_utf8()];
            let keep_period = c == '.'
                && !body.is_empty()
                && (body.chars().count() == 1 && body.chars().all(|x| x.is_alphabetic())
                    || is_initials(body)
                    || ABBREVIATIONS.contains(&body.to_lowercase().as_str()));
            if matches!(
                c,
                '"' | ')' | ']' | '}' | ',' | ';' | ':' | '!' | '?' | '%' | '\''
            ) || (c == '.' && !keep_period)
            {
                trail.push(c.to_string());
                w = body;
            } else {
                break;
            }
        }
        tokens.extend(lead);
        if w == "..." || w == "--" {
            tokens.push(w.to_string());
        } else if !w.is_empty() {
            split_clitics(w, &mut tokens);
        }
        tokens.extend(trail.into_iter().rev());
    }
    let mapped: Vec<String> = tokens
        .into_iter()
        .map(|t| match t.as_str() {
            "(" => "-LRB-".to_string(),
            ")" => "-RRB-".to_string(),
            "[" => "-LSB-".to_string(),
            "]" => "-RSB-".to_string(),
            "{" => "-LCB-".to_string(),
            "}" => "-RCB-".to_string(),
            "\"" => "''".to_string(),
            _ => t,
        })
        .map(|t| t.to_lowercase())
        .collect();
    // the filter compares case-sensitively with the upper-case bracket names, so the
    // lower-cased -lrb-/-rrb- stay
    mapped
        .into_iter()
        .filter(|t| !PTB_DROP.contains(&t.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// n-gram counts, ordered so that sums over them (CIDEr's norms and dot products) add in the
/// same order in every process: the same captions give the same bits.
type Ngrams = BTreeMap<Vec<String>, usize>;

fn ngram_counts(s: &str, n: usize) -> (usize, Ngrams) {
    let words: Vec<String> = s.split_whitespace().map(String::from).collect();
    let mut c = BTreeMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *c.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    (words.len(), c)
}

/// BLEU-1..4 as pycocoevalcap's `Bleu(4)` (option `closest`): (corpus, per-image) scores.
/// `refs[i]` are image i's tokenized references, `hyps[i]` its tokenized candidate.
pub fn bleu(refs: &[Vec<String>], hyps: &[String]) -> ([f64; 4], Vec<[f64; 4]>) {
    const N: usize = 4;
    let (small, tiny) = (1e-9, 1e-15);
    let mut per = Vec::with_capacity(hyps.len());
    let (mut testlen_t, mut reflen_t) = (0usize, 0usize);
    let (mut guess_t, mut correct_t) = ([0usize; N], [0usize; N]);
    for (rs, h) in refs.iter().zip(hyps) {
        let mut maxcounts: Ngrams = BTreeMap::new();
        let mut reflens = Vec::new();
        for r in rs {
            let (l, c) = ngram_counts(r, N);
            reflens.push(l);
            for (g, k) in c {
                let e = maxcounts.entry(g).or_insert(0);
                *e = (*e).max(k);
            }
        }
        let (testlen, counts) = ngram_counts(h, N);
        let reflen = reflens
            .iter()
            .map(|&l| ((l as i64 - testlen as i64).abs(), l))
            .min()
            .map(|x| x.1)
            .unwrap_or(0);
        let guess: [usize; N] = std::array::from_fn(|k| (testlen + 1).saturating_sub(k + 1));
        let mut correct = [0usize; N];
        for (g, k) in &counts {
            correct[g.len() - 1] += (*k).min(maxcounts.get(g).copied().unwrap_or(0));
        }
        testlen_t += testlen;
        reflen_t += reflen;
        for k in 0..N {
            guess_t[k] += guess[k];
            correct_t[k] += correct[k];
        }
        let mut b = 1.0;
        let mut scores = [0.0; N];
        for k in 0..N {
            b *= (correct[k] as f64 + tiny) / (guess[k] as f64 + small);
            scores[k] = b.powf(1.0 / (k as f64 + 1.0));
        }
        let ratio = (testlen as f64 + tiny) / (reflen as f64 + small);
        if ratio < 1.0 {
            for s in scores.iter_mut() {
                *s *= (1.0 - 1.0 / ratio).exp();
            }
        }
        per.push(scores);
    }
    let mut corpus = [0.0; N];
    let mut b = 1.0;
    for k in 0..N {
        b *= (correct_t[k] as f64 + tiny) / (guess_t[k] as f64 + small);
        corpus[k] = b.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (testlen_t as f64 + tiny) / (reflen_t as f64 + small);
    if ratio < 1.0 {
        for s in corpus.iter_mut() {
            *s *= (1.0 - 1.0 / ratio).exp();
        }
    }
    (corpus, per)
}

/// CIDEr-D as pycocoevalcap's `Cider` (n 1..4, sigma 6, idf over this corpus's references,
/// clipped similarity, Gaussian length penalty on the bigram count, ×10): (mean, per-image).
pub fn cider_d(refs: &[Vec<String>], hyps: &[String]) -> (f64, Vec<f64>) {
    const N: usize = 4;
    let sigma = 6.0f64;
    let crefs: Vec<Vec<Ngrams>> = refs
        .iter()
        .map(|rs| rs.iter().map(|r| ngram_counts(r, N).1).collect())
        .collect();
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for rs in &crefs {
        let set: HashSet<&Vec<String>> = rs.iter().flat_map(|r| r.keys()).collect();
        for g in set {
            *df.entry(g.clone()).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (crefs.len() as f64).ln();
    let vec = |c: &Ngrams| {
        let mut v: Vec<BTreeMap<Vec<String>, f64>> = vec![BTreeMap::new(); N];
        let mut norm = [0.0f64; N];
        let mut length = 0usize;
        for (g, tf) in c {
            let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
            let n = g.len() - 1;
            let x = *tf as f64 * (ref_len - d);
            v[n].insert(g.clone(), x);
            norm[n] += x * x;
            if n == 1 {
                length += tf;
            }
        }
        (v, norm.map(f64::sqrt), length)
    };
    let mut scores = Vec::with_capacity(hyps.len());
    for (h, rs) in hyps.iter().zip(&crefs) {
        let (vh, nh, lh) = vec(&ngram_counts(h, N).1);
        let mut score = [0.0f64; N];
        for r in rs {
            let (vr, nr, lr) = vec(r);
            let delta = lh as f64 - lr as f64;
            for n in 0..N {
                let mut val = 0.0;
                for (g, x) in &vh[n] {
                    let y = vr[n].get(g).copied().unwrap_or(0.0);
                    val += x.min(y) * y;
                }
                if nh[n] != 0.0 && nr[n] != 0.0 {
                    val /= nh[n] * nr[n];
                }
                score[n] += val * (-(delta * delta) / (2.0 * sigma * sigma)).exp();
            }
        }
        let mean = score.iter().sum::<f64>() / N as f64;
        scores.push(mean / rs.len() as f64 * 10.0);
    }
    let m = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    (m, scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pope_metrics_of_an_all_no_run_survive_json() {
        // never "yes": precision 0/0 and f1 undefined, written as null, read back as NaN
        let m = pope_metrics(&["yes", "no", "yes", "no"], &[false; 4]);
        assert!(m.precision.is_nan() && m.f1.is_nan());
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"precision\":null"), "{text}");
        let back: PopeMetrics = serde_json::from_str(&text).unwrap();
        assert_eq!((back.tp, back.tn, back.fn_), (0, 2, 2));
        assert_eq!(
            (back.accuracy, back.recall, back.yes_ratio),
            (0.5, 0.0, 0.0)
        );
        assert!(back.precision.is_nan() && back.f1.is_nan());
    }
}
