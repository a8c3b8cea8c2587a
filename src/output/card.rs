//! The README.md model card written beside merged weights, fit to
//! publish: Hub metadata naming the source models and how the output
//! relates to them, the licence carried from the inputs' own cards with
//! the attribution that licence asks for, the method, the inputs, the
//! recipe and a usage snippet. It holds nothing time- or
//! machine-dependent, so re-running a recipe gives the same card.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::output::manifest::{MANIFEST_FILE, RecipeRecord};
use crate::output::sidecars::SideFiles;
use crate::plan::{Plan, Role};

pub(crate) use crate::model::CARD_FILE;

/// The card's YAML front matter: the Hub's model metadata, so the Hub
/// shows the model tree. `base_model` holds Hub ids only (a local path is
/// not a model the Hub knows), and models only (a stored vector or an
/// adapter is not a base model).
#[derive(Serialize)]
struct FrontMatter<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    license: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    license_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    license_link: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    base_model: Vec<&'a str>,
    /// `merge` for merges and chat vectors, `finetune` for a merged LoRA;
    /// only beside a `base_model` (the Hub reads it as a relation to one).
    #[serde(skip_serializing_if = "Option::is_none")]
    base_model_relation: Option<&'static str>,
    library_name: &'static str,
    pipeline_tag: &'static str,
    tags: Vec<&'static str>,
}

/// A model's licence as its card's metadata states it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Licence {
    /// The Hub's licence id (`llama3`, `apache-2.0`, `other`).
    pub id: String,
    /// For `other`: its name and where it is.
    pub name: Option<String>,
    pub link: Option<String>,
}

impl Licence {
    /// What it is called in a sentence: the name of an `other` licence.
    fn label(&self) -> String {
        match (&self.name, self.id.as_str()) {
            (Some(n), "other") => n.clone(),
            _ => self.id.clone(),
        }
    }
}

/// The licence in a model directory's README.md front matter, if any.
pub(crate) fn read_licence(dir: &std::path::Path) -> Option<Licence> {
    let path = dir.join(CARD_FILE);
    let bytes = crate::json::read_capped(&path, 4 << 20).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix("---")?;
    let end = rest.find("\n---")?;
    let meta: serde_yaml_ng::Value = serde_yaml_ng::from_str(&rest[..end]).ok()?;
    let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string).filter(|v| !v.is_empty());
    Some(Licence { id: field("license")?, name: field("license_name"), link: field("license_link") })
}

/// What a licence asks a derived model's card to say (and, where it asks
/// something of the model's name, that too).
fn attribution(l: &Licence) -> Vec<&'static str> {
    let name = l.name.as_deref().unwrap_or_default().to_ascii_lowercase();
    match l.id.as_str() {
        "llama3" => vec![
            "Built with Meta Llama 3.",
            "The Meta Llama 3 Community License asks that a model built from it be named beginning with \"Llama 3\".",
        ],
        "llama3.1" | "llama3.2" | "llama3.3" => vec![
            "Built with Llama.",
            "The Llama 3.x Community License asks that a model built from it be named beginning with \"Llama\".",
        ],
        "llama2" => vec![
            "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. All Rights Reserved.",
        ],
        "gemma" => vec![
            "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms.",
        ],
        _ if name.contains("qwen") || name.contains("tongyi") => vec!["Built with Qwen."],
        _ => Vec::new(),
    }
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

/// The card for `plan`, made by `method`, from `recipe` when there is
/// one, added to `side` (whose chat template decides the usage snippet);
/// inputs whose licences differ are warned about there.
pub(crate) fn model_card(
    plan: &Plan,
    method: &str,
    recipe: Option<&RecipeRecord>,
    side: &mut SideFiles,
) -> Result<()> {
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
    // The licence: the base's (else the first input's that states one);
    // inputs under other licences are named, since each still applies.
    let licences: Vec<(&str, Licence)> =
        plan.inputs.iter().filter_map(|i| read_licence(&i.ckpt.dir).map(|l| (i.label.as_str(), l))).collect();
    let base_licence = plan
        .inputs
        .iter()
        .filter(|i| i.role == Role::Base)
        .find_map(|i| read_licence(&i.ckpt.dir))
        .or_else(|| licences.first().map(|(_, l)| l.clone()));
    if let Some(chosen) = &base_licence
        && licences.iter().any(|(_, l)| l != chosen)
    {
        let all: Vec<String> = licences.iter().map(|(who, l)| format!("{who}: {}", l.label())).collect();
        side.warnings.push(format!(
            "the inputs' licences differ ({}); the card states the base's ({}), and each input's licence still applies to what it contributed",
            all.join(", "),
            chosen.label()
        ));
    }
    let mut attributions: Vec<&str> = Vec::new();
    for (_, l) in &licences {
        for a in attribution(l) {
            if !attributions.contains(&a) {
                attributions.push(a);
            }
        }
    }
    let has_template = side.get("chat_template.jinja").is_some()
        || side.json("tokenizer_config.json")?.is_some_and(|c| c.contains("chat_template"));
    let mut tags = vec!["chatvec", "merge"];
    if vector {
        tags.push("chat-vector");
    }
    if lora {
        tags = vec!["chatvec", "lora"];
    }
    let relation = if lora { "finetune" } else { "merge" };
    let front = FrontMatter {
        license: base_licence.as_ref().map(|l| l.id.clone()),
        license_name: base_licence.as_ref().and_then(|l| l.name.clone()),
        license_link: base_licence.as_ref().and_then(|l| l.link.clone()),
        base_model_relation: (!base_model.is_empty()).then_some(relation),
        base_model,
        library_name: "transformers",
        pipeline_tag: "text-generation",
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
    usage(&mut s, has_template);
    if let Some(l) = &base_licence {
        let _ = write!(s, "\n## License\n\n{}", l.label());
        if let Some(link) = &l.link {
            let _ = write!(s, " ({link})");
        }
        s.push_str(", the base model's licence.");
        if licences.iter().any(|(_, x)| x != l) {
            s.push_str(" The inputs' licences:\n\n");
            for (who, x) in &licences {
                let _ = writeln!(s, "- `{who}`: {}", x.label());
            }
        } else {
            s.push('\n');
        }
    }
    for a in &attributions {
        let _ = write!(s, "\n{a}\n");
    }
    let _ = write!(
        s,
        "\n## Provenance\n\n`{MANIFEST_FILE}` lists the sha256 of every input and output file; `chatvec verify` checks them.\n"
    );
    side.add(CARD_FILE, s.into_bytes());
    Ok(())
}

/// How to run the model, with transformers and with vLLM, from its own
/// directory (or, once pushed, its Hub id in place of `"."`).
fn usage(s: &mut String, chat: bool) {
    s.push_str("\n## Usage\n\nFrom this directory (or with its Hub id in place of `\".\"` once pushed), with transformers:\n\n```python\n");
    s.push_str("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n");
    s.push_str("tokenizer = AutoTokenizer.from_pretrained(\".\")\n");
    s.push_str("model = AutoModelForCausalLM.from_pretrained(\".\", dtype=\"auto\")\n");
    if chat {
        s.push_str("messages = [{\"role\": \"user\", \"content\": \"日本の首都はどこですか?\"}]\n");
        s.push_str("inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n");
    } else {
        s.push_str("inputs = tokenizer(\"日本の首都は\", return_tensors=\"pt\")\n");
    }
    s.push_str("output = model.generate(**inputs, max_new_tokens=64)\n");
    s.push_str("print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```\n\n");
    s.push_str("With vLLM:\n\n```python\nfrom vllm import LLM, SamplingParams\n\nllm = LLM(model=\".\")\n");
    if chat {
        s.push_str("out = llm.chat([{\"role\": \"user\", \"content\": \"日本の首都はどこですか?\"}], SamplingParams(max_tokens=64))\n");
    } else {
        s.push_str("out = llm.generate([\"日本の首都は\"], SamplingParams(max_tokens=64))\n");
    }
    s.push_str("print(out[0].outputs[0].text)\n```\n\nor as a server: `vllm serve .`\n");
}

/// The card of a model trained by `chatvec sft` from `input` (named
/// `reference`): a fine-tune of it, under its licence (read from its
/// card), with the lineage its chatvec manifest records, the training
/// settings, and the usage snippets.
pub(crate) fn sft_card(reference: &str, input: &std::path::Path, settings: &[(&str, String)]) -> Vec<u8> {
    // A Hub model trained on is the base_model; a local one (a merge) is
    // described by its lineage below.
    let hub_id = hub_like(reference.split('@').next().unwrap_or(reference))
        .then(|| reference.split('@').next().unwrap_or(reference).to_string());
    let licence = read_licence(input);
    let front = FrontMatter {
        license: licence.as_ref().map(|l| l.id.clone()),
        license_name: licence.as_ref().and_then(|l| l.name.clone()),
        license_link: licence.as_ref().and_then(|l| l.link.clone()),
        base_model: hub_id.iter().map(String::as_str).collect(),
        base_model_relation: hub_id.is_some().then_some("finetune"),
        library_name: "transformers",
        pipeline_tag: "text-generation",
        tags: vec!["chatvec", "sft", "trl"],
    };
    let yaml = serde_yaml_ng::to_string(&front).unwrap_or_default();
    let mut s = format!("---\n{yaml}---\n\n# Fine-tuned model\n\n");
    let _ = writeln!(
        s,
        "Trained with chatvec {} (`chatvec sft`, TRL's SFT trainer) from `{reference}`.\n",
        env!("CARGO_PKG_VERSION")
    );
    // The lineage: what the input model was made from, as its manifest says.
    if let Ok(m) = crate::json::read_value(&input.join(MANIFEST_FILE), 64 << 20)
        && let Some(inputs) = m["inputs"].as_array()
    {
        s.push_str("It was made by chatvec from:\n\n");
        for i in inputs {
            let _ = writeln!(
                s,
                "- {}: `{}`",
                i["role"].as_str().unwrap_or("input"),
                i["reference"].as_str().unwrap_or("?")
            );
        }
        s.push('\n');
    }
    s.push_str("## Training\n\n");
    for (k, v) in settings {
        let _ = writeln!(s, "- {k}: {v}");
    }
    usage(&mut s, true);
    if let Some(l) = &licence {
        let _ = writeln!(s, "\n## License\n\n{}, the licence of `{reference}`.", l.label());
        for a in attribution(l) {
            let _ = write!(s, "\n{a}\n");
        }
    }
    let _ = write!(
        s,
        "\n## Provenance\n\n`{MANIFEST_FILE}` lists the sha256 of every file of this model; `chatvec verify` checks them.\n"
    );
    s.into_bytes()
}

/// One evaluation figure of a model, as its card states it.
pub(crate) struct Figure {
    /// The benchmark or task (`ja-mt-bench`, `jcommonsenseqa/acc`).
    pub bench: String,
    /// What the number is (`mean grade (judge gpt-4o)`, `acc`).
    pub metric: String,
    pub value: f64,
    /// Its 95% interval.
    pub interval: Option<(f64, f64)>,
}

/// Adds what an evaluation measured to the card in `dir`: the Hub's
/// `model-index` metadata for `figures` (this model's) and an Evaluation
/// section holding `table` (every candidate's figures, as the selection
/// ranked them), replacing an earlier one. The manifest's record of the
/// card is updated with it, so `chatvec verify` still passes.
pub(crate) fn add_evaluation(
    dir: &std::path::Path,
    name: &str,
    figures: &[Figure],
    table: &str,
) -> Result<()> {
    let path = dir.join(CARD_FILE);
    let text = String::from_utf8(crate::json::read_capped(&path, 16 << 20)?)
        .map_err(|_| Error::bad_file(&path, "is not UTF-8"))?;
    let (front, body) = text
        .strip_prefix("---\n")
        .and_then(|t| t.split_once("\n---\n"))
        .ok_or_else(|| Error::bad_file(&path, "has no YAML front matter"))?;
    let mut meta: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(front).map_err(|e| Error::bad_file(&path, format!("front matter: {e}")))?;
    let results: Vec<serde_yaml_ng::Value> = figures
        .iter()
        .filter(|f| f.value.is_finite())
        .map(|f| {
            let v = serde_json::json!({
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": f.bench, "type": f.bench},
                "metrics": [{"type": f.metric, "value": f.value, "name": f.metric}],
            });
            serde_yaml_ng::to_value(v).unwrap_or_default()
        })
        .collect();
    if let Some(m) = meta.as_mapping_mut() {
        if results.is_empty() {
            m.remove("model-index");
        } else {
            let index = serde_json::json!([{"name": name, "results": []}]);
            let mut index = serde_yaml_ng::to_value(index).unwrap_or_default();
            if let Some(first) = index.get_mut(0).and_then(|x| x.as_mapping_mut()) {
                first.insert("results".into(), serde_yaml_ng::Value::Sequence(results));
            }
            m.insert("model-index".into(), index);
        }
    }
    let yaml = serde_yaml_ng::to_string(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    // The body without an earlier Evaluation section, the new one before
    // the provenance.
    let mut body = body.to_string();
    if let Some(start) = body.find("\n## Evaluation\n") {
        let end = body[start + 1..].find("\n## ").map_or(body.len(), |e| start + 1 + e);
        body.replace_range(start..end, "");
    }
    let mut section = String::from("\n## Evaluation\n\n");
    for f in figures {
        let iv = f.interval.map_or(String::new(), |(lo, hi)| format!(" (95% interval {lo:.3} to {hi:.3})"));
        let _ = writeln!(section, "- {} {}: {:.3}{iv}", f.bench, f.metric, f.value);
    }
    section.push('\n');
    section.push_str(table);
    let at = body.find("\n## Provenance\n").unwrap_or(body.len());
    body.insert_str(at, &section);
    let card = format!("---\n{yaml}---\n{body}");
    crate::output::files::write_atomically(&path, card.as_bytes())?;
    // The manifest records the card's bytes and hash: that entry changes,
    // every other key keeps its text (as `manifest::add_record` edits it).
    let mpath = dir.join(MANIFEST_FILE);
    let bytes = crate::json::read_capped(&mpath, 64 << 20)?;
    let mut files = crate::json::read_value(&mpath, 64 << 20)?["files"].clone();
    if let Some(list) = files.as_array_mut() {
        for f in list.iter_mut().filter(|f| f["file"] == CARD_FILE) {
            f["bytes"] = serde_json::json!(card.len());
            f["sha256"] = serde_json::json!(crate::hash::sha256_hex(card.as_bytes()));
        }
    }
    let mut m = crate::json::RawObject::parse(&bytes, &mpath)?;
    m.set("files", &files)?;
    crate::output::files::write_atomically(&mpath, &m.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evaluation goes into the card once (a second one replaces the
    /// first), as model-index metadata and a section before the
    /// provenance, and the manifest's record of the card follows it.
    #[test]
    fn evaluation_results_replace_the_cards_section_and_keep_the_manifest_true() {
        let d = tempfile::tempdir().unwrap();
        let card = "---\nlicense: llama3\n---\n\n# Merged model\n\n## Provenance\n\nfiles.\n";
        std::fs::write(d.path().join(CARD_FILE), card).unwrap();
        let manifest = serde_json::json!({"format": 1, "files": [
            {"file": "config.json", "bytes": 2, "sha256": "aa"},
            {"file": CARD_FILE, "bytes": card.len(), "sha256": crate::hash::sha256_hex(card.as_bytes())},
        ]});
        std::fs::write(d.path().join(MANIFEST_FILE), manifest.to_string()).unwrap();
        let fig = |v: f64| Figure {
            bench: "ja-mt-bench".into(),
            metric: "mean grade".into(),
            value: v,
            interval: Some((v - 1.0, v + 1.0)),
        };
        add_evaluation(d.path(), "m", &[fig(6.0)], "| rank |\n").unwrap();
        add_evaluation(d.path(), "m", &[fig(7.5)], "| rank |\n").unwrap();
        let text = std::fs::read_to_string(d.path().join(CARD_FILE)).unwrap();
        assert_eq!(text.matches("## Evaluation").count(), 1, "{text}");
        assert!(text.contains("ja-mt-bench mean grade: 7.500 (95% interval 6.500 to 8.500)"), "{text}");
        assert!(text.find("## Evaluation").unwrap() < text.find("## Provenance").unwrap(), "{text}");
        let front = text.strip_prefix("---\n").and_then(|t| t.split_once("\n---\n")).unwrap().0;
        let meta: serde_yaml_ng::Value = serde_yaml_ng::from_str(front).unwrap();
        assert_eq!(meta["license"].as_str(), Some("llama3"));
        assert_eq!(meta["model-index"][0]["results"][0]["metrics"][0]["value"].as_f64(), Some(7.5));
        let m = crate::json::read_value(&d.path().join(MANIFEST_FILE), 1 << 20).unwrap();
        assert_eq!(m["files"][1]["sha256"], crate::hash::sha256_hex(text.as_bytes()));
        assert_eq!(m["files"][1]["bytes"], text.len());
        assert_eq!(m["files"][0]["sha256"], "aa");
        assert_eq!(m["format"], 1);
    }
}
