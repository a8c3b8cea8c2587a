//! The README.md model card written beside merged weights, as mergekit
//! writes one: Hub metadata naming the source models, the method, the
//! inputs and the recipe. It holds nothing time- or machine-dependent, so
//! re-running a recipe gives the same card.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::output::manifest::{MANIFEST_FILE, RecipeRecord};
use crate::plan::{Plan, Role};

pub(crate) const CARD_FILE: &str = "README.md";

/// The card's YAML front matter: the Hub's model metadata, so the Hub
/// shows the model tree. `base_model` holds Hub ids only (a local path is
/// not a model the Hub knows), and models only (a stored vector or an
/// adapter is not a base model).
#[derive(Serialize)]
struct FrontMatter<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    base_model: Vec<&'a str>,
    /// `merge` for merges and chat vectors, `finetune` for a merged LoRA.
    base_model_relation: &'static str,
    library_name: &'static str,
    tags: Vec<&'static str>,
}

/// Whether `s` reads as a Hub id (`org/name`), not a local path.
fn hub_like(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !std::path::Path::new(s).exists()
}

/// The card for `plan`, made by `method`, from `recipe` when there is one.
pub(crate) fn model_card(plan: &Plan, method: &str, recipe: Option<&RecipeRecord>) -> Result<Vec<u8>> {
    let lora = plan.inputs.iter().any(|i| i.role == Role::Adapter);
    let vector = plan.inputs.iter().any(|i| matches!(i.role, Role::Vector | Role::Chat));
    let mut base_model: Vec<&str> = Vec::new();
    for i in plan.inputs.iter().filter(|i| !matches!(i.role, Role::Vector | Role::Adapter)) {
        let id = match &i.ckpt.origin {
            Some(o) => o.repo.as_str(),
            None if hub_like(&i.label) => i.label.as_str(),
            None => continue,
        };
        if !base_model.contains(&id) {
            base_model.push(id);
        }
    }
    let mut tags = vec!["chatvec", "merge"];
    if vector {
        tags.push("chat-vector");
    }
    if lora {
        tags = vec!["chatvec", "lora"];
    }
    let front = FrontMatter {
        base_model,
        base_model_relation: if lora { "finetune" } else { "merge" },
        library_name: "transformers",
        tags,
    };
    let yaml = serde_yaml_ng::to_string(&front)
        .map_err(|e| Error::Internal(format!("writing the model card's metadata: {e}")))?;
    let mut s = format!("---\n{yaml}---\n\n# Merged model\n\n");
    let _ = writeln!(
        s,
        "This model was made with chatvec {} by **{method}** from these models:\n",
        env!("CARGO_PKG_VERSION")
    );
    for i in &plan.inputs {
        let role = format!("{:?}", i.role).to_lowercase();
        match &i.ckpt.origin {
            Some(o) => {
                let _ =
                    writeln!(s, "- {role}: `{}` ({}@{}, commit `{}`)", i.label, o.repo, o.revision, o.commit);
            }
            None => {
                let _ = writeln!(s, "- {role}: `{}`", i.label);
            }
        }
    }
    if let Some(r) = recipe {
        let lang = if r.syntax == "mergekit" { "yaml" } else { "toml" };
        let _ = write!(s, "\n## Recipe\n\n```{lang}\n{}", r.text);
        if !r.text.ends_with('\n') {
            s.push('\n');
        }
        s.push_str("```\n");
    }
    let _ = write!(
        s,
        "\n## Provenance\n\n`{MANIFEST_FILE}` lists the sha256 of every input and output file; `chatvec verify` checks them.\n"
    );
    Ok(s.into_bytes())
}
