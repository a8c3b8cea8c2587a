//! The built-in evaluation set, written for this project: short Japanese
//! and English chat prompts, each with a reference reply. The prompts are
//! what `eval` generates from; the (prompt, reply) pairs are the held-out
//! conversations its assistant-token loss is measured on when no `--data`
//! is given. Japanese first, since the tool exists for Japanese models.

/// (language, prompt, reference reply).
const BUILT_IN: [(&str, &str, &str); 12] = [
    ("ja", "日本の首都はどこですか?", "日本の首都は東京です。"),
    (
        "ja",
        "おすすめの朝ごはんを一つ教えてください。",
        "ご飯と味噌汁、焼き魚の和朝食がおすすめです。栄養のバランスが良く、一日を元気に始められます。",
    ),
    ("ja", "「ありがとう」を英語で何と言いますか?", "英語では「Thank you」と言います。"),
    (
        "ja",
        "雨の日の楽しい過ごし方を三つ挙げてください。",
        "読書をする、映画を観る、料理に挑戦する、の三つがおすすめです。",
    ),
    ("ja", "富士山の高さを教えてください。", "富士山の高さは3,776メートルです。"),
    (
        "ja",
        "短い自己紹介をしてください。",
        "こんにちは。私は質問に日本語でお答えするAIアシスタントです。よろしくお願いします。",
    ),
    ("ja", "1から5までの数字を足すといくつになりますか?", "1+2+3+4+5で、合計は15です。"),
    (
        "ja",
        "夏バテを防ぐにはどうすればいいですか?",
        "こまめな水分補給、十分な睡眠、栄養のある食事を心がけましょう。",
    ),
    ("en", "What is the capital of France?", "The capital of France is Paris."),
    (
        "en",
        "Give me one tip for writing clear emails.",
        "Put the main point in the first sentence, then add only the details the reader needs.",
    ),
    ("en", "How many days are in a leap year?", "A leap year has 366 days."),
    ("en", "Say hello in Japanese.", "In Japanese, hello is \"konnichiwa\" (こんにちは)."),
];

/// The prompts, as the worker takes them: one user turn and its language.
pub(crate) fn prompts() -> Vec<serde_json::Value> {
    BUILT_IN
        .iter()
        .map(|(l, q, _)| serde_json::json!({"messages": [{"role": "user", "content": q}], "lang": l}))
        .collect()
}

/// The (prompt, reference reply) conversations the loss is measured on.
pub(crate) fn conversations() -> Vec<serde_json::Value> {
    BUILT_IN
        .iter()
        .map(|(_, q, a)| serde_json::json!([{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
        .collect()
}
