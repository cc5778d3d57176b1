//! Small utilities the whole crate uses and that use nothing of it: file helpers (JSON,
//! atomic writes), progress bars, process facts, plots, the deterministic RNG, and a few
//! number and name helpers.

pub mod checks;
pub mod device;
pub mod dist;
pub mod files;
pub mod gpu;
pub mod heap;
pub mod plot;
pub mod process;
pub mod profile;
pub mod progress;
pub mod rng;
pub mod tensorboard;

/// The median of `v` (mean of the middle two for an even count), NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A name made safe as a file name: ASCII letters, digits, `-`, `_` and `.` kept, anything
/// else `_`.
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `NAME=PATH`, or a bare `PATH` named after its last component that is not `adapter`.
pub fn named_path(spec: &str) -> (String, std::path::PathBuf) {
    use std::path::PathBuf;
    match spec.split_once('=') {
        Some((n, p)) if !n.contains('/') => (n.to_string(), PathBuf::from(p)),
        _ => {
            let p = PathBuf::from(spec);
            let name = p
                .components()
                .rev()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .find(|c| c != "adapter" && !c.is_empty())
                .unwrap_or_else(|| spec.to_string());
            (name, p)
        }
    }
}

/// A count with thousands separators: 1234567 -> "1,234,567".
pub fn commas(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_by_hand() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(file_safe("ln + connector"), "ln___connector");
        assert_eq!(named_path("a=runs/x").0, "a");
        assert_eq!(named_path("runs/x/adapter").0, "x");
        assert_eq!(commas(1234567), "1,234,567");
        assert_eq!(commas(12), "12");
    }
}
