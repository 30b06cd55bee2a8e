//! Typed access to a plugin's `parameters` mapping: every read names the key, every error names
//! the field (`plugins[2].parameters.threshold: must be …`), and keys nobody read are errors.

use serde_json::Value;

use super::picker_config::{PickerConfigError, err};

/// A plugin's parameters, consumed key by key.
pub struct Params<'a> {
    field: String,
    map: serde_json::Map<String, Value>,
    seen: Vec<&'a str>,
}

impl<'a> Params<'a> {
    /// `field` is the path of the mapping (for error messages); `v` may be absent or null.
    pub fn new(field: String, v: &Option<Value>) -> Result<Self, PickerConfigError> {
        let map = match v {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(err(field, "must be a mapping")),
        };
        Ok(Self {
            field,
            map,
            seen: Vec::new(),
        })
    }

    /// The raw value of `key` (null counts as absent).
    pub fn get(&mut self, key: &'a str) -> Option<Value> {
        self.seen.push(key);
        self.map.get(key).cloned().filter(|v| !v.is_null())
    }

    /// The path of `key`, for error messages.
    pub fn path(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }

    /// An error about `key`.
    pub fn error(&self, key: &str, reason: impl Into<String>) -> PickerConfigError {
        err(self.path(key), reason)
    }

    /// An integer > 0.
    pub fn positive(&mut self, key: &'a str) -> Result<Option<usize>, PickerConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                _ => Err(self.error(key, format!("must be a positive integer, got {v}"))),
            },
        }
    }

    /// An integer ≥ 0.
    pub fn count(&mut self, key: &'a str) -> Result<Option<usize>, PickerConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                None => Err(self.error(key, format!("must be an integer ≥ 0, got {v}"))),
            },
        }
    }

    /// A finite number ≥ 0.
    pub fn number(&mut self, key: &'a str) -> Result<Option<f64>, PickerConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
                _ => Err(self.error(key, format!("must be a number ≥ 0, got {v}"))),
            },
        }
    }

    /// A number in `[0, 1]`.
    pub fn fraction(&mut self, key: &'a str) -> Result<Option<f64>, PickerConfigError> {
        match self.number(key)? {
            Some(n) if n > 1.0 => Err(self.error(key, format!("must be between 0 and 1, got {n}"))),
            other => Ok(other),
        }
    }

    pub fn boolean(&mut self, key: &'a str) -> Result<Option<bool>, PickerConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.error(key, format!("must be true or false, got {v}"))),
        }
    }

    pub fn string(&mut self, key: &'a str) -> Result<Option<String>, PickerConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(key, format!("must be a string, got {v}"))),
        }
    }

    /// Fails on any parameter not read.
    pub fn finish(self) -> Result<(), PickerConfigError> {
        match self.map.keys().find(|k| !self.seen.contains(&k.as_str())) {
            Some(k) => Err(err(self.path(k), "unknown parameter")),
            None => Ok(()),
        }
    }
}
