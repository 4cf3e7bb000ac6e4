//! The ArgoCD health check, run by a Lua 5.4 interpreter against its `health_test.yaml`, the
//! format ArgoCD's own resource-customization tests use.

use std::path::PathBuf;

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::Value;

fn dir() -> PathBuf {
    // At run time: a binary reused from a shared target dir may come from another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../config/argocd/semantis.dev/SemanticCache")
}

fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Null => LuaValue::Nil,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => LuaValue::Integer(i),
            None => LuaValue::Number(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
        Value::Object(map) => {
            let t = lua.create_table()?;
            for (k, item) in map {
                t.set(k.as_str(), to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

#[test]
fn the_health_check_passes_its_argocd_test_cases() -> anyhow::Result<()> {
    let script = std::fs::read_to_string(dir().join("health.lua"))?;
    let tests: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("health_test.yaml"))?)?;
    let cases = tests["tests"].as_array().expect("tests list");
    assert!(cases.len() >= 6, "every state has a case");
    for case in cases {
        let input = case["inputPath"].as_str().expect("inputPath");
        let obj: Value = serde_yaml::from_str(&std::fs::read_to_string(dir().join(input))?)?;
        let lua = Lua::new();
        lua.globals().set("obj", to_lua(&lua, &obj)?)?;
        let hs: Table = lua.load(&script).set_name(input).eval()?;
        let status: String = hs.get("status")?;
        let message: String = hs.get("message")?;
        assert_eq!(
            (status.as_str(), message.as_str()),
            (
                case["healthStatus"]["status"].as_str().expect("status"),
                case["healthStatus"]["message"].as_str().expect("message")
            ),
            "{input}"
        );
    }
    Ok(())
}
