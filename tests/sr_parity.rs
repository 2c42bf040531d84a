//! LLaRA's released recommenders load with their PyTorch names and reproduce PyTorch's scores.

mod common;
use candle_core::{DType, Device};
use llara::sr::{load_model, Batch};

#[test]
fn released_weights_reproduce_reference_scores() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = shared.join("recmodels");
    let names = [
        "movielens-sasrec",
        "movielens-gru4rec",
        "movielens-caser",
        "steam-sasrec",
        "steam-gru4rec",
        "steam-caser",
        "lastfm-sasrec",
    ];
    for name in names {
        let (model, cfg) =
            load_model(&dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
        let reference = candle_core::safetensors::load(
            dir.join(format!("{name}.reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let seq = reference["seq"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap();
        let lens = reference["len_seq"].to_vec1::<i64>().unwrap();
        let histories: Vec<Vec<u32>> = seq
            .iter()
            .zip(&lens)
            .map(|(s, &l)| {
                // Right-padded with item_num after the first `len` items.
                assert!(s[l as usize..].iter().all(|&x| x as usize == cfg.item_num));
                s[..l as usize].iter().map(|&x| x as u32).collect()
            })
            .collect();
        let refs: Vec<&[u32]> = histories.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&refs, &cfg, &Device::Cpu).unwrap();
        let ours = model.forward(&batch, None).unwrap();
        let expect = &reference["scores"];
        assert_eq!(ours.dims(), expect.dims(), "{name}");
        let diff = (ours - expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{name}: max |diff| = {diff:e}");
        assert!(diff < 1e-4, "{name}: max |diff| {diff} >= 1e-4");
    }
}
