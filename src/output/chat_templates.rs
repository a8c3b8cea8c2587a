//! A recipe's `chat_template` (mergekit's key): `auto` (the template most
//! of the inputs share), one of the built-in formats mergekit names
//! (`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`; chatvec's own Jinja
//! for each), or the Jinja text itself. The chosen template replaces the
//! reference model's in the output's tokenizer files.

use std::path::Path;

use crate::error::{Error, Result};
use crate::output::sidecars::{SideFiles, chat_template_text, install_template};

/// ChatML (`<|im_start|>role ... <|im_end|>`), as Qwen and many fine-tunes use it.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's headers and `<|eot_id|>`.
const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Alpaca's `### Instruction:` / `### Response:` blocks, a system message first.
const ALPACA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}";

/// Mistral's `[INST] ... [/INST]`, a system message joined to the first user turn.
const MISTRAL: &str = "{{ bos_token }}{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}{% for message in messages %}{% if message['role'] == 'user' %}{% if system and loop.index0 <= 1 %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";

/// EXAONE's `[|role|] ... [|endofturn|]` turns.
const EXAONE: &str = "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}";

/// The built-in formats, by mergekit's names.
pub(crate) const BUILT_IN: &[(&str, &str)] =
    &[("alpaca", ALPACA), ("chatml", CHATML), ("exaone", EXAONE), ("llama3", LLAMA3), ("mistral", MISTRAL)];

/// The template `spec` names, given the inputs' directories (for `auto`,
/// the template most of them have, the first in input order among equal
/// counts), and how it was chosen. `None`: `auto` found no template.
pub(crate) fn resolve(spec: &str, inputs: &[&Path]) -> Result<Option<(String, String)>> {
    if spec == "auto" {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for dir in inputs {
            if let Some(t) = chat_template_text(dir)? {
                let t = t.trim().to_string();
                match seen.iter_mut().find(|(s, _)| *s == t) {
                    Some(e) => e.1 += 1,
                    None => seen.push((t, 1)),
                }
            }
        }
        let best = seen.iter().map(|(_, n)| *n).max();
        return Ok(seen
            .into_iter()
            .find(|(_, n)| Some(*n) == best)
            .map(|(t, n)| (t, format!("auto: the template {n} of the {} inputs have", inputs.len()))));
    }
    if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == spec) {
        return Ok(Some((text.to_string(), format!("the built-in {name} template"))));
    }
    if spec.len() < 20 || !spec.contains('{') {
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        return Err(Error::Usage(format!(
            "chat_template: '{spec}' is neither auto, a built-in template ({}), nor a Jinja template",
            names.join(", ")
        )));
    }
    Ok(Some((spec.to_string(), "the recipe's own Jinja template".into())))
}

/// Sets the output's chat template as `spec` says.
pub(crate) fn apply(side: &mut SideFiles, spec: &str, inputs: &[&Path]) -> Result<()> {
    match resolve(spec, inputs)? {
        Some((text, how)) => install_template(side, &text, &format!("chat template: {how}")),
        None => {
            side.warnings.push("chat_template: auto found no template among the inputs; the output keeps the reference model's".into());
            Ok(())
        }
    }
}
