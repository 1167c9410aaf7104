//! Untrusted input of the YAML-directory source: a file of `---`-separated documents, as a user or
//! a tool writes them. Reading, validation and the whole translation to mesh state must never
//! panic, and every object that is kept has a name (and a namespace where its kind needs one).
#![no_main]

use ca::objects::{Object, Objects};
use ca::translate::{translate, MeshConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (objects, _errors) = ca::source::dir::parse_documents(text);
    let mut all = Objects::default();
    for object in objects {
        let key = object.key();
        assert!(!key.name.is_empty(), "an object without a name was kept: {key}");
        all.insert(object);
    }
    let state = translate(&all, &MeshConfig::default());
    let _ = state.config_errors.len();
    let _ = Object::from_value(serde_json::Value::Null);
});
