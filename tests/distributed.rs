//! Data-parallel training under `mpirun` (the `mpi` feature): two ranks equal one process
//! with the same global batch, resume works with another number of ranks, and a rank that
//! fails or dies ends the whole run. Built without the feature, or where `mpirun` is
//! missing, these tests print `skipped: …` (under CI=true a missing mpirun fails them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::common::{load_all, max_abs, workspace};

fn mpirun() -> Option<PathBuf> {
    if !cfg!(feature = "mpi") {
        eprintln!("skipped: built without the `mpi` feature (.ci/run runs these with it)");
        return None;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mpirun"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mpirun is missing (Debian: openmpi-bin)"
        );
        eprintln!("skipped: no mpirun on PATH (Debian: openmpi-bin)");
    }
    found
}

fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--threads",
        "1",
        "train",
        "--method",
        "ln",
        "--batch",
        "4",
        "--template",
        "chatml",
        "--lr",
        "1e-3",
        "--quiet",
        "--model",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(model.display().to_string());
    a.push("--data".into());
    a.push(data.join("conversation_train.json").display().to_string());
    a.push("--images".into());
    a.push(data.join("images").display().to_string());
    a.push("--out".into());
    a.push(out.display().to_string());
    if !extra.contains(&"--steps") {
        a.extend(["--steps".to_string(), "6".to_string()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run_ranks(mpirun: &Path, ranks: usize, args: &[String]) -> Output {
    let mut c = if ranks == 1 {
        Command::new(env!("CARGO_BIN_EXE_lntune"))
    } else {
        let mut c = Command::new(mpirun);
        c.args(["--oversubscribe", "-np", &ranks.to_string()])
            .arg(env!("CARGO_BIN_EXE_lntune"));
        c
    };
    c.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap()
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Largest difference of the adapters' tensors (both must hold the same names).
fn adapter_gap(a: &Path, b: &Path) -> f64 {
    let (a, b) = (
        load_all(&a.join("adapter/adapter.safetensors")),
        load_all(&b.join("adapter/adapter.safetensors")),
    );
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    assert_eq!(names.len(), b.len());
    names
        .iter()
        .map(|n| max_abs(&a[*n], &b[*n]))
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_train_as_one_process_and_resume_with_another_count() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = workspace(dir.path());
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let out = run_ranks(&mpirun, 1, &train_args(&model, &data, &one, &[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_ranks(
        &mpirun,
        2,
        &train_args(&model, &data, &two, &["--save-every", "3"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // rank 0 alone reports
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.matches("trained 6 steps").count(), 1, "{said}");
    // each rank read its half of every batch; the step's token count is the whole batch's
    let tokens = |run: &Path, key: &str| -> u64 {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    let whole = tokens(&one, "tokens");
    assert_eq!(tokens(&two, "tokens"), whole);
    let rank0 = tokens(&two, "rank0_tokens");
    assert!(
        rank0 > 0 && 4 * rank0 < 3 * whole,
        "rank 0 read {rank0} of {whole} tokens"
    );
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 6);
    assert_eq!(
        l2.len(),
        6,
        "one metrics line per step, written by rank 0 alone"
    );
    for (s, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: {a} vs {b}");
    }
    // the same gradients up to summation order: the adapters agree closely
    let gap = adapter_gap(&one, &two);
    assert!(gap < 1e-5, "adapters differ by {gap}");
    // the 2-rank run's step-3 checkpoint, resumed by one process
    let resumed = dir.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let args = train_args(
        &model,
        &data,
        &resumed,
        &["--resume", two.to_str().unwrap()],
    );
    let out = run_ranks(&mpirun, 1, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gap = adapter_gap(&one, &resumed);
    assert!(gap < 1e-5, "resumed with 1 rank: adapters differ by {gap}");
}

#[test]
fn a_failing_or_dying_rank_ends_every_rank() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = workspace(dir.path());
    // rank 0 cannot write its --out (a file is in the way); rank 1 would wait in the first
    // all-reduce forever without the abort
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "not a folder").unwrap();
    let t = Instant::now();
    let out = run_ranks(&mpirun, 2, &train_args(&model, &data, &blocked, &[]));
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: rank 0 of 2:"), "{err}");
    // a rank killed mid-run: mpirun ends the others and fails
    let killed = dir.path().join("killed");
    let args = train_args(
        &model,
        &data,
        &killed,
        &["--steps", "100000", "--save-every", "2"],
    );
    let mut child = Command::new(&mpirun)
        .args(["--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_lntune"))
        .args(&args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait for training to be under way (rank 0 has written a checkpoint)
    let t = Instant::now();
    while !killed.join("checkpoints").exists() {
        if let Some(s) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the run ended before its first checkpoint ({s}): {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = rank_pid(child.id(), 1).expect("rank 1's process");
    let _ = Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the run outlived its rank by a minute"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    // every checkpoint left is complete (written atomically): resume would trust only those
    for e in std::fs::read_dir(killed.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("step-")
        {
            assert!(p.join("adapter.safetensors").is_file(), "{}", p.display());
            assert!(p.join("optimizer.safetensors").is_file(), "{}", p.display());
        }
    }
}

/// The pid of the lntune process of `rank` under the mpirun with pid `launcher` (OpenMPI
/// sets OMPI_COMM_WORLD_RANK in each rank's environment).
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let is_rank = env.split(|&b| b == 0).any(|v| v == want.as_bytes());
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if is_rank && cmd.contains("lntune") && descends_from(pid, launcher) {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..16 {
        if pid == ancestor {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        pid = ppid;
    }
    false
}

#[test]
fn a_launcher_is_refused_by_a_build_without_mpi() {
    if cfg!(feature = "mpi") {
        eprintln!("skipped: this build has the `mpi` feature");
        return;
    }
    // what mpirun -np 2 would put in the environment of each rank
    let out = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["train", "--model", "x", "--data", "y", "--out", "z"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("2 ranks") && err.contains("`mpi` feature"),
        "{err}"
    );
}
