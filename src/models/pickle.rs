//! A small, non-executing unpickler for PyTorch checkpoints.
//!
//! candle's own `pickle::Stack` is not used because it panics on some inputs a checkpoint can
//! hold (the legacy format's 10-byte magic number overflows its `LONG1` decoding in debug builds),
//! lacks the Python-2 string opcodes old checkpoints use, and copies memoised objects instead of
//! sharing them. This one decodes from a byte slice, checks every length against what is left,
//! and turns anything unexpected into an error with the byte offset.
//!
//! Nothing is ever called: `GLOBAL` yields a [`Value::Global`] and `REDUCE`/`NEWOBJ` a
//! [`Value::Call`], which the checkpoint reader interprets for the few callables it knows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Nesting deeper than this is refused: real checkpoints nest a handful of levels, and unbounded
/// nesting would overflow the stack when the value is walked or dropped.
const MAX_DEPTH: u32 = 200;

/// A dict's (key, value) pairs in insertion order.
pub type Entries = Vec<(Value, Value)>;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Node<Vec<Value>>>),
    /// Lists and dicts are shared and mutable, as in Python, so memoised references see the
    /// items added after they were memoised.
    List(Rc<Node<RefCell<Vec<Value>>>>),
    Dict(Rc<Node<RefCell<Entries>>>),
    Global {
        module: Rc<str>,
        name: Rc<str>,
    },
    /// `callable(*args)` from REDUCE or NEWOBJ, not evaluated.
    Call(Rc<Node<(Value, Value)>>),
    /// `obj.__setstate__(state)` from BUILD, not evaluated.
    Build(Rc<Node<(Value, Value)>>),
    PersistentId(Rc<Node<Value>>),
}

/// A container with its nesting depth, kept so depth checks cost O(1).
#[derive(Debug)]
pub struct Node<T> {
    depth: std::cell::Cell<u32>,
    pub items: T,
}

impl<T> Node<T> {
    fn new(depth: u32, items: T) -> Rc<Self> {
        Rc::new(Node {
            depth: std::cell::Cell::new(depth),
            items,
        })
    }
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(n) => n.depth.get(),
            Value::List(n) => n.depth.get(),
            Value::Dict(n) => n.depth.get(),
            Value::Call(n) | Value::Build(n) => n.depth.get(),
            Value::PersistentId(n) => n.depth.get(),
            _ => 0,
        }
    }

    /// A short description for error messages; never prints contents, which may be cyclic.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt(_) => "big int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) if s.len() <= 60 => format!("str {s:?}"),
            Value::Str(_) => "str".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(t) => format!("tuple of {}", t.items.len()),
            Value::List(l) => format!("list of {}", l.items.borrow().len()),
            Value::Dict(d) => format!("dict of {}", d.items.borrow().len()),
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Call(c) => format!("call of {}", c.items.0.kind()),
            Value::Build(b) => format!("build of {}", b.items.0.kind()),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    pub fn as_tuple(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(t) => Some(&t.items),
            _ => None,
        }
    }

    /// Tuples and lists alike (checkpoints use both for sequences).
    pub fn to_seq(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.items.clone()),
            Value::List(l) => Some(l.items.borrow().clone()),
            _ => None,
        }
    }

    /// Dict entries, in insertion order.
    pub fn dict_items(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.items.borrow().clone()),
            // An OrderedDict with attributes (torch's `_metadata`) arrives as BUILD on the dict.
            Value::Build(b) => b.items.0.dict_items(),
            _ => None,
        }
    }

    /// `(module, name)` if this is a global.
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("pickle at byte {offset}: {message}")]
pub struct PickleError {
    pub offset: usize,
    pub message: String,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(format!(
                "needs {n} more bytes but only {left} are left (truncated file?)"
            ));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn len_u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }
    fn len_u64(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.le()?)).map_err(|_| "length overflows".to_string())
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| "unterminated text argument (truncated file?)".to_string())?;
        self.pos += end + 1;
        let line = &rest[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        std::str::from_utf8(line).map_err(|_| "text argument is not UTF-8".to_string())
    }
}

struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn top(&self) -> Result<&Value, String> {
        self.stack
            .last()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| "no MARK on the stack".to_string())?;
        Ok(self.stack.split_off(mark))
    }
    fn push(&mut self, v: Value) -> Result<(), String> {
        if v.depth() > MAX_DEPTH {
            return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn memo_get(&self, key: u64) -> Result<Value, String> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo entry {key} is not defined"))
    }
    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
}

fn depth_of(items: &[Value]) -> u32 {
    1 + items.iter().map(Value::depth).max().unwrap_or(0)
}

fn tuple(items: Vec<Value>) -> Value {
    Value::Tuple(Node::new(depth_of(&items), items))
}

fn pair(a: Value, b: Value) -> Rc<Node<(Value, Value)>> {
    let d = 1 + a.depth().max(b.depth());
    Node::new(d, (a, b))
}

/// `callable(*args)` as an unevaluated value, for callers that unwrap nested rebuild calls.
pub fn call(callable: Value, args: Value) -> Value {
    Value::Call(pair(callable, args))
}

fn empty_dict() -> Value {
    Value::Dict(Node::new(1, RefCell::new(Vec::new())))
}

fn append_to(target: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::List(list) = target else {
        return Err(format!("APPEND(S) on a {}, not a list", target.kind()));
    };
    let d = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    list.depth.set(list.depth.get().max(d));
    if list.depth.get() > MAX_DEPTH {
        return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
    }
    list.items.borrow_mut().extend(items);
    Ok(())
}

fn set_items(target: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(dict) = target else {
        return Err(format!("SETITEM(S) on a {}, not a dict", target.kind()));
    };
    if !items.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of items".into());
    }
    let d = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    dict.depth.set(dict.depth.get().max(d));
    if dict.depth.get() > MAX_DEPTH {
        return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
    }
    let mut it = items.into_iter();
    let mut entries = dict.items.borrow_mut();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        // Python dicts keep one entry per key; the last assignment wins.
        if let Some(slot) = entries.iter_mut().find(|(ek, _)| same_key(ek, &k)) {
            slot.1 = v;
        } else {
            entries.push((k, v));
        }
    }
    Ok(())
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

/// `collections.OrderedDict()` is the one call evaluated, because SETITEMS must find a dict.
fn reduce(callable: Value, args: Value) -> Value {
    if let Some(("collections", "OrderedDict")) = callable.as_global() {
        if args.as_tuple().is_some_and(|a| a.is_empty()) {
            return empty_dict();
        }
    }
    Value::Call(pair(callable, args))
}

fn decode_long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt(bytes.into());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

fn parse_text_int(s: &str) -> Result<Value, String> {
    let s = s.trim_end_matches('L');
    match s {
        // Protocol 0 spells booleans as INT 01 / 00.
        "01" => Ok(Value::Bool(true)),
        "00" => Ok(Value::Bool(false)),
        _ => s
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| format!("bad integer literal {s:?}")),
    }
}

/// Unpickles one object starting at `data[start..]`; returns it and the offset just past STOP.
pub fn unpickle(data: &[u8], start: usize) -> Result<(Value, usize), PickleError> {
    let mut r = Reader {
        data,
        pos: start.min(data.len()),
    };
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let op_at = r.pos;
        match step(&mut r, &mut m) {
            Ok(true) => {
                let value = m.stack.pop().ok_or_else(|| PickleError {
                    offset: op_at,
                    message: "STOP with an empty stack".into(),
                })?;
                return Ok((value, r.pos));
            }
            Ok(false) => {}
            Err(message) => {
                return Err(PickleError {
                    offset: op_at,
                    message,
                })
            }
        }
    }
}

/// Executes one opcode; `Ok(true)` at STOP.
fn step(r: &mut Reader<'_>, m: &mut Machine) -> Result<bool, String> {
    let op = r.u8()?;
    match op {
        0x80 => {
            let proto = r.u8()?;
            if proto > 5 {
                return Err(format!("unsupported pickle protocol {proto}"));
            }
        }
        // FRAME: a framing hint only.
        0x95 => {
            r.take(8)?;
        }
        b'.' => return Ok(true),
        b'(' => m.marks.push(m.stack.len()),
        b'0' => {
            m.pop()?;
        }
        b'1' => {
            m.pop_mark()?;
        }
        b'2' => {
            let v = m.top()?.clone();
            m.push(v)?;
        }
        b'N' => m.push(Value::None)?,
        0x88 => m.push(Value::Bool(true))?,
        0x89 => m.push(Value::Bool(false))?,
        b'J' => m.push(Value::Int(i64::from(i32::from_le_bytes(r.le()?))))?,
        b'K' => m.push(Value::Int(i64::from(r.u8()?)))?,
        b'M' => m.push(Value::Int(i64::from(u16::from_le_bytes(r.le()?))))?,
        0x8a => {
            let n = usize::from(r.u8()?);
            let v = decode_long(r.take(n)?);
            m.push(v)?;
        }
        0x8b => {
            let n = r.len_u32()?;
            let v = decode_long(r.take(n)?);
            m.push(v)?;
        }
        b'I' | b'L' => {
            let v = parse_text_int(r.line()?)?;
            m.push(v)?;
        }
        b'G' => m.push(Value::Float(f64::from_be_bytes(r.le()?)))?,
        b'F' => {
            let s = r.line()?;
            let f = s
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("bad float literal {s:?}"))?;
            m.push(Value::Float(f))?;
        }
        b'X' | 0x8c | 0x8d => {
            let n = match op {
                b'X' => r.len_u32()?,
                0x8c => usize::from(r.u8()?),
                _ => r.len_u64()?,
            };
            let s = std::str::from_utf8(r.take(n)?).map_err(|_| "string is not UTF-8")?;
            m.push(Value::Str(s.into()))?;
        }
        // Python 2 `str`: bytes that old checkpoints use for ASCII names.
        b'T' | b'U' => {
            let n = if op == b'T' {
                r.len_u32()?
            } else {
                usize::from(r.u8()?)
            };
            let s = String::from_utf8_lossy(r.take(n)?).into_owned();
            m.push(Value::Str(s.into()))?;
        }
        b'B' | b'C' | 0x8e => {
            let n = match op {
                b'B' => r.len_u32()?,
                b'C' => usize::from(r.u8()?),
                _ => r.len_u64()?,
            };
            m.push(Value::Bytes(r.take(n)?.into()))?;
        }
        b')' => m.push(tuple(Vec::new()))?,
        b't' => {
            let items = m.pop_mark()?;
            m.push(tuple(items))?;
        }
        0x85..=0x87 => {
            let n = usize::from(op - 0x84);
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(m.pop()?);
            }
            items.reverse();
            m.push(tuple(items))?;
        }
        b']' => m.push(Value::List(Node::new(1, RefCell::new(Vec::new()))))?,
        b'l' => {
            let items = m.pop_mark()?;
            let d = depth_of(&items);
            m.push(Value::List(Node::new(d, RefCell::new(items))))?;
        }
        b'a' => {
            let v = m.pop()?;
            append_to(m.top()?, vec![v])?;
        }
        b'e' => {
            let items = m.pop_mark()?;
            append_to(m.top()?, items)?;
        }
        b'}' => m.push(empty_dict())?,
        b'd' => {
            let items = m.pop_mark()?;
            let dict = empty_dict();
            set_items(&dict, items)?;
            m.push(dict)?;
        }
        b's' => {
            let v = m.pop()?;
            let k = m.pop()?;
            set_items(m.top()?, vec![k, v])?;
        }
        b'u' => {
            let items = m.pop_mark()?;
            set_items(m.top()?, items)?;
        }
        b'c' => {
            let module = r.line()?.into();
            let name = r.line()?.into();
            m.push(Value::Global { module, name })?;
        }
        0x93 => {
            let name = m.pop()?;
            let module = m.pop()?;
            match (module, name) {
                (Value::Str(module), Value::Str(name)) => m.push(Value::Global { module, name })?,
                _ => return Err("STACK_GLOBAL needs two strings".into()),
            }
        }
        b'R' | 0x81 => {
            let args = m.pop()?;
            let callable = m.pop()?;
            m.push(reduce(callable, args))?;
        }
        b'b' => {
            let state = m.pop()?;
            let obj = m.pop()?;
            // Keep dicts as dicts: their state is attributes such as torch's `_metadata`.
            let v = match obj {
                Value::Dict(_) => obj,
                obj => Value::Build(pair(obj, state)),
            };
            m.push(v)?;
        }
        b'Q' => {
            let id = m.pop()?;
            let d = 1 + id.depth();
            m.push(Value::PersistentId(Node::new(d, id)))?;
        }
        b'P' => {
            let id = Value::Str(r.line()?.into());
            m.push(Value::PersistentId(Node::new(1, id)))?;
        }
        b'h' => {
            let v = m.memo_get(u64::from(r.u8()?))?;
            m.push(v)?;
        }
        b'j' => {
            let v = m.memo_get(u64::from(u32::from_le_bytes(r.le()?)))?;
            m.push(v)?;
        }
        b'g' => {
            let s = r.line()?;
            let key = s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("bad memo key {s:?}"))?;
            let v = m.memo_get(key)?;
            m.push(v)?;
        }
        b'q' => m.memo_put(u64::from(r.u8()?))?,
        b'r' => m.memo_put(u64::from(u32::from_le_bytes(r.le()?)))?,
        b'p' => {
            let s = r.line()?;
            let key = s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("bad memo key {s:?}"))?;
            m.memo_put(key)?;
        }
        0x94 => {
            let key = m.memo.len() as u64;
            m.memo_put(key)?;
        }
        other => return Err(format!("unsupported or invalid opcode 0x{other:02x}")),
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value, PickleError> {
        unpickle(bytes, 0).map(|(v, _)| v)
    }

    #[test]
    fn decodes_legacy_magic_number_as_big_int() {
        // The first pickle of every legacy torch checkpoint: LONG1 with 10 bytes.
        let bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        let (v, end) = unpickle(bytes, 0).expect("magic");
        assert_eq!(end, bytes.len());
        match v {
            Value::BigInt(b) => assert_eq!(&b[..], &bytes[4..14]),
            other => panic!("expected big int, got {}", other.kind()),
        }
    }

    #[test]
    fn small_longs_and_negative_numbers() {
        assert_eq!(
            run(b"\x8a\x02\xe9\x03.").expect("long").as_int(),
            Some(1001)
        );
        assert_eq!(run(b"\x8a\x01\xff.").expect("long").as_int(), Some(-1));
        assert_eq!(
            run(b"J\xff\xff\xff\xff.").expect("binint").as_int(),
            Some(-1)
        );
        assert_eq!(run(b"I01\n.").expect("int").as_int(), Some(1));
    }

    #[test]
    fn memo_shares_mutable_dicts() {
        // d = {}; memo[0] = d; d['a'] = 1; result = (d, memo[0])
        let v = run(b"}q\x00X\x01\x00\x00\x00aK\x01sh\x00\x86.").expect("pickle");
        let items = v.as_tuple().expect("tuple");
        assert_eq!(items[1].dict_items().expect("dict").len(), 1);
    }

    #[test]
    fn errors_not_panics_on_bad_input() {
        for bad in [
            &b""[..],
            b"\x80",
            b"\x80\x02X\xff\xff\xff\xff",
            b"h\x05.",
            b"t.",
            b"0.",
            b"K\x01s.",
            b"\xfe",
            b"(((((((",
            b"\x8b\xff\xff\xff\x7f",
            b"cfoo",
        ] {
            assert!(run(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = b"N".to_vec();
        bytes.extend(std::iter::repeat_n(0x85u8, 10_000));
        bytes.push(b'.');
        let e = run(&bytes).expect_err("too deep");
        assert!(e.message.contains("nested deeper"), "{e}");
    }
}
