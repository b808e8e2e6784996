//! The JPEG header segments: frame (SOF), tables (DQT, DHT), restart interval (DRI), scan (SOS)
//! and the two application markers that decide the colour space (JFIF APP0, Adobe APP14).

use super::huffman::HuffTable;
use super::JpegError;

/// Zigzag position → natural (row-major) position, with 16 extra entries of 63: libjpeg
/// lets a corrupt run length carry the index past 63 and writes those to the last
/// coefficient, so doing the same keeps corrupt files decoding as Pillow decodes them.
pub(super) const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

/// Largest sampling factor libjpeg accepts.
const MAX_SAMP: u8 = 4;

#[derive(Clone, Debug)]
pub(super) struct FrameComponent {
    pub id: u8,
    pub h: usize,
    pub v: usize,
    pub tq: usize,
}

#[derive(Clone, Debug)]
pub(super) struct Frame {
    pub progressive: bool,
    pub width: usize,
    pub height: usize,
    pub components: Vec<FrameComponent>,
}

#[derive(Clone, Debug)]
pub(super) struct ScanComponent {
    /// Index into `Frame::components`.
    pub index: usize,
    pub dc_table: usize,
    pub ac_table: usize,
}

#[derive(Clone, Debug)]
pub(super) struct Scan {
    pub components: Vec<ScanComponent>,
    pub ss: usize,
    pub se: usize,
    pub ah: u8,
    pub al: u8,
}

/// Cursor over the whole file; segments are borrowed slices of it.
pub(super) struct Reader<'a> {
    pub data: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    /// Finds the next marker from `pos`, skipping stray bytes the way libjpeg does (it warns
    /// and carries on), and leaves `pos` just after it. `None` at the end of the file.
    pub fn next_marker(&mut self) -> Option<u8> {
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] != 0xFF {
                self.pos += 1;
                continue;
            }
            let code = self.data[self.pos + 1];
            // 0xFF 0x00 is a stuffed data byte and 0xFF 0xFF fill; neither is a marker.
            if code == 0x00 || code == 0xFF {
                self.pos += 1;
                continue;
            }
            self.pos += 2;
            return Some(code);
        }
        self.pos = self.data.len();
        None
    }

    /// The payload of a segment that starts at `pos` with its two-byte length.
    pub fn segment(&mut self) -> Result<&'a [u8], JpegError> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        if rest.len() < 2 {
            return Err(JpegError::Truncated("inside a marker segment"));
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if len < 2 {
            return Err(JpegError::Corrupt(format!("marker segment length {len}")));
        }
        if rest.len() < len {
            return Err(JpegError::Truncated("inside a marker segment"));
        }
        self.pos += len;
        Ok(&rest[2..len])
    }
}

fn short(what: &str) -> JpegError {
    JpegError::Corrupt(format!("{what} segment too short"))
}

/// Why a start-of-frame marker other than SOF0–SOF2 cannot be decoded here.
pub(super) fn unsupported_frame(marker: u8) -> Option<&'static str> {
    match marker {
        0xC3 => Some("lossless JPEG (SOF3)"),
        0xC5..=0xC7 => Some("hierarchical JPEG (SOF5–SOF7)"),
        0xC8 => Some("reserved JPG frame marker"),
        0xC9..=0xCB | 0xCD..=0xCF => Some("arithmetic coding (SOF9–SOF15)"),
        _ => None,
    }
}

pub(super) fn parse_sof(seg: &[u8], progressive: bool) -> Result<Frame, JpegError> {
    if seg.len() < 6 {
        return Err(short("SOF"));
    }
    let precision = seg[0];
    if precision != 8 {
        return Err(JpegError::Unsupported(format!(
            "{precision}-bit sample precision"
        )));
    }
    let height = usize::from(u16::from_be_bytes([seg[1], seg[2]]));
    let width = usize::from(u16::from_be_bytes([seg[3], seg[4]]));
    if height == 0 {
        // The height would come later in a DNL marker, which libjpeg does not support either.
        return Err(JpegError::Unsupported(
            "height defined by a DNL marker".into(),
        ));
    }
    if width == 0 {
        return Err(JpegError::Corrupt("zero image width".into()));
    }
    let n = usize::from(seg[5]);
    if seg.len() < 6 + 3 * n {
        return Err(short("SOF"));
    }
    match n {
        1 | 3 => {}
        4 => {
            return Err(JpegError::Unsupported(
                "4-component (CMYK/YCCK) JPEG".into(),
            ))
        }
        0 => return Err(JpegError::Corrupt("frame with no components".into())),
        _ => return Err(JpegError::Unsupported(format!("{n}-component JPEG"))),
    }
    let mut components: Vec<FrameComponent> = Vec::with_capacity(n);
    for c in seg[6..6 + 3 * n].chunks_exact(3) {
        let (h, v, tq) = (c[1] >> 4, c[1] & 15, c[2]);
        if !(1..=MAX_SAMP).contains(&h) || !(1..=MAX_SAMP).contains(&v) {
            return Err(JpegError::Corrupt(format!("sampling factors {h}×{v}")));
        }
        if tq > 3 {
            return Err(JpegError::Corrupt(format!("quantization table {tq}")));
        }
        if components.iter().any(|o| o.id == c[0]) {
            return Err(JpegError::Corrupt(format!("component id {} twice", c[0])));
        }
        components.push(FrameComponent {
            id: c[0],
            h: usize::from(h),
            v: usize::from(v),
            tq: usize::from(tq),
        });
    }
    Ok(Frame {
        progressive,
        width,
        height,
        components,
    })
}

/// Stores each table in natural order, so the IDCT can multiply position by position.
pub(super) fn parse_dqt(
    mut seg: &[u8],
    tables: &mut [Option<[u16; 64]>; 4],
) -> Result<(), JpegError> {
    while let Some((&pq_tq, rest)) = seg.split_first() {
        let (pq, tq) = (pq_tq >> 4, usize::from(pq_tq & 15));
        if tq > 3 || pq > 1 {
            return Err(JpegError::Corrupt(format!(
                "DQT table {tq}, precision {pq}"
            )));
        }
        let size = if pq == 0 { 64 } else { 128 };
        if rest.len() < size {
            return Err(short("DQT"));
        }
        let mut table = [0u16; 64];
        for (k, &pos) in NATURAL_ORDER[..64].iter().enumerate() {
            table[pos] = if pq == 0 {
                u16::from(rest[k])
            } else {
                u16::from_be_bytes([rest[2 * k], rest[2 * k + 1]])
            };
        }
        tables[tq] = Some(table);
        seg = &rest[size..];
    }
    Ok(())
}

pub(super) fn parse_dht(
    mut seg: &[u8],
    dc: &mut [Option<HuffTable>; 4],
    ac: &mut [Option<HuffTable>; 4],
) -> Result<(), JpegError> {
    while !seg.is_empty() {
        if seg.len() < 17 {
            return Err(short("DHT"));
        }
        let (tc, th) = (seg[0] >> 4, usize::from(seg[0] & 15));
        if tc > 1 || th > 3 {
            return Err(JpegError::Corrupt(format!("DHT class {tc}, table {th}")));
        }
        let mut counts = [0u8; 16];
        counts.copy_from_slice(&seg[1..17]);
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total > 256 || seg.len() < 17 + total {
            return Err(JpegError::Corrupt("DHT symbol count".into()));
        }
        let table = HuffTable::new(&counts, &seg[17..17 + total])?;
        if tc == 0 {
            dc[th] = Some(table);
        } else {
            ac[th] = Some(table);
        }
        seg = &seg[17 + total..];
    }
    Ok(())
}

pub(super) fn parse_dri(seg: &[u8]) -> Result<usize, JpegError> {
    match seg {
        [a, b, ..] => Ok(usize::from(u16::from_be_bytes([*a, *b]))),
        _ => Err(short("DRI")),
    }
}

pub(super) fn parse_sos(seg: &[u8], frame: &Frame) -> Result<Scan, JpegError> {
    let n = usize::from(*seg.first().ok_or_else(|| short("SOS"))?);
    if !(1..=4).contains(&n) {
        return Err(JpegError::Corrupt(format!("{n} components in a scan")));
    }
    if seg.len() < 1 + 2 * n + 3 {
        return Err(short("SOS"));
    }
    let mut components: Vec<ScanComponent> = Vec::with_capacity(n);
    for c in seg[1..1 + 2 * n].chunks_exact(2) {
        let index = frame
            .components
            .iter()
            .position(|f| f.id == c[0])
            .ok_or_else(|| JpegError::Corrupt(format!("scan names unknown component {}", c[0])))?;
        if components.iter().any(|o| o.index == index) {
            return Err(JpegError::Corrupt(format!(
                "component {} twice in a scan",
                c[0]
            )));
        }
        let (td, ta) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
        if td > 3 || ta > 3 {
            return Err(JpegError::Corrupt(format!("Huffman tables {td}/{ta}")));
        }
        components.push(ScanComponent {
            index,
            dc_table: td,
            ac_table: ta,
        });
    }
    let p = &seg[1 + 2 * n..];
    Ok(Scan {
        components,
        ss: usize::from(p[0]),
        se: usize::from(p[1]),
        ah: p[2] >> 4,
        al: p[2] & 15,
    })
}

/// Whether an APP0 payload is a JFIF header (which libjpeg takes to mean YCbCr).
pub(super) fn is_jfif(seg: &[u8]) -> bool {
    seg.len() >= 14 && seg.starts_with(b"JFIF\0")
}

/// The colour transform flag of an Adobe APP14 payload.
pub(super) fn adobe_transform(seg: &[u8]) -> Option<u8> {
    (seg.len() >= 12 && seg.starts_with(b"Adobe")).then(|| seg[11])
}
