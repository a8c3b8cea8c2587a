//! Entry points for the fuzz targets in `fuzz/`: each parser of untrusted
//! input, over raw bytes. Only built with `--cfg fuzzing`.

use std::path::Path;

/// Parses a safetensors file's bytes (header and layout checks).
pub fn safetensors(bytes: &[u8]) {
    let _ = crate::model::safetensors::parse_header(bytes, Path::new("fuzz.safetensors"));
}

/// Parses a `model.safetensors.index.json`'s bytes.
pub fn index(bytes: &[u8]) {
    let _ = crate::model::checkpoint::parse_index(bytes, false, Path::new("fuzz.index.json"));
}

/// Parses a `config.json`'s bytes and compares it with itself.
pub fn config(bytes: &[u8]) {
    if let Ok(c) = crate::model::config::ModelConfig::parse(bytes, Path::new("config.json")) {
        let _ = crate::model::config::architecture_differences(&c, &c);
        let _ = c.summary();
    }
}

/// Reads a PyTorch `.bin` checkpoint's bytes (zip directory, `data.pkl`
/// pickle, each tensor's storage entry and byte range).
pub fn torch_bin(bytes: &[u8]) {
    let _ = crate::model::torch_bin::parse_bin(bytes, Path::new("pytorch_model.bin"));
}

/// Parses a recipe: the first byte picks the syntax (even, e.g. `T`:
/// chatvec TOML; odd, e.g. `Y`: mergekit YAML), the rest is the text;
/// non-UTF-8 text is skipped, as `Recipe::load` refuses it before parsing.
pub fn recipe(bytes: &[u8]) {
    let Some((&first, rest)) = bytes.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let path = if first % 2 == 0 { "recipe.toml" } else { "recipe.yml" };
    let _ = crate::recipe::parse_recipe(text, Path::new(path));
}

/// Reads a `tokenizer.json`'s vocabulary, then looks a few tokens and ids
/// up in it.
pub fn tokenizer(bytes: &[u8]) {
    if let Ok(v) = crate::model::tokenizer::Vocab::parse(bytes, Path::new("tokenizer.json")) {
        for id in [0, 1, u32::MAX as u64, u64::MAX] {
            if let Some(t) = v.token(id) {
                let _ = v.id(t);
            }
        }
        let _ = v.id("");
    }
}

/// Parses a PEFT `adapter_config.json` (its checks, `rank_pattern` and
/// `alpha_pattern` compiled; no weights), then looks a few module names up
/// in the pattern maps.
pub fn adapter_config(bytes: &[u8]) {
    let file = Path::new("adapter_config.json");
    if let Ok(c) = crate::model::adapter::LoraConfig::parse(bytes, file) {
        let mut work = 0;
        for module in ["model.layers.0.self_attn.q_proj", "lm_head", "q_proj", "", ".", "a..b.", "é.ü"] {
            let _ = c.rank_alpha(module, &mut work);
        }
    }
}
