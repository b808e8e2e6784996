//! Entropy decoding: the bit reader over a scan's byte-stuffed data, Huffman tables with a
//! lookahead table, and the baseline and progressive (DC/AC, first/refine) block decoders.
//!
//! Corrupt data is decoded the way libjpeg decodes it rather than rejected, because Pillow
//! (libjpeg) only warns: a bad code reads as symbol 0, run lengths past the end land on
//! coefficient 63, and bits past a marker read as zeros.

use super::marker::NATURAL_ORDER;
use super::JpegError;

/// Codes up to this length resolve with one table lookup.
const LOOKAHEAD: u32 = 9;

#[derive(Clone, Debug)]
pub(super) struct HuffTable {
    /// `length << 8 | symbol` for every code of at most `LOOKAHEAD` bits, indexed by the next
    /// `LOOKAHEAD` bits of the stream; 0 where the code is longer.
    lookup: Vec<u16>,
    /// Largest code of each length (-1 if none); index 17 is a sentinel above every code.
    maxcode: [i32; 18],
    /// Added to a code of each length to index `values`.
    valoffset: [i32; 17],
    values: [u8; 256],
    /// For AC tables: `value << 16 | run << 8 | bits` when a code and the value bits after it
    /// both fit in the next `LOOKAHEAD` bits, so a whole coefficient takes one lookup; 0
    /// otherwise (EOB, ZRL and longer codes go the ordinary way).
    ac_fast: Vec<i32>,
    /// Whether every symbol is a valid DC category (at most 15): libjpeg rejects a table used
    /// for DC that is not.
    pub dc_ok: bool,
}

impl HuffTable {
    /// `counts[l - 1]` codes of length `l`, assigned canonically to `symbols` in order.
    pub fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Self, JpegError> {
        let mut values = [0u8; 256];
        values[..symbols.len()].copy_from_slice(symbols);
        let mut lookup = vec![0u16; 1 << LOOKAHEAD];
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            if n > 0 {
                valoffset[len] = k as i32 - code;
                for _ in 0..n {
                    if len as u32 <= LOOKAHEAD {
                        let shift = LOOKAHEAD - len as u32;
                        let first = (code as usize) << shift;
                        let entry = (len as u16) << 8 | u16::from(values[k]);
                        lookup[first..first + (1 << shift)].fill(entry);
                    }
                    code += 1;
                    k += 1;
                }
                maxcode[len] = code - 1;
            }
            // A code that no longer fits in `len` bits means the counts over-fill the tree.
            if code >= 1 << len {
                return Err(JpegError::Corrupt("Huffman table over-subscribed".into()));
            }
            code <<= 1;
        }
        maxcode[17] = i32::MAX;
        let mut ac_fast = vec![0i32; 1 << LOOKAHEAD];
        for (look, fast) in ac_fast.iter_mut().enumerate() {
            let entry = lookup[look];
            let (len, rs) = (u32::from(entry >> 8), entry & 0xFF);
            let (run, size) = (i32::from(rs >> 4), u32::from(rs & 15));
            if entry == 0 || size == 0 || len + size > LOOKAHEAD {
                continue;
            }
            let bits = (look as u32 >> (LOOKAHEAD - len - size)) & ((1 << size) - 1);
            let value = extend(bits as i32, size);
            *fast = value << 16 | run << 8 | (len + size) as i32;
        }
        Ok(HuffTable {
            lookup,
            maxcode,
            valoffset,
            values,
            ac_fast,
            dc_ok: symbols.iter().all(|&s| s <= 15),
        })
    }
}

/// The signed value that `s` magnitude bits `v` stand for (JPEG's EXTEND).
#[inline]
fn extend(v: i32, s: u32) -> i32 {
    if v < 1 << (s - 1) {
        v - (1 << s) + 1
    } else {
        v
    }
}

/// Reads bits MSB first from entropy-coded data, undoing 0xFF 0x00 stuffing and stopping at
/// the first marker; past a marker or the end of the file it supplies zero bits.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pub pos: usize,
    /// Valid bits are the top `bits` bits.
    buf: u64,
    bits: u32,
    /// Zero bits appended because the file ended (not because a marker came).
    eof_pad: u64,
    stopped: bool,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            buf: 0,
            bits: 0,
            eof_pad: 0,
            stopped: false,
        }
    }

    fn refill(&mut self) {
        // Fast path: eight bytes at once when none of them is 0xFF (no stuffing, no marker).
        if !self.stopped {
            if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
                let word = u64::from_be_bytes(chunk.try_into().unwrap_or([0xFF; 8]));
                let inverted = !word;
                let has_ff = inverted.wrapping_sub(0x0101_0101_0101_0101)
                    & !inverted
                    & 0x8080_8080_8080_8080;
                if has_ff == 0 {
                    let n = (64 - self.bits) / 8;
                    let taken = word & (!0u64 << (64 - 8 * n));
                    self.buf |= taken >> self.bits;
                    self.bits += 8 * n;
                    self.pos += n as usize;
                    return;
                }
            }
        }
        while self.bits <= 56 {
            let byte = if self.stopped {
                None
            } else {
                match self.data.get(self.pos) {
                    Some(&0xFF) => {
                        // Fill bytes (more 0xFF) may precede the 0x00 of a stuffed 0xFF.
                        let mut next = self.pos + 1;
                        while self.data.get(next) == Some(&0xFF) {
                            next += 1;
                        }
                        match self.data.get(next) {
                            Some(0x00) => {
                                self.pos = next + 1;
                                Some(0xFF)
                            }
                            // A marker: leave `pos` on it for the marker parser.
                            Some(_) => {
                                self.pos = next - 1;
                                None
                            }
                            None => {
                                self.pos = self.data.len();
                                None
                            }
                        }
                    }
                    Some(&b) => {
                        self.pos += 1;
                        Some(b)
                    }
                    None => None,
                }
            };
            match byte {
                Some(b) => self.buf |= u64::from(b) << (56 - self.bits),
                None => {
                    self.stopped = true;
                    if self.pos >= self.data.len() {
                        self.eof_pad += 8;
                    }
                }
            }
            self.bits += 8;
        }
    }

    /// Whether decoding used bits that the file does not have (it ends mid-scan).
    pub fn overran_eof(&self) -> bool {
        self.eof_pad > u64::from(self.bits)
    }

    #[inline]
    fn peek(&mut self, n: u32) -> u32 {
        if self.bits < n {
            self.refill();
        }
        (self.buf >> (64 - n)) as u32
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.bits -= n;
    }

    #[inline]
    pub fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    #[inline]
    pub fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    /// `s` more bits as a signed magnitude of category `s` (JPEG's EXTEND).
    #[inline]
    pub fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        extend(self.bits(s) as i32, s)
    }

    #[inline]
    pub fn decode(&mut self, t: &HuffTable) -> u8 {
        let look = self.peek(16) >> (16 - LOOKAHEAD);
        let entry = t.lookup[look as usize];
        if entry != 0 {
            self.consume(u32::from(entry >> 8));
            return entry as u8;
        }
        let mut len = LOOKAHEAD as usize + 1;
        let mut code = (self.buf >> (64 - len)) as i32;
        while code > t.maxcode[len] {
            len += 1;
            code = (self.buf >> (64 - len)) as i32;
        }
        if len > 16 {
            // libjpeg's "bad Huffman code" warning: the symbol reads as 0.
            self.consume(16);
            return 0;
        }
        self.consume(len as u32);
        t.values[(code + t.valoffset[len]) as usize & 0xFF]
    }

    /// Drops buffered bits and moves past an RSTn marker if one is next, as at the end of
    /// each restart interval. Anything other than RSTn stays put, so the following MCUs
    /// read as zeros, which is how libjpeg recovers.
    pub fn restart(&mut self) {
        self.buf = 0;
        self.bits = 0;
        self.stopped = false;
        self.eof_pad = 0;
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xFF {
                match self.data[p + 1] {
                    0xD0..=0xD7 => {
                        self.pos = p + 2;
                        return;
                    }
                    0x00 | 0xFF => p += 1,
                    _ => {
                        self.pos = p;
                        return;
                    }
                }
            } else {
                p += 1;
            }
        }
        self.pos = self.data.len();
    }
}

/// One baseline block in natural order; returns whether any AC coefficient is set.
#[inline]
pub(super) fn decode_block(
    r: &mut BitReader,
    dc: &HuffTable,
    ac: &HuffTable,
    pred: &mut i32,
    block: &mut [i16; 64],
) -> bool {
    *block = [0; 64];
    let s = u32::from(r.decode(dc));
    *pred = pred.wrapping_add(r.receive_extend(s));
    block[0] = *pred as i16;
    let mut any_ac = false;
    let mut k = 1;
    while k < 64 {
        let fast = ac.ac_fast[(r.peek(16) >> (16 - LOOKAHEAD)) as usize];
        if fast != 0 {
            r.consume((fast & 0xFF) as u32);
            k += ((fast >> 8) & 0xFF) as usize;
            block[NATURAL_ORDER[k]] = (fast >> 16) as i16;
            any_ac = true;
            k += 1;
            continue;
        }
        let rs = r.decode(ac);
        let (run, s) = (usize::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += run;
            block[NATURAL_ORDER[k]] = r.receive_extend(s) as i16;
            any_ac = true;
        } else if run == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
    any_ac
}

/// Progressive state that persists across the blocks of a scan.
pub(super) struct Progressive {
    pub eobrun: u32,
}

pub(super) fn dc_first(
    r: &mut BitReader,
    dc: &HuffTable,
    pred: &mut i32,
    al: u8,
    block: &mut [i16],
) {
    let s = u32::from(r.decode(dc));
    *pred = pred.wrapping_add(r.receive_extend(s));
    block[0] = pred.wrapping_shl(u32::from(al)) as i16;
}

pub(super) fn dc_refine(r: &mut BitReader, al: u8, block: &mut [i16]) {
    if r.bit() {
        block[0] |= 1 << al;
    }
}

pub(super) fn ac_first(
    r: &mut BitReader,
    ac: &HuffTable,
    st: &mut Progressive,
    ss: usize,
    se: usize,
    al: u8,
    block: &mut [i16],
) {
    if st.eobrun > 0 {
        st.eobrun -= 1;
        return;
    }
    let mut k = ss;
    while k <= se {
        let rs = r.decode(ac);
        let (run, s) = (u32::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += run as usize;
            let v = r.receive_extend(s);
            block[NATURAL_ORDER[k]] = v.wrapping_shl(u32::from(al)) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            st.eobrun = (1 << run) + r.bits(run) - 1;
            break;
        }
        k += 1;
    }
}

/// Adds the refinement bit to an already nonzero coefficient, away from zero.
#[inline]
fn refine(r: &mut BitReader, coef: &mut i16, p1: i16) {
    if r.bit() && *coef & p1 == 0 {
        *coef = if *coef >= 0 {
            coef.wrapping_add(p1)
        } else {
            coef.wrapping_sub(p1)
        };
    }
}

pub(super) fn ac_refine(
    r: &mut BitReader,
    ac: &HuffTable,
    st: &mut Progressive,
    ss: usize,
    se: usize,
    al: u8,
    block: &mut [i16],
) {
    let p1: i16 = 1i16.wrapping_shl(u32::from(al));
    let mut k = ss;
    if st.eobrun == 0 {
        while k <= se {
            let rs = r.decode(ac);
            let (mut run, s) = (i32::from(rs >> 4), rs & 15);
            let mut value = 0i16;
            if s != 0 {
                // Any size other than 1 is corrupt; libjpeg warns and treats it as 1.
                value = if r.bit() { p1 } else { p1.wrapping_neg() };
            } else if run != 15 {
                st.eobrun = (1 << run) + r.bits(run as u32);
                break;
            }
            // Skip `run` zero coefficients, refining the nonzero ones passed on the way.
            while k <= se {
                let coef = &mut block[NATURAL_ORDER[k]];
                if *coef != 0 {
                    refine(r, coef, p1);
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 {
                block[NATURAL_ORDER[k]] = value;
            }
            k += 1;
        }
    }
    if st.eobrun > 0 {
        while k <= se {
            let coef = &mut block[NATURAL_ORDER[k]];
            if *coef != 0 {
                refine(r, coef, p1);
            }
            k += 1;
        }
        st.eobrun -= 1;
    }
}
