//! A minimal decoder for Kubernetes protobuf request bodies, for the kinds client-go's typed
//! clients write in practice against this server (helm stores releases in Secrets through a
//! typed client that sends protobuf). Responses are always JSON; clients accept that.

use serde_json::{json, Map, Value};

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn varint(&mut self) -> Option<u64> {
        let mut out = 0u64;
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
    }
    fn next(&mut self) -> Option<Result<(u64, Wire<'a>), ()>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let Some(key) = self.varint() else { return Some(Err(())) };
        let wire = match key & 7 {
            0 => match self.varint() {
                Some(v) => Wire::Varint(v),
                None => return Some(Err(())),
            },
            1 => {
                self.pos += 8;
                Wire::Fixed
            }
            5 => {
                self.pos += 4;
                Wire::Fixed
            }
            2 => {
                let Some(len) = self.varint() else { return Some(Err(())) };
                let end = self.pos.saturating_add(len as usize);
                if end > self.buf.len() {
                    return Some(Err(()));
                }
                let b = &self.buf[self.pos..end];
                self.pos = end;
                Wire::Bytes(b)
            }
            _ => return Some(Err(())),
        };
        Some(Ok((key >> 3, wire)))
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let mut r = Reader::new(buf);
    let mut out = vec![];
    while let Some(f) = r.next() {
        out.push(f.map_err(|_| "malformed protobuf".to_string())?);
    }
    Ok(out)
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = s(x),
            (2, Wire::Bytes(x)) => {
                v = if bytes_value {
                    use base64::Engine as _;
                    json!(base64::engine::general_purpose::STANDARD.encode(x))
                } else {
                    json!(s(x))
                }
            }
            _ => {}
        }
    }
    Ok((k, v))
}

fn time(b: &[u8]) -> Result<Value, String> {
    let mut secs = 0i64;
    for (n, w) in fields(b)? {
        if let (1, Wire::Varint(v)) = (n, w) {
            secs = v as i64;
        }
    }
    Ok(chrono::DateTime::from_timestamp(secs, 0).map(|t| json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())).unwrap_or(Value::Null))
}

fn owner_ref(b: &[u8]) -> Result<Value, String> {
    let mut o = Map::new();
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => {
                o.insert("kind".into(), json!(s(x)));
            }
            (3, Wire::Bytes(x)) => {
                o.insert("name".into(), json!(s(x)));
            }
            (4, Wire::Bytes(x)) => {
                o.insert("uid".into(), json!(s(x)));
            }
            (5, Wire::Bytes(x)) => {
                o.insert("apiVersion".into(), json!(s(x)));
            }
            (6, Wire::Varint(v)) => {
                o.insert("controller".into(), json!(v != 0));
            }
            (7, Wire::Varint(v)) => {
                o.insert("blockOwnerDeletion".into(), json!(v != 0));
            }
            _ => {}
        }
    }
    Ok(Value::Object(o))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut owners = vec![];
    let mut finalizers = vec![];
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => {
                m.insert("name".into(), json!(s(x)));
            }
            (2, Wire::Bytes(x)) => {
                m.insert("generateName".into(), json!(s(x)));
            }
            (3, Wire::Bytes(x)) => {
                m.insert("namespace".into(), json!(s(x)));
            }
            (5, Wire::Bytes(x)) => {
                m.insert("uid".into(), json!(s(x)));
            }
            (6, Wire::Bytes(x)) => {
                m.insert("resourceVersion".into(), json!(s(x)));
            }
            (7, Wire::Varint(v)) => {
                m.insert("generation".into(), json!(v as i64));
            }
            (8, Wire::Bytes(x)) => {
                m.insert("creationTimestamp".into(), time(x)?);
            }
            (11, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                labels.insert(k, v);
            }
            (12, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                annotations.insert(k, v);
            }
            (13, Wire::Bytes(x)) => owners.push(owner_ref(x)?),
            (14, Wire::Bytes(x)) => finalizers.push(json!(s(x))),
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    if !owners.is_empty() {
        m.insert("ownerReferences".into(), Value::Array(owners));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Ok(Value::Object(m))
}

/// Decodes a `k8s\0`-prefixed protobuf body into JSON for Secret, ConfigMap, Namespace and ServiceAccount.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body.strip_prefix(b"k8s\x00").ok_or("missing protobuf magic prefix")?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, w) in fields(rest)? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (tn, tw) in fields(tm)? {
                    match (tn, tw) {
                        (1, Wire::Bytes(x)) => api_version = s(x),
                        (2, Wire::Bytes(x)) => kind = s(x),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    let mut data = Map::new();
    let mut string_data = Map::new();
    let mut binary = Map::new();
    let mut pull_secrets = vec![];
    for (n, w) in fields(raw)? {
        match (kind.as_str(), n, w) {
            (_, 1, Wire::Bytes(x)) => {
                obj.insert("metadata".into(), object_meta(x)?);
            }
            ("Secret", 2, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, true)?;
                data.insert(k, v);
            }
            ("Secret", 3, Wire::Bytes(x)) => {
                obj.insert("type".into(), json!(s(x)));
            }
            ("Secret", 4, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                string_data.insert(k, v);
            }
            ("Secret", 5, Wire::Varint(v)) => {
                obj.insert("immutable".into(), json!(v != 0));
            }
            ("ConfigMap", 2, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                data.insert(k, v);
            }
            ("ConfigMap", 3, Wire::Bytes(x)) => {
                let (k, v) = map_entry(x, true)?;
                binary.insert(k, v);
            }
            ("ConfigMap", 4, Wire::Varint(v)) => {
                obj.insert("immutable".into(), json!(v != 0));
            }
            ("Namespace", 2, Wire::Bytes(_)) | ("Namespace", 3, Wire::Bytes(_)) => {}
            ("ServiceAccount", 3, Wire::Bytes(x)) => {
                let mut name = String::new();
                for (n, w) in fields(x)? {
                    if let (1, Wire::Bytes(v)) = (n, w) {
                        name = s(v);
                    }
                }
                pull_secrets.push(json!({"name": name}));
            }
            ("ServiceAccount", 4, Wire::Varint(v)) => {
                obj.insert("automountServiceAccountToken".into(), json!(v != 0));
            }
            ("ServiceAccount", _, _) => {}
            ("Secret" | "ConfigMap" | "Namespace", _, _) => {}
            (k, _, _) => return Err(format!("protobuf bodies for kind {k:?} are not supported; send JSON")),
        }
    }
    if !data.is_empty() {
        obj.insert("data".into(), Value::Object(data));
    }
    if !string_data.is_empty() {
        obj.insert("stringData".into(), Value::Object(string_data));
    }
    if !pull_secrets.is_empty() {
        obj.insert("imagePullSecrets".into(), Value::Array(pull_secrets));
    }
    if !binary.is_empty() {
        obj.insert("binaryData".into(), Value::Object(binary));
    }
    Ok(Value::Object(obj))
}
