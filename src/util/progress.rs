//! Progress bars: every long loop shows one, with its rate and ETA, on stderr.

/// A progress bar with rate and ETA on stderr (hidden when `show` is false), starting at
/// `pos` of `len`.
pub fn progress_bar(len: u64, pos: u64, show: bool, what: &str) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} ETA {{eta}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(pos);
    bar
}
