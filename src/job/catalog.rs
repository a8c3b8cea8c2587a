//! `chatvec list`: the model and vector aliases in effect and the shipped
//! recipes, so a newcomer can see what names work without reading files.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::error::Result;
use crate::recipe::{Recipe, SHIPPED};
use crate::resolve::alias_list;

/// A model alias.
#[derive(Serialize)]
pub struct ModelAliasEntry {
    /// The short name.
    pub name: String,
    /// The Hub repository (and revision) it stands for.
    pub hub: String,
}

/// A vector alias: a (chat, pretrained) pair whose difference is the vector.
#[derive(Serialize)]
pub struct VectorAliasEntry {
    /// The short name.
    pub name: String,
    /// The chat model.
    pub chat: String,
    /// The pretrained model.
    pub pretrained: String,
}

/// A recipe shipped with chatvec, runnable by name.
#[derive(Serialize)]
pub struct RecipeEntry {
    /// The name `chatvec merge` takes.
    pub name: String,
    /// Its description.
    pub description: String,
}

/// Every alias in effect (built in, then the user's aliases file) and every
/// shipped recipe.
#[derive(Serialize)]
pub struct Catalog {
    /// Model aliases.
    pub models: Vec<ModelAliasEntry>,
    /// Vector aliases.
    pub vectors: Vec<VectorAliasEntry>,
    /// Shipped recipes.
    pub recipes: Vec<RecipeEntry>,
}

/// Lists the aliases in effect and the shipped recipes.
pub fn catalog() -> Result<Catalog> {
    let (models, vectors) = alias_list()?;
    let recipes = SHIPPED
        .iter()
        .map(|(name, _)| {
            let r = Recipe::load(name)?;
            let name = r.name.unwrap_or_else(|| name.to_string());
            Ok(RecipeEntry { name, description: r.description.unwrap_or_default() })
        })
        .collect::<Result<_>>()?;
    Ok(Catalog {
        models: models.into_iter().map(|(name, hub)| ModelAliasEntry { name, hub }).collect(),
        vectors: vectors
            .into_iter()
            .map(|(name, chat, pretrained)| VectorAliasEntry { name, chat, pretrained })
            .collect(),
        recipes,
    })
}

impl fmt::Display for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::from("model aliases (use as MODEL, optionally NAME@REVISION):\n");
        let w = self.models.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in &self.models {
            let _ = writeln!(s, "  {:w$}  {}", m.name, m.hub);
        }
        s.push_str("\nvector aliases (use as --vector NAME: chat - pretrained):\n");
        let w = self.vectors.iter().map(|v| v.name.len()).max().unwrap_or(0);
        for v in &self.vectors {
            let _ = writeln!(s, "  {:w$}  {} - {}", v.name, v.chat, v.pretrained);
        }
        s.push_str("\nshipped recipes (use as chatvec merge NAME -o DIR):\n");
        let w = self.recipes.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &self.recipes {
            let _ = writeln!(s, "  {:w$}  {}", r.name, r.description);
        }
        f.write_str(&s)
    }
}
