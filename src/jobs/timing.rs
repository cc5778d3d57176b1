//! `lntune bench`: each method's training steps timed in its own child process (`lntune
//! bench --child`, the timing config on stdin), so that peak RSS is per method.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::methods::Method;
use crate::train::timing::{StepTiming, TimingConfig};
use crate::util::device::DeviceChoice;

/// Times `base` with each of `methods` in a child process of this executable; `on_result`
/// sees each timing as its child finishes.
pub fn time_methods(
    base: &TimingConfig,
    methods: &[Method],
    threads: Option<usize>,
    device: DeviceChoice,
    mut on_result: impl FnMut(&StepTiming),
) -> Result<Vec<StepTiming>> {
    base.validate()?;
    let exe = std::env::current_exe().context("cannot find the lntune executable")?;
    let mut out = Vec::new();
    for &m in methods {
        let cfg = TimingConfig {
            method: m,
            ..base.clone()
        };
        let mut cmd = Command::new(&exe);
        if let Some(t) = threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        let mut child = cmd
            .args(["bench", "--child", "--device", &device.name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run the benchmark child process")?;
        child
            .stdin
            .take()
            .context("child stdin")?
            .write_all(serde_json::to_string(&cfg)?.as_bytes())?;
        let output = child
            .wait_with_output()
            .context("benchmark child process")?;
        if !output.status.success() {
            // the child's own one-line error, or what its stderr ended with
            let err = String::from_utf8_lossy(&output.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!(
                "bench {}: {}",
                m.name(),
                last.strip_prefix("error: ").unwrap_or(last).trim()
            );
        }
        let line = String::from_utf8_lossy(&output.stdout);
        let r: StepTiming = serde_json::from_str(line.trim()).context("benchmark child output")?;
        on_result(&r);
        out.push(r);
    }
    Ok(out)
}
