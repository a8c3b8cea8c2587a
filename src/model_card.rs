//! The README.md model card written beside merged weights, as mergekit
//! writes one: Hub metadata naming the source models, the method, the
//! inputs and the recipe. It holds nothing time- or machine-dependent, so
//! re-running a recipe gives the same card.

use std::fmt::Write as _;

use crate::manifest::{MANIFEST_FILE, RecipeRecord};
use crate::plan::Plan;

pub const CARD_FILE: &str = "README.md";

/// YAML-quotes a string (double quotes, escapes).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The card for `plan`, made by `method`, from `recipe` when there is one.
pub fn model_card(plan: &Plan, method: &str, recipe: Option<&RecipeRecord>) -> Vec<u8> {
    let mut s = String::from("---\nbase_model:\n");
    for i in &plan.inputs {
        let name = i.ckpt.origin.as_ref().map_or(i.label.as_str(), |o| o.repo.as_str());
        let _ = writeln!(s, "- {}", quoted(name));
    }
    s.push_str("library_name: transformers\ntags:\n- chatvec\n- merge\n---\n\n# Merged model\n\n");
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
        let lang = match r.syntax {
            crate::recipe::Syntax::Toml => "toml",
            crate::recipe::Syntax::Mergekit => "yaml",
        };
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
    s.into_bytes()
}
