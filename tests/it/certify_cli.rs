//! One-off `caf certify` and `caf eval` against closed forms and PyTorch.

use candle_core::{Device, Tensor};

use super::util::*;

#[test]
fn eval_matches_pytorch_on_the_exact_test_images() {
    let dir = Dir::new();
    let root = shared_data().join("cifar10-exact100");
    for (weights, want) in [
        (
            "pretrained/akamaster/resnet20-12fca82f.th",
            "accuracy: 0.9400 (94/100)",
        ),
        (
            "pretrained/akamaster/resnet20.safetensors",
            "accuracy: 0.9400 (94/100)",
        ),
        (
            "pretrained/akamaster/resnet56-4bfd9763.th",
            "accuracy: 0.9600 (96/100)",
        ),
    ] {
        let arch = if weights.contains("56") {
            "resnet56"
        } else {
            "resnet20"
        };
        let w = shared_data().join(weights);
        let out = dir.run(&[
            "eval",
            "--arch",
            arch,
            "--weights",
            w.to_str().unwrap(),
            "--data",
            "cifar10",
            "--data-root",
            root.to_str().unwrap(),
        ]);
        assert_eq!(ok(&out).trim(), want, "{weights}");
    }
}

/// Pixels of image `i` of the exact-100 test batch, as [0,1] floats.
fn exact_image(i: usize) -> Vec<f32> {
    let bytes =
        std::fs::read(shared_data().join("cifar10-exact100/cifar-10-batches-bin/test_batch.bin"))
            .unwrap();
    bytes[i * 3073 + 1..(i + 1) * 3073]
        .iter()
        .map(|&b| b as f32 / 255.0)
        .collect()
}

#[test]
fn certified_radii_of_a_linear_model_never_exceed_the_exact_radius() {
    let dir = Dir::new();
    // Two classes: class 1 iff w·x + b > 0, with w a fixed direction of unit norm.
    let d = 3072;
    let raw: Vec<f64> = (0..d)
        .map(|j| ((j * 7919) % 101) as f64 / 101.0 - 0.45)
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let w: Vec<f64> = raw.iter().map(|v| v / norm).collect();
    let wx = |x: &[f32]| w.iter().zip(x).map(|(a, b)| a * *b as f64).sum::<f64>();
    // Put the decision boundary between images 0 and 1 so that both classes occur.
    let b = -(wx(&exact_image(0)) + wx(&exact_image(1))) / 2.0;
    let mut rows = vec![0f32; d];
    rows.extend(w.iter().map(|&v| v as f32));
    let weight = Tensor::from_vec(rows, (2, d), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(vec![0f32, b as f32], 2, &Device::Cpu).unwrap();
    let path = dir.join("linear.safetensors");
    candle_core::safetensors::save(
        &[("weight", weight), ("bias", bias)].into_iter().collect(),
        &path,
    )
    .unwrap();

    let root = shared_data().join("cifar10-exact100");
    let out = dir.run(&[
        "certify",
        "--arch",
        "linear",
        "--weights",
        path.to_str().unwrap(),
        "--data-root",
        root.to_str().unwrap(),
        "--sigma",
        "0.5",
        "--n0",
        "100",
        "--n",
        "20000",
        "--batch",
        "5000",
        "--max",
        "6",
        "--out",
        "c.tsv",
    ]);
    ok(&out);
    let tsv = std::fs::read_to_string(dir.join("c.tsv")).unwrap();
    let mut lines = tsv.lines();
    assert_eq!(
        lines.next(),
        Some("idx\tlabel\tpredict\tradius\tcorrect\ttime\tnA\tn")
    );
    let mut certified = 0;
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let idx: usize = f[0].parse().unwrap();
        let predict: i64 = f[2].parse().unwrap();
        let radius: f64 = f[3].parse().unwrap();
        let (n_a, n): (u64, u64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
        let margin = wx(&exact_image(idx)) + b;
        let exact = margin.abs();
        if predict >= 0 {
            certified += 1;
            assert_eq!(
                predict,
                (margin > 0.0) as i64,
                "image {idx}: wrong side of the boundary"
            );
            assert!(
                radius <= exact + 5e-4,
                "image {idx}: certified {radius} > exact {exact}"
            );
        }
        // The row can be recomputed from its counts.
        let c = caf::certify::certificate_from_counts(predict.max(0) as u32, n_a, n, 0.001, 0.5);
        assert!(
            (c.radius - radius).abs() < 6e-4,
            "image {idx}: {} vs {radius}",
            c.radius
        );
    }
    assert!(
        certified >= 3,
        "too few certified images to test anything:\n{tsv}"
    );
}

#[test]
fn damaged_data_and_weights_files_are_named_in_a_usage_error() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("data/cifar-10-batches-bin")).unwrap();
    let good =
        std::fs::read(shared_data().join("cifar10-exact100/cifar-10-batches-bin/test_batch.bin"))
            .unwrap();
    std::fs::write(
        dir.join("data/cifar-10-batches-bin/test_batch.bin"),
        &good[..5000],
    )
    .unwrap();
    let w = resnet20_weights();
    let out = dir.run(&[
        "eval",
        "--arch",
        "resnet20",
        "--weights",
        w.to_str().unwrap(),
        "--data-root",
        "data",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("test_batch.bin") && err.contains("1927 extra bytes"),
        "{err}"
    );

    dir.write("garbage.th", "definitely not a checkpoint");
    let root = shared_data().join("cifar10-exact100");
    let out = dir.run(&[
        "eval",
        "--arch",
        "resnet20",
        "--weights",
        "garbage.th",
        "--data-root",
        root.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("garbage.th"),
        "{}",
        text(&out.stderr)
    );

    // Weights of another depth: the error lists what does not fit.
    let out = dir.run(&[
        "eval",
        "--arch",
        "resnet56",
        "--weights",
        w.to_str().unwrap(),
        "--data-root",
        root.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("missing: layer1.3"),
        "{}",
        text(&out.stderr)
    );
}
