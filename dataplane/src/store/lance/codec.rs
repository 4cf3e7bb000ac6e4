//! The one Arrow shape of an [`Entry`]: the table schema, entries → record batch, and back.

use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, Float64Array, Int64Array,
    RecordBatch, StringArray, UInt64Array, types::Float32Type,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use semantis_cache::entry::{Entry, Held, Removed, footprint};

/// The schema of every entry table, for `dimension`-sized vectors.
pub fn schema(dimension: usize) -> SchemaRef {
    let dim = i32::try_from(dimension).unwrap_or(i32::MAX);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("scope", DataType::Utf8, false),
        Field::new("namespace", DataType::Utf8, false),
        Field::new("exact_key", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("vector", vector_type(dim), false),
        Field::new("response", DataType::Binary, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("created_at", DataType::Int64, false),
        Field::new("expires_at", DataType::Int64, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        Field::new("cost_usd", DataType::Float64, false),
        Field::new("metadata", DataType::Utf8, false),
    ]))
}

/// The vector column's type for `dimension`-sized vectors.
pub fn vector_type(dimension: i32) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        dimension,
    )
}

/// The vector width `schema` holds.
pub fn dimension_of(schema: &SchemaRef) -> i32 {
    match schema.field_with_name("vector").map(|f| f.data_type()) {
        Ok(DataType::FixedSizeList(_, d)) => *d,
        _ => 0,
    }
}

/// Entries → one record batch of `schema`.
pub fn encode(schema: &SchemaRef, entries: &[Arc<Entry>]) -> Result<RecordBatch, String> {
    let dim = dimension_of(schema);
    if let Some(e) = entries
        .iter()
        .find(|e| i32::try_from(e.vector.len()).ok() != Some(dim))
    {
        return Err(format!(
            "failed to build a record batch: entry {} has a {}-dimensional vector, the table holds {dim}",
            e.id,
            e.vector.len()
        ));
    }
    let strings = |f: fn(&Entry) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(entries.iter().map(|e| f(e))))
    };
    let vectors = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
        entries
            .iter()
            .map(|e| Some(e.vector.iter().copied().map(Some).collect::<Vec<_>>())),
        dim,
    );
    let columns: Vec<ArrayRef> = vec![
        strings(|e| &e.id),
        strings(|e| &e.scope),
        strings(|e| &e.namespace),
        strings(|e| &e.exact_key),
        strings(|e| &e.prompt),
        Arc::new(vectors),
        Arc::new(BinaryArray::from_iter_values(
            entries.iter().map(|e| e.response.as_ref()),
        )),
        strings(|e| &e.model),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.created_at_ms),
        )),
        Arc::new(Int64Array::from_iter_values(
            entries.iter().map(|e| e.expires_at_ms),
        )),
        Arc::new(UInt64Array::from_iter_values(
            entries.iter().map(|e| e.prompt_tokens),
        )),
        Arc::new(UInt64Array::from_iter_values(
            entries.iter().map(|e| e.completion_tokens),
        )),
        Arc::new(Float64Array::from_iter_values(
            entries.iter().map(|e| e.cost_usd),
        )),
        strings(|e| &e.metadata),
    ];
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| format!("failed to build a record batch: {e}"))
}

/// Rows (every column) → entries.
pub fn decode(b: &RecordBatch) -> Result<Vec<Entry>, String> {
    let id = strings(b, "id")?;
    let scope = strings(b, "scope")?;
    let namespace = strings(b, "namespace")?;
    let exact_key = strings(b, "exact_key")?;
    let prompt = strings(b, "prompt")?;
    let vector = column::<FixedSizeListArray>(b, "vector")?;
    let response = column::<BinaryArray>(b, "response")?;
    let model = strings(b, "model")?;
    let created = column::<Int64Array>(b, "created_at")?;
    let expires = column::<Int64Array>(b, "expires_at")?;
    let ptok = column::<UInt64Array>(b, "prompt_tokens")?;
    let ctok = column::<UInt64Array>(b, "completion_tokens")?;
    let cost = column::<Float64Array>(b, "cost_usd")?;
    let metadata = strings(b, "metadata")?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let v = vector.value(i);
        let v = v
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or("vector items are not f32")?;
        out.push(Entry {
            id: id.value(i).to_owned(),
            scope: scope.value(i).to_owned(),
            namespace: namespace.value(i).to_owned(),
            exact_key: exact_key.value(i).to_owned(),
            prompt: prompt.value(i).to_owned(),
            vector: Arc::from(v.values().as_ref()),
            response: Arc::from(response.value(i)),
            model: model.value(i).to_owned(),
            created_at_ms: created.value(i),
            expires_at_ms: expires.value(i),
            prompt_tokens: ptok.value(i),
            completion_tokens: ctok.value(i),
            cost_usd: cost.value(i),
            metadata: metadata.value(i).to_owned(),
        });
    }
    Ok(out)
}

/// The columns [`decode_removed`] reads.
pub const REMOVED_COLUMNS: [&str; 2] = ["id", "exact_key"];

/// Rows selected with [`REMOVED_COLUMNS`] → what a delete must purge elsewhere.
pub fn decode_removed(b: &RecordBatch, out: &mut Vec<Removed>) -> Result<(), String> {
    let ids = strings(b, "id")?;
    let keys = strings(b, "exact_key")?;
    out.extend((0..b.num_rows()).map(|i| Removed {
        id: ids.value(i).to_owned(),
        exact_key: keys.value(i).to_owned(),
    }));
    Ok(())
}

/// The columns [`decode_ids`] reads.
pub const ID_COLUMNS: [&str; 2] = ["id", "created_at"];

/// Rows selected with [`ID_COLUMNS`] → `(id, created_at)` pairs.
pub fn decode_ids(b: &RecordBatch, out: &mut Vec<(String, i64)>) -> Result<(), String> {
    let ids = strings(b, "id")?;
    let created = column::<Int64Array>(b, "created_at")?;
    out.extend((0..b.num_rows()).map(|i| (ids.value(i).to_owned(), created.value(i))));
    Ok(())
}

/// The columns [`decode_held`] reads.
pub const HELD_COLUMNS: [&str; 5] = ["id", "created_at", "prompt", "response", "metadata"];

/// Rows selected with [`HELD_COLUMNS`] → what eviction tracks of them, for vectors of
/// `dimension`.
pub fn decode_held(b: &RecordBatch, dimension: usize, out: &mut Vec<Held>) -> Result<(), String> {
    let ids = strings(b, "id")?;
    let created = column::<Int64Array>(b, "created_at")?;
    let prompt = strings(b, "prompt")?;
    let response = column::<BinaryArray>(b, "response")?;
    let metadata = strings(b, "metadata")?;
    let len = |n: i32| usize::try_from(n).unwrap_or(0);
    out.extend((0..b.num_rows()).map(|i| Held {
        id: ids.value(i).to_owned(),
        created_at_ms: created.value(i),
        bytes: footprint(
            len(prompt.value_length(i)),
            len(response.value_length(i)),
            len(metadata.value_length(i)),
            dimension,
        ),
    }));
    Ok(())
}

fn strings<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| format!("column `{name}` is missing or not a string"))
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column `{name}` is missing or of the wrong type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, response: &[u8]) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            scope: "s".into(),
            namespace: "n".into(),
            exact_key: format!("k-{id}"),
            prompt: "p".into(),
            vector: Arc::from(vec![0.5f32, -0.25, 1.0]),
            response: Arc::from(response.to_vec()),
            model: "m".into(),
            created_at_ms: 1,
            expires_at_ms: i64::MAX,
            prompt_tokens: u64::MAX,
            completion_tokens: 4,
            cost_usd: 0.125,
            metadata: "{}".into(),
        })
    }

    #[test]
    fn entries_survive_a_round_trip_through_arrow() {
        let schema = schema(3);
        let entries = vec![entry("a", b"{}"), entry("b", &[0, 255, 7])];
        let batch = encode(&schema, &entries).expect("encode");
        let back = decode(&batch).expect("decode");
        assert_eq!(
            back,
            entries.iter().map(|e| (**e).clone()).collect::<Vec<_>>()
        );
        let mut removed = Vec::new();
        let narrow = batch.project(&[0, 3]).expect("project id and exact_key");
        decode_removed(&narrow, &mut removed).expect("decode removed");
        assert_eq!(removed[1].exact_key, "k-b");
    }

    #[test]
    fn a_vector_of_the_wrong_width_is_refused() {
        let err = encode(&schema(4), &[entry("a", b"{}")]).expect_err("3 values into 4");
        assert!(err.starts_with("failed to build a record batch"), "{err}");
        assert_eq!(dimension_of(&schema(384)), 384);
    }
}
