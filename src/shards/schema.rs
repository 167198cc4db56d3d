//! The Arrow schema of a shard and its footer metadata keys
//! (schemas/shard.md is the normative description).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};

use super::{LatentDType, SCHEMA_VERSION, ShardError};

/// Column: the row key (utf8).
pub const COL_KEY: &str = "key";
/// Column: the class index (int32).
pub const COL_LABEL: &str = "label";
/// Column: whether the row is the flipped crop (bool).
pub const COL_FLIP: &str = "flip";
/// Column: the latent, a fixed-size list of tokens*C values.
pub const COL_LATENT: &str = "latent";
/// Column: per-token f32 scales (int8 shards only).
pub const COL_SCALE: &str = "scale";
/// Name of the list item field (Arrow's and pyarrow's default).
pub const ITEM: &str = "item";

/// Footer key: the shard schema version.
pub const META_SCHEMA_VERSION: &str = "rae_cache.schema_version";
/// Footer key: the latent dtype name.
pub const META_DTYPE: &str = "rae_cache.dtype";
/// Footer key: tokens per row.
pub const META_TOKENS: &str = "rae_cache.tokens";
/// Footer key: channels per token.
pub const META_CHANNELS: &str = "rae_cache.channels";
/// Footer key: the version of rae-cache that wrote the shard.
pub const META_TOOL_VERSION: &str = "rae_cache.tool_version";
/// Keys every shard carries; callers add more (encoder, preprocessing...).
pub const REQUIRED_METADATA: [&str; 5] = [
    META_SCHEMA_VERSION,
    META_DTYPE,
    META_TOKENS,
    META_CHANNELS,
    META_TOOL_VERSION,
];

/// Canonical Arrow extension that makes readers see a [tokens, C] tensor.
pub const EXTENSION_NAME_KEY: &str = "ARROW:extension:name";
/// Arrow field metadata key holding the extension's parameters (the shape).
pub const EXTENSION_METADATA_KEY: &str = "ARROW:extension:metadata";
/// The extension's name.
pub const FIXED_SHAPE_TENSOR: &str = "arrow.fixed_shape_tensor";

/// This crate's version, written into every shard and manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Physical element type of the `latent` list for a dtype.
pub fn latent_item_type(dtype: LatentDType) -> DataType {
    match dtype {
        LatentDType::F16 => DataType::Float16,
        LatentDType::F32 => DataType::Float32,
        // bf16 has no Arrow/Parquet type: its bit patterns, unchanged.
        LatentDType::Bf16 => DataType::UInt16,
        LatentDType::Int8 => DataType::Int8,
    }
}

/// `FixedSizeList<item>(len)` with a nullable item field: the layout pyarrow
/// produces for tensors, so readers accept it without casting.
pub fn fixed_list(item: DataType, len: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new(ITEM, item, true)), len as i32)
}

/// `{"shape":[tokens,C]}`, the extension's serialized parameters.
pub fn tensor_extension_metadata(tokens: usize, channels: usize) -> String {
    format!("{{\"shape\":[{tokens},{channels}]}}")
}

/// The Arrow schema of a shard. The footer metadata ([`footer_metadata`])
/// goes into the Parquet key-value metadata, not into the Arrow schema, so
/// it is stored once.
pub fn arrow_schema(dtype: LatentDType, tokens: usize, channels: usize) -> Schema {
    let latent_meta = HashMap::from([
        (
            EXTENSION_NAME_KEY.to_string(),
            FIXED_SHAPE_TENSOR.to_string(),
        ),
        (
            EXTENSION_METADATA_KEY.to_string(),
            tensor_extension_metadata(tokens, channels),
        ),
    ]);
    let mut fields = vec![
        Field::new(COL_KEY, DataType::Utf8, false),
        Field::new(COL_LABEL, DataType::Int32, false),
        Field::new(COL_FLIP, DataType::Boolean, false),
        Field::new(
            COL_LATENT,
            fixed_list(latent_item_type(dtype), tokens * channels),
            false,
        )
        .with_metadata(latent_meta),
    ];
    if dtype == LatentDType::Int8 {
        fields.push(Field::new(
            COL_SCALE,
            fixed_list(DataType::Float32, tokens),
            false,
        ));
    }
    Schema::new(fields)
}

/// The footer key-value metadata written into every shard.
pub fn footer_metadata(
    dtype: LatentDType,
    tokens: usize,
    channels: usize,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut m = extra.clone();
    m.insert(META_SCHEMA_VERSION.into(), SCHEMA_VERSION.into());
    m.insert(META_DTYPE.into(), dtype.as_str().into());
    m.insert(META_TOKENS.into(), tokens.to_string());
    m.insert(META_CHANNELS.into(), channels.to_string());
    m.insert(META_TOOL_VERSION.into(), TOOL_VERSION.into());
    m
}

/// What a shard's footer says about its layout, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// Tokens per row.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
}

/// Parse and check the required footer keys and the Arrow schema against
/// what this version writes; errors name `path` and the offending part.
pub fn validate(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    schema: &Schema,
) -> Result<Layout, ShardError> {
    let get = |k: &str| {
        metadata.get(k).ok_or_else(|| {
            ShardError::format(
                path,
                format!("not a rae-cache shard: footer metadata lacks {k}"),
            )
        })
    };
    let version = get(META_SCHEMA_VERSION)?;
    if version != SCHEMA_VERSION {
        return Err(ShardError::format(
            path,
            format!("shard schema version {version}, this build reads version {SCHEMA_VERSION}"),
        ));
    }
    let dtype: LatentDType = get(META_DTYPE)?
        .parse()
        .map_err(|e: String| ShardError::format(path, e))?;
    let num = |k: &str| -> Result<usize, ShardError> {
        let v = get(k)?;
        v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ShardError::format(path, format!("{k} = {v:?} is not a positive integer"))
        })
    };
    let tokens = num(META_TOKENS)?;
    let channels = num(META_CHANNELS)?;
    let expected = arrow_schema(dtype, tokens, channels);
    for want in expected.fields() {
        let got = schema
            .field_with_name(want.name())
            .map_err(|_| ShardError::format(path, format!("missing column {:?}", want.name())))?;
        if !same_type(got.data_type(), want.data_type()) {
            return Err(ShardError::format(
                path,
                format!(
                    "column {:?} has type {}, expected {} for dtype {dtype}",
                    want.name(),
                    got.data_type(),
                    want.data_type()
                ),
            ));
        }
    }
    Ok(Layout {
        dtype,
        tokens,
        channels,
    })
}

/// Type equality that ignores list item names and nullability (other
/// writers may name the item "element" or declare it required).
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::FixedSizeList(fa, na), DataType::FixedSizeList(fb, nb)) => {
            na == nb && same_type(fa.data_type(), fb.data_type())
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_has_extension_and_scale_only_for_int8() {
        let s = arrow_schema(LatentDType::F16, 4, 3);
        let latent = s.field_with_name(COL_LATENT).unwrap();
        assert_eq!(latent.metadata()[EXTENSION_NAME_KEY], FIXED_SHAPE_TENSOR);
        assert_eq!(
            latent.metadata()[EXTENSION_METADATA_KEY],
            "{\"shape\":[4,3]}"
        );
        assert!(s.field_with_name(COL_SCALE).is_err());
        let s8 = arrow_schema(LatentDType::Int8, 4, 3);
        assert_eq!(
            s8.field_with_name(COL_SCALE).unwrap().data_type(),
            &fixed_list(DataType::Float32, 4)
        );
    }

    #[test]
    fn required_keys_override_extra() {
        let extra = BTreeMap::from([(META_DTYPE.to_string(), "bogus".to_string())]);
        let m = footer_metadata(LatentDType::F32, 1, 1, &extra);
        assert_eq!(m[META_DTYPE], "f32");
    }
}
