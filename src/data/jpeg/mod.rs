//! A JPEG decoder whose output is bit-identical to Pillow's, which decodes with libjpeg-turbo
//! at its defaults: the "islow" integer IDCT, fancy (triangular) chroma upsampling and
//! libjpeg's fixed-point YCbCr → RGB. Matching Pillow exactly means a model evaluated on a
//! JPEG folder sees the same bytes as the PyTorch reference it is compared with.
//!
//! Decodes 8-bit baseline/extended (SOF0/SOF1) and progressive (SOF2) Huffman-coded images
//! with 1 or 3 components and any integral sampling factors 1–4, restart intervals
//! included. Everything else (arithmetic coding, lossless, hierarchical, 12-bit, CMYK/YCCK)
//! is [`JpegError::Unsupported`], which callers may hand to a more general decoder.
//!
//! One libjpeg behaviour is not reproduced: block smoothing of progressive images whose
//! scans leave the low AC coefficients unrefined (libjpeg interpolates them; here they stay
//! as sent). Encoders write complete progressions, which are decoded exactly.

mod color;
mod huffman;
mod idct;
mod marker;
#[cfg(test)]
mod tests;
mod upsample;

use huffman::{BitReader, HuffTable, Progressive};
use marker::{Frame, Reader, Scan};

/// A decoded image: `channels` (1 grey, or 3 RGB) planes of `height` × `width` bytes each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    #[error("not a JPEG file (no start-of-image marker)")]
    NotJpeg,
    #[error("unsupported JPEG: {0}")]
    Unsupported(String),
    #[error("corrupt JPEG: {0}")]
    Corrupt(String),
    #[error("truncated JPEG: the file ends {0}")]
    Truncated(&'static str),
    #[error("JPEG too large to decode: {width}×{height} needs {bytes} bytes of buffers")]
    TooLarge {
        width: usize,
        height: usize,
        bytes: usize,
    },
    #[error("out of memory allocating {0} bytes for a JPEG")]
    OutOfMemory(usize),
}

/// Pillow refuses images above twice its `MAX_IMAGE_PIXELS` (a `DecompressionBombError`), so
/// nothing larger could match it anyway; a forged header could otherwise ask for tens of
/// gigabytes (65535² × 3 components).
const MAX_PIXELS: usize = 2 * 89_478_485;

/// The most working memory one image may take, whatever its sampling factors.
const MAX_BYTES: usize = 1 << 32;

/// libjpeg's limit on blocks in one interleaved MCU.
const MAX_BLOCKS_IN_MCU: usize = 10;

/// A zeroed buffer, or an error instead of an abort when memory is short.
fn alloc<T: Clone + Default>(n: usize) -> Result<Vec<T>, JpegError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| JpegError::OutOfMemory(n * std::mem::size_of::<T>()))?;
    v.resize(n, T::default());
    Ok(v)
}

/// Decodes a whole JPEG file.
pub fn decode(bytes: &[u8]) -> Result<Decoded, JpegError> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err(JpegError::NotJpeg);
    }
    let mut d = Decoder {
        r: Reader {
            data: bytes,
            pos: 2,
        },
        image: None,
        qt: [None; 4],
        dc: Default::default(),
        ac: Default::default(),
        restart_interval: 0,
        jfif: false,
        adobe: None,
    };
    d.read_markers()?;
    d.finish()
}

/// One component's geometry and samples, following libjpeg's `jpeg_component_info`.
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks that carry image samples: ceil(width · h / (8 · max_h)) and likewise down.
    bw: usize,
    bh: usize,
    /// Blocks stored: whole interleaved MCUs, so the plane's row stride is `pbw · 8`.
    pbw: usize,
    pbh: usize,
    /// Real samples: ceil(width · h / max_h) and likewise down.
    dw: usize,
    dh: usize,
    /// The quantization table as it was when the component's first scan began.
    quant: Option<[u16; 64]>,
    /// Samples, filled block by block for sequential images.
    plane: Vec<u8>,
    /// Coefficients of every stored block, for progressive images.
    coefs: Vec<i16>,
    pred: i32,
    scanned: bool,
}

struct Image {
    frame: Frame,
    comps: Vec<Component>,
    max_h: usize,
    max_v: usize,
    mcux: usize,
    mcuy: usize,
    scans: usize,
}

struct Decoder<'a> {
    r: Reader<'a>,
    image: Option<Image>,
    qt: [Option<[u16; 64]>; 4],
    dc: [Option<HuffTable>; 4],
    ac: [Option<HuffTable>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe: Option<u8>,
}

/// Which of the five entropy decoders a scan uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

impl Decoder<'_> {
    fn read_markers(&mut self) -> Result<(), JpegError> {
        loop {
            let Some(m) = self.r.next_marker() else {
                // Pillow reports a file that ends before EOI as truncated, except that a
                // sequential image whose scans are all complete decodes.
                return match &self.image {
                    Some(img) if !img.frame.progressive && img.comps.iter().all(|c| c.scanned) => {
                        Ok(())
                    }
                    _ => Err(JpegError::Truncated("before the end-of-image marker")),
                };
            };
            match m {
                0xD9 => return Ok(()),
                // SOI again, a stray RSTn or TEM: standalone markers with no segment.
                0xD8 | 0xD0..=0xD7 | 0x01 => {}
                0xC0..=0xC2 => {
                    if self.image.is_some() {
                        return Err(JpegError::Corrupt("a second frame header".into()));
                    }
                    let frame = marker::parse_sof(self.r.segment()?, m == 0xC2)?;
                    self.image = Some(Image::new(frame)?);
                }
                m if marker::unsupported_frame(m).is_some() => {
                    let what = marker::unsupported_frame(m).unwrap_or_default();
                    return Err(JpegError::Unsupported(what.into()));
                }
                0xC4 => marker::parse_dht(self.r.segment()?, &mut self.dc, &mut self.ac)?,
                0xDB => marker::parse_dqt(self.r.segment()?, &mut self.qt)?,
                0xDD => self.restart_interval = marker::parse_dri(self.r.segment()?)?,
                0xDA => {
                    let seg = self.r.segment()?;
                    let img = self
                        .image
                        .as_mut()
                        .ok_or_else(|| JpegError::Corrupt("scan before the frame header".into()))?;
                    let scan = marker::parse_sos(seg, &img.frame)?;
                    self.decode_scan(&scan)?;
                }
                0xE0 => self.jfif |= marker::is_jfif(self.r.segment()?),
                0xEE => {
                    if let Some(t) = marker::adobe_transform(self.r.segment()?) {
                        self.adobe = Some(t);
                    }
                }
                // APPn, COM, DNL, DAC and the rest: skipped, as libjpeg skips them.
                _ => {
                    self.r.segment()?;
                }
            }
        }
    }

    fn decode_scan(&mut self, scan: &Scan) -> Result<(), JpegError> {
        let Some(img) = self.image.as_mut() else {
            return Err(JpegError::Corrupt("scan before the frame header".into()));
        };
        let pass = scan_pass(scan, img.frame.progressive)?;
        let ns = scan.components.len();
        if ns > 1 {
            let blocks: usize = scan
                .components
                .iter()
                .map(|s| img.comps[s.index].h * img.comps[s.index].v)
                .sum();
            if blocks > MAX_BLOCKS_IN_MCU {
                return Err(JpegError::Corrupt(format!("{blocks} blocks in one MCU")));
            }
        }
        // Resolve each scan component's tables up front so the MCU loop cannot fail.
        let mut tables: Vec<(Option<&HuffTable>, Option<&HuffTable>)> = Vec::with_capacity(ns);
        for s in &scan.components {
            let needs_dc = matches!(pass, Pass::Sequential | Pass::DcFirst);
            let needs_ac = matches!(pass, Pass::Sequential | Pass::AcFirst | Pass::AcRefine);
            let dc = self.dc[s.dc_table].as_ref();
            let ac = self.ac[s.ac_table].as_ref();
            if (needs_dc && dc.is_none()) || (needs_ac && ac.is_none()) {
                // libjpeg would substitute the standard tables Motion-JPEG frames rely on.
                return Err(JpegError::Unsupported(
                    "a scan without its Huffman tables (Motion-JPEG)".into(),
                ));
            }
            if needs_dc && dc.is_some_and(|t| !t.dc_ok) {
                return Err(JpegError::Corrupt(
                    "DC Huffman table symbol above 15".into(),
                ));
            }
            let c = &mut img.comps[s.index];
            if c.quant.is_none() {
                c.quant = Some(self.qt[c.tq].ok_or_else(|| {
                    JpegError::Corrupt(format!("quantization table {} is not defined", c.tq))
                })?);
            }
            c.scanned = true;
            c.pred = 0;
            tables.push((dc, ac));
        }
        img.scans += 1;

        let (mx, my) = if ns == 1 {
            let c = &img.comps[scan.components[0].index];
            (c.bw, c.bh)
        } else {
            (img.mcux, img.mcuy)
        };
        let mut r = BitReader::new(self.r.data, self.r.pos);
        let mut prog = Progressive { eobrun: 0 };
        let mut block = [0i16; 64];
        let (ss, se, al) = (scan.ss, scan.se, scan.al);
        for m in 0..mx * my {
            if self.restart_interval > 0 && m > 0 && m.is_multiple_of(self.restart_interval) {
                r.restart();
                prog.eobrun = 0;
                for s in &scan.components {
                    img.comps[s.index].pred = 0;
                }
            }
            let (x, y) = (m % mx, m / mx);
            for (s, &(dc, ac)) in scan.components.iter().zip(&tables) {
                let c = &mut img.comps[s.index];
                // A lone component's MCU is one block; interleaved MCUs hold h × v of them.
                let (h, v) = if ns == 1 { (1, 1) } else { (c.h, c.v) };
                for by in y * v..(y + 1) * v {
                    for bx in x * h..(x + 1) * h {
                        let (dc, ac) = (dc.unwrap_or(&EMPTY), ac.unwrap_or(&EMPTY));
                        if pass == Pass::Sequential {
                            let any_ac =
                                huffman::decode_block(&mut r, dc, ac, &mut c.pred, &mut block);
                            let stride = c.pbw * 8;
                            let q = c.quant.as_ref().unwrap_or(&[0; 64]);
                            let out = &mut c.plane[by * 8 * stride + bx * 8..];
                            idct::idct_islow(&block, q, any_ac, out, stride);
                            continue;
                        }
                        let at = (by * c.pbw + bx) * 64;
                        let coefs = &mut c.coefs[at..at + 64];
                        match pass {
                            Pass::DcFirst => huffman::dc_first(&mut r, dc, &mut c.pred, al, coefs),
                            Pass::DcRefine => huffman::dc_refine(&mut r, al, coefs),
                            Pass::AcFirst => {
                                huffman::ac_first(&mut r, ac, &mut prog, ss, se, al, coefs)
                            }
                            Pass::AcRefine => {
                                huffman::ac_refine(&mut r, ac, &mut prog, ss, se, al, coefs)
                            }
                            Pass::Sequential => {}
                        }
                    }
                }
            }
            if x + 1 == mx && r.overran_eof() {
                return Err(JpegError::Truncated("inside a scan"));
            }
        }
        if r.overran_eof() {
            return Err(JpegError::Truncated("inside a scan"));
        }
        self.r.pos = r.pos;
        Ok(())
    }

    fn finish(self) -> Result<Decoded, JpegError> {
        let Some(mut img) = self.image else {
            return Err(JpegError::Corrupt("no frame header".into()));
        };
        if img.scans == 0 {
            return Err(JpegError::Corrupt("no scan".into()));
        }
        let (width, height) = (img.frame.width, img.frame.height);
        for c in &mut img.comps {
            if !img.frame.progressive && !c.scanned {
                // No scan covered it: mid-grey, as the all-zero blocks libjpeg keeps decode.
                c.plane.fill(128);
            }
        }
        if img.frame.progressive {
            for c in &mut img.comps {
                let stride = c.pbw * 8;
                c.plane = alloc(stride * c.pbh * 8)?;
                let q = c.quant.unwrap_or([0; 64]);
                for by in 0..c.bh {
                    for bx in 0..c.bw {
                        let at = (by * c.pbw + bx) * 64;
                        let Ok(block) = <&[i16; 64]>::try_from(&c.coefs[at..at + 64]) else {
                            continue;
                        };
                        let any_ac = block[1..].iter().any(|&k| k != 0);
                        let out = &mut c.plane[by * 8 * stride + bx * 8..];
                        idct::idct_islow(block, &q, any_ac, out, stride);
                    }
                }
                c.coefs = Vec::new();
            }
        }
        let channels = img.comps.len();
        let n = width * height;
        let mut pixels = alloc::<u8>(channels * n)?;
        for (c, out) in img.comps.iter().zip(pixels.chunks_exact_mut(n)) {
            let p = upsample::Plane {
                data: &c.plane,
                stride: c.pbw * 8,
                width: c.dw,
                height: c.dh,
            };
            upsample::upsample(&p, img.max_h / c.h, img.max_v / c.v, width, out);
        }
        if channels == 3 {
            let ids = [img.comps[0].id, img.comps[1].id, img.comps[2].id];
            // libjpeg's colour-space guess (jdapimin.c `default_decompress_parms`).
            let ycc = if self.jfif {
                true
            } else if let Some(t) = self.adobe {
                t != 0
            } else {
                ids != [b'R', b'G', b'B']
            };
            if ycc {
                let (y, rest) = pixels.split_at_mut(n);
                let (cb, cr) = rest.split_at_mut(n);
                color::ycc_to_rgb(y, cb, cr);
            }
        }
        Ok(Decoded {
            width,
            height,
            channels,
            pixels,
        })
    }
}

/// Stands in for a table a pass never reads.
static EMPTY: std::sync::LazyLock<HuffTable> = std::sync::LazyLock::new(|| {
    HuffTable::new(&[0; 16], &[]).unwrap_or_else(|_| unreachable!("an empty table is valid"))
});

/// The pass a scan's header asks for, rejecting the progressions libjpeg rejects.
fn scan_pass(scan: &Scan, progressive: bool) -> Result<Pass, JpegError> {
    if !progressive {
        // libjpeg only warns about odd Ss/Se/Ah/Al in a sequential scan and decodes it whole.
        return Ok(Pass::Sequential);
    }
    let (ss, se, ah, al) = (scan.ss, scan.se, scan.ah, scan.al);
    let dc = ss == 0;
    let bad = if dc {
        se != 0
    } else {
        ss > se || se > 63 || scan.components.len() != 1
    } || (ah != 0 && al + 1 != ah)
        || al > 13;
    if bad {
        return Err(JpegError::Corrupt(format!(
            "progressive scan Ss={ss} Se={se} Ah={ah} Al={al}"
        )));
    }
    Ok(match (dc, ah == 0) {
        (true, true) => Pass::DcFirst,
        (true, false) => Pass::DcRefine,
        (false, true) => Pass::AcFirst,
        (false, false) => Pass::AcRefine,
    })
}

impl Image {
    fn new(frame: Frame) -> Result<Self, JpegError> {
        let (w, h) = (frame.width, frame.height);
        let max_h = frame.components.iter().map(|c| c.h).max().unwrap_or(1);
        let max_v = frame.components.iter().map(|c| c.v).max().unwrap_or(1);
        if frame
            .components
            .iter()
            .any(|c| !max_h.is_multiple_of(c.h) || !max_v.is_multiple_of(c.v))
        {
            // libjpeg cannot upsample by a fractional ratio either.
            return Err(JpegError::Unsupported("non-integral sampling ratio".into()));
        }
        let mcux = w.div_ceil(8 * max_h);
        let mcuy = h.div_ceil(8 * max_v);
        let mut bytes = 0usize;
        for c in &frame.components {
            let blocks = mcux * c.h * mcuy * c.v;
            // A plane, its coefficients if progressive, and its upsampled copy.
            bytes += blocks * 64 * if frame.progressive { 3 } else { 1 } + w * h;
        }
        bytes += frame.components.len() * w * h;
        if w * h > MAX_PIXELS || bytes > MAX_BYTES {
            return Err(JpegError::TooLarge {
                width: w,
                height: h,
                bytes,
            });
        }
        let mut comps = Vec::with_capacity(frame.components.len());
        for c in &frame.components {
            let (pbw, pbh) = (mcux * c.h, mcuy * c.v);
            let (plane, coefs) = if frame.progressive {
                (Vec::new(), alloc(pbw * pbh * 64)?)
            } else {
                (alloc(pbw * pbh * 64)?, Vec::new())
            };
            comps.push(Component {
                id: c.id,
                h: c.h,
                v: c.v,
                tq: c.tq,
                bw: (w * c.h).div_ceil(8 * max_h),
                bh: (h * c.v).div_ceil(8 * max_v),
                pbw,
                pbh,
                dw: (w * c.h).div_ceil(max_h),
                dh: (h * c.v).div_ceil(max_v),
                quant: None,
                plane,
                coefs,
                pred: 0,
                scanned: false,
            });
        }
        Ok(Image {
            frame,
            comps,
            max_h,
            max_v,
            mcux,
            mcuy,
            scans: 0,
        })
    }
}
