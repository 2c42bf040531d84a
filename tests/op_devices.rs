//! Every decoder op's forward and backward on each available device and dtype (candle's
//! `test_device!` pattern, decided at run time): the CPU's fused f32 kernels, the composed path on the
//! CPU in f32 (`--fused off`) and bf16, and CUDA in f32 and bf16 where a GPU is present. Each is
//! compared with the composed path in f64 on the CPU: the output and the gradient of every trainable
//! input (frozen inputs must get none).

use candle_core::{DType, Device, Result, Tensor, Var};
use llara::kernels::weight::FrozenWeight;
use llara::kernels::with_fused;
use llara::llm::ops::{self, AttnMask, RopeTable};

/// Where an op runs: a device, a dtype, and whether the fused CPU kernels may be used.
#[derive(Clone, Copy, Debug)]
struct Target {
    cuda: bool,
    dt: DType,
    fused: bool,
}

fn targets() -> Vec<Target> {
    let mut t = vec![
        Target {
            cuda: false,
            dt: DType::F32,
            fused: true,
        },
        Target {
            cuda: false,
            dt: DType::F32,
            fused: false,
        },
        Target {
            cuda: false,
            dt: DType::BF16,
            fused: false,
        },
    ];
    if candle_core::utils::cuda_is_available() {
        t.push(Target {
            cuda: true,
            dt: DType::F32,
            fused: false,
        });
        t.push(Target {
            cuda: true,
            dt: DType::BF16,
            fused: false,
        });
    }
    t
}

fn device(cuda: bool) -> Device {
    if cuda {
        Device::new_cuda(0).expect("cuda_is_available said yes")
    } else {
        Device::Cpu
    }
}

/// Deterministic values in about [-1, 1].
fn values(n: usize, salt: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (((i * 37 + salt * 11) % 101) as f64 - 50.0) / 50.0)
        .collect()
}

/// Runs an op on its inputs.
type Run = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// One op under test: the shapes of its inputs, which of them are trainable, and how to run it.
struct Case {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    trainable: Vec<bool>,
    run: Run,
}

/// The output and the trainable inputs' gradients (f64 on the host), and whether a frozen input
/// got a gradient.
fn evaluate(case: &Case, dev: &Device, dt: DType) -> (Vec<Vec<f64>>, bool) {
    let mut inputs = vec![];
    let mut vars = vec![];
    for (i, (shape, &train)) in case.shapes.iter().zip(&case.trainable).enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(n, i), shape.as_slice(), dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        if train {
            let v = Var::from_tensor(&t).unwrap();
            inputs.push(v.as_tensor().clone());
            vars.push(Some(v));
        } else {
            inputs.push(t);
            vars.push(None);
        }
    }
    let y = (case.run)(&inputs).unwrap();
    let coef = Tensor::from_vec(values(y.elem_count(), 99), y.shape(), dev)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let grads = (&y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
    let host = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut out = vec![host(&y)];
    let mut frozen_grad = false;
    for (t, v) in inputs.iter().zip(&vars) {
        match v {
            Some(v) => out.push(host(
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{}: no gradient", case.name)),
            )),
            None => frozen_grad |= grads.get(t).is_some(),
        }
    }
    (out, frozen_grad)
}

fn cases() -> Vec<Case> {
    let (b, t, heads, kv, d) = (2, 5, 4, 2, 8);
    let allowed: Vec<u8> = (0..b * (heads / kv) * t * t)
        .map(|i| {
            // Causal, and row 1 padded after 3 positions.
            let (bi, q, k) = (i / ((heads / kv) * t * t), (i / t) % t, i % t);
            u8::from(k <= q && (bi == 0 || k < 3))
        })
        .collect();
    let mask = AttnMask::new(allowed, b, (heads / kv) * t, t);
    let inv_freq: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64))
        .collect();
    let positions: Vec<usize> = (0..b).flat_map(|_| 0..t).collect();
    let table = RopeTable::new(&inv_freq, &positions);
    vec![
        Case {
            name: "rms_norm",
            shapes: vec![vec![b, t, 16], vec![16]],
            trainable: vec![true, false],
            run: Box::new(|x| ops::rms_norm(&x[0], &x[1], 1e-5)),
        },
        Case {
            name: "rope",
            shapes: vec![vec![b, t, heads, d]],
            trainable: vec![true],
            run: Box::new(move |x| ops::rope(&x[0], &table)),
        },
        Case {
            name: "attention",
            shapes: vec![vec![b, heads, t, d], vec![b, kv, t, d], vec![b, kv, t, d]],
            trainable: vec![true, true, true],
            run: Box::new(move |x| ops::attention(&x[0], &x[1], &x[2], &mask, 0.35)),
        },
        Case {
            name: "swiglu",
            shapes: vec![vec![b, t, 12], vec![b, t, 12]],
            trainable: vec![true, true],
            run: Box::new(|x| ops::swiglu(&x[0], &x[1])),
        },
        Case {
            name: "frozen_linear",
            shapes: vec![vec![b, t, 16], vec![12, 16], vec![12]],
            trainable: vec![true, false, false],
            run: Box::new(|x| ops::linear(&x[0], &x[1], Some(&x[2]))),
        },
        Case {
            name: "lora_linear",
            shapes: vec![vec![b, t, 16], vec![12, 16], vec![3, 16], vec![12, 3]],
            trainable: vec![true, false, true, true],
            run: Box::new(|x| {
                let w = FrozenWeight::plain(x[1].clone())?;
                ops::lora_linear(&x[0], &w, None, &x[2], &x[3], 0.7, &mut None)
            }),
        },
    ]
}

#[test]
fn every_op_agrees_on_every_device_and_dtype_and_gives_frozen_inputs_no_gradient() {
    for case in cases() {
        let (want, _) = evaluate(&case, &Device::Cpu, DType::F64);
        for tg in targets() {
            let dev = device(tg.cuda);
            let (got, frozen_grad) = with_fused(tg.fused, || evaluate(&case, &dev, tg.dt));
            assert!(
                !frozen_grad,
                "{} on {tg:?}: a frozen input got a gradient",
                case.name
            );
            assert_eq!(got.len(), want.len(), "{} on {tg:?}", case.name);
            let tol = if tg.dt == DType::BF16 { 4e-2 } else { 1e-4 };
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len());
                assert!(!g.is_empty());
                let scale = w.iter().fold(0f64, |s, v| s.max(v.abs())).max(1e-3);
                for (p, q) in g.iter().zip(w) {
                    assert!(
                        (p - q).abs() <= tol * scale,
                        "{} on {tg:?}, output/gradient {k}: {p} vs {q} (scale {scale})",
                        case.name
                    );
                }
            }
        }
    }
}
