//! `llara train-sr` / `llara eval-sr` end to end on small synthetic data (and on LLaRA's released
//! weights where `../shared` is present).

mod common;
use common::*;
use std::path::Path;

fn small_synth(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("synth");
    ok(&[
        "data",
        "synth",
        "--out",
        s(&d),
        "--users",
        "400",
        "--items",
        "100",
    ]);
    d
}

/// HR@1 of always ranking by train popularity, on the same test candidates.
fn popularity_hr1(data: &Path) -> f64 {
    let train = rows(&data.join("train.jsonl"));
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for (_, n) in &train {
        *counts.entry(*n).or_default() += 1;
    }
    let test = rows(&data.join("test.jsonl"));
    let cands = candidates(&data.join("candidates/test.jsonl"));
    let hits = test
        .iter()
        .zip(&cands)
        .filter(|((_, next), c)| {
            let score = |i: &u32| counts.get(i).copied().unwrap_or(0);
            c.iter().all(|o| o == next || score(o) < score(next))
        })
        .count();
    hits as f64 / test.len() as f64
}

#[test]
fn sasrec_trains_beats_popularity_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_synth(tmp.path());
    let run = tmp.path().join("run");
    let args = |out: &Path| -> Vec<String> {
        [
            "train-sr",
            "--data",
            s(&data),
            "--model",
            "sasrec",
            "--out",
            s(out),
            "--epochs",
            "8",
            "--patience",
            "8",
            "--seed",
            "3",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let a: Vec<String> = args(&run);
    let stdout = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stdout.contains("HR@1") && stdout.contains("test"),
        "{stdout}"
    );
    for f in [
        "model.safetensors",
        "config.json",
        "metrics.json",
        "train_log.jsonl",
        "config.toml",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let m = json(&run.join("metrics.json"));
    for k in [
        "hr@1",
        "hr@5",
        "hr@10",
        "ndcg@5",
        "ndcg@10",
        "rows",
        "full_hr@10",
        "full_ndcg@10",
    ] {
        assert!(m.get(k).is_some(), "metrics.json lacks {k}: {m}");
    }
    let hr1 = m["hr@1"].as_f64().unwrap();
    let pop = popularity_hr1(&data);
    assert!(
        hr1 > 0.3 && hr1 > pop + 0.1,
        "SASRec HR@1 {hr1} vs popularity {pop}"
    );
    let log = std::fs::read_to_string(run.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap());

    // Config: PyTorch names and shapes, item count, hyper-parameters.
    let cfg = json(&run.join("config.json"));
    assert_eq!(cfg["model"], "sasrec");
    assert_eq!(cfg["item_num"], 100);
    assert_eq!(cfg["training"]["seed"], 3);
    let tensors =
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(tensors["item_embeddings.weight"].dims(), &[101, 64]);
    assert_eq!(tensors["feed_forward.w_1.weight"].dims(), &[64, 64, 1]);
    assert_eq!(tensors["s_fc.weight"].dims(), &[100, 64]);

    // eval-sr on the run gives the same test metrics as metrics.json.
    let out = ok(&["eval-sr", "--model", s(&run), "--data", s(&data), "--json"]);
    let e: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "rows"] {
        assert_eq!(e[k], m[k], "{k}");
    }

    // Same seed, same bytes.
    let run2 = tmp.path().join("run2");
    let b: Vec<String> = args(&run2);
    ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(run2.join("model.safetensors")).unwrap()
    );
    // The run's config.toml reproduces it too.
    let run3 = tmp.path().join("run3");
    ok(&[
        "train-sr",
        "--config",
        s(&run.join("config.toml")),
        "--out",
        s(&run3),
    ]);
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(run3.join("model.safetensors")).unwrap()
    );
}

#[test]
fn gru4rec_and_caser_train_and_every_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_synth(tmp.path());
    let pop = popularity_hr1(&data);
    for (model, loss) in [
        ("gru4rec", "bce"),
        ("caser", "bce"),
        ("sasrec", "ce"),
        ("sasrec", "sampled"),
        ("sasrec", "gbce"),
    ] {
        let run = tmp.path().join(format!("{model}-{loss}"));
        ok(&[
            "train-sr",
            "--data",
            s(&data),
            "--model",
            model,
            "--loss",
            loss,
            "--out",
            s(&run),
            "--epochs",
            "6",
            "--lr",
            "3e-3",
            "--negatives",
            "32",
        ]);
        let m = json(&run.join("metrics.json"));
        let hr1 = m["hr@1"].as_f64().unwrap();
        assert!(hr1 > pop, "{model}/{loss}: HR@1 {hr1} vs popularity {pop}");
        let cfg = json(&run.join("config.json"));
        assert_eq!(cfg["model"], model);
        assert_eq!(cfg["training"]["loss"], loss);
        // The patience default depends on the model, and the run records the value used.
        let want = if model == "gru4rec" { 60 } else { 20 };
        assert_eq!(cfg["training"]["patience"], want);
        let toml = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(toml.contains(&format!("patience = {want}")), "{toml}");
        // The selection metric is recorded with the valid metrics.
        let e = m["valid"]["expected_hr@1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&e), "{e}");
    }
    for (flags, want) in [
        (&["--loss", "gbce", "--gbce-t", "1.5"][..], "--gbce-t"),
        (
            &["--loss", "sampled", "--negatives", "0"][..],
            "--negatives",
        ),
        (&["--ema", "1"][..], "--ema"),
    ] {
        let bad = tmp.path().join("bad");
        let mut args = vec!["train-sr", "--data", s(&data), "--out", s(&bad)];
        args.extend(flags.iter().copied());
        let err = fails(&args);
        assert!(err.contains(want), "{err}");
        assert!(!tmp.path().join("bad").exists());
    }
}

#[test]
fn sr_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_synth(tmp.path());
    let run = tmp.path().join("run");
    ok(&[
        "train-sr",
        "--data",
        s(&data),
        "--model",
        "gru4rec",
        "--out",
        s(&run),
        "--epochs",
        "1",
        "--hidden",
        "8",
    ]);

    // Item count of the weights != the dataset's.
    let other = tmp.path().join("other");
    ok(&[
        "data",
        "synth",
        "--out",
        s(&other),
        "--users",
        "100",
        "--items",
        "50",
    ]);
    let err = fails(&["eval-sr", "--model", s(&run), "--data", s(&other)]);
    assert!(err.contains("100 items") && err.contains("50"), "{err}");

    // Unknown architecture / malformed / missing config.
    let cfg_path = run.join("config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, good.replace("\"gru4rec\"", "\"transformer\"")).unwrap();
    let err = fails(&["eval-sr", "--model", s(&run), "--data", s(&data)]);
    assert!(
        err.contains("config.json") && err.contains("transformer"),
        "{err}"
    );
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let err = fails(&["eval-sr", "--model", s(&run), "--data", s(&data)]);
    assert!(
        err.contains("config.json") && err.contains("not a recommender config"),
        "{err}"
    );
    std::fs::remove_file(&cfg_path).unwrap();
    let err = fails(&["eval-sr", "--model", s(&run), "--data", s(&data)]);
    assert!(
        err.contains("config.json") && err.contains("missing"),
        "{err}"
    );
    // A config that does not match the weights.
    std::fs::write(&cfg_path, good.replace("\"gru4rec\"", "\"caser\"")).unwrap();
    let err = fails(&["eval-sr", "--model", s(&run), "--data", s(&data)]);
    assert!(
        err.contains("model.safetensors") && err.contains("does not match"),
        "{err}"
    );

    let err = fails(&[
        "train-sr",
        "--data",
        s(&tmp.path().join("nope")),
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert!(err.contains("--data") && err.contains("meta.json"), "{err}");
    let err = fails(&[
        "train-sr",
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("x")),
        "--device",
        "tpu",
    ]);
    assert!(err.contains("--device"), "{err}");
    let err = fails(&[
        "train-sr",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--epochs",
        "1",
    ]);
    assert!(err.contains("already exists"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn released_checkpoints_evaluate_on_prepared_splits() {
    let Some(shared) = shared() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("movielens");
    ok(&[
        "data",
        "prepare",
        "--from",
        "llara-jsonl",
        s(&shared.join("datasets/movielens")),
        "--out",
        s(&data),
    ]);
    let out = ok(&[
        "eval-sr",
        "--model",
        s(&shared.join("recmodels/movielens-sasrec.safetensors")),
        "--data",
        s(&data),
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["rows"], 95);
    // A trained model ranks far above chance (0.05) on LLaRA's own test users.
    assert!(m["hr@1"].as_f64().unwrap() > 0.2, "{m}");
    let err = fails(&[
        "eval-sr",
        "--model",
        s(&shared.join("recmodels/lastfm-sasrec.safetensors")),
        "--data",
        s(&data),
    ]);
    assert!(err.contains("4606") && err.contains("1682"), "{err}");
}

#[test]
fn quickstart_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let stdout = ok(&[
        "quickstart",
        "--out",
        s(&out),
        "--epochs",
        "2",
        "--tune-samples",
        "8",
    ]);
    assert!(stdout.contains("HR@1"), "{stdout}");
    assert!(out.join("data/meta.json").exists());
    let m = json(&out.join("sasrec/metrics.json"));
    assert!(m["hr@1"].as_f64().unwrap() > 0.05, "{m}");
    // The LLaRA stage: the recommended hybrid run and text-only tuning, both finished and scored by
    // their heads on every test row; generation for the hybrid run.
    for run in ["llara-hybrid", "llara-text-only"] {
        assert!(json(&out.join(run).join("metrics.json"))["finished"]
            .as_bool()
            .unwrap());
        assert!(out.join(run).join("head.safetensors").exists());
        let e = json(&out.join(run).join("eval-test-score/metrics.json"));
        assert_eq!(e["scorer"], "head");
        assert_eq!(e["rows"], m["rows"]);
    }
    assert_eq!(
        json(&out.join("llara-hybrid/eval-test/metrics.json"))["rows"],
        32
    );
    // The comparison table: the recommender, popularity and both LLaRA runs, same dataset.
    for want in [
        "recommender scores",
        "popularity",
        "| generation |",
        "scoring (head)",
        "| synth |",
        "LLaRA hybrid HR@1",
    ] {
        assert!(stdout.contains(want), "{want} missing from {stdout}");
    }
    // Running it again (another seed) replaces its outputs, and the method still shows: the
    // hybrid run near its SASRec, text-only below it.
    ok(&[
        "quickstart",
        "--out",
        s(&out),
        "--epochs",
        "10",
        "--tune-samples",
        "16",
        "--seed",
        "7",
    ]);
    let hr = |p: &str| json(&out.join(p))["hr@1"].as_f64().unwrap();
    let (h, t, r) = (
        hr("llara-hybrid/eval-test-score/metrics.json"),
        hr("llara-text-only/eval-test-score/metrics.json"),
        hr("sasrec/metrics.json"),
    );
    assert!(r > 0.3, "SASRec {r}");
    assert!(h >= 0.8 * r, "hybrid {h} vs SASRec {r}");
    assert!(h > t + 0.1, "hybrid {h} vs text-only {t}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_train_sr_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_synth(tmp.path());
    let out = tmp.path().join("sr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(["train-sr", "--data", s(&data), "--out", s(&out)])
        .args([
            "--epochs",
            "100000",
            "--patience",
            "100000",
            "--hidden",
            "8",
        ])
        .env("LLARA_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the first epoch's line), then interrupt.
    let mut err = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("epoch   1") {
        use std::io::Read;
        let n = err.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "train-sr ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(
        rest.contains("SIGINT") && rest.contains("nothing was written"),
        "{rest}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("sr"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `train-sr --force` killed at many points while replacing a run folder leaves the old folder or
/// the new one, whole; a second writer of the same output is refused while one runs.
#[cfg(unix)]
#[test]
fn a_cut_write_leaves_the_old_or_the_new_run_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    ok(&[
        "data",
        "synth",
        "--users",
        "60",
        "--items",
        "40",
        "--out",
        data.to_str().unwrap(),
    ]);
    let out = tmp.path().join("sr");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = |seed: &'static str| {
        vec![
            "train-sr", "--data", d, "--epochs", "2", "--hidden", "16", "--seed", seed, "--out", o,
            "--force",
        ]
    };
    ok(&args("2"));
    let new = common::snapshot(&out).unwrap();
    ok(&args("1"));
    let old = common::snapshot(&out).unwrap();
    assert_ne!(old, new);
    // A second writer of the same output, while one runs, is refused naming its PID.
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(args("3"))
        .env("LLARA_LOG", "error")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = tmp.path().join(".sr.lock");
    let t = std::time::Instant::now();
    while !lock.exists() && t.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let second = common::llara(&args("4"));
    let done = first.try_wait().unwrap().is_some();
    first.wait().unwrap();
    if !done {
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "{err}");
        assert!(err.contains(&format!("PID {}", first.id())), "{err}");
    }
    ok(&args("1"));
    // metrics.json and train_log.jsonl record wall-clock times: compared by name.
    let timed = ["metrics.json", "train_log.jsonl"];
    let kills = common::cut_writes_leave_a_whole_output(&args("2"), &out, &timed, &old, &new);
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );
}
