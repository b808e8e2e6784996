//! Malformed and unsupported input. Exactness against Pillow is tested on the fixtures in
//! `data::imagefolder` and, for a larger corpus made by hand, by `matches_pillow_on_a_folder`.

use super::{decode, JpegError};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jpeg")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const FIXTURES: [&str; 5] = [
    "rgb420_q75.jpg",
    "prog420_q85.jpg",
    "restart_rows.jpg",
    "grey_prog.jpg",
    "optimize420.jpg",
];

#[test]
fn every_prefix_of_a_file_is_an_error_or_the_full_size_never_a_panic() {
    for name in FIXTURES {
        let bytes = fixture(name);
        let full = decode(&bytes).expect(name);
        let mut truncated = 0;
        for len in 0..bytes.len() {
            match decode(&bytes[..len]) {
                Ok(d) => assert_eq!((d.width, d.height), (full.width, full.height), "{name}"),
                Err(JpegError::Truncated(_)) => truncated += 1,
                Err(_) => {}
            }
        }
        // Cut inside the entropy-coded data, most prefixes must say so.
        assert!(truncated > bytes.len() / 2, "{name}: {truncated} truncated");
    }
}

#[test]
fn corrupt_bytes_decode_or_fail_without_panicking() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in FIXTURES {
        let bytes = fixture(name);
        // Every byte in turn replaced by its complement, then random multi-byte damage.
        for i in 2..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0xFF;
            let _ = decode(&bad);
        }
        for _ in 0..300 {
            let mut bad = bytes.clone();
            for _ in 0..1 + next() % 8 {
                let i = (next() as usize) % bad.len();
                bad[i] = next() as u8;
            }
            let _ = decode(&bad);
        }
    }
    let _ = decode(&[0xFF, 0xD8]);
    let _ = decode(&[0xFF, 0xD8, 0xFF]);
    assert!(matches!(decode(b"GIF89a"), Err(JpegError::NotJpeg)));
}

/// SOI and a frame header: `marker`, `precision`, 16×16, and `components` (id, 0x11, table 0).
fn header(marker: u8, precision: u8, width: u16, height: u16, components: u8) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, marker];
    v.extend_from_slice(&(8 + 3 * u16::from(components)).to_be_bytes());
    v.push(precision);
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(&width.to_be_bytes());
    v.push(components);
    for id in 1..=components {
        v.extend_from_slice(&[id, 0x11, 0]);
    }
    v
}

#[test]
fn other_codings_and_precisions_are_unsupported_not_misdecoded() {
    let cases = [
        (header(0xC9, 8, 16, 16, 3), "arithmetic"),
        (header(0xCA, 8, 16, 16, 3), "arithmetic"),
        (header(0xC3, 8, 16, 16, 3), "lossless"),
        (header(0xC5, 8, 16, 16, 3), "hierarchical"),
        (header(0xC0, 12, 16, 16, 3), "12-bit"),
        (header(0xC1, 12, 16, 16, 1), "12-bit"),
        (header(0xC2, 16, 16, 16, 3), "16-bit"),
        (header(0xC0, 8, 16, 16, 4), "CMYK"),
        (header(0xC0, 8, 16, 0, 3), "DNL"),
    ];
    for (bytes, what) in cases {
        match decode(&bytes) {
            Err(JpegError::Unsupported(m)) => assert!(m.contains(what), "{m} vs {what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn huge_dimensions_are_refused_before_allocating() {
    for components in [1, 3] {
        let bytes = header(0xC0, 8, 65535, 65535, components);
        assert!(matches!(decode(&bytes), Err(JpegError::TooLarge { .. })));
    }
    // Within the limit, a header with no scan is an error, not an image of grey.
    assert!(matches!(
        decode(&header(0xC0, 8, 64, 64, 3)),
        Err(JpegError::Truncated(_))
    ));
}

/// By hand: `CAF_JPEG_COMPARE_DIR=DIR cargo test --lib matches_pillow_on_a_folder -- --ignored`
/// decodes every `DIR/NAME.jpg` and compares it with `DIR/NAME.rgb`, Pillow's
/// `convert("RGB")` as H × W × 3 bytes.
#[test]
#[ignore]
fn matches_pillow_on_a_folder() {
    let dir = PathBuf::from(std::env::var("CAF_JPEG_COMPARE_DIR").expect("CAF_JPEG_COMPARE_DIR"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let mut mismatched = Vec::new();
    for f in &files {
        let want = std::fs::read(f.with_extension("rgb")).expect("rgb");
        let same = decode(&std::fs::read(f).expect("jpg")).is_ok_and(|d| {
            let n = d.width * d.height;
            want.len() == 3 * n
                && (0..n)
                    .all(|p| (0..3).all(|c| d.pixels[(c % d.channels) * n + p] == want[p * 3 + c]))
        });
        if !same {
            mismatched.push(f.display().to_string());
        }
    }
    eprintln!(
        "{}/{} decode exactly as Pillow",
        files.len() - mismatched.len(),
        files.len()
    );
    assert!(mismatched.is_empty(), "differ: {mismatched:?}");
}
