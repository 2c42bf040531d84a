//! Data parallel under `mpirun` (`cargo test --features mpi --test mpi`; needs Open MPI's
//! `mpirun`, which `.ci/run` installs): N ranks train one model as one process trains it on the
//! same global batch, repeat bit for bit, stop together on a signal, fail together when a rank
//! dies, refuse to start when they disagree, and evaluate in shards that gather to the
//! one-process answer.

#![cfg_attr(not(feature = "mpi"), allow(dead_code, unused_imports))]

mod common;

use common::{log_lines, ok, s, snapshot};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A binary without the `mpi` feature refuses to run as one of several processes.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_binary_without_mpi_refuses_to_be_one_of_several_ranks() {
    let out = Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(["data", "synth", "--out", "/nonexistent/never-written"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
}

/// `mpirun` (`None` with a note outside CI when it is not installed; a failure under CI).
#[cfg(feature = "mpi")]
fn mpirun() -> Option<&'static str> {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        Command::new("mpirun")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found {
        return Some("mpirun");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
    }
    eprintln!("skipped: mpirun not found");
    None
}

/// The launch: `np` ranks on this machine, one thread each unless the args say otherwise.
#[cfg(feature = "mpi")]
fn launch(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_llara"))
    .args(args)
    .env("LLARA_LOG", "warn")
    // The tests run as root in CI's container.
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

#[cfg(feature = "mpi")]
fn run_np(np: usize, args: &[&str]) -> Output {
    launch(np, args).output().unwrap()
}

#[cfg(feature = "mpi")]
fn ok_np(np: usize, args: &[&str]) -> String {
    let out = run_np(np, args);
    assert!(
        out.status.success(),
        "mpirun -np {np} llara {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A small dataset and recommender, made once.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llara-mpi-fixture-{}", std::process::id()));
        let (data, sr) = (dir.join("data"), dir.join("sr"));
        ok(&[
            "data",
            "synth",
            "--users",
            "60",
            "--items",
            "40",
            "--candidates",
            "5",
            "--out",
            s(&data),
            "--force",
        ]);
        ok(&[
            "train-sr",
            "--data",
            s(&data),
            "--epochs",
            "2",
            "--hidden",
            "16",
            "--out",
            s(&sr),
            "--force",
        ]);
        (data, sr)
    })
}

/// `llara tune` on the fixture with the tiny backbone, LoRA dropout on (its masks must follow
/// the examples, not the ranks).
fn tune_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let (data, sr) = fixture();
    let mut v = vec![
        "tune",
        "--data",
        s(data),
        "--sr",
        s(sr),
        "--llm",
        "builtin:tiny",
        "--out",
        s(out),
        "--lr",
        "5e-3",
        "--valid-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--lora-dropout",
        "0.1",
        "--seed",
        "9",
        "--threads",
        "1",
        "--force",
    ];
    v.extend_from_slice(extra);
    v
}

/// Every file of the run folder but the log (compared by [`log_lines`]) and the lock.
fn files(run: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(run)
        .unwrap()
        .into_iter()
        .filter(|(f, _)| f != "train_log.jsonl" && f != "run.lock")
        .collect()
}

/// The tensors of a safetensors file, as f32.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every step's loss within `rel` of the other run's, the same tokens, and the adapter and
/// projector within `abs` (float summation order is all that differs).
fn close(a: &Path, b: &Path, rel: f64, abs: f32) {
    let (la, lb) = (log_lines(a), log_lines(b));
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        let (p, q) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (p - q).abs() <= rel * p.abs(),
            "step {}: loss {p} vs {q}",
            x["step"]
        );
        assert_eq!(x["tokens"], y["tokens"], "step {}", x["step"]);
        assert_eq!(x["hybrid"], y["hybrid"], "step {}", x["step"]);
    }
    for f in ["adapter/adapter_model.safetensors", "projector.safetensors"] {
        let (ta, tb) = (tensors(&a.join(f)), tensors(&b.join(f)));
        assert_eq!(ta.len(), tb.len());
        for ((n, x), (_, y)) in ta.iter().zip(&tb) {
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst <= abs, "{f} {n}: differs by {worst}");
        }
    }
}

/// The rank processes `mpirun` started (its children), by rank.
#[cfg(feature = "mpi")]
fn ranks_of(launcher: &Child, np: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut found: Vec<(usize, u32)> = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The parent's pid is the 2nd field after the command's closing parenthesis.
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            let ppid: u32 = after
                .split(' ')
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid != launcher.id() {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rank = env
                .split(|&b| b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK="))
                .and_then(|r| r.parse().ok());
            if let Some(r) = rank {
                found.push((r, pid));
            }
        }
        if found.len() == np {
            found.sort();
            return found.into_iter().map(|(_, p)| p).collect();
        }
        assert!(Instant::now() < deadline, "mpirun did not start {np} ranks");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the run has logged `n` steps (the signal handlers are in place by then).
fn wait_for_steps(run: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let lines = std::fs::read_to_string(run.join("train_log.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= n {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {n}"
        );
        assert!(Instant::now() < deadline, "no step {n} within 5 minutes");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(feature = "mpi")]
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

#[cfg(feature = "mpi")]
#[test]
fn two_ranks_of_batch_2_train_as_one_process_of_batch_4_and_repeat_bit_for_bit() {
    if mpirun().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    let steps = [
        "--epochs",
        "2",
        "--max-train-samples",
        "24",
        "--grad-accum",
        "2",
    ];
    // One process, batch 4 × grad-accum 2: global batch 8.
    ok(&tune_args(
        &one,
        &[&steps[..], &["--batch-size", "4"]].concat(),
    ));
    // Two ranks, batch 2 × grad-accum 2 × 2 ranks: the same global batch.
    let args2 = tune_args(&two, &[&steps[..], &["--batch-size", "2"]].concat());
    ok_np(2, &args2);
    close(&one, &two, 1e-5, 1e-5);
    let toml = std::fs::read_to_string(two.join("tune.toml")).unwrap();
    assert!(toml.contains("ranks = 2"), "{toml}");
    // Validation was sharded and gathered: the same results at every evaluation.
    let evals = |r: &Path| common::json(&r.join("metrics.json"))["evals"].clone();
    assert_eq!(evals(&one), evals(&two));
    assert!(!evals(&one).as_array().unwrap().is_empty());

    // A rerun on two ranks repeats every byte.
    let first = tmp.path().join("two-first");
    std::fs::rename(&two, &first).unwrap();
    ok_np(2, &args2);
    assert_eq!(log_lines(&first), log_lines(&two));
    assert!(
        files(&first) == files(&two),
        "a rerun changed the run folder"
    );

    // Sharded evaluation (both modes) gathers to exactly what one process computes.
    for mode in [
        &["--mode", "generate"][..],
        &["--mode", "score", "--batch-size", "2"],
    ] {
        let (e1, e2) = (tmp.path().join("e1"), tmp.path().join("e2"));
        let eval = |out: &Path| -> Vec<String> {
            let mut v: Vec<String> = ["eval", "--run", s(&two), "--split", "test"]
                .iter()
                .map(|x| x.to_string())
                .collect();
            v.extend(mode.iter().map(|x| x.to_string()));
            v.extend(
                [
                    "--max-new-tokens",
                    "8",
                    "--threads",
                    "1",
                    "--out",
                    s(out),
                    "--json",
                ]
                .map(String::from),
            );
            v
        };
        let a1 = eval(&e1);
        let a2 = eval(&e2);
        let r1 = ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
        let r2 = ok_np(3, &a2.iter().map(String::as_str).collect::<Vec<_>>());
        let strip = |t: &str| {
            let mut v: serde_json::Value = serde_json::from_str(t.trim()).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        };
        assert_eq!(strip(&r1), strip(&r2), "{mode:?}");
        let name = if mode[1] == "score" {
            "scores.jsonl"
        } else {
            "predictions.jsonl"
        };
        let (p1, p2) = (
            std::fs::read(e1.join(name)).unwrap(),
            std::fs::read(e2.join(name)).unwrap(),
        );
        assert!(!p1.is_empty());
        assert!(p1 == p2, "{mode:?}: the sharded {name} differs");
        std::fs::remove_dir_all(&e1).unwrap();
        std::fs::remove_dir_all(&e2).unwrap();
    }

    // recommend --jsonl: the queries (stdin reaches rank 0) answered in shards, printed in order.
    let queries = "{\"history\": [1, 2, 3], \"candidates\": [4, 5, 6]}\n\
                   {\"history\": [7, 8], \"candidates\": [9, 10, 11, 12]}\n\
                   {\"history\": [13], \"candidates\": [14, 15]}\n";
    let rec = |np: usize| -> String {
        let args = ["recommend", "--run", s(&two), "--json", "--threads", "1"];
        let mut c = if np == 1 {
            let mut c = Command::new(env!("CARGO_BIN_EXE_llara"));
            c.args(args).env("LLARA_LOG", "warn");
            c
        } else {
            launch(np, &args)
        };
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(queries.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (r1, r2) = (rec(1), rec(2));
    assert_eq!(r1.lines().count(), 3, "{r1}");
    assert_eq!(r1, r2);
}

#[cfg(feature = "mpi")]
#[test]
fn ctrl_c_on_the_launcher_stops_every_rank_at_one_step_and_resume_repeats_the_run() {
    if mpirun().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let straight = tmp.path().join("straight");
    let args = tune_args(
        &run,
        &[
            "--epochs",
            "3",
            "--max-train-samples",
            "40",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
        ],
    );
    ok_np(2, &args);
    std::fs::rename(&run, &straight).unwrap();

    let mut child = launch(2, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&run, 3, &mut child);
    // Ctrl-C on mpirun: it passes SIGTERM to every rank.
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("checkpoint written"), "{text}");
    let stopped = log_lines(&run).len();
    assert!(stopped < 30, "the signal came after the run ended");
    let state = common::json(&run.join("checkpoint/state.json"));
    assert_eq!(state["step"].as_u64().unwrap() as usize, stopped);

    // The same run continued on one process: grad-accum 2 keeps the global batch of 4.
    let other = tmp.path().join("other");
    copy_dir(&run, &other);
    std::fs::write(
        other.join("tune.toml"),
        std::fs::read_to_string(run.join("tune.toml"))
            .unwrap()
            .replace(s(&run), s(&other)),
    )
    .unwrap();

    ok_np(2, &["tune", "--resume", s(&run)]);
    assert_eq!(log_lines(&run), log_lines(&straight));
    assert!(
        files(&run) == files(&straight),
        "resumed on two ranks, the run differs from the unbroken one"
    );

    ok(&["tune", "--resume", s(&other)]);
    close(&other, &straight, 1e-5, 1e-5);
}

#[cfg(feature = "mpi")]
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else if e.file_name() != "run.lock" {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[cfg(feature = "mpi")]
#[test]
fn a_rank_that_dies_fails_the_run_naming_it_and_leaves_a_whole_checkpoint() {
    if mpirun().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = tune_args(
        &run,
        &[
            "--epochs",
            "3",
            "--max-train-samples",
            "40",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--checkpoint-every",
            "2",
        ],
    );
    let mut child = launch(2, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ranks = ranks_of(&child, 2);
    wait_for_steps(&run, 5, &mut child);
    signal(ranks[1], "KILL");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("rank 1"),
        "the error does not name rank 1: {err}"
    );
    assert!(
        log_lines(&run).len() < 30,
        "rank 1 was killed after the end"
    );
    // What was published is whole: the run continues from it to the end.
    ok_np(2, &["tune", "--resume", s(&run)]);
    assert_eq!(log_lines(&run).len(), 30);
}

#[cfg(feature = "mpi")]
#[test]
fn ranks_that_disagree_refuse_to_start_and_one_process_commands_refuse_to_span_several() {
    if mpirun().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let base = tune_args(&run, &["--epochs", "1", "--max-train-samples", "8"]);
    // Open MPI's MPMD form: rank 0 and rank 1 with different LoRA ranks.
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_llara"))
        .args(&base)
        .args([":", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_llara"))
        .args(&base)
        .args(["--lora-r", "4"])
        .env("LLARA_LOG", "warn")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("rank 1 runs with a different binary, options"),
        "{err}"
    );
    assert!(!run.join("train_log.jsonl").exists());

    let out = run_np(
        2,
        &[
            "data",
            "synth",
            "--out",
            s(&tmp.path().join("d")),
            "--force",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("runs in one process"), "{err}");
    assert!(!tmp.path().join("d").exists());
}
