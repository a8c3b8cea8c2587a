//! The README.md model card written beside merged weights, as mergekit
//! writes one: Hub metadata naming the source models, the method, the
//! inputs and the recipe. It holds nothing time- or machine-dependent, so
//! re-running a recipe gives the same card.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::output::manifest::{MANIFEST_FILE, RecipeRecord};
use crate::plan::Plan;

pub const CARD_FILE: &str = "README.md";

/// The card's YAML front matter: the Hub's model metadata.
#[derive(Serialize)]
struct FrontMatter<'a> {
    base_model: Vec<&'a str>,
    library_name: &'static str,
    tags: [&'static str; 2],
}

/// The card for `plan`, made by `method`, from `recipe` when there is one.
pub fn model_card(plan: &Plan, method: &str, recipe: Option<&RecipeRecord>) -> Result<Vec<u8>> {
    let front = FrontMatter {
        base_model: plan
            .inputs
            .iter()
            .map(|i| i.ckpt.origin.as_ref().map_or(i.label.as_str(), |o| o.repo.as_str()))
            .collect(),
        library_name: "transformers",
        tags: ["chatvec", "merge"],
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
