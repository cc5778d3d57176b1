//! Checks of numbers at the boundary (flags, config fields), each error one line naming
//! the flag or field and the value.

use anyhow::{Result, bail};

/// `value` must be at least 1.
pub fn positive(name: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{name} must be positive, got 0");
    }
    Ok(())
}

/// `value`, when given, must be at least 1.
pub fn positive_if_set(name: &str, value: Option<usize>) -> Result<()> {
    value.map_or(Ok(()), |v| positive(name, v))
}

/// `value` must be a finite number above 0.
pub fn finite_positive(name: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{name} must be a finite number above 0, got {value}");
    }
    Ok(())
}

/// `value` must be a finite number in `[lo, hi]`.
pub fn within(name: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if !(value.is_finite() && (lo..=hi).contains(&value)) {
        bail!("{name} must be between {lo} and {hi}, got {value}");
    }
    Ok(())
}

/// `value` must be at most `max` (sizes that would allocate more than any real model).
pub fn at_most(name: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        bail!("{name} is {value}; at most {max} is supported");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_value() {
        assert!(positive("--batch", 1).is_ok());
        assert_eq!(
            positive("--batch", 0).unwrap_err().to_string(),
            "--batch must be positive, got 0"
        );
        assert!(finite_positive("--lr", f64::NAN).is_err());
        assert!(finite_positive("--lr", -1e-3).is_err());
        assert!(finite_positive("--lr", 1e-3).is_ok());
        assert!(within("--warmup-ratio", 1.5, 0.0, 1.0).is_err());
        assert!(within("--warmup-ratio", f64::INFINITY, 0.0, 1.0).is_err());
        assert!(within("--warmup-ratio", 0.0, 0.0, 1.0).is_ok());
        assert!(at_most("`num_hidden_layers`", 5000, 4096).is_err());
        assert!(positive_if_set("--steps", None).is_ok());
        assert!(positive_if_set("--steps", Some(0)).is_err());
    }
}
