//! Faults: `lntune train` and `lntune eval` killed with SIGKILL at random points (a bounded
//! number of times, the points drawn from a fixed seed over the length of an uninterrupted
//! run) and restarted until they finish must end where an uninterrupted run ends: the same
//! losses and a bit-identical adapter, the same predictions and scores. Also two real
//! `lntune` processes writing one folder.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lntune::util::rng::Rng;

use crate::common::*;

/// Interrupted runs per test; each is killed up to twice.
const TRIALS: usize = 5;

/// Starts `cmd`, kills it with SIGKILL after `after` unless it ended first; returns whether
/// it ended by itself with success.
fn run_and_kill(mut cmd: Command, after: Duration) -> bool {
    let mut child: Child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < after {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    status.success()
}

/// Starts a fresh run in `out` (what `cmd` makes) and kills it at `after`; where the run
/// ends by itself before that (a machine faster than the reference run, or less loaded),
/// the folder is removed and the kill comes at half the time, so that every trial is
/// interrupted at least once. Returns the time of the kill.
fn kill_a_fresh_run(out: &Path, mut cmd: impl FnMut() -> Command, mut after: Duration) -> Duration {
    for _ in 0..12 {
        if !run_and_kill(cmd(), after) {
            return after;
        }
        std::fs::remove_dir_all(out).unwrap();
        after /= 2;
    }
    panic!(
        "{} finished every time, even when killed after {after:?}",
        out.display()
    );
}

/// Files and folders an interrupted atomic write leaves (`.x.tmp-PID`, `.x.new-PID`,
/// `.x.old-PID`), anywhere under `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if [".tmp-", ".new-", ".old-"].iter().any(|k| name.contains(k)) {
                found.push(e.path().display().to_string());
            }
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    found
}

#[test]
fn training_killed_at_random_points_ends_as_an_uninterrupted_run() {
    let t = TinyRun::new();
    let data = format!(
        "{},{}",
        t.path("data/conversation_train.json").display(),
        t.path("data/captions_train.json").display()
    );
    let args = [
        "--data",
        data.as_str(),
        "--method",
        "lora",
        "--steps",
        "12",
        "--save-every",
        "2",
        "--lora-dropout",
        "0.1",
    ];
    let start = Instant::now();
    let (ok, err) = t.train("ref", &args);
    assert!(ok, "{err}");
    let whole = start.elapsed();

    // each trial starts a fresh run, kills it at a random point, kills the restarted one
    // at another, and lets the third finish
    let mut rng = Rng::new(12);
    let mut kills = 0;
    for trial in 0..TRIALS {
        let name = format!("killed-{trial}");
        let out = t.path(&name);
        let out_s = out.display().to_string();
        // what a user does after a kill: resume when the run has a checkpoint, else start over
        let next_args = || -> Vec<String> {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            if lntune::train::checkpoint::latest_checkpoint(&out).is_ok() {
                a.extend(["--resume".into(), out_s.clone()]);
            } else {
                a.push("--overwrite".into());
            }
            a
        };
        let mut finished = false;
        for attempt in 0..2 {
            let a = next_args();
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            let mut after = whole.mul_f64(rng.uniform());
            if attempt == 0 {
                after = kill_a_fresh_run(&out, || t.train_command(&name, &a), after);
            } else if run_and_kill(t.train_command(&name, &a), after) {
                finished = true;
                break;
            }
            kills += 1;
            eprintln!(
                "trial {trial}: killed after {after:?} of {whole:?}; newest checkpoint: {:?}",
                lntune::train::checkpoint::latest_checkpoint(&out)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            );
        }
        if !finished {
            let a = next_args();
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            let (ok, err) = t.train(&name, &a);
            assert!(ok, "trial {trial}: {err}");
        }
        same_run(&t.path("ref"), &out);
    }
    assert!(kills >= TRIALS, "only {kills} runs were killed");
}

/// The losses and adapter of two training runs are equal, and `b` holds no leftovers of
/// an interrupted write.
fn same_run(a_dir: &Path, b_dir: &Path) {
    let (a, b) = (
        metrics(&a_dir.join("metrics.jsonl")),
        metrics(&b_dir.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), b.len(), "metrics lines");
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "loss", "grad_norm", "lr"] {
            assert_eq!(x[k], y[k], "{k} at step {}", x["step"]);
        }
    }
    let (ta, tb) = (
        load_all(&a_dir.join("adapter/adapter.safetensors")),
        load_all(&b_dir.join("adapter/adapter.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for (k, v) in &ta {
        assert_eq!(max_abs(v, &tb[k]), 0.0, "{k}");
    }
    assert_eq!(leftovers(b_dir), Vec::<String>::new());
}

fn predictions(path: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn evaluation_killed_at_random_points_ends_as_an_uninterrupted_one() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("run", &["--data", &data, "--steps", "2", "--lr", "1e-2"]);
    assert!(ok, "{err}");
    let start = Instant::now();
    let o = t.eval_command("ref", &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let whole = start.elapsed();

    let mut rng = Rng::new(13);
    let mut kills = 0;
    for trial in 0..TRIALS {
        let name = format!("killed-{trial}");
        for attempt in 0..2 {
            let mut after = whole.mul_f64(rng.uniform());
            if attempt == 0 {
                let out = t.path(&name);
                after = kill_a_fresh_run(&out, || t.eval_command(&name, &[]), after);
            } else if run_and_kill(t.eval_command(&name, &[]), after) {
                break;
            }
            kills += 1;
            let answered = std::fs::read_to_string(t.path(&name).join("predictions.jsonl"))
                .map_or(0, |s| s.lines().count());
            eprintln!(
                "trial {trial}: killed after {after:?} of {whole:?}; {answered} lines of predictions"
            );
        }
        // the same command again finishes what is left
        let o = t.eval_command(&name, &[]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        same_evaluation(&t.path("ref"), &t.path(&name));
    }
    assert!(kills >= TRIALS, "only {kills} runs were killed");
}

/// The scores and predictions of two evaluations are equal, every question answered once,
/// and `b` holds no leftovers of an interrupted write.
fn same_evaluation(a_dir: &Path, b_dir: &Path) {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read(&b_dir.join("scores.json")),
        read(&a_dir.join("scores.json"))
    );
    let (a, b) = (
        predictions(&a_dir.join("predictions.jsonl")),
        predictions(&b_dir.join("predictions.jsonl")),
    );
    assert_eq!(a, b);
    // every prediction once: a line answered twice would show up as a longer file
    let lines = std::fs::read_to_string(b_dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, a.len());
    assert_eq!(leftovers(b_dir), Vec::<String>::new());
}

#[test]
fn a_second_lntune_writing_the_same_folder_is_refused_and_named() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("run", &["--data", &data, "--steps", "1"]);
    assert!(ok, "{err}");
    // a run long enough to be running when the second one starts
    let mut first = t
        .train_command("a", &["--data", &data, "--steps", "100000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = t.path("a/.lntune.lock");
    let start = Instant::now();
    let running = || {
        std::fs::read_to_string(&lock).is_ok_and(|s| !s.is_empty())
            && t.path("a/config.json").exists()
    };
    while !running() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2", "--overwrite"]);
    let (ok_eval, eval_err) = {
        let o = t.eval_command("a", &[]).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let pid = first.id();
    let _ = first.kill();
    let _ = first.wait();
    for (ok, err) in [(ok, err), (ok_eval, eval_err)] {
        assert!(
            !ok && err.contains("another lntune process is writing here")
                && err.contains(&format!("pid {pid}: ")),
            "{err}"
        );
    }
    // the refused --overwrite removed nothing of the running one's
    assert!(t.path("a/config.json").exists());
}

/// The size in bytes of everything under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// `cmd` as one shell word list.
fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_full_disk_stops_training_with_an_error_and_resume_ends_as_an_uninterrupted_run() {
    // a small disk of its own: a tmpfs in a private mount namespace
    let can_mount = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can_mount {
        eprintln!("skipped: cannot mount a tmpfs in a private namespace (`unshare -rm`)");
        return;
    }
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let args = [
        "--data",
        data.as_str(),
        "--method",
        "full",
        "--steps",
        "6",
        "--save-every",
        "1",
    ];
    let (ok, err) = t.train("ref", &args);
    assert!(ok, "{err}");
    let whole = du(&t.path("ref"));
    let mnt = t.path("disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let inner = format!("{}/run", mnt.display());
    let first = shell_line(&t.train_command("x", &args)).replace(
        &format!("'{}'", t.path("x").display()),
        &format!("'{inner}'"),
    );
    let mut resume = t.train_command("x", &args);
    resume.args(["--resume", &inner]);
    let resume = shell_line(&resume).replace(
        &format!("'{}'", t.path("x").display()),
        &format!("'{inner}'"),
    );
    // the disk holds about half of what the run writes; then it is made larger
    let script = format!(
        "mount -t tmpfs -o size={}k tmpfs '{m}' || exit 9
         {first} 2> '{log}/first.err'; echo $? > '{log}/first.rc'
         mount -o remount,size=64m '{m}' || exit 9
         {resume} 2> '{log}/resume.err'; echo $? > '{log}/resume.rc'
         cp -a '{inner}' '{log}/out'",
        whole / 2 / 1024,
        m = mnt.display(),
        log = t.path("").display(),
    );
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |name: &str| std::fs::read_to_string(t.path(name)).unwrap();
    let first_err = read("first.err");
    assert_eq!(read("first.rc").trim(), "1", "{first_err}");
    assert!(!first_err.contains("panicked"), "{first_err}");
    let last = first_err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: ")
            && last.contains("No space left on device")
            && last.contains(&inner),
        "{first_err}"
    );
    eprintln!("{first_err}");
    let resume_err = read("resume.err");
    eprintln!("{resume_err}");
    assert_eq!(read("resume.rc").trim(), "0", "{resume_err}");
    assert!(resume_err.contains("resuming from"), "{resume_err}");
    same_run(&t.path("ref"), &t.path("out"));
}
