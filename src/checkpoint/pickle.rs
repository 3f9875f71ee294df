//! A restricted reader for the pickles inside PyTorch checkpoints.
//!
//! A pickle is a program for a small stack machine whose `GLOBAL` + `REDUCE`
//! opcodes call any Python function by name; that is how a malicious `.ckpt`
//! runs code. This reader is not Python: it *interprets* the opcodes into plain
//! data, and a "call" only builds a [`Value`] describing it. There is nothing
//! here that could execute code, by construction. On top of that, any global
//! outside the short list of names that rebuild tensors and containers is
//! refused outright, so a file that asks for `os.system` is rejected before
//! anything else in it is looked at.

use std::collections::HashMap;
use std::rc::Rc;

use tch::Kind;

/// What a checkpoint's pickle describes, as data.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<Vec<Value>>),
    /// Insertion-ordered, as Python dicts are.
    Dict(Rc<Vec<(Value, Value)>>),
    /// An allowed global, not yet called.
    Global(Global),
    /// A storage named by `BINPERSID`: its data lives in the archive under `data/<key>`.
    Storage(StorageRef),
    /// The result of `_rebuild_tensor_v2` / `_rebuild_parameter`.
    Tensor(TensorRef),
    /// The result of calling or building an allowed, data-only object whose content
    /// does not matter to us (`global_step` as a numpy scalar, a Lightning callback's state).
    Opaque(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Global {
    RebuildTensor,
    RebuildParameter,
    OrderedDict,
    /// `torch.FloatStorage` and friends: the storage's element type.
    StorageType(Kind),
    /// A `torch.float16`-style dtype object.
    Dtype(Kind),
    /// A name allowed because real checkpoints carry it as plain data (see [`allowed_global`]).
    Inert(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("its pickle asks for `{0}`, which could run code")]
    ForbiddenGlobal(String),
    #[error("its pickle is malformed ({0})")]
    Malformed(String),
    #[error("its pickle uses opcode 0x{0:02x}, which this reader does not support")]
    UnsupportedOpcode(u8),
}

fn malformed(msg: impl Into<String>) -> PickleError {
    PickleError::Malformed(msg.into())
}

/// The globals a state dict needs. Everything else is refused.
fn allowed_global(module: &str, name: &str) -> Option<Global> {
    let storage = |n: &str| -> Option<Kind> {
        Some(match n {
            "FloatStorage" => Kind::Float,
            "HalfStorage" => Kind::Half,
            "BFloat16Storage" => Kind::BFloat16,
            "DoubleStorage" => Kind::Double,
            "LongStorage" => Kind::Int64,
            "IntStorage" => Kind::Int,
            "ShortStorage" => Kind::Int16,
            "CharStorage" => Kind::Int8,
            "ByteStorage" => Kind::Uint8,
            "BoolStorage" => Kind::Bool,
            _ => return None,
        })
    };
    let dtype = |n: &str| -> Option<Kind> {
        Some(match n {
            "float32" | "float" => Kind::Float,
            "float16" | "half" => Kind::Half,
            "bfloat16" => Kind::BFloat16,
            "float64" | "double" => Kind::Double,
            "int64" | "long" => Kind::Int64,
            "int32" | "int" => Kind::Int,
            "int16" | "short" => Kind::Int16,
            "int8" => Kind::Int8,
            "uint8" => Kind::Uint8,
            "bool" => Kind::Bool,
            _ => return None,
        })
    };
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            Some(Global::RebuildParameter)
        }
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch", "Size") => Some(Global::Inert("torch.Size")),
        ("torch", n) => storage(n).map(Global::StorageType).or_else(|| dtype(n).map(Global::Dtype)),
        // Plain data found in real Stable Diffusion .ckpt files (as A1111 also allows):
        // `global_step` as a numpy scalar, Lightning's checkpoint callback state, sets.
        ("numpy.core.multiarray", "scalar") | ("numpy._core.multiarray", "scalar") => Some(Global::Inert("numpy scalar")),
        ("numpy", "dtype") => Some(Global::Inert("numpy dtype")),
        ("_codecs", "encode") => Some(Global::Inert("bytes")),
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => Some(Global::Inert("ModelCheckpoint")),
        ("builtins", "set") | ("__builtin__", "set") => Some(Global::Inert("set")),
        _ => None,
    }
}

/// Interprets a pickle (the opcodes `torch.save` writes, protocols 2–5) into data;
/// `BINPERSID` ids become [`Value::Storage`] references into the archive.
pub fn read(bytes: &[u8]) -> Result<Value, PickleError> {
    Machine { bytes, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    /// Memo values are copies: containers are shared copy-on-write, so a container
    /// fetched from the memo shows its content at memoization time. State dicts never
    /// rely on later mutation being visible through the memo.
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| malformed("it ends early"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| malformed("a text argument has no end"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| malformed("a text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?;
        Ok(Value::Str(std::str::from_utf8(b).map_err(|_| malformed("a string is not UTF-8"))?.to_string()))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| malformed("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        self.stack.last_mut().ok_or_else(|| malformed("stack underflow"))
    }

    /// Everything pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self.marks.pop().ok_or_else(|| malformed("no MARK"))?;
        if at > self.stack.len() {
            return Err(malformed("MARK above the stack"));
        }
        Ok(self.stack.split_off(at))
    }

    fn memo_get(&mut self, i: u32) -> Result<(), PickleError> {
        let v = self.memo.get(&i).cloned().ok_or_else(|| malformed(format!("memo entry {i} is not set")))?;
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, i: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let g = allowed_global(module, name).ok_or_else(|| PickleError::ForbiddenGlobal(format!("{module}.{name}")))?;
        self.stack.push(Value::Global(g));
        Ok(())
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(malformed(format!("protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.u64()?;
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(Vec::new()))),
                b']' => self.stack.push(Value::List(Rc::new(Vec::new()))),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                0x8f => self.stack.push(Value::Opaque("set".into())), // EMPTY_SET
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Rc::new(pairs(items)?)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(items)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![(k, v)])?;
                }
                b'u' => {
                    let items = pairs(self.pop_mark()?)?;
                    set_items(self.top()?, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    append(self.top()?, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    append(self.top()?, items)?;
                }
                0x90 => {
                    // ADDITEMS (to a set): contents do not matter to us
                    self.pop_mark()?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let i = self.line()?.trim().parse().map_err(|_| malformed("bad PUT index"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'g' => {
                    let i = self.line()?.trim().parse().map_err(|_| malformed("bad GET index"))?;
                    self.memo_get(i)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    self.stack.push(Value::Int(long_from_bytes(b)?));
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().map_err(|_| malformed("bad INT"))?),
                    };
                    self.stack.push(v);
                }
                b'G' => {
                    let v = f64::from_bits(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| malformed("float"))?));
                    self.stack.push(Value::Float(v));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| malformed("string too long"))?;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                0x8e => {
                    let n = usize::try_from(self.u64()?).map_err(|_| malformed("bytes too long"))?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => return Err(malformed("STACK_GLOBAL without names")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callee = self.pop()?;
                    let v = call(callee, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let callee = self.pop()?;
                    let v = call(callee, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callee = self.pop()?;
                    let v = call(callee, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: object state (a state dict's `_metadata`, a callback's fields): ignored
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'P' => return Err(malformed("text persistent ids are not used by torch.save")),
                other => return Err(PickleError::UnsupportedOpcode(other)),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(malformed("odd number of dict items"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: &mut Value, items: Vec<(Value, Value)>) -> Result<(), PickleError> {
    match target {
        Value::Dict(d) => {
            // Kept in order; a repeated key (never written by torch.save) is left for
            // readers to resolve, the later entry winning as in Python.
            Rc::make_mut(d).extend(items);
            Ok(())
        }
        // Items of a data-only object (e.g. a callback's dict subclass): not needed.
        Value::Opaque(_) => Ok(()),
        _ => Err(malformed("SETITEM on something that is not a dict")),
    }
}

fn append(target: &mut Value, items: Vec<Value>) -> Result<(), PickleError> {
    match target {
        Value::List(l) => {
            Rc::make_mut(l).extend(items);
            Ok(())
        }
        Value::Opaque(_) => Ok(()),
        _ => Err(malformed("APPEND on something that is not a list")),
    }
}

fn long_from_bytes(b: &[u8]) -> Result<i64, PickleError> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 8 {
        return Err(malformed("an integer wider than 64 bits"));
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let mut a = [if negative { 0xff } else { 0 }; 8];
    a[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(a))
}

/// `torch.save` names storages as `("storage", StorageType, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value, PickleError> {
    let items = match pid {
        Value::Tuple(t) => t,
        _ => return Err(malformed("a persistent id is not a tuple")),
    };
    match items.as_slice() {
        [Value::Str(tag), ty, Value::Str(key), _location, _numel] if tag == "storage" => {
            let kind = match ty {
                Value::Global(Global::StorageType(k)) | Value::Global(Global::Dtype(k)) => *k,
                _ => return Err(malformed(format!("storage `{key}` has no known element type"))),
            };
            Ok(Value::Storage(StorageRef { key: key.clone(), kind }))
        }
        _ => Err(malformed("a persistent id is not a torch storage")),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>, PickleError> {
    match v {
        Value::Tuple(t) | Value::List(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                _ => Err(malformed(format!("a tensor's {what} is not a list of integers"))),
            })
            .collect(),
        _ => Err(malformed(format!("a tensor's {what} is not a tuple"))),
    }
}

/// What "calling" an allowed global gives, as data.
fn call(callee: Value, args: Value) -> Result<Value, PickleError> {
    let args = match args {
        Value::Tuple(t) => t,
        _ => return Err(malformed("call arguments are not a tuple")),
    };
    let g = match callee {
        Value::Global(g) => g,
        // Calling the result of a data-only call: still data-only.
        Value::Opaque(name) => return Ok(Value::Opaque(name)),
        _ => return Err(malformed("a call of something that is not a function")),
    };
    match g {
        Global::RebuildTensor => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 {
                return Err(malformed("_rebuild_tensor_v2 with too few arguments"));
            }
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                _ => return Err(malformed("_rebuild_tensor_v2 without a storage")),
            };
            let offset = match &args[1] {
                Value::Int(i) => *i,
                _ => return Err(malformed("a tensor's storage offset is not an integer")),
            };
            let size = ints(&args[2], "size")?;
            let stride = ints(&args[3], "stride")?;
            if size.len() != stride.len() {
                return Err(malformed("a tensor's size and stride differ in length"));
            }
            Ok(Value::Tensor(TensorRef { storage, offset, size, stride }))
        }
        Global::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err(malformed("_rebuild_parameter without a tensor")),
        },
        Global::OrderedDict => Ok(Value::Dict(Rc::new(Vec::new()))),
        Global::StorageType(_) | Global::Dtype(_) => Err(malformed("a storage type or dtype called as a function")),
        Global::Inert(name) => Ok(Value::Opaque(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_containers_and_numbers() {
        // {"a": [1, -2, 300, 70000, 1.5, True, None], "b": ("x",)} as protocol 2
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b']', b'(', b'K', 1, 0x8a, 1, 0xfe, b'M', 44, 1, b'J'];
        p.extend_from_slice(&70000u32.to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&1.5f64.to_be_bytes());
        p.extend_from_slice(&[0x88, b'N', b'e', 0x8c, 1, b'b', 0x8c, 1, b'x', 0x85, b'u', b'.']);
        let v = read(&p).unwrap();
        let Value::Dict(d) = v else { panic!("not a dict") };
        assert_eq!(d.len(), 2);
        let Value::List(l) = &d[0].1 else { panic!() };
        assert_eq!(
            l.as_slice(),
            &[
                Value::Int(1),
                Value::Int(-2),
                Value::Int(300),
                Value::Int(70000),
                Value::Float(1.5),
                Value::Bool(true),
                Value::None
            ]
        );
    }

    #[test]
    fn refuses_os_system() {
        let p = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.";
        let e = read(p).unwrap_err();
        assert_eq!(e.to_string(), "its pickle asks for `os.system`, which could run code");
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(read(p).unwrap_err(), PickleError::ForbiddenGlobal(g) if g == "builtins.eval"));
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        assert!(read(b"\x80\x02}q").is_err());
        assert!(read(b"").is_err());
        assert!(read(b"\xff\xff").is_err());
        assert!(read(b"\x80\x02h\x05.").is_err());
        assert!(read(b"\x80\x02e.").is_err());
    }
}
