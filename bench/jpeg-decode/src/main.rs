//! `compare DIR`: decodes every `DIR/NAME.jpg` with caf's decoder and compares it with
//! `DIR/NAME.rgb` (Pillow's `convert("RGB")`, H × W × 3), printing each file that differs.
//! `speed DIR`: images per second of caf's decoder and of zune-jpeg over every `DIR/*.jpg`,
//! one thread, files in memory, the two alternated twice.

#[path = "../../../src/data/jpeg/mod.rs"]
#[allow(dead_code)]
mod jpeg;

use std::path::{Path, PathBuf};
use std::time::Instant;

fn jpgs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
}

fn zune(bytes: &[u8]) -> usize {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode().expect("zune-jpeg").len()
}

fn compare(dir: &Path) {
    let files = jpgs(dir);
    let mut exact = 0;
    for f in &files {
        let want = std::fs::read(f.with_extension("rgb")).expect("rgb");
        match jpeg::decode(&std::fs::read(f).expect("jpg")) {
            Ok(d) => {
                let n = d.width * d.height;
                let diff = (0..3 * n)
                    .map(|i| (i / 3, i % 3))
                    .find(|&(p, c)| d.pixels[(c % d.channels) * n + p] != want[p * 3 + c]);
                match (want.len() == 3 * n, diff) {
                    (true, None) => exact += 1,
                    (false, _) => println!("{}: size differs", f.display()),
                    (true, Some((p, c))) => println!(
                        "{}: first difference at y {} x {} channel {c}: caf {}, Pillow {}",
                        f.display(),
                        p / d.width,
                        p % d.width,
                        d.pixels[(c % d.channels) * n + p],
                        want[p * 3 + c]
                    ),
                }
            }
            Err(e) => println!("{}: {e}", f.display()),
        }
    }
    println!("{exact}/{} decode exactly as Pillow", files.len());
}

fn speed(dir: &Path) {
    let data: Vec<Vec<u8>> = jpgs(dir)
        .iter()
        .map(|f| std::fs::read(f).expect("jpg"))
        .collect();
    let rate = |t: Instant| data.len() as f64 / t.elapsed().as_secs_f64();
    for round in 1..=2 {
        let t = Instant::now();
        let a: usize = data
            .iter()
            .map(|b| jpeg::decode(b).expect("caf").pixels.len())
            .sum();
        let caf = rate(t);
        let t = Instant::now();
        let b: usize = data.iter().map(|b| zune(b)).sum();
        let z = rate(t);
        assert_eq!(a, b, "both decode every pixel");
        println!(
            "round {round}: caf {caf:.0} images/s, zune-jpeg {z:.0} images/s ({} files)",
            data.len()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("compare"), Some(dir)) => compare(Path::new(dir)),
        (Some("speed"), Some(dir)) => speed(Path::new(dir)),
        _ => eprintln!("usage: jpeg-decode compare|speed DIR"),
    }
}
