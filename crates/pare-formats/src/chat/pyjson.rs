//! The `tojson` filter as transformers defines it for chat templates: Python's
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
//!
//! Jinja's and minijinja's own `tojson` escape `<`, `>`, `&` and `'` for HTML and format
//! differently; a tool schema rendered into a prompt must match transformers byte for byte, so
//! Python's exact spacing, escaping and float spelling are reproduced here.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// `json.dumps` options that templates pass as keyword arguments.
struct Options {
    ensure_ascii: bool,
    /// `None`: one line; `Some(s)`: one item per line, nested levels indented by `s`.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// The filter: `{{ value | tojson }}`, `{{ value | tojson(indent=2) }}`, ...
pub(super) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => return Err(invalid("tojson: indent must be an integer or a string")),
        },
    };
    // Python's defaults: no space before newlines when indenting.
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (a.to_string(), b.to_string()),
                _ => return Err(invalid("tojson: separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let options = Options {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_value(&mut out, &value, &options, 0)?;
    Ok(Value::from(out))
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.to_string())
}

fn write_value(out: &mut String, value: &Value, o: &Options, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let x = f64::try_from(value.clone())?;
            out.push_str(&match x {
                x if x.is_nan() => "NaN".to_string(),
                x if x.is_infinite() => if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string(),
                x => python_float(x),
            })
        }
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            let mut items = Vec::with_capacity(keys.len());
            for key in keys {
                let item = value.get_item(&key)?;
                items.push((key, item));
            }
            write_container(out, '{', '}', items.len(), o, depth, |out, i| {
                let (key, item) = &items[i];
                write_key(out, key, o)?;
                out.push_str(&o.key_sep);
                write_value(out, item, o, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), o, depth, |out, i| write_value(out, &items[i], o, depth + 1))?;
        }
        _ => return Err(invalid(&format!("tojson: object of kind {} is not JSON serializable", value.kind()))),
    }
    Ok(())
}

/// Writes `[`/`{`, `n` items through `item`, and the closer, with Python's layout.
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    n: usize,
    o: &Options,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        if let Some(indent) = &o.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &o.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python converts non-string keys to strings: `1` → `"1"`, `True` → `"true"`, `None` → `"null"`.
fn write_key(out: &mut String, key: &Value, o: &Options) -> Result<(), Error> {
    match key.kind() {
        ValueKind::String => write_string(out, key.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Bool | ValueKind::None | ValueKind::Number => {
            let mut text = String::new();
            write_value(&mut text, key, o, 0)?;
            write_string(out, &text, o.ensure_ascii);
        }
        kind => return Err(invalid(&format!("tojson: keys must be str, int, float, bool or None, not {kind}"))),
    }
    Ok(())
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `float.__repr__`: shortest round-trip digits, `1.0` not `1`, exponent form below
/// 1e-4 and from 1e16 on with a signed two-digit exponent, `nan` and `inf` (JSON spells those
/// differently; its writer handles them first).
pub(super) fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` is shortest round-trip too: "1.5e-7", "1e16".
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_spell_like_python() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(-2.5), "-2.5");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(123456789.0), "123456789.0");
        assert_eq!(python_float(f64::NAN), "nan");
        assert_eq!(python_float(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn strings_escape_like_python() {
        let mut out = String::new();
        write_string(&mut out, "a\"b\\c\nd\u{1}é<>&'", false);
        assert_eq!(out, r#""a\"b\\c\nd\u0001é<>&'""#);
        let mut out = String::new();
        write_string(&mut out, "é😀", true);
        assert_eq!(out, r#""\u00e9\ud83d\ude00""#);
    }
}
