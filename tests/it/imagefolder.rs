//! An image-folder dataset through the whole pipeline: the first 100 exact CIFAR-10 test images
//! written as PNG class folders (80 for `train/`, 20 for `val/`), a study that trains (RS
//! fine-tuning, a CAF adapter) and certifies on it through `caf run`, and job ids that follow the
//! folder's content, not its path.

use std::path::Path;

use super::util::*;

/// Writes planar RGB (3 × 32 × 32) as an 8-bit RGB PNG.
fn write_png(path: &Path, planar: &[u8]) {
    let n = 32 * 32;
    let rgb: Vec<u8> = (0..n)
        .flat_map(|p| [planar[p], planar[n + p], planar[2 * n + p]])
        .collect();
    let file = std::fs::File::create(path).expect("create png");
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 32, 32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().expect("png header");
    w.write_image_data(&rgb).expect("png data");
}

/// `root/{train,val}/CLASS/NNNN.png`: records 0–79 train, 80–99 val.
fn exact100_folder(root: &Path) {
    let set = caf::data::load_cifar10(
        &shared_data().join("cifar10-exact100"),
        caf::data::Split::Test,
    )
    .expect("exact100");
    for split in ["train", "val"] {
        for class in set.classes() {
            std::fs::create_dir_all(root.join(split).join(class)).expect("mkdir");
        }
    }
    for i in 0..set.len() {
        let split = if i < 80 { "train" } else { "val" };
        let class = &set.classes()[usize::from(set.label(i))];
        write_png(
            &root.join(split).join(class).join(format!("{i:04}.png")),
            set.image_u8(i),
        );
    }
}

fn spec(root: &str) -> String {
    format!(
        "name: folder
seed: 3
data:
  dataset: imagefolder
  root: {root}
  image_size: 32
  resize: 32
backbones:
  r20:
    arch: resnet20
    weights: {weights}
certify: {{n0: 10, n: 100, batch: 110}}
grid:
  params: {{backbone: r20, sigma: 0.25}}
  axes:
    method: [smooth, rs, caf]
  methods:
    rs: {{params: {{epochs: 1, val_size: 16, train_batch: 32}}}}
    caf: {{params: {{epochs: 1, val_size: 16, train_batch: 32, adapter: \"cnn:8:2\"}}}}
",
        weights = resnet20_weights().display(),
    )
}

fn plan_ids(dir: &Dir, spec: &str) -> Vec<String> {
    let out = ok(&dir.run(&["plan", spec, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("plan json");
    let mut ids: Vec<String> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn imagefolder_study_trains_and_certifies_and_ids_follow_content() {
    let dir = Dir::new();
    exact100_folder(&dir.join("folder"));
    dir.write("s.yaml", &spec("folder"));
    ok(&dir.run(&["run", "s.yaml", "--db", "a.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "a.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().expect("jobs");
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    assert_eq!(kinds("train-rs"), 1, "{jobs:#?}");
    assert_eq!(kinds("train-caf"), 1, "{jobs:#?}");
    assert_eq!(kinds("certify"), 3, "{jobs:#?}");
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
        if j["kind"] == "certify" {
            // Every image of val/.
            assert_eq!(j["progress_done"], 20, "{j}");
        }
    }
    let csv = ok(&dir.run(&["export", "--db", "a.db"]));
    assert_eq!(csv.lines().count(), 1 + 3 * 20);
    // Labels are the folders' (sorted class names = CIFAR's label order): val/ holds records
    // 80–99, whose labels the export must show, class by class.
    let set = caf::data::load_cifar10(
        &shared_data().join("cifar10-exact100"),
        caf::data::Split::Test,
    )
    .expect("exact100");
    let mut want: Vec<u16> = (80..100).map(|i| set.label(i)).collect();
    want.sort_unstable();
    let mut first_job: Vec<(usize, u16)> = csv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with(csv.lines().nth(1).unwrap().split(',').next().unwrap()))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    first_job.sort_unstable();
    let labels: Vec<u16> = first_job.iter().map(|&(_, l)| l).collect();
    assert_eq!(labels, want, "labels in folder order");

    // A copy of the folder elsewhere (mtimes kept) plans the same jobs; touching one image
    // (new mtime) changes them, and `fingerprint: content` ignores the mtime again.
    let ids = plan_ids(&dir, "s.yaml");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.join("folder"))
        .arg(dir.join("copy"))
        .status()
        .expect("cp");
    assert!(status.success());
    dir.write("copy.yaml", &spec("copy"));
    assert_eq!(plan_ids(&dir, "copy.yaml"), ids, "ids depend on the path");
    let content_spec =
        |root: &str| spec(root).replace("  resize: 32\n", "  resize: 32\n  fingerprint: content\n");
    dir.write("c1.yaml", &content_spec("folder"));
    let content_ids = plan_ids(&dir, "c1.yaml");
    assert_ne!(content_ids, ids, "the fingerprint kind is part of the id");
    let class = &set.classes()[usize::from(set.label(80))];
    let touched = dir.join(&format!("copy/val/{class}/0080.png"));
    let bytes = std::fs::read(&touched).expect("read png");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&touched, &bytes).expect("rewrite png");
    assert_ne!(
        plan_ids(&dir, "copy.yaml"),
        ids,
        "a new mtime is a new stat fingerprint"
    );
    dir.write("c2.yaml", &content_spec("copy"));
    assert_eq!(
        plan_ids(&dir, "c2.yaml"),
        content_ids,
        "same bytes, same content fingerprint"
    );
}

#[test]
fn imagefolder_errors_point_at_the_data_section() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.join("empty/val")).expect("mkdir");
    dir.write("s.yaml", &spec("empty"));
    let out = dir.run(&["plan", "s.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("s.yaml:4:3"), "{err}");
    assert!(err.contains("no class folders"), "{err}");
}

/// `root/val/CLASS/NNNN.png` with all 100 exact images, so folder index i is binary record i.
pub(super) fn exact100_val_folder(root: &Path) {
    let set = caf::data::load_cifar10(
        &shared_data().join("cifar10-exact100"),
        caf::data::Split::Test,
    )
    .expect("exact100");
    for class in set.classes() {
        std::fs::create_dir_all(root.join("val").join(class)).expect("mkdir");
    }
    for i in 0..set.len() {
        let class = &set.classes()[usize::from(set.label(i))];
        write_png(
            &root.join("val").join(class).join(format!("{i:04}.png")),
            set.image_u8(i),
        );
    }
}

#[test]
fn eval_and_certify_read_an_image_folder_as_the_binary_batches() {
    let dir = Dir::new();
    exact100_val_folder(&dir.join("folder"));
    let weights = resnet20_weights();
    let exact = shared_data().join("cifar10-exact100");
    let (w, exact) = (
        weights.to_str().expect("utf-8"),
        exact.to_str().expect("utf-8"),
    );
    let run = |parts: &[&[&str]]| ok(&dir.run(&parts.concat()));
    let model: &[&str] = &["--arch", "resnet20", "--weights", w];
    let folder: &[&str] = &[
        "--data",
        "imagefolder",
        "--data-root",
        "folder",
        "--image-size",
        "32",
        "--resize",
        "32",
    ];
    let binary: &[&str] = &["--data-root", exact];
    // The same 100 images and labels: the same accuracy.
    let a = run(&[&["eval"], model, folder]);
    let b = run(&[&["eval"], model, binary]);
    assert!(a.contains("(94/100)"), "{a}");
    assert_eq!(a, b);
    // Certification reads the folder in torchvision's order (class folders sorted, then files):
    // the same rows as certifying those images, so labels come class by class.
    let cert: &[&str] = &["--sigma", "0.25", "--n0", "10", "--n", "50", "--max", "12"];
    run(&[&["certify"], model, folder, cert, &["--out", "folder.tsv"]]);
    let t = std::fs::read_to_string(dir.join("folder.tsv")).expect("tsv");
    assert!(
        t.starts_with("idx\tlabel\tpredict\tradius\tcorrect\ttime"),
        "{t}"
    );
    let labels: Vec<u32> = t
        .lines()
        .skip(1)
        .map(|l| {
            l.split('\t')
                .nth(1)
                .and_then(|v| v.parse().ok())
                .expect("label")
        })
        .collect();
    assert_eq!(labels.len(), 12, "{t}");
    assert!(labels.windows(2).all(|w| w[0] <= w[1]), "{labels:?}");
    assert!(labels.iter().any(|&l| l > 0), "{labels:?}");
    // Labels past the model's 10 outputs: a warning naming both counts (a study refuses it).
    for extra in ["k_extra", "l_extra"] {
        std::fs::create_dir_all(dir.join("folder").join("val").join(extra)).expect("mkdir");
    }
    let out = dir.run(&[&["eval"], model, folder].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("10 outputs") && err.contains("12 classes"),
        "{err}"
    );
    // A crop of another size than the network takes (the default follows the arch).
    let out = dir.run(
        &[
            &["eval"],
            model,
            &["--data", "imagefolder", "--data-root", "folder"],
            &["--image-size", "40"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("32×32"), "{}", text(&out.stderr));
}

/// Heads a study trains have one output per class of its data: on a folder of three classes,
/// CAF's new head and an `rs` network from scratch have three outputs (trained on images
/// streamed from the files), and both certify; fine-tuning keeps the initial network's ten.
#[test]
fn trained_heads_have_the_classes_of_the_training_folder() {
    let dir = Dir::new();
    let root = dir.join("three");
    exact100_folder(&root);
    // Keep the first three classes (sorted names) in both splits.
    for split in ["train", "val"] {
        let mut classes: Vec<_> = std::fs::read_dir(root.join(split))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        classes.sort();
        for extra in &classes[3..] {
            std::fs::remove_dir_all(extra).unwrap();
        }
    }
    let spec = spec("three")
        .replace("    method: [smooth, rs, caf]\n", "    method: [rs, caf]\n")
        .replace(
            "    rs: {params:",
            "    rs: {axes: {init: [scratch, pretrained]}, params:",
        )
        // About 24 training images in three classes.
        .replace(
            "val_size: 16, train_batch: 32",
            "val_size: 4, train_batch: 8",
        );
    dir.write("three.yaml", &spec);
    let out = dir.run(&["run", "three.yaml", "--db", "t.db", "--artifacts", "art"]);
    ok(&out);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "t.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().expect("jobs");
    let rows = |label_has: &str, kind: &str, tensor: &str| -> usize {
        let job = jobs
            .iter()
            .find(|j| j["kind"] == kind && j["label"].as_str().unwrap().contains(label_has))
            .unwrap_or_else(|| panic!("a {kind} job with {label_has}: {jobs:#?}"));
        let path = job["weights"]["path"].as_str().expect("weights");
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("load");
        t[tensor].dims()[0]
    };
    assert_eq!(rows("train-caf", "train-caf", "head.weight"), 3);
    let rs: Vec<&serde_json::Value> = jobs.iter().filter(|j| j["kind"] == "train-rs").collect();
    assert_eq!(rs.len(), 2, "{jobs:#?}");
    let mut outputs: Vec<usize> = rs
        .iter()
        .map(|j| {
            let path = j["weights"]["path"].as_str().expect("weights");
            let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
            t["linear.weight"].dims()[0]
        })
        .collect();
    outputs.sort_unstable();
    assert_eq!(
        outputs,
        vec![3, 10],
        "from scratch: 3 classes; fine-tuned: the init's 10"
    );
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
}

/// `caf eval` and `caf certify` decode only the images of their slice: a damaged file outside it
/// (ImageNet's validation folder certified at `--skip 100` reads 500 of 50,000 files) does not
/// stop them, and one inside it is named.
#[test]
fn eval_and_certify_decode_only_their_slice() {
    let dir = Dir::new();
    exact100_val_folder(&dir.join("folder"));
    let truck = dir.join("folder").join("val").join("truck");
    let mut last: Vec<_> = std::fs::read_dir(&truck)
        .expect("truck folder")
        .map(|e| e.expect("entry").path())
        .collect();
    last.sort();
    let damaged = last.pop().expect("a truck image");
    std::fs::write(&damaged, b"not a PNG").expect("damage");
    let weights = resnet20_weights();
    let w = weights.to_str().expect("utf-8");
    let args = |cmd: &str, extra: &[&str]| {
        let mut v = vec![cmd, "--arch", "resnet20", "--weights", w];
        v.extend(["--data", "imagefolder", "--data-root", "folder"]);
        v.extend(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| dir.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Folder index 99 (the last file of the last class) is outside both slices.
    let out = ok(&run(args("eval", &["--max", "10"])));
    assert!(out.contains("/10)"), "{out}");
    let cert = [
        "--sigma", "0.25", "--n0", "10", "--n", "20", "--skip", "10", "--max", "99",
    ];
    ok(&run(args(
        "certify",
        &[&cert[..], &["--out", "c.tsv"]].concat(),
    )));
    let rows = std::fs::read_to_string(dir.join("c.tsv")).expect("tsv");
    assert_eq!(rows.lines().count(), 1 + 10, "{rows}");
    // Evaluating every image reaches it: the error names the file.
    let out = run(args("eval", &[]));
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    let name = damaged.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(err.contains(name), "{err}");
}
